"""Export a palettized or quantized torch model to a Core AI ``.aimodel`` with its palettes and codes intact (needs
``lowbit[coreai]``)."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.report import CompressionReport, WeightResult
from lowbit.torch.export import modes_kept
from lowbit.torch.export_match import kind_of, match_values, matched, quantized_records_of, records_of, warn_unmatched

if TYPE_CHECKING:
    from lowbit.coreai import Program

__all__ = ["export_coreai"]


def export_coreai(model: nn.Module, example_inputs: Any, path: str | os.PathLike) -> Program:
    """Convert ``model`` with coreai-torch (``torch.export`` with its decompositions, then ``TorchConverter``) and
    write each palettized weight as Core AI's ``lut_to_dense``: the LUTs, indices and scales the palettizer
    recorded, so the program has a palettized program's size and the Core AI runtime computes what the torch model
    computes. Each weight :class:`~lowbit.torch.quantization.PostTrainingQuantizer` quantized becomes
    ``blockwise_shift_scale`` of its recorded codes and scales.

    Parameters
    ----------
    model : a model palettized by :class:`~lowbit.torch.palettization.PostTrainingPalettizer`,
        :class:`~lowbit.torch.palettization.SKMPalettizer` or finalized by
        :class:`~lowbit.torch.palettization.DKMPalettizer`, or quantized by
        :class:`~lowbit.torch.quantization.PostTrainingQuantizer` (plain weights stay dense). Exported in eval mode;
        every module's mode is restored afterwards.
    example_inputs : a tuple of the inputs ``torch.export.export`` traces with (a single tensor is wrapped).
    path : the ``.aimodel`` folder to write (atomically).

    Weights are matched to records as :func:`~lowbit.torch.export_onnx` matches them by value: as they are,
    transposed, or with a folded per-channel factor; a record that matches nothing while a dense weight of its size
    remains draws a warning naming it. Returns the saved :class:`lowbit.coreai.Program`; its ``report`` lists what
    each weight became. ``ImportError`` naming the extra when coreai-core or coreai-torch is not installed.
    """
    try:
        import coreai_torch

        from lowbit.coreai import Program
        from lowbit.coreai.encoding import write
        from lowbit.coreai.program import CoreAIBackend
    except ImportError as error:
        raise ImportError(f"export_coreai needs lowbit[coreai] and coreai-torch: {error}") from error
    records, quantized = records_of(model), quantized_records_of(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with modes_kept(model), torch.no_grad():
        exported = torch.export.export(model.eval(), args).run_decompositions(coreai_torch.get_decomp_table())
        program = Program.of(coreai_torch.TorchConverter().add_exported_program(exported).to_coreai())
    backend, report = CoreAIBackend(program), CompressionReport()
    with backend.writing():
        for ref in program.weights():
            if ref.compression is not None:
                continue
            array = backend.read(ref)
            weight = matched(array, ref.output_axis, records) or match_values(array, quantized)
            if weight is not None:
                try:
                    after = write(ref, weight)
                except (TypeError, ValueError) as error:
                    warnings.warn(f"weight {ref.name!r} is stored dense: {error}", UserWarning, stacklevel=2)
                    continue
                row = WeightResult(
                    ref.name, ref.op, ref.shape, ref.nbytes, after, weight.rel_mse, None, kind_of(weight)
                )
                report.rows.append(row)
    warn_unmatched({**records, **quantized}, {w.numel for w in program.weights() if w.compression is None})
    program.report = report
    program.save(path)
    return program
