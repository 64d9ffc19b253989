"""Tuning folds: the training classes dealt into disjoint folds, whole groups kept together."""

from __future__ import annotations

import numpy as np
import torch

from .bundle import DatasetBundle, PairedDataset, remap_labels


def class_folds(bundle: DatasetBundle, k: int) -> list[list[int]]:
    """Split the training classes into ``k`` disjoint folds, whole groups (Omniglot alphabets) kept together.

    Groups (or classes, when the bundle has no groups) are sorted, then dealt largest first to the fold with the
    fewest classes so far (ties: the lower fold index). Deterministic; returns the training labels of each fold.
    """
    labels = bundle.train.labels
    groups = bundle.groups if bundle.groups is not None else labels.astype(str)
    members: dict[str, set[int]] = {}
    for g, y in zip(groups.tolist(), labels.tolist()):
        members.setdefault(str(g), set()).add(int(y))
    if len(members) < k:
        raise ValueError(
            f"--folds {k}: the training split has only {len(members)} "
            f"{'groups' if bundle.groups is not None else 'classes'} to divide"
        )
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in sorted(members, key=lambda g: (-len(members[g]), g)):
        target = min(range(k), key=lambda i: (len(folds[i]), i))
        folds[target].extend(sorted(members[g]))
    return [sorted(f) for f in folds]


def fold_bundle(bundle: DatasetBundle, folds: list[list[int]], held_out: int) -> DatasetBundle:
    """Train on every fold but ``held_out``, evaluate on ``held_out``: a bundle built from the training split only
    (the test split is not touched), labels remapped per side."""
    labels = bundle.train.labels
    held = np.isin(labels, folds[held_out])
    tr, va = np.flatnonzero(~held), np.flatnonzero(held)
    src = bundle.train

    def subset(idx: np.ndarray, transform) -> PairedDataset:
        items = src.items[idx] if isinstance(src.items, (torch.Tensor, np.ndarray)) else [src.items[i] for i in idx]
        return PairedDataset(items, remap_labels(labels[idx]), transform, src.eval_transform, src.loader)

    groups = bundle.groups[tr] if bundle.groups is not None else None
    return DatasetBundle(
        name=bundle.name,
        train=subset(tr, src.transform),
        _test=subset(va, None),
        input_kind=bundle.input_kind,
        input_shape=bundle.input_shape,
        description=f"{bundle.name} training classes, fold {held_out + 1} of {len(folds)} held out "
        f"({len(folds[held_out])} classes, {len(va)} items) for validation",
        info={"fold": held_out, "folds": len(folds)},
        groups=groups,
    )
