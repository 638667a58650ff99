"""Inference on trained runs: loading a run, evaluation, sampling and generation.

This is the public entry point for code that uses trained models (analysis, benchmarks, the CLI);
import from here, not from modules inside ``engram.train``.
"""

from engram.train.commands import evaluate_run, generate_text
from engram.train.trainer import LoadedRun, evaluate, load_run

__all__ = ["LoadedRun", "evaluate", "evaluate_run", "generate_text", "load_run"]
