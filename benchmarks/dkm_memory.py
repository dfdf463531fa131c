"""DKM training step on a 4.2 M-parameter Linear (2048 x 2048, 4 bits): peak memory and time of one step (forward +
backward + optimizer) for lowbit's DKMPalettizer with and without ``palett_unique``, and for
``coremltools.optimize.torch.palettization.DKMPalettizer`` 9.0 with the same config, each in a fresh process (peak:
the process's high-water RSS during the step above what it held before).

Run: ``.venv-bench/bin/python benchmarks/dkm_memory.py``
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _common import one_core, table

VARIANTS = {
    "lowbit": {},
    "lowbit palett_unique": {"palett_unique": True},
    "coremltools": {},
    "coremltools palett_unique": {"palett_unique": True},
}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def child(label: str) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tool = "coremltools" if label.startswith("coremltools") else "lowbit"
    if tool == "coremltools":
        from coremltools.optimize.torch import palettization
    else:
        from lowbit.torch import palettization  # type: ignore[no-redef]
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048))
    options = {"n_bits": 4, "weight_threshold": 0, **VARIANTS[label]}
    config = palettization.DKMPalettizerConfig.from_dict({"global_config": options})
    palettizer = palettization.DKMPalettizer(model, config)
    prepared = palettizer.prepare()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    x = torch.randn(32, 2048)

    def training_step() -> None:
        loss = prepared(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        palettizer.step()

    prepared.train()
    training_step()  # the first step initializes the centroids
    base = _rss_mib("VmRSS:")
    _reset_peak()
    start = time.perf_counter()
    training_step()
    seconds = time.perf_counter() - start
    print(json.dumps({"peak": _rss_mib("VmHWM:") - base, "seconds": seconds}))


def main() -> None:
    one_core()
    rows, results = [], {}
    for label in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--child", label], capture_output=True, text=True)
        if done.returncode:
            rows.append([label, "failed", "", done.stderr.strip().splitlines()[-1][:80]])
            continue
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[label]
        rows.append([label, f"{r['peak']:.0f}", f"{r['seconds']:.2f}", ""])
    print("one DKM training step, Linear 2048 x 2048 (4.2 M weights), 4 bits, batch 32, one core\n")
    print(table(["variant", "peak MiB above step start", "step s", "note"], rows))
    if "lowbit" in results and "lowbit palett_unique" in results:
        cut = results["lowbit"]["peak"] / max(results["lowbit palett_unique"]["peak"], 1e-9)
        print(f"\npalett_unique cuts lowbit's peak {cut:.1f}x (bar: >= 5x)")
    if "lowbit" in results and "coremltools" in results:
        ratio = results["coremltools"]["seconds"] / results["lowbit"]["seconds"]
        print(f"step time coremltools / lowbit: {ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
