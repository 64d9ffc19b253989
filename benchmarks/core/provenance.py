"""Which code made a result: digests of the source that decides it, part of every result key.

A stored result is reused only when everything that decides it is unchanged, the code included:

* :func:`tree_digest` of the ``pml_rll`` and ``benchmarks`` packages (every ``.py`` file, by relative path and
  content), so that any edit of the library or of the runner is a new key, unless ``code_equivalence.txt`` beside
  the runner's modules declares the new digest equivalent to an older one (a change that alters no result, such as
  moving a module: :func:`read_equivalences`); the key then holds the oldest equivalent digest;
* :func:`class_digest` of the source file of every class a run builds by import path (loss, miner, and a NAMR
  entry's wrapped loss and miner), so that an edit of a user's module named by ``--config`` is a new key too.

The digests are SHA-256 of file contents: the same in every process and every run of unchanged code, whatever the
folder, the modification times or the Python version. :func:`git_state` (commit and dirty flag of a checkout) is
recorded beside them for the reader, but is not part of the key (a dirty tree says nothing about which edit).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from typing import Any

#: the packages whose whole source is part of every key (name -> folder, resolved at call time)
PACKAGES = ("pml_rll", "benchmarks")
DIGEST_CHARS = 16  # shown and stored: 64 bits of SHA-256

_NEVER_RELOADED = ("pml_rll", "pytorch_metric_learning", "torch", "torchvision", "numpy")
_IMPORTED: dict[str, str] = {}  # module name -> digest of its file when it was (re)imported by import_current


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def file_digest(path: str) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes."""
    with open(path, "rb") as f:
        return _sha256(f.read())


def tree_digest(folder: str) -> str:
    """One digest of every ``.py`` file under ``folder`` (relative path and content; caches skipped)."""
    h = hashlib.sha256()
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/")):
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        with open(path, "rb") as f:
            data = f.read()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:DIGEST_CHARS]


def package_folder(name: str) -> str:
    """The folder of an imported package (``benchmarks`` is this module's own package, whatever its name)."""
    if name == "benchmarks":
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(name)
    return os.path.dirname(os.path.abspath(module.__file__ or ""))


# ---------------------------------------------------------------------------------------------- declared equivalences
#: beside the runner's modules, the declared equivalences of code digests (not a ``.py`` file: in no digest)
EQUIVALENCE_FILE = "code_equivalence.txt"
_HEX = frozenset("0123456789abcdef")


def equivalence_path() -> str:
    """The declared equivalences of the running code: ``code_equivalence.txt`` in the runner's package folder."""
    return os.path.join(package_folder("benchmarks"), EQUIVALENCE_FILE)


def _digest_field(value: str, where: str) -> str:
    if len(value) != DIGEST_CHARS or not set(value) <= _HEX:
        raise ValueError(f"{where}: {value!r} is not a code digest ({DIGEST_CHARS} lowercase hexadecimal digits)")
    return value


def _is_class_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    parts = module.split(".") + [attr]
    return bool(sep) and all(part.isidentifier() for part in parts)


def read_equivalences(path: str) -> dict[str, dict[str, str]]:
    """``{package: {new digest: old digest}}`` from an equivalence file (none: an empty table).

    One declaration a line, ``<package> <new digest> <old digest>  # commit, why, how verified``: the source of
    ``package`` whose :func:`tree_digest` is the new digest makes the same results as the source whose digest is the
    old one. ``<package>`` may also be the import path of a class a run builds (``pml_rll.losses:NAMRLoss``), whose
    :func:`class_digest` is then resolved the same way. The comment is required (a declaration says which change
    it covers and how that was checked); blank lines and lines starting with ``#`` are skipped. Raises
    ``ValueError`` naming the file and line for a malformed line, an unknown package, a digest that is not one, a
    digest declared equivalent to itself, or a new digest declared twice."""
    if not os.path.isfile(path):
        return {}
    table: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{number}"
            fields, hash_sign, comment = text.partition("#")
            parts = fields.split()
            if len(parts) != 3:
                raise ValueError(f"{where}: expected '<package> <new digest> <old digest>  # why', got {text!r}")
            if not hash_sign or not comment.strip():
                raise ValueError(f"{where}: the declaration needs a comment: '# commit, why, how verified'")
            package, new, old = parts
            if package not in PACKAGES and not _is_class_path(package):
                raise ValueError(
                    f"{where}: unknown package {package!r}; the digests of the key are of {PACKAGES} and of the "
                    "classes a run builds, named by import path ('package.module:Class')"
                )
            new, old = _digest_field(new, where), _digest_field(old, where)
            if new == old:
                raise ValueError(f"{where}: {new} is declared equivalent to itself")
            known = table.setdefault(package, {})
            if new in known and known[new] != old:
                raise ValueError(f"{where}: {package} {new} is already declared equivalent to {known[new]}")
            known[new] = old
    return table


