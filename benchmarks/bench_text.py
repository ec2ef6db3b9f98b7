"""Text features of DualCoOp++'s prompts: the authors' 77 tokens, the short encoding and the shared prefix.

    python benchmarks/bench_text.py                      # every section at the papers' shapes
    python benchmarks/bench_text.py --section features   # one section (repeatable)
    python benchmarks/bench_text.py --quick              # a tiny CLIP, small shapes, one timed call (CI)

Sections (random CLIP weights: speed does not depend on them; the ways of a case are timed in turn,
call by call, so that other work on a shared machine slows them alike):

  training   the text encoder's forward+backward at the zero-shot presets' training shapes (RN50, 64
             shared contexts, three prompt sets; nuswide-zsl: 100 seen classes a batch, coco-zsl: its 48):
             ``full`` (77 tokens), ``short`` (up to the last [EOS]), ``shared`` (the shared prefix once),
             and ``shared-sdpa``, the shared prefix with the other attention formulation measured
             (scaled_dot_product_attention over the prefix's keys copied per class, then the suffix's)
  features   text features without autograd, as evaluation and open-vocabulary scoring compute them:
             1,006 classes (NUS-WIDE's generalised zero-shot) and 10,000 names; time and peak memory.
             On a CPU the full and short ways at 10,000 names are left out unless ``--all`` (about ten
             times their 1,006-class time)
  open       open-vocabulary scoring: ``for_classes(10,000 names)`` of a shared-context model on 16
             images (224 px), without autograd: tokens, text features, regions and the head; time,
             peak memory added and the process's peak
  grouping   class-specific contexts (the coco and nuswide presets: RN101, 21 contexts, 80 and 81
             classes), forward+backward: the short encoding as it is against prompts grouped by their
             [EOS] position, each group run at its own length

Every row gives the prompt tokens the transformer computes. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import sys
import time

import torch
import torch.nn.functional as F

from harness import environment, peak_memory_mib, print_report, progress, resident_mib, synchronize

import dualcoop_kernels as dk
from dualcoop_kernels.data.shapes import TINY_CLIP  # a CLIP small enough for --quick
from dualcoop_kernels.model import text as text_module
from dualcoop_kernels.model.loading import load_clip, open_clip_module

SECTIONS = ("training", "features", "open", "grouping")
WAYS = {  # the text encoder's switches: which path each way runs
    "full": dict(full_length=True, fused=False, shared_prefix=False),
    "short": dict(full_length=False, fused=True, shared_prefix=False),
    "shared": dict(full_length=False, fused=True, shared_prefix=True),
    "shared-sdpa": dict(full_length=False, fused=True, shared_prefix=True),
    "grouped": dict(full_length=False, fused=True, shared_prefix=False),
}
# (case, CLIP, classes, n_ctx, shared contexts); the tiny CLIP's sizes with --quick
TRAINING = [("nuswide-zsl", "RN50", 100, 64, True), ("coco-zsl", "RN50", 48, 64, True)]
GROUPING = [("coco", "RN101", 80, 21, False), ("nuswide", "RN101", 81, 21, False)]
FEATURE_CLASSES = (1006, 10_000)
OPEN_NAMES, OPEN_IMAGES, OPEN_SIDE = 10_000, 16, 224
QUICK = dict(training=13, grouping=11, features=(37, 101), open_names=300, open_images=4, open_side=48)
COLUMNS = [
    ("section", "section"),
    ("case", "case"),
    ("way", "way"),
    ("tokens", "tokens"),
    ("time_ms", "ms"),
    ("speedup", "x short"),
    ("peak_mib", "peak MiB"),
    ("process_mib", "process MiB"),
]


def class_names(count: int, case: str) -> list[str]:
    """Real class names where the package has them (COCO, the NUS-WIDE concepts), then words of CLIP's
    vocabulary (one in four names two words), as Flickr tags and open vocabularies are."""
    from dualcoop_kernels.data import COCO_CLASSES, COCO_SEEN, NUSWIDE_CONCEPTS  # the data wing needs PIL

    if case == "coco-zsl":
        return [COCO_CLASSES[index] for index in COCO_SEEN][:count]
    known = list(COCO_CLASSES) if case == "coco" else list(NUSWIDE_CONCEPTS)
    known += [name for name in COCO_CLASSES if name not in known]
    if count <= len(known):
        return known[:count]
    vocabulary = sorted(
        word[: -len("</w>")]
        for word in open_clip_module().get_tokenizer("RN50").encoder
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalpha() and len(word) > 6
    )
    picker = random.Random(0)
    names = dict.fromkeys(known)
    while len(names) < count:
        words = picker.sample(vocabulary, 2 if len(names) % 4 == 3 else 1)
        names[" ".join(words)] = None
    return list(names)


def prompt_tokens(model, way: str) -> int:
    """Tokens the transformer computes for the model's prompts on ``way``."""
    prompts, sets = model.prompts, len(model.prompts.prompt_sets)
    ends = prompts.tokenized.argmax(dim=-1)
    if way == "full":
        return sets * ends.numel() * prompts.tokenized.shape[1]
    if way in ("shared", "shared-sdpa"):
        return sets * (1 + prompts.n_ctx + int((ends - prompts.n_ctx).sum()))
    if way == "grouped":
        return sets * int((ends + 1).sum())
    return sets * ends.numel() * (int(ends.max()) + 1)


