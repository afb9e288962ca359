"""Batched decoding invariants: one forward over many sequences == each sequence alone, bit for
bit; many requests decoded together == one at a time, token for token; the engine lets
requests join, leave and be cancelled between steps; one Generator serves several threads."""
import threading
from pathlib import Path

import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Engine, Generator, Sampling
from dlmnumba.model.batch import AttentionMask, Output, Segment

TOY = Path(dlmnumba.__file__).parent / "data" / "toy-dlm.gguf"
RNG = np.random.default_rng(7)


def _prompt(n, vocab, seed):
    return np.random.default_rng(seed).integers(0, vocab - 1, n).tolist()


def _prefilled(model, prefix, mask):
    cache = model.new_cache(8)
    if prefix:
        model.forward_batch([Segment(prefix, cache, None, mask, [], Output.HIDDEN)])
    return cache


def _same(a, b):
    if isinstance(a, tuple):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0", "I2_S"])
@pytest.mark.parametrize("lm_head", ["exact", "int8"])
def test_forward_batch_equals_each_segment_alone(synth_model, qtype, lm_head):
    m = dlmnumba.load_model(synth_model(qtype=qtype), lm_head=lm_head)
    v = m.spec.n_vocab
    block16 = AttentionMask.block(16)
    causal = AttentionMask()
    # (prefix length, pass length, mask, rows, output): M = 1 next to M = 128, mixed masks,
    # every output kind, every head path (screened argmax, exact confidence, logits, hidden)
    cases = [(0, 128, block16, None, Output.LOGITS),
             (11, 1, causal, [0], Output.ARGMAX),
             (16, 21, block16, [3, 4, 20], Output.ARGMAX_EXACT),
             (5, 7, causal, [-1], Output.ARGMAX),
             (0, 3, causal, [], Output.HIDDEN),
             (40, 9, AttentionMask.block(8), list(range(9)), Output.ARGMAX),
             (2, 1, block16, None, Output.LOGITS)]
    segs, alone = [], []
    for i, (pre, n, mask, rows, out) in enumerate(cases):
        prefix, toks = _prompt(pre, v, i), _prompt(n, v, 100 + i)
        exclude = v - 1 if out in (Output.ARGMAX, Output.ARGMAX_EXACT) else None
        segs.append(Segment(toks, _prefilled(m, prefix, mask), None, mask, rows, out, exclude))
        alone.append(Segment(toks, _prefilled(m, prefix, mask), None, mask, rows, out, exclude))
    batched = m.forward_batch(segs)
    for seg, ref_seg, got in zip(segs, alone, batched):
        want = m.forward_batch([ref_seg])[0]
        _same(got, want)
        assert seg.cache.length == ref_seg.cache.length
        n = seg.cache.length
        for got, want in zip(seg.cache.view(0, n), ref_seg.cache.view(0, n)):  # K, then V
            np.testing.assert_array_equal(got, want)


def test_forward_batch_on_the_toy_models_dense_head():
    """The bundled model's F32 embedding takes the dense head: its rows are batch-independent
    too (BLAS would sum in another order for another M)."""
    m = dlmnumba.load_model(str(TOY))
    v = m.spec.n_vocab
    segs = [Segment(_prompt(n, v, n), m.new_cache(), None, AttentionMask.block(16), None,
                    Output.LOGITS) for n in (1, 5, 33)]
    got = m.forward_batch(segs)
    for seg, g in zip(segs, got):
        ref = m.logits(seg.tokens, "block", 16)
        np.testing.assert_array_equal(g, ref)


SETTINGS = [
    dict(mode="ar", max_tokens=20),
    dict(mode="greedy", block_size=8, max_tokens=21),
    dict(mode="greedy", block_size=16, attention="causal", max_tokens=19),
    dict(mode="iterative", block_size=16, small_block_size=4, threshold=0.5, max_tokens=23),
    dict(mode="adaptive", block_size=8, small_block_size=4, threshold=0.9, max_tokens=17),
    dict(mode="iterative", block_size=16, small_block_size=4, threshold=0.5, max_tokens=23,
         dual_cache=True),
    dict(mode="greedy", block_size=8, kv_commit="none", attention="causal", max_tokens=17),
    dict(mode="ar", max_tokens=12, sampling=Sampling(temperature=1.0, top_k=20, seed=3)),
    dict(mode="iterative", block_size=8, small_block_size=4, max_tokens=16,
         sampling=Sampling(temperature=0.8, top_p=0.9, seed=11)),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(
    f"{k}={v}" for k, v in kw.items() if k != "sampling") + ("-sampled" if "sampling" in kw
                                                              else ""))
