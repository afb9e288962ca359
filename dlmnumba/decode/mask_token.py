"""The mask token the diffusion modes fill: which id it is, and the one error when there is none."""
from __future__ import annotations

from ..errors import DecodeError
from ..gguf.spec import MASK_TOKEN_TEXT


def resolve_mask_id(model, override: int | None = None) -> int | None:
    """The mask token: override, the file's mask_token_id, the token |<MASK>|, or one of the
    last 4 ids whose text contains MASK; None when the model has none."""
    if override is not None:
        model.check_tokens([override], "mask_token_id")
        return int(override)
    if model.spec.mask_id is not None:
        return model.spec.mask_id
    try:
        tok = model.tokenizer
    except Exception:  # no tokenizer in the file: nothing more to look at
        return None
    found = tok.id_of(MASK_TOKEN_TEXT)
    if found is not None:
        return found
    n = model.spec.n_vocab
    for i in range(n - 1, max(-1, n - 5), -1):
        if "MASK" in tok.token_text(i).upper():
            return i
    return None


def require_mask_token(model, mask_id: int | None, mode: str) -> int:
    """mask_id, or the one error a diffusion mode meets on a model without a mask token."""
    if mask_id is None:
        raise DecodeError(
            f"{model.path}: the model declares no mask token (no "
            f"'tokenizer.ggml.mask_token_id', no '{MASK_TOKEN_TEXT}' token), so mode "
            f"'{mode}' cannot run; pass --mask-token-id ID or use --mode ar", "mode")
    return mask_id
