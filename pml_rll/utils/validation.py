"""Argument checks shared by every public class of the package (losses, miners, reducers, modules, retrieval).

Every check raises at once, before anything is computed or stored, so a rejected call changes no state, and its
message names the argument at fault. The conventions:

* ``TypeError`` for a value of the wrong kind (not a tensor, an integer tensor where floats are needed, a string
  where a number is needed, a bool where a number is needed or a number where a bool is needed);
  ``ValueError`` for a value of the right kind that is out of range (wrong shape or width, NaN or infinity,
  a negative temperature, an unknown choice).
* The scalar checks below (numbers, temperatures, sizes, choices, the distance) raise :class:`HyperParameterError`
  for a value out of range, a ``ValueError`` that is also an ``AssertionError``: PML checks its hyper-parameters
  with ``assert`` (e.g. ``RankedListLoss``'s ``imbalance``), so code written for PML's classes,
  ``except AssertionError``, catches ours too, and ``except ValueError`` works as well. Every out-of-range
  hyper-parameter of ``RankedListLoss``, ``RankedListReducer`` and ``RankedListMiner`` raises it.
* Numbers: Python and numpy scalars alike (``np.float32(0.4)``, ``np.int64(10)``); bools are never numbers.
  Sizes are integers (Python or numpy), never floats, even integral ones.
* Embeddings: 2-D floating-point ``torch.Tensor`` of shape (N, D), D >= 1, every value finite. An empty batch
  (N = 0) is accepted where the class defines its result. Reference embeddings (``ref_emb``, a gallery) of another
  floating dtype are cast to the embeddings' dtype, as PML's CrossBatchMemory casts its memory; on another device
  they are rejected. Meta tensors (shapes without values) pass the value checks, which have nothing to read;
  a class whose result's size depends on the values rejects them with :func:`check_not_meta`.
* Labels: 1-D ``torch.Tensor`` of integer class labels with one entry per embedding. Lists and numpy arrays are
  rejected with a ``TypeError`` (convert with ``torch.as_tensor``) rather than converted, as PML itself expects
  tensors: one rule for every class, and no silent copy to the wrong device. Labels on another device than the
  embeddings are moved, as PML does.
* Temperatures and sharpness factors lie in ``[0, MAX_TEMPERATURE]``, margins, boundaries and loss weights are at
  most ``MAX_MAGNITUDE``: see :data:`MAX_TEMPERATURE` and :data:`MAX_MAGNITUDE`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.distances import BaseDistance
from torch import Tensor

from .compat import aminmax, is_autocast_enabled

#: Largest temperature (RankedListLoss / RankedListReducer ``Tn``, ``Tp``) and soft-assignment sharpness
#: (MultiClusterRankingLoss ``alpha``) accepted. At T = 1e4 a hinge gap of 0.01 already weighs exp(-100) ~ 4e-44,
#: below float32's smallest normal number, so larger values select the same hardest pair; and T * hinge stays below
#: float32's largest value (3.4e38) for every hinge below 3.4e34, so the weights are finite in every dtype the
#: losses compute in (float16 and bfloat16 inputs are computed in float32).
MAX_TEMPERATURE = 1e4
#: Largest margin, alpha (distance boundaries) and loss weight accepted: times a temperature of at most 1e4 it stays
#: below 1e34, far from float32's largest value, so no hyper-parameter can overflow a float32 loss on its own.
MAX_MAGNITUDE = 1e30


# -- hyper-parameters ----------------------------------------------------------------------------------------------
class HyperParameterError(ValueError, AssertionError):
    """A scalar argument (hyper-parameter, size, choice, distance) of the right kind but out of its allowed range.

    Both a ``ValueError`` (this package's convention for out-of-range values) and an ``AssertionError`` (what PML
    raises for the hyper-parameters it checks, with ``assert``), so that either ``except`` clause catches it. The
    message names the argument.
    """


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """A finite real number (Python or numpy scalar, not a bool) inside [low, high] (``(low, high]`` with
    ``low_open``), returned as a Python float."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    out = float(value)
    if not math.isfinite(out):
        raise HyperParameterError(f"{name} must be finite, got {out}")
    too_low = low is not None and (out <= low if low_open else out < low)
    if too_low or (high is not None and out > high):
        left = "(" if low_open else "["
        raise HyperParameterError(f"{name} must lie in {left}{low}, {high}], got {out}")
    return out


