"""Per-request decoding state machines: `next_pass()` says what to run, `feed()` takes its result.

A request owns everything about one generation: prompt, settings, its KV cache, the tokens
decided so far, its random generator, its clock and statistics.  Something outside (a plain
loop in `Generator`, or the batching `Engine`) asks each unfinished request for its next pass
(a `model.batch.Segment`), runs the passes of many requests in one `Model.forward_batch`, and
feeds each request its part of the result; `feed` returns the tokens that pass committed.

kv_commit 'none' replays the seed server's scheduling for like-for-like speed comparisons:
prefill, one autoregressive token, then per block one pass of [previous token, masks] whose
mask K/V stay in the cache as stale entries.  Its output quality suffers.

The diffusion state machine is in decode/diffusion.py; which machine runs a mode, in
decode/modes.py.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from ..errors import DecodeError
from ..model.batch import CAUSAL_MASK, AttentionMask, Logprobs, LogprobsWanted, Output, Pass, Segment
from .strategies import pick_tokens

_IDS = itertools.count(1)


@dataclass(frozen=True)
class RequestStats:
    """What one request cost: a snapshot (`Request.stats` builds a new one each time)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    ttft_s: float = 0.0  # time to the first committed token (from the request's creation)
    latency_s: float = 0.0  # time to the end (so far, while it runs)
    finish_reason: str | None = None  # length | stop | cancelled | error; None while running
    draft_tokens: int = 0  # spec: tokens drafted and verified
    accepted_tokens: int = 0  # spec: drafted tokens accepted (committed as drafted)

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per forward pass."""
        return self.generated_tokens / max(1, self.forward_passes)


MAX_TOP_LOGPROBS = 20  # most alternatives a request may ask per token (OpenAI's limit)


@dataclass(frozen=True)
class TokenLogprob:
    """A committed (or prompt) token's log-probability under the exact LM head, and the most
    likely alternatives at its position: ((token, logprob), ...), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(lp: Logprobs, row: int, token: int, k: int,
                  logits: np.ndarray | None = None) -> TokenLogprob:
    """The entry of `token` at `row` of a pass's Logprobs (k alternatives).  The token is one
    of the row's top ones (an argmax: the first, or one tied with it), else its logit comes
    from `logits` (a sampled token)."""
    top = tuple((int(t), float(v)) for t, v in zip(lp.top_ids[row, :k], lp.top_lps[row, :k]))
    try:
        value = lp.of(row, token)
    except KeyError:
        if logits is not None:
            z = logits[row].astype(np.float64)
            z = z[np.isfinite(z)] if not np.isfinite(z[token]) else z
            mx = z.max()
            value = float(logits[row, token] - (mx + np.log(np.exp(z - mx).sum())))
        else:  # an argmax tied with the head's first pick: the same logit
            value = float(lp.top_lps[row, 0])
    return TokenLogprob(int(token), value, top)


def check_context(n_prompt: int, max_tokens: int, n_ctx: int, field: str = "max_tokens"
                  ) -> None:
    """The one context-length rule: the prompt plus max_tokens (given as `field`) fit the
    model's context (else a DecodeError naming the field, code context_length_exceeded)."""
    if n_prompt + max_tokens > n_ctx:
        raise DecodeError(
            f"the prompt ({n_prompt} tokens) plus {field} ({max_tokens}) is "
            f"{n_prompt + max_tokens} tokens, beyond the model's context length ({n_ctx})",
            field, "context_length_exceeded")


