"""NAMR diagnosis and ablation on Omniglot: what the structure embedding learns and what re-ranking does with it.

python -m benchmarks.namr_diagnose --data-root DIR --bases triplet --variants base nasa structure_weight=0.5

For every base loss (a registry entry: triplet, multi-similarity, contrastive, rll), every variant and every seed,
one model is trained with the benchmark runner's own pipeline (``benchmarks.execute.pipeline.run_one``: same trunk,
sampler, paired seeds and budget as ``python -m benchmarks.run``) and then analysed:

* **during training** (every ``--trace-every`` iterations, NAMR variants): where the anchor-adaptive distances D_ij
  sit relative to the centres (share of pairs nearest to each centre, for same-class and other-class pairs), and
  whether the structure term fights the base loss: the cosine between the gradients of the two terms with respect
  to x, and the ratio of their norms (lambda included). The global RNG is saved and restored around the trace, so
  training is identical with and without it;
* **after training**, on the evaluation split: MAP@R and P@1 of plain retrieval on x and of re-ranking with every
  retrieval variant (query-weighted, symmetric, blends) and candidate count (1, 8, 32, 128, all; only the first K_c
  of the Euclidean list are re-ranked, the rest keep their order); how often re-ranking changes the top-1 and how
  often that change is right; controls with s replaced by its mean over queries and by another query's s; how s
  relates to the local structure: the correlation between s and the per-dimension within-class spread of x, and
  between the mean of s and the neighbourhood density (mean distance to the 10 nearest).

``variant`` is ``base`` (the registry's base loss alone) or ``nasa`` (NASA's configuration) followed by overrides
``key=value`` joined by ``+`` (keys of ``pml_rll.losses.namr_loss.NASA_CONFIG``; e.g.
``structure_weight=0.5+center_mode=per_anchor``).

Splits: ``--split val`` (default) trains on the runner's training alphabets minus the validation alphabets and
evaluates on those (the last sorted training alphabet unless ``--val-alphabets`` names others): every choice of
configuration is made here, never on the test alphabets. ``--split test`` uses the runner's train/test split.
Results go to ``<out>/records.jsonl`` (one line per finished (base, variant, seed); reruns skip them) and a summary
``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.common import atomic_write, environment_info
from ..data.bundle import PairedDataset, RandomShift, remap_labels
from ..data.omniglot import omniglot_alphabet_split, read_omniglot
from ..losses.registry import REGISTRY, BuildContext, LossEntry, LossSpec, Param, namr_spec
from ..plan.sources import key_of
from ..results import report

CANDIDATES = (1, 8, 32, 128, None)  # None: all references
BLENDS = (1.0, 0.5, 0.25, 0.1)
WEIGHTINGS = ("query", "symmetric")
SYMMETRIC_MARGIN = 0.05  # MAP@R points the symmetric weighting must gain to be chosen over the query weighting
TOP1_KEYS = ("top1_changed", "top1_fixed", "top1_broken")


# ------------------------------------------------------------------------------------------------ data
def load_validation_bundle(data_root: str, val_alphabets: list[str] | None = None):
    """The runner's training alphabets only, split into train and validation alphabets (the test ones unused)."""
    from ..data.bundle import DatasetBundle

    images, keys = read_omniglot(data_root, image_size=28)
    if not keys:
        raise SystemExit(f"no Omniglot images under {data_root!r}")
    train_alph, test_alph, _ = omniglot_alphabet_split(keys)
    val = sorted(val_alphabets) if val_alphabets else [sorted(train_alph)[-1]]
    if not set(val) < set(train_alph):
        raise SystemExit(f"validation alphabets {val} must be a proper subset of the training alphabets {train_alph}")
    alphabet = np.array([k[1] for k in keys])
    class_key = np.array([f"{k[1]}/{k[2]}" for k in keys])
    fit = np.flatnonzero(np.isin(alphabet, train_alph) & ~np.isin(alphabet, val))
    ev = np.flatnonzero(np.isin(alphabet, val))
    x = torch.from_numpy(images).unsqueeze(1)
    mean, std = float(x[fit].mean()), float(x[fit].std())
    x = (x - mean) / std
    fit_alph = [a for a in train_alph if a not in val]
    return DatasetBundle(
        name="omniglot",
        train=PairedDataset(x[fit], remap_labels(class_key[fit]), transform=RandomShift(2)),
        _test=PairedDataset(x[ev], remap_labels(class_key[ev])),
        input_kind="gray",
        input_shape=(1, 28, 28),
        description=(
            f"Omniglot validation split from {data_root}: fit on {fit_alph} ({len(np.unique(class_key[fit]))} "
            f"characters, {len(fit)} images), validate on {val} ({len(np.unique(class_key[ev]))} characters, "
            f"{len(ev)} images); test alphabets {test_alph} unused; 28x28, random shift <= 2 px"
        ),
        info={"fit_alphabets": fit_alph, "val_alphabets": val, "test_alphabets": test_alph},
    )


# ------------------------------------------------------------------------------------------------ variants
def _parse_value(value: str):
    """JSON (tuples written with parentheses allowed), None, or else the bare word as a string."""
    if value in ("None", "none"):
        return None
    try:
        return json.loads(value.replace("(", "[").replace(")", "]"))
    except json.JSONDecodeError:
        return value


