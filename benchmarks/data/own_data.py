"""Your own data, no code: an image folder (``--dataset folder``) or a CSV file (``--dataset csv``).

Image folder, ``DIR/<class>/<image>``: every sub-folder of DIR is a class, every image file below it (any depth) an
item. The split is class-disjoint: by default the sorted class names are halved, the first half trains and the
second half tests (an odd count gives the extra class to training); ``--test-classes FILE`` names the test classes
instead (one per line; blank lines and lines starting with ``#`` are skipped).

CSV file, one row per image::

    path,label,split,is_query,is_gallery
    images/0001.jpg,shoe_12,train,,
    images/0420.jpg,shirt_3,test,1,0
    images/0421.jpg,shirt_3,test,0,1

``path`` is relative to the CSV file's folder (or absolute), ``label`` any non-empty text, ``split`` ``train`` or
``test``. ``is_query``/``is_gallery`` (optional, 1/0, true/false, yes/no; a blank cell is 0) switch the test split
to query-vs-gallery evaluation, the In-Shop protocol: each query is searched against the gallery only. With only
one of the two columns, the other is its negation. A test row must then be a query or a gallery item, not both.
Without them, every test image is a query searched against all the other test images.

Images are read lazily with the usual RGB transforms (grayscale images become RGB). Every image is opened once
before any training, so that bad data stops the run with one line naming the file (and the CSV row): a missing or
unreadable image, a training class with a single image, an empty label, an unknown split, no test classes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys

import tqdm

from .bundle import DatasetBundle, PairedDataset, remap_labels
from .pml_images import rgb_transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CSV_COLUMNS = ("path", "label", "split")
CSV_FLAGS = ("is_query", "is_gallery")
_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f", "")


class BadDataError(ValueError):
    """Raised for data the benchmark cannot use; the one-line message names the file (and the CSV row)."""


class ImageFileLoader:
    """Reads one image file into a PIL image; an image that cannot be read raises :class:`BadDataError` naming it."""

    def __call__(self, path: str):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (OSError, SyntaxError, ValueError) as e:
            raise BadDataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def check_images(paths: list[str], where: list[str]) -> None:
    """Open every image once (PIL's ``verify``); the first missing or unreadable one raises :class:`BadDataError`
    with its ``where`` (a file name, or a CSV file and row) in the message."""
    from PIL import Image

    for path, at in zip(
        tqdm.tqdm(paths, desc="checking images", disable=len(paths) < 2000, file=sys.stderr, leave=False), where
    ):
        named = f"{at}: image {path}" if at != path else f"{path}: image"
        if not os.path.isfile(path):
            raise BadDataError(f"{named} does not exist")
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, SyntaxError, ValueError) as e:
            raise BadDataError(f"{named} cannot be read ({type(e).__name__}: {e})") from None


def _sha1_json(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _transforms(image_size: int, augment: bool):
    train_tf, test_tf = rgb_transforms(image_size, resize=max(image_size, round(image_size * 256 / 224)))
    return (train_tf if augment else test_tf), test_tf


# ---------------------------------------------------------------------------------------------------- image folder
def read_test_classes(path: str, classes: list[str]) -> list[str]:
    """The class names listed in ``path`` (one per line); an unknown or repeated name raises naming its line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise BadDataError(f"--test-classes {path}: {e.strerror}") from None
    known = set(classes)
    out: list[str] = []
    for i, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name not in known:
            raise BadDataError(f"{path} line {i}: no class folder named {name!r}")
        if name in out:
            raise BadDataError(f"{path} line {i}: class {name!r} listed twice")
        out.append(name)
    if not out:
        raise BadDataError(f"{path}: names no test class")
    return sorted(out)


def scan_folder(root: str) -> dict[str, list[str]]:
    """``{class name: sorted image paths}`` for ``root/<class>/...``; a class folder without images raises."""
    if not os.path.isdir(root):
        raise BadDataError(f"{root}: not a folder (expected {root}/<class>/<image>)")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise BadDataError(f"{root}: holds no class folders (expected {root}/<class>/<image>)")
    out: dict[str, list[str]] = {}
    for c in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not files:
            raise BadDataError(
                f"{os.path.join(root, c)}: class folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        out[c] = files
    return out


def load_folder_bundle(
    root: str, image_size: int = 224, test_classes_file: str | None = None, augment: bool = True
) -> DatasetBundle:
    """An image folder ``root/<class>/<image>``, split class-disjointly (see the module docstring)."""
    members = scan_folder(root)
    classes = list(members)
    if test_classes_file:
        test = read_test_classes(test_classes_file, classes)
        rule = f"test classes listed in {test_classes_file}"
    else:
        test = classes[(len(classes) + 1) // 2 :]
        rule = "sorted classes halved: first half train, second half test"
    train = [c for c in classes if c not in set(test)]
    if not test:
        raise BadDataError(f"{root}: no test classes (only {len(classes)} class folder); the split needs two classes")
    if not train:
        raise BadDataError(f"{test_classes_file}: names every class as a test class; no training class is left")
    for c in train:
        if len(members[c]) < 2:
            raise BadDataError(
                f"{members[c][0]}: the only image of training class {c!r}; MPerClassSampler needs at least 2 images "
                "per class (add images, or list the class in --test-classes)"
            )
    paths = {s: [p for c in names for p in members[c]] for s, names in (("train", train), ("test", test))}
    labels = {s: [c for c in names for _ in members[c]] for s, names in (("train", train), ("test", test))}
    everything = paths["train"] + paths["test"]
    check_images(everything, everything)
    train_tf, test_tf = _transforms(image_size, augment)
    loader = ImageFileLoader()
    tr = PairedDataset(paths["train"], remap_labels(labels["train"]), train_tf, test_tf, loader)
    te = PairedDataset(paths["test"], remap_labels(labels["test"]), None, test_tf, loader)
    return DatasetBundle(
        name="folder",
        train=tr,
        _test=te,
        input_kind="rgb",
        input_shape=(3, image_size, image_size),
        description=(
            f"image folder {root} ({rule}): {len(train)} train classes ({len(tr)} images), {len(test)} test classes "
            f"({len(te)} images); RandomResizedCrop({image_size}) + flip"
        ),
        info={
            "root": root,
            "split_rule": rule,
            "classes_sha1": _sha1_json({"train": train, "test": test}),
        },
    )


# ---------------------------------------------------------------------------------------------------- CSV
def _flag(value: str | None, column: str, at: str) -> bool:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise BadDataError(f"{at}: {column} must be 1/0 (true/false, yes/no), got {value!r}")


def csv_identity(csv_path: str, paths: list[str]) -> dict[str, object]:
    """What identifies a CSV dataset: the file's resolved path and content hash, and a hash of every image's path,
    size and modification time (a changed CSV or a changed image is new data)."""
    real = os.path.realpath(csv_path)
    with open(real, "rb") as f:
        content = hashlib.sha1(f.read()).hexdigest()
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"csv": real, "csv_sha1": content, "images": len(paths), "images_sha1": h.hexdigest()}


def load_csv_bundle(csv_path: str, image_size: int = 224, augment: bool = True) -> DatasetBundle:
    """A CSV dataset (see the module docstring); bad rows raise :class:`BadDataError` naming the file and row."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    try:
        f = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise BadDataError(f"{csv_path}: {e.strerror}") from None
    rows: list[tuple[int, str, str, str, bool, bool]] = []  # (line, path, label, split, is_query, is_gallery)
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise BadDataError(
                f"{csv_path}: missing columns {missing} (header: {header}; expected {list(CSV_COLUMNS)})"
            )
        has_q, has_g = "is_query" in header, "is_gallery" in header
        try:
            for row in reader:
                at = f"{csv_path} row {reader.line_num}"
                path = (row.get("path") or "").strip()
                label = (row.get("label") or "").strip()
                split = (row.get("split") or "").strip().lower()
                if not path:
                    raise BadDataError(f"{at}: empty path")
                if not label:
                    raise BadDataError(f"{at}: empty label")
                if split not in ("train", "test"):
                    raise BadDataError(f"{at}: split must be train or test, got {row.get('split')!r}")
                q = _flag(row.get("is_query"), "is_query", at) if has_q else None
                g = _flag(row.get("is_gallery"), "is_gallery", at) if has_g else None
                if q is None:
                    q = not g if g is not None else True
                if g is None:
                    g = not q if has_q else True
                if split == "test" and (has_q or has_g) and q == g:
                    both = "both a query and a gallery item" if q else "neither a query nor a gallery item"
                    raise BadDataError(f"{at}: a test row must be a query or a gallery item, this one is {both}")
                full = path if os.path.isabs(path) else os.path.join(folder, path)
                rows.append((reader.line_num, os.path.normpath(full), label, split, q, g))
        except csv.Error as e:
            raise BadDataError(f"{csv_path} row {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise BadDataError(f"{csv_path}: no rows")
    train_rows = [r for r in rows if r[3] == "train"]
    test_rows = [r for r in rows if r[3] == "test"]
    if not train_rows:
        raise BadDataError(f"{csv_path}: no training rows (split=train)")
    if not test_rows:
        raise BadDataError(f"{csv_path}: no test rows (split=test): no test classes")
    counts: dict[str, list[int]] = {}
    for r in train_rows:
        counts.setdefault(r[2], []).append(r[0])
    for label, lines in counts.items():
        if len(lines) < 2:
            raise BadDataError(
                f"{csv_path} row {lines[0]}: the only training image of class {label!r}; MPerClassSampler needs at "
                "least 2 images per class"
            )
    check_images([r[1] for r in rows], [f"{csv_path} row {r[0]}" for r in rows])
    query_mode = has_q or has_g
    train_tf, test_tf = _transforms(image_size, augment)
    loader = ImageFileLoader()
    tr = PairedDataset([r[1] for r in train_rows], remap_labels([r[2] for r in train_rows]), train_tf, test_tf, loader)
    test_labels = remap_labels([r[2] for r in test_rows])  # one label space for queries and gallery
    gallery = None
    if query_mode:
        qi = [i for i, r in enumerate(test_rows) if r[4]]
        gi = [i for i, r in enumerate(test_rows) if r[5]]
        if not qi or not gi:
            raise BadDataError(
                f"{csv_path}: query-vs-gallery evaluation needs test rows of both kinds "
                f"({len(qi)} queries, {len(gi)} gallery items)"
            )
        te = PairedDataset([test_rows[i][1] for i in qi], test_labels[qi], None, test_tf, loader)
        gallery = PairedDataset([test_rows[i][1] for i in gi], test_labels[gi], None, test_tf, loader)
        evaluation = f"{len(qi)} queries against a gallery of {len(gi)}"
    else:
        te = PairedDataset([r[1] for r in test_rows], test_labels, None, test_tf, loader)
        evaluation = "every test image against the others"
    n_tr, n_te = len(counts), len({r[2] for r in test_rows})
    return DatasetBundle(
        name="csv",
        train=tr,
        _test=te,
        input_kind="rgb",
        input_shape=(3, image_size, image_size),
        description=(
            f"CSV dataset {csv_path}: {n_tr} train classes ({len(tr)} images), {n_te} test classes "
            f"({len(test_rows)} images, {evaluation}); RandomResizedCrop({image_size}) + flip"
        ),
        info={
            "csv": csv_path,
            "query_gallery": query_mode,
            "identity": csv_identity(csv_path, [r[1] for r in rows]),
        },
        _gallery=gallery,
    )
