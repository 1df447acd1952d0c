"""hardware.fsdp=true: FSDP2 over two CPU processes (gloo), checkpointed in shards and resumed."""
from __future__ import annotations

import pytest

from lab.checkpoint import read_model_config, weights_of
from lab.config import ModelConfig, to_run_config
from lab.errors import ConfigError
from lab.files import load_safetensors, load_torch
from lab.models import build_model
from labtest import FAST, all_runs, loss_history

TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lab")
COMMON = [*FAST, "train.max_steps=6", "train.eval_every=3", "hardware.grad_accum=2", "train.log_every=1"]


def test_fsdp_trains_checkpoints_in_shards_and_resumes_as_ddp_trains(lab_cli, tmp_path):
    """Stopped at step 3 and resumed, the sharded run records one MLflow run whose six losses are the
    DDP run's: sharding changes where the state lives, not what is computed."""
    ddp, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    ddp.mkdir(), sharded.mkdir()
    lab_cli(*COMMON, launcher=TORCHRUN, cwd=ddp)
    lab_cli(*COMMON, "hardware.fsdp=true", "train.stop_at_step=3", launcher=TORCHRUN, cwd=sharded)
    proc = lab_cli(*COMMON, "hardware.fsdp=true", "train.resume=auto", launcher=TORCHRUN, cwd=sharded)
    assert "torch.compile: off: hardware.fsdp runs eager <hardware.compile=auto>" in proc.stdout
    (plain,), (run,) = all_runs(ddp), all_runs(sharded)
    assert run.info.status == "FINISHED" and run.data.params["hardware.fsdp"] == "True"
    a, b = loss_history(ddp, plain.info.run_id), loss_history(sharded, run.info.run_id)
    assert sorted(b) == list(range(1, 7)) and b[6] < b[1]
    assert all(abs(a[s] - b[s]) <= 1e-5 * a[s] for s in a), (a, b)
    # the optimizer state stays in shards: each rank's file holds half the embedding's moments
    ckpt = sharded / "outputs/checkpoints" / run.info.run_id / "step_0000003"
    assert load_torch(ckpt / "trainer_state.pt", "state")["optimizer"] is None
    for rank in (0, 1):
        shard = load_torch(ckpt / f"optimizer_rank{rank}.pt", "shard")
        assert shard["state"][0]["exp_avg"].shape == (256, 64) and "exp_avg" in shard["sharded"][0]  # tok_emb: 512 x 64
    # the weights are whole, in lab's layout: the export loads into a plain model
    exported = load_safetensors(sharded / "outputs/checkpoints" / run.info.run_id / "export/model.safetensors", "export")
    config = read_model_config(ckpt)
    model = build_model(ModelConfig(**{k: v for k, v in config.items() if k != "vocab_size"}), config["vocab_size"])
    assert set(exported) == set(weights_of(model))


@pytest.mark.parametrize("override,named", [
    ("adapter=lora", "adapter=lora"), ("stage=dpo", "stage=dpo"), ("optimizer=sgd", "optimizer=sgd"),
    ("hardware.compile=true", "hardware.compile=true"), ("hardware.precision=fp16", "hardware.precision=fp16"),
])
def test_fsdp_refuses_what_it_does_not_train(compose_cfg, override, named):
    overrides = ["hardware.fsdp=true", override] + (["init_from=x"] if override == "stage=dpo" else [])
    with pytest.raises(ConfigError, match=f"hardware.fsdp=true does not train with {named}"):
        to_run_config(compose_cfg(*overrides))
