"""``engram bench step``: train-step time (forward + backward + optimizer) of tiny Engram-MoE vs tiny MoE.

Both presets have the same activated parameters (the allocation solver's rho = 0.75 split), run in one
process on the same batches (bf16 autocast where the hardware runs it fast, else fp32), interleaved. Engram tables take sparse row updates.
"""

from __future__ import annotations

import torch

from engram.bench.common import time_pair
from engram.report import format_table
from engram.runtime import compile_blocks, resolve_dtype
from engram.config import preset
from engram.model import build_model
from engram.train.optim import build_optimizers

QUICK = dict(batch=2, seq=64, repeats=2)


def _stepper(name: str, batch: int, seq: int, dtype: torch.dtype, compiled: bool = False):
    torch.manual_seed(0)
    cfg = preset(name)
    model = build_model(cfg).train()
    if compiled:
        compile_blocks(model)
    opt = build_optimizers(model, lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    hash_ids = model.hash(ids)  # hashing belongs to the loader, not the step

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids, hash_ids=hash_ids, targets=ids, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_bias()

    def check() -> None:  # the range check forward runs on caller-supplied hash ids, alone
        if model.hasher is not None:
            model._check_hash_ids(hash_ids, batch, seq)

    return step, model.param_counts(), check


def run(batch: int = 16, seq: int = 256, repeats: int = 5, baseline: str = "tiny-moe",
        candidate: str = "tiny", dtype: str = "auto") -> dict:
    dtype = resolve_dtype(dtype)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    fb, cb, _ = _stepper(baseline, batch, seq, dt)
    fc, cc, check = _stepper(candidate, batch, seq, dt)
    times = time_pair({baseline: fb, candidate: fc}, repeats=repeats, warmup=2)
    check_s = time_pair({"check": check}, repeats=max(repeats, 20), warmup=2)["check"]
    toks = batch * seq
    rows = []
    for name, c in ((baseline, cb), (candidate, cc)):
        rows.append([name, c["P_tot"], c["P_act"], c["engram_tables"], times[name] * 1e3, toks / times[name],
                     times[name] / times[baseline]])
    table = format_table(["preset", "P_tot", "P_act", "table params", "ms / step", "tokens/s", "time ratio"], rows)
    share = check_s / times[candidate]
    table += (f"\nhash-id range check on caller-supplied ids ({candidate}): {check_s * 1e6:,.0f} us per step "
              f"({share:.2%} of the step; included in the step time above)")
    return {"table": table, "ratio": times[candidate] / times[baseline], "hash_check_us": check_s * 1e6,
            "hash_check_share": share,
            "ms_per_step": {k: v * 1e3 for k, v in times.items()},
            "config": dict(batch=batch, seq=seq, dtype=dtype, threads=torch.get_num_threads())}
