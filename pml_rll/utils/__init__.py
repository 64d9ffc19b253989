"""Utilities shared by every part of the package: :mod:`pml_rll.utils.validation`, the argument checks."""

from __future__ import annotations

from . import validation
