"""OpenAI wire format: request models (pydantic) and pure functions that build responses.

Requests are strict: fields of the wrong JSON type and unknown fields are refused (400),
fields that change nothing here (`user`, `store`, `metadata`, `service_tier`,
`parallel_tool_calls` without tools, `stream_options` extras) are accepted and ignored, and
fields OpenAI defines that we do not implement are refused when they ask for something
(`tools`, penalties, `logit_bias`, `suffix`, `best_of` > 1),
never ignored silently.  Diffusion decode settings travel as extra body fields named like the
config keys (`mode`, `block_size`, ...), validated by the same definitions as CLI and YAML.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr,
                      create_model)

from ..decode.requests import MAX_TOP_LOGPROBS
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
    model_config = ConfigDict(extra="ignore")  # other servers' extras: accepted, ignored
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


MAX_STOPS = 16  # stop strings per request
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per completion request (each with its n choices)


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
    n: StrictInt | None = None  # choices per prompt (distinct seeds when sampling)
    # ours: with stream, extra chunks carrying the block being decided after every pass
    # ("dlm": {"offset", "tokens": [text | null per position], "forward_passes"})
    dlm_progress: StrictBool = False
    # structured output: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    response_format: dict[str, Any] | None = None
    # accepted and ignored: they change nothing here
    user: StrictStr | None = None
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    # OpenAI fields we do not implement: refused when they ask for something
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field asking for something we do not do, or None."""
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(self, f) not in (None, 0, 0.0):
                return f, f"{f} is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None

    def grammar(self):
        """The decode.constraint.Grammar response_format asks for (None: plain text)."""
        from ..decode.constraint import Grammar
        from ..errors import DecodeError

        rf = self.response_format
        if not rf or rf.get("type") in (None, "text"):
            return None
        try:
            if rf.get("type") == "json_object":
                return Grammar.json_object()
            if rf.get("type") == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise ApiError(400, "response_format json_schema needs 'json_schema': "
                                        "{'name': ..., 'schema': {...}}", "response_format")
                return Grammar.json_schema(spec["schema"])
        except DecodeError as e:
            raise ApiError(400, str(e), "response_format") from None
        raise ApiError(400, f"response_format type must be text, json_object or json_schema, "
                            f"got {rf.get('type')!r}", "response_format")

    def choices_per_prompt(self) -> int:
        """n (1 when not given), checked."""
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"'n' must be in 1..{MAX_N}, got {n}", "n")
        return n

    def wanted_logprobs(self) -> int | None:
        """How many alternatives per token the log-probabilities carry (None: no logprobs)."""
        raise NotImplementedError

    def stops(self) -> list[str]:
        """The stop strings (empty strings refused)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise ApiError(400, "'stop' strings must not be empty", "stop")
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}",
                           "stop")
        return stops

    def token_budget(self) -> tuple[int | None, str]:
        """The requested max tokens (None: not given) and the field that gave it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def _top_count(value: int, field: str) -> int:
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'{field}' must be in 0..{MAX_TOP_LOGPROBS}, got {value}", field)
    return value


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None  # accepted (there are no tools)

    def unsupported(self):
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tools (function calling) are not supported"
        return super().unsupported()

    def wanted_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if not self.logprobs:
            return None
        return _top_count(self.top_logprobs or 0, "top_logprobs")


class CompletionRequest(CommonRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def unsupported(self):
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of = 1 is supported"
        return super().unsupported()

    def wanted_logprobs(self):
        return None if self.logprobs is None else _top_count(self.logprobs, "logprobs")

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids (a list of texts or of id lists: several)."""
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif p and isinstance(p[0], (str, list)):
            out = list(p)
        else:
            out = [list(p)]
        if not out:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(out) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(out)}",
                           "prompt")
        return out


class TokenizeRequest(BaseModel):
    """llama.cpp's form {"content", "add_special"} or vLLM's {"prompt", "add_special_tokens"}
    (what lm-evaluation-harness's remote tokenizer sends)."""

    model_config = ConfigDict(extra="forbid")
    content: StrictStr | None = None
    add_special: StrictBool | None = None
    prompt: StrictStr | None = None
    add_special_tokens: StrictBool | None = None

    def text_and_special(self) -> tuple[str, bool]:
        """(the text, whether to add the special BOS token per the model file)."""
        if (self.content is None) == (self.prompt is None):
            raise ApiError(400, "give exactly one of 'content' and 'prompt'", "content")
        special = self.add_special if self.add_special is not None else self.add_special_tokens
        return (self.content if self.content is not None else self.prompt,
                True if special is None else special)


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


def response(rid: str, obj: str, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    """A whole answer (`obj`: chat.completion or text_completion)."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chunk(rid: str, obj: str, model: str, choices: list[dict], use: dict | None = None
          ) -> dict[str, Any]:
    """A streamed chunk (`obj`: chat.completion.chunk or text_completion); with usage, the
    last one (choices empty)."""
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
           "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


# -- log-probabilities (decode.requests.TokenLogprob entries; None: the first prompt token) ----
def completion_logprobs(entries, text_of, offset0: int = 0) -> dict[str, Any]:
    """The completions route's logprobs object of these tokens' entries: tokens, token_logprobs,
    top_logprobs ({token text: logprob}), text_offset (from offset0)."""
    tokens, lps, tops, offsets = [], [], [], []
    at = offset0
    for e, tok in entries:
        text = text_of(tok)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {text_of(t): lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries, text_of, top: int) -> list[dict[str, Any]]:
    """The chat route's logprobs content items of these tokens' entries (`top` alternatives)."""
    def item(tok, lp):
        text = text_of(tok)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return [{**item(e.token, e.logprob),
             "top_logprobs": [item(t, lp) for t, lp in e.top[:top]]} for e in entries]