def test_generate_many_equals_one_at_a_time(synth_model, kw):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(ignore_eos=True, **kw))
    v = m.spec.n_vocab
    prompts = [_prompt(n, v, 50 + n) for n in (3, 11, 16, 29, 1)]
    many = gen.generate_many(prompts)
    for p, got in zip(prompts, many):
        want = gen.generate(p)
        assert got.tokens == want.tokens
        assert got.stats.forward_passes == want.stats.forward_passes
        assert got.pending == want.pending and got.cache.length == want.cache.length


def test_generate_many_on_the_toy_model_stops_each_request_on_its_own():
    """Real stop tokens: requests finish at different steps and leave the batch."""
    m = dlmnumba.load_model(str(TOY))
    from dlmnumba.tasks import heldout
    enc = m.tokenizer.encode
    prompts = [enc(f"USER: {e.prompt}<|eot_id|>ASSISTANT:") for e in heldout("add", 6)]
    for kw in (dict(mode="ar", max_tokens=24), dict(mode="iterative", block_size=16,
                                                     small_block_size=8, max_tokens=24)):
        gen = Generator(m, DecodeSettings(**kw))
        many = gen.generate_many(prompts)
        assert [g.tokens for g in many] == [gen.generate(p).tokens for p in prompts]
        assert {g.stats.finish_reason for g in many} == {"stop"}


def test_engine_requests_join_leave_and_cancel(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(ignore_eos=True, mode="ar", max_tokens=10))
    v = m.spec.n_vocab
    engine = Engine(m, max_running=2)
    a = engine.submit(gen.request(_prompt(5, v, 1)))
    b = engine.submit(gen.request(_prompt(7, v, 2)))
    c = engine.submit(gen.request(_prompt(9, v, 3)))
    rep = engine.step()
    assert rep.sequences == 2 and engine.running == 2 and engine.waiting == 1  # c waits
    for _ in range(3):
        engine.step()
    engine.cancel(a)
    rep = engine.step()
    assert [o.request_id for o in rep.finished] == [a.id]
    assert rep.finished[0].stats.finish_reason == a.stats.finish_reason == "cancelled"
    assert a.stats.generated_tokens == 4  # prefill + 3 steps, nothing after the cancel
    assert rep.sequences == 2  # c joined in a's place within the same step
    d = engine.submit(gen.request(_prompt(4, v, 4)))
    engine.run_until_idle()
    for r, p in ((b, 7), (c, 9), (d, 4)):
        assert r.out == gen.generate(_prompt(p, v, {7: 2, 9: 3, 4: 4}[p])).tokens
    assert engine.running == 0 and engine.waiting == 0


def test_engine_isolates_a_failing_request(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(ignore_eos=True, mode="ar", max_tokens=6))
    engine = Engine(m)
    good = engine.submit(gen.request([1, 2, 3]))
    bad = engine.submit(gen.request([4, 5]))
    engine.step()
    bad._pass = None
    bad._feed = [m.spec.n_vocab + 5]  # a corrupted request: its next pass is refused
    bad.next_pass = lambda: (_ for _ in ()).throw(dlmnumba.DecodeError("broken request"))
    engine.run_until_idle()
    assert bad.error is not None and bad.stats.finish_reason == "error"
    assert good.out == gen.generate([1, 2, 3]).tokens


def test_one_generator_from_several_threads(synth_model):
    """No per-request state on the Generator: threads get their own statistics and tokens."""
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="greedy", block_size=8, max_tokens=16,
                                      sampling=Sampling(temperature=1.0, seed=9),
                                      ignore_eos=True))
    v = m.spec.n_vocab
    prompts = [_prompt(n, v, 70 + n) for n in (2, 6, 13, 21)]
    want = [gen.generate(p) for p in prompts]
    got: dict[int, object] = {}

    def work(i):
        for _ in range(3):
            got[i] = gen.generate(prompts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, w in enumerate(want):
        assert got[i].tokens == w.tokens
        assert got[i].stats.prompt_tokens == len(prompts[i])
        assert got[i].stats.forward_passes == w.stats.forward_passes


def test_context_limit_is_checked_before_decoding(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="ar", max_tokens=m.n_ctx))
    with pytest.raises(dlmnumba.DecodeError, match=r"prompt \(3 tokens\) plus max_tokens "
                                                    rf"\({m.n_ctx}\).*context length"):
        gen.generate([1, 2, 3])


