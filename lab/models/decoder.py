"""One Llama-style decoder, readable top to bottom.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention through
`F.scaled_dot_product_attention`, a SwiGLU MLP, and optionally tied embeddings. Variants are
switched by typed `ModelConfig` flags, never by the model's name, so one file covers Llama,
Gemma 2 and Gemma 3:

- `deepnorm`: post-norm with an up-weighted residual and down-scaled init (Wang et al. 2022,
  "DeepNet"), which keeps very deep narrow stacks trainable.
- GPT-2's pieces, as the grokking papers' small transformers have them: `norm=layer` (LayerNorm),
  `mlp=gelu` (an ungated 4x MLP), `positions=learned` (a position table added to the token
  embeddings instead of RoPE), `bias` (on every linear layer but the head), and `init=torch` (each
  torch.nn module's own default initialisation: embeddings N(0, 1), linear layers kaiming-uniform).
- Gemma: `head_dim`, sliding-window layers in a local/global pattern with their own RoPE base,
  `qk_norm`, `attn_softcap` / `final_softcap`, `query_pre_attn_scalar`, `norm_plus_one`,
  `sandwich_norm`, `embed_scale` and `mlp=geglu`. Each block knows its layer index, so its kind
  (local or global) comes from the config.
- `segment_ids` in `forward`: packed rows of several examples, each seeing only itself and each
  starting its RoPE positions at 0, so a packed example behaves as if it were run alone.
- `cache` in `forward` (generation): a `KVCache` holding the keys and values of the tokens
  already seen; the new tokens' positions follow from it, and only the last position's logits are
  computed.

Shape letters: B batch, T time, C = dim, nh query heads, nkv key/value heads, hs head size,
V vocabulary.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lab.config import ModelConfig
from lab.models.attention_ops import (apply_rope, attention_weights, rope_tables, segment_layout, window_mask,
                                      write_out, written_out_attention)
from lab.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in fp32 for stability.

    With `plus_one` (Gemma) the scale is (1 + w), w starting at 0, applied in fp32 before the cast.
    """

    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.plus_one else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return xf.type_as(x) * self.weight


def norm_layer(cfg: ModelConfig, dim: Optional[int] = None) -> nn.Module:
    """The config's norm over `dim` (default: the residual width): RMSNorm, or LayerNorm (`norm=layer`)."""
    dim = dim or cfg.dim
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layer" else RMSNorm(dim, cfg.norm_eps, cfg.norm_plus_one)


