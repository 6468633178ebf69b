"""Data-parallel calibration over torch.distributed (gloo on the CPU): each rank runs its share
of the calibration samples through the layer-sequential pass, and after each pass over a
decoder layer the modifiers' statistics (Hessians, AWQ / SmoothQuant statistics, activation
ranges, KV-cache ranges) are reduced across the ranks, so every rank quantizes the layer from
the statistics of all the samples and holds the same quantized weights. Rank 0 writes the
checkpoint."""

from __future__ import annotations

import datetime
import os
from typing import List, Optional

import torch
import torch.distributed as dist

# Collectives that wait longer than this for a peer fail (a rank that died or hangs) when lowbit
# starts the process group itself (torchrun without an initialised group).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, raised, or did not arrive within the timeout."""


class Group:
    """The process group oneshot calibrates over: this process's rank among `size`."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.reduced_bytes = 0  # what this rank sent into all-reduces (the multi-node plan's traffic)

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as e:  # gloo raises RuntimeError (closed connection, timeout) with its own text
            raise DistributedError(f"lowbit rank {self.rank} of {self.size}: {what} failed ({type(e).__name__}: "
                                   f"{str(e).strip()[:300]}); another rank probably stopped with an error (see its "
                                   "log) or did not reach this point in time") from None

    def _all_reduce(self, tensor: torch.Tensor, op, what: str) -> torch.Tensor:
        self.reduced_bytes += tensor.numel() * tensor.element_size()
        self._run(what, dist.all_reduce, tensor, op=op)
        return tensor

    def sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM, what)

    def max_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX, what)

    def min_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MIN, what)

    def gather(self, obj, what: str) -> List:
        """Every rank's `obj` (picklable, small), in rank order."""
        out: List = [None] * self.size
        self._run(what, dist.all_gather_object, out, obj)
        return out

    def barrier(self, what: str) -> None:
        self._run(what, dist.barrier)

    def shard(self, samples: list) -> list:
        """This rank's calibration samples: every size-th, from its rank on (sample g goes to rank
        g % size, its s-th sample is g = s * size + rank)."""
        if len(samples) < self.size:
            raise ValueError(f"{len(samples)} calibration samples cannot be shared by {self.size} processes: give at "
                             f"least {self.size} samples (num_calibration_samples) or use fewer processes")
        return samples[self.rank::self.size]

    def interleave(self, per_rank: List[list]) -> list:
        """Items recorded per local sample on each rank, in global sample order (see shard)."""
        longest = max((len(items) for items in per_rank), default=0)
        return [items[s] for s in range(longest) for items in per_rank if s < len(items)]


def resolve(distributed) -> Optional[Group]:
    """oneshot's distributed argument: "auto" uses an initialised default process group, or
    starts one (gloo) when torchrun's environment says there are several processes; True
    requires one of those; False runs alone."""
    if distributed not in (True, False, "auto"):
        raise ValueError(f"distributed must be True, False or 'auto', got {distributed!r}")
    if distributed is False:
        return None
    if not dist.is_available():
        if distributed is True:
            raise ValueError("distributed=True, but this torch build has no torch.distributed")
        return None
    if not dist.is_initialized():
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ
        if not launched:
            if distributed is True:
                raise ValueError("distributed=True needs a process group: start the script with torchrun "
                                 "--nproc-per-node N, or call torch.distributed.init_process_group('gloo') first")
            return None
        dist.init_process_group("gloo", timeout=DEFAULT_TIMEOUT)
    group = Group()
    return group if group.size > 1 or distributed is True else None
