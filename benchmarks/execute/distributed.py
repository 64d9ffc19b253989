"""Data-parallel training for the benchmark runner: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun --nproc_per_node N -m benchmarks.run ...`` starts N processes with the ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` environment variables set; :func:`setup` reads them, joins the
process group (nccl on GPUs, one GPU per process chosen by ``LOCAL_RANK``; gloo on CPUs) and returns the
:class:`DistributedContext` that the runner and :func:`benchmarks.execute.pipeline.run_one` consult. Without those
variables (a plain ``python -m benchmarks.run``) the context is the single process and nothing here changes a run.

What one run does with W processes (choices of this runner, each documented in the README):

* Data: the paired-seed sampler is built identically in every process and yields the same global sequence of
  (index, augmentation seed); :class:`GlobalBatchShard` gives rank r the r-th of W equal slices of each global batch,
  so the global batch sequence (and every augmentation) is the single-process one, whatever W is.
* Models: trunk and embedder each in ``DistributedDataParallel`` (gradients averaged over the ranks), built from
  the same seeded weights in every process. On GPUs, BatchNorm layers become ``SyncBatchNorm`` (statistics of the
  global batch, as in one process); on CPUs torch has no ``SyncBatchNorm``, so BatchNorm statistics are per shard.
* Loss: :class:`DistributedLoss`, PML's ``DistributedLossWrapper`` (see :func:`loss_mode` for which mode each loss
  gets). Miners of gathered losses are wrapped in PML's ``DistributedMinerWrapper``. With ``--cross-batch-memory``
  the loss is a :class:`pml_rll.losses.DistributedCrossBatchMemory` (every rank holds the same memory).
* Rank 0 evaluates and writes results, logs and reports; the other ranks write nothing and print nothing.
* Only rank 0 talks to the results store and to Optuna (claims, resume, tuning trials): every task it starts
  (a run, or one fold of a ``--tune`` trial) is sent to the other ranks (:func:`broadcast_task`), which train it
  in step with rank 0 (:func:`follow`) until rank 0 sends the end of the work.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

from ..core.common import resolve_device

#: environment variables set by torchrun (and by ``torch.distributed.run``) in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedContext:
    """Where this process stands in a data-parallel job (a single process when ``world_size == 1``).

    Args:
        device: the device this process trains on (``cuda:LOCAL_RANK`` on GPU nodes).
        rank: global rank, 0 .. world_size - 1 (rank 0 evaluates and writes).
        world_size: number of processes over all nodes.
        local_rank: rank within the node (picks the GPU).
        backend: ``"nccl"``, ``"gloo"``, or ``None`` when no process group was initialised.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    _stdout: object = field(default=None, repr=False)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that evaluates, prints and writes (rank 0, or the single process)."""
        return self.rank == 0

    def describe(self) -> dict[str, object]:
        """What goes into every result record."""
        return {"world_size": self.world_size, "backend": self.backend}

    def barrier(self) -> None:
        if self.is_distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the list of runs still to do: only rank 0 reads the results)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. a dataset download), then the other ranks."""
        if self.is_distributed and not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_distributed and self.is_main:
                self.barrier()

    def cleanup(self, barrier: bool = True) -> None:
        """Leave the process group (after a barrier where all ranks meet, unless ``barrier=False``: after an
        error, when the other ranks may be elsewhere) and restore stdout."""
        if self.is_distributed and dist.is_initialized():
            if barrier:
                self.barrier()
            dist.destroy_process_group()
        if self._stdout is not None:
            sys.stdout.flush()
            sys.stdout = self._stdout
            self._stdout = None


_CURRENT = DistributedContext(device=torch.device("cpu"))


def current() -> DistributedContext:
    """The context set by the last :func:`setup` in this process (a single CPU process before any)."""
    return _CURRENT


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(k in env for k in TORCHRUN_VARIABLES)


def _process_device(arg: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """``--device`` for one process: ``auto`` and ``cuda`` (no index) mean the GPU numbered LOCAL_RANK."""
    if arg.startswith("cuda:") and local_world_size > 1:
        raise ValueError(
            f"--device {arg} would put all {local_world_size} processes of this node on one GPU; "
            "pass --device cuda (or auto): each process then takes the GPU numbered by its LOCAL_RANK"
        )
    if arg in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible: start at most that "
                "many processes per node (--nproc_per_node), or pass --device cpu"
            )
        return torch.device("cuda", local_rank)
    return resolve_device(arg)


