"""Decoder invariants: each one breaks for a wrong token shift, mask, cache or policy."""
import sys
from pathlib import Path

import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator, Sampling
from dlmnumba.decode import policies
from dlmnumba.decode.mask_token import resolve_mask_id
from dlmnumba.decode.policies import step_threshold
from dlmnumba.errors import DecodeError
from dlmnumba.model.batch import AttentionMask, Output, Segment

# bench/ last on the path: its kernels.py would shadow the `kernels` package (Hugging Face's)
# that transformers imports when installed
BENCH = str(Path(__file__).resolve().parents[1] / "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)

PROMPT = [1007, 39, 735, 78, 271, 285, 493, 5, 600, 7, 88]  # 11 tokens: not block aligned


@pytest.fixture(scope="module")
def tiny(synth_model):
    return dlmnumba.load_model(synth_model())


def run(model, prompt=PROMPT, **kw):
    return Generator(model, DecodeSettings(**kw)).generate(prompt)


def masked_argmax(logits, mask_id):
    logits = logits.copy()
    logits[:, mask_id] = -np.inf
    return logits.argmax(1)


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_greedy_block_1_equals_ar(tiny, attention):
    ar = run(tiny, mode="ar", max_tokens=24)
    g1 = run(tiny, mode="greedy", block_size=1, small_block_size=1, attention=attention,
             max_tokens=24)
    assert g1.tokens == ar.tokens
    assert ar.stats.forward_passes == 24 and g1.stats.forward_passes == 24


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_greedy_equals_argmax_of_fresh_logits(tiny, attention):
    """Each block = argmax of Model.logits over [context, masks] under the same mask (shift 1)."""
    b = 8
    out = run(tiny, mode="greedy", block_size=b, attention=attention, max_tokens=21)
    mask = tiny.spec.mask_id
    seq = list(PROMPT)
    while len(seq) - len(PROMPT) < 21:
        pos = len(seq)
        end = (pos // b + 1) * b
        logits = tiny.logits(seq + [mask] * (end - pos), attention=attention,
                             block_size=b if attention == "block" else None)
        seq += masked_argmax(logits[pos - 1:end - 1], mask).tolist()
    assert out.tokens == seq[len(PROMPT):len(PROMPT) + 21]
    assert out.stats.forward_passes == 3  # blocks 8..15 (5 tokens), 16..23, 24..31 (cut to 8)


def test_token_shift_off_uses_own_position(synth_model, tmp_path):
    from gguf_edit import rewrite
    path = rewrite(synth_model(), tmp_path / "noshift.gguf",
                   metadata={"diffusion.shift_logits": False})
    m = dlmnumba.load_model(path)
    assert m.spec.shift_logits is False
    out = run(m, mode="greedy", block_size=16, max_tokens=5)
    logits = m.logits(PROMPT + [m.spec.mask_id] * 5, attention="block", block_size=16)
    assert out.tokens == masked_argmax(logits[11:16], m.spec.mask_id).tolist()


def test_iterative_low_threshold_commits_a_sub_block_per_pass(tiny):
    out = run(tiny, prompt=PROMPT[:8], mode="iterative", block_size=16, small_block_size=4,
              threshold=1e-9, max_tokens=32)
    assert out.stats.forward_passes == 8  # sub-blocks: 2 (8..15) + 4 (16..31) + 2 (32..39)
    assert len(out.tokens) == 32


def test_iterative_threshold_one_commits_one_token_per_pass(tiny):
    out = run(tiny, prompt=PROMPT[:8], mode="iterative", block_size=16, small_block_size=4,
              threshold=1.0, max_iterations_per_block=100, max_tokens=32)
    assert out.stats.forward_passes == 32


def test_iteration_cap_fills_with_best_predictions(tiny):
    out = run(tiny, prompt=PROMPT[:8], mode="iterative", block_size=16, small_block_size=4,
              threshold=1.0, max_iterations_per_block=3, max_tokens=32)
    assert out.stats.forward_passes == 9 and len(out.tokens) == 32  # 3 blocks x cap 3
    assert tiny.spec.mask_id not in out.tokens


def reference_iterative(model, prompt, block, sub, threshold, cap, max_tokens):
    """Iterative decoding written plainly: every pass a fresh forward over prompt + finished
    blocks + the block's current content (no cache), the first pass of a block predicting every
    masked position, later passes the current sub-block's; commit above the threshold (at least
    the most confident); at the cap every mask takes its most confident prediction (earliest on
    ties)."""
    mask_id = model.spec.mask_id
    toks = list(prompt)
    while len(toks) - len(prompt) < max_tokens:
        pos = len(toks)
        start = pos // block * block
        n = start + block - pos
        content = np.full(n, mask_id)
        masked = np.zeros(n, bool)
        masked[:min(n, max_tokens - (pos - len(prompt)))] = True
        best_tok, best_conf = np.zeros(n, np.int64), np.full(n, -1.0)
        passes = 0
        while masked.any():
            logits = model.logits(toks + content.tolist(), "block", block)[pos - 1:pos - 1 + n]
            logits[:, mask_id] = -np.inf
            p = np.exp(logits - logits.max(1, keepdims=True))
            conf = (p.max(1) / p.sum(1)).astype(np.float32)
            tok = logits.argmax(1)
            sub_of = (pos + np.arange(n) - start) // sub
            cur = masked & (sub_of == sub_of[masked].min())
            decide = masked if passes == 0 else cur
            better = decide & (conf > best_conf)
            best_tok[better], best_conf[better] = tok[better], conf[better]
            idx = np.flatnonzero(cur)
            chosen = idx[conf[idx] > threshold] if (conf[idx] > threshold).any() else \
                idx[[int(np.argmax(conf[idx]))]]
            content[chosen] = tok[chosen]
            masked[chosen] = False
            passes += 1
            if masked.any() and passes >= cap:
                content[masked] = best_tok[masked]
                masked[:] = False
        toks += content.tolist()
    return toks[len(prompt):len(prompt) + max_tokens]


@pytest.mark.parametrize("cap", [3, 5, 100])
def test_iterative_equals_plain_reference_cap_included(tiny, cap):
    """The decoder (passes computing the head only for the rows they decide, the first pass's
    other rows kept for the cap) gives the plain reference's tokens, cap fill included."""
    kw = dict(mode="iterative", block_size=16, small_block_size=4, threshold=0.99,
              max_iterations_per_block=cap, max_tokens=32, dual_cache=False)
    out = run(tiny, prompt=PROMPT[:8], **kw)
    assert out.tokens == reference_iterative(tiny, PROMPT[:8], 16, 4, 0.99, cap, 32)


def test_adaptive_uses_its_three_thresholds_in_order(tiny, monkeypatch):
    assert [step_threshold("adaptive", 0.9, i) for i in range(4)] == [0.5, 0.7, 0.9, 0.9]
    assert [step_threshold("adaptive", 0.6, i) for i in range(3)] == [0.5, 0.7, 0.6]
    assert [step_threshold("iterative", 0.9, i) for i in range(3)] == [0.9, 0.9, 0.9]
    seen = []
    real = policies.select_unmask
    monkeypatch.setattr(policies, "select_unmask", lambda c, t: (seen.append(t), real(c, t))[1])
    run(tiny, prompt=PROMPT[:8], mode="adaptive", threshold=0.9, block_size=8,
        small_block_size=8, max_iterations_per_block=100, max_tokens=8)
    assert len(seen) >= 3 and seen[:3] == [0.5, 0.7, 0.9] and set(seen[2:]) == {0.9}


@pytest.mark.parametrize("attention", ["block", "causal"])
@pytest.mark.parametrize("mode", ["greedy", "iterative"])
def test_cache_after_generation_equals_fresh_forward(tiny, attention, mode):
    b = 8
    gen = Generator(tiny, DecodeSettings(mode=mode, block_size=b, small_block_size=4,
                                         threshold=0.5, attention=attention, max_tokens=29))
    out = gen.generate(PROMPT)
    full = PROMPT + out.tokens
    cache = out.cache
    assert cache.length + len(out.pending) == len(full)
    assert cache.length % b == 0 and full[cache.length:] == out.pending  # only the last block
    # the pending tokens' K/V, written as the next pass would (under the request's own mask)
    tiny.forward_batch([Segment(out.pending, cache, None,
                                AttentionMask.parse(attention, b), [], Output.HIDDEN)])
    fresh = tiny.new_cache()
    tiny.forward(full, None, fresh, attention, b if attention == "block" else None, rows=[])
    n = len(full)
    assert cache.length == n
    for got, want in zip(cache.view(0, n), fresh.view(0, n)):  # K, then V
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_seed_kv_commit_none_keeps_stale_masks(tiny):
    out = run(tiny, mode="greedy", block_size=8, kv_commit="none", attention="causal",
              max_tokens=17)
    # prefill + 2 blocks of [prev @ p-1, 8 masks]; each overwrites the slot at p-1 only
    assert out.stats.forward_passes == 3 and len(out.tokens) == 17
    assert out.cache.length == len(PROMPT) + 2 * 8
    assert out.pending == []


@pytest.mark.parametrize("max_tokens", [1, 63, 64, 65, 128])
def test_max_tokens_exact(tiny, max_tokens, monkeypatch):
    gen = Generator(tiny, DecodeSettings(mode="greedy", block_size=64, max_tokens=max_tokens,
                                         ignore_eos=True))
    out = gen.generate(PROMPT)
    assert len(out.tokens) == max_tokens and out.stats.finish_reason == "length"


def test_eos_in_block_truncates_there(tiny):
    ref = Generator(tiny, DecodeSettings(mode="greedy", block_size=16, max_tokens=40,
                                         ignore_eos=True))
    toks = ref.generate(PROMPT).tokens
    stop_tok = toks[9]  # pretend the token at offset 9 (mid-block) ends generation
    first = toks.index(stop_tok)
    gen = Generator(tiny, DecodeSettings(mode="greedy", block_size=16, max_tokens=40))
    gen.eog = frozenset({stop_tok})
    out = gen.generate(PROMPT)
    assert out.tokens == toks[:first + 1] and out.stats.finish_reason == "stop"


def test_sampling_is_seeded(tiny):
    a = run(tiny, mode="greedy", block_size=8, max_tokens=16,
            sampling=Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=3))
    b = run(tiny, mode="greedy", block_size=8, max_tokens=16,
            sampling=Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=3))
    c = run(tiny, mode="greedy", block_size=8, max_tokens=16,
            sampling=Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=4))
    g = run(tiny, mode="greedy", block_size=8, max_tokens=16)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != g.tokens


