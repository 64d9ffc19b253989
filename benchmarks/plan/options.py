"""The runner's options: the command line (``build_parser``), every check made before any data is loaded
(``validate``), and the options it resolves to (:class:`Options`, with the per-dataset defaults applied)."""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

_DEFAULT_FIELDS = (
    "trunk",
    "embedding_size",
    "batch_size",
    "m_per_class",
    "epochs",
    "iterations_per_epoch",
    "lr",
    "weight_decay",
    "seeds",
    "eval_every",
    "eval_batch_size",
)
# one row per dataset, in the order of _DEFAULT_FIELDS; the three image benchmarks of the DML papers share one
# ImageNet-pretrained ResNet-50 setting (SOP: 2 images per class, longer epochs)
_DEFAULT_ROWS: dict[str, tuple[Any, ...]] = {
    "digits": ("mlp", 32, 64, 8, 10, 20, 1e-3, 0.0, 5, 2, 1024),
    "omniglot": ("convnet-small", 64, 64, 4, 8, 100, 1e-3, 0.0, 5, 2, 512),
    "fashion-mnist": ("convnet", 64, 128, 16, 5, 200, 1e-3, 0.0, 3, 1, 1024),
    "cub200": ("resnet50", 512, 120, 4, 40, 100, 1e-5, 1e-4, 3, 5, 256),
    "cars196": ("resnet50", 512, 120, 4, 40, 100, 1e-5, 1e-4, 3, 5, 256),
    "sop": ("resnet50", 512, 120, 2, 40, 500, 1e-5, 1e-4, 3, 10, 256),
    "folder": ("resnet50", 512, 120, 4, 40, 100, 1e-5, 1e-4, 3, 5, 256),
    "csv": ("resnet50", 512, 120, 4, 40, 100, 1e-5, 1e-4, 3, 5, 256),
}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(zip(_DEFAULT_FIELDS, row)) for name, row in _DEFAULT_ROWS.items()
}


def _defaults_help() -> str:
    lines = ["per-dataset defaults (any option given on the command line overrides them):"]
    for name, d in DATASET_DEFAULTS.items():
        lines.append(
            f"  {name:<14} trunk={d['trunk']}, embedding={d['embedding_size']}, batch={d['batch_size']} "
            f"({d['batch_size'] // d['m_per_class']} classes x {d['m_per_class']}), "
            f"{d['epochs']} epochs x {d['iterations_per_epoch']} iterations, Adam lr={d['lr']:g} "
            f"wd={d['weight_decay']:g}, seeds 0..{d['seeds'] - 1}, test curve every {d['eval_every']} epochs"
        )
    return "\n".join(lines)


