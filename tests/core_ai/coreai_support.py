"""Core AI test support: programs converted from torch with coreai-torch, and the Core AI runtime (coreai-core's CPU
runtime, which executes ``.aimodel`` on Linux) as the oracle. Import it after ``pytest.importorskip`` of coreai-core
and coreai-torch: the tests skip, with the reason, where the ``coreai`` extra cannot install (Python < 3.11)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from _common import coreai_convert as convert
from conftest import make_model
from coreai.authoring import AIModelAsset
from coreai.runtime import NDArray

import lowbit


async def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    asset = AIModelAsset.load(path)
    async with asset.executable() as module:
        function = module.load_function("main")
        outputs = await function({k: NDArray(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def run_asset(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The runtime's outputs of the saved asset at ``path``, in output order."""
    return list(asyncio.run(_run(path, feeds)).values())


PROBE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Probe(torch.nn.Module):
    """Each output is one weight exactly, whatever the runtime's arithmetic: identity times a Linear's weight, an
    embedding over every row, one-hot inputs of a conv and of a transposed conv. Channel counts make ragged LUT
    groups (48 and 40 rows in groups of 32 / 16) and ragged blocks (64 inputs in blocks of 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 48, bias=False)
        self.embedding = torch.nn.Embedding(40, 32)
        self.conv = torch.nn.Conv2d(8, 16, 3, bias=False)
        self.deconv = torch.nn.ConvTranspose2d(16, 24, 2, bias=False)

    def forward(self, eye, ids, conv_in, deconv_in):
        return self.linear(eye), self.embedding(ids), self.conv(conv_in), self.deconv(deconv_in)


def probe_inputs(dtype) -> tuple:
    conv_in = torch.eye(8 * 9).reshape(72, 8, 3, 3)
    deconv_in = torch.eye(16).reshape(16, 16, 1, 1)
    return torch.eye(64, dtype=dtype), torch.arange(40), conv_in.to(dtype), deconv_in.to(dtype)


def probe_weights(outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The four weights, in torch's layout, read back from the probe's outputs (told apart by their shapes)."""
    by_shape = {o.shape: o for o in outputs}
    linear, embedding, conv, deconv = (by_shape[s] for s in [(64, 48), (40, 32), (72, 16, 1, 1), (16, 24, 2, 2)])
    return {
        "linear": np.ascontiguousarray(linear.T),
        "embedding": embedding,
        "conv": np.ascontiguousarray(conv.reshape(72, 16).T).reshape(16, 8, 3, 3),
        "deconv": deconv,
    }


def as_numpy(tensors) -> list[np.ndarray]:
    import ml_dtypes

    out = []
    for t in tensors:
        if t.dtype == torch.bfloat16:
            out.append(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
        else:
            out.append(t.numpy())
    return out


def make_probe(dtype_name: str) -> tuple:
    """(the converted probe ``AIProgram`` in ``dtype_name``, its feeds, the dense weights by module name)."""
    dtype = PROBE_DTYPES[dtype_name]
    torch.manual_seed(0)
    model = Probe().to(dtype)
    args = probe_inputs(dtype)
    feeds = dict(zip(["eye", "ids", "conv_in", "deconv_in"], as_numpy(args), strict=True))
    feeds["ids"] = feeds["ids"].astype(np.int32)
    dense = {n: as_numpy([m.weight.detach()])[0] for n, m in model.named_children()}
    return convert(model, args), feeds, dense


def onnx_probe(dense: dict[str, np.ndarray]) -> lowbit.Program:
    """The probe's weights in an ONNX graph, each at its ONNX consumer's layout: a MatMul takes the Linear's
    weight transposed ([in, out]); the embedding and the convolutions keep theirs."""
    weights = {
        "linear": np.ascontiguousarray(dense["linear"].T),
        "embedding": dense["embedding"],
        "conv": dense["conv"],
        "deconv": dense["deconv"],
    }
    ops = [("MatMul", "linear", {}), ("Gather", "embedding", {}), ("Conv", "conv", {}), ("ConvTranspose", "deconv", {})]
    return lowbit.Program(make_model(weights, ops))
