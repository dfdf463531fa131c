"""Program: an ONNX model held as onnx-ir, loaded lazily, saved atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from lowbit.errors import ModelLoadError
from lowbit.onnx.functions import DOMAIN

__all__ = ["Program", "load"]

_PLACEHOLDER = "lowbit-placeholder-never-read.bin"
PROTO_LIMIT_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit, less headroom for the graph itself


class Program:
    """An ONNX model under compression.

    Wraps an :class:`onnx_ir.Model` (``program.model``). Weights stored as external data stay memory-mapped until
    they are read. Build one with :func:`load` or ``Program(model)``.
    """

    def __init__(self, model: ir.Model, path: str | os.PathLike | None = None) -> None:
        self.model = model
        self.path = Path(path) if path is not None else None
        self.report: Any = None  # the CompressionReport of the pass that produced this program, if any

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def __repr__(self) -> str:
        n = len(self.graph.initializers)
        return f"Program({str(self.path) if self.path else '<in memory>'}, {len(self.graph)} nodes, {n} initializers)"

    def weights(self) -> list:
        """The weights of this program: see :func:`lowbit.onnx.discovery.find_weights`."""
        from lowbit.onnx.discovery import find_weights

        return find_weights(self)

    def copy(self) -> Program:
        """A structurally independent copy that shares (does not duplicate) the tensors' bytes."""
        return Program(self.model.clone(), self.path)

    def optimize(self) -> Program:
        """Remove unused nodes, initializers and functions, and merge identical constants. Returns ``self``."""
        ir.passes.PassManager(
            [
                common_passes.DeduplicateHashedInitializersPass(),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ]
        )(self.model)
        return self

    def require_opset(self, version: int) -> None:
        """Raise the default-domain opset to at least ``version`` (onnx's version converter); no-op when it is.

        Raises ``ValueError`` naming the versions when the converter cannot upgrade this model.
        """
        current = self.graph.opset_imports.get("", 1)
        if current >= version:
            return
        skeleton = self.model.clone()  # the converter sees no tensor data: placeholders stand in for it
        originals = {}
        for value in _initializers(skeleton):
            tensor = value.const_value
            if tensor is not None and value.name is not None:
                originals[value.name] = tensor
                value.const_value = ir.ExternalTensor(
                    _PLACEHOLDER,
                    offset=0,
                    length=tensor.nbytes,
                    dtype=tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()),
                    name=value.name,
                )
        try:
            converted = onnx.version_converter.convert_version(ir.serde.serialize_model(skeleton), version)
        except Exception as err:
            raise ValueError(
                f"this compression needs opset >= {version}; converting the model from opset {current} "
                f"failed: {_one_line(err)}"
            ) from err
        model = ir.serde.deserialize_model(converted)
        for value in _initializers(model):
            if value.name in originals:
                value.const_value = originals[value.name]
        for key, function in self.model.functions.items():  # the converter drops model-local functions
            model.functions[key] = _upgraded_function(function, version)
        model.ir_version = max(model.ir_version, self.model.ir_version)
        self.model = model

    def initializers_out_of_inputs(self) -> None:
        """Drop initializers from the graph inputs (where IR < 4 lists them all; they are constants there)."""
        for graph in self.model.graphs():
            graph.inputs[:] = [v for v in graph.inputs if not v.is_initializer()]

    def tensor_nbytes(self) -> int:
        """Bytes of all initializer data, main graph and subgraphs."""
        return sum(v.const_value.nbytes for v in _initializers(self.model) if v.const_value is not None)

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Write the model to ``path`` atomically.

        Parameters
        ----------
        path : destination ``.onnx`` file. May be the file this program was loaded from.
        external_data : ``None`` (default) writes the tensors to ``<file name>.data`` beside the model when they
            exceed protobuf's 2 GB limit or the program already keeps tensors outside the model file; ``True`` or
            ``False`` force the choice.

        The model (and data file) is first written to a temporary folder next to ``path`` and then renamed into
        place, so an interrupted save never leaves a truncated file and never harms the input.
        """
        dest = Path(path).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if external_data is None:
            external_data = self._keeps_external_data() or self.tensor_nbytes() > PROTO_LIMIT_BYTES
        data_name = dest.name + ".data"
        with _temporary_dir(dest.parent) as tmp:
            tmp_model = tmp / dest.name
            if external_data:
                ir.save(self.model, tmp_model, external_data=data_name)
                self._pin_tensors_mapped_from(dest.parent / data_name)
                os.replace(tmp / data_name, dest.parent / data_name)
            else:
                ir.save(self.model, tmp_model)
            os.replace(tmp_model, dest)
        return dest

    def _keeps_external_data(self) -> bool:
        return any(isinstance(v.const_value, ir.ExternalTensor) for v in _initializers(self.model))

    def _pin_tensors_mapped_from(self, data_file: Path) -> None:
        """Map external tensors that read ``data_file`` before it is replaced, so they keep the old bytes."""
        for value in _initializers(self.model):
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and _same_file(tensor.path, data_file):
                tensor.numpy()  # memory-maps the current file; the mapping survives the rename


def _upgraded_function(function: ir.Function, version: int) -> ir.Function:
    """``function`` importing default-domain opset ``version``, as the checker requires of every function, its body
    converted by onnx's version converter.

    Raises ``ValueError`` naming the function when its body cannot be converted.
    """
    current = function.opset_imports.get("")
    if current is None or current >= version:
        return function
    if function.domain == DOMAIN:  # lowbit's bodies mean the same at every opset >= 13
        function.opset_imports[""] = version
        return function
    proto = ir.serde.serialize_function(function)
    untyped = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in proto.input]
    outputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in proto.output]
    body = onnx.helper.make_model(
        onnx.helper.make_graph(proto.node, proto.name, untyped, outputs), opset_imports=proto.opset_import
    )
    try:
        converted = onnx.version_converter.convert_version(body, version)
    except Exception as err:
        raise ValueError(
            f"this compression needs opset >= {version}; converting the model's function {function.domain}."
            f"{function.name} from opset {current} failed: {_one_line(err)}"
        ) from err
    del proto.node[:]
    proto.node.extend(converted.graph.node)
    for opset in proto.opset_import:
        if opset.domain == "":
            opset.version = version
    return ir.serde.deserialize_function(proto)


def load(path: str | os.PathLike) -> Program:
    """Load an ONNX model file as a :class:`Program`.

    Tensors kept in external data files stay on disk (memory-mapped on first use). Raises
    :class:`~lowbit.errors.ModelLoadError` (a ``ValueError``) for a missing, truncated or non-ONNX file.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such file")
    try:
        model = ir.load(p)
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeWarning, ValueError) as err:
        raise ModelLoadError(f"{p}: not a valid ONNX model ({_one_line(err)})") from err
    except Exception as err:  # onnx raises assorted types for corrupt protobufs
        raise ModelLoadError(f"{p}: cannot read the ONNX model ({type(err).__name__}: {_one_line(err)})") from err
    _check_external_files(model, p)
    # Weights given as Constant nodes become initializers, so every pass sees one kind of constant.
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    return Program(model, p)


def _check_external_files(model: ir.Model, path: Path) -> None:
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.path)
            end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
            if not data.is_file():
                raise ModelLoadError(f"{path}: external data file {data.name} of tensor {value.name!r} is missing")
            if data.stat().st_size < end:
                raise ModelLoadError(f"{path}: external data file {data.name} is truncated (tensor {value.name!r})")


def _initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.initializers.values()


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


@contextlib.contextmanager
def _temporary_dir(parent: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".lowbit-save-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
