"""Your own data: image folders and CSV files (benchmarks/data/own_data.py), their bad-data errors, their identity."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from benchmarks.data.identity import data_identity, split_identity
from benchmarks.data.load import load_dataset
from benchmarks.data.own_data import BadDataError
from benchmarks.examples.make_tiny_dataset import make_tiny_dataset
from benchmarks.execute import pipeline
from benchmarks.run import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny")), classes=6, per_class=4, size=24)


def _write_csv(path, rows, header=("path", "label", "split", "is_query", "is_gallery")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _image(path, gray=False, size=16):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = (np.random.RandomState(len(str(path))).rand(size, size, 3) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    (im.convert("L") if gray else im).save(path)
    return str(path)


def test_folder_split_is_class_disjoint_halves_and_reads_gray_and_rgb(tiny):
    b = load_dataset("folder", tiny["folder"], image_size=20)
    assert b.input_kind == "rgb" and b.input_shape == (3, 20, 20)
    assert b.num_train_classes == 3 and len(np.unique(b.test.labels)) == 3  # sorted classes halved
    assert len(b.train) == 12 and len(b.test) == 12
    assert {os.path.basename(os.path.dirname(p)) for p in b.train.items} == {"class_000", "class_001", "class_002"}
    assert {os.path.basename(os.path.dirname(p)) for p in b.test.items} == {"class_003", "class_004", "class_005"}
    gray = next(i for i, p in enumerate(b.train.items) if p.endswith("003.png") and "class_000" in p)
    from PIL import Image

    assert Image.open(b.train.items[gray]).mode == "L"  # stored grayscale, read as RGB
    x, y = b.train[gray]
    assert x.shape == (3, 20, 20) and y == 0
    xa, _ = b.train[(gray, 7)]
    xb, _ = b.train[(gray, 7)]
    assert torch.equal(xa, xb)  # augmentation seeded by the index pair
    assert b.gallery is None


def test_folder_test_classes_file(tiny, tmp_path):
    f = tmp_path / "test.txt"
    f.write_text("# held out\nclass_000\n\nclass_005\n")
    b = load_dataset("folder", tiny["folder"], image_size=20, test_classes=str(f))
    assert {os.path.basename(os.path.dirname(p)) for p in b.test.items} == {"class_000", "class_005"}
    assert b.num_train_classes == 4
    other = load_dataset("folder", tiny["folder"], image_size=20)
    assert split_identity(b) != split_identity(other)
    f.write_text("class_000\nnope\n")
    with pytest.raises(BadDataError, match=r"test.txt line 2: no class folder named 'nope'"):
        load_dataset("folder", tiny["folder"], test_classes=str(f))


def test_csv_query_gallery_shares_one_label_space(tiny):
    b = load_dataset("csv", tiny["csv"], image_size=20)
    assert b.gallery is not None and len(b.test) == 6 and len(b.gallery) == 6
    # queries and gallery items of one class carry one label
    for q_path, q_label in zip(b.test.items, b.test.labels):
        cls = os.path.basename(os.path.dirname(q_path))
        same = [lab for p, lab in zip(b.gallery.items, b.gallery.labels) if f"/{cls}/" in p]
        assert same and set(same) == {q_label}
    assert not set(b.test.items) & set(b.gallery.items)
    assert b.gallery[0][0].shape == (3, 20, 20)
    sid = split_identity(b)
    assert sid["gallery_items"] == 6 and sid["query_gallery"] is True
    b.test_sealed = True
    with pytest.raises(Exception, match="sealed"):
        _ = b.gallery


def test_csv_without_flags_is_all_against_all(tiny, tmp_path):
    rows = list(csv.reader(open(tiny["csv"])))[1:]
    folder = os.path.dirname(tiny["csv"])
    path = _write_csv(os.path.join(folder, "plain.csv"), [r[:3] for r in rows], header=("path", "label", "split"))
    b = load_dataset("csv", path)
    assert b.gallery is None and len(b.test) == 12 and len(b.train) == 12


def test_data_identity_changes_with_the_csv_or_an_image(tmp_path):
    d = make_tiny_dataset(str(tmp_path), classes=4, per_class=3, size=12)
    ident = data_identity(load_dataset("csv", d["csv"]))
    assert ident["images"] == 12 and len(str(ident["csv_sha1"])) == 40
    rows = list(csv.reader(open(d["csv"])))
    rows[1][1], rows[4][1] = rows[4][1], rows[1][1]  # same size and images, two labels swapped
    _write_csv(d["csv"], rows[1:], header=rows[0])
    ident2 = data_identity(load_dataset("csv", d["csv"]))
    assert ident2["csv_sha1"] != ident["csv_sha1"]
    img = os.path.join(d["folder"], "class_003", "000.png")
    os.utime(img, ns=(1, 1))
    assert data_identity(load_dataset("csv", d["csv"]))["images_sha1"] != ident2["images_sha1"]
    folder_id = data_identity(load_dataset("folder", d["folder"]))
    os.utime(img, ns=(2, 2))
    assert data_identity(load_dataset("folder", d["folder"]))["files_sha1"] != folder_id["files_sha1"]


# --------------------------------------------------------------------------------------------- bad data, runner
def _bad_cases(tmp_path):
    """(argv for --dataset/--data-root, expected text naming the file/row)."""
    good = [_image(tmp_path / "img" / f"{c}{i}.png", gray=i == 0) for c in "abcd" for i in range(3)]
    rel = [os.path.relpath(p, tmp_path) for p in good]

    def rows(**change):
        out = []
        for i, r in enumerate(rel):  # a, b train; c, d test: even rows queries, odd rows gallery
            test = r[4] in "cd"
            out.append(
                [r, r[4], "test" if test else "train", str(i % 2 ^ 1) if test else "", str(i % 2) if test else ""]
            )
        for i, row in change.items():
            out[int(i[1:])] = row
        return out

    (tmp_path / "img" / "broken.png").write_bytes(b"not an image at all")
    cases = {
        "missing image": (
            _write_csv(tmp_path / "missing.csv", rows(r4=["img/nope.png", "b", "train", "", ""])),
            "missing.csv row 6: image",
        ),
        "unreadable image": (
            _write_csv(tmp_path / "broken.csv", rows(r2=["img/broken.png", "a", "train", "", ""])),
            "broken.csv row 4:",
        ),
        "empty label": (
            _write_csv(tmp_path / "label.csv", rows(r7=[rel[7], "", "test", "", ""])),
            "label.csv row 9: empty label",
        ),
        "one image in train": (
            _write_csv(tmp_path / "one.csv", rows(r3=[rel[3], "z", "train", "", ""])),
            "one.csv row 5: the only training image of class 'z'",
        ),
        "no test classes": (
            _write_csv(tmp_path / "notest.csv", [[r, r[4], "train", "", ""] for r in rel]),
            "notest.csv: no test rows",
        ),
        "bad split": (
            _write_csv(tmp_path / "split.csv", rows(r0=[rel[0], "a", "val", "", ""])),
            "split.csv row 2: split",
        ),
        "query and gallery": (
            _write_csv(tmp_path / "qg.csv", rows(r9=[rel[9], "d", "test", "1", "1"])),
            "qg.csv row 11: a test row must be a query or a gallery item",
        ),
    }
    folder_one = tmp_path / "f_one"
    for c, n in (("a", 1), ("b", 3), ("c", 2), ("d", 2)):
        for i in range(n):
            _image(folder_one / c / f"{i}.png")
    cases["folder: one image in train"] = (str(folder_one), "f_one/a/0.png: the only image of training class 'a'")
    folder_bad = tmp_path / "f_bad"
    for c in "abcd":
        for i in range(2):
            _image(folder_bad / c / f"{i}.png")
    (folder_bad / "c" / "2.jpg").write_bytes(b"\xff\xd8 garbage")
    cases["folder: unreadable image"] = (str(folder_bad), "f_bad/c/2.jpg: image cannot be read")
    folder_single = tmp_path / "f_single"
    for i in range(3):
        _image(folder_single / "only" / f"{i}.png")
    cases["folder: no test classes"] = (str(folder_single), "no test classes")
    return cases


def test_bad_data_exits_2_with_one_line_naming_file_and_row_before_training(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("training started on bad data")

    monkeypatch.setattr(pipeline, "run_one", refuse)
    for name, (root, message) in _bad_cases(tmp_path).items():
        dataset = "csv" if root.endswith(".csv") else "folder"
        argv = ["--dataset", dataset, "--data-root", root, "--losses", "triplet", "--seeds", "1"]
        argv += ["--trunk", "convnet-small", "--batch-size", "4", "--m-per-class", "2", "--workers", "0"]
        assert main(argv + ["--out", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (name, err)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "folder"], "--data-root is required for folder"),
        (["--dataset", "csv", "--data-root", "/nonexistent.csv"], "does not exist"),
        (["--dataset", "csv", "--data-root", "."], "--dataset csv needs a CSV file"),
        (["--dataset", "folder", "--data-root", "setup.cfg"], "--dataset folder needs a folder"),
        (["--test-classes", "setup.cfg"], "--test-classes applies to --dataset folder only"),
        (["--dataset", "folder", "--data-root", ".", "--test-classes", "/nonexistent"], "--test-classes"),
    ],
)
def test_bad_own_data_options_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    from benchmarks.data import load as datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
