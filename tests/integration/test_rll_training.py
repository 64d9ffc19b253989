"""A short PML training run with RankedListLoss: retrieval on held-out digits must improve clearly."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from pytorch_metric_learning import samplers, testers, trainers
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits

from pml_rll.losses import RankedListLoss

logging.getLogger("PML").setLevel(logging.WARNING)


def digits_split(seed=0):
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order])
    n = int(0.7 * len(y))
    return (x[:n], y[:n]), (x[n:], y[n:])


def map_at_r(trunk, embedder, dataset):
    tester = testers.GlobalEmbeddingSpaceTester(
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),  # the models stay on the CPU in this test
        batch_size=256,
        accuracy_calculator=AccuracyCalculator(
            include=("mean_average_precision_at_r", "precision_at_1"),
            k="max_bin_count",
            knn_func=CustomKNN(LpDistance(normalize_embeddings=True)),
        ),
    )
    acc = tester.test({"test": dataset}, 0, trunk, embedder)
    return acc["test"]["mean_average_precision_at_r_level0"], acc["test"]["precision_at_1_level0"]


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_metric_loss_only_training_lifts_map_at_r(gradient):
    torch.manual_seed(0)
    np.random.seed(0)  # PML's MPerClassSampler shuffles with the global numpy generator
    (xtr, ytr), (xte, yte) = digits_split()
    train = torch.utils.data.TensorDataset(xtr, ytr)
    test = torch.utils.data.TensorDataset(xte, yte)
    trunk = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU())
    embedder = torch.nn.Linear(128, 32)
    before, _ = map_at_r(trunk, embedder, test)
    models = {"trunk": trunk, "embedder": embedder}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    sampler = samplers.MPerClassSampler(ytr, m=8, batch_size=64, length_before_new_iter=len(ytr))
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={"trunk_optimizer": optimizers["trunk"], "embedder_optimizer": optimizers["embedder"]},
        batch_size=64,
        loss_funcs={"metric_loss": RankedListLoss(margin=0.4, Tn=10, gradient=gradient)},
        mining_funcs={},
        dataset=train,
        sampler=sampler,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(num_epochs=4)
    after, p1 = map_at_r(trunk, embedder, test)
    assert after > before + 0.25, (before, after)
    assert after > 0.75 and p1 > 0.9, (after, p1)
