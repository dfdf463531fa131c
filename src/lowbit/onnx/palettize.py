"""palettize_weights: k-means palettization of an ONNX program's weights, encoded as ``lowbit.LutToDense``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.budget import check_bits_per_weight
from lowbit.config import PalettizeConfig, config_of
from lowbit.driver import ALGORITHMS, compress
from lowbit.kernels.palettize import Palettized
from lowbit.onnx import decoders, encoding, fused, graph_edit
from lowbit.onnx import functions as fn
from lowbit.onnx.backend import OnnxBackend, OnnxWriter, target_program
from lowbit.onnx.calibration import collect_input_moments
from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.program import Program
from lowbit.types import CompressionGranularity, DType
from lowbit.weight_configs import WeightConfigs, as_weight_configs
from lowbit.weights import PalettizedWeight

__all__ = ["PalettizeWriter", "palettize_weights", "write_palettized"]

FP8_CAST_OPSET = 19  # Cast from fp8


class PalettizeWriter(OnnxWriter):
    """Each palettized weight as ``lowbit.LutToDense(indices, lut, scale)`` (or one of its faster forms), or in
    ONNX Runtime's fused kernels where ``target`` asks for them and the weight fits one."""

    def requirements_of(self, config: PalettizeConfig, weights: Sequence[WeightRef], program: Program):
        """A LUT of fp8 codes needs opset 19 (``Cast`` from fp8 in ``lowbit.LutDequantize``)."""
        if config.lut_dtype in (DType.FP8_E4M3FN, DType.FP8_E5M2):
            return FP8_CAST_OPSET, 9
        return super().requirements_of(config, weights, program)

    def stored_nbytes(self, ref: WeightRef, result: PalettizedWeight, config: PalettizeConfig) -> int:
        """The weight layer's count, plus the zero points ``lowbit.LutDequantize`` stores beside a quantized LUT
        (one per LUT, zeros when it is symmetric)."""
        quantized = result.palettized.lut_quantized
        return result.nbytes + (0 if quantized is None else quantized.scale.size * quantized.q.dtype.itemsize)

    def write(self, program: Program, ref: WeightRef, result: PalettizedWeight, config: PalettizeConfig) -> int:
        assert ref.value is not None
        consumer = fused.fused_consumer(ref.value, self.target) if result.outliers is None else None
        grid = fused.palettized_grid(program.model, ref.value, result, consumer, ref.output_axis) if consumer else None
        if consumer is not None and grid is not None:
            return fused.write_fused(program.model, ref.value, consumer, grid, self.target)
        self.portable_for(
            ref,
            "outliers need the portable encoding"
            if result.outliers is not None
            else "the kernels hold scalar int8 / uint8 LUTs of 1, 2, 4 or 8 bits, whole groups",
        )
        return encoding.stored_nbytes(write_palettized(program.model, ref, result))


def write_palettized(
    model: ir.Model, ref: WeightRef, weight: PalettizedWeight, reshape: Sequence[int] | None = None
) -> ir.Value:
    """Encode ``weight`` (the compression of the constant ``ref``) as ``lowbit.LutToDense`` in place of ``ref``;
    ``reshape``: ``ref``'s shape when ``weight`` is the same elements in another shape."""
    assert ref.value is not None
    palettized, outliers = weight.palettized, weight.outliers
    lut: np.ndarray | ir.Value = palettized.lut
    if palettized.lut_quantized is not None:
        lut = _lut_dequantize_chain(model, ref.value, palettized)
    decoded = encoding.write_lut(
        model,
        ref.value,
        packed=palettized.packed,
        lut=lut,
        scale=palettized.scale,
        n_bits=palettized.n_bits,
        canonical_shape=weight.padded_shape,
        perm=weight.back,
        replace=outliers is None,
        trim=None if weight.padded_shape == weight.canonical_shape else (weight.forward[0], weight.canonical_shape[0]),
        reshape=reshape,
    )
    if outliers is None:
        return decoded
    return encoding.write_outliers(model, ref.value, decoded, outliers.positions, outliers.values)


def _lut_dequantize_chain(model: ir.Model, weight: ir.Value, palettized: Palettized) -> ir.Value:
    """``lowbit.LutDequantize(q, scale, zero_point)`` producing the LUT from its quantized form."""
    quantized = palettized.lut_quantized
    assert quantized is not None
    name = weight.name or "weight"
    graph = graph_edit.home_graph(model, weight)
    zero_point = quantized.zero_point if quantized.zero_point is not None else np.zeros_like(quantized.scale)
    fn.use_function(model, fn.LUT_DEQUANTIZE)
    scale = encoding.decode_input(model, graph, f"{name}.lut_scale", quantized.scale)
    node = ir.node(
        fn.LUT_DEQUANTIZE,
        [
            graph_edit.add_initializer(model, graph, f"{name}.lut_q", quantized.q),
            scale,
            graph_edit.add_initializer(model, graph, f"{name}.lut_zero_point", zero_point.astype(quantized.q.dtype)),
        ],
        {"to": int(decoders.dtype_of(scale))},
        domain=fn.DOMAIN,
        name=graph_edit.node_name(model, f"{name}.{fn.LUT_DEQUANTIZE}"),
    )
    out = node.outputs[0]
    out.name = graph_edit.unique_name(model, f"{name}.lut")
    out.dtype = decoders.dtype_of(scale)
    out.shape = ir.Shape(palettized.lut.shape)
    graph_edit.insert_early(graph, node)
    return out


