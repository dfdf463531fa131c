"""sparsify_weights: magnitude pruning (unstructured, blocks, n:m) stored as ``lowbit.SparseToDense``, optionally
with the non-zeros palettized or quantized."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.config import SparsifyConfig, config_of
from lowbit.driver import ALGORITHMS, compress
from lowbit.kernels.packing import pack_bits
from lowbit.onnx import encoding
from lowbit.onnx.backend import OnnxBackend, OnnxWriter, target_program
from lowbit.onnx.calibration import collect_input_moments
from lowbit.onnx.discovery import WeightRef, has_fp16_weights
from lowbit.onnx.program import Program
from lowbit.types import DType
from lowbit.weight_configs import WeightConfigs, as_weight_configs
from lowbit.weights import SparsifiedWeight

__all__ = ["SparsifyWriter", "sparsify_weights"]


FP16_SCALE_OPSET = 19  # DequantizeLinear with an fp16 scale


class SparsifyWriter(OnnxWriter):
    """Each sparsified weight as ``lowbit.SparseToDense(mask, values)``, its values dense, palettized or (through
    ``DequantizeLinear``) int8."""

    def requirements_of(self, config: SparsifyConfig, weights: Sequence[WeightRef], program: Program):
        """Quantized non-zeros of an fp16 weight: DequantizeLinear with an fp16 scale needs opset 19."""
        if config.quantize_dtype is not None and has_fp16_weights(program):
            return FP16_SCALE_OPSET, 9
        return super().requirements_of(config, weights, program)

    def write(self, program: Program, ref: WeightRef, weight: SparsifiedWeight, config: SparsifyConfig) -> int:
        assert ref.value is not None
        result = weight.sparsified
        model, packed_mask = program.model, pack_bits(result.mask, 1)
        if result.quantized is not None:  # DequantizeLinear(SparseToDense(mask, codes), per-channel scale)
            codes = encoding.write_sparse(
                model,
                ref.value,
                packed_mask=packed_mask,
                values=result.stored_codes,
                shape=ref.shape,
                replace=False,
            )
            out = encoding.write_dequantize_linear(
                model,
                ref.value,
                q=codes,
                scale=result.quantized.scale.reshape(-1),
                zero_point=None,
                axis=ref.output_axis,
            )
        else:
            values: np.ndarray | ir.Value | None = result.values
            if result.palettized is not None:
                p = result.palettized
                count = p.codes_shape[0] * p.codes_shape[1]
                values = encoding.write_lut(
                    model,
                    _values_holder(ref, count),
                    packed=p.packed,
                    lut=p.lut,
                    scale=None,
                    n_bits=p.n_bits,
                    canonical_shape=[count],
                    perm=[0],
                    replace=False,
                )
            assert values is not None
            out = encoding.write_sparse(model, ref.value, packed_mask=packed_mask, values=values, shape=ref.shape)
        return encoding.stored_nbytes(out)


def _values_holder(ref: WeightRef, count: int) -> ir.Value:
    """A typed stand-in for the non-zero values, which a LUT chain produces."""
    return ir.Value(name=f"{ref.name}.values", type=ir.TensorType(ref.dtype), shape=ir.Shape([count]))


def sparsify_weights(
    program: Program,
    target_sparsity: float,
    block_size: int = 1,
    n_m_ratio: tuple[int, int] | None = None,
    quantize_dtype: DType | str | None = None,
    palettize_nbits: int | None = None,
    weight_num_threshold: int = 1024,
    in_place: bool = False,
    configs: WeightConfigs | Mapping[str, Any] | None = None,
    calibration_data: Any = None,
) -> Program:
    """Prune the smallest-magnitude weights to zero and store each weight as a 1-bit mask plus its non-zeros.

    Parameters
    ----------
    program : the :class:`~lowbit.Program` to compress.
    target_sparsity : fraction of zeros, ``0 <= target_sparsity < 1``: exactly ``round(target * numel)`` zeros
        (already-zero elements count; ties go to the lower index). Ignored with ``n_m_ratio``.
    block_size : ``> 1`` prunes whole blocks of this many consecutive output channels, ranked by L2 norm; a weight
        whose channel count does not divide is skipped with a warning. Default 1 (unstructured).
    n_m_ratio : ``(n, m)``: in every ``m`` consecutive input channels the ``n`` smallest become zero (2:4 is
        ``(2, 4)``); a weight whose input-channel count does not divide by ``m`` is skipped with a warning.
    quantize_dtype : ``INT8``: the non-zeros are also quantized, symmetric, one scale per output channel.
    palettize_nbits : one of {1, 2, 3, 4, 6, 8}: the non-zeros are also palettized (per-tensor k-means over the
        non-zeros only).
    weight_num_threshold : weights with at most this many elements are left alone (default 1024).
    in_place : False (default) returns a new Program; True rewrites ``program``.
    configs : per-weight parameters: a :class:`~lowbit.weight_configs.WeightConfigs` (or its dict form)
        whose entries override this call's parameters for weights by op type or name, or leave weights out
        (``None``). Default None: every weight with this call's parameters.
    calibration_data : None (default: magnitude pruning, as before) or the model's inputs (as for
        :func:`lowbit.palettize_weights`): each MatMul / Gemm / Conv weight is then pruned by ``|w|`` times its
        input channel's root mean squared activation (Wanda), for unstructured, block and n:m sparsity alike.

    Returns the sparse Program; ``result.report`` holds the per-weight :class:`CompressionReport`.

    Raises ``ValueError`` for ``target_sparsity`` outside [0, 1), ``block_size < 1``, an invalid ``n_m_ratio``,
    both ``quantize_dtype`` and ``palettize_nbits``, or an unsupported value of either; ``TypeError`` for arguments
    of the wrong type.
    """
    config = config_of(SparsifyConfig, locals())
    target = target_program(program, in_place)
    weight_configs = as_weight_configs(configs)
    statistics = None if calibration_data is None else collect_input_moments(target, calibration_data)
    backend = OnnxBackend(target, SparsifyWriter())
    target.report = compress(backend, ALGORITHMS["sparsify"], config, weight_configs, None, statistics)
    return target
