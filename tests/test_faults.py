"""Faults injected through the real server (loopback, the `openai` client and raw HTTP): a
request whose own step raises, a kernel that raises, a MemoryError, the engine thread dying.
The failing requests get an error they can see (a 500 in OpenAI's shape, or an error event on
their stream), the requests beside them finish with their own output, and the next request is
served.  And what a handler reports comes from the engine's snapshots: completion_tokens stops
at the stop string."""
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.chat import render_chat
from dlmnumba.decode.diffusion import DiffusionRequest
from dlmnumba.decode.requests import ARRequest
from dlmnumba.kernels import attention as attention_kernels
from dlmnumba.model import bitnet
from dlmnumba.server.app import ServerOptions, ServerState, create_app
from dlmnumba.server.run import ThreadedServer

openai = pytest.importorskip("openai")
TOY = str(Path(dlmnumba.__file__).parent / "data" / "toy-dlm.gguf")
TIMEOUT = 60
POISON = 13  # max_tokens of the requests whose own feed() raises


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(TOY)


@pytest.fixture(scope="module")
def server(toy):
    state = ServerState(ServerOptions(model_name="toy", prefix_cache_tokens=4096),
                        DecodeSettings(block_size=16))
    srv = ThreadedServer(create_app(state, load=lambda: toy)).start()
    _wait_healthy(srv)
    yield srv
    srv.stop()


def _wait_healthy(srv):
    t0 = time.monotonic()
    while httpx.get(srv.url + "/health").status_code != 200:
        assert time.monotonic() - t0 < TIMEOUT, "model did not load"
        time.sleep(0.05)


def _chat(content, **kw):
    return {"messages": [{"role": "user", "content": content}], **kw}


def _want(model, content, **kw):
    gen = Generator(model, DecodeSettings(**{"block_size": 16, **kw}))
    ids = model.tokenizer.encode(render_chat(model.file.metadata,
                                             [{"role": "user", "content": content}]))
    return gen.generate(ids)


def _post(srv, body, timeout=TIMEOUT):
    return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=timeout)


def _stream_events(srv, body):
    """The JSON events of a streamed chat completion, and whether it closed with [DONE]."""
    events, done = [], False
    with httpx.stream("POST", srv.url + "/v1/chat/completions",
                      json={**body, "stream": True}, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events, done


def _text(events):
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices"))


def _served_correctly(srv, toy):
    want = _want(toy, "What is 2+3?", max_tokens=8)
    r = _post(srv, _chat("What is 2+3?", max_tokens=8))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


def _poison_feed(monkeypatch, error):
    """Every request with max_tokens == POISON raises `error` from its own feed()."""
    for cls in (ARRequest, DiffusionRequest):
        real = cls.feed

        def feed(self, result, real=real):
            if self.settings.max_tokens == POISON:
                raise error
            return real(self, result)
        monkeypatch.setattr(cls, "feed", feed)


@pytest.mark.parametrize("error", [RuntimeError("injected fault"), MemoryError()],
                         ids=["RuntimeError", "MemoryError"])
def test_a_request_whose_feed_raises_fails_alone(server, toy, monkeypatch, error):
    long_body = _chat("Copy: abcdefghijklmnop", max_tokens=40, mode="ar")
    want_long = _want(toy, "Copy: abcdefghijklmnop", max_tokens=40, mode="ar")
    _poison_feed(monkeypatch, error)
    fast = toy.forward_batch
    monkeypatch.setattr(toy, "forward_batch", lambda passes: (time.sleep(0.02), fast(passes))[1])
    results = {}

    def beside():
        results["stream"] = _stream_events(server, long_body)

    t = threading.Thread(target=beside)
    t.start()
    # the poisoned requests while the stream beside them runs
    r = _post(server, _chat("What is 1+1?", max_tokens=POISON))
    bad_events, bad_done = _stream_events(server, _chat("What is 4+4?", max_tokens=POISON,
                                                        mode="iterative"))
    t.join(TIMEOUT)
    assert not t.is_alive(), "the stream beside the failing request never finished"
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and type(error).__name__ in err["message"]
    assert bad_done and "error" in bad_events[-1]
    assert type(error).__name__ in bad_events[-1]["error"]["message"]
    events, done = results["stream"]
    assert done and _text(events) == want_long.text
    monkeypatch.undo()
    _served_correctly(server, toy)


def test_a_kernel_that_raises_fails_its_step_and_the_server_recovers(server, toy, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("kernel fault")
    monkeypatch.setattr(bitnet, "ternary_matmul", broken)
    r = _post(server, _chat("What is 1+1?", max_tokens=8))
    assert r.status_code == 500 and "kernel fault" in r.json()["error"]["message"], r.text
    events, done = _stream_events(server, _chat("What is 1+1?", max_tokens=8))
    assert done and "kernel fault" in events[-1]["error"]["message"]
    monkeypatch.undo()
    _served_correctly(server, toy)


def test_a_memory_error_in_attention_fails_its_step_and_the_server_recovers(server, toy,
                                                                             monkeypatch):
    def broken(*args, **kw):
        raise MemoryError()
    monkeypatch.setattr(attention_kernels, "attention", broken)
    monkeypatch.setattr(attention_kernels, "attention_many", broken)
    r = _post(server, _chat("What is 1+1?", max_tokens=8))
    assert r.status_code == 500 and "MemoryError" in r.json()["error"]["message"], r.text
    monkeypatch.undo()
    _served_correctly(server, toy)


def test_completion_tokens_stop_at_the_stop_string(server, toy):
    """The usage counts the tokens through the one that completed the stop string, not the
    rest of its block, nor what the engine decoded before it applied the cancel."""
    content = "Reverse: abcdefghijkl"
    want = _want(toy, content, max_tokens=24)
    full = want.text
    assert len(full) > 6
    stop = full[3:5]
    k = next(i for i in range(1, len(want.tokens) + 1)
             if stop in toy.tokenizer.decode(want.tokens[:i]))
    assert k < len(want.tokens)  # the stop string ends before the output does
    r = _post(server, _chat(content, max_tokens=24, stop=[stop]))
    body = r.json()
    assert body["choices"][0]["message"]["content"] == full[:full.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == k
    events, done = _stream_events(server, _chat(content, max_tokens=24, stop=[stop],
                                                stream_options={"include_usage": True}))
    assert _text(events) == full[:full.find(stop)]
    assert events[-1]["usage"]["completion_tokens"] == k


class _Fatal(BaseException):
    """Not an Exception: nothing in the step loop catches it (the thread itself ends)."""


def test_the_engine_thread_dying_answers_everyone_at_once(synth_model):
    state = ServerState(ServerOptions(model_name="synth"), DecodeSettings(mode="ar"))
    srv = ThreadedServer(create_app(state, load=lambda: dlmnumba.load_model(synth_model()))
                         ).start()
    try:
        _wait_healthy(srv)
        lines = []
        body = {"prompt": "hello", "max_tokens": 1500, "stream": True, "ignore_eos": True}

        def client():
            with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                              timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    lines.append(line)

        t = threading.Thread(target=client)
        t.start()
        t0 = time.monotonic()
        while len(lines) < 4:
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.02)
        svc = state.service
        real_step = svc.engine.step

        def dying():
            real_step()
            raise _Fatal("injected")
        svc.engine.step = dying
        t0 = time.monotonic()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 10
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert "engine stopped" in events[-1]["error"]["message"]
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and "engine stopped" in h.json()["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=TIMEOUT)
        assert r.status_code == 503 and "engine stopped" in r.json()["error"]["message"]
    finally:
        srv.stop()
