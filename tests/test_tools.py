"""Third-party tools against the real server on a free loopback port: lm-evaluation-harness
(a multiple-choice task scored by log-likelihood through echo + logprobs, and a generation
task, both from local task files the test writes, the bundled model) scores what a direct
library evaluation scores; schemathesis, driven by /openapi.json, finds no 5xx and no answer
that disagrees with the schema."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import dlmnumba
from dlmnumba import DecodeSettings, Generator
from dlmnumba.chat import seed_chat
from dlmnumba.server.app import ServerOptions, ServerState, create_app
from dlmnumba.server.run import ThreadedServer
from dlmnumba.tasks import heldout

TOY = str(Path(dlmnumba.__file__).parent / "data" / "toy-dlm.gguf")
SETTINGS = DecodeSettings(block_size=32, max_tokens=16)


@pytest.fixture(scope="module")
def toy():
    return dlmnumba.load_model(TOY)


@pytest.fixture(scope="module")
def server(toy):
    state = ServerState(ServerOptions(model_name="toy", default_max_tokens=16), SETTINGS)
    srv = ThreadedServer(create_app(state, load=lambda: toy)).start()
    t0 = time.monotonic()
    while httpx.get(srv.url + "/health").status_code != 200:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    yield srv
    srv.stop()


def _loglik(model, context: str, continuation: str) -> float:
    """float64 log-likelihood of the continuation's tokens after the context (causal), both
    tokenized as lm-evaluation-harness does for API models (no BOS)."""
    ctx = model.tokenizer.encode(context, add_bos=False)
    cont = model.tokenizer.encode(continuation, add_bos=False)
    z = model.logits(ctx + cont).astype(np.float64)
    z[:, model.spec.mask_id] = -np.inf
    mx = z.max(1, keepdims=True)
    lsm = z - (mx + np.log(np.exp(z - mx).sum(1, keepdims=True)))
    return float(sum(lsm[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_lm_evaluation_harness_scores_what_the_library_scores(server, toy, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm_eval[api]
    from lm_eval.tasks import TaskManager

    rng = np.random.default_rng(0)
    mc, gen_rows = [], []
    for e in heldout("add", 12) + heldout("sub", 12):
        right = int(e.answer)
        wrong = sorted({right + d for d in (-10, -1, 1, 10)} - {right})
        choices = [str(right)] + [str(w) for w in rng.choice(wrong, 3, replace=False)]
        order = rng.permutation(4)
        mc.append({"question": e.prompt, "choices": [choices[i] for i in order],
                   "label": int(np.flatnonzero(order == 0)[0])})
        gen_rows.append({"question": e.prompt, "answer": e.answer})
    for name, rows in (("mc", mc), ("gen", gen_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    def common(path):
        return ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(path)
                + "\ntest_split: test\ndoc_to_text: \"USER: {{question}}<|eot_id|>ASSISTANT:\"\n")
    (tmp_path / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + common(tmp_path / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
          "target_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "toy_gen.yaml").write_text(
        "task: toy_gen\n" + common(tmp_path / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_target: \" {{answer}}\"\ntarget_delimiter: \"\"\n"
          "generation_kwargs:\n  until: [\"<|eot_id|>\"]\n  max_gen_toks: 16\n"
          "metric_list:\n  - metric: exact_match\n")
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={server.url}/v1/completions,model=toy,tokenizer_backend=remote,"
                    "tokenized_requests=True,num_concurrent=2,max_retries=1"),
        tasks=["toy_mc", "toy_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    # the oracle: log-likelihoods from Model.logits, generations from the library
    right = 0
    for row, sample in zip(mc, res["samples"]["toy_mc"]):
        context = seed_chat(row["question"])
        ours = [_loglik(toy, context, " " + c) for c in row["choices"]]
        theirs = [r[0][0] for r in sample["resps"]]
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
        right += int(np.argmax(ours)) == row["label"]
    assert res["results"]["toy_mc"]["acc,none"] == right / len(mc)
    gen = Generator(toy, SETTINGS)
    exact = 0
    for row in gen_rows:
        ids = toy.tokenizer.encode(seed_chat(row["question"]), add_bos=False)  # as lm-eval
        text = gen.generate(ids).text
        exact += text.split("<|eot_id|>")[0] == " " + row["answer"]
    assert res["results"]["toy_gen"]["exact_match,none"] == exact / len(gen_rows)
    print(f"lm-eval: toy_mc acc {right}/{len(mc)}, toy_gen exact_match {exact}/{len(gen_rows)}")
    assert right > len(mc) // 2 and exact > len(gen_rows) // 2  # the tasks measure something


def test_schemathesis_finds_no_server_error_and_no_schema_disagreement(server):
    pytest.importorskip("schemathesis")
    exe = shutil.which("st") or str(Path(sys.executable).parent / "st")
    p = subprocess.run(
        [exe, "run", server.url + "/openapi.json", "--max-examples", "40", "--seed", "1",
         "--request-timeout", "60", "--checks",
         "not_a_server_error,status_code_conformance,content_type_conformance,"
         "response_schema_conformance,response_headers_conformance"],
        capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "passed" in p.stdout