class Request:
    """One generation's state; subclasses are the decoding loops as state machines.

    `eog` are the model's end-of-generation tokens (none when settings.ignore_eos)."""

    def __init__(self, model, prompt: list[int], settings, mask_id: int | None,
                 eog: frozenset[int], cache=None, logprobs: int | None = None,
                 echo: bool = False, grammar=None):
        self.id = next(_IDS)
        self.t0 = time.perf_counter()
        self.prompt = [int(t) for t in prompt]
        if not self.prompt:
            raise DecodeError("the prompt is empty (and the model adds no BOS token)", "prompt")
        model.check_tokens(self.prompt, "prompt")
        self.settings = s = settings
        if s.block_size > model.n_ctx:
            raise DecodeError(f"block_size {s.block_size} is larger than the model's context "
                              f"length ({model.n_ctx})", "block_size")
        check_context(len(self.prompt), s.max_tokens, model.n_ctx)
        self.mask_id, self.shift = mask_id, model.spec.shift_logits
        self.eog = frozenset() if s.ignore_eos else frozenset(eog)
        self.cache = cache if cache is not None else model.new_cache(
            len(self.prompt) + s.max_tokens + 2 * s.block_size + 1)
        self.rng = np.random.default_rng(s.sampling.seed)
        self.out: list[int] = []  # tokens committed so far
        self.finished = False
        self.started = False  # a pass was planned: the cache is the request's own from here
        self.error: BaseException | None = None
        self._pass: Pass | None = None  # the pass handed out and not fed yet
        self._passes = 0  # forward passes fed (head-only passes not counted)
        self._ttft = self._latency = 0.0
        self._finish_reason: str | None = None
        self._drafted = self._accepted = 0  # spec's draft tokens verified and accepted
        # log-probabilities: of each committed token (k alternatives), and with echo of the
        # prompt's tokens (one causal scoring pass first, on a cache of its own)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise DecodeError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {logprobs}",
                              "logprobs")
        self.logprobs_k = logprobs
        # structured output: a matcher of the grammar over the vocabulary (decode/constraint.py)
        self.constraint = None
        if grammar is not None:
            if not self.supports_grammar:
                raise DecodeError(f"{type(self).__name__} does not support structured output",
                                  "response_format")
            from .constraint import Constraint
            self.constraint = Constraint(grammar, model.tokenizer, model.n_vocab, self.eog)
        self.out_logprobs: list[TokenLogprob | None] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # set once
        self._scoring = None
        if echo and logprobs is not None:
            n = len(self.prompt)
            if n == 1:
                self.prompt_logprobs = (None,)
            else:
                self._scoring = Segment(
                    self.prompt, model.new_cache(n), np.arange(n, dtype=np.int32),
                    CAUSAL_MASK, list(range(n - 1)), Output.HIDDEN, mask_id,
                    logprobs=LogprobsWanted(max(1, logprobs),
                                            np.asarray(self.prompt[1:], np.int64)))

    @property
    def stats(self) -> RequestStats:
        """A snapshot of what the request has cost so far (final once it finished)."""
        latency = self._latency if self.finished else time.perf_counter() - self.t0
        return RequestStats(prompt_tokens=len(self.prompt), generated_tokens=len(self.out),
                            forward_passes=self._passes, ttft_s=self._ttft, latency_s=latency,
                            finish_reason=self._finish_reason, draft_tokens=self._drafted,
                            accepted_tokens=self._accepted)

    # -- the protocol ------------------------------------------------------------------------
    def next_pass(self) -> Pass | None:
        """The pass this request needs now (the same one until it is fed), or None when done."""
        if self.finished:
            return None
        if self._pass is None:
            self._pass = self._scoring if self._scoring is not None else self._plan()
            self.started = True
        return self._pass

    def feed(self, result) -> list[int]:
        """Take the result of the pass from next_pass() (logits, or (tokens, confidences) for
        the argmax outputs); return the tokens it commits, in order."""
        seg, self._pass = self._pass, None
        if seg is None:
            raise RuntimeError("feed() without a pass from next_pass()")
        self._last = seg  # the pass being fed
        if len(seg.tokens):  # a pass through the layers (a head-only pass is not one)
            self._passes += 1
        if seg is self._scoring:  # echo: the prompt's log-probabilities, then decoding
            self._scoring = None
            lp, k = seg.logprobs_out, self.logprobs_k
            self.prompt_logprobs = (None,) + tuple(
                TokenLogprob(int(t), float(lp.target_lps[i]),
                             tuple((int(a), float(b)) for a, b in
                                   zip(lp.top_ids[i, :k], lp.top_lps[i, :k])))
                for i, t in enumerate(self.prompt[1:]))
            return []
        self._last_logits = None
        if seg.output is Output.LOGITS:
            logits = result
            if self.mask_id is not None:  # committing a mask token would be meaningless
                logits[:, self.mask_id] = -np.inf
            self._last_logits = logits
            if self.constraint is not None:  # the state machine picks row by row, masked
                return self._take(None, None)
            tok, conf = pick_tokens(logits, self.settings.sampling, self.rng)
        else:
            tok, conf = result
        return self._take(tok, conf)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop here: no further passes."""
        if not self.finished:
            self._finish(reason)

    def fail(self, error: BaseException) -> None:
        """Stop with an error (the engine reports it to whoever waits on the request)."""
        if not self.finished:
            self.error = error
            self._finish("error")

    # set by whoever wants to watch decoding pass by pass (the chat page): the engine then
    # reports progress() after every pass, not only when tokens are committed
    report_progress = False

    def progress(self) -> tuple[int, tuple] | None:
        """What the request is deciding now, for a live view: (output index of the first
        position, the positions' tokens with None for those still masked), or None."""
        return None

    def pending(self) -> list[int]:
        """Trailing tokens of prompt + output whose K/V are not in the cache."""
        return (self.prompt + self.out)[self.cache.length:]

    # K/V in this request's cache hold exactly the real tokens before cache.length (computed
    # under self.mask), so a prefix cache may store them and seed other requests with them
    reusable_kv = True
    mask: AttentionMask

    # -- for the subclasses --------------------------------------------------------------------
    def _plan(self) -> Pass:
        raise NotImplementedError

    def _take(self, tok: np.ndarray, conf: np.ndarray) -> list[int]:
        raise NotImplementedError

    supports_grammar = True  # the state machine can commit under a Constraint

    def _output(self, exact_confidence: bool) -> Output:
        if self.settings.sampling.temperature > 0.0 or self.constraint is not None:
            return Output.LOGITS  # (a constraint masks the logits before picking)
        return Output.ARGMAX_EXACT if exact_confidence else Output.ARGMAX

    def _segment(self, tokens: list[int], pos0: int, mask: AttentionMask, rows,
                 exact_confidence: bool = False) -> Segment:
        return Segment(tokens, self.cache, np.arange(pos0, pos0 + len(tokens), dtype=np.int32),
                       mask, rows, self._output(exact_confidence), self.mask_id,
                       logprobs=self._wanted())

    def _masked_pick(self, row: np.ndarray, matcher=None) -> tuple[int, float]:
        """The token (and its probability) the constraint allows at a logits row, given the
        text its matcher has consumed: argmax or a sample of the allowed tokens only."""
        z = np.array(row, dtype=np.float32, copy=True)
        allowed = self.constraint.allowed(matcher)
        z[~allowed[:z.shape[0]]] = -np.inf
        tok, conf = pick_tokens(z[None], self.settings.sampling, self.rng)
        return int(tok[0]), float(conf[0])

    def _row_entry(self, row: np.ndarray, token: int) -> TokenLogprob | None:
        """A token's log-probability entry from its logits row (the unmasked model's)."""
        if self.logprobs_k is None:
            return None
        z = row.astype(np.float64)
        mx = z[np.isfinite(z)].max()
        lsm = z - (mx + np.log(np.exp(z - mx).sum()))
        k = self.logprobs_k
        top = np.lexsort((np.arange(z.shape[0]), -lsm))[:k] if k else []
        return TokenLogprob(int(token), float(lsm[token]),
                            tuple((int(t), float(lsm[t])) for t in top))

    def _constraint_done(self) -> None:
        """The grammar is complete and admits nothing more: generation ends here."""
        if self.constraint is not None and self.constraint.done and not self.finished:
            self._finish("stop")

    def _wanted(self) -> LogprobsWanted | None:
        """What the passes ask for besides the output: alternatives per row, if logprobs
        (none under a grammar: its entries come from the pass's logits, `_row_entry`)."""
        if self.logprobs_k is None or self.constraint is not None:
            return None
        return LogprobsWanted(max(1, self.logprobs_k))

    def _entries(self, rows, tokens) -> list[TokenLogprob] | None:
        """The log-probability entries of `tokens` at rows `rows` of the pass being fed."""
        if self.logprobs_k is None:
            return None
        lp = self._last.logprobs_out
        return [token_logprob(lp, int(r), int(t), self.logprobs_k, self._last_logits)
                for r, t in zip(rows, tokens)]

    def _emit(self, new: list[int], entries: list | None = None) -> list[int]:
        """Commit decided tokens: exact max_tokens cap, cut after an end-of-generation token;
        `entries` their log-probabilities (when the request asks for them)."""
        new = new[: self.settings.max_tokens - len(self.out)]
        stop = next((i for i, t in enumerate(new) if t in self.eog), None)
        if stop is not None:
            new = new[: stop + 1]
        if new and not self.out:
            self._ttft = time.perf_counter() - self.t0
        if self.logprobs_k is not None:
            self.out_logprobs += (entries or [None] * len(new))[:len(new)]
        self.out += new
        if stop is not None:
            self._finish("stop")
        elif len(self.out) >= self.settings.max_tokens:
            self._finish("length")
        return new

    def _finish(self, reason: str) -> None:
        self.finished = True
        self._pass = None
        self._finish_reason = reason
        self._latency = time.perf_counter() - self.t0


class ARRequest(Request):
    """One token per pass, causal attention: the prompt (what the cache lacks of it) first,
    then each new token."""

    mask = CAUSAL_MASK

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._feed: list[int] | None = None  # tokens of the next pass (None: the prompt's)
        self._pos = 0

    def _plan(self):
        if self._feed is None:  # the cache may hold a prefix of the prompt (prefix cache)
            self._pos = self.cache.length
            self._feed = self.prompt[self._pos:]
        return self._segment(self._feed, self._pos, CAUSAL_MASK, [len(self._feed) - 1])

    def _take(self, tok, conf):
        if self.constraint is not None:
            t, _ = self._masked_pick(self._last_logits[0])
            self.constraint.consume(t)
            entries = [self._row_entry(self._last_logits[0], t)]
        else:
            t = int(tok[0])
            entries = self._entries([0], [t])
        self._pos += len(self._feed)
        self._feed = [t]
        new = self._emit([t], entries)
        self._constraint_done()
        return new


class SeedReplayRequest(Request):
    """The seed's scheduling: prefill, one AR token, then per block one pass of
    [prev @ p-1, masks @ p..p+B-1] with p = len(prompt) at first.  The pass overwrites the
    cache slot at p-1 (at first the last prompt token's, later the previous block's last
    mask) and leaves every other mask's stale K/V in place."""

    def __init__(self, model, prompt, settings, mask_id, eog, cache=None, **kw):
        super().__init__(model, prompt, settings, mask_id, eog, cache, **kw)
        self.mask = AttentionMask.parse(settings.attention, settings.block_size)
        self._prev: int | None = None
        self._p = len(self.prompt)

    def _plan(self):
        if self._prev is None:
            return self._segment(self.prompt, 0, self.mask, [len(self.prompt) - 1])
        b = self.settings.block_size
        self.cache.truncate(self._p - 1)
        return self._segment([self._prev] + [self.mask_id] * b, self._p - 1, self.mask,
                             list(range(b)))

    def _take(self, tok, conf):
        new = [int(t) for t in tok]
        if self._prev is not None:
            self._p += self.settings.block_size
        self._prev = new[-1]
        return self._emit(new, self._entries(range(len(new)), new))

    def pending(self):
        return []  # the stale cache is never continued

    reusable_kv = False  # stale mask K/V and an overwritten prompt slot
    supports_grammar = False  # a comparison mode: its blocks are not decided left to right


# confidence setting -> whether the LM head computes the confidence exactly (model/heads.py)
EXACT_CONFIDENCE = {"exact": True, "screened": False}
