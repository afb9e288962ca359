"""Shared pieces of the server benches (serve_load.py, soak.py): an asyncio + httpx load
generator for OpenAI-compatible servers, the servers under test (dlmnumba in this process,
llama-cpp-python's server in a subprocess), models and percentiles.

Every loop here is bounded in count and in time, and only loopback addresses are contacted.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

TOPICS = ("the sea", "volcanoes", "bread", "the moon", "chess", "rivers", "bees", "glass",
          "trains", "clouds", "copper", "owls", "tea", "maps", "bridges", "salt")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
READY_TIMEOUT_S = 600  # model load (the 2B-shaped file, numba cache cold) before giving up


# -- models -------------------------------------------------------------------------------------
from forward_pass import default_model  # noqa: E402,F401  (the bench scripts' one definition)


def preset_model(preset: str, folder: str | Path) -> str:
    """A synthetic model of `preset` in `folder`, in a type and architecture llama.cpp loads."""
    from dlmnumba.synth.models import write_synthetic

    path = Path(folder) / f"synthetic-{preset}-TQ2_0-bitnet.gguf"
    write_synthetic(path, preset=preset, qtype="TQ2_0", arch="bitnet")
    return str(path)


# -- statistics ---------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation), None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


# -- one request --------------------------------------------------------------------------------
@dataclass
class Result:
    """One request as the client saw it (times in seconds from sending it)."""

    ok: bool = False
    error: str | None = None
    cut: bool = False  # still running when the measurement's time limit ended it
    cancelled: bool = False  # closed mid-stream on purpose (soak)
    ttft: float | None = None  # first non-empty content
    latency: float | None = None  # [DONE] (streamed) or the whole body (not streamed)
    tokens: int = 0  # completion tokens: from `usage`, else streamed token chunks
    tokens_exact: bool = False  # tokens came from a usage object
    prompt_tokens: int | None = None
    finish: str | None = None
    text: str = ""


def client(concurrency: int, timeout_s: float) -> "httpx.AsyncClient":
    """An httpx client for `concurrency` parallel requests; no proxies from the environment."""
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency + 4,
                            max_keepalive_connections=concurrency + 4),
        trust_env=False)


def _content(obj: dict, chat: bool) -> str:
    ch = (obj.get("choices") or [{}])[0]
    if chat:
        return (ch.get("delta") or ch.get("message") or {}).get("content") or ""
    return ch.get("text") or ""


def _token_chunk(obj: dict, chat: bool) -> bool:
    """A streamed chunk that carries a token's text (maybe empty), not the role or the end."""
    ch = (obj.get("choices") or [None])[0]
    if not ch or ch.get("finish_reason"):
        return False
    return "content" in (ch.get("delta") or {}) if chat else "text" in ch


async def request(http, base: str, path: str, body: dict, out: Result,
                  cancel_after_chunks: int | None = None) -> Result:
    """POST `body` to base+path and fill `out` (streamed if body['stream']).  Never raises but
    for asyncio cancellation; cancel_after_chunks: close the stream after that many content
    chunks (a client going away mid-stream)."""
    chat = path.endswith("/chat/completions")
    t0 = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await http.post(base + path, json=body)
            out.latency = time.perf_counter() - t0
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            obj = r.json()
            out.text = _content(obj, chat)
            out.ttft = out.latency if out.text else None
            out.finish = (obj.get("choices") or [{}])[0].get("finish_reason")
            use = obj.get("usage") or {}
            out.tokens, out.tokens_exact = int(use.get("completion_tokens") or 0), "usage" in obj
            out.prompt_tokens = use.get("prompt_tokens")
            out.ok = True
            return out
        chunks, parts, done, server_ttft = 0, [], False, None
        async with http.stream("POST", base + path, json=body) as r:
            if r.status_code != 200:
                head = (await r.aread())[:200].decode(errors="replace")
                out.error = f"HTTP {r.status_code}: {head}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": ping" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    out.error = "stream error: " + str(obj["error"].get("message", obj["error"]))
                    return out
                if obj.get("usage"):
                    out.tokens = int(obj["usage"].get("completion_tokens") or 0)
                    server_ttft = obj["usage"].get("time_to_first_token_s")
                    out.prompt_tokens = obj["usage"].get("prompt_tokens")
                    out.tokens_exact = True
                text = _content(obj, chat)
                if _token_chunk(obj, chat):
                    chunks += 1
                if text:
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - t0
                    parts.append(text)
                    if cancel_after_chunks is not None and len(parts) >= cancel_after_chunks:
                        out.cancelled, out.text = True, "".join(parts)
                        return out  # leaving the `async with` closes the connection
                fr = (obj.get("choices") or [{}])[0].get("finish_reason")
                if fr:
                    out.finish = fr
        out.latency = time.perf_counter() - t0
        out.text = "".join(parts)
        if server_ttft is not None:  # dlmnumba reports it: a random model's first tokens may
            out.ttft = server_ttft   # detokenize to nothing, so the client cannot see them
        if not out.tokens_exact:
            out.tokens = chunks  # llama-cpp-python sends no usage: one chunk per token
        if not done and not out.cancelled:
            out.error = "the stream ended without [DONE]"
            return out
        out.ok = True
        return out
    except asyncio.CancelledError:
        out.cut = True
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        out.error = f"{type(e).__name__}: {e}"[:300]
        return out


