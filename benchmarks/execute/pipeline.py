"""One benchmark run: the same trunk, embedder, optimizer, sampler, trainer and tester for every loss.

PML pieces used as they are: ``MPerClassSampler`` (subclassed only to draw from its own generator),
``MetricLossOnly`` (subclassed only for one progress bar per run), ``GlobalEmbeddingSpaceTester`` and
``AccuracyCalculator`` (subclassed for DML Recall@k), ``logging_presets.HookContainer`` with a record-keeper.

Paired seeds: for a seed s, every loss gets
* the same initial trunk and embedder weights (built right after ``torch.manual_seed`` of values derived from s;
  a NAMR embedder's sample head is a copy of the plain embedder's layer),
* the same batch sequence (the sampler's own ``numpy.random.RandomState(s)``),
* the same augmentations (each sampled index carries an augmentation seed from the same sampler generator),
so that only the loss differs. The global RNGs, which miners and losses may consume, drive none of these.
Model selection never looks at the test split: the reported numbers are those of the last epoch; test-split
evaluations at earlier epochs only draw the learning curves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import samplers, testers, trainers
from pytorch_metric_learning.utils import common_functions as c_f

from ..core.progress import progress_bar
from ..data.bundle import DatasetBundle
from ..losses.registry import BuildContext, LossEntry, LossSpec
from ..results.metrics import NAMRAccuracyCalculator, RetrievalAccuracyCalculator, summarize
from . import distributed

warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
warnings.filterwarnings("ignore", message="Values of Tp or Tn are too high")
c_f.LOGGER.setLevel(logging.WARNING)


@dataclass
class RunConfig:
    """Everything that decides a run's result, except the loss and the seed."""

    dataset: str
    trunk: str
    embedding_size: int
    batch_size: int
    m_per_class: int
    epochs: int
    iterations_per_epoch: int
    lr: float
    weight_decay: float
    schedule: str
    eval_every: int
    eval_batch_size: int
    image_size: int | None = None
    pretrained: bool = True
    cross_batch_memory: int = 0  # DDP hook: memory size of --cross-batch-memory (0: off)
    amp: str = "off"  # --amp: off, bf16 or fp16 (autocast of trunk and embedder; fp16 with a GradScaler)
    trunk_weights: str | None = None  # --trunk-weights: a local checkpoint's path ...
    trunk_weights_sha1: str | None = None  # ... and its content hash (a changed file is a new configuration)
    freeze_bn: bool = False  # --freeze-bn: the trunk's BatchNorm layers in eval mode while training
    knn: str = "exact"  # --knn: the tester's neighbour search and its settings (benchmarks.results.knn.canonical_knn)
    eval_precision: str = "float32"  # --eval-precision: dtype the evaluation embeddings are kept in

    #: options added later, left out of the key at their defaults so that earlier configurations keep their hash
    _KEY_DEFAULTS = (
        ("amp", "off"),
        ("trunk_weights", None),
        ("trunk_weights_sha1", None),
        ("freeze_bn", False),
        ("knn", "exact"),
        ("eval_precision", "float32"),
    )

    def __post_init__(self) -> None:
        from ..results.knn import canonical_knn

        self.knn = canonical_knn(self.knn)  # every index setting spelled out: a changed default is a new key

    def key(self) -> dict:
        k = asdict(self)
        if not k["cross_batch_memory"]:  # DDP hook: configurations without a memory keep their earlier hash
            del k["cross_batch_memory"]
        for name, default in self._KEY_DEFAULTS:
            if k[name] == default:
                del k[name]
        if k.get("trunk_weights") is not None:  # the content decides, not where the file lies
            del k["trunk_weights"]
        return k


# ---------------------------------------------------------------------------------------------------- models
class ConvNet(torch.nn.Module):
    """Small CNN for 1-channel 28x28 inputs: 3 x (conv3x3 + BN + ReLU), two max-pools, global average pool."""

    def __init__(self, in_channels: int = 1, widths=(32, 64, 128)) -> None:
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [torch.nn.Conv2d(c, w, 3, padding=1, bias=False), torch.nn.BatchNorm2d(w), torch.nn.ReLU(True)]
            if i < len(widths) - 1:
                layers.append(torch.nn.MaxPool2d(2))
            c = w
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
        self.net = torch.nn.Sequential(*layers)
        self.out_features = c

    def forward(self, x):
        return self.net(x)


