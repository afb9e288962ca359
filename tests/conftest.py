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
    """The trainer package scripts/toytrain (behind scripts/train_toy_dlm.py) as one namespace of
    its modules' public names, their `__all__` (torch required: the tests using it skip without)."""
    import importlib
    import pkgutil
    import sys
    import types
    from pathlib import Path

    pytest.importorskip("torch")
    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    package = importlib.import_module("toytrain")
    names = {}
    for info in pkgutil.iter_modules(package.__path__):
        mod = importlib.import_module(f"toytrain.{info.name}")
        for name in mod.__all__:
            value = getattr(mod, name)
            assert names.setdefault(name, value) is value, f"toytrain: two public {name}s"
    return types.SimpleNamespace(**names)
