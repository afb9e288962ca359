"""Config: precedence CLI > YAML > env > defaults, validation messages, generated/shipped YAML."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from dlmnumba.settings import SECTIONS
from dlmnumba.config import (ENV_VARS, Config, DlmConfig, config_to_dict, dump_config,
                             generate_config_text, load_config)
from dlmnumba.errors import ConfigError, DlmError

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "dlm_server.yaml"


def write(tmp_path, text, name="cfg.yaml"):
    """Write a config file and return its path as a string."""
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def get(cfg, key):
    """Value of a dotted key in a Config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def nested(key, value):
    """YAML text setting one dotted key."""
    section, _, leaf = key.rpartition(".")
    return yaml.safe_dump({section: {leaf: value}} if section else {key: value})


# key, env var, default, env text, env value, yaml value, cli value (all distinct and valid).
PRECEDENCE = [
    ("dlm.block_size", "DLMNUMBA_BLOCK_SIZE", 64, "32", 32, 128, 16),
    ("dlm.decode_mode", "DLMNUMBA_DECODE_MODE", "greedy", "iterative", "iterative", "adaptive", "ar"),
    ("dlm.mask_token_id", "DLMNUMBA_MASK_TOKEN_ID", None, "5", 5, 7, 9),
    ("sampling.temperature", "DLMNUMBA_TEMPERATURE", 0.0, "0.5", 0.5, 0.7, 1.25),
    ("sampling.max_tokens", "DLMNUMBA_MAX_TOKENS", 128, "64", 64, 96, 32),
    ("scheduler.enable_radix_cache", "DLMNUMBA_ENABLE_RADIX_CACHE", True, "false", False, True, False),
    ("benchmark.prompt", "DLMNUMBA_PROMPT", "What is the meaning of life?", "env p", "env p",
     "yaml p", "cli p"),
    ("benchmark.warmup", "DLMNUMBA_WARMUP", 3, "0", 0, 5, 1),
    ("threads", "DLMNUMBA_THREADS", None, "2", 2, 3, 4),
    ("port", "DLMNUMBA_PORT", 30000, "8080", 8080, 8081, 8082),
    ("model_path", "MODEL_PATH", None, "/env.gguf", "/env.gguf", "/yaml.gguf", "/cli.gguf"),
    ("model_path", "DLMNUMBA_MODEL_PATH", None, "/e.gguf", "/e.gguf", "/y.gguf", "/c.gguf"),
]


@pytest.mark.parametrize("key,var,default,env_text,env_value,yaml_value,cli_value", PRECEDENCE)
def test_precedence_per_key(tmp_path, key, var, default, env_text, env_value, yaml_value,
                            cli_value):
    env = {var: env_text}
    path = write(tmp_path, nested(key, yaml_value))
    assert get(load_config(env={}), key) == default
    assert get(load_config(env=env), key) == env_value
    assert get(load_config(path, env=env), key) == yaml_value
    assert get(load_config(path, cli={key: cli_value}, env=env), key) == cli_value
    # a None CLI value means "option not given": YAML stays in force
    assert get(load_config(path, cli={key: None}, env=env), key) == yaml_value
    # setting one key in every layer leaves the others at their defaults
    assert load_config(path, cli={key: cli_value}, env=env).sampling.top_k == 0


def test_defaults_equal_dataclass_defaults_and_spec():
    cfg = load_config(env={})
    assert cfg == Config()
    assert config_to_dict(cfg) == {
        "model_path": None, "host": "127.0.0.1", "port": 30000, "api_key": None,
        "max_request_bytes": 1048576, "openapi": True, "threads": None, "threads_yield": True,
        "kernel": "auto", "lm_head": "exact",
        "dlm": {"block_size": 64, "small_block_size": 8, "threshold": 0.9, "mask_token_id": None,
                "max_iterations_per_block": 10, "decode_mode": "greedy", "attention": "block",
                "dual_cache": True, "confidence": "exact", "draft_size": 16,
                "draft_policy": "adaptive", "kv_commit": "normal"},
        "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "max_tokens": 128,
                     "ignore_eos": False},
        "scheduler": {"max_sequences": 16, "max_waiting": 256, "enable_radix_cache": True,
                      "radix_cache_max_tokens": 8192},
        "cluster": {"backend": "local", "replicas": 1, "threads_per_replica": None,
                    "max_replicas": None, "ray_address": None},
        "benchmark": {"iterations": 50, "warmup": 3, "max_tokens": 128,
                      "prompt": "What is the meaning of life?"},
    }


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("DLMNUMBA_BLOCK_SIZE", "16")
    assert load_config().dlm.block_size == 16


