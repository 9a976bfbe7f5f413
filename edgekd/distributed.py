"""torch.distributed glue: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we only read them.

`torchrun --nproc_per_node=N -m edgekd distill recipe.toml --out runs/x` runs data-parallel (DDP): gloo
on CPU, NCCL on CUDA. Only rank 0 writes files and shows progress bars.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from edgekd.streaming import stream_item


def init_from_env() -> bool:
    """Join the process group torchrun describes (no-op for a single process); True when distributed."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """On CUDA each rank uses the GPU torchrun gave it (LOCAL_RANK)."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank numbers across ranks (metrics are reduced, not taken from rank 0 alone)."""
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_param_divergence(model: torch.nn.Module) -> float:
    """Largest |param - rank 0's param| over all ranks: 0.0 when DDP kept the replicas in sync."""
    if not is_distributed():
        return 0.0
    worst = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double().cpu())
    worst = worst.to(next(model.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def shard_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP (fully_shard) a teacher too large for one device: each rank holds a shard of its weights and
    gathers a layer's weights only while that layer runs. Every child module with parameters becomes its own
    unit, then the whole model. All ranks must run the teacher in lock-step (DDP training does)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


class StreamBlocks(torch.utils.data.IterableDataset):
    """The blocks of `block` consecutive samples of a stream (edgekd.streaming.LazyStream) that one DDP rank and
    DataLoader worker read: block j goes to rank j % world and a rank's m-th block to worker m % workers (torch's
    documented split by torch.utils.data.get_worker_info()), so a DataLoader yields a rank's blocks in stream
    order. Every worker walks the whole stream and prepares only its blocks. Yields (start, inputs (B, ...)
    normalized, labels (B,)), or with `summary` (start, labels, per-channel sums, sums of squares and value
    counts of the scaled, unnormalized inputs)."""

    def __init__(self, x: Any, block: int, rank: int = 0, world: int = 1, summary: bool = False):
        self.x, self.block, self.rank, self.world, self.summary = x, block, rank, world, summary

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        it, start, j = iter(self.x.base), 0, 0
        while items := list(itertools.islice(it, self.block)):
            if j % self.world == self.rank and (j // self.world) % workers == w:
                yield self._prepare(start, items)
            start, j = start + len(items), j + 1

    def _prepare(self, start: int, items: list) -> tuple:
        pairs = [stream_item(item, start + k) for k, item in enumerate(items)]
        labels = np.asarray([y for _, y in pairs], np.int64)
        xs = np.stack([self.x.scaled(v, start + k) for k, (v, _) in enumerate(pairs)])
        if not self.summary:
            return start, torch.from_numpy(np.stack([self.x.norm(v) for v in xs])), torch.from_numpy(labels)
        a = xs.astype(np.float64)
        a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1) if a.ndim == 4 else a.reshape(1, -1)
        return start, labels, a.sum(1), (a * a).sum(1), a.shape[1]
