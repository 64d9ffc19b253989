"""Datasets for the head-to-head benchmark.

Every loader returns a :class:`DatasetBundle`: a train split and a test split whose labels are remapped to
``0..C-1`` per split, the input kind (which decides the default trunk), and a train-time augmentation.

Protocols (the first two run with no download):

* ``digits``: scikit-learn's 8x8 digits. Its 10 classes are too few for unseen-class retrieval, so the split is
  *within* classes (70 % / 30 % of each class's samples, fixed split seed 0). A smoke benchmark, not a ranking.
* ``omniglot``: unseen-class retrieval, train and test split **by alphabet**. Reads a folder or zip archives laid
  out as ``<alphabet>/<character>/<image>.png`` (the two small background archives, or torchvision's Omniglot
  download). With torchvision's ``images_background``/``images_evaluation`` the standard background/evaluation
  alphabets are the split; otherwise the sorted alphabets alternate train/test. Alphabet/character pairs present
  in several archives are read once. Images are resized to ``image_size`` (28 by default) for CPU budgets.
* ``fashion-mnist``: the standard 60k/10k split, same 10 classes (read from IDX files, gzipped or not).
* ``cub200``, ``cars196``, ``sop``: PML's dataset classes, standard half/half class splits.
* ``folder``, ``csv``: your own images, an image folder or a CSV file (see :mod:`benchmarks.own_data`).

Augmentations are drawn from a seed passed in with every index (see :class:`PairedDataset`), never from the
state the losses or miners consume, so that every loss sees the same augmented images at a given seed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

DATA_ENV = "PML_RLL_DATA"  # a folder holding one sub-folder per dataset: $PML_RLL_DATA/omniglot, .../cub200
FASHION_MNIST_DEFAULT_ROOTS = ("/usr/share/datasets/fashion-mnist",)
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
    evaluation: ``test`` holds the queries, searched against ``gallery`` only. While ``test_sealed`` is set (``with
    bundle.sealed():``), reading ``test`` or ``gallery`` raises :class:`TestSplitSealedError`.
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

    @contextlib.contextmanager
    def sealed(self, sealed: bool = True) -> Iterator[DatasetBundle]:
        """Within the block the test split is sealed (``sealed=False``: readable); afterwards as it was before."""
        before, self.test_sealed = self.test_sealed, sealed
        try:
            yield self
        finally:
            self.test_sealed = before

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
    :class:`benchmarks.pipeline.PairedMPerClassSampler`. For a pair, the augmentation runs inside a forked torch
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


# ----------------------------------------------------------------------------------------------------------- digits
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


# --------------------------------------------------------------------------------------------------------- omniglot
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


# ---------------------------------------------------------------------------------------------------- fashion-mnist
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


# ------------------------------------------------------------------------------------------------ CUB / Cars / SOP
PML_DATASETS = {
    "cub200": ("CUB", "CUB-200-2011: classes 1-100 train, 101-200 test", "CUB_200_2011/"),
    "cars196": ("Cars196", "Cars196: classes 1-98 train, 99-196 test", "names.csv, anno_*.csv, car_data/"),
    "sop": (
        "StanfordOnlineProducts",
        "Stanford Online Products: Ebay_train.txt / Ebay_test.txt classes",
        "Stanford_Online_Products/",
    ),
}


def rgb_transforms(image_size: int = 224, resize: int = 256):
    """The usual DML augmentations: RandomResizedCrop + flip for training, resize + centre crop for testing."""
    from torchvision import transforms as T

    to_rgb = T.Lambda(lambda im: im.convert("RGB"))
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose(
        [to_rgb, T.RandomResizedCrop(image_size, scale=(0.16, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    test = T.Compose([to_rgb, T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, test


class _ImageLoader:
    def __call__(self, path: str):
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return im.copy()


def load_pml_bundle(name: str, data_root: str | None, download: bool = False, image_size: int = 224) -> DatasetBundle:
    from pytorch_metric_learning import datasets as pml_datasets

    cls_name, desc, layout = PML_DATASETS[name]
    data_root = data_root or default_data_root(name)
    if not data_root:
        raise DatasetUnavailableError(
            f"{name} needs --data-root (a folder holding {layout}); add --download to fetch it there."
        )
    if not download and not os.path.isdir(data_root):
        raise DatasetUnavailableError(
            f"{name}: data root {data_root!r} does not exist. Expected it to hold {layout}; "
            "pass --download to fetch the dataset (needs internet) or point --data-root at a prepared copy."
        )
    cls = getattr(pml_datasets, cls_name)
    try:
        splits = {s: cls(root=data_root, split=s, download=download) for s in ("train", "test")}
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DatasetUnavailableError(
            f"{name}: could not read the dataset under {data_root!r} (expected {layout}): {e}"
        ) from e
    train_tf, test_tf = rgb_transforms(image_size)
    loader = _ImageLoader()
    train = PairedDataset(splits["train"].paths, remap_labels(splits["train"].labels), train_tf, test_tf, loader)
    test = PairedDataset(splits["test"].paths, remap_labels(splits["test"].labels), None, test_tf, loader)
    return DatasetBundle(
        name=name,
        train=train,
        _test=test,
        input_kind="rgb",
        input_shape=(3, image_size, image_size),
        description=f"{desc}; {len(train)} train / {len(test)} test images, RandomResizedCrop({image_size}) + flip",
        info={"root": data_root},
    )


DATASETS = ("digits", "omniglot", "fashion-mnist", "cub200", "cars196", "sop", "folder", "csv")


def load_dataset(
    name: str,
    data_root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    test_alphabets: Sequence[str] | None = None,
    test_classes: str | None = None,
) -> DatasetBundle:
    """Load one benchmark protocol by name (see the module docstring). ``test_classes``: ``folder`` only, a file
    naming the test classes."""
    if name in ("folder", "csv"):
        from .own_data import load_csv_bundle, load_folder_bundle

        if not data_root:
            raise DatasetUnavailableError(f"{name} needs --data-root")
        if name == "folder":
            return load_folder_bundle(data_root, image_size=image_size or 224, test_classes_file=test_classes)
        return load_csv_bundle(data_root, image_size=image_size or 224)
    if name == "digits":
        return load_digits_bundle()
    if name == "omniglot":
        return load_omniglot_bundle(data_root, image_size=image_size or 28, test_alphabets=test_alphabets)
    if name == "fashion-mnist":
        return load_fashion_mnist_bundle(data_root)
    if name in PML_DATASETS:
        return load_pml_bundle(name, data_root, download=download, image_size=image_size or 224)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


# ------------------------------------------------------------------------------------------------ identity and folds
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

    with bundle.sealed(False):
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
    for k in ("train_alphabets", "test_alphabets", "split_rule", "classes_sha1", "query_gallery"):
        if k in bundle.info:
            out[k] = bundle.info[k]
    return out


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
