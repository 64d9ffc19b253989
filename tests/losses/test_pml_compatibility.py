"""Drop-in compatibility with PML 2.9's RankedListLoss, from its documented behaviour.

Code written for PML's class runs unchanged against ours: for every dtype PML supports on a CPU (float64, float32,
float16) the two agree on the value (where the paper does not differ), on the returned dtype (the embeddings'), on
the gradient's dtype and shape, and on the exception type of each out-of-range argument. The deliberate deviations
are the named cases ``test_deviation_*`` below (the hand cases of docs/ranked_list_loss.md, section 5, are in
test_pml_differences.py); the README's table "Differences from PML 2.9's RankedListLoss" lists them.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from pml_rll import losses, miners, reducers
from pml_rll.utils.validation import HyperParameterError
from tests.conftest import hand_case, needs_cpu_float16, paired_batch
from tests.reference.ranked_list_loss import reference_loss

batch = partial(paired_batch, n=24, dim=6, classes=4, noise=0.4)

# dtypes PML's class computes on a CPU (float16 where torch has float16 CPU kernels: not torch 2.0, 2.1); bfloat16 is a
# named deviation (its LpDistance uses cdist, which a CPU lacks)
PML_CPU_DTYPES = [torch.float64, torch.float32, pytest.param(torch.float16, marks=needs_cpu_float16)]
# moderate temperatures (PML's float16 weights overflow from Tn ~ 9) and no pair at distance 0: the two agree
KWARGS = dict(margin=0.4, Tn=5.0, imbalance=0.4, alpha=1.1, Tp=2.0)
# value and gradient tolerances: PML's N * 1e-5 epsilon (about 1e-4 relative here); in half precision PML rounds
# every intermediate to float16 where ours computes in float32
TOL = {
    torch.float64: dict(rtol=1e-3, atol=1e-6),
    torch.float32: dict(rtol=1e-3, atol=1e-6),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
}


def pml_rll(**kwargs):
    with warnings.catch_warnings():  # PML warns about temperatures above 5
        warnings.simplefilter("ignore")
        return pml_losses.RankedListLoss(**kwargs)


def value_and_grad(loss, x, *args):
    """(loss, gradient with respect to the embeddings) on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, *args)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


# ---- value, returned dtype, gradient dtype and shape ------------------------------------------------------------


@pytest.mark.parametrize("dtype", PML_CPU_DTYPES)
def test_same_value_dtype_and_gradient_as_pml(dtype):
    x, y = batch(seed=11, dtype=dtype)
    ours, g_ours = value_and_grad(losses.RankedListLoss(**KWARGS, gradient="autograd"), x, y)
    theirs, g_theirs = value_and_grad(pml_rll(**KWARGS), x, y)
    assert ours.dtype == theirs.dtype == dtype
    assert ours.shape == theirs.shape == ()
    assert g_ours.dtype == g_theirs.dtype == dtype
    assert g_ours.shape == g_theirs.shape == x.shape
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    torch.testing.assert_close(g_ours, g_theirs, **TOL[dtype])
    # and both are the paper's value (the slow reference, float64 on the same rounded inputs)
    expected = reference_loss(x.double(), y.tolist(), **KWARGS)
    assert ours.double().item() == pytest.approx(expected.item(), rel=TOL[dtype]["rtol"])


@pytest.mark.parametrize("dtype", PML_CPU_DTYPES)
def test_paper_gradient_has_pml_dtype_and_shape(dtype):
    x, y = batch(seed=12, dtype=dtype)
    ours, grad = value_and_grad(losses.RankedListLoss(**KWARGS), x, y)
    assert ours.dtype == grad.dtype == dtype and grad.shape == x.shape
    theirs = pml_rll(**KWARGS)(x, y)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


@needs_cpu_float16
def test_half_precision_loss_compares_and_stacks_with_pml():
    # a float32 result raised "Float did not match Half" in both calls
    x, y = batch(seed=13, dtype=torch.float16)
    ours, theirs = losses.RankedListLoss(**KWARGS)(x, y), pml_rll(**KWARGS)(x, y)
    assert bool(torch.isclose(ours, theirs, rtol=1e-2))
    assert torch.stack([ours, theirs]).dtype == torch.float16


