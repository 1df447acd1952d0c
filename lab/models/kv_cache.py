"""The keys and values of tokens already seen, so generation runs each new token through the model once.

    KVCache    a prompt's prefill: rows sharing one timeline (slot t holds position t)
    RowCache   the decode step's rows (`lab.decoding`): each at its own length, joining and leaving
    RowView    what one decode step reads and writes of a RowCache: one new token per row
    BlockView  what one Set Block Decoding pass (`lab.sbd`) reads and writes of a RowCache row

Global layers keep every slot; sliding-window layers keep only their last `window` positions, in a
ring: position p at slot p % window (attention does not care in which order its keys sit, since
RoPE has already put each key's position into it).

Shape letters: B batch, nkv key/value heads, S stored slots, T new tokens, L keys attended, hs head size.
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Per-layer key/value buffers for rows that share one timeline (a prompt's prefill).

    Attributes:
        length: slots filled so far (the next token goes to slot `length`).
        capacity: slots the timeline holds.
    """

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int, dtype: Optional[torch.dtype] = None) -> None:
        cfg = model.config
        if capacity > cfg.max_seq_len:
            raise ValueError(f"{capacity} tokens exceed model.max_seq_len={cfg.max_seq_len} (the context)")
        weight = model.tok_emb.weight
        device, dtype = weight.device, dtype or weight.dtype
        self.capacity, self.length, self.window, self.batch = capacity, 0, cfg.sliding_window, batch
        nkv = cfg.n_kv_heads or cfg.n_heads
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for block in model.layers:
            size = self._size(block.local)
            self.keys.append(torch.zeros(batch, nkv, size, cfg.head_size, dtype=dtype, device=device))
            self.values.append(torch.zeros_like(self.keys[-1]))

    transient = 0  # every token of a pass is stored (see BlockView)

    def _size(self, local: bool) -> int:
        """Slots a layer of this kind keeps: its window (sliding-window layers) or the whole timeline."""
        return min(self.capacity, self.window) if local else self.capacity

    def nbytes(self) -> int:
        """Memory the buffers hold."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) RoPE positions of the next T tokens."""
        return torch.arange(self.length, self.length + T, device=self.keys[0].device)[None].expand(self.batch, T)

    def _held(self, size: int, filled: int) -> torch.Tensor:
        """The timeline slot of each buffer entry once `filled` slots are written, in buffer order (a
        ring of `size` entries holds, at index j, the latest slot congruent to j)."""
        device = self.keys[0].device
        if filled <= size:
            return torch.arange(filled, device=device)
        j = torch.arange(size, device=device)
        return j + size * torch.div(filled - 1 - j, size, rounding_mode="floor")

    def _in_place(self, size: int, T: int) -> bool:
        """Whether the T new keys can be written before attending: true unless a ring would overwrite
        keys that the new tokens still see (a prefill longer than what the ring has left)."""
        return T == 1 or self.length + T <= size

    def _key_slots(self, size: int, T: int) -> torch.Tensor:
        """The timeline slot of each key the T new tokens attend to, in the order `extend` returns them."""
        if self._in_place(size, T):
            return self._held(size, self.length + T)
        new = torch.arange(self.length, self.length + T, device=self.keys[0].device)
        return torch.cat([self._held(size, self.length), new])

    def mask(self, T: int, local: bool) -> torch.Tensor:
        """(1, 1, T, L) True where a new token may attend: keys not in the future and (local layers)
        fewer than `window` slots back."""
        q = torch.arange(self.length, self.length + T, device=self.keys[0].device)  # (T,)
        k = self._key_slots(self._size(local), T)  # (L,)
        seen = k[None, :] <= q[:, None]  # (T, L)
        if local:
            seen &= q[:, None] - k[None, :] < self.window
        return seen[None, None]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, nkv, T, hs); return every key and value they attend to,
        (B, nkv, L, hs), in the order `mask` describes."""
        kbuf, vbuf = self.keys[layer], self.values[layer]
        size, T, t0 = kbuf.size(2), k.size(2), self.length
        if t0 + T > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} slots; {t0} are filled and {T} more do not fit")
        in_place = self._in_place(size, T)
        if not in_place:  # a long prefill into a ring: attend to the old entries and all new ones
            keys, values = torch.cat([kbuf[:, :, :min(t0, size)], k], dim=2), torch.cat([vbuf[:, :, :min(t0, size)], v], dim=2)
        keep = min(T, size)  # a ring keeps only the newest `size`
        slots = torch.arange(t0 + T - keep, t0 + T, device=k.device) % size
        if keep == 1:  # decoding: a slice, not an index tensor (cheaper, and the common case)
            kbuf[:, :, int(slots):int(slots) + 1] = k[:, :, T - 1:T]
            vbuf[:, :, int(slots):int(slots) + 1] = v[:, :, T - 1:T]
        else:
            kbuf[:, :, slots] = k[:, :, T - keep:].to(kbuf.dtype)
            vbuf[:, :, slots] = v[:, :, T - keep:].to(vbuf.dtype)
        if in_place:
            n = min(t0 + T, size)
            return kbuf[:, :, :n], vbuf[:, :, :n]
        return keys, values

    def advance(self, T: int) -> None:
        """Mark the T new tokens filled (the model calls this after every layer has extended)."""
        self.length += T


class RowCache:
    """Key/value buffers for rows that each keep their own timeline and decode one token per step:
    row b's next token is position lengths[b], stored at that slot (sliding-window layers: at
    lengths[b] % window, a ring). No row is padded, rows join and leave independently (the server's
    continuous batching), and the shapes a step sees do not change from step to step, so a
    compiled step is captured once and replayed (`lab.decoding`).

    Attributes:
        capacity: tokens a row holds at most (its prompt and what it generates).
        lengths: (R,) tokens each row holds.
    """

    def __init__(self, model: torch.nn.Module, rows: int, capacity: int, dtype: Optional[torch.dtype] = None,
                 spare: bool = False) -> None:
        cfg = model.config
        if capacity > cfg.max_seq_len:
            raise ValueError(f"{capacity} tokens exceed model.max_seq_len={cfg.max_seq_len} (the context)")
        weight = model.tok_emb.weight
        self.capacity, self.local = capacity, [block.local for block in model.layers]
        self.dtype = dtype or weight.dtype
        nkv = cfg.n_kv_heads or cfg.n_heads
        # with `spare`, global layers get a slot never used, so that no view is ever the whole buffer:
        # a contiguous view would recompile a step compiled for cut ones (its strides differ)
        size = {False: capacity + spare, True: min(capacity, cfg.sliding_window or capacity)}
        self.keys = [torch.zeros(rows, nkv, size[local], cfg.head_size, dtype=self.dtype, device=weight.device)
                     for local in self.local]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=weight.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def admit(self, row: int, prefilled: KVCache) -> None:
        """Take into `row` a prompt prefilled alone (a KVCache of batch 1, unpadded, as long as the prompt):
        its ring layers already hold position p at p % window, as this cache's do."""
        n = prefilled.length
        if n >= self.capacity:
            raise ValueError(f"a prompt of {n} tokens leaves no room in rows of {self.capacity}")
        for mine, theirs in zip(self.keys + self.values, prefilled.keys + prefilled.values):
            m = min(n, mine.size(2))
            mine[row, :, :m] = theirs[0, :, :m]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (a server keeps its live rows first)."""
        for t in self.keys + self.values:
            t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def view(self, rows: int, span: Optional[int] = None) -> "RowView":
        """The first `rows` rows, their global layers cut to the first `span` slots (None: the capacity),
        for one step. Every view shares this cache's memory: the step writes into it."""
        span = span or self.capacity
        cut = [k[:rows] if local else k[:rows, :, :span] for k, local in zip(self.keys, self.local)]
        cutv = [v[:rows] if local else v[:rows, :, :span] for v, local in zip(self.values, self.local)]
        return RowView(cut, cutv, self.lengths[:rows], self.local)


