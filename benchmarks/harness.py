"""Measurement helpers shared by the benchmark scripts: presets, timing, peak memory, reports.

Times are medians of repeated calls after warm-up (``triton.testing.do_bench`` on a GPU, ``perf_counter``
on the CPU).
Peak memory is what a call adds beyond what was live before it: the CUDA allocator's peak statistics
on a GPU, the peak resident set size on a Linux CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
# The benchmarks measure the checkout they sit in, installed or not (a GPU machine gets a bare copy).
sys.path.insert(0, str(ROOT))

# docs/math.md, "Presets": B images, N regions, D width, C classes.
HEAD_PRESETS = {
    "voc": dict(B=64, N=256, D=512, C=20),
    "coco": dict(B=64, N=196, D=512, C=80),
    "nuswide": dict(B=192, N=196, D=512, C=81),
    "zsl": dict(B=64, N=49, D=1024, C=1006),
    "openimages": dict(B=64, N=196, D=512, C=9605),
}
# The WTA mode each preset's setting trains with (docs/math.md, "Presets").
PRESET_WTA = dict(voc="pos_softmax", coco="pos_norm", nuswide="pos_softmax", zsl="pos_softmax", openimages="pos_norm")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn, device: torch.device, *, min_repeats: int, budget_s: float) -> float:
    """Median time of ``fn`` in ms. CUDA: ``triton.testing.do_bench`` (device events, L2 flushed
    between calls). CPU: ``perf_counter`` over at least ``min_repeats`` calls, more within ``budget_s``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(100, int(budget_s * 1000)), return_mode="median")
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < min_repeats or (time.perf_counter() - started < budget_s and len(samples) < 200):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def cuda_graph(fn, device: torch.device):
    """``fn`` captured once in a CUDA graph (after warm-up on a side stream, as PyTorch requires);
    returns the replay, which launches all of fn's kernels at once: what is left is their own time."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)[1])


def resident_mib() -> float | None:
    """This process's resident memory now, in MiB; None where /proc does not say."""
    try:
        return _resident_kib("VmRSS") / 1024
    except OSError:
        return None


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim), so that reusing it shows up in the
    resident set again and a peak is not hidden by blocks an earlier call left behind."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: peaks may undercount
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_mib(fn, device: torch.device) -> float | None:
    """Peak memory one call of ``fn`` adds to what was live before it, in MiB.

    CUDA: the caching allocator's peak statistics. CPU (Linux): the peak resident set size, reset
    through ``/proc/self/clear_refs``; None where /proc does not offer that.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident size
        before = _resident_kib("VmRSS")
        fn()
        return (_resident_kib("VmHWM") - before) / 1024
    except OSError:
        return None


# Both ratios point the same way: above 1, the row beats eager PyTorch.
RATIO_LEGEND = (
    "x faster = eager's time / the row's time; x less mem = eager's peak memory / the row's peak memory "
    "(above 1: better than eager, for both)"
)


def add_ratios(rows: list[dict], same: tuple[str, ...], base=None) -> None:
    """Add each row's speed-up (eager time / time) and memory saving (eager peak / peak) against the
    row with backend "eager" that agrees with it on the ``same`` keys, or on ``base(row)`` where given
    (the key values of the row to compare with); None where a number is missing."""
    key = base or (lambda row: tuple(row[name] for name in same))
    eager = {key(row): row for row in rows if row["backend"] == "eager"}
    for row in rows:
        baseline = eager[key(row)]
        ok = row["time_ms"] and baseline["time_ms"]
        row["speedup"] = baseline["time_ms"] / row["time_ms"] if ok else None
        ok = row["peak_mib"] and baseline["peak_mib"]
        row["memory_saving"] = baseline["peak_mib"] / row["peak_mib"] if ok else None


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average": [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def machine_line(env: dict) -> str:
    """Threads and load: on a shared CPU, other work shows up in every timing."""
    load = env["load_average"]
    line = f"torch uses {env['cpu_threads']} threads of {env['cpu_cores']} cores"
    if load is not None:
        line += f"; load average {load[0]} (1 min), {load[1]} (5 min) before the run"
        if load[0] > 0.5:
            line += ": other work was running, so CPU times may include contention"
    return line


def recorded_results(results_dir: Path) -> list[str]:
    """One line per card with results in ``results_dir``: its targets, as ``--gpu-check`` wrote them."""
    lines = []
    for report in sorted(results_dir.glob("*.json")):
        recorded = json.loads(report.read_text())
        env = recorded["environment"]
        goals = "; ".join(f"{g['target']}: {g['measured']}" for g in recorded.get("targets", [])) or "no targets"
        lines.append(f"{env['device']} ({env['date'][:10]}, {report.with_suffix('.md').name}): {goals}")
    return lines


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` maps row keys to headers, floats get 3 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
        return "-" if value is None else str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(line[i]) for line in body)) for i, (_, header) in enumerate(columns)]
    lines = ["  ".join(header.ljust(width) for (_, header), width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths)) for line in body]
    return "\n".join(lines)


def print_report(title: str, device: torch.device, env: dict, rows: list[dict], columns, out: str | None) -> None:
    """A benchmark's table under its title (on a CPU, the threads and the load), and its JSON to ``out``."""
    print(f"{title}, {env['device']}, torch {env['torch']}")
    if device.type == "cpu":
        print(machine_line(env))
    print(format_table(rows, columns))
    if out:
        write_json(out, dict(environment=env, results=rows))


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
