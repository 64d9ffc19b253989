"""NAMRLoss: joins any distance-based PML loss on the sample embedding with the NAMR structure term."""

from __future__ import annotations

import sys
import warnings
from types import FrameType

import torch
from pytorch_metric_learning.losses.base_loss_wrapper import BaseLossWrapper
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..functional import namr as F_namr
from ..utils.validation import (
    MAX_MAGNITUDE,
    check_batch,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_keywords,
    check_number,
    check_structure_positive,
)
from .multi_cluster_ranking_loss import MultiClusterRankingLoss


class NAMRLoss(BaseLossWrapper, ModuleWithRecords):
    """``loss(x, ...) + structure_weight * structure_loss(x, s)`` on packed ``[x || s]`` embeddings.

    Paper: NAMR (TCSVT 2022) trains a sample embedding x with "any distance-based loss" jointly with a
    structure embedding s learned by self-supervised multi-cluster ranking; the documented objective is
    the NASA code's ``L = L_metric(x_tilde, y) + lambda * L_strc(x_tilde, s)`` with lambda = 2
    (docs/namr.md, section 4.6).
    This is what goes in a PML trainer's ``loss_funcs["metric_loss"]``.

    ``forward(packed, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``:

    1. split the packed input (and ``ref_emb`` when given, packed or sample-only) into x and s;
    2. if ``scale_by_mean_distance``: x_tilde = x / d_bar with d_bar the batch mean pairwise distance of
       x, not detached (NASA, docs/namr.md, section 4.1); ``ref_emb`` is divided by the same d_bar;
    3. if ``miner`` is given and no ``indices_tuple`` was passed: mine on x_tilde only;
    4. return ``loss(x_tilde, labels, indices_tuple, ref_emb, ref_labels) + structure_weight *
       structure_loss([x_tilde || s])``. The structure term always uses the batch only.

    Bad input (see :mod:`pml_rll.utils.validation`): the arguments are checked at construction (``loss``,
    ``structure_loss``, ``miner`` callable; sizes ints, numpy ints too; ``structure_weight`` a number >= 0) and
    every call before anything is computed or recorded: embeddings (N, 2d) floating point, finite, s > 0 when
    the structure term is on, N >= 2; labels a 1-D integer tensor of length N, or an ``indices_tuple``;
    ``ref_emb`` (R, 2d) or (R, d), finite, on the same device, with ``ref_labels`` when labels are given.

    ``structure_weight == 0`` skips the structure term: the result is exactly the base loss and s gets
    no gradient. Both parts are kept, detached, in ``metric_loss_value`` and ``structure_loss_value``
    (recordable attributes, so record-keeper logs them).

    Args:
        loss: any loss called as ``loss(embeddings, labels, indices_tuple, ref_emb=..., ref_labels=...)``:
            a PML loss or :class:`pml_rll.losses.RankedListLoss`. ``ref_emb``/``ref_labels`` are passed
            only when given, so losses that reject them still work without them.
        embedding_size: d, the width of x and of s.
        structure_loss: the structure term; default ``MultiClusterRankingLoss(embedding_size)`` (NASA).
        structure_weight: lambda in [0, 1e30] (NASA: 2.0).
        miner: optional PML miner applied to x_tilde (use this rather than a trainer-level miner so
            mining sees the scaled geometry).
        scale_by_mean_distance: divide x by the batch mean pairwise distance (NASA: True).
        structure_geometry: the x that the structure term sees. ``"scaled"``: x_tilde, as in NASA, whose
            triplet loss works on raw distances. ``"l2"``: x_tilde L2-normalised, for base losses that
            normalise their embeddings (cosine geometry), so that both terms shape the same geometry. ``"auto"``
            (default): ``"l2"`` when ``loss.distance.normalize_embeddings`` is true, else ``"scaled"``
            (a choice of this package; NAMR's text does not say). :meth:`retrieval_settings` sets the
            matching retrieval geometry (``NAMRReRankKNN(normalize_sample=True)`` for ``"l2"``).
        retrieval: the re-ranking settings of :meth:`retrieval_settings` (``NAMRReRankKNN`` keyword arguments
            ``num_candidates``, ``weighting``, ``blend``). Default: :func:`validated_retrieval` of ``loss``, the
            settings validated for that base loss when it is one of the bundled bases (recognised by class name:
            triplet, multi-similarity, contrastive, ranked list), NASA's otherwise.

    Retrieval: ``NAMRReRankKNN.for_loss(loss)`` is the ``knn_func`` to evaluate with (PML's ``AccuracyCalculator`` or
    ``InferenceModel``, with ``normalize_embeddings=False`` in the tester): the validated re-ranking in the
    geometry the loss trained. :meth:`check_retrieval` raises when a hand-built ``NAMRReRankKNN`` does not match.
    """

    def __init__(
        self,
        loss: torch.nn.Module,
        embedding_size: int,
        structure_loss: torch.nn.Module | None = None,
        structure_weight: float = 2.0,
        miner: torch.nn.Module | None = None,
        scale_by_mean_distance: bool = True,
        structure_geometry: str = "auto",
        retrieval: dict | None = None,
        **kwargs,
    ):
        check_keywords(self, kwargs)  # a typo names this class and the closest keyword
        check_callable("loss", loss)
        embedding_size = check_int("embedding_size", embedding_size)
        structure_weight = check_number("structure_weight", structure_weight, 0.0, MAX_MAGNITUDE)
        check_callable("structure_loss", structure_loss, optional=True)
        check_callable("miner", miner, optional=True)
        scale_by_mean_distance = check_bool("scale_by_mean_distance", scale_by_mean_distance)
        check_choice("structure_geometry", structure_geometry, ("auto", "scaled", "l2"))
        retrieval = _checked_retrieval(embedding_size, validated_retrieval(loss) if retrieval is None else retrieval)
        super().__init__(loss=loss, **kwargs)
        if structure_loss is None:
            structure_loss = MultiClusterRankingLoss(embedding_size)
        elif getattr(structure_loss, "embedding_size", embedding_size) != embedding_size:
            raise ValueError(
                f"structure_loss.embedding_size ({structure_loss.embedding_size}) != embedding_size ({embedding_size})"
            )
        self.loss = loss
        self.structure_loss = structure_loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.structure_weight = float(structure_weight)
        self.scale_by_mean_distance = bool(scale_by_mean_distance)
        if structure_geometry == "auto":
            normalised = getattr(getattr(loss, "distance", None), "normalize_embeddings", False)
            structure_geometry = "l2" if normalised else "scaled"
        self.structure_geometry = structure_geometry
        self.retrieval = retrieval
        self.add_to_recordable_attributes(
            list_of_names=[
                "embedding_size",
                "structure_weight",
                "metric_loss_value",
                "structure_loss_value",
                "mean_distance_scale",
            ],
            is_stat=False,
        )

    @property
    def retrieval_normalize_sample(self) -> bool:
        """Whether retrieval must L2-normalise x: True when the structure term shaped normalised x (``"l2"``)."""
        return self.structure_geometry == "l2"

    def retrieval_settings(self, **overrides) -> dict:
        """The ``NAMRReRankKNN`` keyword arguments to evaluate this loss's embeddings with: :attr:`retrieval`'s
        settings (the validated ones by default) with ``overrides`` laid over them, and ``normalize_sample`` for the
        geometry the loss trained. ``NAMRReRankKNN.for_loss(loss)`` builds the kNN from them.

        An override ``normalize_sample`` that contradicts the loss's geometry raises ``ValueError``."""
        settings = {**self.retrieval, **overrides}
        expected = self.retrieval_normalize_sample
        if "normalize_sample" in settings and settings["normalize_sample"] != expected:
            raise ValueError(
                f"normalize_sample={settings['normalize_sample']!r} does not match this NAMRLoss: its structure "
                f"geometry is {self.structure_geometry!r}, so retrieval needs normalize_sample={expected}"
            )
        settings["normalize_sample"] = expected
        return settings

    def check_retrieval(self, knn) -> None:
        """Raise ``ValueError`` when ``knn`` (a ``NAMRReRankKNN``) retrieves in another geometry or width than
        this loss trained (``normalize_sample`` must equal :attr:`retrieval_normalize_sample`)."""
        if not (hasattr(knn, "embedding_size") and hasattr(knn, "normalize_sample")):
            raise TypeError(f"knn: expected a NAMRReRankKNN, got {type(knn).__name__}")
        if knn.embedding_size != self.embedding_size:
            raise ValueError(
                f"knn.embedding_size ({knn.embedding_size}) != this NAMRLoss's embedding_size ({self.embedding_size})"
            )
        if knn.normalize_sample != self.retrieval_normalize_sample:
            raise ValueError(
                f"knn.normalize_sample={knn.normalize_sample} does not match this NAMRLoss (structure geometry "
                f"{self.structure_geometry!r}): retrieval would rank x in another geometry than the loss trained; "
                "build it with NAMRReRankKNN.for_loss(loss)"
            )

    @staticmethod
    def supported_losses():
        """Any loss with PML's call signature can be wrapped (PML's ``BaseLossWrapper`` hook)."""
        return None  # any loss with the PML call signature

    @classmethod
    def check_loss_support(cls, loss_name):
        """Accept every loss name (see :meth:`supported_losses`)."""
        pass

    def check_input(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None) -> None:
        """Raise on bad input to :meth:`forward` (nothing is computed or recorded)."""
        d = self.embedding_size
        check_batch(embeddings, labels, ref_emb, ref_labels, packed=d, indices_tuple=indices_tuple)
        if self.structure_weight > 0:
            check_structure_positive("embeddings", embeddings, d)
        if labels is None and indices_tuple is None:
            raise ValueError("NAMRLoss needs labels or an indices_tuple (the base loss's pairs or triplets)")
        if labels is None and self.structure_weight > 0 and getattr(self.structure_loss, "shortlist_weight", 0) > 0:
            raise ValueError("labels: the structure term's short-list ranking (shortlist_weight > 0) needs labels")
        if embeddings.shape[0] < 2 and (self.scale_by_mean_distance or self.structure_weight > 0):
            raise ValueError(f"embeddings: NAMRLoss needs a batch of at least 2 embeddings, got {embeddings.shape[0]}")

    def _split_ref(self, ref_emb: torch.Tensor) -> torch.Tensor:
        return F_namr.sample_part(ref_emb, self.embedding_size, "ref_emb")

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The joint loss of packed embeddings ``[x || s]`` (N, 2 * embedding_size).

        The base loss sees the (scaled) sample part x with ``labels``, ``indices_tuple`` and the sample part of
        ``ref_emb``; the structure term sees the whole batch. Returns the weighted sum, a scalar tensor.
        """
        self.check_input(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        x, s = F_namr.split_packed(embeddings, self.embedding_size)
        if labels is not None:
            labels = c_f.to_device(labels, embeddings)
        ref_x = None if ref_emb is None else self._split_ref(ref_emb).to(x.dtype)
        if ref_x is not None and ref_labels is not None:
            ref_labels = c_f.to_device(ref_labels, ref_x)

        if self.scale_by_mean_distance:
            scale = F_namr.mean_pairwise_distance(x)
            x = x / scale
            if ref_x is not None:
                ref_x = ref_x / scale
            self.mean_distance_scale = scale.item()
        else:
            self.mean_distance_scale = 1.0

        if self.miner is not None and indices_tuple is None:
            if ref_x is None:
                indices_tuple = self.miner(x, labels)
            else:
                indices_tuple = self.miner(x, labels, ref_x, ref_labels)

        loss_kwargs = {}
        if ref_x is not None:
            loss_kwargs["ref_emb"] = ref_x
        if ref_labels is not None:
            loss_kwargs["ref_labels"] = ref_labels
        metric = self.loss(x, labels, indices_tuple, **loss_kwargs)
        self.metric_loss_value = float(metric.detach())

        if self.structure_weight == 0:
            self.structure_loss_value = 0.0
            return metric
        x_s = torch.nn.functional.normalize(x, dim=1) if self.structure_geometry == "l2" else x
        # labels reach the structure term only when it asks for them (a supervised short-list term)
        wants_labels = labels is not None and getattr(self.structure_loss, "shortlist_weight", 0) > 0
        structure = (
            self.structure_loss(F_namr.pack(x_s, s), labels)
            if wants_labels
            else self.structure_loss(F_namr.pack(x_s, s))
        )
        self.structure_loss_value = float(structure.detach())
        return metric + self.structure_weight * structure


def _normalise_name(name: str) -> str:
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    if key.startswith("namr"):
        key = key[4:]
    if key.endswith("loss"):
        key = key[:-4]
    return key


_ALIASES = {
    "triplet": "triplet",
    "tripletmargin": "triplet",
    "multisimilarity": "multi-similarity",
    "contrastive": "contrastive",
    "rankedlist": "rll",
    "rll": "rll",
}

#: The names :func:`make_namr_loss` and :data:`NAMR_CONFIGS` accept: the benchmark registry's names of the base
#: losses (``python -m benchmarks.run --list``).
NAMR_VARIANTS = ("triplet", "multi-similarity", "contrastive", "rll")

#: Names accepted until 0.2.0 and still accepted with a ``DeprecationWarning``: old name -> its name now.
DEPRECATED_NAMES = {"multi_similarity": "multi-similarity", "ranked_list": "rll", "ms": "multi-similarity"}


def make_base_loss(base_name: str):
    """(base loss, miner or None) for a NAMR variant name; see :func:`make_namr_loss`."""
    from pytorch_metric_learning import distances, losses, miners, reducers

    key = canonical_base_name(base_name)
    if key == "triplet":
        # NASA recipe (docs/namr.md, section 7): margin 0.2 on the scaled, un-normalised x, plain mean over triplets,
        # distance-weighted negatives.
        loss = losses.TripletMarginLoss(
            margin=0.2, distance=distances.LpDistance(normalize_embeddings=False), reducer=reducers.MeanReducer()
        )
        return loss, miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    if key == "multi-similarity":
        return losses.MultiSimilarityLoss(), None
    if key == "contrastive":
        return losses.ContrastiveLoss(), None
    from . import RankedListLoss  # the package's faithful RLL

    return RankedListLoss(margin=0.4, Tn=10.0), None


#: The NASA code's configuration (docs/namr.md, section 7): lambda = 2, centres mu and max(0.2 mu, mu - 3 sigma)
#: from the batch, alpha = 10, joint gradient, re-ranking of the top 32 by the query's s alone.
NASA_CONFIG: dict = {
    "structure_weight": 2.0,
    "t_values": (0.0, 3.0),
    "alpha": 10.0,
    "center_mode": "batch",
    "neighbourhood_k": None,
    "detach_sample_embedding": False,
    # not in NASA's code (docs/namr.md, section 9): off
    "centre_structure": False,
    "shortlist_weight": 0.0,
    "shortlist_k": 8,
    "shortlist_temperature": 0.1,
    "retrieval": {"num_candidates": 32, "weighting": "query", "blend": 1.0},
}


def _warn_deprecated(name: str) -> None:
    """A ``DeprecationWarning`` naming the current name of a base-loss name accepted until 0.2.0 (if ``name`` is one),
    attributed to the first caller outside this module."""
    new = DEPRECATED_NAMES.get(name.strip().lower())
    if new is None:
        return
    level = 1
    frame: FrameType | None = sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        level, frame = level + 1, frame.f_back
    warnings.warn(
        f"the NAMR base loss name {name!r} is deprecated; use {new!r} (the benchmark registry's name)",
        DeprecationWarning,
        stacklevel=level,
    )


class _NamrConfigs(dict):
    """:data:`NAMR_CONFIGS`: a plain dict whose deprecated keys (:data:`DEPRECATED_NAMES`) still index it, with a
    ``DeprecationWarning`` naming the current key."""

    def __missing__(self, key: object) -> dict:
        if isinstance(key, str) and key.strip().lower() in DEPRECATED_NAMES:
            _warn_deprecated(key)
            return self[DEPRECATED_NAMES[key.strip().lower()]]  # type: ignore[no-any-return]
        raise KeyError(key)


#: The configuration per base loss that :func:`make_namr_loss` and the benchmark's NAMR entries use. Chosen on
#: validation classes carved from the Omniglot training alphabets (never the test alphabets) with the base losses
#: of ``benchmarks/losses/registry.py``; the ablation and the commands are in ``docs/namr_ablation.md``. Keys:
#: ``structure_weight`` (lambda), ``t_values``, ``alpha``, ``center_mode``, ``neighbourhood_k`` and
#: ``detach_sample_embedding`` (:class:`MultiClusterRankingLoss` arguments), and ``retrieval`` (keyword
#: arguments of :class:`pml_rll.retrieval.NAMRReRankKNN`).
#: Retrieval: plain Euclidean search on x (``mode="plain"``). No re-ranking by s tried on validation, including the
#: remedies for the collapse of s (centred s, a short-list ranking term), beat plain retrieval by 0.5 MAP@R points
#: for any base (docs/namr_ablation.md), so the structure term is kept as a regulariser of x and re-ranking is an
#: option: ``dict(retrieval, mode="rerank")`` re-ranks with the least harmful variant found, the query's s blended
#: 1:9 with the plain distance over the top 8 candidates (-0.01 MAP@R points on average). ``NAMRReRankKNN``
#: re-ranks max(k, num_candidates) candidates, so a caller asking for more than 8 neighbours gets all k re-ranked.
_VALIDATED_RETRIEVAL = {"mode": "plain", "num_candidates": 8, "weighting": "query", "blend": 0.1}
NAMR_CONFIGS: dict[str, dict] = _NamrConfigs(
    {
        # NASA's structure term (lambda 2, batch centres); per-anchor centres were level with it on validation
        "triplet": dict(NASA_CONFIG, retrieval=dict(_VALIDATED_RETRIEVAL)),
        # lambda 2 costs MultiSimilarity and RankedListLoss 4-6 MAP@R points on validation; 0.25 is the best tried
        "multi-similarity": dict(NASA_CONFIG, structure_weight=0.25, retrieval=dict(_VALIDATED_RETRIEVAL)),
        # per-anchor centres: each anchor's mu_i, sigma_i from its own row of distances
        "contrastive": dict(NASA_CONFIG, center_mode="per_anchor", retrieval=dict(_VALIDATED_RETRIEVAL)),
        "rll": dict(NASA_CONFIG, structure_weight=0.25, retrieval=dict(_VALIDATED_RETRIEVAL)),
    }
)

_STRUCTURE_KEYS = (
    "t_values",
    "alpha",
    "center_mode",
    "neighbourhood_k",
    "detach_sample_embedding",
    "centre_structure",
    "shortlist_weight",
    "shortlist_k",
    "shortlist_temperature",
)


def canonical_base_name(base_name: str) -> str:
    """The :data:`NAMR_VARIANTS` name of a base loss ("TripletMarginLoss", "multi-similarity", "NAMR + Triplet", ...);
    a :data:`DEPRECATED_NAMES` name is translated with a ``DeprecationWarning``."""
    if not isinstance(base_name, str):
        raise TypeError(f"base_name must be a string, one of {NAMR_VARIANTS}, got {type(base_name).__name__}")
    if base_name.strip().lower() in DEPRECATED_NAMES:
        _warn_deprecated(base_name)
        return DEPRECATED_NAMES[base_name.strip().lower()]
    key = _ALIASES.get(_normalise_name(base_name))
    if key is None:
        raise ValueError(f"unknown NAMR base loss {base_name!r}; expected one of {NAMR_VARIANTS}")
    return key


def namr_config(base_name: str) -> dict:
    """A copy of the configuration :data:`NAMR_CONFIGS` holds for a base loss (name as in :func:`make_namr_loss`)."""
    cfg = NAMR_CONFIGS[canonical_base_name(base_name)]
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}


_RETRIEVAL_KEYS = ("mode", "num_candidates", "weighting", "blend")


def validated_retrieval(base) -> dict:
    """The validated re-ranking settings (``NAMRReRankKNN`` keyword arguments) for a base loss, read from
    :data:`NAMR_CONFIGS`: ``base`` is a name as in :func:`make_namr_loss` or a loss object, recognised by its class
    name (``TripletMarginLoss``, ``MultiSimilarityLoss``, ``ContrastiveLoss``, ``RankedListLoss``). A loss object
    of any other class gets NASA's settings (:data:`NASA_CONFIG`); an unknown name raises ``ValueError``.

    The geometry (``normalize_sample``) is not part of it: it follows the trained loss
    (:meth:`NAMRLoss.retrieval_settings`)."""
    if isinstance(base, str):
        return dict(namr_config(base)["retrieval"])
    try:
        key = canonical_base_name(type(base).__name__)
    except ValueError:
        return dict(NASA_CONFIG["retrieval"])
    return dict(namr_config(key)["retrieval"])


def _checked_retrieval(embedding_size: int, retrieval) -> dict:
    if not isinstance(retrieval, dict):
        raise TypeError(f"retrieval must be a dict of NAMRReRankKNN settings, got {type(retrieval).__name__}")
    unknown = sorted(set(retrieval) - set(_RETRIEVAL_KEYS))
    if unknown:
        raise ValueError(
            f"retrieval: unknown keys {unknown}; allowed: {list(_RETRIEVAL_KEYS)} (the geometry, normalize_sample, "
            "follows the loss)"
        )
    out = dict(retrieval)  # the same checks as NAMRReRankKNN's, naming the argument
    if "mode" in out:
        check_choice("mode", out["mode"], ("rerank", "plain", "exhaustive"))
    if "num_candidates" in out:
        out["num_candidates"] = check_int("num_candidates", out["num_candidates"])
    if "weighting" in out:
        check_choice("weighting", out["weighting"], ("query", "symmetric"))
    if "blend" in out:
        out["blend"] = check_number("blend", out["blend"], 0.0, 1.0)
    return out


def make_structure_loss(embedding_size: int, config: dict, **kwargs) -> MultiClusterRankingLoss:
    """``MultiClusterRankingLoss`` built from the structure keys of a :data:`NAMR_CONFIGS` entry."""
    return MultiClusterRankingLoss(embedding_size, **{k: config[k] for k in _STRUCTURE_KEYS if k in config}, **kwargs)


def make_namr_loss(base_name: str, embedding_size: int, **kwargs) -> NAMRLoss:
    """Build "NAMR + <base>" by name for benchmark runners.

    ``base_name`` is a :data:`NAMR_VARIANTS` name (the benchmark registry's) or the base loss's class name, case-
    and punctuation-insensitive: "triplet" / "TripletMarginLoss", "multi-similarity" / "MultiSimilarityLoss",
    "contrastive" / "ContrastiveLoss", "rll" / "RankedListLoss" (an optional "NAMR+" prefix is ignored; the names
    of :data:`DEPRECATED_NAMES` still work, with a ``DeprecationWarning``). Base losses:

    * triplet: ``TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False),
      reducer=MeanReducer())`` with ``DistanceWeightedMiner(0.5, 1.4)`` (the NASA recipe);
    * multi-similarity: PML ``MultiSimilarityLoss()`` defaults (cosine similarity);
    * contrastive: PML ``ContrastiveLoss()`` defaults (L2-normalised distance, margins 0 and 1);
    * rll: ``pml_rll.losses.RankedListLoss(margin=0.4, Tn=10.0)``.

    The structure weight, the structure term and the retrieval settings come from :data:`NAMR_CONFIGS` for that
    base (see :func:`namr_config`); evaluate with ``NAMRReRankKNN.for_loss(loss)``, which also
    sets the geometry.
    ``kwargs`` go to :class:`NAMRLoss` and override it (``structure_weight``, ``structure_loss``, ``miner``,
    ``retrieval``, ...).
    """
    key = canonical_base_name(base_name)  # (warns once for a deprecated name)
    loss, miner = make_base_loss(key)
    config = namr_config(key)
    kwargs.setdefault("miner", miner)
    kwargs.setdefault("retrieval", config["retrieval"])
    kwargs.setdefault("structure_weight", config["structure_weight"])
    if "structure_loss" not in kwargs:
        kwargs["structure_loss"] = make_structure_loss(embedding_size, config)
    return NAMRLoss(loss, embedding_size, **kwargs)
