"""eDKM's memory savers for :class:`~lowbit.torch.palettization.FakePalettize`'s ``palett_unique`` path: an index
list kept for the backward pass (whole, packed, or sharded across ranks) and the two autograd functions that use it."""

from __future__ import annotations

import torch

__all__ = ["IndexList", "SegmentMean", "Take"]


class IndexList:
    """An index list kept for a backward pass (eDKM): whole; with ``shard`` under ``torch.distributed`` with several
    ranks only this rank's share, the others gathered back when the backward pass needs them; packed to int32 when
    it has at least ``pack_above`` entries (``palett_min_tsize``)."""

    def __init__(self, index: torch.Tensor, shard: bool, pack_above: int) -> None:
        self.length = len(index)
        distributed = shard and torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world = torch.distributed.get_world_size() if distributed else 1
        kept = index
        if self.world > 1:
            padded = torch.nn.functional.pad(index, (0, -self.length % self.world))
            kept = padded.chunk(self.world)[torch.distributed.get_rank()]
        fits = self.length < 2**31  # indices into a list no longer than the index list itself
        if self.length >= pack_above and fits:
            self.kept = kept.to(torch.int32)
        else:  # a shard is a view of the padded whole: a copy lets the whole go
            self.kept = kept.clone() if self.world > 1 else kept

    def whole(self) -> torch.Tensor:
        if self.world == 1:
            return self.kept.long()
        parts = [torch.empty_like(self.kept) for _ in range(self.world)]
        torch.distributed.all_gather(parts, self.kept)
        return torch.cat(parts)[: self.length].long()


class SegmentMean(torch.autograd.Function):
    """``values[u] = mean of x where index == u`` (``counts``: members per value)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, kept: IndexList, counts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.kept, ctx.counts = kept, counts
        return torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add(0, index, x) / counts

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return (grad / ctx.counts)[ctx.kept.whole()], None, None, None


class Take(torch.autograd.Function):
    """``table[index]``, the index list kept as :class:`IndexList` for the backward pass."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, kept: IndexList) -> torch.Tensor:  # type: ignore[override]
        ctx.kept, ctx.size = kept, len(table)
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        whole = ctx.kept.whole()
        return torch.zeros(ctx.size, dtype=grad.dtype, device=grad.device).index_add(0, whole, grad), None, None
