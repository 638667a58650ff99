"""Engram switched off at inference: how much of what the model gets right survives without its memory.

For each probe set (``engram.analysis.probes``) the model answers every probe twice, with Engram on and
with every Engram layer's output zeroed (``hooks.engram_off``). Over the probes the full model gets
right (top-1 next token = the answer; their number is reported):

    retention = accuracy with Engram off / accuracy with Engram on = the share still answered right
    probability retention = mean p(answer) with Engram off / the same with Engram on

The paper finds factual recall keeps ~29-44% of its score and reading comprehension ~81-93%: memory
holds knowledge, context-reading lives in the backbone. Held-out loss on/off is reported beside it.

Shape legend: B probes of one prompt length, T prompt length, V vocab.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from engram.analysis.hooks import engram_off
from engram.analysis.lens import autocast
from engram.analysis.probes import Probe


@torch.no_grad()
def score_probes(model, probes: list[Probe], dtype: str = "fp32", batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per probe (in order): {"correct": bool [P], "p_answer": float [P]} from the last prompt position."""
    model.eval()
    correct = torch.zeros(len(probes), dtype=torch.bool)
    p_answer = torch.zeros(len(probes), dtype=torch.float64)
    by_len: dict[int, list[int]] = defaultdict(list)
    for k, p in enumerate(probes):
        by_len[len(p.prompt)].append(k)
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids_BT = torch.tensor([probes[k].prompt for k in chunk], dtype=torch.int64)
            answers_B = torch.tensor([probes[k].answer for k in chunk], dtype=torch.int64)
            with autocast(model, dtype):
                logits_BTV = model(ids_BT).logits
            logp_BV = logits_BTV[:, -1].float().log_softmax(-1)
            correct[chunk] = logp_BV.argmax(-1) == answers_B
            p_answer[chunk] = logp_BV.gather(1, answers_B[:, None])[:, 0].exp().double()
    return {"correct": correct, "p_answer": p_answer}


def retention(on: dict[str, torch.Tensor], off: dict[str, torch.Tensor]) -> dict:
    """Retention over the probes right with Engram on (None when there are none)."""
    right = on["correct"]
    n_right = int(right.sum())
    out = {"probes": int(right.numel()), "right_on": n_right, "accuracy_on": float(right.float().mean()),
           "accuracy_off": float(off["correct"].float().mean()), "right_off_of_right_on": None,
           "retention": None, "p_retention": None}
    if n_right:
        kept = int((off["correct"] & right).sum())
        out.update(right_off_of_right_on=kept, retention=kept / n_right,
                   p_retention=float(off["p_answer"][right].mean() / on["p_answer"][right].mean()))
    return out


@torch.no_grad()
def ablate(model, probe_sets: dict[str, list[Probe]], dtype: str = "fp32", heldout=None) -> dict:
    """Retention per probe set, and (given held-out batches) the mean loss with Engram on and off."""
    results: dict = {"sets": {}}
    for name, probes in probe_sets.items():
        if not probes:
            raise ValueError(f"probe set {name!r} is empty")
        on = score_probes(model, probes, dtype)
        with engram_off(model):
            off = score_probes(model, probes, dtype)
        res = retention(on, off)
        res["examples"] = [{"probe": p.text, "on": bool(on["correct"][k]), "off": bool(off["correct"][k]),
                            "p_on": float(on["p_answer"][k]), "p_off": float(off["p_answer"][k])}
                           for k, p in enumerate(probes[:20])]
        results["sets"][name] = res
    if heldout is not None:
        loss_on = heldout_loss(model, heldout, dtype)
        with engram_off(model):
            loss_off = heldout_loss(model, heldout, dtype)
        results["heldout_loss"] = {"on": loss_on, "off": loss_off}
    return results


@torch.no_grad()
def heldout_loss(model, batches, dtype: str = "fp32") -> float:
    """Mean next-token cross-entropy (nats) over the batches' targets."""
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        with autocast(model, dtype):
            out = model(b.ids, b.segment_ids, targets=b.targets, return_logits=False)
        k = int((b.targets != -100).sum())
        if k:  # a batch of only masked targets has a NaN mean loss and no weight
            total += float(out.ce_loss) * k
            n += k
    if n == 0:
        raise ValueError("nothing to evaluate: every held-out target is masked")
    return total / n


def ablation_markdown(res: dict, title: str = "Engram switched off at inference") -> str:
    lines = [f"## {title}", "",
             "| probe set | probes | right with Engram | still right without | retention | p(answer) retention |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in res["sets"].items():
        ret = f"{r['retention']:.1%}" if r["retention"] is not None else "-"
        pret = f"{r['p_retention']:.1%}" if r["p_retention"] is not None else "-"
        kept = r["right_off_of_right_on"] if r["right_off_of_right_on"] is not None else "-"
        lines.append(f"| {name} | {r['probes']} | {r['right_on']} | {kept} | {ret} | {pret} |")
    if "heldout_loss" in res:
        h = res["heldout_loss"]
        lines += ["", f"Held-out loss ({res.get('heldout_source', 'held-out')}): {h['on']:.4f} with Engram, "
                      f"{h['off']:.4f} without ({h['off'] - h['on']:+.4f} nats/token)."]
    return "\n".join(lines) + "\n"


__all__ = ["ablate", "ablation_markdown", "heldout_loss", "retention", "score_probes"]
