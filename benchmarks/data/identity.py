"""The data part of a result key: which files (:func:`data_identity`) and which split (:func:`split_identity`)."""

from __future__ import annotations

import os

import numpy as np

from .bundle import DatasetBundle


def root_identity(root: str | None) -> dict[str, object]:
    """What identifies a data folder: its resolved path and a hash of every file's relative path, size and mtime."""
    if not root:
        return {"root": None}
    import hashlib

    real = os.path.realpath(root)
    h = hashlib.sha1()
    n = 0
    if os.path.isfile(real):
        st = os.stat(real)
        h.update(f"{os.path.basename(real)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        n = 1
    for dirpath, dirnames, filenames in os.walk(real):
        dirnames.sort()
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            try:
                st = os.stat(full)
            except OSError:
                continue
            h.update(f"{os.path.relpath(full, real)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return {"root": real, "files": n, "files_sha1": h.hexdigest()}


def data_identity(bundle: DatasetBundle) -> dict[str, object]:
    """The data part of the store key: a CSV dataset's file and image hashes, a folder's :func:`root_identity`, or
    the built-in dataset's name."""
    if "identity" in bundle.info:
        return dict(bundle.info["identity"])  # type: ignore[call-overload]
    return root_identity(str(bundle.info["root"])) if bundle.info.get("root") else {"builtin": bundle.name}


def split_identity(bundle: DatasetBundle) -> dict[str, object]:
    """The actual split of a bundle: class lists where the protocol has names (Omniglot alphabets), sizes, and a
    hash of the label arrays. The test split is read only for its labels' hash, before any training."""
    import hashlib

    sealed, bundle.test_sealed = bundle.test_sealed, False
    try:
        test = bundle.test
        h = hashlib.sha1(np.ascontiguousarray(bundle.train.labels).tobytes())
        h.update(b"|" + np.ascontiguousarray(test.labels).tobytes())
        gallery = bundle.gallery
        if gallery is not None:
            h.update(b"|gallery|" + np.ascontiguousarray(gallery.labels).tobytes())
        out: dict[str, object] = {
            "train_items": len(bundle.train),
            "test_items": len(test),
            "train_classes": bundle.num_train_classes,
            "test_classes": int(len(np.unique(test.labels))),
            "labels_sha1": h.hexdigest(),
        }
        if gallery is not None:
            out["gallery_items"] = len(gallery)
    finally:
        bundle.test_sealed = sealed
    for k in ("train_alphabets", "test_alphabets", "split_rule", "classes_sha1", "query_gallery"):
        if k in bundle.info:
            out[k] = bundle.info[k]
    return out