def launch_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes torchrun started (1 without torchrun), read before any process group exists."""
    env = os.environ if environ is None else environ
    return int(env["WORLD_SIZE"]) if launched_by_torchrun(env) else 1


def process_device(device_arg: str = "auto", environ: Mapping[str, str] | None = None) -> torch.device:
    """The device this process will train on (``--device`` resolved; under torchrun the GPU of ``LOCAL_RANK``).

    Raises ``ValueError`` naming ``--device`` for a bad value, before any process group exists.
    """
    env = os.environ if environ is None else environ
    if launch_world_size(env) == 1:
        return resolve_device(device_arg)
    return _process_device(device_arg, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", "1")))


def setup(
    device_arg: str = "auto", environ: Mapping[str, str] | None = None, timeout_minutes: float = 30.0
) -> DistributedContext:
    """Join the process group described by torchrun's variables, or return the single-process context.

    Backend: nccl when this process's device is a GPU, gloo otherwise. Processes other than rank 0 get their
    standard output sent to ``os.devnull`` (errors still reach standard error) until :meth:`cleanup`.
    """
    global _CURRENT
    env = os.environ if environ is None else environ
    device = process_device(device_arg, env)
    if launch_world_size(env) == 1:
        _CURRENT = DistributedContext(device=device)
        return _CURRENT
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs
        )
    ctx = DistributedContext(device=device, rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    if not ctx.is_main:
        ctx._stdout = sys.stdout
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (restored by cleanup)
    _CURRENT = ctx
    return ctx


# ---------------------------------------------------------------------------------------------------- data
class GlobalBatchShard(torch.utils.data.Sampler[Any]):
    """Rank r's share of each global batch of a sampler: items ``[r * b, (r + 1) * b)`` of every block of
    ``global_batch_size`` items, with ``b = global_batch_size / world_size``.

    Args:
        sampler: the single-process sampler (identical, same seed, in every process).
        global_batch_size: the batch size of one process training alone; a multiple of ``world_size``.
        rank: this process's rank.
        world_size: number of processes.

    Concatenating the shards of all ranks, in rank order, gives back each global batch in its order; an
    incomplete last block is dropped, as the single-process loader (``drop_last=True``) drops it.
    """

    def __init__(self, sampler: Any, global_batch_size: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by the number of processes {world_size}")
        self.sampler = sampler
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return (len(self.sampler) // self.global_batch_size) * self.local_batch_size

    def __iter__(self) -> Iterator[Any]:
        items = list(iter(self.sampler))
        g, b = self.global_batch_size, self.local_batch_size
        out: list[Any] = []
        for start in range(0, len(items) - g + 1, g):
            out.extend(items[start + self.rank * b : start + (self.rank + 1) * b])
        return iter(out)


def shard_sampler(sampler: Any, global_batch_size: int, ctx: DistributedContext | None = None) -> tuple[Any, int]:
    """(sampler, per-process batch size): the sampler itself with one process, else its :class:`GlobalBatchShard`."""
    ctx = ctx or current()
    if not ctx.is_distributed:
        return sampler, global_batch_size
    shard = GlobalBatchShard(sampler, global_batch_size, ctx.rank, ctx.world_size)
    return shard, shard.local_batch_size


# ---------------------------------------------------------------------------------------------------- models
def wrap_model(module: torch.nn.Module, ctx: DistributedContext | None = None) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` with several processes (``SyncBatchNorm`` first on GPUs), else ``module``.

    No buffer synchronisation in forward (``forward_sync_buffers=False``, ``broadcast_buffers=False`` in older
    torch): the forward pass then issues no collective, so rank 0 can evaluate alone while the
    other ranks wait at their next training step (BatchNorm buffers are kept equal by ``SyncBatchNorm`` on GPUs).
    """
    ctx = ctx or current()
    if not ctx.is_distributed:
        return module
    if ctx.device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call]
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # no collective in forward; buffers still copied from rank 0 at construction
    name = "forward_sync_buffers" if "forward_sync_buffers" in _parameters(ddp) else "broadcast_buffers"
    no_forward_sync: dict[str, Any] = {name: False}
    return ddp(module, device_ids=device_ids, **no_forward_sync)


