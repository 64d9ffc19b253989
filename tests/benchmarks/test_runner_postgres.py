"""Runners sharing one PostgreSQL store (``--storage``), on a throwaway cluster in a temporary folder.

Skipped, with the reason, where PostgreSQL's server programs (Debian package ``postgresql``) or the ``psycopg``
driver (extra ``postgres``) are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--eval-every", "0"]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="PostgreSQL driver psycopg not installed (extra 'postgres')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not installed (Debian package 'postgresql')")
    prefix: list[str] = []
    folder = tempfile.mkdtemp(prefix="pml-rll-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(folder, "data")
    try:
        subprocess.run(
            prefix + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        opts = f"-c listen_addresses='' -k {folder} -c fsync=off"
        subprocess.run(
            prefix + [pg_ctl, "-D", data, "-o", opts, "-l", os.path.join(folder, "log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL cluster: {e}")
    yield f"postgresql+psycopg://postgres@/postgres?host={folder}"
    subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def test_two_runners_share_a_postgres_store(postgres_url, tmp_path):
    from benchmarks.results.store import RUNS, ResultStore

    args = [sys.executable, "-m", "benchmarks.run", "--losses", "triplet,contrastive", "--seeds", "2", *TINY]
    args += ["--storage", postgres_url]
    procs = [
        subprocess.Popen(
            args + ["--out", str(tmp_path / f"machine{i}")],  # each "machine" has its own exports and logs
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    done = [p.communicate(timeout=600) for p in procs]
    outs = [o for o, _ in done]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in done]
    made = [int(o.split(" runs/trials made")[0].rsplit("\n", 1)[-1]) for o in outs]
    assert sum(made) == 4, outs
    store = ResultStore(postgres_url)
    with store.engine.connect() as conn:
        rows = list(conn.execute(RUNS.select()).mappings())
    store.close()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    for i in range(2):  # both machines export every run
        assert len(open(tmp_path / f"machine{i}" / "results.jsonl").read().splitlines()) == 4


def test_tune_on_postgres(postgres_url, tmp_path):
    from benchmarks.run import main

    argv = ["--losses", "contrastive", "--seeds", "1", "--tune", "--trials", "2", "--folds", "2", "--batch-size", "32"]
    assert main(argv + TINY + ["--storage", postgres_url, "--out", str(tmp_path / "o")]) == 0
    assert "## Tuning: 2 trials per loss" in open(tmp_path / "o" / "results.md").read()