class Fused:
    """Linear layers that read the same input, run as one matrix product: the product of x with
    `weight` (in, sum of their outs), split into each layer's output. Their own weights are views of
    `weight`, so the state dict is unchanged (`lab.decoding.lay_out_for_decoding` builds it)."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sizes = [linear.out_features for linear in linears]
        self.weight = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous()  # (in, sum of outs)
        biases = [linear.bias for linear in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        at = 0
        for linear in linears:
            linear.weight.data = self.weight[:, at:at + linear.out_features].t()  # the same values, now a view
            if linear.bias is not None:
                linear.bias.data = self.bias[at:at + linear.out_features]
            at += linear.out_features

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = x @ self.weight
        return (y if self.bias is None else y + self.bias).split(self.sizes, dim=-1)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads <= n_heads)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # its buffers in a KVCache
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_size
        self.dropout = cfg.dropout
        # None lets SDPA use its own 1/sqrt(hs), bitwise as before the option existed
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_softcap
        self.rotary = cfg.positions == "rope"  # learned positions enter with the embeddings instead
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.qkv: Optional[Fused] = None  # q, k and v projections in one product (decoding on a CPU)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             cache: Optional[KVCache] = None) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values, (B, nh, T or L, hs) each: normed (QK-norm), rotated, kv heads
        repeated; with a cache, the keys and values are the cached ones followed by x's."""
        B, T, C = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the cache stores nkv heads, not nh: the repeat below is free memory
            k, v = cache.extend(self.layer_idx, k, v)  # (B, nkv, L, hs)
            # a cache may store a narrower dtype (generate.kv_cache_dtype): attention computes in q's,
            # and a compiled step reads the narrow values straight into it
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.n_kv_heads != self.n_heads:
            # each kv head serves a group of consecutive query heads; repeating (rather than
            # SDPA's enable_gqa) keeps this working on every torch >= 2.4 kernel
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, T or L, hs)
            v = v.repeat_interleave(rep, dim=1)  # (B, nh, T or L, hs)
        return q, k, v

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention weights this layer applies to input `x`, (B, nh, T, T), rows summing to 1.

        Written out (SDPA never returns them) for analysis: the same scale, soft-cap and mask as forward.
        """
        q, k, _ = self._qkv(x, cos, sin)
        return attention_weights(q, k, mask, self.scale or self.head_dim ** -0.5, self.softcap)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x, cos, sin, cache)
        dropout = self.dropout if self.training else 0.0
        if self.softcap is None and not write_out(q):
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,  # is_causal: the flash-kernel fast path
                dropout_p=dropout, scale=self.scale,
            )  # (B, nh, T, hs); with a cache, the mask is always given (it is (T, L), not square)
        else:
            y = written_out_attention(q, k, v, mask, self.scale or self.head_dim ** -0.5, self.softcap, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh * hs)
        return self.resid_drop(self.o_proj(y))


class MLP(nn.Module):
    """A gated MLP, down(act(gate(x)) * up(x)): SwiGLU (SiLU) or GeGLU (tanh-approximated GELU); or
    GPT-2's ungated one, down(gelu(up(x))) (`mlp=gelu`, exact GELU), which has no gate_proj."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = ffn_width(cfg)
        self.gate_proj = None if cfg.mlp == "gelu" else nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.act = {"swiglu": F.silu, "geglu": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}[cfg.mlp]
        self.gate_up: Optional[Fused] = None  # gate and up projections in one product (decoding on a CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.resid_drop(self.down_proj(self.act(self.up_proj(x))))
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.resid_drop(self.down_proj(self.act(gate) * up))


def ffn_width(cfg: ModelConfig) -> int:
    """The MLP's hidden width: `ffn_dim`, else 4 * dim for the ungated GELU MLP and `ffn_hidden` for gated ones."""
    return cfg.ffn_dim or (4 * cfg.dim if cfg.mlp == "gelu" else ffn_hidden(cfg.dim, cfg.multiple_of))


def ffn_hidden(dim: int, multiple_of: int) -> int:
    """8/3 * dim rounded up to multiple_of: SwiGLU's three matrices then cost what a 4*dim GELU MLP's two do."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class Block(nn.Module):
    """One transformer layer: pre-norm residual (with Gemma's sandwich norms when asked), or
    DeepNorm's post-norm. `layer_idx` decides, from the config, whether it attends locally."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.local = cfg.is_local(layer_idx)
        self.deepnorm = cfg.deepnorm
        # DeepNet, decoder-only: up-weighting the residual bounds each layer's update size
        self.alpha = (2 * cfg.n_layers) ** 0.25 if cfg.deepnorm else 1.0
        norm = partial(norm_layer, cfg)
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg)
        self.post_attn_norm = norm() if cfg.sandwich_norm else None
        self.post_mlp_norm = norm() if cfg.sandwich_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        if self.deepnorm:
            x = self.attn_norm(self.alpha * x + self.attn(x, cos, sin, mask, cache=cache))
            return self.mlp_norm(self.alpha * x + self.mlp(x))
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache=cache)  # by keyword: hooks see (x, cos, sin, mask)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h))