def test_top_k_one_is_greedy(tiny):
    g = run(tiny, mode="greedy", block_size=8, max_tokens=16)
    k1 = run(tiny, mode="greedy", block_size=8, max_tokens=16,
             sampling=Sampling(temperature=0.7, top_k=1, seed=5))
    assert g.tokens == k1.tokens


def test_mask_detection_and_errors(synth_model, tmp_path):
    from gguf_edit import rewrite
    m = dlmnumba.load_model(synth_model())
    assert resolve_mask_id(m) == m.spec.mask_id == m.spec.n_vocab - 1
    # without the metadata key the |<MASK>| token text is found
    path = rewrite(synth_model(), tmp_path / "nomaskkey.gguf",
                   metadata={"tokenizer.ggml.mask_token_id": None})
    m2 = dlmnumba.load_model(path)
    assert m2.spec.mask_id is None and resolve_mask_id(m2) == m.spec.mask_id
    assert resolve_mask_id(m2, 5) == 5
    with pytest.raises(DecodeError, match="outside the vocabulary"):
        resolve_mask_id(m2, 10**6)


def test_no_mask_token_needs_ar(synth_model, tmp_path):
    from gguf_edit import rewrite
    src = dlmnumba.load_model(synth_model())
    toks = list(src.file.metadata["tokenizer.ggml.tokens"])
    toks[-1] = "<|reserved_special_token_x|>"
    path = rewrite(synth_model(), tmp_path / "nomask.gguf",
                   metadata={"tokenizer.ggml.mask_token_id": None, "tokenizer.ggml.tokens": toks})
    m = dlmnumba.load_model(path)
    for mode in ("greedy", "spec"):
        with pytest.raises(DecodeError, match="--mask-token-id.*--mode ar"):
            Generator(m, DecodeSettings(mode=mode))
    assert len(Generator(m, DecodeSettings(mode="ar", max_tokens=4)).generate(PROMPT).tokens) == 4