PROG = "python -m benchmarks.run"  # how the command was started (pml-rll-bench: cli())
SEED_MAX = 2**31 - 1 - 40_000  # the pipeline derives seeds up to seed + 30_011
SEEDS_MAX = 10_000  # seeds in one command
# upper bounds of the numeric options (said in --help): beyond them a run would exhaust memory or never end
UPPER: dict[str, int | float] = {
    "epochs": 100_000,
    "iterations_per_epoch": 10_000_000,
    "batch_size": 65_536,
    "m_per_class": 65_536,
    "embedding_size": 65_536,
    "eval_batch_size": 65_536,
    "eval_every": 100_000,
    "image_size": 4096,
    "jobs": 256,
    "threads": 1024,
    "workers": 256,
    "trials": 100_000,
    "folds": 100,
    "cross_batch_memory": 1_048_576,
    "lease": 86_400.0,
}
CROSS_BATCH_FLOATS_MAX = 2**30  # --cross-batch-memory x --embedding-size (4 GiB of float32)
TRUNKS = ("mlp", "convnet", "convnet-small", "resnet18", "resnet50")
NEEDS_ROOT = ("omniglot", "cub200", "cars196", "sop", "folder", "csv")
TPE_STARTUP_TRIALS = 4  # trials before TPE models the results: trial 0 (the defaults) and 3 random draws


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is in ``--help``) that name the closest valid choice or option."""

    def error(self, message: str) -> NoReturn:
        from ..core.common import did_you_mean

        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            message += did_you_mean(bad.group(1), re.findall(r"'([^']*)'", bad.group(2)))
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for o in self._option_string_actions if o.startswith("--")]
            for token in unknown.group(1).split():
                if token.startswith("-"):
                    message += did_you_mean(token.split("=")[0], options)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The runner's command line; ``prog`` names the command in messages."""
    from ..data.bundle import DATA_ENV

    p = ArgumentParser(
        prog=prog,
        usage="%(prog)s [options]   (every option: --help; the losses: --list)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Benchmark pml_rll's RankedListLoss and NAMR head to head against PML's losses.\n"
            "Every loss gets the same data, trunk + embedder, Adam optimizer, MPerClassSampler batches, budget and\n"
            "evaluation (GlobalEmbeddingSpaceTester + AccuracyCalculator: P@1, Recall@1/2/4/8 as in the DML papers,\n"
            "MAP@R, R-precision, NMI). Seeds are paired: at a given seed every loss starts from the same weights and\n"
            "sees the same batches and augmentations. Numbers are those of the last epoch (the test split is never\n"
            "used for model selection). With --tune every loss first gets the same number of Optuna TPE trials on\n"
            "class-disjoint folds of the training classes (A Metric Learning Reality Check, ECCV 2020).\n"
            "Results are stored per (key, seed), the key covering everything that decides a result; finished runs\n"
            "are never redone or duplicated, and several runners may share one store."
        ),
        epilog=_defaults_help() + "\n\ndatasets:\n"
        "  digits         scikit-learn digits, within-class 70/30 split (no download; a smoke test, not a ranking)\n"
        "  omniglot       unseen characters, split by alphabet; --data-root: folder or zips of\n"
        f"                 alphabet/character/*.png (required, or ${DATA_ENV}/omniglot); images resized to\n"
        "                 --image-size (28)\n"
        "  fashion-mnist  IDX files: Debian dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or a\n"
        "                 torchvision FashionMNIST root via --data-root\n"
        "  cub200, cars196, sop   PML's dataset classes under --data-root (--download fetches them); ResNet-50 with\n"
        "                 ImageNet weights when loadable, RandomResizedCrop(224) + flip\n"
        "  folder, csv    your images: DIR/<class>/<image> or a CSV file (docs/own_data.md)\n"
        "\nThe losses, their defaults, search spaces and sources: --list.",
    )
    _add_data_options(p)
    _add_model_options(p)
    _add_training_options(p)
    _add_process_options(p)
    _add_tuning_and_store_options(p)
    _add_output_options(p)
    for action in p._actions:
        if action.dest in UPPER and action.help:
            action.help += f" (at most {UPPER[action.dest]:g})"
        elif action.dest == "seeds" and action.help:
            action.help += f" (at most {SEEDS_MAX} seeds, each in 0..{SEED_MAX})"
    return p


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """The dataset and what to run on it."""
    from ..data.bundle import DATA_ENV
    from ..data.load import DATASETS

    p.add_argument("--dataset", default="digits", choices=DATASETS, help="benchmark protocol (default: digits)")
    p.add_argument(
        "--data-root",
        default=None,
        help=f"dataset folder (omniglot, fashion-mnist, cub200, cars196, sop; default ${DATA_ENV}/<dataset>)",
    )
    p.add_argument("--download", action="store_true", help="let PML download cub200/cars196/sop into --data-root")
    p.add_argument(
        "--losses", default="all", help="comma-separated registry names, or all / ours / pml (default: all; see --list)"
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="number of paired seeds N (seeds 0..N-1) or a comma list like 0,3,7 (default: per dataset)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The training budget, the trunk and the evaluation's precision."""
    from ..results.knn import KNN_METHODS, knn_argument

    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset)")
    p.add_argument("--iterations-per-epoch", type=int, default=None, help="iterations per epoch (default: per dataset)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: per dataset)")
    p.add_argument(
        "--m-per-class",
        "--images-per-class",
        dest="m_per_class",
        type=int,
        default=None,
        help="images per class in a batch, MPerClassSampler's m (default: per dataset)",
    )
    p.add_argument("--embedding-size", type=int, default=None, help="embedding width (default: per dataset)")
    p.add_argument(
        "--trunk",
        default=None,
        help="mlp, convnet(-small), resnet18/50, a torchvision model or timm:<model> (default: per dataset)",
    )
    p.add_argument("--no-pretrained", action="store_true", help="ResNet/torchvision trunks: no ImageNet weights")
    p.add_argument("--trunk-weights", default=None, metavar="FILE", help="a local trunk checkpoint (state_dict)")
    p.add_argument("--freeze-bn", action="store_true", help="the trunk's BatchNorm layers stay in eval mode")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], metavar="off|bf16|fp16", help="autocast")
    p.add_argument("--knn", default="exact", type=knn_argument, metavar="M[:K=V,..]", help="|".join(KNN_METHODS))
    p.add_argument("--eval-precision", default="float32", choices=["float32", "float16"], metavar="float32|float16")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The optimizer, the schedule and the evaluation."""
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate for trunk and embedder")
    p.add_argument("--weight-decay", type=float, default=None, help="Adam weight decay")
    p.add_argument(
        "--schedule",
        default="constant",
        choices=["constant", "cosine"],
        help="learning-rate schedule over all iterations (default: constant)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="evaluate the test split every N epochs for the learning curves, plus before training "
        "(0: only after the last epoch). Never used for model selection",
    )
    p.add_argument("--eval-batch-size", type=int, default=None, help="tester batch size")
    p.add_argument("--image-size", type=int, default=None, help="omniglot: side in pixels (28); RGB: crop size (224)")
    p.add_argument("--test-alphabets", default=None, help="omniglot: comma list of test alphabets (default: auto)")
    p.add_argument("--test-classes", default=None, metavar="FILE", help="folder: a file naming the test classes")


def _add_process_options(p: argparse.ArgumentParser) -> None:
    """The device and the processes."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per run (0: auto = 1 on CPU, where these small models gain little from "
        "intra-op threads and lose a lot on a shared machine; torch's default with CUDA)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes (default 1)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loader workers (default: 0 for in-memory datasets, 4 for image folders)",
    )


