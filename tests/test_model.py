"""Forward pass against the plain numpy reference (tests/oracles.py), and cache invariants."""
import numpy as np
import pytest

import dlmnumba
from dlmnumba.model.heads import ExactF16Head
from oracles import load_gguf_weights, numpy_logits

TOKENS = [1007, 39, 735, 78, 271, 285, 493, 5, 600, 7, 88, 1000, 3]


@pytest.fixture(scope="module")
def tiny(synth_model):
    return dlmnumba.load_model(synth_model())


@pytest.mark.parametrize("qtype,arch", [("TQ2_0", "bitnet-b1.58"), ("TQ1_0", "bitnet"),
                                        ("TQ2_0", "bitnet")])
@pytest.mark.parametrize("attention,block", [("causal", None), ("block", 4)])
def test_logits_match_numpy_reference(synth_model, qtype, arch, attention, block):
    path = synth_model(qtype=qtype, arch=arch)
    hp, w = load_gguf_weights(path)
    ref = numpy_logits(hp, w, TOKENS, attention=attention, block_size=block)
    got = dlmnumba.load_model(path).logits(TOKENS, attention=attention, block_size=block)
    assert got.shape == ref.shape == (len(TOKENS), w["token_embd.weight"].shape[0]) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_block_mask_visibility(tiny):
    """Block mask: a later token changes earlier logits of its own block, never earlier blocks."""
    changed = list(TOKENS)
    changed[6] = 17  # position 6 is in block 1 (positions 4..7) for block_size 4
    for attention, block in (("causal", None), ("block", 4)):
        a = tiny.logits(TOKENS, attention=attention, block_size=block)
        b = tiny.logits(changed, attention=attention, block_size=block)
        unaffected = 6 if attention == "causal" else 4
        np.testing.assert_array_equal(a[:unaffected], b[:unaffected])
        assert not np.allclose(a[unaffected], b[unaffected], atol=1e-4)


@pytest.mark.parametrize("attention,block", [("causal", None), ("block", 4)])
def test_chunked_evaluation_equals_one_pass(tiny, attention, block):
    """Evaluating a sequence in block-aligned chunks against the cache = evaluating it at once."""
    full = tiny.logits(TOKENS, attention=attention, block_size=block)
    cache = tiny.new_cache(2)  # also exercises cache growth
    parts = [tiny.forward(TOKENS[i:i + 4], None, cache, attention, block)
             for i in range(0, len(TOKENS), 4)]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-5, atol=1e-5)
    assert cache.length == len(TOKENS)


def test_truncate_and_reevaluate(tiny):
    cache = tiny.new_cache()
    tiny.forward(TOKENS, None, cache)
    first = tiny.forward([5, 6, 7], None, cache)
    cache.truncate(len(TOKENS))
    again = tiny.forward([5, 6, 7], None, cache)
    assert np.array_equal(first, again)
    cache.truncate(len(TOKENS))
    other = tiny.forward([9, 6, 7], None, cache)
    assert not np.allclose(other[1:], first[1:])  # the new first token is seen by the rest


def test_rows_selection(tiny):
    cache = tiny.new_cache()
    all_rows = tiny.logits(TOKENS)
    sel = tiny.forward(TOKENS, None, cache, rows=[0, 5, len(TOKENS) - 1])
    np.testing.assert_allclose(sel, all_rows[[0, 5, -1]], rtol=1e-6, atol=1e-6)


def test_i2s_matches_tq2(synth_model):
    """Same seed: identical ternary codes; scales differ only by TQ2_0's f16 rounding."""
    a = dlmnumba.load_model(synth_model(qtype="I2_S")).logits(TOKENS)
    b = dlmnumba.load_model(synth_model(qtype="TQ2_0")).logits(TOKENS)
    assert np.abs(a - b).max() < 2e-2 * np.abs(b).max()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_bad_tokens_and_modes(tiny):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.logits([1, tiny.spec.n_vocab])
    with pytest.raises(ValueError, match="block_size"):
        tiny.logits([1, 2], attention="block")
    with pytest.raises(ValueError, match="attention must be"):
        tiny.logits([1, 2], attention="full")


def test_threads_setting(synth_model):
    m1 = dlmnumba.load_model(synth_model(), threads=1)
    assert m1.threads == 1
    np.testing.assert_array_equal(m1.logits(TOKENS), dlmnumba.load_model(synth_model()).logits(TOKENS))


def test_kernel_paths_give_identical_logits(synth_model):
    """Every int8 path computes the same integers and the same float epilogue."""
    from dlmnumba.kernels.dispatch import supported_paths
    path = synth_model()
    ref = dlmnumba.load_model(path, kernel="portable").logits(TOKENS)
    for kernel in supported_paths():
        m = dlmnumba.load_model(path, kernel=kernel)
        assert m.kernel == kernel
        np.testing.assert_array_equal(m.logits(TOKENS), ref)


def test_unknown_or_unsupported_kernel_path(synth_model):
    with pytest.raises(ValueError, match="unknown"):
        dlmnumba.load_model(synth_model(), kernel="neon")


@pytest.mark.parametrize("attention,block", [("causal", None), ("block", 4)])
def test_screened_argmax_is_the_exact_heads(tiny, attention, block):
    """forward_argmax through the int8 screen (exact_confidence False, as greedy decoding runs
    it) picks exactly the argmax of the exact logits, the excluded token never; the exact-
    confidence path gives the same tokens with the exact softmax probability."""
    assert isinstance(tiny.head, ExactF16Head)  # the tiny model's F16 embedding is screened
    logits = tiny.logits(TOKENS, attention=attention, block_size=block).astype(np.float64)
    for exclude in (None, int(logits[3].argmax())):
        ref = logits.copy()
        if exclude is not None:
            ref[:, exclude] = -np.inf
        p = np.exp(ref - ref.max(1, keepdims=True))
        conf_ref = 1 / p.sum(1)
        for exact_confidence in (False, True):
            cache = tiny.new_cache()
            tok, conf = tiny.forward_argmax(TOKENS, None, cache, attention, block,
                                            exclude=exclude, exact_confidence=exact_confidence)
            assert np.array_equal(tok, ref.argmax(1))
            np.testing.assert_allclose(conf, conf_ref, rtol=1e-5 if exact_confidence else 5e-2)


def test_screened_argmax_from_threads(tiny):
    """Two threads decoding at once (the kernels release the GIL) each get the exact head's
    argmax: the screen's scratch logits are per thread, not shared."""
    from concurrent.futures import ThreadPoolExecutor
    seqs = [TOKENS, TOKENS[::-1] + [5, 6]]
    refs = [tiny.logits(s).argmax(1) for s in seqs]

    def run(i):
        out = []
        for _ in range(20):
            tok, _ = tiny.forward_argmax(seqs[i], None, tiny.new_cache(), exact_confidence=False)
            out.append(np.array_equal(tok, refs[i]))
        return all(out)

    with ThreadPoolExecutor(2) as ex:
        assert all(ex.map(run, [0, 1, 0, 1]))