async def bounded(coros: list, limit_s: float) -> tuple[float, int]:
    """Run the client coroutines together for at most limit_s seconds: (wall seconds, number
    cut off).  Clients append their results as they go, so a cut-off run keeps what finished."""
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(c) for c in coros]
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    return time.perf_counter() - t0, len(pending)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    """Requests, errors, aggregate tok/s (completion tokens of finished requests / wall time),
    TTFT and latency percentiles."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok if r.latency is not None]
    tokens = sum(r.tokens for r in ok)
    errors = [r.error for r in results if r.error]
    return {"requests": len(results), "ok": len(ok), "errors": len(errors),
            "cut": sum(r.cut for r in results), "error_samples": sorted(set(errors))[:3],
            "tokens": tokens, "tokens_exact": all(r.tokens_exact for r in ok) if ok else None,
            "tokens_per_request": tokens / len(ok) if ok else None,
            "wall_s": wall, "tok_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "no_content": sum(r.ttft is None for r in ok)}


# -- servers ------------------------------------------------------------------------------------
def check_loopback(url: str) -> str:
    """url without a trailing slash; refuses anything but a loopback host."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"{url}: only loopback servers ({', '.join(LOOPBACK)}) are driven here")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S, proc=None, log: Path | None = None
               ) -> None:
    """Poll GET url until it answers 200 (or the process dies, or timeout_s passes)."""
    import httpx

    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was "
                               f"ready{_tail(log)}")
        try:
            if httpx.get(url, timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{url} was not ready after {timeout_s:.0f} s{_tail(log)}")
        time.sleep(0.25)


def _tail(log: Path | None, n: int = 2000) -> str:
    if log is None or not log.exists():
        return ""
    return "; its log ends:\n" + log.read_text(errors="replace")[-n:]


@contextlib.contextmanager
def dlmnumba_server(model, settings, **options) -> Iterator[str]:
    """Our server in this process (ThreadedServer on a free loopback port) around an already
    loaded model; yields its base URL and stops it at the end."""
    from dlmnumba.server.app import ServerOptions, ServerState, create_app
    from dlmnumba.server.run import ThreadedServer

    state = ServerState(ServerOptions(**options), settings)
    srv = ThreadedServer(create_app(state, load=lambda: model)).start()
    try:
        wait_ready(srv.url + "/health", 120)
        yield srv.url
    finally:
        srv.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def subprocess_server(argv: list[str], ready_url: str, name: str,
                      env: dict | None = None) -> Iterator[subprocess.Popen]:
    """Start argv (a server), wait for ready_url, yield the process; always stop it at the end
    (SIGTERM to its process group, SIGKILL after 15 s), also on Ctrl-C and errors."""
    log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent,
                                env=env)
    try:
        wait_ready(ready_url, proc=proc, log=log)
        proc.log = log  # type: ignore[attr-defined]
        yield proc
    finally:
        _stop(proc)
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, None):
            print(f"note: {name} exited with status {proc.returncode}; log: {log}",
                  file=sys.stderr)
        else:
            log.unlink(missing_ok=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # its own session: the group is the server and its children
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def llamacpp_server(model: str, threads: int, n_ctx: int) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on a free loopback port; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", model,
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(n_ctx), "--host", "127.0.0.1", "--port", str(port),
            # by default a new request cuts the streaming one short: serve them one by one
            "--interrupt_requests", "False"]
    url = f"http://127.0.0.1:{port}"
    with subprocess_server(argv, url + "/v1/models", "llama_cpp.server"):
        yield url


def llama_server_binary(explicit: str | None = None) -> str:
    """The llama-server binary: `explicit`, $LLAMA_SERVER, one on PATH, or the one
    scripts/build_llama_server.sh writes to the user cache; a clear error if there is none."""
    import shutil

    cache = Path(os.environ.get("DLMNUMBA_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlmnumba")
    for cand in (explicit, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"),
                 str(cache / "llama-server" / "llama-server")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise SystemExit("llama-server not found: build it with `bash scripts/build_llama_server.sh`"
                     " (about 10 minutes) or pass --llama-server PATH")


@contextlib.contextmanager
def llama_server(binary: str, model: str, threads: int, n_ctx: int, slots: int
                 ) -> Iterator[str]:
    """llama.cpp's own server (continuous batching over `slots` parallel sequences, each with
    n_ctx tokens of context) in its own process on a free loopback port; yields its base URL."""
    port = free_port()
    argv = [binary, "--model", model, "--threads", str(threads), "--threads-batch", str(threads),
            "--ctx-size", str(n_ctx * slots), "--parallel", str(slots), "--cont-batching",
            "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        [str(Path(binary).parent), os.environ.get("LD_LIBRARY_PATH", "")]))
    url = f"http://127.0.0.1:{port}"
    with subprocess_server(argv, url + "/health", "llama-server", env=env):
        yield url


@contextlib.contextmanager
def dlmnumba_process_server(model: str, threads: int, extra: dict, max_sequences: int
                            ) -> Iterator[str]:
    """`dlmnumba serve` in its own process (as users run it, and as llama-server runs) with
    the decode settings of `extra` as its defaults; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "dlmnumba", "serve", "--model", model, "--threads",
            str(threads), "--host", "127.0.0.1", "--port", str(port), "--max-sequences",
            str(max_sequences), "--log-level", "warning"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    url = f"http://127.0.0.1:{port}"
    with subprocess_server(argv, url + "/health", "dlmnumba-serve"):
        yield url


def raise_on_sigterm() -> None:
    """SIGTERM ends the bench like Ctrl-C does: `finally` blocks stop the servers."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