def copied_prefix_attention(q, k, v, prefix_keys, prefix_values, length):
    """The formulation not chosen: the prefix's keys and values copied per class, concatenated with
    the suffix's, through scaled_dot_product_attention with a lower-right causal mask."""
    q, k, v = (t.unflatten(2, (-1, length)) for t in (q, k, v))  # S x H x C x L x dh
    prefix = prefix_keys.shape[-2]
    keys, values = (
        torch.cat([shared[:, :, None].expand(-1, -1, t.shape[2], -1, -1), t], -2)
        for shared, t in ((prefix_keys, k), (prefix_values, v))
    )
    mask = torch.ones(length, prefix + length, dtype=torch.bool, device=q.device).tril(prefix)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).flatten(2, 3)


def grouped_by_end(encoder, contexts, tokenized) -> torch.Tensor:
    """Class-specific prompts grouped by their [EOS] position, each group at its own length."""
    ends = tokenized.argmax(dim=-1)
    groups = [(ends == end).nonzero().flatten() for end in ends.unique()]
    parts = [encoder([c[rows] for c in contexts], tokenized[rows]) for rows in groups]
    return torch.cat(parts, 1)[:, torch.cat(groups).argsort()]


def text_call(model, way: str, backward: bool):
    """One call of the text encoder on ``way``, with the backward of a sum when ``backward``."""
    encoder = model.text_encoder

    def call():
        for switch, value in WAYS[way].items():
            setattr(encoder, switch, value)
        attention = copied_prefix_attention if way == "shared-sdpa" else text_module.suffix_attention
        with _swapped(text_module, "suffix_attention", attention), torch.set_grad_enabled(backward):
            encode = grouped_by_end if way == "grouped" else lambda e, c, t: e(c, t)
            features = encode(encoder, *model.prompts())
            if backward:
                model.zero_grad(set_to_none=True)
                features.sum().backward()

    return call


@contextlib.contextmanager
def _swapped(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def interleaved_ms(calls: dict, device, repeats: int, warm_up: bool) -> dict:
    """Median milliseconds of each call, the calls timed in turn, ``repeats`` rounds."""
    if warm_up:
        for call in calls.values():
            call()
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            started = time.perf_counter()
            call()
            synchronize(device)
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}


def compare(section, case, model, ways, backward, args) -> list[dict]:
    """Rows of the ways of one case: tokens, peak memory (also a warm-up), time, speed-up over short."""
    calls = {way: text_call(model, way, backward) for way in ways}
    peaks = {way: peak_memory_mib(call, args.device) for way, call in calls.items()}
    times = interleaved_ms(calls, args.device, args.repeats, warm_up=False)
    rows = [
        dict(
            section=section,
            case=case,
            way=way,
            tokens=prompt_tokens(model, way),
            time_ms=times[way],
            peak_mib=peaks[way],
        )
        for way in ways
    ]
    short = next((row["time_ms"] for row in rows if row["way"] == "short"), None)
    for row in rows:
        row["speedup"] = short / row["time_ms"] if short else None
    return rows


def build(args, clip_name: str, names: list[str], n_ctx: int, shared_contexts: bool, clips: dict):
    """A model of the given prompts on a CLIP loaded once per name (the tiny one with --quick)."""
    if clip_name not in clips:
        clips[clip_name] = open_clip_module().model.CLIP(**TINY_CLIP) if args.quick else load_clip(clip_name)
    model = dk.DualCoOpPlusPlus(clips[clip_name], names, n_ctx=n_ctx, shared_contexts=shared_contexts)
    return model.to(args.device)


