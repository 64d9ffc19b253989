"""Loss registry for the head-to-head benchmark: every hyper-parameter declared once, as data.

Each :class:`LossEntry` names the loss class (and optional miner class) by import path and declares its
hyper-parameters as :class:`Param` objects: the default with its source, and the search space that ``--tune``
draws from (a range on a linear or log scale, or a list of choices). The builders, the report, ``--list``,
``--set`` / ``--config`` and the loss speed benchmark all read these declarations; no value is written twice.

Hyper-parameter names:

* a plain name (``margin``) is a keyword argument of the loss class;
* ``miner.<name>`` is a keyword argument of the miner class;
* ``loss_lr_multiplier`` is not passed to any class: the loss's own parameters (proxies, a learned beta) are
  trained at ``loss_lr_multiplier x --lr``;
* NAMR entries wrap another entry: their own names (``structure_weight``) go to ``NAMRLoss`` and
  ``loss.<name>`` to the wrapped entry (``loss.margin``, ``loss.miner.margin``), with the wrapped entry's
  defaults and search space.
* cross-batch-memory entries (``rll-xbm``, ...) wrap another entry the same way: ``memory_size`` and
  ``start_iteration`` go to :class:`benchmarks.warmup_cross_batch_memory.WarmupCrossBatchMemory`, ``loss.<name>``
  to the wrapped entry (its miner mines the batch and the memory).

A value may be a placeholder string: ``"{embedding_size}"``, ``"{num_classes}"`` (the training classes of the run)
or ``"{<other hyper-parameter>}"`` (the triplet miner's margin follows the loss's margin this way).

Left out on purpose: PML's ``LiftedStructureLoss``. It builds a (#positive pairs x #negative pairs) matrix, so its
memory grows as O(B^4) in the batch size B (8.9 GB at B=512, killed at B=1024 on a 24 GB machine, 317 s per
Fashion-MNIST epoch on 2 CPU cores); ``GeneralizedLiftedStructureLoss`` (the lifted-structure variant of "In
Defense of the Triplet Loss") stands in for it.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

EXCLUDED = {
    "lifted-structure": "PML LiftedStructureLoss: O(#pos pairs x #neg pairs) memory, 8.9 GB at batch 512 and "
    "OOM at 1024; GeneralizedLiftedStructureLoss is benchmarked instead",
}
FAMILIES = ("ours", "pml", "user")
LR_MULTIPLIER = "loss_lr_multiplier"
_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][\w.]*)\}$")


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its default, where the default comes from, and its search space for ``--tune``.

    Args:
        default: the value used without ``--set`` / ``--tune`` (a number, bool, string, ``None`` or placeholder).
        low, high: a numeric search range (both or neither); ``log`` draws on a log scale (``low > 0``),
            ``integer`` draws integers.
        choices: a search space of discrete values instead of a range.
        source: where the default comes from when it differs from the entry's source (e.g. "PML default").
    """

    default: object
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if (self.low is None) != (self.high is None):
            raise ValueError(f"a search range needs both low and high, got low={self.low}, high={self.high}")
        if self.low is not None:
            if self.choices is not None:
                raise ValueError("give a search range (low, high) or choices, not both")
            for v in (self.low, self.high):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"search range bounds must be finite numbers, got {self.low!r}, {self.high!r}")
            if not self.low < self.high:  # type: ignore[operator]  # both checked above
                raise ValueError(f"search range needs low < high, got [{self.low}, {self.high}]")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale search range needs low > 0, got {self.low}")
        if self.choices is not None and len(self.choices) < 1:
            raise ValueError("choices must not be empty")

    @property
    def tunable(self) -> bool:
        return self.low is not None or self.choices is not None

    def contains(self, value: object) -> bool:
        """Whether ``value`` lies in the search space: one of the choices, or a number (not a bool) inside
        ``[low, high]``, a whole one for an ``integer`` range. A fixed parameter's space is its default alone."""
        if self.choices is not None:
            return value in self.choices
        if self.low is None or self.high is None:
            return bool(value == self.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (not self.integer or float(value).is_integer())

    def space(self) -> str:
        """The search space in words, '' when the parameter is fixed."""
        if self.choices is not None:
            return "{" + ", ".join(repr(c) for c in self.choices) + "}"
        if self.low is None:
            return ""
        scale = "log" if self.log else "linear"
        return f"[{self.low:g}, {self.high:g}] {scale}{', int' if self.integer else ''}"

    def distribution(self) -> Any:
        """The Optuna distribution of the search space."""
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)


