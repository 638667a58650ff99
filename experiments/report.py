"""An experiment's report from its committed summaries: tables, paired comparisons, plots.

Writes RESULTS/SIZE/EXPERIMENT/report.md and report.json, plus rho.png (the rho experiment) or
memory.png (the memory experiment). Uses only the summaries whose config hash matches the current plan,
so a report never mixes runs of different configurations. A token budget other than the size's default
(``--tokens``) gets its own files, tagged with the budget (``report-800k.md``, ``rho-800k.png``), so
reports of two budgets of one experiment sit side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from engram.io import atomic_write, atomic_write_json

from experiments.runner import REPO, RunPlan, load_summaries, plan_experiment
from experiments.specs import SIZES, experiments
from experiments.stats import mean_sd, paired_difference


def build_report(
    experiment: str,
    size: str = "xs",
    seeds: int | None = None,
    tokens: int | None = None,
    dtype: str | None = None,
    results: str | Path = REPO / "experiments" / "results",
    ngram_counts: dict | None = None,
) -> dict:
    """Tables and comparisons of every finished run of the plan; writes the report files."""
    results = Path(results)
    plans, left_out = plan_experiment(experiment, size, seeds, tokens, dtype)
    spec = experiments(SIZES[size])[experiment]
    summaries = load_summaries(results, plans)
    sets = [c for c, _ in SIZES[size].eval_sets]
    variants = list(dict.fromkeys(p.variant for p in plans))
    rows = {v: _variant_row(v, summaries, sets) for v in variants}
    comparisons = []
    for a, b in spec.comparisons:
        if a not in variants or b not in variants:
            continue
        seeds_both = sorted({s for (v, s) in summaries if v == a} & {s for (v, s) in summaries if v == b})
        for c in sets:
            if not seeds_both:
                continue
            cmp = paired_difference([summaries[(a, s)]["held_out"][c]["loss"] for s in seeds_both],
                                    [summaries[(b, s)]["held_out"][c]["loss"] for s in seeds_both])
            comparisons.append({"variant": a, "baseline": b, "eval": c, "seeds": seeds_both, **cmp})
    report = {
        "experiment": experiment, "title": spec.title, "size": size, "paper": spec.paper, "notes": list(spec.notes),
        "planned_runs": len(plans), "finished_runs": len(summaries), "left_out": left_out,
        "missing": [p.name for p in plans if (p.variant, p.seed) not in summaries],
        "tokens_per_run": plans[0].train.steps * plans[0].train.batch_size * plans[0].train.seq_len if plans else 0,
        "dtype": plans[0].train.dtype if plans else None,
        "wall_seconds": sum(s["wall_seconds"]["train"] + s["wall_seconds"]["eval"] for s in summaries.values()),
        "machines": sorted({json.dumps(s["machine"], sort_keys=True) for s in summaries.values()}),
        "variants": rows, "comparisons": comparisons, "ngram_counts": ngram_counts,
    }
    tag = budget_tag(experiment, size, tokens)
    report["tokens_override"] = tokens if tag else None
    out_dir = results / size / experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    if summaries and spec.plot == "rho":
        report["plot"] = str(plot_rho(spec, plans, summaries, sets, out_dir / f"rho{tag}.png").name)
    if summaries and spec.plot == "memory":
        report["plot"] = str(plot_memory(spec, plans, summaries, sets, out_dir / f"memory{tag}.png", ngram_counts).name)
    report["path"] = str((out_dir / f"report{tag}.md").relative_to(results))
    atomic_write_json(out_dir / f"report{tag}.json", report)
    atomic_write(out_dir / f"report{tag}.md", render_markdown(report, sets).encode())
    return report


def budget_tag(experiment: str, size: str, tokens: int | None) -> str:
    """"" at the size's default token budget, else "-<tokens>" in thousands (``-800k``)."""
    if tokens is None or tokens == SIZES[size].tokens[experiment]:
        return ""
    return f"-{tokens // 1000}k" if tokens % 1000 == 0 else f"-{tokens}"


