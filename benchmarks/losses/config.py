"""``--set NAME.PARAM=VALUE`` and ``--config FILE``: change or add registry entries without editing code.

A config file is TOML. Each ``[losses.<name>]`` table either changes a registered entry (``kwargs`` = new defaults,
``search`` = new search spaces) or adds one (``class`` given)::

    [losses.my-loss]
    class = "my_losses:MyLoss"                      # module:Class, a torch.nn.Module (the file's folder is
                                                    # searched last for modules)
    kwargs = { pos_margin = 0.0, neg_margin = 0.8, embedding_size = "{embedding_size}" }
    miner = "pytorch_metric_learning.miners:MultiSimilarityMiner"   # optional
    miner_kwargs = { epsilon = 0.1 }                # optional
    search = { neg_margin = [0.5, 1.5], "miner.epsilon" = { low = 0.01, high = 0.5, log = true } }
    loss_lr_multiplier = 1.0                        # optional: learning rate of the loss's own parameters
    family = "user"                                 # optional: "user" (default), "ours" or "pml"
    source = "where the defaults come from"         # optional

A search space is ``[low, high]`` (linear), ``{ low, high, log = true, int = true }`` or ``{ choices = [...] }``.
Placeholders: ``"{embedding_size}"``, ``"{num_classes}"`` and ``"{<other hyper-parameter>}"``.

An entry's name is used in folder names and in ``--set NAME.PARAM``: 1 to 64 letters, digits, ``_``, ``+`` or ``-``,
starting with a letter or digit.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch

from ..core.common import did_you_mean
from ..core.provenance import import_current
from .registry import FAMILIES, LR_MULTIPLIER, REGISTRY, LossEntry, Param, Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")
ENTRY_KEYS = {"class", "kwargs", "miner", "miner_kwargs", "search", LR_MULTIPLIER, "family", "source", "notes"}


def parse_value(text: str) -> object:
    """A ``--set`` value: TOML (numbers, booleans, quoted strings, arrays); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str], entries: dict[str, LossEntry]) -> dict[str, dict[str, object]]:
    """``["rll.Tn=20", ...]`` -> ``{"rll": {"Tn": 20}}``; ValueError naming the bad item."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        target, eq, value = item.partition("=")
        name, dot, param = target.strip().partition(".")
        if not eq or not dot or not name or not param:
            raise ValueError(f"--set {item!r}: expected NAME.PARAM=VALUE, e.g. rll.Tn=20")
        if name not in entries:
            hint = did_you_mean(name, list(entries))
            raise ValueError(f"--set {item!r}: unknown loss {name!r}{hint}; registered: {', '.join(entries)}")
        if param not in entries[name].params:
            known = ", ".join(entries[name].params)
            hint = did_you_mean(param, list(entries[name].params))
            raise ValueError(f"--set {item!r}: {name} has no hyper-parameter {param!r}{hint}; known: {known}")
        out.setdefault(name, {})[param] = parse_value(value.strip())
    return out


def parse_space(name: str, spec: object) -> Param:
    """A search space from its TOML form (see the module docstring)."""
    if isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
        return Param(None, float(spec[0]), float(spec[1]))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "int", "choices"}
        if unknown:
            raise ValueError(f"search space of {name!r}: unknown keys {sorted(unknown)}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list):
                raise ValueError(f"search space of {name!r}: choices must be a list")
            return Param(None, choices=tuple(spec["choices"]))
        return Param(None, spec.get("low"), spec.get("high"), log=bool(spec.get("log")), integer=bool(spec.get("int")))
    raise ValueError(f"search space of {name!r}: expected [low, high], {{low, high, log}} or {{choices}}, got {spec!r}")


def _entry_from_table(name: str, t: dict[str, Any], existing: LossEntry | None, where: str) -> LossEntry:
    unknown = set(t) - ENTRY_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(ENTRY_KEYS)}")
    for k in ("kwargs", "miner_kwargs", "search"):
        if not isinstance(t.get(k, {}), dict):
            raise ValueError(f"{where}: {k} must be a table")
    defaults = dict(t.get("kwargs", {}))
    defaults.update({f"miner.{k}": v for k, v in t.get("miner_kwargs", {}).items()})
    if LR_MULTIPLIER in t:
        defaults[LR_MULTIPLIER] = t[LR_MULTIPLIER]
    try:
        search = {k: parse_space(k, v) for k, v in t.get("search", {}).items()}
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if "class" not in t:
        if existing is None:
            raise ValueError(f"{where}: a new entry needs class = 'module:Class'")
        if "miner" in t or "family" in t:
            raise ValueError(f"{where}: to change the class, miner or family of {name!r}, give class as well")
        return existing.with_changes(defaults, search)
    family = t.get("family", "user")
    if family not in FAMILIES:
        raise ValueError(f"{where}: family must be one of {FAMILIES}, got {family!r}")
    unknown_space = set(search) - set(defaults)
    if unknown_space:
        raise ValueError(f"{where}: search space for {sorted(unknown_space)}, which have no value in kwargs")
    if t.get("miner_kwargs") and "miner" not in t:
        raise ValueError(f"{where}: miner_kwargs without miner")
    for what in ("class", "miner"):
        if what not in t:
            continue
        if not isinstance(t[what], str):
            raise ValueError(f"{where}: {what} must be a string 'module:Class', got {t[what]!r}")
        try:
            obj = import_current(t[what])  # reloaded when its file changed since this process imported it
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
            kind = "loss" if what == "class" else "miner"
            raise ValueError(f"{where}: {what} {t[what]!r} is not a {kind} (a torch.nn.Module class)")
    params = {k: Param(v) for k, v in defaults.items()}
    for k, p in search.items():
        params[k] = Param(defaults[k], p.low, p.high, p.log, p.integer, p.choices)
    return LossEntry(
        name,
        family,
        t["class"],
        params,
        t.get("source", where.split(": [")[0]),
        miner_class=t.get("miner"),
        notes=t.get("notes", ""),
    )


def load_config(path: str, base: dict[str, LossEntry] | None = None) -> dict[str, LossEntry]:
    """Read a TOML config; return the registry with its entries changed and added. The file's folder is put last
    on ``sys.path`` so that a module beside it can be named in ``class`` (without shadowing any other module)."""
    entries = dict(REGISTRY if base is None else base)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML: {e}") from e
    unknown = set(data) - {"losses"}
    if unknown:
        raise ValueError(f"--config {path}: unknown top-level tables {sorted(unknown)}; expected [losses.<name>]")
    losses = data.get("losses", {})
    if not isinstance(losses, dict):
        raise ValueError(f"--config {path}: losses must be a table of [losses.<name>] tables, got {losses!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.append(folder)  # last: a module beside the config never shadows an installed one
    for name, t in losses.items():
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"--config {path}: [losses.{name!r}]: a name is 1 to 64 letters, digits, '_', '+' or '-', "
                "starting with a letter or digit"
            )
        if not isinstance(t, dict):
            raise ValueError(f"--config {path}: losses.{name} must be a table")
        where = f"--config {path}: [losses.{name}]"
        try:
            entries[name] = _entry_from_table(name, t, entries.get(name), where)
        except ValueError as e:  # every message names the file and the entry
            raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    return entries


def build_registry(config: str | None, sets: list[str]) -> Registry:
    """The registry of one command: the built-in entries, ``--config`` applied, then ``--set``."""
    entries = load_config(config) if config else dict(REGISTRY)
    reg = Registry(entries, parse_sets(sets, entries))
    for name, ov in reg.overrides.items():  # unknown names were rejected above; values are checked by a dry build
        reg.entries[name].hparams(ov)
    return reg