def _add_tuning_and_store_options(p: argparse.ArgumentParser) -> None:
    """Own losses and settings, tuning, and the results store."""
    g = p.add_argument_group("your own losses and settings")
    g.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="NAME.PARAM=VALUE",
        help="override one hyper-parameter (repeatable), e.g. --set rll.Tn=20 --set multi-similarity.beta=40; "
        "the value is TOML (numbers, true/false, quoted strings); a bare word is a string",
    )
    g.add_argument("--config", default=None, help="TOML file adding or changing [losses.<name>] entries (README)")
    g = p.add_argument_group("tuning (A Metric Learning Reality Check, ECCV 2020)")
    g.add_argument(
        "--tune",
        action="store_true",
        help="tune every selected loss with the same number of TPE trials on class-disjoint folds of the training "
        "classes, then train the best configuration on all training classes with the paired seeds and test once; "
        "the untuned runs are made too, for the side-by-side table",
    )
    g.add_argument("--trials", type=int, default=10, help="trials per loss (default 10)")
    g.add_argument(
        "--folds", type=int, default=2, help="class-disjoint folds of the training classes (default 2; >= 2)"
    )
    g = p.add_argument_group("results store")
    g.add_argument("--out", default=None, help="output folder (default: results/<dataset>)")
    g.add_argument(
        "--storage",
        default=None,
        help="SQLAlchemy database URL of the results store and the tuning studies, shared by every runner that "
        "names it (default: sqlite:///<out>/results.db)",
    )
    g.add_argument(
        "--lease",
        type=float,
        default=120.0,
        help="seconds without a heartbeat after which another runner takes a claimed run over (default 120)",
    )
    g.add_argument(
        "--no-resume", action="store_true", help="redo and replace the records this command would otherwise reuse"
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """What each run writes besides its record, the cross-batch memory, and --list."""
    p.add_argument("--tensorboard", action="store_true", help="also write tensorboard event files per run")
    p.add_argument("--save-models", action="store_true", help="save the models of every epoch (PML preset)")
    p.add_argument(
        "--cross-batch-memory",
        type=int,
        default=0,
        metavar="SIZE",
        help="train through a cross-batch memory of SIZE embeddings (at least one batch); under torchrun every "
        "process fills it with the gathered global batch. Losses it cannot wrap are skipped (default 0: off)",
    )
    p.add_argument("--list", action="store_true", help="print the loss registry (after --config/--set) and exit")


def parse_seeds(spec: str | None, default_n: int) -> list[int]:
    """``N`` (seeds 0..N-1) or a comma list; ValueError naming --seeds for bad, repeated or out-of-range seeds."""
    if spec is None:
        return list(range(default_n))
    spec = spec.strip()
    try:
        if "," in spec:
            parts = [s.strip() for s in spec.split(",")]
            if len(parts) > SEEDS_MAX:
                raise ValueError(f"--seeds: {len(parts)} seeds, at most {SEEDS_MAX}")
            seeds = [int(s) for s in parts]  # an empty part fails here too
        else:
            n = int(spec)
            if n > SEEDS_MAX:
                raise ValueError(f"--seeds {spec}: at most {SEEDS_MAX} seeds")
            seeds = list(range(max(n, 0)))
    except ValueError as e:
        if str(e).startswith("--seeds"):
            raise
        raise ValueError(f"--seeds {spec!r}: expected a count N or a comma list of integers") from None
    if not seeds:
        raise ValueError(f"--seeds {spec}: the number of seeds must be >= 1")
    counts = collections.Counter(seeds)
    repeated = sorted(s for s, c in counts.items() if c > 1)
    if repeated:
        raise ValueError(f"--seeds {spec}: seeds {repeated} repeated (each seed once)")
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise ValueError(f"--seeds {spec}: seeds {bad} outside 0..{SEED_MAX}")
    return seeds


def resolve_losses(spec: str, entries: dict) -> list[str]:
    from ..core.common import closest

    spec = spec.strip()
    if spec == "all":
        return list(entries)
    if spec in ("ours", "pml", "user"):
        names = [n for n, e in entries.items() if e.family == spec]
        if not names:
            raise ValueError(f"--losses {spec}: no entry of family {spec!r}")
        return names
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    if not chosen:
        raise ValueError(f"--losses {spec!r}: no loss named")
    unknown = [n for n in chosen if n not in entries]
    if unknown:
        close = [repr(m) for m in (closest(n, entries) for n in unknown) if m]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"--losses: unknown names {unknown}{hint}; registered: {', '.join(entries)}")
    repeated = sorted({n for n in chosen if chosen.count(n) > 1})
    if repeated:
        raise ValueError(f"--losses: {repeated} named twice")
    return chosen


