"""Which cluster is the UI: cluster sizes, dominance and the choice of eps, on a driver-side sample.

The paper's unrecognizable identity (UI) is the largest single-linkage cluster, far above the
next, at the cut where identities are still separate. :func:`choose_eps` finds that cut on a
grid of eps (scipy single linkage on a sample); :func:`dominant_cluster` and
:func:`cluster_sizes` apply the same rule to any labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.cluster.hierarchy import fcluster, linkage

from ers_spark.errors import ClusteringError

__all__ = [
    "EpsChoice",
    "cluster_sizes",
    "dominant_cluster",
    "identity_clusters",
    "separated_limit",
    "first_absorption",
    "choose_eps",
]

IntArray = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class EpsChoice:
    """Outcome of :func:`choose_eps`: eps, labels at that eps, and per grid eps the top-5 sizes
    and the number of identity-sized clusters outside the largest."""

    eps: float
    labels: IntArray
    size_table: list[tuple[float, list[int], int]]
    rule: str


def cluster_sizes(labels: npt.ArrayLike) -> IntArray:
    """Cluster sizes, largest first.

    Examples
    --------
    >>> cluster_sizes([3, 1, 3, 2, 3, 1]).tolist()
    [3, 2, 1]
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return np.sort(counts.astype(np.int64))[::-1].copy()


