"""Using trained models end to end: generate, chat, serve (through the OpenAI client), eval and the
generation benchmark, on a FAST pretraining run and a LoRA SFT run from it; and the errors a user
can make. Where a subprocess adds nothing (errors raised before any output), the stage runs in
this process."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import pytest
import sacrebleu

from labtest import FAST, mc_task_yaml, mlflow_client, run_lab

SFT = ["stage=sft", "data=kjv_sft", "adapter=lora", "train.lr=2e-2", "train.max_steps=6", "train.eval_every=0"]
COMMON = [*FAST, "train.eval_every=12", "train.eval_batches=3"]  # the final evaluation: 3 val batches of 4 rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(cwd, cache, {"pre": run id, "sft": run id}): FAST pretraining, and LoRA SFT (chatml) from it."""
    cwd = tmp_path_factory.mktemp("use")
    cache = tmp_path_factory.getbasetemp() / "cache_use"
    run_lab(*COMMON, f"paths.cache={cache}", "tracking.experiment=pre", cwd=cwd)
    pre = _only(cwd, "pre")
    run_lab(*COMMON, *SFT, f"paths.cache={cache}", f"init_from={pre.info.run_id}", "tracking.experiment=sft", cwd=cwd)
    return cwd, cache, {"pre": pre.info.run_id, "sft": _only(cwd, "sft").info.run_id}


def _only(cwd, experiment):
    client = mlflow_client(cwd)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def lab(runs, *args, **kw):
    cwd, cache, _ = runs
    return run_lab(*args, f"paths.cache={cache}", cwd=cwd, **kw)


def in_process(runs, compose_cfg, *overrides):
    """Run a stage in this process (its errors come back as exceptions); returns the Outcome."""
    from lab.run import HydraInfo
    from lab.runner import execute

    cwd, cache, _ = runs
    dcfg = compose_cfg(*FAST, f"paths.outputs={cwd / 'outputs'}", f"paths.cache={cache}", *overrides)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return execute(dcfg, info=HydraInfo(output_dir=cwd / "outputs" / "runs" / f"p{time.monotonic_ns()}"))
    finally:  # MLflow's set_tracking_uri also sets this variable, which later subprocesses would inherit
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def greedy(runs, name: str, prompt_ids_of, new: int = 8) -> list[str]:
    """What lab.generation gives in this process for the checkpoint, greedily (the stages must agree)."""
    import torch

    from lab import inference
    from lab.config_stages import Sampling
    from lab.lineage import resolve

    cwd, cache, ids = runs
    pre = resolve(str(cwd / "outputs" / "checkpoints" / ids[name]), None, cwd / "outputs" / "checkpoints", cache)
    tm = inference.load(pre, None, torch.device("cpu"))  # generation runs in fp32 on a CPU, whatever the profile
    result = tm.complete([prompt_ids_of(tm)], Sampling(max_new_tokens=new, temperature=0.0))
    return [c.text for c in result.completions]


# ---- generate -----------------------------------------------------------------------------------

def test_generate_writes_completions_that_match_the_generation_module(runs, tmp_path):
    cwd, _, ids = runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("And God said\n\nthe LORD\n")
    out = tmp_path / "out.jsonl"
    proc = lab(runs, "stage=generate", f"init_from={ids['pre']}", "prompt=In the beginning", f"generate.prompts={prompts}",
               "generate.temperature=0", "generate.max_new_tokens=8", f"generate.output={out}", "tracking.experiment=gen")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["In the beginning", "And God said", "the LORD"]
    assert all(r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in records)
    expected = greedy(runs, "pre", lambda tm: tm.encode("In the beginning"))
    assert records[0]["completion"] == expected[0]
    assert f"--- prompt\n{expected[0]}" in proc.stdout
    run = _only(cwd, "gen")
    assert run.info.status == "FINISHED" and run.data.tags["lab.lineage.parent_run"] == ids["pre"]
    assert run.data.metrics["generate/prompts"] == 3
    assert [f.path for f in mlflow_client(cwd).list_artifacts(run.info.run_id)].count("out.jsonl") == 1