def _check_out(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out_dir}: not a writable folder ({e.strerror})") from None


class OptionError(ValueError):
    """A bad option, with the message that names it (``validate`` hands it to ``parser.error``: exit code 2)."""


@dataclass(frozen=True)
class Options:
    """The runner's options once checked, with the per-dataset defaults applied (what :func:`validate` returns)."""

    dataset: str
    data_root: str | None  # as given: None lets the loaders read $PML_RLL_DATA themselves (and name it so)
    download: bool
    image_size: int | None
    test_alphabets: tuple[str, ...] | None
    test_classes: str | None
    cfg: Any  # benchmarks.pipeline.RunConfig: everything that decides a run's result but the loss and the seed
    seeds: tuple[int, ...]
    registry: Any  # benchmarks.config.Registry: the entries after --config and --set
    loss_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (loss, why): losses the cross-batch memory cannot wrap
    device_arg: str  # --device, resolved per process by benchmarks.distributed.setup
    out_dir: str
    storage: str  # the results store's database URL (--storage, or SQLite in --out)
    lease: float
    no_resume: bool
    tune: bool
    trials: int
    folds: int
    jobs: int
    threads: int
    workers: int | None
    tensorboard: bool
    save_models: bool
    config: str | None  # --config: its folder is where its own loss modules are imported from


