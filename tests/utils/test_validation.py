"""The shared argument checks of pml_rll.utils.validation: what each accepts, what it rejects and how it says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_rll.utils import validation as V

GOOD_NUMBERS = [0.4, 3, np.float32(0.4), np.float64(2.0), np.int64(10), np.int8(1)]
BAD_NUMBERS = [
    ("0.4", TypeError),
    (True, TypeError),
    (np.bool_(False), TypeError),
    (None, TypeError),
    (torch.tensor(1.0), TypeError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (-float("inf"), ValueError),
]


@pytest.mark.parametrize("value", GOOD_NUMBERS)
def test_check_number_accepts_python_and_numpy_scalars(value):
    out = V.check_number("margin", value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value,exc", BAD_NUMBERS)
def test_check_number_rejects(value, exc, rejects):
    rejects(lambda: V.check_number("margin", value), exc, "margin")


def test_check_number_ranges(rejects):
    assert V.check_number("imbalance", 1.0, 0.0, 1.0) == 1.0
    rejects(lambda: V.check_number("imbalance", 1.5, 0.0, 1.0), ValueError, "imbalance")
    rejects(lambda: V.check_number("alpha", 0.0, 0.0, low_open=True), ValueError, "alpha")
    assert V.check_number("alpha", 1e-30, 0.0, low_open=True) == 1e-30


def test_check_temperature_range(rejects):
    assert V.check_temperature("Tn", 0) == 0.0
    assert V.check_temperature("Tn", V.MAX_TEMPERATURE) == V.MAX_TEMPERATURE
    rejects(lambda: V.check_temperature("Tn", -1e-9), ValueError, "Tn")
    rejects(lambda: V.check_temperature("Tn", 3.5e38), ValueError, "Tn")


@pytest.mark.parametrize("value", [1, 7, np.int64(4), np.int32(2), np.uint8(3)])
def test_check_int_accepts(value):
    out = V.check_int("embedding_size", value)
    assert type(out) is int and out == int(value)


@pytest.mark.parametrize(
    "value,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError), ("4", TypeError)]
)
def test_check_int_rejects(value, exc, rejects):
    rejects(lambda: V.check_int("embedding_size", value), exc, "embedding_size")


def test_check_bool_choice_callable(rejects):
    assert V.check_bool("freeze_bn", np.bool_(True)) is True
    for value in (1, 0, "yes", None):
        rejects(lambda value=value: V.check_bool("freeze_bn", value), TypeError, "freeze_bn")
    assert V.check_choice("mode", "plain", ("plain", "rerank")) == "plain"
    for value in ("fast", None, ["plain"]):
        rejects(lambda value=value: V.check_choice("mode", value, ("plain",)), ValueError, "mode")
    V.check_callable("miner", None, optional=True)
    rejects(lambda: V.check_callable("miner", None), TypeError, "miner")
    rejects(lambda: V.check_callable("miner", 3, optional=True), TypeError, "miner")


def test_check_numbers(rejects):
    assert V.check_numbers("t_values", [0, np.float32(3)]) == (0.0, 3.0)
    rejects(lambda: V.check_numbers("t_values", "03"), TypeError, "t_values")
    rejects(lambda: V.check_numbers("t_values", 3.0), TypeError, "t_values")
    rejects(lambda: V.check_numbers("t_values", ()), ValueError, "t_values")
    rejects(lambda: V.check_numbers("t_values", (0, float("nan"))), ValueError, "t_values[1]")
    rejects(lambda: V.check_numbers("t_values", (0, "3")), TypeError, "t_values[1]")


EMB = torch.randn(5, 3)
BAD_EMBEDDINGS = [
    ("list", EMB.tolist(), TypeError),
    ("numpy", EMB.numpy(), TypeError),
    ("1-D", EMB[0], ValueError),
    ("3-D", EMB[None], ValueError),
    ("integer", EMB.long(), TypeError),
    ("bool", EMB > 0, TypeError),
    ("complex", EMB.to(torch.complex64), TypeError),
    ("width 0", EMB[:, :0], ValueError),
    ("wrong width", torch.randn(5, 4), ValueError),
    ("nan", EMB.index_put((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"))), ValueError),
    ("-inf", EMB.index_put((torch.tensor([4]), torch.tensor([0])), torch.tensor(-float("inf"))), ValueError),
]


@pytest.mark.parametrize("case", BAD_EMBEDDINGS, ids=[c[0] for c in BAD_EMBEDDINGS])
def test_check_embeddings_rejects(case, rejects):
    _, value, exc = case
    rejects(lambda: V.check_embeddings("ref_emb", value, 3), exc, "ref_emb")


def test_check_finite_names_the_first_bad_row():
    x = torch.zeros(6, 2)
    x[4, 1] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match="embeddings contains non-finite values .*row 4"):
        V.check_finite("embeddings", x)


BAD_LABELS = [
    ("list", [0, 1, 2, 0, 1], TypeError),
    ("numpy", np.array([0, 1, 2, 0, 1]), TypeError),
    ("float", torch.tensor([0.0, 1, 2, 0, 1]), TypeError),
    ("bool", torch.tensor([True, False, True, False, True]), TypeError),
    ("2-D", torch.zeros(5, 1, dtype=torch.long), ValueError),
    ("short", torch.arange(4), ValueError),
]


@pytest.mark.parametrize("case", BAD_LABELS, ids=[c[0] for c in BAD_LABELS])
def test_check_labels_rejects(case, rejects):
    _, value, exc = case
    rejects(lambda: V.check_labels("labels", value, 5), exc, "labels")


def test_check_labels_accepts_integer_tensors_and_none(rejects):
    for dtype in (torch.int64, torch.int32, torch.uint8):
        V.check_labels("labels", torch.arange(5, dtype=dtype), 5)
    assert V.check_labels("labels", None, 5) is None
    rejects(lambda: V.check_labels("labels", None, 5, required=True), ValueError, "labels")


def test_check_batch(rejects):
    e, lab = torch.randn(4, 3), torch.arange(4)
    V.check_batch(e, lab, torch.randn(6, 3), torch.arange(6))
    rejects(lambda: V.check_batch(e, lab, None, torch.arange(6)), ValueError, "ref_labels")
    rejects(lambda: V.check_batch(e, lab, torch.randn(6, 3)), ValueError, "ref_labels")
    rejects(lambda: V.check_batch(e, lab, torch.randn(6, 2), torch.arange(6)), ValueError, "ref_emb")
    rejects(lambda: V.check_batch(e, lab, torch.randn(6, 3), torch.arange(5)), ValueError, "ref_labels")
    rejects(lambda: V.check_batch(e, None, labels_required=True), ValueError, "labels")
    rejects(lambda: V.check_batch(e, lab, width=2), ValueError, "embedding_size")
    V.check_batch(torch.randn(4, 6), lab, torch.randn(5, 3), torch.arange(5), packed=3)
    rejects(lambda: V.check_batch(torch.randn(4, 5), lab, packed=3), ValueError, "2 * embedding_size")
    rejects(
        lambda: V.check_batch(e, lab, indices_tuple=(torch.tensor([0]), torch.tensor([9]), torch.tensor([1]))),
        ValueError,
        "indices_tuple",
    )


def test_check_indices_tuple(rejects):
    a, p, n = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 3])
    a1, p1, a2, n2 = V.check_indices_tuple((a, p, n), 4, 4)
    assert torch.equal(a1, a2) and torch.equal(p1, p) and torch.equal(n2, n)
    rejects(lambda: V.check_indices_tuple((a, p), 4, 4), TypeError, "indices_tuple")
    rejects(lambda: V.check_indices_tuple((a, p, n.float()), 4, 4), TypeError, "indices_tuple")
    rejects(lambda: V.check_indices_tuple((a, p, [2, 3]), 4, 4), TypeError, "indices_tuple")
    rejects(lambda: V.check_indices_tuple((a, p, n[:1]), 4, 4), ValueError, "indices_tuple")
    rejects(lambda: V.check_indices_tuple((a, p, n), 4, 3), ValueError, "indices_tuple")
    rejects(lambda: V.check_indices_tuple((a, p, a, p), 4, 4), ValueError, "both as positive and as negative")


def test_packed_and_reference(rejects):
    x, s = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    V.check_packed("query", torch.cat([x, s], 1), 3)
    rejects(lambda: V.check_packed("query", torch.cat([x, -s], 1), 3), ValueError, "query")
    rejects(lambda: V.check_packed("query", torch.cat([x, 0 * s], 1), 3), ValueError, "strictly positive")
    rejects(lambda: V.check_packed("query", x, 3), ValueError, "query")
    V.check_reference("reference", x, 3)
    V.check_reference("reference", torch.cat([x, s], 1), 3)
    rejects(lambda: V.check_reference("reference", torch.randn(4, 5), 3), ValueError, "reference")


def test_out_of_range_scalars_raise_hyper_parameter_error():
    # a ValueError and an AssertionError (PML asserts its hyper-parameters); wrong kinds stay TypeErrors
    out_of_range = [
        lambda: V.check_number("margin", -1.0, 0.0),
        lambda: V.check_number("margin", float("nan")),
        lambda: V.check_temperature("Tn", -1.0),
        lambda: V.check_int("memory_size", 0),
        lambda: V.check_numbers("t_values", (), min_len=1),
        lambda: V.check_choice("gradient", "fast", ("paper", "autograd")),
    ]
    for call in out_of_range:
        with pytest.raises(V.HyperParameterError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)
    with pytest.raises(TypeError) as type_info:
        V.check_number("margin", "0.4")
    assert not isinstance(type_info.value, AssertionError)


def test_meta_tensors_have_no_values_to_check(rejects):
    # shapes and kinds are still checked; values, which a meta tensor does not have, are not
    emb = torch.empty(4, 3, device="meta")
    V.check_embeddings("embeddings", emb)
    a, p, n = (torch.tensor(v, device="meta") for v in ([0, 1], [1, 0], [2, 3]))
    V.check_indices_tuple((a, p, n), 4, 4)
    rejects(lambda: V.check_embeddings("embeddings", torch.empty(4, device="meta")), ValueError, "embeddings")
    rejects(lambda: V.check_indices_tuple((a, p, n[:1]), 4, 4), ValueError, "indices_tuple")
    rejects(lambda: V.check_not_meta("embeddings", emb, "RankedListMiner", "why"), ValueError, "embeddings")
