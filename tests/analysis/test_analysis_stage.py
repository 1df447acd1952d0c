"""stage=analysis end to end, on real micro runs: a pretraining run, a ReLoRA SFT run from it, and a
byte-level run. The analyses run in this process (the stage is the same as under `lab`; this spares
a start-up per analysis); one test goes through the CLI for the composition error."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from labtest import FAST, mlflow_client, run_lab

RELORA = ["stage=sft", "data=kjv_sft", "adapter=relora", "adapter.rank=2", "adapter.merge_every=4",
          "adapter.rewarmup_steps=1", "train.lr=1e-2", "train.save_every=4", "train.keep_checkpoints=5", "train.eval_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(cwd, cache, {name: run id}): pretraining, ReLoRA SFT from it (checkpoints at 4, 8, 12), byte-level pretraining."""
    cwd = tmp_path_factory.mktemp("analysis")
    cache = tmp_path_factory.getbasetemp() / "cache_analysis"
    common = [*FAST, f"paths.cache={cache}", "train.eval_every=0", "train.sample_tokens=0"]
    run_lab(*common, "tracking.experiment=pre", cwd=cwd)
    ids = {"pre": _ids(cwd, "pre")[0]}
    run_lab(*common, *RELORA, f"init_from={ids['pre']}", "tracking.experiment=sft", cwd=cwd)
    run_lab(*common, "tokenizer=byte", "train.max_steps=2", "tracking.experiment=byte", cwd=cwd)
    return cwd, cache, ids | {"sft": _ids(cwd, "sft")[0], "byte": _ids(cwd, "byte")[0]}


def _ids(cwd: Path, experiment: str) -> list[str]:
    client = mlflow_client(cwd)
    return [r.info.run_id for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                                      order_by=["attributes.start_time ASC"])]


def analyse(runs, compose_cfg, *overrides: str):
    """Run stage=analysis in this process; returns (the MLflow run, its analysis folder)."""
    from lab.run import HydraInfo
    from lab.runner import execute

    cwd, cache, _ = runs
    dcfg = compose_cfg("stage=analysis", *FAST, f"paths.outputs={cwd / 'outputs'}", f"paths.cache={cache}",
                       "tracking.experiment=analysis", *overrides)
    out = cwd / "outputs" / "runs" / f"a{len(list((cwd / 'outputs' / 'runs').glob('a*')))}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        outcome = execute(dcfg, info=HydraInfo(output_dir=out))
    finally:  # MLflow's set_tracking_uri also sets this variable, which the later tests' subprocesses would inherit
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return mlflow_client(cwd).get_run(outcome.run_id), out / "analysis"


def logged(cwd: Path, run_id: str) -> set[str]:
    return {f.path for f in mlflow_client(cwd).list_artifacts(run_id, "analysis")}


def test_layers_a_checkpoint_against_itself_changes_nowhere(runs, compose_cfg):
    cwd, _, ids = runs
    run, folder = analyse(runs, compose_cfg, "analysis=layers", f"init_from={ids['pre']}", f"analysis.runs=[{ids['pre']}]")
    change = pd.read_csv(folder / "layers_change.csv")
    assert len(change) == 20 and (change["change"] == 0).all()  # micro: 2 x 9 layer weights, embedding, final norm (tied head)
    assert run.data.metrics["analysis/layers/max_change"] == 0.0
    assert run.data.tags["lab.analysis.runs"] == f"{ids['pre']},{ids['pre']}" and run.info.run_name == "analysis-layers"
    weights = pd.read_csv(folder / "layers_weights.csv")
    assert (weights["grad_norm"] > 0).all() and (weights["weight_norm"] > 0).all()
    acts = pd.read_csv(folder / "layers_activations.csv")
    assert {"0", "1"} <= set(acts["layer"].astype(str)) and "block" in set(acts["module"])
    m = run.data.metrics  # one checkpoint's summary, to compare runs by
    assert m["analysis/layers/grad_norm"] == pytest.approx(float((weights["grad_norm"] ** 2).sum() ** 0.5))
    assert m["analysis/layers/last_block_act_std"] == pytest.approx(acts[acts["module"] == "block"]["act_std"].iloc[-1])
    assert logged(cwd, run.info.run_id) >= {f"analysis/{n}" for n in (
        "layers_change.csv", "layers_change.png", "layers_weights.csv", "layers_activations.csv",
        "layers_attention_entropy.csv", "layers_gradient_flow.png")}


