"""`--mode spec` (decode/spec.py): token for token `ar`'s output -- on the bundled model over
every held-out task, on random-weight models (where almost nothing is accepted), at several
draft sizes, with stop tokens and max_tokens falling inside a draft, batched with other
modes -- while committing several tokens per pass where the drafts are right; its cache
after a request equals a fresh causal forward."""
import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Engine, Generator, PrefixCache
from dlmnumba.chat import chat_prompt
from dlmnumba.decode.spec import SpecRequest
from dlmnumba.model.batch import CAUSAL_MASK
from dlmnumba.model_source import TOY_MODEL
from dlmnumba.tasks import TASKS, heldout

DRAFTS = [dict(draft_size=n, draft_policy="fixed") for n in (1, 4, 8, 16)] + [
    dict(draft_size=16, draft_policy="adaptive"), dict(draft_size=32, draft_policy="adaptive")]


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(str(TOY_MODEL))


@pytest.fixture(scope="module")
def toy_prompts(toy):
    """300 held-out prompts (50 per task) in the chat form the toy model was trained on."""
    enc = toy.tokenizer.encode
    return [enc(chat_prompt(toy.file.metadata, e.prompt)) for t in TASKS for e in heldout(t, 50)]


def _outputs(gen, prompts):
    return [(g.tokens, g.stats.finish_reason) for g in gen.generate_many(prompts)]


@pytest.mark.parametrize("draft", DRAFTS, ids=lambda d: f"{d['draft_policy']}-{d['draft_size']}")
def test_spec_equals_ar_on_every_held_out_task(toy, toy_prompts, draft):
    ar = Generator(toy, DecodeSettings(mode="ar", max_tokens=48))
    spec = Generator(toy, DecodeSettings(mode="spec", max_tokens=48, **draft))
    want = _outputs(ar, toy_prompts)
    got = spec.generate_many(toy_prompts)
    assert [(g.tokens, g.stats.finish_reason) for g in got] == want
    passes = sum(g.stats.forward_passes for g in got)
    tokens = sum(g.stats.generated_tokens for g in got)
    drafted = sum(g.stats.draft_tokens for g in got)
    accepted = sum(g.stats.accepted_tokens for g in got)
    assert 0 < accepted <= drafted
    # every pass commits the drafts it accepted, then one token of its own (unless the
    # output ended inside the accepted drafts: a request's last pass)
    assert passes + accepted - len(got) <= tokens <= passes + accepted
    if draft["draft_size"] > 1:
        assert tokens / passes > 1.5  # the drafts are right often enough to matter


@pytest.mark.parametrize("draft", DRAFTS, ids=lambda d: f"{d['draft_policy']}-{d['draft_size']}")
@pytest.mark.parametrize("max_tokens", [1, 2, 7, 33])
def test_spec_equals_ar_on_random_weights(synth_model, draft, max_tokens):
    """Random weights: drafts are (almost) never right; every pass still commits ar's token."""
    m = dlmnumba.load_model(synth_model())
    prompts = [np.random.default_rng(n).integers(0, m.spec.n_vocab - 1, n).tolist()
               for n in (1, 5, 16, 23)]
    kw = dict(max_tokens=max_tokens, ignore_eos=True)
    want = [g.tokens for g in Generator(m, DecodeSettings(mode="ar", **kw)).generate_many(prompts)]
    gen = Generator(m, DecodeSettings(mode="spec", **kw, **draft))
    got = [gen.generate(p) for p in prompts]
    assert [g.tokens for g in got] == want
    assert all(len(g.tokens) == max_tokens and g.stats.finish_reason == "length" for g in got)


def test_stop_tokens_and_max_tokens_inside_a_draft(toy, toy_prompts):
    """Every cut of the budget, on prompts whose answers end with the stop token inside a
    wholly accepted draft: the same tokens and finish reason as ar."""
    prompts = toy_prompts[::50]  # one per task
    for max_tokens in range(1, 30):
        ar = Generator(toy, DecodeSettings(mode="ar", max_tokens=max_tokens))
        spec = Generator(toy, DecodeSettings(mode="spec", max_tokens=max_tokens, draft_size=16))
        assert [(g.tokens, g.stats.finish_reason) for g in spec.generate_many(prompts)] == \
            _outputs(ar, prompts), max_tokens
    long = Generator(toy, DecodeSettings(mode="spec", max_tokens=48, draft_size=16))
    outs = long.generate_many(prompts)
    assert {g.stats.finish_reason for g in outs} == {"stop"}
    # the stop token was committed from a draft: more tokens than passes in the last pass
    assert any(g.stats.accepted_tokens >= 2 for g in outs)


