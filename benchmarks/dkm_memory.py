"""DKM training step on a 4.2 M-parameter Linear (2048 x 2048, 4 bits): peak memory and time of one step (forward +
backward + optimizer) for lowbit's DKMPalettizer with and without ``palett_unique``, ``palett_min_tsize`` packing
and ``palett_shard`` (two gloo ranks under DistributedDataParallel, rank 0 measured), and for
``coremltools.optimize.torch.palettization.DKMPalettizer`` 9.0 with the same config, each in a fresh process (peak:
the process's high-water RSS during the step above what it held before).

Run: ``.venv-bench/bin/python benchmarks/dkm_memory.py``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import one_core, table

UNPACKED = {"palett_min_tsize": 2**62}  # index lists never packed to int32
VARIANTS = {
    "lowbit": {},
    "lowbit palett_unique": {"palett_unique": True},
    "lowbit palett_unique, palett_min_tsize off": {"palett_unique": True, **UNPACKED},
    "lowbit palett_unique, 2 ranks": {"palett_unique": True},
    "lowbit palett_unique + palett_shard, 2 ranks": {"palett_unique": True, "palett_shard": True},
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


def child(label: str, rank: int = 0, store: str = "") -> None:
    import torch

    if store:  # one of two ranks (gloo), the model wrapped in DistributedDataParallel
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
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
    if store:
        prepared = torch.nn.parallel.DistributedDataParallel(prepared)
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


def run(label: str) -> dict:
    """The figures of ``label`` from fresh processes (two ranks for the distributed variants: rank 0's)."""
    with tempfile.TemporaryDirectory() as folder:
        ranks = (0, 1) if "ranks" in label else (0,)
        store = str(Path(folder) / "store") if len(ranks) > 1 else ""
        command = [sys.executable, __file__, "--child", label]
        procs = [subprocess.Popen([*command, str(r), store], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for r in ranks]  # fmt: skip
        outputs = [p.communicate() for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(next(err for (_, err), p in zip(outputs, procs, strict=True) if p.returncode))
        return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    one_core()
    rows, results = [], {}
    for label in VARIANTS:
        try:
            results[label] = run(label)
        except RuntimeError as error:
            rows.append([label, "failed", "", str(error)[:80]])
            continue
        r = results[label]
        rows.append([label, f"{r['peak']:.0f}", f"{r['seconds']:.2f}", "rank 0" if "ranks" in label else ""])
    print("one DKM training step, Linear 2048 x 2048 (4.2 M weights), 4 bits, batch 32, one core\n")
    print(table(["variant", "peak MiB above step start", "step s", "note"], rows))
    if "lowbit" in results and "lowbit palett_unique" in results:
        cut = results["lowbit"]["peak"] / max(results["lowbit palett_unique"]["peak"], 1e-9)
        print(f"\npalett_unique cuts lowbit's peak {cut:.1f}x (bar: >= 5x)")
    pairs = [
        ("lowbit palett_unique, palett_min_tsize off", "lowbit palett_unique", "palett_min_tsize packing"),
        ("lowbit palett_unique, 2 ranks", "lowbit palett_unique + palett_shard, 2 ranks", "palett_shard"),
    ]
    for without, with_option, name in pairs:
        if without in results and with_option in results:
            saved = results[without]["peak"] - results[with_option]["peak"]
            print(f"{name}: {saved:+.0f} MiB of peak saved")
    if "lowbit" in results and "coremltools" in results:
        ratio = results["coremltools"]["seconds"] / results["lowbit"]["seconds"]
        print(f"step time coremltools / lowbit: {ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0, sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        main()
