"""Time per training step of DualCoOp++, the authors' way against this package's, in one run.

    python benchmarks/bench_train.py                     # quick: RN50, 224 px, batch 16, 80 classes
    python benchmarks/bench_train.py --quick             # the same, one timed call of each part (CI)
    python benchmarks/bench_train.py --config coco       # RN101, 448 px, batch 64, 80 classes (a GPU)
    python benchmarks/bench_train.py --config nuswide    # RN101, 448 px, batch 192, 81 classes (a GPU)
    python benchmarks/bench_train.py --config nuswide-zsl --config coco-zsl   # RN50, 224 px, batch 32,
                                                         # 64 shared contexts, 100 or 48 seen classes

(a) ``authors``: the frozen image encoder on every batch, the 77-token text encoder, the eager head and
the eager loss. (b) ``package``: region features read from a cache (the encoder ran once, before),
the short text encoding with fused attention, the head's and the loss's fastest backends (the fused
Triton head on a GPU, the loss extension where it is built); on a GPU also ``package-bf16`` (the text
encoder under bf16 autocast). With shared contexts (the zero-shot configurations) (b) computes the
contexts' common prefix once per prompt set, and (c) ``package-short`` is (b) without that: the short
encoding of every prompt whole. Each row gives the median step time and peak memory, each part's time
(image encoder, text encoder forward and backward, head forward and backward, loss, optimizer step),
the speedup over (a) and over (c), and, for COCO, an epoch's time at the authors' 1,293 steps. CLIP
weights are random: speed does not depend on them. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench_text import class_names
from harness import environment, peak_memory_mib, print_report, progress, synchronize

import dualcoop_kernels as dk

CONFIGS = {  # the zero-shot ones with their presets' class names (bench_text.class_names), WTA and contexts
    "quick": dict(clip="RN50", image_size=224, batch=16, classes=80),
    "coco": dict(clip="RN101", image_size=448, batch=64, classes=80),
    "nuswide": dict(clip="RN101", image_size=448, batch=192, classes=81),
    "coco-zsl": dict(clip="RN50", image_size=224, batch=32, classes=48, n_ctx=64, wta="pos_norm", shared_contexts=True),
    "nuswide-zsl": dict(
        clip="RN50", image_size=224, batch=32, classes=100, n_ctx=64, wta="pos_softmax", shared_contexts=True
    ),
}
COCO_STEPS_PER_EPOCH = 1293  # 82,783 images in batches of 64, the last dropped
WAYS = {
    "authors": dict(text_encoding="full", head_backend="reference", loss_backend="reference", cached=False),
    "package-short": dict(
        text_encoding="short", shared_prefix=False, head_backend="auto", loss_backend="auto", cached=True
    ),
    "package": dict(text_encoding="short", head_backend="auto", loss_backend="auto", cached=True),
}
COLUMNS = [
    ("config", "config"),
    ("way", "way"),
    ("precision", "precision"),
    ("step_ms", "step ms"),
    ("speedup", "x authors"),
    ("speedup_short", "x package-short"),
    ("text_speedup_short", "text x package-short"),
    ("peak_mib", "peak MiB"),
    ("image_ms", "image enc"),
    ("text_ms", "text enc"),
    ("head_ms", "head"),
    ("loss_ms", "loss"),
    ("optimizer_ms", "optim"),
    ("epoch_min", "COCO epoch min"),
]


def timed(fn, device, repeats: int, warm_up: bool) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls (after one untimed call when ``warm_up``)."""
    if warm_up:
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - started) * 1e3)
    return sorted(samples)[len(samples) // 2]


def bench_way(name, way, shape, device, precision, repeats, warm_up) -> dict:
    model = dk.DualCoOpPlusPlus(
        shape["clip"],
        shape["classnames"],
        text_encoding=way["text_encoding"],
        head_backend=way["head_backend"],
        **{key: shape[key] for key in ("n_ctx", "shared_contexts", "wta") if key in shape},
    ).to(device)
    model.text_encoder.shared_prefix &= way.get("shared_prefix", True)
    optimizer = torch.optim.SGD(model.learnable_parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    loss_fn = dk.AsymmetricLoss(gamma_neg=2.0, gamma_pos=1.0, clip=0.05, backend=way["loss_backend"])
    images = torch.randn(shape["batch"], 3, shape["image_size"], shape["image_size"], device=device)
    labels = torch.randint(-1, 2, (shape["batch"], shape["classes"]), device=device)
    targets, mask = dk.split_signed_labels(labels)
    cached = model.encode_regions(images).half() if way["cached"] else None  # the cache stores float16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            inputs = {"regions": cached.float()} if cached is not None else {"images": images}
            logits = model(**inputs)
        loss = 0.02 * loss_fn(logits.float(), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    regions = cached.float() if cached is not None else model.encode_regions(images)

    def image_encoder():
        if cached is None:
            model.encode_regions(images)
        else:
            cached.float()

    def text_encoder():
        with autocast:
            texts = model.text_features()
        torch.autograd.backward(texts, [torch.ones_like(t) for t in texts])

    texts = [t.detach().float().requires_grad_() for t in model.text_features()]

    def head():
        model.head(regions, *texts).sum().backward()

    logits = model(regions=regions).detach().float().requires_grad_()

    def loss():
        (0.02 * loss_fn(logits, targets, mask)).backward()

    def optimizer_step():
        optimizer.step()

    row = dict(way=name, precision=precision, peak_mib=peak_memory_mib(step, device))  # also warms up
    row["step_ms"] = timed(step, device, repeats, warm_up=False)
    for part, fn in [
        ("image", image_encoder),
        ("text", text_encoder),
        ("head", head),
        ("loss", loss),
        ("optimizer", optimizer_step),
    ]:
        row[f"{part}_ms"] = timed(fn, device, repeats, warm_up)
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), action="append", help="repeatable (default: quick)")
    parser.add_argument("--clip", help="override the configuration's CLIP (a name or an open_clip model config .json)")
    parser.add_argument("--image-size", type=int, help="override the image side")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (median), after one warm-up")
    parser.add_argument(
        "--quick", action="store_true", help="the quick configuration, one timed call each, no warm-ups"
    )
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats = ["quick"], 1
    return args


def run(args) -> list[dict]:
    """Every configuration's rows: each way, timed, with its speedups over the authors' way and over
    package-short (where contexts are shared: elsewhere the shared prefix does not apply)."""
    device = torch.device(args.device)
    rows = []
    for config in args.config or ["quick"]:
        shape = dict(CONFIGS[config])
        shape.update({k: v for k, v in dict(clip=args.clip, image_size=args.image_size, batch=args.batch).items() if v})
        shared = shape.get("shared_contexts", False)
        shape["classnames"] = (
            class_names(shape["classes"], config) if shared else [f"class {i}" for i in range(shape["classes"])]
        )
        cases = [("authors", "fp32")] + [("package-short", "fp32")] * shared + [("package", "fp32")]
        cases += [("package", "bf16")] if device.type == "cuda" else []
        settings = ", ".join(f"{key} {value}" for key, value in shape.items() if key != "classnames")
        for way, precision in cases:
            progress(f"{config} {way} {precision} on {device}: {settings}")
            timing = bench_way(way, WAYS[way], shape, device, precision, args.repeats, warm_up=not args.quick)
            rows.append(dict(config=config, **timing))
        own = [row for row in rows if row["config"] == config]
        authors = next(row for row in own if row["way"] == "authors")
        short = next((row for row in own if row["way"] == "package-short"), None)
        for row in own:
            row["speedup"] = authors["step_ms"] / row["step_ms"]
            if short is not None and row["precision"] == "fp32":
                row["speedup_short"] = short["step_ms"] / row["step_ms"]
                row["text_speedup_short"] = short["text_ms"] / row["text_ms"]
            if config == "coco":
                row["epoch_min"] = row["step_ms"] * COCO_STEPS_PER_EPOCH / 60e3
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The shared prefix's target for a whole step (nuswide-zsl, cached features), measured."""
    row = next((r for r in rows if (r["config"], r["way"]) == ("nuswide-zsl", "package")), None)
    if row is None or not row.get("speedup_short"):
        return []
    measured = f"{row['speedup_short']:.1f}x (text {row['text_speedup_short']:.1f}x)"
    return [dict(target="nuswide-zsl step >= 6x package-short", measured=measured, met=row["speedup_short"] >= 6)]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print_report("dualcoop training step", device, env, run(args), COLUMNS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
