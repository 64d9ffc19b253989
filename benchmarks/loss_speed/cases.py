"""What the loss speed benchmark measures: the cases (one builder per loss), the inputs, the target ratios."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..losses.registry import default as registry_default

RLL_MARGIN, RLL_TN = registry_default("rll", "margin"), registry_default("rll", "Tn")  # the runner's defaults

SAMPLES_PER_CLASS = 4

# A step: takes (input, labels), returns the scalar loss (backward is called by the harness).
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reference = tuple[torch.Tensor, torch.Tensor]  # (ref_emb, ref_labels) of the cross-batch memory mode

# "random": randn embeddings; after L2 normalisation all pairs lie near sqrt(2), so the Ranked List Loss sees every
# positive and no negative as non-trivial (a typical early-training regime).
# "hard": a shared direction plus class centres plus noise; about 17% of the negative pairs lie closer than
# alpha = 1.2 (many non-trivial negatives per query, the dense regime).
INPUT_DESCRIPTIONS = {
    "random": "randn",
    "hard": "0.7 * shared direction + class centre + 0.7 * randn (about 17% of negatives non-trivial)",
}
INPUT_KINDS = tuple(INPUT_DESCRIPTIONS)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every step of a run sees, passed explicitly to every builder and input maker.

    Args:
        dim: embedding width D.
        inputs: an ``INPUT_KINDS`` entry.
        ref_size: 0, or M: the cross-batch memory mode, where the B queries are compared with a fixed reference
            set of M items (``ref_emb``, ``ref_labels``; no gradient, as in a memory bank) instead of the batch.
        seed: seed of the random inputs.
    """

    dim: int
    inputs: str = "random"
    ref_size: int = 0
    seed: int = 0

    def describe(self) -> str:
        text = f"{INPUT_DESCRIPTIONS[self.inputs]} (B, {self.dim})"
        if self.ref_size:
            text += f" against a reference set of {self.ref_size} items of the same kind (no gradient)"
        return text


class Unavailable(Exception):
    """Raised by a case's builder when the loss cannot be built here (missing class, wrong signature).

    ``short`` goes into the tables, ``detail`` (the underlying error) into the JSON and the notes.
    """

    def __init__(self, short: str, detail: str):
        super().__init__(short)
        self.short, self.detail = short, detail


Builder = Callable[[int, Workload, torch.device], tuple[Step, list[torch.nn.Module]]]


@dataclasses.dataclass(frozen=True)
class SpeedCase:
    """One benchmarked loss: a case of the loss speed benchmark, named like the loss's benchmark registry entry.

    ``build(batch_size, workload, device)`` returns ``(step, modules)``: the step function and the modules whose
    parameters receive gradients (their grads are cleared between steps). It raises ``Unavailable`` when the
    loss cannot be constructed (or takes no reference set in the cross-batch memory mode). ``packed`` losses
    receive a ``(B, 2D)`` input ``[x | s]`` with ``s > 0``. ``max_batch`` skips larger batch sizes, with
    ``max_batch_reason`` shown in the table.
    """

    name: str
    label: str
    build: Builder
    note: str = ""
    packed: bool = False
    max_batch: int | None = None
    max_batch_reason: str = ""


def _import_ours(name: str) -> Any:
    try:
        import pml_rll.losses as ours

        return getattr(ours, name)
    except (ImportError, AttributeError) as e:
        raise Unavailable("not importable", f"pml_rll.losses.{name}: {e}") from e


