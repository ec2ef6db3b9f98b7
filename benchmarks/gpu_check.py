"""The one command for a GPU machine: test, check, time and tune, in at most about 9 minutes.

    python benchmarks/gpu_check.py --out benchmarks/results          # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/check        # the same steps on the CPU, small

It runs from a bare checkout (the package need not be installed) on a machine with torch, triton,
ninja and pytest. Steps, each in a process of its own that is stopped when it overruns its share of
``--budget`` (what it wrote by then is kept):

  tests   the CUDA test suite (tests/cuda): compiled kernels against the reference on CUDA tensors
  checks  every backend against float64 at every preset and WTA mode, outputs and gradients
  timing  eager, torch.compile and the Triton head (also replayed from a CUDA graph) at every preset
  sweep   the launch settings worth sweeping for the Triton head (pipelining stages, the D step)
  loss    the loss benchmark on CUDA: the extension (built here) against eager and torch.compile
  train   a whole training step, the authors' way and the package's (bench_train.py: coco, nuswide and
          the zero-shot nuswide-zsl and coco-zsl, with and without the shared prefix)
  model   the kernel model's estimates for this GPU (kernel_model.py: H100 or A100), shown beside the
          Triton head's measured times, so that the first GPU says how far off the model is
  text    text features (bench_text.py): the text encoder's forward+backward at the zero-shot training
          shapes, 1,006 classes and 10,000 names without autograd, open-vocabulary scoring of 10,000
          names, prompts grouped by [EOS] for class-specific contexts; full, short and shared prefix

After every step it writes ``<card>.md`` (tables for people) and ``<card>.json`` (everything) to
``--out``, so a run that is cut short still leaves what it measured. Progress is printed unbuffered.
``--dry-run`` runs every step on the CPU at small shapes (Triton in its interpreter, no compile), as
the tests do, so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_asl
import bench_head
import bench_text
import bench_train
from bench_head import bench_preset, candidates, check_preset, library_backends, make_inputs, quick_shape
from harness import HEAD_PRESETS, PRESET_WTA, ROOT, environment, format_table, median_time_ms, progress, write_json

from dualcoop_kernels import build_extension
from dualcoop_kernels.options import WTA_MODES
from dualcoop_kernels.reference import dualcoop_head_reference
from dualcoop_kernels.triton.head import choose_launch_config, dualcoop_head_triton

# Shares of the budget; "tests" and "loss" include compiling (Triton's kernels, the C++/CUDA extension),
# "checks" five draws of every preset and mode (the tests' rule, testing.DRAWS).
STEPS = {
    "tests": 0.25,
    "checks": 0.2,
    "timing": 0.25,
    "model": 0.2,
    "sweep": 0.1,
    "loss": 0.1,
    "train": 0.25,
    "text": 0.15,
}
MODEL_GPUS = {(9, 0): "H100", (8, 0): "A100"}  # kernel_model.py's cards (SXM), by compute capability
COMPILED_PRESETS = ("coco", "zsl")  # torch.compile costs about half a minute a preset: the targets' ones
# pipeline stages and D step with the similarities saved for the backward (the default up to 256 classes),
# then the default launch recomputing them instead (issue 26: a measured choice)
SWEEP = [dict(num_stages=stages, block_d=d, save_similarities=1) for stages in (1, 2, 3) for d in (16, 32)]
SWEEP.append(dict(num_stages=2, block_d=16, save_similarities=0))
LOSS_SHAPES = [(64, 80), (192, 1006), (192, 9605)]  # B, C: COCO's batch, then the zero-shot and open scales


def step_file(out: Path, step: str) -> Path:
    return out / f".step-{step}.json"


def save_step(out: Path, step: str, payload: dict) -> None:
    """Written after every unit of work, so that a step stopped at its limit keeps what it measured."""
    temporary = step_file(out, step).with_suffix(".tmp")
    write_json(temporary, payload)
    os.replace(temporary, step_file(out, step))


def run_tests(args, out: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["DUALCOOP_CUDA_SUITE"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "cuda")]
    if importlib.util.find_spec("xdist") and not args.dry_run:  # compiling the kernels is most of the time
        command += ["-n", str(min(8, os.cpu_count() or 1))]
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    print(finished.stdout[-4000:], finished.stderr[-2000:], sep="\n", flush=True)
    summary = finished.stdout.strip().splitlines()[-1] if finished.stdout.strip() else "no output"
    failures = re.findall(r"^FAILED (.*)$", finished.stdout, re.M)
    save_step(out, "tests", dict(returncode=finished.returncode, summary=summary, failures=failures))


def run_checks(args, out: Path) -> None:
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        shape = quick_shape(HEAD_PRESETS[preset]) if args.dry_run else HEAD_PRESETS[preset]
        for wta in WTA_MODES:
            progress(f"check {preset} {wta} {shape} on {device}")
            heads = library_backends(device, True)[0]
            rows += check_preset(preset, shape, device, torch.float32, heads, wta)
            save_step(out, "checks", dict(rows=rows))


def run_timing(args, out: Path) -> None:
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        shape = quick_shape(HEAD_PRESETS[preset]) if args.dry_run else HEAD_PRESETS[preset]
        compiled = not args.dry_run and preset in COMPILED_PRESETS
        progress(f"time {preset} {shape} on {device}{' with torch.compile' if compiled else ''}")
        heads = candidates(device, compiled, interpreted_triton=True)
        rows += bench_preset(
            preset, shape, device, torch.float32, heads, PRESET_WTA[preset], args.min_repeats, args.repeat_s
        )
        save_step(out, "timing", dict(rows=rows))


def run_sweep(args, out: Path) -> None:
    device = torch.device(args.device)
    preset = "coco"
    shape = quick_shape(HEAD_PRESETS[preset]) if args.dry_run else HEAD_PRESETS[preset]
    inputs = make_inputs(shape, device, torch.float32)
    features, texts, log_temp = inputs["features"], inputs["texts"], inputs["log_spatial_temp"]
    expected = dualcoop_head_reference(features.double(), *[t.double() for t in texts], log_temp.double())
    default = choose_launch_config(shape["B"], shape["N"], shape["C"], shape["D"], device)
    rows = []
    for setting in SWEEP:
        launch = dataclasses.replace(default, **setting)
        progress(f"sweep {preset} {launch}")

        def forward_backward(launch=launch):
            for leaf in (*texts, log_temp):
                leaf.grad = None
            dualcoop_head_triton(features, *texts, log_temp, launch=launch).backward(inputs["grad_output"])

        try:
            forward_backward()
            with torch.no_grad():
                error = (
                    (dualcoop_head_triton(features, *texts, log_temp, launch=launch).double() - expected).abs().max()
                )
            time_ms = median_time_ms(forward_backward, device, min_repeats=args.min_repeats, budget_s=args.repeat_s)
            rows.append(
                dict(preset=preset, **setting, default=launch == default, time_ms=time_ms, max_abs_error=error.item())
            )
        except Exception as error:  # a setting that fails to compile (out of shared memory) is a result too
            rows.append(dict(preset=preset, **setting, default=launch == default, error=str(error)[:300]))
        save_step(out, "sweep", dict(rows=rows))


def run_model(args, out: Path) -> None:
    """kernel_model.py for this card's architecture, fp32 inputs, a preset at a time (saved after each),
    in a process without Triton's interpreter (it compiles for the GPU); in a dry run, for an H100 at
    the smallest preset."""
    if args.dry_run:
        gpu, presets = "H100", ["voc"]
    else:
        gpu, presets = MODEL_GPUS.get(torch.cuda.get_device_capability(torch.device(args.device))), args.presets
    if gpu is None:
        save_step(out, "model", dict(error=f"the model knows {sorted(MODEL_GPUS.values())}, not this card"))
        return
    rows_file = out / "model-rows.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_model.py"), "--gpu", gpu, "--json", str(rows_file)]
    rows = []
    for preset in presets:
        progress(f"model {preset} for an {gpu}")
        finished = subprocess.run([*command, "--preset", preset], env=env, capture_output=True, text=True)
        if finished.returncode:
            save_step(out, "model", dict(rows=rows, gpu=gpu, error=finished.stderr[-1000:]))
            return
        rows += json.loads(rows_file.read_text())["rows"]
        save_step(out, "model", dict(rows=rows, gpu=gpu))
    rows_file.unlink()


def with_estimates(timing: list[dict], estimates: list[dict]) -> list[dict]:
    """The timing rows, the Triton head's with the model's estimate of the same preset and pass."""
    found = {(row["preset"], row["pass"]): row["estimate_us"] for row in estimates}
    return [
        dict(row, estimate_us=found.get((row["preset"], row["mode"]))) if row["backend"] == "triton" else row
        for row in timing
    ]


def run_loss(args, out: Path) -> None:
    device = torch.device(args.device)
    status = build_extension()
    if not getattr(status, f"{device.type}_built"):
        save_step(out, "loss", dict(error=status.why_not.get(device.type)))
        return
    shapes = [(7, 37)] if args.dry_run else LOSS_SHAPES
    rows = bench_asl.bench_device(device, args.min_repeats, args.repeat_s, shapes=shapes)
    save_step(out, "loss", dict(rows=rows))


def run_train(args, out: Path) -> None:
    """A whole training step, the authors' way and the package's (needs open_clip: carried as wheels)."""
    if importlib.util.find_spec("open_clip") is None:
        save_step(out, "train", dict(error="open_clip_torch is not installed (benchmarks/NOTES.md: bring wheels)"))
        return
    configs = ["quick", "nuswide-zsl"] if args.dry_run else ["coco", "nuswide", "nuswide-zsl", "coco-zsl"]
    arguments = []
    if args.dry_run:  # a tiny CLIP at small shapes
        tiny = out / "tiny-clip.json"
        tiny.write_text(json.dumps(bench_text.TINY_CLIP))
        arguments = ["--clip", str(tiny), "--image-size", "48", "--batch", "4", "--repeats", "1"]
    rows = []
    for config in configs:  # saved after each, so that a step stopped at its limit keeps what it measured
        rows += bench_train.run(bench_train.parse_args([*arguments, "--config", config, "--device", args.device]))
        save_step(out, "train", dict(rows=rows, targets=[] if args.dry_run else bench_train.targets(rows)))


def run_text(args, out: Path) -> None:
    """Text features: full, short and the shared prefix (needs open_clip: carried as wheels)."""
    if importlib.util.find_spec("open_clip") is None:
        save_step(out, "text", dict(error="open_clip_torch is not installed (benchmarks/NOTES.md: bring wheels)"))
        return
    rows = []
    for section in bench_text.SECTIONS:
        arguments = ["--section", section, "--device", args.device] + (["--quick"] if args.dry_run else [])
        rows += bench_text.run(bench_text.parse_args(arguments))
        save_step(out, "text", dict(rows=rows, targets=[] if args.dry_run else bench_text.targets(rows)))


RUNNERS = {
    "tests": run_tests,
    "checks": run_checks,
    "timing": run_timing,
    "model": run_model,
    "sweep": run_sweep,
    "loss": run_loss,
    "train": run_train,
    "text": run_text,
}

SWEEP_COLUMNS = [
    ("num_stages", "stages"),
    ("block_d", "D step"),
    ("save_similarities", "saved S"),
    ("default", "default"),
    ("time_ms", "fwd+bwd ms"),
    ("max_abs_error", "max |err|"),
    ("error", "error"),
]


def targets(rows: list[dict]) -> list[dict]:
    """The Triton head's targets, measured; reported, never asserted."""

    def find(preset, backend, mode="fwd+bwd"):
        return next((r for r in rows if (r["preset"], r["backend"], r["mode"]) == (preset, backend, mode)), None)

    found = []
    coco, coco_compile, zsl = find("coco", "triton"), find("coco", "torch.compile"), find("zsl", "triton")
    if coco and coco.get("speedup"):
        found.append(
            dict(target="coco fwd+bwd >= 5x eager", measured=f"{coco['speedup']:.2f}x", met=coco["speedup"] >= 5)
        )
    if coco and coco_compile and coco.get("time_ms") and coco_compile.get("time_ms"):
        ratio = coco_compile["time_ms"] / coco["time_ms"]
        found.append(dict(target="coco fwd+bwd >= 2x torch.compile", measured=f"{ratio:.2f}x", met=ratio >= 2))
    if zsl and zsl.get("memory_saving"):
        found.append(
            dict(
                target="zsl fwd+bwd peak >= 5x less than eager's",
                measured=f"{zsl['memory_saving']:.1f}x",
                met=zsl["memory_saving"] >= 5,
            )
        )
    openimages = find("openimages", "triton")
    if openimages and openimages.get("peak_mib") is not None:
        found.append(
            dict(
                target="openimages fwd+bwd < 2 GiB beyond inputs",
                measured=f"{openimages['peak_mib']:.0f} MiB",
                met=openimages["peak_mib"] < 2048,
            )
        )
    return found


