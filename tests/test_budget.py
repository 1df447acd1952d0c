"""Token budgets (lab.budget): train.tokens and train.tokens_per_param set train.max_steps; the run
logs what it derived and trains exactly those tokens; repeating the corpus past data.max_epochs warns."""
from __future__ import annotations

import logging

import pytest

from lab.config import to_run_config
from lab.errors import ConfigError
from lab.settle import settle
from labtest import FAST, mlflow_client, run_lab

# micro's non-embedding parameters by hand: 2 layers x (q and o 64x64, k and v 64x32 (2 kv heads of
# 16), gate, up and down 64x192, two norms of 64) + the final norm
MICRO_N = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64) + 64


def test_tokens_per_param_sets_the_steps_from_the_global_batch(compose_cfg):
    assert MICRO_N == 98_624
    cfg = to_run_config(compose_cfg("model=micro", "data.seq_len=64", "hardware.micro_batch=4", "train.global_batch=32",
                                    "hardware.compile=false", "train.tokens_per_param=20"))
    settled, decisions = settle(cfg, world_size=2, mixed_precision="no")
    budget = decisions[-1]
    # 20 x 98,624 = 1,972,480 tokens; a step is 32 rows x 64 tokens = 2,048: 963.1 -> 964 steps
    assert budget.values == {"train.max_steps": 964} and settled.train.max_steps == 964
    assert budget.params == {"budget.steps": 964, "budget.tokens": 964 * 2048, "budget.params": MICRO_N,
                             "budget.params_counted": "non-embedding", "budget.flops": budget.params["budget.flops"]}
    assert budget.why.startswith("budget: 20 x 98,624 non-embedding parameters = 1,972,480 tokens = train.max_steps=964 "
                                 "of 32 x 64 tokens (1,974,272 tokens, ")
    assert budget.why.endswith("FLOPs) <train.tokens_per_param=20>")


def test_a_token_budget_shorter_than_the_warmup_warms_up_over_a_tenth(compose_cfg):
    cfg = to_run_config(compose_cfg("model=micro", "data.seq_len=64", "hardware.micro_batch=4", "hardware.compile=false",
                                    "train.tokens=10000"))
    settled, decisions = settle(cfg, world_size=1, mixed_precision="no")
    assert decisions[-1].values == {"train.max_steps": 40, "train.warmup_steps": 4}  # 10,000 / 256 -> 40 steps
    assert settled.train.warmup_steps == 4 and cfg.train.max_steps == 400  # the request is left as asked


@pytest.mark.parametrize("args, message", [
    (["train.tokens=1000", "train.tokens_per_param=20"], "train.tokens and train.tokens_per_param both set the run's length; keep one"),
    (["stage=sft", "init_from=x", "train.tokens=1000"], "train.tokens sets the length of pretraining on text"),
    (["experiment=grokking", "train.tokens_per_param=20"], "train.tokens_per_param sets the length of pretraining on text"),
])
def test_a_budget_where_it_cannot_apply_is_one_line(compose_cfg, args, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config(compose_cfg(*args))


def test_the_run_trains_the_budgeted_tokens_and_logs_them(tmp_path, shared_cache, caplog):
    """0.05 tokens per parameter: 4,932 tokens = 20 steps of 4 x 64; the logged budget is the tokens seen."""
    proc = run_lab(*FAST, "train.tokens_per_param=0.05", "data.max_epochs=0.001", f"paths.cache={shared_cache}", cwd=tmp_path)
    (run,) = mlflow_client(tmp_path).search_runs([mlflow_client(tmp_path).get_experiment_by_name("lab").experiment_id])
    p, m = run.data.params, run.data.metrics
    assert (p["budget.steps"], p["budget.tokens"], p["budget.params"]) == ("20", "5120", str(MICRO_N))
    assert m["train/tokens_seen"] == 5120 and p["train.max_steps"] == "12"  # the request's steps; the run's are the budget's
    rows = int(p["data.n_train_rows"])
    assert p["data.epochs"] == f"{20 * 4 / rows:.3g}"
    assert f"this run repeats its corpus {20 * 4 / rows:.3g} times (20 steps over {rows} train rows of 64 tokens), " \
           "more than data.max_epochs=0.001" in proc.stdout + proc.stderr


def test_epochs_count_the_global_batch(compose_cfg, caplog):
    from lab.budget import check_epochs

    cfg = to_run_config(compose_cfg("train.max_steps=100", "hardware.micro_batch=4", "hardware.grad_accum=2"))
    with caplog.at_level(logging.WARNING, logger="lab.budget"):
        assert check_epochs(cfg, rows=800, world_size=1) == 1.0 and not caplog.records
        assert check_epochs(cfg, rows=80, world_size=2) == 20.0
    assert "repeats its corpus 20 times" in caplog.records[0].getMessage()
