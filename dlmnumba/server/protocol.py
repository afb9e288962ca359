"""OpenAI wire format: request models (pydantic) and pure functions that build responses.

Requests are strict: fields of the wrong JSON type and unknown fields are refused (400), and
fields OpenAI defines that we do not implement are refused when they ask for something
(`n` > 1, `logprobs`, `tools`, penalties, `logit_bias`, a non-text `response_format`), never
ignored silently.  Diffusion decode settings travel as extra body fields named like the
config keys (`mode`, `block_size`, ...), validated by the same definitions as CLI and YAML.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr,
                      create_model)

from ..settings import DECODE_KEYS, SETTINGS

Float = Annotated[float, Strict()]  # a JSON number (an integer is accepted), never a string


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type_, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        """The message's text (content parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


# Decode settings a request may set, named like DecodeSettings' fields and the config keys'
# leaves; derived from the settings table (dlmnumba.settings.DECODE_KEYS), which also checks
# their values.  The sampling fields OpenAI names itself are declared below; the mask token
# is the server's business.
OPENAI_FIELDS = ("max_tokens", "temperature", "top_p", "seed")
DECODE_FIELDS = tuple(f for f in DECODE_KEYS if f not in (*OPENAI_FIELDS, "mask_token_id"))
_JSON_TYPES = {int: StrictInt, float: Float, str: StrictStr, bool: StrictBool}
_DecodeFields = create_model(
    "_DecodeFields", __config__=ConfigDict(extra="forbid"),
    **{f: (_JSON_TYPES[SETTINGS[DECODE_KEYS[f]].type] | None, None) for f in DECODE_FIELDS})


class CommonRequest(_DecodeFields):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted, unused
    # OpenAI fields we do not implement: refused when they ask for something
    n: StrictInt | None = None
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field asking for something we do not do, or None."""
        if self.n is not None and self.n != 1:
            return "n", "only n = 1 is supported (one choice per request)"
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            return ("logprobs" if self.logprobs not in (None, False, 0) else "top_logprobs",
                    "log probabilities are not supported")
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(self, f) not in (None, 0, 0.0):
                return f, f"{f} is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    def stops(self) -> list[str]:
        """The stop strings (empty strings refused)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise ApiError(400, "'stop' strings must not be empty", "stop")
        if len(stops) > 4:
            raise ApiError(400, f"'stop' takes at most 4 strings, got {len(stops)}", "stop")
        return stops

    def token_budget(self) -> tuple[int | None, str]:
        """The requested max tokens (None: not given) and the field that gave it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self):
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tools (function calling) are not supported"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format", "only response_format {'type': 'text'} is supported"
        return super().unsupported()


class CompletionRequest(CommonRequest):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def unsupported(self):
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of = 1 is supported"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) \
                and len(self.prompt) != 1:
            return "prompt", "one prompt per request (a list of several strings is a batch)"
        return super().unsupported()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: StrictStr
    add_special: StrictBool = True  # BOS per the model file


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[StrictInt]


# -- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, forward_passes: int,
          ttft_s: float, draft_tokens: int = 0, accepted_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object, plus the forward passes the reply took (a diffusion figure) and
    the server's time from the request's arrival to its first committed token.  spec's drafts
    are reported as OpenAI reports predicted outputs: completion_tokens_details'
    accepted_prediction_tokens / rejected_prediction_tokens (0 in the other modes)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {
                "accepted_prediction_tokens": accepted_tokens,
                "rejected_prediction_tokens": draft_tokens - accepted_tokens},
            "forward_passes": forward_passes, "time_to_first_token_s": round(ttft_s, 4)}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}


def completion_response(rid: str, model: str, text: str, finish: str, use: dict
                        ) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [], "usage": use}