def test_half_precision_is_computed_in_float32():
    # returned in float16, but not computed in it: the float32 loss rounded once, unlike PML's
    x, y = batch(seed=14, dtype=torch.float16)
    ours = losses.RankedListLoss(**KWARGS)(x, y)
    in_float32 = losses.RankedListLoss(**KWARGS)(x.float(), y)
    assert ours.item() == in_float32.half().item()


ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("ref_dtype", ALL_DTYPES)
@pytest.mark.parametrize("distance", [None, LpDistance(power=2)], ids=["fast path", "generic path"])
def test_reference_of_another_dtype_is_cast_to_the_embeddings_dtype(dtype, ref_dtype, distance):
    # as PML's CrossBatchMemory casts its memory: the reference set is cast to the embeddings' dtype
    x, y = batch(seed=15, dtype=dtype)
    r, ry = batch(seed=16, dtype=torch.float64)
    loss = losses.RankedListLoss(**KWARGS, distance=distance)
    got, grad = value_and_grad(loss, x, y, None, r.to(ref_dtype), ry)
    cast, cast_grad = value_and_grad(loss, x, y, None, r.to(ref_dtype).to(dtype), ry)
    assert got.dtype == grad.dtype == dtype
    assert torch.equal(got, cast) and torch.equal(grad, cast_grad)
    mined = miners.RankedListMiner(margin=KWARGS["margin"], alpha=KWARGS["alpha"], distance=distance)
    for a, b in zip(mined(x, y, r.to(ref_dtype), ry), mined(x, y, r.to(ref_dtype).to(dtype), ry)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", PML_CPU_DTYPES)
def test_reducer_returns_the_embeddings_dtype_like_pml_reducers(dtype):
    x, y = batch(seed=17, dtype=dtype)
    alpha, margin = KWARGS["alpha"], KWARGS["margin"]
    pair_loss = partial(pml_losses.ContrastiveLoss, pos_margin=alpha - margin, neg_margin=alpha)
    red = reducers.RankedListReducer(Tp=KWARGS["Tp"], Tn=KWARGS["Tn"], imbalance=KWARGS["imbalance"])
    ours, grad = value_and_grad(pair_loss(reducer=red), x, y)
    with_mean_reducer = pair_loss()(x, y)  # PML's default reducer
    assert ours.dtype == grad.dtype == with_mean_reducer.dtype == dtype
    torch.testing.assert_close(ours, losses.RankedListLoss(**KWARGS)(x, y), **TOL[dtype])


def test_recorded_attributes_are_pmls():
    ours, theirs = losses.RankedListLoss(**KWARGS), pml_rll(**KWARGS)
    names = ("margin", "alpha", "Tp", "Tn", "imbalance")
    assert {n: getattr(ours, n) for n in names} == {n: getattr(theirs, n) for n in names}
    assert set(names) <= set(ours._record_these) and set(names) <= set(theirs._record_these)


# ---- exception types ------------------------------------------------------------------------------------------

BASE = dict(margin=0.4, Tn=10.0)  # PML requires these two
# (id, arguments, PML's outcome: the exception type, or None where PML accepts the value)
SAME_EXCEPTION = [
    ("imbalance above 1", dict(imbalance=1.5), AssertionError),
    ("imbalance below 0", dict(imbalance=-0.1), AssertionError),
    ("imbalance nan", dict(imbalance=float("nan")), AssertionError),
    ("imbalance str", dict(imbalance="0.5"), TypeError),
    ("imbalance None", dict(imbalance=None), TypeError),
    ("margin str", dict(margin="0.4"), TypeError),
    ("Tn str", dict(Tn="10"), TypeError),
    ("Tp str", dict(Tp="0"), TypeError),
]
# arguments PML accepts (and then computes NaN or nonsense from) where ours raises, both catchable ways when out of
# range: negative temperatures, negative margins, non-positive or non-numeric boundaries, non-finite or huge values
REJECTED_ONLY_HERE = [
    ("deviation: margin negative", dict(margin=-0.1), HyperParameterError),
    ("deviation: margin huge", dict(margin=1e40), HyperParameterError),
    ("deviation: Tn negative", dict(Tn=-1.0), HyperParameterError),
    ("deviation: Tn nan", dict(Tn=float("nan")), HyperParameterError),
    ("deviation: Tn above 1e4", dict(Tn=2e4), HyperParameterError),
    ("deviation: Tp negative", dict(Tp=-0.5), HyperParameterError),
    ("deviation: alpha zero", dict(alpha=0.0), HyperParameterError),
    ("deviation: alpha negative", dict(alpha=-1.0), HyperParameterError),
    ("deviation: alpha str", dict(alpha="1"), TypeError),
    ("deviation: similarity as distance", dict(distance=CosineSimilarity()), HyperParameterError),
]


def pml_outcome(kwargs):
    try:
        pml_rll(**{**BASE, **kwargs})
    except Exception as e:  # the outcome is what is compared
        return type(e)
    return None


@pytest.mark.parametrize("kwargs,pml", [row[1:] for row in SAME_EXCEPTION], ids=[row[0] for row in SAME_EXCEPTION])
def test_out_of_range_argument_raises_what_pml_raises(kwargs, pml):
    assert pml_outcome(kwargs) is pml
    with pytest.raises(pml) as info:
        losses.RankedListLoss(**{**BASE, **kwargs})
    assert next(iter(kwargs)) in str(info.value)  # the message names the argument
    if pml is AssertionError:  # PML's assert, and this package's ValueError convention, both catch it
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs,ours", [row[1:] for row in REJECTED_ONLY_HERE], ids=[row[0] for row in REJECTED_ONLY_HERE]
)
def test_deviation_arguments_pml_accepts_are_rejected(kwargs, ours):
    assert pml_outcome(kwargs) is None
    with pytest.raises(ours) as info:
        losses.RankedListLoss(**{**BASE, **kwargs})
    assert next(iter(kwargs)) in str(info.value)
    if ours is HyperParameterError:
        assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)


