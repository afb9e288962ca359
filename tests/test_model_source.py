"""Model resolution and the settings a model file recommends (diffusion.* metadata)."""
import re

import pytest
from click.testing import CliRunner

from dlmnumba.cli import main
from dlmnumba.config import load_config
from dlmnumba.errors import ModelFormatError
from dlmnumba.gguf.reader import GGUFFile
from dlmnumba.model_source import TOY_MODEL, recommended_settings, resolve_model_path
from gguf_edit import rewrite

RECOMMENDS = {"diffusion.block_size": 32, "diffusion.small_block_size": 4,
              "diffusion.threshold": 0.7, "diffusion.decode_mode": "iterative"}


@pytest.fixture(scope="module")
def recommending(synth_model, tmp_path_factory):
    """A tiny synthetic model whose metadata recommends decoding settings."""
    out = tmp_path_factory.mktemp("rec") / "rec.gguf"
    return rewrite(synth_model(), out, metadata=RECOMMENDS)


def test_recommended_settings_are_read_and_typed(recommending):
    rec = recommended_settings(GGUFFile(recommending).metadata, recommending)
    # a float32 0.7 in the file reads back as 0.7, not 0.699999988079071
    assert rec == {"dlm.block_size": 32, "dlm.small_block_size": 4, "dlm.threshold": 0.7,
                   "dlm.decode_mode": "iterative"}
    assert recommended_settings({}, "x.gguf") == {}


def test_recommended_settings_sit_below_env_yaml_and_cli(recommending, tmp_path):
    rec = recommended_settings(GGUFFile(recommending).metadata, recommending)
    assert load_config(env={}, model_defaults=rec).dlm.threshold == 0.7
    assert load_config(env={"DLMNUMBA_THRESHOLD": "0.6"}, model_defaults=rec).dlm.threshold == 0.6
    y = tmp_path / "c.yaml"
    y.write_text("dlm:\n  threshold: 0.5\n")
    assert load_config(str(y), env={"DLMNUMBA_THRESHOLD": "0.6"},
                       model_defaults=rec).dlm.threshold == 0.5
    cfg = load_config(str(y), cli={"dlm.threshold": 0.4, "dlm.decode_mode": "greedy"},
                      env={}, model_defaults=rec)
    assert (cfg.dlm.threshold, cfg.dlm.decode_mode, cfg.dlm.block_size) == (0.4, "greedy", 32)


def test_cli_runs_with_the_files_recommendations(recommending):
    def run(*args):
        r = CliRunner().invoke(main, ["generate", "hi", "--model", recommending, "--no-chat",
                                      "--max-tokens", "4", *args], env={})
        assert r.exit_code == 0, r.output
        return re.search(r"mode (\w+), block (\d+)\]", r.stderr).groups()

    assert run() == ("iterative", "32")
    assert run("--mode", "greedy", "--block-size", "8") == ("greedy", "8")


@pytest.mark.parametrize("key,value,needles", [
    ("diffusion.block_size", 0, ["diffusion.block_size", "dlm.block_size", "positive", "0"]),
    ("diffusion.threshold", 1.5, ["diffusion.threshold", "[0, 1]"]),
    ("diffusion.decode_mode", "fast", ["diffusion.decode_mode", "greedy, iterative", "fast"]),
    ("diffusion.small_block_size", "8", ["diffusion.small_block_size", "integer"]),
    ("diffusion.block_size", 10, ["recommended settings disagree", "multiple"]),
])
def test_a_bad_recommended_value_is_a_model_format_error(synth_model, tmp_path, key, value,
                                                         needles):
    path = rewrite(synth_model(), tmp_path / "bad.gguf", metadata={**RECOMMENDS, key: value})
    with pytest.raises(ModelFormatError) as e:
        recommended_settings(GGUFFile(path).metadata, path)
    for needle in [path, *needles]:
        assert needle in str(e.value)
    r = CliRunner().invoke(main, ["generate", "hi", "--model", path], env={})
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and path in r.stderr


def test_resolve_model_path():
    notes = []
    assert resolve_model_path("m.gguf", "toy", notes.append).name == "m.gguf" and not notes
    assert resolve_model_path(None, "toy", notes.append) == TOY_MODEL and "bundled" in notes[0]
    with pytest.raises(ValueError):
        resolve_model_path(None, "other")
