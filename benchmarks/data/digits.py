"""``digits``: scikit-learn's 8x8 digits, split within classes (no download)."""

from __future__ import annotations

import numpy as np
import torch

from .bundle import DatasetBundle, PairedDataset


def load_digits_bundle(test_fraction: float = 0.3, split_seed: int = 0) -> DatasetBundle:
    """scikit-learn digits, split within classes (same 10 classes in train and test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = np.asarray(data.target, dtype=np.int64)
    rng = np.random.RandomState(split_seed)
    train_list: list[int] = []
    test_list: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test_list.extend(idx[:n_test].tolist())
        train_list.extend(idx[n_test:].tolist())
    train_idx, test_idx = np.sort(train_list), np.sort(test_list)
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    train = PairedDataset(x[train_idx], y[train_idx])
    test = PairedDataset(x[test_idx], y[test_idx])
    return DatasetBundle(
        name="digits",
        train=train,
        _test=test,
        input_kind="vector",
        input_shape=(64,),
        description=f"sklearn digits, within-class split {1 - test_fraction:.0%}/{test_fraction:.0%} "
        f"(seed {split_seed}): {len(train)} train / {len(test)} test, 10 classes",
    )
