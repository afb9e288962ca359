"""The OpenAI-compatible server on a free loopback port, driven by the official `openai` client
and by raw HTTP: outputs equal the library's one-at-a-time decoding; concurrency; bad
requests; disconnects; API key; prefix cache."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.chat import render_chat
from dlmnumba.server.app import ServerOptions, ServerState, create_app
from dlmnumba.server.run import ThreadedServer

openai = pytest.importorskip("openai")
TOY = str(Path(dlmnumba.__file__).parent / "data" / "toy-dlm.gguf")
TIMEOUT = 120


def _server(model_path, settings=DecodeSettings(block_size=16), **opts):
    state = ServerState(ServerOptions(model_name="toy", **opts), settings)
    app = create_app(state, load=lambda: dlmnumba.load_model(model_path))
    srv = ThreadedServer(app).start()
    t0 = time.monotonic()
    while httpx.get(srv.url + "/health").status_code != 200:
        assert time.monotonic() - t0 < TIMEOUT, "model did not load"
        time.sleep(0.05)
    return srv


@pytest.fixture(scope="module")
def toy_server():
    srv = _server(TOY, prefix_cache_tokens=4096)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(TOY)


def _client(srv, key="x"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def _want(model, text, chat=True, **kw):
    gen = Generator(model, DecodeSettings(**{"block_size": 16, **kw}))
    if chat:
        text = render_chat(model.file.metadata, [{"role": "user", "content": text}])
    return gen.generate(model.tokenizer.encode(text))


def _metric(srv, name):
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.mark.parametrize("mode", ["greedy", "ar", "iterative", "spec"])
def test_chat_equals_library_output(toy_server, toy, mode):
    c = _client(toy_server)
    want = _want(toy, "What is 12+35?", mode=mode, max_tokens=24)
    r = c.chat.completions.create(model="toy", messages=[{"role": "user",
                                                          "content": "What is 12+35?"}],
                                  max_tokens=24, extra_body={"mode": mode})
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.stats.finish_reason
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.prompt_tokens == want.stats.prompt_tokens
    details = r.usage.completion_tokens_details  # spec's drafts, as OpenAI's predictions
    assert details.accepted_prediction_tokens == want.stats.accepted_tokens
    assert details.rejected_prediction_tokens == (want.stats.draft_tokens
                                                  - want.stats.accepted_tokens)
    if mode == "spec":
        assert want.stats.accepted_tokens > 0
        assert _metric(toy_server, "dlmnumba_accepted_draft_tokens_total") >= \
            want.stats.accepted_tokens
    # streamed: the same text, chunk by chunk, then usage
    parts, finish, use = [], None, None
    for ch in c.chat.completions.create(model="toy", messages=[{"role": "user",
                                                                "content": "What is 12+35?"}],
                                        max_tokens=24, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body={"mode": mode}):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            use = ch.usage
    assert "".join(parts) == want.text and finish == want.stats.finish_reason
    assert use.completion_tokens == len(want.tokens)


def test_completions_text_and_token_ids(toy_server, toy):
    c = _client(toy_server)
    want = _want(toy, "Copy: abc", chat=False, max_tokens=12)
    r = c.completions.create(model="toy", prompt="Copy: abc", max_tokens=12)
    assert r.choices[0].text == want.text
    ids = toy.tokenizer.encode("Copy: abc")
    r2 = c.completions.create(model="toy", prompt=ids, max_tokens=12)
    assert r2.choices[0].text == want.text
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="toy", prompt="Copy: abc", max_tokens=12, stream=True) if ch.choices)
    assert text == want.text


def test_stop_strings_cut_the_text(toy_server, toy):
    c = _client(toy_server)
    full = _want(toy, "Reverse: abcdefgh", max_tokens=24).text
    assert len(full) > 3
    stop = full[2:4]
    r = c.chat.completions.create(model="toy", messages=[{"role": "user",
                                                          "content": "Reverse: abcdefgh"}],
                                  max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_each_equal_their_own_output(toy_server, toy):
    from dlmnumba.tasks import heldout
    prompts = [e.prompt for t in ("add", "copy", "reverse", "sort") for e in heldout(t, 4)]
    want = {p: _want(toy, p, max_tokens=32).text for p in prompts}
    c = _client(toy_server)

    def one(p):
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="toy", messages=[{"role": "user", "content": p}], max_tokens=32,
            stream=True) if ch.choices)

    with ThreadPoolExecutor(16) as ex:
        got = dict(zip(prompts, ex.map(one, prompts)))
    assert got == want


BAD = [
    ("not json", b"{not json", "not valid JSON"),
    ("wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
     "max_tokens"),
    ("unknown mode", {"messages": [{"role": "user", "content": "hi"}], "mode": "bogus"}, "mode"),
    ("max_tokens 0", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     "max_tokens"),
    ("max_tokens negative", {"messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": -3}, "max_tokens"),
    ("beyond context", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
     "context length"),
    ("empty messages", {"messages": []}, "messages"),
    ("n 0", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ("n above 16", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
    ("17 stops", {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcdefghijklmnopq")},
     "at most 16"),
    ("top_logprobs without logprobs", {"messages": [{"role": "user", "content": "hi"}],
                                       "top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs 21", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                         "top_logprobs": 21}, "top_logprobs"),
    ("tools", {"messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("unknown field", {"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "bogus"),
    ("bad threshold", {"messages": [{"role": "user", "content": "hi"}], "mode": "iterative",
                       "threshold": 5}, "threshold"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ("spec sampling", {"messages": [{"role": "user", "content": "hi"}], "mode": "spec",
                       "temperature": 0.7}, "decodes greedily"),
]


@pytest.mark.parametrize("name,body,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(toy_server, name, body,
                                                                  needle):
    url = toy_server.url + "/v1/chat/completions"
    r = (httpx.post(url, content=body, headers={"Content-Type": "application/json"})
         if isinstance(body, bytes) else httpx.post(url, json=body))
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err["param"], err
    ok = httpx.post(url, json={"messages": [{"role": "user", "content": "What is 1+1?"}],
                               "max_tokens": 4}, timeout=TIMEOUT)
    assert ok.status_code == 200


def test_oversize_body_is_413(toy_server):
    r = httpx.post(toy_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_models_tokenize_detokenize(toy_server, toy):
    assert httpx.get(toy_server.url + "/v1/models").json()["data"][0]["id"] == "toy"
    ids = httpx.post(toy_server.url + "/tokenize", json={"content": "Copy: ab"}).json()["tokens"]
    assert ids == toy.tokenizer.encode("Copy: ab")
    text = httpx.post(toy_server.url + "/detokenize", json={"tokens": ids}).json()["content"]
    assert text == toy.tokenizer.decode(ids)
    assert httpx.post(toy_server.url + "/detokenize", json={"tokens": [10**7]}).status_code == 400


def test_prefix_cache_hits_on_a_resent_conversation_same_output(toy_server, toy):
    c = _client(toy_server)
    before = _metric(toy_server, "dlmnumba_prefix_cache_hit_tokens_total")
    msgs = [{"role": "user", "content": "Copy: abcdefghijklmnop"}]
    for turn in range(3):
        r = c.chat.completions.create(model="toy", messages=msgs, max_tokens=30)
        text = r.choices[0].message.content
        gen = Generator(toy, DecodeSettings(block_size=16, max_tokens=30))
        want = gen.generate(toy.tokenizer.encode(render_chat(toy.file.metadata, msgs))).text
        assert text == want
        msgs = msgs + [{"role": "assistant", "content": text},
                       {"role": "user", "content": f"Reverse: {'xyz'[turn]}bcdefgh"}]
    assert _metric(toy_server, "dlmnumba_prefix_cache_hit_tokens_total") > before


def test_api_key(toy):
    srv = _server(TOY, api_key="sekrit")
    try:
        body = {"messages": [{"role": "user", "content": "What is 1+1?"}], "max_tokens": 4}
        url = srv.url + "/v1/chat/completions"
        assert httpx.post(url, json=body).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}
                          ).status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/openapi.json").status_code == 401
        assert httpx.get(srv.url + "/openapi.json",
                         headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        r = _client(srv, "sekrit").chat.completions.create(
            model="toy", messages=body["messages"], max_tokens=4)
        assert r.choices[0].message.content == _want(toy, "What is 1+1?", max_tokens=4).text
    finally:
        srv.stop()


def test_disconnect_mid_stream_frees_the_slot(synth_model):
    """A client that goes away mid-stream is cancelled: running sequences back to 0."""
    srv = _server(synth_model(), DecodeSettings(mode="ar"))
    try:
        body = {"prompt": "hello", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                          timeout=TIMEOUT) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 6:
                    break  # close the connection mid-stream
        t0 = time.monotonic()
        while _metric(srv, "dlmnumba_running_sequences") != 0:
            assert time.monotonic() - t0 < 30, "the request kept running"
            time.sleep(0.1)
        assert _metric(srv, 'dlmnumba_requests_total{outcome="cancelled"}') >= 1
    finally:
        srv.stop()


def test_shutdown_ends_running_streams(synth_model):
    srv = _server(synth_model(), DecodeSettings(mode="ar"))
    got = []

    def client():
        body = {"prompt": "hello", "max_tokens": 1800, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                          timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                got.append(line)

    t = threading.Thread(target=client)
    t.start()
    while len(got) < 4:
        time.sleep(0.05)
    t0 = time.monotonic()
    srv.stop()
    t.join(15)
    assert not t.is_alive() and time.monotonic() - t0 < 10
    events = [json.loads(x[6:]) for x in got if x.startswith("data: {")]
    assert "shutting down" in events[-1]["error"]["message"]


def test_cli_serve_answers_and_stops_cleanly_on_ctrl_c(tmp_path):
    """`dlmnumba serve` on a free port: health, a chat request, then SIGINT (Ctrl-C): exit 0
    within seconds, no traceback."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dlmnumba", "serve", "--port", str(port),
                             "--max-tokens", "8"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"messages": [{"role": "user", "content": "What is 2+3?"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_serve_bad_model_is_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    p = subprocess.run([sys.executable, "-m", "dlmnumba", "serve", "--model", str(bad)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "bad.gguf" in p.stderr, p.stderr


def test_health_is_503_while_loading_and_routes_say_so(toy):
    """Until the model is loaded: /health 503 {"status": "loading"}, model routes 503 in
    OpenAI's shape; then 200 and answers. A failed load is reported, not hidden."""
    gate = threading.Event()

    def slow_load():
        assert gate.wait(TIMEOUT)
        return toy

    srv = ThreadedServer(create_app(ServerState(ServerOptions(model_name="toy"),
                                                DecodeSettings(block_size=16)),
                                    load=slow_load)).start()
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        t0 = time.monotonic()
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"messages": [{"role": "user", "content": "What is 1+1?"}],
                             "max_tokens": 4})
        assert r.status_code == 200
    finally:
        srv.stop()

    def broken():
        raise dlmnumba.ModelFormatError("m.gguf: not a GGUF file")

    srv = ThreadedServer(create_app(ServerState(ServerOptions()), load=broken)).start()
    try:
        t0 = time.monotonic()
        while (r := httpx.get(srv.url + "/health")).json().get("status") == "loading":
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.05)
        assert r.status_code == 503 and "not a GGUF file" in r.json()["message"]
    finally:
        srv.stop()


def test_full_waiting_queue_is_429_with_retry_after(synth_model):
    def slow_model():  # 50 ms a step: the running request outlasts the test
        m = dlmnumba.load_model(synth_model())
        fast = m.forward_batch
        m.forward_batch = lambda segs: (time.sleep(0.05), fast(segs))[1]
        return m

    state = ServerState(ServerOptions(max_sequences=1, max_waiting=1), DecodeSettings(mode="ar"))
    srv = ThreadedServer(create_app(state, load=slow_model)).start()
    try:
        t0 = time.monotonic()
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.05)
        # random weights: no early stop frees the slot
        body = {"prompt": "hello", "max_tokens": 1500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                          timeout=TIMEOUT) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # admitted and streaming
            with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                              timeout=TIMEOUT) as waiting:
                t0 = time.monotonic()
                while _metric(srv, "dlmnumba_waiting_sequences") != 1:
                    assert time.monotonic() - t0 < 30
                    time.sleep(0.05)
                r = httpx.post(srv.url + "/v1/completions", json=body, timeout=TIMEOUT)
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200
            del lines
        assert _metric(srv, 'dlmnumba_requests_total{outcome="rejected"}') == 1
    finally:
        srv.stop()


