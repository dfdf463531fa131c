"""The k-means that starts DKM's centroids: lowbit's exact 1-D optimum, or k-means++ seeding and Lloyd for vectors."""

from __future__ import annotations

import numpy as np
import torch

from lowbit.kernels.kmeans1d import optimal_centroids

__all__ = ["exact_centroids", "kmeans_plus_plus"]


def exact_centroids(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[G, k]`` optimal 1-D centroids of each row of ``values`` (rounded to fp16: at most 65,536 distinct)."""
    rows = [np.unique(row.astype(np.float16).astype(np.float64), return_counts=True) for row in values.cpu().numpy()]
    offsets = np.cumsum([0] + [len(distinct) for distinct, _ in rows])
    centroids = optimal_centroids(
        np.concatenate([distinct for distinct, _ in rows]),
        np.concatenate([counts for _, counts in rows]).astype(np.float64),
        offsets,
        k,
    )
    return torch.from_numpy(np.asarray(centroids).reshape(len(rows), k)).to(values)


def kmeans_plus_plus(x: torch.Tensor, k: int, n_init: int) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations on ``x [n, d]``; the best of ``n_init`` runs (fixed generator)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    best, best_cost = None, float("inf")
    data = x.double().cpu()
    for _ in range(n_init):
        centers = data[torch.randint(len(data), (1,), generator=generator)]
        while len(centers) < k:
            distance = torch.cdist(data, centers).min(1).values ** 2
            pick = (
                torch.multinomial(distance + 1e-30, 1, generator=generator)
                if distance.sum() > 0
                else torch.zeros(1, dtype=torch.long)
            )
            centers = torch.cat([centers, data[pick]])
        for _ in range(20):
            nearest = torch.cdist(data, centers).argmin(1)
            sums = torch.zeros_like(centers).index_add(0, nearest, data)
            counts = torch.bincount(nearest, minlength=k)[:, None]
            centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        cost = float((torch.cdist(data, centers).min(1).values ** 2).sum())
        if cost < best_cost:
            best, best_cost = centers, cost
    assert best is not None
    return best.to(x)
