"""DKMPalettizer: training-time palettization with differentiable k-means (DKM, Cho et al. 2022), with eDKM's
attention over unique weight values (``palett_unique``).

``prepare`` registers a :class:`FakePalettize` parametrization on each weight (``torch.nn.utils.parametrize``), so
optimizers, ``state_dict`` and DDP see ordinary parameters; each forward replaces the weight by its soft-assigned
reconstruction ``A @ C``, ``A = softmax(-|w - c|^2 / tau)``, after ``kmeans_max_iter`` differentiable centroid updates.
``finalize`` writes the hard-assigned LUT values back (at most ``2**n_bits`` distinct values per LUT), removes the
parametrizations and records the palettization so :func:`lowbit.torch.export_onnx` writes it as LUT + indices.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from lowbit.config import PalettizeConfig
from lowbit.errors import SkipWeight
from lowbit.kernels.kmeans1d import optimal_centroids
from lowbit.report import CompressionReport
from lowbit.torch.modules import computed_weights, is_supported, module_weights, numpy_dtype, to_numpy
from lowbit.torch.palettization._base import target_model
from lowbit.torch.palettization.dkm_config import DKMPalettizerConfig, ModuleDKMPalettizerConfig, config_for_size
from lowbit.torch.records import store_palettization
from lowbit.types import CompressionGranularity
from lowbit.weights import check_eligible, palettize_weight

__all__ = ["DKMPalettizer", "FakePalettize"]

_LUT_TYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


class FakePalettize(nn.Module):
    """The parametrization of one weight: its DKM reconstruction once the step count reaches ``milestone``.

    The weight's grouping axis (``axis``) is moved first; ``cluster_dim`` consecutive channels form a vector; each
    group of ``group_size`` channels (all of them per tensor) has its own ``2**n_bits`` centroids, kept in the
    ``centroids`` buffer between steps (the next forward starts from them).
    """

    def __init__(self, config: ModuleDKMPalettizerConfig, n_bits: int, weight: torch.Tensor, axis: int):
        super().__init__()
        self.config, self.n_bits, self.axis = config, n_bits, axis
        self.cluster_dim = config.cluster_dim or 1
        self.check(weight)
        groups = weight.shape[axis] // (config.group_size or weight.shape[axis])
        # allocated now and filled in place when palettization starts, so that DDP's buffer broadcast (which keeps
        # the tensors it found at wrapping) carries them
        self.centroids: torch.Tensor
        self.initialized: torch.Tensor
        self.register_buffer("centroids", torch.zeros(groups, 1 << n_bits, self.cluster_dim, device=weight.device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=weight.device))
        # flipped once by DKMPalettizer.step at the milestone: a buffer, so state_dict resumes it and torch.compile
        # does not guard on a step count
        self.enabled: torch.Tensor
        self.register_buffer("enabled", torch.tensor(config.milestone == 0, device=weight.device))
        # while the module that reads the weight runs its forward, every read gets one reconstruction
        self.caching = False
        self._cached: list[torch.Tensor] = []  # a list: a Module would register a parameter put in an attribute

    def cache_during(self, module: nn.Module) -> None:
        """Compute the reconstruction once per forward of ``module`` (an attention reads its weights several times),
        never across forwards: each forward's graph is its own."""

        def start(*_: object) -> None:
            self.caching = True
            self._cached.clear()

        def stop(*_: object) -> None:
            self.caching = False
            self._cached.clear()

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop, always_call=True)

    # ------------------------------------------------------------------------------------------------ layout
    def groups_of(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as ``[G, n, cluster_dim]``: the groups' vectors (channel ``axis`` first)."""
        moved = weight.movedim(self.axis, 0)
        channels = moved.shape[0]
        per_group = self.config.group_size or channels
        vectors = moved.reshape(channels // self.cluster_dim, self.cluster_dim, -1).transpose(1, 2)
        return vectors.reshape(channels // per_group, -1, self.cluster_dim)

    def weight_of(self, groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`groups_of`."""
        moved_shape = like.movedim(self.axis, 0).shape
        channels = moved_shape[0]
        vectors = groups.reshape(channels // self.cluster_dim, -1, self.cluster_dim).transpose(1, 2)
        return vectors.reshape(moved_shape).movedim(0, self.axis)

    def check(self, weight: torch.Tensor) -> None:
        """:class:`SkipWeight` when the weight's channels do not split into this config's groups and vectors."""
        channels = weight.shape[self.axis]
        per_group = self.config.group_size or channels
        if channels % per_group or per_group % self.cluster_dim:
            raise SkipWeight(
                f"{channels} channels do not split into groups of {per_group} and vectors of {self.cluster_dim}"
            )

    def _scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The per-channel scale (detached, broadcastable to ``weight``), or None."""
        if not self.config.enable_per_channel_scale:
            return None
        moved = weight.detach().movedim(self.axis, 0).reshape(weight.shape[self.axis], -1)
        if self.config.per_channel_scaling_factor_scheme == "abs":
            scale = moved.abs().amax(1)
        else:
            scale = (moved.amax(1) - moved.amin(1)) / 2
        shape = [1] * weight.dim()
        shape[self.axis] = -1
        fallback = moved.abs().amax(1)  # a constant channel has no range: its magnitude, else 1
        scale = torch.where(scale > 0, scale, torch.where(fallback > 0, fallback, torch.ones_like(fallback)))
        return scale.reshape(shape)

    # ------------------------------------------------------------------------------------------------ k-means
    def _initial_centroids(self, groups: torch.Tensor) -> torch.Tensor:
        """``kmeans_init``: ``"opt1d"`` the exact 1-D optimum of each group's fp16-rounded values (lowbit's shared
        kernel); ``"kmeans++"`` / ``"cpu.kmeans++"`` seeding and Lloyd; ``"auto"``: opt1d for scalar clusters of
        groups of at least ``kmeans_opt1d_threshold`` values, else k-means++."""
        k, init = 1 << self.n_bits, self.config.kmeans_init
        scalar = self.cluster_dim == 1
        if scalar and (init == "opt1d" or (init == "auto" and groups.shape[1] >= self.config.kmeans_opt1d_threshold)):
            return _exact_centroids(groups[..., 0].detach(), k)[..., None]
        return torch.stack([_kmeans_plus_plus(g, k, self.config.kmeans_n_init) for g in groups.detach()])

    def _zeroed(self, groups: torch.Tensor) -> torch.Tensor:
        """``zero_threshold``: values whose magnitude is below it count as exact zeros."""
        return groups * (groups.detach().abs() >= self.config.zero_threshold)

    @torch.compiler.disable  # the init calls numba / numpy, which dynamo cannot trace
    @torch.no_grad()
    def _start(self, groups: torch.Tensor) -> None:
        """Initialize the centroids from the weight's groups the first time palettization runs."""
        if not bool(self.initialized):
            self.centroids.copy_(self._initial_centroids(groups))
            self.initialized.fill_(True)

    def _snap(self, centroids: torch.Tensor) -> torch.Tensor:
        """``enforce_zero`` (the centroid nearest 0 becomes 0), ``prune_threshold`` (tiny centroids become 0) and
        ``lut_dtype`` rounding, differentiable straight through."""
        norms = centroids.norm(dim=-1, keepdim=True)
        keep = norms >= self.config.prune_threshold
        if self.config.enforce_zero:
            nearest = norms.argmin(dim=1, keepdim=True)
            keep = keep & ~torch.zeros_like(keep).scatter_(1, nearest, True)
        centroids = centroids * keep
        lut_type = self.config.lut_dtype
        if lut_type in _LUT_TYPES:
            rounded = centroids.to(_LUT_TYPES[lut_type]).to(centroids.dtype)
        elif lut_type in ("i8", "u8"):  # one symmetric scale per LUT
            scale = centroids.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30) / 127
            rounded = (centroids / scale).round().clamp(-127, 127) * scale
        else:
            return centroids
        return centroids + (rounded - centroids).detach()

    def _attention(self, x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """``[G, n, k]`` soft assignment of the vectors ``x`` to ``centroids`` per ``palett_mode``."""
        logits = (2 * x @ centroids.transpose(1, 2) - (centroids**2).sum(-1)[:, None, :]) / self.config.palett_tau
        mode = self.config.palett_mode
        if mode == "hard":
            hard = nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(x.dtype)
            soft = logits.softmax(-1)
            return hard + (soft - soft.detach())  # straight through
        if mode == "gsm" and self.training:
            return nn.functional.gumbel_softmax(logits, tau=1.0, dim=-1)
        return logits.softmax(-1)

    def _cluster(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction of ``x``, centroids) after the DKM iterations."""
        centroids = self._centroids(x, None)
        snapped = self._snap(centroids)
        return self._attention(x, snapped) @ snapped, centroids

    def _centroids(self, x: torch.Tensor, mass: torch.Tensor | None) -> torch.Tensor:
        """The centroids after the DKM iterations from the stored ones (differentiable in ``x``); ``mass``:
        per-vector counts (distinct values)."""
        centroids = self.centroids.to(x.dtype)
        weights = torch.ones_like(x[..., :1]) if mass is None else mass
        for _ in range(self.config.kmeans_max_iter):
            attention = self._attention(x, self._snap(centroids))
            weighted = attention * weights
            total = weighted.sum(1)[..., None]
            updated = torch.where(total > 1e-12, (weighted.transpose(1, 2) @ x) / total.clamp_min(1e-12), centroids)
            moved = (updated - centroids).detach().abs().max()
            centroids = updated
            if moved < self.config.palett_epsilon:
                break
        return centroids

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.caching and self._cached:
            return self._cached[0]
        out = self._reconstruct(weight)
        if self.caching:
            self._cached.append(out)
        return out

    def _reconstruct(self, weight: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return weight
        if not self.training:  # evaluation sees what finalize will write, and moves no centroid
            return self.hard(weight)
        scale = self._scale(weight)
        scaled = weight if scale is None else weight / scale
        groups = self._zeroed(self.groups_of(scaled.float()))
        self._start(groups)
        if self.config.palett_unique:
            out, centroids = self._cluster_unique(groups)
        else:
            out, centroids = self._cluster(groups)
        with torch.no_grad():
            self.centroids.copy_(centroids)
        out = self.weight_of(out, scaled).to(weight.dtype)
        return out if scale is None else out * scale

    def _cluster_unique(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eDKM: the attention over each group's distinct 16-bit values (with their counts) instead of every
        element. The centroids see every element through its value's mean (exact: members share the value); each
        element's own derivative is its value's slope ``2 / tau * Var_A(c)``, applied per element. The element ->
        value index list is kept for the backward pass whole, or with ``palett_shard`` one shard per rank."""
        g, n, _ = groups.shape
        x = groups.reshape(-1)
        bits = groups.detach().to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        keys = (torch.arange(g, device=groups.device)[:, None] * 65536 + bits[..., 0]).reshape(-1)
        unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        kept = _IndexList(inverse, self.config.palett_shard, self.config.palett_min_tsize)
        values = _SegmentMean.apply(x, inverse, kept, counts)
        owner = unique // 65536
        per_group = torch.bincount(owner, minlength=g)
        slot = torch.arange(len(unique), device=groups.device) - (torch.cumsum(per_group, 0) - per_group)[owner]
        empty = torch.zeros(g, int(per_group.max()), 1, dtype=groups.dtype, device=groups.device)
        padded = empty.index_put((owner, slot), values[:, None])
        mass = empty.index_put((owner, slot), counts.to(groups.dtype)[:, None])
        centroids = self._centroids(padded, mass)
        snapped = self._snap(centroids)
        attention = self._attention(padded.detach(), snapped)
        out = (attention @ snapped)[owner, slot, 0]  # through the centroids only
        with torch.no_grad():
            mean = attention @ snapped
            slope = (2 / self.config.palett_tau) * (attention @ snapped**2 - mean**2)
        direct = (x - x.detach()) * slope[owner, slot, 0][inverse]
        return (_Take.apply(out, inverse, kept) + direct).reshape(g, n, 1), centroids

    @torch.no_grad()
    def describe(self, latent: torch.Tensor) -> tuple[str, int, float | None]:
        """(status, bytes ``finalize`` would store, relative MSE of the hard assignment of ``latent``, the trained
        weight; None before the k-means starts) for the report during training."""
        k, groups = 1 << self.n_bits, self.centroids.shape[0]
        lut_bytes = groups * k * self.cluster_dim * latent.element_size()
        stored = -(-latent.numel() // self.cluster_dim * self.n_bits // 8) + lut_bytes
        status = f"{k} clusters x {groups} LUT(s), cluster_dim {self.cluster_dim}, {latent.numel()} parameters"
        if not bool(self.initialized):
            return f"{status}, k-means from step {self.config.milestone}", stored, None
        hard, dense = self.hard(latent).double(), latent.detach().double()
        energy = float((dense**2).sum())
        return f"{status}, training", stored, float(((hard - dense) ** 2).sum()) / energy if energy else 0.0

    @torch.no_grad()
    def hard(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with every vector replaced by its nearest (snapped) centroid: the finalized values."""
        scale = self._scale(weight)
        scaled = weight if scale is None else weight / scale
        groups = self._zeroed(self.groups_of(scaled.float()))
        self._start(groups)
        centroids = self._snap(self.centroids.to(groups.dtype))
        nearest = torch.cdist(groups, centroids).argmin(-1)
        out = torch.gather(centroids, 1, nearest[..., None].expand(-1, -1, self.cluster_dim))
        out = self.weight_of(out, scaled).to(weight.dtype)
        return out if scale is None else out * scale


class _IndexList:
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


class _SegmentMean(torch.autograd.Function):
    """``values[u] = mean of x where index == u`` (``counts``: members per value)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, kept: _IndexList, counts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.kept, ctx.counts = kept, counts
        return torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add(0, index, x) / counts

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return (grad / ctx.counts)[ctx.kept.whole()], None, None, None


class _Take(torch.autograd.Function):
    """``table[index]``, the index list kept as :class:`_IndexList` for the backward pass."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, kept: _IndexList) -> torch.Tensor:  # type: ignore[override]
        ctx.kept, ctx.size = kept, len(table)
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        whole = ctx.kept.whole()
        return torch.zeros(ctx.size, dtype=grad.dtype, device=grad.device).index_add(0, whole, grad), None, None


def _exact_centroids(values: torch.Tensor, k: int) -> torch.Tensor:
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


def _kmeans_plus_plus(x: torch.Tensor, k: int, n_init: int) -> torch.Tensor:
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


class DKMPalettizer:
    """Palettize a model while it trains: ``prepare`` / ``step`` / ``finalize`` / ``report``.

    ``DKMPalettizer(model, config)``; ``config`` defaults to DKM on every supported module (4 bits for Linear, 2
    otherwise, weights of at least 2048 elements).
    """

    def __init__(self, model: nn.Module, config: DKMPalettizerConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = DKMPalettizerConfig() if config is None else config
        if not isinstance(config, DKMPalettizerConfig):
            raise TypeError(f"config must be a DKMPalettizerConfig, got {type(config).__name__}")
        self._model, self._config, self._steps = model, config, 0
        self._fakes: list[FakePalettize] = []

    def prepare(self, inplace: bool = False) -> nn.Module:
        """Register a :class:`FakePalettize` on every configured weight; returns the model (a deep copy unless
        ``inplace``). Weights below their config's ``weight_threshold`` stay as they are; a weight whose channels do
        not split into the configured groups and vectors is left with a ``UserWarning`` naming it. ``ValueError``
        when a parameter is on the meta device."""
        model = target_model(self._model, inplace)
        tied: dict[int, str] = {}
        for module_name, config in self._config.resolve(model, is_supported).items():
            module = model.get_submodule(module_name)
            for name, reason in computed_weights(module):
                warnings.warn(f"weight {_qualified(module_name, name)!r} skipped: {reason}", UserWarning, stacklevel=2)
            for weight in module_weights(module):
                chosen = config_for_size(config, weight.parameter.numel())
                if chosen is None:
                    continue
                axis = weight.input_axis if chosen.channel_axis == 1 else weight.output_axis
                qualified = _qualified(module_name, weight.name)
                try:
                    check_eligible(weight.parameter.shape, numpy_dtype(weight.parameter.dtype), 0)
                    first = tied.setdefault(id(weight.parameter), qualified)
                    if first != qualified:
                        raise SkipWeight(
                            f"tied to {first!r} (one parameter), which DKM palettizes: this module trains on the "
                            "dense weight until finalize() writes the palettized values into the shared parameter"
                        )
                    fake = FakePalettize(chosen, chosen.bits_for(module), weight.parameter, axis)
                except SkipWeight as skip:
                    warnings.warn(f"weight {qualified!r} skipped: {skip.reason}", UserWarning, stacklevel=2)
                    continue
                owner_name, _, name = weight.name.rpartition(".")  # an attention's out_proj.weight
                parametrize.register_parametrization(module.get_submodule(owner_name), name, fake)
                fake.cache_during(module)
                self._fakes.append(fake)
        self._model = model
        return model

    def step(self) -> None:
        """Advance the step count: palettization of a weight starts once it reaches the config's ``milestone``."""
        self._steps += 1
        for fake in self._fakes:
            if self._steps >= fake.config.milestone:
                fake.enabled.fill_(True)

    def finalize(self, model: nn.Module | None = None, inplace: bool = False) -> nn.Module:
        """Replace each palettized weight by its hard-assigned LUT values, remove the parametrizations and record
        each palettization (LUT + indices) for :func:`lowbit.torch.export_onnx`; returns the plain model."""
        model = self._model if model is None else model
        model = model if inplace else _independent_copy(model)
        finalized = 0
        for module_name, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            lists: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
            for name in list(lists.keys()):
                chain: parametrize.ParametrizationList = lists[name]  # type: ignore[assignment]
                fakes = [p for p in chain if isinstance(p, FakePalettize)]
                if not fakes:
                    continue
                qualified = _qualified(module_name, name)
                if not bool(fakes[0].enabled):
                    warnings.warn(
                        f"weight {qualified!r} is finalized before its milestone (step {self._steps} of "
                        f"{fakes[0].config.milestone}): it never trained palettized, its LUT is plain k-means",
                        UserWarning,
                        stacklevel=2,
                    )
                latent = chain.original.detach().clone()
                hard = fakes[0].hard(latent)
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                with torch.no_grad():
                    getattr(module, name).copy_(hard)
                _record_lut(module, name, qualified, fakes[0], latent)
                finalized += 1
        if not finalized:
            warnings.warn(
                "finalize() found no weight DKM trains: call prepare() first (and train the model it returns)",
                UserWarning,
                stacklevel=2,
            )
        self._model = model
        return model

    def report(self) -> CompressionReport:
        """The per-weight report of the model: during training each weight's state and the error of its hard
        assignment now; after :meth:`finalize` what was recorded (see :func:`lowbit.torch.report`)."""
        from lowbit.torch.report import report

        return report(self._model)


def _independent_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a prepared model that finalizing cannot reach back through: each parametrized module gets its
    own class (torch's parametrize shares one class between a module and its copies, and removing a parametrization
    edits that class), and tensors computed from the parametrizations (a recurrent layer's ``_flat_weights`` after a
    step), which cannot be deep-copied, are copied detached (the next forward recomputes them)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in module.__dict__.values():
            for tensor in value if isinstance(value, list) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                    memo[id(tensor)] = tensor.detach()
    replica = copy.deepcopy(model, memo)
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return replica


def _qualified(module_name: str, name: str) -> str:
    return f"{module_name}.{name}" if module_name else name


def _record_lut(module: nn.Module, name: str, qualified: str, fake: FakePalettize, latent: torch.Tensor) -> None:
    """Record the finalized weight's LUTs and indices: its values are exactly the LUT entries, so the weight layer's
    ``unique`` mode recovers them bit for bit; the recorded error is the hard assignment's against ``latent``, the
    weight as trained."""
    param = getattr(module, name)
    per_group = fake.config.group_size
    config = PalettizeConfig(
        n_bits=fake.n_bits,
        granularity=CompressionGranularity.PER_GROUPED_CHANNEL if per_group else CompressionGranularity.PER_TENSOR,
        group_size=per_group or 1,
        cluster_dim=fake.cluster_dim,
        weight_num_threshold=0,
        mode="unique",
    )
    try:
        if fake.config.enable_per_channel_scale:
            raise SkipWeight("a per-channel scale makes more than 2**n_bits distinct values per LUT")
        exact = palettize_weight(to_numpy(param), fake.axis, config)
    except SkipWeight as skip:
        warnings.warn(
            f"weight {qualified!r}: its palettization is not recorded ({skip.reason})", UserWarning, stacklevel=3
        )
        return
    dense, hard = latent.detach().double(), param.detach().double()
    error = float(((hard - dense) ** 2).sum())
    palettized = dataclasses.replace(exact.palettized, squared_error=error, energy=float((dense**2).sum()))
    store_palettization(module, name, dataclasses.replace(exact, palettized=palettized))
