"""The one training loop, shared by every stage.

A stage hands the engine a model, named training tasks (a stream of batches, the objective
`loss(model, batch) -> (loss, metrics)` that scores them, and a sampling weight) and named
evaluation sets; the engine knows nothing about which stage it runs. Its own state (step, tokens
seen, each stream's position, the task sampler's RNG, the gradient filter, the watchers) is
checkpointed like the weights, so a resumed run replays exactly.

Metric names: with one task and one evaluation set (both named ""), `train/loss`, `val/loss`,
`val/<metric>`. With several, each also logs under its own name (`train/lm/loss`,
`val/coherence/acc`), and `val/loss` is their weighted mean.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import psutil
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from lab import checkpoint as ckpt
from lab import fsdp, signals
from lab.config import HardwareConfig, OptimizerConfig, TrainConfig
from lab.data.batch import Batch
from lab.config_stages import GenerateConfig, HarnessConfig
from lab.data.mixture import TaskMixture
from lab.downstream import DownstreamScores
from lab.errors import CheckpointError, TrainingDiverged
from lab.grokfast import GradFilter
from lab.grokking import GrokkingDetector
from lab.hardware import AutocastForward, autocast_dtype
from lab.optim import build_optimizer
from lab.stopping import Plateau, stopping_callbacks
from lab.tracking import Tracker

log = logging.getLogger(__name__)

Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Parts:
    """What the engine uses of a run: its configs, device, tracker, and where checkpoints go."""

    train: TrainConfig
    hardware: HardwareConfig
    accelerator: Accelerator
    tracker: Tracker
    ckpt_dir: Path  # this run's checkpoints
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    meta: dict[str, Any] = field(default_factory=dict)  # written into every checkpoint's meta.json
    resume_from: Optional[Path] = None
    flush_every: int = 50  # steps between metric batches sent to the tracker
    started_at: float = field(default_factory=time.time)  # when the job began (for train/job_to_first_step_s)
    label: str = "train"  # the progress bar's name
    generate: GenerateConfig = field(default_factory=GenerateConfig)  # how train.eval_references are generated
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # how train.eval_harness tasks are run


@dataclass
class Task:
    """A named stream of training batches, the objective that scores them, and their share of micro-batches.

    `stream(micro_batch, seed=, rank=, world_size=)` makes the stream (e.g. `PackedData.stream`): an
    object with `next_batch() -> Batch`, `state_dict()` and `load_state_dict(state)`.
    """

    name: str
    stream: Callable[..., Any]
    objective: Objective
    weight: float = 1.0


@dataclass
class EvalSet:
    """Fixed evaluation batches and their objective. `batches(micro_batch, max_batches, rank, world_size)`
    yields them (e.g. `PackedData.val_batches`). `weight` counts in the combined val/loss."""

    batches: Callable[..., Iterable[Batch]]
    objective: Objective
    weight: float = 1.0
    perplexity: bool = True  # also log ppl = exp(loss): only meaningful for per-token cross-entropy
    # metrics over the whole set at once (AUC, retrieval), instead of the mean of per-batch objectives
    whole_set: Optional[Callable[[torch.nn.Module, Iterable[Batch]], dict[str, torch.Tensor]]] = None


class Callback(Protocol):
    """Something that watches evaluations (samples, the grokking detector, progress measures).

    `after_eval` may return more metrics to log at this step, and may call `trainer.save(event=...)`.
    An optional `after_log(trainer, metrics)` sees each logged step's train metrics (and may add to
    them). A callback with `state_dict()` / `load_state_dict(state)` is checkpointed with the run.
    """

    def after_eval(self, trainer: "Trainer", values: dict[str, float]) -> Optional[dict[str, float]]: ...


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
    stopped_early: bool  # paused by train.stop_at_step before train.max_steps (a run ended by train.stop is finished)
    stop_reason: Optional[str] = None  # why train.stop ended the run before train.max_steps


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine, linear or constant down to `min_lr_ratio` at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all parameters together (a progress measure of grokking: weight decay shrinks it).
    Of a sharded model, on every rank (collective)."""
    with torch.no_grad():
        return math.sqrt(sum(float(fsdp.full_tensor(p.detach()).float().pow(2).sum()) for p in model.parameters()))


