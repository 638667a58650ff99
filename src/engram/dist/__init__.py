"""Running on several processes with torch.distributed: the runtime (device, rank, world size, process
groups, collective timeouts), Engram tables sharded by rows with an all-to-all lookup, and the launcher.

Imports point down: ``dist`` uses ``memory`` (stores) and is used by ``train``; nothing here knows the
training loop. A single process is a ``Runtime`` of world size 1, so one code path serves both.
"""

from engram.dist.runtime import CollectiveError, Runtime

__all__ = ["CollectiveError", "Runtime"]
