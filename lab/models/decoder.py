"""One Llama-style decoder, readable top to bottom.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention through
`F.scaled_dot_product_attention`, a SwiGLU MLP, and optionally tied embeddings. Variants are
switched by typed `ModelConfig` flags, never by the model's name:

- `deepnorm`: post-norm with an up-weighted residual and down-scaled init (Wang et al. 2022,
  "DeepNet"), which keeps very deep narrow stacks trainable.
- `segment_ids` in `forward`: packed rows of several examples, each seeing only itself and each
  starting its RoPE positions at 0, so a packed example behaves as if it were run alone.

Shape letters: B batch, T time, C = dim, nh query heads, nkv key/value heads, hs head size,
V vocabulary.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lab.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables, each (max_seq_len, head_dim), in the "rotate half" layout.

    The rotate-half layout (pairs are dimension i and i + hs/2) is the one Hugging Face Llama uses,
    so weights can be compared against it without permuting q_proj and k_proj rows.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, hs) by position; cos/sin broadcast as (1 or B, 1, T, hs)."""
    xf = x.float()  # rotate in fp32: bf16 angles lose precision at far positions
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def segment_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that restart per segment, and the block-diagonal causal mask.

    A segment is a maximal run of equal ids, so a reused id further along a row still starts a
    new segment (positions and mask agree on that).

    Args:
        segment_ids: (B, T) integer ids.

    Returns:
        positions (B, T) counting from 0 at each segment start, and a boolean mask
        (B, 1, T, T) that is True where query t may attend to key s.
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    positions = idx - start  # (B, T)
    run = is_start.cumsum(dim=1)  # (B, T) index of the run each token belongs to
    same = run[:, :, None] == run[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return positions, (same & causal)[:, None]  # (B, 1, T, T)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads <= n_heads)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # each kv head serves a group of consecutive query heads; repeating (rather than
            # SDPA's enable_gqa) keeps this working on every torch >= 2.4 kernel
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, T, hs)
            v = v.repeat_interleave(rep, dim=1)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,  # is_causal: the flash-kernel fast path
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_dim or ffn_hidden(cfg.dim, cfg.multiple_of)
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