class Decoder(nn.Module):
    """A decoder-only language model built from a `ModelConfig`.

    Attributes:
        config: the ModelConfig it was built from.
        vocab_size: rows of the embedding and output head (from the tokenizer).
        gradient_checkpointing: recompute each block in backward instead of storing activations.
        task_heads: the multi-task stage's heads (`lab.tasks.TaskHeads`), or None.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size = vocab_size
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        # under post-norm every block already ends in a norm; a second one would be redundant
        self.norm = nn.Identity() if cfg.deepnorm else norm_layer(cfg)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # the multi-task stage's heads (lab.tasks.TaskHeads) on the final norm's output; none otherwise
        self.register_module("task_heads", None)
        # derived from the config, so kept out of the state_dict (non-persistent)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("rope_local_cos", torch.empty(0), persistent=False)  # sliding-window layers' own base
        self.register_buffer("rope_local_sin", torch.empty(0), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables, e.g. after `to_empty` from meta."""
        cfg = self.config
        self.reset_rope()
        if cfg.init == "torch":  # each module's own default, in module order, as a torch.nn model gets
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, RMSNorm)):
                    module.reset_parameters()
            return
        for table in (self.tok_emb, self.pos_emb):
            if table is not None:
                nn.init.normal_(table.weight, mean=0.0, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)
        for module in self.modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.layers:
            self._init_block(block)

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables: derived from the config, never stored."""
        cfg = self.config
        device = self.tok_emb.weight.device
        self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(
            cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg))  # (max_seq_len, hs)
        if cfg.sliding_window is not None:
            self.rope_local_cos, self.rope_local_sin = (t.to(device) for t in rope_tables(
                cfg.head_size, cfg.max_seq_len, cfg.rope_local_theta or cfg.rope_theta))  # (max_seq_len, hs)

    def _init_block(self, block: Block) -> None:
        cfg = self.config
        a, m = block.attn, block.mlp
        if cfg.deepnorm:
            # DeepNet: down-scale the value path and the MLP; q and k keep gain 1 since they only
            # set attention scores, not the size of what is added to the residual
            beta = (8 * cfg.n_layers) ** -0.25
            for w in (a.q_proj.weight, a.k_proj.weight):
                nn.init.xavier_normal_(w, gain=1.0)
            for layer in (a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                if layer is not None:
                    nn.init.xavier_normal_(layer.weight, gain=beta)
            return
        for layer in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            if layer is not None:
                nn.init.normal_(layer.weight, mean=0.0, std=cfg.init_std)
        # GPT-2: each of the 2N residual writes is scaled so the stream's variance stays O(1)
        for w in (a.o_proj.weight, m.down_proj.weight):
            nn.init.normal_(w, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _layout(self, idx: torch.Tensor, segment_ids: Optional[torch.Tensor], cache: Optional[KVCache],
                positions: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]):
        """Where each token sits and what it sees, for every way of calling `forward`: each token's
        position (B, T), or None for 0..T-1; and `mask_for(local)`, the attention mask of global
        (False) or sliding-window (True) layers, None for plain causal (SDPA's is_causal fast path)."""
        T, window = idx.size(1), self.config.sliding_window
        if attn_mask is not None:  # given positions and mask; sliding-window layers also drop keys `window` or more positions back
            near = None if window is None else (positions[:, :, None] - positions[:, None, :] < window)[:, None]
            return positions, lambda local: attn_mask & near if local else attn_mask
        if cache is not None:  # the new tokens' positions and masks come from the cache's timeline
            return cache.positions(T), lambda local: cache.mask(T, local)
        mask = None
        if segment_ids is not None:
            if segment_ids.shape != idx.shape:
                raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != idx shape {tuple(idx.shape)}")
            positions, mask = segment_layout(segment_ids)  # (B, T), (B, 1, T, T)
        # a window as long as the row limits nothing: the causal (fast) path then serves
        return positions, lambda local: window_mask(mask, T, window, idx.device) if local and T > window else mask

    def _contexts(self, T: int, positions: Optional[torch.Tensor], mask_for) -> dict[bool, tuple]:
        """(cos, sin, mask) for global layers (key False) and sliding-window layers (key True)."""
        def rope(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if positions is None:
                return cos[None, None, :T], sin[None, None, :T]  # (1, 1, T, hs)
            return cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, hs)

        contexts = {False: (*rope(self.rope_cos, self.rope_sin), mask_for(False))}
        if self.config.sliding_window is not None:
            contexts[True] = (*rope(self.rope_local_cos, self.rope_local_sin), mask_for(True))
        return contexts

    def forward(self, idx: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                task: Optional[str] = None, lengths: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-token logits, or a task head's output.

        Args:
            idx: (B, T) token ids, T <= config.max_seq_len.
            segment_ids: optional (B, T) ids of packed examples. A token then attends only to
                earlier tokens of its own segment, and RoPE positions restart at 0 per segment.
            task, lengths: return the output of `self.task_heads` (lab.tasks.TaskHeads, which the
                multi-task stage sets) for that task, on each row's first `lengths` tokens.
            cache: generation. idx are the next tokens of the cache's timeline: they attend to the
                cached keys and values and to each other, and are then stored in it.
            positions, attn_mask: any other attention pattern (Set Block Decoding's, `lab.sbd`):
                each token's RoPE position (B, T) and a boolean mask (B, 1, T, T), True where
                query t may attend to key s.

        Returns:
            (B, T, V) logits, (B, 1, V) for the last position only with a cache (plus its transient
            block's), or the task head's (B, ...) output.

        Raises:
            ValueError: if T exceeds config.max_seq_len.
        """
        cfg = self.config
        T = idx.size(1)
        if T > cfg.max_seq_len and positions is None:  # given positions may repeat (SBD's copy): they are what must fit
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len}")
        if cache is not None and (segment_ids is not None or task is not None):
            raise ValueError("a KV cache serves next-token generation only (no segment_ids, no task)")
        positions, mask_for = self._layout(idx, segment_ids, cache, positions, attn_mask)
        contexts = self._contexts(T, positions, mask_for)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:  # each token's position, as RoPE would rotate it
            x = x + self.pos_emb(torch.arange(T, device=idx.device)[None] if positions is None else positions)
        if cfg.embed_scale:  # Gemma rounds sqrt(dim) to the activations' dtype first
            x = x * torch.tensor(cfg.dim ** 0.5, dtype=x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, *contexts[layer.local], use_reentrant=False)
            else:
                x = layer(x, *contexts[layer.local], cache)
        if cache is not None:
            cache.advance(T)
            x = x[:, -1 - cache.transient:]  # the next token's logits only (and a transient block's): (B, 1 [+ k], C)
        x = self.norm(x)  # (B, T, C)
        if task is not None:
            if self.task_heads is None:
                raise ValueError(f"task={task!r}: this model has no task heads (stage=multitask sets model.task_heads)")
            return self.task_heads(x, lengths, task)
        logits = self.lm_head(x)  # (B, T, V)
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once.

        Args:
            exclude_embeddings: drop the token-embedding table (with tied embeddings the head is
                that same table, so it goes too; an untied head stays counted).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        # a quantized frozen base (lab.adapters.quantized) holds its weights as buffers: still the model's parameters
        n += sum(m.in_features * m.out_features for m in self.modules() if getattr(m, "qweight", None) is not None)
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N + 12 * n_layers * nh * hs * seq_len (PaLM, appendix B).

        N counts the non-embedding parameters plus the output head (its matmul runs whether or not
        it is tied); the second term is the attention score and value matmuls, which have no
        parameters (a sliding-window layer attends to at most its window). Forward is 1/3 of the
        total, backward 2/3.
        """
        n = self.num_parameters(exclude_embeddings=True)
        if self.config.tie_embeddings:
            n += self.lm_head.weight.numel()
        cfg = self.config
        attended = sum(min(seq_len, cfg.sliding_window) if layer.local else seq_len for layer in self.layers)
        return 6.0 * n + 12.0 * cfg.n_heads * cfg.head_size * attended


def build_model(cfg: ModelConfig, vocab_size: int) -> Decoder:
    """Build the decoder described by `cfg`.

    Args:
        cfg: the model config (its sizes, never a vocabulary).
        vocab_size: from the tokenizer, specials included.
    """
    return Decoder(cfg, vocab_size)


def build_empty(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> Decoder:
    """A decoder about to be loaded: its weights allocated once and left uninitialised.

    Built on the meta device first, so no time goes into a random init that loading overwrites and
    no random number is drawn; the RoPE tables are computed, since they are never stored.
    """
    with torch.device("meta"):
        model = Decoder(cfg, vocab_size).to(dtype)
    model.to_empty(device="cpu")
    model.reset_rope()
    if cfg.tie_embeddings:  # to_empty gives each module its own new tensor, which unties the head
        model.lm_head.weight = model.tok_emb.weight
    return model
