"""The CLI end to end on tiny models: generate streams the decoder's text, bench prints the
seed's report, config round-trips, errors are one line with exit status 2."""
import json
import re
import shutil

import pytest
from click.testing import CliRunner

import dlmnumba
from dlmnumba import tasks as T
from dlmnumba.chat import chat_prompt, seed_chat
from dlmnumba.cli import main
from dlmnumba import DecodeSettings, Generator
from dlmnumba.model_source import default_model_path

REPORT = re.compile(
    r"=== Benchmark Results ===\n"
    r"Iterations:        (\d+)\n"
    r"Prompt tokens:     (\d+)\n"
    r"Max tokens:        (\d+)\n"
    r"Total tokens:      (\d+)\n\n"
    r"Latency \(ms\):\n"
    r"  Mean:            \d+\.\d\d\n"
    r"  p50:             \d+\.\d\d\n"
    r"  p95:             \d+\.\d\d\n"
    r"  p99:             \d+\.\d\d\n\n"
    r"Throughput:\n"
    r"  Tokens/sec:      \d+\.\d\d\n"
    r"  Avg tokens/req:  (\d+\.\d\d)\n"
    r"  Total time:      \d+\.\d\ds\n"
    r"=========================\n$")


def invoke(args, env=None):
    return CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)


def test_generate_streams_the_decoders_text(synth_model):
    path = synth_model()
    r = invoke(["generate", "Explain ternary weights", "--model", path, "--max-tokens", "40",
                "--mode", "iterative", "--threshold", "0.5", "--block-size", "16", "--no-chat"])
    assert r.exit_code == 0, r.stderr
    m = dlmnumba.load_model(path)
    gen = Generator(m, DecodeSettings(mode="iterative", threshold=0.5, block_size=16,
                                      max_tokens=40))
    want = gen.generate(m.tokenizer.encode("Explain ternary weights"))
    assert r.stdout == want.text + "\n"
    assert f"{want.stats.generated_tokens} generated in {want.stats.forward_passes} forward" \
        in r.stderr


def test_generate_chat_uses_template_and_model_path_env(synth_model):
    path = synth_model()
    runs = {flag: invoke(["generate", "hi", "--max-tokens", "8", "--block-size", "8"] +
                         ([flag] if flag else []), env={"MODEL_PATH": path})
            for flag in ("--no-chat", "--chat", None)}
    n = {}
    for flag, r in runs.items():
        assert r.exit_code == 0, r.stderr
        n[flag] = int(re.search(r"\[(\d+) prompt tokens", r.stderr).group(1))
    m = dlmnumba.load_model(path)
    assert n["--no-chat"] == len(m.tokenizer.encode("hi"))
    assert n["--chat"] > n["--no-chat"] + 4  # the template's header tokens wrap the prompt
    assert n[None] == n["--chat"]  # the file carries a template: chat by default


def test_generate_and_eval_default_to_the_bundled_toy_model(monkeypatch):
    monkeypatch.delenv("MODEL_PATH", raising=False)
    r = invoke(["generate", "Reverse: abc", "--max-tokens", "8", "--block-size", "16"])
    assert r.exit_code == 0, r.stderr
    assert "bundled toy-dlm.gguf" in r.stderr
    r = invoke(["eval", "--tasks", "sort,copy", "-n", "3", "--block-size", "16"])
    assert r.exit_code == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert set(rows) == {"sort", "copy", "all"} and rows["all"][1] == "6"