def _parameters(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls).parameters)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


# ---------------------------------------------------------------------------------------------------- losses
def loss_mode(loss: torch.nn.Module) -> str:
    """How a loss is spread over the processes.

    * ``"efficient"``: this package's ``RankedListLoss`` (without trainable parameters): each rank ranks its own
      queries against the gathered global batch (PML's ``efficient=True``). With the paper's gradient (gallery
      held constant) this is the single-process gradient exactly, at 1/W of the loss computation per rank; with
      ``gradient="autograd"`` the gallery-side terms that other ranks' queries put on this rank's samples are not
      propagated (PML's efficient-mode approximation).
    * ``"gather"``: every other loss, NAMR included (its mean-distance scale and structure term need the whole
      batch, and PML's losses and miners are exact only this way): each rank computes the loss of the gathered
      global batch (PML's ``efficient=False``), which gives the single-process gradient.
    * ``"local"``: a :class:`pml_rll.losses.DistributedCrossBatchMemory`, which gathers by itself.
    """
    from pml_rll.losses.distributed_cross_batch_memory import DistributedCrossBatchMemory
    from pml_rll.losses.ranked_list_loss import RankedListLoss

    if isinstance(loss, DistributedCrossBatchMemory):
        return "local"
    trainable = any(p.requires_grad for p in loss.parameters())
    if isinstance(loss, RankedListLoss) and not trainable:
        return "efficient"
    return "gather"


class DistributedLoss(DistributedLossWrapper):  # type: ignore[misc]
    """PML's ``DistributedLossWrapper`` with the scaling set so that DDP's gradient averaging gives the gradient
    of one process on the global batch, and a returned value equal to the global-batch loss on every rank.

    Args:
        loss: the loss; any module with PML's call signature (PML's wrapper admits only ``BaseMetricLossFunction``
            and ``CrossBatchMemory``; ``NAMRLoss`` has the same signature and is admitted here).
        mode: ``"gather"``, ``"efficient"`` or ``"local"`` (see :func:`loss_mode`).
        world_size: number of processes.

    * ``"gather"``: PML's ``efficient=False``: the loss of the gathered batch, times W (each rank's gradient
      reaches only its own embeddings; DDP divides their sum by W). The loss's own parameters (proxies, a margin's
      beta), which DDP does not see, get W times their gradient in every rank; a gradient hook divides it by W.
    * ``"efficient"``: PML's ``efficient=True`` returns W times this rank's mean over its queries; after DDP's
      averaging that is W times the global-batch gradient, so it is divided by W here (the learning rate then
      means what it means in one process, and so does Adam's weight decay). Only for losses without parameters.
    * ``"local"``: the loss as it is (it gathers by itself); for a loss averaging over queries, DDP's average of
      the per-rank gradients is the global-batch gradient. Only for losses without trainable parameters.

    The returned value is the global-batch loss: the gathered loss itself, or the mean over the ranks of the
    per-rank values (one scalar all-reduce); only its gradient carries the scaling above.
    """

    MODES = ("gather", "efficient", "local")

    def __init__(self, loss: torch.nn.Module, mode: str, world_size: int) -> None:
        torch.nn.Module.__init__(self)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        trainable = [p for p in loss.parameters() if p.requires_grad]
        if trainable and mode != "gather" and world_size > 1:
            raise ValueError(f"a loss with trainable parameters needs mode='gather' under DDP, got {mode!r}")
        self.loss = loss
        self.mode = mode
        self.efficient = mode == "efficient"
        self.world_size = world_size
        if mode == "gather" and world_size > 1:
            for p in trainable:
                p.register_hook(lambda g: g / world_size)  # type: ignore[no-untyped-call]

    def forward(  # type: ignore[no-untyped-def]
        self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None
    ) -> torch.Tensor:
        if self.world_size == 1:
            return self.loss(embeddings, labels, indices_tuple)  # type: ignore[no-any-return]
        if self.mode == "local":
            out = self.loss(embeddings, labels, indices_tuple)
            return _with_value(out, _rank_mean(out.detach()))
        out = self.forward_regular_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, self.world_size)
        if self.mode == "efficient":
            out = out / self.world_size
            return _with_value(out, _rank_mean(out.detach()))
        return _with_value(out, out.detach() / self.world_size)


