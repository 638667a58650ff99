"""The end-to-end demo (the README's main command): does conditional memory help at equal parameters?

1. prepare the ``mini`` corpus (pip only) and train its byte-level BPE (8,192 ids);
2. train ``tiny-moe`` (the baseline) and ``tiny`` (Engram-MoE: the allocation solver moved a quarter of
   the sparse budget from routed experts into an Engram table), same total and activated parameters,
   same data order, same steps, bf16 on CPU;
3. print a side-by-side table (held-out loss, tokens/s, parameters), a sample from each, and write the
   loss curves of both runs to one PNG.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from engram.config import TrainConfig, preset, to_dict
from engram.io import atomic_write_json
from engram.report import format_table
from engram.train.metrics import plot_loss_curves

DEMO_RUNS = (("baseline MoE", "tiny-moe"), ("Engram-MoE", "tiny"))
DEMO_STEPS = 400  # ~3.7 minutes per model on 2 cores (~7.5k tokens/s): both fit the 15-minute budget with set-up
PROMPTS = ("ROMEO:", "def read_config(path):")
GATE_TEXT = "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; import os.path as osp"


def demo_train_config(steps: int) -> TrainConfig:
    return TrainConfig(corpus="mini", steps=steps, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=min(30, steps // 10),
                       schedule="cosine", eval_every=max(steps // 5, 1), eval_batches=16, ckpt_every=steps,
                       keep_checkpoints=1, seed=0)


def run_demo(out_dir: str | Path = "runs/demo", steps: int | None = None, cache_dir: str | Path | None = None,
             progress: bool = True, out: TextIO = sys.stdout) -> dict:
    from engram.analysis.gates import gates_of_run
    from engram.infer import generate_text
    from engram.train.trainer import train

    out_dir = Path(out_dir)
    tcfg = demo_train_config(steps or DEMO_STEPS)
    t0 = time.perf_counter()
    results = {}
    for label, name in DEMO_RUNS:
        run_dir = out_dir / name
        print(f"== training {label} ({name}) for {tcfg.steps} steps of {tcfg.batch_size}x{tcfg.seq_len} tokens", file=out)
        res = train(preset(name), tcfg, run_dir, resume="auto", cache_dir=cache_dir, progress=progress, label=label)
        results[label] = (name, res)

    rows, summary = [], {"train": to_dict(tcfg), "runs": {}}
    for label, (name, res) in results.items():
        c = res.model.param_counts()
        val = res.final_val or {}
        rows.append([label, name, c["P_tot"], c["P_act"], c["engram_tables"], val.get("loss", float("nan")),
                     val.get("ppl", float("nan")), res.tokens_per_s])
        samples = {p: generate_text(str(res.run_dir), p, max_new_tokens=48, temperature=0.8, top_k=40, seed=0)
                   for p in PROMPTS}
        summary["runs"][label] = {"preset": name, "params": c, "val": val, "tokens_per_s": res.tokens_per_s,
                                  "samples": samples}
    gates_png = out_dir / "gates.png"
    gates_of_run(str(results["Engram-MoE"][1].run_dir), GATE_TEXT, str(gates_png))
    summary["gates_png"] = str(gates_png)
    table = format_table(["model", "preset", "P_tot", "P_act", "table params", "val loss", "val ppl", "tokens/s"], rows)
    png, val_png = out_dir / "loss.png", out_dir / "val_loss.png"
    curves = {label: res.metrics for label, (_, res) in results.items()}
    plot_loss_curves(curves, png)
    plot_loss_curves(curves, val_png, keys=("val_loss",), title="held-out loss (mini val split)")
    summary.update(table=table, png=str(png), val_png=str(val_png), seconds=time.perf_counter() - t0)
    atomic_write_json(out_dir / "summary.json", summary)

    print("\n" + table, file=out)
    base, eng = (summary["runs"][label]["val"].get("loss") for label, _ in DEMO_RUNS)
    if base is not None and eng is not None:
        print(f"\nheld-out loss, Engram-MoE minus baseline: {eng - base:+.4f} nats/token", file=out)
    for label, info in summary["runs"].items():
        print(f"\n-- sample from {label}:", file=out)
        for p, text in info["samples"].items():
            print(json.dumps(text), file=out)
    print(f"\nloss curves: {png}, {val_png}\ngate heatmap: {gates_png}\nsummary: {out_dir / 'summary.json'} ({summary['seconds']:.0f} s)", file=out)
    return summary