def check_temperature(name: str, value: Any) -> float:
    """A temperature in [0, :data:`MAX_TEMPERATURE`]."""
    return check_number(name, value, 0.0, MAX_TEMPERATURE)


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An integer (Python or numpy, not a bool, not a float) in [low, high], returned as a Python int."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    out = int(value)
    if out < low or (high is not None and out > high):
        raise HyperParameterError(f"{name} must be an int in [{low}, {high if high is not None else 'inf'}], got {out}")
    return out


def check_bool(name: str, value: Any) -> bool:
    """A bool (Python or numpy); numbers, strings and None are rejected."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of the strings in ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise HyperParameterError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(name: str, value: Any, optional: bool = False) -> None:
    """A callable (a module, a function); ``None`` too when ``optional``."""
    if value is None and optional:
        return
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__} ({value!r})")


def check_numbers(
    name: str, values: Any, min_len: int = 1, low: float | None = None, high: float | None = None
) -> tuple[float, ...]:
    """A non-empty sequence of finite numbers in [low, high] (a string is not a sequence of numbers)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__} ({values!r})")
    out = tuple(check_number(f"{name}[{i}]", v, low, high) for i, v in enumerate(values))
    if len(out) < min_len:
        raise HyperParameterError(f"{name} must hold at least {min_len} value(s), got {len(out)}")
    return out


def check_distance(distance: BaseDistance, owner: str) -> None:
    """Ranked lists need a distance (small = similar), not a similarity."""
    if getattr(distance, "is_inverted", False):
        raise HyperParameterError(
            f"{owner} needs a distance (small = similar), but distance={type(distance).__name__} is a "
            "similarity (is_inverted=True); use e.g. LpDistance()"
        )


# -- tensors -------------------------------------------------------------------------------------------------------
def all_finite(t: Tensor) -> bool:
    """Whether every value is finite: the extremes are finite exactly when every value is (NaN propagates); one
    reduction pass, no temporary of the tensor's size."""
    t = t.detach()
    if t.numel() == 0 or t.is_meta:  # a meta tensor has a shape and a dtype but no values to check
        return True
    low, high = aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(name: str, t: Tensor) -> None:
    """Every value finite; the message names the argument and the first bad row."""
    if all_finite(t):
        return
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(1) if t.ndim > 1 else bad.reshape(-1)
        row = int(rows.nonzero()[0, 0])
        raise ValueError(f"{name} contains non-finite values (NaN or inf), first at row {row}")


def check_embeddings(
    name: str,
    emb: Any,
    width: int | Sequence[int] | None = None,
    check_values: bool = True,
    what: str = "",
) -> Tensor:
    """A 2-D floating-point tensor of shape (N, D), D >= 1, D in ``width`` when given, finite (``check_values``).

    ``what`` describes the expected width in the error message (default: the number)."""
    if not torch.is_tensor(emb):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {emb.dtype}")
    if emb.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(emb.shape)}")
    if width is not None:
        widths = (width,) if isinstance(width, int) else tuple(width)
        if emb.shape[1] not in widths:
            what = what or " or ".join(str(w) for w in widths)
            raise ValueError(f"{name} must have width {what}, got width {emb.shape[1]}")
    if check_values:
        check_finite(name, emb)
    return emb


