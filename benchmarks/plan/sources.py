"""The work of one runner command, as sources for ``benchmarks.execute.executor.schedule``.

* :class:`RunSource`: (loss, hyper-parameters, seed) runs on the test split, each claimed in the results store.
* :class:`TuneSource`: the Reality Check protocol for one loss. Trial slot s (s = 0 .. trials-1) is claimed in the
  store and asks Optuna's TPE sampler for hyper-parameters (slot 0: the defaults, when they lie in the search
  space); the trial trains with seed s on every fold but one and scores MAP@R on the held-out fold, for each of the
  K class-disjoint folds, and its value, the mean over folds, goes back to the study. Every loss gets the same
  slots, seeds, folds and budget. The test split is never read. A trial whose runner died is taken over with the
  same hyper-parameters (its finished folds are reused from the store).

A task that raises is a failed run: its claim is released (a later command retries it), its traceback is written to
``error.txt`` in its log folder, ``ctx.on_record`` hears of it as ``"failed"``, and the command goes on with the
other runs. A full disk stops the command instead. Every claim writes its per-run logs into a folder of its own
(named after its token), so a runner that lost its claim never writes into the logs of the runner that took it.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.provenance import class_digests
from ..data.bundle import TestSplitSealedError
from ..losses.registry import LossEntry
from ..results.store import ClaimLostError, ResultStore, disk_full

PRIMARY = "mean_average_precision_at_r"


def key_of(obj: dict[str, Any]) -> str:
    """The store key of a key object: a hash of its canonical JSON."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class Context:
    """What every source of one command shares."""

    store: ResultStore
    out_dir: str
    common_key: dict[str, Any]  # dataset, split, data identity, config, world size, versions
    extras: dict[str, Any]  # copied into every record: dataset, config, environment, command
    replace_before: float | None = None  # --no-resume: re-claim records finished before this time
    optuna_storage: Any = None
    poll_seconds: float = 2.0
    on_record: Callable[[dict[str, Any], str], None] = field(default=lambda rec, how: None)
    tune_meta: dict[str, Any] = field(default_factory=dict)  # the sampler's settings (part of the trials' key)


def entry_classes(entry: LossEntry) -> list[str | None]:
    """The import paths of every class an entry builds: loss, miner, and a wrapper's wrapped loss and miner."""
    paths = [entry.loss_class, entry.miner_class]
    if entry.wraps is not None:
        paths += entry_classes(entry.wraps)
    return paths


def claim_log_dir(ctx: Context, key: str, name: str, seed: int, token: str | None) -> str:
    """The per-run log folder of one claim: ``logs/<key>/<loss>/seed<seed>/<claim>``."""
    return os.path.join(ctx.out_dir, "logs", key[:16], name, f"seed{seed}", f"claim-{(token or 'none')[:12]}")