def test_layers_after_relora_sft_change_the_projections_and_what_no_adapter_wraps(runs, compose_cfg):
    _, _, ids = runs
    _, folder = analyse(runs, compose_cfg, "analysis=layers", f"init_from={ids['pre']}", f"analysis.runs=[{ids['sft']}]")
    change = pd.read_csv(folder / "layers_change.csv").set_index("module")["change"]
    rest = change[change.index.str.contains("norm|tok_emb")]
    adapted = change[change.index.str.contains("proj")]
    assert (rest > 0).all() and len(rest) == 6  # ReLoRA trains the rest (adapter.train_rest): embedding, final norm, 2 x 2 norms
    assert (adapted > 0).all() and len(adapted) == 14


def test_adapter_rank_of_relora_grows_past_the_adapter_rank(runs, compose_cfg):
    cwd, _, ids = runs
    run, folder = analyse(runs, compose_cfg, "analysis=adapter_rank", f"init_from={ids['sft']}")
    table = pd.read_csv(folder / "adapter_rank.csv")
    assert set(table["adapter_rank"]) == {2} and len(table) == 3 * 14  # 3 checkpoints x 14 modules
    per_step = table.groupby("step")["rank"].agg(["min", "max"])
    assert per_step.to_dict(orient="index") == {4: {"min": 2, "max": 2}, 8: {"min": 4, "max": 4}, 12: {"min": 6, "max": 6}}
    assert run.data.metrics["analysis/adapter_rank/rank_max"] == 6
    assert {"analysis/adapter_rank_growth.png", "analysis/adapter_rank_spectrum.png"} <= logged(cwd, run.info.run_id)


def test_attention_alignment_concepts_and_tokenizer_write_tables_and_pictures(runs, compose_cfg):
    cwd, _, ids = runs
    pre = f"init_from={ids['pre']}"
    run, folder = analyse(runs, compose_cfg, "analysis=attention", pre, "analysis.attention.layers=[1]")
    heads = pd.read_csv(folder / "attention_heads.csv")
    assert len(heads) == 2 * 4 and (heads["entropy"] > 0).all() and (folder / "attention_layer1.png").read_bytes()[:4] == b"\x89PNG"
    assert not (folder / "attention_layer0.png").exists() and "analysis/attention_mean_distance_global" not in run.data.metrics
    assert run.data.metrics["analysis/attention/mean_distance_global"] > 0

    run, folder = analyse(runs, compose_cfg, "analysis=alignment", pre, "analysis.verses=96")
    summary = json.loads((folder / "alignment.json").read_text())
    assert summary["verses"] == 96 and 0 < summary["distance"] < 1 and 0 < summary["random_baseline"] < 1
    books = pd.read_csv(folder / "alignment_by_book.csv")
    assert books["verses"].sum() == 96 and books["book"].iloc[0] == "Genesis"
    assert run.data.metrics["analysis/alignment/distance"] == pytest.approx(summary["distance"])

    run, folder = analyse(runs, compose_cfg, "analysis=concepts", pre, "analysis.verses=120", "analysis.concepts.clusters=4")
    table = pd.read_csv(folder / "concepts.csv")
    assert len(table) == 120 and set(table["cluster"]) == {0, 1, 2, 3} and set(table["testament"]) == {"old", "new"}
    assert -1 <= run.data.metrics["analysis/concepts/silhouette"] <= 1

    run, folder = analyse(runs, compose_cfg, "analysis=tokenizer", pre, f"analysis.tokenizer.tokenizers=[{ids['byte']}]")
    table = pd.read_csv(folder / "tokenizers.csv")
    byte = table.iloc[0]
    assert list(table["kind"]) == ["byte", "bpe"] and byte["tokens_per_char"] > 0.99 and byte["unk_rate"] == 0
    assert table.iloc[1]["tokens_per_char"] < 0.6 and 0 < table.iloc[1]["packing_efficiency"] <= 1
    for name in ("attention", "alignment", "concepts", "tokenizer"):
        (run,) = [r for r in mlflow_client(cwd).search_runs(
            [mlflow_client(cwd).get_experiment_by_name("analysis").experiment_id]) if r.info.run_name == f"analysis-{name}"]
        assert run.info.status == "FINISHED" and any(p.endswith(".png") for p in logged(cwd, run.info.run_id))