class _Defaults:
    """An option's value on the command line, else the dataset's default."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.row = args, DATASET_DEFAULTS[args.dataset]

    def __call__(self, name: str) -> Any:
        v = getattr(self.args, name)
        return self.row[name] if v is None else v


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    """Check every option before any data is loaded; ``parser.error`` (exit 2) names the first bad one."""
    try:
        return _validate(args)
    except OptionError as e:
        parser.error(str(e))


def _validate(args: argparse.Namespace) -> Options:
    from ..execute import distributed

    pick = _Defaults(args)
    _check_numbers(args, pick)
    world = distributed.launch_world_size()
    _check_processes(args, pick, world)
    _check_inputs(args, pick)
    weights_sha1 = _check_files(args)
    seeds = _wrap(parse_seeds, args.seeds, pick.row["seeds"])
    registry = _wrap(_registry, args)
    loss_names = _wrap(resolve_losses, args.losses, registry.entries)
    skipped = _check_losses(args, pick, registry, loss_names, world=world)
    _check_device(args)
    _check_data_root(args)
    out_dir = args.out or os.path.join("results", args.dataset)
    storage = _check_out_and_storage(args, out_dir)
    return Options(
        dataset=args.dataset,
        data_root=args.data_root,
        download=args.download,
        image_size=args.image_size,
        test_alphabets=_alphabets(args.test_alphabets),
        test_classes=args.test_classes,
        cfg=_run_config(args, pick, weights_sha1),
        seeds=tuple(seeds),
        registry=registry,
        loss_names=tuple(loss_names),
        skipped=tuple(skipped),
        device_arg=args.device,
        out_dir=out_dir,
        storage=storage,
        lease=args.lease,
        no_resume=args.no_resume,
        tune=args.tune,
        trials=args.trials,
        folds=args.folds,
        jobs=args.jobs,
        threads=args.threads,
        workers=args.workers,
        tensorboard=args.tensorboard,
        save_models=args.save_models,
        config=args.config,
    )


def _wrap(fn: Callable[..., Any], *a: Any) -> Any:
    """``fn(*a)``, its ValueError an :class:`OptionError`."""
    try:
        return fn(*a)
    except ValueError as e:
        raise OptionError(str(e)) from None


def _registry(args: argparse.Namespace) -> Any:
    from ..losses.config import build_registry

    return build_registry(args.config, args.sets)


def _alphabets(spec: str | None) -> tuple[str, ...] | None:
    return tuple(a.strip() for a in spec.split(",") if a.strip()) if spec else None


def _check_range(opt: str, value: Any, lo: int, hi: int | float) -> None:
    if value < lo:
        raise OptionError(f"{opt} must be >= {lo}, got {value}")
    if value > hi:
        raise OptionError(f"{opt} must be <= {hi}, got {value}")


def _check_numbers(args: argparse.Namespace, pick: _Defaults) -> None:
    """The numeric options in their ranges."""
    for opt, name, lo in (
        ("--epochs", "epochs", 1),
        ("--iterations-per-epoch", "iterations_per_epoch", 1),
        ("--batch-size", "batch_size", 1),
        ("--m-per-class", "m_per_class", 1),
        ("--embedding-size", "embedding_size", 1),
        ("--eval-batch-size", "eval_batch_size", 1),
        ("--eval-every", "eval_every", 0),
    ):
        _check_range(opt, pick(name), lo, UPPER[name])
    for opt, v, lo in (
        ("--jobs", args.jobs, 1),
        ("--threads", args.threads, 0),
        ("--trials", args.trials, 1),
        ("--folds", args.folds, 2),
    ):
        _check_range(opt, v, lo, UPPER[opt[2:]])
    if args.workers is not None and not 0 <= args.workers <= UPPER["workers"]:
        raise OptionError(f"--workers must be in 0..{UPPER['workers']}, got {args.workers}")
    if args.image_size is not None and not 1 <= args.image_size <= UPPER["image_size"]:
        raise OptionError(f"--image-size must be in 1..{UPPER['image_size']}, got {args.image_size}")
    lr, wd = pick("lr"), pick("weight_decay")
    if not (math.isfinite(lr) and lr > 0):
        raise OptionError(f"--lr must be a positive number, got {lr}")
    if not (math.isfinite(wd) and wd >= 0):
        raise OptionError(f"--weight-decay must be a number >= 0, got {wd}")
    if not (math.isfinite(args.lease) and 0 < args.lease <= UPPER["lease"]):
        raise OptionError(f"--lease must be > 0 and <= {UPPER['lease']:g} seconds, got {args.lease}")
    if pick("batch_size") % pick("m_per_class"):
        raise OptionError(
            f"--batch-size {pick('batch_size')} must be a multiple of --m-per-class {pick('m_per_class')}"
        )


def _check_processes(args: argparse.Namespace, pick: _Defaults, world: int) -> None:
    """torchrun against --jobs and the batch, and the cross-batch memory's size."""
    batch, memory = pick("batch_size"), args.cross_batch_memory
    if world > 1 and args.jobs > 1:
        raise OptionError("--jobs > 1 cannot be combined with torchrun: each run already uses every process")
    if batch % world:
        raise OptionError(f"--batch-size {batch} must be a multiple of the {world} processes started by torchrun")
    if memory < 0:
        raise OptionError(f"--cross-batch-memory must be >= 0, got {memory}")
    if 0 < memory < batch:
        raise OptionError(f"--cross-batch-memory {memory} must hold one batch ({batch})")
    if memory > UPPER["cross_batch_memory"]:
        raise OptionError(f"--cross-batch-memory must be <= {UPPER['cross_batch_memory']}, got {memory}")
    if memory * pick("embedding_size") > CROSS_BATCH_FLOATS_MAX:
        raise OptionError(
            f"--cross-batch-memory {memory} x --embedding-size {pick('embedding_size')}: more than "
            f"{CROSS_BATCH_FLOATS_MAX} numbers ({CROSS_BATCH_FLOATS_MAX * 4 // 2**30} GiB) in the memory"
        )