def _rank_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _with_value(out: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as the forward value, with the gradient of ``out``."""
    return out + (value - out).detach()


def wrap_loss(
    loss: torch.nn.Module, miner: torch.nn.Module | None, ctx: DistributedContext | None = None
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(loss, miner) for this process: unchanged with one process; else :class:`DistributedLoss` and, for a
    gathered loss, PML's ``DistributedMinerWrapper(efficient=False)`` (mining on the gathered batch, indices in
    the order the wrapper's loss sees)."""
    ctx = ctx or current()
    if not ctx.is_distributed:
        return loss, miner
    mode = loss_mode(loss)
    if miner is not None and mode == "efficient":
        mode = "gather"  # a trainer-level miner indexes the gathered batch
    wrapped = DistributedLoss(loss, mode, ctx.world_size)
    if miner is not None:
        miner = DistributedMinerWrapper(miner, efficient=False)
    return wrapped, miner


def cross_batch_memory(
    loss: torch.nn.Module, miner: torch.nn.Module | None, embedding_size: int, memory_size: int
) -> tuple[torch.nn.Module, None]:
    """(distributed cross-batch memory around ``loss`` with ``miner`` inside it, None): ``--cross-batch-memory``."""
    from pml_rll.losses.distributed_cross_batch_memory import DistributedCrossBatchMemory

    return DistributedCrossBatchMemory(loss, embedding_size, memory_size=memory_size, miner=miner), None


def cross_batch_support(
    entry: Any, hparams: dict[str, Any] | None, num_classes: int, embedding_size: int, world_size: int
) -> tuple[bool, str]:
    """(ok, why not) for wrapping a registry entry's loss, built with ``hparams``, in ``--cross-batch-memory``
    when trained by ``world_size`` processes."""
    from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory

    from pml_rll.losses.ranked_list_loss import RankedListLoss

    from ..losses.registry import BuildContext

    spec = entry.build(BuildContext(num_classes=num_classes, embedding_size=embedding_size), hparams)
    loss = spec.loss
    if spec.namr:
        return False, "NAMRLoss packs two embeddings; the cross-batch memory holds one"
    if not isinstance(loss, RankedListLoss) and type(loss).__name__ not in PMLCrossBatchMemory.supported_losses():
        return False, f"{type(loss).__name__} is not supported by CrossBatchMemory"
    if world_size > 1 and any(p.requires_grad for p in loss.parameters()):
        return False, "a loss with trainable parameters in a cross-batch memory is not supported under DDP"
    return True, ""


# ---------------------------------------------------------------------------------------------------- the runner
#: the task fields the other ranks need to train in step with rank 0 (see ``benchmarks.execute.executor.execute``)
TASK_FIELDS = ("entry", "hparams", "seed", "fold", "folds", "log_dir")


def follow(job: dict[str, Any], ctx: DistributedContext | None = None) -> int:
    """The loop of a rank other than 0: receive each task rank 0 starts (:func:`broadcast_task`) and train it in
    step with rank 0, until rank 0 sends ``None``. Only rank 0 talks to the results store and to Optuna, so every
    claim, resume and tuning decision is its own. Returns the number of tasks trained."""
    from .executor import execute

    ctx = ctx or current()
    n = 0
    while True:
        task = ctx.broadcast_object(None)
        if task is None:
            return n
        try:
            execute(job, dict(task, pbar_position=None))
        except (ValueError, RuntimeError, FloatingPointError):
            pass  # rank 0 meets the same failure (a trial whose hyper-parameters fail) and goes on to its next task
        n += 1


def broadcast_task(task: dict[str, Any] | None, ctx: DistributedContext | None = None) -> None:
    """Rank 0: send the task it is about to train (``None``: no more tasks) to the ranks in :func:`follow`."""
    ctx = ctx or current()
    if ctx.is_distributed:
        ctx.broadcast_object(None if task is None else {k: task.get(k) for k in TASK_FIELDS})