@dataclass
class LossSpec:
    """What a registry entry builds for one run."""

    loss: torch.nn.Module
    miner: torch.nn.Module | None = None
    namr: bool = False  # needs NAMREmbedder, un-normalized tester, and the NAMR re-ranking kNN
    loss_lr_multiplier: float = 1.0  # learning rate of the loss's own parameters, relative to --lr
    retrieval: dict | None = None  # NAMR: keyword arguments of NAMRReRankKNN (candidates, weighting, blend)


@dataclass
class BuildContext:
    """What a run knows when it builds its loss: the values the placeholders refer to."""

    num_classes: int
    embedding_size: int


def import_object(path: str) -> Any:
    """Import ``"module:Name"`` (or ``"module.Name"``); raise ValueError naming the path when it fails."""
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"{path!r} is not an import path like 'package.module:Class'")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {path!r}: {e}") from e


@dataclass(frozen=True)
class LossEntry:
    """One benchmarked loss: its class, optional miner, and declared hyper-parameters.

    Args:
        name: registry name (``--losses``, ``--set NAME.PARAM=VALUE``).
        family: ``"ours"`` (pml_rll), ``"pml"`` (PML's bundled losses) or ``"user"`` (from ``--config``).
        loss_class: import path ``"module:Class"`` of the loss.
        params: hyper-parameter name -> :class:`Param` (see the module docstring for the naming rules).
        source: the paper (title, venue) the defaults come from.
        miner_class: import path of the miner, or ``None``.
        wraps: for NAMR and cross-batch-memory entries, the wrapped entry (its parameters appear here as
            ``loss.<name>``).
        memory: ``True`` for a cross-batch-memory entry (``wraps`` trained through a memory), ``False`` for NAMR.
        notes: anything a reader of the table should know.
    """

    name: str
    family: str
    loss_class: str
    params: dict[str, Param]
    source: str
    miner_class: str | None = None
    wraps: LossEntry | None = None
    memory: bool = False
    notes: str = ""

    @property
    def namr(self) -> bool:
        return self.wraps is not None and not self.memory

    @property
    def base(self) -> str | None:
        return self.wraps.name if self.wraps is not None else None

    def defaults(self) -> dict[str, object]:
        return {k: p.default for k, p in self.params.items()}

    def hparams(self, overrides: dict[str, object] | None = None) -> dict[str, object]:
        """Every hyper-parameter: the defaults with ``overrides`` laid over them (unknown names are an error)."""
        hp = self.defaults()
        for k, v in (overrides or {}).items():
            if k not in hp:
                raise ValueError(f"{self.name}: unknown hyper-parameter {k!r}; known: {', '.join(hp)}")
            hp[k] = v
        return hp

    def search_space(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if p.tunable}

    def with_changes(
        self,
        defaults: dict[str, object] | None = None,
        search: dict[str, Param] | None = None,
        source: str = "--config",
    ) -> LossEntry:
        """A copy with new defaults and/or search spaces for existing parameters (``--config`` on a known entry)."""
        params = dict(self.params)
        for k, v in (defaults or {}).items():
            if k not in params:
                raise ValueError(f"{self.name}: unknown hyper-parameter {k!r}; known: {', '.join(params)}")
            params[k] = replace(params[k], default=v, source=source)
        for k, p in (search or {}).items():
            if k not in params:
                raise ValueError(f"{self.name}: search space for unknown hyper-parameter {k!r}")
            params[k] = replace(p, default=params[k].default, source=params[k].source)
        return replace(self, params=params)

    def build(self, ctx: BuildContext, hparams: dict[str, object] | None = None) -> LossSpec:
        """Build (loss, miner) with ``hparams`` (default: the declared defaults), placeholders resolved."""
        hp = self.hparams(hparams)
        loss_kw, miner_kw, inner_kw = {}, {}, {}
        for k, v in hp.items():
            if k.startswith("loss.") and self.wraps is not None:
                inner_kw[k[len("loss.") :]] = v
            elif k.startswith("miner."):
                miner_kw[k[len("miner.") :]] = _resolve(v, ctx, hp, k)
            elif k != LR_MULTIPLIER:
                loss_kw[k] = _resolve(v, ctx, hp, k)
        lr_mult = float(_resolve(hp.get(LR_MULTIPLIER, 1.0), ctx, hp, LR_MULTIPLIER))
        if self.wraps is not None and self.memory:
            return memory_spec(self.wraps, ctx, loss_kw, inner_kw)
        if self.wraps is not None:
            config = namr_base_config(self.wraps.name)
            config["retrieval"] = dict(config["retrieval"])
            for k, v in loss_kw.items():
                if k.startswith("structure."):
                    config[k[len("structure.") :]] = v
                elif k.startswith("retrieval."):
                    config["retrieval"][k[len("retrieval.") :]] = v
                else:
                    config[k] = v
            return namr_spec(self.wraps, ctx, config, inner_kw)
        loss = import_object(self.loss_class)(**loss_kw)
        miner = import_object(self.miner_class)(**miner_kw) if self.miner_class else None
        if miner is None and miner_kw:
            raise ValueError(f"{self.name}: miner hyper-parameters {sorted(miner_kw)} but no miner class")
        return LossSpec(loss, miner, loss_lr_multiplier=lr_mult)

    def describe(self) -> str:
        def fmt(k: str, p: Param) -> str:
            s = f"{k}={p.default!r}"
            if p.tunable:
                s += f" ~ {p.space()}"
            return s + (f" ({p.source})" if p.source else "")

        cls = self.loss_class.split(":")[-1] + (f" + {self.miner_class.split(':')[-1]}" if self.miner_class else "")
        if self.wraps is not None:
            cls += f"({self.wraps.name})"
        lines = [f"  {self.name:<22} [{self.family}] {cls}; source: {self.source}"]
        lines += [f"  {'':<24}{fmt(k, p)}" for k, p in self.params.items()]
        if self.notes:
            lines.append(f"  {'':<24}note: {self.notes}")
        return "\n".join(lines)


