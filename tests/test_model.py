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


def test_cpu_share_gives_up_the_cores_others_keep_busy(monkeypatch):
    """CpuShare's arithmetic on scripted readings: others' busy time (allowed CPUs' busy time
    minus our own) of at least GIVE_UP of a core costs a thread, never the last one; readings
    come at most every INTERVAL; it comes back when the others stop."""
    from dlmnumba.kernels import cpu

    clock = {"t": 0.0}
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock["t"])
    share = cpu.CpuShare(4)
    readings = []  # (others' cores, our cores) over each next second
    state = {"busy": 0.0, "own": 0.0}

    def sample():
        others, own = readings.pop(0) if readings else (0.0, 0.0)
        state["busy"] += others + own
        state["own"] += own
        return clock["t"], state["busy"], state["own"]

    monkeypatch.setattr(share, "_sample", sample)
    share._last = (0.0, 0.0, 0.0)
    share._allowed = 4  # as if this process could run on 4 CPUs
    seen = []
    for others, own in [(0.1, 4.0), (0.5, 3.5), (2.2, 1.8), (3.9, 0.1), (0.0, 4.0), (0.29, 3.0)]:
        clock["t"] += 1.0
        readings.append((others, own))
        seen.append(share.threads())
        clock["t"] += share.INTERVAL / 2  # too soon for a new reading: the same count
        assert share.threads() == seen[-1] and not readings
        clock["t"] -= share.INTERVAL / 2
    assert seen == [4, 3, 2, 1, 4, 4]
    # on 16 allowed CPUs, others keeping 10 busy leave 2 threads their 2 (and 15 busy: 1)
    share.wanted, share._allowed = 2, 16
    for others, want in ((10.0, 2), (13.5, 2), (15.0, 1)):
        clock["t"] += 1.0
        readings.append((others, 1.0))
        assert share.threads() == want
    assert cpu.CpuShare(4, enabled=False).threads() == 4


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity")
                    or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs to keep one busy")
def test_cpu_share_sees_a_real_busy_process():
    """Asked for as many threads as we have CPUs, a busy loop pinned to one of them costs a
    thread within a few readings (we stay idle meanwhile, so the loop has its core to itself);
    when it ends the thread comes back."""
    import os
    import subprocess
    import sys
    import time

    from dlmnumba.kernels.cpu import CpuShare

    n = len(os.sched_getaffinity(0))
    share = CpuShare(n)
    cpu_id = sorted(os.sched_getaffinity(0))[-1]
    code = ("import os, sys, time\nos.sched_setaffinity(0, {%d})\nend = time.time() + 3\n"
            "while time.time() < end:\n    pass\n" % cpu_id)
    busy = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 2.5
        while share.threads() != n - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert share.current == n - 1
    finally:
        busy.wait(timeout=10)
    deadline = time.monotonic() + 3
    time.sleep(share.INTERVAL)  # a reading wholly after the loop
    while share.threads() != n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert share.current == n
