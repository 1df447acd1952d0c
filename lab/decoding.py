"""The decode step: one new token for each of a batch of rows, each at its own length.

    prompt -> prefilled alone (a KVCache of its own length) -> copied into a row of a RowCache
    rows' last tokens (B,) -> one forward pass over every row -> next-token logits (B, V)
    Set Block Decoding: a row's new tokens and its block (2 x block places) -> logits (1 + block, V)

A step's shapes depend only on the rows and the span of slots attended, never on how far each row
has got, so `torch.compile` captures the step once and replays it: on a CPU that removes most of
the per-token cost of an eager forward pass (small operations and Python; nano decoded 1,327
tokens/s compiled against 543 eager, one thread: `lab.benchmarks.decode_speed`). Compiling costs seconds, so a short job decodes
eager (`choose_compile`). Prefilling each prompt alone, rather than left-padded beside the others,
makes a row's tokens independent of the rows decoded beside it: the server's answers equal what
each request gets alone.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from lab import hardware
from lab.models.kv_cache import KVCache, RowCache

# Compiling the step takes about 3 s (nano) to 8 s (tiny) on 2 cores with inductor's cache warm (15 to
# 25 s cold) and then saves 1 to 3 ms a token, so a job of fewer tokens than this decodes eager
# (hardware.compile=auto).
COMPILE_PAYS_AFTER_TOKENS = 4096


# A step attends over this many slots at least (then the next power of two above the longest row):
# short rows do not pay for the whole context, and a compiled step sees few distinct shapes.
MIN_SPAN = 64


def span(tokens: int, limit: int) -> int:
    """The slots a step attends over for rows of up to `tokens` tokens: the next power of two, MIN_SPAN at
    least, `limit` (a row's capacity, the context) at most."""
    return min(limit, max(MIN_SPAN, 1 << (tokens - 1).bit_length()))


def choose_compile(setting: Any, tokens: Optional[int], device: torch.device) -> tuple[bool, str]:
    """Whether a job decoding about `tokens` tokens (None: a server, long-lived) compiles its decode
    step under hardware.compile=`setting` (true, false or auto), and the line that says why."""
    key = f"<hardware.compile={str(setting).lower()}>"
    if setting is False:
        return False, f"decode step: eager {key}"
    if device.type == "mps":
        return False, f"decode step: eager: torch.compile's MPS backend is still experimental {key}"
    if device.type == "cpu" and hardware.cpp_compiler() is None:
        return False, f"decode step: eager: no C++ compiler found to build its CPU kernels (install g++, or set CXX) {key}"
    if setting is True:
        return True, f"decode step: compiled {key}"
    if tokens is None:
        return True, f"decode step: compiled: a server decodes for long enough to repay the compile {key}"
    on = tokens >= COMPILE_PAYS_AFTER_TOKENS
    return on, (f"decode step: {'compiled' if on else 'eager'}: this job decodes up to {tokens} tokens, "
                f"{'more' if on else 'fewer'} than the {COMPILE_PAYS_AFTER_TOKENS} that repay compiling it {key}")


def lay_out_for_decoding(model: torch.nn.Module) -> None:
    """Store every Linear weight of a CPU inference model transposed: the same (out, in) tensor, its
    memory (in, out). A decoded token is one matrix-vector product per weight, and MKL's reads a weight
    laid out (in, out) at 22 GB/s against 13.6 GB/s for (out, in) on these 2-core AMD EPYC machines
    (one thread; `tiny` decoded 401 tokens/s compiled against 214). Nothing else changes: a tied head
    shares the embedding's new layout, and a product over many rows (a prefill, eval's scoring) took
    within 10% of its time either way (64 and 512 rows).

    Projections that read the same input (q, k and v; gate and up) become one product over their
    weights side by side (`Fused`; each layer's weight a view of it): fewer, longer reads, and
    `tiny`'s products took 1.63 ms a token against 1.96 (six rounds, one thread). A layer wrapped by
    an adapter is left as it is. Call this last: moving or casting the model afterwards would leave the
    fused weights behind."""
    from lab.models.decoder import MLP, Attention, Fused

    for module in model.modules():
        if isinstance(module, Attention) and _plain(module.q_proj, module.k_proj, module.v_proj):
            module.qkv = Fused([module.q_proj, module.k_proj, module.v_proj])
        elif isinstance(module, MLP) and _plain(module.gate_proj, module.up_proj):
            module.gate_up = Fused([module.gate_proj, module.up_proj])
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()


def _plain(*layers) -> bool:
    """Whether these are plain Linear layers (not wrapped by an adapter) that can share one product."""
    return all(type(layer) is torch.nn.Linear for layer in layers)


def _step(model: torch.nn.Module, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
          lengths: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after each row's token (B,); writes the rows' keys and values and advances `lengths`."""
    from lab.models.kv_cache import RowView

    cache = RowView(keys, values, lengths, [block.local for block in model.layers])
    return model(tokens[:, None], cache=cache)[:, -1]


# A job's step keeps one shape, so its wrapper (the code calling the step's ~70 kernels and products)
# is compiled to C++ as well: tiny decoded 5% (128 tokens of context) to 9% (1,024) faster than with
# inductor's Python wrapper, for ~8 s more of compiling the first time (cached after). A server's
# step changes shape every few steps and keeps the Python wrapper.
_compiled_step = torch.compile(_step, options={"cpp_wrapper": True})
_compiled_dynamic_step = torch.compile(_step)

# torch.compiler.set_stance(skip_guard_eval_unsafe=True) as a context costs 60 us to enter and leave
# (against 0.13 ms saved); dynamo's own setter swaps the stance in a microsecond
_set_stance = torch._dynamo.eval_frame._set_stance
_REPLAY = torch._dynamo.eval_frame.DynamoStance("default", skip_guard_eval_unsafe=True)


def _block_pass(model: torch.nn.Module, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                length: torch.Tensor, pending: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Logits (1 + w, V) of a Set Block Decoding pass over tokens (1, 2w) (`BlockView`): after the last
    known place, then at each block place; stores the known tokens and advances `length`."""
    from lab.models.kv_cache import BlockView

    width = tokens.size(1) // 2
    cache = BlockView(keys, values, length, pending, block, [b.local for b in model.layers], width)
    return model(tokens, cache=cache)[0]


_compiled_block_pass = torch.compile(_block_pass, options={"cpp_wrapper": True})


class Decoding:
    """Rows of a RowCache and the step that decodes them, eager or compiled.

    Args:
        rows: rows decoded together at most.
        capacity: tokens a row holds (prompt and completion).
        compiled: replay a compiled step instead of running eager.
        dynamic: compile for any number of rows and span (a server's batch changes every few steps);
            otherwise the first shape is compiled as it is (a job's shape never changes).
    """

    def __init__(self, model: torch.nn.Module, rows: int, capacity: int, compiled: bool = False,
                 dynamic: bool = False, dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.compiled, self.dynamic = model, compiled, dynamic
        self.warm = False  # a step of this shape has run with dynamo's guards checked
        self.cache = RowCache(model, rows, capacity, dtype, spare=dynamic)
        self.device = model.tok_emb.weight.device

    def admit(self, row: int, prompt: Sequence[int]) -> torch.Tensor:
        """Prefill `prompt` into `row`; returns the logits (V,) of its next token."""
        prefill = KVCache(self.model, 1, len(prompt), dtype=self.cache.dtype)
        logits = self.model(torch.tensor([list(prompt)], device=self.device), cache=prefill)[0, -1]
        self.cache.admit(row, prefill)
        return logits

    def prefill_known(self, row: int, prompt: Sequence[int]) -> list[int]:
        """Store all but the last token of `prompt` in `row`; returns the rest, the first pass's known tokens
        (`block_pass`: the next token's logits come from the last known one)."""
        if len(prompt) > 1:
            self.admit(row, prompt[:-1])
        else:
            self.cache.lengths[row] = 0
        return list(prompt[-1:])

    def block_pass(self, row: int, known: Sequence[int], block: Sequence[int], width: int, filler: int) -> torch.Tensor:
        """A Set Block Decoding pass on `row` (`lab.sbd`): the `known` tokens not yet stored (1 to `width`),
        then `block` (1 to `width` ids: guesses and masks), in one forward pass of 2 * `width` places
        whatever the counts (the rest hold `filler`), so a compiled pass is captured once. Stores the
        known tokens; returns logits (1 + len(block), V): the next token's after them, then each block place's."""
        tokens = [filler] * (width - len(known)) + list(known) + list(block) + [filler] * (width - len(block))
        pending, placed = torch.tensor(len(known), device=self.device), torch.tensor(len(block), device=self.device)
        args = (self.model, torch.tensor([tokens], device=self.device),
                [k[row:row + 1] for k in self.cache.keys], [v[row:row + 1] for v in self.cache.values],
                self.cache.lengths[row:row + 1], pending, placed)
        return (_compiled_block_pass if self.compiled else _block_pass)(*args)[:1 + len(block)]

    def step(self, tokens: torch.Tensor, span: Optional[int] = None) -> torch.Tensor:
        """Logits (B, V) of the next tokens of the first B rows, fed `tokens` (B,); their global layers
        attend to the first `span` slots (every row's length must be below it; None: the capacity)."""
        view = self.cache.view(tokens.size(0), span)
        if not self.compiled:
            return _step(self.model, tokens, view.keys, view.values, view.lengths)
        if self.dynamic:
            for t in (tokens, view.lengths, *view.keys, *view.values):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            for t, local in zip(view.keys + view.values, view.local * 2):
                if not local:
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            return _compiled_dynamic_step(self.model, tokens, view.keys, view.values, view.lengths)
        if self.warm:
            # every later step has the first one's shapes, model and modes, so the graph dynamo chose
            # then is the one it would choose now: checking only the guards that tell its graphs apart
            # saves 0.13 ms a token (of ~2.2 on tiny: dynamo checks every weight)
            prior = _set_stance(_REPLAY)
            try:
                return _compiled_step(self.model, tokens, view.keys, view.values, view.lengths)
            finally:
                _set_stance(prior)
        self.warm = True
        return _compiled_step(self.model, tokens, view.keys, view.values, view.lengths)
