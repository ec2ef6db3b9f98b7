"""The ``dualcoop`` command line (also ``python -m dualcoop_kernels``): train, cache, evaluate, predict,
report, explain and export; a first try and the extension's build.

    dualcoop train --preset coco --root DATA --partial 0.3 --seed 1 --out RUN
    dualcoop cache --preset coco --root DATA --out CACHE [--augment --views 4]   (then train --features CACHE)
    dualcoop eval RUN [--json]
    dualcoop predict RUN IMAGE_OR_FOLDER ... [--top-k 3] [--out predictions.csv]
    dualcoop report RUN [--out report.html]
    dualcoop explain RUN IMAGE_OR_FOLDER ... [--classes ...] [--top-k 3] --out FOLDER
    dualcoop export RUN --out model.pt2
    dualcoop first-try [FOLDER]           (a small task a tiny random CLIP learns on a CPU)
    dualcoop build-extension              (the C++/CUDA loss, ahead of time)

Errors in what was asked (a missing file, a bad option) end the command with one line that says what is
wrong and exit code 2 (``DUALCOOP_DEBUG=1`` adds their traceback); under torchrun the first process alone
says it. Anything else is a bug in the package: its traceback is shown, with what to report, and the
command exits with 1. A run's log.txt keeps the traceback in both cases.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from ._checks import error_gist
from .errors import UsageError
from .version import __version__

LOGGER = logging.getLogger("dualcoop_kernels.cli")
CLASS_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst", ".list", ".names")  # --classes: a value ending so is a file


def _shown_default(item: dataclasses.Field) -> str:
    """A setting's default in the user's terms, for ``--help``."""
    if item.metadata["shown"]:
        return item.metadata["shown"]
    value = item.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


ARGUMENT_TYPES = {
    "int": dict(type=int),
    "int | None": dict(type=int),
    "float": dict(type=float),
    "tuple[float, float]": dict(type=float, nargs=2, metavar=("LOW", "HIGH")),
    "dict": dict(type=_key_value, action="append", metavar="KEY=VALUE"),
}


def _add_settings(parser) -> None:
    """Every field of TrainConfig as an option, generated from the field's metadata (training/config.py)."""
    from .training.config import PRESETS, TrainConfig

    parser.add_argument("--preset", choices=list(PRESETS), help="the authors' settings for a paper's experiment")
    group = parser.add_argument_group("settings (a preset's values, overridden by those given)")
    for item in dataclasses.fields(TrainConfig):
        flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
        options = dict(dest=item.name, help=f"{item.metadata['help']} (default: {_shown_default(item)})")
        if item.type == "bool":
            options.update(action=argparse.BooleanOptionalAction)
        else:
            options.update(ARGUMENT_TYPES.get(item.type, {}), choices=item.metadata["choices"])
        if item.metadata["bare"] is not None:
            options.update(nargs="?", const=item.metadata["bare"])
        group.add_argument(flag, *item.metadata["aliases"], **options)
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no log lines (log.txt has them)")


def _given_settings(args) -> dict:
    """The settings given on the command line, as TrainConfig values; paths made absolute, so that the
    run folder's config.json works from any working folder."""
    from .training.config import TrainConfig

    given = {}
    for item in dataclasses.fields(TrainConfig):
        value = getattr(args, item.name)
        if value is None:
            continue
        if item.type == "dict":
            value = dict(value)
        elif item.type.startswith("tuple"):
            value = tuple(value)
        path = item.metadata["path"]
        if path == "always" or (path == "if it exists" and Path(value).exists()):
            value = str(Path(value).resolve())
        given[item.name] = value
    return given


def _config_from(args):
    """A new run's settings: the preset's, then those given."""
    from .training import TrainConfig, preset_config

    given = _given_settings(args)
    if "root" not in given:
        raise UsageError("--root is needed: the dataset's folder (for --dataset csv, the CSV file)")
    return TrainConfig(**{**(preset_config(args.preset) if args.preset else {}), **given})


def _resumed_config(args):
    """A resumed run's settings: its own (its config.json, read once). The same settings given again
    (the first command line, say) are welcome; other values are refused, each named with the run's,
    except those of --workers, --device and --report-to, which may change."""
    from .training import preset_config
    from .training.runs import RUNTIME_SETTINGS, refuse_other_settings, resumed_config

    given = _given_settings(args)
    try:
        config = resumed_config(args.out, {name: value for name, value in given.items() if name in RUNTIME_SETTINGS})
    except ValueError as error:
        raise UsageError(f"--resume continues the run in {args.out}: {error}") from error
    refuse_other_settings(args.out, config, {**(preset_config(args.preset) if args.preset else {}), **given})
    return config


