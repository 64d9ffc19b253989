"""Declared equivalences of code digests (benchmarks/code_equivalence.txt): a change declared to alter no result
keeps the key of the results already stored; everything else about the code is still a new key."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.core import provenance
from benchmarks.run import main
from tests.benchmarks.test_provenance import library_copy, run_then_edit

A, B, C, D = "a" * 16, "b" * 16, "c" * 16, "d" * 16


def _file(tmp_path, *lines: str):
    path = tmp_path / "code_equivalence.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_declarations_resolve_from_new_to_the_oldest(tmp_path):
    path = _file(
        tmp_path,
        "# a comment line, then a blank one",
        "",
        f"benchmarks {A} {B}  # 1111111, modules moved, old store reused",
        f"benchmarks {B} {C}  # 2222222, docstrings only",
        f"pml_rll {A} {D}  # 3333333, a private helper renamed",
        f"benchmarks {A} {B}  # the same declaration again is harmless",
    )
    table = provenance.read_equivalences(path)
    assert table == {"benchmarks": {A: B, B: C}, "pml_rll": {A: D}}
    assert [provenance.resolve_digest("benchmarks", d, table) for d in (A, B, C, D)] == [C, C, C, D]
    assert provenance.resolve_digest("pml_rll", A, table) == D
    assert provenance.resolve_digest("pml_rll", B, table) == B  # declarations are per package
    assert provenance.read_equivalences(str(tmp_path / "absent.txt")) == {}


@pytest.mark.parametrize(
    "line,message",
    [
        (f"benchmarks {A}  # one digest", "expected '<package> <new digest> <old digest>"),
        (f"benchmarks {A} {B} {C}  # three", "expected '<package> <new digest> <old digest>"),
        (f"benchmarks {A} {B}", "needs a comment"),
        (f"benchmarks {A} {B}  #   ", "needs a comment"),
        (f"torch {A} {B}  # not a package of the key", "unknown package 'torch'"),
        (f"pml_rll.losses: {A} {B}  # a class path without its class", "unknown package 'pml_rll.losses:'"),
        (f"pml-rll.losses:NAMRLoss {A} {B}  # not an import path", "unknown package 'pml-rll.losses:NAMRLoss'"),
        (f"benchmarks {A[:15]} {B}  # 15 digits", "is not a code digest"),
        (f"benchmarks {A.upper()} {B}  # upper case", "is not a code digest"),
        (f"benchmarks {A} {'g' * 16}  # not hexadecimal", "is not a code digest"),
        (f"benchmarks {A} {A}  # itself", "equivalent to itself"),
    ],
)
def test_a_malformed_declaration_is_refused_naming_its_line(tmp_path, line, message):
    path = _file(tmp_path, "# header", f"benchmarks {C} {D}  # fine", line)
    with pytest.raises(ValueError, match=rf"code_equivalence\.txt:3: .*{message}"):
        provenance.read_equivalences(path)


def test_a_new_digest_declared_twice_and_a_circle_are_refused(tmp_path):
    path = _file(tmp_path, f"benchmarks {A} {B}  # one", f"benchmarks {A} {C}  # another")
    with pytest.raises(ValueError, match=rf"code_equivalence\.txt:2: benchmarks {A} is already declared"):
        provenance.read_equivalences(path)
    path = _file(tmp_path, f"benchmarks {A} {B}  # one", f"benchmarks {B} {C}  # two", f"benchmarks {C} {A}  # three")
    table = provenance.read_equivalences(path)
    with pytest.raises(ValueError, match="go round in a circle"):
        provenance.resolve_digest("benchmarks", B, table, path)


def test_code_digests_resolve_the_declarations_and_records_keep_the_source_digests(tmp_path, monkeypatch):
    actual = provenance.source_digests()
    monkeypatch.setattr(provenance, "equivalence_path", lambda: str(tmp_path / "absent.txt"))
    assert provenance.code_digests() == actual
    assert "source_digests" not in provenance.code_record(provenance.code_digests(), "0")
    path = _file(tmp_path, f"pml_rll {actual['pml_rll']} {D}  # test")
    monkeypatch.setattr(provenance, "equivalence_path", lambda: path)
    assert provenance.code_digests() == {"pml_rll": D, "benchmarks": actual["benchmarks"]}
    record = provenance.code_record(provenance.code_digests(), "0")
    assert record["digests"]["pml_rll"] == D and record["source_digests"] == actual


def test_a_class_digest_resolves_through_the_declarations_naming_its_import_path(tmp_path, monkeypatch):
    name = "pml_rll.losses:NAMRLoss"
    actual = provenance.class_digest(name)
    other = "pml_rll.losses:RankedListLoss"
    monkeypatch.setattr(provenance, "equivalence_path", lambda: str(tmp_path / "absent.txt"))
    assert provenance.class_digests([name, other, None]) == {name: actual, other: provenance.class_digest(other)}
    path = _file(tmp_path, f"{name} {actual} {D}  # test: names only", f"benchmarks {actual} {C}  # another package")
    assert provenance.read_equivalences(path)[name] == {actual: D}
    monkeypatch.setattr(provenance, "equivalence_path", lambda: path)
    # the declaration names NAMRLoss's path: RankedListLoss's digest is its own, whatever the other lines say
    assert provenance.class_digests([name, other]) == {name: D, other: provenance.class_digest(other)}


def test_the_repository_file_is_valid_and_in_no_digest(tmp_path):
    path = provenance.equivalence_path()
    assert path.endswith("benchmarks/code_equivalence.txt")
    table = provenance.read_equivalences(path)  # raises for a malformed line
    assert provenance.code_digests() == {
        name: provenance.resolve_digest(name, d, table, path) for name, d in provenance.source_digests().items()
    }
    copy = tmp_path / "benchmarks"
    shutil.copytree(provenance.package_folder("benchmarks"), copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = provenance.tree_digest(str(copy))
    with open(copy / "code_equivalence.txt", "a") as f:
        f.write(f"benchmarks {A} {B}  # an added declaration\n")
    assert provenance.tree_digest(str(copy)) == before


def test_a_change_declared_equivalent_reuses_the_stored_result(tmp_path, monkeypatch, capsys):
    # a copy of pml_rll stands in for the installed tree; an edit of one of its files is a new key unless declared
    copy = library_copy(tmp_path, monkeypatch)
    declarations = tmp_path / "code_equivalence.txt"
    monkeypatch.setattr(provenance, "equivalence_path", lambda: str(declarations))
    old = provenance.code_digests()["pml_rll"]
    argv = run_then_edit(copy, str(tmp_path / "out"), "\n# a comment: no result changes\n")
    capsys.readouterr()
    new = provenance.source_digests()["pml_rll"]
    assert new != old
    declarations.write_text(f"pml_rll {new} {old}  # test: a comment added\n")
    assert main(argv) == 0
    assert "0 runs/trials made, 1 reused from the store" in capsys.readouterr().out
    declarations.write_text("# the declaration withdrawn\n")
    assert main(argv) == 0
    assert "1 runs/trials made, 0 reused from the store" in capsys.readouterr().out
