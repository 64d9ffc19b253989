"""``cub200``, ``cars196``, ``sop``: PML's image dataset classes, standard half/half class splits."""

from __future__ import annotations

import os

from .bundle import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetBundle,
    DatasetUnavailableError,
    PairedDataset,
    default_data_root,
    remap_labels,
)

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
