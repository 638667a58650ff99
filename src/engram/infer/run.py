"""A trained run on disk, loaded for inference.

A run directory (written by ``engram.train.trainer``) holds:
    .lock                    an exclusive OS lock while a process trains in it (engram.io.RunLock)
    config.json              model + train config of the run (also inside every checkpoint)
    tokenizer.json           the tokenizer the model was trained with
    compression.safetensors  the tokenizer compression map (raw id -> canonical id)
    metrics.jsonl, loss.png  training metrics and the loss curve
    checkpoints/step_*/      atomic checkpoints (engram.checkpoint); ``latest`` names the newest
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.checkpoint import latest_checkpoint, load_checkpoint
from engram.config import ModelConfig, from_dict
from engram.memory.placement import Placement
from engram.model import EngramLM, build_model
from engram.tokenizer import CompressionMap, load_tokenizer

RUN_CONFIG = "config.json"
COMPRESSION_FILE = "compression.safetensors"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
CHECKPOINTS = "checkpoints"


@dataclass
class LoadedRun:
    model: EngramLM
    tokenizer: Any  # tokenizers.Tokenizer
    compression: CompressionMap
    config: dict[str, Any]
    step: int
    checkpoint: Path


def read_config_json(path: Path) -> dict[str, Any]:
    """A run's or checkpoint's config.json; errors name the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a complete engram run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON config: {e}") from None


def find_checkpoint(path: str | Path) -> Path:
    """The newest complete checkpoint of a run directory, or ``path`` itself if it is a checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run at {path}: not a directory")
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    ck_dir = latest_checkpoint(root)
    if ck_dir is None:
        if (path / "manifest.json").is_file():
            return path
        raise FileNotFoundError(f"no checkpoint under {path}")
    return ck_dir


def load_run(path: str | Path, step_dir: str | Path | None = None, placement: Placement | None = None) -> LoadedRun:
    """Load a trained model for evaluation or generation from a run directory (or one checkpoint), its
    tables on ``placement``'s tier (default: in memory on the device). On the disk tier the table rows
    come from the row files (exported from this run: their layout is checked) and are never loaded."""
    ck_dir = Path(step_dir) if step_dir is not None else find_checkpoint(path)
    config = read_config_json(ck_dir / RUN_CONFIG)
    try:
        model_cfg = from_dict(ModelConfig, config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ck_dir / RUN_CONFIG}: not a valid model config: {e}") from None
    tok = load_tokenizer(ck_dir / TOKENIZER_FILE)
    cmap = CompressionMap.load(ck_dir / COMPRESSION_FILE)
    model = build_model(model_cfg, cmap.lookup, placement=placement)
    ck = load_checkpoint(ck_dir, model, None, expected_config=config, restore_rng=False)
    return LoadedRun(model.eval(), tok, cmap, config, ck.step, ck.path)
