"""``fashion-mnist``: the standard 60k/10k split, read from IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np
import torch

from .bundle import DatasetBundle, DatasetUnavailableError, PairedDataset, RandomShift, default_data_root

FASHION_MNIST_DEFAULT_ROOTS = ("/usr/share/datasets/fashion-mnist",)


def _find_idx(roots: Sequence[str], kind: str, what: str) -> str | None:
    names = [f"{kind}-{what}-ubyte", f"{kind}-{what}-ubyte.gz"]
    for root in roots:
        for sub in ("", "FashionMNIST/raw", "raw", "fashion-mnist"):
            for n in names:
                p = os.path.join(root, sub, n)
                if os.path.isfile(p):
                    return p
    return None


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic, dims, then unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist_bundle(data_root: str | None = None, augment: bool = True) -> DatasetBundle:
    data_root = data_root or default_data_root("fashion-mnist")
    roots = [data_root] if data_root else list(FASHION_MNIST_DEFAULT_ROOTS)
    paths = {(k, w): _find_idx(roots, k, w) for k in ("train", "t10k") for w in ("images-idx3", "labels-idx1")}
    missing = [f"{k}-{w}-ubyte[.gz]" for (k, w), p in paths.items() if p is None]
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST files {missing} not found under {roots} (also looked in FashionMNIST/raw/). "
            "Install the Debian package dataset-fashion-mnist (-> /usr/share/datasets/fashion-mnist) or pass "
            "--data-root to a torchvision FashionMNIST root."
        )
    found = {key: p for key, p in paths.items() if p is not None}
    xs, ys = {}, {}
    for k in ("train", "t10k"):
        xs[k] = torch.from_numpy(read_idx(found[(k, "images-idx3")]).astype(np.float32) / 255.0).unsqueeze(1)
        ys[k] = read_idx(found[(k, "labels-idx1")]).astype(np.int64)
    mean, std = float(xs["train"].mean()), float(xs["train"].std())
    train = PairedDataset((xs["train"] - mean) / std, ys["train"], transform=RandomShift(2) if augment else None)
    test = PairedDataset((xs["t10k"] - mean) / std, ys["t10k"])
    return DatasetBundle(
        name="fashion-mnist",
        train=train,
        _test=test,
        input_kind="gray",
        input_shape=(1, 28, 28),
        description=f"Fashion-MNIST from {os.path.dirname(found[('train', 'images-idx3')])}: standard "
        f"{len(train)} train / {len(test)} test split, 10 classes, random shift <= 2 px",
        info={"root": os.path.dirname(found[("train", "images-idx3")])},
    )
