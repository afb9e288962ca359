"""The GGUF fuzz harness in CI: a short seeded run of scripts/fuzz_gguf.py (every case loads
the model, tokenizer and one forward pass in a forked child), and a check that the runner
really counts what it is there to count (exceptions, hangs, crashes, memory blow-ups).

Both run in subprocesses: forked children need a parent that never used GNU OpenMP, which the
pytest process may have (the script selects numba's fork-safe workqueue layer before import).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CI_CASES = 2000  # about 30 s here: the cases are small files that load in milliseconds


def run_python(args, tmp_path, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               NUMBA_THREADING_LAYER="workqueue")
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_seeded_fuzz_run(tmp_path):
    out = tmp_path / "fuzz.json"
    r = run_python([str(ROOT / "scripts" / "fuzz_gguf.py"), "--cases", str(CI_CASES),
                    "--seed", "14", "--json", str(out), "-q"], tmp_path)
    assert out.exists(), r.stdout + r.stderr
    s = json.loads(out.read_text())
    assert s["cases"] == CI_CASES
    # the mutants reach every stage: refused by the reader/spec/weights, and loaded in full
    assert s["outcomes"].get("ok", 0) > CI_CASES // 50, s["outcomes"]
    assert s["rejected_by_stage"].get("load", 0) > CI_CASES // 2, s["rejected_by_stage"]
    assert s["rejected_without_file_name"] == 0
    assert s["hangs"] == 0
    # every finding is an exception other than our own error types (a finite but huge norm
    # overflowing in the forward pass is refused there, naming the layer and the norm)
    assert not s["findings"], json.dumps(s["findings"][:5], indent=1)


RUNNER_SELF_TEST = """
import json, os, signal, sys, time
import numpy as np
import gguf_doc, gguf_fuzz as gf
from dlmnumba.errors import ModelFormatError
from dlmnumba.model_source import TOY_MODEL

def fake(path, prompt, forward, stage):
    name = os.path.basename(path)
    index = int(name[5:-5]) if name.startswith("case-") else -1
    if index == 1:
        raise ModelFormatError(f"{path}: refused")
    if index == 2:
        {}["missing"]
    if index == 3:
        time.sleep(60)
    if index == 4:
        os.kill(os.getpid(), signal.SIGSEGV)
    if index == 5:
        np.ones(1 << 31, np.uint8)
    if index == 6:
        a = np.ones(16 << 20, np.uint8)
    return {"outcome": "ok", "finite_logits": True}

gf.use_model = fake
doc = gguf_doc.parse(TOY_MODEL.read_bytes())
res = gf.run_cases([doc], [str(TOY_MODEL)], 0, range(8), timeout=2, mem_limit=256 << 20,
                   batch=3, tmpdir=sys.argv[1])
print(json.dumps(res))
"""


def test_runner_counts_failures(tmp_path):
    r = run_python(["-c", textwrap.dedent(RUNNER_SELF_TEST), str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    res = {x["index"]: x for x in json.loads(r.stdout.strip().splitlines()[-1])}
    assert sorted(res) == list(range(8))  # every case reported once, children restarted
    got = {i: (x["outcome"], x.get("type")) for i, x in res.items()}
    assert got == {0: ("ok", None), 1: ("rejected", "ModelFormatError"),
                   2: ("exception", "KeyError"), 3: ("hang", None),
                   4: ("crash", "signal 11"), 5: ("memory", "MemoryError"), 6: ("ok", None),
                   7: ("ok", None)}, got
    assert res[6]["peak"] >= 12 << 20 and res[7]["peak"] < 8 << 20  # per-case peak growth
    assert not list(tmp_path.glob("case-*.gguf"))