def _dominance(labels: npt.ArrayLike, ratio: float, min_share: float) -> tuple[bool, Any, IntArray]:
    lab = np.asarray(labels)
    if lab.size == 0:
        return False, None, np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(lab, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    sizes = counts[order].astype(np.int64)
    largest = int(sizes[0])
    second = int(sizes[1]) if sizes.size > 1 else 0
    dominant_ratio = largest >= 2 if second == 0 else largest >= ratio * second
    ok = dominant_ratio and largest >= min_share * lab.size
    return ok, uniq[order[0]], sizes


def dominant_cluster(labels: npt.ArrayLike, ratio: float, min_share: float) -> Any:
    """Label of the largest cluster if it dominates, else ClusteringError.

    Dominant means ``largest >= ratio * second`` (no second cluster counts as
    dominant only if the largest has at least 2 members) and ``largest >=
    min_share * n``.

    Examples
    --------
    >>> dominant_cluster([7, 7, 7, 7, 2, 5], ratio=2.0, min_share=0.5)
    7
    """
    ok, lab, sizes = _dominance(labels, ratio, min_share)
    if not ok:
        n = int(sizes.sum())
        raise ClusteringError(
            f"no dominant cluster: top sizes {sizes[:5].tolist()} of {n} rows; need largest >= "
            f"{ratio:g} x second and >= {min_share:g} of rows"
        )
    return lab.item() if hasattr(lab, "item") else lab


def identity_clusters(sizes: IntArray, identity_min_size: int) -> int:
    """Clusters of at least ``identity_min_size`` members other than the largest (``sizes`` largest first).

    >>> identity_clusters(np.array([40, 10, 9, 3, 1]), 5)
    2
    """
    return int(np.count_nonzero(np.asarray(sizes)[1:] >= identity_min_size))


def separated_limit(counts: npt.ArrayLike, tolerance: float) -> int:
    """Index of the last grid eps at which identities are still separate.

    From the first peak of ``counts`` (identity-sized clusters per ascending eps) walk up while
    the count stays >= ``(1 - tolerance) * peak``; past that eps identity-sized clusters vanish,
    absorbed by the largest cluster or merged with each other.

    >>> separated_limit([0, 20, 46, 45, 43, 42, 40, 37, 27], 0.1)
    5
    """
    c = np.asarray(counts, dtype=np.int64)
    peak = int(np.argmax(c))
    floor = (1.0 - tolerance) * c[peak]
    last = peak
    while last + 1 < c.size and c[last + 1] >= floor:
        last += 1
    return last


def _eps_table(x: F64, grid: F64, ratio: float, min_share: float) -> list[tuple[float, IntArray, IntArray, bool]]:
    """Per grid eps (ascending): labels, sizes and dominance of one scipy single linkage cut there."""
    z = linkage(x, method="single", metric="cosine")
    rows = []
    for eps in grid:
        lab = fcluster(z, t=float(eps), criterion="distance").astype(np.int64)
        ok, _, sizes = _dominance(lab, ratio, min_share)
        rows.append((float(eps), lab, sizes, ok))
    return rows


def first_absorption(labels_per_eps: list[IntArray], identity_min_size: int) -> int | None:
    """Index of the first grid eps whose largest cluster took in another cluster of >= ``identity_min_size``.

    The largest cluster at eps ``k`` is made of clusters of eps ``k - 1``; besides its biggest part
    (the previous core), any part of ``identity_min_size`` or more images is an absorbed identity.

    >>> first_absorption([np.array([1, 1, 1, 2, 2, 2, 3]), np.array([1, 1, 1, 1, 1, 1, 3])], 3)
    1
    """
    for k in range(1, len(labels_per_eps)):
        cur, prev = labels_per_eps[k], labels_per_eps[k - 1]
        parts = np.sort(np.unique(prev[cur == np.bincount(cur).argmax()], return_counts=True)[1])[::-1]
        if parts.size > 1 and parts[1] >= identity_min_size:
            return k
    return None


def _candidates(rows: list, counts: list[int], tolerance: float, identity_min_size: int,
                separated: bool) -> tuple[list, str, int]:
    """Grid rows to try, best first, the rule that limits them, and the last index the rule allows."""
    if separated:
        limit = separated_limit(counts, tolerance)
        return list(reversed(rows[: limit + 1])), "largest eps before identities merge", limit
    absorbed = first_absorption([r[1] for r in rows], identity_min_size)
    limit = len(rows) - 1 if absorbed is None else absorbed - 1
    apart = [r for r in rows[: limit + 1] if r[2].size > 1]  # one cluster holding every row is no UI
    return list(reversed(apart)), "largest eps before the largest cluster absorbs an identity-sized one", limit


def _no_ui_message(table: list, limit: int, ratio: float, min_share: float, n: int, separated: bool) -> str:
    sizes = "; ".join(f"eps={e:g}: {s} ({c} identity-sized)" for e, s, c in table)
    need = f"largest >= {ratio:g} x second and >= {min_share:g} of {n} rows"
    what = "identities stay separate" if separated else "the largest cluster absorbs no identity-sized cluster"
    return f"no UI here: {what} up to eps={table[limit][0]:g} and no cluster up to there has {need}; top sizes per eps: {sizes}"


def choose_eps(
    embeddings: npt.ArrayLike, grid: npt.ArrayLike, ratio: float, min_share: float, *,
    identity_min_size: int, identity_tolerance: float,
) -> EpsChoice:
    """The largest eps in ``grid`` at which identities are still separate and the largest cluster dominates.

    The paper's UI is the largest cluster, far above the next, at the cut where identities are
    still separate. Identities count as separate up to :func:`separated_limit` of the number of
    clusters with >= ``identity_min_size`` members outside the largest; among those eps the
    largest one with a dominant cluster (:func:`dominant_cluster`) is chosen, so the UI gathers
    as many unrecognizable images as it can before it absorbs identities. When the data show too
    few identity-sized clusters for that (fewer than ``1 / identity_tolerance`` at every eps,
    e.g. one image per person), the limit is instead the eps before the largest cluster first
    takes in a cluster of ``identity_min_size`` or more (:func:`first_absorption`), and a cut
    that puts every row in one cluster is never a UI; ``rule`` says which. ``size_table`` lists
    per eps the top-5 sizes and that count. Raises ClusteringError ("no UI here", with the
    table) when no eps qualifies, e.g. on recognizable faces only.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    g = np.unique(np.asarray(grid, dtype=np.float64).ravel())
    if g.size == 0:
        raise ValueError("choose_eps: grid is empty")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ClusteringError(f"choose_eps needs at least 2 embeddings, got shape {x.shape}")
    rows = _eps_table(x, g, ratio, min_share)
    table = [(eps, sizes[:5].tolist(), identity_clusters(sizes, identity_min_size)) for eps, _, sizes, _ in rows]
    counts = [c for _, _, c in table]
    separated = max(counts) * identity_tolerance >= 1  # identities visible: one may vanish within the tolerance
    candidates, rule, limit = _candidates(rows, counts, identity_tolerance, identity_min_size, separated)
    chosen = next((r for r in candidates if r[3]), None)
    if chosen is None:
        raise ClusteringError(_no_ui_message(table, limit, ratio, min_share, x.shape[0], separated))
    return EpsChoice(eps=chosen[0], labels=chosen[1], size_table=table, rule=rule)
