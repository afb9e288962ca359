"""scripts/train_toy_dlm.py: a resumed run equals an uninterrupted one bit for bit, batches are
a pure function of (seed, step), the fast encoder equals the tokenizer, and the torch-side
decoder that chooses the recommended settings decodes as the engine does."""

import numpy as np
import pytest

from dlmnumba import tasks as T

torch = pytest.importorskip("torch")
TINY = ["--n-embd", "64", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2", "--n-ff", "128",
        "--batch", "8", "--steps", "6", "--ar-frac", "0.34", "--ar-every", "2", "--warmup", "2",
        "--curriculum", "0.5", "--threads", "1", "--device", "cpu", "--workers", "0",
        "--eval-n", "0"]


def test_resumed_run_equals_an_uninterrupted_one(trainer, tmp_path):
    whole, reached = trainer.train(trainer.parse_args(TINY))
    assert reached == 6
    ck = tmp_path / "ck.pt"
    half, reached = trainer.train(trainer.parse_args(TINY + ["--checkpoint", str(ck),
                                                             "--stop-at", "3"]))
    assert reached == 3
    resumed, reached = trainer.train(trainer.parse_args(TINY + ["--resume", str(ck)]))
    assert reached == 6
    a, b, c = whole.state_dict(), resumed.state_dict(), half.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the second half did train
    with pytest.raises(SystemExit, match="steps=6"):
        trainer.train(trainer.parse_args(TINY[:-2] + ["--eval-n", "0", "--steps", "7",
                                                      "--resume", str(ck)]))


def test_batches_are_a_pure_function_of_seed_and_step_and_skip_heldout_prompts(trainer):
    cfg = trainer.data_config(trainer.parse_args(TINY + ["--batch", "64"]))
    for step in (0, 2, 5):  # ar, and diffusion steps
        a, b = trainer.make_batch(cfg, step), trainer.make_batch(cfg, step)
        assert a.kind == b.kind and np.array_equal(a.ids, b.ids) and a.block == b.block
        assert (a.masked is None) == (a.kind == "ar") and np.array_equal(
            a.masked if a.masked is not None else 0, b.masked if b.masked is not None else 0)
    enc = trainer.Encoder()
    banned = T.heldout_prompts()
    for step in range(6):
        bt = trainer.make_batch(cfg, step)
        for ids, p in zip(bt.ids, bt.plen):
            text = enc.decode(ids[len(enc.head):p - len(enc.tail)])
            assert text not in banned


def test_fast_encoder_equals_the_tokenizer(trainer):
    cfg = trainer.data_config(trainer.parse_args(TINY))
    trainer.Encoder().check(trainer.eval_sets(20) +
                            [trainer.make_batch_example(cfg, i) for i in range(200)])


def test_torch_decoder_decodes_as_the_engine(trainer):
    import dlmnumba
    from dlmnumba import DecodeSettings, Generator
    from dlmnumba.model_source import TOY_MODEL

    torch.set_num_threads(1)
    ref = trainer.load_gguf(TOY_MODEL)
    model = dlmnumba.load_model(str(TOY_MODEL), threads=1)
    enc = trainer.Encoder()
    exs = [ex for t in T.TASKS for ex in T.heldout(t, 2)]
    prompts = [enc.prompt(e.prompt) for e in exs]
    for mode, kw in (("ar", {}), ("iterative", dict(block_size=16, small_block_size=8,
                                                    threshold=0.7))):
        outs, passes = trainer.torch_decode(ref, prompts, mode, kw.get("block_size", 32),
                                            kw.get("small_block_size", 8),
                                            kw.get("threshold", 0.9), enc=enc)
        gen = Generator(model, DecodeSettings(mode=mode, max_tokens=48, **kw))
        got = [gen.generate(p) for p in prompts]
        # near-ties may round either way between the two float evaluation orders
        assert sum(enc.decode(o).strip() == g.text.strip() for o, g in zip(outs, got)) \
            >= len(exs) - 1
        assert sum(p == g.stats.forward_passes for p, g in zip(passes, got)) >= len(exs) - 1


def test_a_stage_starts_from_the_checkpoints_weights_and_resumes(trainer, tmp_path):
    ck, ck2 = tmp_path / "stage1.pt", tmp_path / "stage2.pt"
    stage1, _ = trainer.train(trainer.parse_args(TINY + ["--checkpoint", str(ck),
                                                         "--stop-at", "3"]))
    stage2 = TINY + ["--init-from", str(ck), "--seed", "5", "--mix", "lookup=1,sort=1"]
    # lr 0: AdamW moves nothing, so the stage ends on the checkpoint's weights exactly
    frozen, _ = trainer.train(trainer.parse_args(stage2 + ["--lr", "0"]))
    a, b = stage1.state_dict(), frozen.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh, _ = trainer.train(trainer.parse_args(TINY + ["--lr", "0"]))
    assert not all(torch.equal(a[k], fresh.state_dict()[k]) for k in a)
    # a stage stopped and resumed equals the whole stage (the resume does not re-initialize)
    whole, _ = trainer.train(trainer.parse_args(stage2))
    trainer.train(trainer.parse_args(stage2 + ["--checkpoint", str(ck2), "--stop-at", "4"]))
    resumed, reached = trainer.train(trainer.parse_args(stage2 + ["--resume", str(ck2)]))
    assert reached == 6
    w, r = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(w[k], r[k]) for k in w)
    with pytest.raises(SystemExit, match="n_embd=64 .now 128."):
        trainer.train(trainer.parse_args(TINY[2:] + ["--n-embd", "128", "--init-from", str(ck)]))