def target_lines(goals: list[dict]) -> list[str]:
    return [f"- {g['target']}: {g['measured']} ({'met' if g['met'] else 'not met'})" for g in goals]


def model_note(results: dict) -> str:
    model = results.get("model")
    if model is None:
        return "the model step did not run"
    if "gpu" not in model:
        return model["error"].strip()
    return f"modelled as an {model['gpu']} SXM, fp32 inputs, features frozen" + (
        f"; it stopped: {model['error'].strip()}" if "error" in model else ""
    )


def table_or_reason(result: dict, columns) -> list[str]:
    """A step's rows as a table, or why the step could not run (no extension, no open_clip)."""
    if "rows" in result:
        return ["```", format_table(result["rows"], columns), "```"]
    return [f"not run: {result.get('error')}"]


def write_report(env: dict, steps: dict, out: Path) -> Path:
    """``<card>.md`` and ``<card>.json`` from what the steps have written so far."""
    results = {step: json.loads(step_file(out, step).read_text()) for step in STEPS if step_file(out, step).exists()}
    timing = results.get("timing", {}).get("rows", [])
    goals = targets(timing)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-") or "device"
    write_json(out / f"{slug}.json", dict(environment=env, steps=steps, results=results, targets=goals))

    def section(title, step, body):
        state = steps.get(step, "not run")
        return (
            [f"## {title} ({state})", "", *body(results[step]), ""]
            if step in results
            else [f"## {title} ({state})", ""]
        )

    checks = results.get("checks", {}).get("rows", [])
    failed = [row for row in checks if not row["passed"]]
    lines = [
        f"# DualCoOp++ head on {env['device']}",
        "",
        f"{env['date']}, torch {env['torch']}, triton {env['triton']}, float32 inputs, produced by "
        "`python benchmarks/gpu_check.py`. Times are medians (triton.testing.do_bench on a GPU); peak memory "
        "is beyond the inputs.",
        "",
        *section("CUDA tests", "tests", lambda r: [f"`{r['summary']}`", *[f"- FAILED {f}" for f in r["failures"]]]),
        *section(
            "Correctness",
            "checks",
            lambda r: [
                f"{len(checks) - len(failed)} of {len(checks)} checks pass: each backend's output and gradients "
                "against a float64 reference over a few draws, by the tests' rules (dualcoop_kernels.testing): "
                "the median error at most twice eager float32's, every error within its condition bound.",
                "",
                "```",
                format_table(failed, bench_head.CHECK_COLUMNS) if failed else "all pass",
                "```",
            ],
        ),
        *section(
            "Time and memory (each preset's WTA mode)",
            "timing",
            lambda r: [
                "```",
                format_table(
                    with_estimates(r["rows"], results.get("model", {}).get("rows", [])),
                    [*bench_head.BENCH_COLUMNS, ("estimate_us", "model us")],
                ),
                "```",
                "",
                f"model us: kernel_model.py's estimate for the Triton head on this card ({model_note(results)}).",
                "",
                *target_lines(goals),
            ],
        ),
        *section(
            "Launch settings of the Triton head, coco fwd+bwd",
            "sweep",
            lambda r: ["```", format_table(r["rows"], SWEEP_COLUMNS), "```"],
        ),
        *section(
            "A training step: the authors' way and the package's",
            "train",
            lambda r: [*table_or_reason(r, bench_train.COLUMNS), "", *target_lines(r.get("targets", []))],
        ),
        *section(
            "Text features: the authors' 77 tokens, the short encoding, the shared prefix",
            "text",
            lambda r: [
                *table_or_reason(r, bench_text.COLUMNS),
                "",
                *target_lines(r.get("targets", [])),
            ],
        ),
        *section(
            "Asymmetric loss, fwd+bwd",
            "loss",
            lambda r: table_or_reason(r, bench_asl.COLUMNS),
        ),
    ]
    path = out / f"{slug}.md"
    path.write_text("\n".join(lines))
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for <card>.md and .json")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all the steps together")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {list(STEPS)}")
    parser.add_argument("--presets", default=",".join(HEAD_PRESETS), help="for checks and timing")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at small shapes")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # one step, in the process the parent starts
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--repeat-s", type=float, default=0.3, help="seconds of timed calls per case, about")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {list(STEPS)}")
    args.presets = args.presets.split(",")
    args.device = "cpu" if args.dry_run else "cuda"
    return args


