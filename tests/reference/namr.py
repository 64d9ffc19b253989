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
