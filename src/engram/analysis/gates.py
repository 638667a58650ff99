"""What the memory does: Engram gate values per token, as numbers, a heatmap PNG and a shaded-text page.

alpha_t in (0, 1) is how much of the retrieved n-gram memory enters the residual stream at position t
(per Engram block and branch). High gates on the later tokens of multi-token names and idioms
("Alexander the Great", "By the way") are the paper's qualitative finding (its Figure 7).

The gates are read with a forward hook on each Engram layer (``engram.analysis.hooks.record_gates``).
A text longer than the model's context (``max_seq_len``) is read in consecutive windows, each opened
by the document separator as training documents are; a window's first tokens therefore see no
n-gram or attention context from the previous window.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from engram.analysis.hooks import engram_layers, record_gates


@torch.no_grad()
def gate_values(model, tokenizer, text: str, bos_id: int | None = None, window: int | None = None) -> dict[str, Any]:
    """Tokens of ``text`` and the gate of every Engram block and branch at each of them.

    Returns {"tokens": [str] * T, "gates": {block: [[gate] * T] * M}}.
    """
    if not engram_layers(model):
        raise ValueError("this model has no Engram layer: no gates to show")
    ids = tokenizer.encode(text).ids
    if not ids:
        raise ValueError("the text has no tokens")
    prefix = [bos_id] if bos_id is not None else []
    window = window or model.cfg.max_seq_len - len(prefix)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    per_block: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(ids), window):
        x = torch.tensor([prefix + ids[start : start + window]], dtype=torch.int64)
        with record_gates(model) as gates:
            model(x, return_logits=False)
        for blk, g_BTM in gates.items():
            per_block.setdefault(blk, []).append(g_BTM[0, len(prefix) :].float())
    tokens = [tokenizer.decode([i]) for i in ids]
    gates_out = {blk: torch.cat(parts).T.tolist() for blk, parts in sorted(per_block.items())}  # block -> [M][T]
    return {"tokens": tokens, "gates": gates_out}


def _rows(values: dict[str, Any]) -> tuple[list[list[float]], list[str]]:
    rows, labels = [], []
    for blk, per_branch in sorted(values["gates"].items(), key=lambda kv: int(kv[0])):
        for m, row in enumerate(per_branch):
            rows.append(row)
            labels.append(f"block {blk}" + (f" / branch {m}" if len(per_branch) > 1 else ""))
    return rows, labels


def plot_gates(values: dict[str, Any], out_png: str | Path, title: str | None = None) -> Path:
    """Heatmap: one row per (Engram block, branch), one column per token; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engram.io import atomic_write

    rows, labels = _rows(values)
    tokens = [t.replace("\n", "\\n") for t in values["tokens"]]
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.45 * len(tokens)), 60.0), 1.2 + 0.45 * len(rows)))
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


def _shade(g: float) -> tuple[str, str]:
    """Background and text colour of a token with gate g: white (0) to deep red (1)."""
    g = min(max(g, 0.0), 1.0)
    r, gb = 255, round(255 * (1 - 0.85 * g))
    text = "#fff" if g > 0.6 else "#000"
    return f"#{r:02x}{gb:02x}{gb:02x}", text


def gates_html(values: dict[str, Any], title: str = "Engram gates") -> str:
    """A self-contained HTML page: the text once per Engram block, each token shaded by its gate (the mean
    over branches when there are several; hovering shows every branch's value)."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
        ".t{font-family:monospace;white-space:pre-wrap;padding:1px 0;border-radius:2px}"
        ".legend span{display:inline-block;width:3em;text-align:center;font-size:80%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Each token is shaded by its Engram gate: how much of the retrieved n-gram memory entered the "
        "residual stream there (0 = none, 1 = all).</p>",
        '<p class="legend">' + "".join(f'<span style="background:{_shade(g / 4)[0]};color:{_shade(g / 4)[1]}">'
                                      f"{g / 4:.2f}</span>" for g in range(5)) + "</p>",
    ]
    for blk, per_branch in sorted(values["gates"].items(), key=lambda kv: int(kv[0])):
        label = f"Block {blk}" + (f" (mean of {len(per_branch)} branches)" if len(per_branch) > 1 else "")
        parts.append(f"<h2>{html.escape(label)}</h2><p>")
        for t, tok in enumerate(values["tokens"]):
            branch = [row[t] for row in per_branch]
            g = sum(branch) / len(branch)
            bg, fg = _shade(g)
            tip = ", ".join(f"{v:.3f}" for v in branch)
            shown = html.escape(tok).replace("\n", "\u21b5<br>")
            parts.append(f'<span class="t" style="background:{bg};color:{fg}" title="gate {tip}">{shown}</span>')
        parts.append("</p>")
    parts.append("</body></html>")
    return "".join(parts)


def write_gate_report(values: dict[str, Any], out_dir: str | Path, title: str = "Engram gates") -> dict[str, Path]:
    """gates.png, gates.html and gates.json in ``out_dir`` (each written atomically)."""
    from engram.io import atomic_write, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "gates.png", "html": out / "gates.html", "json": out / "gates.json"}
    plot_gates(values, paths["png"], title=title)
    atomic_write(paths["html"], gates_html(values, title).encode())
    atomic_write_json(paths["json"], {"tokens": values["tokens"], "gates": {str(k): v for k, v in values["gates"].items()}})
    return paths


def gates_of_run(run: str | Path, text: str, out_png: str | Path | None = None) -> dict[str, Any]:
    """Gate values of a trained run's Engram layers on ``text`` (and a heatmap PNG if asked)."""
    from engram.data.bpe import eot_id
    from engram.infer import load_run

    lr = load_run(run)
    values = gate_values(lr.model, lr.tokenizer, text, bos_id=eot_id(lr.tokenizer))
    if out_png:
        plot_gates(values, out_png, title=f"Engram gates: {Path(run).name}")
    return values


__all__ = ["gate_values", "gates_html", "gates_of_run", "plot_gates", "write_gate_report"]
