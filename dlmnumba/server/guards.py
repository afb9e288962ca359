"""What stands in front of the routes: the API key and body-size ASGI middleware, and the
exception handlers that answer every error in OpenAI's error shape (never a traceback)."""
from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P

log = logging.getLogger("dlmnumba.server")
# answered without the API key: the health probe, and the chat page's static shell (it holds no
# data; every request it makes carries the key it asks for)
OPEN_PATHS = ("/health", "/")


def json_error(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


def install_middleware(app: FastAPI, api_key: str | None, max_body: int,
                       responses=None) -> None:
    """The API key check (every route but /health), the body-size limit, and (responses: a
    prometheus Counter labelled by status) the count of every answer."""
    app.add_middleware(_Limits, api_key=api_key, max_body=max_body, responses=responses)


class _Limits:
    """ASGI middleware: API key on every route but /health; request body size limit; every
    answer counted by status."""

    def __init__(self, app, api_key: str | None, max_body: int, responses=None):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.responses = responses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.responses is not None:
            inner, counter = send, self.responses

            async def send(message):  # noqa: F811 - the counting wrapper of this request
                if message["type"] == "http.response.start":
                    counter.labels(str(message["status"])).inc()
                await inner(message)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                err = P.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer "
                                      "<key>')", type_="authentication_error",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await json_error(err)(scope, receive, send)
        length = headers.get(b"content-length")
        too_big = P.ApiError(413, f"request body larger than {self.max_body} bytes",
                             code="body_too_large")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return await json_error(too_big)(scope, receive, send)
            except ValueError:
                return await json_error(P.ApiError(400, "bad Content-Length"))(scope, receive,
                                                                               send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await json_error(too_big)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def install_errors(app: FastAPI) -> None:
    """Exception handlers: ours, pydantic's, starlette's and anything else -> OpenAI's shape."""
    @app.exception_handler(P.ApiError)
    async def api_error(_, err: P.ApiError):
        return json_error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if first.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip()
        elif first.get("type") == "extra_forbidden":
            msg = f"unknown field '{where}'"
        elif first.get("type") == "missing":
            msg = f"missing field '{where}'"
        else:
            msg = f"'{where}': {first.get('msg', 'invalid value')}"
        return json_error(P.ApiError(400, msg, where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return json_error(P.ApiError(err.status_code, str(err.detail),
                                      type_="not_found_error" if err.status_code == 404
                                      else "invalid_request_error",
                                      headers=dict(err.headers or {})))  # 405: Allow

    @app.exception_handler(Exception)
    async def crash(_, err: Exception):
        log.exception("internal error")
        return json_error(P.ApiError(500, f"internal error: {type(err).__name__}: {err}",
                                      type_="server_error"))