@pytest.mark.parametrize("where, error", [("feed", RuntimeError("feed fault")),
                                          ("next_pass", MemoryError())])
def test_engine_isolates_any_exception_of_one_request(synth_model, where, error):
    """Not only our own errors: any exception of one request's step fails that request only."""
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="greedy", block_size=8, max_tokens=12,
                                      ignore_eos=True))
    engine = Engine(m)
    good = engine.submit(gen.request([1, 2, 3]))
    bad = engine.submit(gen.request([4, 5]))
    engine.step()

    def boom(*args):
        raise error
    setattr(bad, where, boom)
    outs = []
    while engine.has_work():
        outs += engine.step().outputs
    final = {o.request_id: o for o in outs if o.finished}
    assert final[bad.id].error is error and final[bad.id].stats.finish_reason == "error"
    assert final[good.id].error is None
    assert list(final[good.id].tokens) == good.out == gen.generate([1, 2, 3]).tokens


def test_a_pass_failing_in_the_batch_fails_only_its_own_request(synth_model):
    """forward_batch raises for the batch: the engine runs the passes one by one, each with
    the result it gets in the batch, and only the one that fails alone fails."""
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="iterative", block_size=8, small_block_size=4,
                                      threshold=0.6, max_tokens=16, ignore_eos=True))
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [4, 4]]
    want = [gen.generate(p).tokens for p in prompts]
    engine = Engine(m)
    reqs = [engine.submit(gen.request(p)) for p in prompts]
    poisoned = reqs[1].cache
    real = m.forward_batch

    def forward_batch(passes):
        if any(getattr(p, "cache", None) is poisoned for p in passes) and len(passes) > 1:
            raise RuntimeError("this batch fails")
        if any(getattr(p, "cache", None) is poisoned for p in passes) and reqs[1].out:
            raise RuntimeError("this sequence fails")
        return real(passes)
    m.forward_batch = forward_batch
    engine.run_until_idle()
    assert reqs[1].stats.finish_reason == "error" and "sequence fails" in str(reqs[1].error)
    assert reqs[1].out == want[1][:len(reqs[1].out)] and reqs[1].out  # ran until it failed
    assert [reqs[0].out, reqs[2].out] == [want[0], want[2]]


def test_cap_fills_are_head_passes_batched_with_the_others(synth_model):
    """At the iteration cap a request's deferred rows get their head from a HeadPass that the
    engine batches with other requests' passes; tokens equal each request decoded alone."""
    from dlmnumba.model.batch import HeadPass

    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="iterative", block_size=16, small_block_size=4,
                                      threshold=1.0, max_iterations_per_block=2,
                                      max_tokens=20, ignore_eos=True))
    prompts = [_prompt(n, m.spec.n_vocab, 90 + n) for n in (3, 8, 13)]
    want = [gen.generate(p) for p in prompts]
    mixed = []
    real = m.forward_batch

    def spy(passes):
        kinds = {type(p) for p in passes}
        if HeadPass in kinds and len(passes) > 1:
            mixed.append([type(p).__name__ for p in passes])
        return real(passes)
    m.forward_batch = spy
    got = gen.generate_many(prompts)
    assert mixed, "no head pass shared a step with another request's pass"
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and g.stats.forward_passes == w.stats.forward_passes


def test_a_failing_pass_raises_from_generate_and_the_generator_goes_on(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="ar", max_tokens=5, ignore_eos=True))
    want = gen.generate([1, 2, 3]).tokens
    real = m.forward_batch
    m.forward_batch = lambda passes: (_ for _ in ()).throw(MemoryError())
    with pytest.raises(MemoryError):
        gen.generate([1, 2, 3])
    with pytest.raises(MemoryError):
        list(gen.stream([1, 2, 3]))
    m.forward_batch = real
    assert gen.generate([1, 2, 3]).tokens == want
