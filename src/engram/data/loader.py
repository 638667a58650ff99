"""Packing token documents into fixed-length sequences, and background-thread batch loaders.

Shapes: B batch, T sequence length.

Packing (one epoch):
    1. Order the documents (a seeded permutation per epoch for training; a fixed one for evaluation).
    2. Form the stream: for each document, ``<|endoftext|>`` followed by its tokens. The separator opens
       each document (a BOS), so every document's first token is predicted from the separator alone.
    3. Window j is stream[j*T : j*T + T + 1] (consecutive windows share one token); the partial
       window at the end of the stream is dropped.
    4. ids = window[:-1], targets = window[1:], segment_ids[t] = index, within the window, of the
       document that ids[t] belongs to (0 for the first, +1 at each document start). A target whose
       token belongs to a different document than its input (the last token of a document, followed
       by the next document's separator) is masked with IGNORE_INDEX = -100: no prediction crosses a
       document boundary.

Training order: windows are shuffled within an epoch (seeded by (seed, epoch)); batch k of an
epoch is windows order[k*B:(k+1)*B]; the last partial batch is dropped; epochs follow each other
without end. The position is one integer, the number of batches handed out, so ``state_dict()`` /
``load_state_dict()`` resume exactly: the batches after a resume equal those of an uninterrupted run.

Batches (including the caller's ``hash_fn(ids_BT, segment_ids_BT)``) are built in a background
thread, a bounded queue ahead of the consumer. An exception there is re-raised in the caller by the
next ``next()`` (with a note saying which batch), never swallowed. A thread that produces nothing for
``timeout`` seconds (default ``DEFAULT_TIMEOUT``: generous, since one batch of a big model hashes in
well under a second) raises ``TimeoutError`` in the caller instead of hanging it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch

from engram.data.shards import TokenDataset

__all__ = ["IGNORE_INDEX", "Batch", "EvalLoader", "HashFn", "Packing", "TrainLoader"]

IGNORE_INDEX = -100
EVAL_SEED = 0x5EED  # evaluation document order; fixed so every run evaluates on the same windows
DEFAULT_TIMEOUT = 600.0  # seconds the consumer waits for one batch before giving up
HashFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids_BT, segment_ids_BT) -> hash ids


@dataclass(slots=True)
class Batch:
    """One batch. All (B, T) int64; ``targets`` holds IGNORE_INDEX where masked."""

    ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    segment_ids: torch.Tensor  # (B, T)
    hash_ids: torch.Tensor | None = None  # whatever hash_fn returned, e.g. (B, T, H)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        hash_ids = None if self.hash_ids is None else self.hash_ids.to(device, non_blocking=non_blocking)
        ids, targets, seg = (x.to(device, non_blocking=non_blocking) for x in (self.ids, self.targets, self.segment_ids))
        return Batch(ids, targets, seg, hash_ids)

    def pin_memory(self) -> Batch:
        """Page-locked copies, so ``to("cuda", non_blocking=True)`` overlaps the copy with compute."""
        hash_ids = None if self.hash_ids is None else self.hash_ids.pin_memory()
        return Batch(self.ids.pin_memory(), self.targets.pin_memory(), self.segment_ids.pin_memory(), hash_ids)


# ------------------------------------------------------------------------------------------------ packing


class Packing:
    """The stream of one document order: ``[eot] + doc`` for each document, cut into windows of T+1."""

    def __init__(self, data: TokenDataset, order: np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.data, self.order, self.seq_len = data, np.asarray(order, dtype=np.int64), seq_len
        lengths = data.doc_lengths[self.order] + 1  # + the separator
        self.starts = np.zeros(len(self.order) + 1, dtype=np.int64)  # stream offset of each document's separator
        np.cumsum(lengths, out=self.starts[1:])
        self.n_windows = max(0, int(self.starts[-1]) - 1) // seq_len

    def window(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, targets, segment_ids) of window j, each (T,) int64."""
        if not 0 <= j < self.n_windows:
            raise IndexError(f"window {j} out of range [0, {self.n_windows})")
        T = self.seq_len
        p0, p1 = j * T, j * T + T + 1
        buf = np.empty(T + 1, dtype=np.int64)
        doc_of = np.empty(T + 1, dtype=np.int64)  # which document (counted within the window) each token is in
        k = int(np.searchsorted(self.starts, p0, side="right")) - 1
        seg, p = 0, p0
        while p < p1:
            s = int(self.starts[k])
            a, b = p - s, min(p1, int(self.starts[k + 1])) - s  # [a, b) within "[eot] + doc"
            out = slice(p - p0, p - p0 + b - a)
            if a == 0:
                buf[out.start] = self.data.eot_id
                buf[out.start + 1 : out.stop] = self.data.doc(int(self.order[k]))[: b - 1]
            else:
                buf[out] = self.data.doc(int(self.order[k]))[a - 1 : b - 1]
            doc_of[out] = seg
            p += b - a
            k += 1
            seg += 1
        targets = buf[1:].copy()
        targets[doc_of[1:] != doc_of[:-1]] = IGNORE_INDEX
        return buf[:-1], targets, doc_of[:-1].copy()

    def batch(self, windows: np.ndarray, hash_fn: HashFn | None = None, pin_memory: bool = False) -> Batch:
        """Stack windows into a Batch; ``hash_fn(ids_BT, segment_ids_BT)`` fills ``hash_ids``."""
        ids, targets, seg = (torch.from_numpy(np.stack(x)) for x in zip(*(self.window(int(j)) for j in windows)))
        hash_ids = hash_fn(ids, seg) if hash_fn is not None else None
        batch = Batch(ids, targets, seg, hash_ids)
        return batch.pin_memory() if pin_memory else batch