def _resolve(value: Any, ctx: BuildContext, hp: dict[str, Any], name: str, depth: int = 0) -> Any:
    if not isinstance(value, str):
        return value
    m = _PLACEHOLDER.match(value)
    if m is None:
        return value
    ref = m.group(1)
    if ref in ("embedding_size", "num_classes"):
        return getattr(ctx, ref)
    if ref in hp and ref != name and depth < 8:
        return _resolve(hp[ref], ctx, hp, ref, depth + 1)
    raise ValueError(
        f"hyper-parameter {name}: unknown placeholder {value!r} (use {{embedding_size}}, {{num_classes}} or "
        "another hyper-parameter's name)"
    )


# ------------------------------------------------------------------------------------------------ the entries
RLL_SOURCE = "Ranked List Loss, CVPR 2019 / TPAMI 2021: m=0.4, alpha=1+m/2=1.2, Tn=10, Tp=0 (SOP configs)"
# Shared by ours and PML's: margin m=0.4 (so alpha = 1 + m/2 = 1.2), Tn=10, Tp=0, equal weighting of the terms.
RLL_PARAMS = {
    "margin": Param(0.4, 0.1, 1.0),
    "Tn": Param(10.0, 1.0, 50.0, log=True),
    "imbalance": Param(0.5, 0.2, 0.8),
    "alpha": Param(None, source="None = 1 + margin/2"),
    "Tp": Param(0.0, 0.0, 10.0),
}
# ours: both gradient rules in the search space (the value is the same; the gradient differs)
RLL_GRADIENTS = ("paper", "autograd")
NAMR_SOURCE = (
    "NAMR (TCSVT 2022) / NASA (AAAI 2022) code; lambda, centres and re-ranking per base chosen on validation "
    "alphabets (pml_rll.losses.namr_loss.NAMR_CONFIGS, docs/namr_ablation.md)"
)
_PML = "pytorch_metric_learning.losses:"
_PML_MINERS = "pytorch_metric_learning.miners:"