def parse_variant(text: str, base: str | None = None) -> dict | None:
    """``base`` -> None (no NAMR); ``nasa[+key=value...]`` or ``key=value[+...]`` -> a NAMR configuration.

    ``validated[+key=value...]`` starts from the base loss's configuration in ``NAMR_CONFIGS`` (``base`` needed)
    instead of NASA's."""
    from pml_rll.losses.namr_loss import NASA_CONFIG, namr_config

    if text == "base":
        return None
    tokens = text.split("+")
    if tokens[0] == "validated":
        if base is None:
            raise SystemExit(f"variant {text!r} starts from the validated configuration and needs a base loss")
        start = namr_config(base)
    else:
        start = NASA_CONFIG
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in start.items()}
    for token in tokens:
        if token in ("", "nasa", "validated"):
            continue
        key, _, value = token.partition("=")
        parsed = _parse_value(value)
        if key in config["retrieval"]:
            config["retrieval"][key] = parsed
        elif key in config:
            config[key] = tuple(parsed) if isinstance(parsed, list) else parsed
        else:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}; keys: {sorted(config)}")
    return config


def _append_jsonl(path: str, record: dict) -> None:
    """Append one whole JSON line and flush it to disk (this script is the file's only writer)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class _AblationEntry(LossEntry):
    """A registry-style entry for one ablation variant: ``builder(ctx)`` builds its LossSpec."""

    builder: Callable[[BuildContext], LossSpec] | None = None

    def build(self, ctx: BuildContext, hparams: dict[str, object] | None = None) -> LossSpec:
        assert self.builder is not None
        return self.builder(ctx)


class _TracedSpec:
    """Wraps a NAMR LossSpec's loss so that every ``every`` calls the training-time diagnostics are recorded."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.calls = 0
        self.rows: list[dict] = []

    def wrap(self, namr_loss):
        tracer = self
        inner_forward = namr_loss.forward

        def forward(embeddings, labels=None, *args, **kwargs):
            if tracer.calls % tracer.every == 0 and labels is not None:
                state = torch.get_rng_state()
                try:
                    tracer.rows.append({"iteration": tracer.calls, **trace_batch(namr_loss, embeddings, labels)})
                finally:
                    torch.set_rng_state(state)
            tracer.calls += 1
            return inner_forward(embeddings, labels, *args, **kwargs)

        namr_loss.forward = forward
        return namr_loss


def trace_batch(namr_loss, packed: torch.Tensor, labels: torch.Tensor) -> dict:
    """Distances vs centres and the angle between the two terms' gradients on x, for one training batch."""
    from pml_rll.functional import namr as F_namr

    d = namr_loss.embedding_size
    x = packed.detach()[:, :d].clone().requires_grad_(True)
    s = packed.detach()[:, d:].clone().requires_grad_(True)
    labels = labels.to(x.device)
    xs = x / F_namr.mean_pairwise_distance(x) if namr_loss.scale_by_mean_distance else x
    indices = namr_loss.miner(xs, labels) if namr_loss.miner is not None else None
    metric = namr_loss.loss(xs, labels, indices)
    xg = torch.nn.functional.normalize(xs, dim=1) if namr_loss.structure_geometry == "l2" else xs
    sl = namr_loss.structure_loss
    shortlist_weight = getattr(sl, "shortlist_weight", 0.0)
    packed_g = F_namr.pack(xg, s)
    structure = sl(packed_g, labels) if shortlist_weight > 0 else sl(packed_g)
    g_metric = torch.autograd.grad(metric, x, retain_graph=True, allow_unused=True)[0]
    g_struct = torch.autograd.grad(structure, x, retain_graph=True, allow_unused=True)[0]
    out: dict[str, Any] = {"metric_loss": float(metric.detach()), "structure_loss": float(structure.detach())}
    if g_metric is not None and g_struct is not None:
        gm, gs = g_metric.flatten(), namr_loss.structure_weight * g_struct.flatten()
        out["grad_cosine"] = float(torch.nn.functional.cosine_similarity(gm, gs, dim=0))
        out["grad_norm_ratio"] = float(gs.norm() / gm.norm().clamp_min(1e-12))
    # what the structure term tells s: its gradient's sample-independent part against its per-sample part
    s_used = F_namr.centre_structure(s) if getattr(sl, "centre_structure", False) else s
    cluster, _, _ = F_namr.multi_cluster_anchor_losses(
        xg.detach(),
        s_used,
        sl.t_values,
        sl.alpha,
        sl.floor,
        sl.stats_include_diagonal,
        sl.center_mode,
        sl.neighbourhood_k,
    )
    out.update(gradient_spread(torch.autograd.grad(cluster.mean(), s, retain_graph=True)[0], "s_grad_cluster"))

    def cluster_pairs(s_r: torch.Tensor) -> torch.Tensor:
        s_u = F_namr.centre_structure(s_r) if getattr(sl, "centre_structure", False) else s_r
        args = (sl.t_values, sl.alpha, sl.floor, sl.stats_include_diagonal, sl.center_mode, sl.neighbourhood_k)
        return F_namr.multi_cluster_pair_matrix(xg.detach(), s_u, *args)[0]

    out.update(partner_decomposition(cluster_pairs, s, "s_grad_cluster"))
    out.update(near_far_split(cluster_pairs, s, xg.detach(), "s_grad_cluster"))
    if shortlist_weight > 0:
        short, _ = F_namr.shortlist_ranking_losses(
            xg.detach(), s_used, labels, sl.shortlist_k, sl.shortlist_temperature
        )
        out.update(gradient_spread(torch.autograd.grad(short.mean(), s)[0], "s_grad_shortlist"))
    s = s.detach()
    with torch.no_grad():
        xd = xg.detach()
        _, dist, centres = F_namr.multi_cluster_anchor_losses(
            xd, s, sl.t_values, sl.alpha, sl.floor, sl.stats_include_diagonal, sl.center_mode, sl.neighbourhood_k
        )
        n = xd.shape[0]
        off = ~torch.eye(n, dtype=torch.bool, device=xd.device)
        same = (labels[:, None] == labels[None, :]) & off
        other = labels[:, None] != labels[None, :]
        nearest = F_namr.centre_gaps(dist, centres).argmin(-1)
        m = centres.shape[-1]
        out["num_centres"] = m
        mean_centres = centres.mean(0) if centres.ndim == 2 else centres
        out["centres_over_mean_D"] = [float(c) for c in mean_centres / dist[off].mean()]
        for name, mask in (("pos", same), ("neg", other)):
            counts = torch.bincount(nearest[mask], minlength=m).double()
            out[f"{name}_cluster_share"] = (counts / counts.sum()).tolist()
            out[f"{name}_mean_D"] = float(dist[mask].mean())
        counts = torch.bincount(nearest[off], minlength=m).double()
        out["cluster_share"] = (counts / counts.sum()).tolist()
    return out


