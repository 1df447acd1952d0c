"""Generation: sampling from a decoder, the one place every caller goes through (eval-time samples,
the generate, chat and serve stages, stage=eval, the generation benchmark).

    prompts (token ids, different lengths) -> each prefilled into its row -> one forward pass per
    new token -> sampled ids -> text, cut at stop ids and stop strings

With `use_cache` (the default) each prompt is prefilled into a row of its own and each new token is
the only input of its forward pass (`lab.decoding`: eager, or a compiled step replayed). Without
it every step re-runs the whole left-padded sequence; the padding is then a segment of its own
(`segment_ids`), so each row still sees only itself from position 0.
Both give the same tokens, which the tests check. With `sampling.sbd_gamma` set, Set Block Decoding
(`lab.sbd`) takes several tokens per forward pass, one prompt at a time.

Sampling never touches the global RNG: it draws from its own generator, seeded by `Sampling.seed`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from lab import sbd
from lab.config_stages import Sampling
from lab.decoding import Decoding, span

OnText = Callable[[int, str], None]  # (row, new text): streaming output


@dataclass
class Completion:
    """One prompt's continuation."""

    ids: list[int]  # generated token ids, the stop id left out
    text: str  # their text, cut before a stop string
    finish_reason: str  # "stop" (a stop id or string) or "length" (max_new_tokens, or the context, ran out)
    prompt_tokens: int


@dataclass
class Row:
    """A row's progress: its ids and how much of its text the caller has been given."""

    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text streamed so far
    finish_reason: Optional[str] = None


@dataclass
class Result:
    completions: list[Completion]
    forward_passes: int  # model calls, the prefill included


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], sampling: Sampling, *,
             decode: Optional[Callable[[list[int]], str]] = None, stop_ids: Sequence[int] = (),
             pad_id: int = 0, use_cache: bool = True, on_text: Optional[OnText] = None, compile: bool = False,
             cache_dtype: Optional[torch.dtype] = None) -> Result:
    """Continue each prompt (token ids, bos included) until a stop id, a stop string, max_new_tokens or the context.

    Args:
        model: a lab Decoder; it runs in eval mode (its mode is restored after).
        prompts: token ids of each prompt, lengths may differ.
        sampling: temperature (0: greedy), top_k, top_p, repetition_penalty, stop strings,
            max_new_tokens and seed.
        decode: ids -> text; needed for stop strings and streaming (without it, text stays "").
        stop_ids: ids that end a row (eos, a template's end-of-turn); they are not part of the output.
        pad_id: the id that fills left padding (never attended to); with sampling.sbd_gamma, Set
            Block Decoding's mask token (`lab.sbd.mask_token`).
        use_cache: keep keys and values (one token per forward pass after the prefill; `lab.decoding`).
        on_text: called with (row, new text) as text becomes final: streaming.
        compile: decode with the compiled step (`lab.decoding`); the same tokens, faster once compiled.
        cache_dtype: what the KV cache stores keys and values in; None: the dtype decoding runs in
            (autocast's, else the weights').

    Raises:
        ValueError: an empty prompt, or a prompt that fills the model's context.
    """
    context = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context (model.max_seq_len) is {context}")
    width = max(len(p) for p in prompts)
    new = min(sampling.max_new_tokens, context - width)  # the context bounds the longest row
    if sampling.sbd_gamma is not None:
        return _generate_sbd(model, prompts, sampling, new, decode, stop_ids, pad_id, use_cache, on_text, compile,
                             cache_dtype)
    device = model.tok_emb.weight.device
    rows = [Row(list(p)) for p in prompts]
    generator = sampler(sampling, device)
    was_training = model.training
    model.eval()
    passes = 0
    try:
        step = (_cached_steps(model, prompts, width + new, compile, cache_dtype) if use_cache
                else _uncached_steps(model, prompts, pad_id))
        nxt = None
        for _ in range(new):
            logits = step(nxt)  # (B, V)
            passes += 1
            nxt = sample(logits.float(), sampling, generator, seen_ids(rows, logits.size(-1), sampling))
            for b, (row, token) in enumerate(zip(rows, nxt.tolist())):  # the one host sync of a step
                if row.finish_reason is None:
                    advance(row, token, sampling, decode, stop_ids, b, on_text)
            if all(r.finish_reason is not None for r in rows):
                break
    finally:
        model.train(was_training)
    return _finish(rows, passes, on_text)