# --------------------------------------------------------------------------------------- background thread


class _Failure:
    __slots__ = ("exc", "index")

    def __init__(self, exc: BaseException, index: int) -> None:
        self.exc, self.index = exc, index


class _Prefetcher:
    """Runs ``make(i)`` for i = start, start+1, ... (< stop) in a daemon thread, ``depth`` results ahead."""

    def __init__(
        self, make: Callable[[int], Batch], start: int, stop: int | None, depth: int, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start, stop), daemon=True, name="engram-data-loader")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[int], Batch], start: int, stop: int | None) -> None:
        i = start
        while stop is None or i < stop:
            try:
                item: object = (i, make(i))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, who re-raises it
                self._put(_Failure(e, i))
                return
            if not self._put(item):
                return
            i += 1

    def get(self) -> tuple[int, Batch]:
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("engram data loader thread exited without producing a batch") from None
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(
                        f"the engram data loader thread produced no batch in {self._timeout:g} s (stuck reading "
                        "shards or hashing?); raise the loader timeout if batches are legitimately this slow"
                    ) from None
        if isinstance(item, _Failure):
            self.close()
            item.exc.add_note(f"(raised in the engram data loader thread while building batch {item.index})")
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------- loaders


def _check_shard(batch_size: int, shard: tuple[int, int]) -> None:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"loader shard: rank {rank} outside world size {world}")
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} (sequences per step, all ranks together) is not divisible by "
                         f"the world size {world}")


