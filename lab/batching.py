"""Continuous batching: the server's requests decoded together, one forward pass per step for all.

    submit(jobs) -> waiting queue -> a free row: prefilled alone, first token sampled
                 -> live rows: one step for every row -> each row sampled with its own settings
                 -> a row that finishes (or whose client went away) leaves; the last row moves into its place

One thread (`Batcher.run`) owns the model and the rows; request handlers only submit jobs and
wait for their text. A job joins at the next step after a row frees up and leaves as soon as it
ends, so a short answer never waits for a long one. Each row has its own sampler generator,
seeded by its request, and its tokens do not depend on the rows beside it (`lab.decoding`): a
greedy or seeded answer is the one the same request gets alone.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from lab.config_stages import Sampling
from lab.decoding import Decoding, span
from lab.generation import Completion, Row, advance, flush, sample, sampler, seen_ids

if TYPE_CHECKING:
    from lab.inference import TextModel

class QueueFull(Exception):
    """More jobs wait than the queue holds."""


@dataclass
class Job:
    """One prompt of a request: its row's progress, its sampler and where its text goes."""

    prompt: list[int]
    sampling: Sampling
    on_text: Optional[Callable[[str], None]] = None  # streaming: each piece of final text
    on_done: Optional[Callable[[], None]] = None  # called once it has left (finished, abandoned or failed)
    row: Row = field(init=False)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # its client went away: it leaves at the next step
    error: Optional[BaseException] = None
    length: int = 0  # tokens in its row of the cache
    last: int = 0  # its latest token, the next step's input
    generator: Optional[torch.Generator] = None  # its sampler's, made when it is admitted (on the model's device)

    def __post_init__(self) -> None:
        self.row = Row(list(self.prompt))

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def completion(self) -> Completion:
        if self.error is not None:
            raise self.error
        return Completion(self.row.ids, self.row.text, self.row.finish_reason or "length", len(self.prompt))

    @property
    def greedy(self) -> bool:
        """Whether the argmax over the batch's logits is its token (no sampling, no penalty)."""
        return self.sampling.temperature == 0 and self.sampling.repetition_penalty == 1.0


class Batcher:
    """The rows one model decodes together, and the queue of jobs waiting for one.

    Args:
        tm: the model, its tokenizer and stop ids; `tm.compile` compiles the step.
        max_batch: rows decoded together at most.
        max_queue: jobs waiting at most; `submit` beyond it raises QueueFull.
        capacity: tokens a row holds (prompt and completion).
    """

    def __init__(self, tm: "TextModel", max_batch: int, max_queue: int, capacity: int) -> None:
        self.tm, self.model, self.decode, self.stop_ids = tm, tm.model, tm.tokenizer.decode, tm.stop_ids
        self.max_batch, self.max_queue, self.capacity = max_batch, max_queue, capacity
        self.device = tm.model.tok_emb.weight.device
        self.decoding = Decoding(tm.model, max_batch, capacity, tm.compile, dynamic=True, dtype=tm.cache_dtype)
        self.waiting: deque[Job] = deque()
        self.live: list[Job] = []  # row i of the cache is live[i]
        self.wake = threading.Condition()
        self.steps = 0  # forward passes over the live rows

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none; QueueFull when the free rows and the queue cannot take them."""
        with self.wake:
            free = self.max_batch - len(self.live)  # rows the next admission fills before anything waits
            if len(self.waiting) + len(jobs) > self.max_queue + free:
                raise QueueFull(f"{self.max_batch} prompts are decoding and {len(self.waiting)} waiting, the most this "
                                f"server queues (serve.max_batch={self.max_batch}, serve.max_queue={self.max_queue})")
            self.waiting.extend(jobs)
            self.wake.notify()

    def load(self) -> dict[str, int]:
        """Rows decoding and jobs waiting, for /health."""
        return {"running": len(self.live), "waiting": len(self.waiting)}

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the step before serving: for any number of rows and span (two rows: a dim of size 1
        would be specialised), then for one row alone, the single client's case."""
        self.model.eval()
        with self.tm.decode_context():
            for rows in (2, 1):
                for row in range(rows):
                    self.decoding.admit(row, [0])
                self.decoding.step(torch.zeros(rows, dtype=torch.long, device=self.device), span(1, self.capacity))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="lab-batcher", daemon=True)
        thread.start()
        return thread

    @torch.no_grad()
    def run(self) -> None:
        """Decode until the process ends: admit, step, retire."""
        self.model.eval()
        while True:
            with self.wake:
                while not self.waiting and not self.live:
                    self.wake.wait()
            try:
                with self.tm.decode_context():
                    self._admit()
                    if self.live:
                        self._step()
            except Exception as e:  # noqa: BLE001 -- every job in flight hears of it; the server carries on
                with self.wake:
                    failed = self.live + list(self.waiting)
                    self.live.clear()
                    self.waiting.clear()
                for job in failed:
                    job.error = e
                    job.finish()

    def _admit(self) -> None:
        """Prefill waiting jobs into free rows; each samples its first token at once."""
        while len(self.live) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    break
                job = self.waiting.popleft()
            if job.cancelled:
                job.finish()
                continue
            row = len(self.live)
            job.generator = sampler(job.sampling, self.device)  # sampling where the logits are
            logits = self.decoding.admit(row, job.prompt)[None].float()  # (1, V)
            self.live.append(job)
            job.length = len(job.prompt)
            self._take(row, job, sample(logits, job.sampling, job.generator, seen_ids([job.row], logits.size(-1), job.sampling)))
        self._retire()

    def _step(self) -> None:
        """One forward pass over every live row, each sampled with its own settings."""
        live = self.live
        tokens = torch.tensor([job.last for job in live], device=self.device)
        logits = self.decoding.step(tokens, span(max(job.length for job in live) + 1, self.capacity)).float()  # (B, V)
        self.steps += 1
        greedy = logits.argmax(-1).tolist()  # the one host sync of a step, for every greedy row at once
        for i, job in enumerate(live):
            job.length += 1
            if job.greedy:
                self._take(i, job, greedy[i])
            else:
                seen = seen_ids([job.row], logits.size(-1), job.sampling)
                self._take(i, job, sample(logits[i:i + 1], job.sampling, job.generator, seen))
        self._retire()

    def _take(self, row: int, job: Job, token) -> None:
        """The job's next token: text out, and the end of the job at a stop or its length."""
        token = int(token)
        job.last = token
        if not job.cancelled:
            advance(job.row, token, job.sampling, self.decode, self.stop_ids, row, self._streamer(job))
        if job.row.finish_reason is None and len(job.row.ids) >= job.sampling.max_new_tokens:
            job.row.finish_reason = "length"
            flush(job.row, row, self._streamer(job), len(job.row.text))

    @staticmethod
    def _streamer(job: Job):
        return None if job.on_text is None else (lambda _row, text: job.on_text(text))

    def _retire(self) -> None:
        """Finished and abandoned jobs leave; the last live row moves into each freed row."""
        i = 0
        while i < len(self.live):
            job = self.live[i]
            if job.row.finish_reason is None and not job.cancelled:
                i += 1
                continue
            job.finish()
            last = len(self.live) - 1
            if i != last:
                self.decoding.cache.move(last, i)
                self.live[i] = self.live[last]
            self.live.pop()
