"""GGUF files in a real llama.cpp: its prebuilt CPU build, driven through node-llama-cpp
(tests/llama_cpp/, which `make test` installs), tokenizes a text into lab's ids (bos first) and
continues it greedily as lab does, for a Llama, a Gemma 2 and a Gemma 3 trained here for a few
hundred steps on Genesis, in f32 and in every quantized type lab writes."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lab.config import ModelConfig, TokenizerConfig
from lab.config_stages import GGUF_TYPES, Sampling
from lab.formats.gguf import write_gguf
from lab.generation import generate
from lab.models import build_model
from lab.tokenizers import train_sentencepiece

NODE_DIR = Path(__file__).parents[1] / "llama_cpp"
if not (NODE_DIR / "node_modules" / ".installed").exists() or shutil.which("node") is None:  # make test's marker
    pytest.skip("llama.cpp is not installed here: `make test` installs it (tests/llama_cpp) where npm is, "
                "on Linux x86-64", allow_module_level=True)

TEXT = "And God said, Let there be light: and there was"
NEW = 16
STEPS = 150
SMALL = dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=128)  # rows of whole q4_0 blocks
ARCHS = {
    "llama": ModelConfig(name="llama", n_layers=2, **SMALL),
    "gemma2": ModelConfig(name="gemma2", n_layers=2, mlp="geglu", sliding_window=16, sliding_window_pattern=2,
                          query_pre_attn_scalar=16, attn_softcap=50.0, final_softcap=30.0, norm_eps=1e-6,
                          norm_plus_one=True, sandwich_norm=True, embed_scale=True, **SMALL),
    "gemma3": ModelConfig(name="gemma3", n_layers=6, mlp="geglu", sliding_window=16, sliding_window_pattern=6,
                          qk_norm=True, query_pre_attn_scalar=16, rope_theta=1e6, rope_local_theta=1e4, norm_eps=1e-6,
                          norm_plus_one=True, sandwich_norm=True, embed_scale=True, **SMALL),
}
QUANTIZED = [t for t in GGUF_TYPES if t.startswith("q")]
# A quantized file computes other logits than lab's model: its weights are rounded, and llama.cpp
# rounds activations to 8 bits for its quantized dot products. One token picked otherwise sends a
# greedy continuation down another text, so a quantized file's continuation is judged token by
# token on its own text: at how many of its 16 positions lab's model, given the same prefix, picks
# the same token. Measured (llama, gemma2, gemma3): q8_0 16 16 16; q5_1 16 15 16; q5_0 15 16 16;
# q4_1 15 16 16; q4_0 14 13 13. Allowed: q8_0 all 16 (8 bits round a weight by at most 1/254 of its
# block's range, below these models' margins); 5 bits 14 (8 times q8_0's step: a near tie may flip
# once or twice); 4 bits 12 (twice 5 bits' step again, and q4_0's grid has no zero-point). Gemma 2's
# soft-capped logits bunch a knowing model's best tokens near the cap: its margins are the narrowest.
MATCHING = {"q8_0": 16, "q5_1": 14, "q5_0": 14, "q4_1": 12, "q4_0": 12}


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    texts = [p.read_text() for p in sorted(small_corpus.glob("*.txt"))]
    return train_sentencepiece(TokenizerConfig(kind="bpe", vocab_size=512), texts), texts[0]


def trained(cfg: ModelConfig, tokenizer, text: str) -> torch.nn.Module:
    """AdamW in fp32 on rows of Genesis 1 until the model knows it (loss about 0.05)."""
    ids = torch.tensor([tokenizer.bos_id, *tokenizer.encode(text)])
    rows = ids.unfold(0, 65, 16)  # every 16th start
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = rows[torch.randint(0, len(rows), (8,), generator=g)]
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def agreed(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> int:
    """Positions of `continuation` where `model`, given the same prefix, picks the same token (greedy)."""
    ids = torch.tensor([prompt + continuation])
    picks = model(ids[:, :-1])[0, len(prompt) - 1:].argmax(-1)
    return int((picks == ids[0, len(prompt):]).sum())


def run_llama_cpp(jobs: list[dict], tmp_path: Path) -> list[dict]:
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(["node", "check.mjs", str(tmp_path / "jobs.json")], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the prebuilt llama.cpp installed is Linux x86-64's")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_tokenizes_and_continues_as_lab_does(tmp_path, tokenizer, arch):
    tok, text = tokenizer
    cfg = ARCHS[arch]
    model = trained(cfg, tok, text)
    prompt = [tok.bos_id, *tok.encode(TEXT)]
    ours = generate(model, [prompt], Sampling(max_new_tokens=NEW, temperature=0.0)).completions[0].ids
    weights = model.state_dict()
    files = {t: write_gguf(tmp_path / f"{arch}_{t}.gguf", weights, cfg, tok.vocab_size, tok, t) for t in ["f32", *QUANTIZED]}
    answers = run_llama_cpp([{"model": str(f), "text": TEXT, "new_tokens": NEW} for f in files.values()], tmp_path)
    sizes = {t: f.stat().st_size for t, f in files.items()}
    agreement = {}
    for (kind, _), answer in zip(files.items(), answers):
        assert answer["ids"] == prompt, kind  # llama.cpp's tokenizer, from the file's vocabulary: lab's ids
        if kind == "f32":
            assert answer["continuation"] == ours
            continue
        agreement[kind] = agreed(model, prompt, answer["continuation"])
    assert all(agreement[k] >= MATCHING[k] for k in QUANTIZED), agreement
    assert sizes["q8_0"] < sizes["f32"] / 2.5 and sizes["q4_0"] < sizes["q8_0"]  # the sizes the types promise
