"""lab.evaluation's measures with answers known by construction, and the task files' errors."""
from __future__ import annotations

import math

import pytest
import torch

from lab.config import ModelConfig, TokenizerConfig
from lab.data.prompts import Choice, read_choices, read_prompts, read_references
from lab.errors import DataError
from lab.evaluation import choice_accuracy, perplexity, reference_scores
from lab.tokenizers import ByteTokenizer, train_sentencepiece

# Next-letter probabilities of a bigram "model" over the letters a-e (ids 0-4; 5 is bos).
AFTER = {0: {1: 0.6, 2: 0.3, 3: 0.05, 4: 0.05}, 2: {2: 0.9, 4: 0.1}}


class Bigram(torch.nn.Module):
    config = ModelConfig(max_seq_len=64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = torch.full((6, 6), 1e-9)
        for prev, nxt in AFTER.items():
            for j, p in nxt.items():
                table[prev, j] = p
        return table.log()[ids]  # (B, T, 6)


class Letters:
    bos_id = 5

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]


def test_choice_accuracy_scores_by_summed_and_per_byte_log_likelihood():
    items = [Choice("a", ["b", "cc"], 0),  # ln .6 > ln .3 + ln .9: right either way
             Choice("a", ["b", "cccc"], 1),  # in total "b" wins (-0.51 > -1.52); per byte "cccc" (-0.38 > -0.51)
             Choice("a", ["d", "b"], 1)]
    scores = choice_accuracy(Bigram(), Letters(), items, torch.device("cpu"))
    assert scores == {"choice_acc": 2 / 3, "choice_acc_norm": 1.0}


def test_bits_per_byte_counts_the_bytes_the_tokens_spell():
    text = "In the beginning God created the heaven and the earth."
    torch.manual_seed(0)
    from lab.models import build_model

    byte = ByteTokenizer()
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2), byte.vocab_size).eval()
    ids = torch.tensor([[byte.bos_id] + byte.encode(text)])
    m = perplexity(model, [(ids[:, :-1], ids[:, 1:])], byte)
    assert m["bytes"] == m["tokens"] == len(text)  # the targets are the text, one byte per byte token
    assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2))
    bpe = train_sentencepiece(TokenizerConfig(vocab_size=300, special_tokens=[]), [text * 20] * 5)
    pieces = bpe.encode(text)
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2), bpe.vocab_size).eval()
    row = torch.tensor([[bpe.bos_id] + pieces + [bpe.eos_id]])
    m = perplexity(model, [(row[:, :-1], row[:, 1:])], bpe)
    assert m["bytes"] == len(text)  # the pieces spell the text exactly; eos spells nothing
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / m["bytes"])


def test_leakage_counts_whole_forbidden_words_only():
    s = reference_scores(["thee and thou", "the LORD", "nothing"], ["a", "b", "c"], forbidden=["the", "thou"])
    assert s["leakage"] == 2 / 3 and s["forbidden_words"] == 2.0  # "thee" and "nothing" are not "the"
    assert s["exact_match"] == 0.0


def test_task_files_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"prompt": "Is it?", "choices": ["yes", "no"], "answer": 1}\n'
                   '{"prompt": "Is it?", "choices": ["yes", "no"], "answer": 2}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: \"answer\"=2 must be the index of the right choice \(0 to 1\)"):
        read_choices(str(bad))
    bad.write_text('{"prompt": "Is it?", "choices": ["yes", "no"], "answer": "no"}\n')
    assert read_choices(str(bad))[0].answer == 1
    refs = tmp_path / "r.jsonl"
    refs.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match=rf"{refs}:1: needs \"reference\""):
        read_references(str(refs))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n')
    with pytest.raises(DataError, match=rf"{prompts}:2: needs a \"prompt\" \(text\) or \"messages\""):
        read_prompts(str(prompts), "generate.prompts")
    with pytest.raises(DataError, match="generate.prompts='nowhere.txt': no such file"):
        read_prompts("nowhere.txt", "generate.prompts")
