"""Running the app under uvicorn: in the foreground (the CLI), or in a thread (tests, benches).

Shutdown (Ctrl-C, SIGTERM): uvicorn stops accepting connections; the engine service ends every
running and waiting stream at once with an error event (instead of letting them run to their
budget), so the process exits within a few seconds.
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

GRACEFUL_S = 3  # seconds open connections get after a shutdown signal


class _Server(uvicorn.Server):
    """uvicorn.Server that also tells the engine service to end its streams on a signal."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free port, read back from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(app, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_S,
                          access_log=False, lifespan="on")


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve until Ctrl-C / SIGTERM."""
    state = app.state.dlm
    sock = bind(host, port)
    server = _Server(_config(app, log_level),
                     lambda: state.service and state.service.begin_shutdown())
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a clean stop here
        pass


class ThreadedServer:
    """The app served from a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = _Server(_config(app, log_level), self._on_exit)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def _on_exit(self):
        svc = self.app.state.dlm.service
        if svc is not None:
            svc.begin_shutdown()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ThreadedServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._on_exit()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
