"""The values the executor runs: a :class:`Job` (what every process of one command shares) and a :class:`Task`
(one training run, also what rank 0 sends to the other ranks under torchrun)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Job:
    """What every process needs to run any task of one command: the dataset to load, the run configuration, the
    device and per-process settings, and the store that claims are checked against."""

    dataset: str
    data_root: str | None  # None: the loaders read $PML_RLL_DATA themselves (and name it so)
    download: bool
    image_size: int | None
    test_alphabets: tuple[str, ...] | None
    test_classes: str | None
    cfg: Any  # benchmarks.execute.pipeline.RunConfig
    device: str
    workers: int
    tensorboard: bool = False
    save_models: bool = False
    threads: int = 0
    sys_path: tuple[str, ...] = ()  # folders a --config file's own loss modules are imported from
    storage: str | None = None  # workers check that their claim is still theirs
    lease: float = 120.0

    @property
    def data_key(self) -> tuple[Any, ...]:
        """What decides the loaded dataset (one bundle per process per key)."""
        return (self.dataset, self.data_root, self.image_size, tuple(self.test_alphabets or ()), self.test_classes)


@dataclass(frozen=True)
class Task:
    """One training run as the executor runs it, and as rank 0 sends it to the other ranks under torchrun.

    ``fold`` (with ``folds``): a tuning fold, trained on the other folds' classes and evaluated on the held-out one
    with the test split sealed; ``None``: a run evaluated on the test split. ``claim``: ``(key, seed, token)`` of the
    claim the run is made under (checked while it trains). ``pbar_position``: its progress bar's line (None: none).
    """

    entry: Any  # benchmarks.losses.registry.LossEntry
    hparams: dict[str, Any] | None
    seed: int
    log_dir: str
    fold: int | None = None
    folds: Any = None  # the class lists of every fold
    claim: tuple[str, int, str | None] | None = None
    pbar_position: int | None = None

    @classmethod
    def of(cls, task: dict[str, Any], *, pbar_position: int | None = None) -> Task:
        """The executor's view of a task a source handed out (a source keeps its own fields beside these)."""
        return cls(
            entry=task["entry"],
            hparams=task["hparams"],
            seed=task["seed"],
            log_dir=task["log_dir"],
            fold=task.get("fold"),
            folds=task.get("folds"),
            claim=task.get("claim"),
            pbar_position=pbar_position,
        )

    def for_other_ranks(self) -> Task:
        """What the other ranks train in step with rank 0: no claim (rank 0 alone talks to the store), no bar."""
        return replace(self, claim=None, pbar_position=None)