def test_generate_errors_name_what_to_fix(runs, compose_cfg, tmp_path):
    from lab.config import to_run_config
    from lab.errors import LabError

    _, _, ids = runs
    with pytest.raises(LabError, match=r"stage=generate starts from a trained model: set init_from="):
        to_run_config(compose_cfg("stage=generate", "prompt=x"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(LabError, match=re.escape(f"generate.prompts={str(empty)!r}: the file holds no prompts")):
        in_process(runs, compose_cfg, "stage=generate", f"init_from={ids['pre']}", f"generate.prompts={empty}")
    with pytest.raises(LabError, match=r"prompt is \d+ tokens long, and the model's context \(model.max_seq_len\) is 128"):
        in_process(runs, compose_cfg, "stage=generate", f"init_from={ids['pre']}", "prompt=" + "and the " * 100)
    with pytest.raises(LabError, match="stage=generate has no prompt"):
        in_process(runs, compose_cfg, "stage=generate", f"init_from={ids['pre']}")


def test_a_run_starts_from_fresh_accelerator_state_whatever_ran_before_in_the_process(runs, compose_cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    _, _, ids = runs
    AcceleratorState._reset_state(True)
    Accelerator(cpu=True, mixed_precision="fp16")  # another caller's state, with a precision no run here asks for
    outcome = in_process(runs, compose_cfg, "stage=eval", f"init_from={ids['pre']}", "eval.batches=1",
                         "tracking.experiment=fresh_state")
    assert outcome.run_id and math.isfinite(outcome.value)


# ---- chat ---------------------------------------------------------------------------------------

def test_chat_streams_answers_in_the_sft_template_and_logs_the_transcript(runs):
    cwd, cache, ids = runs
    proc = subprocess.run([sys.executable, "-m", "lab", "stage=chat", f"init_from={ids['sft']}", f"paths.cache={cache}",
                           "generate.temperature=0", "generate.max_new_tokens=6", "tracking.experiment=chat"],
                          input=b"Quote Genesis 1:3.\n/reset\n\xff\xfe caf\xe9\nWho was Noah?\n/exit\nnever read\n", cwd=cwd,
                          capture_output=True, timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, proc.stderr
    assert "(template chatml)" in proc.stdout and proc.stdout.count("model> ") == 2 and "(new conversation)" in proc.stdout
    assert "(that line is not UTF-8 text: byte 0xff at position 0; it was skipped" in proc.stdout  # and the session goes on
    from lab.data.chat import Message

    expected = greedy(runs, "sft", lambda tm: tm.encode([Message("user", "Quote Genesis 1:3.")]), new=6)[0]
    assert f"model> {expected}\n" in proc.stdout
    run = _only(cwd, "chat")
    assert run.info.status == "FINISHED" and run.data.metrics["chat/answers"] == 2


# ---- serve --------------------------------------------------------------------------------------

def test_serve_answers_the_openai_client_and_stops_cleanly(runs):
    import openai
    import urllib.error
    import urllib.request

    cwd, cache, ids = runs
    proc = subprocess.Popen([sys.executable, "-m", "lab", "stage=serve", f"init_from={ids['sft']}", f"paths.cache={cache}",
                             "serve.port=0", "serve.model_name=micro-sft", "tracking.experiment=serve",
                             "hardware.compile=false"],  # the compiled step: tests/test_generation.py
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        start: list[str] = []
        url = _wait_for_url(proc, start)
        assert "decode step: eager <hardware.compile=false>\n" in start and any(
            line.startswith("KV cache: 16 rows of 128 tokens") for line in start)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["micro-sft"]
        done = client.completions.create(model="micro-sft", prompt="In the beginning", max_tokens=8, temperature=0)
        expected = greedy(runs, "sft", lambda tm: [tm.tokenizer.bos_id] + tm.tokenizer.encode("In the beginning"))[0]
        assert done.choices[0].text == expected and done.usage.completion_tokens <= 8
        streamed = client.completions.create(model="micro-sft", prompt="In the beginning", max_tokens=8, temperature=0,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected
        chat = client.chat.completions.create(model="micro-sft", messages=[{"role": "user", "content": "Who was Noah?"}],
                                              max_tokens=6, temperature=0)
        pieces = client.chat.completions.create(model="micro-sft", messages=[{"role": "user", "content": "Who was Noah?"}],
                                                max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in pieces) == chat.choices[0].message.content
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
        answers: list[str] = []  # four clients at once: each gets what it would get alone
        workers = [threading.Thread(target=lambda: answers.append(client.completions.create(
            model="micro-sft", prompt="In the beginning", max_tokens=8, temperature=0).choices[0].text)) for _ in range(4)]
        [w.start() for w in workers]
        [w.join() for w in workers]
        assert answers == [expected] * 4
        with pytest.raises(openai.BadRequestError, match="context is 128 tokens, but 509 were requested") as e:
            client.completions.create(model="micro-sft", prompt="In the beginning", max_tokens=500)
        assert e.value.code == "context_length_exceeded"
        with pytest.raises(openai.NotFoundError, match="serves 'micro-sft'"):
            client.completions.create(model="gpt-4", prompt="x")
        bad = urllib.request.Request(f"{url}/completions", b'{"model": "micro-sft", "prompt": ', {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad)
        assert e.value.code == 400 and "not valid JSON" in json.load(e.value)["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    run = _only(cwd, "serve")
    assert run.info.status == "FINISHED" and run.data.metrics["serve/requests"] == 8  # refused requests are not counted


BAD_REQUESTS = {  # a field made wrong -> the status, and what the answer names (the same streaming or not)
    "temperature Infinity": ('"temperature": Infinity', 400, "temperature"),
    "temperature NaN": ('"temperature": NaN', 400, "temperature"),
    "seed 2**70": (f'"seed": {2**70}', 400, "seed"),
    "seed -2": ('"seed": -2', 400, "seed"),
    "a lone surrogate": ('"prompt": "In the \\ud800 beginning"', 400, "lone surrogate"),
    "a lone surrogate in stop": ('"stop": ["\\udfff"]', 400, "lone surrogate"),
    "temperature 1e-300": ('"temperature": 1e-300', 200, None),  # T -> 0: greedy's answer
    "repetition_penalty 1e-300": ('"repetition_penalty": 1e-300, "temperature": 1', 200, None),
    "seed -1": ('"seed": -1, "temperature": 1', 200, None),  # -1: a fresh seed, as llama.cpp reads it
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_no_request_gets_a_500(runs, stream):
    import torch
    from fastapi.testclient import TestClient

    from lab import inference
    from lab.config_stages import Sampling
    from lab.errors import LabError
    from lab.lineage import resolve
    from lab.serving import Stats, build_app

    cwd, cache, ids = runs
    pre = resolve(str(cwd / "outputs" / "checkpoints" / ids["pre"]), None, cwd / "outputs" / "checkpoints", cache)
    tm = inference.load(pre, None, torch.device("cpu"), name="m")
    client = TestClient(build_app(tm, Sampling(max_new_tokens=4), Stats()), raise_server_exceptions=False)
    greedy_text = client.post("/v1/completions", json={"model": "m", "prompt": "In the", "temperature": 0}).json()
    for case, (field, status, named) in BAD_REQUESTS.items():
        body = '{"model": "m", "prompt": "In the", "stream": %s, %s}' % (str(stream).lower(), field)
        if '"prompt"' in field:
            body = body.replace('"prompt": "In the", ', "", 1)
        answer = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == status, (case, answer.text)
        if status == 400:
            assert named in answer.json()["error"]["message"] and answer.json()["error"]["type"] == "invalid_request_error", case
        elif stream:
            assert answer.text.endswith("data: [DONE]\n\n") and '"error"' not in answer.text, case
        elif case == "temperature 1e-300":
            assert answer.json()["choices"][0]["text"] == greedy_text["choices"][0]["text"]
    assert client.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    # Set Block Decoding decodes one prompt at a time: a server, which decodes requests together, refuses it at start
    with pytest.raises(LabError, match="generate.sbd_gamma: stage=serve decodes its requests together"):
        build_app(tm, Sampling(max_new_tokens=4, sbd_gamma=0.3), Stats())


def _wait_for_url(proc: subprocess.Popen, seen: Optional[list[str]] = None, timeout: float = 120.0) -> str:
    """The url the server says it listens at; the lines before it go to `seen`."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if seen is not None:
            seen.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
        if found:
            return found.group(1)
        if time.monotonic() > deadline:
            break
    raise AssertionError("the server never said where it listens")


def test_serve_on_a_port_in_use_says_so(runs, compose_cfg, capsys):
    from lab.errors import LabError

    _, _, ids = runs
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(LabError, match=f"serve.port={port} is already in use on 127.0.0.1; .* serve.port={port + 1}"):
            in_process(runs, compose_cfg, "stage=serve", f"init_from={ids['pre']}", f"serve.port={port}")
    said = capsys.readouterr().out
    assert "decode step: compiled" in said and "decode step compiled in" not in said  # refused before compiling


# ---- eval ---------------------------------------------------------------------------------------

def test_eval_perplexity_matches_the_val_loss_and_scores_match_sacrebleu(runs, compose_cfg, tmp_path):
    cwd, _, ids = runs
    refs = tmp_path / "refs.jsonl"
    refs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "In the beginning", "reference": " God created the heaven and the earth."},
        {"prompt": "And God said", "reference": ", Let there be light: and there was light."},
        {"prompt": "the LORD", "reference": " is my shepherd; I shall not want."}]))
    outcome = in_process(runs, compose_cfg, "stage=eval", f"init_from={ids['pre']}", "eval.batches=3",
                         f"eval.references={refs}", "eval.compression=true", "eval.forbidden=[and,the]",
                         "generate.max_new_tokens=10", "tracking.experiment=eval")
    client = mlflow_client(cwd)
    run = client.get_run(outcome.run_id)
    m = run.data.metrics
    val = client.get_run(ids["pre"]).data.metrics["val/loss"]  # the training stage's, on the same 3 batches
    assert m["eval/loss"] == pytest.approx(val, abs=1e-5)
    assert m["eval/ppl"] == pytest.approx(math.exp(m["eval/loss"]))
    assert 0 < m["eval/bits_per_byte"] < m["eval/loss"] / math.log(2)  # a BPE token spells more than a byte
    out = [json.loads(line) for line in
           (cwd / "outputs" / "runs").glob(f"*/outputs_{ids['pre'][:8]}.jsonl").__next__().read_text().splitlines()]
    hyps, refs_ = [o["output"] for o in out], [[o["reference"] for o in out]]
    assert m["eval/bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs_).score)
    assert m["eval/bleu_char"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs_, tokenize="char").score)
    assert m["eval/chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs_).score)
    assert m["eval/compression_ratio"] == pytest.approx(sum(map(len, hyps)) / sum(map(len, refs_[0])))
    assert m["eval/leakage"] == sum(bool(re.search(r"\b(and|the)\b", h, re.I)) for h in hyps) / 3
    assert run.data.tags["lab.eval.runs"] == ids["pre"]


def test_eval_of_two_runs_writes_one_table(runs, compose_cfg):
    cwd, _, ids = runs
    outcome = in_process(runs, compose_cfg, "stage=eval", f"init_from={ids['pre']}", f"eval.runs=[{ids['sft']}]",
                         "eval.batches=1", "tracking.experiment=eval2")
    run = mlflow_client(cwd).get_run(outcome.run_id)
    assert run.data.tags["lab.eval.runs"] == f"{ids['pre']},{ids['sft']}"
    assert {f"eval/{ids[k][:8]}/bits_per_byte" for k in ("pre", "sft")} <= set(run.data.metrics)


GEN_TASK = """task: lab_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_harness_tasks_from_local_files_score_what_is_computed_by_hand(runs, compose_cfg, tmp_path):
    """A multiple-choice and a generation task of lm-eval, their data in local JSONL files: the accuracy
    and exact match lab logs equal the ones computed here from the model's own log-probabilities and
    greedy answers."""
    import torch

    from lab import inference
    from lab.config_stages import Sampling
    from lab.evaluation import continuation_logprobs
    from lab.lineage import resolve

    cwd, cache, ids = runs
    pre = resolve(str(cwd / "outputs" / "checkpoints" / ids["pre"]), None, cwd / "outputs" / "checkpoints", cache)
    tm = inference.load(pre, None, torch.device("cpu"))
    tok = tm.tokenizer
    items = [("In the beginning God created the", ["heaven", "sea", "bread"], 0), ("And God said, Let there be", ["light", "cattle"], 0),
             ("The LORD is my", ["stone", "shepherd"], 1), ("And Noah begat", ["Shem", "waters"], 0)]
    right = 0
    for prompt, choices, answer in items:  # lm-eval's split: the whole text's tokens after the context's
        context = tok.encode(prompt)
        conts = [tok.encode(prompt + " " + c)[len(context):] for c in choices]
        scores = continuation_logprobs(tm.model, [tok.bos_id, *context], conts, torch.device("cpu"))
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    prompts = ["In the beginning", "And God said", "And the earth was", "Noah"]
    greedy = [c.text for c in tm.complete([[tok.bos_id, *tok.encode(p)] for p in prompts],
                                          Sampling(max_new_tokens=6, temperature=0.0, stop=["."])).completions]
    references = [greedy[0], greedy[1], "not this", "nor this"]  # two of four answered exactly
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"prompt": p, "choices": c, "answer": a}) + "\n" for p, c, a in items))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(prompts, references)))
    (tasks / "lab_mc.yaml").write_text(mc_task_yaml("lab_mc", tmp_path / "mc.jsonl"))
    (tasks / "lab_gen.yaml").write_text(GEN_TASK.format(data=tmp_path / "gen.jsonl"))
    outcome = in_process(runs, compose_cfg, "stage=eval", f"init_from={ids['pre']}", "eval.perplexity=false",
                         f"eval.harness.include={tasks}", "eval.harness.tasks=[lab_mc,lab_gen]", "tracking.experiment=harness")
    run = mlflow_client(cwd).get_run(outcome.run_id)
    m = run.data.metrics
    assert m["eval/harness/lab_mc/acc"] == right / 4 and m["eval/harness/lab_gen/exact_match"] == 0.5
    assert m["eval/harness/lab_mc/acc_stderr"] > 0
    logged = json.loads(next((cwd / "outputs" / "runs").glob(f"*/harness_{ids['pre'][:8]}.json")).read_text())
    assert logged["results"]["lab_mc"]["acc,none"] == right / 4
    (tasks / "lab_gone.yaml").write_text(mc_task_yaml("lab_gone", tmp_path / "gone.jsonl"))
    from lab.errors import LabError

    with pytest.raises(LabError, match="task 'lab_gone' cannot load its data .*lab downloads nothing at run time") as e:
        in_process(runs, compose_cfg, "stage=eval", f"init_from={ids['pre']}", "eval.perplexity=false",
                   f"eval.harness.include={tasks}", "eval.harness.tasks=[lab_gone]", "tracking.experiment=harness_gone")
    assert "\n" not in str(e.value)


def test_harness_renders_a_chat_as_the_model_learned_it(runs):
    """lm-eval's chat path (eval.harness.chat, on for an SFT model): the text LabLM renders tokenizes into the
    ids lab's own chat encoding gives, so a chat model sees its template exactly."""
    import torch

    from lab import inference
    from lab.data.chat import Message
    from lab.harness import _lab_lm
    from lab.lineage import resolve

    cwd, cache, ids = runs
    sft = resolve(str(cwd / "outputs" / "checkpoints" / ids["sft"]), None, cwd / "outputs" / "checkpoints", cache)
    tm = inference.load(sft, None, torch.device("cpu"))
    lm = _lab_lm()(tm, 4)
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who was Noah?"}]
    text = lm.apply_chat_template(chat)
    assert tm.template == "chatml" and "<|im_start|>assistant" in text
    assert [lm.prefix_token_id, *lm.tok_encode(text)] == tm.encode([Message(m["role"], m["content"]) for m in chat])


# ---- the generation benchmark -------------------------------------------------------------------

def test_bench_generate_grows_a_fresh_models_context_on_its_own_copy(runs, compose_cfg):
    cwd, _, _ = runs  # model=micro holds 128 tokens: a context of 160 grows the model's (the run's config is settled)
    outcome = in_process(runs, compose_cfg, "stage=bench", "bench=generate", "bench.contexts=[160]", "bench.new_tokens=8",
                         "bench.rounds=1", "bench.clients=0", "tracking.experiment=bench_fresh", "hardware.compile=false")
    m = mlflow_client(cwd).get_run(outcome.run_id).data.metrics
    assert m["bench/gen_160/kv_cache_mb"] == 160 * 512 / 2**20


def test_bench_generate_times_both_modes_and_the_server(runs, compose_cfg):
    cwd, _, ids = runs
    outcome = in_process(runs, compose_cfg, "stage=bench", "bench=generate", f"init_from={ids['pre']}",
                         "bench.contexts=[16,96]", "bench.new_tokens=8", "bench.rounds=1",
                         "bench.clients=2", "bench.requests=1", "tracking.experiment=bench",
                         "hardware.compile=false")  # the compiled step's tokens: tests/test_generation.py
    m = mlflow_client(cwd).get_run(outcome.run_id).data.metrics
    # micro: 2 layers x (keys, values) x 2 kv heads x 16-wide fp32 = 512 bytes per token of context
    assert m["bench/kv_bytes_per_token"] == 512 and m["bench/gen_96/kv_cache_mb"] == 96 * 512 / 2**20
    assert all(m[f"bench/gen_{c}/tokens_per_sec_{k}"] > 0 for c in (16, 96) for k in ("cache", "nocache"))
    assert "bench/gen_96/tokens_per_sec_compiled" not in m  # hardware.compile=false: no compiled mode
    assert m["bench/server_requests_per_sec"] > 0