def _rll_entries() -> list[LossEntry]:
    """Ours with each gradient rule, and PML's RankedListLoss, with the same hyper-parameters."""
    return [
        LossEntry(
            "rll",
            "ours",
            "pml_rll.losses:RankedListLoss",
            {**RLL_PARAMS, "gradient": Param("paper", choices=RLL_GRADIENTS)},
            RLL_SOURCE + "; paper gradient (query-only, constant weights); --tune also tries the autograd rule",
        ),
        LossEntry(
            "rll-autograd",
            "ours",
            "pml_rll.losses:RankedListLoss",
            {**RLL_PARAMS, "gradient": Param("autograd")},
            RLL_SOURCE + "; plain autograd of eqs. 2-5",
            notes="the autograd rule only; 'rll' searches both rules",
        ),
        LossEntry("pml-rll", "pml", _PML + "RankedListLoss", dict(RLL_PARAMS), RLL_SOURCE + "; PML 2.9 RankedListLoss"),
    ]


def _pml_pair_entries() -> list[LossEntry]:
    """PML's pair and triplet losses (with their papers' miners)."""
    return [
        LossEntry(
            "triplet",
            "pml",
            _PML + "TripletMarginLoss",
            {
                "margin": Param(0.2, 0.01, 1.0, log=True),
                "miner.margin": Param("{margin}"),
                "miner.type_of_triplets": Param("semihard"),
            },
            "FaceNet, CVPR 2015: margin 0.2 on L2-normalized embeddings, semi-hard mining",
            miner_class=_PML_MINERS + "TripletMarginMiner",
        ),
        LossEntry(
            "multi-similarity",
            "pml",
            _PML + "MultiSimilarityLoss",
            {
                "alpha": Param(2.0, 0.5, 20.0, log=True),
                "beta": Param(50.0, 10.0, 100.0, log=True),
                "base": Param(0.5, 0.2, 0.9),
                "miner.epsilon": Param(0.1, 0.01, 0.5, log=True),
            },
            "Multi-Similarity Loss, CVPR 2019: alpha=2, beta=50, lambda=0.5, mining epsilon=0.1",
            miner_class=_PML_MINERS + "MultiSimilarityMiner",
        ),
        LossEntry(
            "contrastive",
            "pml",
            _PML + "ContrastiveLoss",
            {"pos_margin": Param(0.0, 0.0, 0.5), "neg_margin": Param(1.0, 0.3, 1.5)},
            "Learning an Invariant Mapping, CVPR 2006: positives pulled to 0, negatives pushed beyond margin 1 "
            "(PML defaults)",
        ),
        LossEntry(
            "circle",
            "pml",
            _PML + "CircleLoss",
            {"m": Param(0.4, 0.1, 0.5), "gamma": Param(80.0, 10.0, 256.0, log=True)},
            "Circle Loss, CVPR 2020: m=0.4, gamma=80 (its fine-grained retrieval setting)",
        ),
        LossEntry(
            "ntxent",
            "pml",
            _PML + "NTXentLoss",
            {"temperature": Param(0.07, 0.01, 1.0, log=True)},
            "Supervised NT-Xent / InfoNCE over all positive pairs: temperature 0.07 (PML default, MoCo/SupCon)",
        ),
        LossEntry(
            "generalized-lifted",
            "pml",
            _PML + "GeneralizedLiftedStructureLoss",
            {"neg_margin": Param(1.0, 0.1, 2.0), "pos_margin": Param(0.0, 0.0, 0.5)},
            "In Defense of the Triplet Loss, 2017 (generalized lifted structure): margin 1",
        ),
    ]


