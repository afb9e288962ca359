"""`spec`: `ar`'s output, several tokens per pass -- the model drafts with masks and verifies
its drafts causally in the same pass (see decode/requests.py for the protocol).

A Fast-dLLM v2 model is an autoregressive model too (`ar` runs it causally), so one pass can
both check a draft and make the next one.  A pass is, at positions p0..:

    [U: committed tokens the cache lacks (the last one, at first the prompt's rest), causal]
    [D: the k drafted tokens for positions p..p+k-1, causal]
    [M: B mask tokens after them, bidirectional among themselves, seeing everything before]

By token shift the causal rows of U's last token and of D give the tokens `ar` picks at
p..p+k (each row sees exactly the tokens `ar` would have fed it, and rows are computed
independently of the rows after them, bit for bit).  The pass commits the longest prefix of D
equal to them plus the next `ar` token: at least one token, always `ar`'s.  If the whole
draft was accepted, the mask rows' predictions (positions p+k+1..) are the next draft;
otherwise the next pass drafts again after the corrected token.  The K/V of U and of the
accepted drafts are exact causal K/V and stay; the rejected drafts' and the masks' are cut
off, so the cache is always what `ar` would hold.

How many masks a pass carries is a draft policy's choice (`DRAFT_POLICIES`, setting
`dlm.draft_policy`, at most `dlm.draft_size`).  Temperature 0 only: sampling would need the
speculative-sampling acceptance rule, refused by the settings (settings.check_together).
"""
from __future__ import annotations

import math

from ..model.batch import CAUSAL_MASK, Output
from .mask_token import require_mask_token
from .requests import Request


class DraftPolicy:
    """How many mask positions a spec pass drafts, from what the request accepted so far."""

    name = "?"

    def size(self, settings, history: list[tuple[int, int]]) -> int:
        """Masks for the next pass (>= 1, <= settings.draft_size); history: (drafted,
        accepted) of the request's passes that verified a draft, oldest first."""
        raise NotImplementedError


class FixedDraft(DraftPolicy):
    """Always draft_size masks."""

    name = "fixed"

    def size(self, settings, history):
        return settings.draft_size


class AdaptiveDraft(DraftPolicy):
    """Draft the positions more likely than not to be accepted: with alpha the request's
    per-token acceptance so far (accepted / examined draft tokens, a Beta(3, 1) prior), the
    i-th draft token is reached and accepted with probability alpha^i, so draft the B with
    alpha^B >= 1/2: B = log(1/2) / log(alpha), between 1 and draft_size (draft_size before
    any draft was verified).  A model whose drafts are right gets long drafts; one whose
    drafts are wrong gets short ones, whose passes cost little more than an ar step."""

    name = "adaptive"
    PRIOR = (3.0, 1.0)  # pseudo-counts of accepted / rejected draft tokens

    def size(self, settings, history):
        if not history:
            return settings.draft_size
        # a pass examined its draft up to the first rejection: j accepted, then (if j < k)
        # one rejected
        accepted = sum(j for _, j in history) + self.PRIOR[0]
        rejected = sum(1 for k, j in history if j < k) + self.PRIOR[1]
        alpha = accepted / (accepted + rejected)
        return max(1, min(settings.draft_size, int(math.log(0.5) / math.log(alpha))))


DRAFT_POLICIES: dict[str, DraftPolicy] = {}


def register_draft(policy: DraftPolicy) -> DraftPolicy:
    """Make `policy` available as dlm.draft_policy `policy.name`."""
    DRAFT_POLICIES[policy.name] = policy
    return policy


for _p in (FixedDraft(), AdaptiveDraft()):
    register_draft(_p)


