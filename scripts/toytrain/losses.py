"""Training losses (no host synchronisation: masked means instead of boolean indexing): the
autoregressive loss with the optional recall-attention term, and the block-diffusion loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Batch, DataConfig
from .model import ToyDLM, noisy_clean_mask

__all__ = ["Masks", "ar_loss", "dlm_loss", "batch_loss"]


class Masks:
    """Attention masks by (kind, length, block), built once per device."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def noisy_clean(self, t: int, block: int) -> torch.Tensor:
        key = ("nc", t, block)
        if key not in self.cache:
            self.cache[key] = noisy_clean_mask(t, block)[None].to(self.device)
        return self.cache[key]


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         reduction="none")
    keep = keep.reshape(-1).float()
    return (ce * keep).sum() / keep.sum().clamp(min=1)


def ar_loss(model: ToyDLM, ids, plen, end, recall=None, heads=(), weight: float = 0.0
            ) -> torch.Tensor:
    """Next-token loss on the answer (and its EOT), causal attention; with recall [B, 2, T] (see
    recall_sources) and heads (copy head, key head or None), plus weight x the mean negative log
    of the attention each head pays to its targets."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)
    taught = [] if recall is None else [(lh, recall[:, row]) for row, lh in enumerate(heads)
                                        if lh is not None]
    probe = tuple(lh for lh, _ in taught)
    h, logps = model.hidden(ids, pos.expand(b, t), None, probe=probe), []
    if probe:
        h, logps = h
    tgt_pos = pos[None, 1:]
    keep = (tgt_pos >= plen[:, None]) & (tgt_pos < end[:, None])
    loss = _masked_ce(model.logits(h[:, :-1]), ids[:, 1:], keep)
    for (_, target), logp in zip(taught, logps):
        on = target >= 0
        if bool(on.any()):
            paid = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
            loss = loss - weight * paid[on].mean()
    return loss


def dlm_loss(model: ToyDLM, ids, plen, end, block: int, m: torch.Tensor, mask_id: int,
             masks: Masks) -> torch.Tensor:
    """Block-diffusion loss with complementary masks and token shift; m [B, T] is the first
    mask of each pair (the second is its complement on the answer)."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)
    answer = pos[None] >= plen[:, None]
    # score positions through the end of the block holding the final EOT; later ones are padding
    last = ((end - 1) // block + 1) * block
    scored = answer & (pos[None] < last[:, None])
    both = torch.cat([m & answer, ~m & answer])  # complementary pair
    ids2, scored2 = ids.repeat(2, 1), scored.repeat(2, 1)
    noisy = torch.where(both, torch.full_like(ids2, mask_id), ids2)
    inp = torch.cat([noisy, ids2], 1)
    pos2 = torch.cat([pos, pos])
    h = model.hidden(inp, pos2.expand(2 * b, 2 * t), masks.noisy_clean(t, block))
    # target i (1..t-1): row i-1 of the noisy stream, or of the clean stream when i starts a block
    tgt = pos[1:]
    src = torch.where(tgt % block == 0, t + tgt - 1, tgt - 1)
    keep = both[:, 1:] & scored2[:, 1:]
    return _masked_ce(model.logits(h[:, src]), ids2[:, 1:], keep)


def batch_loss(model: ToyDLM, batch: Batch, device, mask_id: int, masks: Masks,
               cfg: DataConfig) -> torch.Tensor:
    ids, plen, end = (torch.from_numpy(a).to(device, non_blocking=True)
                      for a in (batch.ids, batch.plen, batch.end))
    if batch.kind == "ar":
        if batch.recall is None:
            return ar_loss(model, ids, plen, end)
        recall = torch.from_numpy(batch.recall).to(device, non_blocking=True)
        return ar_loss(model, ids, plen, end, recall, (cfg.recall_head, cfg.key_head),
                       cfg.recall_weight)
    m = torch.from_numpy(batch.masked).to(device, non_blocking=True)
    return dlm_loss(model, ids, plen, end, batch.block, m, mask_id, masks)
