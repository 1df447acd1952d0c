"""lab's models in EleutherAI's lm-evaluation-harness (`lm-eval`, the `harness` extra): the tasks
researchers publish numbers on, scored on any `init_from`.

    lab stage=eval init_from=<run> eval.harness.tasks=[arc_easy] eval.harness.limit=100
    lab stage=eval init_from=<run> eval.harness.include=my_tasks eval.harness.tasks=[my_task]

`LabLM` is an lm-eval model: log-likelihoods of continuations (multiple choice), rolling
log-likelihoods of whole texts (perplexity tasks) and generation until a stop string, batched, with
lab's tokenizer (a `<bos>` first, as lab's models learned) and, when the model has one, its chat
template. Nothing is downloaded: the datasets library runs offline, so a task reads its data from
local files (a task YAML of the user's, `dataset_path: json` with `data_files`) or from datasets
already in the local cache, and a task whose data is not there stops the run in one line.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lab.config_stages import HarnessConfig, Sampling
from lab.data.chat import Message
from lab.data.templates import render
from lab.errors import ConfigError

if TYPE_CHECKING:
    from lab.inference import TextModel

INSTALL = "pip install 'lab[harness]' (EleutherAI's lm-eval)"


def _lm_eval():
    """lm-eval, imported offline (the datasets library reads its settings once, when first imported)."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"eval.harness.tasks needs lm-evaluation-harness: {INSTALL}") from None
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its progress lines; lab prints its table
    return lm_eval


class Tasks(NamedTuple):
    """lm-eval's index of tasks (its own and `include`'s; indexing takes seconds) and the tasks loaded."""

    manager: Any
    tasks: dict[str, Any]


def load_tasks(hc: HarnessConfig) -> Tasks:
    """lm-eval's tasks `hc.tasks` with their data, or one line naming what is unknown or missing."""
    _lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=hc.include, verbosity="ERROR")
    unknown = [t for t in hc.tasks if t not in manager.all_tasks]
    if unknown:
        where = f"its own tasks or the YAMLs in eval.harness.include={hc.include}" if hc.include else \
            "its own tasks; give your own with eval.harness.include=<folder of task YAMLs>"
        raise ConfigError(f"eval.harness.tasks: {', '.join(map(repr, unknown))} is not a task lm-eval knows ({where})")
    tasks = {}
    for name in hc.tasks:  # one at a time: a task whose data is missing is named
        try:
            tasks |= get_task_dict([name], manager)
        except Exception as e:  # noqa: BLE001 -- the datasets library's many ways of saying "not here"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"eval.harness.tasks: task {name!r} cannot load its data ({reason[:300]}); lab downloads "
                              "nothing at run time: point a task YAML at local files (eval.harness.include), or put the "
                              "dataset in the local datasets cache first") from None
    return Tasks(manager, tasks)


def evaluate(tm: "TextModel", hc: HarnessConfig, tasks: Optional[Tasks] = None) -> dict[str, Any]:
    """lm-eval's results for `tm` on `hc.tasks` (its `results` dict: per task, "acc,none" and so on);
    `tasks` from `load_tasks`, loaded here when not given. The global RNGs, which lm-eval seeds, are
    left as they were (a training run's randomness goes on undisturbed)."""
    lm_eval = _lm_eval()
    tasks = load_tasks(hc) if tasks is None else tasks
    chat = tm.template is not None if hc.chat is None else hc.chat
    if chat and tm.template is None:
        raise ConfigError("eval.harness.chat=true needs a model with a chat template (fine-tuned with stage=sft or dpo), "
                          "or generate.template=<chatml | ...>")
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        return lm_eval.simple_evaluate(model=_lab_lm()(tm, hc.batch), tasks=list(tasks.tasks.values()),
                                       num_fewshot=hc.num_fewshot, limit=hc.limit, apply_chat_template=chat,
                                       bootstrap_iters=1000, log_samples=False, task_manager=tasks.manager,
                                       verbosity="ERROR")
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """`<task>/<metric>` -> value, for every number lm-eval reports ("acc,none" -> acc; another filter
    than none joins the name: exact_match_strict-match)."""
    out = {}
    for task, scores in results["results"].items():
        for key, value in scores.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, kept = key.split(",", 1)
            out[f"{task}/{metric if kept == 'none' else f'{metric}_{kept}'}"] = float(value)
    return out