class MLP(torch.nn.Module):
    """Two-layer perceptron trunk for flat features."""

    def __init__(self, in_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden),
            torch.nn.ReLU(True),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(True),
        )
        self.out_features = hidden

    def forward(self, x):
        return self.net(x)


def build_trunk(
    name: str, input_shape: tuple[int, ...], pretrained: bool = True, weights: str | None = None
) -> tuple[torch.nn.Module, int, str]:
    """Return (trunk, output width, note). ResNets load ImageNet weights when they can (cached or downloadable);
    ``timm:<name>`` and torchvision model names are built by :mod:`benchmarks.execute.trunks`; ``weights``, a local
    checkpoint, replaces any pretrained weights (no download)."""
    if weights is not None:
        from .trunks import load_trunk_weights

        trunk, width, note, heads = _build_trunk(name, input_shape, pretrained=False)
        load_trunk_weights(trunk, weights, heads)
        return trunk, width, note.replace("(random init)", "").strip() + f" (weights {os.path.basename(weights)})"
    trunk, width, note, _ = _build_trunk(name, input_shape, pretrained)
    return trunk, width, note


def _build_trunk(
    name: str, input_shape: tuple[int, ...], pretrained: bool
) -> tuple[torch.nn.Module, int, str, list[str]]:
    """(trunk, output width, note, key prefixes of a removed classifier)."""
    if name not in ("mlp", "convnet", "convnet-small", "resnet18", "resnet50"):
        from .trunks import build_named_trunk

        return build_named_trunk(name, input_shape, pretrained)
    trunk, width, note = _build_builtin_trunk(name, input_shape, pretrained)
    return trunk, width, note, ["fc"] if name.startswith("resnet") else []


def _build_builtin_trunk(
    name: str, input_shape: tuple[int, ...], pretrained: bool = True
) -> tuple[torch.nn.Module, int, str]:
    if name == "mlp":
        t = MLP(int(np.prod(input_shape)))
        return t, t.out_features, "MLP(in->128->128)"
    if name == "convnet":
        cnn = ConvNet(input_shape[0])
        return cnn, cnn.out_features, "ConvNet(32-64-128, GAP)"
    if name == "convnet-small":
        cnn = ConvNet(input_shape[0], widths=(16, 32, 64))
        return cnn, cnn.out_features, "ConvNet(16-32-64, GAP)"
    if name in ("resnet18", "resnet50"):
        import torchvision

        fn = getattr(torchvision.models, name)
        note = f"{name} (random init)"
        model = None
        if pretrained:
            try:
                weights = torchvision.models.get_model_weights(name).DEFAULT
                model = fn(weights=weights)
                note = f"{name} ({weights})"
            except Exception as e:  # offline, no cache: fall back, and say so
                warnings.warn(f"could not load ImageNet weights for {name} ({type(e).__name__}: {e}); random init")
        if model is None:
            model = fn(weights=None)
        width = model.fc.in_features
        model.fc = torch.nn.Identity()
        return model, width, note
    raise ValueError(f"unknown trunk {name!r}")


def build_models(cfg: RunConfig, bundle: DatasetBundle, seed: int, namr: bool):
    """Trunk and embedder for one seed. A NAMR embedder's sample head is a copy of the plain embedder (paired)."""
    from pml_rll.modules import NAMREmbedder

    torch.manual_seed(seed)
    trunk, width, note = build_trunk(cfg.trunk, bundle.input_shape, cfg.pretrained, cfg.trunk_weights)
    torch.manual_seed(seed + 10_007)
    embedder: torch.nn.Module = torch.nn.Linear(width, cfg.embedding_size)
    if namr:
        torch.manual_seed(seed + 20_011)
        namr_embedder = NAMREmbedder(width, cfg.embedding_size)
        namr_embedder.sample_head.load_state_dict(embedder.state_dict())
        embedder = namr_embedder
    return trunk, embedder, note