def _train(args) -> int:
    from .training import train
    from .training.evaluation import results_table

    _writable_folder(args.out, f"--out {args.out}")
    config = _resumed_config(args) if args.resume else _config_from(args)
    results = train(config, args.out, resume=args.resume, show_progress=not args.quiet)
    print(results_table(results))
    return 0


def _cache(args) -> int:
    from .training.cache import cache_training_split

    _writable_folder(args.out, f"--out {args.out}")
    config = _config_from(args)
    options = dict(views=args.views, augment=args.augment not in (None, "none"), dtype=args.dtype)
    cache_training_split(config, args.out, show_progress=not args.quiet, **options)
    if _rank() == 0:
        print(f"dualcoop cache: {args.out} is complete; train with --features {args.out}")
    return 0


def _eval(args) -> int:
    from .training.evaluation import evaluate_run, results_table

    results = evaluate_run(args.run, args.split, args.device, args.workers)
    print(json.dumps(results, indent=2) if args.json else results_table(results))
    return 0


def _image_suffixes() -> set[str]:
    """The file suffixes of every image format PIL reads."""
    from PIL import Image

    return {suffix for suffix, format in Image.registered_extensions().items() if format in Image.OPEN}


def _images(paths: list[str]) -> list[Path]:
    found, suffixes = [], _image_suffixes()
    for given in map(Path, paths):
        if given.is_dir():
            found += sorted(p for p in given.rglob("*") if p.suffix.lower() in suffixes)
        elif given.is_file():
            found.append(given)
        else:
            raise FileNotFoundError(f"{given} is neither an image file nor a folder")
    if not found:
        raise UsageError(f"no images (files of a format PIL reads: .jpg, .png, .gif, .webp, .tif, ...) in {paths}")
    return found


def _class_list(given: str) -> list[str]:
    """``--classes``: names separated by commas, or the path of a file with one name a line (a value
    with a path separator or a file suffix is a path, and the file must exist)."""
    path = Path(given)
    if path.is_file():
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise UsageError(f"--classes file {path} is not UTF-8 text ({error})") from error
    elif "/" in given or os.sep in given or path.suffix.lower() in CLASS_FILE_SUFFIXES:
        raise FileNotFoundError(
            f"--classes {given!r} reads as a file of class names (it has a path separator or a file suffix), "
            "but there is no such file; give class names separated by commas, or an existing file"
        )
    else:
        names = [name.strip() for name in given.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--classes {given!r} names no class (give names separated by commas, or a file of names)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--classes names {repeated} more than once: each class is one column of the output")
    return names


def _writable_file(value: str | None) -> Path | None:
    """``--out`` of a file: not a folder, in a folder that exists (or can be made) and is writable."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"--out {value} is a folder; give the path of a file to write")
    _writable_folder(path.parent, f"--out {value}")
    return path


def _writable_folder(folder: Path, what: str) -> None:
    """A folder to write in: it, or the nearest of its parents that exists, must be a writable folder."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: the folder {existing} is not writable")


def _prediction_header(classnames: list[str], top_k: int | None) -> list[str]:
    if top_k is None:
        return ["image", *classnames, "present"]
    return [
        "image",
        *[f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "probability", "present")],
    ]


def _prediction_row(path, probabilities, classnames: list[str], top_k: int | None) -> list[str]:
    """An image's probabilities, and which classes are present: P+ > P- (probability above 1/2), the
    threshold of the metrics (1 / 0 per class of the top k, or the present classes joined by ';')."""
    if top_k is None:
        present = ";".join(name for name, p in zip(classnames, probabilities.tolist()) if p > 0.5)
        return [str(path), *(f"{value:.6f}" for value in probabilities.tolist()), present]
    best = probabilities.topk(top_k)
    pairs = zip(best.indices.tolist(), best.values.tolist())
    return [str(path), *(cell for i, v in pairs for cell in (classnames[i], f"{v:.6f}", str(int(v > 0.5))))]


