"""Linear CKA between the blocks of two models on the same tokens, and each block's soft alignment.

CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = X X^T, L = Y Y^T over the
n token positions (rows), and the unbiased HSIC estimator (Song et al., 2012):

    HSIC(K, L) = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1 ] / (n (n-3))

where K~, L~ are K, L with their diagonals set to zero. With linear kernels every term is computed in
feature space, never forming an n x n matrix:

    tr(K~ L~)  = ||X^T Y||_F^2 - sum_i |x_i|^2 |y_i|^2
    K~ 1       = X (X^T 1) - (|x_i|^2)_i            1^T K~ 1 = sum of K~ 1
    1^T K~ L~ 1 = (K~ 1) . (L~ 1)

so a pair of blocks costs O(n D_x D_y). ``tests/reference.py`` holds the direct O(n^2) version.

Soft alignment of block i of model A in model B (the paper's measure): the CKA-weighted mean index of
the k = 5 blocks of B most similar to it, sum_j cka_ij j / sum_j cka_ij over those j.

Shape legend: N token positions, D feature width, La / Lb blocks of models A / B.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engram.analysis.hooks import record_hidden
from engram.analysis.lens import autocast


class _Features:
    """One block's features [N, D] (float64) and the quantities every HSIC with them needs."""

    def __init__(self, x_ND: torch.Tensor) -> None:
        if x_ND.dim() != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(x_ND.shape)}")
        self.x = x_ND.double()
        self.n = self.x.shape[0]
        if self.n < 4:
            raise ValueError(f"the unbiased HSIC needs at least 4 positions, got {self.n}")
        self.diag_N = (self.x * self.x).sum(1)  # K_ii
        self.row_N = self.x @ self.x.sum(0) - self.diag_N  # K~ 1
        self.total = self.row_N.sum()  # 1^T K~ 1


def _hsic(a: _Features, b: _Features) -> torch.Tensor:
    n = a.n
    tr = (a.x.T @ b.x).pow(2).sum() - (a.diag_N * b.diag_N).sum()
    return (tr + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (a.row_N @ b.row_N)) / (n * (n - 3))


def hsic_unbiased(x_ND: torch.Tensor, y_ND: torch.Tensor) -> float:
    """The unbiased HSIC of the linear kernels of X and Y (rows: the same n positions)."""
    if x_ND.shape[0] != y_ND.shape[0]:
        raise ValueError(f"X and Y must hold the same positions, got {x_ND.shape[0]} and {y_ND.shape[0]} rows")
    return float(_hsic(_Features(x_ND), _Features(y_ND)))


def linear_cka(x_ND: torch.Tensor, y_ND: torch.Tensor) -> float:
    """Linear CKA of X and Y with the unbiased HSIC estimator."""
    return float(cka_matrix([x_ND], [y_ND])[0, 0])


def cka_matrix(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """[La, Lb] linear CKA between every block of A and every block of B (float64)."""
    fa = [_Features(x) for x in feats_a]
    fb = [_Features(y) for y in feats_b]
    if {f.n for f in fa + fb} != {fa[0].n}:
        raise ValueError("every block of both models must hold the same token positions")
    self_a = torch.stack([_hsic(f, f) for f in fa])
    self_b = torch.stack([_hsic(f, f) for f in fb])
    out = torch.empty(len(fa), len(fb), dtype=torch.float64)
    for i, a in enumerate(fa):
        for j, b in enumerate(fb):
            out[i, j] = _hsic(a, b) / (self_a[i] * self_b[j]).sqrt()
    return out


def soft_alignment(cka_AB: torch.Tensor, k: int = 5) -> list[float]:
    """For each row (block of A): the CKA-weighted mean column index of its top-k columns (blocks of B).

    With k near B's depth every row averages nearly all columns and the alignment flattens towards the
    middle index: a shallow model needs a smaller k."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    k = min(k, cka_AB.shape[1])
    vals, idx = cka_AB.topk(k, dim=1)
    w = vals.clamp_min(0.0)  # the unbiased estimator can dip just below 0 for unrelated blocks
    return ((w * idx.double()).sum(1) / w.sum(1).clamp_min(1e-12)).tolist()


@torch.no_grad()
def block_features(model, batches, dtype: str = "fp32", max_tokens: int | None = None) -> list[torch.Tensor]:
    """Every block's output at the held-out positions with a target: a list of [N, D] (float32)."""
    model.eval()
    per_block: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    for batch in batches:
        with autocast(model, dtype), record_hidden(model) as hidden:
            model(batch.ids, batch.segment_ids, return_logits=False)
        mask_BT = batch.targets != -100
        for i in range(len(per_block)):
            per_block[i].append(hidden[i][mask_BT].float())
    feats = [torch.cat(parts) for parts in per_block]
    return [f[:max_tokens] for f in feats] if max_tokens else feats


def compare_models(model_a, model_b, batches, dtype: str = "fp32", max_tokens: int | None = None, k: int = 5) -> dict:
    """CKA of every block pair of two models on the same batches, and soft alignments both ways."""
    fa = block_features(model_a, batches, dtype, max_tokens)
    fb = block_features(model_b, batches, dtype, max_tokens)
    m = cka_matrix(fa, fb)
    return {"cka": m.tolist(), "tokens": fa[0].shape[0], "top_k": k,
            "alignment_a_in_b": soft_alignment(m, k), "alignment_b_in_a": soft_alignment(m.T, k)}


def plot_cka(res: dict, out_png: str | Path, label_a: str, label_b: str) -> Path:
    """Heatmap of the CKA matrix (rows: blocks of A, columns: blocks of B) with A's soft alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engram.io import atomic_write

    m = res["cka"]
    la, lb = len(m), len(m[0])
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * lb, 1.4 + 0.5 * la))
    lo = math.floor(min(min(row) for row in m) * 10) / 10  # colours from the lowest tenth reached, up to 1
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=lo, vmax=1.0, aspect="auto")
    ax.plot(res["alignment_a_in_b"], range(la), color="cyan", marker="o", ms=3, lw=1,
            label=f"soft alignment (top-{res['top_k']})")
    ax.set_xlabel(f"block of {label_b}")
    ax.set_ylabel(f"block of {label_a}")
    ax.set_xticks(range(lb))
    ax.set_yticks(range(la))
    ax.set_title(f"linear CKA ({res['tokens']:,} tokens)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="CKA")
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out_png


__all__ = ["block_features", "cka_matrix", "compare_models", "hsic_unbiased", "linear_cka", "plot_cka", "soft_alignment"]