# ---------------------------------------------------------------------------------------------------- sampler
class PairedMPerClassSampler(samplers.MPerClassSampler):
    """PML's ``MPerClassSampler`` drawing from its own ``RandomState(seed)``, yielding ``(index, aug_seed)``.

    The class order, the m samples per class and one augmentation seed per sample come from the sampler's own
    generator, so the batch sequence and the augmentations are identical for every loss at a given seed, however
    much global randomness the losses and miners consume. Each ``iter()`` continues the same stream.
    """

    def __init__(self, labels, m, batch_size, length_before_new_iter, seed: int) -> None:
        super().__init__(labels, m, batch_size=batch_size, length_before_new_iter=length_before_new_iter)
        self.rng = np.random.RandomState(seed)

    def __iter__(self):
        idx_list: list[int] = []
        bs = self.batch_size if self.batch_size is not None else self.length_of_single_pass
        for _ in range(self.calculate_num_iters()):
            labels = list(self.labels)
            self.rng.shuffle(labels)
            for label in labels[: bs // self.m_per_class]:
                t = self.labels_to_indices[label]
                replace = len(t) < self.m_per_class
                idx_list.extend(self.rng.choice(t, size=self.m_per_class, replace=replace).tolist())
        idx_list = idx_list[: self.list_size]
        aug = self.rng.randint(0, 2**31 - 1, size=len(idx_list))
        return iter(list(zip(idx_list, aug.tolist())))


# ---------------------------------------------------------------------------------------------------- trainer / tester
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``--amp bf16|fp16`` on the device's type; a no-op for ``off``."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


class BenchmarkTrainer(trainers.MetricLossOnly):
    """``MetricLossOnly`` with one tqdm bar per run (PML's bar restarts every epoch) and a per-iteration log of the
    total loss; training logic unchanged.

    ``amp`` (``"off"``, ``"bf16"``, ``"fp16"``): the trunk and the embedder run under ``torch.autocast``; the miner
    and the loss run outside it, on autocast's embeddings cast to float32, the same for every loss (pml_rll's
    losses compute half precision in float32 anyway; several of PML's distances have no bfloat16 kernel on the
    CPU). ``fp16`` scales the loss with a ``GradScaler`` (steps skipped when gradients overflow), the loss's own
    parameters and a cross-batch memory included.
    """

    def __init__(self, *args: Any, amp: str = "off", **kwargs: Any) -> None:
        if amp not in ("off", *AMP_DTYPES):
            raise ValueError(f"amp must be off, bf16 or fp16, got {amp!r}")
        self.amp = amp
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler(torch.device(self.data_device).type) if amp == "fp16" else None

    def compute_embeddings(self, data):
        if self.amp == "off":
            return super().compute_embeddings(data)
        with autocast(self.data_device, self.amp):
            embeddings = super().compute_embeddings(data)
        return embeddings.float()

    def backward(self):
        if self.scaler is None:
            return super().backward()
        self.scaler.scale(self.losses["total_loss"]).backward()

    def step_optimizers(self):
        if self.scaler is None:
            return super().step_optimizers()
        for k, v in self.optimizers.items():
            if c_f.regex_replace("_optimizer$", "", k) not in self.freeze_these:
                self.scaler.step(v)
        self.scaler.update()

    def train(self, start_epoch=1, num_epochs=1, pbar=None):
        self.initialize_dataloader()
        self.loss_log: list[float] = []
        for self.epoch in range(start_epoch, num_epochs + 1):
            self.set_to_train()
            for self.iteration in range(self.iterations_per_epoch):  # noqa: B020 (PML's trainer loop)
                self.forward_and_backward()
                self.end_of_iteration_hook(self)
                loss = float(torch.as_tensor(self.losses["total_loss"]).detach())
                self.loss_log.append(loss)
                if pbar is not None:
                    pbar.update(1)
                    if self.iteration % 10 == 0:
                        pbar.set_postfix(loss=f"{loss:.4f}", epoch=self.epoch, refresh=False)
                self.step_lr_schedulers(end_of_epoch=False)
            self.step_lr_schedulers(end_of_epoch=True)
            self.zero_losses()
            if self.end_of_epoch_hook(self) is False:
                break


class BenchmarkTester(testers.GlobalEmbeddingSpaceTester):
    """``GlobalEmbeddingSpaceTester`` without its per-evaluation progress bar (one bar per run is enough).

    ``amp``: the trunk and embedder run under autocast, as in training; the embeddings are then cast to float32
    before normalisation. ``eval_precision="float16"`` keeps the batches' embeddings in float16 until the accuracy
    calculator reads them (half the memory of the embedding table).
    """

    def __init__(self, *args: Any, amp: str = "off", eval_precision: str = "float32", **kwargs: Any) -> None:
        if eval_precision not in ("float32", "float16"):
            raise ValueError(f"eval_precision must be float32 or float16, got {eval_precision!r}")
        self.amp = amp
        self.eval_dtype = torch.float16 if eval_precision == "float16" else None
        super().__init__(*args, **kwargs)

    def get_embeddings_for_eval(self, trunk_model, embedder_model, input_imgs):
        if self.amp == "off":
            return super().get_embeddings_for_eval(trunk_model, embedder_model, input_imgs)
        with autocast(self.data_device, self.amp):
            out = super().get_embeddings_for_eval(trunk_model, embedder_model, input_imgs)
        return out.float()

    def compute_all_embeddings(self, dataloader, trunk_model, embedder_model):
        embs, labs = [], []
        with torch.no_grad():
            for data in dataloader:
                img, label = self.data_and_label_getter(data)
                label = c_f.process_label(label, "all", self.label_mapper)
                q = self.get_embeddings_for_eval(trunk_model, embedder_model, img)
                if self.eval_dtype is not None:
                    q = self.maybe_normalize(q.float()).to(self.eval_dtype)  # normalised in float32, kept in half
                if label.dim() == 1:
                    label = label.unsqueeze(1)
                embs.append(q)
                labs.append(label.to(self.data_device))
        return torch.cat(embs), torch.cat(labs)


def build_accuracy_calculator(namr_loss: Any, device, retrieval: dict | None = None, knn: str = "exact"):
    """PML's accuracy calculator for a plain loss (``namr_loss=None``); for a ``NAMRLoss``, its re-ranked retrieval
    and plain retrieval (``NAMRReRankKNN.for_loss``: the validated settings in the geometry the loss trained),
    with the entry's ``retrieval`` settings (``--set NAME.retrieval.blend=...``) laid over them. ``knn``
    (``--knn``): the neighbour search, exact or a faiss index (:class:`benchmarks.results.knn.ScalableKNN`); for NAMR it
    finds the candidates that the structure embedding re-ranks."""
    from ..results.knn import ScalableKNN

    knn_func = ScalableKNN.from_spec(knn)
    if namr_loss is None:  # exact: PML's CustomKNN as before, its query batch bounded for large reference sets
        return RetrievalAccuracyCalculator(device=device, knn_func=knn_func)
    from pml_rll.retrieval import NAMRReRankKNN

    # retrieval in the geometry the wrapped loss trained (NAMRLoss.retrieval_settings); the entry's options
    # (candidates, weighting, blend) override the loss's; its mode says which retrieval the main numbers report
    # ("plain": plain retrieval, re-ranked under reranked_*), and both are always computed
    settings = dict(retrieval or {})
    mode = settings.pop("mode", namr_loss.retrieval.get("mode", "rerank"))
    base_knn = knn_func if knn != "exact" else None  # candidates from the approximate index, then re-ranked
    rerank = NAMRReRankKNN.for_loss(
        namr_loss, mode="rerank" if mode == "plain" else mode, base_knn=base_knn, **settings
    )
    plain = NAMRReRankKNN.for_loss(namr_loss, mode="plain", base_knn=base_knn, **settings)
    namr_loss.check_retrieval(rerank)
    main = "plain" if mode == "plain" else "rerank"
    return NAMRAccuracyCalculator(namr_loss.embedding_size, rerank, plain, main=main, device=device)


# ---------------------------------------------------------------------------------------------------- one run
@dataclass
class _Training:
    """What one run trains: the built loss spec, the models, and PML's trainer arguments (without hooks)."""

    spec: LossSpec
    trunk: torch.nn.Module
    embedder: torch.nn.Module
    trunk_note: str
    trainer_kwargs: dict[str, Any]


def _optimizers(trunk, embedder, loss, spec: LossSpec, cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Adam for the trunk, the embedder and the loss's own parameters; the cosine schedulers of ``--schedule``."""
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
    }
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss_params, lr=cfg.lr * spec.loss_lr_multiplier)
    if cfg.schedule != "cosine":
        return optimizers, None
    total_iters = cfg.epochs * cfg.iterations_per_epoch
    schedulers = {
        k.replace("_optimizer", "_scheduler_by_iteration"): torch.optim.lr_scheduler.CosineAnnealingLR(o, total_iters)
        for k, o in optimizers.items()
    }
    return optimizers, schedulers


