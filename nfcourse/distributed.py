"""Data-parallel training helpers for :func:`nfcourse.train.fit` (``torch.distributed``).

``fit`` notices an initialised process group (``torchrun`` or :func:`launch` set one up)
and then trains data-parallel: every process holds the whole data set and draws the same
global batch of ``batch_size`` examples, takes its contiguous share of it
(:func:`shard_bounds`) and weights its mean loss by ``W * b_r / B`` (``W`` processes,
``b_r`` examples on rank ``r``, ``B`` in the batch). DistributedDataParallel averages the
gradients over the processes, so

    mean_r grad(W b_r / B * mean_{i in r} l_i) = grad(1/B * sum_i l_i),

the gradient of one process with the whole batch, whatever the shares' sizes. Training is
therefore the same as on one process, up to the order of floating-point sums, when the loss
is deterministic; stochastic layers (dequantization noise) draw independent noise on each
rank, so such runs agree in distribution only.

Example (two CPU processes on one machine)::

    from nfcourse.distributed import launch
    launch(train_one_rank, world_size=2, backend="gloo")   # train_one_rank(rank) calls fit

or, on GPUs: ``torchrun --nproc-per-node=8 my_script.py`` with ``fit(...)`` in the script
(``fit`` calls ``init_process_group`` itself when torchrun's variables are set and no group
exists yet; see :func:`init_from_env`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "shard_bounds",
    "all_reduce_sum",
    "all_gather_objects",
    "LossModule",
    "init_from_env",
    "launch",
    "free_port",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The rank on this machine: ``$LOCAL_RANK`` (torchrun sets it), else the global rank
    modulo the visible GPUs (else the global rank)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank() % count if count else rank()


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that logs and saves."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items: the first ``n % W``
    ranks get one more than the others; shares can be empty when ``n < W``.

    Example:
        >>> [shard_bounds(5, r, 2) for r in range(2)]
        [(0, 3), (3, 5)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    if n < 0:
        raise ValueError(f"cannot shard a negative number of items ({n})")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum of ``values`` over the processes (``values`` itself without a group)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class LossModule(nn.Module):
    """A module whose ``forward(batch)`` returns the training loss of ``model``.

    DistributedDataParallel only synchronises gradients of computations that went through
    its own ``forward``; a flow's loss is ``model.loss(x)``, not ``model(x)``, so ``fit`` wraps
    this module (and compiles it when asked) instead of the model itself.

    Example:
        >>> module = LossModule(model, lambda b: model.loss(b))   # doctest: +SKIP
        >>> module(batch).backward()                              # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, loss_of: Callable[[Tensor], Tensor]):
        super().__init__()
        self.model = model
        self._loss_of = loss_of  # a plain callable, not a submodule

    def forward(self, batch: Tensor, weight: float | Tensor = 1.0) -> Tensor:
        return self._loss_of(batch) * weight


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's variables (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when they are set and no group exists.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise. Returns whether a
    process group is initialised afterwards.
    """
    if is_distributed():
        return True
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if not dist.is_available() or not all(k in os.environ for k in needed):
        return False
    if int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launched(
    rank_: int,
    fn: Callable[..., Any],
    world: int,
    backend: str,
    port: int,
    args: Sequence[Any],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank_),
        LOCAL_RANK=str(rank_),
        WORLD_SIZE=str(world),
    )
    if backend == "nccl":
        torch.cuda.set_device(rank_)
    dist.init_process_group(backend, rank=rank_, world_size=world)
    try:
        fn(rank_, *args)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    backend: str = "gloo",
    port: int | None = None,
) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes on this machine, each with
    the default process group initialised (rendezvous on 127.0.0.1), and wait for them.

    ``fn`` must be importable by name (a module-level function): the processes are spawned,
    not forked. An exception in any process is raised here. For many machines use torchrun.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    import torch.multiprocessing as mp

    mp.spawn(
        _launched,
        args=(fn, world_size, backend, port or free_port(), args),
        nprocs=world_size,
        join=True,
    )
