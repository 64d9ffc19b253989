"""Utilities shared by every part of the package: :mod:`pml_rll.utils.validation`, the argument checks;
:mod:`pml_rll.utils.autograd`, the guard of the closed-form backward passes; :mod:`pml_rll.utils.workspace`, the
CPU scratch buffers; :mod:`pml_rll.utils.compat`, the torch functions spelled differently across the supported
torch releases."""

from __future__ import annotations

from . import validation
