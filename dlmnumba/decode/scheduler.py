"""Decoding API: settings, the Generator (one request at a time, or many decoded together).

Layering: `decode/requests.py` and `decode/diffusion.py` hold the request state machines
(next_pass / feed; `decode/modes.py` picks one per mode),
`decode/policies.py` the unmasking policies by name, `decode/strategies.py` token picking;
`engine.py` steps many requests with one `Model.forward_batch` per step.  A Generator holds
only what every request shares (model, default settings, mask and stop tokens), so one
Generator serves requests from several threads at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence

from ..errors import DecodeError
from ..gguf.spec import MASK_TOKEN_TEXT as MASK_TEXT
from ..model.bitnet import Model
from ..model.kv_cache import KVCache
from .modes import AR_MODE, request_class
from .requests import ATTENTIONS, Request, RequestStats
from ..model.batch import Output, Segment
from .strategies import Sampling



@dataclass(frozen=True)
class DecodeSettings:
    """How one request is decoded."""

    mode: str = "greedy"  # greedy | iterative | adaptive | ar
    block_size: int = 64  # tokens per diffusion block (blocks aligned at multiples of it)
    small_block_size: int = 8  # sub-block refined at a time by iterative / adaptive
    threshold: float = 0.9  # confidence needed to commit a token (iterative / adaptive)
    max_iterations_per_block: int = 10  # refinement passes per block before filling the rest
    attention: str = "block"  # block (Fast-dLLM v2) | causal
    kv_commit: str = "normal"  # normal | none (the seed's stale-mask scheduling)
    dual_cache: bool = True  # refinement passes over the sub-block only (Fast-dLLM DualCache)
    confidence: str = "exact"  # exact | screened: the confidence iterative/adaptive threshold
    mask_token_id: int | None = None  # None = from the model file
    max_tokens: int = 128  # exact cap on generated tokens
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self):
        # the same definitions as YAML, CLI and HTTP requests (dlmnumba/settings.py)
        from ..settings import DECODE_KEYS, check_values

        values = {DECODE_KEYS[f.name]: getattr(self, f.name) for f in fields(self)
                  if f.name in DECODE_KEYS}
        values.update({DECODE_KEYS[f.name]: getattr(self.sampling, f.name)
                       for f in fields(self.sampling)})
        check_values(values, "DecodeSettings")


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


def resolve_mask_id(model: Model, override: int | None = None) -> int | None:
    """The mask token: override, the file's mask_token_id, the token |<MASK>|, or one of the
    last 4 ids whose text contains MASK; None when the model has none."""
    n = model.spec.n_vocab
    if override is not None:
        if not 0 <= override < n:
            raise DecodeError(f"mask_token_id {override} is outside the vocabulary (0..{n - 1})")
        return int(override)
    if model.spec.mask_id is not None:
        return model.spec.mask_id
    try:
        tok = model.tokenizer
    except Exception:  # no tokenizer in the file: nothing more to look at
        return None
    found = tok.id_of(MASK_TEXT)
    if found is not None:
        return found
    for i in range(n - 1, max(-1, n - 5), -1):
        if "MASK" in tok.token_text(i).upper():
            return i
    return None


class Generator:
    """Decodes requests on one model with default settings (a request may override them)."""

    def __init__(self, model: Model, settings: DecodeSettings = DecodeSettings()):
        self.model = model
        self.settings = settings
        self.mask_id = resolve_mask_id(model, settings.mask_token_id)
        if settings.mode != AR_MODE and self.mask_id is None:
            raise DecodeError(
                f"{model.path}: the model declares no mask token (no "
                f"'tokenizer.ggml.mask_token_id', no '{MASK_TEXT}' token), so mode "
                f"'{settings.mode}' cannot run; pass --mask-token-id ID or use --mode ar")
        self.eog = frozenset(model.spec.eog_ids)  # end-of-generation tokens

    # -- one request -------------------------------------------------------------------------
    def request(self, prompt: Sequence[int], settings: DecodeSettings | None = None) -> Request:
        """A new request's state machine (for a loop of your own, or an Engine)."""
        s = settings or self.settings
        mask_id = (self.mask_id if s.mask_token_id == self.settings.mask_token_id
                   else resolve_mask_id(self.model, s.mask_token_id))
        return request_class(s)(self.model, list(prompt), s, mask_id, self.eog)

    def stream(self, prompt: Sequence[int], settings: DecodeSettings | None = None) -> "Stream":
        """Decode one request; iterate the result for committed tokens as they are decided
        (`Chunk`s); its `.stats` are the request's."""
        return Stream(self.model, self.request(prompt, settings))

    def generate(self, prompt: Sequence[int], settings: DecodeSettings | None = None
                 ) -> Generation:
        """Decode one request to the end."""
        return self.stream(prompt, settings).result()

    # -- many requests -----------------------------------------------------------------------
    def generate_many(self, prompts: Sequence[Sequence[int]],
                      settings: DecodeSettings | None = None) -> list[Generation]:
        """Decode every prompt together: each step runs one forward pass over the passes of all
        unfinished requests; the result equals decoding them one at a time."""
        from ..engine import Engine

        engine = Engine(self.model, max_running=max(1, len(prompts)))
        reqs = [engine.submit(self.request(p, settings)) for p in prompts]
        engine.run_until_idle()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [_generation(self.model, r) for r in reqs]

    def commit(self, gen: Generation) -> None:
        """Write the pending tokens' K/V into the generation's cache (one forward pass)."""
        if gen.pending:
            s = self.settings
            mask = ATTENTIONS["causal" if s.mode == AR_MODE else s.attention](s.block_size)
            self.model.forward_batch([Segment(gen.pending, gen.cache, None, mask, [],
                                              Output.HIDDEN)])
            gen.pending = []


class Stream:
    """One request decoded pass by pass in the calling thread; iterate for its Chunks."""

    def __init__(self, model: Model, request: Request):
        self.model, self.request = model, request

    @property
    def stats(self) -> RequestStats:
        """The request's statistics (final once the iteration ended)."""
        return self.request.stats

    def __iter__(self) -> Iterator[Chunk]:
        r = self.request
        while (seg := r.next_pass()) is not None:
            new = r.feed(self.model.forward_batch([seg])[0])
            if new:
                yield Chunk(new)

    def result(self) -> Generation:
        """Run to the end; the finished request."""
        for _ in self:
            pass
        return _generation(self.model, self.request)


def _generation(model: Model, r: Request) -> Generation:
    return Generation(list(r.out), model.tokenizer.decode(r.out), r.stats, r.cache, r.pending())
