"""`analysis=alignment`: how far apart two spaces of verse embeddings are, up to a rotation.

The same verses are embedded twice: in two languages under one checkpoint, or in one language
under two checkpoints. Both sides are centred and scaled to unit Frobenius norm, and the narrower
is padded with zero columns to the wider's width, so the rotation R is square and orthogonal
(orthogonal Procrustes: R = U Vᵀ from the SVD of XᵀY). The normalised distance

    d = ||X R - Y||² / (||X||² + ||Y||²) = 1 - ||XᵀY||_*   (the nuclear norm: the singular values' sum)

is 0 for a rotated copy and 1 for orthogonal spaces, and d(X, Y) = d(Y, X) for any two widths.
(Without the padding, R from a wider X to a narrower Y only has orthonormal columns, ||X R||² < 1,
and the residual no longer measures the distance.) The random baseline is d with Y's rows
shuffled (the verses no longer correspond), averaged over `analysis.alignment.permutations`
shuffles. Each book's share is the same ratio over its own verses, under the global rotation.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lab.analysis.inputs import Report, Source, need, pyplot, same_tokenizer, spread_indices, verse_embeddings
from lab.data.verses import LANGUAGES, book_names, translation_verses
from lab.errors import ConfigError


def normalise(x: np.ndarray) -> np.ndarray:
    """Centred on the mean row, scaled to unit Frobenius norm."""
    x = x - x.mean(0, keepdims=True)
    return x / np.linalg.norm(x)


def procrustes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Orthogonal Procrustes between the normalised spaces.

    Args:
        x: (N, d1) and y: (N, d2), row i of each the same item; the widths may differ.

    Returns:
        R (d, d), orthogonal, d = max(d1, d2); the residual X R - Y of the padded spaces, (N, d); the
        distance d, the same for (x, y) and (y, x) (and each row's residual norm too).
    """
    x, y = padded(normalise(x), normalise(y))
    u, s, vt = np.linalg.svd(x.T @ y)
    rotation = u @ vt
    residual = x @ rotation - y
    return rotation, residual, float((residual ** 2).sum() / 2.0)  # ||X||² + ||Y||² = 2


def padded(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both spaces at the wider width, the narrower with zero columns appended (norms unchanged)."""
    width = max(x.shape[1], y.shape[1])
    return tuple(np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in (x, y))


def random_baseline(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> float:
    """The mean distance once the correspondence is broken by shuffling Y's rows."""
    rng = np.random.default_rng(seed)
    return float(np.mean([procrustes(x, y[rng.permutation(len(y))])[2] for _ in range(permutations)]))


def by_group(x: np.ndarray, y: np.ndarray, residual: np.ndarray, groups: np.ndarray) -> pd.DataFrame:
    """Each group's distance: its residual energy over its own energy on both sides (normalised spaces).
    `residual` is `procrustes`'s, so each row's share is the same whichever side came first."""
    xn, yn = normalise(x), normalise(y)
    rows = []
    for g in np.unique(groups):
        sel = groups == g
        energy = (xn[sel] ** 2).sum() + (yn[sel] ** 2).sum()
        rows.append({"group": g, "verses": int(sel.sum()), "distance": float((residual[sel] ** 2).sum() / energy)})
    return pd.DataFrame(rows)


def alignment(run, sources: list[Source], report: Report) -> float:
    """Embed, align, write the per-book table, the summary and the bar chart. Returns the distance."""
    cfg = run.cfg.analysis
    need(sources, "alignment", 1, 2)
    langs = list(cfg.alignment.languages)
    if len(sources) == 1 and len(langs) != 2:
        raise ConfigError(f"analysis=alignment under one checkpoint compares two languages, but analysis.alignment."
                          f"languages={langs}; give two, e.g. [k,l], or a second checkpoint in analysis.runs")
    sides = [(sources[0], langs[0]), (sources[0], langs[1])] if len(sources) == 1 else [(s, langs[0]) for s in sources]
    models = {s: (s.model(), s.tokenizer()) for s in sources}
    if len(sources) == 2:
        same_tokenizer(sources[0], sources[1], "alignment", [models[s][1] for s in sources])
    texts = {lang: translation_verses(lang, "analysis.alignment.languages") for lang in set(langs)}
    keys = texts[langs[0]].keys
    idx = spread_indices(len(keys), cfg.verses)
    space = [verse_embeddings(*models[s], [texts[lang].texts[i] for i in idx], cfg.verse_tokens, cfg.pooling)
             for s, lang in sides]
    _, residual, distance = procrustes(*space)
    baseline = random_baseline(*space, cfg.alignment.permutations, run.cfg.train.seed)
    names = book_names()
    books = by_group(*space, residual, np.array([keys[i][0] for i in idx]))
    books.insert(0, "book", [names[b - 1] for b in books.pop("group")])
    report.table("alignment_by_book", books)
    what = [f"{s.label} {LANGUAGES[lang]}" for s, lang in sides]
    report.json("alignment", {"sides": what, "verses": len(idx), "pooling": cfg.pooling, "distance": distance,
                              "random_baseline": baseline, "distance_over_baseline": distance / baseline,
                              "widths": [e.shape[1] for e in space]})
    report.metric("alignment/distance", distance)
    report.metric("alignment/random_baseline", baseline)
    report.figure("alignment_by_book", _plot(books, distance, baseline, " vs ".join(what)))
    run.say(f"alignment: {' vs '.join(what)} over {len(idx)} verses: distance {distance:.4f}, "
            f"random baseline {baseline:.4f} ({distance / baseline:.2f}x)")
    return distance


def _plot(books: pd.DataFrame, distance: float, baseline: float, title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(8, len(books) * 0.22), 4))
    ax.bar(range(len(books)), books["distance"], color="tab:blue")
    ax.axhline(distance, color="black", lw=1, label=f"all verses {distance:.3f}")
    ax.axhline(baseline, color="tab:red", ls="--", lw=1, label=f"random baseline {baseline:.3f}")
    ax.set_xticks(range(len(books)), books["book"], rotation=90, fontsize=7)
    ax.set_ylabel("normalised Procrustes distance")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=9)
    return fig