def stop(process: subprocess.Popen) -> None:
    """Ends a step (or the background build) with everything it started: pytest's workers, ninja."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        RUNNERS[args.step](args, out)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (--dry-run runs its steps on the CPU)")
    env = {**environment(torch.device(args.device)), "dry_run": args.dry_run}
    steps = {}
    started = time.monotonic()
    wanted = args.steps.split(",")
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        child_env["TRITON_INTERPRET"] = "1"
    # the loss extension takes about a minute to build: in the background, while the tests compile
    # Triton's kernels (the tests and the loss step wait for it on torch's build lock)
    with open(out / "extension-build.log", "w") as build_log:  # the build keeps its own handle
        build = subprocess.Popen(
            [sys.executable, "-m", "dualcoop_kernels.extension"],
            cwd=ROOT,
            env=child_env,
            stdout=build_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for step in wanted:
        share = args.budget * STEPS[step] / sum(STEPS[s] for s in wanted)
        step_file(out, step).unlink(missing_ok=True)
        progress(f"== {step} (at most {share:.0f} s; {time.monotonic() - started:.0f} s so far)")
        begun = time.monotonic()
        command = [sys.executable, "-u", str(Path(__file__).resolve()), "--step", step, *(argv or sys.argv[1:])]
        child = subprocess.Popen(command, env=child_env, start_new_session=True)
        try:
            returncode = child.wait(timeout=share)
            steps[step] = (
                f"done in {time.monotonic() - begun:.0f} s"
                if returncode == 0
                else f"failed (exit {returncode}) after {time.monotonic() - begun:.0f} s"
            )
        except subprocess.TimeoutExpired:
            stop(child)
            steps[step] = f"stopped at its limit of {share:.0f} s; what it finished is shown"
        path = write_report(env, steps, out)
        progress(f"== {step}: {steps[step]}; report: {path}")
    stop(build)  # if still running, the steps that ran did not need it
    for step in wanted:
        step_file(out, step).unlink(missing_ok=True)
    print(path.read_text())
    print(f"gpu_check: {time.monotonic() - started:.0f} s in all; " + "; ".join(f"{k} {v}" for k, v in steps.items()))
    return 0 if all(state.startswith("done") for state in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
