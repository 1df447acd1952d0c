"""`analysis=concepts`: do a model's verse embeddings cluster by book and testament?

`analysis.verses` KJV verses, spread evenly over the Bible, are embedded (final hidden states,
pooled by `analysis.pooling`), centred and scaled to unit length, then clustered with k-means
(scikit-learn: k-means++ with 10 restarts, seeded by `train.seed`). Reported: the silhouette of
the clustering (cosine), and its agreement with the books and with the two testaments as the
adjusted Rand index (0 for chance, 1 for identical partitions). The 2-D projection is the
embeddings' first two principal components, coloured by testament and by cluster.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lab.analysis.inputs import Report, Source, need, pyplot, spread_indices, verse_embeddings
from lab.data.verses import book_names, kjv_verses

OLD_TESTAMENT_BOOKS = 39  # Genesis .. Malachi


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def cluster(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def agreement(x: np.ndarray, clusters: np.ndarray, books: np.ndarray) -> dict[str, float]:
    """Silhouette of the clustering, and its adjusted Rand index against books and testaments."""
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    testaments = (books > OLD_TESTAMENT_BOOKS).astype(int)
    return {"silhouette": float(silhouette_score(x, clusters, metric="cosine")),
            "ari_books": float(adjusted_rand_score(books, clusters)),
            "ari_testaments": float(adjusted_rand_score(testaments, clusters))}


def project(x: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, 2): the first two principal components."""
    centred = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def concepts(run, sources: list[Source], report: Report) -> float:
    """Cluster, score, tabulate and draw. Returns the adjusted Rand index against the books."""
    cfg = run.cfg.analysis
    need(sources, "concepts", 1, 1)
    verses = kjv_verses()
    idx = spread_indices(len(verses.keys), cfg.verses)
    books = np.array([verses.keys[i][0] for i in idx])
    k = cfg.concepts.clusters or len(np.unique(books))
    x = unit_rows(verse_embeddings(sources[0].model(), sources[0].tokenizer(), [verses.texts[i] for i in idx],
                                   cfg.verse_tokens, cfg.pooling))
    clusters = cluster(x, k, run.cfg.train.seed)
    scores = agreement(x, clusters, books)
    xy = project(x)
    names = book_names()
    report.table("concepts", pd.DataFrame({
        "verse": [f"{names[b - 1]} {c}:{v}" for b, c, v in (verses.keys[i] for i in idx)],
        "book": [names[b - 1] for b in books], "testament": np.where(books > OLD_TESTAMENT_BOOKS, "new", "old"),
        "cluster": clusters, "pc1": xy[:, 0], "pc2": xy[:, 1]}))
    report.json("concepts", {"verses": len(idx), "clusters": k, "pooling": cfg.pooling, **scores})
    for name, value in scores.items():
        report.metric(f"concepts/{name}", value)
    report.figure("concepts_projection", _plot(xy, books, clusters, scores, sources[0].label))
    run.say(f"concepts: {len(idx)} verses in {k} clusters: silhouette {scores['silhouette']:.3f}, "
            f"ARI books {scores['ari_books']:.3f}, ARI testaments {scores['ari_testaments']:.3f}")
    return scores["ari_books"]


def _plot(xy: np.ndarray, books: np.ndarray, clusters: np.ndarray, scores: dict[str, float], label: str):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    old = books <= OLD_TESTAMENT_BOOKS
    left.scatter(xy[old, 0], xy[old, 1], s=6, c="tab:brown", label="Old Testament")
    left.scatter(xy[~old, 0], xy[~old, 1], s=6, c="tab:blue", label="New Testament")
    left.legend(fontsize=9)
    left.set_title(f"by testament (ARI {scores['ari_testaments']:.3f})", fontsize=9)
    right.scatter(xy[:, 0], xy[:, 1], s=6, c=clusters, cmap="tab20")
    right.set_title(f"by k-means cluster (silhouette {scores['silhouette']:.3f}, ARI books {scores['ari_books']:.3f})",
                    fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle(f"verse embeddings of {label}, first two principal components", fontsize=10)
    return fig