def _rank_slice(windows: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Rank r's consecutive 1/world part of a batch's windows (all of them for one process)."""
    rank, world = shard
    b = len(windows) // world
    return windows[rank * b : (rank + 1) * b] if world > 1 else windows


class _TrainOrder:
    """Which windows make batch ``step``: separate from TrainLoader so the loader thread holds no
    reference to the loader (dropping the loader then stops the thread)."""

    def __init__(
        self, data: TokenDataset, batch_size: int, seq_len: int, seed: int, hash_fn: HashFn | None, pin_memory: bool,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.data, self.batch_size, self.seq_len, self.seed, self.hash_fn = data, batch_size, seq_len, seed, hash_fn
        self.pin_memory, self.shard = pin_memory, shard
        self.batches_per_epoch = Packing(data, np.arange(data.n_docs), seq_len).n_windows // batch_size
        self._cache: tuple[int, Packing, np.ndarray] | None = None  # the current epoch's packing and window order

    def epoch(self, epoch: int) -> tuple[Packing, np.ndarray]:
        cached = self._cache
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            packing = Packing(self.data, rng.permutation(self.data.n_docs), self.seq_len)
            cached = (epoch, packing, rng.permutation(packing.n_windows))
            self._cache = cached
        return cached[1], cached[2]

    def make_batch(self, step: int) -> Batch:
        epoch, k = divmod(step, self.batches_per_epoch)
        packing, window_order = self.epoch(epoch)
        B = self.batch_size
        return packing.batch(_rank_slice(window_order[k * B : (k + 1) * B], self.shard), self.hash_fn, self.pin_memory)


class TrainLoader:
    """Endless, shuffled, resumable batches of one tokenised split (see the module docstring)."""

    def __init__(
        self,
        data: TokenDataset,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        hash_fn: HashFn | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``shard`` (rank, world size): this process yields its 1/world part of every batch of
        ``batch_size`` sequences (the global batch, the same whatever the world size)."""
        self._prefetcher: _Prefetcher | None = None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_shard(batch_size, shard)
        if not timeout > 0:
            raise ValueError(f"loader timeout must be positive, got {timeout}")
        self.data, self.batch_size, self.seq_len, self.seed, self.prefetch = data, batch_size, seq_len, seed, prefetch
        self.timeout = timeout
        self._order = _TrainOrder(data, batch_size, seq_len, seed, hash_fn, pin_memory, shard)
        self.batches_per_epoch = self._order.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{data.directory}: {data.n_tokens} tokens in {data.n_docs} documents do not fill one batch of "
                f"{batch_size} x {seq_len}"
            )
        self._step = 0  # batches handed to the caller so far

    def make_batch(self, step: int) -> Batch:
        """Batch number ``step`` of the endless sequence, built in the calling thread (pure: the same
        step always gives the same batch)."""
        return self._order.make_batch(step)

    @property
    def step(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self._step // self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self._order.make_batch, self._step, None, self.prefetch, self.timeout)
        try:
            step, batch = self._prefetcher.get()
        except BaseException:  # the loader thread's error, or e.g. KeyboardInterrupt while waiting
            self.close()  # the next call restarts the thread at the same step
            raise
        assert step == self._step, (step, self._step)
        self._step += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "step": self._step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_docs": self.data.n_docs,
            "n_tokens": self.data.n_tokens,
            "content": self.data.index.get("content"),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state taken over different data or batch geometry."""
        mine = self.state_dict()
        diff = [k for k in mine if k != "step" and state.get(k) != mine[k]]
        if diff:
            raise ValueError(
                f"loader state does not match this loader: {', '.join(f'{k}={state.get(k)!r} vs {mine[k]!r}' for k in diff)}"
            )
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stop the background thread (prefetched batches are dropped; the position is kept)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self.close()


class EvalLoader:
    """A fixed list of evaluation batches: every iteration yields the same ``len(self)`` batches.

    Documents are in a fixed seeded order (EVAL_SEED, independent of the training seed), windows in
    stream order; ``n_batches`` is capped at the number of full batches the split holds.
    """

    def __init__(
        self,
        data: TokenDataset,
        batch_size: int,
        seq_len: int,
        n_batches: int | None = None,
        *,
        hash_fn: HashFn | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        source: str | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``source`` names the data in errors (default: the dataset's directory); ``shard`` as for
        ``TrainLoader``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_shard(batch_size, shard)
        self.shard = shard
        if n_batches is not None and n_batches < 1:
            raise ValueError(f"the number of evaluation batches must be >= 1, got {n_batches}")
        self.packing = Packing(data, np.random.default_rng(EVAL_SEED).permutation(data.n_docs), seq_len)
        available = self.packing.n_windows // batch_size
        if available == 0:
            raise ValueError(
                f"{source or data.directory}: too few tokens ({data.n_tokens:,}) for one evaluation batch of "
                f"{batch_size} x {seq_len} (+1) tokens; use a longer text or a smaller batch size / sequence length"
            )
        self.n_batches = available if n_batches is None else min(n_batches, available)
        self.batch_size, self.hash_fn, self.prefetch, self.pin_memory = batch_size, hash_fn, prefetch, pin_memory
        self.timeout = timeout

    def make_batch(self, k: int) -> Batch:
        B = self.batch_size
        return self.packing.batch(_rank_slice(np.arange(k * B, (k + 1) * B), self.shard), self.hash_fn, self.pin_memory)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Batch]:
        prefetcher = _Prefetcher(self.make_batch, 0, self.n_batches, self.prefetch, self.timeout)
        try:
            for _ in range(self.n_batches):
                yield prefetcher.get()[1]
        finally:
            prefetcher.close()
