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

import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from .plan import options
from .plan.options import TPE_STARTUP_TRIALS, TRUNKS, Options, parse_seeds, validate

if TYPE_CHECKING:
    from .execute.distributed import DistributedContext
    from .execute.tasks import Job
    from .plan.sources import RunItem, TuneSource
    from .results.store import ResultStore

__all__ = ["PROG", "build_parser", "cli", "main", "parse_seeds"]

PROG = f"python -m {__package__ or 'benchmarks'}.run"  # how the command was started (pml-rll-bench: cli())


def build_parser() -> Any:
    """The runner's command line (:func:`benchmarks.plan.options.build_parser`) under this command's name."""
    return options.build_parser(PROG)


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
    """Run the benchmark command ``argv`` (default: the process's arguments); its exit code."""
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
    opts = validate(args, parser)

    from .execute import distributed

    dctx = distributed.setup(opts.device_arg)  # torchrun's process group (or the single process)
    try:
        rc = _main(opts, argv, dctx)
    except BaseException:
        dctx.cleanup(barrier=False)  # the other ranks may be inside another collective: no barrier
        raise
    dctx.cleanup(barrier=rc == 0)  # interrupted: rank 0 sent the other ranks no end of work, so no barrier
    return rc


class _Refused(Exception):
    """A command that cannot start (a bad store, dataset or trunk): its message, printed as ``error: ...``, exit 2."""


def _main(opts: Options, argv: list[str] | None, dctx: DistributedContext) -> int:
    """The body of :func:`main` in every process; under torchrun only rank 0 talks to the store and writes."""
    from .execute.executor import follow, preload

    t_start = time.time()
    threads = _set_threads(opts, dctx)
    store = None
    try:
        if dctx.is_main:  # under torchrun only rank 0 talks to the store (claims, resume, records)
            store = _open_store(opts)
        bundle, folds = _load_data(opts, dctx)
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        if store is not None:
            store.close()
        return 2
    job = _job(opts, bundle, dctx, threads=threads)
    preload(job, bundle)
    if not dctx.is_main:  # the other ranks train rank 0's tasks in step with it, and write nothing
        follow(job, dctx)
        return 0
    assert store is not None
    setting = _setting(opts, bundle, dctx, argv, started=t_start)
    _print_plan(opts, bundle, setting)
    outcome = _execute(opts, store, job, bundle=bundle, folds=folds, setting=setting)
    return _export(opts, store, outcome, bundle=bundle, folds=folds, setting=setting)


def _open_store(opts: Options) -> ResultStore:
    """The results store of this command (opened once: claims, resume, records and the export)."""
    from .results.store import ResultStore, StoreError, mask_url

    try:
        return ResultStore(opts.storage, lease_seconds=opts.lease)
    except StoreError as e:  # checked before any data is loaded
        raise _Refused(f"--storage: {e}") from None
    except Exception as e:  # noqa: BLE001 - cannot open the database: a bad option
        raise _Refused(f"--storage {mask_url(opts.storage)}: cannot open the results store ({e})") from None