def _predict(args) -> int:
    from ._atomic import atomic_open
    from .data.image_check import small_images_warning
    from .training.evaluation import image_probabilities, scoring
    from .training.runs import load_best

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = _writable_file(args.out)
    config, model, device = load_best(args.run, args.device)
    paths = _images(args.images)
    model, columns = scoring(model, config, None if args.classes is None else _class_list(args.classes))
    classnames = [model.prompts.classnames[c] for c in columns]
    _check_top_k(args.top_k, len(classnames))
    unreadable, sizes = {}, {}
    scored_batches = image_probabilities(model, paths, config, device, args.batch_size, unreadable, sizes)
    with atomic_open(out, "w") if out else contextlib.nullcontext(sys.stdout) as file:
        writer = csv.writer(file, lineterminator="\n")  # row by row: a vocabulary's rows are not all kept
        writer.writerow(_prediction_header(classnames, args.top_k))
        for scored, probabilities in scored_batches:
            writer.writerows(
                _prediction_row(path, row[columns], classnames, args.top_k) for path, row in zip(scored, probabilities)
            )
    for warning in small_images_warning(sizes):
        LOGGER.warning(warning)
    if unreadable:
        listing = "; ".join(f"{path} ({reason})" for path, reason in list(unreadable.items())[:10])
        raise UsageError(
            f"{len(unreadable)} of {len(paths)} images could not be read (the others are scored): {listing}"
        )
    return 0


def _report(args) -> int:
    from .reports.report import write_report

    out = _writable_file(args.out)
    print(f"dualcoop report: {write_report(args.run, out)}")
    return 0


def _first_try(args) -> int:
    from .data.shapes import write_first_try

    _writable_folder(args.folder, f"folder {args.folder}")
    written = write_first_try(args.folder, args.train, args.test)
    print(f"dualcoop first-try: {written}")
    return 0


def _build_extension(args) -> int:
    from .extension.build import build_and_print

    return build_and_print()


def _check_top_k(top_k: int | None, classes: int) -> None:
    if top_k is not None and not 1 <= top_k <= classes:
        raise UsageError(f"--top-k must be from 1 to the {classes} classes, got {top_k}")


def _explain(args) -> int:
    from .data.image_check import check_image_files
    from .reports.maps import write_explanations
    from .training.evaluation import scoring
    from .training.runs import load_best

    _writable_folder(args.out, f"--out {args.out}")
    config, model, _ = load_best(args.run, "cpu")
    paths = _images(args.images)
    for warning in check_image_files(paths):
        LOGGER.warning(warning)
    model, columns = scoring(model, config, None if args.classes is None else _class_list(args.classes))
    _check_top_k(args.top_k, len(model.prompts.classnames))
    named = columns if args.classes is not None else None  # else each image's top k
    written = write_explanations(model, paths, args.out, config, named, args.top_k)
    print(f"dualcoop explain: {len(written)} picture(s) in {args.out}")
    return 0