def test_max_tokens_env_sets_both_sections():
    cfg = load_config(env={"DLMNUMBA_MAX_TOKENS": "40"})
    assert (cfg.sampling.max_tokens, cfg.benchmark.max_tokens) == (40, 40)
    assert ENV_VARS["DLMNUMBA_MAX_TOKENS"] == ["sampling.max_tokens", "benchmark.max_tokens"]


def test_env_names_cover_every_leaf_once():
    keys = [k for ks in ENV_VARS.values() for k in ks]
    assert sorted(keys) == sorted(k for k in _flat(config_to_dict(Config())))


def _flat(d, prefix=""):
    """{dotted key: value} of a nested dict."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_dlmnumba_model_path_beats_model_path():
    env = {"MODEL_PATH": "/seed.gguf", "DLMNUMBA_MODEL_PATH": "/ours.gguf"}
    assert load_config(env=env).model_path == "/ours.gguf"


def test_env_parsing_and_empty_values():
    cfg = load_config(env={"DLMNUMBA_THRESHOLD": "0.75", "DLMNUMBA_ENABLE_RADIX_CACHE": "no",
                           "DLMNUMBA_THREADS": "null", "DLMNUMBA_HOST": "", "MODEL_PATH": ""})
    assert cfg.dlm.threshold == 0.75 and cfg.scheduler.enable_radix_cache is False
    assert cfg.threads is None and cfg.host == "127.0.0.1" and cfg.model_path is None


def test_cli_path_objects_become_strings(tmp_path):
    assert load_config(cli={"model_path": tmp_path / "m.gguf"}, env={}).model_path == str(
        tmp_path / "m.gguf")


def test_int_accepted_for_float_key(tmp_path):
    cfg = load_config(write(tmp_path, "sampling:\n  top_p: 1\n  temperature: 2\n"), env={})
    assert cfg.sampling.top_p == 1.0 and type(cfg.sampling.top_p) is float
    assert type(cfg.sampling.temperature) is float


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), env={}) == Config()
    assert load_config(write(tmp_path, "dlm:\n  # block_size: 32\n"), env={}) == Config()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        DlmConfig().block_size = 1


def test_config_error_is_a_dlm_error():
    assert issubclass(ConfigError, DlmError)


# YAML text -> substrings the error must contain (besides the file path).
YAML_ERRORS = [
    ("modle_path: x.gguf\n", ["modle_path", "model_path", "not a known"]),
    ("dlm:\n  blok_size: 32\n", ["dlm.blok_size", "dlm.block_size"]),
    ("block_size: 32\n", ["'block_size'", "did you mean 'dlm.block_size'"]),
    ("sampler:\n  top_k: 3\n", ["'sampler'", "did you mean 'sampling'?"]),
    ("benchmark:\n  prompt: hi\n  iteratons: 3\n", ["benchmark.iteratons", "benchmark.iterations"]),
    ("dlm: 5\n", ["'dlm'", "mapping"]),
    ("dlm:\n  block_size: abc\n", ["dlm.block_size", "'abc'", "integer"]),
    ("dlm:\n  block_size: 64.0\n", ["dlm.block_size", "64.0", "integer"]),
    ("dlm:\n  block_size: true\n", ["dlm.block_size", "True", "integer"]),
    ("dlm:\n  threshold: true\n", ["dlm.threshold", "True", "number"]),
    ("dlm:\n  threshold: .nan\n", ["dlm.threshold", "nan", "number"]),
    ("sampling:\n  temperature: 1e-3\n", ["sampling.temperature", "1e-3", "1.0e-3"]),
    ("scheduler:\n  enable_radix_cache: 1\n", ["scheduler.enable_radix_cache", "1", "boolean"]),
    ("benchmark:\n  enabled: false\n", ["benchmark.enabled", "not a known"]),  # removed key
    ("benchmark:\n  prompt: 42\n", ["benchmark.prompt", "42", "string"]),
    ("host: null\n", ["'host'", "null", "string"]),
    ("threads: two\n", ["'threads'", "'two'", "integer or null"]),
    ("dlm:\n  mask_token_id: x\n", ["dlm.mask_token_id", "integer or null"]),
    ("dlm:\n  block_size: 0\n", ["dlm.block_size", "positive", "0"]),
    ("dlm:\n  small_block_size: -8\n", ["dlm.small_block_size", "positive", "-8"]),
    ("dlm:\n  max_iterations_per_block: 0\n", ["dlm.max_iterations_per_block", "positive"]),
    ("benchmark:\n  iterations: 0\n", ["benchmark.iterations", "positive"]),
    ("benchmark:\n  max_tokens: 0\n", ["benchmark.max_tokens", "positive"]),
    ("sampling:\n  max_tokens: -1\n", ["sampling.max_tokens", "positive"]),
    ("scheduler:\n  max_sequences: 0\n", ["scheduler.max_sequences", "positive"]),
    ("scheduler:\n  radix_cache_max_tokens: 0\n", ["scheduler.radix_cache_max_tokens", "positive"]),
    ("port: 0\n", ["'port'", "1..65535", "0"]),
    ("port: 65536\n", ["'port'", "1..65535", "65536"]),
    ("benchmark:\n  warmup: -1\n", ["benchmark.warmup", ">= 0"]),
    ("sampling:\n  top_k: -1\n", ["sampling.top_k", ">= 0"]),
    ("sampling:\n  seed: -1\n", ["sampling.seed", ">= 0"]),
    ("threads: 0\n", ["'threads'", "null or >= 1"]),
    ("dlm:\n  threshold: 1.01\n", ["dlm.threshold", "[0, 1]", "1.01"]),
    ("dlm:\n  threshold: -0.5\n", ["dlm.threshold", "[0, 1]"]),
    ("sampling:\n  top_p: 0.0\n", ["sampling.top_p", "(0, 1]"]),
    ("sampling:\n  top_p: 1.5\n", ["sampling.top_p", "(0, 1]"]),
    ("sampling:\n  temperature: -0.1\n", ["sampling.temperature", ">= 0"]),
    ("dlm:\n  decode_mode: fast\n", ["dlm.decode_mode", "greedy, iterative, adaptive, ar", "fast"]),
    ("dlm:\n  attention: full\n", ["dlm.attention", "block, causal", "full"]),
    ("dlm:\n  kv_commit: stale\n", ["dlm.kv_commit", "normal, none", "stale"]),
    ("dlm:\n  mask_token_id: -1\n", ["dlm.mask_token_id", "null or >= 0"]),
    ("host: ''\n", ["'host'", "empty"]),
    ("- a\n- b\n", ["mapping", "list"]),
    ("dlm: [1\n", ["not valid YAML"]),
    ("port: 1\nport: 2\n", ["not valid YAML", "duplicate key 'port'"]),
]


@pytest.mark.parametrize("text,needles", YAML_ERRORS)
def test_yaml_errors_name_key_and_file(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    msg = str(e.value)
    assert path in msg and "\n" not in msg  # the CLI prints errors on one line
    for needle in needles:
        assert needle in msg


def test_unreadable_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="nope.yaml.*cannot read"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path), env={})  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00port: 1")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_config(str(binary), env={})


@pytest.mark.parametrize("env,needles", [
    ({"DLMNUMBA_BLOCK_SIZE": "abc"}, ["DLMNUMBA_BLOCK_SIZE", "dlm.block_size", "'abc'", "integer"]),
    ({"DLMNUMBA_THRESHOLD": "high"}, ["DLMNUMBA_THRESHOLD", "'high'", "number"]),
    ({"DLMNUMBA_THRESHOLD": "inf"}, ["DLMNUMBA_THRESHOLD", "number"]),
    ({"DLMNUMBA_THRESHOLD": "2"}, ["DLMNUMBA_THRESHOLD", "[0, 1]"]),
    ({"DLMNUMBA_ENABLE_RADIX_CACHE": "maybe"}, ["DLMNUMBA_ENABLE_RADIX_CACHE", "'maybe'"]),
    ({"DLMNUMBA_PORT": "99999"}, ["DLMNUMBA_PORT", "1..65535"]),
    ({"DLMNUMBA_DECODE_MODE": "fast"}, ["DLMNUMBA_DECODE_MODE", "greedy"]),
    ({"DLMNUMBA_MAX_TOKENS": "0"}, ["DLMNUMBA_MAX_TOKENS", "max_tokens", "positive"]),
])
def test_env_errors_name_variable(env, needles):
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("cli,needles", [
    ({"dlm.block_size": "32"}, ["command line", "dlm.block_size", "'32'", "integer"]),
    ({"dlm.threshold": 1.5}, ["command line", "dlm.threshold", "[0, 1]"]),
    ({"sampling.top_k": True}, ["command line", "sampling.top_k", "integer"]),
    ({"dlm.blocksize": 32}, ["command line", "dlm.blocksize", "dlm.block_size"]),
])
def test_cli_errors_name_command_line(cli, needles):
    with pytest.raises(ConfigError) as e:
        load_config(cli=cli, env={})
    for needle in needles:
        assert needle in str(e.value)


def test_block_size_multiple_checked_on_merged_config(tmp_path):
    path = write(tmp_path, "dlm:\n  small_block_size: 8\n  decode_mode: iterative\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, cli={"dlm.block_size": 12}, env={})
    msg = str(e.value)
    assert "'dlm.block_size' (12, from command line)" in msg
    assert f"'dlm.small_block_size' (8, from {path})" in msg
    assert f"in iterative mode (from {path})" in msg
    # the same file with a compatible CLI value loads; env values are checked the same way
    assert load_config(path, cli={"dlm.block_size": 16}, env={}).dlm.block_size == 16
    with pytest.raises(ConfigError, match="DLMNUMBA_SMALL_BLOCK_SIZE"):
        load_config(env={"DLMNUMBA_SMALL_BLOCK_SIZE": "48", "DLMNUMBA_DECODE_MODE": "adaptive"})
    # greedy and ar decode whole blocks: there the sub-block size does not matter
    assert load_config(path, cli={"dlm.block_size": 12, "dlm.decode_mode": "greedy"},
                       env={}).dlm.block_size == 12


def test_generated_text_loads_back_to_defaults(tmp_path):
    text = generate_config_text()
    assert load_config(write(tmp_path, text), env={}) == Config()
    assert load_config(write(tmp_path, text), env={"DLMNUMBA_BLOCK_SIZE": "32"}) == Config()
    assert "mask_token_id: null" in text


def test_generated_text_comments_every_key():
    lines = generate_config_text().splitlines()
    keys = [i for i, line in enumerate(lines) if line and not line.lstrip().startswith("#")]
    assert len(keys) == len(_flat(config_to_dict(Config()))) + len(SECTIONS)  # + section headers
    for i in keys:
        assert lines[i - 1].lstrip().startswith("#"), lines[i]
        assert len(lines[i - 1]) <= 100


def test_shipped_config_equals_generated():
    assert SHIPPED.read_text(encoding="utf-8") == generate_config_text()


def test_dump_config_round_trip(tmp_path):
    cfg = load_config(env={}, cli={"model_path": "/m.gguf", "dlm.block_size": 32,
                                   "dlm.decode_mode": "adaptive", "dlm.kv_commit": "none",
                                   "sampling.temperature": 0.8, "threads": 2,
                                   "benchmark.prompt": "yes: no # not a comment",
                                   "scheduler.enable_radix_cache": False})
    assert load_config(write(tmp_path, dump_config(cfg)), env={}) == cfg
    assert yaml.safe_load(dump_config(cfg)) == config_to_dict(cfg)

