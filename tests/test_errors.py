"""Bad model files: each failure gives a ModelFormatError naming the file and what was expected,
and the CLI prints it in one line and exits 2 (never a traceback)."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

import dlmnumba
from dlmnumba.cli import main
from dlmnumba.errors import ModelFormatError
from dlmnumba.gguf.reader import GGUFFile
from gguf_edit import rewrite


def assert_cli_error(path, *needles):
    r = CliRunner().invoke(main, ["model", "info", path, "--load"])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err[0], (n, err[0])


def check(path, *needles):
    with pytest.raises(ModelFormatError) as e:
        dlmnumba.load_model(path)
    for n in (os.path.basename(path),) + needles:
        assert n in str(e.value), (n, str(e.value))
    assert_cli_error(path, os.path.basename(path), *needles)


def test_baseline_rewrite_loads(synth_model, tmp_path):
    """The rewrite helper itself makes loadable files, so the failures below are the edits'."""
    path = rewrite(synth_model(), tmp_path / "same.gguf")
    np.testing.assert_array_equal(dlmnumba.load_model(path).logits([1, 2, 3]),
                                  dlmnumba.load_model(synth_model()).logits([1, 2, 3]))


def test_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am not a model\n")
    check(str(p), "GGUF")


def test_missing_file(tmp_path):
    check(str(tmp_path / "absent.gguf"))


def test_truncated(synth_model, tmp_path):
    data = open(synth_model(), "rb").read()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - 5000])
    check(str(p), "blk.")


def test_unknown_architecture(synth_model, tmp_path):
    p = rewrite(synth_model(), tmp_path / "arch.gguf", metadata={"general.architecture": "llama"})
    check(p, "llama", "general.architecture", "bitnet-b1.58")


def test_missing_tensor(synth_model, tmp_path):
    p = rewrite(synth_model(), tmp_path / "missing.gguf",
                drop=("blk.1.ffn_down.weight", "blk.0.attn_sub_norm.weight"))
    check(p, "blk.1.ffn_down.weight", "blk.0.attn_sub_norm.weight")


def test_shape_disagrees_with_metadata(synth_model, tmp_path):
    p = rewrite(synth_model(), tmp_path / "shape.gguf",
                metadata={"bitnet-b1.58.feed_forward_length": 512})
    check(p, "blk.0.ffn_gate.weight", "512")


def test_ternary_tensor_of_wrong_type(synth_model, tmp_path):
    p = rewrite(synth_model(), tmp_path / "type.gguf",
                tensors={"blk.0.attn_q.weight": np.zeros((256, 256), np.float16)})
    check(p, "blk.0.attn_q.weight", "F16", "ternary")


def test_missing_hyperparameter(synth_model, tmp_path):
    src = GGUFFile(synth_model())
    assert "bitnet-b1.58.block_count" in src.metadata
    p = tmp_path / "nokey.gguf"
    # rewrite without the key: override with None is skipped by the writer helper
    rewrite(synth_model(), p, metadata={"bitnet-b1.58.block_count": None})
    check(str(p), "bitnet-b1.58.block_count")


def test_cli_synth_rejects_unknown_preset(tmp_path):
    r = CliRunner().invoke(main, ["model", "synth", str(tmp_path / "x.gguf"), "--preset", "huge"])
    assert r.exit_code == 2 and "huge" in r.output
    assert not (tmp_path / "x.gguf").exists()
