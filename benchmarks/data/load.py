"""One benchmark protocol by name (:func:`load_dataset`; the protocols are listed in :mod:`benchmarks.data`)."""

from __future__ import annotations

from collections.abc import Sequence

from .bundle import DatasetBundle, DatasetUnavailableError
from .digits import load_digits_bundle
from .fashion_mnist import load_fashion_mnist_bundle
from .omniglot import load_omniglot_bundle
from .pml_images import PML_DATASETS, load_pml_bundle

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
