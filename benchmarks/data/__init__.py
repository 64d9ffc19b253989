"""Datasets for the head-to-head benchmark.

Modules: ``bundle`` (:class:`~benchmarks.data.bundle.DatasetBundle`, the splits every loader returns), one module
per dataset family (``digits``, ``omniglot``, ``fashion_mnist``, ``pml_images``, ``own_data``), ``load`` (a
protocol by name), ``identity`` (the data part of a result key) and ``folds`` (the tuning folds).

Every loader returns a :class:`DatasetBundle`: a train split and a test split whose labels are remapped to
``0..C-1`` per split, the input kind (which decides the default trunk), and a train-time augmentation.

Protocols (the first two run with no download):

* ``digits``: scikit-learn's 8x8 digits. Its 10 classes are too few for unseen-class retrieval, so the split is
  *within* classes (70 % / 30 % of each class's samples, fixed split seed 0). A smoke benchmark, not a ranking.
* ``omniglot``: unseen-class retrieval, train and test split **by alphabet**. Reads a folder or zip archives laid
  out as ``<alphabet>/<character>/<image>.png`` (the two small background archives, or torchvision's Omniglot
  download). With torchvision's ``images_background``/``images_evaluation`` the standard background/evaluation
  alphabets are the split; otherwise the sorted alphabets alternate train/test. Alphabet/character pairs present
  in several archives are read once. Images are resized to ``image_size`` (28 by default) for CPU budgets.
* ``fashion-mnist``: the standard 60k/10k split, same 10 classes (read from IDX files, gzipped or not).
* ``cub200``, ``cars196``, ``sop``: PML's dataset classes, standard half/half class splits.
* ``folder``, ``csv``: your own images, an image folder or a CSV file (see :mod:`benchmarks.data.own_data`).

Augmentations are drawn from a seed passed in with every index (see :class:`PairedDataset`), never from the
state the losses or miners consume, so that every loss sees the same augmented images at a given seed.
"""

from __future__ import annotations
