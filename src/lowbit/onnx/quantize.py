"""quantize_weights: linear quantization of an ONNX program's weights.

Integer and fp8 elements with float scales become the standard ``DequantizeLinear`` (ONNX Runtime fuses the int4
blocked form into ``MatMulNBits``); FP4 (MXFP4) and E8M0 scales, which ONNX Runtime cannot run, become
``lowbit.MxDequantize``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.config import QuantizeConfig, config_of
from lowbit.driver import ALGORITHMS, compress
from lowbit.kernels.decode import value_table
from lowbit.kernels.packing import pack_bits
from lowbit.onnx import encoding, fused
from lowbit.onnx.backend import OnnxBackend, OnnxWriter, target_program
from lowbit.onnx.calibration import collect_input_moments
from lowbit.onnx.discovery import WeightRef, has_fp16_weights
from lowbit.onnx.program import Program
from lowbit.types import CompressionGranularity, DType, QScheme
from lowbit.weight_configs import WeightConfigs, as_weight_configs
from lowbit.weights import QuantizedWeight

__all__ = ["QuantizeWriter", "quantize_weights"]


class QuantizeWriter(OnnxWriter):
    """Each quantized weight as ``DequantizeLinear`` (``lowbit.MxDequantize`` for fp4 / E8M0), or in ONNX Runtime's
    fused kernels where ``target`` asks for them and the weight fits one."""

    _last_fused: tuple[QuantizedWeight | None, tuple[str, fused.Grid] | None] = (None, None)

    def requirements_of(self, config: QuantizeConfig, weights: Sequence[WeightRef], program: Program):
        """int4 / blocked DequantizeLinear need opset 21 (IR 10 / 9); fp8 elements or 16-bit scales 19 (IR 9);
        lowbit.MxDequantize only the functions' opset 13. With an ONNX Runtime target, weights that all go to fused
        kernels need no opset (IR 10 for int4 embedding tables)."""
        if self._all_fused(config, weights):
            return 0, 10 if config.dtype in (DType.INT4, DType.UINT4) else 3
        if config.e8m0:
            return super().requirements_of(config, weights, program)
        if config.dtype in (DType.INT4, DType.UINT4):
            return 21, 10
        if config.granularity == CompressionGranularity.PER_BLOCK:
            return 21, 9
        if config.dtype in (DType.FP8_E4M3FN, DType.FP8_E5M2):
            return 19, 9
        if has_fp16_weights(program):
            return 19, 8
        return 13, 7

    def _all_fused(self, config: QuantizeConfig, weights: Sequence[WeightRef]) -> bool:
        """Whether every weight of ``weights`` (those compressed with ``config``) will be written as a fused
        kernel."""
        if config.e8m0 or config.dtype not in (DType.INT4, DType.UINT4, DType.INT8, DType.UINT8):
            return False
        for ref in weights:
            assert ref.value is not None
            inner = ref.shape[ref.input_axis]
            blocked = config.granularity == CompressionGranularity.PER_BLOCK
            block = min(config.block_size, inner) if blocked else 0
            if fused.fused_consumer(ref.value, self.target) is None or (block and inner % block):
                return False
            if fused.fused_block(inner, block) is None:
                return False
        return True

    def stored_nbytes(self, ref: WeightRef, weight: QuantizedWeight, config: QuantizeConfig) -> int:
        if weight.quantized.e8m0:  # counting the element type's value table, shared once per model
            return weight.nbytes + value_table(weight.quantized.q.dtype).nbytes
        if (kernel := self._fused(ref, weight, config)) is not None:
            return kernel[1].nbytes
        return weight.codes_nbytes + _dequantize_layout(ref, weight, config).nbytes

    def _fused(self, ref: WeightRef, weight: QuantizedWeight, config: QuantizeConfig) -> tuple[str, fused.Grid] | None:
        """(consumer, grid) when the target is an ONNX Runtime one and it has a kernel for this weight (worked out
        once per weight: the size check and the write both ask)."""
        if self._last_fused[0] is not weight:
            self._last_fused = (weight, self._fused_layout(ref, weight, config))
        return self._last_fused[1]

    def _fused_layout(
        self, ref: WeightRef, weight: QuantizedWeight, config: QuantizeConfig
    ) -> tuple[str, fused.Grid] | None:
        assert ref.value is not None
        consumer = fused.fused_consumer(ref.value, self.target)
        if consumer is None or weight.trim is not None or weight.quantized.e8m0:
            return None
        layout = _dequantize_layout(ref, weight, config)
        q = weight.quantized.q
        grid = fused.quantized_grid(q, layout.scale, layout.zero_point, layout.axis, layout.block, ref.output_axis)
        return None if grid is None else (consumer, grid)

    def write(self, program: Program, ref: WeightRef, weight: QuantizedWeight, config: QuantizeConfig) -> int:
        assert ref.value is not None
        result = weight.quantized
        if (kernel := self._fused(ref, weight, config)) is not None:
            return fused.write_fused(program.model, ref.value, *kernel, self.target)
        self.portable_for(
            ref, "the kernels take int4 / int8 codes in blocks of a power of two >= 16 dividing the input channels"
        )
        if result.e8m0:
            n_bits = config.dtype.bits
            out = encoding.write_mx(
                program.model,
                ref.value,
                packed_codes=pack_bits(result.q.view(np.uint8), n_bits),
                n_bits=n_bits,
                exponents=result.scale,
                element=result.q.dtype,
                split_shape=result.split_shape(),
                scale_shape=result.grid_shape(),
                dtype=ref.dtype,
                trim=weight.trim,
            )
        else:
            out = _write_dequantize(program.model, ref, weight, config)
        return encoding.stored_nbytes(out)


@dataclass(frozen=True)
class _Layout:
    """The scale grid of a quantized weight as DequantizeLinear takes it."""

    axis: int | None
    block: int
    scale: np.ndarray
    zero_point: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.scale.nbytes + (0 if self.zero_point is None else self.zero_point.nbytes)


def _dequantize_layout(ref: WeightRef, weight: QuantizedWeight, cfg: QuantizeConfig) -> _Layout:
    """Per tensor: a scalar; per channel, or blocks spanning the whole input axis: one scale per output channel;
    blocks along the input axis: the grid, repeated over the axes whole blocks span (a kernel's spatial axes: DQ
    blocks one axis only)."""
    result = weight.quantized
    axis: int | None
    shape: tuple[int, ...]
    if cfg.granularity == CompressionGranularity.PER_TENSOR:
        axis, block, shape = None, 0, ()
    elif (
        cfg.granularity == CompressionGranularity.PER_CHANNEL
        or result.block[ref.input_axis] == result.q.shape[ref.input_axis]
    ):
        axis, block, shape = ref.output_axis, 0, (ref.shape[ref.output_axis],)
    else:
        axis, block = ref.input_axis, result.block[ref.input_axis]
        shape = tuple(n // block if a == ref.input_axis else n for a, n in enumerate(result.q.shape))

    def laid_out(grid: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(grid, shape) if block else grid.reshape(shape))

    zero_point = None if result.zero_point is None else laid_out(result.zero_point)
    return _Layout(axis, block, laid_out(result.scale), zero_point)


def _write_dequantize(model: ir.Model, ref: WeightRef, weight: QuantizedWeight, cfg: QuantizeConfig) -> ir.Value:
    """Write the weight as DequantizeLinear with its scale grid laid out for the granularity."""
    assert ref.value is not None
    layout = _dequantize_layout(ref, weight, cfg)
    return encoding.write_dequantize_linear(
        model,
        ref.value,
        q=weight.quantized.q,
        scale=layout.scale,
        zero_point=layout.zero_point,
        axis=layout.axis,
        block_size=layout.block,
        trim=weight.trim,
    )


def quantize_weights(
    program: Program,
    dtype: DType | str,
    qscheme: QScheme | str = QScheme.SYMMETRIC,
    granularity: CompressionGranularity | str = CompressionGranularity.PER_CHANNEL,
    block_size: int = 32,
    weight_num_threshold: int = 1024,
    scale_dtype: DType | str | None = None,
    scale_search: bool = False,
    in_place: bool = False,
    configs: WeightConfigs | Mapping[str, Any] | None = None,
    target: str = fused.TARGETS[0],
    calibration_data: Any = None,
) -> Program:
    """Linearly quantize the weights of ``program``.

    Parameters
    ----------
    program : the :class:`~lowbit.Program` to compress.
    dtype : ``INT8``, ``UINT8``, ``INT4``, ``UINT4``, ``FP8_E4M3FN``, ``FP8_E5M2`` or ``FP4_E2M1FN`` (MXFP4).
    qscheme : ``SYMMETRIC`` (default; zero point 0 for signed, mid-range for unsigned) or ``ASYMMETRIC`` (full
        range, a zero point per block that makes 0.0 exact; integers only).
    granularity : ``PER_TENSOR``, ``PER_CHANNEL`` (default; one scale per output channel) or ``PER_BLOCK`` (one per
        output channel and ``block_size`` input channels).
    block_size : input channels per block for ``PER_BLOCK`` (default 32). When the input-channel axis does not
        divide by it, the last block is shorter (stored zero-padded, sliced off at decode).
    weight_num_threshold : weights with at most this many elements are left alone (default 1024).
    scale_dtype : ``None`` (default: scales in the weight's float dtype) or ``FP8_E8M0FNU`` (power-of-two scales,
        the OCP MX encoding; fp8 dtypes only). FP4_E2M1FN always uses E8M0 scales.
    scale_search : integer dtypes: per block, keep the share (60-100 %) of its range that gives the least squared
        error, clipping outliers (data-free; default False: the full range, round-to-nearest).
    in_place : False (default) returns a new Program; True rewrites ``program``.
    configs : per-weight parameters: a :class:`~lowbit.weight_configs.WeightConfigs` (or its dict form)
        whose entries override this call's parameters for weights by op type or name, or leave weights out
        (``None``). Default None: every weight with this call's parameters.
    target : ``"portable"`` (default: standard ONNX ops and lowbit's decode functions, any runtime; ONNX Runtime
        decodes the weights to dense constants at load) or ``"onnxruntime"``: weights that fit one of ONNX
        Runtime's fused kernels stay compressed in its memory (``com.microsoft`` ops; the file then runs in ONNX
        Runtime only); their products compute in float. ``"onnxruntime-int8"``: the same, with MatMulNBits
        quantizing the activations to int8 (``accuracy_level`` 4: about 2x faster, adds error).
        Linear int4 / uint4 / int8 / uint8 weights of a ``MatMul`` become ``MatMulNBits`` and of an
        embedding ``Gather`` ``GatherBlockQuantized``, when their blocks are a power of two >= 16 (a per-channel
        or per-tensor scale is repeated over such blocks). Other weights get the portable encoding.

    calibration_data : None (default: round to nearest, as before) or the model's inputs (as for
        :func:`lowbit.palettize_weights`): the integer codes of each 2-D MatMul / Gemm weight are then chosen with
        error feedback across its input channels (GPTQ's, act-order), the scales kept.

    Returns the quantized Program; ``result.report`` holds the per-weight :class:`CompressionReport`.

    Raises ``ValueError`` for an unsupported ``dtype``; a float dtype with ``ASYMMETRIC``; a ``scale_dtype`` for an
    integer dtype or for ``FP4_E2M1FN``; ``FP4_E2M1FN`` without ``PER_BLOCK`` and ``block_size=32``;
    ``block_size < 1``; ``PER_GROUPED_CHANNEL``; and when the model's opset cannot be raised to what the encoding
    needs. ``TypeError`` for arguments of the wrong type.
    """
    config = config_of(QuantizeConfig, locals())
    writer = QuantizeWriter(target)
    result = target_program(program, in_place)
    weight_configs = as_weight_configs(configs)
    statistics = None if calibration_data is None else collect_input_moments(result, calibration_data)
    backend = OnnxBackend(result, writer)
    result.report = compress(backend, ALGORITHMS["quantize"], config, weight_configs, None, statistics)
    return result
