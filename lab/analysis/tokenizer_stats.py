"""`analysis=tokenizer`: how well tokenizers fit a corpus, side by side.

The corpus is the data group's documents (`data=kjv`: the King James Bible by chapter). For each
tokenizer: the share of its vocabulary the corpus uses (coverage), tokens per character and per
whitespace word, the share of tokens that are its unknown token, and two packing figures over the
corpus's lines (for the KJV, its verses), each followed by an end-of-sequence token as packing
adds one: the packing efficiency of whole lines put in order into rows of `data.seq_len` tokens
(a line never split unless it alone exceeds a row; efficiency = line tokens / row slots), and
how many whole lines fit a context of `analysis.tokenizer.context` tokens (GREMLIN's context
window efficiency).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab.analysis.inputs import Report, Source, pyplot
from lab.data.sources import read_sources
from lab.formats.hf_tokenizer import load_any_tokenizer


TRAINABLE = ("byte", "bpe", "unigram")  # tokenizer kinds named in analysis.tokenizer.tokenizers are trained on the data


def next_fit(lengths: np.ndarray, capacity: int) -> int:
    """Rows needed to pack units of `lengths` in order, never splitting one that fits in a row."""
    rows, free = 0, 0
    for n in lengths.tolist():
        if n > capacity:  # cut into full rows, its remainder opens the next
            full, n = divmod(n, capacity)
            rows, free = rows + full, 0
            if n == 0:
                continue
        if n > free:
            rows, free = rows + 1, capacity
        free -= n
    return rows


def tokenizer_row(name: str, tokenizer: Any, docs: list[str], lines: list[str], seq_len: int, context: int) -> dict:
    """The figures of one tokenizer on the corpus (see the module doc)."""
    ids = tokenizer.encode_batch(docs)
    flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
    chars, words = sum(map(len, docs)), sum(len(d.split()) for d in docs)
    line_tokens = np.array([len(r) + 1 for r in tokenizer.encode_batch(lines)])  # + eos
    unk = tokenizer.unk_id
    return {"tokenizer": name, "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "coverage": len(np.unique(flat)) / tokenizer.vocab_size, "tokens": len(flat),
            "tokens_per_char": len(flat) / chars, "tokens_per_word": len(flat) / words,
            "unk_rate": float((flat == unk).mean()) if unk is not None else 0.0,
            "packing_efficiency": line_tokens.sum() / (next_fit(line_tokens, seq_len) * seq_len),
            "lines_per_context": len(lines) / next_fit(line_tokens, context),
            "sha256": tokenizer.sha256[:12]}


def tokenizers_named(run, sources: list[Source]) -> list[tuple[str, Any]]:
    """analysis.tokenizer.tokenizers, then the analysed checkpoints' tokenizers; none: the tokenizer group."""
    cfg = run.cfg
    named = []
    for i, spec in enumerate(cfg.analysis.tokenizer.tokenizers):
        key, folder = f"analysis.tokenizer.tokenizers[{i}]", Path(spec).expanduser()
        if spec in TRAINABLE:  # trained on the data group's train split at tokenizer.vocab_size, as pretraining would
            named.append(_trained(cfg, spec))
        elif (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            named.append((folder.name, load_any_tokenizer(folder)))
        else:  # a checkpoint or run, as init_from takes it
            pre = run.resolve(spec, key=key)
            named.append((Source(key, spec, pre).label, pre.tokenizer()))
    named += [(s.label, s.tokenizer()) for s in sources]
    return named or [_trained(cfg, cfg.tokenizer.kind)]


def _trained(cfg, kind: str) -> tuple[str, Any]:
    """The tokenizer of this kind that pretraining on the data group would train (cached by content)."""
    from lab.data import prepare_data

    tok_cfg = dataclasses.replace(cfg.tokenizer, name=kind, kind=kind)
    tok = prepare_data(cfg.data, tok_cfg, Path(cfg.paths.cache)).tokenizer
    return f"{kind}-{tok.vocab_size}", tok


def tokenizer_analysis(run, sources: list[Source], report: Report) -> float:
    """Tabulate and chart every tokenizer on the corpus. Returns the first one's tokens per character."""
    cfg = run.cfg
    docs = [d for source in read_sources(cfg.data) for d in source]
    lines = [ln for d in docs for ln in d.splitlines() if ln.strip()]
    table = pd.DataFrame([tokenizer_row(name, tok, docs, lines, cfg.data.seq_len, cfg.analysis.tokenizer.context)
                          for name, tok in tokenizers_named(run, sources)])
    report.table("tokenizers", table)
    report.json("tokenizers", {"corpus": cfg.data.name, "documents": len(docs), "lines": len(lines),
                               "characters": sum(map(len, docs)), "seq_len": cfg.data.seq_len,
                               "context": cfg.analysis.tokenizer.context, "tokenizers": table.to_dict(orient="records")})
    first = table.iloc[0]
    for key in ("coverage", "tokens_per_char", "tokens_per_word", "unk_rate", "packing_efficiency", "lines_per_context"):
        report.metric(f"tokenizer/{key}", first[key])
    report.figure("tokenizers", _plot(table))
    run.say(f"tokenizer: data={cfg.data.name}, {len(docs):,} documents, {len(lines):,} lines")
    run.say(table.drop(columns=["sha256"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return float(first["tokens_per_char"])


def _plot(table: pd.DataFrame):
    plt = pyplot()
    keys = ["tokens_per_char", "coverage", "packing_efficiency", "lines_per_context"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        ax.bar(range(len(table)), table[key], color="tab:blue")
        ax.set_xticks(range(len(table)), table["tokenizer"], rotation=45, ha="right", fontsize=7)
        ax.set_title(key.replace("_", " "), fontsize=9)
    fig.tight_layout()
    return fig
