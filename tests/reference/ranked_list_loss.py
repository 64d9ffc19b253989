"""A slow, explicit Ranked List Loss written from the paper's eqs. 2-5 (docs/ranked_list_loss.md, sections 1-2).

Loops over queries and gallery items with scalar arithmetic; nothing here is shared with the package.
"""

from __future__ import annotations

import math

import torch


def _normalise(x):
    return [row / torch.sqrt((row * row).sum()) for row in x]


def _lists(e, g, labels, ref_labels, i, margin, alpha, same, pos_pairs, neg_pairs):
    """Non-trivial positives and negatives of query i: lists of (j, d_ij)."""
    P, N = [], []
    for j in range(len(g)):
        if pos_pairs is not None:
            is_pos, is_neg = (i, j) in pos_pairs, (i, j) in neg_pairs
        else:
            is_pos = labels[i] == ref_labels[j] and not (same and i == j)
            is_neg = labels[i] != ref_labels[j]
        d = torch.sqrt(((e[i] - g[j]) ** 2).sum())
        if is_pos and d.item() > alpha - margin:
            P.append((j, d))
        if is_neg and d.item() < alpha:
            N.append((j, d))
    return P, N


def _weighted_mean(values, T):
    if not values:
        return torch.zeros((), dtype=torch.float64)
    ws = [torch.exp(T * v) for v in values]
    return sum(w * v for w, v in zip(ws, values)) / sum(ws)


def reference_losses(
    x,
    labels=None,
    margin=0.4,
    alpha=None,
    Tp=0.0,
    Tn=10.0,
    imbalance=0.5,
    ref=None,
    ref_labels=None,
    pos_pairs=None,
    neg_pairs=None,
):
    """Per-query losses (list of 0-d tensors, differentiable by autograd = plain-autograd semantics)."""
    alpha = 1 + margin / 2 if alpha is None else alpha
    same = ref is None
    e = _normalise(x)
    g = e if same else _normalise(ref)
    ref_labels = labels if same else ref_labels
    out = []
    for i in range(len(e)):
        P, N = _lists(e, g, labels, ref_labels, i, margin, alpha, same, pos_pairs, neg_pairs)
        L_P = _weighted_mean([d - (alpha - margin) for _, d in P], Tp)
        L_N = _weighted_mean([alpha - d for _, d in N], Tn)
        out.append((1 - imbalance) * L_P + imbalance * L_N)
    return out


def reference_loss(*args, **kwargs):
    q = reference_losses(*args, **kwargs)
    return sum(q) / len(q)


def reference_paper_gradient(
    x, labels, margin=0.4, alpha=None, Tp=0.0, Tn=10.0, imbalance=0.5, ref=None, ref_labels=None
):
    """The paper's gradient of the mean loss (docs/ranked_list_loss.md, section 2.1): constant weights, query-only,
    unit directions, then the L2-normalisation Jacobian. Written out by hand, no autograd. With ``ref`` the
    gallery is the (fixed) reference set."""
    alpha = 1 + margin / 2 if alpha is None else alpha
    x = x.detach().to(torch.float64)
    e = _normalise(x)
    same = ref is None
    g = e if same else _normalise(ref.detach().to(torch.float64))
    ref_labels = labels if same else ref_labels
    B = len(e)
    grads = []
    for i in range(B):
        P, N = _lists(e, g, labels, ref_labels, i, margin, alpha, same, None, None)
        ge = torch.zeros_like(e[i])
        for group, T, sign, lam in ((P, Tp, 1.0, 1 - imbalance), (N, Tn, -1.0, imbalance)):
            if not group:
                continue
            h = [float(d - (alpha - margin)) if sign > 0 else float(alpha - d) for _, d in group]
            top = max(T * v for v in h)
            w = [math.exp(T * v - top) for v in h]
            s = sum(w)
            for (j, d), wj in zip(group, w):
                if float(d) > 1e-12:  # the direction at d = 0 is undefined: zero (docs/ranked_list_loss.md, case 5)
                    ge += sign * lam * (wj / s) * (e[i] - g[j]) / d
        ge = ge / B
        norm = torch.sqrt((x[i] ** 2).sum())
        grads.append((ge - e[i] * (e[i] @ ge)) / norm)
    return torch.stack(grads)