def _pml_learned_entries() -> list[LossEntry]:
    """PML's losses with parameters of their own (a learned margin, proxies), trained by the loss optimizer."""
    return [
        LossEntry(
            "margin",
            "pml",
            _PML + "MarginLoss",
            {
                "margin": Param(0.2, 0.05, 0.5),
                "beta": Param(1.2, 0.5, 1.5),
                "nu": Param(0.0),
                "triplets_per_anchor": Param("all"),
                "learn_beta": Param(True),
                "miner.cutoff": Param(0.5),
                "miner.nonzero_loss_cutoff": Param(1.4),
            },
            "Sampling Matters, ICCV 2017: alpha=0.2, beta0=1.2 (learned), distance-weighted sampling",
            miner_class=_PML_MINERS + "DistanceWeightedMiner",
            notes="beta is a parameter: trained by the loss optimizer at --lr",
        ),
        LossEntry(
            "proxy-anchor",
            "pml",
            _PML + "ProxyAnchorLoss",
            {
                "num_classes": Param("{num_classes}"),
                "embedding_size": Param("{embedding_size}"),
                "margin": Param(0.1, 0.0, 0.5),
                "alpha": Param(32.0, 4.0, 128.0, log=True),
                LR_MULTIPLIER: Param(100.0, 1.0, 1000.0, log=True),
            },
            "Proxy Anchor Loss, CVPR 2020: delta=0.1, alpha=32, proxies at 100x the learning rate",
            notes="proxies are parameters: trained by the loss optimizer at loss_lr_multiplier x --lr",
        ),
    ]


def _entries() -> list[LossEntry]:
    """Every built-in entry: the plain losses, then NAMR around four of them, then three through a memory."""
    e = _rll_entries() + _pml_pair_entries() + _pml_learned_entries()
    by_name = {x.name: x for x in e}
    for base in ("triplet", "multi-similarity", "contrastive", "rll"):
        e.append(namr_entry(f"namr-{base}", by_name[base]))
    for base in MEMORY_BASES:
        e.append(memory_entry(f"{base}-xbm", by_name[base]))
    return e


# ------------------------------------------------------------------------------------------------ cross-batch memory
XBM_SOURCE = (
    "Cross-Batch Memory for Embedding Learning, CVPR 2020: the batch's loss plus its loss against a memory of past "
    "embeddings, the memory used only after a warm-up while the embeddings drift fast; memory size and warm-up "
    "chosen for this benchmark's small training sets and budgets"
)
#: the entries also trained through a memory: ours and two of PML's pair losses
MEMORY_BASES = ("rll", "contrastive", "multi-similarity")
MEMORY_CLASS = "benchmarks.warmup_cross_batch_memory:WarmupCrossBatchMemory"


def memory_params() -> dict[str, Param]:
    """A memory entry's own hyper-parameters: the memory's size (rows) and the iteration it starts at."""
    return {
        "memory_size": Param(1024, 256, 4096, log=True, integer=True),
        "start_iteration": Param(1000, 0, 2000, integer=True, source="XBM's warm-up"),
    }


def memory_entry(name: str, base: LossEntry, family: str | None = None) -> LossEntry:
    """``base`` trained through :class:`~benchmarks.warmup_cross_batch_memory.WarmupCrossBatchMemory`: the
    memory's parameters (:func:`memory_params`) plus ``loss.<name>`` for each of base's."""
    params = {**memory_params(), **{f"loss.{k}": p for k, p in base.params.items()}}
    return LossEntry(
        name,
        family or base.family,
        MEMORY_CLASS,
        params,
        XBM_SOURCE + f"; wrapped loss = the '{base.name}' entry",
        wraps=base,
        memory=True,
    )


def memory_spec(base: LossEntry, ctx: BuildContext, memory_kw: dict, base_hparams: dict | None = None) -> LossSpec:
    """``base``'s loss and miner inside a warm-up cross-batch memory built with ``memory_kw``."""
    inner = base.build(ctx, base_hparams)
    if inner.namr:
        raise ValueError(f"{base.name}: NAMRLoss packs two embeddings; a cross-batch memory holds one")
    loss = import_object(MEMORY_CLASS)(inner.loss, ctx.embedding_size, miner=inner.miner, **memory_kw)
    return LossSpec(loss, None, loss_lr_multiplier=inner.loss_lr_multiplier)


def namr_base_config(base_name: str) -> dict:
    """The NAMR configuration of a base entry: the validated one of ``NAMR_CONFIGS`` for the four bundled bases,
    NASA's for any other (a user's loss)."""
    from pml_rll.losses.namr_loss import NASA_CONFIG, namr_config

    try:
        return namr_config(base_name)
    except ValueError:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in NASA_CONFIG.items()}