def sampler(sampling: Sampling, device: torch.device) -> torch.Generator:
    """The sampler's own generator: seeded by sampling.seed, or from the OS; never the global RNG."""
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed) if sampling.seed is not None else generator.seed()
    return generator


def _finish(rows: list[Row], passes: int, on_text: Optional[OnText]) -> Result:
    """Rows still open ran out of tokens: "length"; their held-back text is final now."""
    for b, row in enumerate(rows):
        if row.finish_reason is None:
            row.finish_reason = "length"
            flush(row, b, on_text, len(row.text))
    return Result([Completion(r.ids, r.text, r.finish_reason, len(r.prompt)) for r in rows], passes)


def _cache_dtype(model, cache_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """`cache_dtype`, else autocast's (under autocast keys come out in bf16 or fp16: a cache stores them
    as they are, at half the memory), else None: the weights'."""
    device = model.tok_emb.weight.device
    if cache_dtype is None and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return cache_dtype


def _cached_steps(model, prompts: Sequence[Sequence[int]], capacity: int, compile: bool,
                  cache_dtype: Optional[torch.dtype]):
    """step(None) prefills each prompt into its row; step(next ids (B,)) feeds one token per row: (B, V)."""
    # rows as long as the server's spans: jobs of nearby lengths share one compiled shape
    decoding = Decoding(model, len(prompts), span(capacity, model.config.max_seq_len), compile,
                        dtype=_cache_dtype(model, cache_dtype))
    return lambda nxt: (torch.stack([decoding.admit(b, p) for b, p in enumerate(prompts)]) if nxt is None
                        else decoding.step(nxt))


def _generate_sbd(model, prompts: Sequence[Sequence[int]], sampling: Sampling, new: int, decode, stop_ids: Sequence[int],
                  mask_id: int, use_cache: bool, on_text: Optional[OnText], compile: bool,
                  cache_dtype: Optional[torch.dtype]) -> Result:
    """Set Block Decoding (`lab.sbd`), one prompt at a time: rows advance by different numbers of tokens per pass."""
    block = sampling.sbd_block
    if not block:
        raise ValueError("Set Block Decoding needs a block size (sampling.sbd_block)")
    sbd.check_block(block, model.config.sliding_window)
    generator = sampler(sampling, model.tok_emb.weight.device)
    was_training = model.training
    model.eval()
    rows, passes = [Row(list(p)) for p in prompts], 0
    try:
        for b, row in enumerate(rows):
            end = len(row.prompt) + new
            # a pass stores its known tokens and attends to the block beside them: room for both
            decoding = Decoding(model, 1, max(span(end, model.config.max_seq_len), 2 * block), compile,
                                dtype=_cache_dtype(model, cache_dtype)) if use_cache else None
            passes += _sbd_row(model, row, b, sampling, end, decode, stop_ids, mask_id, decoding, on_text, generator)
    finally:
        model.train(was_training)
    return _finish(rows, passes, on_text)


def _sbd_row(model, row: Row, b: int, sampling: Sampling, end: int, decode, stop_ids, mask_id: int,
             decoding: Optional[Decoding], on_text: Optional[OnText], generator: torch.Generator) -> int:
    """Decode one row up to `end` tokens, a block of sbd_block positions at a time; returns the forward passes.
    With `decoding` (the KV cache), each pass feeds the tokens decoded since the last one and the block;
    without, the whole text and the block."""
    device = model.tok_emb.weight.device
    text, filled, passes = list(row.prompt), {}, 0
    known = decoding.prefill_known(0, row.prompt) if decoding is not None else []  # decoded, not yet cached
    block_end = len(text)
    while row.finish_reason is None and len(text) < end:
        t = len(text)
        if t >= block_end:  # the block is decoded: the next one
            block_end = min(t + sampling.sbd_block, end)
        ids, masked = sbd.block_ids(filled, t, block_end, mask_id)  # masked[0] == 0: the next place is never decoded yet
        if decoding is not None:
            logits = decoding.block_pass(0, known, ids, sampling.sbd_block, mask_id)  # (1 + k, V)
        else:
            positions, mask = sbd.decode_layout(t, len(ids), device)
            logits = model(torch.tensor([text + ids], device=device), positions=positions, attn_mask=mask)[0, t - 1:]
        passes += 1
        # the next place by next-token prediction (logits[0], from the last known token); the others by
        # their own masked-token prediction (logits[1 + j] at block place j)
        guesses = torch.stack([logits[0] if j == 0 else logits[1 + j] for j in masked]).float()  # (M, V)
        seen = seen_ids([row], logits.size(-1), sampling)
        for i in sbd.entropy_bounded(sbd.entropy(guesses).tolist(), sampling.sbd_gamma, first=0):
            filled[t + masked[i]] = int(sample(guesses[i:i + 1], sampling, generator, seen)[0])
        known = []
        while len(text) in filled and row.finish_reason is None:
            token = filled.pop(len(text))
            text.append(token)
            known.append(token)
            advance(row, token, sampling, decode, stop_ids, b, on_text)
    return passes


def _uncached_steps(model, prompts: Sequence[Sequence[int]], pad_id: int):
    """step(next ids (B,)) re-runs the whole left-padded sequence: (B, V). The padding is segment 0,
    each prompt segment 1, so each row sees only itself from position 0."""
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=model.tok_emb.weight.device)
    for b, p in enumerate(prompts):
        idx[b, width - len(p):] = torch.tensor(list(p))
    pad = torch.tensor([width - len(p) for p in prompts], device=idx.device)
    seq = [idx]
    segments = (torch.arange(width, device=idx.device)[None] >= pad[:, None]).long()  # (B, T)

    def step(nxt):
        if nxt is not None:
            seq[0] = torch.cat([seq[0], nxt[:, None]], dim=1)
        ids = seq[0]
        seg = torch.cat([segments, segments.new_ones(ids.size(0), ids.size(1) - segments.size(1))], dim=1)
        return model(ids, segment_ids=seg)[:, -1]  # (B, V)
    return step


