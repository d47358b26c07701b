"""Fused collectives over a process group: bucketed all-reduce (symmetric matrices as upper
triangles) and broadcast, with payload bytes counted per purpose."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist


class PendingReduction:
    """An asynchronous bucketed all-reduce whose results are unpacked on :meth:`wait`."""

    def __init__(self, works: list[Any], unpack: list[Any]) -> None:
        self.works, self.unpack = works, unpack

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        for fn in self.unpack:
            fn()
        self.works, self.unpack = [], []


def _buckets(tensors: list[torch.Tensor], sizes: list[int], limit: float) -> list[list[int]]:
    """Indices grouped by (dtype, device), each group cut into buckets of at most ``limit`` bytes."""
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out = []
    for indices in groups.values():
        bucket, used = [], 0
        for i in indices:
            nbytes = sizes[i] * tensors[i].element_size()
            if bucket and used + nbytes > limit:
                out.append(bucket)
                bucket, used = [], 0
            bucket.append(i)
            used += nbytes
        if bucket:
            out.append(bucket)
    return out


class Communicator:
    """Fused collectives over a process group, counting payload bytes per purpose in :attr:`bytes`."""

    def __init__(self, group: Any = None, bucket_mb: float = 25.0) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.bytes: Counter[str] = Counter()
        self.collectives: Counter[str] = Counter()

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def allreduce_mean(self, tensors: list[torch.Tensor], purpose: str, *, symmetric: bool = False,
                       async_op: bool = False, fuse_all: bool = False) -> PendingReduction:
        """Average ``tensors`` across ranks in place; symmetric matrices travel as upper triangles.
        ``fuse_all``: one collective per dtype and device, whatever ``bucket_mb`` says (a bucket
        planned by the caller)."""
        tensors = list(tensors)
        triu = [torch.triu_indices(t.shape[0], t.shape[0], device=t.device) if symmetric else None
                for t in tensors]
        sizes = [t.shape[0] * (t.shape[0] + 1) // 2 if symmetric else t.numel() for t in tensors]
        works, unpack = [], []
        for bucket in _buckets(tensors, sizes, math.inf if fuse_all else self.bucket_bytes):
            parts = []
            for i in bucket:
                t = tensors[i]
                parts.append(t[triu[i][0], triu[i][1]] if symmetric else t.reshape(-1))
            flat = torch.cat(parts)
            self.bytes[purpose] += flat.numel() * flat.element_size()
            self.collectives[purpose] += 1
            works.append(dist.all_reduce(flat, group=self.group, async_op=True))

            def finish(flat: torch.Tensor = flat, bucket: list[int] = bucket) -> None:
                flat.div_(self.world_size)
                offset = 0
                for i in bucket:
                    t, n = tensors[i], sizes[i]
                    values = flat[offset:offset + n]
                    offset += n
                    if symmetric:
                        rows, cols = triu[i]
                        t[rows, cols] = values
                        t[cols, rows] = values
                    else:
                        t.copy_(values.view_as(t))

            unpack.append(finish)
        pending = PendingReduction(works, unpack)
        if not async_op:
            pending.wait()
        return pending

    def broadcast(self, tensors: list[torch.Tensor], src: int, purpose: str) -> None:
        """Broadcast ``tensors`` (same shapes on every rank) from group rank ``src``, fused."""
        tensors = list(tensors)
        if not tensors:
            return
        sizes = [t.numel() for t in tensors]
        for bucket in _buckets(tensors, sizes, self.bucket_bytes):
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            self.bytes[purpose] += flat.numel() * flat.element_size()
            self.collectives[purpose] += 1
            dist.broadcast(flat, src=self._global_rank(src), group=self.group)
            if self.rank != src:
                offset = 0
                for i in bucket:
                    t = tensors[i]
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def all_gather_object(self, obj: Any, purpose: str) -> list[Any]:
        """Every rank's ``obj`` (small metadata), in rank order."""
        self.bytes[purpose] += len(pickle.dumps(obj))
        self.collectives[purpose] += 1
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
