"""all-MiniLM-L6-v2 converted with coreai-torch and compressed with lowbit.coreai: the runtime's output of the
compressed program equals the output of the same program holding lowbit's decoded weights, and 4-bit grouped(16)
palettization, the 30,522-row embedding included (ragged last group: coreai-opt skips it, and its default output
is NaN here), keeps the sentence embeddings."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

import torch
from _common import mean_pooled, minilm_encoder
from _text import english_sentences
from coreai_support import convert, run_asset

import lowbit.coreai as lc

LENGTH = 48  # tokens per sentence (padded), a static shape


@pytest.fixture(scope="module")
def minilm(minilm_torch, tmp_path_factory):
    """(the converted MiniLM saved as .aimodel, feeds of 16 sentences, torch's fp32 mean-pooled embeddings)."""
    bert, tokenizer = minilm_torch
    bert.config._attn_implementation = "eager"
    batch = tokenizer(
        english_sentences(16), padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"].to(torch.int32), batch["attention_mask"].to(torch.int32)
    encoder = minilm_encoder(bert).eval()
    path = tmp_path_factory.mktemp("minilm") / "minilm.aimodel"
    convert(encoder, (ids, mask)).save_asset(path)
    with torch.no_grad():
        hidden = encoder(ids, mask).numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    return path, feeds, mean_pooled(hidden, feeds["attention_mask"])


def test_palettized_minilm_on_the_runtime(minilm, tmp_path):
    path, feeds, reference = minilm
    (dense_hidden,) = run_asset(path, feeds)
    assert float((mean_pooled(dense_hidden, feeds["attention_mask"]) * reference).sum(1).min()) > 0.9999
    program = lc.load(path)
    weights = program.weights()
    # 36 Linear weights, the word and token-type embeddings (the position embedding is folded by the converter)
    assert len(weights) == 38 and {w.op for w in weights} == {"broadcasting_batch_matmul", "gather_nd"}
    small = lc.palettize_weights(program, n_bits=4, granularity="per_grouped_channel", group_size=16)
    embedding = next(r for r in small.report.rows if r.shape == (30522, 384))
    assert embedding.skipped is None
    saved = small.save(tmp_path / "minilm_4bit.aimodel")
    (hidden,) = run_asset(saved, feeds)
    assert np.isfinite(hidden).all()
    cosine = float((mean_pooled(hidden, feeds["attention_mask"]) * reference).sum(1).mean())
    assert cosine >= 0.955, cosine
    decoded = lc.decompress_weights(lc.load(saved)).save(tmp_path / "decoded.aimodel")
    (again,) = run_asset(decoded, feeds)
    np.testing.assert_array_equal(hidden, again)


def test_calibrated_minilm_keeps_its_embeddings_better(minilm, minilm_torch, tmp_path):
    """4-bit grouped(16) with calibration on 64 other sentences: the runtime's embeddings of the evaluation sentences
    move much less than data-free (the graph door's ONNX figures: 0.957 -> 0.987, benchmarks/data_aware.py)."""
    path, feeds, reference = minilm
    _, tokenizer = minilm_torch
    sentences = english_sentences(80)[16:]
    calibration = []
    for i in range(0, 64, 16):
        batch = tokenizer(
            sentences[i : i + 16], padding="max_length", max_length=LENGTH, truncation=True, return_tensors="np"
        )
        calibration.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    program = lc.load(path)
    params = {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}
    cosines = []
    for data in (None, calibration):
        saved = lc.palettize_weights(program, calibration_data=data, **params).save(tmp_path / "small.aimodel")
        (hidden,) = run_asset(saved, feeds)
        cosines.append(float((mean_pooled(hidden, feeds["attention_mask"]) * reference).sum(1).mean()))
    assert cosines[1] >= 0.98 and cosines[1] > cosines[0] + 0.02, cosines
