"""The splits every dataset loader returns (:class:`DatasetBundle`), their items and augmentations."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

DATA_ENV = "PML_RLL_DATA"  # a folder holding one sub-folder per dataset: $PML_RLL_DATA/omniglot, .../cub200
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetUnavailableError(RuntimeError):
    """Raised when a dataset's files cannot be found; the message says where they were looked for."""


def default_data_root(dataset: str) -> str | None:
    """``$PML_RLL_DATA/<dataset>`` when the environment variable is set, else None."""
    base = os.environ.get(DATA_ENV)
    return os.path.join(base, dataset) if base else None


class TestSplitSealedError(RuntimeError):
    """Raised when the test split of a sealed bundle is read (hyper-parameter tuning must never see it)."""


@dataclass
class DatasetBundle:
    """Train and test splits of one benchmark protocol.

    ``train`` and ``test`` are :class:`PairedDataset` objects. ``input_kind`` is ``"vector"`` (flat features),
    ``"gray"`` (1 x H x W tensors) or ``"rgb"`` (PIL images turned into 3 x 224 x 224 tensors). ``groups``
    (optional) gives, per training sample, the group its class belongs to (Omniglot: its alphabet), so that tuning
    folds keep whole groups together. ``gallery`` (optional) turns the test split into query-vs-gallery
    evaluation: ``test`` holds the queries, searched against ``gallery`` only. While ``test_sealed`` is set, reading
    ``test`` or ``gallery`` raises :class:`TestSplitSealedError`.
    """

    name: str
    train: PairedDataset
    _test: PairedDataset
    input_kind: str
    input_shape: tuple[int, ...]
    description: str
    info: dict[str, object] = field(default_factory=dict)
    groups: np.ndarray | None = None
    test_sealed: bool = False
    _gallery: PairedDataset | None = None

    @property
    def test(self) -> PairedDataset:
        if self.test_sealed:
            raise TestSplitSealedError(f"{self.name}: the test split was read while it is sealed (tuning)")
        return self._test

    @property
    def gallery(self) -> PairedDataset | None:
        if self.test_sealed:
            raise TestSplitSealedError(f"{self.name}: the test gallery was read while it is sealed (tuning)")
        return self._gallery

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def num_train_classes(self) -> int:
        return int(len(np.unique(self.train.labels)))


def remap_labels(labels: npt.ArrayLike) -> np.ndarray:
    """Map arbitrary integer labels to 0..C-1 in sorted order."""
    labels = np.asarray(labels)
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.int64)


class PairedDataset(Dataset):
    """A dataset whose random augmentation is driven by a seed that comes with the index.

    ``__getitem__`` accepts an ``int`` (no augmentation: evaluation) or an ``(index, aug_seed)`` pair produced by
    :class:`benchmarks.execute.pipeline.PairedMPerClassSampler`. For a pair, the augmentation runs inside a forked torch
    RNG seeded with ``aug_seed``: the result depends only on the pair, not on how much randomness the losses,
    miners or other data-loader workers have consumed, and the global RNG is left untouched.

    Args:
        items: a tensor (N x ...) of inputs, or a sequence that ``loader`` turns into an input.
        labels: integer labels, length N.
        transform: train-time augmentation (callable on one input), or ``None``.
        eval_transform: deterministic transform applied when no seed is given (and before nothing else).
        loader: optional callable mapping ``items[i]`` to an input (e.g. a PIL image reader).
    """

    def __init__(
        self,
        items,
        labels: npt.ArrayLike,
        transform: Callable | None = None,
        eval_transform: Callable | None = None,
        loader: Callable | None = None,
    ) -> None:
        self.items = items
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise ValueError(f"items ({len(self.items)}) and labels ({len(self.labels)}) differ in length")
        self.transform = transform
        self.eval_transform = eval_transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.labels)

    def _raw(self, idx: int):
        x = self.items[idx]
        return self.loader(x) if self.loader is not None else x

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            idx, aug_seed = int(key[0]), int(key[1])
            x = self._raw(idx)
            if self.transform is not None:
                with torch.random.fork_rng(devices=[]):  # CPU generator only: transforms run on CPU
                    torch.default_generator.manual_seed(aug_seed)
                    x = self.transform(x)
            elif self.eval_transform is not None:
                x = self.eval_transform(x)
        else:
            idx = int(key)
            x = self._raw(idx)
            if self.eval_transform is not None:
                x = self.eval_transform(x)
        return x, int(self.labels[idx])


class RandomShift:
    """Shift a C x H x W tensor by up to ``max_shift`` pixels in each direction (zero fill); torch RNG."""

    def __init__(self, max_shift: int = 2) -> None:
        self.max_shift = int(max_shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        if s <= 0:
            return x
        dy, dx = (torch.randint(-s, s + 1, (2,))).tolist()
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        h, w = x.shape[-2:]
        return padded[..., s + dy : s + dy + h, s + dx : s + dx + w]

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"
