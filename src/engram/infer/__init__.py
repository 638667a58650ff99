"""Inference on trained runs: loading a run, evaluation, sampling and generation.

This is the public entry point for code that uses trained models (analysis, benchmarks, the CLI).
"""

from engram.infer.evaluate import evaluate, evaluate_run, read_text_file
from engram.infer.generate import (GenerationResult, check_prompts, check_sampling, generate, generate_batch,
                                   generate_text, generate_texts, read_prompts_file, sample_next)
from engram.infer.run import LoadedRun, find_checkpoint, load_run

__all__ = ["GenerationResult", "LoadedRun", "check_prompts", "check_sampling", "evaluate", "evaluate_run",
           "find_checkpoint", "generate", "generate_batch", "generate_text", "generate_texts", "load_run",
           "read_prompts_file", "read_text_file", "sample_next"]