def prefixed(split: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
    """`train/loss` for the unnamed task or set, `train/<name>/loss` for a named one."""
    head = f"{split}/{name}/" if name else f"{split}/"
    return {head + k: v for k, v in values.items()}


class _Lines:
    """A stream for tqdm that is not a terminal (a log file, a pipe): each update its own line, never
    carriage returns that pile every update into one endless line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, initial: int, desc: str, disable: bool) -> tqdm:
    """The live bar on a terminal; elsewhere a line every 30 s."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable, dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable, file=_Lines(sys.stderr),
                mininterval=30, ncols=100)


class Trainer:
    """Fits one model on one or more tasks. Only rank 0 logs and saves."""

    def __init__(self, parts: Parts, model: torch.nn.Module, tasks: list[Task], evals: dict[str, EvalSet],
                 tokenizer: Any, adapter: Any = None, callbacks: Iterable[Callback] = ()):
        """`adapter` (from lab.adapters.apply_adapter) may merge itself into the base every few
        steps (`after_step`) and reshape the schedule (`lr_factor`, ReLoRA's jagged re-warmups)."""
        if len({t.name for t in tasks}) != len(tasks) or not tasks or not evals:
            raise ValueError(f"need at least one task and one eval set, tasks uniquely named; got {[t.name for t in tasks]}")
        self.parts, self.cfg, self.acc, self.tracker = parts, parts.train, parts.accelerator, parts.tracker
        self.tasks, self.evals, self.tokenizer = {t.name: t for t in tasks}, evals, tokenizer
        self.adapter, self.callbacks = adapter, list(callbacks)
        if self.cfg.eval_choices or self.cfg.eval_references or self.cfg.eval_harness:  # downstream scores beside
            self.callbacks.append(DownstreamScores(self.cfg, tokenizer, parts.meta.get("template"), parts.generate,
                                                   parts.harness))  # val/loss, which train.stop can watch
        if self.cfg.grokking.enabled:  # any stage can watch for grokking
            self.callbacks.append(GrokkingDetector(self.cfg.grokking))
        self.callbacks += stopping_callbacks(self.cfg.stop)
        self.stop_reason: Optional[str] = None  # set by a callback (lab.stopping): the run ends after this step
        self.raw_model = model.to(self.acc.device)
        self.raw_model.gradient_checkpointing = parts.hardware.grad_checkpointing
        self.sharded = parts.hardware.fsdp
        if self.sharded:  # before the optimizer: it holds the shards
            fsdp.shard(self.raw_model)
        optimizer = build_optimizer(self.raw_model, parts.optimizer, self.cfg)
        jagged = adapter.lr_factor if adapter is not None else (lambda s: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.cfg) * jagged(s) * self._stop_lr_scale())
        # One process compiles each task's whole objective (forward and loss), so the fp32 log-softmax
        # over the batch's logits fuses with the head; under DDP dynamo compiles the model alone.
        compile_model = parts.hardware.compile and self.acc.num_processes > 1
        if self.sharded:  # accelerate would wrap it in DDP: lab does what its prepare does for a model
            self.model, self.optimizer = AutocastForward(self.raw_model, self.acc.device.type,
                                                         autocast_dtype(self.acc.mixed_precision)), optimizer
        else:  # the scheduler is stepped by hand: accelerate would step it once per process
            self.model, self.optimizer = self.acc.prepare(
                torch.compile(self.raw_model) if compile_model else self.raw_model, optimizer)
        if parts.hardware.compile and not compile_model:
            self.tasks = {t.name: dataclasses.replace(t, objective=torch.compile(t.objective)) for t in tasks}
        self.streams = {t.name: t.stream(parts.hardware.micro_batch, seed=self.cfg.seed + i, rank=self.acc.process_index,
                                         world_size=self.acc.num_processes) for i, t in enumerate(tasks)}
        self.mixture = TaskMixture([t.name for t in tasks], [t.weight for t in tasks], seed=self.cfg.seed)
        self.grad_filter = GradFilter(self.cfg.grokfast) if self.cfg.grokfast.kind != "none" else None
        self.state = TrainState()
        self.bar: Optional[tqdm] = None
        self._since_log = {"seconds": 0.0, "tokens": 0, "merges": False}  # train time and tokens since the last log
        self._saved: Optional[tuple[int, Path]] = None  # the checkpoint this process wrote last
        self._startup_logged = False
        if parts.resume_from is not None:
            self.restore(parts.resume_from)

    def _stop_lr_scale(self) -> float:
        """train.stop's learning-rate drops so far (a callback's state, so a resumed run keeps them)."""
        return math.prod(cb.lr_scale for cb in self.callbacks if isinstance(cb, Plateau))

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate from the next step on; the schedule follows through `_stop_lr_scale`."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor

    # ---- one step -------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """Forward and backward over `grad_accum` micro-batches (each from the task the mixture draws),
        clip, filter, and one optimizer step. Returns the step's metrics, still on the device."""
        accum = self.parts.hardware.grad_accum
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: torch.Tensor) -> None:
            sums[key] = sums.get(key, 0.0) + value.detach().float()
            counts[key] = counts.get(key, 0) + 1

        for micro in range(accum):
            name = self.mixture.next()
            batch = self.streams[name].next_batch().to(self.acc.device)
            self.state.tokens_seen += batch.tokens * self.acc.num_processes
            self._since_log["tokens"] += batch.tokens * self.acc.num_processes
            # autocast wraps the prepared model's forward only: losses are computed in fp32
            if self.sharded:
                fsdp.gradient_sync(self.raw_model, micro == accum - 1)
            with nullcontext() if micro == accum - 1 or self.sharded else self.acc.no_sync(self.model):
                loss, metrics = self.tasks[name].objective(self.model, batch)
            self.acc.backward(loss / accum)
            for k, v in {"loss": loss, **metrics}.items():
                add(f"{name}/{k}" if name else k, v)  # a task's metrics: means over its own micro-batches
            if name:
                add("loss", loss)  # the step's loss is over all its micro-batches
        means = {k: v / counts[k] for k, v in sums.items()}
        grad_norm = self._clip()
        if self.grad_filter is not None:  # after clipping: the raw gradient is bounded, then its slow part added
            self.grad_filter.apply(self.raw_model.named_parameters(), finite=torch.isfinite(grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return means | {"grad_norm": grad_norm}

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if self.sharded else self.acc.clip_grad_norm_(params, max_norm)
        return torch.as_tensor(fsdp.full_tensor(norm)).detach().float()

    def _mean_over_ranks(self, values: dict[str, Any]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], device=self.acc.device).float() for k in keys])
        if self.acc.num_processes > 1:
            stacked = self.acc.reduce(stacked, reduction="mean")
        return dict(zip(keys, stacked.tolist()))

    def step_and_log(self) -> dict[str, float]:
        """One step, and at every `train.log_every`-th its checks and metrics: the engine's per-step path.
        Returns the metrics logged ({} on a step that logs nothing)."""
        t0 = time.perf_counter()
        values = self.train_step()
        self.state.step += 1
        step = self.state.step
        if self.adapter is not None and self.adapter.after_step(step, getattr(self.optimizer, "optimizer", self.optimizer)):
            self._since_log["merges"] = True
        self._since_log["seconds"] += time.perf_counter() - t0
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return {}  # no host sync on this step
        metrics = prefixed("train", "", self._mean_over_ranks(values)) | {"train/lr": self.scheduler.get_last_lr()[0]}
        if not math.isfinite(metrics["train/loss"]):
            self._diverged(metrics["train/loss"])
        if self._since_log["merges"]:
            metrics["train/adapter_merges"] = self.adapter.merges_at(step)
        # the tokens these steps counted: DPO batches are narrower than data.seq_len
        metrics["train/tokens_per_sec"] = self._since_log["tokens"] / self._since_log["seconds"]
        metrics["train/tokens_seen"] = self.state.tokens_seen
        self._since_log = {"seconds": 0.0, "tokens": 0, "merges": False}
        if not self._startup_logged:  # the first step this process logs carries its start-up times
            metrics |= self._startup_times()
            self._startup_logged = True
        for cb in self.callbacks:
            if hasattr(cb, "after_log"):
                cb.after_log(self, metrics)
        self.tracker.log_metrics(metrics, step)
        if step % self.parts.flush_every == 0:
            self.tracker.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_sec']:,.0f}",
                                 refresh=False)  # the bar redraws on its own schedule (mininterval)
        return metrics

    def _startup_times(self) -> dict[str, float]:
        """Seconds from the job's start, and from the process's start, to the end of the first logged step."""
        now = time.time()
        return {"train/job_to_first_step_s": now - self.parts.started_at,
                "train/process_to_first_step_s": now - psutil.Process().create_time()}

    def _diverged(self, loss: float) -> None:
        last = ckpt.latest_checkpoint(self.parts.ckpt_dir)
        then = f"then resume from it with train.resume={last}" if last else "then start again (no checkpoint was saved)"
        raise TrainingDiverged(
            f"train loss is {loss} at step {self.state.step}; last good checkpoint: {last or 'none'}; "
            f"lower train.lr or raise train.warmup_steps, {then}"
        )

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Train to `train.max_steps` (or `train.stop_at_step`), evaluating and saving on schedule."""
        tc = self.cfg
        stop = min(tc.max_steps, tc.stop_at_step or tc.max_steps)
        self.bar = progress_bar(total=tc.max_steps, initial=self.state.step, desc=self.parts.label,
                                disable=not (self.acc.is_main_process and tc.progress))
        val_loss, evaluated = float("nan"), None
        try:
            while self.state.step < stop and self.stop_reason is None:
                signals.raise_if_interrupted()  # a Ctrl-C that landed in a finalizer and was swallowed there
                self.step_and_log()
                step = self.state.step
                if tc.eval_every and step % tc.eval_every == 0 and step < stop:
                    val_loss, evaluated = self.evaluate(), step
                if tc.save_every and step % tc.save_every == 0 and step < stop and self.stop_reason is None:
                    self.save()
        finally:
            self.bar.close()
        paused = self.state.step < tc.max_steps and self.stop_reason is None
        if paused:
            log.info("stopped at step %d of %d <train.stop_at_step=%s>", self.state.step, tc.max_steps, tc.stop_at_step)
        elif evaluated != self.state.step:  # the last step's evaluation, unless it just ran
            val_loss = self.evaluate()
        if self.stop_reason is not None:
            log.info("ended at step %d of %d: %s", self.state.step, tc.max_steps, self.stop_reason)
            self.tracker.set_tags({"lab.stop_reason": self.stop_reason})
        saved = self.save()
        self.tracker.flush()
        return FitResult(self.state.step, val_loss, self.state.tokens_seen, saved, paused, self.stop_reason)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Every evaluation set's mean objective, the weight norm, then the callbacks; returns val/loss."""
        self.model.eval()
        values: dict[str, float] = {}
        losses: dict[str, float] = {}
        for name, ev in self.evals.items():
            means = self._evaluate_set(ev)
            if ev.perplexity:
                means["ppl"] = math.exp(min(means["loss"], 50.0))
            values |= prefixed("val", name, means)
            losses[name] = means["loss"]
        if "" not in self.evals:  # named sets only: val/loss is their weighted mean
            total = sum(self.evals[n].weight for n in losses)
            values["val/loss"] = sum(self.evals[n].weight * loss for n, loss in losses.items()) / total
        values["train/weight_norm"] = weight_norm(self.raw_model)
        # logged before any callback runs: a checkpoint a callback saves has this evaluation in MLflow
        self.tracker.log_metrics(values, self.state.step)
        for cb in self.callbacks:
            more = cb.after_eval(self, values)
            if more:
                self.tracker.log_metrics(more, self.state.step)
                values |= more
        return values["val/loss"]

    def _evaluate_set(self, ev: EvalSet) -> dict[str, float]:
        hw, acc = self.parts.hardware, self.acc
        sums: dict[str, torch.Tensor] = {}
        batches = list(ev.batches(hw.micro_batch, self.cfg.eval_batches, acc.process_index, acc.num_processes))
        if ev.whole_set is not None:
            return self._mean_over_ranks(ev.whole_set(self.model, (b.to(acc.device) for b in batches)))
        rows = sum(b.size for b in batches)
        for batch in batches:  # each batch weighs by its rows: a last, partial batch counts for what it holds
            loss, metrics = ev.objective(self.model, batch.to(acc.device))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * (batch.size / rows)
        return self._mean_over_ranks(sums)

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, event: Optional[str] = None) -> Path:
        """All ranks write their RNG state; rank 0 writes the rest and renames the folder into place.

        Metrics are flushed first: once a checkpoint exists, every step up to it is in MLflow, so a
        run killed after it and resumed from it leaves no hole in its curves. `event` (e.g.
        "grokking") marks a checkpoint that `train.keep_checkpoints` never prunes.
        """
        acc, step, run_dir = self.acc, self.state.step, self.parts.ckpt_dir
        if self._saved is not None and self._saved[0] == step and event is None:
            return self._saved[1]  # already written at this step (an event checkpoint, say)
        self.tracker.flush()
        if acc.is_main_process:
            ckpt.tmp_dir(run_dir, step).mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        try:
            self._write(step, run_dir, event)
        except BaseException:  # Ctrl-C or a full disk mid-write: leave no half checkpoint behind
            shutil.rmtree(ckpt.tmp_dir(run_dir, step), ignore_errors=True)
            raise
        self._saved = (step, ckpt.step_dir(run_dir, step))
        return self._saved[1]

    def _write(self, step: int, run_dir: Path, event: Optional[str]) -> None:
        acc = self.acc
        ckpt.write_rank_rng(run_dir, step, acc.process_index)
        weights = None if self.sharded else self._checkpointed()
        if self.sharded:  # each rank its optimizer shard; the weights gathered for rank 0 to write whole
            fsdp.save_optimizer_shard(self.optimizer, ckpt.tmp_dir(run_dir, step), acc.process_index)
            weights = fsdp.full_weights(self.raw_model)
        acc.wait_for_everyone()
        if acc.is_main_process:
            trainer_state = {
                "optimizer": None if self.sharded else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "state": dataclasses.asdict(self.state),
                "streams": {name: s.state_dict() for name, s in self.streams.items()},
                "mixture": self.mixture.state_dict(),
                "grad_filter": self.grad_filter.state_dict() if self.grad_filter is not None else None,
                "callbacks": {str(i): cb.state_dict() for i, cb in enumerate(self.callbacks) if hasattr(cb, "state_dict")},
            }
            meta = self.parts.meta | {"tokenizer_sha256": self.tokenizer.sha256} | ({"event": event} if event else {})
            ckpt.write_checkpoint(run_dir, step, self.raw_model, trainer_state, meta, self.tokenizer, self.cfg.keep_checkpoints,
                                  weights=weights)
        acc.wait_for_everyone()

    def _checkpointed(self) -> dict[str, torch.Tensor]:
        """The model's tensors a checkpoint holds: its weights, or what an adapter run stores of them."""
        return self.adapter.checkpoint_weights() if self.adapter is not None else ckpt.weights_of(self.raw_model)

    def restore(self, path: Path) -> None:
        """Load weights, optimizer, scheduler, data positions, task draws, filter, watchers and RNG:
        the run continues bit for bit."""
        from lab.tokenizers import check_tokenizer

        meta = ckpt.read_meta(path)
        check_tokenizer(meta["tokenizer_sha256"], self.tokenizer, where=f"checkpoint {path}")
        if self.sharded:
            fsdp.load_full_weights(self.raw_model, path)
        else:
            ckpt.load_weights(self.raw_model, path, self._checkpointed())
        state, rng = ckpt.load_trainer_state(path, self.acc.process_index)
        if self.sharded:
            fsdp.load_optimizer_shard(self.optimizer, path, self.acc.process_index)
        elif state["optimizer"] is None:
            raise CheckpointError(f"checkpoint {path} was written by a sharded run (hardware.fsdp=true); resume it with that")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.acc.scaler is not None and state["scaler"] is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["state"])
        streams = state.get("streams") or {next(iter(self.streams)): state["stream"]}  # one stream before tasks
        if set(streams) != set(self.streams):
            raise CheckpointError(f"checkpoint {path} has the tasks {sorted(streams)}, this run {sorted(self.streams)}; "
                                       "resume with the same tasks, or start without resuming")
        for name, saved in streams.items():
            self.streams[name].load_state_dict(saved)
        if "mixture" in state:
            self.mixture.load_state_dict(state["mixture"])
        if self.grad_filter is not None and state.get("grad_filter"):
            self.grad_filter.load_state_dict(state["grad_filter"], self.acc.device)
        for i, cb in enumerate(self.callbacks):
            if hasattr(cb, "load_state_dict") and str(i) in state.get("callbacks", {}):
                cb.load_state_dict(state["callbacks"][str(i)])
        ckpt.set_rng_state(rng)
        log.info("resumed from %s at step %d <train.resume=%s>", path, self.state.step, self.cfg.resume)
