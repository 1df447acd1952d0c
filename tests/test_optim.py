"""The optimizer group: each kind trains, resumes bit for bit, and states what its state costs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from accelerate import Accelerator

from lab.config import OPTIMIZER_KINDS, AdapterConfig, HardwareConfig, OptimizerConfig, TrainConfig
from lab.adapters import apply_adapter
from lab.data.stream import BatchStream, val_batches
from lab.engine import EvalSet, Parts, Task, Trainer
from lab.errors import ConfigError
from lab.models import build_model
from lab.objectives import lm_loss
from lab.optim import Combined, build_optimizer, hidden_matrices, state_bytes
from lab.config import to_run_config
from labtest import micro
from test_engine_tasks import Recorder, Tokenizer

T, V = 8, 50
LR = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.1, "adafactor": 0.5, "muon": 1e-2}


class Counting:
    """Rows that count up mod V from a random start: a pattern micro learns in a few dozen steps."""

    def __init__(self, seed: int, n: int = 64):
        starts = np.random.default_rng(seed).integers(0, V, size=(n, 1))
        self.rows = (starts + np.arange(T + 1)) % V

    def stream(self, micro_batch, seed, rank=0, world_size=1):
        return BatchStream(self.rows, micro_batch, seed, rank, world_size)

    def val_batches(self, micro_batch, max_batches=None, rank=0, world_size=1):
        return val_batches(self.rows[:8], micro_batch, max_batches, rank, world_size)


def trainer(tmp_path: Path, kind: str, max_steps: int, resume=None, stop=None) -> tuple[Trainer, Recorder]:
    torch.manual_seed(0)
    model = build_model(micro(max_seq_len=T), V)
    train = TrainConfig(max_steps=max_steps, lr=LR[kind], warmup_steps=2, eval_every=0, eval_batches=1,
                        progress=False, stop_at_step=stop)
    opt = OptimizerConfig(name=kind, kind=kind, momentum=0.95 if kind == "muon" else 0.9, nesterov=kind == "muon")
    recorder = Recorder()
    parts = Parts(train, HardwareConfig(micro_batch=4, precision="fp32"), Accelerator(cpu=True), recorder,
                  tmp_path / "ckpt", optimizer=opt, resume_from=resume)
    data = Counting(1)
    return Trainer(parts, model, [Task("", data.stream, lm_loss)], {"": EvalSet(data.val_batches, lm_loss)},
                   Tokenizer()), recorder


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
def test_each_optimizer_trains_and_resumes_bit_for_bit(tmp_path, kind):
    whole, rec = trainer(tmp_path / "whole", kind, max_steps=30)
    whole.fit()
    losses = [rec.logged[s]["train/loss"] for s in range(1, 31)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses  # the pattern is being learnt
    first, _ = trainer(tmp_path / "parts", kind, max_steps=30, stop=17)
    saved = first.fit().checkpoint
    resumed, rec2 = trainer(tmp_path / "parts", kind, max_steps=30, resume=saved)
    resumed.fit()
    assert [rec2.logged[s]["train/loss"] for s in range(18, 31)] == losses[17:]
    for (name, a), b in zip(whole.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(a, b), name


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = build_model(micro(tie_embeddings=False), V)
    opt = build_optimizer(model, OptimizerConfig(kind="muon", momentum=0.95, nesterov=True), TrainConfig())
    assert isinstance(opt, Combined) and set(opt.parts) == {"muon", "adamw"}
    muon = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if p.dim() == 2 and "layers." in n}  # q k v o gate up down
    assert {id(p) for p in hidden_matrices(model)} == muon
    # a scheduler's lr reaches both parts, and the state dict keeps each part's own
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert {g["lr"] for o in opt.parts.values() for g in o.param_groups} == {TrainConfig().lr * 0.5}
    assert set(opt.state_dict()) == {"muon", "adamw"} and sched.get_last_lr()[0] == TrainConfig().lr * 0.5


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_state_bytes_is_what_the_optimizer_holds_after_a_step(kind, adapter):
    torch.manual_seed(0)
    model = build_model(micro(), V)
    apply_adapter(model, AdapterConfig(name=adapter, kind=adapter))
    cfg = OptimizerConfig(kind=kind, nesterov=kind == "muon")
    opt = build_optimizer(model, cfg, TrainConfig())
    model(torch.randint(0, V, (2, T))).sum().backward()
    opt.step()
    held = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_bytes(model, cfg) == held > 0


def test_unknown_optimizer_kind_and_options_fail_naming_them(compose_cfg):
    with pytest.raises(ConfigError, match=r"optimizer.kind='lion' is unknown; use one of adamw, adam, sgd, adafactor, muon"):
        to_run_config(compose_cfg("optimizer.kind=lion"))
    with pytest.raises(Exception, match="optimizer.momentun"):
        compose_cfg("optimizer.momentun=0.9")
    with pytest.raises(ConfigError, match=r"optimizer.betas=\[0.9\] must be two numbers"):
        to_run_config(compose_cfg("optimizer.betas=[0.9]"))


def test_adam_couples_its_weight_decay_into_the_moments_and_adamw_does_not():
    """One step from zero moments: Adam's L2 term joins the gradient (so the normalised step is
    sign-like in g + wd*w), AdamW's decay shrinks w apart from it."""
    w0, g, lr, wd = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]]), 0.1, 0.5
    steps = {}
    for kind in ("adam", "adamw"):
        layer = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w0)
        opt = build_optimizer(layer, OptimizerConfig(kind=kind, fused=False), TrainConfig(lr=lr, weight_decay=wd))
        layer.weight.grad = g.clone()
        opt.step()
        steps[kind] = layer.weight.detach() - w0
    # Adam: the effective gradient is wd * w, so the first step is -lr * sign(w) (bias-corrected m / sqrt(v))
    assert torch.allclose(steps["adam"], -lr * torch.sign(w0), atol=1e-6)
    # AdamW: a zero gradient moves nothing but the decay, -lr * wd * w
    assert torch.allclose(steps["adamw"], -lr * wd * w0, atol=1e-7)
