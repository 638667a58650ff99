"""The analyses on trained runs: load (``engram.infer.load_run``), measure, write the figures and numbers.

Each function takes run directories, writes its files into ``out_dir`` and returns what it wrote and
measured; ``engram analyze ...`` (``engram.analysis.commands``) only parses arguments and calls these.
"""

from __future__ import annotations

from pathlib import Path

from engram.analysis.ablate import ablate, ablation_markdown
from engram.analysis.cka import compare_models, plot_cka
from engram.analysis.gates import gate_values, write_gate_report
from engram.analysis.heldout import heldout_batches
from engram.analysis.hooks import engram_layers
from engram.analysis.lens import logit_lens, plot_logit_lens
from engram.analysis.probes import copy_probes, factual_probes, key_value_probes
from engram.data import eot_id, prepare, prepare_tokens
from engram.data.corpora import default_cache_dir
from engram.infer import load_run, read_text_file
from engram.io import atomic_write, atomic_write_json


def _label(run: str | Path) -> str:
    return Path(run).resolve().name


def _seq_len(loaded, seq_len: int | None) -> int:
    return seq_len or int(loaded.config["train"]["seq_len"])


def analyze_gates(run: str | Path, out_dir: str | Path, text: str | None = None, file: str | Path | None = None) -> dict:
    """Gates of every Engram block and branch on a text: gates.png, gates.html, gates.json."""
    if (text is None) == (file is None):
        raise ValueError("give exactly one of --text TEXT or --file PATH")
    if file is not None:
        if not Path(file).exists():
            raise FileNotFoundError(f"no such text file: {file}")
        text = read_text_file(file)
    lr = load_run(run)
    values = gate_values(lr.model, lr.tokenizer, text, bos_id=eot_id(lr.tokenizer))
    paths = write_gate_report(values, out_dir, title=f"Engram gates: {_label(run)}")
    return {"values": values, "files": {k: str(v) for k, v in paths.items()}}


def analyze_logit_lens(runs: list[str | Path], out_dir: str | Path, corpus: str | None = None,
                       file: str | Path | None = None, batches: int = 8, batch_size: int = 8,
                       seq_len: int | None = None, dtype: str = "fp32", cache_dir: str | Path | None = None) -> dict:
    """KL(final || block) per block for one or two runs on the same text: logit_lens.png, logit_lens.json."""
    if not 1 <= len(runs) <= 2:
        raise ValueError(f"logit-lens takes one or two runs, got {len(runs)}")
    curves = {}
    for run in runs:
        lr = load_run(run)
        data, source = heldout_batches(lr.tokenizer, corpus, file, batches, batch_size, _seq_len(lr, seq_len), cache_dir)
        curves[_label(run)] = {**logit_lens(lr.model, data, dtype), "run": str(run), "source": source}
    if len(curves) < len(runs):
        raise ValueError("the two runs have the same directory name; give them distinct names")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_logit_lens(curves, out / "logit_lens.png", title=f"LogitLens on {next(iter(curves.values()))['source']}")
    atomic_write_json(out / "logit_lens.json", curves)
    return {"curves": curves, "files": {"png": str(png), "json": str(out / "logit_lens.json")}}


def analyze_cka(run_a: str | Path, run_b: str | Path, out_dir: str | Path, corpus: str | None = None,
                file: str | Path | None = None, batches: int = 4, batch_size: int = 8, seq_len: int | None = None,
                max_tokens: int | None = 8192, dtype: str = "fp32", cache_dir: str | Path | None = None,
                top_k: int = 5) -> dict:
    """Linear CKA of every block pair of two runs on the same tokens, soft alignments: cka.png, cka.json."""
    a, b = load_run(run_a), load_run(run_b)
    if a.config["tokenizer"] != b.config["tokenizer"]:
        raise ValueError(f"{run_a} and {run_b} use different tokenizers: CKA needs both models on the same tokens")
    data, source = heldout_batches(a.tokenizer, corpus, file, batches, batch_size, _seq_len(a, seq_len), cache_dir)
    res = {**compare_models(a.model, b.model, data, dtype, max_tokens, top_k), "run_a": str(run_a), "run_b": str(run_b),
           "source": source}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_cka(res, out / "cka.png", _label(run_a), _label(run_b))
    atomic_write_json(out / "cka.json", res)
    return {**res, "files": {"png": str(png), "json": str(out / "cka.json")}}


def analyze_ablation(run: str | Path, out_dir: str | Path, n_probes: int = 200, n_in_context: int = 100,
                     seed: int = 0, heldout: int = 4, dtype: str = "fp32", cache_dir: str | Path | None = None,
                     min_count: int = 20) -> dict:
    """Retention with Engram off on factual (from the run's training data) and in-context probes, and the
    held-out loss on/off: ablation.md, ablation.json."""
    lr = load_run(run)
    if not engram_layers(lr.model):
        raise ValueError(f"{run}: this model has no Engram layer: nothing to switch off")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = prepare(lr.config["train"]["corpus"], cache)
    train_tokens = prepare_tokens(corpus, lr.tokenizer, cache, ("train",))["train"]
    sets = {
        "factual (training-data phrases)": factual_probes(train_tokens, lr.tokenizer, min_count=min_count, limit=n_probes),
        "in-context: copy": copy_probes(lr.tokenizer, n_in_context, seed=seed),
        "in-context: key-value": key_value_probes(lr.tokenizer, n_in_context, seed=seed),
    }
    batches = None
    if heldout:
        batches, source = heldout_batches(lr.tokenizer, corpus.name, None, heldout, 8, _seq_len(lr, None), cache)
    res = ablate(lr.model, {k: v for k, v in sets.items() if v}, dtype, batches)
    res.update(run=str(run), step=lr.step, seed=seed, empty_sets=[k for k, v in sets.items() if not v])
    if heldout:
        res["heldout_source"] = source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ablation_markdown(res, f"Engram switched off at inference: {_label(run)} (step {lr.step})")
    if res["empty_sets"]:
        md += f"\nNo probes could be built for: {', '.join(res['empty_sets'])}.\n"
    atomic_write(out / "ablation.md", md.encode())
    atomic_write_json(out / "ablation.json", res)
    return {**res, "markdown": md, "files": {"md": str(out / "ablation.md"), "json": str(out / "ablation.json")}}


__all__ = ["analyze_ablation", "analyze_cka", "analyze_gates", "analyze_logit_lens"]
