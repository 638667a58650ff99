"""The backbone data-parallel: DDP on the runtime's group, the (sharded) memory tables left out of it.

A table's gradient never goes through DDP's all-reduce: its rows are sharded and its gradients reach
the owners through the lookup's all-to-all (engram.dist.sharded). DDP also skips broadcasting buffers
each step: the only training-time buffers (MoE expert biases) change by the same rule on every rank from
all-reduced expert loads, so they stay equal without it.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engram.dist.runtime import Runtime
from engram.memory import memory_tables


def table_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of the memory tables' row parameters."""
    rows = {id(t.weight) for t in memory_tables(model).values() if "weight" in t._parameters}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in rows]


def data_parallel(model: nn.Module, rt: Runtime) -> nn.Module:
    """``model`` wrapped in DDP over ``rt.group`` (tables excluded), or ``model`` itself in one process."""
    if not rt.distributed:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, table_parameter_names(model))
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    with rt.guard("wrapping the model in DDP (it checks that every rank has the same parameters)"):
        return DistributedDataParallel(model, device_ids=device_ids, process_group=rt.group,
                                       forward_sync_buffers=False)


__all__ = ["data_parallel", "table_parameter_names"]
