"""decompress_weights: turn every compressed weight back into a dense initializer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from lowbit.onnx import fused
from lowbit.onnx.decoders import decoder_for
from lowbit.onnx.program import Program, remove_unused_subgraph_initializers

__all__ = ["decompress_weights"]


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is None or value.is_graph_input():
        raise LookupError
    return value.const_value.numpy()


def decompress_weights(program: Program, in_place: bool = False) -> Program:
    """Replace each decode node whose inputs are constants (``lowbit.LutToDense``, ``lowbit.SparseToDense``,
    ``lowbit.MxDequantize``, ``DequantizeLinear``; chains included) by the dense initializer it computes, and each
    fused kernel lowbit writes for ``target="onnxruntime"`` by ``MatMul`` / ``Gather`` of its dense weight.

    The values are computed by the numpy reference decoders, bit for bit what ONNX Runtime computes for the same
    nodes. Unused constants and functions are removed afterwards.

    Parameters
    ----------
    program : the program to decompress.
    in_place : ``False`` (default) returns a new Program and leaves ``program`` untouched; ``True`` rewrites it.
    """
    target = program if in_place else program.copy()
    # decide before rewriting: a decode Cast is recognized by what it reads
    decode_nodes = [(n, d) for n in ir.traversal.RecursiveGraphIterator(target.graph) if (d := decoder_for(n))]
    for node, decoder in decode_nodes:
        graph = node.graph
        assert graph is not None
        try:
            inputs = [_constant_array(v) for v in node.inputs]
        except LookupError:
            continue  # runs on activations: a real quantized layer, not a stored weight
        out = node.outputs[0]
        name = out.name
        dense = ir.Value(const_value=ir.tensor(np.ascontiguousarray(decoder.decode(node, inputs))))
        out.replace_all_uses_with(dense, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        dense.name = name
        graph.register_initializer(dense)
    for nodes in fused.fused_by_codes(target.graph).values():
        slot = fused.activation_slot(nodes[0])
        try:
            inputs = [None if i == slot else _constant_array(v) for i, v in enumerate(nodes[0].inputs)]
        except LookupError:
            continue
        fused.unfuse(nodes, inputs)
    ir.passes.PassManager(
        [
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ]
    )(target.model)
    remove_unused_subgraph_initializers(target.model)
    return target
