"""Loss speed and memory benchmark: forward+backward time and peak memory per loss and batch size.

Run from the repository root::

    python -m benchmarks.loss_speed                      # full default sweep, CPU or CUDA (auto)
    python -m benchmarks.loss_speed --batch-sizes 256 512 --losses rll pml-rll floor --no-memory
    python -m benchmarks.loss_speed --inputs hard --losses rll rll-autograd pml-rll floor --no-memory
    python -m benchmarks.loss_speed --ref-size 65536 --batch-sizes 256 --dim 128 --threads 1 \
        --losses rll rll-autograd contrastive multi-similarity floor   # cross-batch memory mode

What is measured
----------------
* Input: ``randn(B, D, requires_grad=True)`` and labels ``arange(B) // 4`` (B/4 classes, 4 samples each).
  Losses that take a packed ``[x | s]`` input (the NAMR entries) get ``x = randn(B, D)`` and a positive
  ``s`` of the same width, so their input is ``(B, 2D)``.
* Time: one *step* is ``loss = fn(emb, labels); loss.backward()`` (gradients are cleared outside the timed
  region). Per batch size, every loss first runs ``--warmup`` steps, then ``--repeats`` rounds; in each round
  every loss runs one step, the losses being visited round-robin with the starting loss rotated each round, so
  that slow drifts of the machine affect all losses alike. The reported figure is the median. Timing uses
  ``time.perf_counter`` with ``torch.cuda.synchronize`` before and after the step on CUDA.
* Peak memory on CPU: each (loss, batch size) runs in a fresh subprocess. After the imports, the input
  allocation, the loss construction and one small warm-up step (B=8, so that lazy library initialisation is not
  counted), the process's peak resident set size is reset (``/proc/self/clear_refs``) and the current RSS taken
  as the baseline; one step is run; the figure is ``VmHWM - baseline``. Where the peak cannot be reset, the
  figure is ``ru_maxrss - baseline`` (an upper bound, flagged in the JSON).
* Peak memory on CUDA: in-process, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats``,
  minus the memory allocated just before the step.
* The "floor" entry is the cheapest conceivable pairwise loss: ``F.normalize`` then ``(e @ e.T).sum()``.
* Cross-batch memory mode (``--ref-size M``): every loss that takes ``ref_emb`` compares the B queries with the
  same fixed reference set of M items (M/4 classes, drawn like the inputs, no gradient, as in a memory bank);
  the floor is then ``(F.normalize(emb) @ F.normalize(ref).T).sum()``. The reference set is allocated before the
  memory baseline.

Layout: ``cases`` (the losses, the inputs, the target ratios), ``measure`` (timing and memory), ``render`` (ratios,
tables, figure, files) and ``cli`` (the sweep and the arguments).

Outputs (written atomically into ``--out``): ``loss_speed.json`` (everything, including raw samples; rewritten
after each batch size, so ``--resume`` can continue an interrupted run), ``loss_speed.md`` (tables and the
ratios asked for by the speed targets) and ``loss_speed.png`` (log-log time and memory against batch size).
"""

from __future__ import annotations

from .cases import CASES, RatioSpec, SpeedCase, Unavailable, Workload, ratio_specs
from .cli import main
from .render import JSON_NAME, MD_NAME, PNG_NAME, compute_ratios

__all__ = [
    "JSON_NAME",
    "MD_NAME",
    "PNG_NAME",
    "CASES",
    "SpeedCase",
    "RatioSpec",
    "Unavailable",
    "Workload",
    "compute_ratios",
    "main",
    "ratio_specs",
]