def _export(args) -> int:
    from .model.export import export_model
    from .training.runs import load_best

    out = _writable_file(args.out)
    config, model, _ = load_best(args.run, "cpu")
    export_model(model, out, config.image_size)
    print(
        f"dualcoop export: {out}: {config.image_size} x {config.image_size} normalised images in, "
        f"B x {len(model.prompts.classnames)} probabilities out (torch.export.load(path).module())"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualcoop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train prompts on a dataset, pick the best epoch, evaluate it")
    _add_settings(train)
    train.add_argument("--out", required=True, type=Path, help="the run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    cache = commands.add_parser("cache", help="store the frozen image encoder's features of the training split")
    _add_settings(cache)
    cache.add_argument("--out", required=True, type=Path, help="the cache folder (a rerun finishes it)")
    cache.add_argument("--views", type=int, default=1, help="augmented views per image (needs --augment)")
    cache.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    evaluate = commands.add_parser("eval", help="evaluate a run's best prompts on its test split(s)")
    evaluate.add_argument("run", type=Path)
    evaluate.add_argument("--split", action="append", help="test, zsl, gzsl or val (repeatable; default: the tests)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--device")
    evaluate.add_argument("--workers", type=int)
    predict = commands.add_parser("predict", help="class probabilities of new images, as CSV")
    predict.add_argument("run", type=Path)
    predict.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    predict.add_argument("--top-k", dest="top_k", type=int, help="only the k most likely classes per image")
    predict.add_argument(
        "--classes",
        help="score these class names instead (shared-context runs): names separated by commas, or a file with "
        "one name a line (a value with a / or a suffix such as .txt is read as a file, which must exist)",
    )
    predict.add_argument("--out", help="CSV file to write (default: standard output)")
    predict.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    predict.add_argument("--device")
    report = commands.add_parser("report", help="one HTML page of what a run learned (self-contained)")
    report.add_argument("run", type=Path)
    report.add_argument("--out", help="the HTML file (default: RUN/report.html)")
    explain = commands.add_parser("explain", help="where each class finds its evidence in images, as PNGs")
    explain.add_argument("run", type=Path)
    explain.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    explain.add_argument("--classes", help="these classes (as --classes of predict) instead of the top k")
    explain.add_argument("--top-k", dest="top_k", type=int, default=3, help="the k most probable classes")
    explain.add_argument("--out", required=True, type=Path, help="the folder of the pictures")
    export = commands.add_parser("export", help="the inference model as a torch.export program (.pt2)")
    export.add_argument("run", type=Path)
    export.add_argument("--out", required=True, help="the .pt2 file to write")
    first_try = commands.add_parser("first-try", help="write a small task a tiny random CLIP learns on a CPU")
    first_try.add_argument("folder", nargs="?", type=Path, default=Path("first-try"), help="(default: first-try)")
    first_try.add_argument("--train", type=int, default=160, help="training images")
    first_try.add_argument("--test", type=int, default=64, help="test images")
    commands.add_parser(
        "build-extension",
        help="build the C++/CUDA loss extension ahead of time and print what was built",
        description=BUILD_EXTENSION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


BUILD_EXTENSION = """Build the asymmetric-loss extension into torch's extension cache (TORCH_EXTENSIONS_DIR),
where every later process finds it, and print its status. The CUDA part needs a CUDA toolkit
(CUDA_HOME, or nvcc on PATH); without a GPU it is compiled for sm_90 (DUALCOOP_CUDA_ARCH=80 picks
another). Exits with 1 when the CPU part could not be built."""

STOPPED = {  # what Ctrl-C leaves, where the command has nothing more to say
    "train": "stopped",
    "cache": "stopped; the chunks written are kept: the same command finishes the cache",
    "eval": "stopped; nothing was written",
    "predict": "stopped; nothing was written",
    "report": "stopped; nothing was written",
    "explain": "stopped; the pictures written are kept",
    "export": "stopped; nothing was written",
    "first-try": "stopped; the images written are kept",
    "build-extension": "stopped; what was built is kept",
}


OUT_OF_MEMORY = {  # what to change when a command runs out of memory
    "train": "try a smaller --batch-size (a new run: --resume keeps the run's own) or --precision bf16",
    "cache": "try a smaller --batch-size",
    "predict": "try a smaller --batch-size, or --device cpu",
    "eval": "try --device cpu",
}


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def _show_log_lines(quiet: bool) -> None:
    """The package's log lines on standard error (only warnings when quiet), through tqdm's bars."""
    logger = logging.getLogger("dualcoop_kernels")
    for old in [handler for handler in logger.handlers if getattr(handler, "dualcoop_cli", False)]:
        logger.removeHandler(old)  # an earlier command's, in this process: its stream may be gone
    handler = logging.StreamHandler(sys.stderr)
    handler.dualcoop_cli = True
    handler.setFormatter(logging.Formatter("dualcoop: %(message)s"))
    handler.setLevel(logging.WARNING if quiet or _rank() != 0 else logging.INFO)
    handler.addFilter(lambda record: not getattr(record, "run_log_only", False))  # the command prints those
    logger.addHandler(handler)
    logger.propagate = False  # not again through a handler someone gave the root logger
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    from .model.loading import WeightsUnavailable

    args = _parser().parse_args(argv)
    _show_log_lines(getattr(args, "quiet", False))
    handlers = {
        "train": _train, "cache": _cache, "eval": _eval, "predict": _predict,
        "report": _report, "explain": _explain, "export": _export, "first-try": _first_try,
        "build-extension": _build_extension,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as stopped:
        print(f"dualcoop {args.command}: {str(stopped) or STOPPED[args.command]}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (| head): no traceback, no more output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, OSError, WeightsUnavailable) as error:
        if _rank() == 0:  # every rank meets a bad option; the first says it (each rank's log.txt line too)
            if os.environ.get("DUALCOOP_DEBUG") == "1":
                traceback.print_exc()
            print(f"dualcoop {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__name__ == "OutOfMemoryError":  # torch's, CUDA or not: the sizes asked for
            if os.environ.get("DUALCOOP_DEBUG") == "1":
                traceback.print_exc()
            advice = OUT_OF_MEMORY.get(args.command, "free the GPU's memory (other processes), or use a larger GPU")
            print(f"dualcoop {args.command}: error: {error_gist(error)}: {advice}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"dualcoop {args.command}: this is a bug in dualcoop_kernels {__version__}, not in what you asked: "
            "please report it with the command, the traceback above and your torch, triton and open_clip versions",
            file=sys.stderr,
        )
        return 1