def test_a_stage_may_copy_the_checkpoints_kv_heads_and_computes_the_same(trainer, tmp_path):
    ck = tmp_path / "stage1.pt"
    stage1, _ = trainer.train(trainer.parse_args(TINY + ["--checkpoint", str(ck),
                                                         "--stop-at", "3"]))
    kv = TINY.index("--n-head-kv") + 1
    wide = TINY[:kv] + ["4"] + TINY[kv + 1:] + ["--init-from", str(ck), "--lr", "0"]
    grown, _ = trainer.train(trainer.parse_args(wide))
    hd = 64 // 4
    old, new = stage1.state_dict(), grown.state_dict()
    for name in old:
        if name.endswith((".k.weight", ".v.weight")):
            o, n = old[name].view(2, hd, -1), new[name].view(4, hd, -1)
            for h in range(4):  # query head h read KV head h // 2 and now reads KV head h
                assert torch.equal(n[h], o[h // 2])
        else:
            assert torch.equal(old[name], new[name])
    ids = torch.tensor([T.heldout("lookup", 1)[0].prompt.encode()], dtype=torch.long)
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        a = stage1.logits(stage1.hidden(ids, pos, None))
        b = grown.logits(grown.hidden(ids, pos, None))
    # the same codes; the absmean scale may differ in its last bit (another summation order)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.allclose(a, b, atol=1e-2 * float(a.abs().max()))
    for bad in ("3", "1"):  # not a multiple of the checkpoint's 2, or fewer
        with pytest.raises(SystemExit, match="n_head_kv=2"):
            trainer.train(trainer.parse_args(TINY[:kv] + [bad] + TINY[kv + 1:] +
                                             ["--init-from", str(ck)]))


def test_multi_query_lookup_answers_each_key_with_its_pair_from_the_prompt(trainer):
    import random
    import re

    rng = random.Random(7)
    for _ in range(50):
        ex = trainer.draw_example(rng, "lookup_multi", 1.0)
        m = re.fullmatch(r"Given ((?:[a-z]=\d+ ?)+), find ([a-z](?: [a-z])*)", ex.prompt)
        pairs = dict(p.split("=") for p in m.group(1).split())
        keys = m.group(2).split()
        assert sorted(keys) == sorted(pairs)  # every key once
        assert ex.answer == " ".join(f"{k}={pairs[k]}" for k in keys)


def test_recall_sources_point_at_the_digit_each_answer_position_copies_and_its_key(trainer):
    args = trainer.parse_args(TINY + ["--mix", "lookup=1,lookup_multi=1,add=1",
                                      "--recall-weight", "1", "--batch", "32"])
    cfg = trainer.data_config(args)
    seen = 0
    for step in range(3):  # AR steps carry recall sources
        b = trainer.make_batch(cfg, step, kind="ar")
        for row, (copy, key), plen in zip(b.ids, b.recall, b.plen):
            for i in np.nonzero(copy >= 0)[0]:
                assert i >= plen - 1 and copy[i] < plen  # answer position -> prompt position
                assert row[copy[i]] == row[i + 1] and chr(row[i + 1]).isdigit()
                # the answer's key (before this position) is the key of the copied digit
                assert plen <= key[i] <= i and row[key[i]] == row[key[copy[i]]]
                seen += 1
            for j in np.nonzero(key >= 0)[0]:
                assert chr(row[key[j]]).islower()  # a key letter, followed by '='
                assert chr(row[key[j] + 1]) == "=" and key[j] < j
                if j < plen:  # a value digit of the prompt: its pair's key, the digits between
                    assert all(chr(row[x]).isdigit() for x in range(key[j] + 2, j + 1))
    assert seen > 50
    assert trainer.make_batch(cfg, 3, kind="dlm").recall is None


def test_probed_attention_is_the_heads_causal_distribution_and_changes_nothing(trainer):
    torch.manual_seed(0)
    model = trainer.ToyDLM(trainer.Shape(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128))
    ids = torch.randint(0, 256, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    plain = model.hidden(ids, pos, None)
    out, (logp, other) = model.hidden(ids, pos, None, probe=((1, 3), (0, 0)))
    assert torch.equal(plain, out) and not torch.equal(logp, other)
    p = logp.exp()
    assert torch.allclose(p.sum(-1), torch.ones(2, 12))
    assert float(p.triu(1).abs().max()) == 0.0  # causal
