"""Chat prompts: the file's template, else the seed's form, for one or several messages."""
import jinja2
import pytest

from dlmnumba.chat import chat_prompt, prompt_text, render_chat, seed_chat
from dlmnumba.synth.vocab import LLAMA3_STYLE_CHAT_TEMPLATE, build_char_vocab, seed_chat_template

TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+2?"},
        {"role": "assistant", "content": " 3"}, {"role": "user", "content": "And 2+2?"}]


def test_seed_form_of_one_prompt():
    assert seed_chat("hi") == "USER: hi<|eot_id|>ASSISTANT:"
    assert chat_prompt({}, "hi") == seed_chat("hi")


def test_fallback_concatenates_every_turn_in_the_seed_form():
    assert render_chat({}, TALK) == ("SYSTEM: Be brief.<|eot_id|>USER: What is 1+2?<|eot_id|>"
                                     "ASSISTANT:  3<|eot_id|>USER: And 2+2?<|eot_id|>ASSISTANT:")
    assert render_chat({}, TALK[:2], add_generation_prompt=False).endswith("1+2?<|eot_id|>")


def test_fallback_equals_the_seed_template_written_into_files():
    """A file carrying the seed-form template (the toy model) and a file without one see the
    same prompt, for several messages too."""
    template = seed_chat_template(build_char_vocab())
    for gen in (True, False):
        want = jinja2.Environment().from_string(template).render(
            messages=TALK, add_generation_prompt=gen)
        assert render_chat({"tokenizer.chat_template": template}, TALK, gen) == want
        assert render_chat({}, TALK, gen) == want


def test_file_template_renders_every_message_without_bos():
    md = {"tokenizer.chat_template": LLAMA3_STYLE_CHAT_TEMPLATE}
    text = render_chat(md, TALK[1:3])
    assert text == ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n3<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_text_chat_switch():
    md = {"tokenizer.chat_template": LLAMA3_STYLE_CHAT_TEMPLATE}
    assert prompt_text(md, "hi") == chat_prompt(md, "hi") != "hi"
    assert prompt_text(md, "hi", chat=False) == "hi"
    assert prompt_text({}, "hi") == "hi"  # no template: raw unless asked
    assert prompt_text({}, "hi", chat=True) == seed_chat("hi")


def test_broken_or_refusing_template_falls_back_to_the_seed_form():
    for template in ("{{ messages[0]['nope'] }}", "{{ raise_exception('no system role') }}"):
        assert render_chat({"tokenizer.chat_template": template}, TALK[1:2]) == \
            seed_chat("What is 1+2?")


@pytest.mark.parametrize("bad", [[{"role": "user"}], [{"role": 1, "content": "x"}], ["hi"]])
def test_malformed_messages_are_refused(bad):
    with pytest.raises(ValueError, match="message 0"):
        render_chat({}, bad)