def _build_training(
    bundle: DatasetBundle,
    entry: LossEntry,
    hparams: dict[str, object] | None,
    seed: int,
    cfg: RunConfig,
    device: torch.device,
    *,
    num_workers: int,
) -> _Training:
    """Build the loss, models, optimizers and sampler of one (loss, seed), every random draw paired by ``seed``."""
    ctx = BuildContext(num_classes=bundle.num_train_classes, embedding_size=cfg.embedding_size)
    torch.manual_seed(seed + 30_011)  # loss parameters (proxies, beta) are paired too
    spec: LossSpec = entry.build(ctx, hparams)
    trunk, embedder, trunk_note = build_models(cfg, bundle, seed, spec.namr)
    trunk, embedder, loss = trunk.to(device), embedder.to(device), spec.loss.to(device)
    miner = spec.miner
    if cfg.cross_batch_memory:  # DDP hook: --cross-batch-memory
        loss, miner = distributed.cross_batch_memory(loss, miner, cfg.embedding_size, cfg.cross_batch_memory)
        loss = loss.to(device)
    trunk, embedder = distributed.wrap_model(trunk), distributed.wrap_model(embedder)  # DDP hook
    loss, miner = distributed.wrap_loss(loss, miner)  # DDP hook
    torch.manual_seed(seed)  # the global RNG that miners use starts from the same state too
    optimizers, lr_schedulers = _optimizers(trunk, embedder, loss, spec, cfg)
    sampler = PairedMPerClassSampler(
        bundle.train_labels, cfg.m_per_class, cfg.batch_size, cfg.iterations_per_epoch * cfg.batch_size, seed
    )
    sampler, process_batch_size = distributed.shard_sampler(sampler, cfg.batch_size)  # DDP hook
    trainer_kwargs = dict(  # DDP hook: built here so that the other ranks can train without hooks
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=process_batch_size,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miner} if miner is not None else {},
        dataset=bundle.train,
        sampler=sampler,
        iterations_per_epoch=cfg.iterations_per_epoch,
        lr_schedulers=lr_schedulers,
        data_device=device,
        dataloader_num_workers=num_workers,
        freeze_trunk_batchnorm=cfg.freeze_bn,  # PML's option: the trunk's BatchNorm layers stay in eval mode
        amp=cfg.amp,
    )
    return _Training(spec, trunk, embedder, trunk_note, trainer_kwargs)


