"""``omniglot``: unseen-class retrieval, train and test split by alphabet (a folder or zip archives)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from functools import partial
from typing import Callable

import numpy as np
import torch

from .bundle import (
    DATA_ENV,
    DatasetBundle,
    DatasetUnavailableError,
    PairedDataset,
    RandomShift,
    default_data_root,
    remap_labels,
)


def _omniglot_sources(root: str) -> list[tuple[str, str]]:
    """List (kind, path) sources under root: extracted folders and zip archives (a zip is skipped when a folder
    with the same stem sits beside it)."""
    if not os.path.exists(root):
        return []
    if os.path.isfile(root) and root.endswith(".zip"):
        return [("zip", root)]
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(".zip") and not os.path.isdir(os.path.join(dirpath, f[:-4])):
                sources.append(("zip", os.path.join(dirpath, f)))
        if any(f.lower().endswith(".png") for f in filenames):
            sources.append(("dir", dirpath))
    return sources


def _decode_omniglot(raw: bytes, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as src:
        im = src.convert("L")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BOX)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return 1.0 - arr  # strokes are dark on white: make strokes 1, background 0


def read_omniglot(root: str, image_size: int = 28) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Read every ``<archive>/<alphabet>/<character>/<file>.png`` under root (folders and zips).

    Returns images (N x S x S float32 in [0, 1], strokes = 1) and keys (archive, alphabet, character). Images are
    de-duplicated by (alphabet, character, file name): the small archives both hold Greek and Latin.
    """
    seen: dict[tuple[str, str, str], int] = {}
    images: list[np.ndarray] = []
    keys: list[tuple[str, str, str]] = []

    def add(path_parts: list[str], read: Callable[[], bytes]):
        if len(path_parts) < 3:
            return
        archive = path_parts[-4] if len(path_parts) >= 4 else ""
        alphabet, character, fname = path_parts[-3], path_parts[-2], path_parts[-1]
        key = (alphabet, character, fname)
        if key in seen:
            return
        seen[key] = len(images)
        images.append(_decode_omniglot(read(), image_size))
        keys.append((archive, alphabet, character))

    for kind, path in _omniglot_sources(root):
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                for name in sorted(z.namelist()):
                    if name.lower().endswith(".png"):
                        add(name.split("/"), partial(z.read, name))
        else:
            rel = os.path.relpath(path, root)
            prefix = [] if rel == "." else rel.split(os.sep)
            prefix = [os.path.basename(os.path.abspath(root))] + prefix
            for f in sorted(os.listdir(path)):
                if f.lower().endswith(".png"):
                    full = os.path.join(path, f)

                    def read(full=full) -> bytes:
                        with open(full, "rb") as fh:
                            return fh.read()

                    add(prefix + [f], read)
    if not images:
        return np.zeros((0, image_size, image_size), np.float32), []
    return np.stack(images), keys


def omniglot_alphabet_split(
    keys: list[tuple[str, str, str]], test_alphabets: Sequence[str] | None = None
) -> tuple[list[str], list[str], str]:
    """Decide train and test alphabets. Returns (train_alphabets, test_alphabets, rule)."""
    alphabets = sorted({k[1] for k in keys})
    if test_alphabets:
        unknown = sorted(set(test_alphabets) - set(alphabets))
        if unknown:
            raise ValueError(f"--test-alphabets names unknown alphabets {unknown}; available: {alphabets}")
        test = sorted(test_alphabets)
        rule = "given by --test-alphabets"
    else:
        archive_of: dict[str, set[str]] = {}
        for archive, alphabet, _ in keys:
            archive_of.setdefault(alphabet, set()).add(archive)
        evaluation = sorted(a for a, arch in archive_of.items() if any("evaluation" in x for x in arch))
        background = sorted(a for a, arch in archive_of.items() if any("background" in x for x in arch))
        if evaluation and len(evaluation) < len(alphabets) and not set(evaluation) & set(background):
            test = evaluation
            rule = "standard Omniglot background (train) / evaluation (test) alphabets"
        else:
            test = alphabets[1::2]
            rule = "sorted alphabets alternate train/test (1st, 3rd, ... train; 2nd, 4th, ... test)"
    train = [a for a in alphabets if a not in set(test)]
    if not train or not test:
        raise ValueError(f"alphabet split leaves an empty side: train={train}, test={test}")
    return train, test, rule


def load_omniglot_bundle(
    data_root: str | None = None,
    image_size: int = 28,
    test_alphabets: Sequence[str] | None = None,
    augment: bool = True,
) -> DatasetBundle:
    shown = data_root or f"${DATA_ENV}/omniglot"  # how the description names the folder
    data_root = data_root or default_data_root("omniglot")
    if not data_root:
        raise DatasetUnavailableError(
            f"omniglot needs --data-root (a folder holding the Omniglot zips or folders), or {DATA_ENV} set to a "
            "folder with an omniglot/ sub-folder"
        )
    images, keys = read_omniglot(data_root, image_size=image_size)
    if not keys:
        raise DatasetUnavailableError(
            f"Omniglot not found: looked for <alphabet>/<character>/*.png folders or zip archives under "
            f"{data_root!r}. Pass --data-root pointing at the folder holding the Omniglot zips (e.g. torchvision's "
            "omniglot-py folder, or images_background.zip / images_evaluation.zip)."
        )
    train_alph, test_alph, rule = omniglot_alphabet_split(keys, test_alphabets)
    alphabet = np.array([k[1] for k in keys])
    class_key = np.array([f"{k[1]}/{k[2]}" for k in keys])
    is_test = np.isin(alphabet, test_alph)
    x = torch.from_numpy(images).unsqueeze(1)  # N x 1 x S x S
    mean, std = float(x[~is_test].mean()), float(x[~is_test].std())
    x = (x - mean) / std
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    train = PairedDataset(x[tr], remap_labels(class_key[tr]), transform=RandomShift(2) if augment else None)
    test = PairedDataset(x[te], remap_labels(class_key[te]))
    n_tr_cls, n_te_cls = len(np.unique(class_key[tr])), len(np.unique(class_key[te]))
    return DatasetBundle(
        name="omniglot",
        train=train,
        _test=test,
        input_kind="gray",
        input_shape=(1, image_size, image_size),
        description=(
            f"Omniglot from {shown}, alphabet split ({rule}); train alphabets {train_alph} "
            f"({n_tr_cls} characters, {len(tr)} images), test alphabets {test_alph} "
            f"({n_te_cls} characters, {len(te)} images); {image_size}x{image_size}, random shift <= 2 px"
        ),
        info={"train_alphabets": train_alph, "test_alphabets": test_alph, "split_rule": rule, "root": data_root},
        groups=alphabet[tr],
    )