def test_except_assertion_error_catches_imbalance_as_with_pml():
    for make in (pml_rll, losses.RankedListLoss):
        with pytest.raises(AssertionError, match="(?i)imbalance"):
            make(margin=0.4, Tn=10.0, imbalance=2.0)
    with pytest.raises(ValueError, match="imbalance"):
        losses.RankedListLoss(imbalance=2.0)


# every out-of-range hyper-parameter of the three ranked-list classes: ValueError and AssertionError alike
OUT_OF_RANGE = [
    ("loss gradient", lambda: losses.RankedListLoss(gradient="exact"), "gradient"),
    ("loss path", lambda: losses.RankedListLoss(path="fast"), "path"),
    ("loss Tp huge", lambda: losses.RankedListLoss(Tp=1e5), "Tp"),
    ("reducer Tn negative", lambda: reducers.RankedListReducer(Tn=-1.0), "Tn"),
    ("reducer Tp nan", lambda: reducers.RankedListReducer(Tp=float("nan")), "Tp"),
    ("reducer imbalance", lambda: reducers.RankedListReducer(imbalance=1.5), "imbalance"),
    ("reducer gradient", lambda: reducers.RankedListReducer(gradient="exact"), "gradient"),
    ("miner margin negative", lambda: miners.RankedListMiner(margin=-1.0), "margin"),
    ("miner alpha zero", lambda: miners.RankedListMiner(alpha=0.0), "alpha"),
    ("miner alpha huge", lambda: miners.RankedListMiner(alpha=1e40), "alpha"),
    ("miner similarity", lambda: miners.RankedListMiner(distance=CosineSimilarity()), "distance"),
]


@pytest.mark.parametrize("make,name", [row[1:] for row in OUT_OF_RANGE], ids=[row[0] for row in OUT_OF_RANGE])
def test_out_of_range_hyper_parameters_are_caught_both_ways(make, name):
    for exc in (AssertionError, ValueError):
        with pytest.raises(exc, match=name):
            make()


def test_hyper_parameter_error_is_both_kinds():
    assert issubclass(HyperParameterError, ValueError) and issubclass(HyperParameterError, AssertionError)


