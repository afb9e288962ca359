"""Command-line interface: thin click commands that parse, call the library, and print."""
from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from pathlib import Path

import click

from .chat import chat_prompt, prompt_text, seed_chat
from .convert.weights import EMBD_TYPES
from .convert.writer import ARCHS as CONVERT_ARCHS
from .errors import DlmError
from .model_source import RECOMMENDED_KEYS
from .settings import REFINING_MODES, SETTINGS
from .synth.models import PRESETS, QTYPES
from .tasks import TASKS

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


class _OneLineErrors(click.Group):
    """A bad command line is one line on stderr (`error: ...`) and exit status 2, like every
    other user error, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            msg = " ".join(e.format_message().split())
            if e.ctx is not None and isinstance(e, click.UsageError):
                msg += f" (see '{e.ctx.command_path} --help')"
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlmnumba")
def main() -> None:
    """dlmnumba: fast CPU inference for ternary (BitNet b1.58) diffusion language models."""


@main.group()
def model() -> None:
    """Inspect and synthesize GGUF model files."""


@model.command("synth")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny",
              show_default=True, help="Model shapes (bitnet-2b4t = BitNet b1.58 2B-4T's).")
@click.option("--qtype", type=click.Choice(list(QTYPES)), default="TQ2_0",
              show_default=True, help="Ternary storage type of the projection weights.")
@click.option("--arch", type=click.Choice(["bitnet-b1.58", "bitnet"]), default="bitnet-b1.58",
              show_default=True, help="bitnet-b1.58: relu^2 FFN (bitnet.cpp); bitnet: SiLU (llama.cpp).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@user_errors
def model_synth(out: Path, preset: str, qtype: str, arch: str, seed: int) -> None:
    """Write a synthetic BitNet model with random ternary weights to OUT."""
    from .synth.models import write_synthetic

    write_synthetic(out, preset=preset, qtype=qtype, arch=arch, seed=seed, progress=_progress())
    click.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): preset {preset}, {qtype}, "
               f"arch {arch}, seed {seed}; random weights, so generated text is noise")


@model.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--load", is_flag=True, help="Also load the weights; report load time and memory.")
@click.option("--threads", type=int, default=None, help="Threads (default: physical cores).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config (its `threads` applies).")
@user_errors
def model_info(path: Path, load: bool, threads: int | None, config_path: str | None) -> None:
    """Describe a GGUF model: architecture, dimensions, tensor types, special tokens."""
    from .gguf.reader import GGUFFile
    from .gguf.spec import ModelSpec
    from .model.weights import type_name

    f = GGUFFile(str(path))
    s = ModelSpec.from_metadata(f.metadata, str(path))
    types = Counter(type_name(t.qtype) for t in f.tensors.values())
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

        from .config import load_config

        threads = load_config(config_path, cli={"threads": threads}).threads
        m = load_model(str(path), threads=threads, progress=_progress())
        packed = sum(t.packed.nbytes + t.scales.nbytes for L in m.weights.layers
                     for t in (L.qkv, L.o, L.gate_up, L.down))
        n_w = sum(t.packed.shape[0] * t.k for L in m.weights.layers
                  for t in (L.qkv, L.o, L.gate_up, L.down))
        from .bench import process_memory_mib

        rss, peak = process_memory_mib()
        rows += [("load time", f"{m.load_seconds:.2f} s ({m.threads} threads)"),
                 ("kernel path", f"{m.kernel}; LM head {m.head.describe()}"),
                 ("ternary weights", f"{n_w / 1e6:.1f} M in {packed / 2**20:.1f} MiB "
                                     f"({8 * packed / n_w:.2f} bits/weight)"),
                 ("resident memory", f"{rss:.0f} MiB (peak {peak:.0f} MiB)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':':<{width + 2}}{v}")


# -- settings shared by generate, bench and eval -------------------------------------------
# The settings each decoding command takes as options; flag, type, choices and help come from
# settings.py.  max_tokens is per command (sampling.max_tokens or benchmark.max_tokens).
DECODE_OPTION_KEYS = (
    "model_path", "dlm.decode_mode", "dlm.block_size", "dlm.small_block_size", "dlm.threshold",
    "dlm.max_iterations_per_block", "dlm.mask_token_id", "dlm.attention", "dlm.kv_commit",
    "dlm.dual_cache", "dlm.confidence", "dlm.draft_size", "dlm.draft_policy",
    "threads", "threads_yield", "kernel", "lm_head", "sampling.temperature", "sampling.top_k",
    "sampling.top_p", "sampling.seed", "sampling.ignore_eos",
)


def setting_option(key: str):
    """A click option for one setting, defaulting to None (the config decides)."""
    s = SETTINGS[key]
    if s.type is bool:
        return click.option(f"{s.flag}/--no-{s.flag[2:]}", s.param, default=None, help=s.help)
    kind = click.Choice(s.choices) if s.choices else s.type
    if key == "model_path":
        kind = click.Path(dir_okay=False)
    return click.option(s.flag, s.param, type=kind, default=None, help=s.help)


def _setting_options(keys):
    """Options for several settings (a decorator), in the order given."""
    def wrap(fn):
        for k in reversed(keys):
            fn = setting_option(k)(fn)
        return fn
    return wrap


def decode_options(max_tokens_key: str = "sampling.max_tokens"):
    """The options every decoding command takes (a decorator); all default to None."""
    def wrap(fn):
        fn = _setting_options((*DECODE_OPTION_KEYS, max_tokens_key))(fn)
        return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                            help="YAML config (see `dlmnumba config generate`).")(fn)
    return wrap


def _cli_values(opts: dict, max_tokens_key: str, extra: dict | None = None) -> dict:
    """{setting key: value} of the options given (None = not given)."""
    keys = {SETTINGS[k].param: k for k in (*DECODE_OPTION_KEYS, max_tokens_key)}
    cli = {keys[p]: v for p, v in opts.items() if p in keys}
    cli.update(extra or {})
    return cli


def _resolve(opts: dict, max_tokens_key: str, extra: dict | None = None,
             default: str = "bench", note=None):
    """(Config, opened model file) of a command's options, each resolved once: the model file
    (configured, or the built-in one of `default`) is opened once and its recommended settings
    apply above the defaults and below environment, YAML and command line."""
    from .config import load_config
    from .model_source import resolve

    cli = _cli_values(opts, max_tokens_key, extra)
    return resolve(lambda recommended: load_config(opts.get("config_path"), cli=cli,
                                                   model_defaults=recommended),
                   default, note=note or _note, progress=_progress())


def _readable(text: str) -> str:
    """A command-line argument as text: bytes that were not UTF-8 (which Python keeps as lone
    surrogates) become U+FFFD replacement characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _note(text: str) -> None:
    click.echo(text, err=True)


