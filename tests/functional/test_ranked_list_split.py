"""The split path (positives listed from the labels, negatives in lean blocks) equals the list path and the loop
reference, in every way it processes a block, and is taken only where it applies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pml_rll.functional.ranked_list_euclidean as euclid_mod
import pml_rll.functional.ranked_list_split as split_mod
from pml_rll.functional.numerics import add_pair_product
from pml_rll.functional.ranked_list import dense_masks, label_masks, same_label_pairs
from pml_rll.functional.ranked_list_euclidean import ranked_list_euclidean
from pml_rll.functional.ranked_list_params import RankedListParams
from pml_rll.functional.ranked_list_split import ranked_list_split, split_supported, squared_boundary
from pml_rll.losses import RankedListLoss
from tests.conftest import needs_cpu_float16
from tests.functional.test_ranked_list_dense import assert_same, clustered, run
from tests.reference.ranked_list_loss import reference_losses, reference_paper_gradient

# Tn * alpha within the constant-shift limit: the split path applies (Tp is free: positives are lists)
PARAMS = [
    RankedListParams(),
    RankedListParams(margin=0.3, Tp=3.0, Tn=5.0, imbalance=0.3),
    RankedListParams(margin=0.6, alpha=1.0, Tp=0.5, Tn=30.0, imbalance=0.8),
]


def many_classes(n=64, seed=0, dtype=torch.float64):
    """Clustered, 3-4 samples per class (sparse positives), near-duplicates across classes."""
    return clustered(n=n, classes=n // 3, seed=seed, dtype=dtype)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the split forward pass (so a test knows the split path really ran)."""
    calls = []
    real = split_mod._split_forward
    monkeypatch.setattr(split_mod, "_split_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def small_blocks(monkeypatch, listing):
    """Panels of 8 queries (batch) or 8 x 16 blocks (reference set); ``listing``: every block after the first
    listed (the first is always dense)."""
    monkeypatch.setattr(split_mod, "_SAME_BLOCK", 8)
    monkeypatch.setattr(split_mod, "_REF_BLOCK_ROWS", 8)
    monkeypatch.setattr(split_mod, "_BLOCK_ELEMENTS", 8 * 16)
    monkeypatch.setattr(split_mod, "_LIST_FRACTION", 1.0 if listing else 0.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("blocks", ["one", "small", "small-listed"])
def test_split_equals_list_path_batch_as_gallery(monkeypatch, counted, dtype, tol, params, blocks):
    if blocks != "one":
        small_blocks(monkeypatch, listing=blocks == "small-listed")
    x, y = many_classes(dtype=dtype)
    assert_same(run("split", x, y, params, True), run("list", x, y, params, True), tol)
    assert len(counted) == 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("params", PARAMS[:2])
@pytest.mark.parametrize("blocks", ["one", "small", "small-listed"])
def test_split_equals_list_path_reference_set(monkeypatch, counted, dtype, tol, params, blocks):
    if blocks != "one":
        small_blocks(monkeypatch, listing=blocks == "small-listed")
    x, y = many_classes(dtype=dtype)
    ref, ref_y = clustered(n=90, classes=30, seed=3, dtype=dtype)
    ref[5] = x[3]  # a near-duplicate between the batch and the reference set (different classes)
    assert int(y[3]) != int(ref_y[5])
    out = run("split", x, y, params, True, ref, ref_y)
    assert_same(out, run("list", x, y, params, True, ref, ref_y), tol)
    assert out[2] is None or torch.count_nonzero(out[2]) == 0  # paper's rule: the reference set is fixed
    assert len(counted) == 1


def test_split_equals_loop_reference_value_and_paper_gradient(counted):
    x, y = clustered(n=40, classes=20, seed=1)  # 2 per class
    x[4] = x[9]  # an exact duplicate in another class: a negative at distance 0
    params = RankedListParams(Tp=2.0, Tn=10.0, imbalance=0.4)
    n = len(y)
    losses, grad, _, _, _ = run("split", x, y, params, True, weights=torch.full((n,), 1 / n, dtype=x.dtype))
    ref = reference_losses(x.clone(), y.tolist(), Tp=2.0, Tn=10.0, imbalance=0.4)
    assert torch.allclose(losses, torch.stack(ref), atol=1e-12)
    expected = reference_paper_gradient(x, y.tolist(), Tp=2.0, Tn=10.0, imbalance=0.4)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert len(counted) == 1


def test_split_without_gradient_and_counts(counted):
    x, y = many_classes(seed=2)
    q = F.normalize(x, dim=1)
    params = RankedListParams()
    with torch.no_grad():
        split = ranked_list_euclidean(q, None, label_masks(y, y), params=params, paper=False, path="split")
        listed = ranked_list_euclidean(q, None, label_masks(y, y), params=params, paper=False, path="list")
    assert torch.allclose(split[0], listed[0], atol=1e-12)
    assert (int(split[1]), int(split[2])) == (int(listed[1]), int(listed[2])) and int(split[2]) > 0
    assert len(counted) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.7, 1.3, 0.123456789])
