"""The bundled toy block-diffusion model: export parity with its PyTorch definition, and accuracy
floors that a broken token shift, attention mask or KV cache falls far below."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import dlmnumba
from dlmnumba import evaluate as E
from dlmnumba.decode.scheduler import DecodeSettings, Generator
from dlmnumba.gguf.synth import TOY_MODEL

torch = pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_toy_dlm.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_toy_dlm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _compare(ours: np.ndarray, ref: np.ndarray) -> None:
    # The forward is discontinuous: int8 activation rounding flips a value wherever the two
    # float evaluation orders straddle a rounding edge (about one value in 1e5), and a flip
    # moves later rows by ~1e-3 of the logit range.  Structural errors (RoPE, norms, masks,
    # activation) move logits by 10-70% (tests/test_parity.py measured them), so 0.5% is tight.
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 5e-3, rel
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("attention", ["causal", "block"])
def test_exported_gguf_matches_the_pytorch_forward(tmp_path, trainer, attention):
    torch.manual_seed(1)
    shape = trainer.Shape(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128)
    model = trainer.ToyDLM(shape)
    with torch.no_grad():  # non-trivial norms and a trained-looking embedding
        for p in model.parameters():
            if p.dim() == 1:
                p.mul_(1 + 0.2 * torch.randn_like(p))
        model.embd.mul_(20)
    path = trainer.export_gguf(model, tmp_path / "t.gguf", {"seed": 1})
    m = dlmnumba.load_model(str(path), threads=1)
    assert m.spec.n_vocab == 274 and m.spec.activation == "relu2"
    assert {t.qtype for n, t in m.file.tensors.items() if n.startswith("blk.") and
            n.endswith(("q.weight", "down.weight"))} == {36}  # I2_S
    ids = m.tokenizer.encode(trainer.chat("What is 48+27?")) + [m.spec.mask_id] * 12
    block = 16 if attention == "block" else None
    ref = trainer.torch_logits(model, ids, attention, block)
    _compare(m.logits(ids, attention, block), ref)
    # the file read back into torch is the same model
    back = trainer.torch_logits(trainer.load_gguf(path), ids, attention, block)
    np.testing.assert_allclose(back, ref, atol=1e-4 * np.abs(ref).max())


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(str(TOY_MODEL), threads=2)


def test_bundled_model_matches_its_pytorch_definition(trainer, toy):
    ref_model = trainer.load_gguf(TOY_MODEL)
    ids = toy.tokenizer.encode(trainer.chat("Reverse: abcdef")) + [toy.spec.mask_id] * 20
    for attention, block in (("causal", None), ("block", 16)):
        _compare(toy.logits(ids, attention, block),
                 trainer.torch_logits(ref_model, ids, attention, block))


def test_bundled_model_prompt_form_is_the_chat_template(trainer, toy):
    from dlmnumba.cli import _chat
    assert _chat(toy, "What is 1+2?") == trainer.chat("What is 1+2?")
