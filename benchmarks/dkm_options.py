"""Every DKM option against coremltools 9.0 on the digits CNN: the shipped CNN fine-tuned 3 epochs at 2 bits with one
option changed from its default, then finalized; test accuracy, the mean training step time (forward, backward,
optimizer, palettizer step) and the peak memory of the run above what the process held before training. Both tools run
the same code (only the import differs), each row in a fresh process on one core.

The bar (issue 25): lowbit within 0.5 points of coremltools' accuracy or better on every row, its step no slower.

Run: ``.venv-bench/bin/python benchmarks/dkm_options.py [--rows NAME ...] [--epochs 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from _common import one_core, table

ROOT = Path(__file__).resolve().parents[1]
GROUPED = {"granularity": "per_grouped_channel", "group_size": 8}
# row -> (global options, module type options): one option (or a pair that only acts together) changed
ROWS: dict[str, tuple[dict, dict]] = {
    "defaults": ({}, {}),
    "quantize_activations": ({"quantize_activations": True}, {}),
    "quantize_activations quint8 0..255": (
        {"quantize_activations": True, "dtype": "quint8", "quant_min": 0, "quant_max": 255},
        {},
    ),
    "cluster_permute (1, 0, 2, 3) on convs": ({}, {"Conv2d": {"cluster_permute": (1, 0, 2, 3)}}),
    "palett_max_mem 0.5": ({"palett_max_mem": 0.5}, {}),
    "palett_cluster_tol 0.5": ({"palett_cluster_tol": 0.5}, {}),
    "palett_batch_mode": ({"palett_batch_mode": True, **GROUPED}, {}),
    "palett_dist": ({"palett_dist": True}, {}),
    "percentage_palett_enable 0.5, grouped(8)": ({"percentage_palett_enable": 0.5, **GROUPED}, {}),
    "kmeans_batch_threshold 1": ({"kmeans_batch_threshold": 1}, {}),
    "prune_threshold 0 + enforce_zero": ({"prune_threshold": 0.0, "enforce_zero": True}, {}),
    "prune_threshold 1e-3": ({"prune_threshold": 1e-3}, {}),
    "zero_threshold 1e-4": ({"zero_threshold": 1e-4}, {}),
    "palett_lambda 0.1": ({"palett_lambda": 0.1}, {}),
    "add_extra_centroid": ({"add_extra_centroid": True}, {}),
    "kmeans_error_bnd 0.1": ({"kmeans_error_bnd": 0.1}, {}),
    "enforce_zero": ({"enforce_zero": True}, {}),
    "kmeans_max_iter 1": ({"kmeans_max_iter": 1}, {}),
    "palett_tau 1e-3": ({"palett_tau": 1e-3}, {}),
    "palett_epsilon 1e-2": ({"palett_epsilon": 1e-2}, {}),
    "grouped(8)": (GROUPED, {}),
    "cluster_dim 2": ({"cluster_dim": 2}, {}),
    "lut_dtype f16": ({"lut_dtype": "f16"}, {}),
    "enable_per_channel_scale": ({"enable_per_channel_scale": True}, {}),
    "milestone 20": ({"milestone": 20}, {}),
    "kmeans_init kmeans++": ({"kmeans_init": "kmeans++"}, {}),
    "palett_mode hard": ({"palett_mode": "hard"}, {}),
    "palett_mode topk": ({"palett_mode": "topk"}, {}),
    "palett_mode gsm": ({"palett_mode": "gsm"}, {}),
    "palett_unique": ({"palett_unique": True}, {}),
}
TOOLS = {"coremltools": "coremltools.optimize.torch.palettization", "lowbit": "lowbit.torch.palettization"}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(tool: str, row: str, epochs: int) -> None:
    """Fine-tune, finalize and score one (tool, row); print one JSON line."""
    import importlib
    import importlib.util
    import logging

    import torch

    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("digits_train", ROOT / "examples" / "digits" / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    import lowbit

    model = train.DigitsCNN()
    initializers = lowbit.load(ROOT / "examples" / "digits" / "digits_cnn.onnx").graph.initializers
    model.load_state_dict({n: torch.from_numpy(v.const_value.numpy().copy()) for n, v in initializers.items()})
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in train.load_split())
    y_train, y_test = y_train.long(), y_test.long()
    palettization = importlib.import_module(TOOLS[tool])
    options, per_type = ROWS[row]
    base = {"n_bits": 2, "weight_threshold": 1024}
    config = palettization.DKMPalettizerConfig.from_dict(
        {
            "global_config": {**base, **options},
            "module_type_configs": {name: {**base, **options, **o} for name, o in per_type.items()},
        }
    )
    palettizer = palettization.DKMPalettizer(model, config)
    prepared = palettizer.prepare()
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-3)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = _rss_mib("VmRSS")
    steps, elapsed = 0, 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        prepared.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(64):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(prepared(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            palettizer.step()
            elapsed += time.perf_counter() - start
            steps += 1
    final = palettizer.finalize()
    final.eval()
    with torch.no_grad():
        accuracy = float((final(x_test).argmax(1) == y_test).float().mean())
    peak = _rss_mib("VmHWM") - before
    print(json.dumps({"accuracy": accuracy, "step_ms": 1000 * elapsed / steps, "peak_mib": peak}))


def run(tool: str, row: str, epochs: int) -> dict | str:
    command = [sys.executable, __file__, "--child", tool, row, str(epochs)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        error = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return f"fails: {error[-1][:90] if error else done.returncode}"
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    one_core()
    rows, failures = [], {}
    for row in args.rows:
        results = {tool: run(tool, row, args.epochs) for tool in TOOLS}
        ct, lb = results["coremltools"], results["lowbit"]

        def cell(result: dict | str, key: str, spec: str) -> str:
            if isinstance(result, str):
                failures.setdefault(result, len(failures) + 1)
                return f"fails ({failures[result]})"
            return format(result[key], spec)

        verdict = "n/a"
        if isinstance(lb, dict) and isinstance(ct, dict):
            accurate = lb["accuracy"] >= ct["accuracy"] - 0.005
            verdict = "met" if accurate and lb["step_ms"] <= ct["step_ms"] else "NOT met"
        elif isinstance(lb, dict):
            verdict = "coremltools fails"
        rows.append(
            [
                row,
                cell(ct, "accuracy", ".3f"),
                cell(lb, "accuracy", ".3f"),
                cell(ct, "step_ms", ".1f"),
                cell(lb, "step_ms", ".1f"),
                cell(ct, "peak_mib", ".0f"),
                cell(lb, "peak_mib", ".0f"),
                verdict,
            ]
        )
        print(f"{row}: {results}", file=sys.stderr, flush=True)
    headers = ["option (2 bits)", "acc ct", "acc lowbit", "step ms ct", "step ms lowbit"]
    headers += ["peak MiB ct", "peak MiB lowbit"]
    print(table([*headers, "bar"], rows))
    for message, number in failures.items():
        print(f"({number}) {message.removeprefix('fails: ')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