def record_failure(ctx: Context, task: dict[str, Any], error: BaseException, what: dict[str, Any]) -> None:
    """Write the traceback of a failed task into its log folder and tell ``ctx.on_record`` (``"failed"``)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    path = os.path.join(task["log_dir"], "error.txt")
    try:
        os.makedirs(task["log_dir"], exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        path = ""
    ctx.on_record(dict(what, error=f"{type(error).__name__}: {error}".strip(), traceback=path), "failed")


def entry_key(entry: LossEntry, hparams: dict[str, Any]) -> dict[str, Any]:
    """The entry's part of a key: name, classes, hyper-parameters and the digest of each class's source file."""
    out = {"loss": entry.name, "loss_class": entry.loss_class, "miner_class": entry.miner_class, "hparams": hparams}
    if entry.wraps is not None:
        out["wraps"] = {"loss_class": entry.wraps.loss_class, "miner_class": entry.wraps.miner_class}
    out["class_code"] = class_digests(entry_classes(entry))
    return out


@dataclass
class RunItem:
    """One (loss, hyper-parameters, seed) run on the test split."""

    entry: LossEntry
    hparams: dict[str, Any]
    seed: int
    variant: str  # "untuned" (defaults + --set/--config) or "tuned"
    key_obj: dict[str, Any]
    key: str

    @classmethod
    def make(cls, ctx: Context, entry: LossEntry, hparams: dict[str, Any], seed: int, variant: str) -> RunItem:
        obj = {**ctx.common_key, "kind": "run", **entry_key(entry, hparams)}
        return cls(entry, hparams, seed, variant, obj, key_of(obj))


class RunSource:
    """Test-split runs: claim, hand out, record (see the module docstring).

    Args:
        ctx: the command's shared context.
        items: the runs to make sure exist in the store.
    """

    def __init__(self, ctx: Context, items: list[RunItem]) -> None:
        self.ctx = ctx
        self.pending = list(items)
        self.busy: list[RunItem] = []
        self.next_poll = 0.0

    @property
    def finished(self) -> bool:
        return not self.pending and not self.busy

    def next_task(self) -> dict[str, Any] | None:
        if not self.pending and self.busy and time.time() >= self.next_poll:
            self.pending, self.busy = self.busy, []
            self.next_poll = time.time() + self.ctx.poll_seconds
        while self.pending:
            it = self.pending.pop(0)
            state, rec = self.ctx.store.claim(it.key, it.seed, "run", it.key_obj, self.ctx.replace_before)
            if state == "done":
                assert rec is not None
                self.ctx.on_record(rec, "skipped")
                continue
            if state == "busy":
                self.busy.append(it)
                continue
            token = self.ctx.store.token(it.key, it.seed)
            return {
                "item": it,
                "entry": it.entry,
                "hparams": it.hparams,
                "seed": it.seed,
                "fold": None,
                "claim": (it.key, it.seed, token),
                "log_dir": claim_log_dir(self.ctx, it.key, it.entry.name, it.seed, token),
            }
        return None

    def on_result(self, task: dict[str, Any], future: cf.Future[Any]) -> None:
        it: RunItem = task["item"]
        try:
            rec = future.result()
        except ClaimLostError:  # another runner owns the run now and writes its record
            self.ctx.store.release(it.key, it.seed)  # (deletes nothing: the token is no longer the row's)
            self.ctx.on_record({"loss": it.entry.name, "seed": it.seed, "variant": it.variant}, "lost")
            return
        except Exception as e:
            self.ctx.store.release(it.key, it.seed)
            if disk_full(e):
                raise
            what = {"kind": "run", "loss": it.entry.name, "seed": it.seed, "variant": it.variant}
            record_failure(self.ctx, task, e, what)
            return
        except BaseException:
            self.ctx.store.release(it.key, it.seed)
            raise
        rec.update(self.ctx.extras)
        rec["code"] = dict(rec.get("code") or {}, classes=it.key_obj["class_code"])  # which code made this row
        rec.update(variant=it.variant, key=it.key, finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        if self.ctx.store.complete(it.key, it.seed, rec):
            self.ctx.on_record(rec, "ran")
        else:
            self.ctx.on_record(rec, "lost")


class TuneSource:
    """Optuna TPE trials of one loss over class-disjoint folds (see the module docstring).

    Args:
        ctx: the command's shared context (``ctx.tune_meta`` holds folds, trials and the sampler settings).
        entry: the registry entry; its search space is what is tuned.
        hparams: every hyper-parameter's value outside the search (defaults + ``--set``).
        folds: the training labels of each fold (``benchmarks.data.folds.class_folds``).
        trials: the number of trial slots.
    """

    def __init__(
        self, ctx: Context, entry: LossEntry, hparams: dict[str, Any], folds: list[list[int]], trials: int
    ) -> None:
        self.ctx, self.entry, self.hparams, self.folds, self.trials = ctx, entry, hparams, folds, trials
        self.space = entry.search_space()
        self.key_obj = {
            **ctx.common_key,
            "kind": "trial",
            **entry_key(entry, hparams),
            "search": {k: p.space() for k, p in self.space.items()},
            "folds": folds,
            "sampler": ctx.tune_meta.get("sampler"),
        }
        self.key = key_of(self.key_obj)
        self.done: dict[int, dict[str, Any]] = {}
        self.failed: set[int] = set()  # slots whose trial failed for a reason other than its hyper-parameters
        self.active: dict[str, Any] | None = None
        self.next_poll = 0.0
        self._study: Any = None

    @property
    def finished(self) -> bool:
        return not self.space or len(self.done) + len(self.failed) >= self.trials

    @property
    def best(self) -> dict[str, Any] | None:
        """The finished trial with the highest validation score (ties: the lower slot), or None."""
        valid = [r for r in self.done.values() if r.get("value") is not None]
        return max(valid, key=lambda r: (r["value"], -r["slot"])) if valid else None

    def study(self) -> Any:
        if self._study is None:
            import optuna

            sampler = self._sampler(0)
            name = f"{self.entry.name}-{self.key[:16]}"
            for attempt in range(3):
                try:
                    self._study = optuna.create_study(
                        storage=self.ctx.optuna_storage,
                        study_name=name,
                        direction="maximize",
                        sampler=sampler,
                        load_if_exists=True,
                    )
                    break
                except optuna.exceptions.DuplicatedStudyError:  # created by another runner at the same moment
                    if attempt == 2:
                        raise
        return self._study

    def _sampler(self, slot: int) -> Any:
        """TPE seeded by the trial slot: a resumed study draws what an uninterrupted one would, never a repeat of
        an earlier slot's random draw (a sampler seeded once per process would restart its random stream)."""
        import optuna

        meta = self.ctx.tune_meta["sampler"]
        return optuna.samplers.TPESampler(seed=meta["seed"] + slot, n_startup_trials=meta["n_startup_trials"])

    def _fold_key(self, hp: dict[str, Any], k: int) -> tuple[dict[str, Any], str]:
        obj = {**self.ctx.common_key, "kind": "fold", **entry_key(self.entry, hp), "folds": self.folds, "held_out": k}
        return obj, key_of(obj)

    def _start(self, slot: int, payload: dict[str, Any] | None) -> None:
        import optuna

        study = self.study()
        if payload and payload.get("trial_number") is not None:  # taken over from a runner that died
            try:
                study.tell(payload["trial_number"], state=optuna.trial.TrialState.FAIL)
            except (ValueError, RuntimeError):
                pass
            if payload.get("params"):
                study.enqueue_trial(payload["params"])
        elif slot == 0:  # trial 0 tries the defaults (when inside the space), so tuning can only confirm or improve
            defaults = {k: self.hparams[k] for k in self.space}
            if all(p.contains(defaults[k]) for k, p in self.space.items()):
                study.enqueue_trial(defaults)
        study.sampler = self._sampler(slot)
        trial = study.ask({k: p.distribution() for k, p in self.space.items()})
        hp = dict(self.hparams, **trial.params)
        self.ctx.store.set_payload(self.key, slot, {"trial_number": trial.number, "params": trial.params})
        self.active = {"slot": slot, "trial": trial, "hparams": hp, "queue": list(range(len(self.folds))), "out": {}}

    def next_task(self) -> dict[str, Any] | None:
        while True:
            if self.active is not None:
                a = self.active
                while a["queue"]:
                    k = a["queue"].pop(0)
                    obj, fkey = self._fold_key(a["hparams"], k)
                    cached = None if self.ctx.replace_before else self.ctx.store.get(fkey, a["slot"])
                    if cached is not None:
                        a["out"][k] = cached
                        continue
                    token = self.ctx.store.token(self.key, a["slot"])
                    log_dir = claim_log_dir(self.ctx, fkey, self.entry.name, a["slot"], token)
                    return {
                        "entry": self.entry,
                        "hparams": a["hparams"],
                        "seed": a["slot"],
                        "fold": k,
                        "folds": self.folds,
                        "fold_key": (obj, fkey),
                        "claim": (self.key, a["slot"], token),  # a fold runs under its trial's claim
                        "log_dir": log_dir,
                    }
                if len(a["out"]) == len(self.folds):
                    self._finish()
                    continue
                return None  # folds running
            if self.finished or time.time() < self.next_poll:
                return None
            busy = False
            for slot in range(self.trials):
                if slot in self.done or slot in self.failed:
                    continue
                state, payload = self.ctx.store.claim(self.key, slot, "trial", self.key_obj, self.ctx.replace_before)
                if state == "done":
                    assert payload is not None
                    self.done[slot] = payload
                    self.ctx.on_record(payload, "skipped")
                elif state == "busy":
                    busy = True
                else:
                    self._start(slot, payload)
                    break
            else:
                if busy:
                    self.next_poll = time.time() + self.ctx.poll_seconds
                return None

    def on_result(self, task: dict[str, Any], future: cf.Future[Any]) -> None:
        a = self.active
        assert a is not None
        try:
            rec = future.result()
        except TestSplitSealedError:
            self.ctx.store.release(self.key, a["slot"])
            raise
        except ClaimLostError:
            rec = {"error": "claim lost", "lost": True}
        except (ValueError, RuntimeError, FloatingPointError) as e:  # these hyper-parameters fail: the trial fails
            rec = {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # not the hyper-parameters' fault (a worker died...): the trial is retried later
            if disk_full(e):
                self.ctx.store.release(self.key, a["slot"])
                raise
            rec = {"error": f"{type(e).__name__}: {e}", "crashed": True}
            what = {"kind": "trial", "loss": self.entry.name, "seed": a["slot"], "fold": task["fold"]}
            record_failure(self.ctx, task, e, what)
        except BaseException:
            self.ctx.store.release(self.key, a["slot"])
            raise
        else:
            obj, fkey = task["fold_key"]
            rec.update(self.ctx.extras)
            rec.update(kind="fold", fold=task["fold"], key=fkey, finished_unix=time.time())
            self.ctx.store.put(fkey, task["seed"], "fold", obj, rec)
        a["out"][task["fold"]] = rec

    def _finish(self) -> None:
        import optuna

        a, self.active = self.active, None
        assert a is not None
        values = [a["out"][k].get("metrics", {}).get(PRIMARY) for k in range(len(self.folds))]
        errors = [a["out"][k]["error"] for k in range(len(self.folds)) if "error" in a["out"][k]]
        ok = not errors and all(v is not None and math.isfinite(v) for v in values)
        value = float(sum(values) / len(values)) if ok else None
        study = self.study()
        try:
            if ok:
                study.tell(a["trial"], value)
            else:
                study.tell(a["trial"], state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # already finished by a runner that took the claim over
            pass
        outs = [a["out"][k] for k in range(len(self.folds))]
        if any(o.get("lost") for o in outs):
            self.ctx.store.release(self.key, a["slot"])  # the other runner records the trial
            return
        if any(o.get("crashed") for o in outs):  # released: a later command runs the trial again
            self.ctx.store.release(self.key, a["slot"])
            self.failed.add(a["slot"])
            return
        rec = {
            "kind": "trial",
            "loss": self.entry.name,
            "family": self.entry.family,
            "slot": a["slot"],
            "seed": a["slot"],
            "trial_number": a["trial"].number,
            "params": a["trial"].params,
            "hparams": a["hparams"],
            "value": value,
            "fold_values": values,
            "errors": errors,
            "seconds": sum(a["out"][k].get("wall_seconds", 0.0) for k in range(len(self.folds))),
            "key": self.key,
            "dataset": self.ctx.extras.get("dataset"),
            "finished_unix": time.time(),
        }
        if self.ctx.store.complete(self.key, a["slot"], rec):
            self.done[a["slot"]] = rec
            self.ctx.on_record(rec, "ran")
