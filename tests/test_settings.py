"""settings.py is the one definition: config dataclasses, YAML, environment, CLI options and the
check function all derive from it and refuse the same values."""
import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from dlmnumba import cli
from dlmnumba.config import (ENV_VARS, Config, decode_settings, generate_config_text, get,
                             load_config)
from dlmnumba.errors import ConfigError
from dlmnumba.settings import (DECODE_KEYS, SECTIONS, SETTINGS, check, check_together,
                               check_values, from_text)

# Settings only a server reads: no command-line option today.

def _options(command) -> dict:
    """--flag -> click.Option of a command."""
    return {o: p for p in command.params for o in getattr(p, "opts", ())}


def test_config_dataclasses_are_the_table():
    leaves = {}
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            leaves.update({f"{f.name}.{g.name}": g.default for g in dataclasses.fields(f.type)})
        else:
            leaves[f.name] = f.default
    assert leaves == {k: s.default for k, s in SETTINGS.items()}


def test_every_setting_has_its_env_name_and_yaml_comment():
    text = generate_config_text()
    for key, s in SETTINGS.items():
        assert s.env == "DLMNUMBA_" + key.rsplit(".", 1)[-1].upper()
        assert key in ENV_VARS[s.env]
        assert s.help.split()[0] in text
        if s.default is not None:
            assert load_config(env={s.env: str(s.default)}) == Config()


def test_every_setting_is_a_cli_option_derived_from_its_definition():
    seen = set()
    for command, max_key in ((cli.generate, "sampling.max_tokens"),
                             (cli.eval_, "sampling.max_tokens"),
                             (cli.bench, "benchmark.max_tokens"),
                             (cli.serve, "sampling.max_tokens")):
        opts = _options(command)
        keys = [*cli.DECODE_OPTION_KEYS, max_key]
        if command is cli.bench:
            keys += ["benchmark.iterations", "benchmark.warmup", "benchmark.prompt"]
        if command is cli.serve:
            keys += list(cli.SERVE_KEYS)
        for key in keys:
            s = SETTINGS[key]
            o = opts[s.flag]
            assert o.name == s.param and o.default is None and o.help == s.help
            if s.choices:
                assert tuple(o.type.choices) == s.choices
            elif key != "model_path" and s.type is not bool:
                assert o.type.name == {int: "integer", float: "float", str: "text"}[s.type]
            seen.add(key)
    assert seen == set(SETTINGS)


def _candidates(s):
    """Values to try on a setting: valid and invalid ones."""
    if s.choices:
        return [*s.choices, "bogus"]
    if s.type is int:
        return [-1, 0, 1, 7, 8, 65535, 65536]
    if s.type is float:
        return [-0.5, 0.0, 0.5, 1.0, 1.5]
    if s.type is str:
        return ["", "x"]
    return [True, False]


def _refused(fn) -> bool:
    try:
        fn()
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("key", sorted(SETTINGS))
def test_check_yaml_env_and_cli_refuse_the_same_values(tmp_path, key):
    """A test that fails if one of the front ends drifts from the definition."""
    s = SETTINGS[key]
    section, _, leaf = key.rpartition(".")
    commands = [c for c in (cli.generate, cli.bench) if s.flag in _options(c)]
    for value in _candidates(s):
        want = _refused(lambda: check(key, value, "test"))
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({section: {leaf: value}} if section else {key: value}))
        assert _refused(lambda: load_config(str(path), env={})) == want, (key, value)
        if value != "":  # an empty environment variable counts as unset
            assert _refused(lambda: load_config(env={s.env: str(value)})) == want, (key, value)
            assert _refused(lambda: from_text(key, str(value), "test")) == want, (key, value)
        for command in commands:
            name = "generate" if command is cli.generate else "bench"
            args = [name] + (["hi"] if name == "generate" else [])
            args += [s.flag, str(value)] + (["--model", str(tmp_path / "none.gguf")]
                                              if key != "model_path" else [])
            r = CliRunner().invoke(cli.main, args, env={})
            refused = r.exit_code == 2 and ("command line" in r.output or
                                            "Invalid value" in r.output)
            assert refused == want, (key, value, r.output)


def test_check_normalises_and_names_source_key_value_and_expectation():
    assert check("dlm.threshold", 1, "req") == 1.0 and type(check("dlm.threshold", 1)) is float
    with pytest.raises(ConfigError, match=r"^req: 'dlm.threshold' must be in the interval "
                                          r"\[0, 1\], got 5.0$"):
        check("dlm.threshold", 5, "req")
    with pytest.raises(ValueError):  # ConfigError is a ValueError for API callers
        check("dlm.decode_mode", "fast", "req")
    with pytest.raises(ConfigError, match="did you mean 'dlm.block_size'"):
        check("block_size", 8, "req")


def test_check_values_on_a_plain_dict_applies_the_cross_key_rule_per_mode():
    ok = {"dlm.block_size": 12, "dlm.small_block_size": 8, "dlm.decode_mode": "greedy"}
    assert check_values(ok, "request") == ok
    with pytest.raises(ConfigError, match=r"'dlm.block_size' \(12, from request\) must be a "
                                          r"multiple of 'dlm.small_block_size' \(8, from request\)"
                                          r" in iterative mode"):
        check_values({**ok, "dlm.decode_mode": "iterative"}, "request")
    with pytest.raises(ConfigError, match="multiple"):  # no mode given: the rule applies
        check_together({"dlm.block_size": 12, "dlm.small_block_size": 8}, "request")
    check_together({"dlm.block_size": 12}, "request")  # a rule missing a key is skipped


def test_decode_keys_name_every_decode_setting_and_config_builds_them():
    from dlmnumba import DecodeSettings
    from dlmnumba.decode.strategies import Sampling

    fields = {f.name for f in dataclasses.fields(DecodeSettings)} - {"sampling"}
    fields |= {f.name for f in dataclasses.fields(Sampling)}
    assert set(DECODE_KEYS) == fields
    cfg = load_config(env={}, cli={"dlm.decode_mode": "adaptive", "dlm.threshold": 0.6,
                                   "sampling.top_k": 5, "dlm.kv_commit": "none"})
    ds = decode_settings(cfg, max_tokens=7)
    assert ds.max_tokens == 7 and decode_settings(cfg).max_tokens == cfg.sampling.max_tokens
    for name, key in DECODE_KEYS.items():
        if name != "max_tokens":
            got = getattr(ds.sampling if hasattr(ds.sampling, name) else ds, name)
            assert got == get(cfg, key), name