@functools.cache  # the class once, not once per evaluation
def _lab_lm():
    """The LM class, defined against lm-eval's TemplateLM (lm-eval is an optional extra)."""
    from lm_eval.api.model import TemplateLM

    class LabLM(TemplateLM):
        """A TextModel as lm-eval's model."""

        def __init__(self, tm: "TextModel", batch: int):
            super().__init__()
            self.tm, self.batch = tm, batch
            self._device = tm.model.tok_emb.weight.device

        @property
        def device(self) -> torch.device:
            return self._device

        @property
        def eot_token_id(self) -> int:
            return self.tm.tokenizer.eos_id

        @property
        def prefix_token_id(self) -> int:  # lab's models learned every text after <bos>
            return self.tm.tokenizer.bos_id

        @property
        def tokenizer_name(self) -> str:
            return f"lab-{self.tm.name}"

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            return self.tm.tokenizer.encode(string)

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            messages = [Message(m["role"], m["content"]) for m in chat_history]
            return "".join(text for text, _ in render(messages, self.tm.template, add_generation_prompt))

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=True)  # lab prints the table, not a bar per request type

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
            bos, context = self.prefix_token_id, self.tm.context
            rows = []
            for _, ctx, cont in requests:
                ids = ((ctx if ctx[:1] == [bos] else [bos, *ctx]) + cont)[-context - 1:]  # the oldest tokens go, as
                rows.append((ids, min(len(cont), len(ids) - 1)))  # lm-eval's HF model drops them from a long request
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch together
            out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
            for start in range(0, len(order), self.batch):
                part = order[start:start + self.batch]
                for i, scored in zip(part, self._score([rows[i] for i in part])):
                    out[i] = scored
            return out

        @torch.no_grad()
        def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
            width = max(len(ids) - 1 for ids, _ in rows)
            inputs = torch.full((len(rows), width), self.tm.tokenizer.pad_id, dtype=torch.long, device=self._device)
            for b, (ids, _) in enumerate(rows):
                inputs[b, :len(ids) - 1] = torch.tensor(ids[:-1])  # right-padded: padding comes after what counts
            with self.tm.autocast_context():
                logprobs = F.log_softmax(self.tm.model(inputs).float(), dim=-1)  # (B, T, V)
            scored = []
            for b, (ids, n) in enumerate(rows):
                at = len(ids) - 1 - n  # the positions predicting the continuation's tokens
                target = torch.tensor(ids[-n:], device=self._device)
                rows_lp = logprobs[b, at:at + n]  # (n, V)
                total = rows_lp.gather(1, target[:, None]).sum().item()
                scored.append((total, bool((rows_lp.argmax(-1) == target).all())))
            return scored

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """A whole text's log-likelihood, in windows of the model's context (lm-eval's own windowing)."""
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            totals = []
            for (text,) in [r.args for r in requests]:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.tm.context, 1)]
                scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                totals.append(sum(lp for lp, _ in scored))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Text until a stop string, max_gen_toks or the context: greedy unless the task samples;
            prompts with the same settings generate together, `batch` at a time."""
            args = [r.args for r in requests]
            groups: dict[str, list[int]] = {}
            for i, (_, kw) in enumerate(args):
                groups.setdefault(json.dumps(kw, sort_keys=True, default=str), []).append(i)
            out = [""] * len(args)
            for same in groups.values():
                sampling = self._sampling(args[same[0]][1])
                for start in range(0, len(same), self.batch):
                    part = same[start:start + self.batch]
                    prompts = [self._prompt(args[i][0], sampling.max_new_tokens) for i in part]
                    for i, c in zip(part, self.tm.complete(prompts, sampling).completions):
                        out[i] = c.text
            return out

        @staticmethod
        def _sampling(kw: dict) -> Sampling:
            until = kw.get("until") or []
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            return Sampling(max_new_tokens=int(kw.get("max_gen_toks", 256)), temperature=temperature, top_k=0,
                            stop=[until] if isinstance(until, str) else list(until), seed=0)

        def _prompt(self, context: str, new: int) -> list[int]:
            """<bos> and the context, its oldest tokens dropped to leave room for `new` tokens."""
            ids = [self.prefix_token_id, *self.tok_encode(context)]
            return ids[-(self.tm.context - min(new, self.tm.context - 1)):]

    return LabLM
