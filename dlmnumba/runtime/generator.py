"""The Generator: the library's front of the engine (generate, stream, generate_many).

Every path runs the same `Engine` (runtime/engine.py): `stream`/`generate` step a private
engine of one request in the caller's thread, `generate_many` one of all the prompts; the
server's engine thread steps a long-lived one.  One loop, one error policy, and the prefix
cache (if the Generator has one) for all of them.  A Generator holds only what every request
shares (model, default settings, mask and stop tokens, the prefix cache), so one Generator
serves requests from several threads at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..decode.mask_token import require_mask_token, resolve_mask_id
from ..decode.modes import needs_mask, request_class
from ..decode.requests import Request, RequestStats
from ..model.bitnet import Model
from ..model.kv_cache import KVCache
from .decode_settings import DecodeSettings
from .engine import Engine, RequestOutput


@dataclass
class Chunk:
    """Tokens committed by one step of decoding, in order."""

    tokens: list[int]


@dataclass
class Generation:
    """A finished request."""

    tokens: list[int]  # generated ids (through the end-of-generation token, if any)
    text: str  # detokenized, special tokens dropped
    stats: RequestStats
    cache: KVCache  # K/V of prompt + tokens, except `pending`
    pending: list[int]  # trailing tokens whose K/V are not in the cache yet


class Generator:
    """Decodes requests on one model with default settings (a request may override them)."""

    def __init__(self, model: Model, settings: DecodeSettings = DecodeSettings(),
                 prefix_cache=None):
        self.model = model
        self.settings = settings
        self.prefix_cache = prefix_cache  # a runtime.prefix_cache.PrefixCache, or None
        self.mask_id = resolve_mask_id(model, settings.mask_token_id)
        if needs_mask(settings.mode):
            require_mask_token(model, self.mask_id, settings.mode)
        self.eog = frozenset(model.spec.eog_ids)  # end-of-generation tokens

    # -- one request -------------------------------------------------------------------------
    def request(self, prompt: Sequence[int], settings: DecodeSettings | None = None,
                logprobs: int | None = None, echo: bool = False, grammar=None) -> Request:
        """A new request's state machine (for an Engine, or a loop of your own).  logprobs: the
        log-probability of every committed token with that many alternatives (0..20; None:
        none); echo with logprobs: the prompt's tokens' too (one causal scoring pass);
        grammar (decode.constraint.Grammar): the output follows it (structured output)."""
        s = settings or self.settings
        mask_id = (self.mask_id if s.mask_token_id == self.settings.mask_token_id
                   else resolve_mask_id(self.model, s.mask_token_id))
        return request_class(s)(self.model, list(prompt), s, mask_id, self.eog,
                                logprobs=logprobs, echo=echo, grammar=grammar)

    def engine(self, max_running: int = 1) -> Engine:
        """An engine over this Generator's model and prefix cache."""
        return Engine(self.model, max_running=max_running, prefix_cache=self.prefix_cache)

    def stream(self, prompt: Sequence[int], settings: DecodeSettings | None = None,
               grammar=None) -> "Stream":
        """Decode one request in the calling thread; iterate the result for committed tokens
        as they are decided (`Chunk`s); its `.stats` are the request's."""
        return Stream(self.engine(), self.request(prompt, settings, grammar=grammar))

    def generate(self, prompt: Sequence[int], settings: DecodeSettings | None = None,
                 grammar=None) -> Generation:
        """Decode one request to the end (grammar: structured output, decode.constraint)."""
        return self.stream(prompt, settings, grammar).result()

    # -- many requests -----------------------------------------------------------------------
    def generate_many(self, prompts: Sequence[Sequence[int]],
                      settings: DecodeSettings | None = None, grammar=None
                      ) -> list[Generation]:
        """Decode every prompt together: each step runs one forward pass over the passes of all
        unfinished requests; the result equals decoding them one at a time."""
        engine = self.engine(max(1, len(prompts)))
        reqs = [engine.submit(self.request(p, settings, grammar=grammar)) for p in prompts]
        engine.run_until_idle()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [_generation(self.model, r) for r in reqs]


class Stream:
    """One request decoded step by step by its own engine, in the calling thread; iterate for
    its Chunks.  A failed request raises its error from the iteration."""

    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request = engine, request
        self.final: RequestOutput | None = None
        engine.submit(request)

    @property
    def stats(self) -> RequestStats:
        """The request's statistics so far (final once the iteration ended)."""
        return self.final.stats if self.final is not None else self.request.stats

    def __iter__(self) -> Iterator[Chunk]:
        while self.final is None:
            if not self.engine.has_work():
                raise RuntimeError("the engine dropped the request without finishing it")
            for out in self.engine.step().outputs:
                if out.new_tokens:
                    yield Chunk(list(out.new_tokens))
                if out.finished:
                    self.final = out
        if self.final.error is not None:
            raise self.final.error

    def result(self) -> Generation:
        """Run to the end; the finished request."""
        for _ in self:
            pass
        return _generation(self.engine.model, self.request)


def _generation(model: Model, r: Request) -> Generation:
    return Generation(list(r.out), model.tokenizer.decode(r.out), r.stats, r.cache, r.pending())