def _load_data(opts: Options, dctx: DistributedContext) -> tuple[Any, list[list[int]] | None]:
    """The dataset (rank 0 downloads first) and, with --tune, its class-disjoint folds; checks that a batch's
    classes fit every split and that the trunk fits the data and the checkpoint, before any training."""
    from .data.bundle import DatasetUnavailableError
    from .data.folds import class_folds
    from .data.load import load_dataset

    alphabets = list(opts.test_alphabets) if opts.test_alphabets is not None else None
    try:
        with dctx.main_first():  # rank 0 downloads first
            bundle = load_dataset(
                opts.dataset, opts.data_root, opts.download, opts.image_size, alphabets, opts.test_classes
            )
    except (DatasetUnavailableError, ValueError) as e:  # ValueError: e.g. unknown --test-alphabets
        raise _Refused(str(e)) from None
    cfg = opts.cfg
    folds = None
    n_batch_classes = cfg.batch_size // cfg.m_per_class
    need = [("the training split", bundle.num_train_classes)]
    if opts.tune:
        try:
            folds = class_folds(bundle, opts.folds)
        except ValueError as e:
            raise _Refused(str(e)) from None
        need += [(f"tuning fold {k + 1} held out", bundle.num_train_classes - len(f)) for k, f in enumerate(folds)]
    for what, n in need:
        if n_batch_classes > n:
            raise _Refused(
                f"--batch-size {cfg.batch_size} / --m-per-class {cfg.m_per_class} = {n_batch_classes} classes "
                f"per batch, but {what} has {n} classes"
            )
    if cfg.trunk_weights or cfg.trunk not in TRUNKS:  # the trunk fits the data and the checkpoint, before training
        from .execute.pipeline import build_trunk
        from .execute.trunks import TrunkError

        try:
            build_trunk(cfg.trunk, bundle.input_shape, pretrained=False, weights=cfg.trunk_weights)
        except TrunkError as e:
            raise _Refused(str(e)) from None
    return bundle, folds


