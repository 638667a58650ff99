"""LogitLens: how close each block's hidden state already is to the model's final prediction.

For block i, its output h_i (streams reduced as the head reduces them) is read out through the final
norm and LM head, and compared with the model's own next-token distribution p:

    KL_i = mean over held-out positions t of  sum_v p_t(v) (log p_t(v) - log q_{i,t}(v)),
    q_{i,t} = softmax(lm_head(norm(h_{i,t})))

The last block's KL is 0 by construction. The paper reports that an Engram model reaches a low KL at
earlier blocks than an MoE model (the memory hands the early layers static patterns they would
otherwise assemble). Positions averaged over: every position with a target (no document ends).

Shape legend: B batch, T time, D model width, V vocab, N positions with a target.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engram.analysis.hooks import project_to_vocab, record_hidden


def autocast(model: torch.nn.Module, dtype: str):
    """bf16 autocast on the model's device, or a no-op for fp32."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")


@torch.no_grad()
def logit_lens(model, batches, dtype: str = "fp32") -> dict:
    """{"blocks": [0..L-1], "kl": [mean KL per block] (nats), "tokens": N} over the batches."""
    model.eval()
    n_blocks = len(model.blocks)
    sums = torch.zeros(n_blocks, dtype=torch.float64)
    n = 0
    for batch in batches:
        with autocast(model, dtype), record_hidden(model) as hidden:
            out = model(batch.ids, batch.segment_ids)
        mask_BT = batch.targets != -100
        logp_NV = out.logits.float()[mask_BT].log_softmax(-1)
        p_NV = logp_NV.exp()
        for i in range(n_blocks):
            with autocast(model, dtype):
                logits_BTV = project_to_vocab(model, hidden[i])
            logq_NV = logits_BTV.float()[mask_BT].log_softmax(-1)
            sums[i] += (p_NV * (logp_NV - logq_NV)).sum(-1).double().sum()
        n += int(mask_BT.sum())
    if n == 0:
        raise ValueError("no held-out positions with a target")
    return {"blocks": list(range(n_blocks)), "kl": (sums / n).tolist(), "tokens": n}


def plot_logit_lens(curves: dict[str, dict], out_png: str | Path, title: str | None = None) -> Path:
    """KL per block, one line per model (label -> ``logit_lens`` result), log scale; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engram.io import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, res in curves.items():  # the last block's KL is 0 by construction: not on a log axis
        ax.plot(res["blocks"][:-1], res["kl"][:-1], marker="o", label=label)
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("block (its output read through the final norm and LM head)")
    ax.set_ylabel("KL(final || block) [nats/token]")
    ax.set_title((title or "LogitLens") + "\n(the last block's KL is 0 by construction: not drawn)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out_png


__all__ = ["autocast", "logit_lens", "plot_logit_lens"]
