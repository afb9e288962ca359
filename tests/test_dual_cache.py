"""Dual cache (sub-block refinement passes): exact where its approximation is exact, the cache
after a block equals a fresh forward, budgets and stop tokens behave as without it, and the
LM head runs only for the rows a pass decides."""
import dataclasses

import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.model.batch import AttentionMask, Output, Segment

PROMPT = [1007, 39, 735, 78, 271, 285, 493, 5, 600, 7, 88, 19, 300, 301]  # 14: not aligned


@pytest.fixture(scope="module")
def tiny(synth_model):
    return dlmnumba.load_model(synth_model())


def _gen(model, **kw):
    return Generator(model, DecodeSettings(**{"mode": "iterative", "block_size": 16,
                                              "small_block_size": 4, "threshold": 1.0,
                                              "max_iterations_per_block": 100,
                                              "ignore_eos": True, **kw}))


def _commit_pending(model, out, mask):
    """Write the generation's pending tokens' K/V into its cache (one forward pass)."""
    model.forward_batch([Segment(out.pending, out.cache, None, mask, [], Output.HIDDEN)])


def _step(model, req, output=None):
    seg = req.next_pass()
    if output is not None:  # every row of the pass, as logits
        seg = dataclasses.replace(seg, output=output, rows=None)
        req._pass = seg
    res = model.forward_batch([seg])[0]
    return seg, res


@pytest.mark.parametrize("prompt_len", [14, 16, 21])
def test_sub_block_pass_equals_the_full_pass_when_the_block_kv_are_current(tiny, prompt_len):
    """Where the approximation is exact -- the other positions' K/V are those a full pass over
    the block's current content computes -- a sub-block pass gives that full pass's logits."""
    prompt = (PROMPT * 2)[:prompt_len]
    req = _gen(tiny, dual_cache=True, max_tokens=30).request(prompt)
    for _ in range(3):  # the block's first pass and two refinements: 3 tokens committed
        seg, res = _step(tiny, req)
        req.feed(res)
    b = req.block
    start, n = b.start, 16
    content = req.tokens[start:b.pos] + b.tokens.tolist()
    # the full pass over the block's current content, against the same prefix
    ref = tiny.new_cache()
    if start:
        tiny.forward(req.tokens[:start], None, ref, "block", 16, rows=[])
    full = tiny.forward(content, None, ref, "block", 16)
    req._bk[:], req._bv[:] = ref.view(start, start + n)
    seg, logits = _step(tiny, req, Output.LOGITS)
    assert len(seg.tokens) < n  # a sub-block pass, not the block
    lo = seg.positions[0] - start
    want = full[lo:lo + len(seg.tokens)]
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_first_refinement_pass_in_a_one_layer_model_is_exact(synth_model, tmp_path):
    """With one layer the other positions' K/V depend on their own token only: right after the
    block's first pass, the cached block K/V are exact and a sub-block pass equals a full one."""
    from dlmnumba.synth.models import write_synthetic
    path = write_synthetic(tmp_path / "l1.gguf", preset="tiny", n_layer=1)
    m = dlmnumba.load_model(str(path))
    for dual in (False, True):
        req = _gen(m, dual_cache=dual, max_tokens=16).request(PROMPT)
        seg, res = _step(m, req)
        req.feed(res)
        seg, logits = _step(m, req, Output.LOGITS)
        rows_pos = np.asarray(seg.positions)
        if dual:
            got = dict(zip(rows_pos.tolist(), logits))
        else:
            want = dict(zip(rows_pos.tolist(), logits))
    assert got.keys() < want.keys()
    for p in got:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-4,
                                   atol=1e-4 * np.abs(want[p]).max())