def palettize_weights(
    program: Program,
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
    target: str = fused.TARGETS[0],
    calibration_data: Any = None,
    outlier_fraction: float = 0.0,
    bits_per_weight: float | None = None,
) -> Program:
    """Palettize the weights of ``program``: each becomes a LUT of ``2**n_bits`` entries plus n-bit indices.

    Parameters
    ----------
    program : the :class:`~lowbit.Program` to compress.
    lut_dtype : None (default) keeps LUT entries in the weight's dtype; ``INT8``, ``UINT8``, ``FP8_E4M3FN``,
        ``FP8_E5M2`` quantize them symmetrically with one scale per LUT (``lowbit.LutDequantize`` before the LUT).
    n_bits : bits per index, one of {1, 2, 3, 4, 6, 8}; default 4.
    granularity : ``PER_TENSOR`` (default, one LUT), ``PER_CHANNEL`` (one per output channel),
        ``PER_GROUPED_CHANNEL`` (one per ``group_size`` consecutive output channels).
    group_size : channels per LUT for ``PER_GROUPED_CHANNEL``; default 32. When the channel count does not divide
        by it, the last LUT serves fewer channels (stored padded to a whole group, sliced off at decode).
    cluster_dim : LUT entries are vectors of this many output channels (default 1: scalar, exact k-means).
    enable_per_channel_scale : divide each output channel by its max-abs before clustering; default False.
    weight_num_threshold : weights with at most this many elements are left alone; default 1024.
    num_kmeans_workers : weights compressed in parallel on this many threads (default 4; 1: in the calling
        thread). Results do not depend on it.
    enable_fast_kmeans_mode : cluster fp32 weights' fp16-rounded values (default True); 16-bit weights are always
        clustered exactly.
    rounding_precision : accepted for compatibility with the reference API (default 4). lowbit's fast mode rounds
        to fp16 instead of to decimal places, which keeps small weights' resolution.
    in_place : False (default) returns a new Program, leaving ``program`` untouched; True rewrites ``program``.
    configs : per-weight parameters: a :class:`~lowbit.weight_configs.WeightConfigs` (or its dict form)
        whose entries override this call's parameters for weights by op type or name, or leave weights out
        (``None``). Default None: every weight with this call's parameters.
    mode : ``"kmeans"`` (default), ``"uniform"`` (evenly spaced LUT from min to max), ``"unique"`` (exact LUT of a
        group's distinct values when there are at most ``2**n_bits``, else skipped with a warning).
    executor : run the per-weight k-means on this ``concurrent.futures.Executor`` (e.g. a Dask client's) instead of
        a thread pool of ``num_kmeans_workers`` (a ``ProcessPoolExecutor`` works too).
    target : ``"portable"`` (default: standard ONNX ops and lowbit's decode functions, any runtime; ONNX Runtime
        decodes the weights to dense constants at load) or ``"onnxruntime"``: weights that fit one of ONNX
        Runtime's fused kernels stay compressed in its memory (``com.microsoft`` ops; the file then runs in ONNX
        Runtime only); their products compute in float. ``"onnxruntime-int8"``: the same, with MatMulNBits
        quantizing the activations to int8 (``accuracy_level`` 4: about 2x faster, adds error).
        A weight with an int8 / uint8 ``lut_dtype`` (scalar LUTs, no per-channel scale, 1/2/4/8-bit
        indices) of a ``MatMul`` becomes an 8-bit ``MatMulNBits``, of an embedding ``Gather`` an 8-bit
        ``GatherBlockQuantized``. Other weights get the portable encoding.
    calibration_data : None (default: data-free, as before, bit for bit) or the model's inputs: an iterable of
        ``{input name: array}`` dicts or an ONNX Runtime ``CalibrationDataReader``. The model runs on them in ONNX
        Runtime first; each MatMul / Gemm / Conv weight's k-means is then weighted by its input channels' mean
        squared activation (activation-aware k-means: the layer's output error, not the weight's, is minimized).
        Other weights are palettized data-free.
    outlier_fraction : 0 (default) or up to 0.1: this fraction of each weight's elements, those whose squared
        error (weighted by their input channel's activation energy with ``calibration_data``) is largest, are kept
        exact: ``lowbit.WithOutliers(decoded, positions, values)`` puts their values back after the LUT decode
        (folded by ONNX Runtime; the LUTs are then fitted to the other weights). Costs an int32 position and a value
        per outlier; ``mode="kmeans"`` only.
    bits_per_weight : None (default: every weight at ``n_bits``) or a budget above 2: mixed bits. Each weight is
        palettized at 2, 3, 4, 6 and 8 bits (its other parameters as given), each width's bytes and error measured
        (the relative output error with ``calibration_data``, else the relative weight error), and the widths chosen
        so that the compressed weights take at most this many bits per element, tables and outliers included, with
        the smallest summed error (``n_bits`` is then not used). The report notes each weight's width.
        ``ValueError`` when even 2 bits everywhere exceeds it.

    Returns the compressed Program; ``result.report`` holds the per-weight :class:`CompressionReport`.

    Raises ``ValueError`` / ``TypeError`` for an invalid parameter (naming it and the allowed values), before any
    work is done.
    """
    config = config_of(PalettizeConfig, locals())
    budget = check_bits_per_weight(bits_per_weight)
    writer = PalettizeWriter(target)
    result = target_program(program, in_place)
    weight_configs = as_weight_configs(configs)
    statistics = None if calibration_data is None else collect_input_moments(result, calibration_data)
    backend, algorithm = OnnxBackend(result, writer), ALGORITHMS["palettize"]
    result.report = compress(backend, algorithm, config, weight_configs, executor, statistics, budget)
    return result
