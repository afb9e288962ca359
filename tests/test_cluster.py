"""Ray Serve backend: 2 replicas x 1 thread answer like the local backend; a killed replica's
requests end (error or retry) without hanging and the survivor serves; a missing extra is a
one-line error.  A local Ray on 127.0.0.1, every wait bounded."""
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.chat import render_chat

TIMEOUT = 120


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(synth_model):
    pytest.importorskip("ray.serve")
    from dlmnumba.cluster import ray_serve
    from dlmnumba.config import load_config

    port = _free_port()
    cfg = load_config(env={}, cli={"model_path": synth_model(), "port": port,
                                   "cluster.backend": "ray", "cluster.replicas": 2,
                                   "cluster.threads_per_replica": 1,
                                   "dlm.decode_mode": "greedy", "dlm.block_size": 16,
                                   "sampling.max_tokens": 24})
    ray_serve.start(cfg)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() - t0 < TIMEOUT, "the Ray deployment did not become ready"
        time.sleep(0.5)
    yield url, cfg
    ray_serve.stop()


def _want(path, prompt, **kw):
    m = dlmnumba.load_model(path)
    gen = Generator(m, DecodeSettings(**{"block_size": 16, "max_tokens": 24, **kw}))
    text = render_chat(m.file.metadata, [{"role": "user", "content": prompt}])
    return gen.generate(m.tokenizer.encode(text)).text


def test_two_replicas_answer_eight_concurrent_clients_like_the_local_backend(ray_server,
                                                                               synth_model):
    openai = pytest.importorskip("openai")
    url, _ = ray_server
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
    prompts = [f"request {i}: say something" for i in range(8)]

    def ask(p):
        return c.chat.completions.create(model="m", messages=[{"role": "user", "content": p}],
                                         max_tokens=24).choices[0].message.content

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(ask, prompts))
    assert got == [_want(synth_model(), p) for p in prompts]
    # the same routes and errors as the local backend
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [], "max_tokens": 4})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_a_killed_replica_fails_or_retries_its_requests_and_the_survivor_serves(ray_server):
    import ray
    url, _ = ray_server
    body = {"prompt": "hello", "max_tokens": 24, "stream": False}
    # the replicas' actors; one is killed mid-run (ray.kill ends its process)
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "SERVE_REPLICA" in a["name"] and "dlmnumba" in a["name"]]
    assert len(names) >= 2, names
    victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])

    def ask(_):
        try:
            return httpx.post(url + "/v1/completions", json=body, timeout=60).status_code
        except httpx.TransportError:
            return "transport error"

    with ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(ask, i) for i in range(6)]
        time.sleep(0.2)
        ray.kill(victim, no_restart=False)
        codes = [f.result(timeout=90) for f in futs]  # none hangs
    assert all(c == 200 or c == "transport error" or c >= 500 for c in codes), codes
    t0 = time.monotonic()
    ok = 0
    while ok < 4:  # the survivor, then the restarted replica, serve new requests
        assert time.monotonic() - t0 < TIMEOUT, "no replica served after the kill"
        if ask(0) == 200:
            ok += 1
        else:
            time.sleep(0.5)


def test_backend_ray_without_the_extra_is_one_line():
    code = ("import sys; sys.modules['ray'] = None; from dlmnumba.cli import main; "
            "main(['serve', '--backend', 'ray'], prog_name='dlmnumba')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "pip install -e '.[cluster]'" in lines[0], p.stderr