def test_ar_matches_llamacpp_greedy(synth_model):
    """Teacher-forced: at every step of our AR output, llama.cpp's argmax given the same
    history agrees with ours (where activation-quantization near-ties allow)."""
    pytest.importorskip("llama_cpp")
    from llamacpp import LlamaCpp
    path = synth_model(qtype="TQ2_0", arch="bitnet")
    m = dlmnumba.load_model(path)
    gen = Generator(m, DecodeSettings(ignore_eos=True, mode="ar", max_tokens=48))
    out = gen.generate(PROMPT).tokens
    lc = LlamaCpp(path, n_ctx=128, exact=True)
    logits = lc.decode(PROMPT + out[:-1], 0, logits_rows="all")[len(PROMPT) - 1:]
    lc.close()
    agree = (masked_argmax(logits, m.spec.mask_id) == np.array(out)).mean()
    assert agree >= 0.9, agree


def test_seed_replay_matches_llamacpp(synth_model):
    """kv_commit none + causal = the seed's scheduling replayed on llama.cpp, token for token.
    n_ff = 256 makes every matmul input one 256-value block, where llama.cpp's Q8_K activation
    quantization equals our per-token one."""
    pytest.importorskip("llama_cpp")
    from dlmnumba.synth.models import write_synthetic
    from llamacpp import LlamaCpp
    from seed_replay import seed_replay
    path = str(Path(synth_model()).parent / "k256.gguf")
    write_synthetic(path, preset="tiny", qtype="TQ2_0", arch="bitnet", n_ff=256)
    m = dlmnumba.load_model(path)
    gen = Generator(m, DecodeSettings(mode="greedy", block_size=16, kv_commit="none",
                                      attention="causal", max_tokens=49, ignore_eos=True))
    out = gen.generate(PROMPT)
    ours = out.tokens
    lc = LlamaCpp(path, n_ctx=256, exact=True)
    theirs, passes = seed_replay(lc, PROMPT, m.spec.mask_id, block_size=16, max_tokens=49)
    lc.close()
    assert passes == out.stats.forward_passes == 4
    assert ours == theirs[:49]
