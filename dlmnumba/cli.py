"""Command-line interface: thin click commands that parse, call the library, and print."""
from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from pathlib import Path

import click

from .errors import DlmError

EXIT_USER_ERROR = 2


def _progress() -> bool:
    """Progress bars go to stderr, and only when a person is watching it."""
    return sys.stderr.isatty()


def user_errors(fn):
    """Print our errors (and bad-file OS errors) as one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DlmError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except OSError as e:
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlmnumba")
def main() -> None:
    """dlmnumba: fast CPU inference for ternary (BitNet b1.58) diffusion language models."""


@main.group()
def model() -> None:
    """Inspect and synthesize GGUF model files."""


@model.command("synth")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "small", "bitnet-2b4t"]), default="tiny",
              show_default=True, help="Model shapes (bitnet-2b4t = BitNet b1.58 2B-4T's).")
@click.option("--qtype", type=click.Choice(["TQ1_0", "TQ2_0", "I2_S"]), default="TQ2_0",
              show_default=True, help="Ternary storage type of the projection weights.")
@click.option("--arch", type=click.Choice(["bitnet-b1.58", "bitnet"]), default="bitnet-b1.58",
              show_default=True, help="bitnet-b1.58: relu^2 FFN (bitnet.cpp); bitnet: SiLU (llama.cpp).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@user_errors
def model_synth(out: Path, preset: str, qtype: str, arch: str, seed: int) -> None:
    """Write a synthetic BitNet model with random ternary weights to OUT."""
    from .gguf.synth import write_synthetic

    write_synthetic(out, preset=preset, qtype=qtype, arch=arch, seed=seed, progress=_progress())
    click.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): preset {preset}, {qtype}, "
               f"arch {arch}, seed {seed}; random weights, so generated text is noise")


@model.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--load", is_flag=True, help="Also load the weights; report load time and memory.")
@click.option("--threads", type=int, default=None, help="Threads (default: physical cores).")
@user_errors
def model_info(path: Path, load: bool, threads: int | None) -> None:
    """Describe a GGUF model: architecture, dimensions, tensor types, special tokens."""
    from .gguf.reader import GGUFFile
    from .gguf.spec import ModelSpec
    from .model.weights import _type_name

    f = GGUFFile(str(path))
    s = ModelSpec.from_metadata(f.metadata, str(path))
    types = Counter(_type_name(t.qtype) for t in f.tensors.values())
    md = f.metadata
    rows = [
        ("file", f"{path} ({path.stat().st_size / 2**20:.1f} MiB)"),
        ("name", md.get("general.name", "-")),
        ("architecture", f"{s.arch} (FFN activation {s.activation})"),
        ("layers", s.n_layer),
        ("embedding", s.n_embd),
        ("heads", f"{s.n_head} query, {s.n_head_kv} key/value, head dim {s.head_dim}, "
                  f"rotary dims {s.n_rot}"),
        ("feed-forward", s.n_ff),
        ("vocabulary", s.n_vocab),
        ("context (trained)", s.n_ctx_train),
        ("rope base", s.rope_base),
        ("rms eps", f"{s.rms_eps:.3g}"),
        ("tensors", ", ".join(f"{n} {t}" for t, n in sorted(types.items()))),
        ("lm head", "tied to token_embd" if "output.weight" not in f.tensors else "output.weight"),
        ("tokenizer", f"{md.get('tokenizer.ggml.model', '-')} (pre {md.get('tokenizer.ggml.pre', '-')})"),
        ("special ids", f"bos {s.bos_id}, eos {s.eos_id}, eot {s.eot_id}, "
                        f"end-of-generation {sorted(s.eog_ids)}"),
        ("mask id", s.mask_id if s.mask_id is not None else "none declared"),
        ("shift logits", s.shift_logits),
    ]
    if load:
        from .model.bitnet import load_model

        m = load_model(str(path), threads=threads, progress=_progress())
        packed = sum(t.packed.nbytes + t.scales.nbytes for L in m.weights.layers
                     for t in (L.qkv, L.o, L.gate_up, L.down))
        n_w = sum(t.packed.shape[0] * t.k for L in m.weights.layers
                  for t in (L.qkv, L.o, L.gate_up, L.down))
        rss, peak = _memory_mib()
        rows += [("load time", f"{m.load_seconds:.2f} s ({m.threads} threads)"),
                 ("ternary weights", f"{n_w / 1e6:.1f} M in {packed / 2**20:.1f} MiB "
                                     f"({8 * packed / n_w:.2f} bits/weight)"),
                 ("resident memory", f"{rss:.0f} MiB (peak {peak:.0f} MiB)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':':<{width + 2}}{v}")


def _memory_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process in MiB."""
    cur = peak = 0.0
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cur = peak
    return cur, peak


if __name__ == "__main__":  # pragma: no cover
    main()
