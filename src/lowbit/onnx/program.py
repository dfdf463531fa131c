"""Program: an ONNX model held as onnx-ir, loaded lazily, saved atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from lowbit.errors import ModelLoadError
from lowbit.onnx.functions import DOMAIN

__all__ = ["Program", "initializer_values", "load"]

_PLACEHOLDER = "lowbit-placeholder-never-read.bin"
PROTO_LIMIT_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit, less headroom for the graph itself


class Program:
    """An ONNX model under compression.

    Wraps an :class:`onnx_ir.Model` (``program.model``). Weights stored as external data stay memory-mapped until
    they are read. Build one with :func:`load` or ``Program(model)``.
    """

    def __init__(
        self,
        model: ir.Model,
        path: str | os.PathLike | None = None,
        training_info: Sequence[onnx.TrainingInfoProto] = (),
    ) -> None:
        self.model = model
        self.path = Path(path) if path is not None else None
        self.report: Any = None  # the CompressionReport of the pass that produced this program, if any
        self.training_info = list(training_info)  # kept from the file: onnx-ir does not carry it
        self.data_path: Path | None = None  # the external data file the last save wrote

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

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """Every weight's dense values by name, compressed ones decoded (as ``decompress_weights`` decodes them)."""
        from lowbit.onnx.decompress import decompress_weights

        dense = decompress_weights(self)
        return {
            w.name: w.value.const_value.numpy()
            for w in dense.weights()
            if w.value is not None and w.value.const_value is not None
        }

    def copy(self) -> Program:
        """A structurally independent copy that shares (does not duplicate) the tensors' bytes."""
        return Program(self.model.clone(), self.path, self.training_info)

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
        remove_unused_subgraph_initializers(self.model)
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
        for value in initializer_values(skeleton):
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
        for value in initializer_values(model):
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
        return sum(v.const_value.nbytes for v in initializer_values(self.model) if v.const_value is not None)

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Write the model to ``path`` atomically.

        Parameters
        ----------
        path : destination ``.onnx`` file. May be the file this program was loaded from.
        external_data : ``None`` (default) writes the tensors to a data file beside the model when they exceed
            protobuf's 2 GB limit or the program already keeps tensors outside the model file; ``True`` or
            ``False`` force the choice.

        The model is written to a temporary folder next to ``path`` and renamed into place, so an interrupted save
        never leaves a truncated file and never harms the input. Tensors kept outside go to a data file of a name
        no other save uses at the same time (``<file name>.data``, else ``<file name>.1.data``, ...), renamed into
        place before the model that references it; the data file the replaced model referenced is removed after.
        So the model and its data always match, also when two processes save to one path. ``self.data_path`` is
        the data file written (None: none).

        Raises ``PermissionError`` when ``path`` exists and is read-only (it is never replaced then).
        """
        dest = Path(path).resolve()
        if dest.exists() and not dest.stat().st_mode & 0o222:
            raise PermissionError(f"{dest}: the output file is read-only; not replacing it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if external_data is None:
            external_data = self._keeps_external_data() or self.tensor_nbytes() > PROTO_LIMIT_BYTES
        _remove_stale_temporaries(dest.parent)
        with _temporary_dir(dest.parent) as tmp:
            tmp_model = tmp / dest.name
            self.data_path = None
            if external_data:
                data_path = _reserve_data_file(dest)
                try:
                    replaced = _replaced_data_files(dest)
                    ir.save(self.model, tmp_model, external_data=data_path.name)
                    self._add_training_info(tmp_model)
                    os.replace(tmp / data_path.name, data_path)
                except BaseException:
                    data_path.unlink(missing_ok=True)  # the empty reservation
                    raise
                os.replace(tmp_model, dest)
                self.data_path = data_path
                self._remove_data_files(replaced - {data_path}, dest)
            else:
                replaced = _replaced_data_files(dest)
                self._load_external_tensors()  # else onnx-ir writes references to the data files they came from
                ir.save(self.model, tmp_model)
                self._add_training_info(tmp_model)
                os.replace(tmp_model, dest)
                self._remove_data_files(replaced, dest)
        return dest

    def _load_external_tensors(self) -> None:
        for value in initializer_values(self.model):
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.tensor(np.array(value.const_value.numpy()), name=value.name)

    def _add_training_info(self, written: Path) -> None:
        """Put the loaded model's ``training_info`` (which onnx-ir does not carry) into the written file, unless it
        names an initializer that is gone (a compressed weight): then it is dropped with a warning."""
        if not self.training_info:
            return
        names = set(self.graph.initializers)
        bound = {b.key for info in self.training_info for b in info.update_binding}
        if not bound <= names:
            warnings.warn(
                f"training_info dropped: it updates {sorted(bound - names)[:3]}, which are no longer initializers",
                UserWarning,
                stacklevel=3,
            )
            return
        proto = onnx.load(written, load_external_data=False)
        proto.training_info.extend(self.training_info)
        onnx.save(proto, written)

    def _remove_data_files(self, files: set[Path], dest: Path) -> None:
        """Remove the data files of the model ``dest`` replaced (lowbit's naming only). Tensors of this program that
        read one of them are first pointed at the same tensors in the file just written."""
        doomed = {f for f in files if f.parent == dest.parent and _is_data_name(f.name, dest.name)}
        reading = [v for v in initializer_values(self.model) if _reads_any(v.const_value, doomed)]
        if reading:
            saved = {v.name: v.const_value for v in initializer_values(ir.load(dest))}
            for value in reading:
                assert value.const_value is not None
                value.const_value.numpy()  # maps the old file: a copy of this program sharing it keeps its bytes
                value.const_value = saved[value.name]
        for data in doomed:
            with contextlib.suppress(FileNotFoundError):
                data.unlink()

    def stored_nbytes(self) -> int:
        """Bytes of the file this program was loaded from plus the external data files its tensors read."""
        data = {Path(t.path).resolve() for t in self._external_tensors()}
        own = self.path.stat().st_size if self.path is not None and self.path.is_file() else 0
        return own + sum(f.stat().st_size for f in data if f.is_file())

    def _external_tensors(self) -> list[ir.ExternalTensor]:
        return [v.const_value for v in initializer_values(self.model) if isinstance(v.const_value, ir.ExternalTensor)]

    def _keeps_external_data(self) -> bool:
        return any(isinstance(v.const_value, ir.ExternalTensor) for v in initializer_values(self.model))


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
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p}: empty file (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(p, load_external_data=False)
        model = ir.serde.deserialize_model(proto)
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeWarning, ValueError) as err:
        raise ModelLoadError(f"{p}: not a valid ONNX model ({_one_line(err)})") from err
    except Exception as err:  # onnx / onnx-ir raise assorted types: report the innermost cause
        root: BaseException = err
        while root.__cause__ is not None:
            root = root.__cause__
        raise ModelLoadError(f"{p}: cannot read the ONNX model ({type(root).__name__}: {_one_line(root)})") from err
    ir.external_data.set_base_dir(model.graph, p.parent)
    _check_external_files(model, p)
    # Weights given as Constant nodes become initializers, so every pass sees one kind of constant.
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    return Program(model, p, proto.training_info)


def _check_external_files(model: ir.Model, path: Path) -> None:
    folder = path.resolve().parent
    for value in initializer_values(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.path)
            if not data.resolve().is_relative_to(folder):
                raise ModelLoadError(
                    f"{path}: tensor {value.name!r} points outside the model's folder "
                    f"(external data location {tensor.location!r}); refusing to read it"
                )
            end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
            if not data.is_file():
                raise ModelLoadError(f"{path}: external data file {data.name} of tensor {value.name!r} is missing")
            if data.stat().st_size < end:
                raise ModelLoadError(f"{path}: external data file {data.name} is truncated (tensor {value.name!r})")


def initializer_values(model: ir.Model) -> Iterator[ir.Value]:
    """The initializer values of every graph of ``model``."""
    for graph in model.graphs():
        yield from graph.initializers.values()


def _reads_any(tensor: object, files: set[Path]) -> bool:
    return isinstance(tensor, ir.ExternalTensor) and any(_same_file(tensor.path, f) for f in files)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


TEMPORARY_PREFIX = ".lowbit-save-"


@contextlib.contextmanager
def _temporary_dir(parent: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(parent: Path) -> None:
    """Remove temporary folders of saves whose process is gone (killed before it could clean up)."""
    for folder in parent.glob(f"{TEMPORARY_PREFIX}*"):
        pid = folder.name[len(TEMPORARY_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still run; True when this platform cannot tell (its folders are kept)."""
    if pid == os.getpid():
        return True
    if Path("/proc/self").is_dir():
        return Path(f"/proc/{pid}").exists()
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _is_data_name(name: str, model_name: str) -> bool:
    """``<model>.data`` or ``<model>.<n>.data``: the data files lowbit names for the model file ``model_name``."""
    if not (name.startswith(f"{model_name}.") and name.endswith(".data")) or len(name) < len(model_name) + 5:
        return False
    middle = name[len(model_name) + 1 : -len(".data")]
    return middle == "" or middle.isdigit()


def _data_number(name: str, model_name: str) -> int | None:
    """n of ``<model>.<n>.data`` (0 for ``<model>.data``); None for another name."""
    if not _is_data_name(name, model_name):
        return None
    middle = name[len(model_name) + 1 : -len(".data")]
    return int(middle) if middle else 0


def _reserve_data_file(dest: Path) -> Path:
    """A data file name for ``dest``, created empty and exclusively (no concurrent save takes it too): ``<dest>.data``
    when no data file of ``dest`` exists, else ``<dest>.<n>.data`` past the highest n there. Numbers only grow while
    a data file of ``dest`` exists, so a name a concurrent save saw referenced (and will remove) is never reused."""
    numbers = [n for p in dest.parent.iterdir() if (n := _data_number(p.name, dest.name)) is not None]
    start = max(numbers) + 1 if numbers else 0
    for n in range(start, start + (1 << 20)):
        candidate = dest.with_name(f"{dest.name}.data" if n == 0 else f"{dest.name}.{n}.data")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return candidate
    raise OSError(f"{dest}: no free name for its external data file")


def _replaced_data_files(model_file: Path) -> set[Path]:
    """The external data files that the ONNX file ``model_file`` (if any) references; read only when a data file
    of lowbit's naming lies beside it (no parse of a large model stored inline)."""
    if not model_file.is_file() or not any(_is_data_name(p.name, model_file.name) for p in model_file.parent.iterdir()):
        return set()
    try:
        model = ir.load(model_file)
    except Exception:  # not a model we can read: nothing of ours to clean up
        return set()
    return {
        Path(v.const_value.path).resolve()
        for v in initializer_values(model)
        if isinstance(v.const_value, ir.ExternalTensor)
    }


def remove_unused_subgraph_initializers(model: ir.Model) -> None:
    """Drop the initializers of If / Loop / Scan bodies that nothing reads (onnx-ir's unused-node pass keeps them,
    e.g. a decoded weight's codes after decompression)."""
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(name)
