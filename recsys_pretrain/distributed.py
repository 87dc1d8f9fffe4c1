"""Small helpers over torch.distributed: the training loop is the same loop in one process or under torchrun.

A process started by `torchrun` (WORLD_SIZE, RANK and LOCAL_RANK in its environment) joins the process
group in `init_from_env()`: gloo for CPU tensors, NCCL for CUDA tensors when a GPU is present (one process
group with both backends, each rank on GPU LOCAL_RANK). Everything else here is a thin wrapper that is a
no-op (or the identity) in a single process, so callers never branch on whether they are distributed.

Nothing here communicates by itself: every exchange is a torch.distributed collective.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist

# Batch entries shared by every example of a batch (sampled negatives and their log sampling probabilities,
# the batch's loss weight): a rank keeps them whole. Every other tensor has a row per example and is sliced.
SHARED_KEYS = frozenset({"negatives", "neg_logq", "loss_scale"})
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment variables)."""
    return all(k in os.environ for k in _ENV)


def init_from_env(force: bool = False, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment, once (later calls return at once).
    `force`: join even when the variables are missing (then MASTER_ADDR/PORT, WORLD_SIZE and RANK must come
    from elsewhere, as torch.distributed's env:// expects). Returns whether a process group is active."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not (launched() or force):
        return False
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        from datetime import timedelta

        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", **kwargs)
    else:
        dist.init_process_group(backend="gloo", **kwargs)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (float64 on the CPU: gloo). Every rank must pass the same keys."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a decision the ranks must take together)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (pickled: small objects such as the loop's state)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def share(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of `n` examples: sizes differ by at most one, the first ranks larger."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def batch_size(batch: dict[str, torch.Tensor], shared: Collection[str] = SHARED_KEYS) -> int:
    """Examples in a batch: the common first dimension of its per-example tensors."""
    sizes = {k: v.shape[0] for k, v in batch.items() if k not in shared and v.dim() > 0}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"a batch's per-example tensors must have one first dimension; got {sizes}")
    return next(iter(sizes.values()))


def shard(batch: dict[str, torch.Tensor], rank: int, world: int,
          shared: Collection[str] = SHARED_KEYS) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous slice of a global batch: every per-example tensor is cut along its first
    dimension; the entries in `shared` (and 0-d tensors) stay whole. A rank past the end gets 0 examples."""
    part = share(batch_size(batch, shared), rank, world)
    return {k: v if k in shared or v.dim() == 0 else v[part] for k, v in batch.items()}


def loss_count(batch: dict[str, torch.Tensor]) -> float:
    """What a batch's loss is a mean over, by the batch conventions of the models' tasks: masked positions
    (`labels` != 0: BERT4Rec's masked-item loss), the summed interaction weights (`targets`: MF's multinomial
    loss, a sum over the rows divided by the total weight) or else the examples (a mean over rows: BPR)."""
    if "labels" in batch:
        return float((batch["labels"] != 0).sum())
    if "targets" in batch:
        return max(float(batch["targets"].sum()), 1.0)  # MF clamps its denominator at 1 too
    return float(batch_size(batch))


def part(batch: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """(rank `rank`'s share of a global batch, the factor its loss is multiplied by) for data-parallel training
    under DDP, which averages the ranks' gradients. A batch's loss is a mean over `loss_count(batch)`; the
    rank's mean over its own count, times world x (its count / the global count), averaged over the ranks,
    is the global batch's loss, so its gradient is the one world size 1 computes. The counts are local:
    every rank holds the whole global batch."""
    mine = shard(batch, rank, world)
    total, count = loss_count(batch), (loss_count(mine) if batch_size(mine) else 0.0)
    if count == 0 or total == 0:
        # Nothing of the batch's loss here (a batch smaller than the world): DDP still needs this rank's
        # backward, so it computes rank 0's share and weighs it 0 (a zero gradient, never a NaN).
        return shard(batch, 0, world), 0.0
    return mine, world * count / total


def destroy() -> None:
    if active():
        dist.destroy_process_group()


def launch(argv: Sequence[str], nproc: int, module: str = "recsys_pretrain.cli") -> int:
    """Run `python -m <module> argv...` as `nproc` processes under torchrun on this machine (standalone
    rendezvous) and return its exit status. The CLI calls this for `--nproc N`, with `argv` its own arguments
    less that option; the workers see torchrun's environment (`launched()` is true there), so they train as
    ranks instead of launching again. Only rank 0 should write outputs (`is_main()`)."""
    return subprocess.run(torchrun_command(argv, nproc, module), check=False).returncode


def torchrun_command(argv: Sequence[str], nproc: int, module: str = "recsys_pretrain.cli") -> list[str]:
    """The command line that runs `python -m <module> argv...` as `nproc` ranks on this machine."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *argv]