class _Evaluation:
    """The test-split evaluations of one run (rank 0): PML's logging preset and tester, the learning curve and the
    seconds spent evaluating. ``check()`` runs before every write of the per-run logs."""

    def __init__(
        self,
        bundle: DatasetBundle,
        training: _Training,
        cfg: RunConfig,
        device: torch.device,
        *,
        log_dir: str,
        num_workers: int,
        tensorboard: bool,
        save_models: bool,
        check: Callable[[], None],
    ) -> None:
        from pytorch_metric_learning.utils import logging_presets

        record_keeper, _, _ = logging_presets.get_record_keeper(
            os.path.join(log_dir, "logs"), os.path.join(log_dir, "tensorboard") if tensorboard else None
        )
        self.hooks = logging_presets.get_hook_container(
            record_keeper,
            primary_metric="mean_average_precision_at_r",
            validation_split_name="test",
            save_models=save_models,
            log_freq=max(1, cfg.iterations_per_epoch // 5),
        )
        self.check, self.cfg, self.training = check, cfg, training
        spec = training.spec
        self.tester = BenchmarkTester(
            amp=cfg.amp,
            eval_precision=cfg.eval_precision,
            normalize_embeddings=not spec.namr,
            batch_size=cfg.eval_batch_size,
            dataloader_num_workers=num_workers,
            data_device=device,
            accuracy_calculator=build_accuracy_calculator(
                spec.loss if spec.namr else None, device, retrieval=spec.retrieval, knn=cfg.knn
            ),
            end_of_testing_hook=self.end_of_testing_hook,
        )
        self.dataset_dict = {"test": bundle.test}
        self.splits_to_eval = None
        if bundle.gallery is not None:  # query-vs-gallery (CSV is_query/is_gallery): queries searched in the gallery
            self.dataset_dict["gallery"] = bundle.gallery
            self.splits_to_eval = [("test", ["gallery"])]
        self.curve: list[dict] = []
        self.seconds = 0.0
        self.inner_hook = self.hooks.end_of_epoch_hook(
            self.tester,
            self.dataset_dict,
            os.path.join(log_dir, "models"),
            test_interval=1,
            splits_to_eval=self.splits_to_eval,
        )

    def end_of_iteration_hook(self, trainer) -> Any:  # the preset's hooks, each after the check
        self.check()
        return self.hooks.end_of_iteration_hook(trainer)

    def end_of_testing_hook(self, tester) -> Any:
        self.check()
        return self.hooks.end_of_testing_hook(tester)

    def end_of_epoch_hook(self, trainer) -> bool:
        self.check()
        cfg = self.cfg
        if trainer.epoch == cfg.epochs or (cfg.eval_every > 0 and trainer.epoch % cfg.eval_every == 0):
            self.evaluate(trainer.epoch, trainer)
        return True

    def evaluate(self, epoch: int, trainer=None) -> dict:
        """Test at ``epoch`` (through PML's preset inside training, its "best" never used) and extend the curve."""
        t0 = time.perf_counter()
        if trainer is not None:
            self.inner_hook(trainer)
        else:
            self.tester.test(
                self.dataset_dict,
                epoch,
                self.training.trunk,
                self.training.embedder,
                splits_to_eval=self.splits_to_eval,
            )
        acc = summarize(self.tester.all_accuracies["test"])
        self.seconds += time.perf_counter() - t0
        self.curve.append({"epoch": epoch, "iteration": epoch * self.cfg.iterations_per_epoch, **acc})
        return acc


def _train_timed(trainer: BenchmarkTrainer, evaluation: _Evaluation, *, desc: str, pbar_position: int | None) -> float:
    """Train with one progress bar; the training seconds, evaluations inside training excluded."""
    eval_before = evaluation.seconds
    t_start = time.perf_counter()
    with progress_bar(
        total=evaluation.cfg.epochs * evaluation.cfg.iterations_per_epoch,
        desc=desc,
        position=pbar_position or 0,
        leave=False,
        dynamic_ncols=True,
        disable=pbar_position is None,
    ) as pbar:
        trainer.train(num_epochs=evaluation.cfg.epochs, pbar=pbar)
    wall = time.perf_counter() - t_start
    return wall - (evaluation.seconds - eval_before)


def run_one(
    bundle: DatasetBundle,
    entry: LossEntry,
    hparams: dict[str, object] | None,
    seed: int,
    cfg: RunConfig,
    device: torch.device,
    *,
    log_dir: str,
    num_workers: int = 0,
    tensorboard: bool = False,
    save_models: bool = False,
    pbar_position: int | None = 1,
    after_training: Callable[..., dict] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> dict:
    """Train one (loss, seed) with ``hparams`` and evaluate it on ``bundle.test``; return the result record.

    ``bundle`` may be a tuning fold (:func:`benchmarks.data.folds.fold_bundle`), whose ``test`` is the held-out fold.
    ``after_training(trunk, embedder, loss_spec) -> dict``, when given, runs on the trained models (after the
    last evaluation); its result is stored under the record's ``"after_training"`` key (extra analyses such as
    ``benchmarks/namr_diagnose/diagnose.py``). ``should_stop()``, when given, is called before every write of the
    per-run logs (each iteration's and epoch's end); it raises to stop the run (a claim taken over by another
    runner)."""
    main = distributed.current().is_main  # DDP hook: only rank 0 logs, evaluates and returns a record
    if main:
        os.makedirs(log_dir, exist_ok=True)
    if device.type == "cuda":  # same convolution algorithms for every loss (GPU runs are still not bitwise exact)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    training = _build_training(bundle, entry, hparams, seed, cfg, device, num_workers=num_workers)
    if not main:  # DDP hook: ranks other than 0 train in step with rank 0 and write nothing
        BenchmarkTrainer(**training.trainer_kwargs).train(num_epochs=cfg.epochs)  # type: ignore[no-untyped-call]
        return {}
    evaluation = _Evaluation(
        bundle,
        training,
        cfg,
        device,
        log_dir=log_dir,
        num_workers=num_workers,
        tensorboard=tensorboard,
        save_models=save_models,
        check=should_stop if should_stop is not None else (lambda: None),
    )
    untrained = evaluation.evaluate(0) if cfg.eval_every > 0 else None
    trainer = BenchmarkTrainer(
        **training.trainer_kwargs,  # DDP hook: the arguments moved up
        end_of_iteration_hook=evaluation.end_of_iteration_hook,
        end_of_epoch_hook=evaluation.end_of_epoch_hook,
    )
    train_seconds = _train_timed(trainer, evaluation, desc=f"{entry.name} seed {seed}", pbar_position=pbar_position)
    extra = after_training(training.trunk, training.embedder, training.spec) if after_training is not None else None
    return _record(
        entry,
        hparams,
        seed,
        cfg,
        loss_log=trainer.loss_log,
        evaluation=evaluation,
        untrained=untrained,
        train_seconds=train_seconds,
        trunk_note=training.trunk_note,
        log_dir=log_dir,
        extra=extra,
    )


def _record(
    entry: LossEntry,
    hparams: dict[str, object] | None,
    seed: int,
    cfg: RunConfig,
    *,
    loss_log: list[float],
    evaluation: _Evaluation,
    untrained: dict | None,
    train_seconds: float,
    trunk_note: str,
    log_dir: str,
    extra: dict | None,
) -> dict:
    """The result record of one finished run (rank 0)."""
    final = evaluation.curve[-1]
    metrics = {k: v for k, v in final.items() if k not in ("epoch", "iteration")}
    per_epoch_loss = [
        float(np.mean(loss_log[i : i + cfg.iterations_per_epoch]))
        for i in range(0, len(loss_log), cfg.iterations_per_epoch)
    ]
    return {
        "loss": entry.name,
        "family": entry.family,
        "seed": seed,
        "metrics": metrics,
        "untrained": {k: v for k, v in (untrained or {}).items()},
        "curve": evaluation.curve,
        "loss_curve": per_epoch_loss,
        "iterations": len(loss_log),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(evaluation.seconds, 3),
        "seconds_per_iteration": train_seconds / max(1, len(loss_log)),
        "hparams": entry.hparams(hparams),
        "trunk": trunk_note,
        "precision": {"off": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast + GradScaler"}[cfg.amp],
        "knn": cfg.knn,
        "log_dir": log_dir,
        **({"after_training": extra} if extra is not None else {}),
        **distributed.current().describe(),  # DDP hook: world_size, backend
    }