def namr_params(config: dict) -> dict[str, Param]:
    """NAMR's own hyper-parameters of an entry: ``structure_weight`` (lambda), ``structure.<name>`` for the
    multi-cluster ranking loss and ``retrieval.<name>`` for ``NAMRReRankKNN``; defaults from ``config``."""
    src = "validated per base (docs/namr_ablation.md)"
    params = {"structure_weight": Param(config["structure_weight"], 0.05, 10.0, log=True, source=src)}
    params["structure.center_mode"] = Param(config["center_mode"], choices=("batch", "per_anchor"), source=src)
    for k in ("t_values", "alpha", "neighbourhood_k", "detach_sample_embedding"):
        params[f"structure.{k}"] = Param(config[k], source="NASA code")
    for k in ("centre_structure", "shortlist_weight", "shortlist_k", "shortlist_temperature"):
        if k in config:
            params[f"structure.{k}"] = Param(config[k], source=src)
    for k, v in config["retrieval"].items():
        params[f"retrieval.{k}"] = Param(v, source=src)
    return params


def namr_spec(base: LossEntry, ctx: BuildContext, config: dict, base_hparams: dict | None = None) -> LossSpec:
    """NAMR + ``base``: ``NAMRLoss`` around the base entry's loss and miner with a ``NAMR_CONFIGS``-style config."""
    from pml_rll.losses import NAMRLoss
    from pml_rll.losses.namr_loss import make_structure_loss

    inner = base.build(ctx, base_hparams)
    loss = NAMRLoss(
        loss=inner.loss,
        miner=inner.miner,
        embedding_size=ctx.embedding_size,
        structure_weight=config["structure_weight"],
        structure_loss=make_structure_loss(ctx.embedding_size, config),
    )
    retrieval = dict(config.get("retrieval") or {})
    if config.get("centre_structure"):  # a centred s is retrieved centred
        retrieval["centre_structure"] = True
    return LossSpec(loss, None, namr=True, loss_lr_multiplier=inner.loss_lr_multiplier, retrieval=retrieval)


def namr_entry(name: str, base: LossEntry, family: str = "ours") -> LossEntry:
    """The NAMR wrapper of ``base``: NAMR's own parameters (:func:`namr_params`) plus ``loss.<name>`` for each of
    base's."""
    params = {**namr_params(namr_base_config(base.name)), **{f"loss.{k}": p for k, p in base.params.items()}}
    return LossEntry(
        name,
        family,
        "pml_rll.losses:NAMRLoss",
        params,
        NAMR_SOURCE + f"; wrapped loss = the '{base.name}' entry",
        wraps=base,
    )


REGISTRY: dict[str, LossEntry] = {x.name: x for x in _entries()}
NAMR_ENTRIES = tuple(n for n, x in REGISTRY.items() if x.namr)


def default(name: str, param: str) -> object:
    """The registered default of one hyper-parameter (for scripts that build a loss by hand, e.g. loss_speed)."""
    return REGISTRY[name].params[param].default


def default_loss_names(registry: dict[str, LossEntry] | None = None) -> list[str]:
    """Every registered name (``--losses all``)."""
    return list(REGISTRY if registry is None else registry)


def describe_registry(registry: dict[str, LossEntry] | None = None) -> str:
    reg = REGISTRY if registry is None else registry
    lines = [x.describe() for x in reg.values()]
    for k, why in EXCLUDED.items():
        lines.append(f"  (excluded) {k}: {why}")
    return "\n".join(lines)


@dataclass
class Registry:
    """A registry plus the per-run overrides: what ``--config`` and ``--set`` produce.

    Args:
        entries: name -> :class:`LossEntry` (the built-in registry, changed and extended by ``--config``).
        overrides: name -> {hyper-parameter: value} from ``--set``.
    """

    entries: dict[str, LossEntry] = field(default_factory=lambda: dict(REGISTRY))
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)

    def hparams(self, name: str) -> dict[str, object]:
        return self.entries[name].hparams(self.overrides.get(name))
