"""Distributed calibration and evaluation on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank calibrates on its own shard of the calibration data; every per-channel statistic
(running maxima, the pre/post errors of Algorithm 1) is all-reduced before it is used, so all
ranks hold identical parameters, equal to a single-process run whose batches are the union of
the ranks' batches (up to floating-point reduction order). Evaluation shards the test set and
sums the counts. Launch with ``torchrun --nproc_per_node=N``; see the docs for the command line.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "allreduce_reducer", "shard_indices",
           "distributed_evaluate"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: Optional[str] = None) -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Returns True when running distributed. The backend defaults to NCCL with CUDA, else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def allreduce_reducer(group=None) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """A ``reducer(tensor, op)`` for :class:`~sj_parallel_conversion.ParallelConversionRecipe`.

    ``op`` is ``"sum"`` (per-channel sums and counts) or ``"max"`` (running maxima).
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        if not is_distributed():
            return t
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=ops[op], group=group)
        return out

    return reduce


def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Sequence[int]:
    """Contiguous, equally sized shard of ``range(n)`` for this rank (the remainder is dropped so
    that every rank runs the same number of steps, which collective reductions need)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    per = n // w
    if per == 0:
        raise ValueError(f"cannot shard {n} items over {w} processes")
    return range(r * per, (r + 1) * per)


@torch.no_grad()
def distributed_evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device="cpu",
                         num_batches: Optional[int] = None, progress: bool = False):
    """:func:`~sj_parallel_conversion.compare.evaluate` on this rank's shard, counts summed over ranks.

    Returns ``(accuracy, images, seconds)`` with images summed and seconds maximised over ranks.
    """
    from .compare import evaluate

    acc, n, sec = evaluate(predict, loader, device=device, num_batches=num_batches, progress=progress)
    if not is_distributed():
        return acc, n, sec
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    where = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = torch.tensor([acc * n, float(n)], dtype=torch.float64, device=where)
    dist.all_reduce(counts)
    t = torch.tensor([sec], dtype=torch.float64, device=where)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(counts[0] / counts[1]), int(counts[1]), float(t[0])
