"""The ONNX backend of :mod:`lowbit.driver`: an ONNX :class:`~lowbit.onnx.program.Program` with one writer strategy
per compression (portable encodings, or ONNX Runtime's fused kernels where ``target`` asks for them).

Everything the ONNX format asks of a model that holds lowbit's encodings lives here: the opset and IR version each
writer declares (raised once per pass, only when something is compressed), IR 3's initializers-as-inputs, and the
paging of models larger than memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.config import check_bool, check_choice
from lowbit.onnx import fused, graph_edit
from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.functions import FUNCTION_OPSET, MIN_IR_VERSION
from lowbit.onnx.fused import TARGETS
from lowbit.onnx.paging import Spill, prefetch_pages, release_pages
from lowbit.onnx.program import PROTO_LIMIT_BYTES, Program

__all__ = ["OnnxBackend", "OnnxWriter", "target_program"]


def target_program(program: Program, in_place: bool) -> Program:
    """The Program a pass rewrites: ``program`` itself when ``in_place``, else a copy sharing its tensor bytes.

    Raises ``TypeError`` when ``program`` is not a :class:`Program` or ``in_place`` not a bool.
    """
    check_bool("in_place", in_place)
    if not isinstance(program, Program):
        raise TypeError(f"program must be a lowbit.Program (from lowbit.load), got {type(program).__name__}")
    return program if in_place else program.copy()


class OnnxWriter:
    """How one compression's results go into an ONNX graph. Subclasses define ``write`` and, when their encoding
    needs more than lowbit's functions (opset 13, IR 8), ``requirements_of``. ``target``: ``"portable"`` (standard
    ops and lowbit functions) or an ONNX Runtime one (its fused kernels where a weight fits one, see
    :mod:`lowbit.onnx.fused`); ``ValueError`` for any other."""

    def __init__(self, target: str = TARGETS[0]) -> None:
        self.target = check_choice("target", target, TARGETS)
        self.notes: dict[str, str] = {}  # weight name -> what the report says about how it was written

    def portable_for(self, ref: WeightRef, layout_reason: str) -> None:
        """Note that ``ref`` got the portable encoding although ``target`` asks for ONNX Runtime's kernels, and why
        (``layout_reason`` when its readers would allow a kernel but the compression's layout does not)."""
        if self.target != TARGETS[0]:
            assert ref.value is not None
            why = fused.why_not_fused(ref.value) or layout_reason
            self.notes[ref.name] = f"portable encoding, no {self.target} kernel: {why}"

    def requirements_of(self, config: Any, weights: Sequence[WeightRef], program: Program) -> tuple[int, int]:
        """(default-domain opset, IR version) that ``weights``, compressed per ``config``, need."""
        return FUNCTION_OPSET, MIN_IR_VERSION

    def stored_nbytes(self, ref: WeightRef, result: Any, config: Any) -> int:
        """Bytes ``result`` will take in the graph."""
        return result.nbytes

    def write(self, program: Program, ref: WeightRef, result: Any, config: Any) -> int:
        """Write ``result`` into the graph in place of ``ref``; return the bytes it occupies now."""
        raise NotImplementedError


def numpy_dtype(dtype: ir.DataType) -> np.dtype | None:
    """The numpy dtype of an ONNX element type (None when it has none)."""
    try:
        return np.dtype(dtype.numpy())
    except (TypeError, ValueError):
        return None


class OnnxBackend:
    """:class:`lowbit.driver.Backend` over an ONNX ``program``, writing through ``writer``."""

    def __init__(self, program: Program, writer: OnnxWriter) -> None:
        self.program, self.writer = program, writer
        self.spill: Spill | None = None

    def weights(self) -> list[WeightRef]:
        return self.program.weights()

    def element_dtype(self, weight: WeightRef) -> np.dtype | None:
        return numpy_dtype(weight.dtype)

    def prepare(self, plan: Sequence[tuple[WeightRef, Any]]) -> bool:
        """Raise the opset / IR version to the most any planned weight needs; True when the version converter
        rewrote the graph."""
        program = self.program
        by_config: dict[Any, list[WeightRef]] = {}
        for ref, config in plan:
            by_config.setdefault(config, []).append(ref)
        needs = [self.writer.requirements_of(config, refs, program) for config, refs in by_config.items()]
        opset, ir_version = max(n[0] for n in needs), max(n[1] for n in needs)
        if program.model.ir_version < 4:  # from IR 4 on, an initializer listed as an input is an overridable default
            program.initializers_out_of_inputs()
        program.model.ir_version = max(program.model.ir_version, ir_version)
        if program.graph.opset_imports.get("", 1) >= opset:
            return False
        program.require_opset(opset)
        return True

    def read(self, weight: WeightRef) -> np.ndarray:
        assert weight.value is not None and weight.value.const_value is not None
        array = weight.value.const_value.numpy()
        prefetch_pages(weight.value.const_value)
        return array

    def release(self, weight: WeightRef) -> None:
        release_pages(weight.value.const_value if weight.value is not None else None)

    def stored_nbytes(self, weight: WeightRef, result: Any, config: Any) -> int:
        return self.writer.stored_nbytes(weight, result, config)

    def write(self, weight: WeightRef, result: Any, config: Any) -> int:
        known = self.spill.before() if self.spill else None
        after = self.writer.write(self.program, weight, result, config)
        if self.spill and known is not None:
            self.spill.after(known)
        return after

    def note(self, weight: WeightRef) -> str | None:
        return self.writer.notes.pop(weight.name, None)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Names handed out from one scan of the model; a model saved with external data keeps its compressed
        weights on disk until it is saved, not in memory."""
        self.spill = Spill(self.program) if self.program.tensor_nbytes() > PROTO_LIMIT_BYTES else None
        with graph_edit.writing(self.program.model):
            yield