def _construct(cls: Any, call: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise Unavailable("constructor signature differs", f"{call}: {e}") from e


def _with_reference(loss: torch.nn.Module, batch_size: int, workload: Workload, device: torch.device) -> Step:
    """The step of a PML-style loss: ``loss(emb, labels)``, or with the reference set as ``ref_emb``."""
    ref = make_reference(batch_size, workload, device)
    if ref is None:
        return loss
    ref_emb, ref_labels = ref

    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = loss(emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)
        return out

    return step


def _no_reference(name: str, workload: Workload) -> None:
    if workload.ref_size:
        raise Unavailable("no ref_emb", f"{name} does not take a reference set")


def _ours_rll(gradient: str) -> Builder:
    def build(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
        cls = _import_ours("RankedListLoss")
        call = f"RankedListLoss(margin={RLL_MARGIN}, Tn={RLL_TN}, gradient={gradient!r})"
        loss = _construct(cls, call, margin=RLL_MARGIN, Tn=RLL_TN, gradient=gradient).to(device)
        return _with_reference(loss, batch_size, workload, device), [loss]

    return build


def _pml_rll(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
    from pytorch_metric_learning.losses import RankedListLoss

    _no_reference("PML's RankedListLoss", workload)
    with warnings.catch_warnings():  # PML warns about Tn > 5 at construction; Tn=10 is the paper's value
        warnings.simplefilter("ignore")
        loss = RankedListLoss(margin=RLL_MARGIN, Tn=RLL_TN).to(device)
    return loss, [loss]


def _multi_similarity(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    loss = MultiSimilarityLoss().to(device)
    return _with_reference(loss, batch_size, workload, device), [loss]


def _contrastive(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
    from pytorch_metric_learning.losses import ContrastiveLoss

    loss = ContrastiveLoss().to(device)
    return _with_reference(loss, batch_size, workload, device), [loss]


def _triplet_all(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import TripletMarginMiner

    _no_reference("the all-triplets miner", workload)
    loss = TripletMarginLoss().to(device)
    miner = TripletMarginMiner(type_of_triplets="all").to(device)

    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = loss(emb, labels, miner(emb, labels))
        return out

    return step, [loss, miner]


def _proxy_anchor(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    _no_reference("ProxyAnchorLoss", workload)
    loss = ProxyAnchorLoss(num_classes=batch_size // SAMPLES_PER_CLASS, embedding_size=workload.dim).to(device)
    return loss, [loss]


def _multi_cluster_ranking(
    batch_size: int, workload: Workload, device: torch.device
) -> tuple[Step, list[torch.nn.Module]]:
    _no_reference("MultiClusterRankingLoss", workload)
    cls = _import_ours("MultiClusterRankingLoss")
    dim = workload.dim
    loss = _construct(cls, f"MultiClusterRankingLoss(embedding_size={dim})", embedding_size=dim).to(device)
    return loss, [loss]


def _namr_multi_similarity(
    batch_size: int, workload: Workload, device: torch.device
) -> tuple[Step, list[torch.nn.Module]]:
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    _no_reference("NAMRLoss", workload)
    cls = _import_ours("NAMRLoss")
    dim = workload.dim
    call = f"NAMRLoss(MultiSimilarityLoss(), embedding_size={dim})"
    loss = _construct(cls, call, MultiSimilarityLoss(), embedding_size=dim).to(device)
    return loss, [loss]


def _floor(batch_size: int, workload: Workload, device: torch.device) -> tuple[Step, list[torch.nn.Module]]:
    ref = make_reference(batch_size, workload, device)
    if ref is not None:
        gallery = F.normalize(ref[0], p=2, dim=1)

        def against_reference(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return (F.normalize(emb, p=2, dim=1) @ gallery.T).sum()

        return against_reference, []

    def step(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb, p=2, dim=1)
        return (e @ e.T).sum()

    return step, []


CASES: dict[str, SpeedCase] = {
    s.name: s
    for s in [
        SpeedCase(
            "rll",
            "ours RankedListLoss (paper grad)",
            _ours_rll("paper"),
            note=f"pml_rll RankedListLoss(margin={RLL_MARGIN}, Tn={RLL_TN}, gradient='paper')",
        ),
        SpeedCase(
            "rll-autograd",
            "ours RankedListLoss (autograd)",
            _ours_rll("autograd"),
            note=f"pml_rll RankedListLoss(margin={RLL_MARGIN}, Tn={RLL_TN}, gradient='autograd')",
        ),
        SpeedCase(
            "pml-rll",
            "PML RankedListLoss",
            _pml_rll,
            note=f"pytorch_metric_learning RankedListLoss(margin={RLL_MARGIN}, Tn={RLL_TN})",
        ),
        SpeedCase(
            "multi-similarity",
            "PML MultiSimilarityLoss",
            _multi_similarity,
            note="MultiSimilarityLoss() defaults, no miner",
        ),
        SpeedCase("contrastive", "PML ContrastiveLoss", _contrastive, note="ContrastiveLoss() defaults, all pairs"),
        SpeedCase(
            "triplet",
            "PML Triplet + miner (all)",
            _triplet_all,
            note="TripletMarginLoss() with TripletMarginMiner(type_of_triplets='all'); miner time included",
            max_batch=1024,
            max_batch_reason="all-triplets mining is O(B^3)",
        ),
        SpeedCase(
            "proxy-anchor",
            "PML ProxyAnchorLoss",
            _proxy_anchor,
            note="ProxyAnchorLoss(num_classes=B/4, embedding_size=D); proxies receive gradients",
        ),
        SpeedCase(
            "multi-cluster-ranking",
            "ours MultiClusterRankingLoss",
            _multi_cluster_ranking,
            packed=True,
            note="pml_rll MultiClusterRankingLoss(embedding_size=D) on a packed (B, 2D) input",
        ),
        SpeedCase(
            "namr-multi-similarity",
            "ours NAMRLoss(MultiSimilarity)",
            _namr_multi_similarity,
            packed=True,
            note="pml_rll NAMRLoss(MultiSimilarityLoss(), embedding_size=D) on a packed (B, 2D) input; "
            "its overhead is this row minus the MultiSimilarity row (which sees a (B, D) input)",
        ),
        SpeedCase(
            "floor",
            "floor: normalize + Gram",
            _floor,
            note="F.normalize(emb) then (e @ e.T).sum(): one matmul forward, two backward; with a reference set "
            "(F.normalize(emb) @ F.normalize(ref).T).sum(): one forward, one backward",
        ),
    ]
}


#: Case names of earlier releases, still accepted by ``--losses`` and read from an earlier ``loss_speed.json`` by
#: ``--resume``: old name -> its name now (the benchmark registry's name of the loss, ``python -m benchmarks.run
#: --list``; the cases without a registry entry are named in the same style).
DEPRECATED_NAMES = {
    "rll_paper": "rll",
    "rll_autograd": "rll-autograd",
    "pml_rll": "pml-rll",
    "multi_similarity": "multi-similarity",
    "triplet_all": "triplet",
    "proxy_anchor": "proxy-anchor",
    "multi_cluster_ranking": "multi-cluster-ranking",
    "namr_ms": "namr-multi-similarity",
}


def current_name(name: str) -> str:
    """The case name now of ``name`` (a :data:`DEPRECATED_NAMES` name is translated, any other returned as is)."""
    return DEPRECATED_NAMES.get(name, name)


def with_current_names(doc: dict[str, Any]) -> dict[str, Any]:
    """A ``loss_speed.json`` document with every case under its name now (``config.losses``, ``results``): an earlier
    run's file is read as if it had been written today, so ``--resume`` reuses it."""
    cfg = dict(doc.get("config", {}))
    if "losses" in cfg:
        cfg["losses"] = [current_name(n) for n in cfg["losses"]]
    results = {current_name(n): per for n, per in doc.get("results", {}).items()}
    return {**doc, "config": cfg, "results": results}


@dataclasses.dataclass(frozen=True)
class RatioSpec:
    """A ratio the speed targets are stated in. ``kind``: "time" (median forward+backward) or "memory" (peak above
    baseline). ``batch_sizes`` None: every batch size of the run. ``target`` None: informational only.
    ``reference_set``: whether the ratio belongs to runs with a reference set (cross-batch memory mode)."""

    title: str
    kind: str
    numerator: str
    denominator: str
    batch_sizes: tuple[int, ...] | None
    target: float | None
    reference_set: bool = False


RATIO_SPECS: list[RatioSpec] = [
    RatioSpec("time ours (paper) / PML RankedListLoss", "time", "rll", "pml-rll", (512, 1024), 0.5),
    RatioSpec("time ours (paper) / floor", "time", "rll", "floor", (1024, 2048), 1.0),
    RatioSpec("peak memory ours (paper) / PML RankedListLoss", "memory", "rll", "pml-rll", (4096,), 0.5),
    RatioSpec("peak memory ours (autograd) / PML RankedListLoss", "memory", "rll-autograd", "pml-rll", (4096,), None),
    RatioSpec("time ours (autograd) / ours (paper)", "time", "rll-autograd", "rll", None, 1.5),
    RatioSpec("time ours (paper) / ContrastiveLoss", "time", "rll", "contrastive", None, 0.3, True),
    RatioSpec("peak memory ours (paper) / ContrastiveLoss", "memory", "rll", "contrastive", None, 0.1, True),
    RatioSpec("time ours (paper) / MultiSimilarityLoss", "time", "rll", "multi-similarity", None, None, True),
    RatioSpec("time ours (paper) / floor (reference set)", "time", "rll", "floor", None, None, True),
]


def ratio_specs(workload: Workload, inputs_hard: bool | None = None) -> list[RatioSpec]:
    """The ratios of a run: the cross-batch memory ones with a reference set, the others without. With hard
    inputs the floor targets are those of the dense regime (<= 0.8 at B = 2048)."""
    hard = workload.inputs == "hard" if inputs_hard is None else inputs_hard
    specs = [s for s in RATIO_SPECS if s.reference_set == bool(workload.ref_size)]
    if hard:
        specs = [
            dataclasses.replace(s, batch_sizes=(2048,), target=0.8) if s.title == "time ours (paper) / floor" else s
            for s in specs
        ]
    return specs


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def make_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    """B/4 classes of 4 samples."""
    return torch.div(torch.arange(batch_size, device=device), SAMPLES_PER_CLASS, rounding_mode="floor")


def _embeddings(labels: torch.Tensor, batch_size: int, workload: Workload, kind: str, salt: int) -> torch.Tensor:
    """Embeddings of ``labels``: randn, or (hard) a shared direction + the class centre + noise. The batch and the
    reference set of one batch size share the direction and the centres."""
    g = torch.Generator(device="cpu").manual_seed(workload.seed * 1000003 + batch_size * 17 + salt)
    x = torch.randn(len(labels), workload.dim, generator=g)
    if kind == "hard":
        common = torch.Generator(device="cpu").manual_seed(workload.seed * 1000003 + batch_size)
        shared = torch.randn(1, workload.dim, generator=common)
        classes = max(batch_size, workload.ref_size) // SAMPLES_PER_CLASS + 1
        centres = torch.randn(classes, workload.dim, generator=common)
        x = 0.7 * shared + centres[labels] + 0.7 * x
    return x


def make_input(
    spec: SpeedCase, batch_size: int, workload: Workload, device: torch.device, kind: str | None = None
) -> torch.Tensor:
    """The batch of one (loss, batch size): ``kind`` (default ``workload.inputs``) says how it is drawn."""
    labels = make_labels(batch_size, torch.device("cpu"))
    x = _embeddings(labels, batch_size, workload, kind or workload.inputs, salt=0)
    if spec.packed:
        g = torch.Generator(device="cpu").manual_seed(workload.seed * 1000003 + batch_size * 17 + 1)
        s = 0.5 + torch.rand(batch_size, workload.dim, generator=g)  # strictly inside (0.5, 1.5), like the head
        x = torch.cat([x, s], dim=1)
    return x.to(device).requires_grad_(True)


def reference_labels(ref_size: int) -> torch.Tensor:
    """Labels of the reference set: ref_size / 4 classes, so that each query class appears 4 times in it."""
    return torch.arange(ref_size) % max(ref_size // SAMPLES_PER_CLASS, 1)


def make_reference(batch_size: int, workload: Workload, device: torch.device) -> Reference | None:
    """The fixed reference set of the cross-batch memory mode (None without one), drawn like the inputs."""
    if not workload.ref_size:
        return None
    labels = reference_labels(workload.ref_size)
    emb = _embeddings(labels, batch_size, workload, workload.inputs, salt=2)
    return emb.to(device), labels.to(device)
