"""The ``dualcoop`` command line: train, evaluate and predict (also ``python -m dualcoop_kernels``).

    dualcoop train --preset coco --root DATA --partial 0.3 --seed 1 --out RUN
    dualcoop cache --preset coco --root DATA --out CACHE [--augment --views 4]   (then train --features CACHE)
    dualcoop eval RUN [--json]
    dualcoop predict RUN IMAGE_OR_FOLDER ... [--top-k 3] [--out predictions.csv]

Errors in what was asked (a missing file, a bad option) end the command with one line that says what is
wrong, not a traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TOP_K_COLUMNS = (("P", "precision"), ("R", "recall"), ("F1", "f1"))


def _settings_parser(commands, name: str, help: str):
    """A command that takes a run's settings: a preset, then any setting overridden."""
    from .training.config import DATASETS, PRESETS, SELECT_ON, TrainConfig

    parser = commands.add_parser(name, help=help)
    parser.add_argument("--preset", choices=list(PRESETS), help="the authors' settings for a paper's experiment")
    settings = parser.add_argument_group("settings (a preset's values, overridden by those given)")
    settings.add_argument("--dataset", choices=DATASETS)
    settings.add_argument("--root", help="the dataset's folder (csv: the training CSV file)")
    settings.add_argument("--test-root", dest="test_root", help="csv: a CSV file of test images")
    settings.add_argument("--protocol", choices=("dualcoop++", "dualcoop"))
    settings.add_argument("--partial", type=float, help="proportion of training labels known, in (0, 1]")
    settings.add_argument("--mask-seed", dest="mask_seed", type=int, help="seed of the partial-label draw")
    settings.add_argument("--mask", dest="mask_file", help="a saved mask (.npy) instead of a drawn one")
    settings.add_argument("--features", help="a feature cache of the training split (dualcoop cache)")
    settings.add_argument("--zero-shot", dest="zero_shot", action="store_const", const=True)
    settings.add_argument("--bigearthnet-classes", dest="bigearthnet_classes", type=int, choices=(19, 43))
    settings.add_argument(
        "--rgb-max", dest="rgb_max", type=float, help="BigEarthNet: reflectance (x 10,000) shown as 255"
    )
    settings.add_argument("--clip", help="open_clip model name or model config (.json)")
    settings.add_argument("--pretrained", help="open_clip tag, checkpoint file, or 'none' for random weights")
    settings.add_argument("--image-size", dest="image_size", type=int)
    settings.add_argument("--n-ctx", dest="n_ctx", type=int)
    settings.add_argument("--shared-contexts", dest="csc", action="store_const", const=False)
    settings.add_argument("--wta", choices=("pos_norm", "pos_softmax", "pos200", "none"))
    settings.add_argument("--epochs", type=int)
    settings.add_argument("--batch-size", dest="batch_size", type=int)
    settings.add_argument("--lr", type=float)
    settings.add_argument("--loss-weight", dest="loss_weight", type=float)
    settings.add_argument("--val-fraction", dest="val_fraction", type=float)
    settings.add_argument("--select-on", dest="select_on", choices=SELECT_ON)
    settings.add_argument("--seed", type=int)
    settings.add_argument("--workers", type=int)
    settings.add_argument("--device")
    settings.add_argument("--precision", choices=("fp32", "tf32", "bf16"), help="of the encoders (default fp32)")
    settings.add_argument("--compile-text", dest="compile_text", action="store_const", const=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = {item.name: item.default for item in dataclasses.fields(TrainConfig)}
    for action in settings._group_actions:  # show what a setting is when neither preset nor option sets it
        if action.dest in defaults:
            action.help = f"{action.help or ''} (default: {defaults[action.dest]})".strip()
    return parser


def _train_parser(commands) -> None:
    parser = _settings_parser(commands, "train", "train prompts on a dataset, pick the best epoch, evaluate it")
    parser.add_argument("--out", required=True, type=Path, help="the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def _cache_parser(commands) -> None:
    parser = _settings_parser(commands, "cache", "store the frozen image encoder's features of the training split")
    parser.add_argument("--out", required=True, type=Path, help="the cache folder (a rerun finishes it)")
    parser.add_argument("--views", type=int, default=1, help="augmented views per image (needs --augment)")
    parser.add_argument("--augment", action="store_true", help="the training augmentation (else the test transform)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")


SETTINGS = [
    "dataset",
    "root",
    "test_root",
    "protocol",
    "partial",
    "mask_seed",
    "mask_file",
    "features",
    "zero_shot",
    "bigearthnet_classes",
    "rgb_max",
    "clip",
    "pretrained",
    "image_size",
    "n_ctx",
    "csc",
    "wta",
    "epochs",
    "batch_size",
    "lr",
    "loss_weight",
    "val_fraction",
    "select_on",
    "seed",
    "workers",
    "device",
    "precision",
    "compile_text",
]


def _train(args) -> int:
    from .training import TrainConfig, train

    if args.resume:
        from .training.trainer import RUNTIME_SETTINGS

        given = [name for name in SETTINGS if getattr(args, name) is not None and name not in RUNTIME_SETTINGS]
        if given or args.preset:
            raise ValueError(
                f"--resume continues {args.out} as configured (only --workers and --device may change); "
                f"drop {given or ['--preset']}"
            )
        config = TrainConfig.load(args.out / "config.json")
        for name in RUNTIME_SETTINGS:
            if getattr(args, name) is not None:
                setattr(config, name, getattr(args, name))
    else:
        config = _config_from(args)
    results = train(config, args.out, resume=args.resume, show_progress=not args.quiet)
    print(_summary(results))
    return 0


PATH_SETTINGS = ("root", "test_root", "mask_file", "features", "clip", "pretrained")


def _config_from(args):
    """The run's settings: the preset's, then those given; paths made absolute, so that the run
    folder's config.json works from any working folder."""
    from .training import TrainConfig, preset_config

    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    for name in PATH_SETTINGS:
        if name in given and (name not in ("clip", "pretrained") or Path(given[name]).exists()):
            given[name] = str(Path(given[name]).resolve())
    if "root" not in given:
        raise ValueError("--root is needed: the dataset's folder (for --dataset csv, the CSV file)")
    return TrainConfig(**{**(preset_config(args.preset) if args.preset else {}), **given})


def _cache(args) -> int:
    from tqdm.auto import tqdm

    from .training import build_model, distributed
    from .training.cache import extract
    from .training.datasets import training_split
    from .training.trainer import resolve_device

    config = _config_from(args)
    dataset = training_split(config)
    ranks, device = distributed.start(resolve_device(config.device))
    model = build_model(config, dataset.classnames).to(device)
    progress = None if args.quiet or not ranks.main else tqdm
    options = dict(views=args.views, augment=args.augment, dtype=args.dtype, device=device, ranks=ranks)
    extract(config, model, dataset, args.out, **options, progress=progress)
    distributed.stop(ranks)
    if ranks.main:
        print(f"dualcoop cache: {args.out} is complete; train with --features {args.out}")
    return 0


def _load_run(run: Path, device: str | None):
    from .training import TrainConfig, build_model
    from .training.checkpoint import load_torch_file
    from .training.trainer import resolve_device

    config = TrainConfig.load(run / "config.json")
    if device:
        config.device = device
    best = load_torch_file(run / "prompts.pt", "learned prompts", weights_only=True)
    resolved = resolve_device(config.device)
    model = build_model(config, best["classnames"]).to(resolved)
    model.load_prompt_state_dict(best["prompts"])
    return config, model.eval(), resolved


def _eval(args) -> int:
    from .training.datasets import load_run_data
    from .training.trainer import evaluate_split

    config, model, device = _load_run(args.run, args.device)
    if args.workers is not None:
        config.workers = args.workers
    data = load_run_data(config, None)
    sets = dict(data.tests)
    if data.validation is not None:
        sets["val"] = data.validation
    chosen = args.split or [name for name in sets if name != "val"] or ["val"]
    unknown = [name for name in chosen if name not in sets]
    if unknown:
        raise ValueError(f"--split {unknown[0]!r}: this run's splits are {sorted(sets)}")
    results = {name: evaluate_split(model, sets[name], config, device) for name in chosen}
    print(json.dumps(results, indent=2) if args.json else _summary(results))
    return 0


def _summary(results: dict) -> str:
    """A readable table: one row per evaluated split."""
    columns = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    lines = []
    for name, metrics in results.items():
        if not isinstance(metrics, dict) or "mAP" not in metrics:
            lines.append(f"{name}: {metrics}")
            continue
        row = "  ".join(f"{column} {metrics[column]:6.2f}" for column in columns)
        top = metrics.get("top_k")
        if top:
            row += "".join(f"  {label}@{top['k']} {top[key]:6.2f}" for label, key in TOP_K_COLUMNS)
        lines.append(f"{name:>6}  {row}")
    return "\n".join(lines)


def _images(paths: list[str]) -> list[Path]:
    found = []
    for given in map(Path, paths):
        if given.is_dir():
            found += sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif given.is_file():
            found.append(given)
        else:
            raise FileNotFoundError(f"{given} is neither an image file nor a folder")
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {paths}")
    return found


def _class_list(given: str) -> list[str]:
    """``--classes``: names separated by commas, or the path of a file with one name a line."""
    path = Path(given)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in given.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--classes {given!r} names no class (give names separated by commas, or a file of names)")
    return names


def _open_vocabulary(model, config, given: str):
    """The run's learned contexts around other class names: only contexts shared by all classes
    (zero-shot training, --shared-contexts) can describe a class they were not trained on."""
    from .training.trainer import model_for

    if config.csc:
        raise ValueError(
            "--classes needs a run trained with contexts shared by all classes (--zero-shot or "
            "--shared-contexts); this run learned class-specific contexts, which exist only for its own classes"
        )
    return model_for(model, config, _class_list(given)).eval()


def _predict(args) -> int:
    import torch

    from ._atomic import atomic_write_text
    from .data import load_image
    from .data.transforms import test_transform
    from .metrics import ranking_scores

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    config, model, device = _load_run(args.run, args.device)
    if args.classes is not None:
        model = _open_vocabulary(model, config, args.classes)
    classnames = model.prompts.classnames
    if args.top_k is not None and not 1 <= args.top_k <= len(classnames):
        raise ValueError(f"--top-k must be from 1 to the {len(classnames)} classes, got {args.top_k}")
    transform = test_transform(config.image_size, config.protocol)
    paths = _images(args.images)
    if args.top_k is None:
        rows = [["image", *classnames]]
    else:
        ranks = range(1, args.top_k + 1)
        rows = [["image", *[f"{kind}_{rank}" for rank in ranks for kind in ("class", "probability")]]]
    with torch.no_grad():
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            images = torch.stack([transform(load_image(path, "predict")) for path in chunk]).to(device)
            probabilities = torch.sigmoid(ranking_scores(model(images).float())).cpu()
            for path, row in zip(chunk, probabilities):
                if args.top_k is None:
                    rows.append([str(path), *(f"{value:.6f}" for value in row.tolist())])
                else:
                    best = row.topk(args.top_k)
                    pairs = zip(best.indices.tolist(), best.values.tolist())
                    rows.append([str(path), *(cell for i, v in pairs for cell in (classnames[i], f"{v:.6f}"))])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    if args.out:
        atomic_write_text(Path(args.out), text.getvalue())
    else:
        sys.stdout.write(text.getvalue())
    return 0


def main(argv=None) -> int:
    from .model.loading import WeightsUnavailable

    parser = argparse.ArgumentParser(
        prog="dualcoop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _train_parser(commands)
    _cache_parser(commands)
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
        "--classes", help="score these class names instead (comma-separated, or a file of names; shared-context runs)"
    )
    predict.add_argument("--out", help="CSV file to write (default: standard output)")
    predict.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    predict.add_argument("--device")
    args = parser.parse_args(argv)
    handlers = {"train": _train, "cache": _cache, "eval": _eval, "predict": _predict}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as stopped:
        print(f"dualcoop: {stopped}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, WeightsUnavailable) as error:
        print(f"dualcoop {args.command}: error: {error}", file=sys.stderr)
        return 2