def _open_model(cfg, file):
    """The model of a resolved Config, from its opened file."""
    from .model_source import open_model

    return open_model(cfg, progress=_progress(), file=file)


def _generator(model, cfg, max_tokens: int):
    from .config import decode_settings
    from .runtime.generator import Generator

    return Generator(model, decode_settings(cfg, max_tokens))


@main.command()
@click.argument("prompt")
@decode_options()
@click.option("--chat/--no-chat", default=None,
              help="Wrap the prompt in the model's chat template (default: when the model "
                   "file has one).")
@click.option("--json", "as_json", is_flag=True,
              help="Structured output: the answer is a JSON object (grammar-masked).")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False),
              help="Structured output: the answer is JSON valid against this schema file.")
@user_errors
def generate(prompt: str, chat: bool | None, as_json: bool, json_schema: str | None,
             **opts) -> None:
    """Generate text from PROMPT, streamed to stdout as blocks are committed."""
    from .decode.constraint import Grammar

    grammar = None
    if json_schema:
        with open(json_schema, encoding="utf-8") as f:
            text = f.read()
        grammar = Grammar.json_schema(text, f"JSON schema {json_schema}", "json_schema")
    elif as_json:
        grammar = Grammar.json_object()
    prompt = _readable(prompt)
    notes: list[str] = []  # said once the request is accepted: a bad one is one line
    cfg, file = _resolve(opts, "sampling.max_tokens", default="toy", note=notes.append)
    m = _open_model(cfg, file)
    gen = _generator(m, cfg, cfg.sampling.max_tokens)
    ids = m.tokenizer.encode(prompt_text(m.file.metadata, prompt, chat))
    stream = gen.stream(ids, grammar=grammar)
    for n in notes:
        _note(n)
    dec = m.tokenizer.stream_decoder()
    for chunk in stream:
        text = "".join(dec.push(t) for t in chunk.tokens)
        click.echo(text, nl=False)
        sys.stdout.flush()
    click.echo(dec.flush())
    st = stream.stats
    drafts = (f"{st.accepted_tokens} of {st.draft_tokens} draft tokens accepted; "
              if st.draft_tokens else "")
    click.echo(f"[{st.prompt_tokens} prompt tokens, {st.generated_tokens} generated in "
               f"{st.forward_passes} forward passes ({st.tokens_per_pass:.2f} tokens/pass); "
               f"{drafts}"
               f"first token {st.ttft_s * 1e3:.0f} ms, total {st.latency_s:.2f} s, "
               f"{st.generated_tokens / max(st.latency_s, 1e-9):.2f} tok/s; "
               f"stop: {st.finish_reason}; mode {cfg.dlm.decode_mode}, block {cfg.dlm.block_size}]", err=True)