def test_squared_boundary_is_the_exact_image_of_d_below_alpha(dtype, alpha):
    t = squared_boundary(alpha, dtype)
    a = torch.tensor(alpha, dtype=dtype)
    around = torch.tensor(t, dtype=dtype)
    values = [around]
    for direction in (0.0, 10.0):
        v = around
        for _ in range(40):
            v = torch.nextafter(v, torch.tensor(direction, dtype=dtype))
            values.append(v)
    sq = torch.stack(values)
    assert torch.equal(sq < t, torch.sqrt(sq) < a)
    assert bool(torch.sqrt(around) >= a)


def test_same_label_pairs_match_the_comparison():
    g = torch.Generator().manual_seed(0)
    labels, ref_labels = torch.randint(0, 7, (23,), generator=g), torch.randint(0, 7, (41,), generator=g)
    rows, cols, starts = same_label_pairs(labels, ref_labels)
    expected = torch.nonzero(labels[:, None] == ref_labels[None, :])
    got = torch.stack([rows, cols], 1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    assert torch.equal(rows, torch.sort(rows).values)
    assert starts.tolist() == [0, *torch.cumsum(torch.bincount(rows, minlength=23), 0).tolist()]


def test_where_split_does_not_apply(counted):
    x, y = many_classes()
    q = F.normalize(x, dim=1).requires_grad_(True)
    masks = label_masks(y, y)
    assert split_supported(q, masks, params=RankedListParams())
    assert not split_supported(q, masks, params=RankedListParams(Tn=0.0))
    assert not split_supported(q, masks, params=RankedListParams(Tn=500.0))  # no constant shift
    assert not split_supported(q.half(), masks, params=RankedListParams())
    # few classes: the positives are not sparse, nothing computed but the pair count
    few = torch.arange(64) % 4
    assert ranked_list_split(q, None, label_masks(few, few), params=RankedListParams(), paper=True) is None
    assert counted == []


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_path_split_falls_back_to_dense_with_the_same_result(counted, gradient):
    x, y = clustered(n=48, classes=6)  # 8 per class: positives not sparse for the split path
    params = RankedListParams()
    paper = gradient == "paper"
    assert_same(run("split", x, y, params, paper), run("list", x, y, params, paper), 1e-12)
    many, many_y = many_classes()
    assert_same(run("split", many, many_y, params, paper), run("list", many, many_y, params, paper), 1e-12)
    assert len(counted) == 1


def test_auto_takes_split_for_large_batches_and_large_reference_sets(monkeypatch, counted):
    x, y = many_classes()
    q = F.normalize(x, dim=1)
    params = RankedListParams()
    spread = F.normalize(torch.randn(64, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    for emb in (q, spread):  # a small batch: the list or the dense path
        ranked_list_euclidean(emb, None, label_masks(y, y), params=params, paper=True)
    assert counted == []
    monkeypatch.setattr(euclid_mod, "_SPLIT_PAIRS", 64 * 64)
    for emb in (q, spread):  # a large batch, long lists or short
        ranked_list_euclidean(emb, None, label_masks(y, y), params=params, paper=True)
    assert len(counted) == 2
    with_grad = spread.clone().requires_grad_(True)  # the autograd rule too
    ranked_list_euclidean(with_grad, None, label_masks(y, y), params=params, paper=False)
    assert len(counted) == 3
    none = torch.zeros(64, 64, dtype=torch.bool)
    ranked_list_euclidean(spread, None, dense_masks(none, ~none), params=params, paper=True)  # pair masks: not split
    assert len(counted) == 3
    monkeypatch.setattr(euclid_mod, "_SPLIT_PAIRS", 1 << 40)
    monkeypatch.setattr(euclid_mod, "_LARGE_GALLERY", 90)
    ref = F.normalize(torch.randn(90, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=1)
    ranked_list_euclidean(spread, ref, label_masks(y, torch.arange(90) % 30), params=params, paper=True)
    assert len(counted) == 4


def test_auto_for_long_lists_depends_on_the_batch_and_the_gradient_rule(monkeypatch, counted):
    """Long lists: the split path from a medium batch on; below, the dense path with the paper's rule and the list
    path with the autograd rule. Short lists: the list path."""
    taken = []
    for name in ("ranked_list_dense", "ranked_list_list"):
        real = getattr(euclid_mod, name)
        monkeypatch.setattr(euclid_mod, name, lambda *a, _n=name, _r=real, **k: taken.append(_n) or _r(*a, **k))
    x, y = many_classes()
    long = F.normalize(x, dim=1).requires_grad_(True)
    short = F.normalize(torch.randn(64, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    short.requires_grad_(True)
    params, masks = RankedListParams(), label_masks(y, y)
    assert euclid_mod.dense_lists_expected(long, None, masks, params=params)
    assert not euclid_mod.dense_lists_expected(short, None, masks, params=params)

    def path(emb, paper):
        taken.clear()
        before = len(counted)
        ranked_list_euclidean(emb, None, masks, params=params, paper=paper)
        return "split" if len(counted) > before else taken[0]

    assert (path(long, True), path(long, False)) == ("ranked_list_dense", "ranked_list_list")
    assert (path(short, True), path(short, False)) == ("ranked_list_list", "ranked_list_list")
    monkeypatch.setattr(euclid_mod, "_SPLIT_PAIRS_LONG", 64 * 64)  # a medium batch
    assert (path(long, True), path(long, False)) == ("split", "split")
    assert path(short, True) == "ranked_list_list"
    monkeypatch.setattr(euclid_mod, "_LIST_AUTOGRAD_PAIRS", 64 * 64)  # without the split path, above that size
    pairs = dense_masks(y[:, None] == y[None, :], y[:, None] != y[None, :])  # pair masks: no split path
    taken.clear()
    ranked_list_euclidean(long, None, pairs, params=params, paper=False)
    assert taken == ["ranked_list_dense"]


def test_loss_class_with_split_path_matches_list_path_and_half_precision_is_finite():
    x, y = many_classes(n=96, seed=5, dtype=torch.float32)
    out = {}
    for path in ("split", "list"):
        xp = x.clone().requires_grad_(True)
        loss = RankedListLoss(margin=0.4, Tn=10.0, path=path, collect_stats=True)
        value = loss(xp, y)
        value.backward()
        out[path] = (value.detach(), xp.grad, loss.avg_num_neg_per_query)
    assert torch.allclose(out["split"][0], out["list"][0], atol=1e-6)
    assert torch.allclose(out["split"][1], out["list"][1], atol=1e-7)
    assert out["split"][2] == out["list"][2] > 0
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype).requires_grad_(True)
        value = RankedListLoss(margin=0.4, Tn=10.0, path="split")(xh, y)
        value.backward()
        assert torch.isfinite(value) and bool(torch.isfinite(xh.grad).all())


@pytest.mark.parametrize("listing", [False, True])
def test_without_counting_same_losses_and_gradient(monkeypatch, counted, listing):
    small_blocks(monkeypatch, listing=listing)  # the listing decision then comes from a sample of rows
    x, y = many_classes(seed=6)
    params = RankedListParams(Tp=1.0)
    out = {}
    for count in (True, False):
        xp = x.clone().requires_grad_(True)
        q = F.normalize(xp, dim=1)
        losses, n_pos, n_neg = ranked_list_euclidean(
            q, None, label_masks(y, y), params=params, paper=True, path="split", count_negatives=count
        )
        losses.sum().backward()
        out[count] = (losses.detach(), xp.grad, int(n_pos), n_neg)
    assert out[False][3] is None and int(out[True][3]) > 0
    for a, b in zip(out[True][:2], out[False][:2]):  # the listing may differ: the order of sums only
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert out[True][2] == out[False][2]
    assert len(counted) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_pair_product_adds_the_dense_product_in_place(dtype):
    g = torch.randn(5, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.tensor([0, 0, 2, 2, 2, 6]), torch.tensor([1, 3, 0, 4, 4, 2])  # a repeated pair adds up
    values = torch.tensor([0.5, -1.0, 2.0, 0.25, 0.75, 3.0], dtype=dtype)
    matrix = torch.zeros(7, 5, dtype=dtype).index_put_((rows, cols), values, accumulate=True)
    start = torch.randn(7, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    out = start.clone()
    add_pair_product(out, rows, cols, values, g, alpha=-2.0)
    add_pair_product(out, rows[:0], cols[:0], values[:0], g)  # no pairs: nothing added
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    assert torch.allclose(out, start - 2 * (matrix @ g), atol=tol, rtol=0)


_WARNINGS_SCRIPT = """
import warnings
import torch
from pml_rll.functional.numerics import add_pair_product, pair_product

g = torch.randn(64, 3)
rows, cols, values = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([1.0, 2.0])

def products():
    add_pair_product(torch.zeros(64, 3), rows, cols, values, g)  # compressed rows
    pair_product(rows, cols, values, (64, 64), g)  # coordinates (2 pairs of 4096: sparse)

def mine():
    warnings.warn("a warning of the user's, shown once", UserWarning)

products()  # the first products: torch's one-time notices about sparse layouts are silenced
for _ in range(3):
    mine()
    products()  # later products leave the filters alone: the user's warning is not shown again
"""


def test_sparse_products_show_no_notice_and_leave_the_users_warnings_alone():
    """In a fresh process (torch gives its sparse notices once per process): no notice reaches the user, and the
    warning filters are touched only at the first product (touching them makes Python repeat shown warnings)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", _WARNINGS_SCRIPT], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("a warning of the user's") == 1, done.stderr
    assert "Sparse" not in done.stderr, done.stderr


def test_labels_of_different_dtypes_are_compared_as_equality_compares_them(counted):
    x, _ = many_classes(n=40, seed=7)
    ref, _ = clustered(n=60, classes=20, seed=8)
    for y, ref_y in (
        (torch.arange(40) % 20 + 2**32, (torch.arange(60) % 20).to(torch.int32)),  # no label in common
        (-(torch.arange(40) % 20) - 1, (255 - torch.arange(60) % 20).to(torch.uint8)),
        (torch.arange(40) % 20, (torch.arange(60) % 20).to(torch.int16)),  # the same labels
    ):
        split = run("split", x, y, RankedListParams(), True, ref, ref_y)
        assert_same(split, run("list", x, y, RankedListParams(), True, ref, ref_y), 1e-12)
    assert len(counted) == 3
    assert same_label_pairs(torch.arange(8) % 2, torch.arange(8) % 2, max_pairs=31) is None  # 32 pairs


@pytest.mark.parametrize("jitter", [0.0, 1e-4])
def test_collapsed_embeddings_keep_their_gram_values(counted, jitter):
    """More near-duplicates than the budget (4 per query): Gram values stand, as on the list path."""
    x = torch.zeros(64, 16)
    x[:, 0] = 1.0
    x += jitter * torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 16
    split, listed = run("split", x, y, RankedListParams(), True), run("list", x, y, RankedListParams(), True)
    assert split[3:] == listed[3:]
    assert torch.allclose(split[0], listed[0], atol=1e-6) and torch.allclose(split[1], listed[1], atol=1e-5)
    assert bool(torch.isfinite(split[1]).all())
    assert len(counted) == 1


@needs_cpu_float16
def test_half_precision_in_the_functional_api_takes_another_path(counted):
    x, y = many_classes(dtype=torch.float32)
    q = F.normalize(x, dim=1).half()
    out = ranked_list_euclidean(q, None, label_masks(y, y), params=RankedListParams(Tn=0.01), paper=True, path="split")
    assert bool(torch.isfinite(out[0]).all()) and counted == []


# float32: listed blocks take explicit differences where the list path's backward takes the Gram form
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("blocks", ["one", "small", "small-listed", "small-some-kept", "one-none-kept"])
def test_autograd_rule_equals_list_path(monkeypatch, counted, dtype, tol, params, blocks):
    """gradient="autograd": the second pass over the panels gives the list path's exact derivative, both ends of
    every pair moved (with a reference set that requires grad, the reference set's gradient too), whether it
    reuses the panels' distances kept by the first pass or computes them again."""
    if blocks.startswith("small"):  # listed: the second pass reuses the members the first listed
        small_blocks(monkeypatch, listing=blocks == "small-listed")
    if blocks.endswith("kept"):  # the distances of the first few panels kept, or of none
        monkeypatch.setattr(split_mod, "_KEEP_ELEMENTS", 5 * 8 * 16 if blocks == "small-some-kept" else 0)
    x, y = many_classes(dtype=dtype)
    assert_same(run("split", x, y, params, False), run("list", x, y, params, False), tol)
    ref, ref_y = clustered(n=90, classes=30, seed=3, dtype=dtype)
    ref[5] = x[3]  # a near-duplicate between the batch and the reference set
    out = run("split", x, y, params, False, ref, ref_y)
    assert_same(out, run("list", x, y, params, False, ref, ref_y), tol)
    assert torch.count_nonzero(out[2]) > 0  # the reference set moves
    assert len(counted) == 2


def test_autograd_rule_equals_loop_reference():
    x, y = clustered(n=40, classes=20, seed=9, duplicates=False)  # autograd's derivative of sqrt at 0 is NaN
    params = RankedListParams(Tp=2.0, Tn=10.0, imbalance=0.4)
    losses, grad, _, _, _ = run("split", x, y, params, False, weights=torch.full((40,), 1 / 40, dtype=x.dtype))
    xr = x.clone().requires_grad_(True)
    ref = reference_losses(xr, y.tolist(), Tp=2.0, Tn=10.0, imbalance=0.4)
    assert torch.allclose(losses, torch.stack(ref).detach(), atol=1e-12)
    (expected,) = torch.autograd.grad(sum(ref) / 40, xr)
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize("paper", [True, False])
def test_a_second_backward_pass_through_the_graph_gives_the_same_gradient(paper):
    """retain_graph: the autograd rule's second pass has used the kept distances; the next computes them again."""
    x, y = many_classes()
    q = x.clone().requires_grad_(True)
    losses, _, _ = ranked_list_split(q, None, label_masks(y, y), params=RankedListParams(), paper=paper)
    (first,) = torch.autograd.grad(losses.sum(), q, retain_graph=True)
    (second,) = torch.autograd.grad(losses.sum(), q)
    assert torch.count_nonzero(first) > 0 and torch.equal(first, second)
