"""The benchmark's results store: one database table of claimed and finished runs, shared by any number of runners.

Every run (and every tuning trial) is a row keyed by ``(key, seed)``, where ``key`` is the hash of everything that
decides the result (see ``benchmarks.run.run_key``). A runner *claims* a row before it starts the work:

* a new row is inserted with status ``claimed``, a random token, the worker's host and pid, a heartbeat and the
  claiming runner's lease;
* a ``done`` row is skipped (or, with ``--no-resume``, re-claimed once, when it finished before this runner started:
  its status becomes ``replacing`` and its record stays, and is reported as the result, until the new record
  replaces it; a replacement given up restores the row to ``done``);
* a ``claimed`` (or ``replacing``) row is left to its worker while that worker's heartbeat is fresh; a claim whose
  heartbeat is older than the lease stored with the claim, or whose worker process is gone (same host, pid no longer
  alive), is taken over.

Every state change is one compare-and-swap statement (``UPDATE ... WHERE token = <the token read>``), so two runners
can never both own a row, and a record is written only by the current owner, in one statement with the status
change: a killed runner leaves no half-written record, and nothing is counted twice. Released claims (a run that
failed or was interrupted) are deleted, so a restart redoes them at once. A worker checks now and then that its
token still owns the row (:func:`claim_lost`) and stops as soon as it does not.

Opening a store checks it before any work starts: a database that cannot be read or written (a damaged file, a
read-only file or folder, a full disk) or a ``bench_runs`` table without the expected columns raises
:class:`StoreError` with a one-line message. A table from before claims carried their own lease gets the column.

The database is any SQLAlchemy URL: SQLite in the output folder by default (WAL journal, a long busy timeout),
PostgreSQL or another server to share one store between machines. Optuna's study tables live in the same database.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError, SQLAlchemyError

_META = sa.MetaData()
RUNS = sa.Table(
    "bench_runs",
    _META,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("seed", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("key_json", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("worker", sa.String(255), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("record", sa.Text, nullable=True),
    sa.Column("lease", sa.Float, nullable=True),  # the claiming runner's lease (None: written before leases were)
)
LIVE = ("claimed", "replacing")  # a row some runner works on; "replacing" still holds its earlier done record
ADDED_COLUMNS = ("lease",)  # columns added since the first version of the table: added to older tables on open


class StoreError(Exception):
    """The results store cannot be used (damaged, read-only, full, or a table of another layout)."""


class ClaimLostError(Exception):
    """The claim a task runs under now belongs to another runner: the task stops without writing anything more."""


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what may be printed or written into records)."""
    try:
        parsed = sa.engine.make_url(url)
        return url if parsed.password is None else parsed.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: the text itself holds no password field
        return url