@main.command()
@decode_options("benchmark.max_tokens")
@setting_option("benchmark.iterations")
@setting_option("benchmark.warmup")
@setting_option("benchmark.prompt")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write figures + environment as JSON.")
@user_errors
def bench(iterations, warmup, prompt, json_path, **opts) -> None:
    """Benchmark sequential requests and print the seed's report."""
    from . import bench as B

    extra = {"benchmark.iterations": iterations, "benchmark.warmup": warmup,
             "benchmark.prompt": prompt}
    cfg, file = _resolve(opts, "benchmark.max_tokens", extra)
    m = _open_model(cfg, file)
    bc = cfg.benchmark
    gen = _generator(m, cfg, bc.max_tokens)
    ids = m.tokenizer.encode(seed_chat(bc.prompt))
    stats, wall = B.run_benchmark(gen, ids, bc.iterations, bc.warmup, progress=_progress())
    summary = B.summarize(stats, wall, len(ids), bc.max_tokens)
    click.echo(B.format_report(summary))
    click.echo(f"({cfg.dlm.decode_mode}, block {cfg.dlm.block_size}, attention {cfg.dlm.attention}, "
               f"kv_commit {cfg.dlm.kv_commit}, {m.threads} threads: "
               f"{summary.forward_passes_per_req:.2f} forward passes/request, "
               f"{summary.tokens_per_forward_pass:.2f} tokens/pass"
               + (f", {100 * summary.acceptance:.1f}% of draft tokens accepted"
                  if summary.acceptance else "") + ")", err=True)
    if json_path:
        settings = {"model": m.path, "model_bytes": os.path.getsize(m.path),
                    "mode": cfg.dlm.decode_mode, "block_size": cfg.dlm.block_size,
                    "small_block_size": cfg.dlm.small_block_size, "threshold": cfg.dlm.threshold,
                    "attention": cfg.dlm.attention, "kv_commit": cfg.dlm.kv_commit,
                    "threads": m.threads, "forward_passes_per_request": summary.forward_passes_per_req,
                    "prompt": bc.prompt, "warmup": bc.warmup}
        B.write_json(json_path, summary, B.environment_info(), settings)


SERVE_KEYS = ("host", "port", "api_key", "max_request_bytes", "openapi", "scheduler.max_sequences",
              "scheduler.max_waiting", "scheduler.enable_radix_cache",
              "scheduler.radix_cache_max_tokens", "cluster.backend", "cluster.replicas",
              "cluster.threads_per_replica", "cluster.max_replicas",
              "cluster.ray_address")