def forward_backward_rows(section: str, cases, ways: list[str], args, clips) -> list[dict]:
    """The text encoder's forward+backward on each way, at each (case, CLIP, classes, n_ctx, shared contexts)."""
    rows = []
    for case, clip_name, classes, n_ctx, shared_contexts in cases:
        names = class_names(QUICK[section] if args.quick else classes, case)
        kind = "shared" if shared_contexts else "class-specific"
        progress(f"{section} {case}: {len(names)} classes, {n_ctx} {kind} contexts, forward+backward")
        model = build(args, clip_name, names, n_ctx, shared_contexts, clips)
        rows += compare(section, case, model, ways, True, args)
    return rows


def feature_rows(args, clips) -> list[dict]:
    rows = []
    for classes in QUICK["features"] if args.quick else FEATURE_CLASSES:
        names = class_names(classes, "nuswide-zsl")
        ways = ["full", "short", "shared"]
        if classes > 2000 and args.device.type == "cpu" and not args.all:
            ways = ["shared"]
            progress(f"features {classes}: full and short left out on the CPU (--all runs them)")
        progress(f"features {classes} classes without autograd: {ways}")
        model = build(args, "RN50", names, 64, True, clips)
        rows += compare("features", f"{classes} classes", model, ways, False, args)
    return rows


def open_vocabulary_rows(args, clips) -> list[dict]:
    """for_classes(names)(images) without autograd, as ``predict --classes`` scores."""
    count, images, side = (
        (QUICK["open_names"], QUICK["open_images"], QUICK["open_side"])
        if args.quick
        else (OPEN_NAMES, OPEN_IMAGES, OPEN_SIDE)
    )
    names = class_names(count, "open")
    model = build(args, "RN50", ["cat", "dog"], 64, True, clips).eval()
    pictures = torch.randn(images, 3, side, side, device=args.device)

    def score():
        with torch.no_grad():
            model.for_classes(names)(pictures)

    progress(f"open vocabulary: {count} names, {images} images at {side} px")
    resident = resident_mib() if args.device.type == "cpu" else None
    peak = peak_memory_mib(score, args.device)
    time_ms = interleaved_ms({"shared": score}, args.device, args.repeats, warm_up=False)["shared"]
    case = f"{count} names, {images} images"
    row = dict(section="open", case=case, way="shared", time_ms=time_ms, peak_mib=peak)
    row["tokens"] = prompt_tokens(model.for_classes(names), "shared")
    if resident is not None and peak is not None:
        row["process_mib"] = resident + peak
    return [row]


RUNNERS = dict(
    training=functools.partial(forward_backward_rows, "training", TRAINING, ["full", "short", "shared", "shared-sdpa"]),
    features=feature_rows,
    open=open_vocabulary_rows,
    grouping=functools.partial(forward_backward_rows, "grouping", GROUPING, ["short", "grouped"]),
)


def targets(rows: list[dict]) -> list[dict]:
    """The shared prefix's targets at the papers' shapes, measured; reported, never asserted."""

    def find(section, case, way="shared"):
        return next((r for r in rows if (r["section"], r["case"], r["way"]) == (section, case, way)), None)

    found = []
    for section, case, goal in [("training", "nuswide-zsl", 8), ("features", "1006 classes", 10)]:
        row = find(section, case)
        if row and row.get("speedup"):
            what = "text fwd+bwd" if section == "training" else "text features"
            measured, met = f"{row['speedup']:.1f}x", row["speedup"] >= goal
            found.append(dict(target=f"{case} {what} >= {goal}x short", measured=measured, met=met))
    row = find("open", f"{OPEN_NAMES} names, {OPEN_IMAGES} images")
    peak = row and (row.get("process_mib") or row.get("peak_mib"))
    if peak:
        measured = f"{peak:.0f} MiB in {row['time_ms'] / 1e3:.1f} s"
        found.append(dict(target=f"{row['case']}: peak < 4 GiB", measured=measured, met=peak < 4096))
    return found


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=SECTIONS, action="append", help="repeatable (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per way (median)")
    parser.add_argument("--all", action="store_true", help="on a CPU too, full and short at 10,000 names")
    parser.add_argument("--quick", action="store_true", help="a tiny CLIP at small shapes, one timed call each")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    args.device = torch.device(args.device)
    return args


def run(args) -> list[dict]:
    clips: dict = {}
    rows = []
    for section in args.section or SECTIONS:
        rows += RUNNERS[section](args, clips)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args.device)
    print_report("dualcoop text features", args.device, env, run(args), COLUMNS, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
