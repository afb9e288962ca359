"""Chat prompts: the model file's chat template (jinja2), else the seed server's prompt form.

The seed's form of one user turn is ``USER: {prompt}<|eot_id|>ASSISTANT:``.  For several
messages the fallback writes each as ``{ROLE}: {content}<|eot_id|>`` (the role upper-cased:
SYSTEM, USER, ASSISTANT) one after the other, then ``ASSISTANT:`` when a reply is wanted: the
same text as the seed-form template that `synth.vocab.seed_chat_template` writes into files
(the bundled toy model carries it), so a file with that template and a file without one see
the same prompt.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .gguf.spec import EOT_TEXT

TEMPLATE_KEY = "tokenizer.chat_template"
Message = Mapping[str, str]  # {"role": "user" | "assistant" | "system" | ..., "content": text}


def seed_chat(prompt: str) -> str:
    """The seed server's prompt form of one user prompt."""
    return seed_render([{"role": "user", "content": prompt}])


def seed_render(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Messages in the seed's form: `ROLE: content<|eot_id|>` each, then `ASSISTANT:`."""
    text = "".join(f"{m['role'].upper()}: {m['content']}{EOT_TEXT}" for m in _checked(messages))
    return text + ("ASSISTANT:" if add_generation_prompt else "")


def has_template(metadata: Mapping[str, Any]) -> bool:
    """True if the model file carries a chat template."""
    return bool(metadata.get(TEMPLATE_KEY))


def render_chat(metadata: Mapping[str, Any], messages: Sequence[Message],
                add_generation_prompt: bool = True) -> str:
    """The file's chat template rendered on messages (BOS left to the tokenizer), or the seed's
    form when the file has no template or its template fails to render."""
    messages = _checked(messages)
    template = metadata.get(TEMPLATE_KEY)
    if not template:
        return seed_render(messages, add_generation_prompt)
    import jinja2

    def raise_exception(message: str) -> None:  # templates call it on messages they refuse
        raise jinja2.TemplateError(message)

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token="", eos_token="")  # the tokenizer adds BOS itself
    except jinja2.TemplateError:
        return seed_render(messages, add_generation_prompt)


def chat_prompt(metadata: Mapping[str, Any], prompt: str) -> str:
    """One user prompt as a chat: what `generate --chat` and `eval` send."""
    return render_chat(metadata, [{"role": "user", "content": prompt}])


def prompt_text(metadata: Mapping[str, Any], prompt: str, chat: bool | None = None) -> str:
    """The text `generate` sends: the chat form when `chat` (None: when the file has a
    template), else the raw prompt."""
    if chat is None:
        chat = has_template(metadata)
    return chat_prompt(metadata, prompt) if chat else prompt


def _checked(messages: Sequence[Message]) -> list[Message]:
    """messages, each a mapping with text `role` and `content`; else ValueError."""
    out = list(messages)
    for i, m in enumerate(out):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"chat message {i} must have text 'role' and 'content', got {m!r}")
    return out
