"""Run every kernel a server step uses once before the server says it is ready.

numba compiles a kernel (or loads it from its disk cache) the first time it is called with a
type signature, in the calling thread.  A server that starts cold pays that inside its first
requests' steps: measured on the 2-core AMD EPYC, py-spy put 23% of the engine thread's
samples over a 16-client run (32 requests) in numba's dispatcher (`_compile_for_args`).
`warm_up` decodes a few tokens as a single request and as a batch (the small-batch kernel,
the batched attention and K/V writes), and one block in the server's default mode when it is
a diffusion mode (the block kernel), on a Generator of its own: no prefix cache, no state left.
"""
from __future__ import annotations

import dataclasses
import time

from ..errors import DecodeError
from .decode_settings import DecodeSettings
from .generator import Generator


def warm_up(model, settings: DecodeSettings | None = None) -> float:
    """Decode a few tokens on `model` in the ways a server step runs them; seconds taken."""
    t0 = time.perf_counter()
    prompt = [t % max(1, model.spec.n_vocab) for t in (1, 2, 3)]
    ar = Generator(model, DecodeSettings(mode="ar", max_tokens=2, ignore_eos=True))
    ar.generate(prompt)
    ar.generate_many([prompt, prompt[:2]])
    if settings is not None and settings.mode != "ar":
        one_block = dataclasses.replace(settings, max_tokens=settings.block_size,
                                        ignore_eos=True)
        try:
            Generator(model, one_block).generate(prompt)
        except DecodeError:  # e.g. no mask token, or a block longer than the context: the
            pass  # requests will say so themselves
    return time.perf_counter() - t0