def seen_ids(rows: list[Row], vocab: int, sampling: Sampling) -> Optional[torch.Tensor]:
    """(B, V) True at every id a row's prompt or output holds, for the repetition penalty."""
    if sampling.repetition_penalty == 1.0:
        return None
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for b, row in enumerate(rows):
        seen[b, row.prompt + row.ids] = True
    return seen


def advance(row: Row, token: int, sampling: Sampling, decode, stop_ids: Sequence[int], b: int,
             on_text: Optional[OnText]) -> None:
    """Append a token to a row, and finish the row at a stop id or a stop string."""
    if token in stop_ids:
        row.finish_reason = "stop"
        flush(row, b, on_text, len(row.text))
        return
    row.ids.append(token)
    if decode is None:
        return
    row.text = decode(row.ids)
    for s in sampling.stop:
        at = row.text.find(s, max(0, row.sent - len(s)))
        if at >= 0:
            row.text, row.finish_reason = row.text[:at], "stop"
            flush(row, b, on_text, at)
            return
    flush(row, b, on_text, len(row.text) - _held_back(row.text, sampling.stop))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not yet final: an unfinished UTF-8 sequence (decoded as
    U+FFFD), or the start of a stop string that the next token may complete."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def flush(row: Row, b: int, on_text: Optional[OnText], upto: int) -> None:
    if on_text is not None and upto > row.sent:
        on_text(b, row.text[row.sent:upto])
    row.sent = max(row.sent, upto)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One id per row of (B, V) float logits: greedy at temperature 0, else drawn after the
    repetition penalty, temperature, top-k and top-p (nucleus) filters, in that order (as HF does)."""
    if seen is not None:  # CTRL's penalty: a seen token's logit moves toward "less likely" either side of 0
        p = sampling.repetition_penalty
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen.to(logits.device), penalised, logits)
        logits = logits.clamp(max=torch.finfo(logits.dtype).max)  # a tiny penalty may overflow: inf - inf is NaN
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    # shifted first, so that the best logit stays 0 however small the temperature (never inf - inf); a
    # temperature below float32's normal range would round to 0 (0 / 0), and at 1e-30 sampling is greedy already
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(sampling.temperature, 1e-30)
    if sampling.top_k and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        mass_before = F.softmax(ordered, dim=-1).cumsum(dim=-1) - F.softmax(ordered, dim=-1)  # (B, V)
        drop = mass_before >= sampling.top_p  # keeps the smallest prefix reaching top_p (never empty)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))  # back in id order
    probs = F.softmax(logits, dim=-1).to(generator.device)  # sample where the generator lives
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)  # (B,)
