"""Shared fixtures: small synthetic models written once per test session."""
import pytest

from dlmnumba.synth.models import write_synthetic


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory):
    """Factory: path of a synthetic model with the given settings (cached per session)."""
    made = {}
    root = tmp_path_factory.mktemp("models")

    def make(preset="tiny", qtype="TQ2_0", arch="bitnet-b1.58", seed=0):
        key = (preset, qtype, arch, seed)
        if key not in made:
            made[key] = write_synthetic(root / f"{preset}-{qtype}-{arch}-{seed}.gguf",
                                        preset=preset, qtype=qtype, arch=arch, seed=seed)
        return str(made[key])

    return make


@pytest.fixture(scope="module")
def trainer():
    """scripts/train_toy_dlm.py as a module (torch required: the tests using it skip without)."""
    import importlib.util
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_toy_dlm.py"
    spec = importlib.util.spec_from_file_location("train_toy_dlm", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