class RowView:
    """What a decode step reads and writes of a RowCache: the `forward(cache=...)` protocol of KVCache,
    for one new token per row. Slots at or beyond a row's length are masked."""

    transient = 0  # nothing of a step is held back

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor,
                 local: list[bool]) -> None:
        self.keys, self.values, self.lengths, self.local = keys, values, lengths, local

    def positions(self, T: int) -> torch.Tensor:
        return self.lengths[:, None]  # (B, 1)

    def mask(self, T: int, local: bool) -> torch.Tensor:
        """(B, 1, 1, S): every slot written so far and the new token's own. A ring holds only the last
        `window` positions, all of them seen once it is full."""
        size = self.keys[self.local.index(local)].size(2)
        return (torch.arange(size, device=self.lengths.device)[None] <= self.lengths[:, None])[:, None, None]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key and value (B, nkv, 1, hs) at its slot; return the whole buffers."""
        kbuf, vbuf = self.keys[layer], self.values[layer]
        rows, slots = torch.arange(k.size(0), device=k.device), self.lengths % kbuf.size(2)
        kbuf[rows, :, slots] = k[:, :, 0].to(kbuf.dtype)
        vbuf[rows, :, slots] = v[:, :, 0].to(vbuf.dtype)
        return kbuf, vbuf

    def advance(self, T: int) -> None:
        self.lengths += T


class BlockView:
    """What a Set Block Decoding pass (`lab.sbd`) reads and writes of one RowCache row: `width` places of
    known tokens not stored yet (`pending` of them, right-aligned), then `width` places of the block of
    guesses (`block` of them, left-aligned): seen but never stored (`transient`). The known tokens
    attend causally; the block's tokens to every known token and to all of the block. How many places
    are used is data (two counts), not shape, so the pass compiles once; unused places see only themselves.

    A ring layer keeps at least `width` slots (one block never outgrows a sliding window).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: torch.Tensor,
                 pending: torch.Tensor, block: torch.Tensor, local: list[bool], width: int) -> None:
        self.keys, self.values, self.length, self.local = keys, values, length, local
        self.pending, self.block, self.width, self.transient = pending, block, width, width
        place = torch.arange(2 * width, device=length.device)
        known = place < width
        self.used = torch.where(known, place >= width - pending, place - width < block)  # (2w,)
        at = torch.where(known, length - (width - pending) + place, length + pending + place - width)
        self.at = torch.where(self.used, at, 0)  # (2w,) each place's position (unused: 0)
        self.known = known

    def positions(self, T: int) -> torch.Tensor:
        return self.at[None]  # (1, 2w)

    def mask(self, T: int, local: bool) -> torch.Tensor:
        """(1, 1, 2w, S + 2w): the stored slots (a ring's within its window), then the pass's own places."""
        size = self.keys[self.local.index(local)].size(2)
        q, used, known = self.at[:, None], self.used[:, None], self.known
        slot = torch.arange(size, device=q.device)
        held = slot + size * torch.div(self.length - 1 - slot, size, rounding_mode="floor")  # the position slot s holds
        stored = (slot < self.length)[None] & used  # (2w, S)
        causal = known[None] & (self.at[None] <= q)  # (2w, 2w)
        if local:  # a ring holds its last `size` positions: the window
            stored &= q - held[None] < size
            causal &= q - self.at[None] < size
        among = used & self.used[None] & (causal | (~known[None] & ~known[:, None]))  # (2w, 2w)
        among |= torch.eye(2 * self.width, dtype=torch.bool, device=q.device)
        return torch.cat([stored, among], dim=1)[None, None]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values followed by the pass's (1, nkv, S + 2w, hs); then the known tokens'
        are stored at their slots (unused places write back what the slots held)."""
        kbuf, vbuf = self.keys[layer], self.values[layer]
        keys, values = torch.cat([kbuf, k.to(kbuf.dtype)], dim=2), torch.cat([vbuf, v.to(vbuf.dtype)], dim=2)
        w = self.width
        slots = (self.length - (w - self.pending) + torch.arange(w, device=k.device)) % kbuf.size(2)
        write = self.used[:w][None, :, None]
        kbuf[0, :, slots] = torch.where(write, k[0, :, :w].to(kbuf.dtype), kbuf[0, :, slots])
        vbuf[0, :, slots] = torch.where(write, v[0, :, :w].to(vbuf.dtype), vbuf[0, :, slots])
        return keys, values

    def advance(self, T: int) -> None:
        self.length += self.pending
