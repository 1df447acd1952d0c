"""data=modular end to end: a small table is memorised, and the grokking metrics reach MLflow."""
from __future__ import annotations

from labtest import loss_history, mlflow_client, run_lab


def test_modular_run_memorises_its_train_split_and_logs_progress_measures(tmp_path):
    proc = run_lab("experiment=grokking", "data.modular.p=23", "train.max_steps=60", "train.lr=3e-3",
                   "train.eval_every=20", "train.log_every=5", "train.save_every=0", "train.progress=false",
                   "train.grokking.window=3", cwd=tmp_path)
    assert "full batch: hardware.micro_batch=159" in proc.stdout  # round(0.3 * 23 * 23) equations a step
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["train/acc"] == 1.0 and not any(k.startswith("final/") for k in m)
    assert sorted(loss_history(tmp_path, run.info.run_id, "train/acc")) == list(range(5, 61, 5))  # train.log_every=5
    assert 0 < m["train/fourier_top5_share"] <= 1 and m["train/weight_norm"] > 0
    memorised = m["grokking/memorized_step"]  # the detector saw train accuracy saturate (window of 3 logged steps)
    assert memorised in range(15, 61, 5) and "grokking/delay_steps" not in m
    assert int(run.data.params["data.n_train_rows"]) == 159 and run.data.params["model.name"] == "grok"
