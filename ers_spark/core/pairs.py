"""Genuine and impostor pairs from identity labels, and their cosine similarities.

The labelled gamma calibrations (:mod:`ers_spark.core.calibration`) compare images two by two:
a *genuine* pair shows one identity twice, an *impostor* pair two identities. Small sets give
every pair; large ones a seeded uniform draw of each kind, so the result is deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ers_spark.core.ers import normalize_rows

__all__ = ["build_identity_pairs", "identity_pair_similarities"]

F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def _all_within_group_pairs(starts: IntArray, sizes: IntArray) -> tuple[IntArray, IntArray]:
    """All (p, q), p < q, of positions inside the same contiguous group (vectorised)."""
    n = int(sizes.sum())
    group_end = np.repeat(starts + sizes, sizes)  # exclusive end per position
    pos = np.arange(n, dtype=np.int64)
    counts = group_end - pos - 1
    p = np.repeat(pos, counts)
    first = np.cumsum(counts) - counts  # offset of each p's run
    q = p + 1 + (np.arange(p.size, dtype=np.int64) - np.repeat(first, counts))
    return p, q


def build_identity_pairs(
    identities: npt.ArrayLike, max_pairs: int = 200_000, seed: int = 0
) -> tuple[IntArray, IntArray, BoolArray]:
    """Genuine and impostor row-index pairs ``(i, j, is_same)`` from identity labels.

    Up to ``max_pairs // 2`` pairs of each kind. A kind with at most that many
    pairs is enumerated completely (vectorised); otherwise exactly
    ``max_pairs // 2`` pairs are drawn uniformly over all pairs of that kind,
    with replacement (duplicates possible, rare), from ``default_rng(seed)``,
    so the result is deterministic. Always ``i < j``; genuine pairs come first.
    Every label, including a "UI" label such as -1, is treated as an identity:
    pass only rows with real identity labels.
    """
    labels = np.asarray(identities)
    if labels.ndim != 1:
        raise ValueError(f"build_identity_pairs: identities must be 1-D, got shape {labels.shape}")
    if max_pairs < 2:
        raise ValueError(f"build_identity_pairs: max_pairs must be >= 2, got {max_pairs}")
    half = max_pairs // 2
    rng = np.random.default_rng(seed)
    inv, order, starts, sizes = _group_layout(labels)
    # genuine pairs draw from rng before impostor pairs: this order fixes the result for a seed
    gi, gj = _genuine_pairs(rng, order, starts, sizes, half)
    n_gen_total = int((sizes * (sizes - 1) // 2).sum())
    ii, jj = _impostor_pairs(rng, inv, n_gen_total, half)
    i_all = np.concatenate([gi, ii]).astype(np.int64)
    j_all = np.concatenate([gj, jj]).astype(np.int64)
    lo, hi = np.minimum(i_all, j_all), np.maximum(i_all, j_all)
    is_same = np.concatenate([np.ones(gi.size, bool), np.zeros(ii.size, bool)])
    return lo, hi, is_same


def _group_layout(labels: npt.NDArray[Any]) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """(label code per row, rows ordered by label, start and size of each label's run in that order).

    Why: with rows grouped into contiguous runs, a genuine pair is two positions in one run.
    """
    n = labels.size
    _, inv = np.unique(labels, return_inverse=True)
    inv = inv.astype(np.int64).ravel()
    order = np.argsort(inv, kind="stable").astype(np.int64)
    sorted_lab = inv[order]
    starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n]).astype(np.int64)
    return inv, order, starts, sizes


def _genuine_pairs(
    rng: np.random.Generator, order: IntArray, starts: IntArray, sizes: IntArray, half: int
) -> tuple[IntArray, IntArray]:
    """Row pairs with the same label: all of them when at most ``half``, else ``half`` drawn uniformly."""
    n_gen_total = int((sizes * (sizes - 1) // 2).sum())
    if n_gen_total <= half:
        p, q = _all_within_group_pairs(starts, sizes)
    else:
        # draw a group with probability proportional to its number of pairs, then a pair in it
        w = (sizes * (sizes - 1) / 2).astype(np.float64)
        grp = rng.choice(sizes.size, size=half, p=w / w.sum())
        s = sizes[grp]
        a = (rng.random(half) * s).astype(np.int64)
        b = (rng.random(half) * (s - 1)).astype(np.int64)
        b = b + (b >= a)
        p = starts[grp] + np.minimum(a, b)
        q = starts[grp] + np.maximum(a, b)
    return order[p], order[q]


def _impostor_pairs(rng: np.random.Generator, inv: IntArray, n_gen_total: int, half: int) -> tuple[IntArray, IntArray]:
    """Row pairs ``i < j`` with different labels: all when at most ``half``, else ``half`` drawn uniformly.

    Why rejection sampling: uniform over all impostor pairs without listing them (n^2 for big sets).
    """
    n = inv.size
    if n * (n - 1) // 2 - n_gen_total <= half:
        ii, jj = np.triu_indices(n, k=1)
        keep = inv[ii] != inv[jj]
        return ii[keep].astype(np.int64), jj[keep].astype(np.int64)
    got_i: list[IntArray] = []
    got_j: list[IntArray] = []
    have = 0
    while have < half:
        m = 2 * (half - have) + 16
        a = rng.integers(0, n, size=m)
        b = rng.integers(0, n, size=m)
        ok = inv[a] != inv[b]
        a, b = a[ok], b[ok]
        got_i.append(np.minimum(a, b))
        got_j.append(np.maximum(a, b))
        have += a.size
    return np.concatenate(got_i)[:half].astype(np.int64), np.concatenate(got_j)[:half].astype(np.int64)



def identity_pair_similarities(
    embeddings: npt.ArrayLike, identities: npt.ArrayLike, *, max_pairs: int, seed: int
) -> tuple[IntArray, IntArray, BoolArray, F64]:
    """Pairs from :func:`build_identity_pairs` and their cosine similarities (in chunks of 65,536 pairs,
    so no pairs x dimension matrix is built)."""
    emb = normalize_rows(embeddings)
    i, j, same = build_identity_pairs(np.asarray(identities), max_pairs=max_pairs, seed=seed)
    sim = np.empty(i.size, dtype=np.float64)
    step = 65_536
    for k in range(0, i.size, step):
        sim[k : k + step] = np.einsum("ij,ij->i", emb[i[k : k + step]], emb[j[k : k + step]], dtype=np.float64)
    return i, j, same, sim