def _set_threads(opts: Options, dctx: DistributedContext) -> int:
    """Set this process's torch threads (--threads; 0: 1 on the CPU, torch's default with CUDA); the number set."""
    import torch

    threads = opts.threads if opts.threads > 0 else (1 if dctx.device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    return threads


def _job(opts: Options, bundle: Any, dctx: DistributedContext, *, threads: int) -> Job:
    """What every process needs to run this command's tasks."""
    from .execute.tasks import Job

    return Job(
        dataset=opts.dataset,
        data_root=opts.data_root,  # None: the loaders read $PML_RLL_DATA themselves (and name it so)
        download=opts.download,
        image_size=opts.image_size,
        test_alphabets=opts.test_alphabets,
        test_classes=opts.test_classes,
        cfg=opts.cfg,
        device=str(dctx.device),
        workers=opts.workers if opts.workers is not None else (4 if bundle.input_kind == "rgb" else 0),
        tensorboard=opts.tensorboard,
        save_models=opts.save_models,
        threads=threads,
        sys_path=(os.path.dirname(os.path.abspath(opts.config)),) if opts.config else (),
        storage=opts.storage,  # workers check that their claim is still theirs
        lease=opts.lease,
    )


@dataclass(frozen=True)
class _Setting:
    """What every run of one command shares: the key part common to its runs, the fields added to its records,
    the machine and the command line (for the log and the report), and when it started."""

    common_key: dict[str, Any]
    extras: dict[str, Any]
    sampler_meta: dict[str, Any]
    env: dict[str, Any]
    command: str
    world_size: int
    backend: str | None
    started: float


def _setting(
    opts: Options, bundle: Any, dctx: DistributedContext, argv: list[str] | None, *, started: float
) -> _Setting:
    from .core import provenance
    from .core.common import environment_info
    from .data.identity import data_identity, split_identity

    cfg = opts.cfg
    env = environment_info(dctx.device)
    command = PROG + " " + " ".join(shlex.quote(a) for a in _masked_argv(argv if argv is not None else sys.argv[1:]))
    code = provenance.code_digests()
    common_key = {
        "dataset": opts.dataset,
        "split": split_identity(bundle),
        "data": data_identity(bundle),  # a changed folder, CSV file or image is new data
        "config": cfg.key(),
        "world_size": dctx.world_size,  # records made before world sizes existed were single-process runs
        "versions": _versions(),
        "code": code,  # the pml_rll and benchmarks sources: an edit is a new key (benchmarks/core/provenance.py)
    }
    extras = dict(
        dataset=opts.dataset,
        data=common_key["data"],
        config=cfg.key(),
        environment=env,
        command=command,
        code=provenance.code_record(code, _versions()["pml_rll"]),
    )
    # part of the trials' key, so independent of --trials: more trials extend a study instead of starting a new one
    sampler_meta = {"name": "TPESampler", "seed": 0, "n_startup_trials": TPE_STARTUP_TRIALS}
    backend = dctx.backend if dctx.is_distributed else None
    return _Setting(common_key, extras, sampler_meta, env, command, dctx.world_size, backend, started)


def _print_plan(opts: Options, bundle: Any, setting: _Setting) -> None:
    """What the command is about to do: the data, configuration, machine, losses, seeds and store."""
    from .results.store import mask_url

    env, registry, loss_names = setting.env, opts.registry, opts.loss_names
    print(f"dataset: {bundle.description}")
    print(f"config: {opts.cfg.key()}")
    print(f"device: {env['device']} ({env['device_name']}), torch {env['torch']}, threads {env['torch_threads']}")
    print(
        f"losses ({len(loss_names)}): {', '.join(loss_names)}; seeds: {list(opts.seeds)}; "
        f"store: {mask_url(opts.storage)}"
    )
    if setting.backend is not None:
        print(f"distributed: {setting.world_size} processes, backend {setting.backend}")
    for n, why in opts.skipped:
        print(f"skipping {n}: {why}")
    for n, ov in registry.overrides.items():
        if n in loss_names:
            print(f"--set {n}: {ov}")
    for n in loss_names:  # NAMR entries: the retrieval each one is evaluated with (settings and geometry)
        if registry.entries[n].namr:
            print(f"{n}: evaluated with {_namr_retrieval_line(registry, n, bundle.num_train_classes, opts.cfg)}")


class _Tally:
    """The command's progress: one bar over every run and trial, a line per finished one, the counts by outcome
    (``ran``, ``skipped``: reused from the store, ``lost``: claim taken over, ``failed``) and the failures."""

    def __init__(self, opts: Options) -> None:
        from .core.progress import progress_bar

        self.counts = {"ran": 0, "skipped": 0, "lost": 0, "failed": 0}
        self.failures: list[dict[str, Any]] = []
        total = len(opts.loss_names) * len(opts.seeds) * (2 if opts.tune else 1)
        if opts.tune:
            total += len(opts.loss_names) * opts.trials
        desc = "runs" if not opts.tune else "trials + runs"
        self.bar = progress_bar(total=total, desc=desc, position=0, dynamic_ncols=True)

    def on_record(self, rec: dict, how: str) -> None:
        """A source's report of one finished task (see :class:`benchmarks.sources.Context`)."""
        import tqdm

        self.counts[how] += 1
        if how == "failed":
            self.failures.append(rec)
            tqdm.tqdm.write(f"{rec['loss']:<22} {_where(rec)}: FAILED ({rec['error']}); traceback: {rec['traceback']}")
            return
        self.bar.update(1)
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


def _where(rec: dict[str, Any]) -> str:
    return f"trial {rec['seed']} fold {rec['fold']}" if rec.get("kind") == "trial" else f"seed {rec['seed']}"


@dataclass
class _Outcome:
    """What the command's work came to: its runs and tuners, how it ended, and its progress."""

    tally: _Tally
    untuned: list[RunItem]
    tuned: list[RunItem] = field(default_factory=list)
    tuners: list[TuneSource] = field(default_factory=list)
    interrupted: bool = False
    store_fault: str | None = None
    elapsed: float = 0.0


def _execute(
    opts: Options, store: ResultStore, job: Job, *, bundle: Any, folds: list[list[int]] | None, setting: _Setting
) -> _Outcome:
    """Tune (with the test split sealed), then make every run; stops cleanly on an interrupt or a store fault
    (the claims are released, finished runs stay in the store)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .execute.executor import WorkerPool
    from .plan.sources import Context, RunItem
    from .results.store import disk_full

    tally = _Tally(opts)
    ctx = Context(
        store=store,
        out_dir=opts.out_dir,
        common_key=setting.common_key,
        extras=setting.extras,
        replace_before=setting.started if opts.no_resume else None,
        optuna_storage=_optuna_storage(opts),
        on_record=tally.on_record,
        tune_meta={"sampler": setting.sampler_meta},
    )
    entries, hparams = opts.registry.entries, opts.registry.hparams
    untuned = [RunItem.make(ctx, entries[n], hparams(n), s, "untuned") for s in opts.seeds for n in opts.loss_names]
    out = _Outcome(tally, untuned)
    pool = WorkerPool(opts.jobs)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.perf_counter()
    try:
        store.start_heartbeat()
        _run_all(opts, ctx, pool, job, bundle=bundle, folds=folds, out=out)
    except KeyboardInterrupt:
        out.interrupted = True
    except (SQLAlchemyError, OSError) as e:  # the store or the disk failed: release the claims, export what is done
        if not (isinstance(e, SQLAlchemyError) or disk_full(e)):
            raise
        out.store_fault = ("the disk is full: " if disk_full(e) else "the results store failed: ") + _one_line(e)
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.shutdown()
        try:
            store.stop()  # releases this runner's claims
        except SQLAlchemyError as e:
            print(f"error: claims not released ({_one_line(e)}); they expire with --lease", file=sys.stderr)
        tally.bar.close()
    out.elapsed = time.perf_counter() - t0
    if out.interrupted:
        print(
            "\ninterrupted: finished runs are kept in the store and exported below; the same command resumes",
            file=sys.stderr,
        )
    if out.store_fault:
        print(f"\nerror: {out.store_fault}; claims released, finished runs exported below", file=sys.stderr)
    return out


def _optuna_storage(opts: Options) -> Any:
    """Optuna's storage of the tuning studies (the results store's database), with --tune only."""
    if not opts.tune:
        return None
    import optuna

    from .results.store import open_optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_optuna_storage(opts.storage)


def _run_all(
    opts: Options, ctx: Any, pool: Any, job: Job, *, bundle: Any, folds: list[list[int]] | None, out: _Outcome
) -> None:
    """The tuning trials (the test split sealed), then the untuned and tuned runs, into ``out``."""
    from .execute import distributed
    from .execute.executor import Source, schedule
    from .plan.sources import RunItem, RunSource, TuneSource

    entries, hparams = opts.registry.entries, opts.registry.hparams
    if opts.tune:
        assert folds is not None  # made with the tuning options
        out.tuners = [TuneSource(ctx, entries[n], hparams(n), folds, opts.trials) for n in opts.loss_names]
        tuning_sources: list[Source] = list(out.tuners)
        with bundle.sealed():
            schedule(pool, job, tuning_sources, ctx.poll_seconds)
    for t in out.tuners:
        best = t.best
        hp = dict(t.hparams, **best["params"]) if best else t.hparams
        out.tuned += [RunItem.make(ctx, t.entry, hp, s, "tuned") for s in opts.seeds]
    schedule(pool, job, [RunSource(ctx, out.untuned), RunSource(ctx, out.tuned)], ctx.poll_seconds)
    distributed.broadcast_task(None)  # under torchrun: the other ranks leave their loop


def _export(
    opts: Options,
    store: ResultStore,
    out: _Outcome,
    *,
    bundle: Any,
    folds: list[list[int]] | None,
    setting: _Setting,
) -> int:
    """Read this command's records from the store, write the exports and print the summary; the exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from .results import report
    from .results.store import StoreError

    try:
        records, trials = _read_results(store, out)
    except (StoreError, SQLAlchemyError) as e:
        print(f"error: the results store cannot be read, nothing exported ({_one_line(e)})", file=sys.stderr)
        return 130 if out.interrupted else 1
    order = {n: i for i, n in enumerate(opts.loss_names)}
    records.sort(key=lambda r: (r["variant"], order.get(r["loss"], 0), r["seed"]))
    tuning = _tuning_summary(opts, folds, trials, setting) if opts.tune else None
    try:
        paths = report.write_reports(records, opts.out_dir, _header(opts, bundle, out, setting), tuning=tuning)
    except OSError as e:
        print(
            f"error: the exports cannot be written to {opts.out_dir} ({e}); the store keeps every result",
            file=sys.stderr,
        )
        return 130 if out.interrupted else 1
    print()
    print(report.markdown_report(records, tuning=tuning))
    _print_summary(opts, out, paths)
    if out.interrupted:
        return 130
    return 1 if out.tally.failures or out.store_fault else 0


