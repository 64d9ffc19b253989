"""Autograd helpers shared by the package's closed-form backward passes."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

from .compat import is_compiling

F = TypeVar("F", bound=Callable[..., Any])


def closed_form_backward(name: str) -> Callable[[F], F]:
    """Decorates the ``backward`` of an autograd Function whose backward is a closed form, not differentiable
    itself: asked to build a graph (``create_graph=True``, e.g. for a gradient penalty or meta-learning) it
    raises a ``RuntimeError`` naming ``name``, where a plain backward would return a second derivative that
    silently treats the closed form as a constant. The backward itself runs without building a graph.
    """

    def wrap(backward: F) -> F:
        @functools.wraps(backward)
        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled() and not is_compiling():
                raise RuntimeError(
                    f"{name} has a closed-form backward pass that is not differentiable itself: a second "
                    "derivative (create_graph=True through it) is not supported"
                )
            return backward(ctx, *grads)

        return checked  # type: ignore[return-value]

    return wrap
