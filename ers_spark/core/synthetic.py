"""Synthetic data for tests and benchmarks: vMF face embeddings and image degradations.

Embeddings
----------
Identities are von Mises-Fisher (vMF) clouds around random unit centres; the
unrecognizable identity (UI, label ``-1``) is one more cloud around its own
centre, larger and more diffuse (smaller kappa), as in the paper's
observation that unrecognizable images of every identity collapse into one
cluster.

With the defaults (``dim=128, kappa=800, ui_kappa=300``) a member's cosine to
its own centre concentrates near 0.925 (identities) and 0.81 (UI), so the
cosine distance between two members is about 0.145 (identities) and 0.34
(UI), while members of different clouds are at cosine distance ~1 (random
centres in 128-D are nearly orthogonal; the closest of 100k centres still have
cosine ~0.5, i.e. member distance >= ~0.5). Single linkage on the defaults
therefore gives, for a cosine-distance eps in about **0.32-0.50**
(:data:`RECOMMENDED_EPS` = 0.4), every identity as its own cluster and the UI
as one big cluster; below ~0.3 the UI is fragmented into small pieces.
Measured (seed 3): 2,000 identities x 10 + 10 % UI (22,222 rows): UI connected
at eps 0.31, first merge of two different clouds at 0.55; 300 x 3 + 10 % UI:
0.31 and 0.63. More rows make the UI connect at a smaller eps and bring
the closest identities nearer, so the window narrows slowly with scale.

Images
------
:func:`degrade` turns a recognisable image into an unrecognizable one with
numpy, scipy.ndimage and PIL only.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFAULT_KAPPA",
    "DEFAULT_UI_KAPPA",
    "RECOMMENDED_EPS",
    "DEGRADATIONS",
    "sample_vmf",
    "vmf_layout",
    "iter_vmf_chunks",
    "vmf_embeddings",
    "degrade",
    "degrade_random",
]

DEFAULT_KAPPA = 800.0
DEFAULT_UI_KAPPA = 300.0
RECOMMENDED_EPS = 0.4
_BLOCK_ROWS = 8192  # internal generation block; output does not depend on chunk_rows

F32 = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


# --------------------------------------------------------------------------- vMF sampling


def _wood_w(kappa: float, dim: int, m: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Cosines to the mean direction of ``m`` vMF samples (Wood 1994), vectorised rejection."""
    p1 = dim - 1.0
    b = p1 / (2.0 * kappa + np.sqrt(4.0 * kappa * kappa + p1 * p1))  # stable form
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + p1 * np.log(1.0 - x0 * x0)
    out = np.empty(m, dtype=np.float64)
    filled = 0
    while filled < m:
        need = m - filled
        k = need + need // 4 + 16
        z = rng.beta(p1 / 2.0, p1 / 2.0, size=k)
        w = (1.0 - (1.0 + b) * z) / (1.0 - (1.0 - b) * z)
        u = rng.random(k)
        ok = kappa * w + p1 * np.log(1.0 - x0 * w) - c >= np.log(u)
        acc = w[ok][:need]
        out[filled : filled + acc.size] = acc
        filled += acc.size
    return out