def resolve_digest(package: str, digest: str, table: dict[str, dict[str, str]], path: str = "") -> str:
    """The oldest digest ``digest`` is declared equivalent to, following the declarations from new to old
    (``digest`` itself when none names it). Raises ``ValueError`` for a circle of declarations."""
    steps = table.get(package, {})
    seen = [digest]
    while digest in steps:
        digest = steps[digest]
        if digest in seen:
            chain = " -> ".join(seen + [digest])
            raise ValueError(f"{path or EQUIVALENCE_FILE}: the declarations of {package} go round in a circle: {chain}")
        seen.append(digest)
    return digest


def source_digests() -> dict[str, str]:
    """``{"pml_rll": digest, "benchmarks": digest}``: the :func:`tree_digest` of each package as it is on disk."""
    return {name: tree_digest(package_folder(name)) for name in PACKAGES}


def code_digests() -> dict[str, str]:
    """``{"pml_rll": digest, "benchmarks": digest}``, the code part of every key: each package's
    :func:`source_digests`, resolved through the declared equivalences (:func:`read_equivalences` of
    :func:`equivalence_path`) to the oldest digest it is declared equivalent to. Unchanged code, or a change
    declared to alter no result, keeps the key of the results already stored."""
    path = equivalence_path()
    table = read_equivalences(path)
    return {name: resolve_digest(name, digest, table, path) for name, digest in source_digests().items()}


def _split(path: str) -> tuple[str, str]:
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    return mod, attr


def class_digest(path: str) -> str:
    """The digest of the source file defining the class (or function) at import path ``"module:Name"``.

    The whole file counts, so helpers beside the class are covered. An object without a source file (a compiled
    extension's or one defined interactively) is named by its module's version, or ``"no-source"``."""
    mod_name, attr = _split(path)
    module = importlib.import_module(mod_name)
    obj = getattr(module, attr, None)
    defining = sys.modules.get(getattr(obj, "__module__", "") or "", module)
    try:
        source_file = inspect.getsourcefile(defining)
    except TypeError:
        source_file = None
    if source_file and os.path.isfile(source_file):
        return file_digest(source_file)
    top = sys.modules.get(mod_name.split(".")[0])
    return "version-" + str(getattr(top, "__version__", "no-source"))


def class_digests(paths: list[str | None]) -> dict[str, str]:
    """``{import path: class_digest(path)}`` for the given paths (``None`` skipped), each resolved through the
    declarations that name its import path (:func:`read_equivalences`)."""
    path = equivalence_path()
    table = read_equivalences(path)
    return {p: resolve_digest(p, class_digest(p), table, path) for p in paths if p}


def import_current(path: str) -> Any:
    """Import ``"module:Name"``, reloading the module when its file changed since this process imported it.

    A command run twice in one process (a notebook, a test) then builds the class as it is on disk, the code that
    :func:`class_digest` names in the key, instead of the version imported first. Raises ``ValueError`` naming
    the path when the import fails."""
    mod_name, attr = _split(path)
    if not mod_name or not attr:
        raise ValueError(f"{path!r} is not an import path like 'package.module:Class'")
    try:
        module = importlib.import_module(mod_name)
        source = getattr(module, "__file__", None)
        top = mod_name.split(".")[0]
        user_module = top not in _NEVER_RELOADED and top != __name__.split(".")[0]
        if user_module and source and source.endswith(".py") and os.path.isfile(source):
            now = file_digest(source)
            before = _IMPORTED.setdefault(mod_name, now)
            if before != now:
                cached = importlib.util.cache_from_source(source)
                if os.path.exists(cached):  # a same-size edit within the same second would look up to date
                    os.unlink(cached)
                module = importlib.reload(module)
                _IMPORTED[mod_name] = now
        return getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ValueError(f"cannot import {path!r}: {type(e).__name__}: {e}") from e


def git_state(folder: str | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding ``folder`` (default: the runner's), or None
    outside a git checkout (an installed package) or without git."""
    folder = folder or package_folder("benchmarks")
    try:
        commit = subprocess.run(
            ["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


def code_record(digests: dict[str, str], version: str) -> dict[str, Any]:
    """What every record stores about its code: the package version, the digests of the key (:func:`code_digests`)
    and the git state; where a declared equivalence maps the source on disk to older digests, its own digests too
    (``source_digests``)."""
    record = {"pml_rll_version": version, "digests": dict(digests), "git": git_state()}
    actual = source_digests()
    if actual != dict(digests):
        record["source_digests"] = actual
    return record
