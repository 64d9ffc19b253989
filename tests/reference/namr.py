"""Slow, obviously-correct loop references for the NAMR tests, from the formulas of docs/namr.md (float64)."""

from __future__ import annotations

import math

import torch


def plain_distance_stats(x):
    """mu, Bessel std of all N*N Euclidean distances of x, diagonal zeros included (python floats)."""
    xd = x.detach().tolist()
    n, d = len(xd), len(xd[0])
    vals = []
    for i in range(n):
        for j in range(n):
            vals.append(math.sqrt(sum((xd[i][k] - xd[j][k]) ** 2 for k in range(d))))
    mu = sum(vals) / len(vals)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return mu, sigma


def centres(x, t_values, floor):
    mu, sigma = plain_distance_stats(x)
    return [max(floor * mu, mu - t * sigma) for t in t_values]


def adaptive_distance(x, s, i, j):
    """D_ij = sqrt(sum_k s_ik * max((x_ik - x_jk)^2, 1e-12)), a differentiable scalar."""
    total = 0.0
    for k in range(x.shape[1]):
        total = total + s[i, k] * torch.clamp((x[i, k] - x[j, k]) ** 2, min=1e-12)
    return torch.sqrt(total)


def multi_cluster_loss(x, s, t_values=(0.0, 3.0), alpha=10.0, floor=0.2):
    """mean over ordered pairs i != j of sum_m softmax_m(-alpha |D_ij - eta_m|) |D_ij - eta_m|."""
    n = x.shape[0]
    etas = centres(x, t_values, floor)
    total = 0.0
    for i in range(n):
        total = total + _anchor_row_sum(x, s, i, etas, alpha)
    return total / (n * (n - 1))


def _anchor_row_sum(x, s, i, etas, alpha):
    """sum over j != i of sum_m softmax_m(-alpha |D_ij - eta_m|) |D_ij - eta_m| (one anchor's row)."""
    total = 0.0
    for j in range(x.shape[0]):
        if i == j:
            continue
        dij = adaptive_distance(x, s, i, j)
        gaps = [torch.abs(dij - eta) for eta in etas]
        weights = [torch.exp(-alpha * g) for g in gaps]
        z = sum(weights)
        for m in range(len(etas)):
            total = total + weights[m] / z * gaps[m]
    return total


def weighted_sq_distance(qx, qs, rx):
    """sum_k s_qk (x_qk - x_jk)^2 for one query and one reference (python floats)."""
    return sum(float(qs[k]) * (float(qx[k]) - float(rx[k])) ** 2 for k in range(len(qx)))


def euclidean_sq(a, b):
    return sum((float(a[k]) - float(b[k])) ** 2 for k in range(len(a)))


def row_stats(x, i, k=None):
    """mu_i, Bessel std of anchor i's Euclidean distances to the others (or to its k nearest), python floats."""
    xd = x.detach().tolist()
    vals = sorted(math.sqrt(euclidean_sq(xd[i], xd[j])) for j in range(len(xd)) if j != i)
    if k is not None:
        vals = vals[:k]
    mu = sum(vals) / len(vals)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return mu, sigma


def per_anchor_multi_cluster_loss(x, s, t_values=(0.0, 3.0), alpha=10.0, floor=0.2, k=None):
    """The multi-cluster loss with anchor i's centres from its own row (or k nearest); repeated centres dropped."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        mu, sigma = row_stats(x, i, k)
        etas = []
        for t in sorted(t_values):
            eta = max(floor * mu, mu - t * sigma)
            if eta not in etas:
                etas.append(eta)
        total = total + _anchor_row_sum(x, s, i, etas, alpha)
    return total / (n * (n - 1))


def rerank_sq_distance(qx, qs, rx, rs=None, blend=1.0):
    """sum_k w_k (x_qk - x_jk)^2, w = (1 - blend) + blend * (s_q, or (s_q + s_j) / 2), python floats."""
    total = 0.0
    for k in range(len(qx)):
        s = float(qs[k]) if rs is None else 0.5 * (float(qs[k]) + float(rs[k]))
        total += ((1.0 - blend) + blend * s) * (float(qx[k]) - float(rx[k])) ** 2
    return total


def centred_structure(s):
    """s_ik / mean_j s_jk, written out element by element (a differentiable tensor)."""
    n, d = s.shape
    rows = []
    for i in range(n):
        rows.append(torch.stack([s[i, k] / (sum(s[j, k] for j in range(n)) / n) for k in range(d)]))
    return torch.stack(rows)


def shortlist_ranking_loss(x, s, labels, k=8, temperature=0.1):
    """Per-anchor short-list ranking loss (a list of differentiable scalars, 0.0 for anchors without pairs).

    Anchor i: its k nearest others by plain squared distance; m_i their mean plain squared distance; for every
    same-class p and other-class n among them, softplus((d_w(i,p) - d_w(i,n)) / (temperature * m_i)) with
    d_w(i,j) = sum_k s_ik (x_ik - x_jk)^2 and x treated as a constant; the mean over the anchor's pairs."""
    xd = x.detach().tolist()
    lab = [int(v) for v in labels]
    n = len(xd)
    out = []
    for i in range(n):
        others = sorted((euclidean_sq(xd[i], xd[j]), j) for j in range(n) if j != i)[: min(k, n - 1)]
        m = sum(dist for dist, _ in others) / len(others)
        cand = [j for _, j in others]

        def dw(j, i=i):
            return sum(s[i, kk] * (xd[i][kk] - xd[j][kk]) ** 2 for kk in range(len(xd[i])))

        pairs = [(p, q) for p in cand for q in cand if lab[p] == lab[i] and lab[q] != lab[i]]
        if not pairs:
            out.append(0.0)
            continue
        total = 0.0
        for p, q in pairs:
            total = total + torch.nn.functional.softplus((dw(p) - dw(q)) / (temperature * m))
        out.append(total / len(pairs))
    return out
