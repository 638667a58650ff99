"""What the memory does: Engram gate values per token, as numbers and as a heatmap PNG.

alpha_t in (0, 1) is how much of the retrieved n-gram memory enters the residual stream at position t
(per Engram block and branch). High gates on the later tokens of multi-token names and idioms
("Alexander the Great", "By the way") are the paper's qualitative finding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engram.data.bpe import eot_id
from engram.infer import load_run


@torch.no_grad()
def gate_values(model, tokenizer, text: str, bos_id: int | None = None) -> dict[str, Any]:
    """Tokens of ``text`` and the gate of every Engram block and branch at each of them."""
    ids = tokenizer.encode(text).ids
    prefix = [bos_id] if bos_id is not None else []
    x = torch.tensor([prefix + ids], dtype=torch.int64)
    out = model(x, return_gates=True)
    if not out.gates:
        raise ValueError("this model has no Engram layer: no gates to show")
    tokens = [tokenizer.decode([i]) for i in ids]
    gates = {blk: g[0, len(prefix):].float().T.tolist() for blk, g in out.gates.items()}  # block -> [M][T]
    return {"tokens": tokens, "gates": gates}


def plot_gates(values: dict[str, Any], out_png: str | Path, title: str | None = None) -> Path:
    """Heatmap: one row per (Engram block, branch), one column per token; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engram.io import atomic_write

    rows, labels = [], []
    for blk, per_branch in sorted(values["gates"].items()):
        for m, row in enumerate(per_branch):
            rows.append(row)
            labels.append(f"block {blk}" + (f" / branch {m}" if len(per_branch) > 1 else ""))
    tokens = [t.replace("\n", "\\n") for t in values["tokens"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(tokens)), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title or "Engram gate per token")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="gate")
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out_png


def gates_of_run(run: str | Path, text: str, out_png: str | Path | None = None) -> dict[str, Any]:
    """Gate values of a trained run's Engram layers on ``text`` (and a heatmap PNG if asked)."""
    lr = load_run(run)
    values = gate_values(lr.model, lr.tokenizer, text, bos_id=eot_id(lr.tokenizer))
    if out_png:
        plot_gates(values, out_png, title=f"Engram gates: {Path(run).name}")
    return values