@pytest.mark.parametrize("attention", ["block", "causal"])
@pytest.mark.parametrize("mode", ["iterative", "adaptive"])
def test_cache_after_generation_equals_fresh_forward(tiny, attention, mode):
    gen = Generator(tiny, DecodeSettings(mode=mode, block_size=8, small_block_size=4,
                                         threshold=0.5, attention=attention, max_tokens=29,
                                         dual_cache=True))
    out = gen.generate(PROMPT)
    full = PROMPT + out.tokens
    assert out.cache.length % 8 == 0 and full[out.cache.length:] == out.pending
    _commit_pending(tiny, out, AttentionMask.parse(attention, 8))
    fresh = tiny.new_cache()
    tiny.forward(full, None, fresh, attention, 8 if attention == "block" else None, rows=[])
    n = len(full)
    for got, want in zip(out.cache.view(0, n), fresh.view(0, n)):  # K, then V
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 17, 40])
def test_max_tokens_exact_and_one_commit_per_pass(tiny, max_tokens):
    out = _gen(tiny, dual_cache=True, max_tokens=max_tokens).generate(PROMPT)
    assert len(out.tokens) == max_tokens and out.stats.finish_reason == "length"
    assert out.stats.forward_passes == max_tokens  # threshold 1: one token per pass
    assert tiny.spec.mask_id not in out.tokens


def test_stop_token_truncates_there(tiny):
    toks = _gen(tiny, dual_cache=True, max_tokens=30).generate(PROMPT).tokens
    stop = toks[6]
    gen = _gen(tiny, dual_cache=True, max_tokens=30, ignore_eos=False)
    gen.eog = frozenset({stop})
    out = gen.generate(PROMPT)
    assert out.tokens == toks[:toks.index(stop) + 1] and out.stats.finish_reason == "stop"


def test_passes_compute_only_the_rows_they_decide(tiny, monkeypatch):
    """Every pass computes the head for the current sub-block's masked positions only (a
    block's first pass keeps the hidden states of its other masked positions, for the cap);
    with the dual cache a later pass itself is the sub-block (plus the row before it)."""
    for dual in (False, True):
        req = _gen(tiny, dual_cache=dual, max_tokens=16).request(PROMPT[:8])
        sizes, kept = [], []
        while (seg := req.next_pass()) is not None:
            sizes.append((len(seg.tokens), len(seg.rows)))
            kept.append(len(seg.keep))
            req.feed(tiny.forward_batch([seg])[0])
            assert seg.kept is None if not seg.keep else seg.kept.shape == (len(seg.keep),
                                                                            tiny.spec.n_embd)
        # prompt 8 tokens, block 16: positions 8..15 in sub-blocks 8..11, 12..15; then 16..23
        # (whose first pass also commits block 0: the cache holds nothing of a shared block)
        assert sizes[0] == (16, 4) and kept[0] == 4  # rows for 8..11, 12..15 kept
        assert [r for _, r in sizes[1:4]] == [3, 2, 1]  # sub-block 8..11 after one commit
        assert not any(kept[1:8])
        if dual:
            assert all(t <= 5 for t, _ in sizes[1:8])
        else:
            assert all(t == 16 for t, _ in sizes[1:8])
        assert sizes[8] == (32, 4) and kept[8] == 4  # next block: 0..15 and its own 16..23


@pytest.mark.parametrize("confidence, output", [("exact", Output.ARGMAX_EXACT),
                                                ("screened", Output.ARGMAX)])
def test_confidence_setting_chooses_the_head_output(tiny, confidence, output):
    """iterative/adaptive ask the LM head for the exact confidence, or for the screened one
    (the exact argmax, a confidence from screened rows); greedy never needs it."""
    for mode in ("iterative", "adaptive"):
        req = _gen(tiny, mode=mode, confidence=confidence, max_tokens=8).request(PROMPT)
        assert req.next_pass().output is output
    greedy = Generator(tiny, DecodeSettings(mode="greedy", confidence="exact")).request(PROMPT)
    assert greedy.next_pass().output is Output.ARGMAX
    out = _gen(tiny, confidence=confidence, max_tokens=12).generate(PROMPT)
    assert len(out.tokens) == 12 and tiny.spec.mask_id not in out.tokens
