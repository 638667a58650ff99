"""The command line: every example line of the README's "Command line" block runs, in order, in a fresh
directory (the demo line, minutes long, runs in the slow suite); `engram hash --json` is exact."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engram.cli import main
from reference import ref_hash

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command line", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("engram ")]


def run_line(line: str, cwd: Path, cache: Path, timeout: int = 600) -> str:
    argv = shlex.split(line)[1:]
    # the data cache comes from ENGRAM_CACHE_DIR, as a user's would
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ENGRAM_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "engram.cli", *argv, *(["--no-progress"] if argv[0] in ("train", "demo") else [])],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"`{line}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_every_subcommand_has_a_readme_example():
    subs = {shlex.split(line)[1] for line in readme_examples()}
    assert subs == {"hash", "data", "train", "eval", "generate", "gates", "tables", "analyze", "bench", "demo", "plan",
                    "import", "export"}
    formats = {tuple(shlex.split(line)[1:3]) for line in readme_examples() if shlex.split(line)[1] in ("import", "export")}
    assert formats == {("import", "demo"), ("import", "deepseek-v41"), ("export", "deepseek-v41")}
    analyses = {shlex.split(line)[2] for line in readme_examples() if shlex.split(line)[1] == "analyze"}
    assert analyses == {"gates", "logit-lens", "cka", "ablate"}
    benches = {shlex.split(line)[2] for line in readme_examples() if shlex.split(line)[1] == "bench"}
    assert benches == {"hashing", "lookup", "step", "train", "storage", "cache", "generate", "offload", "shard"}


@pytest.mark.slow
def test_readme_examples_run(mini_cache, tmp_path):
    (tmp_path / "tests" / "fixtures").mkdir(parents=True)  # the examples name files of the repository
    (tmp_path / "tests" / "fixtures" / "prompts.txt").write_bytes((ROOT / "tests" / "fixtures" / "prompts.txt").read_bytes())
    shutil.copytree(ROOT / "tests" / "fixtures" / "v41-tiny", tmp_path / "tests" / "fixtures" / "v41-tiny")
    shutil.copytree(ROOT / "tests" / "golden", tmp_path / "tests" / "golden")
    outputs = {}
    for line in readme_examples():
        if line.startswith("engram demo"):
            continue  # slow: test_readme_demo_example
        outputs[line] = run_line(line, tmp_path, mini_cache)
    hashed = json.loads(next(v for k, v in outputs.items() if k.startswith("engram hash")))
    assert hashed["compressed_vocab_size"] == 99092
    assert "perplexity" in next(v for k, v in outputs.items() if k.startswith("engram eval"))
    assert next(v for k, v in outputs.items() if k.startswith("engram generate")).startswith("ROMEO:")
    resumed = [k for k in outputs if "--resume" in k][0]
    assert "to step 30" in outputs[resumed]
    two = next(k for k in outputs if "--nproc 2" in k)
    assert "trained debug to step 6" in outputs[two]
    assert len(list((tmp_path / "runs" / "debug-2proc" / "checkpoints" / "step_00000006").glob("table.*"))) == 2
    assert (tmp_path / "runs" / "debug" / "loss.png").is_file()
    assert (tmp_path / "runs" / "gates.png").read_bytes()[:4] == b"\x89PNG"
    assert "block 1 branch 0:" in next(v for k, v in outputs.items() if k.startswith("engram gates"))
    cache = next(v for k, v in outputs.items() if k.startswith("engram bench cache"))
    assert "belady" in cache and "compulsory ceiling" in cache and "M accesses/s" in cache
    assert (tmp_path / "runs" / "bench" / "cache_hit_rates.png").read_bytes()[:4] == b"\x89PNG"
    planned = next(v for k, v in outputs.items() if k.startswith("engram plan"))
    assert "distinct rows per token" in planned and "fits in 80 GiB per rank" in planned
    analysis = tmp_path / "runs" / "analysis"
    for name in ("gates.png", "gates.html", "gates.json", "logit_lens.png", "logit_lens.json", "cka.png", "cka.json",
                 "ablation.md", "ablation.json"):
        assert (analysis / name).is_file(), name
    assert json.loads((analysis / "logit_lens.json").read_text())["debug"]["kl"][-1] == 0.0
    assert "| factual (training-data phrases) |" in (analysis / "ablation.md").read_text()
    runs = tmp_path / "runs"
    assert "layers [1] (rows {1: 12478})" in next(v for k, v in outputs.items() if k.startswith("engram import demo"))
    for name in ("engram.1.rows", "engram.14.rows", "fusion.safetensors", "engram_bundle.json"):
        assert (runs / "v41-again" / name).read_bytes() == (runs / "v41-bundle" / name).read_bytes()  # bit-exact


@pytest.mark.slow
def test_readme_demo_example(mini_cache, tmp_path):
    line = next(line for line in readme_examples() if line.startswith("engram demo"))
    out = run_line(line, tmp_path, mini_cache, timeout=1800)
    assert "Engram-MoE" in out and "baseline MoE" in out and "held-out loss" in out
    summary = json.loads((tmp_path / "runs" / "demo-short" / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline MoE", "Engram-MoE"}
    assert (tmp_path / "runs" / "demo-short" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_hash_json_is_exact_against_the_reference(capsys):
    from engram.tokenizer import CompressionMap, deepseek_tokenizer_path

    argv = ["hash", "--text", "By the way, Alexander the Great", "--max-ngram", "4", "--heads", "2",
            "--start-size", "1000,2000,3000", "--layers", "1,6", "--seed", "5", "--pad-id", "2", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"compressed_vocab_size", "multipliers", "table_sizes", "total_rows", "token_ids", "hash_ids"}
    lookup = CompressionMap.build(deepseek_tokenizer_path()).lookup
    want = ref_hash([res["token_ids"]], lookup, [1, 6], 4, 2, [1000, 2000, 3000], 5, 2)
    assert res["hash_ids"] == {str(k): v[0] for k, v in want.items()}
    assert all(len(res["table_sizes"][k]) == 3 and len(res["multipliers"][k]) == 4 for k in ("1", "6"))
    assert res["total_rows"]["1"] == sum(sum(o) for o in res["table_sizes"]["1"])


def test_cli_errors_are_clear(capsys):
    assert main(["hash", "--text", "x", "--max-ngram", "3", "--start-size", "1,2,3"]) == 2
    assert "--start-size needs 1 or 2 values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "tiny"])  # --out is required
    assert main(["train", "--preset", "nope", "--out", "x"]) == 2
    assert "valid presets: debug" in capsys.readouterr().err


def test_readme_library_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Library", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md#library", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert int(printed[0]) > 0 and printed[1:] == ["torch.Size([2,", "32,", "1])"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "x", "--lr", "inf"], "argument --lr: must be a finite number"),
    (["train", "--out", "x", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "--out", "x", "--steps", "0"], "argument --steps: must be >= 1"),
    (["train", "--out", "x", "--resume", "maybe"], "argument --resume: expected nothing or 'auto'"),
    (["eval", "run", "--corpus", "mini", "--batches", "0"], "argument --batches: must be >= 1, got 0"),
    (["eval", "run", "--corpus", "mini", "--seq-len", "0"], "argument --seq-len: must be >= 1"),
    (["generate", "run", "--prompt", "x", "--top-k", "0"], "argument --top-k: must be >= 1"),
    (["generate", "run", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: must be <= 1"),
    (["generate", "run", "--prompt", "x", "--top-p", "0"], "argument --top-p: must be > 0"),
    (["generate", "run", "--prompt", "x", "--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["generate", "run", "--prompt", "x", "--temperature", "-1"], "argument --temperature: must be >= 0"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0"),
])
def test_bad_options_name_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_errors_about_files_are_one_clear_line(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--preset", "debug", "--out", str(tmp_path / "afile")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing"), "--corpus", "mini"]) == 2
    assert "no run at" in capsys.readouterr().err
    assert main(["bench", "hashing", "--quick", "--json-out", str(tmp_path)]) == 2  # a directory, not a file
    err = capsys.readouterr().err
    assert "Is a directory" in err and "Traceback" not in err
