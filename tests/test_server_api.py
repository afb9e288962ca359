"""The server as tools use it, with the official `openai` client and raw HTTP: log-probabilities
(against a float64 log-softmax of Model.logits), echo, prompt lists, n, the models, tokenizer
and schema routes, and every answer counted."""
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.chat import render_chat
from dlmnumba.server.app import ServerOptions, ServerState, create_app
from dlmnumba.server.run import ThreadedServer

openai = pytest.importorskip("openai")
TOY = str(Path(dlmnumba.__file__).parent / "data" / "toy-dlm.gguf")
TIMEOUT = 120
PROMPT = "USER: What is 12+35?<|eot_id|>ASSISTANT:"


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(TOY)


@pytest.fixture(scope="module")
def server(toy):
    state = ServerState(ServerOptions(model_name="toy"), DecodeSettings(block_size=16))
    srv = ThreadedServer(create_app(state, load=lambda: toy)).start()
    while httpx.get(srv.url + "/health").status_code != 200:
        pass
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT,
                         max_retries=0)


def log_softmax(model, ids, attention="causal", block_size=None):
    """float64 log-softmax of Model.logits over [ids] (the mask token excluded)."""
    z = model.logits(ids, attention, block_size).astype(np.float64)
    z[:, model.spec.mask_id] = -np.inf
    mx = z.max(1, keepdims=True)
    return z - (mx + np.log(np.exp(z - mx).sum(1, keepdims=True)))


def _lib(model, ids, **kw):
    return Generator(model, DecodeSettings(**{"block_size": 16, **kw})).generate(ids)


def test_completion_echo_logprobs_equal_the_float64_oracle(client, toy):
    """What lm-evaluation-harness's loglikelihood asks: echo + logprobs, the prompt's tokens'
    log-probabilities (the first null), then the generated token's."""
    ids = toy.tokenizer.encode(PROMPT)
    r = client.completions.create(model="toy", prompt=ids, max_tokens=1, logprobs=1,
                                  echo=True, temperature=0, extra_body={"mode": "ar"})
    c = r.choices[0]
    want = _lib(toy, ids, mode="ar", max_tokens=1)
    lsm = log_softmax(toy, ids + want.tokens)
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    full = ids + want.tokens
    for i in range(1, len(full)):
        assert math.isclose(lp.token_logprobs[i], lsm[i - 1, full[i]], abs_tol=1e-6)
        top_token, top_lp = next(iter(lp.top_logprobs[i].items()))
        assert math.isclose(top_lp, lsm[i - 1].max(), abs_tol=1e-6)
    assert c.text == toy.tokenizer.decode(ids, skip_special=False) + want.text
    assert lp.text_offset[0] == 0 and lp.tokens[-1] == toy.tokenizer.decode(want.tokens)