def gradient_spread(g: torch.Tensor, prefix: str) -> dict:
    """How much of a gradient on s (N x d) is the same for every sample.

    ``<prefix>_common_share``: N |mean_i g_i|^2 / sum_i |g_i|^2, the share of the squared gradient norm in its
    sample-independent part (1: every sample gets the same gradient, i.e. only a global re-weighting of the
    dimensions is trained; about 1/N for independent per-sample gradients). ``<prefix>_between_over_mean_sq``:
    the variance over samples of g_ik, averaged over dimensions, against the square of its mean over samples,
    averaged over dimensions."""
    g = g.detach().double()
    n = g.shape[0]
    mean = g.mean(0)
    total = g.pow(2).sum().clamp_min(1e-300)
    return {
        f"{prefix}_common_share": float(n * mean.pow(2).sum() / total),
        f"{prefix}_between_over_mean_sq": float(g.var(0, unbiased=False).mean() / mean.pow(2).mean().clamp_min(1e-300)),
    }


def partner_decomposition(
    pair_losses: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor, prefix: str, subsets: int = 8, seed: int = 0
) -> dict:
    """Which part of the gradient on s a structure head could learn per sample, measured in one batch.

    ``pair_losses(s)`` is the N x N matrix of pair losses l_ij. For ``subsets`` random halves P_r of the batch (the
    same partners for every anchor, as another batch would give), g_r = d/ds of the mean over anchors of
    (mean over j in P_r, j != i, of l_ij). The R x N x d gradients split exactly into three orthogonal parts; their
    shares of the total squared norm are returned:

    * ``<prefix>_common``: the mean over anchors and subsets (one global re-weighting of the dimensions);
    * ``<prefix>_per_sample``: each anchor's mean over subsets minus the common part (a per-sample signal that
      does not depend on which partners are in the batch: what a head predicting s from the sample can fit);
    * ``<prefix>_partner_noise``: the rest, which changes with the partners and averages out over batches."""
    n = s.shape[0]
    gen = torch.Generator().manual_seed(seed)
    grads = []
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    for _ in range(subsets):
        s_r = s.detach().clone().requires_grad_(True)
        keep = torch.zeros(n, n, dtype=torch.bool, device=s.device)
        keep[:, torch.randperm(n, generator=gen)[: max(2, n // 2)].to(s.device)] = True
        keep &= ~eye
        rows = (pair_losses(s_r) * keep).sum(1) / keep.sum(1).clamp_min(1)
        grads.append(torch.autograd.grad(rows.mean(), s_r)[0])
    g = torch.stack(grads).double()  # R x N x d
    per_anchor = g.mean(0)
    common = per_anchor.mean(0)
    total = g.pow(2).sum().clamp_min(1e-300)
    r = g.shape[0]
    return {
        f"{prefix}_common": float(r * n * common.pow(2).sum() / total),
        f"{prefix}_per_sample": float(r * (per_anchor - common).pow(2).sum() / total),
        f"{prefix}_partner_noise": float((g - per_anchor).pow(2).sum() / total),
    }


def near_far_split(
    pair_losses: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor, x: torch.Tensor, prefix: str, k: int = 8
) -> dict:
    """How much of the gradient on s comes from each anchor's short list, the only pairs re-ranking reorders.

    g = g_near + g_far, from the pairs (i, j) with j among the ``k`` nearest of i by plain distance on x and from
    the others. ``<prefix>_near_norm_share``: |g_near| / (|g_near| + |g_far|); ``<prefix>_near_cosine``: the cosine
    between g_near and the whole g."""
    from pml_rll.functional import namr as F_namr

    n = s.shape[0]
    with torch.no_grad():
        plain = F_namr.pairwise_sq_euclidean(x).masked_fill(
            torch.eye(n, dtype=torch.bool, device=x.device), float("inf")
        )
        near = torch.zeros(n, n, dtype=torch.bool, device=x.device)
        near.scatter_(1, plain.topk(min(k, n - 1), dim=1, largest=False).indices, True)
    far = ~near & ~torch.eye(n, dtype=torch.bool, device=x.device)
    grads = []
    for mask in (near, far):
        s_r = s.detach().clone().requires_grad_(True)
        grads.append(torch.autograd.grad((pair_losses(s_r) * mask).sum() / (n * (n - 1)), s_r)[0].double())
    g_near, g_far = grads
    total = g_near + g_far
    nn_, nf = float(g_near.norm()), float(g_far.norm())
    return {
        f"{prefix}_near_norm_share": nn_ / max(nn_ + nf, 1e-300),
        f"{prefix}_near_cosine": float(torch.nn.functional.cosine_similarity(g_near.flatten(), total.flatten(), dim=0)),
    }


# ------------------------------------------------------------------------------------------------ evaluation
def map_at_r_and_p1(ranked_labels: torch.Tensor, query_labels: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    """MAP@R and P@1 from each query's ranked reference labels (self excluded) and its R (same-class count)."""
    rel = (ranked_labels == query_labels[:, None]).double()
    k = rel.shape[1]
    positions = torch.arange(1, k + 1, dtype=torch.float64)
    within = positions[None, :] <= r[:, None]
    prec = rel.cumsum(1) / positions
    ap = (prec * rel * within).sum(1) / r.double()
    return float(ap.mean()), float(rel[:, 0].mean())


def ranking(dist: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(dist, k, dim=1, largest=False, sorted=True).indices


def rerank_top(plain_idx: torch.Tensor, score: torch.Tensor, num_candidates: int | None) -> torch.Tensor:
    """Re-rank only the first ``num_candidates`` of each plain list by ``score`` (Q x R); the rest keep their order."""
    kc = plain_idx.shape[1] if num_candidates is None else min(num_candidates, plain_idx.shape[1])
    head = plain_idx[:, :kc]
    order = torch.sort(torch.gather(score, 1, head), dim=1, stable=True).indices
    return torch.cat([torch.gather(head, 1, order), plain_idx[:, kc:]], 1)


def evaluate_embeddings(
    packed: torch.Tensor, labels: torch.Tensor, d: int, normalize: bool, seed: int, centre: bool = False
) -> dict:
    """Every retrieval variant and the structure diagnostics on one set of packed embeddings (all vs all).

    ``centre``: s is divided by its mean over the evaluation set per dimension first (a model trained with
    ``centre_structure=True``; ``NAMRReRankKNN(centre_structure=True)`` does the same)."""
    from pml_rll.functional import namr as F_namr

    x, s = packed[:, :d].double(), packed[:, d:].double()
    if centre:
        s = F_namr.centre_structure(s)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    r = (labels[:, None] == labels[None, :]).sum(1) - 1
    keep = r > 0
    plain = F_namr.pairwise_sq_euclidean(x).masked_fill(eye, float("inf"))
    plain_idx = ranking(plain, n - 1)
    k_eval = int(r.max())

    def score(idx: torch.Tensor) -> tuple[float, float]:
        return map_at_r_and_p1(labels[idx[keep, :k_eval]], labels[keep], r[keep])

    out: dict = {}
    out["plain"] = score(plain_idx)
    for weighting in WEIGHTINGS:
        for blend in BLENDS:
            full = F_namr.rerank_sq_distance(x, s, x, s if weighting == "symmetric" else None, blend)
            for kc in CANDIDATES:
                out[f"{weighting}_b{blend:g}_k{kc or 'all'}"] = score(rerank_top(plain_idx, full, kc))
    # controls: s averaged over queries, and s of another (random) query
    g = torch.Generator().manual_seed(seed)
    mean_s = s.mean(0, keepdim=True).expand_as(s)
    shuffled = s[torch.randperm(n, generator=g)]
    for name, s_ctrl in (("control_mean_s", mean_s), ("control_shuffled_s", shuffled)):
        out[f"{name}_k32"] = score(rerank_top(plain_idx, F_namr.rerank_sq_distance(x, s_ctrl, x), 32))
    # top-1 changes (query weighting, K_c = 32, blend 1)
    full = F_namr.rerank_sq_distance(x, s, x)
    new_idx = rerank_top(plain_idx, full, 32)
    old_hit = labels[plain_idx[:, 0]] == labels
    new_hit = labels[new_idx[:, 0]] == labels
    changed = plain_idx[:, 0] != new_idx[:, 0]
    out["top1_changed"] = float(changed.double().mean())
    out["top1_fixed"] = float((changed & new_hit & ~old_hit).double().mean())
    out["top1_broken"] = float((changed & old_hit & ~new_hit).double().mean())
    # s against local structure
    classes = labels.unique()
    class_var = torch.stack([x[labels == c].var(0) for c in classes])  # C x d
    class_of = torch.searchsorted(classes, labels)
    sv = class_var[class_of]
    sc, vc = s - s.mean(1, keepdim=True), sv - sv.mean(1, keepdim=True)
    spread_corr = (sc * vc).sum(1) / (sc.norm(dim=1) * vc.norm(dim=1)).clamp_min(1e-12)
    knn10 = torch.topk(plain, 10, dim=1, largest=False).values.sqrt().mean(1)
    s_mean = s.mean(1)
    density = float(np.corrcoef(s_mean.numpy(), knn10.numpy())[0, 1]) if s_mean.std() > 0 else float("nan")
    out["s_stats"] = {
        "mean": float(s.mean()),
        "std_over_samples": float(s.std(0).mean()),  # per dimension, across samples, averaged
        "std_over_dims": float(s.std(1).mean()),  # per sample, across dimensions, averaged
        "spread_ratio": float(s.std(0).mean() / s.std(1).mean().clamp_min(1e-12)),
        "corr_s_vs_class_spread": float(spread_corr.mean()),
        "corr_mean_s_vs_knn10_distance": density,
    }
    return out


def after_training_factory(bundle, seed: int):
    def after_training(trunk, embedder, spec) -> dict:
        if not spec.namr:
            return {}
        trunk.eval()
        embedder.eval()
        loader = torch.utils.data.DataLoader(bundle.test, batch_size=512, shuffle=False)
        device = next(embedder.parameters()).device
        with torch.no_grad():
            packed = torch.cat([embedder(trunk(xb.to(device))).cpu() for xb, _ in loader])
        labels = torch.as_tensor(bundle.test.labels)
        normalize = getattr(spec.loss, "structure_geometry", "scaled") == "l2"
        centre = bool(getattr(spec.loss.structure_loss, "centre_structure", False))
        return evaluate_embeddings(packed, labels, spec.loss.embedding_size, normalize, seed, centre)

    return after_training


# ------------------------------------------------------------------------------------------------ summary
def _namr_map(rec: dict, key: str) -> float:
    return rec["after_training"][key][0] * 100


def _base_map(rec: dict) -> float:
    return rec["metrics"]["mean_average_precision_at_r"] * 100


def _paired(runs: dict, base_runs: dict, key: str) -> str:
    common = sorted(set(runs) & set(base_runs))
    if not common:
        return ""
    diffs = [_namr_map(runs[s], key) - _base_map(base_runs[s]) for s in common]
    return f"{np.mean(diffs):+.2f} ± {np.std(diffs):.2f}"


def _mean(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" if values else ""


def summarize(records: list[dict]) -> str:
    """Markdown tables: training variants against the base alone (paired), retrieval variants, diagnostics."""
    by: dict = {}
    for r in records:
        by.setdefault((r["base"], r["variant"]), {})[r["seed"]] = r
    retrieval_keys = ["plain"] + [f"query_b{b:g}_k{k}" for b in BLENDS for k in (8, 32)]
    retrieval_keys += [f"symmetric_b{b:g}_k32" for b in (1.0, 0.1)]
    retrieval_keys += [f"query_b1_k{k or 'all'}" for k in CANDIDATES if k not in (1, 8, 32)]
    retrieval_keys += ["control_mean_s_k32", "control_shuffled_s_k32"]
    t1 = [
        "MAP@R (%), mean over seeds; paired = mean ± std of the per-seed difference to the base loss alone.\n",
        "| base | variant | seeds | MAP@R plain | MAP@R re-ranked (NASA: query s, top 32) | plain − base | "
        "re-ranked − base | best retrieval variant | best − base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t2 = ["| base | variant | " + " | ".join(retrieval_keys) + " |", "|---|---|" + "---|" * len(retrieval_keys)]
    t3 = [
        "| base | variant | top-1 changed / fixed / broken (%) | s: std over samples / over dims | "
        "corr(s, class spread) | corr(mean s, 10-NN distance) | grad cosine (metric, λ·structure) | "
        "‖λ·g_structure‖ / ‖g_metric‖ | positive pairs nearest the low centre | negative pairs nearest the low "
        "centre |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (base, variant), runs in sorted(by.items()):
        if variant == "base":
            t1.append(
                f"| {base} | base alone | {len(runs)} | {_mean([_base_map(r) for r in runs.values()])} | | | | | |"
            )
            continue
        base_runs = by.get((base, "base"), {})
        ev = [r["after_training"] for r in runs.values()]
        mean = {k: np.mean([e[k][0] for e in ev]) * 100 for k in ev[0] if isinstance(ev[0][k], list)}
        # real re-ranking choices only (K_c = 1 is the plain top-1)
        choices = [k for k in mean if k != "plain" and not k.startswith("control") and not k.endswith("_k1")]
        best = max(choices, key=lambda k: mean[k])
        t1.append(
            f"| {base} | {variant} | {len(runs)} | {mean['plain']:.2f} | {mean['query_b1_k32']:.2f} | "
            f"{_paired(runs, base_runs, 'plain')} | {_paired(runs, base_runs, 'query_b1_k32')} | {best} "
            f"({mean[best]:.2f}) | {_paired(runs, base_runs, best)} |"
        )
        t2.append(f"| {base} | {variant} | " + " | ".join(f"{mean[k]:.2f}" for k in retrieval_keys) + " |")
        top1 = " / ".join(f"{np.mean([e[k] for e in ev]) * 100:.1f}" for k in TOP1_KEYS)
        st = [e["s_stats"] for e in ev]
        last = [r["trace"][-1] for r in runs.values() if r.get("trace")]

        def tr(key: str, index: int | None = None, last=last) -> str:
            vals = [t[key] if index is None else t[key][index] for t in last if key in t]
            return f"{np.mean(vals):.2f}" if vals else ""

        t3.append(
            f"| {base} | {variant} | {top1} | {np.mean([t['std_over_samples'] for t in st]):.3f} / "
            f"{np.mean([t['std_over_dims'] for t in st]):.3f} | "
            f"{np.mean([t['corr_s_vs_class_spread'] for t in st]):+.2f} | "
            f"{np.mean([t['corr_mean_s_vs_knn10_distance'] for t in st]):+.2f} | {tr('grad_cosine')} | "
            f"{tr('grad_norm_ratio')} | {tr('pos_cluster_share', -1)} | {tr('neg_cluster_share', -1)} |"
        )
    return "\n".join(
        [
            "## Training variants",
            *t1,
            "",
            "## Retrieval variants (MAP@R %, same trained models)",
            *t2,
            "",
            "## Diagnostics (after training; training-time columns at the last traced iteration)",
            *t3,
            "",
            "## Re-ranking against plain retrieval, per model (the remedies' table)",
            *remedy_table(records),
            "",
            "## The structure term's gradient on s during training (mean over traced iterations and seeds)",
            *gradient_table(records),
            "",
            "## During training (mean over seeds)",
            *_trace_table(by),
            "",
            "## Selection rule applied (validation MAP@R %)",
            *choose(records)[2],
        ]
    )


REMEDY_KEYS = ("query_b1_k8", "query_b1_k32", "query_b0.5_k8", "query_b0.25_k8", "query_b0.1_k8")


def remedy_table(records: list[dict]) -> list[str]:
    """Per (base, variant): the spread ratio of s, plain MAP@R, and re-ranked − plain (paired over seeds, same model)
    for the query-weighted re-ranking of the top 8 / 32 at blends 1, 0.5, 0.25, 0.1."""
    by: dict = {}
    for r in records:
        if r["variant"] != "base" and r.get("after_training"):
            by.setdefault((r["base"], r["variant"]), []).append(r)
    head = " | ".join(f"{k} − plain" for k in REMEDY_KEYS)
    out = [
        "MAP@R (%); re-ranked − plain: mean ± std over seeds of the per-model difference. Spread ratio: std of s over "
        "samples / std over dimensions (per dimension resp. per sample, averaged; s centred by its evaluation-set "
        "mean when the model was trained centred).\n",
        f"| base | variant | seeds | spread ratio | plain | {head} |",
        "|---|---|---|---|---|" + "---|" * len(REMEDY_KEYS),
    ]
    for (base, variant), runs in sorted(by.items()):
        ratio = np.mean([_spread_ratio(r["after_training"]["s_stats"]) for r in runs])
        plain = np.mean([_namr_map(r, "plain") for r in runs])
        cells = []
        for k in REMEDY_KEYS:
            diffs = [_namr_map(r, k) - _namr_map(r, "plain") for r in runs]
            cells.append(f"{np.mean(diffs):+.2f} ± {np.std(diffs, ddof=1) if len(diffs) > 1 else 0.0:.2f}")
        out.append(f"| {base} | {variant} | {len(runs)} | {ratio:.3f} | {plain:.2f} | " + " | ".join(cells) + " |")
    return out


def _spread_ratio(stats: dict) -> float:
    return stats.get("spread_ratio", stats["std_over_samples"] / max(stats["std_over_dims"], 1e-12))


def gradient_table(records: list[dict]) -> list[str]:
    """The structure term's gradient on s (:func:`gradient_spread`, :func:`partner_decomposition`), averaged."""
    cols = (
        "s_grad_cluster_common",
        "s_grad_cluster_per_sample",
        "s_grad_cluster_partner_noise",
        "s_grad_cluster_common_share",
        "s_grad_shortlist_common_share",
        "s_grad_cluster_near_norm_share",
        "s_grad_cluster_near_cosine",
    )
    out = [
        "Shares of the squared gradient norm. Cluster term, over 8 random halves of the batch as partners: common to "
        "all samples / per-sample and the same whatever the partners / changing with the partners. Common share in "
        "one batch (all partners): cluster term, short-list term (1/N would be no common part; N = 64). Near: the "
        "cluster term's gradient from each anchor's 8 nearest partners (what re-ranking reorders), |g_near| / "
        "(|g_near| + |g_far|), and the cosine between g_near and the whole gradient.\n",
        "| base | variant | traced rows | common | per-sample | partner noise | cluster: common share (batch) | "
        "short list: common share (batch) | near: norm share | near: cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict = {}
    for r in records:
        rows = [row for row in r.get("trace") or [] if "s_grad_cluster_common_share" in row]
        if rows:
            by.setdefault((r["base"], r["variant"]), []).extend(rows)
    for (base, variant), rows in sorted(by.items()):
        vals = [np.mean([row[c] for row in rows if c in row]) if any(c in row for row in rows) else None for c in cols]
        cells = " | ".join("" if v is None else f"{v:.3f}" for v in vals)
        out.append(f"| {base} | {variant} | {len(rows)} | {cells} |")
    return out


def _trace_table(by: dict) -> list[str]:
    """Where D_ij sit relative to the centres, and the angle between the two terms' gradients, over training."""
    out = [
        "| base | variant | iteration | centres / mean D | pairs nearest the low centre: all / positive / negative | "
        "grad cosine | ‖λ·g_structure‖ / ‖g_metric‖ |",
        "|---|---|---|---|---|---|---|",
    ]
    shares = ("cluster_share", "pos_cluster_share", "neg_cluster_share")
    for (base, variant), runs in sorted(by.items()):
        traces = [r["trace"] for r in runs.values() if r.get("trace")]
        if not traces:
            continue
        for i, row in enumerate(traces[0]):
            if i % 2 and i != len(traces[0]) - 1:
                continue  # every other traced iteration, and the last
            rows = [t[i] for t in traces if len(t) > i]
            cen = np.mean([r.get("centres_over_mean_D", [np.nan]) for r in rows], axis=0)
            share = " / ".join(f"{np.mean([r[k][-1] for r in rows]):.2f}" for k in shares)
            out.append(
                f"| {base} | {variant} | {row['iteration']} | {', '.join(f'{c:.2f}' for c in cen)} | {share} | "
                f"{np.mean([r.get('grad_cosine', np.nan) for r in rows]):+.2f} | "
                f"{np.mean([r.get('grad_norm_ratio', np.nan) for r in rows]):.2f} |"
            )
    return out


def choose(records: list[dict], min_seeds: int = 2) -> tuple[str, dict[str, str], list[str]]:
    """The selection rule applied to validation records, in two steps.

    1. Retrieval: the re-ranking variant (weighting, blend, K_c > 1) with the largest mean (re-ranked − plain)
       MAP@R over every trained NAMR model; the symmetric weighting (which needs the references' s in the index)
       must beat the query weighting by ``SYMMETRIC_MARGIN`` points to be preferred.
    2. Training, per base: among the variants with at least ``min_seeds`` seeds (and the NASA configuration), the one
       with the largest mean validation MAP@R under that retrieval.

    Returns (retrieval key, {base: variant}, markdown lines explaining the choice)."""
    namr = [r for r in records if r["variant"] != "base" and r.get("after_training")]
    keys = [
        k
        for k, v in namr[0]["after_training"].items()
        if isinstance(v, list) and k != "plain" and not k.startswith("control") and not k.endswith("_k1")
    ]
    gain = {k: float(np.mean([_namr_map(r, k) - _namr_map(r, "plain") for r in namr])) for k in keys}

    def rank(k: str) -> float:
        return gain[k] - (SYMMETRIC_MARGIN if k.startswith("symmetric") else 0.0)

    best_key = max(keys, key=rank)
    top = [best_key] + [k for k in sorted(keys, key=lambda k: -gain[k]) if k != best_key][:4]
    lines = [
        f"Re-ranking variant: `{best_key}` (mean re-ranked − plain over {len(namr)} trained models: "
        f"{gain[best_key]:+.3f} points; next: " + ", ".join(f"`{k}` {gain[k]:+.3f}" for k in top[1:]) + ")."
    ]
    by: dict = {}
    for r in namr:
        by.setdefault(r["base"], {}).setdefault(r["variant"], []).append(_namr_map(r, best_key))
    picks = {}
    for base, variants in sorted(by.items()):
        eligible = {v: np.mean(x) for v, x in variants.items() if len(x) >= min_seeds}
        if not eligible:
            continue
        picks[base] = max(eligible, key=lambda v: eligible[v])
        ranked = sorted(eligible.items(), key=lambda kv: -kv[1])
        lines.append(f"* {base}: `{picks[base]}` (" + ", ".join(f"`{v}` {m:.2f}" for v, m in ranked) + ")")
    return best_key, picks, lines


def runner_table(records: list[dict]) -> str:
    """The final table from the runner's results.jsonl: NAMR + X (plain and re-ranked) against X, paired seeds."""
    from ..losses.registry import NAMR_ENTRIES

    by: dict = {}
    for r in records:
        by.setdefault(r["loss"], {})[int(r["seed"])] = r["metrics"]
    lines = [
        "MAP@R (%): mean ± std over seeds; paired differences: mean ± std of the per-seed differences, and the 95% t "
        "interval of re-ranked − plain.\n",
        "| base X | seeds | X | NAMR + X plain | NAMR + X re-ranked | plain − X | re-ranked − X | re-ranked − plain | "
        "95% interval |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(values: list[float]) -> str:
        return f"{np.mean(values):.2f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2f}"

    def pd(values: list[float]) -> str:
        return f"{np.mean(values):+.2f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2f}"

    for name in NAMR_ENTRIES:
        base = REGISTRY[name].base
        if name not in by or base not in by:
            continue
        seeds = sorted(set(by[name]) & set(by[base]))
        x = [by[base][s]["mean_average_precision_at_r"] * 100 for s in seeds]
        plain = [by[name][s]["plain_mean_average_precision_at_r"] * 100 for s in seeds]
        # records before the reranked_* keys existed reported re-ranked retrieval under the bare key
        rer = [
            by[name][s].get("reranked_mean_average_precision_at_r", by[name][s]["mean_average_precision_at_r"]) * 100
            for s in seeds
        ]
        _, _, lo, hi = report.paired_interval([r - p for r, p in zip(rer, plain)])
        lines.append(
            f"| {base} | {len(seeds)} | {ms(x)} | {ms(plain)} | {ms(rer)} | "
            f"{pd([p - b for p, b in zip(plain, x)])} | {pd([r - b for r, b in zip(rer, x)])} | "
            f"{pd([r - p for r, p in zip(rer, plain)])} | [{lo:+.2f}, {hi:+.2f}] |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.namr_diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="Omniglot folder or zips (required unless --runner-table)")
    p.add_argument(
        "--runner-table",
        default=None,
        metavar="RESULTS_JSONL",
        help="only print the NAMR + X vs X table of a `python -m benchmarks.run` results.jsonl and exit",
    )
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--val-alphabets", default=None, help="comma list (default: last sorted training alphabet)")
    p.add_argument("--bases", default="triplet,multi-similarity,contrastive,rll", help="registry base entries")
    p.add_argument("--variants", nargs="+", default=["base", "nasa"], help="see the module docstring")
    p.add_argument("--seeds", default="0,1", help="comma list of paired seeds")
    p.add_argument("--epochs", type=int, default=None, help="default: the runner's omniglot default")
    p.add_argument("--trace-every", type=int, default=100, help="training diagnostics every N iterations")
    p.add_argument("--out", default="results/namr_diagnose")
    return p


def omniglot_run_config(epochs: int | None = None):
    """The runner's Omniglot configuration (constant schedule, no evaluation during training); ``epochs`` replaces
    its number of epochs."""
    from ..execute.pipeline import RunConfig
    from ..run import DATASET_DEFAULTS

    d = DATASET_DEFAULTS["omniglot"]
    return RunConfig(
        dataset="omniglot",
        trunk=d["trunk"],
        embedding_size=d["embedding_size"],
        batch_size=d["batch_size"],
        m_per_class=d["m_per_class"],
        epochs=epochs or d["epochs"],
        iterations_per_epoch=d["iterations_per_epoch"],
        lr=d["lr"],
        weight_decay=d["weight_decay"],
        schedule="constant",
        eval_every=0,
        eval_batch_size=d["eval_batch_size"],
    )


def variant_entry(base: str, variant: str, config: dict | None, tracer: _TracedSpec) -> LossEntry:
    """The registry entry one (base, variant) trains: the base alone (``config`` None), or NAMR around it with
    ``config``, its loss traced by ``tracer``."""
    if config is None:
        return REGISTRY[base]

    def traced(ctx: BuildContext) -> LossSpec:
        spec = namr_spec(REGISTRY[base], ctx, config)
        tracer.wrap(spec.loss)
        return spec

    return _AblationEntry(
        f"namr-{base}",
        "ours",
        "pml_rll.losses:NAMRLoss",
        {"variant": Param(variant)},
        "ablation",
        wraps=REGISTRY[base],
        builder=traced,
    )


@dataclass
class _Diagnosis:
    """What every (base, variant, seed) run of one command shares."""

    args: argparse.Namespace
    bundle: Any
    cfg: Any
    chash: str
    env: dict
    command: str


def run_variant(d: _Diagnosis, base: str, variant: str, config: dict | None, seed: int) -> dict:
    """Train and analyse one (base, variant, seed) with the runner's pipeline (``config``: the variant's NAMR
    configuration, None for the base alone); its record, with the diagnostics."""
    from ..execute.pipeline import run_one

    tracer = _TracedSpec(d.args.trace_every)
    entry = variant_entry(base, variant, config, tracer)
    t0 = time.perf_counter()
    rec = run_one(
        d.bundle,
        entry,
        {},
        seed,
        d.cfg,
        torch.device("cpu"),
        os.path.join(d.args.out, "logs", base, variant.replace("/", "_"), f"seed{seed}"),
        after_training=after_training_factory(d.bundle, seed),
    )
    rec.update(
        base=base,
        variant=variant,
        split=d.args.split,
        config_hash=d.chash,
        namr_config=config,
        trace=tracer.rows,
        dataset_description=d.bundle.description,
        environment=d.env,
        command=d.command,
        wall_seconds=round(time.perf_counter() - t0, 1),
    )
    return rec


def write_summary(d: _Diagnosis, jsonl: str) -> str:
    """``summary.md`` from the records of this split and configuration in ``jsonl`` (written atomically)."""
    records = [r for r in report.load_jsonl(jsonl) if r["split"] == d.args.split and r["config_hash"] == d.chash]
    text = summarize(records)
    env = d.env
    atomic_write(
        os.path.join(d.args.out, "summary.md"),
        f"# NAMR diagnosis ({d.args.split} split)\n\n{d.bundle.description}.\n\n"
        f"Machine: {env['device']} ({env['device_name']}, {env['cpu_count']} CPUs), 1 torch thread.\n\n{text}\n",
    )
    return text


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.runner_table:
        print(runner_table(report.load_jsonl(args.runner_table)))
        return 0
    if not args.data_root:
        p.error("--data-root is required")

    from ..data.load import load_dataset

    torch.set_num_threads(1)
    cfg = omniglot_run_config(args.epochs)
    if args.split == "val":
        bundle = load_validation_bundle(args.data_root, args.val_alphabets.split(",") if args.val_alphabets else None)
    else:
        bundle = load_dataset("omniglot", args.data_root)
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "records.jsonl")
    done = {(r["base"], r["variant"], r["seed"], r["split"], r["config_hash"]) for r in report.load_jsonl(jsonl)}
    command = "python -m benchmarks.namr_diagnose " + " ".join(argv if argv is not None else sys.argv[1:])
    d = _Diagnosis(args, bundle, cfg, key_of(cfg.key())[:12], environment_info(torch.device("cpu")), command)
    print(bundle.description)
    for base in args.bases.split(","):
        for variant in args.variants:
            config = parse_variant(variant, base)
            for seed in [int(s) for s in args.seeds.split(",")]:
                if (base, variant, seed, args.split, d.chash) in done:
                    continue
                rec = run_variant(d, base, variant, config, seed)
                _append_jsonl(jsonl, rec)
                m = rec["metrics"]
                print(
                    f"{base} {variant} seed {seed}: MAP@R {m['mean_average_precision_at_r']:.4f} "
                    f"plain {m.get('plain_mean_average_precision_at_r', float('nan')):.4f} ({rec['wall_seconds']} s)",
                    flush=True,
                )
    print(write_summary(d, jsonl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
