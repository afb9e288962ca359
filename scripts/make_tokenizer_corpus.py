"""Regenerate dlmnumba/data/corpus.txt, the license-clean text the synthetic BPE vocabulary is trained on.

All text below is original to this project. The output is deterministic (fixed seed, no
dependence on the machine), so rerunning the script must leave the committed file unchanged:
    python scripts/make_tokenizer_corpus.py && git diff --exit-code dlmnumba/data/corpus.txt
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "dlmnumba" / "data" / "corpus.txt"
SEED = 20240917
N_STORY_PARAGRAPHS = 150
N_EXTRA_ARITHMETIC_LINES = 20
N_EXTRA_CODE_BLOCKS = 2

PEOPLE = ["Anna", "Ben", "Carla", "David", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kemal", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sam", "Tomas",
          "my neighbour", "the baker", "our teacher", "a friend of mine", "the old man next door"]
PLACES = ["the kitchen", "the garden", "the market", "the library", "the station", "the park",
          "the office", "the beach", "the village square", "the bus stop", "the corner shop",
          "the hospital", "the school yard", "the bakery", "the river bank", "the museum"]
TIMES = ["Early in the morning", "Around noon", "In the late afternoon", "After dinner",
         "On Sunday", "Last winter", "Every Tuesday", "During the summer holidays",
         "Before sunrise", "Yesterday evening", "Later that week", "Once a month"]
ACTIVITIES = [
    "baked two loaves of bread with a crunchy crust",
    "repaired the squeaky wheel of an old bicycle",
    "planted tomatoes, beans and a row of sunflowers",
    "wrote a long letter to a cousin who lives abroad",
    "practised the piano until the neighbours started to hum along",
    "sorted a drawer full of screws, buttons and forgotten keys",
    "walked the dog along the river and counted the ducks",
    "cooked a spicy lentil soup for the whole family",
    "read three chapters of a mystery novel",
    "painted the fence a cheerful shade of green",
    "learned how to fold paper cranes",
    "cleaned the windows while listening to the radio",
    "helped a tourist find the right platform",
    "built a small shelf for the hallway",
    "tried a new recipe for apple cake",
    "fixed the leaking tap in the bathroom",
    "made a list of everything that needed to be done",
    "went jogging in the rain without an umbrella",
    "taught a younger sister how to ride a scooter",
    "spent an hour choosing between two kinds of cheese",
]
FEELINGS = ["happy", "tired", "surprised", "relieved", "proud", "curious", "calm", "hungry",
            "a little nervous", "quite pleased", "completely soaked", "ready for a nap"]
OBSERVATIONS = [
    "The weather changed three times before lunch.",
    "Nobody remembered where the spare key was hidden.",
    "It turned out that the shop closes early on holidays.",
    "The kettle whistled just as the phone began to ring.",
    "A cat watched the whole scene from the top of a wall.",
    "The smell of fresh coffee drifted down the street.",
    "Somebody had left a bright red umbrella on the bench.",
    "The train was late, but nobody seemed to mind.",
    "There were more questions than answers, as usual.",
    "The children laughed so loudly that the birds flew away.",
    "It was the first warm day of the year.",
    "The map was wrong, so they asked a stranger for directions.",
    "A quiet rain started to fall on the roofs.",
    "The instructions were longer than the actual task.",
    "Everything took twice as long as planned.",
    "The price of strawberries had doubled since last week.",
]
ADVICE = [
    "If you want good bread, give the dough enough time to rise.",
    "Water the plants in the evening, when the sun is low.",
    "Keep a notebook in your pocket; ideas arrive at strange moments.",
    "A short walk after lunch helps you think more clearly.",
    "Check the tyres before a long trip, and pack some water.",
    "When you learn a language, speak it out loud, even if it feels silly.",
    "Label the boxes before you move, or you will regret it later.",
    "Sleep is not a luxury; it is how the body repairs itself.",
    "Ask questions early, because small problems grow quickly.",
    "Save a little money each month, even if it is only a few coins.",
    "Turn off the stove before you answer the door.",
    "Read the recipe twice before you start cooking.",
]
QUESTIONS = [
    "What time does the next bus leave?",
    "Could you pass me the salt, please?",
    "Have you ever seen snow in April?",
    "Why does bread go stale so quickly?",
    "Where did you put the scissors?",
    "How many eggs do we need for the cake?",
    "Is it going to rain tomorrow?",
    "Which road is shorter, the one by the lake or the one through the hills?",
    "Do you know anyone who can fix a washing machine?",
    "Shouldn't we have left ten minutes ago?",
]
REPLIES = [
    "I'm not sure, but I'll check.",
    "It's right there, next to the fruit bowl.",
    "They've said it'll be sunny, but I don't believe them.",
    "We'd better hurry, or we'll miss it.",
    "You're right; I hadn't thought of that.",
    "She'll know, she's lived here for years.",
    "I can't remember, sorry!",
    "Let's ask at the desk.",
]

# Hand-written lines in other languages (original sentences, everyday topics).
MULTILINGUAL = [
    "Deutsch: Heute Morgen habe ich frisches Brot beim Bäcker an der Ecke gekauft.",
    "Deutsch: Der Zug nach München fährt um 14:35 Uhr von Gleis 7 ab.",
    "Deutsch: Im Garten wachsen Tomaten, Gurken und ein paar große Sonnenblumen.",
    "Deutsch: Könnten Sie mir bitte sagen, wo die nächste Apotheke ist?",
    "Deutsch: Wir treffen uns am Samstag im Park, wenn es nicht regnet.",
    "Deutsch: Die Straße ist wegen Bauarbeiten gesperrt; bitte nehmen Sie die Umleitung.",
    "Français : Ce matin, j'ai pris un café au lait sur la terrasse.",
    "Français : Le marché ouvre à huit heures et ferme à midi.",
    "Français : Nous avons passé l'après-midi à nettoyer le grenier.",
    "Français : Est-ce que tu sais où se trouve la gare ?",
    "Français : Il fait très beau aujourd'hui, allons nous promener au bord de la rivière.",
    "Français : Les enfants préparent une surprise pour l'anniversaire de leur grand-mère.",
    "Español: Mañana vamos a la playa si hace buen tiempo.",
    "Español: El autobús número doce pasa cada quince minutos.",
    "Español: ¿Dónde has dejado las llaves del coche?",
    "Español: Mi abuela cocina la mejor sopa de verduras del barrio.",
    "Español: Después de cenar, leímos un libro en voz alta.",
    "Español: ¡Qué alegría verte otra vez después de tanto tiempo!",
    "中文：今天早上我去市场买了新鲜的蔬菜和水果。",
    "中文：明天下午三点我们在图书馆门口见面。",
    "中文：这家小饭馆的面条非常好吃，价格也很便宜。",
    "中文：请问，去火车站怎么走？",
    "中文：周末我们打算去山上散步，顺便拍一些照片。",
    "中文：学习一门新的语言需要耐心和每天的练习。",
    "日本語：今朝は雨が降っていたので、傘を持って出かけました。",
    "日本語：駅の近くに新しいパン屋さんができました。",
    "日本語：週末は友達と一緒に公園でお弁当を食べました。",
    "日本語：すみません、この電車は東京駅に止まりますか？",
    "日本語：毎日少しずつ漢字を練習しています。",
    "日本語：カレーライスを作るのは意外と簡単です。",
    "Русский: Сегодня утром я купил свежий хлеб в булочной за углом.",
    "Русский: Поезд отправляется в восемь часов вечера.",
    "Русский: Летом мы часто ездим на дачу и собираем ягоды.",
    "Русский: Скажите, пожалуйста, как пройти к музею?",
    "Русский: Вчера было холодно, но сегодня светит солнце.",
    "Русский: Моя сестра учится играть на гитаре.",
    "العربية: ذهبت إلى السوق صباح اليوم واشتريت الخبز والفاكهة.",
    "العربية: الطقس جميل اليوم، لنذهب إلى الحديقة.",
    "العربية: أين محطة الحافلات من فضلك؟",
    "العربية: نحن نحب شرب الشاي مع الأصدقاء في المساء.",
    "العربية: تعلمت أختي الطبخ من جدتنا.",
    "हिन्दी: आज सुबह मैंने बाज़ार से ताज़ी सब्ज़ियाँ खरीदीं।",
    "हिन्दी: कल हम सब पार्क में पिकनिक मनाने जाएँगे।",
    "हिन्दी: कृपया मुझे बताइए कि रेलवे स्टेशन कहाँ है?",
    "हिन्दी: मेरी माँ बहुत स्वादिष्ट खाना बनाती हैं।",
    "हिन्दी: बारिश के बाद हवा बहुत ठंडी हो गई।",
    "Italiano: Stasera prepariamo la pasta con il pomodoro fresco.",
    "Português: Amanhã vamos visitar os nossos avós no campo.",
    "Nederlands: We fietsen elke ochtend samen naar school.",
    "Polski: Dziś rano piłem kawę i czytałem gazetę.",
    "Türkçe: Bu akşam arkadaşlarımla çay içmeye gideceğim.",
    "한국어: 오늘은 날씨가 좋아서 공원에서 산책을 했어요.",
    "Ελληνικά: Το πρωί ήπια καφέ στο μπαλκόνι.",
    "עברית: היום הלכנו לים עם כל המשפחה.",
]

EMOJI_LINES = [
    "Good morning! ☀️ Coffee is ready ☕ and the cat is asleep 🐈.",
    "Shopping list: 🍎 apples, 🥖 bread, 🧀 cheese, 🥚 eggs, 🍅 tomatoes.",
    "Weekend plans: 🚲 ride, 🏊 swim, 📚 read, 😴 nap.",
    "Happy birthday 🎂🎉🎈 — have a wonderful day! 🥳",
    "Weather today: 🌧️ rain in the morning, 🌤️ sunny later, 🌈 maybe a rainbow.",
    "Great job 👍👏 — see you tomorrow 👋",
    "The train is late again 🚆⏰😩",
    "Love this song 🎵🎶❤️",
    "Family: 👨‍👩‍👧‍👦 and flags: 🇩🇪 🇫🇷 🇪🇸 🇯🇵 🇮🇳",
    "Skin tones: 👋🏻 👋🏽 👋🏿, hearts: 💙💚💛🧡💜",
    "Symbols: © ® ™ € £ ¥ ° ± × ÷ ≠ ≤ ≥ ∞ → ← ↑ ↓ • … “quotes” ‘single’ «guillemets»",
    "Math: α + β = γ, ∑ xᵢ², √2 ≈ 1.4142, π ≈ 3.14159, ½ + ¼ = ¾",
]


def story_paragraph(rng: random.Random) -> str:
    """One short everyday paragraph from the templates."""
    who = rng.choice(PEOPLE)
    sentences = [
        f"{rng.choice(TIMES)}, {who} {rng.choice(ACTIVITIES)} in {rng.choice(PLACES)}.",
        rng.choice(OBSERVATIONS),
        f"Afterwards {who} felt {rng.choice(FEELINGS)}.",
    ]
    if rng.random() < 0.5:
        sentences.append(f"\"{rng.choice(QUESTIONS)}\" someone asked. \"{rng.choice(REPLIES)}\"")
    if rng.random() < 0.4:
        sentences.append(rng.choice(ADVICE))
    if rng.random() < 0.3:
        sentences.append(f"It cost {rng.randint(2, 95)}.{rng.randint(0, 99):02d} euros and took "
                         f"{rng.randint(5, 180)} minutes.")
    return " ".join(sentences)


def arithmetic_line(rng: random.Random) -> str:
    """A line of digits and arithmetic, so that number merges exist."""
    kind = rng.randrange(5)
    a, b = rng.randint(0, 99999), rng.randint(1, 9999)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        return f"{a % 1000} * {b % 100} = {(a % 1000) * (b % 100)}"
    if kind == 3:
        return f"{a} / {b} = {a / b:.4f}"
    return (f"Order #{rng.randint(1000, 99999)} on {rng.randint(2019, 2030)}-"
            f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} at {rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}, total {rng.randint(1, 999)}.{rng.randint(0, 99):02d}")


def code_block(rng: random.Random) -> str:
    """A small code-like snippet (Python, JSON, shell, C) with indentation and symbols."""
    name = rng.choice(["total", "count", "items", "value", "result", "buffer", "index", "name"])
    n = rng.randint(2, 64)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"def compute_{name}(values: list[int]) -> int:\n"
                f"    \"\"\"Return the sum of the first {n} values.\"\"\"\n"
                f"    {name} = 0\n"
                f"    for i, v in enumerate(values[:{n}]):\n"
                f"        if v % 2 == 0:\n"
                f"            {name} += v * i\n"
                f"    return {name}\n")
    if kind == 1:
        return (f'{{"id": {rng.randint(1, 9999)}, "{name}": "{rng.choice(PEOPLE)}", '
                f'"tags": ["a", "b"], "ok": true, "score": {rng.random():.3f}}}\n')
    if kind == 2:
        return (f"$ mkdir -p build/{name} && cd build/{name}\n"
                f"$ ls -la | grep -v '^total' | wc -l\n"
                f"{n}\n")
    return (f"for (int i = 0; i < {n}; ++i) {{\n"
            f"    {name}[i] = ({name}[i] << 2) ^ 0x{rng.randint(0, 0xFFFF):04x};\n"
            f"}}\n")


def build_corpus() -> str:
    """Assemble the corpus text deterministically."""
    rng = random.Random(SEED)
    parts: list[str] = []
    multilingual = list(MULTILINGUAL)
    for i in range(N_STORY_PARAGRAPHS):
        parts.append(story_paragraph(rng))
        if i % 3 == 0:
            parts.append(multilingual[(i // 3) % len(multilingual)])
        if i % 5 == 0:
            parts.append("\n".join(arithmetic_line(rng) for _ in range(4)))
        if i % 5 == 2:
            parts.append(code_block(rng).rstrip("\n"))
        if i % 12 == 7:
            parts.append(EMOJI_LINES[(i // 12) % len(EMOJI_LINES)])
    parts.append("\n".join(MULTILINGUAL))
    parts.append("\n".join(EMOJI_LINES))
    parts.append("\n".join(arithmetic_line(rng) for _ in range(N_EXTRA_ARITHMETIC_LINES)))
    parts.append("\n\n".join(code_block(rng).rstrip("\n") for _ in range(N_EXTRA_CODE_BLOCKS)))
    # Whitespace runs and tabs, so merges for indentation and blank lines exist.
    parts.append("Column A\tColumn B\tColumn C\n1\t2\t3\n  two spaces\n    four spaces\n"
                 "        eight spaces\n\n\nthree newlines above")
    return "\n\n".join(parts) + "\n"


def main() -> None:
    """Write the corpus and report its size."""
    text = build_corpus()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {OUT} ({len(text.encode('utf-8'))} bytes)")


if __name__ == "__main__":
    main()