@main.command()
@decode_options()
@_setting_options(SERVE_KEYS)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True, help="uvicorn's log level.")
@user_errors
def serve(log_level: str, **opts) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (continuous batching, prefix cache).

    Without --model it serves the bundled toy model, like `generate`.  Ctrl-C stops it."""
    extra = {SETTINGS[k].key: opts.pop(SETTINGS[k].param) for k in SERVE_KEYS}
    # the file is opened and checked once, before serving; its settings feed the config
    cfg, file = _resolve(opts, "sampling.max_tokens", extra, default="toy")
    host_note = ("" if cfg.host in ("127.0.0.1", "localhost", "::1")
                 else " (reachable from other machines)")
    if cfg.cluster.backend == "ray":
        from .cluster.ray_serve import serve_ray

        serve_ray(cfg, log_level, note=_note)
        return
    from .server.build import serve_local

    _note(f"serving on http://{cfg.host}:{cfg.port}{host_note}; loading the model ...")
    serve_local(cfg, log_level, file)


@main.command("eval")
@decode_options()
@click.option("--tasks", default=",".join(TASKS),
              show_default=True, help="Comma-separated held-out tasks.")
@click.option("-n", "--examples", "n_per_task", type=int, default=50, show_default=True,
              help="Held-out examples per task (at most 200).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the results + environment as JSON.")
@click.option("--show-failures", is_flag=True, help="Print a few wrong answers per task.")
@user_errors
def eval_(tasks, n_per_task, json_path, show_failures, **opts) -> None:
    """Accuracy, tokens per forward pass and tok/s on held-out synthetic tasks
    (default model: the bundled toy model)."""
    from . import bench as B
    from . import evaluate as E

    if opts.get("max_tokens") is None:
        opts["max_tokens"] = 48  # the longest answer is 25 tokens + EOT, after a block start
    try:
        exs = E.examples_for([t.strip() for t in tasks.split(",") if t.strip()], n_per_task)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    cfg, file = _resolve(opts, "sampling.max_tokens", default="toy")
    m = _open_model(cfg, file)
    gen = _generator(m, cfg, cfg.sampling.max_tokens)
    bar = None
    if _progress():
        from tqdm import tqdm
        bar = tqdm(total=len(exs), desc="eval", unit="prompt", leave=False)
    try:
        encode = lambda p: m.tokenizer.encode(chat_prompt(m.file.metadata, p))  # noqa: E731
        results, total = E.run_eval(gen, encode, exs, bar)
    finally:
        if bar is not None:
            bar.close()
    d = cfg.dlm
    desc = (f"mode {d.decode_mode}, block {d.block_size}"
            + (f", small block {d.small_block_size}, threshold {d.threshold}"
               + (", dual cache" if d.dual_cache else "")
               + (f", {d.confidence} confidence" if d.confidence != "exact" else "")
               if d.decode_mode in REFINING_MODES else "")
            + f", attention {d.attention}, kv_commit {d.kv_commit}, {m.threads} threads, "
              f"model {Path(m.path).name}")
    click.echo(E.format_table(results, total, desc))
    if show_failures:
        for r in results:
            for f in r.failures:
                click.echo(f"  {r.task}: {f['prompt']!r} -> {f['output']!r} (want {f['answer']!r})")
    if json_path:
        settings = {"model": m.path, "mode": d.decode_mode, "block_size": d.block_size,
                    "small_block_size": d.small_block_size, "threshold": d.threshold,
                    "attention": d.attention, "kv_commit": d.kv_commit,
                    "max_tokens": cfg.sampling.max_tokens, "examples_per_task": n_per_task,
                    "threads": m.threads}
        E.write_json(json_path, results, total, settings, B.environment_info())


# The decode settings `convert` can store as the file's recommendation (its --block-size, ...):
# setting key -> GGUF key, the inverse of what model_source reads back.
CONVERT_RECOMMENDS = {key: gguf_key for gguf_key, key in RECOMMENDED_KEYS.items()}


@main.command("convert")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--qtype", type=click.Choice(list(QTYPES)), default="TQ2_0", show_default=True,
              help="Ternary type: TQ1_0/TQ2_0 (llama.cpp), I2_S (bitnet.cpp).")
@click.option("--arch", type=click.Choice(list(CONVERT_ARCHS)), default=None,
              help="Default from hidden_act: relu2 -> bitnet-b1.58, silu -> bitnet.")
@click.option("--embd-type", type=click.Choice(EMBD_TYPES), default="F16",
              show_default=True, help="Type of the token embedding (and an untied LM head).")
@click.option("--mask-token", default=None, metavar="TEXT",
              help="The diffusion mask token (e.g. '|<MASK>|'): the tokenizer's, or added on "
                   "the checkpoint's spare embedding row.")
@click.option("--shift-logits/--no-shift-logits", default=True, show_default=True,
              help="diffusion.shift_logits: logit i predicts token i+1.")
@_setting_options(tuple(CONVERT_RECOMMENDS))  # stored as the file's recommended settings
@user_errors
def convert(src: Path, out: Path, qtype: str, arch: str | None, embd_type: str,
            mask_token: str | None, shift_logits: bool, **recommend) -> None:
    """Convert a Hugging Face BitNet checkpoint directory SRC to the GGUF file OUT."""
    import signal

    from .convert.writer import convert as convert_checkpoint
    from .settings import check_values

    def terminated(signum, frame):  # a kill cleans up like Ctrl-C: no .part file left
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)

    keys = {SETTINGS[k].param: k for k in CONVERT_RECOMMENDS}  # mode -> dlm.decode_mode, ...
    chosen = check_values({keys[p]: v for p, v in recommend.items() if v is not None},
                          "dlmnumba convert")
    r = convert_checkpoint(src, out, qtype=qtype, arch=arch, embd_type=embd_type,
                           mask_token=mask_token, shift_logits=shift_logits,
                           recommended={CONVERT_RECOMMENDS[k]: v for k, v in chosen.items()},
                           progress=_progress())
    mask = "none" if r.mask_id is None else f"{r.mask_id}{' (added)' if r.mask_added else ''}"
    click.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {r.qtype}, arch {r.arch}, "
               f"{r.n_ternary / 1e6:.1f} M ternary weights from {r.form} weights, "
               f"{r.n_tensors} tensors, mask id {mask}")


@main.group("config")
def config_group() -> None:
    """Write or inspect YAML configuration."""


@config_group.command("generate")
def config_generate() -> None:
    """Print a commented example config (the defaults) to stdout."""
    from .config import generate_config_text

    click.echo(generate_config_text(), nl=False)


@config_group.command("show")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@user_errors
def config_show(config_path) -> None:
    """Print the effective configuration (defaults < environment < YAML)."""
    from .config import dump_config, load_config

    click.echo(dump_config(load_config(config_path)), nl=False)


@main.command()
def doctor() -> None:
    """Show the CPU features, the int8 kernel path that runs, threads and versions."""
    import numba
    import numpy as np

    from .bench import environment_info
    from .kernels.cpu import physical_cores
    from .kernels.dispatch import ENV, select_path, supported_paths

    env = environment_info()
    flags = ", ".join(k for k, v in env["cpu_flags"].items() if v) or "none of interest"
    try:
        chosen = select_path()
    except ValueError as e:  # a bad $DLMNUMBA_KERNEL
        chosen = f"error: {e}"
    rows = [("cpu", env["cpu_model"]), ("cpu flags", flags),
            ("kernel paths here", ", ".join(supported_paths())),
            ("kernel path used", f"{chosen}" + (f" (from ${ENV})" if os.environ.get(ENV) else "")),
            ("threads", f"{physical_cores()} physical cores (numba max {numba.config.NUMBA_NUM_THREADS})"),
            ("versions", f"python {env['python']}, numba {numba.__version__}, numpy {np.__version__}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':':<{width + 2}}{v}")
