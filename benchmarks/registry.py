"""Loss registry for the head-to-head benchmark.

Every entry builds a fresh (loss, miner) pair with the hyper-parameters its paper recommends, written next to it
with a one-line source note. ``family`` is ``"ours"`` for pml_rll losses and ``"pml"`` for PML's bundled losses;
the results table reports, for each of ours, the paired difference to each PML loss.

Our losses are imported lazily: an entry whose class cannot be imported (a library piece not merged yet) is
reported as unavailable and skipped, never a crash. The NAMR entries are registered only when
``pml_rll.losses.NAMRLoss`` is importable.

Left out on purpose: PML's ``LiftedStructureLoss``. It builds a (#positive pairs x #negative pairs) matrix, so its
memory grows as O(B^4) in the batch size B (8.9 GB at B=512, killed at B=1024 on a 24 GB machine, 317 s per
Fashion-MNIST epoch on 2 CPU cores); ``GeneralizedLiftedStructureLoss`` (the lifted-structure variant of "In
Defense of the Triplet Loss") stands in for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

EXCLUDED = {
    "lifted-structure": "PML LiftedStructureLoss: O(#pos pairs x #neg pairs) memory, 8.9 GB at batch 512 and "
    "OOM at 1024; GeneralizedLiftedStructureLoss is benchmarked instead",
}


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
    num_classes: int
    embedding_size: int


@dataclass
class LossEntry:
    name: str
    family: str  # "ours" or "pml"
    hparams: dict[str, object]
    source: str
    build: Callable[[BuildContext], LossSpec]
    requires: tuple[str, ...] = ()  # "module:attr" that must import for the entry to be available
    base: str | None = None  # for NAMR variants: the registry entry whose loss is wrapped
    notes: str = ""

    def available(self) -> tuple[bool, str]:
        for req in self.requires:
            ok, why = _importable(req)
            if not ok:
                return False, why
        return True, ""


def _importable(req: str) -> tuple[bool, str]:
    mod, _, attr = req.partition(":")
    try:
        m = importlib.import_module(mod)
        if attr and not hasattr(m, attr):
            return False, f"{mod}.{attr} not found"
    except ImportError as e:  # pragma: no cover - depends on what is merged
        return False, f"{mod}: {e}"
    return True, ""


def _ours(name: str):
    return getattr(importlib.import_module("pml_rll.losses"), name)


# ------------------------------------------------------------------------------------------------ PML's losses
def _pml_losses():
    from pytorch_metric_learning import losses, miners

    return losses, miners


# Ranked List Loss hyper-parameters shared by ours and PML's: margin m=0.4 (so alpha = 1 + m/2 = 1.2), Tn=10, Tp=0,
# equal weighting of the positive and negative terms.
RLL_HPARAMS = {"margin": 0.4, "Tn": 10.0, "imbalance": 0.5, "alpha": None, "Tp": 0.0}
RLL_SOURCE = "Ranked List Loss, CVPR 2019 / TPAMI 2021: m=0.4, alpha=1+m/2=1.2, Tn=10, Tp=0 (SOP configs)"

TRIPLET_HPARAMS = {"margin": 0.2, "miner": "TripletMarginMiner(margin=0.2, type_of_triplets='semihard')"}
MS_HPARAMS = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "miner": "MultiSimilarityMiner(epsilon=0.1)"}
CONTRASTIVE_HPARAMS = {"pos_margin": 0.0, "neg_margin": 1.0}


def _build_triplet(ctx: BuildContext) -> LossSpec:
    losses, miners = _pml_losses()
    return LossSpec(
        losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    )


def _build_ms(ctx: BuildContext) -> LossSpec:
    losses, miners = _pml_losses()
    return LossSpec(
        losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    )


def _build_contrastive(ctx: BuildContext) -> LossSpec:
    losses, _ = _pml_losses()
    return LossSpec(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0))


def _build_pml_rll(ctx: BuildContext) -> LossSpec:
    losses, _ = _pml_losses()
    return LossSpec(losses.RankedListLoss(margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0))


def _build_circle(ctx: BuildContext) -> LossSpec:
    losses, _ = _pml_losses()
    return LossSpec(losses.CircleLoss(m=0.4, gamma=80))


def _build_ntxent(ctx: BuildContext) -> LossSpec:
    losses, _ = _pml_losses()
    return LossSpec(losses.NTXentLoss(temperature=0.07))


def _build_gls(ctx: BuildContext) -> LossSpec:
    losses, _ = _pml_losses()
    return LossSpec(losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0))


def _build_margin(ctx: BuildContext) -> LossSpec:
    losses, miners = _pml_losses()
    loss = losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, triplets_per_anchor="all", learn_beta=True)
    return LossSpec(loss, miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))


def _build_proxy_anchor(ctx: BuildContext) -> LossSpec:
    losses, _ = _pml_losses()
    loss = losses.ProxyAnchorLoss(num_classes=ctx.num_classes, embedding_size=ctx.embedding_size, margin=0.1, alpha=32)
    return LossSpec(loss, loss_lr_multiplier=100.0)


# ------------------------------------------------------------------------------------------------ our losses
def _build_rll(gradient: str) -> Callable[[BuildContext], LossSpec]:
    def build(ctx: BuildContext) -> LossSpec:
        RankedListLoss = _ours("RankedListLoss")
        return LossSpec(RankedListLoss(margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0, gradient=gradient))

    return build


NAMR_SOURCE = (
    "NAMR (TCSVT 2022) / NASA (AAAI 2022) code; lambda, centres, alpha and re-ranking per base chosen on "
    "validation alphabets (pml_rll.losses.namr_loss.NAMR_CONFIGS, docs/namr_ablation.md)"
)


def _namr_hparams(base_name: str) -> dict[str, object]:
    """The per-base NAMR configuration the entry uses (``pml_rll.losses.namr_loss.NAMR_CONFIGS``), for reports."""
    try:
        from pml_rll.losses.namr_loss import namr_config
    except ImportError:  # pragma: no cover - depends on what is merged
        return {}
    return namr_config(base_name)


def _build_namr(base_name: str, config: dict | None = None) -> Callable[[BuildContext], LossSpec]:
    """Builder of "NAMR + <the registry entry base_name>" with ``config`` (a ``NAMR_CONFIGS``-style dict; default:
    the validated configuration for that base)."""

    def build(ctx: BuildContext) -> LossSpec:
        from pml_rll.losses.namr_loss import make_structure_loss, namr_config

        NAMRLoss = _ours("NAMRLoss")
        config_ = namr_config(base_name) if config is None else config
        base = REGISTRY[base_name].build(ctx)
        loss = NAMRLoss(
            loss=base.loss,
            embedding_size=ctx.embedding_size,
            structure_weight=config_["structure_weight"],
            structure_loss=make_structure_loss(ctx.embedding_size, config_),
            miner=base.miner,
        )
        return LossSpec(
            loss, None, namr=True, loss_lr_multiplier=base.loss_lr_multiplier, retrieval=dict(config_["retrieval"])
        )

    return build


def _entries() -> list[LossEntry]:
    ours_rll_req = ("pml_rll.losses:RankedListLoss",)
    namr_req = ("pml_rll.losses:NAMRLoss", "pml_rll.modules:NAMREmbedder", "pml_rll.retrieval:NAMRReRankKNN")
    e = [
        LossEntry(
            "rll",
            "ours",
            dict(RLL_HPARAMS, gradient="paper"),
            RLL_SOURCE + "; paper gradient (query-only, constant weights)",
            _build_rll("paper"),
            ours_rll_req,
        ),
        LossEntry(
            "rll-autograd",
            "ours",
            dict(RLL_HPARAMS, gradient="autograd"),
            RLL_SOURCE + "; plain autograd of eqs. 2-5",
            _build_rll("autograd"),
            ours_rll_req,
        ),
        LossEntry("pml-rll", "pml", dict(RLL_HPARAMS), RLL_SOURCE + "; PML 2.9 RankedListLoss", _build_pml_rll),
        LossEntry(
            "triplet",
            "pml",
            TRIPLET_HPARAMS,
            "FaceNet, CVPR 2015: margin 0.2 on L2-normalized embeddings, semi-hard mining",
            _build_triplet,
        ),
        LossEntry(
            "multi-similarity",
            "pml",
            MS_HPARAMS,
            "Multi-Similarity Loss, CVPR 2019: alpha=2, beta=50, lambda=0.5, mining epsilon=0.1",
            _build_ms,
        ),
        LossEntry(
            "contrastive",
            "pml",
            CONTRASTIVE_HPARAMS,
            "Learning an Invariant Mapping, CVPR 2006: positives pulled to 0, negatives pushed beyond margin 1 "
            "(PML defaults)",
            _build_contrastive,
        ),
        LossEntry(
            "circle",
            "pml",
            {"m": 0.4, "gamma": 80},
            "Circle Loss, CVPR 2020: m=0.4, gamma=80 (its fine-grained retrieval setting)",
            _build_circle,
        ),
        LossEntry(
            "ntxent",
            "pml",
            {"temperature": 0.07},
            "Supervised NT-Xent / InfoNCE over all positive pairs: temperature 0.07 (PML default, MoCo/SupCon)",
            _build_ntxent,
        ),
        LossEntry(
            "generalized-lifted",
            "pml",
            {"neg_margin": 1.0, "pos_margin": 0.0},
            "In Defense of the Triplet Loss, 2017 (generalized lifted structure): margin 1",
            _build_gls,
        ),
        LossEntry(
            "margin",
            "pml",
            {
                "margin": 0.2,
                "beta": 1.2,
                "nu": 0.0,
                "learn_beta": True,
                "miner": "DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)",
            },
            "Sampling Matters, ICCV 2017: alpha=0.2, beta0=1.2 (learned), distance-weighted sampling",
            _build_margin,
            notes="beta is a parameter: trained by the loss optimizer at --lr",
        ),
        LossEntry(
            "proxy-anchor",
            "pml",
            {"margin": 0.1, "alpha": 32, "proxy_lr_multiplier": 100},
            "Proxy Anchor Loss, CVPR 2020: delta=0.1, alpha=32, proxies at 100x the learning rate",
            _build_proxy_anchor,
            notes="proxies are parameters: trained by the loss optimizer at 100 x --lr",
        ),
    ]
    for name, base, req in (
        ("namr-triplet", "triplet", ()),
        ("namr-multi-similarity", "multi-similarity", ()),
        ("namr-contrastive", "contrastive", ()),
        ("namr-rll", "rll", ours_rll_req),
    ):
        e.append(
            LossEntry(
                name,
                "ours",
                dict(_namr_hparams(base), base=base),
                NAMR_SOURCE + f"; base loss = the '{base}' entry",
                _build_namr(base),
                namr_req + req,
                base=base,
            )
        )
    return e


REGISTRY: dict[str, LossEntry] = {e.name: e for e in _entries()}
NAMR_ENTRIES = tuple(n for n, e in REGISTRY.items() if e.base is not None)


def namr_available() -> bool:
    return _importable("pml_rll.losses:NAMRLoss")[0]


def default_loss_names() -> list[str]:
    """Every registered name, NAMR variants only when NAMRLoss imports."""
    names = list(REGISTRY)
    if not namr_available():
        names = [n for n in names if n not in NAMR_ENTRIES]
    return names


def describe_registry() -> str:
    lines = []
    for e in REGISTRY.values():
        hp = ", ".join(f"{k}={v}" for k, v in e.hparams.items())
        lines.append(f"  {e.name:<22} [{e.family}] {hp}\n  {'':<22} source: {e.source}")
    for k, why in EXCLUDED.items():
        lines.append(f"  (excluded) {k}: {why}")
    return "\n".join(lines)
