"""Prefix cache: reused K/V change no output; hits on resent conversations; LRU under budget."""
import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Engine, Generator
from dlmnumba import PrefixCache


def _run(engine, gen, prompt, settings=None):
    r = engine.submit(gen.request(prompt, settings))
    engine.run_until_idle()
    return r


@pytest.mark.parametrize("kw", [dict(mode="ar", max_tokens=20),
                                dict(mode="greedy", block_size=16, max_tokens=37),
                                dict(mode="greedy", block_size=8, attention="causal",
                                     max_tokens=21),
                                dict(mode="iterative", block_size=16, small_block_size=4,
                                     threshold=0.5, max_tokens=24)])
def test_conversation_turns_same_output_with_and_without_the_cache(synth_model, kw):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(ignore_eos=True, **kw))
    rng = np.random.default_rng(1)
    on = Engine(m, prefix_cache=PrefixCache(4096))
    off = Engine(m)
    convo = rng.integers(0, m.spec.n_vocab - 1, 37).tolist()
    for turn in range(4):
        a, b = _run(on, gen, convo), _run(off, gen, convo)
        assert a.out == b.out == gen.generate(convo).tokens
        # the next turn resends the conversation: prompt, answer, a new user message
        convo = convo + a.out + rng.integers(0, m.spec.n_vocab - 1, 9).tolist()
    assert on.prefix_cache.hit_tokens > 0
    assert off.prefix_cache is None


def test_attached_kv_equal_a_fresh_forward(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="greedy", block_size=8, max_tokens=12,
                                      ignore_eos=True))
    pc = PrefixCache(1024)
    engine = Engine(m, prefix_cache=pc)
    prompt = list(range(3, 30))
    first = _run(engine, gen, prompt)
    r = gen.request(prompt + first.out + [5, 6, 7])
    n = pc.attach(r)
    assert n > 0 and n % 8 == 0 and n <= len(r.prompt) - 1
    fresh = m.new_cache()
    m.forward(r.prompt[:n], None, fresh, "block", 8, rows=[])
    for got, want in zip(r.cache.view(0, n), fresh.view(0, n)):  # K, then V
        np.testing.assert_array_equal(got, want)


def test_lru_eviction_keeps_the_budget_and_the_recent(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(ignore_eos=True, mode="ar", max_tokens=1))
    pc = PrefixCache(64)  # four causal pages
    engine = Engine(m, prefix_cache=pc)
    a, b = list(range(10, 43)), list(range(50, 83))  # 33 tokens: two full pages each
    _run(engine, gen, a)
    _run(engine, gen, b)
    assert pc.tokens == 64
    _run(engine, gen, a)  # a used again: b is now the least recently used
    c = list(range(100, 133))
    _run(engine, gen, c)
    assert pc.tokens <= 64
    assert pc.attach(gen.request(a + [1])) == 32  # kept
    assert pc.attach(gen.request(b + [1])) == 0  # evicted


def test_seed_replay_never_uses_the_cache(synth_model):
    m = dlmnumba.load_model(synth_model())
    gen = Generator(m, DecodeSettings(mode="greedy", block_size=8, kv_commit="none",
                                      attention="causal", max_tokens=9, ignore_eos=True))
    pc = PrefixCache(1024)
    engine = Engine(m, prefix_cache=pc)
    prompt = list(range(3, 40))
    _run(engine, gen, prompt)
    assert pc.tokens == 0 and pc.attach(gen.request(prompt)) == 0
