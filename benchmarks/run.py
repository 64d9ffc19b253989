"""Head-to-head benchmark: pml_rll's losses against PML's bundled losses, same data, model, sampler and budget.

python -m benchmarks.run                      # digits, every registered loss, default seeds (CPU, minutes)
python -m benchmarks.run --dataset omniglot --data-root DIR   # unseen-class retrieval, alphabet split
python -m benchmarks.run --tune --trials 8 --folds 2          # tune every loss alike, then test (Reality Check)
python -m benchmarks.run --list               # the loss registry with its hyper-parameters and sources
torchrun --nproc_per_node 2 -m benchmarks.run # data-parallel (DDP) training, see benchmarks/execute/distributed.py

Every option is checked before any data is loaded (exit code 2 with a message naming the option). Results live in
a database (``results.db`` in ``--out``, or ``--storage URL``); results.jsonl/csv/md/png are exports of it.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from .execute import distributed

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


PROG = f"python -m {__package__ or 'benchmarks'}.run"  # how the command was started (pml-rll-bench: cli())
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
        from .core.common import did_you_mean

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


def build_parser() -> argparse.ArgumentParser:
    from .data.bundle import DATA_ENV
    from .data.load import DATASETS
    from .results.knn import KNN_METHODS, knn_argument

    p = ArgumentParser(
        prog=PROG,
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
    for action in p._actions:
        if action.dest in UPPER and action.help:
            action.help += f" (at most {UPPER[action.dest]:g})"
        elif action.dest == "seeds" and action.help:
            action.help += f" (at most {SEEDS_MAX} seeds, each in 0..{SEED_MAX})"
    return p


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
    from .core.common import closest

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


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Check every option before any data is loaded; ``parser.error`` (exit 2) names the first bad one."""
    from .data.bundle import DATA_ENV, default_data_root
    from .execute import distributed
    from .execute.pipeline import RunConfig
    from .losses.config import build_registry
    from .losses.registry import REGISTRY, BuildContext
    from .results.store import mask_url

    d = DATASET_DEFAULTS[args.dataset]

    def pick(name: str) -> Any:
        v = getattr(args, name)
        return d[name] if v is None else v

    def fail(msg: str) -> NoReturn:
        parser.error(msg)

    for opt, name, lo in (
        ("--epochs", "epochs", 1),
        ("--iterations-per-epoch", "iterations_per_epoch", 1),
        ("--batch-size", "batch_size", 1),
        ("--m-per-class", "m_per_class", 1),
        ("--embedding-size", "embedding_size", 1),
        ("--eval-batch-size", "eval_batch_size", 1),
        ("--eval-every", "eval_every", 0),
    ):
        if pick(name) < lo:
            fail(f"{opt} must be >= {lo}, got {pick(name)}")
        if pick(name) > UPPER[name]:
            fail(f"{opt} must be <= {UPPER[name]}, got {pick(name)}")
    for opt, v, lo in (
        ("--jobs", args.jobs, 1),
        ("--threads", args.threads, 0),
        ("--trials", args.trials, 1),
        ("--folds", args.folds, 2),
    ):
        if v < lo:
            fail(f"{opt} must be >= {lo}, got {v}")
        if v > UPPER[opt[2:]]:
            fail(f"{opt} must be <= {UPPER[opt[2:]]}, got {v}")
    if args.workers is not None and not 0 <= args.workers <= UPPER["workers"]:
        fail(f"--workers must be in 0..{UPPER['workers']}, got {args.workers}")
    if args.image_size is not None and not 1 <= args.image_size <= UPPER["image_size"]:
        fail(f"--image-size must be in 1..{UPPER['image_size']}, got {args.image_size}")
    lr, wd = pick("lr"), pick("weight_decay")
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number, got {lr}")
    if not (math.isfinite(wd) and wd >= 0):
        fail(f"--weight-decay must be a number >= 0, got {wd}")
    if not (math.isfinite(args.lease) and 0 < args.lease <= UPPER["lease"]):
        fail(f"--lease must be > 0 and <= {UPPER['lease']:g} seconds, got {args.lease}")
    if pick("batch_size") % pick("m_per_class"):
        fail(f"--batch-size {pick('batch_size')} must be a multiple of --m-per-class {pick('m_per_class')}")
    world = distributed.launch_world_size()
    if world > 1 and args.jobs > 1:
        fail("--jobs > 1 cannot be combined with torchrun: each run already uses every process")
    if pick("batch_size") % world:
        fail(f"--batch-size {pick('batch_size')} must be a multiple of the {world} processes started by torchrun")
    if args.cross_batch_memory < 0:
        fail(f"--cross-batch-memory must be >= 0, got {args.cross_batch_memory}")
    if 0 < args.cross_batch_memory < pick("batch_size"):
        fail(f"--cross-batch-memory {args.cross_batch_memory} must hold one batch ({pick('batch_size')})")
    if args.cross_batch_memory > UPPER["cross_batch_memory"]:
        fail(f"--cross-batch-memory must be <= {UPPER['cross_batch_memory']}, got {args.cross_batch_memory}")
    if args.cross_batch_memory * pick("embedding_size") > CROSS_BATCH_FLOATS_MAX:
        fail(
            f"--cross-batch-memory {args.cross_batch_memory} x --embedding-size {pick('embedding_size')}: more than "
            f"{CROSS_BATCH_FLOATS_MAX} numbers ({CROSS_BATCH_FLOATS_MAX * 4 // 2**30} GiB) in the memory"
        )
    if args.test_alphabets is not None:
        if args.dataset != "omniglot":
            fail("--test-alphabets applies to --dataset omniglot only")
        if not [a for a in args.test_alphabets.split(",") if a.strip()]:
            fail(f"--test-alphabets {args.test_alphabets!r}: no alphabet named")
    from .execute.trunks import check_trunk_name, file_sha1

    why = check_trunk_name(pick("trunk"))
    if why:
        fail(why)
    weights_sha1 = None
    if args.trunk_weights is not None:
        if not os.path.isfile(args.trunk_weights):
            fail(f"--trunk-weights {args.trunk_weights}: not a file")
        weights_sha1 = file_sha1(args.trunk_weights)
    if args.knn.startswith("faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            fail(f"--knn {args.knn} needs faiss (the cpu or gpu extra)")
    if args.test_classes is not None:
        if args.dataset != "folder":
            fail("--test-classes applies to --dataset folder only")
        if not os.path.isfile(args.test_classes):
            fail(f"--test-classes {args.test_classes}: not a file")
    try:
        seeds = parse_seeds(args.seeds, d["seeds"])
    except ValueError as e:
        fail(str(e))
    try:
        registry = build_registry(args.config, args.sets)
        loss_names = resolve_losses(args.losses, registry.entries)
    except ValueError as e:
        fail(str(e))
    n_batch_classes = pick("batch_size") // pick("m_per_class")
    ctx = BuildContext(num_classes=max(2, n_batch_classes), embedding_size=pick("embedding_size"))
    for n in loss_names:  # a dry run: bad --set values and --config kwargs fail here, not after loading data
        by_config = registry.entries[n] is not REGISTRY.get(n)  # added or changed by --config
        src = "--set" if n in registry.overrides else (f"--config {args.config}" if by_config else "registry")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = registry.entries[n].build(ctx, registry.overrides.get(n))
        except Exception as e:  # noqa: BLE001 - whatever a user's class raises, the entry is refused
            fail(f"{src}: loss {n!r} cannot be built with these hyper-parameters: {type(e).__name__}: {e}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dry_forward(spec, ctx)
        except Exception as e:  # noqa: BLE001 - as above
            fail(f"{src}: loss {n!r} fails on a small random batch: {type(e).__name__}: {e}")
    skipped = []
    if args.cross_batch_memory:  # losses the memory cannot wrap are skipped, with the reason printed
        for n in list(loss_names):
            ok, why = distributed.cross_batch_support(
                registry.entries[n], registry.overrides.get(n), ctx.num_classes, ctx.embedding_size, world
            )
            if not ok:
                loss_names.remove(n)
                skipped.append((n, why))
        if not loss_names:
            fail(f"--cross-batch-memory: no selected loss can be wrapped ({'; '.join(w for _, w in skipped)})")
    if args.tune:
        untunable = [n for n in loss_names if not registry.entries[n].search_space()]
        if untunable:
            print(f"note: {untunable} have no search space; --tune reports them untuned", file=sys.stderr)
    try:
        device = distributed.process_device(args.device)  # under torchrun: the GPU of LOCAL_RANK
    except ValueError as e:
        fail(str(e))
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        fail(f"--device {args.device}: runs train on cpu, cuda, mps or xpu, not {device.type}")
    if args.amp == "fp16" and device.type != "cuda":
        fail(f"--amp fp16 needs a CUDA device (--device is {device}); use --amp bf16 on the CPU")
    own = args.dataset in ("folder", "csv")  # your own data: never looked for under $PML_RLL_DATA
    data_root = args.data_root or (None if own else default_data_root(args.dataset))
    if own and not data_root:
        what = "a folder <class>/<image>" if args.dataset == "folder" else "a CSV file"
        fail(f"--data-root is required for {args.dataset} ({what})")
    if args.dataset in NEEDS_ROOT and not data_root:
        fail(f"--data-root is required for {args.dataset} (or set {DATA_ENV} to a folder holding {args.dataset}/)")
    if data_root and not args.download and not os.path.exists(data_root):
        fail(f"--data-root {data_root}: does not exist")
    if args.dataset == "folder" and not os.path.isdir(str(data_root)):
        fail(f"--data-root {data_root}: --dataset folder needs a folder laid out <class>/<image>")
    if args.dataset == "csv" and not os.path.isfile(str(data_root)):
        fail(f"--data-root {data_root}: --dataset csv needs a CSV file (path,label,split[,is_query,is_gallery])")
    out_dir = args.out or os.path.join("results", args.dataset)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes (the folder may be on its node only)
        try:
            _check_out(out_dir)
        except ValueError as e:
            fail(str(e))
    storage = args.storage or "sqlite:///" + os.path.join(os.path.abspath(out_dir), "results.db")
    try:
        import sqlalchemy

        sqlalchemy.engine.make_url(storage)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad option
        fail(f"--storage {mask_url(storage)!r}: not a database URL ({type(e).__name__})")
    jsonl = os.path.join(out_dir, "results.jsonl")
    if args.storage is None and not os.path.exists(os.path.join(out_dir, "results.db")) and os.path.exists(jsonl):
        if os.path.getsize(jsonl) > 0:  # results of a runner that kept them in results.jsonl only
            fail(
                f"--out {out_dir}: holds a results.jsonl but no results.db (results kept outside a results store); "
                "this command would overwrite it: move it away or choose another --out"
            )
    cfg = RunConfig(
        dataset=args.dataset,
        trunk=pick("trunk"),
        embedding_size=pick("embedding_size"),
        batch_size=pick("batch_size"),
        m_per_class=pick("m_per_class"),
        epochs=pick("epochs"),
        iterations_per_epoch=pick("iterations_per_epoch"),
        lr=lr,
        weight_decay=wd,
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
    return dict(
        cfg=cfg,
        seeds=seeds,
        registry=registry,
        loss_names=loss_names,
        device=device,
        data_root=data_root,
        out_dir=out_dir,
        storage=storage,
        skipped=skipped,
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


def _versions() -> dict:
    import pytorch_metric_learning
    import torch

    import pml_rll

    return {
        "pml_rll": pml_rll.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        from .losses.config import build_registry
        from .losses.registry import describe_registry

        try:
            reg = build_registry(args.config, args.sets)
        except ValueError as e:
            parser.error(str(e))
        print(
            describe_registry({n: e.with_changes(reg.overrides.get(n), source="--set") for n, e in reg.entries.items()})
        )
        return 0
    v = validate(args, parser)

    from .execute import distributed

    dctx = distributed.setup(args.device)  # torchrun's process group (or the single process)
    try:
        rc = _main(args, argv, parser, v, dctx)
    except BaseException:
        dctx.cleanup(barrier=False)  # the other ranks may be inside another collective: no barrier
        raise
    dctx.cleanup(barrier=rc == 0)  # interrupted: rank 0 sent the other ranks no end of work, so no barrier
    return rc


def _main(
    args: argparse.Namespace,
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    v: dict[str, Any],
    dctx: distributed.DistributedContext,
) -> int:
    """The body of :func:`main` in every process; under torchrun only rank 0 talks to the store and writes."""
    import torch
    import tqdm
    from sqlalchemy.exc import SQLAlchemyError

    from .core import provenance
    from .core.common import environment_info
    from .core.progress import progress_bar
    from .data.bundle import DatasetUnavailableError
    from .data.folds import class_folds
    from .data.identity import data_identity, split_identity
    from .data.load import load_dataset
    from .execute import distributed
    from .execute.executor import Source, WorkerPool, follow, preload, schedule
    from .plan.sources import Context, RunItem, RunSource, TuneSource
    from .results import report
    from .results.store import ResultStore, StoreError, disk_full, mask_url, open_optuna_storage

    cfg, seeds, registry, loss_names, device = v["cfg"], v["seeds"], v["registry"], v["loss_names"], dctx.device
    out_dir = v["out_dir"]
    t_start = time.time()
    threads = args.threads if args.threads > 0 else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    store = None
    if dctx.is_main:  # under torchrun only rank 0 talks to the store (claims, resume, records)
        try:
            store = ResultStore(v["storage"], lease_seconds=args.lease)
        except StoreError as e:  # checked before any data is loaded
            print(f"error: --storage: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - cannot open the database: a bad option
            print(f"error: --storage {mask_url(v['storage'])}: cannot open the results store ({e})", file=sys.stderr)
            return 2
    test_alphabets = [a.strip() for a in args.test_alphabets.split(",") if a.strip()] if args.test_alphabets else None
    try:
        with dctx.main_first():  # rank 0 downloads first
            bundle = load_dataset(
                args.dataset, args.data_root, args.download, args.image_size, test_alphabets, args.test_classes
            )
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. unknown --test-alphabets
        print(f"error: {e}", file=sys.stderr)
        return 2
    folds = None
    n_batch_classes = cfg.batch_size // cfg.m_per_class
    need = [("the training split", bundle.num_train_classes)]
    if args.tune:
        try:
            folds = class_folds(bundle, args.folds)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        need += [(f"tuning fold {k + 1} held out", bundle.num_train_classes - len(f)) for k, f in enumerate(folds)]
    for what, n in need:
        if n_batch_classes > n:
            print(
                f"error: --batch-size {cfg.batch_size} / --m-per-class {cfg.m_per_class} = {n_batch_classes} classes "
                f"per batch, but {what} has {n} classes",
                file=sys.stderr,
            )
            return 2
    if cfg.trunk_weights or cfg.trunk not in TRUNKS:  # the trunk fits the data and the checkpoint, before training
        from .execute.pipeline import build_trunk
        from .execute.trunks import TrunkError

        try:
            build_trunk(cfg.trunk, bundle.input_shape, pretrained=False, weights=cfg.trunk_weights)
        except TrunkError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    workers = args.workers if args.workers is not None else (4 if bundle.input_kind == "rgb" else 0)
    job = dict(
        dataset=args.dataset,
        data_root=args.data_root,  # None: the loaders read $PML_RLL_DATA themselves (and name it so)
        download=args.download,
        image_size=args.image_size,
        test_alphabets=test_alphabets,
        test_classes=args.test_classes,
        cfg=cfg,
        device=str(device),
        workers=workers,
        tensorboard=args.tensorboard,
        save_models=args.save_models,
        threads=threads,
        sys_path=[os.path.dirname(os.path.abspath(args.config))] if args.config else [],
        storage=v["storage"],  # workers check that their claim is still theirs
        lease=args.lease,
    )
    preload(job, bundle)
    if not dctx.is_main:  # the other ranks train rank 0's tasks in step with it, and write nothing
        follow(job, dctx)
        return 0
    assert store is not None
    env = environment_info(device)
    command = PROG + " " + " ".join(shlex.quote(a) for a in _masked_argv(argv if argv is not None else sys.argv[1:]))
    shown_storage = mask_url(v["storage"])
    code = provenance.code_digests()
    common_key = {
        "dataset": args.dataset,
        "split": split_identity(bundle),
        "data": data_identity(bundle),  # a changed folder, CSV file or image is new data
        "config": cfg.key(),
        "world_size": dctx.world_size,  # records made before world sizes existed were single-process runs
        "versions": _versions(),
        "code": code,  # the pml_rll and benchmarks sources: an edit is a new key (benchmarks/core/provenance.py)
    }
    # part of the trials' key, so independent of --trials: more trials extend a study instead of starting a new one
    sampler_meta = {"name": "TPESampler", "seed": 0, "n_startup_trials": TPE_STARTUP_TRIALS}
    extras = dict(
        dataset=args.dataset,
        data=common_key["data"],
        config=cfg.key(),
        environment=env,
        command=command,
        code=provenance.code_record(code, _versions()["pml_rll"]),
    )
    print(f"dataset: {bundle.description}")
    print(f"config: {cfg.key()}")
    print(f"device: {env['device']} ({env['device_name']}), torch {env['torch']}, threads {env['torch_threads']}")
    print(f"losses ({len(loss_names)}): {', '.join(loss_names)}; seeds: {seeds}; store: {shown_storage}")
    if dctx.is_distributed:
        print(f"distributed: {dctx.world_size} processes, backend {dctx.backend}")
    for n, why in v["skipped"]:
        print(f"skipping {n}: {why}")
    for n, ov in registry.overrides.items():
        if n in loss_names:
            print(f"--set {n}: {ov}")
    for n in loss_names:  # NAMR entries: the retrieval each one is evaluated with (settings and geometry)
        if registry.entries[n].namr:
            print(f"{n}: evaluated with {_namr_retrieval_line(registry, n, bundle.num_train_classes, cfg)}")

    counts = {"ran": 0, "skipped": 0, "lost": 0, "failed": 0}
    failures: list[dict[str, Any]] = []
    total = len(loss_names) * len(seeds) * (2 if args.tune else 1)
    if args.tune:
        total += len(loss_names) * args.trials
    outer = progress_bar(total=total, desc="runs" if not args.tune else "trials + runs", position=0, dynamic_ncols=True)

    def on_record(rec: dict, how: str) -> None:
        counts[how] += 1
        if how == "failed":
            failures.append(rec)
            where = f"trial {rec['seed']} fold {rec['fold']}" if rec.get("kind") == "trial" else f"seed {rec['seed']}"
            tqdm.tqdm.write(f"{rec['loss']:<22} {where}: FAILED ({rec['error']}); traceback: {rec['traceback']}")
            return
        outer.update(1)
        if how == "skipped":
            return
        if "metrics" not in rec and "value" not in rec:  # a claim lost before the run ended: nothing recorded
            tqdm.tqdm.write(f"{rec['loss']:<22} seed {rec['seed']}: claim taken over by another runner, stopped")
            return
        if rec.get("kind") == "trial":
            val = "failed" if rec["value"] is None else f"{rec['value'] * 100:.2f}%"
            tqdm.tqdm.write(f"{rec['loss']:<22} trial {rec['slot']}: validation MAP@R {val} {rec['params']}")
            return
        m = rec["metrics"]
        tqdm.tqdm.write(
            f"{rec['loss']:<22} {rec['variant']:<8} seed {rec['seed']}: "
            f"MAP@R {m.get('mean_average_precision_at_r', float('nan')) * 100:.2f}% "
            f"P@1 {m.get('precision_at_1', float('nan')) * 100:.2f}% "
            f"({rec['seconds_per_iteration'] * 1000:.1f} ms/iter, {rec['wall_seconds']:.1f} s)"
            + (" [claim lost: another runner's record kept]" if how == "lost" else "")
        )

    optuna_storage = None
    if args.tune:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna_storage = open_optuna_storage(v["storage"])
    ctx = Context(
        store=store,
        out_dir=out_dir,
        common_key=common_key,
        extras=extras,
        replace_before=t_start if args.no_resume else None,
        optuna_storage=optuna_storage,
        on_record=on_record,
        tune_meta={"sampler": sampler_meta},
    )
    untuned = [
        RunItem.make(ctx, registry.entries[n], registry.hparams(n), s, "untuned") for s in seeds for n in loss_names
    ]
    tuners: list[TuneSource] = []
    tuned: list[RunItem] = []
    interrupted = False
    store_fault: str | None = None
    pool = WorkerPool(args.jobs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.perf_counter()
    try:
        store.start_heartbeat()
        if args.tune:
            bundle.test_sealed = True
            assert folds is not None  # made with the tuning options above
            tuners = [TuneSource(ctx, registry.entries[n], registry.hparams(n), folds, args.trials) for n in loss_names]
            tuning_sources: list[Source] = list(tuners)
            schedule(pool, job, tuning_sources, ctx.poll_seconds)
            bundle.test_sealed = False
        for t in tuners:
            best = t.best
            hp = dict(t.hparams, **best["params"]) if best else t.hparams
            tuned += [RunItem.make(ctx, t.entry, hp, s, "tuned") for s in seeds]
        schedule(pool, job, [RunSource(ctx, untuned), RunSource(ctx, tuned)], ctx.poll_seconds)
        distributed.broadcast_task(None)  # under torchrun: the other ranks leave their loop
    except KeyboardInterrupt:
        interrupted = True
    except (SQLAlchemyError, OSError) as e:  # the store or the disk failed: release the claims, export what is done
        if not (isinstance(e, SQLAlchemyError) or disk_full(e)):
            raise
        store_fault = ("the disk is full: " if disk_full(e) else "the results store failed: ") + _one_line(e)
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.shutdown()
        try:
            store.close()  # releases this runner's claims
        except SQLAlchemyError as e:
            print(f"error: claims not released ({_one_line(e)}); they expire with --lease", file=sys.stderr)
        outer.close()
    elapsed = time.perf_counter() - t0
    if interrupted:
        print(
            "\ninterrupted: finished runs are kept in the store and exported below; the same command resumes",
            file=sys.stderr,
        )
    if store_fault:
        print(f"\nerror: {store_fault}; claims released, finished runs exported below", file=sys.stderr)

    try:
        store = ResultStore(v["storage"], lease_seconds=args.lease)
        # a tuned configuration equal to the defaults is one stored run, listed under both variants
        records: list[dict[str, Any]] = []
        for it in untuned + tuned:
            rec = store.get(it.key, it.seed)
            if rec is not None:
                records.append(dict(rec, variant=it.variant))
        trials = store.records([t.key for t in tuners]) if tuners else []
        store.close()
    except (StoreError, SQLAlchemyError) as e:
        print(f"error: the results store cannot be read, nothing exported ({_one_line(e)})", file=sys.stderr)
        return 130 if interrupted else 1
    order = {n: i for i, n in enumerate(loss_names)}
    records.sort(key=lambda r: (r["variant"], order.get(r["loss"], 0), r["seed"]))
    header = (
        f"# {args.dataset}: {len(loss_names)} losses x {len(seeds)} paired seeds"
        + (f", tuned with {args.trials} trials x {args.folds} folds" if args.tune else "")
        + f"\n\n{bundle.description}.\n\n"
        f"Trunk {cfg.trunk}, embedding {cfg.embedding_size}, batch {cfg.batch_size} "
        f"({cfg.batch_size // cfg.m_per_class} classes x {cfg.m_per_class}), {cfg.epochs} epochs x "
        f"{cfg.iterations_per_epoch} iterations, Adam lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, "
        f"{cfg.schedule} schedule.\n\n"
        f"Machine: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs), torch {env['torch']}, "
        f"PML {env['pytorch_metric_learning']}, {env['torch_threads']} torch threads, {args.jobs} parallel runs"
        + (f", each trained by {dctx.world_size} DDP processes ({dctx.backend})" if dctx.is_distributed else "")
        + ".\n\n"
        f"Command: `{command.strip()}`: {counts['ran']} runs/trials made and {counts['skipped']} reused from the "
        f"store in {elapsed:.0f} s" + (" (interrupted)" if interrupted else "") + ".\n"
    )
    tuning = None
    if args.tune:
        tuning = {
            "folds": folds,
            "trials": args.trials,
            "sampler": sampler_meta,
            "records": trials,
            "defaults": {n: registry.hparams(n) for n in loss_names},
            "spaces": {n: {k: p.space() for k, p in registry.entries[n].search_space().items()} for n in loss_names},
        }
    try:
        paths = report.write_reports(records, out_dir, header, tuning=tuning)
    except OSError as e:
        print(f"error: the exports cannot be written to {out_dir} ({e}); the store keeps every result", file=sys.stderr)
        return 130 if interrupted else 1
    print()
    print(report.markdown_report(records, tuning=tuning))
    print(
        f"{counts['ran']} runs/trials made, {counts['skipped']} reused from the store, {counts['lost']} dropped "
        f"(claims taken over) in {elapsed:.1f} s; store: {shown_storage}"
    )
    for k, path in paths.items():
        print(f"  {k}: {path}")
    print(f"  per-run logs (record-keeper CSV + SQLite): {os.path.join(out_dir, 'logs')}")
    if failures:
        print(f"\n{len(failures)} failed (the same command retries them):", file=sys.stderr)
        for f in failures:
            where = f"trial {f['seed']} fold {f['fold']}" if f.get("kind") == "trial" else f"seed {f['seed']}"
            print(f"  {f['loss']} {where}: {f['error']} (traceback: {f['traceback']})", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failures or store_fault else 0


def _one_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    lines = str(orig if orig is not None else e).strip().splitlines()
    return f"{type(orig or e).__name__}: {lines[0] if lines else ''}"


def _masked_argv(argv: list[str]) -> list[str]:
    """The command line with the password of a ``--storage`` URL replaced by ``***``."""
    from .results.store import mask_url

    out, mask_next = [], False
    for a in argv:
        if mask_next:
            out.append(mask_url(a))
        elif a.startswith("--storage="):
            out.append("--storage=" + mask_url(a[len("--storage=") :]))
        else:
            out.append(a)
        mask_next = a == "--storage"
    return out


def _namr_retrieval_line(registry: Any, name: str, num_classes: int, cfg: Any) -> str:
    """The effective re-ranking settings of a NAMR entry, as its runs build them (``NAMRReRankKNN.for_loss``)."""
    from pml_rll.retrieval import NAMRReRankKNN

    from .losses.registry import BuildContext

    spec = registry.entries[name].build(BuildContext(num_classes, cfg.embedding_size), registry.hparams(name))
    knn = NAMRReRankKNN.for_loss(spec.loss, **(spec.retrieval or {}))
    return (
        f"NAMRReRankKNN(mode={knn.mode!r}, num_candidates={knn.num_candidates}, weighting={knn.weighting!r}, "
        f"blend={knn.blend:g}, normalize_sample={knn.normalize_sample})"
    )


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _exit(rc: int) -> NoReturn:
    if os.environ.get("WORLD_SIZE", "1") != "1":  # skip interpreter teardown, where gloo's threads
        sys.stdout.flush()  # sometimes abort the process after the work is done and the group destroyed
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def cli() -> NoReturn:
    """The ``pml-rll-bench`` console command (installed with the package): the same as ``python -m``."""
    global PROG
    PROG = "pml-rll-bench"
    _exit(main())


if __name__ == "__main__":
    _exit(main())
