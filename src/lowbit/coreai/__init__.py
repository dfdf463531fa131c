"""Core AI programs (``.aimodel``): a drop-in for ``coreai_opt.coreai_utils``.

``from lowbit.coreai import palettize_weights, quantize_weights, sparsify_weights, DType, CompressionGranularity``
takes the same parameters (``coreai_program=`` first), defaults and values as coreai-opt 0.3.0, runs lowbit's
weight layer (exact k-means, OCP MX scales, ragged groups and blocks) through the one driver, and returns a
:class:`Program`: an ``AIProgram`` with ``optimize()``, an atomic ``save_asset()`` and ``report``.

Needs the optional extra ``lowbit[coreai]`` (coreai-core, Python >= 3.11).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

from lowbit.budget import check_bits_per_weight
from lowbit.config import PalettizeConfig, QuantizeConfig, SparsifyConfig, check_bool, config_of
from lowbit.coreai.discovery import CoreAIWeight
from lowbit.coreai.program import CoreAIBackend, Program, load
from lowbit.driver import ALGORITHMS, compress
from lowbit.errors import ModelLoadError
from lowbit.types import CompressionGranularity, DType, QScheme
from lowbit.weight_configs import WeightConfigs, as_weight_configs

__all__ = [
    "CompressionGranularity",
    "CoreAIWeight",
    "DType",
    "ModelLoadError",
    "Program",
    "QScheme",
    "decompress_weights",
    "load",
    "palettize_weights",
    "quantize_weights",
    "sparsify_weights",
]


def _target(coreai_program: Any, in_place: bool) -> Program:
    check_bool("in_place", in_place)
    program = Program.of(coreai_program)
    return program if in_place else program.copy()


def _run(
    coreai_program: Any,
    in_place: bool,
    algorithm: str,
    config: Any,
    configs,
    calibration_data: Any,
    executor=None,
    bits_per_weight=None,
) -> Program:
    weight_configs = as_weight_configs(configs)
    program = _target(coreai_program, in_place)
    statistics = None
    if calibration_data is not None:
        from lowbit.coreai.calibration import collect_input_moments

        statistics = collect_input_moments(program, calibration_data)
    backend = CoreAIBackend(program)
    report = compress(backend, ALGORITHMS[algorithm], config, weight_configs, executor, statistics, bits_per_weight)
    program.report = report
    return program


def palettize_weights(
    coreai_program: Any,
    lut_dtype: DType | str | None = None,
    n_bits: int = 4,
    granularity: CompressionGranularity | str = CompressionGranularity.PER_TENSOR,
    group_size: int = 32,
    cluster_dim: int = 1,
    enable_per_channel_scale: bool = False,
    weight_num_threshold: int = 1024,
    num_kmeans_workers: int = 4,
    enable_fast_kmeans_mode: bool = True,
    rounding_precision: int = 4,
    in_place: bool = False,
    configs: WeightConfigs | Mapping[str, Any] | None = None,
    mode: str = "kmeans",
    executor: Executor | None = None,
    bits_per_weight: float | None = None,
    calibration_data: Any = None,
    outlier_fraction: float = 0.0,
) -> Program:
    """Palettize the weights of a Core AI program: each becomes ``lut_to_dense`` over a LUT of ``2**n_bits``
    entries and n-bit indices in the weight's own layout.

    Parameters are those of :func:`lowbit.palettize_weights` (and of coreai-opt's), with ``coreai_program`` (an
    ``AIProgram``) for the program: ``lut_dtype`` (None: LUT in the weight's dtype; ``INT8``, ``UINT8``,
    ``FP8_E4M3FN``, ``FP8_E5M2``: quantized, one scale per LUT, decoded by ``blockwise_shift_scale``), ``n_bits`` in
    {1, 2, 3, 4, 6, 8} (default 4), ``granularity`` ``PER_TENSOR`` (default) / ``PER_CHANNEL`` /
    ``PER_GROUPED_CHANNEL`` with ``group_size`` (default 32; a ragged last group is decoded padded and sliced),
    ``cluster_dim`` (default 1), ``enable_per_channel_scale`` (default False; the scale multiplies the decoded LUT),
    ``weight_num_threshold`` (default 1024), ``num_kmeans_workers`` (default 4 threads), ``enable_fast_kmeans_mode``
    (default True), ``rounding_precision`` (accepted, default 4), ``in_place`` (default False: a copy is
    compressed), and lowbit's ``configs`` (``op_type_configs`` keyed by Core AI op names such as ``"gather_nd"``,
    ``op_name_configs`` by weight names, see :mod:`lowbit.coreai.discovery`), ``mode``, ``executor``,
    ``bits_per_weight`` (mixed bits to a budget) and ``calibration_data``: None (default: data-free, bit for bit
    as without it) or the program's inputs, an iterable of ``{input name: array}`` dicts or a
    ``CalibrationDataReader`` (arrays are cast to the input's type when no value changes, e.g. int64 token ids to
    int32). A copy of the program first runs in Core AI's runtime on them (:mod:`lowbit.coreai.calibration`); each
    matmul / conv weight's k-means is then weighted by its input channels' mean squared activation and its codes
    chosen with error feedback, an embedding table's weighted by its rows' lookup counts, and the budget measures
    output errors, as :func:`lowbit.palettize_weights` does on ONNX; ``outlier_fraction`` (default 0; up to 0.1,
    ``mode="kmeans"``): that fraction of each weight's elements, those it serves worst, kept exact, put back after
    the LUT decode by ``scatter_nd`` (each outlier costs its coordinates, int16 when every dim fits, and its value).

    Returns the compressed :class:`Program`; ``result.report`` is the per-weight report. Raises ``ValueError`` /
    ``TypeError`` for an invalid parameter (naming it and the allowed values) before any work is done.
    """
    config = config_of(PalettizeConfig, locals())
    budget = check_bits_per_weight(bits_per_weight)
    return _run(coreai_program, in_place, "palettize", config, configs, calibration_data, executor, budget)


def quantize_weights(
    coreai_program: Any,
    dtype: DType | str,
    qscheme: QScheme | str = QScheme.SYMMETRIC,
    granularity: CompressionGranularity | str = CompressionGranularity.PER_CHANNEL,
    block_size: int = 32,
    weight_num_threshold: int = 1024,
    scale_dtype: DType | str | None = None,
    in_place: bool = False,
    configs: WeightConfigs | Mapping[str, Any] | None = None,
    scale_search: bool = False,
    calibration_data: Any = None,
) -> Program:
    """Linearly quantize the weights of a Core AI program: each becomes ``blockwise_shift_scale(q, scale,
    zero_point, 0)``.

    Parameters are those of :func:`lowbit.quantize_weights` (and of coreai-opt's): ``dtype`` (``INT8``, ``UINT8``,
    ``INT4``, ``UINT4``, ``FP8_E4M3FN``, ``FP8_E5M2``, ``FP4_E2M1FN`` = MXFP4, packed, with ``f8E8M0FNU`` scales),
    ``qscheme`` (default ``SYMMETRIC``), ``granularity`` (default ``PER_CHANNEL``; ``PER_TENSOR``, ``PER_BLOCK``),
    ``block_size`` (default 32; a ragged last block is decoded padded and sliced), ``weight_num_threshold``
    (default 1024), ``scale_dtype`` (None or ``FP8_E8M0FNU``), ``in_place`` (default False), ``configs``,
    ``scale_search`` and ``calibration_data`` (integer codes chosen with error feedback, GPTQ's, on each matmul
    weight's ``X^T X``). Asymmetric integers: Core AI's Linux runtime rounds ``scale * q`` and ``scale * zero_point``
    separately in the output type, so a decoded value can differ from lowbit's ``(q - zero_point) * scale`` by an
    ulp (the report's error is lowbit's).

    Returns the quantized :class:`Program`. Raises ``ValueError`` / ``TypeError`` as :func:`lowbit.quantize_weights`.
    """
    config = config_of(QuantizeConfig, locals())
    return _run(coreai_program, in_place, "quantize", config, configs, calibration_data)


def sparsify_weights(
    coreai_program: Any,
    target_sparsity: float | None = 0.5,
    block_size: int | None = None,
    n_m_ratio: tuple[int, int] | None = None,
    quantize_dtype: DType | str | None = None,
    palettize_nbits: int | None = None,
    weight_num_threshold: int = 1024,
    in_place: bool = False,
    configs: WeightConfigs | Mapping[str, Any] | None = None,
    calibration_data: Any = None,
) -> Program:
    """Prune the smallest-magnitude weights of a Core AI program: each becomes a ``ui1`` bitmask and its non-zeros
    (``build_sparse_with_bitmask`` -> ``sparse_with_bitmask_to_dense``).

    Parameters are those of :func:`lowbit.sparsify_weights` with coreai-opt's defaults: ``target_sparsity``
    (default 0.5; None only with ``n_m_ratio``), ``block_size`` (default None: unstructured), ``n_m_ratio``,
    ``quantize_dtype`` (``INT8``: int8 non-zeros, one scale per output channel), ``palettize_nbits`` (a LUT over
    the non-zeros), ``weight_num_threshold`` (default 1024), ``in_place`` (default False), ``configs`` and
    ``calibration_data`` (the pruned set chosen and the kept weights solved for each layer's output, as
    :func:`lowbit.sparsify_weights` does with it).

    Returns the sparse :class:`Program`. Raises ``ValueError`` / ``TypeError`` as :func:`lowbit.sparsify_weights`,
    and ``ValueError`` for ``target_sparsity=None`` without ``n_m_ratio``.
    """
    if target_sparsity is None:
        if n_m_ratio is None:
            raise ValueError("target_sparsity must be a number in [0, 1) unless n_m_ratio is given, got None")
        target_sparsity = 0.0
    block_size = 1 if block_size is None else block_size
    config = config_of(SparsifyConfig, locals())
    return _run(coreai_program, in_place, "sparsify", config, configs, calibration_data)


def decompress_weights(coreai_program: Any, in_place: bool = False) -> Program:
    """Every compressed weight (lowbit's or coreai-opt's encodings) back to a dense constant, decoded as Core AI's
    runtime decodes it. Returns the dense :class:`Program`."""
    from lowbit.coreai.decode import decompress

    program = _target(coreai_program, in_place)
    decompress(program)
    return program