def check_labels(name: str, labels: Any, n: int | None = None, required: bool = False) -> Tensor | None:
    """``None`` (unless ``required``) or a 1-D integer tensor of length ``n``."""
    if labels is None:
        if required:
            raise ValueError(f"{name} is required (a 1-D integer tensor with one class label per embedding)")
        return None
    if not torch.is_tensor(labels):
        raise TypeError(
            f"{name} must be a torch.Tensor of integer class labels, got {type(labels).__name__}; "
            "convert it with torch.as_tensor"
        )
    if labels.ndim != 1 or (n is not None and labels.shape[0] != n):
        raise ValueError(f"{name} must have shape ({n if n is not None else 'N'},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    return labels


def check_not_meta(name: str, t: Tensor, owner: str, why: str) -> None:
    """Reject a tensor on the meta device where the result's size depends on its values (``why`` says which)."""
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no values, but {owner} needs them: {why}")


def check_same_device(name: str, t: Tensor, like: Tensor, like_name: str = "embeddings") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``t`` is on the device of ``like``."""
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, {like_name} on {like.device}; put both on one device")


def check_features(features: Any, module: torch.nn.Module) -> None:
    """Input of a module with ``in_features``: (N, in_features) floating point, finite, of the parameters' dtype
    and device (any floating dtype under autocast)."""
    width = int(module.in_features)  # type: ignore[arg-type]
    check_embeddings("features", features, width, what=f"in_features = {width}")
    param = next(module.parameters(), None)
    if param is None:
        return
    check_same_device("features", features, param, "the module's parameters")
    if features.dtype != param.dtype and not is_autocast_enabled(features.device.type):
        raise TypeError(
            f"features are {features.dtype} but the module's parameters are {param.dtype}; convert one of them "
            "or run under torch.autocast"
        )


def packed_width(embedding_size: int) -> str:
    """The expected width of a packed embedding, for error messages."""
    return f"2 * embedding_size = {2 * embedding_size} (packed [x || s])"


def reference_width(embedding_size: int) -> str:
    """The accepted widths of a reference embedding (packed or sample part), for error messages."""
    return f"2 * embedding_size = {2 * embedding_size} (packed) or embedding_size = {embedding_size} (sample part)"


def check_batch(
    embeddings: Any,
    labels: Any = None,
    ref_emb: Any = None,
    ref_labels: Any = None,
    *,
    width: int | None = None,
    packed: int | None = None,
    labels_required: bool = False,
    ref_labels_required: bool | None = None,
    indices_tuple: Any = None,
    check_values: bool = True,
) -> None:
    """The PML call ``(embeddings, labels, ref_emb, ref_labels)`` of a loss or a miner, every value finite.

    ``check_values=False`` skips the finiteness checks (they read values on the host, a synchronisation on CUDA).

    embeddings: (N, D), D == ``width`` when given; labels: (N,) integers, required if ``labels_required``;
    ref_emb: (R, D) on the embeddings' device; ref_labels: (R,) integers, required with ``ref_emb`` when
    ``ref_labels_required`` (default: when labels are given); ``ref_labels`` without ``ref_emb`` is rejected (it
    would be ignored). ``packed=d``: NAMR inputs, embeddings (N, 2d) and ref_emb (R, 2d) or (R, d).
    ``indices_tuple``, when given, is checked by :func:`check_indices_tuple` for N queries x R references.
    """
    if packed is not None:
        check_embeddings("embeddings", embeddings, 2 * packed, check_values, what=packed_width(packed))
    else:
        check_embeddings("embeddings", embeddings, width, check_values, what=f"{width} (embedding_size)")
    check_labels("labels", labels, embeddings.shape[0], required=labels_required)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb (it would be ignored); pass ref_emb too")
        if indices_tuple is not None:
            check_indices_tuple(indices_tuple, embeddings.shape[0], embeddings.shape[0])
        return
    if packed is not None:
        check_reference("ref_emb", ref_emb, packed)
    else:
        d = embeddings.shape[1]
        check_embeddings("ref_emb", ref_emb, d, check_values, what=f"{d} like embeddings")
    check_same_device("ref_emb", ref_emb, embeddings)
    if ref_labels_required is None:
        ref_labels_required = labels is not None
    check_labels("ref_labels", ref_labels, ref_emb.shape[0], required=ref_labels_required)
    if indices_tuple is not None:
        check_indices_tuple(indices_tuple, embeddings.shape[0], ref_emb.shape[0])


def check_structure_positive(name: str, packed: Tensor, embedding_size: int) -> None:
    """The structure part s of checked packed embeddings is strictly positive (NAMR's per-dimension weights)."""
    s = packed[:, embedding_size:].detach()
    if not bool((s > 0).all()):
        row = int((s <= 0).any(1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: the structure part s (columns {embedding_size}:) must be strictly positive "
            f"(first non-positive value at row {row})"
        )


def check_packed(name: str, packed: Any, embedding_size: int) -> None:
    """Packed NAMR embeddings ``[x || s]``: (N, 2d) floating point, finite, s > 0."""
    check_embeddings(name, packed, 2 * embedding_size, what=packed_width(embedding_size))
    check_structure_positive(name, packed, embedding_size)


def check_reference(name: str, reference: Any, embedding_size: int) -> None:
    """Reference embeddings given packed (width 2d) or as the sample part alone (width d), finite."""
    check_embeddings(name, reference, (2 * embedding_size, embedding_size), what=reference_width(embedding_size))


# -- miners' output --------------------------------------------------------------------------------------------------
def check_indices_tuple(indices_tuple: Any, n: int, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A PML triplet ``(a, p, n)`` or pair ``(a1, p, a2, n)`` tuple for n queries x m references, as the pairs
    ``(a1, p, a2, n)`` (long tensors): 1-D integer tensors, matching lengths, indices in range, and no pair listed
    both as positive and as negative."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError("indices_tuple must be a PML tuple of 3 (triplets) or 4 (pairs) index tensors")
    for t in indices_tuple:
        if not torch.is_tensor(t) or t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError("indices_tuple must hold 1-D integer index tensors")
    a1, p, a2, neg = as_pairs(indices_tuple)
    for kind, rows, cols in (("positive", a1, p), ("negative", a2, neg)):
        if rows.shape != cols.shape:
            raise ValueError(f"indices_tuple: {kind} anchors and partners differ in length")
    if any(t.is_meta for t in (a1, p, a2, neg)):  # meta tensors have no values: the shapes are all there is
        return a1, p, a2, neg
    for kind, rows, cols in (("positive", a1, p), ("negative", a2, neg)):
        if rows.numel() and (rows.min() < 0 or rows.max() >= n or cols.min() < 0 or cols.max() >= m):
            raise ValueError(f"indices_tuple: {kind} pair indices out of range for {n} queries x {m} references")
    if a1.numel() and a2.numel() and bool(torch.isin(a1 * m + p, a2.to(a1.device) * m + neg.to(a1.device)).any()):
        raise ValueError("indices_tuple: a pair is listed both as positive and as negative")
    return a1, p, a2, neg


def as_pairs(indices_tuple: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A PML triplet ``(a, p, n)`` or pair ``(a1, p, a2, n)`` tuple as the pairs ``(a1, p, a2, n)`` (long tensors),
    without checks (see :func:`check_indices_tuple`)."""
    idx = [t.long() for t in indices_tuple]
    return (idx[0], idx[1], idx[0], idx[2]) if len(idx) == 3 else (idx[0], idx[1], idx[2], idx[3])


def pairs_to_masks(indices_tuple: Any, n: int, m: int, device: Any) -> tuple[Tensor, Tensor]:
    """Dense (n x m) positive / negative masks from a PML pair or triplet tuple already checked by
    :func:`check_indices_tuple` (a tuple names its pairs: no labels are needed)."""
    a1, p, a2, n_idx = (t.to(device) for t in as_pairs(indices_tuple))
    pos = torch.zeros(n, m, dtype=torch.bool, device=device)
    neg = torch.zeros(n, m, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n_idx] = True
    return pos, neg


def check_keywords(owner: object, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming ``owner``'s class (and the closest accepted name) for a keyword argument that no
    ``__init__`` in its class hierarchy accepts, before a base class's ``__init__`` raises naming itself."""
    import difflib
    import inspect

    accepted: list[str] = []
    for klass in type(owner).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - a builtin __init__ without a signature
            continue
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted += [p.name for p in params if p.kind in kinds and p.name != "self"]
    for name in kwargs:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{type(owner).__name__}() got an unexpected keyword argument {name!r}{hint}")
