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
        for j in range(n):
            if i == j:
                continue
            dij = adaptive_distance(x, s, i, j)
            gaps = [torch.abs(dij - eta) for eta in etas]
            weights = [torch.exp(-alpha * g) for g in gaps]
            z = sum(weights)
            for m in range(len(etas)):
                total = total + weights[m] / z * gaps[m]
    return total / (n * (n - 1))


def weighted_sq_distance(qx, qs, rx):
    """sum_k s_qk (x_qk - x_jk)^2 for one query and one reference (python floats)."""
    return sum(float(qs[k]) * (float(qx[k]) - float(rx[k])) ** 2 for k in range(len(qx)))


def euclidean_sq(a, b):
    return sum((float(a[k]) - float(b[k])) ** 2 for k in range(len(a)))