def _variant_row(variant: str, summaries: dict, sets: list[str]) -> dict:
    runs = [s for (v, _), s in sorted(summaries.items()) if v == variant]
    row = {"seeds": [s["seed"] for s in runs], "params": runs[0]["params"] if runs else None, "loss": {}}
    for c in sets:
        if runs:
            m, sd = mean_sd([s["held_out"][c]["loss"] for s in runs])
            row["loss"][c] = {"mean": m, "sd": sd, "values": [s["held_out"][c]["loss"] for s in runs]}
    return row


def render_markdown(r: dict, sets: list[str]) -> str:
    lines = [f"# {r['title']} (size `{r['size']}`)", "",
             f"Command: `python -m experiments run {r['experiment']} "
             f"{'--quick' if r['size'] == 'quick' else '--size ' + r['size']}"
             f"{' --tokens ' + str(r['tokens_override']) if r.get('tokens_override') else ''}`", "",
             f"Paper: {r['paper']}", ""]
    lines += [f"- {n}" for n in r["notes"]]
    lines += ["", f"Runs finished: {r['finished_runs']} of {r['planned_runs']}; {r['tokens_per_run'] / 1e6:.2f} M "
              f"training tokens per run ({r['dtype']}); wall time of the finished runs "
              f"{r['wall_seconds'] / 3600:.2f} h."]
    for m in r["machines"]:
        d = json.loads(m)
        lines.append(f"Machine: {d['processor']}, {d['cpus']} CPUs, torch {d['torch']} ({d['platform']}).")
    if r["left_out"]:
        lines += ["", "Left out: " + "; ".join(r["left_out"]) + "."]
    if r["missing"]:
        lines += ["", f"Not finished yet: {', '.join(r['missing'])}."]
    lines += ["", "## Held-out loss per variant (mean ± sd over seeds, nats/token)", "",
              "| variant | P_tot | P_act | table params | seeds | " + " | ".join(sets) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(sets)]
    for v, row in r["variants"].items():
        p = row["params"] or {}
        tables = (p.get("engram_tables", 0) + p.get("overencoding_tables", 0)) if p else None
        cells = [_mean_sd_cell(row["loss"].get(c)) for c in sets]
        lines.append(f"| {v} | {_int(p.get('P_tot'))} | {_int(p.get('P_act'))} | {_int(tables)} | {len(row['seeds'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (variant minus baseline, same seeds; 95% t-interval)", "",
              "| variant | baseline | held-out set | pairs | mean difference | 95% CI | excludes zero | p |",
              "|---|---|---|---:|---:|---|---|---:|"]
    for c in r["comparisons"]:
        ci = f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]" if c["ci"] else "n < 2"
        ex = {True: "**yes**", False: "no", None: "-"}[c["excludes_zero"]]
        p = f"{c['p_value']:.3f}" if c["p_value"] is not None else "-"
        lines.append(f"| {c['variant']} | {c['baseline']} | {c['eval']} | {c['n']} | {c['mean']:+.4f} | {ci} | {ex} | {p} |")
    if r.get("ngram_counts"):
        lines += ["", "## Distinct n-grams in the training data (compressed ids, within documents)", "",
                  "| order | distinct in the training split | occurrences | distinct in one run's batches (seed 0) |",
                  "|---:|---:|---:|---:|"]
        for n, d in sorted(r["ngram_counts"]["orders"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {d['distinct']:,} | {d['total']:,} | {d['seen_by_a_run']:,} |")
    if r.get("plot"):
        lines += ["", f"![{r['experiment']}]({r['plot']})"]
    return "\n".join(lines) + "\n"


def _mean_sd_cell(x: dict | None) -> str:
    if not x:
        return "-"
    return f"{x['mean']:.4f}" + (f" ± {x['sd']:.4f}" if x["sd"] is not None else "")


def _int(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "-"


# ------------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return path


def _seed_points(plans: list[RunPlan], summaries: dict, variant: str, corpus: str) -> list[float]:
    return [summaries[(variant, p.seed)]["held_out"][corpus]["loss"] for p in plans
            if p.variant == variant and (variant, p.seed) in summaries]


def plot_rho(spec, plans: list[RunPlan], summaries: dict, sets: list[str], path: Path) -> Path:
    """Held-out loss vs rho: every seed as a dot, the mean with a +-1 sd bar, one panel per held-out set."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sets), figsize=(max(6.4, 4.2 * len(sets)), 3.8), squeeze=False)
    for ax, c in zip(axes[0], sets):
        xs, means, sds = [], [], []
        for v in spec.variants:
            pts = _seed_points(plans, summaries, v.name, c)
            if not pts:
                continue
            ax.scatter([v.x] * len(pts), pts, s=10, color="0.6", zorder=2)
            m, sd = mean_sd(pts)
            xs.append(v.x), means.append(m), sds.append(sd or 0.0)
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, color="C0", zorder=3)
        ax.set_xlabel("rho (share of sparse parameters in routed experts)")
        ax.set_ylabel(f"held-out loss ({c})")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.suptitle("Sparsity allocation: loss vs rho (dots: seeds; bars: mean ± sd)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_memory(spec, plans: list[RunPlan], summaries: dict, sets: list[str], path: Path,
                ngram_counts: dict | None) -> Path:
    """Per held-out set: loss vs table parameters (Engram vs OverEncoding at equal memory, backbone as a
    line) and loss vs slots per n-gram order, with the training data's distinct n-grams marked."""
    plt = _plt()
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 3.4 * len(sets)), squeeze=False)
    for row, c in zip(axes, sets):
        base = _seed_points(plans, summaries, "backbone", c)
        for k, family in enumerate(("Engram", "OverEncoding")):
            xs_p, xs_s, means, sds = [], [], [], []
            for v in spec.variants:
                if v.family != family:
                    continue
                pts = _seed_points(plans, summaries, v.name, c)
                if not pts:
                    continue
                s0 = next(s for (name, _), s in summaries.items() if name == v.name)
                m, sd = mean_sd(pts)
                xs_p.append(s0["params"]["engram_tables"] + s0["params"]["overencoding_tables"])
                xs_s.append(_slots_per_order(s0))
                means.append(m), sds.append(sd or 0.0)
            for ax, xs in ((row[0], xs_p), (row[1], xs_s)):
                ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, color=f"C{k}", label=family)
        for ax in row:
            if base:
                m, _ = mean_sd(base)
                ax.axhline(m, color="0.4", ls="--", lw=1, label="backbone (no memory)")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a short log axis overlap
            ax.set_ylabel(f"held-out loss ({c})")
            ax.grid(alpha=0.3, which="both")
        row[0].set_xlabel("table parameters (equal memory at equal x)")
        row[1].set_xlabel("slots per n-gram order (rows per head x heads)")
        if ngram_counts:  # dotted: the whole training split; dash-dot: the batches one run trains on
            for n, d in ngram_counts["orders"].items():
                for x, ls, what in ((d["distinct"], ":", "split"), (d["seen_by_a_run"], "-.", "one run")):
                    row[1].axvline(x, color="0.3", ls=ls, lw=1)
                    row[1].text(x, row[1].get_ylim()[1], f" {n}-grams ({what})", fontsize=7, va="top", rotation=90)
        row[0].legend(fontsize=8)
    fig.suptitle("Memory scaling: fixed MoE backbone (bars: ± sd over seeds)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _slots_per_order(summary: dict) -> int:
    """Rows an n-gram of one order can land in: rows per head x heads (Engram or OverEncoding)."""
    m = summary["config"]["model"]
    mem = m.get("engram") or m.get("overencoding")
    return int(mem["table_sizes"][0]) * int(mem["heads"])


__all__ = ["budget_tag", "build_report", "plot_memory", "plot_rho", "render_markdown"]