WARM_CHECK = r"""
import sys
import numba
import dlmnumba, dlmnumba.kernels as K
from dlmnumba import DecodeSettings, Generator
from dlmnumba.runtime.warmup import warm_up
import importlib, pkgutil

mods = [importlib.import_module("dlmnumba.kernels." + i.name) for i in pkgutil.iter_modules(K.__path__)]
def signatures():
    return {f"{m.__name__}.{n}": len(d.signatures) for m in mods for n, d in vars(m).items()
            if isinstance(d, numba.core.registry.CPUDispatcher)}
m = dlmnumba.load_model(sys.argv[1])
before = signatures()
warm_up(m, DecodeSettings(mode="greedy", block_size=8))
warm = signatures()
assert sum(warm.values()) > sum(before.values()), "warm_up compiled nothing"
ar = Generator(m, DecodeSettings(mode="ar", max_tokens=5, ignore_eos=True))
ar.generate([5, 6, 7, 8, 9, 10, 11])
ar.generate_many([[5, 6], [7, 8, 9, 10], [11, 12, 13]])
Generator(m, DecodeSettings(mode="greedy", block_size=8, max_tokens=16, ignore_eos=True)
          ).generate([5, 6, 7, 8, 9])
after = signatures()
new = {k: after[k] - warm[k] for k in after if after[k] != warm[k]}
print("NEW", new)
assert not new, new
"""


def test_warm_up_leaves_no_kernel_to_compile_in_a_request(synth_model, tmp_path):
    """After runtime.warm_up (what the server runs before it reports ready), a single and a
    batched `ar` request and a greedy one add no compiled signature to any kernel: the first
    real requests do not pay the JIT (a fresh process, kernels loaded from numba's cache)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", WARM_CHECK, synth_model()], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