def _check_inputs(args: argparse.Namespace, pick: _Defaults) -> None:
    """The dataset-specific options, the trunk's name and the neighbour search."""
    from ..execute.trunks import check_trunk_name

    if args.test_alphabets is not None:
        if args.dataset != "omniglot":
            raise OptionError("--test-alphabets applies to --dataset omniglot only")
        if not [a for a in args.test_alphabets.split(",") if a.strip()]:
            raise OptionError(f"--test-alphabets {args.test_alphabets!r}: no alphabet named")
    why = check_trunk_name(pick("trunk"))
    if why:
        raise OptionError(why)


def _check_files(args: argparse.Namespace) -> str | None:
    """--trunk-weights, --knn and --test-classes; the checkpoint's content hash (a changed file is a new
    configuration)."""
    from ..execute.trunks import file_sha1

    weights_sha1 = None
    if args.trunk_weights is not None:
        if not os.path.isfile(args.trunk_weights):
            raise OptionError(f"--trunk-weights {args.trunk_weights}: not a file")
        weights_sha1 = file_sha1(args.trunk_weights)
    if args.knn.startswith("faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise OptionError(f"--knn {args.knn} needs faiss (the cpu or gpu extra)") from None
    if args.test_classes is not None:
        if args.dataset != "folder":
            raise OptionError("--test-classes applies to --dataset folder only")
        if not os.path.isfile(args.test_classes):
            raise OptionError(f"--test-classes {args.test_classes}: not a file")
    return weights_sha1


def _check_losses(
    args: argparse.Namespace, pick: _Defaults, registry: Any, loss_names: list[str], *, world: int
) -> list[tuple[str, str]]:
    """Build every selected loss and call it on a small batch; drop (and return, with the reason) the losses the
    cross-batch memory cannot wrap."""
    from ..execute import distributed
    from ..losses.registry import BuildContext

    n_batch_classes = pick("batch_size") // pick("m_per_class")
    ctx = BuildContext(num_classes=max(2, n_batch_classes), embedding_size=pick("embedding_size"))
    for n in loss_names:  # a dry run: bad --set values and --config kwargs fail here, not after loading data
        _dry_run(args, registry, n, ctx)
    skipped: list[tuple[str, str]] = []
    if args.cross_batch_memory:  # losses the memory cannot wrap are skipped, with the reason printed
        for n in list(loss_names):
            ok, why = distributed.cross_batch_support(
                registry.entries[n], registry.overrides.get(n), ctx.num_classes, ctx.embedding_size, world
            )
            if not ok:
                loss_names.remove(n)
                skipped.append((n, why))
        if not loss_names:
            raise OptionError(
                f"--cross-batch-memory: no selected loss can be wrapped ({'; '.join(w for _, w in skipped)})"
            )
    if args.tune:
        untunable = [n for n in loss_names if not registry.entries[n].search_space()]
        if untunable:
            print(f"note: {untunable} have no search space; --tune reports them untuned", file=sys.stderr)
    return skipped


def _dry_run(args: argparse.Namespace, registry: Any, name: str, ctx: Any) -> None:
    """Build the entry ``name`` and call it on a small random batch; an :class:`OptionError` names where it came
    from (--set, --config or the registry)."""
    from ..losses.registry import REGISTRY

    by_config = registry.entries[name] is not REGISTRY.get(name)  # added or changed by --config
    src = "--set" if name in registry.overrides else (f"--config {args.config}" if by_config else "registry")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = registry.entries[name].build(ctx, registry.overrides.get(name))
    except Exception as e:  # noqa: BLE001 - whatever a user's class raises, the entry is refused
        raise OptionError(
            f"{src}: loss {name!r} cannot be built with these hyper-parameters: {type(e).__name__}: {e}"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dry_forward(spec, ctx)
    except Exception as e:  # noqa: BLE001 - as above
        raise OptionError(f"{src}: loss {name!r} fails on a small random batch: {type(e).__name__}: {e}") from None


def _check_device(args: argparse.Namespace) -> None:
    """The device this process trains on, and --amp on it."""
    from ..execute import distributed

    try:
        device = distributed.process_device(args.device)  # under torchrun: the GPU of LOCAL_RANK
    except ValueError as e:
        raise OptionError(str(e)) from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise OptionError(f"--device {args.device}: runs train on cpu, cuda, mps or xpu, not {device.type}")
    if args.amp == "fp16" and device.type != "cuda":
        raise OptionError(f"--amp fp16 needs a CUDA device (--device is {device}); use --amp bf16 on the CPU")


def _check_data_root(args: argparse.Namespace) -> None:
    """The dataset's folder or file exists (or may be downloaded)."""
    from ..data.bundle import DATA_ENV, default_data_root

    own = args.dataset in ("folder", "csv")  # your own data: never looked for under $PML_RLL_DATA
    data_root = args.data_root or (None if own else default_data_root(args.dataset))
    if own and not data_root:
        what = "a folder <class>/<image>" if args.dataset == "folder" else "a CSV file"
        raise OptionError(f"--data-root is required for {args.dataset} ({what})")
    if args.dataset in NEEDS_ROOT and not data_root:
        raise OptionError(
            f"--data-root is required for {args.dataset} (or set {DATA_ENV} to a folder holding {args.dataset}/)"
        )
    if data_root and not args.download and not os.path.exists(data_root):
        raise OptionError(f"--data-root {data_root}: does not exist")
    if args.dataset == "folder" and not os.path.isdir(str(data_root)):
        raise OptionError(f"--data-root {data_root}: --dataset folder needs a folder laid out <class>/<image>")
    if args.dataset == "csv" and not os.path.isfile(str(data_root)):
        raise OptionError(
            f"--data-root {data_root}: --dataset csv needs a CSV file (path,label,split[,is_query,is_gallery])"
        )


def _check_out_and_storage(args: argparse.Namespace, out_dir: str) -> str:
    """A writable --out (on rank 0) and a parseable --storage URL; the results store's URL."""
    from ..results.store import mask_url

    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes (the folder may be on its node only)
        _wrap(_check_out, out_dir)
    storage = args.storage or "sqlite:///" + os.path.join(os.path.abspath(out_dir), "results.db")
    try:
        import sqlalchemy

        sqlalchemy.engine.make_url(storage)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad option
        raise OptionError(f"--storage {mask_url(storage)!r}: not a database URL ({type(e).__name__})") from None
    jsonl = os.path.join(out_dir, "results.jsonl")
    if args.storage is None and not os.path.exists(os.path.join(out_dir, "results.db")) and os.path.exists(jsonl):
        if os.path.getsize(jsonl) > 0:  # results of a runner that kept them in results.jsonl only
            raise OptionError(
                f"--out {out_dir}: holds a results.jsonl but no results.db (results kept outside a results store); "
                "this command would overwrite it: move it away or choose another --out"
            )
    return storage


def _run_config(args: argparse.Namespace, pick: _Defaults, weights_sha1: str | None) -> Any:
    from ..execute.pipeline import RunConfig

    return RunConfig(
        dataset=args.dataset,
        trunk=pick("trunk"),
        embedding_size=pick("embedding_size"),
        batch_size=pick("batch_size"),
        m_per_class=pick("m_per_class"),
        epochs=pick("epochs"),
        iterations_per_epoch=pick("iterations_per_epoch"),
        lr=pick("lr"),
        weight_decay=pick("weight_decay"),
        schedule=args.schedule,
        eval_every=pick("eval_every"),
        eval_batch_size=pick("eval_batch_size"),
        image_size=args.image_size,
        pretrained=not args.no_pretrained,
        cross_batch_memory=args.cross_batch_memory,
        amp=args.amp,
        trunk_weights=os.path.abspath(args.trunk_weights) if args.trunk_weights else None,
        trunk_weights_sha1=weights_sha1,
        freeze_bn=args.freeze_bn,
        knn=args.knn,
        eval_precision=args.eval_precision,
    )


def dry_forward(spec: Any, ctx: Any) -> None:
    """Call a built loss (and its miner) on a small random batch on the CPU: what fails at training time fails here
    (a zero divisor, an argument of the wrong type, a class that is not a loss)."""
    import torch

    n_classes = max(2, min(ctx.num_classes, 8))
    labels = torch.arange(n_classes).repeat_interleave(2)
    gen = torch.Generator().manual_seed(0)
    if spec.namr:
        from pml_rll.modules import NAMREmbedder

        emb = NAMREmbedder(8, ctx.embedding_size)(torch.randn(len(labels), 8, generator=gen))
    else:
        emb = torch.randn(len(labels), ctx.embedding_size, generator=gen)
    if not isinstance(spec.loss, torch.nn.Module):
        raise TypeError(f"{type(spec.loss).__name__} is not a loss (a torch.nn.Module)")
    tuples = spec.miner(emb, labels) if spec.miner is not None else None
    out = spec.loss(emb, labels, tuples) if tuples is not None else spec.loss(emb, labels)
    if not torch.is_tensor(out) or out.numel() != 1:
        raise TypeError(f"{type(spec.loss).__name__} returned {type(out).__name__}, not a scalar loss")
