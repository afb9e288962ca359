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