def _read_results(store: ResultStore, out: _Outcome) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records of the command's runs (each under its variant) and of its trials; closes the store."""
    try:
        # a tuned configuration equal to the defaults is one stored run, listed under both variants
        records: list[dict[str, Any]] = []
        for it in out.untuned + out.tuned:
            rec = store.get(it.key, it.seed)
            if rec is not None:
                records.append(dict(rec, variant=it.variant))
        trials = store.records([t.key for t in out.tuners]) if out.tuners else []
        return records, trials
    finally:
        store.close()


def _tuning_summary(
    opts: Options, folds: list[list[int]] | None, trials: list[dict[str, Any]], setting: _Setting
) -> dict[str, Any]:
    reg = opts.registry
    return {
        "folds": folds,
        "trials": opts.trials,
        "sampler": setting.sampler_meta,
        "records": trials,
        "defaults": {n: reg.hparams(n) for n in opts.loss_names},
        "spaces": {n: {k: p.space() for k, p in reg.entries[n].search_space().items()} for n in opts.loss_names},
    }


def _header(opts: Options, bundle: Any, out: _Outcome, setting: _Setting) -> str:
    """The first paragraphs of results.md: the data, the configuration, the machine and the command."""
    cfg, env, counts = opts.cfg, setting.env, out.tally.counts
    return (
        f"# {opts.dataset}: {len(opts.loss_names)} losses x {len(opts.seeds)} paired seeds"
        + (f", tuned with {opts.trials} trials x {opts.folds} folds" if opts.tune else "")
        + f"\n\n{bundle.description}.\n\n"
        f"Trunk {cfg.trunk}, embedding {cfg.embedding_size}, batch {cfg.batch_size} "
        f"({cfg.batch_size // cfg.m_per_class} classes x {cfg.m_per_class}), {cfg.epochs} epochs x "
        f"{cfg.iterations_per_epoch} iterations, Adam lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, "
        f"{cfg.schedule} schedule.\n\n"
        f"Machine: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs), torch {env['torch']}, "
        f"PML {env['pytorch_metric_learning']}, {env['torch_threads']} torch threads, {opts.jobs} parallel runs"
        + (
            f", each trained by {setting.world_size} DDP processes ({setting.backend})"
            if setting.backend is not None
            else ""
        )
        + ".\n\n"
        f"Command: `{setting.command.strip()}`: {counts['ran']} runs/trials made and {counts['skipped']} reused from "
        f"the store in {out.elapsed:.0f} s" + (" (interrupted)" if out.interrupted else "") + ".\n"
    )


def _print_summary(opts: Options, out: _Outcome, paths: dict[str, str]) -> None:
    from .results.store import mask_url

    counts = out.tally.counts
    print(
        f"{counts['ran']} runs/trials made, {counts['skipped']} reused from the store, {counts['lost']} dropped "
        f"(claims taken over) in {out.elapsed:.1f} s; store: {mask_url(opts.storage)}"
    )
    for k, path in paths.items():
        print(f"  {k}: {path}")
    print(f"  per-run logs (record-keeper CSV + SQLite): {os.path.join(opts.out_dir, 'logs')}")
    if out.tally.failures:
        print(f"\n{len(out.tally.failures)} failed (the same command retries them):", file=sys.stderr)
        for f in out.tally.failures:
            print(f"  {f['loss']} {_where(f)}: {f['error']} (traceback: {f['traceback']})", file=sys.stderr)


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