def test_spec_batched_with_every_other_mode_equals_alone(toy, toy_prompts):
    settings = [DecodeSettings(mode="spec", max_tokens=40, draft_size=8, draft_policy="fixed"),
                DecodeSettings(mode="ar", max_tokens=40),
                DecodeSettings(mode="greedy", block_size=16, max_tokens=40),
                DecodeSettings(mode="iterative", block_size=32, small_block_size=8,
                               threshold=0.9, max_tokens=40),
                DecodeSettings(mode="spec", max_tokens=40, draft_size=4,
                               draft_policy="adaptive")]
    gen = Generator(toy, settings[0])
    jobs = [(p, settings[i % len(settings)]) for i, p in enumerate(toy_prompts[::25])]
    want = [gen.generate(p, s).tokens for p, s in jobs]
    engine = Engine(toy, max_running=len(jobs))
    reqs = [engine.submit(gen.request(p, s)) for p, s in jobs]
    engine.run_until_idle()
    assert [r.out for r in reqs] == want


@pytest.mark.parametrize("draft_size", [3, 16])
def test_cache_after_generation_equals_a_fresh_causal_forward(toy, toy_prompts, draft_size):
    """Rejected drafts' and masks' K/V never stay (nor accepted drafts after a stop token):
    the cache holds exactly the causal K/V of prompt + output but what is pending."""
    gen = Generator(toy, DecodeSettings(mode="spec", max_tokens=40, draft_size=draft_size))
    for prompt in toy_prompts[::60]:
        out = gen.generate(prompt)
        full = prompt + out.tokens
        n = out.cache.length
        # all but the last committed token (or all of them, when the output ended on a stop
        # token inside the accepted drafts)
        assert n in (len(full) - 1, len(full)) and out.pending == full[n:]
        fresh = toy.new_cache()
        toy.forward(full[:n], None, fresh, "causal", rows=[])
        k, v = out.cache.view()
        fk, fv = fresh.view()
        np.testing.assert_allclose(k, fk, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v, fv, rtol=1e-5, atol=1e-5)
        assert np.array_equal(out.cache.positions, np.arange(n))


def test_a_pass_is_causal_rows_then_a_bidirectional_mask_group(toy, toy_prompts):
    req = Generator(toy, DecodeSettings(mode="spec", max_tokens=40, draft_size=5,
                                        draft_policy="fixed")).request(toy_prompts[0])
    seg = req.next_pass()
    n = len(toy_prompts[0])
    assert list(seg.tokens) == toy_prompts[0] + [toy.spec.mask_id] * 5
    assert seg.mask == CAUSAL_MASK.with_tail(n) and list(seg.rows) == list(range(n - 1, n + 5))
    req.feed(toy.forward_batch([seg])[0])
    seg = req.next_pass()  # [the committed token, its 5 drafts, 5 masks]
    assert len(seg.tokens) == 11 and seg.positions[0] == n and seg.mask.open_from == n + 6
    assert list(seg.rows) == list(range(0, 11))


def test_spec_with_the_prefix_cache_equals_without(toy, toy_prompts):
    """spec's cache is causal K/V of real tokens: pages shared with ar under the causal mask."""
    pc = PrefixCache(4096)
    gen = Generator(toy, DecodeSettings(mode="spec", max_tokens=40), prefix_cache=pc)
    plain = Generator(toy, DecodeSettings(mode="spec", max_tokens=40))
    ar = Generator(toy, DecodeSettings(mode="ar", max_tokens=40), prefix_cache=pc)
    convo = toy_prompts[7]
    for turn in range(3):
        a = gen.generate(convo)
        assert a.tokens == plain.generate(convo).tokens == ar.generate(convo).tokens
        convo = convo + a.tokens + toy_prompts[100 + turn][1:]
    assert pc.hit_tokens > 0


def test_spec_refuses_sampling_and_needs_a_mask_token(toy):
    with pytest.raises(ValueError, match="spec.*decodes greedily.*temperature"):
        DecodeSettings(mode="spec", sampling=dlmnumba.Sampling(temperature=0.7))
    assert SpecRequest.mask is CAUSAL_MASK


def test_the_adaptive_draft_follows_the_acceptance(synth_model):
    """Drafts the positions more likely than not to be accepted: all of draft_size while the
    drafts are right, one mask when they are wrong (random weights), so a pass then costs
    little more than an ar step."""
    import math

    from dlmnumba.decode.spec import DRAFT_POLICIES
    policy = DRAFT_POLICIES["adaptive"]
    s = DecodeSettings(mode="spec", draft_size=16)
    assert policy.size(s, []) == 16
    assert policy.size(s, [(16, 16)] * 3) == 16
    assert policy.size(s, [(16, 0)] * 4) == 1
    alpha = (4 * 3 + 3) / (4 * 3 + 3 + 4 + 1)  # four passes: 3 accepted, then one rejected
    assert policy.size(s, [(8, 3)] * 4) == int(math.log(0.5) / math.log(alpha))
    m = dlmnumba.load_model(synth_model())
    req = Generator(m, DecodeSettings(mode="spec", draft_size=16, max_tokens=30,
                                      ignore_eos=True)).request([5, 6, 7])
    sizes = []
    while (seg := req.next_pass()) is not None:
        sizes.append(len(seg.tokens))
        req.feed(m.forward_batch([seg])[0])
    assert sizes[0] == 3 + 16 and max(sizes[-5:]) <= 3
