"""The experiment infrastructure: specs keep the parameter budgets they promise, the paired statistics
match a hand computation and scipy, and a `--quick` experiment runs end to end, skipping finished runs."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.runner import config_hash, find_summary, plan_experiment, run_experiment  # noqa: E402
from experiments.specs import RHOS, SIZES, experiments, memory_params, missing_fields  # noqa: E402
from experiments.stats import describe, paired_difference  # noqa: E402

EN_TRAIN_TOKENS_16K = 13_800_000  # docs/data.md: `en` train split with the 16k BPE (smaller vocabularies give more)

# ------------------------------------------------------------------------------------------------ stats


def test_paired_difference_by_hand():
    a, b = [4.10, 4.00, 4.25], [4.20, 4.05, 4.40]
    r = paired_difference(a, b)
    d = [-0.10, -0.05, -0.15]
    mean = sum(d) / 3  # -0.1
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)  # 0.05
    t975_df2 = 4.302652729749464  # Student t quantile, 97.5%, 2 degrees of freedom (tables)
    half = t975_df2 * sd / math.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(mean) and r["sd"] == pytest.approx(sd)
    assert r["ci"] == pytest.approx((mean - half, mean + half))
    assert r["excludes_zero"] is False and "includes zero" in describe(r)  # [-0.224, +0.024]
    tight = paired_difference([4.10, 4.00, 4.25], [4.20, 4.11, 4.37])  # d = -0.10, -0.11, -0.12
    half = t975_df2 * 0.01 / math.sqrt(3)
    assert tight["ci"] == pytest.approx((-0.11 - half, -0.11 + half)) and tight["excludes_zero"] is True
    assert "excludes zero" in describe(tight)


def test_paired_difference_matches_scipy():
    from scipy import stats

    a = [3.91, 3.87, 3.95, 3.90, 3.99]
    b = [3.93, 3.90, 3.94, 3.95, 4.02]
    r = paired_difference(a, b)
    t = stats.ttest_rel(a, b)
    lo, hi = t.confidence_interval(0.95)
    assert r["ci"] == pytest.approx((lo, hi), rel=1e-10) and r["p_value"] == pytest.approx(t.pvalue, rel=1e-10)
    assert r["excludes_zero"] == (hi < 0 or lo > 0)


def test_paired_difference_edge_cases():
    one = paired_difference([1.0], [0.5])
    assert one["ci"] is None and one["mean"] == 0.5 and "no interval" in describe(one)
    same = paired_difference([1.0, 2.0], [0.9, 1.9])
    assert same["sd"] == pytest.approx(0.0, abs=1e-12) and same["excludes_zero"] is True
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------------ specs


def _counts(cfg):
    from engram.allocation import count

    return count(cfg)


def test_iso_experiment_matches_parameters():
    size = SIZES["xs"]
    iso = {v.name: _counts(v.build(size)) for v in experiments(size)["iso"].variants}
    assert iso["dense"]["P_act"] == pytest.approx(iso["moe"]["P_act"], rel=0.01)
    assert iso["engram-moe"]["P_act"] == pytest.approx(iso["moe"]["P_act"], rel=0.01)
    assert iso["engram-moe"]["P_tot"] == pytest.approx(iso["moe"]["P_tot"], rel=0.01)
    assert iso["engram-moe"]["engram_tables"] > 0 and iso["dense"]["moe_routed"] == 0


def test_rho_sweep_and_memory_range():
    size = SIZES["xs"]
    assert len(RHOS) >= 6 and max(RHOS) == 1.0 and min(RHOS) <= 0.25
    ex = experiments(size)
    counts = [_counts(v.build(size)) for v in ex["rho"].variants]
    for c in counts:
        assert c["P_tot"] == pytest.approx(counts[0]["P_tot"], rel=0.01)
        assert c["P_act"] == pytest.approx(counts[0]["P_act"], rel=0.01)
    shares = [c["engram_tables"] / c["P_sparse"] for c in counts]
    assert shares == sorted(shares) and shares[0] == 0  # rho falls: the tables' share grows
    assert math.log10(max(size.memory_rows) / min(size.memory_rows)) >= 1.5
    for rows in size.memory_rows:
        e = _counts(ex["memory"].variant(f"engram-{rows}").build(size))
        o = _counts(ex["memory"].variant(f"overencoding-{rows}").build(size))
        assert e["engram_tables"] == pytest.approx(memory_params(size, rows), rel=0.01)
        assert o["overencoding_tables"] == pytest.approx(e["engram_tables"], rel=0.02)  # equal memory


def test_placement_variants_and_budgets():
    size = SIZES["xs"]
    ex = experiments(size)["placement"]
    names = {v.name for v in ex.variants}
    assert {"layer0", "layer1", "layer2", "layer3", "no-gate", "no-compress", "no-conv", "4-gram", "m4-per-branch",
            "m4-single"} <= names
    cfgs = {v.name: v.build(size) for v in ex.variants if not missing_fields(v)}
    assert cfgs["no-compress"].engram.compress is False and cfgs["no-conv"].engram.use_conv is False
    assert cfgs["4-gram"].engram.max_ngram == 4 and cfgs["m4-single"].engram.gate == "single"
    assert cfgs["m4-single"].hc_mult == cfgs["m4-per-branch"].hc_mult == 4
    plans, left_out = plan_experiment("placement", "xs")
    assert ("no-gate" in {p.variant for p in plans}) != bool(left_out)  # runnable once EngramConfig.use_gate exists
    for name in ("iso", "rho", "memory", "placement"):
        plans, _ = plan_experiment(name, "xs")
        per_run = plans[0].train.steps * plans[0].train.batch_size * plans[0].train.seq_len
        assert per_run < EN_TRAIN_TOKENS_16K  # under one epoch of `en`
        assert len({p.seed for p in plans}) >= 3 and plans[0].train.corpus == "en"
        assert len({p.config_hash for p in plans}) == len(plans)


def test_config_hash_is_stable_and_sensitive():
    plans, _ = plan_experiment("iso", "quick", dtype="fp32")
    again, _ = plan_experiment("iso", "quick", dtype="fp32")
    assert [p.config_hash for p in plans] == [p.config_hash for p in again]
    more, _ = plan_experiment("iso", "quick", tokens=10_000, dtype="fp32")
    assert not {p.config_hash for p in plans} & {p.config_hash for p in more}
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})


def test_fields_added_later_do_not_orphan_finished_runs():
    """A field added after runs were recorded hashes as before while it holds its legacy value (the
    committed xs summaries were recorded before TrainConfig.compile existed), and changes it otherwise."""
    import dataclasses

    from experiments.runner import ADDED_FIELDS

    plan = plan_experiment("iso", "xs", dtype="fp32")[0][0]
    old = plan.config()
    for part, fields in ADDED_FIELDS.items():
        for name in fields:
            old[part].pop(name, None)
    assert plan.config_hash == config_hash(old) == "54c25418" + plan.config_hash[8:]
    flipped = dataclasses.replace(plan, train=dataclasses.replace(plan.train, compile=True))
    assert flipped.config_hash != plan.config_hash


# ------------------------------------------------------------------------------------ quick end to end


@pytest.mark.slow
def test_quick_experiment_end_to_end(mini_cache, tmp_path, capsys):
    from experiments.__main__ import main

    results, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["run", "iso", "--quick", "--dtype", "fp32", "--results", str(results), "--runs", str(runs),
            "--cache-dir", str(mini_cache)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "trained 6, skipped 0 of 6 runs" in first
    plans, _ = plan_experiment("iso", "quick", dtype="fp32")
    summaries = {}
    for p in plans:
        path = find_summary(results, p)
        s = json.loads(path.read_text())
        assert s["config_hash"] == p.config_hash and s["seed"] == p.seed and s["variant"] == p.variant
        assert set(s["held_out"]) == {"mini"} and s["held_out"]["mini"]["loss"] > 0
        assert s["git"]["commit"] is None or len(s["git"]["commit"]) == 40
        assert s["steps"] == p.train.steps and s["wall_seconds"]["train"] > 0
        summaries[(p.variant, p.seed)] = s
    # a second invocation trains nothing
    assert main(argv) == 0
    assert "trained 0, skipped 6 of 6 runs" in capsys.readouterr().out
    # the report's interval is the paired t-interval of the summaries' losses
    report = json.loads((results / "quick" / "iso" / "report.json").read_text())
    cmp = next(c for c in report["comparisons"] if (c["variant"], c["baseline"]) == ("engram-moe", "moe"))
    want = paired_difference([summaries[("engram-moe", s)]["held_out"]["mini"]["loss"] for s in (0, 1)],
                             [summaries[("moe", s)]["held_out"]["mini"]["loss"] for s in (0, 1)])
    assert cmp["ci"] == pytest.approx(list(want["ci"])) and cmp["n"] == 2
    assert "| engram-moe | moe | mini | 2 |" in (results / "quick" / "iso" / "report.md").read_text()
    # another budget is another configuration: everything would be trained again
    res = run_experiment("iso", "quick", tokens=1024, dtype="fp32", results=results, runs=runs, dry_run=True)
    assert res["skipped"] == [] and len(res["planned"]) == 6


def test_a_report_of_another_budget_has_its_own_files(tmp_path):
    """``--tokens`` is another configuration: its report is written beside the default budget's (tagged
    with the budget, the command naming it), never over it."""
    from experiments.report import budget_tag, build_report

    assert budget_tag("rho", "xs", None) == budget_tag("rho", "xs", SIZES["xs"].tokens["rho"]) == ""
    assert budget_tag("rho", "xs", 800_000) == "-800k" and budget_tag("rho", "xs", 12_345) == "-12345"
    default = build_report("rho", "quick", dtype="fp32", results=tmp_path)
    short = build_report("rho", "quick", tokens=2048, dtype="fp32", results=tmp_path)
    assert default["path"] == "quick/rho/report.md" and short["path"] == "quick/rho/report-2048.md"
    text = (tmp_path / short["path"]).read_text()
    assert "--quick --tokens 2048`" in text and "0.00 M training tokens" in text
    assert "--tokens" not in (tmp_path / default["path"]).read_text()
    assert json.loads((tmp_path / "quick/rho/report-2048.json").read_text())["tokens_override"] == 2048


def test_a_run_another_process_is_training_is_skipped(tmp_path):
    """Two processes share an experiment: a run claimed by a live process is left to it (and counted),
    and the claim dies with its holder, so the run is taken again afterwards."""
    import subprocess

    from experiments.runner import claim_run

    plans, _ = plan_experiment("iso", "quick", dtype="fp32")
    claims = tmp_path / "runs" / "quick" / "iso" / ".claims"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom engram.io import RunLock\n"
         "[RunLock(d).acquire() for d in sys.argv[1:]]\nprint('held', flush=True)\ntime.sleep(120)",
         *[str(claims / p.name) for p in plans]], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = io.StringIO()
        res = run_experiment("iso", "quick", dtype="fp32", results=tmp_path / "results", runs=tmp_path / "runs",
                             out=out)
        assert res["trained"] == [] and res["busy"] == [p.name for p in plans]
        assert "being trained by another process, skipped" in out.getvalue()
        assert claim_run(plans[0], tmp_path / "runs") is None
    finally:
        holder.kill()
        holder.wait()
    claim = claim_run(plans[0], tmp_path / "runs")
    assert claim is not None
    claim.release()


@pytest.mark.slow
def test_jobs_share_an_experiment_between_processes(mini_cache, tmp_path, capsys, monkeypatch):
    """``--jobs 2``: a worker process and this one train the runs between them, each once, each with
    half the CPUs; then one report over all of them."""
    import os

    from experiments.__main__ import _worker_argv, main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the worker runs `python -m experiments`
    results, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["run", "iso", "--quick", "--dtype", "fp32", "--results", str(results), "--runs", str(runs),
            "--cache-dir", str(mini_cache), "--jobs", "2"]
    assert _worker_argv(argv) == [*argv[:-2], "--no-report"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plans, _ = plan_experiment("iso", "quick", dtype="fp32")
    threads = {json.loads(find_summary(results, p).read_text())["machine"]["threads"] for p in plans}
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}
    assert "(6 of 6 runs finished)" in out
    assert not list((results / "quick" / "iso" / "summaries").glob("*.tmp*"))


def test_bad_experiment_arguments_are_named(capsys):
    from experiments.__main__ import main

    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        plan_experiment("nope", "quick")
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        plan_experiment("iso", "quick", seeds=0)
    with pytest.raises(ValueError, match="no variant 'x'"):
        experiments(SIZES["quick"])["iso"].variant("x")
    with pytest.raises(SystemExit):
        main(["run", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "iso", "--jobs", "0"])
    assert "argument --jobs: must be >= 1, got 0" in capsys.readouterr().err