def test_eval_matches_the_library_and_writes_json(tmp_path):
    from dlmnumba import evaluate as E
    from dlmnumba.model_source import TOY_MODEL

    out = tmp_path / "e.json"
    # every decode setting explicit: the file's recommended ones must not fill in for the CLI
    # only (the library's DecodeSettings does not read the file)
    r = invoke(["eval", "--tasks", "add,reverse", "-n", "4", "--mode", "iterative",
                "--block-size", "16", "--small-block-size", "8", "--threshold", "0.9",
                "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    m = dlmnumba.load_model(str(TOY_MODEL))
    gen = Generator(m, DecodeSettings(mode="iterative", block_size=16, small_block_size=8,
                                      threshold=0.9, max_tokens=48))
    exs = E.examples_for(["add", "reverse"], 4)
    want = [T.is_correct(e, gen.generate(m.tokenizer.encode(chat_prompt(m.file.metadata, e.prompt))).text)
            for e in exs]
    data = json.loads(out.read_text())
    assert data["total"]["n"] == 8 and data["total"]["correct"] == sum(want)
    assert [t["task"] for t in data["tasks"]] == ["add", "reverse"]
    assert data["settings"]["mode"] == "iterative" and "cpu_flags" in data["environment"]
    assert f"{100 * sum(want) / 8:.1f}%" in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("args, needle", [(["--tasks", "add,mul"], "'mul'"),
                                          (["-n", "0"], "1..200")])
def test_eval_rejects_bad_arguments(args, needle):
    r = CliRunner().invoke(main, ["eval"] + args)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


def test_bench_prints_seed_report_and_json(synth_model, tmp_path):
    path = synth_model()
    out = tmp_path / "b.json"
    r = invoke(["bench", "--model", path, "--max-tokens", "40", "--iterations", "4",
                "--warmup", "1", "--block-size", "16", "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    m = REPORT.match(r.stdout)
    assert m, r.stdout
    iters, prompt_toks, max_toks, total = map(int, m.groups()[:4])
    m_model = dlmnumba.load_model(path)
    assert (iters, max_toks) == (4, 40)
    assert prompt_toks == len(m_model.tokenizer.encode(seed_chat("What is the meaning of life?")))
    assert float(m.group(5)) == pytest.approx(total / 4, abs=0.005)
    data = json.loads(out.read_text())
    assert data["summary"]["iterations"] == 4 and data["summary"]["total_tokens"] == total
    assert data["settings"]["block_size"] == 16 and data["settings"]["model"] == path
    assert "cpu_flags" in data["environment"]


def test_config_generate_roundtrip_and_cli_precedence(synth_model, tmp_path):
    r = invoke(["config", "generate"])
    assert r.exit_code == 0
    cfg = tmp_path / "my.yaml"
    cfg.write_text(r.stdout.replace("block_size: 64", "block_size: 16")
                   .replace("model_path: null", f"model_path: {synth_model()}"))
    out = tmp_path / "b.json"
    r = invoke(["bench", "--config", str(cfg), "--block-size", "32", "--iterations", "1",
                "--warmup", "0", "--max-tokens", "8", "--json", str(out)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(out.read_text())["settings"]["block_size"] == 32  # CLI over YAML
    r = invoke(["bench", "--config", str(cfg), "--iterations", "1", "--warmup", "0",
                "--max-tokens", "8", "--json", str(out)])
    assert json.loads(out.read_text())["settings"]["block_size"] == 16  # YAML over default


@pytest.mark.parametrize("args,needle", [
    (["--block-size", "12", "--mode", "iterative"], "dlm.block_size"),
    (["--threshold", "1.5"], "dlm.threshold"),
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
])
def test_errors_are_one_line(synth_model, args, needle):
    r = invoke(["generate", "hi", "--model", synth_model()] + args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1] and "Traceback" not in r.stderr


def test_bad_yaml_key_is_config_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dlm:\n  blok_size: 32\n")
    r = invoke(["generate", "hi", "--config", str(cfg)])
    assert r.exit_code == 2 and "dlm.blok_size" in r.stderr and str(cfg) in r.stderr


def test_default_model_is_used_from_the_cache(synth_model, tmp_path):
    path, spec = default_model_path()
    assert spec["preset"] == "bitnet-2b4t" and spec["arch"] == "bitnet"
    env = {"DLMNUMBA_CACHE_DIR": str(tmp_path), "MODEL_PATH": "", "DLMNUMBA_MODEL_PATH": ""}
    # a tiny stand-in at the default location keeps the test fast; the CLI must reuse it
    target = tmp_path / path.name
    shutil.copy(synth_model(), target)
    r = invoke(["bench", "--max-tokens", "4", "--block-size", "8", "--iterations", "1",
                "--warmup", "0"], env=env)
    assert r.exit_code == 0, r.stderr
    assert "random weights" in r.stderr and path.name in r.stderr
    assert "writing the built-in default model" not in r.stderr


def test_python_m_entry_point():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dlmnumba", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout and "bench" in r.stdout


def test_doctor_reports_the_kernel_path():
    from dlmnumba.kernels.dispatch import select_path, supported_paths
    r = invoke(["doctor"])
    assert r.exit_code == 0
    assert f"kernel path used:  {select_path()}" in r.stdout
    assert ", ".join(supported_paths()) in r.stdout
    forced = invoke(["doctor"], env={"DLMNUMBA_KERNEL": "portable"})
    assert "kernel path used:  portable (from $DLMNUMBA_KERNEL)" in forced.stdout


def test_model_files_block_size_is_a_default_below_env_yaml_and_cli(tmp_path, monkeypatch):
    from dlmnumba.model_source import TOY_MODEL
    monkeypatch.delenv("DLMNUMBA_BLOCK_SIZE", raising=False)
    assert dlmnumba.load_model(str(TOY_MODEL)).file.metadata["diffusion.block_size"] == 32

    def block(args, env=None):
        r = invoke(["generate", "Sort: 321", "--max-tokens", "4"] + args, env=env)
        assert r.exit_code == 0, r.stderr
        return int(re.search(r"block (\d+)\]", r.stderr).group(1))

    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("dlm:\n  block_size: 8\n")
    assert block([]) == 32  # the file's diffusion.block_size replaces the default 64
    assert block([], env={"DLMNUMBA_BLOCK_SIZE": "16"}) == 16
    assert block(["--config", str(yaml_path)]) == 8
    assert block(["--block-size", "64"]) == 64


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_the_model_file_is_opened_and_the_config_resolved_once(monkeypatch, command):
    """serve (and generate) open the GGUF once and resolve the configuration once, the file's
    recommended settings included; the model loads from that very file object."""
    import dlmnumba.config
    import dlmnumba.server.build
    from dlmnumba.gguf import reader
    from dlmnumba.model_source import TOY_MODEL

    opened, resolved, loaded = [], [], []
    real_init, real_load = reader.GGUFFile.__init__, dlmnumba.config.load_config

    def init(self, *args, **kw):
        opened.append(args[0] if args else kw.get("path"))
        real_init(self, *args, **kw)

    def load_config(*args, **kw):
        resolved.append(kw.get("model_defaults"))
        return real_load(*args, **kw)

    def serve_local(cfg, log_level, file=None):  # instead of serving: the background load
        loaded.append((cfg, dlmnumba.server.build.load_model(cfg, file)))

    monkeypatch.setattr(reader.GGUFFile, "__init__", init)
    monkeypatch.setattr(dlmnumba.config, "load_config", load_config)
    monkeypatch.setattr(dlmnumba.server.build, "serve_local", serve_local)
    monkeypatch.delenv("DLMNUMBA_BLOCK_SIZE", raising=False)
    args = (["serve", "--port", "1"] if command == "serve"
            else ["generate", "Sort: 321", "--max-tokens", "4"])
    r = invoke(args)
    assert r.exit_code == 0, r.stderr
    assert opened == [str(TOY_MODEL)] and len(resolved) == 1
    if command == "serve":
        cfg, model = loaded[0]
        assert cfg.dlm.block_size == 32  # the file's recommendation, resolved in that one pass
        assert model.path == str(TOY_MODEL)
