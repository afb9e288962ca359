"""Structured output (decode/constraint.py): every output that ends parses and validates (the
`jsonschema` package as the oracle), on the bundled model and on random weights (where the mask
does all the work), in every mode, batched == alone; the mask equals a brute-force check of
each token; a schema llguidance cannot compile is a clear error; the server's response_format
on both routes."""
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.chat import chat_prompt
from dlmnumba.decode.constraint import Constraint, Grammar
from dlmnumba.errors import DecodeError
from dlmnumba.model_source import TOY_MODEL
from dlmnumba.tasks import TASKS, heldout

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0,
                                                 "maximum": 199}},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "word": {"type": "string", "maxLength": 6},
                                      "pick": {"enum": ["add", "sub", "copy"]}},
     "required": ["ok", "word", "pick"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
     "minItems": 1, "maxItems": 4},
]
MODES = [dict(mode="ar"), dict(mode="greedy", block_size=32),
         dict(mode="iterative", block_size=32, threshold=0.9),
         dict(mode="adaptive", block_size=32, threshold=0.9), dict(mode="spec")]


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(str(TOY_MODEL))


def _check(text, schema):
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
@pytest.mark.parametrize("si", range(len(SCHEMAS)))
def test_every_output_parses_and_validates_and_batched_equals_alone(toy, kw, si):
    schema = SCHEMAS[si]
    g = Grammar.json_schema(schema)
    gen = Generator(toy, DecodeSettings(max_tokens=48, **kw))
    prompts = [toy.tokenizer.encode(chat_prompt(toy.file.metadata, e.prompt))
               for t in TASKS for e in heldout(t, 3)]
    many = gen.generate_many(prompts, grammar=g)
    for p, out in zip(prompts, many):
        assert out.stats.finish_reason == "stop", out.text
        _check(out.text, schema)
        assert out.tokens == gen.generate(p, grammar=g).tokens  # batched == alone


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
def test_random_weights_the_mask_does_all_the_work(synth_model, kw):
    m = dlmnumba.load_model(synth_model())
    kw = {**kw, "block_size": 16} if "block_size" in kw else kw
    gen = Generator(m, DecodeSettings(max_tokens=80, **kw))
    rng = np.random.default_rng(3)
    for schema in SCHEMAS:
        g = Grammar.json_schema(schema)
        for n in (3, 9):
            out = gen.generate(rng.integers(0, m.spec.n_vocab - 1, n).tolist(), grammar=g)
            assert out.stats.finish_reason == "stop", out.text
            _check(out.text, schema)
    obj = gen.generate([5, 6, 7], grammar=Grammar.json_object())
    if obj.stats.finish_reason == "stop":  # any object: a long one may reach the budget
        assert isinstance(json.loads(obj.text), dict)


def test_the_mask_equals_a_brute_force_check_of_every_token(toy):
    """On the bundled model's 274-token vocabulary: at states along a JSON answer, the allowed
    set is exactly the tokens the matcher accepts one by one, and for an enum of strings
    exactly the tokens whose text keeps the output a prefix of an allowed value."""
    tok = toy.tokenizer
    eog = frozenset(toy.spec.eog_ids)
    c = Constraint(Grammar.json_schema(SCHEMAS[0]), tok, toy.n_vocab, eog)
    for t in tok.encode('{"answer":12}', add_bos=False):
        allowed = c.allowed()
        brute = np.zeros_like(allowed)
        for cand in range(toy.n_vocab):
            m = c.fork()
            brute[cand] = m.consume_token(cand)
        assert np.array_equal(allowed, brute)
        assert allowed[t]
        c.consume(t)
    values = ['"yes"', '"no"', '"maybe"']
    e = Constraint(Grammar.json_schema({"enum": ["yes", "no", "maybe"]}), tok, toy.n_vocab, eog)
    text = ""
    for t in tok.encode('"ma', add_bos=False):
        allowed = e.allowed()
        for cand in range(toy.n_vocab):
            piece = tok.token_bytes(cand).decode("utf-8", "replace")
            ok = bool(piece) and not tok.is_special(cand) and any(
                v.startswith(text + piece) for v in values)
            assert allowed[cand] == ok, (text, piece)
        e.consume(t)
        text += tok.token_bytes(t).decode()


def test_schemas_that_cannot_be_compiled_are_clear_errors(toy):
    for schema, needle in (({"not": {"type": "string"}}, "not"),
                           ({"$ref": "#/nope"}, "nope"), ("{", "not valid JSON")):
        with pytest.raises(DecodeError, match=needle):
            Grammar.json_schema(schema)


def test_cli_json_schema(tmp_path):
    import subprocess
    import sys
    good = tmp_path / "s.json"
    good.write_text(json.dumps(SCHEMAS[0]))
    p = subprocess.run([sys.executable, "-m", "dlmnumba", "generate", "What is 12+35?",
                        "--json-schema", str(good)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    _check(p.stdout.strip(), SCHEMAS[0])
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": {}}')
    p = subprocess.run([sys.executable, "-m", "dlmnumba", "generate", "hi", "--json-schema",
                        str(bad)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not" in p.stderr


def test_server_response_format_on_both_routes(toy):
    openai = pytest.importorskip("openai")
    from dlmnumba.server.app import ServerOptions, ServerState, create_app
    from dlmnumba.server.run import ThreadedServer
    srv = ThreadedServer(create_app(ServerState(ServerOptions(model_name="toy")),
                                    load=lambda: toy)).start()
    try:
        while httpx.get(srv.url + "/health").status_code != 200:
            pass
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is 12+35?"}]
        r = c.chat.completions.create(model="toy", messages=msgs, max_tokens=40,
                                      response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS[1]}}
        for mode in ("ar", "iterative"):
            r = c.chat.completions.create(model="toy", messages=msgs, max_tokens=48,
                                          response_format=rf, extra_body={"mode": mode})
            _check(r.choices[0].message.content, SCHEMAS[1])
        r = c.completions.create(model="toy", prompt="USER: Copy: ab<|eot_id|>ASSISTANT:",
                                 max_tokens=40, extra_body={"response_format": rf})
        _check(r.choices[0].text, SCHEMAS[1])
        bad = httpx.post(srv.url + "/v1/chat/completions", json={
            "messages": msgs, "response_format": {"type": "json_schema", "json_schema": {
                "name": "b", "schema": {"not": {}}}}})
        assert bad.status_code == 400 and "not" in bad.json()["error"]["message"]
        assert bad.json()["error"]["param"] == "response_format"
        odd = httpx.post(srv.url + "/v1/chat/completions",
                         json={"messages": msgs, "response_format": {"type": "xml"}})
        assert odd.status_code == 400
    finally:
        srv.stop()
