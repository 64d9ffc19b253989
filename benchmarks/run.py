"""Head-to-head benchmark: pml_rll's losses against PML's bundled losses, same data, model, sampler and budget.

python -m benchmarks.run                      # digits, every registered loss, default seeds (CPU, minutes)
python -m benchmarks.run --dataset omniglot   # unseen-class retrieval, alphabet split
python -m benchmarks.run --list               # the loss registry with its hyper-parameters and sources
torchrun --nproc_per_node 2 -m benchmarks.run # data-parallel (DDP) training, see benchmarks/distributed.py
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # DDP hook
    from . import distributed

DATASET_DEFAULTS = {
    # dataset: trunk, embedding, batch, m per class, epochs, iterations per epoch, lr, weight decay, seeds, eval every
    "digits": dict(
        trunk="mlp",
        embedding_size=32,
        batch_size=64,
        m_per_class=8,
        epochs=10,
        iterations_per_epoch=20,
        lr=1e-3,
        weight_decay=0.0,
        seeds=5,
        eval_every=2,
        eval_batch_size=1024,
    ),
    "omniglot": dict(
        trunk="convnet-small",
        embedding_size=64,
        batch_size=64,
        m_per_class=4,
        epochs=8,
        iterations_per_epoch=100,
        lr=1e-3,
        weight_decay=0.0,
        seeds=5,
        eval_every=2,
        eval_batch_size=512,
    ),
    "fashion-mnist": dict(
        trunk="convnet",
        embedding_size=64,
        batch_size=128,
        m_per_class=16,
        epochs=5,
        iterations_per_epoch=200,
        lr=1e-3,
        weight_decay=0.0,
        seeds=3,
        eval_every=1,
        eval_batch_size=1024,
    ),
    "cub200": dict(
        trunk="resnet50",
        embedding_size=512,
        batch_size=120,
        m_per_class=4,
        epochs=40,
        iterations_per_epoch=100,
        lr=1e-5,
        weight_decay=1e-4,
        seeds=3,
        eval_every=5,
        eval_batch_size=256,
    ),
    "cars196": dict(
        trunk="resnet50",
        embedding_size=512,
        batch_size=120,
        m_per_class=4,
        epochs=40,
        iterations_per_epoch=100,
        lr=1e-5,
        weight_decay=1e-4,
        seeds=3,
        eval_every=5,
        eval_batch_size=256,
    ),
    "sop": dict(
        trunk="resnet50",
        embedding_size=512,
        batch_size=120,
        m_per_class=2,
        epochs=40,
        iterations_per_epoch=500,
        lr=1e-5,
        weight_decay=1e-4,
        seeds=3,
        eval_every=10,
        eval_batch_size=256,
    ),
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


def build_parser() -> argparse.ArgumentParser:
    from .datasets import DATASETS
    from .registry import describe_registry

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Benchmark pml_rll's RankedListLoss (and NAMR, when installed) head to head against PML's losses.\n"
            "Every loss gets the same data, trunk + embedder, Adam optimizer, MPerClassSampler batches, budget and\n"
            "evaluation (GlobalEmbeddingSpaceTester + AccuracyCalculator: P@1, Recall@1/2/4/8 as in the DML papers,\n"
            "MAP@R, R-precision, NMI). Seeds are paired: at a given seed every loss starts from the same weights and\n"
            "sees the same batches and augmentations. Numbers are those of the last epoch (the test split is never\n"
            "used for model selection). Finished (loss, seed) runs are skipped when the command is run again."
        ),
        epilog=_defaults_help() + "\n\ndatasets:\n"
        "  digits         scikit-learn digits, within-class 70/30 split (no download; a smoke test, not a ranking)\n"
        "  omniglot       unseen characters, split by alphabet;\n"
        "                 --data-root: folder or zips of alphabet/character/*.png\n"
        "                 (default ../shared/data/omniglot); images resized to --image-size (28)\n"
        "  fashion-mnist  IDX files: Debian dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or a\n"
        "                 torchvision FashionMNIST root via --data-root\n"
        "  cub200, cars196, sop   PML's dataset classes under --data-root (--download fetches them); ResNet-50 with\n"
        "                 ImageNet weights when loadable, RandomResizedCrop(224) + flip\n"
        "\nloss registry (paper-default hyper-parameters):\n" + describe_registry(),
    )
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="benchmark protocol (default: digits)")
    p.add_argument("--data-root", default=None, help="dataset folder (omniglot, fashion-mnist, cub200, cars196, sop)")
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
        choices=["mlp", "convnet", "convnet-small", "resnet18", "resnet50"],
        help="trunk network (default: per dataset)",
    )
    p.add_argument("--no-pretrained", action="store_true", help="ResNet trunks: do not try ImageNet weights")
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
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per run (0: auto = 1 on CPU, where these small models gain little from "
        "intra-op threads and lose a lot on a shared machine; torch's default with CUDA)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="(loss, seed) runs in parallel worker processes (default 1); results are identical",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loader workers (default: 0 for in-memory datasets, 4 for image folders)",
    )
    p.add_argument("--out", default=None, help="output folder (default: results/<dataset>)")
    p.add_argument("--no-resume", action="store_true", help="rerun (loss, seed) pairs already in results.jsonl")
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
    p.add_argument("--list", action="store_true", help="print the loss registry and exit")
    return p


def parse_seeds(spec: str | None, default_n: int) -> list[int]:
    if spec is None:
        return list(range(default_n))
    spec = spec.strip()
    if "," in spec:
        return [int(s) for s in spec.split(",") if s.strip()]
    return list(range(int(spec)))


def resolve_losses(spec: str) -> list[str]:
    from .registry import REGISTRY, default_loss_names

    names = default_loss_names()
    spec = spec.strip()
    if spec == "all":
        return names
    if spec in ("ours", "pml"):
        return [n for n in names if REGISTRY[n].family == spec]
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown loss names {unknown}; registered: {', '.join(REGISTRY)}")
    return chosen


_BUNDLE_CACHE: dict = {}


def _run_job(job: dict, name: str, seed: int, pbar_position: int | None) -> dict:
    """One (loss, seed) run; also the entry point of --jobs worker processes (the dataset is loaded once each)."""
    import torch

    from .datasets import load_dataset
    from .pipeline import run_one
    from .registry import REGISTRY

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    key = (job["dataset"], job["data_root"], job["image_size"], tuple(job["test_alphabets"] or ()))
    if key not in _BUNDLE_CACHE:
        _BUNDLE_CACHE[key] = load_dataset(
            job["dataset"], job["data_root"], job["download"], job["image_size"], job["test_alphabets"]
        )
    log_dir = os.path.join(job["out_dir"], "logs", job["chash"], name, f"seed{seed}")
    t_run = time.perf_counter()
    rec = run_one(
        _BUNDLE_CACHE[key],
        REGISTRY[name],
        seed,
        job["cfg"],
        torch.device(job["device"]),
        log_dir,
        num_workers=job["workers"],
        tensorboard=job["tensorboard"],
        save_models=job["save_models"],
        pbar_position=pbar_position,
    )
    rec["wall_seconds"] = round(time.perf_counter() - t_run, 3)
    return rec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .registry import describe_registry

    if args.list:
        print(describe_registry())
        return 0

    from . import distributed

    dctx = distributed.setup(args.device)  # DDP hook: torchrun's process group (or the single process)
    try:
        rc = _main(args, argv, dctx)
    except BaseException:
        dctx.cleanup(barrier=False)  # the other ranks may be inside another collective: no barrier
        raise
    dctx.cleanup()
    return rc


# DDP hook: the body of main, unchanged except where marked
def _main(args: argparse.Namespace, argv: list[str] | None, dctx: distributed.DistributedContext) -> int:
    import torch
    import tqdm

    from . import distributed, report
    from .common import environment_info
    from .datasets import DatasetUnavailableError, load_dataset
    from .pipeline import RunConfig
    from .registry import REGISTRY

    device = dctx.device  # DDP hook (was resolve_device(args.device))
    if args.jobs > 1 and dctx.is_distributed:  # DDP hook
        raise SystemExit("--jobs > 1 cannot be combined with torchrun: each run already uses every process")
    threads = args.threads if args.threads > 0 else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    d = DATASET_DEFAULTS[args.dataset]

    def pick(name):
        v = getattr(args, name)
        return d[name] if v is None else v

    cfg = RunConfig(
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
        cross_batch_memory=args.cross_batch_memory,  # DDP hook
    )
    if cfg.batch_size % cfg.m_per_class:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of --m-per-class {cfg.m_per_class}")
    if cfg.batch_size % dctx.world_size:  # DDP hook
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of the {dctx.world_size} processes")
    if cfg.cross_batch_memory and not cfg.batch_size <= cfg.cross_batch_memory:  # DDP hook
        raise SystemExit(f"--cross-batch-memory {cfg.cross_batch_memory} must hold one batch ({cfg.batch_size})")
    seeds = parse_seeds(args.seeds, d["seeds"])
    loss_names = resolve_losses(args.losses)
    out_dir = args.out or os.path.join("results", args.dataset)
    if dctx.is_main:  # DDP hook
        os.makedirs(out_dir, exist_ok=True)

    try:
        test_alphabets = args.test_alphabets.split(",") if args.test_alphabets else None
        with dctx.main_first():  # DDP hook: rank 0 downloads first
            bundle = load_dataset(args.dataset, args.data_root, args.download, args.image_size, test_alphabets)
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_classes_batch = cfg.batch_size // cfg.m_per_class
    if n_classes_batch > bundle.num_train_classes:
        raise SystemExit(
            f"batch of {n_classes_batch} classes x {cfg.m_per_class} needs >= {n_classes_batch} train classes; "
            f"{bundle.name} has {bundle.num_train_classes}"
        )
    workers = args.workers if args.workers is not None else (4 if bundle.input_kind == "rgb" else 0)

    available, skipped = [], []
    for n in loss_names:
        ok, why = REGISTRY[n].available()
        why = why and f"not importable ({why})"  # DDP hook: the reason moved here from the print below
        if ok and cfg.cross_batch_memory:  # DDP hook: losses the cross-batch memory cannot wrap are skipped
            ok, why = distributed.cross_batch_support(REGISTRY[n], bundle.num_train_classes, cfg.embedding_size)
        (available if ok else skipped).append(n if ok else (n, why))
    env = environment_info(device)
    chash = report.config_hash(cfg.key())
    jsonl = os.path.join(out_dir, "results.jsonl")
    command = "python -m benchmarks.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"dataset: {bundle.description}")
    print(f"config {chash}: {cfg.key()}")
    print(f"device: {env['device']} ({env['device_name']}), torch {env['torch']}, threads {env['torch_threads']}")
    print(f"losses ({len(available)}): {', '.join(available)}; seeds: {seeds}")
    if dctx.is_distributed:  # DDP hook
        print(f"distributed: {dctx.world_size} processes, backend {dctx.backend}")
    for n, why in skipped:
        print(f"skipping {n}: {why}")  # DDP hook (was "not importable ({why})")

    done = set()
    if not args.no_resume and dctx.is_main:  # DDP hook: rank 0 reads the results
        done = {report.run_key(r) for r in report.load_jsonl(jsonl)}
    todo = [(s, n) for s in seeds for n in available if (args.dataset, n, s, chash, dctx.world_size) not in done]
    todo = dctx.broadcast_object(todo)  # DDP hook: every rank runs rank 0's list
    if len(todo) < len(seeds) * len(available):
        print(f"resuming: {len(seeds) * len(available) - len(todo)} finished runs skipped, {len(todo)} to run")
    t0 = time.perf_counter()
    job_args = dict(
        dataset=args.dataset,
        data_root=args.data_root,
        download=args.download,
        image_size=args.image_size,
        test_alphabets=test_alphabets,
        cfg=cfg,
        device=str(device),
        out_dir=out_dir,
        chash=chash,
        workers=workers,
        tensorboard=args.tensorboard,
        save_models=args.save_models,
        threads=threads,
    )
    _BUNDLE_CACHE[(args.dataset, args.data_root, args.image_size, tuple(test_alphabets or ()))] = bundle

    def finish(rec):
        if not dctx.is_main:  # DDP hook
            return
        rec.update(
            dataset=args.dataset,
            config=cfg.key(),
            config_hash=chash,
            environment=env,
            command=command,
            finished_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        report.append_jsonl(jsonl, rec)
        m = rec["metrics"]
        tqdm.tqdm.write(
            f"{rec['loss']:<22} seed {rec['seed']}: MAP@R {m.get('mean_average_precision_at_r', float('nan')):.4f} "
            f"P@1 {m.get('precision_at_1', float('nan')):.4f} R@1 {m.get('recall_at_1', float('nan')):.4f} "
            f"({rec['seconds_per_iteration'] * 1000:.1f} ms/iter, {rec['wall_seconds']:.1f} s)"
        )

    with tqdm.tqdm(
        total=len(todo),
        desc="runs",
        position=0,
        dynamic_ncols=True,
        disable=not dctx.is_main,  # DDP hook
    ) as outer:
        if args.jobs <= 1:
            for seed, name in todo:
                outer.set_postfix_str(f"{name} seed {seed}")
                finish(_run_job(job_args, name, seed, pbar_position=1 if dctx.is_main else None))  # DDP hook
                outer.update(1)
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_run_job, job_args, name, seed, None) for seed, name in todo]
                for fut in cf.as_completed(futures):
                    finish(fut.result())
                    outer.update(1)
    elapsed = time.perf_counter() - t0
    if not dctx.is_main:  # DDP hook: rank 0 writes the reports
        return 0

    records = [
        r
        for r in report.load_jsonl(jsonl)
        if r.get("dataset") == args.dataset
        and r.get("config_hash") == chash
        and r["loss"] in available
        and int(r["seed"]) in seeds
        and int(r.get("world_size", 1)) == dctx.world_size  # DDP hook
    ]
    header = (
        f"# {args.dataset}: {len(set(r['loss'] for r in records))} losses x {len(seeds)} paired seeds\n\n"
        f"{bundle.description}.\n\n"
        f"Config `{chash}`: trunk {cfg.trunk}, embedding {cfg.embedding_size}, batch {cfg.batch_size} "
        f"({cfg.batch_size // cfg.m_per_class} classes x {cfg.m_per_class}), {cfg.epochs} epochs x "
        f"{cfg.iterations_per_epoch} iterations, Adam lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, "
        f"{cfg.schedule} schedule.\n\n"
        f"Machine: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs), torch {env['torch']}, "
        f"PML {env['pytorch_metric_learning']}, {env['torch_threads']} torch threads.\n\n"
        f"Command: `{command.strip()}`\n"
    )
    paths = report.write_reports(records, out_dir, header)
    print()
    print(report.markdown_tables(records))
    print(f"{len(todo)} runs in {elapsed:.1f} s; results: {jsonl}")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    print(f"  per-run logs (record-keeper CSV + SQLite): {os.path.join(out_dir, 'logs', chash)}")
    return 0


if __name__ == "__main__":
    rc = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":  # DDP hook: skip interpreter teardown, where gloo's threads
        sys.stdout.flush()  # sometimes abort the process after the work is done and the group destroyed
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
