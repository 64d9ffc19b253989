"""Your own backbone: ``--trunk timm:<name>``, ``--trunk <torchvision model name>`` and ``--trunk-weights FILE``.

* ``timm:<name>``: ``timm.create_model(name, pretrained=False, num_classes=0, in_chans=C)`` (the ``timm`` extra);
  never downloads: ImageNet or your own weights come from ``--trunk-weights``.
* a torchvision classification model name (``resnet34``, ``efficientnet_b0``, ``convnext_tiny``, ...): built
  without weights, or with torchvision's default ImageNet weights when they are cached or downloadable (as the
  built-in ``resnet18``/``resnet50`` trunks), unless ``--no-pretrained`` or ``--trunk-weights`` is given. Its last
  ``Linear`` layer (the classifier) is replaced by the identity.

The embedder's input width is read from the trunk: a forward pass of one zero batch of the dataset's input shape
(in eval mode, without gradients), which also checks that the trunk accepts the dataset's inputs.

``--trunk-weights FILE``: a local checkpoint (``torch.save`` of a ``state_dict``, or of a dict holding one under
``state_dict``/``model``/``trunk``; a ``module.`` prefix from DataParallel/DDP is dropped), loaded with
``weights_only=True``. Every trunk parameter and buffer must be in it with its shape; keys of the removed
classifier may be there too (a full classification checkpoint); anything else is an error naming the keys.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

TIMM_PREFIX = "timm:"
BUILTIN_TRUNKS = ("mlp", "convnet", "convnet-small", "resnet18", "resnet50")


class TrunkError(ValueError):
    """A trunk that cannot be built, does not fit the data, or does not match ``--trunk-weights``."""


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_trunk_name(name: str) -> str | None:
    """None when ``--trunk name`` can be built here, else why not (one line)."""
    if name in BUILTIN_TRUNKS:
        return None
    if name.startswith(TIMM_PREFIX):
        model = name[len(TIMM_PREFIX) :]
        try:
            import timm
        except ImportError:
            return f"--trunk {name}: timm is not installed (pip install timm, or the timm extra)"
        if not model or not timm.is_model(model):
            return f"--trunk {name}: timm has no model {model!r} (timm.list_models() lists them)"
        return None
    if name in torchvision_names():
        return None
    return (
        f"--trunk {name}: not a built-in trunk ({', '.join(BUILTIN_TRUNKS)}), a torchvision model name, or timm:<model>"
    )


def file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _last_linear(model: torch.nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return names[-1] if names else None


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_width(model: torch.nn.Module, input_shape: tuple[int, ...], name: str) -> int:
    """The trunk's output width for one input of ``input_shape`` (a zero batch of 2, eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - any failure means the trunk does not take these inputs
        raise TrunkError(
            f"--trunk {name} cannot take the dataset's inputs of shape {tuple(input_shape)}: {type(e).__name__}: {e}"
        ) from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise TrunkError(f"--trunk {name}: expected a batch x features output, got {shape}")
    return int(out.shape[1])


def build_named_trunk(
    name: str, input_shape: tuple[int, ...], pretrained: bool = True
) -> tuple[torch.nn.Module, int, str, list[str]]:
    """(trunk, output width, note, prefixes of the removed classifier's keys) for timm and torchvision names."""
    if len(input_shape) != 3:
        raise TrunkError(f"--trunk {name} needs image inputs (C x H x W); this dataset gives {tuple(input_shape)}")
    model: torch.nn.Module | None
    if name.startswith(TIMM_PREFIX):
        import timm

        model_name = name[len(TIMM_PREFIX) :]
        model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=input_shape[0])
        cfg: Any = getattr(model, "pretrained_cfg", None) or {}
        head = cfg.get("classifier", "")
        heads = [head] if isinstance(head, str) else list(head)
        note = f"timm {model_name} (random init)"
    else:
        import torchvision

        model = None
        note = f"torchvision {name} (random init)"
        if pretrained:
            try:
                weights = torchvision.models.get_model_weights(name).DEFAULT
                model = torchvision.models.get_model(name, weights=weights)
                note = f"torchvision {name} ({weights})"
            except Exception as e:  # noqa: BLE001 - offline, no cache: fall back, and say so
                import warnings

                warnings.warn(f"could not load ImageNet weights for {name} ({type(e).__name__}: {e}); random init")
        if model is None:
            model = torchvision.models.get_model(name, weights=None)
        last = _last_linear(model)
        if last is None:
            raise TrunkError(f"--trunk {name}: no Linear classifier to remove (not a classification model?)")
        _set_module(model, last, torch.nn.Identity())
        heads = [last]
    assert model is not None
    width = output_width(model, input_shape, name)
    return model, width, note, [h for h in heads if h]


def _state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "trunk"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise TrunkError(f"--trunk-weights {path}: not a state_dict (a dict of tensors)")
    out = {}
    for k, v in obj.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def load_trunk_weights(model: torch.nn.Module, path: str, head_prefixes: list[str] = ()) -> int:  # type: ignore[assignment]
    """Load a local checkpoint into ``model`` (see the module docstring); returns the number of tensors loaded."""
    if not os.path.isfile(path):
        raise TrunkError(f"--trunk-weights {path}: not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, not a torch file, or not weights-only
        raise TrunkError(f"--trunk-weights {path}: cannot be read as torch weights ({type(e).__name__}: {e})") from None
    sd = _state_dict(obj, path)
    own = model.state_dict()
    head = tuple(p + "." for p in head_prefixes)
    unexpected = [k for k in sd if k not in own and not k.startswith(head)]
    missing = [k for k in own if k not in sd]
    wrong = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise TrunkError(f"--trunk-weights {path} does not match the trunk: keys {', '.join(problems)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return len(own)