def sample_vmf(mus: npt.ArrayLike, kappa: float, rng: np.random.Generator) -> F32:
    """One vMF sample per row of ``mus`` (unit mean directions), concentration ``kappa``.

    Examples
    --------
    >>> x = sample_vmf(np.eye(3)[[0, 0]], 1e4, np.random.default_rng(0))
    >>> x.shape, bool(np.all(x[:, 0] > 0.99))
    ((2, 3), True)
    """
    mu = np.asarray(mus, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[1] < 2:
        raise ValueError(f"sample_vmf: mus must have shape (m, d) with d >= 2, got {mu.shape}")
    if kappa <= 0:
        raise ValueError(f"sample_vmf: kappa must be > 0, got {kappa}")
    m, d = mu.shape
    w = _wood_w(float(kappa), d, m, rng)
    v = rng.standard_normal((m, d))
    v -= np.sum(v * mu, axis=1, keepdims=True) * mu
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    x = w[:, None] * mu + np.sqrt(np.clip(1.0 - w * w, 0.0, None))[:, None] * v
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _check_params(n_identities: int, per_identity: int, dim: int, ui_share: float) -> None:
    if n_identities < 0 or per_identity < 1:
        raise ValueError(
            f"vmf: need n_identities >= 0 and per_identity >= 1, got {n_identities} and {per_identity}"
        )
    if dim < 2:
        raise ValueError(f"vmf: dim must be >= 2, got {dim}")
    if not 0.0 <= ui_share < 1.0:
        raise ValueError(f"vmf: ui_share must be in [0, 1), got {ui_share}")


def vmf_layout(n_identities: int, per_identity: int, ui_share: float = 0.1, seed: int = 0) -> IntArray:
    """Shuffled label of every row: identities ``0..n_identities-1`` (``per_identity`` rows each)
    and ``round(ui_share / (1 - ui_share) * n_identities * per_identity)`` UI rows labelled ``-1``.
    """
    _check_params(n_identities, per_identity, 2, ui_share)
    n_id_rows = n_identities * per_identity
    n_ui = int(round(ui_share / (1.0 - ui_share) * n_id_rows))
    labels = np.concatenate(
        [np.repeat(np.arange(n_identities, dtype=np.int64), per_identity), np.full(n_ui, -1, np.int64)]
    )
    return np.random.default_rng([seed, 2]).permutation(labels)


def iter_vmf_chunks(
    n_identities: int,
    per_identity: int,
    dim: int = 128,
    kappa: float = DEFAULT_KAPPA,
    ui_share: float = 0.1,
    ui_kappa: float = DEFAULT_UI_KAPPA,
    seed: int = 0,
    chunk_rows: int = 65_536,
) -> Iterator[tuple[F32, IntArray]]:
    """Yield ``(embeddings float32 unit, labels int64)`` chunks of at most ``chunk_rows`` rows.

    Rows are generated in fixed internal blocks with their own seeds, so the
    concatenated output is identical for every ``chunk_rows``; memory is
    ``O(chunk_rows * dim + n_identities * dim + n_rows)`` (8 bytes per row for
    the label layout), e.g. about 70 MB for 1M rows from 100k identities.
    """
    _check_params(n_identities, per_identity, dim, ui_share)
    if chunk_rows < 1:
        raise ValueError(f"iter_vmf_chunks: chunk_rows must be >= 1, got {chunk_rows}")
    crng = np.random.default_rng([seed, 0])
    centres = crng.standard_normal((n_identities + 1, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)  # last row: UI centre
    labels = vmf_layout(n_identities, per_identity, ui_share, seed)
    n = labels.size

    def block(bi: int) -> F32:
        lab = labels[bi * _BLOCK_ROWS : (bi + 1) * _BLOCK_ROWS]
        rng = np.random.default_rng([seed, 1, bi])
        out = np.empty((lab.size, dim), dtype=np.float32)
        is_ui = lab < 0
        for mask, kap in ((~is_ui, kappa), (is_ui, ui_kappa)):
            if mask.any():
                mu = centres[np.where(lab[mask] < 0, n_identities, lab[mask])]
                out[mask] = sample_vmf(mu, kap, rng)
        return out

    pending: list[F32] = []
    have = 0
    start = 0
    for bi in range((n + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
        pending.append(block(bi))
        have += pending[-1].shape[0]
        while have >= chunk_rows:
            buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield buf[:chunk_rows], labels[start : start + chunk_rows]
            start += chunk_rows
            rest = buf[chunk_rows:]
            pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]
    if have:
        buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
        yield buf, labels[start:]


def vmf_embeddings(
    n_identities: int,
    per_identity: int,
    dim: int = 128,
    kappa: float = DEFAULT_KAPPA,
    ui_share: float = 0.1,
    ui_kappa: float = DEFAULT_UI_KAPPA,
    seed: int = 0,
) -> tuple[F32, IntArray]:
    """All rows of :func:`iter_vmf_chunks` at once: ``(embeddings, labels)``, UI label ``-1``.

    Examples
    --------
    >>> x, y = vmf_embeddings(5, 4, dim=16, ui_share=0.2)
    >>> x.shape, int((y == -1).sum())
    ((25, 16), 5)
    """
    parts = list(
        iter_vmf_chunks(n_identities, per_identity, dim, kappa, ui_share, ui_kappa, seed, chunk_rows=1 << 30)
    )
    if not parts:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return parts[0]


# --------------------------------------------------------------------------- image degradations

DEGRADATIONS: tuple[str, ...] = ("blur", "lowres", "dark", "occlusion", "motion", "noise")


def _check_image(image: Any) -> U8:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"degrade: image must be uint8, got dtype {img.dtype}")
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"degrade: image must be HxW or HxWx3, got shape {img.shape}")
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"degrade: image must be at least 2x2, got shape {img.shape}")
    return img