def _reason(e: BaseException) -> str:
    """One line from a database error (the driver's message, without SQLAlchemy's statement and link)."""
    orig = getattr(e, "orig", None)
    text = str(orig if orig is not None else e).strip().splitlines()
    return text[0] if text else type(e).__name__


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says that the disk (or the database's size limit) is full."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return "disk is full" in _reason(e) or "database or disk is full" in str(e)


_ENGINES: dict[str, Any] = {}


def make_engine(url: str) -> Any:
    """An SQLAlchemy engine for ``url``; SQLite gets a WAL journal and a long busy timeout."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 120}
    engine = sa.create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA busy_timeout=120000")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

    return engine


def claim_lost(url: str, key: str, seed: int, token: str) -> bool:
    """Whether the claim ``token`` on ``(key, seed)`` no longer owns its row (taken over, or the row is gone).
    For worker processes: one engine per process and URL. A database error counts as not lost."""
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    try:
        with _ENGINES[url].connect() as conn:
            row = conn.execute(
                sa.select(RUNS.c.token, RUNS.c.status).where(RUNS.c.key == key, RUNS.c.seed == seed)
            ).first()
    except SQLAlchemyError:
        return False
    return row is None or row[0] != token or row[1] not in LIVE


def open_optuna_storage(url: str, attempts: int = 8) -> Any:
    """Optuna's ``RDBStorage`` on ``url``. Several runners creating its tables at once on a fresh database race
    (a table or the version row already exists): the losers try again, and find the tables made."""
    import random

    import optuna

    kw = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kw)
        except (SQLAlchemyError, RuntimeError, ValueError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


class ResultStore:
    """Claims, heartbeats and records of benchmark runs in one SQL table (see the module docstring).

    Args:
        url: an SQLAlchemy database URL (``sqlite:///path/results.db``, ``postgresql://...``).
        lease_seconds: a claim whose heartbeat is older than this is taken over by another runner.
    """

    def __init__(self, url: str, lease_seconds: float = 120.0) -> None:
        self.url = url
        self.lease_seconds = float(lease_seconds)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.worker = f"{self.host}:{self.pid}"
        where = f"results store {mask_url(url)}"
        self.engine = make_engine(url)
        try:
            self._open()
        except StoreError:
            self.engine.dispose()
            raise
        except SQLAlchemyError as e:
            self.engine.dispose()
            raise StoreError(f"{where}: cannot be opened ({_reason(e)})") from None
        self._held: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        where = f"results store {mask_url(self.url)}"
        for attempt in range(5):  # two runners creating the tables at once: one wins, the other sees them
            try:
                _META.create_all(self.engine)
                break
            except DatabaseError as e:  # SQLite: locked; PostgreSQL: a duplicate catalogue entry
                if (
                    attempt == 4
                    or "locked" not in str(e)
                    and "already exists" not in str(e)
                    and "duplicate" not in (str(e).lower())
                ):
                    raise
                time.sleep(0.2 * (attempt + 1))
        if self.url.startswith("sqlite"):
            with self.engine.connect() as conn:
                check = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
            if check != ["ok"]:
                detail = " ".join(" ".join(map(str, check[:3])).split())[:200]
                raise StoreError(f"{where}: the database file is damaged ({detail})")
        for attempt in range(5):
            columns = {c["name"] for c in sa.inspect(self.engine).get_columns(RUNS.name)}
            missing = [c.name for c in RUNS.columns if c.name not in columns]
            absent = [c for c in missing if c not in ADDED_COLUMNS]
            if absent:
                raise StoreError(
                    f"{where}: table {RUNS.name} lacks the columns {absent} (another layout); "
                    "use another --out or --storage"
                )
            if not missing:
                break
            try:
                with self.engine.begin() as conn:
                    for c in missing:
                        conn.exec_driver_sql(f"ALTER TABLE {RUNS.name} ADD COLUMN {c} FLOAT")
            except DatabaseError:  # another runner added it first
                if attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))
        with self.engine.connect() as conn:  # a write that is rolled back: read-only files and full disks fail here
            trans = conn.begin()
            try:
                now = time.time()
                conn.execute(
                    RUNS.insert().values(
                        key="write-check-" + uuid.uuid4().hex[:20], seed=-1, kind="check", key_json="{}",
                        status="check", token=uuid.uuid4().hex, worker=self.worker, heartbeat=now, started_at=now,
                    )
                )  # fmt: skip
            except OperationalError as e:
                raise StoreError(f"{where}: cannot be written ({_reason(e)})") from None
            finally:
                trans.rollback()

    # ---------------------------------------------------------------------------------------------------- claims
    def _row(self, conn: Any, key: str, seed: int) -> Any:
        return conn.execute(sa.select(RUNS).where(RUNS.c.key == key, RUNS.c.seed == seed)).mappings().first()

    def _stale(self, row: Any, now: float) -> bool:
        lease = row["lease"] if row["lease"] else self.lease_seconds  # rows written before claims carried one
        if row["heartbeat"] < now - lease:
            return True
        host, _, pid = row["worker"].rpartition(":")
        return host == self.host and pid.isdigit() and int(pid) != self.pid and not _pid_alive(int(pid))

    def claim(
        self, key: str, seed: int, kind: str, key_obj: dict[str, Any], replace_before: float | None = None
    ) -> tuple[str, dict[str, Any] | None]:
        """Try to own ``(key, seed)``. Returns ``("mine", payload)`` (payload: what a taken-over claim had stored),
        ``("done", record)`` or ``("busy", None)``. ``replace_before``: re-claim a done row finished before then."""
        for _ in range(50):
            now = time.time()
            token = uuid.uuid4().hex
            with self.engine.connect() as conn:  # read, then one compare-and-swap write (no read-write transaction)
                row = self._row(conn, key, seed)
            if row is None:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(
                            RUNS.insert().values(
                                key=key,
                                seed=seed,
                                kind=kind,
                                key_json=_json(key_obj),
                                status="claimed",
                                token=token,
                                worker=self.worker,
                                heartbeat=now,
                                started_at=now,
                                lease=self.lease_seconds,
                            )
                        )
                except IntegrityError:
                    continue  # another runner inserted it first: read again
                self._hold(key, seed, token)
                return "mine", None
            if row["status"] in ("done", "replacing") and replace_before is None:
                return "done", json.loads(row["record"])  # a record being replaced stands until it is
            if row["status"] == "done":
                assert replace_before is not None
                if (row["finished_at"] or 0) >= replace_before:
                    return "done", json.loads(row["record"])
            elif not self._stale(row, now):
                return "busy", None
            payload = json.loads(row["record"]) if row["status"] == "claimed" and row["record"] else None
            values: dict[str, Any] = dict(
                token=token, worker=self.worker, heartbeat=now, started_at=now, lease=self.lease_seconds
            )
            if row["status"] == "claimed":
                values.update(finished_at=None, record=None)
            else:  # done or replacing: the earlier record stays until the new one replaces it
                values.update(status="replacing")
            with self.engine.begin() as conn:
                res = conn.execute(
                    RUNS.update()
                    .where(RUNS.c.key == key, RUNS.c.seed == seed, RUNS.c.token == row["token"])
                    .values(**values)
                )
            if res.rowcount == 1:
                self._hold(key, seed, token)
                return "mine", payload
        raise RuntimeError(f"could not claim run {key} seed {seed}: the row keeps changing")

    def _hold(self, key: str, seed: int, token: str) -> None:
        with self._lock:
            self._held[(key, seed)] = token

    def _token(self, key: str, seed: int) -> str:
        with self._lock:
            if (key, seed) not in self._held:
                raise KeyError(f"run {key} seed {seed} is not claimed by this runner")
            return self._held[(key, seed)]

    def token(self, key: str, seed: int) -> str | None:
        """The token of this runner's claim on ``(key, seed)``, or None."""
        with self._lock:
            return self._held.get((key, seed))

    def set_payload(self, key: str, seed: int, payload: dict[str, Any]) -> bool:
        """Store ``payload`` in a claimed row (what a runner taking the claim over needs to continue). A row being
        replaced keeps its earlier record instead: False."""
        token = self._token(key, seed)
        with self.engine.begin() as conn:
            res = conn.execute(
                RUNS.update()
                .where(RUNS.c.key == key, RUNS.c.seed == seed, RUNS.c.token == token, RUNS.c.status == "claimed")
                .values(record=_json(payload), heartbeat=time.time())
            )
        return res.rowcount == 1

    def complete(self, key: str, seed: int, record: dict[str, Any]) -> bool:
        """Write the record and mark the row done, if this runner still owns it. False: the claim was lost (taken
        over by another runner, which will write its own record), and this record is dropped."""
        token = self._token(key, seed)
        with self.engine.begin() as conn:
            res = conn.execute(
                RUNS.update()
                .where(RUNS.c.key == key, RUNS.c.seed == seed, RUNS.c.token == token, RUNS.c.status.in_(LIVE))
                .values(status="done", record=_json(record), finished_at=time.time(), heartbeat=time.time())
            )
        with self._lock:
            self._held.pop((key, seed), None)
        return res.rowcount == 1

    def release(self, key: str, seed: int) -> None:
        """Give a claim up (the work failed or was interrupted): the row is deleted, a restart redoes it; a row being
        replaced (``--no-resume``) is done again with its earlier record."""
        with self._lock:
            token = self._held.pop((key, seed), None)
        if token is None:
            return
        mine = (RUNS.c.key == key, RUNS.c.seed == seed, RUNS.c.token == token)
        with self.engine.begin() as conn:
            conn.execute(RUNS.delete().where(*mine, RUNS.c.status == "claimed"))
            conn.execute(
                RUNS.update()
                .where(*mine, RUNS.c.status == "replacing")
                .values(status="done", token=uuid.uuid4().hex, heartbeat=time.time())
            )

    def release_all(self) -> None:
        with self._lock:
            held = list(self._held)
        for key, seed in held:
            try:
                self.release(key, seed)
            except Exception:  # noqa: BLE001 - best effort on the way out; the lease covers the rest
                pass

    def put(self, key: str, seed: int, kind: str, key_obj: dict[str, Any], record: dict[str, Any]) -> None:
        """Insert or replace a finished row directly (for work owned through another claim: a trial's folds)."""
        now = time.time()
        values = dict(
            kind=kind,
            key_json=_json(key_obj),
            status="done",
            token=uuid.uuid4().hex,
            worker=self.worker,
            heartbeat=now,
            started_at=now,
            finished_at=now,
            record=_json(record),
            lease=self.lease_seconds,
        )
        with self.engine.begin() as conn:
            res = conn.execute(RUNS.update().where(RUNS.c.key == key, RUNS.c.seed == seed).values(**values))
            if res.rowcount == 0:
                conn.execute(RUNS.insert().values(key=key, seed=seed, **values))

    # ---------------------------------------------------------------------------------------------------- heartbeat
    def start_heartbeat(self) -> None:
        """Refresh the heartbeat of every claim this runner holds, every lease / 4 seconds, in a daemon thread (each
        claim carries the lease of the runner that made it, so runners with different leases can share a store)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(max(0.5, self.lease_seconds / 4)):
                with self._lock:
                    tokens = list(self._held.values())
                if tokens:
                    try:
                        with self.engine.begin() as conn:
                            conn.execute(RUNS.update().where(RUNS.c.token.in_(tokens)).values(heartbeat=time.time()))
                    except OperationalError:  # a busy database: the next beat comes soon
                        pass

        self._thread = threading.Thread(target=beat, name="store-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.release_all()
        self.engine.dispose()

    # ---------------------------------------------------------------------------------------------------- reading
    def get(self, key: str, seed: int) -> dict[str, Any] | None:
        """The record of a finished row (or of one being replaced), or None."""
        with self.engine.connect() as conn:
            row = self._row(conn, key, seed)
        if row is None or row["status"] not in ("done", "replacing"):
            return None
        record: dict[str, Any] = json.loads(row["record"])
        return record

    def status(self, key: str, seed: int) -> str | None:
        with self.engine.connect() as conn:
            row = self._row(conn, key, seed)
        return None if row is None else row["status"]

    def records(self, keys: Iterable[str] | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Finished records (optionally only these keys / this kind), in the order they finished (a record being
        replaced counts until it is)."""
        q = sa.select(RUNS.c.record).where(RUNS.c.status.in_(("done", "replacing")))
        if kind is not None:
            q = q.where(RUNS.c.kind == kind)
        if keys is not None:
            keys = list(keys)
            if not keys:
                return []
            q = q.where(RUNS.c.key.in_(keys))
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(RUNS.c.finished_at, RUNS.c.key, RUNS.c.seed)).all()
        return [json.loads(r[0]) for r in rows]