@pytest.mark.parametrize("overrides, fragment", [
    (["analysis=adapter_rank", "init_from={pre}"], "the run trained no adapter"),
    (["analysis=alignment", "init_from={pre}", "analysis.runs=[{byte}]"], "use different tokenizers"),
    (["analysis=layers", "init_from={pre}", "analysis.runs=[{byte}]"], "are not the same model"),
    (["analysis=attention"], "analyses 1 checkpoint(s), got 0"),
    (["analysis=layers", "analysis.runs=[0123456789abcdef0123456789abcdef]"], "analysis.runs[0]=0123456789abcdef0123456789abcdef: "),
])
def test_analyses_that_cannot_be_made_say_why(runs, compose_cfg, overrides, fragment):
    from lab.errors import LabError

    _, _, ids = runs
    with pytest.raises(LabError) as e:
        analyse(runs, compose_cfg, *[o.format(**ids) for o in overrides])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_kind_lists_the_kinds_and_a_run_without_checkpoint_is_named(runs):
    cwd, cache, ids = runs
    proc = run_lab("stage=analysis", "analysis=anatomy", cwd=cwd, check=False)
    assert proc.returncode != 0 and "adapter_rank, alignment, attention, capacity, concepts, layers, tokenizer" in proc.stderr
    (analysis_run,) = [r for r in _ids(cwd, "analysis")[:1]]  # an analysis run: no checkpoint
    proc = run_lab(*FAST, f"paths.cache={cache}", "stage=analysis", "analysis=layers", f"init_from={analysis_run}",
                   cwd=cwd, check=False)
    assert proc.returncode != 0 and f"init_from={analysis_run}: run {analysis_run} has no checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


CAPACITY = ["stage=analysis", "analysis=capacity", "analysis.capacity.vocab=16", "analysis.capacity.length=8",
            "analysis.capacity.sequences=[8,32]", "analysis.capacity.dims=[8]", "analysis.capacity.steps=600",
            "analysis.capacity.window=100", "analysis.capacity.tol=1e-2", "analysis.capacity.lr=1e-2", "hardware.precision=fp32", "hardware.compile=false",
            "train.progress=false", "tracking.experiment=cap"]


def test_capacity_points_train_to_convergence_and_mlflow_holds_what_it_is_computed_from(lab_cli, tmp_path):
    lab_cli(*CAPACITY)
    client = mlflow_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("cap").experiment_id])
    (analysis,) = [r for r in runs if r.info.run_name == "analysis-capacity"]
    points = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == analysis.info.run_id),
                    key=lambda r: int(r.data.params["data.random.sequences"]))
    bits = [p.data.metrics["capacity/memorized_bits"] for p in points]
    assert [int(p.data.params["data.random.sequences"]) for p in points] == [8, 32]
    assert bits[0] < bits[1]
    # 8 sequences are memorized long before the cap: the plateau rule, after dividing the rate by 10
    # twice, ends the point, full batch, unclipped
    small = points[0]
    reason = small.data.tags["lab.stop_reason"]
    assert "after 2 learning-rate drops <train.stop.plateau_window=100>" in reason and small.data.params["train.grad_clip"] == "0.0"
    assert [m.value for m in client.get_metric_history(small.info.run_id, "stop/lr_scale")] == pytest.approx([0.1, 0.01])
    assert small.data.params["hardware.micro_batch"] == "8"
    steps = max(m.step for m in client.get_metric_history(small.info.run_id, "train/loss"))
    assert steps < 600
    # all but the first token of each, which <bos> can only tell among the 8 first tokens: about 29 of 32 bits
    assert 0.85 * 8 * 29 < bits[0] <= 8 * 32
    assert {p.data.tags["lab.precision"] for p in points} == {"fp32"}
    n_params = int(points[0].data.params["model.n_params"])
    assert analysis.data.metrics["analysis/capacity/bits_per_param"] == pytest.approx(max(bits) / n_params)
    files = {f.path for f in client.list_artifacts(analysis.info.run_id, "analysis")}
    assert {"analysis/capacity.png", "analysis/capacity.csv", "analysis/capacity_points.csv"} <= files
    # a sweep's parent works the same: the points are read back, nothing is trained
    proc = lab_cli("stage=analysis", "analysis=capacity", f"analysis.parent={analysis.info.run_id}",
                   "hardware.precision=fp32", "tracking.experiment=cap")
    assert "model.dim=8" not in proc.stdout and f"{max(bits):,.0f} bits" in proc.stdout