def _per_channel(img: U8, fn: Any) -> npt.NDArray[np.float64]:
    f = img.astype(np.float64)
    if f.ndim == 2:
        return np.asarray(fn(f))
    return np.stack([fn(f[:, :, ch]) for ch in range(f.shape[2])], axis=2)


def _to_u8(x: npt.NDArray[Any]) -> U8:
    out: U8 = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def _motion_kernel(length: int, angle: float) -> npt.NDArray[np.float64]:
    size = length if length % 2 else length + 1
    k = np.zeros((size, size), dtype=np.float64)
    c = size // 2
    t = np.linspace(-c, c, 4 * size)
    rr = np.rint(c + t * np.sin(angle)).astype(int)
    cc = np.rint(c + t * np.cos(angle)).astype(int)
    k[rr, cc] = 1.0
    out: npt.NDArray[np.float64] = k / k.sum()
    return out


def degrade(image: npt.ArrayLike, kind: str, rng: np.random.Generator) -> U8:
    """Make an image unrecognizable; returns a uint8 array of the same shape.

    Kinds: ``blur`` (Gaussian, sigma 6-10 % of the image side), ``lowres``
    (down to 6-10 px on the long side, then back up), ``dark`` (brightness x
    0.03-0.12), ``occlusion`` (black box over 50-75 % of each side), ``motion``
    (line kernel 20-35 % of the side at a random angle), ``noise`` (Gaussian,
    sigma 70-110 grey levels).

    Examples
    --------
    >>> img = np.full((32, 32), 200, np.uint8)
    >>> int(degrade(img, "dark", np.random.default_rng(0)).max()) < 30
    True
    """
    img = _check_image(image)
    if kind not in DEGRADATIONS:
        raise ValueError(f"degrade: unknown kind {kind!r}; expected one of {', '.join(DEGRADATIONS)}")
    h, w = img.shape[:2]
    side = max(h, w)
    if kind == "blur":
        sigma = side * rng.uniform(0.06, 0.10)
        return _to_u8(_per_channel(img, lambda c: ndimage.gaussian_filter(c, sigma, mode="nearest")))
    if kind == "lowres":
        target = int(rng.integers(6, 11))
        scale = target / side
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        pil = Image.fromarray(img)
        small = pil.resize((sw, sh), Image.Resampling.BOX)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
    if kind == "dark":
        return _to_u8(img.astype(np.float64) * rng.uniform(0.03, 0.12))
    if kind == "occlusion":
        bh = max(1, int(round(h * rng.uniform(0.5, 0.75))))
        bw = max(1, int(round(w * rng.uniform(0.5, 0.75))))
        y0 = int(rng.integers(0, h - bh + 1))
        x0 = int(rng.integers(0, w - bw + 1))
        out = img.copy()
        out[y0 : y0 + bh, x0 : x0 + bw] = 0
        return out
    if kind == "motion":
        length = max(3, int(round(side * rng.uniform(0.20, 0.35))))
        kern = _motion_kernel(length, rng.uniform(0.0, np.pi))
        return _to_u8(_per_channel(img, lambda c: ndimage.convolve(c, kern, mode="nearest")))
    # noise
    sigma = rng.uniform(70.0, 110.0)
    return _to_u8(img.astype(np.float64) + rng.normal(0.0, sigma, size=img.shape))


def degrade_random(image: npt.ArrayLike, rng: np.random.Generator) -> tuple[U8, str]:
    """Apply one degradation drawn uniformly from :data:`DEGRADATIONS`; returns ``(image, kind)``."""
    kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    return degrade(image, kind, rng), kind
