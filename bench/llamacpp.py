"""A thin llama.cpp runner (llama-cpp-python's low-level API) for same-run comparisons."""
from __future__ import annotations

import ctypes

import numpy as np

_LOG_CB = None


def _lib():
    """Import llama_cpp once, with its logging silenced."""
    global _LOG_CB
    import llama_cpp

    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


class LlamaCpp:
    """One llama.cpp model and context with a single sequence."""

    def __init__(self, path: str, n_ctx: int = 512, n_threads: int = 2, n_batch: int = 512,
                 exact: bool = False):
        """exact: F32 KV cache and no flash attention (which runs in F16 on the CPU), for
        comparing numbers; the default keeps llama.cpp's own fast settings for timing."""
        lc = self.lc = _lib()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        if exact:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
            cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def decode(self, tokens, pos0: int, logits_rows=None) -> np.ndarray | None:
        """One llama_decode of tokens at positions pos0..; logits of `logits_rows` (indices)."""
        b = self.batch
        want = set(range(len(tokens)) if logits_rows == "all" else (logits_rows or ()))
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(tok), pos0 + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i in want else 0
        b.n_tokens = len(tokens)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        if not want:
            return None
        rows = sorted(want)
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for j, i in enumerate(rows):
            out[j] = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i),
                                           shape=(self.n_vocab,))
        return out

    def truncate(self, n: int) -> None:
        """Drop cached positions >= n."""
        self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.ctx), 0, n, -1)

    def set_causal(self, causal: bool) -> None:
        """Causal (True) or bidirectional (False) attention for the following decodes."""
        self.lc.llama_set_causal_attn(self.ctx, causal)

    def close(self) -> None:
        """Free the context and model."""
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)