@pytest.mark.parametrize("mode", ["ar", "spec", "greedy"])
def test_chat_logprobs_and_top_logprobs(client, toy, mode):
    r = client.chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "What is 12+35?"}], max_tokens=12,
        logprobs=True, top_logprobs=3, extra_body={"mode": mode})
    content = r.choices[0].logprobs.content
    ids = toy.tokenizer.encode(render_chat(toy.file.metadata,
                                           [{"role": "user", "content": "What is 12+35?"}]))
    want = _lib(toy, ids, mode=mode, max_tokens=12)
    assert "".join(e.token for e in content) == toy.tokenizer.decode(want.tokens,
                                                                      skip_special=False)
    assert r.choices[0].message.content == want.text
    for e in content:
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and math.isclose(e.logprob, tops[0])
    if mode != "greedy":  # ar and spec: each token's under the causal model, = the oracle
        lsm = log_softmax(toy, ids + want.tokens)
        for i, (e, t) in enumerate(zip(content, want.tokens)):
            assert math.isclose(e.logprob, lsm[len(ids) - 1 + i, t], abs_tol=1e-6)


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = dict(model="toy", prompt=PROMPT, max_tokens=10, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    lps, tokens = [], []
    for ch in client.completions.create(stream=True, **kw):
        if ch.choices and ch.choices[0].logprobs:
            lps += ch.choices[0].logprobs.token_logprobs
            tokens += ch.choices[0].logprobs.tokens
    assert tokens == whole.tokens and lps == whole.token_logprobs


def test_n_choices_and_prompt_lists(client, toy):
    greedy = client.completions.create(model="toy", prompt=PROMPT, max_tokens=8, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1  # temperature 0: n identical choices
    ids = toy.tokenizer.encode(PROMPT)
    sampled = client.completions.create(model="toy", prompt=ids, max_tokens=8, n=2,
                                        temperature=1.0, seed=5, extra_body={"mode": "ar"})
    for j, c in enumerate(sampled.choices):  # choice j: the request's seed + j
        s = DecodeSettings(mode="ar", max_tokens=8, block_size=16,
                           sampling=dlmnumba.Sampling(temperature=1.0, seed=5 + j))
        assert c.text == Generator(toy, s).generate(ids).text
    prompts = ["USER: Copy: abc<|eot_id|>ASSISTANT:", "USER: Reverse: xyz<|eot_id|>ASSISTANT:"]
    many = client.completions.create(model="toy", prompt=prompts, max_tokens=10, n=2)
    want = [_lib(toy, toy.tokenizer.encode(p), max_tokens=10).text for p in prompts]
    assert [c.text for c in many.choices] == [want[0], want[0], want[1], want[1]]
    as_ids = client.completions.create(model="toy", max_tokens=10,
                                       prompt=[toy.tokenizer.encode(p) for p in prompts])
    assert [c.text for c in as_ids.choices] == want
    assert many.usage.prompt_tokens == sum(len(toy.tokenizer.encode(p)) for p in prompts)
    streamed = {}
    for ch in client.completions.create(model="toy", prompt=prompts, max_tokens=10,
                                        stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: want[0], 1: want[1]}


def test_models_fields_ignored_and_tokenizer_routes(server, client, toy):
    assert client.models.retrieve("toy").id == "toy"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    r = client.chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "What is 1+1?"}], max_tokens=4,
        store=False, metadata={"a": "b"}, service_tier="auto", user="u",
        stream_options=None)
    assert r.choices[0].finish_reason in ("stop", "length")
    url = server.url
    vllm = httpx.post(url + "/tokenize", json={"prompt": "Copy: ab",
                                               "add_special_tokens": False}).json()
    assert vllm["tokens"] == toy.tokenizer.encode("Copy: ab", add_bos=False)
    info = httpx.get(url + "/tokenizer_info").json()
    assert toy.tokenizer.encode(info["eos_token"], add_bos=False) == [toy.spec.eot_id
                                                                     or toy.spec.eos_id]
    back = httpx.post(url + "/detokenize", json={"tokens": vllm["tokens"]}).json()
    assert back["prompt"] == back["content"] == "Copy: ab"


def test_openapi_schema_says_what_the_server_answers(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"], path
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "400" in chat and "text/event-stream" in chat["200"]["content"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    r = httpx.get(server.url + "/v1/chat/completions")  # a POST route
    assert r.status_code == 405 and "POST" in r.headers["Allow"]


def test_every_answer_is_counted(server):
    def count(status):
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith(f'dlmnumba_http_responses_total{{status="{status}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count(400)
    httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert count(400) == before + 1


def test_greedy_logprobs_are_the_committing_pass_probabilities(toy):
    """Diffusion: a token's log-probability is the one under which it was committed: greedy
    commits a block in one pass, so its entries are the log-softmax of that pass's fresh
    logits over [context, masks] (block mask, token shift)."""
    from dlmnumba import Engine
    ids = toy.tokenizer.encode(PROMPT)
    gen = Generator(toy, DecodeSettings(mode="greedy", block_size=32, max_tokens=8))
    e = Engine(toy)
    r = e.submit(gen.request(ids, logprobs=2))
    e.run_until_idle()
    pos, end = len(ids), (len(ids) // 32 + 1) * 32
    lsm = log_softmax(toy, ids + [toy.spec.mask_id] * (end - pos), "block", 32)
    for i, (entry, t) in enumerate(zip(r.out_logprobs, r.out)):
        assert entry.token == t and math.isclose(entry.logprob, lsm[pos - 1 + i, t],
                                                 abs_tol=1e-6)


def test_progress_chunks_show_the_block_filling_in_only_when_asked(server):
    """dlm_progress: extra chunks (no choices) with the block after each pass; masks are null,
    then tokens; the text is the same as without; without the flag no such chunk."""
    body = {"messages": [{"role": "user", "content": "Reverse: diffusion"}], "max_tokens": 24,
            "mode": "iterative", "threshold": 0.99, "block_size": 32, "stream": True}

    def events(extra):
        out = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, **extra},
                          timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    out.append(json.loads(line[6:]))
        return out

    def text(evs):
        return "".join(c["delta"].get("content") or "" for e in evs for c in e["choices"])

    plain, watched = events({}), events({"dlm_progress": True})
    assert not any("dlm" in e for e in plain) and text(plain) == text(watched)
    prog = [e["dlm"] for e in watched if "dlm" in e]
    masks = [sum(t is None for t in p["tokens"]) for p in prog]
    assert len(prog) >= 2 and masks[0] > masks[-1] and all(e["choices"] == []
                                                           for e in watched if "dlm" in e)
    passes = [p["forward_passes"] for p in prog]
    assert passes == sorted(passes)
