"""torch.compile (regional: each decoder block) agrees with eager execution.

Tolerance: compiled kernels fuse and reorder fp32 reductions, so losses differ in the last bits; over a
few optimizer steps on the same batches the losses must agree to 1e-4 (absolute, nats/token) and the
parameter names (what checkpoints and optimizers see) must not change.
"""

from __future__ import annotations

import pytest
import torch

from engram.config import preset
from engram.model import build_model
from engram.runtime import compile_blocks
from engram.train.optim import build_optimizers

pytestmark = pytest.mark.slow  # compiling costs tens of seconds on 2 CPU cores


def _losses(name: str, compiled: bool, steps: int = 3) -> tuple[list[float], list[str]]:
    torch.manual_seed(0)
    model = build_model(preset(name)).train()
    names = [n for n, _ in model.named_parameters()]
    if compiled:
        compile_blocks(model)
    opt = build_optimizers(model, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=g)
    hash_ids = model.hash(ids) if model.hasher is not None else None
    out = []
    for _ in range(steps):
        loss = model(ids, hash_ids=hash_ids, targets=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_bias()
        out.append(float(loss.detach()))
    assert [n for n, _ in model.named_parameters()] == names
    return out, names


@pytest.mark.parametrize("name", ["tiny-dense", "debug"])
def test_compiled_training_matches_eager(name):
    eager, names = _losses(name, compiled=False)
    compiled, names_c = _losses(name, compiled=True)
    assert names == names_c
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_compile_blocks_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="no .blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
