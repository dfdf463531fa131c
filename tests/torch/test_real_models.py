"""The torch front end on real models: the shipped digits CNN and all-MiniLM-L6-v2, on English text shipped on the
machine (benchmarks/_text.py), exported to ONNX and run in ONNX Runtime."""

import warnings

import numpy as np
import pytest
from _common import minilm_encoder
from _text import english_sentences
from conftest import digits_split, digits_torch_model, ort_session

torch = pytest.importorskip("torch")

import lowbit.torch  # noqa: E402
from lowbit.torch.palettization import (  # noqa: E402
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    SKMPalettizer,
    SKMPalettizerConfig,
    palettization_of,
)


def _config(cls, bits: int, grouped: bool, **options):
    grouping = {"granularity": "per_grouped_channel", "group_size": 16} if grouped else {}
    return cls.from_dict({"global_config": {"n_bits": bits, **grouping, **options}})


def test_palettized_digits_cnn_exports_with_its_luts_and_runs_the_same_in_onnx_runtime(tmp_path):
    model = digits_torch_model()
    small = PostTrainingPalettizer(model, _config(PostTrainingPalettizerConfig, 3, False)).compress()
    _, _, x_test, _ = digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: every palettization is found, the exporter is quiet
        program = lowbit.torch.export_onnx(
            small,
            (torch.zeros(1, 1, 8, 8),),
            tmp_path / "digits.onnx",
            input_names=["image"],
            dynamic_axes={"image": {0: "batch"}},
        )
    assert len(program.report.rows) == 5
    saved = lowbit.load(tmp_path / "digits.onnx")
    lut = saved.graph.initializers["classifier.1.weight.lut"].const_value.numpy()
    np.testing.assert_array_equal(lut, palettization_of(small.classifier[1])["weight"].palettized.lut)
    logits = ort_session(tmp_path / "digits.onnx", "all").run(None, {"image": x_test})[0]
    with torch.no_grad():
        expected = small(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (tmp_path / "digits.onnx").stat().st_size < dense_bytes / 6


def _embeddings(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)


def test_sensitive_kmeans_beats_post_training_on_minilm_at_3_and_4_bits(minilm_torch, tmp_path):
    model, tokenizer = minilm_torch
    sentences = english_sentences(96)
    evaluation, calibration = sentences[:64], sentences[64:]
    reference = _embeddings(model, tokenizer, evaluation)

    def cosine(m) -> float:
        return float((_embeddings(m, tokenizer, evaluation) * reference).sum(1).mean())

    gen = torch.Generator().manual_seed(0)
    items = [(s, torch.randn(384, generator=gen)) for s in calibration]

    def projected_embedding(m, item):  # E[grad^2] of <e(x), r>, r ~ N(0, I): the Gauss-Newton diagonal of e(x)
        sentence, r = item
        batch = tokenizer([sentence], return_tensors="pt")
        hidden = m(**batch).last_hidden_state
        return (torch.nn.functional.normalize(hidden.mean(1), dim=1)[0] * r).sum()

    path = tmp_path / "minilm_sensitivity.pt"
    SKMPalettizer(model, SKMPalettizerConfig()).compute_sensitivity(items, projected_embedding, sensitivity_path=path)
    for bits in (3, 4):
        for grouped in (False, True):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "weight 'embeddings.word_embeddings.weight' skipped: 30522")
                plain = PostTrainingPalettizer(model, _config(PostTrainingPalettizerConfig, bits, grouped)).compress()
                # 32 sentences give noisy sensitivities: damped as the option's documentation says
                skm_config = _config(SKMPalettizerConfig, bits, grouped, sensitivity_damping=1.0)
                skm = SKMPalettizer(model, skm_config).compress(sensitivity_path=path)
            plain_cosine, skm_cosine = cosine(plain), cosine(skm)
            assert skm_cosine > plain_cosine, (bits, grouped, skm_cosine, plain_cosine)
            assert plain_cosine > {3: 0.75, 4: 0.9}[bits]


def test_palettized_minilm_exports_and_onnx_runtime_matches_torch(minilm_torch, tmp_path):
    model, tokenizer = minilm_torch
    small = PostTrainingPalettizer(model, _config(PostTrainingPalettizerConfig, 4, False)).compress()

    encoder = minilm_encoder(small).eval()

    example = tokenizer(["a short example"], return_tensors="pt")
    path = tmp_path / "minilm.onnx"
    with warnings.catch_warnings():  # every palettized weight is found in the exported graph
        warnings.filterwarnings("error", "palettized weight .* matches no weight")
        program = lowbit.torch.export_onnx(
            encoder,
            (example["input_ids"], example["attention_mask"]),
            path,
            input_names=["input_ids", "attention_mask"],
            dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
        )
    palettized = len(palettization_of(small))
    assert palettized == 40  # 36 Linear in the layers, the pooler's, the word / position / token type embeddings
    # the pooler is not part of last_hidden_state's graph; the exporter folds the token type lookup
    assert len(program.report.rows) >= palettized - 2
    assert not [w for w in program.weights() if w.numel >= 384 * 384 and w.compression is None]
    batch = tokenizer(english_sentences(4), padding=True, return_tensors="np")
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    got = ort_session(path, "basic").run(None, feeds)[0]
    with torch.no_grad():
        expected = encoder(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-4)
    assert path.stat().st_size < 90e6 / 6  # 86 MiB of fp32 weights -> 4-bit palettes