def ffn_hidden(dim: int, multiple_of: int) -> int:
    """8/3 * dim rounded up to multiple_of: SwiGLU's three matrices then cost what a 4*dim GELU MLP's two do."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class Block(nn.Module):
    """One transformer layer: pre-norm residual, or DeepNorm's post-norm when cfg.deepnorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.deepnorm = cfg.deepnorm
        # DeepNet, decoder-only: up-weighting the residual bounds each layer's update size
        self.alpha = (2 * cfg.n_layers) ** 0.25 if cfg.deepnorm else 1.0
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.deepnorm:
            x = self.attn_norm(self.alpha * x + self.attn(x, cos, sin, mask))
            return self.mlp_norm(self.alpha * x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """A decoder-only language model built from a `ModelConfig`.

    Attributes:
        config: the ModelConfig it was built from.
        vocab_size: rows of the embedding and output head (from the tokenizer).
        gradient_checkpointing: recompute each block in backward instead of storing activations.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size = vocab_size
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # under post-norm every block already ends in a norm; a second one would be redundant
        self.norm = nn.Identity() if cfg.deepnorm else RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # derived from the config, so kept out of the state_dict (non-persistent)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables, e.g. after `to_empty` from meta."""
        cfg = self.config
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos = cos.to(self.tok_emb.weight.device)  # (max_seq_len, hs)
        self.rope_sin = sin.to(self.tok_emb.weight.device)  # (max_seq_len, hs)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            self._init_block(block)

    def _init_block(self, block: Block) -> None:
        cfg = self.config
        a, m = block.attn, block.mlp
        if cfg.deepnorm:
            # DeepNet: down-scale the value path and the MLP; q and k keep gain 1 since they only
            # set attention scores, not the size of what is added to the residual
            beta = (8 * cfg.n_layers) ** -0.25
            for w in (a.q_proj.weight, a.k_proj.weight):
                nn.init.xavier_normal_(w, gain=1.0)
            for w in (a.v_proj.weight, a.o_proj.weight, m.gate_proj.weight, m.up_proj.weight,
                      m.down_proj.weight):
                nn.init.xavier_normal_(w, gain=beta)
            return
        for w in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight,
                  m.up_proj.weight):
            nn.init.normal_(w, mean=0.0, std=cfg.init_std)
        # GPT-2: each of the 2N residual writes is scaled so the stream's variance stays O(1)
        for w in (a.o_proj.weight, m.down_proj.weight):
            nn.init.normal_(w, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _rope_and_mask(self, idx: torch.Tensor, segment_ids: Optional[torch.Tensor]):
        T = idx.size(1)
        if segment_ids is None:
            return self.rope_cos[None, None, :T], self.rope_sin[None, None, :T], None  # (1, 1, T, hs)
        if segment_ids.shape != idx.shape:
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != idx shape {tuple(idx.shape)}")
        positions, mask = segment_layout(segment_ids)
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None], mask  # (B, 1, T, hs)

    def forward(self, idx: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-token logits.

        Args:
            idx: (B, T) token ids, T <= config.max_seq_len.
            segment_ids: optional (B, T) ids of packed examples. A token then attends only to
                earlier tokens of its own segment, and RoPE positions restart at 0 per segment.

        Returns:
            (B, T, V) logits.

        Raises:
            ValueError: if T exceeds config.max_seq_len.
        """
        T = idx.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin, mask = self._rope_and_mask(idx, segment_ids)
        x = self.tok_emb(idx)  # (B, T, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: Optional[int] = 50, generator: Optional[torch.Generator] = None,
                 eos_id: Optional[int] = None) -> torch.Tensor:
        """Sample a continuation, never touching the global RNG.

        Runs in eval mode (restoring the previous mode after), since dropout would draw from the
        global RNG. Without a KV cache: each step re-runs the (cropped) context.

        Args:
            idx: (B, T) prompt ids.
            max_new_tokens: tokens to append at most.
            temperature: softmax temperature; 0 picks the argmax (greedy).
            top_k: sample only among the k most likely tokens; None or 0 for all.
            generator: the RNG to sample with (any device); None uses a fresh, randomly seeded one.
            eos_id: stop once every row has emitted it; rows that finished early are padded with it.

        Returns:
            (B, T + n) ids, prompt included, n <= max_new_tokens.
        """
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # seeds from the OS, not from the global RNG
        was_training = self.training
        self.eval()
        try:
            done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.config.max_seq_len:])[:, -1, :].float()  # (B, V)
                nxt = self._pick(logits, temperature, top_k, generator)  # (B, 1)
                if eos_id is not None:
                    nxt[done] = eos_id
                    done |= nxt[:, 0] == eos_id
                idx = torch.cat([idx, nxt], dim=1)
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int],
              generator: torch.Generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1).to(generator.device)  # sample where the generator lives
        return torch.multinomial(probs, 1, generator=generator).to(logits.device)  # (B, 1)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once.

        Args:
            exclude_embeddings: drop the token-embedding table (with tied embeddings the head is
                that same table, so it goes too; an untied head stays counted).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N + 12 * n_layers * dim * seq_len (PaLM, appendix B).

        N counts the non-embedding parameters plus the output head (its matmul runs whether or not
        it is tied); the second term is the attention score and value matmuls, which have no
        parameters. Forward is 1/3 of the total, backward 2/3.
        """
        n = self.num_parameters(exclude_embeddings=True)
        if self.config.tie_embeddings:
            n += self.lm_head.weight.numel()
        cfg = self.config
        return 6.0 * n + 12.0 * cfg.n_layers * cfg.dim * seq_len


def build_model(cfg: ModelConfig, vocab_size: int) -> Decoder:
    """Build the decoder described by `cfg`.

    Args:
        cfg: the model config (its sizes, never a vocabulary).
        vocab_size: from the tokenizer, specials included.
    """
    return Decoder(cfg, vocab_size)
