"""The one training loop, shared by every stage.

A stage hands the engine a model, an objective `loss(model, batch) -> (loss, metrics)` and packed
rows; the engine knows nothing about which stage it runs. Its own state (step, tokens seen, data
position, RNG) is checkpointed like the weights, so a resumed run replays exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import torch
from tqdm.auto import tqdm

from lab import checkpoint as ckpt
from lab.config import TrainConfig
from lab.data import PackedData
from lab.errors import TrainingDiverged
from lab.runner import Run

log = logging.getLogger(__name__)

Objective = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


@dataclass
class FitResult:
    step: int
    val_loss: float
    tokens_seen: int
    checkpoint: Optional[Path]
    stopped_early: bool  # train.stop_at_step was reached before train.max_steps


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine, linear or constant down to `min_lr_ratio` at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch: the size of its first tensor (the inputs)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.numel()


def log_dataset(run: Run, data: Any) -> None:
    """The run's data as MLflow dataset inputs: the cache's content hash as the digest, one input per split."""
    meta = data.meta
    source = {"cache": str(Path(data.directory).resolve()), "sources": [{"kind": s["kind"], "path": s["path"]} for s in meta["sources"]]}
    profiles = {context: {"rows": meta[f"n_{split}_rows"], "seq_len": meta["seq_len"],
                          "tokenizer_sha256": meta["tokenizer_sha256"]}
                for context, split in (("train", "train"), ("validation", "val"))}
    run.tracker.log_dataset(run.cfg.data.name, meta["key"], source, profiles)


class Trainer:
    """Fits one model with one objective. Only rank 0 logs and saves."""

    def __init__(
        self,
        run: Run,
        model: torch.nn.Module,
        objective: Objective,
        data: PackedData,
        on_eval: Optional[Callable[[torch.nn.Module, int], None]] = None,
        adapter: Any = None,
        perplexity: bool = True,
    ):
        """`adapter` (from lab.adapters.apply_adapter) may merge itself into the base every few
        steps (`after_step`) and reshape the schedule (`lr_factor`, ReLoRA's jagged re-warmups).
        `perplexity`: log val/ppl = exp(val/loss); only meaningful when the loss is per-token cross-entropy."""
        cfg, acc = run.cfg, run.accelerator
        self.run, self.cfg, self.acc = run, cfg, acc
        self.objective, self.data, self.on_eval, self.adapter = objective, data, on_eval, adapter
        self.perplexity = perplexity
        self.raw_model = model.to(acc.device)
        self.raw_model.gradient_checkpointing = cfg.hardware.grad_checkpointing
        optimizer = build_optimizer(self.raw_model, cfg.train)
        jagged = adapter.lr_factor if adapter is not None else (lambda s: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train) * jagged(s))
        compiled = torch.compile(self.raw_model) if cfg.hardware.compile else self.raw_model
        # The scheduler is stepped by hand: accelerate would step it once per process.
        self.model, self.optimizer = acc.prepare(compiled, optimizer)
        self.stream = data.stream(cfg.hardware.micro_batch, seed=cfg.train.seed,
                                  rank=acc.process_index, world_size=acc.num_processes)
        self.state = TrainState()
        self.steps_here = 0  # steps taken by this process (a resumed run starts above 0)
        self.bar: Optional[tqdm] = None
        if run.resume_from is not None:  # before the stage logs anything: a wrong tokenizer stops here
            self.restore(run.resume_from)
        else:
            log_dataset(run, data)

    # ---- one step -------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Forward and backward over `grad_accum` micro-batches, clip, and one optimizer step."""
        accum = self.cfg.hardware.grad_accum
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(accum):
            batch = to_device(self.stream.next_batch(), self.acc.device)
            tokens += batch_tokens(batch)
            last = micro == accum - 1
            # autocast wraps the prepared model's forward only: losses are computed in fp32
            with nullcontext() if last else self.acc.no_sync(self.model):
                loss, metrics = self.objective(self.model, batch)
            self.acc.backward(loss / accum)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = self._mean_over_ranks(sums | {"grad_norm": grad_norm})
        self.state.tokens_seen += tokens * self.acc.num_processes
        return {f"train/{k}": v for k, v in values.items()} | {"train/lr": self.scheduler.get_last_lr()[0]}

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        return torch.as_tensor(self.acc.clip_grad_norm_(params, max_norm)).detach().float()

    def _mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], device=self.acc.device).float() for k in keys])
        if self.acc.num_processes > 1:
            stacked = self.acc.reduce(stacked, reduction="mean")
        return dict(zip(keys, stacked.tolist()))

    def step_and_log(self) -> dict[str, float]:
        """One step, its checks, and its metrics: the engine's whole per-step path."""
        t0, seen = time.perf_counter(), self.state.tokens_seen
        metrics = self.train_step()
        self.state.step += 1
        step = self.state.step
        if self.adapter is not None and self.adapter.after_step(step, getattr(self.optimizer, "optimizer", self.optimizer)):
            metrics["train/adapter_merges"] = step // self.cfg.adapter.merge_every
        if not math.isfinite(metrics["train/loss"]):
            self._diverged(metrics["train/loss"])
        # the tokens this step counted: DPO batches are narrower than data.seq_len
        metrics["train/tokens_per_sec"] = (self.state.tokens_seen - seen) / (time.perf_counter() - t0)
        metrics["train/tokens_seen"] = self.state.tokens_seen
        self.steps_here += 1
        if self.steps_here == 1:  # the first step this process took
            metrics |= self._startup_times()
        self.run.tracker.log_metrics(metrics, step)
        if step % self.cfg.tracking.flush_every == 0:
            self.run.tracker.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_sec']:,.0f}")
        return metrics

    def _startup_times(self) -> dict[str, float]:
        """Seconds from the job's start, and from the process's start, to the end of the first step."""
        now = time.time()
        return {"time/job_to_first_step_s": now - self.run.started_at,
                "time/process_to_first_step_s": now - psutil.Process().create_time()}

    def _diverged(self, loss: float) -> None:
        last = ckpt.latest_checkpoint(self.run.ckpt_dir)
        then = f"then resume from it with train.resume={last}" if last else "then start again (no checkpoint was saved)"
        raise TrainingDiverged(
            f"train loss is {loss} at step {self.state.step}; last good checkpoint: {last or 'none'}; "
            f"lower train.lr or raise train.warmup_steps, {then}"
        )

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Train to `train.max_steps` (or `train.stop_at_step`), evaluating and saving on schedule."""
        tc = self.cfg.train
        stop = min(tc.max_steps, tc.stop_at_step or tc.max_steps)
        self.bar = tqdm(
            total=tc.max_steps, initial=self.state.step, desc=self.cfg.stage.name, unit="step",
            disable=not (self.acc.is_main_process and tc.progress), dynamic_ncols=True,
        )
        saved: Optional[Path] = None
        val_loss = float("nan")
        try:
            while self.state.step < stop:
                self.step_and_log()
                step = self.state.step
                if tc.eval_every and step % tc.eval_every == 0 and step < stop:
                    val_loss = self.evaluate()
                if tc.save_every and step % tc.save_every == 0 and step < stop:
                    saved = self.save()
        finally:
            self.bar.close()
        if self.state.step < tc.max_steps:
            log.info("stopped at step %d of %d <train.stop_at_step=%s>", self.state.step, tc.max_steps, tc.stop_at_step)
        else:
            val_loss = self.evaluate()
        saved = self.save()
        self.run.tracker.flush()
        return FitResult(self.state.step, val_loss, self.state.tokens_seen, saved, self.state.step < tc.max_steps)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean objective over the fixed validation batches; logs val/loss (and val/ppl), val/<metric>."""
        self.model.eval()
        hw, acc = self.cfg.hardware, self.acc
        sums: dict[str, torch.Tensor] = {}
        batches = list(self.data.val_batches(hw.micro_batch, self.cfg.train.eval_batches, acc.process_index, acc.num_processes))
        for batch in batches:
            loss, metrics = self.objective(self.model, to_device(batch, acc.device))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / len(batches)
        values = {f"val/{k}": v for k, v in self._mean_over_ranks(sums).items()}
        if self.perplexity:
            values["val/ppl"] = math.exp(min(values["val/loss"], 50.0))
        self.run.tracker.log_metrics(values, self.state.step)
        if self.on_eval is not None and acc.is_main_process:
            self.on_eval(self.raw_model, self.state.step)
        return values["val/loss"]

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        """All ranks write their RNG state; rank 0 writes the rest and renames the folder into place.

        Metrics are flushed first: once a checkpoint exists, every step up to it is in MLflow, so a
        run killed after it and resumed from it leaves no hole in its curves.
        """
        acc, step, run_dir = self.acc, self.state.step, self.run.ckpt_dir
        self.run.tracker.flush()
        if acc.is_main_process:
            ckpt.tmp_dir(run_dir, step).mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        try:
            self._write(step, run_dir)
        except BaseException:  # Ctrl-C or a full disk mid-write: leave no half checkpoint behind
            shutil.rmtree(ckpt.tmp_dir(run_dir, step), ignore_errors=True)
            raise
        return ckpt.step_dir(run_dir, step)

    def _write(self, step: int, run_dir: Path) -> None:
        acc = self.acc
        ckpt.write_rank_rng(run_dir, step, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            trainer_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "state": dataclasses.asdict(self.state),
                "stream": self.stream.state_dict(),
            }
            meta = self.run.checkpoint_meta() | {"tokenizer_sha256": self.data.tokenizer.sha256}
            ckpt.write_checkpoint(run_dir, step, self.raw_model, trainer_state, meta, self.data.tokenizer, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()

    def restore(self, path: Path) -> None:
        """Load weights, optimizer, scheduler, data position and RNG: the run continues bit for bit."""
        from lab.tokenizers import check_tokenizer

        meta = ckpt.read_meta(path)
        check_tokenizer(meta["tokenizer_sha256"], self.data.tokenizer, where=f"checkpoint {path}")
        ckpt.load_weights(self.raw_model, path)
        state, rng = ckpt.load_trainer_state(path, self.acc.process_index)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.acc.scaler is not None and state["scaler"] is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["state"])
        self.stream.load_state_dict(state["stream"])
        ckpt.set_rng_state(rng)
        log.info("resumed from %s at step %d <train.resume=%s>", path, self.state.step, self.cfg.train.resume)
