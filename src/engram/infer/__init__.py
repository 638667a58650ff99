"""Inference on trained runs: loading a run, evaluation, sampling and generation.

This is the public entry point for code that uses trained models (analysis, benchmarks, the CLI).
"""

from engram.infer.evaluate import evaluate, evaluate_run, read_text_file
from engram.infer.generate import check_prompts, check_sampling, generate, generate_text, sample_next
from engram.infer.run import LoadedRun, find_checkpoint, load_run

__all__ = ["LoadedRun", "check_prompts", "check_sampling", "evaluate", "evaluate_run", "find_checkpoint", "generate",
           "generate_text", "load_run", "read_text_file", "sample_next"]
