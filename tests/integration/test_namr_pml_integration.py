"""End-to-end with PML's trainer and tester (docs/namr.md, section 5.3; the README's NAMR usage)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances, losses, samplers, testers, trainers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import InferenceModel

from pml_rll.losses import NAMRLoss
from pml_rll.modules import NAMREmbedder
from pml_rll.retrieval import NAMRReRankKNN

D = 8


def _dataset(seed, num_classes, per_class, dim=16, class_seed=None):
    # class_seed: draw the class means from another seed (same classes, new samples)
    g = torch.Generator().manual_seed(seed)
    g_means = g if class_seed is None else torch.Generator().manual_seed(class_seed)
    means = torch.randn(num_classes, dim, generator=g_means) * 2.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), dim, generator=g)
    return torch.utils.data.TensorDataset(x, labels)


class _Recording:
    def __init__(self, knn):
        self.knn, self.queries = knn, []

    def __call__(self, query, k, reference, ref_includes_query):
        self.queries.append(query.detach().clone())
        return self.knn(query, k, reference, ref_includes_query)


def _sklearn_kmeans(x, k):
    from sklearn.cluster import KMeans

    return torch.as_tensor(KMeans(k, n_init=1, random_state=0).fit_predict(x.cpu().numpy()), device=x.device)


def _accuracies(tester, dataset, trunk, embedder, knn, epoch):
    tester.accuracy_calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count", knn_func=knn
    )
    return tester.test({"val": dataset}, epoch, trunk, embedder)["val"]


def test_metric_loss_only_then_global_embedding_space_tester(one_thread, tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)  # PML's MPerClassSampler shuffles with the global numpy generator
    train_ds = _dataset(0, num_classes=8, per_class=24)
    val_ds = _dataset(1, num_classes=8, per_class=12, class_seed=0)  # held-out samples of the trained classes
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    embedder = NAMREmbedder(32, embedding_size=D)
    loss = NAMRLoss(losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(normalize_embeddings=False)), D)
    labels = train_ds.tensors[1]
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=3e-3),
            "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=3e-3),
        },
        batch_size=32,
        loss_funcs={"metric_loss": loss},
        dataset=train_ds,
        sampler=samplers.MPerClassSampler(labels, m=4, batch_size=32, length_before_new_iter=len(labels)),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    plain = NAMRReRankKNN(D, num_candidates=16, mode="plain")
    tester = testers.GlobalEmbeddingSpaceTester(  # an explicit calculator: PML's default needs faiss
        normalize_embeddings=False,
        batch_size=64,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=AccuracyCalculator(include=("precision_at_1",), knn_func=plain),
    )
    rerank = NAMRReRankKNN(D, num_candidates=16)
    before = _accuracies(tester, val_ds, trunk, embedder, plain, 0)

    struct_before = [p.detach().clone() for p in embedder.structure_head.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        trainer.train(num_epochs=4)
    struct_changed = any(not torch.equal(a, b) for a, b in zip(struct_before, embedder.structure_head.parameters()))
    assert struct_changed, "the structure head must receive gradient through NAMRLoss"
    assert loss.structure_loss_value > 0 and loss.metric_loss_value >= 0

    acc_plain = _accuracies(tester, val_ds, trunk, embedder, plain, 4)
    acc_rerank = _accuracies(tester, val_ds, trunk, embedder, _Recording(rerank), 4)
    # the tester handed the packed, un-normalised vector to our knn_func
    packed = tester.accuracy_calculator.knn_func.queries[0]
    assert packed.shape == (len(val_ds), 2 * D)
    with torch.no_grad():
        embedder.eval()
        torch.testing.assert_close(packed.cpu(), embedder(trunk(val_ds.tensors[0])))
    s = packed[:, D:]
    assert (s > 0.5).all() and (s < 1.5).all()
    for acc in (before, acc_plain, acc_rerank):
        assert 0.0 <= acc["precision_at_1_level0"] <= 1.0
    # held-out samples of the trained classes: MAP@R 0.51 untrained -> 0.96 after 4 epochs at these seeds
    assert acc_plain["mean_average_precision_at_r_level0"] > before["mean_average_precision_at_r_level0"] + 0.2
    assert acc_plain["precision_at_1_level0"] > 0.5 and acc_rerank["precision_at_1_level0"] > 0.5


def test_tester_with_default_knn_and_clustering_metrics(one_thread):
    # the full default metric set (incl. NMI/AMI through a k-means function) with the re-ranking knn
    torch.manual_seed(1)
    val_ds = _dataset(2, num_classes=5, per_class=10)
    trunk = torch.nn.Identity()
    embedder = NAMREmbedder(16, embedding_size=D)
    tester = testers.GlobalEmbeddingSpaceTester(
        normalize_embeddings=False,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=AccuracyCalculator(
            knn_func=NAMRReRankKNN(D, num_candidates=8), kmeans_func=_sklearn_kmeans
        ),
    )
    acc = tester.test({"val": val_ds}, 0, trunk, embedder)["val"]
    assert {"precision_at_1_level0", "NMI_level0", "mean_average_precision_at_r_level0"} <= set(acc)


def test_inference_model_with_rerank_knn():
    torch.manual_seed(2)
    ds = _dataset(3, num_classes=4, per_class=10)
    embedder = NAMREmbedder(16, embedding_size=D)
    model = InferenceModel(
        torch.nn.Identity(),
        embedder=embedder,
        normalize_embeddings=False,
        knn_func=NAMRReRankKNN(D, num_candidates=10),
        data_device=torch.device("cpu"),
    )
    model.train_knn(ds.tensors[0])
    dist, idx = model.get_nearest_neighbors(ds.tensors[0][:5], k=3)
    assert idx.shape == (5, 3) and torch.equal(idx[:, 0], torch.arange(5))  # each item's nearest is itself
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


def test_record_keeper_logs_both_loss_parts(one_thread, tmp_path):
    rk = pytest.importorskip("record_keeper")
    import sqlite3

    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import logging_presets

    keeper = rk.RecordKeeper(
        tensorboard_writer=None,
        record_writer=rk.RecordWriter(folder=str(tmp_path)),
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )
    hooks = logging_presets.HookContainer(keeper, primary_metric="precision_at_1", log_freq=1)
    ds = _dataset(4, num_classes=8, per_class=8)
    labels = ds.tensors[1]
    embedder = NAMREmbedder(16, embedding_size=4)
    trainer = trainers.MetricLossOnly(
        models={"trunk": torch.nn.Identity(), "embedder": embedder},
        optimizers={"embedder_optimizer": torch.optim.Adam(embedder.parameters())},
        batch_size=16,
        loss_funcs={"metric_loss": NAMRLoss(losses.TripletMarginLoss(), 4)},
        dataset=ds,
        sampler=samplers.MPerClassSampler(labels, 4, batch_size=16, length_before_new_iter=len(labels)),
        dataloader_num_workers=0,
        end_of_iteration_hook=hooks.end_of_iteration_hook,
        data_device=torch.device("cpu"),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        trainer.train(num_epochs=1)
    keeper.save_records()
    con = sqlite3.connect(str(tmp_path / "logs.db"))
    rows = con.execute("select metric_loss_value, structure_loss_value from metric_loss_NAMRLoss").fetchall()
    con.close()
    assert len(rows) == 4 and all(m >= 0 and s > 0 for m, s in rows)