# ---- the other deliberate deviations, in every dtype PML supports on a CPU ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deviation_pairs_at_distance_zero_count(dtype):
    # case 5: the two embeddings at angle 0 are of different classes; PML's masks drop the pair
    x, y = hand_case([0, 0, 90, 180], [0, 1, 0, 1], dtype)
    assert pml_rll(margin=0.4, Tn=10.0)(x, y).item() == pytest.approx(0.4535352, abs=1e-6)
    ours = losses.RankedListLoss(margin=0.4, Tn=10.0)(x, y)
    assert ours.dtype == dtype and ours.item() == pytest.approx(0.7535534, abs=1e-6)


@pytest.mark.parametrize(
    "dtype,Tn", [(torch.float32, 100.0), pytest.param(torch.float16, 20.0, marks=needs_cpu_float16)]
)
def test_deviation_large_temperatures_stay_finite(dtype, Tn):
    # case 6b: PML's unshifted exp overflows (here from Tn ~ 86 in float32, ~ 11 in float16); ours is max-shifted
    x, y = hand_case([0, 70, 10], [0, 0, 1], dtype)
    assert torch.isnan(pml_rll(margin=0.4, Tn=Tn)(x, y))
    ours = losses.RankedListLoss(margin=0.4, Tn=Tn)(x, y)
    expected = reference_loss(x.double(), y.tolist(), Tn=Tn)
    assert ours.dtype == dtype
    assert ours.item() == pytest.approx(expected.item(), rel=TOL[dtype]["rtol"])


def test_deviation_paper_gradient_by_default():
    # same value; the default gradient is the paper's (constant weights, query only), "autograd" gives PML's
    x, y = batch(seed=18)
    theirs, g_theirs = value_and_grad(pml_rll(**KWARGS), x, y)
    ours, g_paper = value_and_grad(losses.RankedListLoss(**KWARGS), x, y)
    _, g_autograd = value_and_grad(losses.RankedListLoss(**KWARGS, gradient="autograd"), x, y)
    torch.testing.assert_close(ours, theirs, **TOL[torch.float64])
    torch.testing.assert_close(g_autograd, g_theirs, **TOL[torch.float64])
    assert (g_paper - g_theirs).abs().max() > 100 * TOL[torch.float64]["atol"]


def test_deviation_bfloat16_runs_where_pml_cannot():
    # PML's LpDistance computes bfloat16 with cdist, which a CPU does not implement; ours computes it in float32 and
    # returns bfloat16, the value of PML's class on the same (rounded) values in float32
    x, y = batch(seed=19, dtype=torch.bfloat16)
    with pytest.raises((NotImplementedError, RuntimeError), match="cdist"):
        pml_rll(**KWARGS)(x, y)
    ours, grad = value_and_grad(losses.RankedListLoss(**KWARGS, gradient="autograd"), x, y)
    theirs, g_theirs = value_and_grad(pml_rll(**KWARGS), x.float(), y)
    assert ours.dtype == grad.dtype == torch.bfloat16 and grad.shape == x.shape
    torch.testing.assert_close(ours.float(), theirs, **TOL[torch.bfloat16])
    torch.testing.assert_close(grad.float(), g_theirs, **TOL[torch.bfloat16])


def test_deviation_margin_and_tn_have_defaults():
    # PML requires margin and Tn; ours defaults them to 0.4 and 10, and accepts PML's calls unchanged
    with pytest.raises(TypeError, match="margin"):
        pml_losses.RankedListLoss()
    loss = losses.RankedListLoss()
    assert (loss.margin, loss.Tn, loss.imbalance, loss.alpha, loss.Tp) == (0.4, 10.0, 0.5, 1.2, 0.0)
    theirs = pml_rll(margin=0.4, Tn=10.0)
    assert (theirs.imbalance, theirs.alpha, theirs.Tp) == (loss.imbalance, loss.alpha, loss.Tp)


def test_deviation_meta_device_gives_shapes_where_pml_fails():
    x, y = batch(seed=20, dtype=torch.float16)
    x, y = x.to("meta").requires_grad_(True), y.to("meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        pml_rll(**KWARGS)(x, y)
    ours = losses.RankedListLoss(**KWARGS)(x, y)
    (grad,) = torch.autograd.grad(ours, x)
    assert ours.is_meta and (ours.shape, ours.dtype) == ((), torch.float16)
    assert grad.is_meta and (grad.shape, grad.dtype) == (x.shape, torch.float16)