class SpecRequest(Request):
    """Draft with masks, verify causally, in one pass (see the module docstring)."""

    mask = CAUSAL_MASK  # what its cache holds: causal K/V of real tokens (prefix-cache pages)

    def __init__(self, model, prompt, settings, mask_id, eog, cache=None, **kw):
        require_mask_token(model, mask_id, settings.mode)
        super().__init__(model, prompt, settings, mask_id, eog, cache, **kw)
        self.policy = DRAFT_POLICIES[settings.draft_policy]
        self.draft: list[int] = []  # tokens proposed for the positions after the output
        self.history: list[tuple[int, int]] = []  # (drafted, accepted) per verified draft
        self._n_cached = self._n_draft = 0  # of the pass in flight

    def _plan(self):
        committed = self.prompt + self.out
        pos0 = self.cache.length  # the cache may hold a prefix of the prompt (prefix cache)
        fresh = committed[pos0:]  # at least the last committed token
        left = self.settings.max_tokens - len(self.out)  # tokens this request may still commit
        draft = self.draft[:left - 1]  # a pass commits at most len(draft) + 1
        n_mask = min(self.policy.size(self.settings, self.history), left - 1 - len(draft))
        tokens = fresh + draft + [self.mask_id] * n_mask
        first_mask = pos0 + len(fresh) + len(draft)
        # rows: U's last and each draft's (the tokens ar picks), then the masks' that predict
        # a position after the ones those pick (token shift: every mask's; else all but the
        # first's, which predicts its own position)
        causal_rows = list(range(len(fresh) - 1, len(fresh) + len(draft)))
        skip = 0 if self.shift else 1
        mask_rows = list(range(len(fresh) + len(draft) + skip, len(tokens)))
        mask = CAUSAL_MASK.with_tail(first_mask) if n_mask else CAUSAL_MASK
        self._n_cached, self._n_draft = pos0 + len(fresh), len(draft)
        self._draft_in_pass = draft
        return self._segment(tokens, pos0, mask, causal_rows + mask_rows)

    def _output(self, exact_confidence: bool) -> Output:
        # temperature 0 (settings refuse sampling): the argmax is all, unless a grammar masks
        return Output.LOGITS if self.constraint is not None else Output.ARGMAX

    def _take(self, tok, conf):
        k, draft = self._n_draft, self._draft_in_pass
        if self.constraint is not None:
            return self._take_constrained(k, draft)
        picks = [int(t) for t in tok[:k + 1]]  # what ar commits at the next k + 1 positions
        j = self._accept(draft, picks)
        self.draft = [int(t) for t in tok[k + 1:]] if j == k else []
        new = self._emit(draft[:j] + [picks[j]],  # (cut at a stop token, at max_tokens)
                         self._entries(range(j + 1), picks[:j + 1]))
        kept = min(j, len(new))  # accepted drafts that were committed
        # exact causal K/V: the tokens the cache lacked and the committed drafts; cut the rest
        self.cache.truncate(self._n_cached + kept)
        if k:
            self.history.append((k, j))
            self._drafted += k
            self._accepted += kept
        return new

    def progress(self):
        # the draft the next pass verifies, after the committed output
        return (len(self.out), tuple(self.draft)) if self.draft else None

    @staticmethod
    def _accept(draft: list[int], picks: list[int]) -> int:
        """How many drafted tokens are accepted: the longest prefix equal to ar's picks."""
        j = 0
        while j < len(draft) and draft[j] == picks[j]:
            j += 1
        return j

    def _take_constrained(self, k: int, draft: list[int]) -> list[int]:
        """Under a grammar: the causal rows' picks are the masked argmax after the accepted
        prefix (what constrained `ar` picks); the masks' predictions, unconstrained, are only
        the next draft."""
        logits = self._last_logits
        walk = self.constraint.fork()
        picks, j = [], 0
        for i in range(k + 1):
            t, _ = self._masked_pick(logits[i], walk)
            picks.append(t)
            if i == k or draft[i] != t or t in self.eog:
                break
            self.constraint.consume(t, walk)
            j += 1
        committed = draft[:j] + [picks[j]]
        for t in committed:
            if t not in self.eog:
                self.constraint.consume(t)
        self.draft = [int(t) for t in logits[k + 1:].argmax(1)] if j == k else []
        new = self._emit(committed, [self._row_entry(logits[i], t)
                                     for i, t in enumerate(committed)])
        kept = min(j, len(new))
        self.cache.truncate(self._n_cached + kept)
        if k:
            self.history.append((k, j))
            self._drafted += k
            self._accepted += kept
        self._constraint_done()
        return new
