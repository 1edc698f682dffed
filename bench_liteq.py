#!/usr/bin/env python3
"""Benchmark liteq against a raw sqlite3 loop doing the same work.

Run it from anywhere (standard library only)::

    python3 bench_liteq.py                 # full run, about 3 minutes
    python3 bench_liteq.py --quick         # CI smoke run, about 45 s
    python3 bench_liteq.py --n 10000 --json bench.json
    python3 bench_liteq.py --only drain --only steps
    python3 bench_liteq.py --profile       # where .delay() and a worker
                                           # spend their time

Every measurement uses fresh database files in a temporary directory on
local disk (``--dir`` chooses where it is made).  Absolute times wander on
a shared machine, so each liteq figure is printed next to the same work
done by a hand-written ``sqlite3`` loop, and as a ratio to it; the ratios
are the numbers to watch.  The raw loop uses a comparable table (an
autoincrement id, a name, a JSON payload, a status, REAL timestamps and a
partial index on (queue, priority DESC, ready)), WAL, ``synchronous =
NORMAL`` and one ``BEGIN IMMEDIATE`` transaction per write, as liteq does;
it waits for locks with SQLite's own busy handler.

Sections (``grep -n '^# [0-9]*\\. ' bench_liteq.py``):

 1. Settings and helpers
 2. Child processes and /proc
 3. Tasks: the parent's registrations and the generated task module
 4. The raw sqlite3 baseline
 5. liteq measurements
 6. The benchmark, measurement by measurement
 7. Report: table and JSON
 8. Profile (--profile)
 9. Command line and child entry points

The measurements (N is ``--n``: 20000, or 1000 with ``--quick``; a worker
drains 20,000 jobs in about a second, long enough for the machine's noise
to average out):

1. enqueue: 5 rounds of N ``.delay()`` calls, one commit each, into one
   fresh file, versus 5 rounds of N single-INSERT ``BEGIN IMMEDIATE``
   transactions; the best round counts.  Rounds alternate between liteq
   and raw, so a slow moment of the machine hits both.
2. batch enqueue: N ``.delay()`` calls in one ``with queue.batch():``
   block, versus ``executemany`` in one transaction.  Best of 5 rounds.
3. drain: N pending no-op jobs (stored with ``batch()``) run by one
   worker thread in another process (``python -m liteq run benchtasks
   --db PATH``, with a generated task module), versus a raw worker
   process that runs a claim transaction (``UPDATE ... WHERE id = (SELECT
   ... LIMIT 1) RETURNING``) and a completion transaction per job.  Timed
   in the database, from the first claim (min ``started_at``) to the last
   completion (max ``finished_at``), so process start-up does not count.
   Best of 3 rounds (1 with --quick), alternating liteq and raw, each on a
   fresh file: the machine's speed swings by 2x within minutes.
4. continuation steps: one job of N steps (``return steps(n - 1)``), in
   steps per second, as a ratio to a drain as in (3) (target >= 0.8) and
   to a raw worker that stores each continuation (new payload, next place
   in line) in its own transaction.  Rounds alternate steps, drain and
   raw steps; best of each.
5. latency: an idle worker in another process; sequential ``.delay()``
   calls (200, 50 with --quick) of a task that returns ``time.time()`` as
   its first act; the delay from just before ``.delay()`` to that stamp,
   p50/p90/p99 in ms.  The same with a ``Worker`` thread in this process.
   Then the idle worker process's CPU use over 10 s (2 s with --quick),
   from utime + stime in /proc/PID/stat, as % of one core.
6. scale: (1) and (3) on a file that already holds 1,000,000 finished
   jobs (20,000 with --quick; copies of a real done row inserted with raw
   SQL), each round alternating with the same measurement on an empty
   file; ratios of the best rounds.  Then the worker's peak RSS (VmHWM in
   /proc/PID/status) with 1,000,000 pending jobs (copies of a real pending
   row, each with its own place in line), read after it has run N of
   them, and the drain rate it reached there, against drains as in (3)
   alternating with it.
7. multi-process: 4 worker processes and 2 producer processes (each
   calling ``.delay()`` as fast as it can) on one file, against 1 worker
   process with the same 2 producers, in rounds that alternate the two.
   First with a backlog: each round's file starts with more pending jobs
   than the workers can run in it (40,000 per second of the round), the
   workers start on them at once and the producers half a second later;
   the drain rate while the producers run is the pool's aggregate drain
   (target >= 1.0 of the one worker's), also shown against the drain of
   (3), and the producers' enqueue rate, CPU and time per ``.delay()``
   meanwhile (p99 and longest, of the worst round).  5 rounds of 6 s each
   (1 of 1.5 s with --quick).  Then with no backlog, the producers starting
   once the workers have started up and gone idle: the workers drain
   what the producers make, so the ratio says what the idle extra
   workers cost the producers; 3 rounds of 5 s (1 of 1 s with --quick).
   Over all rounds, counts every exception that reaches the producers'
   code and every "database is locked" / Busy / OperationalError line in
   the workers' stderr (target 0), ERROR and Traceback lines, failed
   jobs.  The rates with no backlog are also shown against the same run
   of raw workers and raw producers (30 s, 1 s with --quick).
8. timers: one file with 1,000,000 jobs waiting on timers a day ahead
   (100,000 with --quick; copies of a real ``apply_async(countdown=)``
   row, each on its own timer, a sample read back through
   ``Queue.get()``: pending, ``waiting == "timer"``).  Drains as in (3)
   on it, alternating with drains on a file where none waits, best of 5
   rounds (1 with --quick; target >= 0.9), and the worker's peak RSS
   there (target <= 64 MiB).  Then an idle worker process on it and
   another on the file with none waiting, over the same 10 s (5 s with
   --quick): CPU in % of one core (target <= 1) and wake-ups per second
   (voluntary context switches of all its threads).  Then wake-up
   precision: 100 waits (40 with --quick) of 0.2-1.0 s, started about
   0.1 s apart (0.025 s) so that several overlap, to an idle ``Worker``
   thread in this process and then to a worker in another process;
   every other wait is a countdown, the others a step returning
   ``stamp().after(seconds=...)``.  The stamp step returns
   ``time.time()`` as its first act; the delay is that stamp minus the
   job's stored eta (its wake time), p50/p99/max in ms (target p99 <=
   50), and a step that starts before its wake time is counted (target
   0).
9. schedules: 1,000 schedules whose next slots are weeks ahead (``every``
   of about 30 days, each a different one, each next slot at least a day
   off), stored with ``Queue.schedule()`` in one file, declared with
   ``liteq.periodic`` in a generated module the worker imports in
   another (the worker stores them when it starts).  Drains as in (3) on
   each, alternating with drains on a file with no schedule, best of 5
   rounds (1 with --quick; target >= 0.9); afterwards none has fired and
   all are still there.  Then an idle worker process on each of the three
   files over the same 10 s (2.5 s with --quick, to keep it near 45 s):
   CPU in % of one core (target <= 1) and wake-ups per second.  Over the
   same seconds a fourth worker process, idle otherwise, fires 16
   schedules stored as it idles (``every`` 1.0 to 3.0 s, about 9 slots a
   second, some at the same time; every other one with ``overlap=
   "allow"``, so that a slot fired early or twice runs rather than being
   skipped) until 60 slots (20 with --quick) have run, then they are
   paused; each fires a task that returns ``time.time()`` as its first
   act.  The lateness of a slot is that stamp minus the job's
   ``scheduled_for``: p50/p99/max in ms of the first 60 slots (target p99
   <= 1000), and the p99 of ``created_at`` (when it was fired) minus
   ``scheduled_for``.  A slot fired twice, before its time, off its
   schedule's grid, or not at all (of those more than a second before the
   pause) is counted (target 0), and so are the slots the schedules
   count skipped (target 0: an idle worker with steps of a millisecond
   has no reason to skip one).

Targets are informational: a MISS never changes the exit status.  The exit
status is 1 only when something crashed: a child process failed or timed
out, a job failed in (3), (4), (6), (8) or (9), a measurement raised.
(Errors and failed jobs of (7) are figures with a target of 0, not
crashes.)
``--quick`` makes no timing assertions at all; it takes about 45 s on an
idle 2-CPU machine.

``--profile`` runs no benchmark: it runs cProfile over N in-process
``.delay()`` calls, a ``Worker.run_once()`` loop over N jobs, and a real
``Worker`` thread draining N jobs and running one N-step job, and prints
the top functions, the SQL statements each job costs, each timed from
liteq's DEBUG log up to its thread's next statement (so with the Python
after it), and how long each write transaction holds the lock; then the
same SQL figures for the raw loops.
"""

# ---------------------------------------------------------------------------
# 1. Settings and helpers
# ---------------------------------------------------------------------------

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import pstats
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import liteq  # noqa: E402  (the copy next to this file)

ROUNDS = 5  # best of, for the in-process measurements
DRAIN_ROUNDS = (3, 1)  # best of, for measurements with a worker process
LATENCY_SAMPLES = (200, 50)  # (full, quick)
CPU_SECONDS = (10.0, 2.0)
SCALE_ROWS = (1_000_000, 20_000)
MULTI_SECONDS = (30.0, 1.5)  # for each of one and four workers
MULTI_ROUNDS = (5, 1)  # the seconds are split into alternating rounds
FED_SECONDS, FED_ROUNDS = (15.0, 1.0), (3, 1)  # the same, with no backlog
BACKLOG_RATE = 40000  # jobs per second of a round put in line beforehand
RAW_MULTI_SECONDS = (30.0, 1.0)
MULTI_WORKERS, MULTI_PRODUCERS = 4, 2
WAITING_ROWS = (1_000_000, 100_000)  # jobs waiting on timers, in (8)
TIMER_ROUNDS = (5, 1)  # drains with and without them, alternating
WAKE_SAMPLES = (100, 40)  # waits timed, in each of two places
WAKE_GAP = (0.1, 0.025)  # mean seconds between two waits' starts
WAKE_WAITS = (0.2, 1.0)  # each wait is drawn from this range, seconds
IDLE_WAITING_SECONDS = (10.0, 5.0)
SCHEDULES = 1000  # schedules far ahead, in (9), stored and declared
FAR_EVERY = 86400.0 * 30  # their every= is this plus 7 s per schedule
FAR_MARGIN = 86400.0  # each one's next slot is at least this far ahead
SCHEDULE_ROUNDS = (5, 1)  # drains with and without them, alternating
IDLE_SCHEDULE_SECONDS = (10.0, 2.5)
#: The every= of the schedules that fire in (9): 16 from 1 s to 3 s,
#: about 9 slots a second in all, some at the same time.
FAST_EVERY = tuple(round(1.0 + i * 2.0 / 15, 3) for i in range(16))
SLOT_SAMPLES = (60, 20)  # slots fired and timed, at least
#: What a worker process imports (``liteq run MODULE ...``); the second
#: declares SCHEDULES schedules in code (see PERIODIC_MODULE).
WORKER_MODULES = ("benchtasks",)
DECLARING_MODULES = ("benchtasks", "benchperiodic")
POLL = 0.02  # seconds between checks of a child's progress
STOP_TIMEOUT = 15.0  # seconds a worker gets to exit after SIGTERM

#: Lines in a worker's stderr that mean a lock error reached it.
LOCK_WORDS = ("database is locked", "Busy", "OperationalError")
#: Lines that mean something went wrong in a worker at all.
ERROR_WORDS = ("Traceback", " ERROR ", " CRITICAL ")


class BenchError(Exception):
    """Something crashed or timed out: the run exits with status 1."""


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             watch: tuple = ()) -> None:
    """Poll ``condition`` until true; fail if a watched child exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in watch:
            if proc.poll() is not None:
                raise BenchError(f"{proc.label} exited with status "
                                 f"{proc.returncode} while {what}"
                                 f"{stderr_tail(proc)}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s while {what}")
        time.sleep(POLL)


def read_one(path: str, sql: str, params: Any = ()) -> tuple:
    """One row of a query on ``path``, outside any transaction."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        return conn.execute(sql, params).fetchone()
    finally:
        conn.close()


def span(path: str, table: str, first_id: int = 1,
         last_id: int = 2**63 - 1) -> tuple[int, float]:
    """Finished jobs with ids in a range, and first claim to last end."""
    count, started, finished = read_one(
        path, f"SELECT count(*), min(started_at), max(finished_at) "
              f"FROM {table} WHERE id BETWEEN ? AND ? "
              f"AND finished_at IS NOT NULL", (first_id, last_id))
    if not count:
        raise BenchError(f"no finished jobs in {table} of {path}")
    return count, finished - started


def done_between(path: str, table: str, start: float, end: float) -> int:
    return read_one(path, f"SELECT count(*) FROM {table} "
                          f"WHERE finished_at BETWEEN ? AND ?",
                    (start, end))[0]


def fs_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (Linux), or '?'."""
    best, kind = "", "?"
    path = os.path.realpath(path)
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/mountinfo") as lines:
            for line in lines:
                fields = line.split()
                mount = fields[4]
                inside = path == mount or path.startswith(
                    mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[fields.index("-") + 1]
    return kind


def error_key(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:200]

# ---------------------------------------------------------------------------
# 2. Child processes and /proc
# ---------------------------------------------------------------------------


class Children:
    """Child processes of one run; whatever happens, none outlives it."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        # Sent SIGTERM, not yet waited for (see stop(wait=False)).
        self.retiring: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (HERE, self.env.get("PYTHONPATH")) if p)
        self.env.pop("LITEQ_DB", None)

    def spawn(self, label: str, argv: list[str],
              stdout: Any = subprocess.DEVNULL) -> subprocess.Popen:
        """Start ``argv`` with its stderr in a file named after ``label``."""
        err_path = os.path.join(self.workdir, f"{label}.stderr")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=self.workdir, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=err)
        proc.label, proc.stderr_path = label, err_path
        self.procs.append(proc)
        return proc

    def worker(self, label: str, path: str,
               modules: tuple[str, ...] = WORKER_MODULES
               ) -> subprocess.Popen:
        """``python -m liteq run benchtasks`` on ``path``, one thread."""
        return self.spawn(label, [
            sys.executable, "-m", "liteq", "run", *modules, "--db", path,
            "--threads", "1", "--log-level", "WARNING"])

    def bench(self, label: str, *args: str,
              stdout: Any = subprocess.DEVNULL) -> subprocess.Popen:
        """This file, run as one of the child entry points of section 9."""
        return self.spawn(label, [sys.executable, os.path.abspath(__file__),
                                  *args], stdout=stdout)

    def stop(self, *procs: subprocess.Popen, wait: bool = True) -> None:
        """SIGTERM (a graceful liteq stop); exit status 0 expected.

        An idle liteq worker takes up to a second to stop, so a caller
        that does not need it gone passes ``wait=False`` and reap()
        checks it later.
        """
        # Once each: a second SIGTERM makes liteq exit at once, unclean.
        procs = tuple(p for p in procs if p not in self.retiring)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self.retiring.extend(procs)
        if wait:
            self.reap()

    def reap(self) -> None:
        """Wait for the stopped children; fail if one did not exit 0."""
        procs, self.retiring = self.retiring, []
        for proc in procs:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchError(f"{proc.label} did not stop within "
                                 f"{STOP_TIMEOUT:g}s of SIGTERM") from None
        for proc in procs:
            if proc.returncode != 0:
                raise BenchError(f"{proc.label} exited with status "
                                 f"{proc.returncode}{stderr_tail(proc)}")

    def kill_all(self) -> None:
        self.retiring = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stderr_text(proc: subprocess.Popen) -> str:
    try:
        with open(proc.stderr_path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def stderr_tail(proc: subprocess.Popen, lines: int = 15) -> str:
    text = stderr_text(proc).strip()
    if not text:
        return ""
    return "; its stderr ends:\n    " + "\n    ".join(
        text.splitlines()[-lines:])


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (Linux only)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat


def wakeups(pid: int) -> int | None:
    """Voluntary context switches of all of a process's threads (Linux):
    one each time a thread blocks, so about one per wake-up when idle."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that just ended
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a process in MiB (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None

# ---------------------------------------------------------------------------
# 3. Tasks: the parent's registrations and the generated task module
# ---------------------------------------------------------------------------

# The workers import this module; the parent and the producers register
# functions of their own under the same stored names (see bind_tasks).
TASK_MODULE = '''\
"""Tasks for bench_liteq.py (generated; safe to delete)."""
import time

from liteq import task


@task
def noop():
    return None


@task
def steps(n):
    return steps(n - 1) if n > 0 else None


@task
def stamp():
    return time.time()


@task
def wait_stamp(seconds):
    return stamp().after(seconds=seconds)


@task
def slot_stamp(tag):
    return time.time()
'''

# (9) runs some workers with this module too: SCHEDULES schedules declared
# in code, far ahead (the parent fills in FAR; see far_schedules).
PERIODIC_MODULE = '''\
"""Schedules for bench_liteq.py (generated; safe to delete)."""
from liteq import periodic

from benchtasks import noop

FAR = {far!r}

for _name, _every in FAR:
    periodic(every=_every, name=_name)(noop)
'''

NOOP, STEPS, STAMP = "benchtasks:noop", "benchtasks:steps", "benchtasks:stamp"
WAIT_STAMP = "benchtasks:wait_stamp"
SLOT_STAMP = "benchtasks:slot_stamp"


def noop() -> None:
    return None


def steps(n: int) -> Any:
    return liteq.Task(STEPS, [n - 1]) if n > 0 else None


def stamp() -> float:
    return time.time()


def wait_stamp(seconds: float) -> Any:
    """A step that waits ``seconds`` as stored data, then stamps."""
    return liteq.Task(STAMP, []).after(seconds=seconds)


def slot_stamp(tag: str) -> float:
    """A stamp that says which schedule fired it."""
    return time.time()


@dataclasses.dataclass
class Tasks:
    noop: liteq.TaskFunction
    steps: liteq.TaskFunction
    stamp: liteq.TaskFunction
    wait_stamp: liteq.TaskFunction
    slot_stamp: liteq.TaskFunction


def bind_tasks(queue: liteq.Queue) -> Tasks:
    """Register the bench tasks so that their calls go to ``queue``.

    The registry is one per process and keyed by stored name, so this
    replaces the previous binding: use one Queue at a time.
    """
    return Tasks(queue.task(noop, name=NOOP),
                 queue.task(steps, name=STEPS),
                 queue.task(stamp, name=STAMP),
                 queue.task(wait_stamp, name=WAIT_STAMP),
                 queue.task(slot_stamp, name=SLOT_STAMP))


@contextlib.contextmanager
def open_queue(path: str) -> Iterator[tuple[liteq.Queue, Tasks]]:
    """A Queue on ``path`` with its schema made, and the bench tasks."""
    queue = liteq.Queue(path)
    try:
        queue.counts()  # opens the file and creates the schema
        yield queue, bind_tasks(queue)
    finally:
        queue.close()

# ---------------------------------------------------------------------------
# 4. The raw sqlite3 baseline
# ---------------------------------------------------------------------------

RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    queue       TEXT    NOT NULL,
    priority    INTEGER NOT NULL,
    payload     TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    ready       INTEGER,
    result      TEXT,
    created_at  REAL    NOT NULL,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS raw_jobs_ready
    ON raw_jobs (queue, priority DESC, ready) WHERE ready IS NOT NULL;
"""

# A job takes its place in line from the AUTOINCREMENT counter, as liteq's.
RAW_INSERT = """
    INSERT INTO raw_jobs (name, queue, priority, payload, status, ready,
                          created_at)
    VALUES (?, 'default', 0, ?, 'pending',
            1 + coalesce((SELECT seq FROM sqlite_sequence
                           WHERE name = 'raw_jobs'), 0), ?)
"""

RAW_CLAIM = """
    UPDATE raw_jobs
       SET status = 'running', ready = NULL,
           started_at = coalesce(started_at, :now)
     WHERE id = (SELECT id FROM raw_jobs
                  WHERE queue = 'default' AND ready IS NOT NULL
                  ORDER BY priority DESC, ready LIMIT 1)
 RETURNING id, name, payload
"""

RAW_DONE = """
    UPDATE raw_jobs SET status = 'done', result = ?, finished_at = ?
     WHERE id = ?
"""

RAW_NEXT_READY = """
    UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'raw_jobs'
 RETURNING seq
"""

RAW_CONTINUE = """
    UPDATE raw_jobs SET payload = ?, status = 'pending', ready = ?
     WHERE id = ?
"""


def raw_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def raw_create(path: str) -> sqlite3.Connection:
    conn = raw_connect(path)
    conn.executescript(RAW_SCHEMA)
    return conn


def raw_params(name: str, args: list) -> tuple:
    payload = json.dumps({"name": name, "args": args, "kwargs": {}},
                         separators=(",", ":"))
    return name, payload, time.time()


def raw_enqueue(conn: sqlite3.Connection, n: int) -> None:
    """``n`` inserts, one transaction each."""
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(RAW_INSERT, raw_params(NOOP, []))
        conn.execute("COMMIT")


def raw_batch(conn: sqlite3.Connection, n: int) -> None:
    """``n`` inserts by executemany in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(RAW_INSERT, (raw_params(NOOP, []) for _ in range(n)))
    conn.execute("COMMIT")


def raw_step(name: str, args: list) -> Any:
    """Run a raw job's call: a dict {"continue": args} continues it."""
    if name == STEPS and args[0] > 0:
        return {"continue": [args[0] - 1]}
    return None


def raw_run_one(conn: sqlite3.Connection) -> bool:
    """Claim, run and record one raw job; False if none was ready."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute(RAW_CLAIM, {"now": time.time()}).fetchall()
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    if not rows:
        return False
    job_id, name, payload = rows[0]
    call = json.loads(payload)
    value = raw_step(name, call["args"])
    conn.execute("BEGIN IMMEDIATE")
    try:
        if isinstance(value, dict) and "continue" in value:
            ready = conn.execute(RAW_NEXT_READY).fetchall()[0][0]
            payload = raw_params(name, value["continue"])[1]
            conn.execute(RAW_CONTINUE, (payload, ready, job_id))
        else:
            conn.execute(RAW_DONE, (json.dumps(value), time.time(), job_id))
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return True


def raw_drain(children: Children, path: str, label: str,
              jobs: int | None = None) -> tuple[int, float]:
    """Run a raw worker process and time its work.

    It runs ``jobs`` jobs, or by default until none is ready.
    """
    proc = children.bench(label, "_raw-worker", path, "drain",
                          *([str(jobs)] if jobs else []))
    try:
        proc.wait(600)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{label} did not finish in 600s") from None
    if proc.returncode != 0:
        raise BenchError(f"{label} exited with status {proc.returncode}"
                         f"{stderr_tail(proc)}")
    return span(path, "raw_jobs")

# ---------------------------------------------------------------------------
# 5. liteq measurements
# ---------------------------------------------------------------------------


def liteq_enqueue(tasks: Tasks, n: int) -> None:
    for _ in range(n):
        tasks.noop.delay()


def liteq_batch(queue: liteq.Queue, tasks: Tasks, n: int) -> None:
    with queue.batch():
        for _ in range(n):
            tasks.noop.delay()


def next_id(path: str) -> int:
    """No job stored in ``path`` from now on has a smaller id."""
    row = read_one(path, "SELECT seq FROM sqlite_sequence "
                         "WHERE name = 'liteq_jobs'")
    return (row[0] if row else 0) + 1


def failed_jobs(path: str, first_id: int = 1) -> int:
    return read_one(path, "SELECT count(*) FROM liteq_jobs WHERE id >= ? "
                          "AND status IN ('failed', 'cancelled')",
                    (first_id,))[0]


@dataclasses.dataclass
class Drain:
    jobs: int
    seconds: float
    peak_rss_mb: float | None

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def nth_id(path: str, first_id: int, n: int) -> int:
    """The id of the n-th job from ``first_id`` on."""
    row = read_one(path, "SELECT id FROM liteq_jobs WHERE id >= ? "
                         "ORDER BY id LIMIT 1 OFFSET ?", (first_id, n - 1))
    if row is None:
        raise BenchError(f"{path} has fewer than {n} jobs from {first_id}")
    return row[0]


def liteq_drain(children: Children, path: str, first_id: int, last: int,
                label: str, modules: tuple[str, ...] = WORKER_MODULES
                ) -> Drain:
    """Run a worker process until jobs ``first_id`` to ``last`` end.

    One worker thread runs jobs in line order, and ids come from the
    counter that orders the line, so job ``last`` ends last: polling
    that one row costs the worker nothing.
    """
    # One connection for all the polls: closing the last connection to a
    # file checkpoints it under an exclusive lock, and a liteq 0.1.0
    # worker that opens the file at that moment exits with "not a liteq
    # database (database is locked)".
    with contextlib.closing(sqlite3.connect(path, timeout=30,
                                            isolation_level=None)) as conn:
        proc = children.worker(label, path, modules)
        try:
            wait_for(lambda: conn.execute(
                "SELECT finished_at FROM liteq_jobs WHERE id = ?",
                (last,)).fetchone()[0] is not None,
                timeout=max(120.0, (last - first_id) / 50),
                what=f"{label} ran jobs {first_id} to {last}",
                watch=(proc,))
            rss = peak_rss_mb(proc.pid)
        finally:
            children.stop(proc, wait=False)
    failed = failed_jobs(path, first_id)
    if failed:
        raise BenchError(f"{failed} jobs failed in {label}; see "
                         f"{proc.stderr_path}")
    jobs, seconds = span(path, "liteq_jobs", first_id, last)
    return Drain(jobs, seconds, rss)


def template_row(path: str, kind: str) -> dict:
    """A real liteq row: one noop job, ``kind`` pending, done, or waiting
    (on a timer WAIT_COUNTDOWN seconds ahead: ``apply_async(countdown=)``).
    """
    with open_queue(path) as (queue, tasks):
        if kind == "waiting":
            job = tasks.noop.apply_async(countdown=WAIT_COUNTDOWN)
        else:
            job = tasks.noop.delay()
        if kind == "done":
            if not liteq.Worker(queue).run_once():
                raise BenchError("Worker.run_once() found no job to run")
            if job.status != "done":
                raise BenchError(f"the template job ended {job.status}")
        conn = sqlite3.connect(path)
        try:
            conn.row_factory = sqlite3.Row
            return dict(conn.execute("SELECT * FROM liteq_jobs WHERE id = ?",
                                     (job.id,)).fetchone())
        finally:
            conn.close()


TIME_COLUMNS = ("eta", "timer", "created_at", "started_at", "updated_at",
                "finished_at")
WAIT_COUNTDOWN = 86400.0  # seconds: the timers of filled waiting jobs


def fill(path: str, rows: int, kind: str) -> float:
    """Add ``rows`` copies of a real ``kind`` row (done, pending or
    waiting: see template_row); return seconds.

    Done copies get ready and timer NULL.  Pending copies each get their
    own place in line: ids and ``ready`` values past the template's, with
    sqlite_sequence moved past them, as liteq's own inserts would leave
    it.  Waiting copies stay out of line (``ready`` NULL, ``waiting``
    "timer"), each on its own timer, equal to its eta.  Copies are spread
    1 ms apart in time, ending at the template's (so waiting copies all
    wake about WAIT_COUNTDOWN seconds from now).
    """
    template = template_row(path, kind)
    for column in ("id", "status", "ready", "timer", "worker", "waiting"):
        if column not in template:
            raise BenchError(f"liteq_jobs has no column {column!r}: update "
                             f"fill() in bench_liteq.py to the new schema")
    values = dict(template)
    if kind == "done":
        if template["finished_at"] is None:
            raise BenchError("the template done row has no finished_at")
        values.update(status="done", ready=None, timer=None, worker=None)
    elif kind == "pending" and template["ready"] is None:
        raise BenchError("the template pending row has no ready value")
    elif kind == "waiting" and (
            template["waiting"] != "timer" or template["ready"] is not None
            or template["timer"] != template["eta"]):
        raise BenchError(f"the template waiting row is not out of line on "
                         f"its eta: waiting {template['waiting']!r}, ready "
                         f"{template['ready']!r}, timer {template['timer']!r}"
                         f", eta {template['eta']!r}")
    columns, exprs = [], []
    for column in template:
        if column == "id" or (column == "ready" and kind == "pending"):
            expr = ":base + x"
        elif column in TIME_COLUMNS and values[column] is not None:
            expr = f":{column} - (:rows - x) * 0.001"
        else:
            expr = f":{column}"
        columns.append(column)
        exprs.append(expr)
    sql = (f"INSERT INTO liteq_jobs ({', '.join(columns)}) "
           f"WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n "
           f"WHERE x < :rows) SELECT {', '.join(exprs)} FROM n")
    conn = raw_connect(path)
    try:
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(sql, {**values, "rows": rows, "base": template["id"]})
        conn.execute("UPDATE sqlite_sequence SET seq = (SELECT max(id) FROM "
                     "liteq_jobs) WHERE name = 'liteq_jobs'")
        conn.execute("COMMIT")
        seconds = time.perf_counter() - start
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return seconds
    finally:
        conn.close()


def latencies(task: liteq.TaskFunction, count: int,
              poll: float | None) -> list[float]:
    """ms from just before ``.delay()`` to the stamp its step returns.

    ``poll``: check the job's status this often (another process's
    worker: ``result()`` alone re-checks only every 50 ms).
    """
    rng = random.Random(7)
    out = []
    for _ in range(count):
        time.sleep(rng.uniform(0.002, 0.006))  # the worker is idle again
        before = time.time()
        job = task.delay()
        if poll is not None:
            deadline = time.monotonic() + 30
            while job.status not in ("done", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    raise BenchError(f"job {job.id} did not finish in 30s")
                time.sleep(poll)
        out.append((job.result(timeout=30) - before) * 1000)
    return out

# ---------------------------------------------------------------------------
# 6. The benchmark, measurement by measurement
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the final table."""

    metric: str
    liteq: float | None
    base: float | None
    unit: str
    base_label: str = "raw"
    ratio: float | None = None
    target: str = ""  # e.g. ">= 0.8" or "<= 5"
    applies_to: str = "ratio"  # what the target checks: ratio or liteq

    def __post_init__(self) -> None:
        if (self.ratio is None and self.liteq is not None and self.base
                and self.unit != "count"):
            self.ratio = self.liteq / self.base

    @property
    def verdict(self) -> str:
        if not self.target:
            return ""
        value = self.ratio if self.applies_to == "ratio" else self.liteq
        if value is None:
            return "-"
        op, limit = self.target.split()
        ok = value >= float(limit) if op == ">=" else value <= float(limit)
        return "ok" if ok else "MISS"


@dataclasses.dataclass
class Enqueued:
    """The outcome of (1): rates, and the files (3) drains."""

    rate: float
    raw_rate: float
    path: str
    raw_path: str


class Bench:
    """One run: the options, its directory, its children and its figures."""

    def __init__(self, opts: argparse.Namespace, workdir: str,
                 children: Children) -> None:
        self.n, self.quick = opts.n, opts.quick
        self.workdir, self.children = workdir, children
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        self._files = 0
        self._cache: dict[str, Any] = {}

    def db(self, label: str) -> str:
        """A fresh database path."""
        self._files += 1
        return os.path.join(self.workdir, f"{self._files:02d}-{label}.db")

    def pick(self, choices: tuple) -> Any:
        full, quick = choices
        return quick if self.quick else full

    def once(self, key: str, measure: Callable[[], Any]) -> Any:
        """Measure once per run; later sections reuse the figure."""
        if key not in self._cache:
            self._cache[key] = measure()
        return self._cache[key]

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = "" if row.ratio is None else f" (ratio {row.ratio:.2f})"
        print(f"  {row.metric}: {format_value(row.liteq, row.unit)}{ratio}",
              flush=True)

    # 1. and 2. -------------------------------------------------------------

    def enqueued(self) -> Enqueued:
        def measure() -> Enqueued:
            path, raw_path = self.db("enqueue"), self.db("raw-enqueue")
            ours, raw = [], []
            with open_queue(path) as (_, tasks), contextlib.closing(
                    raw_create(raw_path)) as conn:
                for _ in range(ROUNDS):
                    ours.append(timed(lambda: liteq_enqueue(tasks, self.n)))
                    raw.append(timed(lambda: raw_enqueue(conn, self.n)))
            return Enqueued(self.n / min(ours), self.n / min(raw), path,
                            raw_path)
        return self.once("enqueue", measure)

    def section_enqueue(self) -> None:
        done = self.enqueued()
        self.add(Row("1. enqueue, .delay() per commit", done.rate,
                     done.raw_rate, "jobs/s", target=">= 0.6"))

    def section_batch(self) -> None:
        ours, raw = [], []
        with open_queue(self.db("batch")) as (queue, tasks), \
                contextlib.closing(raw_create(self.db("raw-batch"))) as conn:
            for _ in range(ROUNDS):
                ours.append(timed(lambda: liteq_batch(queue, tasks, self.n)))
                raw.append(timed(lambda: raw_batch(conn, self.n)))
        self.add(Row("2. batch enqueue, one batch()", self.n / min(ours),
                     self.n / min(raw), "jobs/s",
                     base_label="raw executemany", target=">= 0.5"))

    # 3. --------------------------------------------------------------------

    def drain_round(self, label: str, path: str | None = None,
                    modules: tuple[str, ...] = WORKER_MODULES) -> Drain:
        """Store N no-op jobs (in a fresh file unless ``path``) and time a
        worker process (importing ``modules``) draining them."""
        path = path or self.db(label)
        first = next_id(path) if os.path.exists(path) else 1
        with open_queue(path) as (queue, tasks):
            liteq_batch(queue, tasks, self.n)
        return liteq_drain(self.children, path, first,
                           nth_id(path, first, self.n), f"{label}-worker",
                           modules)

    def raw_drain_round(self, label: str) -> float:
        path = self.db(label)
        with contextlib.closing(raw_create(path)) as conn:
            raw_batch(conn, self.n)
        jobs, seconds = raw_drain(self.children, path, label, self.n)
        return jobs / seconds

    def drain(self) -> tuple[Drain, float]:
        """liteq's drain and the raw one, best of alternating rounds."""
        def measure() -> tuple[Drain, float]:
            ours, raw = [], []
            for r in range(self.pick(DRAIN_ROUNDS)):
                ours.append(self.drain_round(f"drain-{r + 1}"))
                raw.append(self.raw_drain_round(f"raw-drain-{r + 1}"))
            return max(ours, key=lambda d: d.rate), max(raw)
        return self.once("drain", measure)

    def section_drain(self) -> None:
        drain, raw = self.drain()
        self.add(Row("3. drain, 1 worker process", drain.rate, raw,
                     "jobs/s", target=">= 1.0"))

    # 4. --------------------------------------------------------------------

    def section_steps(self) -> None:
        # Rounds alternate with drains, so both meet the same machine.
        ours, drains, raws = [], [], []
        for r in range(self.pick(DRAIN_ROUNDS)):
            path = self.db(f"steps-{r + 1}")
            with open_queue(path) as (_, tasks):
                job = tasks.steps.delay(self.n - 1)
            run = liteq_drain(self.children, path, job.id, job.id,
                              f"steps-{r + 1}-worker")
            ours.append(self.n / run.seconds)
            drains.append(self.drain_round(f"steps-drain-{r + 1}").rate)
            raw_path = self.db(f"raw-steps-{r + 1}")
            with contextlib.closing(raw_create(raw_path)) as conn:
                conn.execute(RAW_INSERT, raw_params(STEPS, [self.n - 1]))
            raws.append(self.n / raw_drain(self.children, raw_path,
                                           f"raw-steps-{r + 1}")[1])
        ours, raw = max(ours), max(raws)
        self.add(Row("4. continuation steps vs drain (3)", ours,
                     max(drains), "steps/s", base_label="liteq drain",
                     target=">= 0.8"))
        self.add(Row("4. continuation steps vs raw", ours, raw, "steps/s",
                     base_label="raw steps"))

    # 5. --------------------------------------------------------------------

    def section_latency(self) -> None:
        samples, cpu_seconds = self.pick(LATENCY_SAMPLES), self.pick(
            CPU_SECONDS)
        with open_queue(self.db("latency")) as (queue, tasks):
            proc = self.children.worker("latency-worker", queue.path)
            try:
                tasks.stamp.delay().result(timeout=60)  # the worker is up
                time.sleep(0.1)
                other = latencies(tasks.stamp, samples, poll=0.002)
                time.sleep(0.1)
                cpu = idle_cpu(proc, cpu_seconds)
                self.details["idle_worker_peak_rss_mb"] = peak_rss_mb(
                    proc.pid)
            finally:
                self.children.stop(proc, wait=False)
            with liteq.Worker(queue, threads=1):
                tasks.stamp.delay().result(timeout=60)
                time.sleep(0.1)
                inproc = latencies(tasks.stamp, samples, poll=None)
        self.details["latency_ms"] = {"other_process": other,
                                      "in_process": inproc}
        for where, values in (("other process", other),
                              ("in-process", inproc)):
            limits = ({50: 2, 99: 10} if where == "other process"
                      else {50: 1})  # the issue's targets, in ms
            for p in (50, 90, 99):
                target = f"<= {limits[p]}" if p in limits else ""
                self.add(Row(f"5. latency {where} p{p}",
                             percentile(values, p), None, "ms",
                             base_label="", target=target,
                             applies_to="liteq"))
        self.add(Row(f"5. idle worker CPU over {cpu_seconds:g} s", cpu,
                     None, "% core", base_label="", target="<= 1",
                     applies_to="liteq"))

    # 6. --------------------------------------------------------------------

    def section_scale(self) -> None:
        rows = self.pick(SCALE_ROWS)
        label = f"{rows:,}"
        rounds = self.pick(DRAIN_ROUNDS)
        # Each measurement on the full file alternates with the same one
        # on an empty file, best of the rounds, so that both meet the same
        # machine.
        empty, full = self.db("scale-empty"), self.db("scale-done")
        with open_queue(empty):
            pass
        self.details["fill_done_seconds"] = fill(full, rows, "done")
        times: dict[str, list[float]] = {empty: [], full: []}
        with open_queue(empty) as (_, empty_tasks), \
                open_queue(full) as (_, full_tasks):
            for _ in range(ROUNDS):
                for path, tasks in ((full, full_tasks), (empty, empty_tasks)):
                    times[path].append(
                        timed(lambda: liteq_enqueue(tasks, self.n)))
        self.add(Row(f"6. enqueue, {label} done rows", self.n / min(
            times[full]), self.n / min(times[empty]), "jobs/s",
            base_label="empty file", target=">= 0.8"))
        drains: dict[str, list[Drain]] = {empty: [], full: []}
        for r in range(rounds):
            for path in (full, empty):
                drains[path].append(self.drain_round(
                    f"scale-{r + 1}-{len(drains[path])}", path))
        best = {path: max(d.rate for d in runs)
                for path, runs in drains.items()}
        self.add(Row(f"6. drain, {label} done rows", best[full], best[empty],
                     "jobs/s", base_label="empty file", target=">= 0.8"))

        path = self.db("scale-pending")
        self.details["fill_pending_seconds"] = fill(path, rows, "pending")
        first = next_id(path) - rows
        pending, plain = [], []
        for r in range(rounds):
            last = nth_id(path, first, min(self.n, rows))
            pending.append(liteq_drain(self.children, path, first, last,
                                       f"scale-pending-{r + 1}-worker"))
            first = last + 1
            plain.append(self.drain_round(f"scale-plain-{r + 1}"))
        self.add(Row(f"6. worker peak RSS, {label} pending",
                     max(d.peak_rss_mb or 0 for d in pending),
                     max(d.peak_rss_mb or 0 for d in plain), "MiB",
                     base_label="worker of (3)", target="<= 64",
                     applies_to="liteq"))
        self.add(Row(f"6. drain, {label} pending",
                     max(d.rate for d in pending),
                     max(d.rate for d in plain), "jobs/s",
                     base_label="drain (3)", target=">= 0.8"))

    # 7. --------------------------------------------------------------------

    def section_multi(self) -> None:
        # Two questions, each answered by rounds that alternate one
        # worker and four under the same two producers, so that a slow
        # spell of this shared machine weighs on both:
        # - with a backlog, is the pool's drain at least one worker's, or
        #   does lock contention between the workers eat it (the target)?
        # - with no backlog the workers drain what the producers make; do
        #   the idle extra workers slow the producers down?
        busy_one, busy_four = self.multi_rounds(
            MULTI_ROUNDS, MULTI_SECONDS, backlog=True)
        fed_one, fed_four = self.multi_rounds(
            FED_ROUNDS, FED_SECONDS, backlog=False)
        raw = self.multi_raw(self.pick(RAW_MULTI_SECONDS))
        self.details["multi"] = {
            "backlog": {"four": busy_four, "one": busy_one},
            "as_produced": {"four": fed_four, "one": fed_one}, "raw": raw}
        ours = merge_outcomes([busy_one, busy_four, fed_one, fed_four])
        for line in ours["problems"][:10]:
            print(f"    {line}")
        who = f"{MULTI_WORKERS} workers + {MULTI_PRODUCERS} producers"
        self.add(Row("7. multi: errors reaching user code", ours["errors"],
                     raw["errors"], "count", target="<= 0",
                     applies_to="liteq"))
        self.add(Row("7. multi: ERROR/Traceback lines of workers",
                     ours["error_lines"], None, "count", base_label="",
                     target="<= 0", applies_to="liteq"))
        self.add(Row("7. multi: failed jobs", ours["failed"], None, "count",
                     base_label="", target="<= 0", applies_to="liteq"))
        self.add(Row(f"7. multi: drain, backlog, {who}", busy_four["drain"],
                     busy_one["drain"], "jobs/s",
                     base_label="1 worker + producers", target=">= 1.0"))
        self.add(Row(f"7. multi: drain, backlog, {who}", busy_four["drain"],
                     self.drain()[0].rate, "jobs/s",
                     base_label="1 worker, no producers"))
        self.add(Row("7. multi: enqueue meanwhile, backlog",
                     busy_four["enqueue"], busy_one["enqueue"], "jobs/s",
                     base_label="with 1 worker"))
        self.add(Row("7. multi: CPU of each producer, backlog",
                     busy_four["producer_cpu"], busy_one["producer_cpu"],
                     "% core", base_label="with 1 worker"))
        self.add(Row("7. multi: .delay() p99, backlog",
                     busy_four["delay_p99"], busy_one["delay_p99"], "ms",
                     base_label="with 1 worker"))
        self.add(Row("7. multi: .delay() longest, backlog",
                     busy_four["delay_max"], busy_one["delay_max"], "ms",
                     base_label="with 1 worker"))
        self.add(Row(f"7. multi: drain as produced, {who}",
                     fed_four["drain"], fed_one["drain"], "jobs/s",
                     base_label="1 worker + producers"))
        self.add(Row(f"7. multi: drain as produced, {who}",
                     fed_four["drain"], raw["drain"], "jobs/s",
                     base_label="raw, same"))
        self.add(Row(f"7. multi: enqueue by the {MULTI_PRODUCERS} producers",
                     fed_four["enqueue"], raw["enqueue"], "jobs/s",
                     base_label="raw, same"))

    def multi_rounds(self, rounds: tuple, seconds: tuple,
                     backlog: bool) -> tuple[dict, dict]:
        """Alternating rounds of one worker and of MULTI_WORKERS; the
        merged outcomes of each."""
        count = self.pick(rounds)
        each = self.pick(seconds) / count
        one_runs, four_runs = [], []
        for r in range(count):
            for workers, runs in ((1, one_runs), (MULTI_WORKERS, four_runs)):
                finish = self.multi_liteq(each, workers, backlog,
                                          f"-{r + 1}")
                self.children.reap()
                runs.append(finish())
        return merge_outcomes(one_runs), merge_outcomes(four_runs)

    def multi_liteq(self, seconds: float, count: int, backlog: bool,
                    tag: str = "") -> Callable[[], dict]:
        """Run ``count`` workers and the producers; return what reads
        their outcome.

        With ``backlog`` the file starts with more pending jobs than the
        workers can run in ``seconds``, and they start on them at once.
        The workers are stopped but not waited for: call the result once
        they have exited (after reap()).
        """
        kind = "backlog" if backlog else "fed"
        path = self.db(f"multi-{kind}{count}{tag}")
        with open_queue(path):
            pass
        if backlog:
            fill(path, int(BACKLOG_RATE * (seconds + 2)), "pending")
        last_of_backlog = next_id(path) - 1
        workers = [self.children.worker(f"multi-{kind}{count}{tag}-"
                                        f"worker{i + 1}", path)
                   for i in range(count)]
        try:
            reports = self.run_producers(f"multi-{kind}{count}{tag}-"
                                         f"producer", "_producer", path,
                                         seconds, workers, settle=not backlog)
        finally:
            self.children.stop(*workers, wait=False)
        return lambda: self.multi_outcome(path, workers, reports,
                                          last_of_backlog if backlog else 0)

    @staticmethod
    def multi_outcome(path: str, workers: list, reports: list[dict],
                      backlog_end: int = 0) -> dict:
        start = min(r["start"] for r in reports)
        end = max(r["end"] for r in reports)
        errors: collections.Counter = collections.Counter()
        for report in reports:
            errors.update(report["errors"])
        lock_lines, error_lines = [], []
        for proc in workers:
            for line in stderr_text(proc).splitlines():
                if any(word in line for word in LOCK_WORDS):
                    lock_lines.append(f"{proc.label}: {line}")
                if any(word in line for word in ERROR_WORDS):
                    error_lines.append(f"{proc.label}: {line}")
        if backlog_end and not read_one(
                path, "SELECT count(*) FROM liteq_jobs WHERE id <= ? AND "
                "status = 'pending'", (backlog_end,))[0]:
            raise BenchError(f"{path}: the workers ran out of backlog; "
                             f"raise BACKLOG_RATE")
        return {
            "seconds": end - start,
            "drain": done_between(path, "liteq_jobs", start, end)
            / (end - start),
            "enqueue": sum(r["delayed"] for r in reports) / (end - start),
            # % of one core each producer used, on average
            "producer_cpu": 100 * sum(r["cpu"] for r in reports)
            / len(reports) / (end - start),
            # ms one .delay() took: the worst producer's p99, the longest
            "delay_p99": max(r["p99_ms"] or 0.0 for r in reports),
            "delay_max": max(r["max_ms"] or 0.0 for r in reports),
            "errors": sum(errors.values()) + len(lock_lines),
            "error_lines": len(error_lines), "failed": failed_jobs(path),
            "problems": list(errors) + lock_lines + error_lines,
            "producer_errors": dict(errors),
            "worker_lines": (lock_lines + error_lines)[:50]}

    def multi_raw(self, seconds: float) -> dict:
        path = self.db("raw-multi")
        raw_create(path).close()
        workers = [self.children.bench(f"raw-multi-worker{i + 1}",
                                       "_raw-worker", path, "serve",
                                       stdout=subprocess.PIPE)
                   for i in range(MULTI_WORKERS)]
        producers = self.run_producers("raw-multi-producer",
                                       "_raw-producer", path, seconds,
                                       workers)
        reports = []
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            out, _ = proc.communicate(timeout=STOP_TIMEOUT)
            if proc.returncode != 0:
                raise BenchError(f"{proc.label} exited with status "
                                 f"{proc.returncode}{stderr_tail(proc)}")
            reports.append(json.loads(out))
        start = min(r["start"] for r in producers)
        end = max(r["end"] for r in producers)
        return {
            "seconds": end - start,
            "drain": done_between(path, "raw_jobs", start, end)
            / (end - start),
            "enqueue": sum(r["delayed"] for r in producers) / (end - start),
            "errors": sum(sum(r["errors"].values())
                          for r in producers + reports),
            "problems": [key for r in producers + reports
                         for key in r["errors"]][:50]}

    def run_producers(self, label: str, entry: str, path: str,
                      seconds: float, workers: list,
                      settle: bool = False) -> list[dict]:
        """Run the producers after the workers' start-up; their reports.

        ``settle``: wait until the workers are idle (liteq workers sleep
        when idle); else give them half a second to start.
        """
        if settle:
            settle_down(workers)
        else:
            time.sleep(0.5)
        start_at = time.time() + 0.5  # the producers' own start-up
        producers = [self.children.bench(
            f"{label}{i + 1}", entry, path, str(seconds), str(start_at),
            stdout=subprocess.PIPE) for i in range(MULTI_PRODUCERS)]
        reports = []
        for proc in producers:
            out, _ = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise BenchError(f"{proc.label} exited with status "
                                 f"{proc.returncode}{stderr_tail(proc)}")
            reports.append(json.loads(out))
        for proc in workers:
            if proc.poll() is not None:
                raise BenchError(f"{proc.label} ended during the run with "
                                 f"status {proc.returncode}"
                                 f"{stderr_tail(proc)}")
        return reports

    # 8. --------------------------------------------------------------------

    def section_timers(self) -> None:
        rows = self.pick(WAITING_ROWS)
        label = f"{rows:,} waiting"
        # One file with the waiting jobs, built once; each round drains N
        # fresh jobs on it, alternating with the same on a file where none
        # waits (the waiting jobs' timers are a day ahead: none wakes).
        waiting, none = self.db("timers-waiting"), self.db("timers-none")
        with open_queue(none):
            pass
        self.details["fill_waiting_seconds"] = fill(waiting, rows,
                                                    "waiting")
        first = next_id(waiting) - rows
        self.details["waiting_sample"] = check_waiting(waiting, first, rows)
        drains: dict[str, list[Drain]] = {waiting: [], none: []}
        for r in range(self.pick(TIMER_ROUNDS)):
            for path in (waiting, none) if r % 2 == 0 else (none, waiting):
                tag = "waiting" if path == waiting else "none"
                drains[path].append(self.drain_round(
                    f"timers-{r + 1}-{tag}", path))
        if check_waiting(waiting, first, rows) != \
                self.details["waiting_sample"]:
            raise BenchError(f"{waiting}: waiting jobs changed while the "
                             f"drains ran")
        self.details["timers_drain"] = {
            tag: [d.rate for d in drains[path]]
            for tag, path in (("waiting", waiting), ("none", none))}
        self.add(Row(f"8. drain, {label} on timers",
                     max(d.rate for d in drains[waiting]),
                     max(d.rate for d in drains[none]), "jobs/s",
                     base_label="none waiting", target=">= 0.9"))
        # (c) before (b): the same file, idle workers on both.
        idle = self.idle_with_waiting(waiting, none)
        self.add(Row(f"8. worker peak RSS, {label}",
                     max([d.peak_rss_mb or 0 for d in drains[waiting]]
                         + [idle["waiting"]["peak_rss_mb"] or 0]),
                     max(d.peak_rss_mb or 0 for d in drains[none]), "MiB",
                     base_label="none waiting", target="<= 64",
                     applies_to="liteq"))
        self.wake_precision()
        seconds = self.pick(IDLE_WAITING_SECONDS)
        self.add(Row(f"8. idle worker CPU over {seconds:g} s, {label}",
                     idle["waiting"]["cpu"], idle["none"]["cpu"], "% core",
                     base_label="none waiting", target="<= 1",
                     applies_to="liteq"))
        self.add(Row(f"8. idle worker wake-ups, {label}",
                     idle["waiting"]["wakeups"], idle["none"]["wakeups"],
                     "per s", base_label="none waiting"))

    def idle_with_waiting(self, waiting: str, none: str) -> dict:
        """Idle worker processes on both files, measured over the same
        seconds: CPU, wake-ups (voluntary context switches of all their
        threads) and peak RSS."""
        procs = {"waiting": self.children.worker("timers-idle-waiting",
                                                 waiting),
                 "none": self.children.worker("timers-idle-none", none)}
        try:
            with open_queue(none) as (_, tasks):  # a worker is up and idle
                tasks.stamp.delay().result(timeout=60)
            settle_down(list(procs.values()))
            usage = idle_usage(list(procs.values()),
                               self.pick(IDLE_WAITING_SECONDS))
            for proc in procs.values():
                if proc.poll() is not None:
                    raise BenchError(f"{proc.label} exited with status "
                                     f"{proc.returncode} while idle"
                                     f"{stderr_tail(proc)}")
        finally:
            self.children.stop(*procs.values(), wait=False)
        out = {tag: {"cpu": cpu, "wakeups": wakeups,
                     "peak_rss_mb": peak_rss_mb(procs[tag].pid)}
               for tag, (cpu, wakeups) in zip(procs, usage)}
        self.details["timers_idle"] = out
        return out

    def wake_precision(self) -> None:
        """Waits with an idle worker: in this process, then in another."""
        count, gap = self.pick(WAKE_SAMPLES), self.pick(WAKE_GAP)
        found = {}
        with open_queue(self.db("wake-in-process")) as (queue, tasks):
            with liteq.Worker(queue, threads=1):
                tasks.stamp.delay().result(timeout=60)
                time.sleep(0.1)
                found["in-process"] = wake_delays(tasks, count, gap)
        with open_queue(self.db("wake-other")) as (queue, tasks):
            proc = self.children.worker("wake-worker", queue.path)
            try:
                tasks.stamp.delay().result(timeout=60)
                time.sleep(0.1)
                found["other process"] = wake_delays(tasks, count, gap)
            finally:
                self.children.stop(proc, wait=False)
        self.details["wake_ms"] = found
        early = 0
        for where, values in found.items():
            early += sum(1 for v in values if v < 0)
            for p, target in ((50, ""), (99, "<= 50"), (100, "")):
                value = max(values) if p == 100 else percentile(values, p)
                self.add(Row(f"8. wake-up {where}, "
                             f"{'max' if p == 100 else f'p{p}'}", value,
                             None, "ms", base_label="", target=target,
                             applies_to="liteq"))
        self.add(Row(f"8. steps started before their wake time "
                     f"(of {2 * count})", early, None, "count",
                     base_label="", target="<= 0", applies_to="liteq"))

    # 9. --------------------------------------------------------------------

    def section_schedules(self) -> None:
        label = f"{SCHEDULES:,}"
        far = far_schedules(SCHEDULES, time.time())
        with open(os.path.join(self.workdir, "benchperiodic.py"), "w") as f:
            f.write(PERIODIC_MODULE.format(far=far))
        # Three files: no schedule; SCHEDULES stored with q.schedule(); the
        # same declared in code, stored by each worker that imports
        # benchperiodic when it starts (only those fire them).
        paths = {"none": self.db("sched-none"),
                 "stored": self.db("sched-stored"),
                 "declared": self.db("sched-declared")}
        modules = {"none": WORKER_MODULES, "stored": WORKER_MODULES,
                   "declared": DECLARING_MODULES}
        with open_queue(paths["none"]), open_queue(paths["declared"]):
            pass
        with open_queue(paths["stored"]) as (queue, tasks):
            self.details["store_schedules_seconds"] = timed(lambda: [
                queue.schedule(name, tasks.noop(), every=every)
                for name, every in far])
        check_far(paths["stored"], "api")
        drains: dict[str, list[Drain]] = {tag: [] for tag in paths}
        for r in range(self.pick(SCHEDULE_ROUNDS)):
            for tag in list(paths) if r % 2 == 0 else list(paths)[::-1]:
                drains[tag].append(self.drain_round(
                    f"sched-{r + 1}-{tag}", paths[tag], modules[tag]))
        self.details["schedules_drain"] = {
            tag: [d.rate for d in runs] for tag, runs in drains.items()}
        best = {tag: max(d.rate for d in runs)
                for tag, runs in drains.items()}
        for tag in ("stored", "declared"):
            self.add(Row(f"9. drain, {label} {tag} schedules", best[tag],
                         best["none"], "jobs/s", base_label="no schedules",
                         target=">= 0.9"))
        idle = self.idle_and_firing(paths, modules)
        check_far(paths["stored"], "api")
        check_far(paths["declared"], "code")
        seconds = self.pick(IDLE_SCHEDULE_SECONDS)
        for tag in ("stored", "declared"):
            self.add(Row(f"9. idle worker CPU over {seconds:g} s, {label} "
                         f"{tag}", idle[tag]["cpu"], idle["none"]["cpu"],
                         "% core", base_label="no schedules",
                         target="<= 1", applies_to="liteq"))
        for tag in ("stored", "declared"):
            self.add(Row(f"9. idle worker wake-ups, {label} {tag}",
                         idle[tag]["wakeups"], idle["none"]["wakeups"],
                         "per s", base_label="no schedules"))

    def idle_and_firing(self, paths: dict[str, str],
                        modules: dict[str, tuple[str, ...]]) -> dict:
        """Idle worker processes on ``paths``, measured over the same
        seconds as in (8), while a worker on a fourth file fires short
        schedules (see fire_slots).  Returns the idle figures."""
        seconds = self.pick(IDLE_SCHEDULE_SECONDS)
        fast = self.db("sched-fast")
        with open_queue(fast):
            pass
        procs = {tag: self.children.worker(f"sched-idle-{tag}", path,
                                           modules[tag])
                 for tag, path in paths.items()}
        firing = self.children.worker("sched-fast-worker", fast)
        watch = (*procs.values(), firing)
        usage: list = []
        try:
            with open_queue(fast) as (queue, tasks):
                tasks.stamp.delay().result(timeout=60)  # it is up and idle
            for tag, path in paths.items():  # each is up and idle
                with open_queue(path) as (_, tasks):
                    tasks.stamp.delay().result(timeout=60)
            settle_down(list(watch))
            meter = threading.Thread(target=lambda: usage.extend(
                idle_usage(list(procs.values()), seconds)))
            meter.start()
            try:
                self.fire_slots(fast, firing, watch)
            finally:
                meter.join()
            for proc in procs.values():  # (fire_slots stops ``firing``)
                if proc.poll() is not None:
                    raise BenchError(f"{proc.label} exited with status "
                                     f"{proc.returncode} while idle"
                                     f"{stderr_tail(proc)}")
        finally:
            self.children.stop(*watch, wait=False)
        out = {tag: {"cpu": cpu, "wakeups": wakeups,
                     "peak_rss_mb": peak_rss_mb(procs[tag].pid)}
               for tag, (cpu, wakeups) in zip(procs, usage)}
        self.details["schedules_idle"] = out
        return out

    def fire_slots(self, path: str, proc: subprocess.Popen,
                   watch: tuple) -> None:
        """Store FAST_EVERY schedules for the idle worker ``proc`` of
        ``path``; once SLOT_SAMPLES slots have run, pause them, let what
        fired finish and stop it; then time and check every slot."""
        wanted = self.pick(SLOT_SAMPLES)
        names = [f"fast-{i}" for i in range(len(FAST_EVERY))]
        with open_queue(path) as (queue, tasks), contextlib.closing(
                sqlite3.connect(path, timeout=30,
                                isolation_level=None)) as conn:
            for i, (name, every) in enumerate(zip(names, FAST_EVERY)):
                # Half may overlap: a slot fired early, or twice, then
                # runs rather than being skipped as still unfinished.
                queue.schedule(name, tasks.slot_stamp(name), every=every,
                               overlap="allow" if i % 2 else "skip")
            firsts = dict(conn.execute(
                "SELECT name, next_slot FROM liteq_schedules"))

            def finished() -> int:
                return conn.execute(
                    "SELECT count(*) FROM liteq_jobs WHERE scheduled_for "
                    "IS NOT NULL AND finished_at IS NOT NULL").fetchone()[0]

            wait_for(lambda: finished() >= wanted, timeout=60 + wanted,
                     what=f"{proc.label} fired {wanted} slots", watch=watch)
            paused = time.time()
            for name in names:
                queue.pause_schedule(name)
            wait_for(lambda: conn.execute(
                "SELECT count(*) FROM liteq_jobs WHERE scheduled_for IS NOT "
                "NULL AND finished_at IS NULL").fetchone()[0] == 0,
                timeout=30, what=f"{proc.label} ran the slots it fired",
                watch=watch)
            self.children.stop(proc, wait=False)
            fired = []
            for job_id, call, slot, created, status in conn.execute(
                    "SELECT id, call, scheduled_for, created_at, status "
                    "FROM liteq_jobs WHERE scheduled_for IS NOT NULL "
                    "ORDER BY scheduled_for, id").fetchall():
                if status != "done":
                    raise BenchError(f"{path}: fired job {job_id} ended "
                                     f"{status}")
                try:
                    name = json.loads(call)["args"][0]
                except (ValueError, KeyError, IndexError, TypeError):
                    raise BenchError(f"{path}: cannot read the schedule of "
                                     f"job {job_id} from its call {call!r}: "
                                     f"update fire_slots()") from None
                fired.append((name, slot, created,
                              queue.get(job_id).result(timeout=30)))
            skipped = conn.execute("SELECT sum(skipped) FROM "
                                   "liteq_schedules").fetchone()[0]
        every = dict(zip(names, FAST_EVERY))
        wrong = check_slots(fired, firsts, every, paused - 1.0)
        wrong["skipped"] = skipped
        timed_slots = fired[:wanted]
        started = [(stamp - slot) * 1000 for _, slot, _, stamp in
                   timed_slots]
        stored = [(created - slot) * 1000 for _, slot, created, _ in
                  timed_slots]
        self.details["slots"] = {"fired": len(fired), "wrong": wrong,
                                 "started_ms": started,
                                 "fired_ms": stored}
        for p, target in ((50, ""), (99, "<= 1000"), (100, "")):
            value = max(started) if p == 100 else percentile(started, p)
            self.add(Row(f"9. slot to its step's start, "
                         f"{'max' if p == 100 else f'p{p}'}", value, None,
                         "ms", base_label="", target=target,
                         applies_to="liteq"))
        self.add(Row("9. slot to its job stored (fired), p99",
                     percentile(stored, 99), None, "ms", base_label=""))
        bad = sum(v for k, v in wrong.items() if k != "skipped")
        if bad or skipped:
            print(f"  wrong slots: {wrong}", flush=True)
        self.add(Row("9. slots fired twice, early, off or missed", bad,
                     None, "count", base_label="", target="<= 0",
                     applies_to="liteq"))
        # An idle worker running steps of a millisecond has no reason to
        # skip a slot: each one was counted skipped by the schedule.
        self.add(Row("9. slots the schedules counted skipped", skipped,
                     None, "count", base_label="", target="<= 0",
                     applies_to="liteq"))


def settle_down(procs: list[subprocess.Popen],
                timeout: float = 30.0) -> None:
    """Wait until ``procs`` stop using CPU: started up and idle, so that
    their start-up does not eat into a measurement."""
    deadline = time.monotonic() + timeout
    last, quiet = None, 0
    while quiet < 3 and time.monotonic() < deadline:
        ticks = [cpu_ticks(proc.pid) for proc in procs]
        quiet = quiet + 1 if ticks == last else 0
        last = ticks
        time.sleep(0.1)


def merge_outcomes(runs: list[dict]) -> dict:
    """One outcome of several multi_outcome() rounds: rates over their
    total time, counts summed."""
    seconds = sum(r["seconds"] for r in runs)
    merged = {"seconds": seconds, "problems": [], "worker_lines": [],
              "producer_errors": collections.Counter()}
    for key in ("drain", "enqueue", "producer_cpu"):
        merged[key] = sum(r[key] * r["seconds"] for r in runs) / seconds
    for key in ("errors", "error_lines", "failed"):
        merged[key] = sum(r[key] for r in runs)
    for key in ("delay_p99", "delay_max"):  # the worst round's
        merged[key] = max(r[key] for r in runs)
    for r in runs:
        merged["problems"] += r["problems"]
        merged["worker_lines"] += r["worker_lines"]
        merged["producer_errors"].update(r["producer_errors"])
    merged["producer_errors"] = dict(merged["producer_errors"])
    return merged


def idle_cpu(proc: subprocess.Popen, seconds: float) -> float | None:
    """% of one core a process used over ``seconds`` from now."""
    before, start = cpu_ticks(proc.pid), time.monotonic()
    time.sleep(seconds)
    after, wall = cpu_ticks(proc.pid), time.monotonic() - start
    if before is None or after is None:
        return None
    return 100.0 * (after - before) / os.sysconf("SC_CLK_TCK") / wall


def check_waiting(path: str, first: int, rows: int) -> list[tuple]:
    """Read a sample of fill()'s waiting copies (ids ``first`` on) through
    liteq: each must be pending, waiting on a timer, with its eta a day
    ahead.  Returns what was read, to compare later."""
    ids = sorted({first, first + rows - 1,
                  *random.Random(5).sample(range(first, first + rows), 8)})
    sample = []
    queue = liteq.Queue(path)
    try:
        now = time.time()
        for job_id in ids:
            job = queue.get(job_id)
            if job is None:
                raise BenchError(f"{path}: no job {job_id}")
            found = (job_id, job.status, job.waiting, job.eta.timestamp())
            if found[1:3] != ("pending", "timer") or found[3] < now + 3600:
                raise BenchError(f"{path}: job {job_id} is not waiting on "
                                 f"a timer a day ahead: {found}")
            sample.append(found)
    finally:
        queue.close()
    return sample


def wake_delays(tasks: Tasks, count: int, gap: float) -> list[float]:
    """ms from each wait's end (the job's stored eta) to the stamp the
    step after it took as its first act; negative: it started early.

    The waits start about ``gap`` apart and last WAKE_WAITS seconds, so
    several overlap and the worker sleeps until the next one ends; every
    other one is a countdown (``apply_async(countdown=)``), the others a
    step returning ``stamp().after(seconds=)``.
    """
    rng = random.Random(11)
    jobs = []
    for i in range(count):
        time.sleep(rng.uniform(0.5, 1.5) * gap)
        wait = rng.uniform(*WAKE_WAITS)
        jobs.append(tasks.stamp.apply_async(countdown=wait) if i % 2 == 0
                    else tasks.wait_stamp.delay(wait))
    out = []
    for job in jobs:
        started = job.result(timeout=60)
        out.append((started - job.eta.timestamp()) * 1000)
    return out


def idle_usage(procs: list[subprocess.Popen],
               seconds: float) -> list[tuple[float | None, float | None]]:
    """% of one core, and wake-ups per second, of each process over the
    same ``seconds`` from now."""
    before = [(cpu_ticks(p.pid), wakeups(p.pid)) for p in procs]
    start = time.monotonic()
    time.sleep(seconds)
    after = [(cpu_ticks(p.pid), wakeups(p.pid)) for p in procs]
    wall = time.monotonic() - start
    out = []
    for (ticks0, woke0), (ticks1, woke1) in zip(before, after):
        cpu = None if ticks0 is None or ticks1 is None else (
            100.0 * (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / wall)
        woke = None if woke0 is None or woke1 is None else (
            (woke1 - woke0) / wall)
        out.append((cpu, woke))
    return out


def far_schedules(count: int, now: float) -> list[tuple[str, float]]:
    """``count`` schedules (name, every) for (9): every about 30 days,
    each a different one, so their slots fall apart; a schedule whose
    next slot would come within FAR_MARGIN of ``now`` is left out."""
    out: list[tuple[str, float]] = []
    i = 0
    while len(out) < count:
        every = FAR_EVERY + 7 * i
        if (math.floor(now / every) + 1) * every - now > FAR_MARGIN:
            out.append((f"far-{i:04d}", every))
        i += 1
    return out


def check_far(path: str, origin: str) -> None:
    """The SCHEDULES schedules of ``origin`` in ``path`` are all there,
    none has fired or skipped a slot, and the soonest is hours ahead."""
    count, soonest, fired_slots, skipped = read_one(
        path, "SELECT count(*), min(next_slot), count(last_slot), "
              "coalesce(sum(skipped), 0) FROM liteq_schedules "
              "WHERE origin = ?", (origin,))
    jobs = read_one(path, "SELECT count(*) FROM liteq_jobs "
                          "WHERE scheduled_for IS NOT NULL")[0]
    if (count != SCHEDULES or fired_slots or skipped or jobs
            or soonest < time.time() + 3600):
        raise BenchError(
            f"{path}: expected {SCHEDULES} {origin!r} schedules, none "
            f"fired, the soonest hours ahead; found {count}, {fired_slots} "
            f"fired, {skipped} skipped, {jobs} fired jobs, the soonest "
            f"{(soonest or 0) - time.time():.0f} s ahead")


def check_slots(fired: list[tuple], firsts: dict[str, float],
                every: dict[str, float], due_by: float) -> dict[str, int]:
    """Count what went wrong with the slots ``fired`` (schedule name,
    slot, fired at, step start), schedules starting at ``firsts`` with
    ``every``: a slot fired twice, fired or started before its time, off
    its schedule's grid, or missed (not fired though its time came
    before ``due_by``)."""
    seen: collections.Counter = collections.Counter()
    wrong = {"twice": 0, "early": 0, "off_grid": 0, "missed": 0}
    for name, slot, created, started in fired:
        k = round((slot - firsts[name]) / every[name])
        if k < 0 or abs(firsts[name] + k * every[name] - slot) > 1e-3:
            wrong["off_grid"] += 1
            continue
        seen[name, k] += 1
        if created < slot - 1e-6 or started < slot:
            wrong["early"] += 1
    wrong["twice"] = sum(n - 1 for n in seen.values())
    for name, first in firsts.items():
        k = 0
        while first + k * every[name] < due_by:
            wrong["missed"] += (name, k) not in seen
            k += 1
    return wrong


SECTIONS = {
    "enqueue": Bench.section_enqueue,
    "batch": Bench.section_batch,
    "drain": Bench.section_drain,
    "steps": Bench.section_steps,
    "latency": Bench.section_latency,
    "scale": Bench.section_scale,
    "multi": Bench.section_multi,
    "timers": Bench.section_timers,
    "schedules": Bench.section_schedules,
}

# ---------------------------------------------------------------------------
# 7. Report: table and JSON
# ---------------------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("jobs/s", "steps/s"):
        return f"{value:,.0f} {unit}"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "per s":
        return f"{value:,.1f} /s"
    return f"{value:,.2f} {unit}"


def print_table(rows: list[Row]) -> None:
    header = ("metric", "liteq", "baseline", "vs", "ratio", "target", "")
    lines = [header]
    for row in rows:
        target = row.target
        if target and row.applies_to == "liteq":
            target = f"value {target}"
        lines.append((
            row.metric, format_value(row.liteq, row.unit),
            format_value(row.base, row.unit) if row.base is not None
            else "", row.base_label,
            "" if row.ratio is None else f"{row.ratio:.2f}", target,
            row.verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(7)]
    right = {1, 2, 4}
    for i, line in enumerate(lines):
        cells = [cell.rjust(w) if col in right else cell.ljust(w)
                 for col, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def meta(opts: argparse.Namespace, workdir: str) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"),
        "liteq": liteq.__version__, "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(),
        "n": opts.n, "quick": opts.quick, "filesystem": fs_type(workdir),
        "load_average_at_start": load_average(),
    }


def load_average() -> float | None:
    """The 1-minute load average: how busy the shared machine was."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 1)
    return None


def write_json(path: str, info: dict, bench: Bench,
               crashed: list[str]) -> None:
    rows = [{**dataclasses.asdict(row), "verdict": row.verdict}
            for row in bench.rows]
    with open(path, "w") as f:
        json.dump({"meta": info, "rows": rows, "details": bench.details,
                   "crashed": crashed}, f, indent=2)
        f.write("\n")

# ---------------------------------------------------------------------------
# 8. Profile (--profile)
# ---------------------------------------------------------------------------

# Each scenario runs three times on fresh files: once plain (the time per
# job), once with every SQL statement counted and timed from liteq's DEBUG
# log, once under cProfile.  Tracing and profiling never share a pass, so
# neither distorts the other's figures.
#
# liteq sends every statement through liteq._execute, which logs it on
# logger "liteq" at DEBUG (``sql: TEXT PARAMS``, or ``sql: TEXT xN`` for
# executemany) just before running it.  sql_timer() listens to that log:
# no private class of liteq is needed.  A record says when a statement
# started, not when it ended, so each statement is charged the time from
# its record to the next record of the same thread: the statement itself
# AND the Python work between it and the next one (fetching rows,
# decoding, running a step, encoding the next call).  The figures say
# where the time lies between statements, not how long SQLite took.
#
# A thread's last statement of the block is counted but not timed: after
# it the thread may go idle until the block ends, and that wait is no
# statement's cost.  A Worker thread also goes idle before its first job
# (start-up) and after its last (until the block sees the jobs done and
# stops it), between statements; so for a Worker's pass only statements
# sent inside the pass's timed window (first job's start to last job's
# end, as the jobs table says) go into the table, and those outside it
# are summed on one line.  The longest single span is printed, so an idle
# wait left inside would show (a COMMIT that checkpoints the WAL is a
# real long span).  DEBUG logging costs time (a LogRecord per statement,
# and liteq's INFO records, which DEBUG lets through too): in the traced
# pass only, but in all of its figures (the spans, the write lock held),
# so its excess over the plain pass is shown.

HELD = "BEGIN IMMEDIATE to the start of COMMIT/ROLLBACK"
RAW_LOGGER = "bench_liteq.raw"  # the raw loops' statements, traced


@dataclasses.dataclass
class SqlTally:
    """``statements``: {statement text: [calls, seconds]}, the seconds
    from each record to its thread's next; ``held``: [transactions,
    seconds] from each BEGIN IMMEDIATE record to its thread's COMMIT or
    ROLLBACK record (how long other processes may wait for the write
    lock, less the COMMIT itself); ``longest``: (seconds, statement) of
    the longest span counted; ``outside``: [statements, seconds] sent
    outside the window."""

    statements: dict[str, list] = dataclasses.field(default_factory=dict)
    held: list = dataclasses.field(default_factory=lambda: [0, 0.0])
    longest: tuple[float, str] = (0.0, "")
    outside: list = dataclasses.field(default_factory=lambda: [0, 0.0])

    def charge(self, previous: tuple[str, float, bool], now: float) -> None:
        text, then, inside = previous
        if not inside:
            self.outside[1] += now - then
            return
        self.statements[text][1] += now - then
        if now - then > self.longest[0]:
            self.longest = (now - then, text)


class SqlLog(logging.Handler):
    """Collects the ``sql:`` records of chosen threads; tally() sums them.

    emit() only notes (thread, statement, perf_counter, record.created),
    so the traced pass pays little beyond the logging itself.
    """

    def __init__(self, threads: Callable[[str], bool]) -> None:
        super().__init__(logging.DEBUG)
        self.threads = threads
        self.records: list[tuple[int | None, str, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        now = time.perf_counter()  # first, so little of this is charged
        if not (isinstance(record.msg, str) and
                record.msg.startswith("sql: ") and
                isinstance(record.args, tuple) and record.args and
                self.threads(record.threadName or "")):
            return  # liteq's INFO records, other threads
        # args[0] is the statement, whitespace collapsed; params dropped.
        text = str(record.args[0])
        if record.msg.endswith("x%d"):
            text += "  (executemany)"
        self.records.append((record.thread, text, now, record.created))

    def tally(self, window: tuple[float, float] | None = None) -> SqlTally:
        """Sum the records; with ``window`` (time.time() seconds, first
        and last), only those made inside it, the rest in ``outside``."""
        found = SqlTally()
        last: dict[int | None, tuple[str, float, bool]] = {}
        began: dict[int | None, float] = {}
        for thread, text, now, created in self.records:
            inside = window is None or window[0] <= created <= window[1]
            previous = last.get(thread)
            if previous is not None:
                found.charge(previous, now)
            last[thread] = (text, now, inside)
            if not inside:
                found.outside[0] += 1
                continue
            found.statements.setdefault(text, [0, 0.0])[0] += 1
            if text == "BEGIN IMMEDIATE":
                began[thread] = now
            elif text in ("COMMIT", "ROLLBACK") and thread in began:
                found.held[0] += 1
                found.held[1] += now - began.pop(thread)
        return found


@contextlib.contextmanager
def sql_timer(threads: Callable[[str], bool],
              name: str = "liteq") -> Iterator[SqlLog]:
    """Collect the statements chosen threads log on logger ``name``.

    Sets that logger to DEBUG for the block, with no propagation (no
    DEBUG record reaches a root handler), and restores both after.
    """
    log = logging.getLogger(name)
    found = SqlLog(threads)
    level, propagate = log.level, log.propagate
    log.addHandler(found)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield found
    finally:
        log.setLevel(level)
        log.propagate = propagate
        log.removeHandler(found)


class LoggedConnection:
    """A raw connection whose statements are logged as liteq._execute
    logs its own (at DEBUG, on logger RAW_LOGGER), for sql_timer; so the
    raw loops pay the same logging cost in their traced pass as liteq."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._log = logging.getLogger(RAW_LOGGER)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("sql: %s %r", " ".join(sql.split()), params)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("sql: %s x%d", " ".join(sql.split()), len(rows))
        return self._conn.executemany(sql, rows)


# Up to Python 3.11 a cProfile.Profile sees only the thread that enabled
# it; from 3.12 it uses sys.monitoring, sees every thread, and only one
# may be active, so the per-thread profiles below are skipped there.
PER_THREAD_PROFILES = sys.version_info < (3, 12)


@contextlib.contextmanager
def thread_profiles() -> Iterator[dict[str, cProfile.Profile]]:
    """cProfile each liteq thread started in the block, one per thread."""
    profiles: dict[str, cProfile.Profile] = {}
    if not PER_THREAD_PROFILES:
        yield profiles
        return

    def hook(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        name = threading.current_thread().name
        if name.startswith("liteq-"):
            profiles[name] = cProfile.Profile()
            profiles[name].enable()

    threading.setprofile(hook)
    try:
        yield profiles
    finally:
        threading.setprofile(None)


@dataclasses.dataclass
class Scenario:
    """Work to profile: ``prepare`` stores jobs, ``work`` runs them.

    ``threaded``: the work happens in a Worker's thread, not this one.
    """

    title: str
    prepare: Callable[[liteq.Queue, Tasks, int], Any]
    work: Callable[[liteq.Queue, Tasks, int, Any], None]
    threaded: bool


def store_noops(queue: liteq.Queue, tasks: Tasks, n: int) -> Any:
    with queue.batch():
        jobs = [tasks.noop.delay() for _ in range(n)]
    return jobs[-1]


def store_steps(queue: liteq.Queue, tasks: Tasks, n: int) -> Any:
    return tasks.steps.delay(n - 1)


def work_delay(queue: liteq.Queue, tasks: Tasks, n: int, _: Any) -> None:
    liteq_enqueue(tasks, n)


def work_run_once(queue: liteq.Queue, tasks: Tasks, n: int,
                  _: Any) -> None:
    worker = liteq.Worker(queue)
    while worker.run_once():
        pass


def work_thread(queue: liteq.Queue, tasks: Tasks, n: int, last: Any) -> None:
    with liteq.Worker(queue, threads=1):
        wait_for(lambda: read_one(
            queue.path, "SELECT finished_at FROM liteq_jobs WHERE id = ?",
            (last.id,))[0] is not None, 600, "a Worker thread ran the jobs")


SCENARIOS = (
    Scenario(".delay() in this thread, one commit each (per job)",
             lambda queue, tasks, n: None, work_delay, threaded=False),
    Scenario("Worker.run_once() loop in this thread, noop jobs (per job)",
             store_noops, work_run_once, threaded=False),
    Scenario("Worker thread draining noop jobs, as `liteq run` does "
             "(per job)", store_noops, work_thread, threaded=True),
    Scenario("Worker thread running one job of N continuation steps "
             "(per step)", store_steps, work_thread, threaded=True),
)


def profile_pass(scenario: Scenario, path: str, n: int,
                 kind: str) -> tuple[float, Any]:
    """One run of a scenario: its seconds, and the probe's findings."""
    if scenario.threaded:
        def chosen(name: str) -> bool:
            return name.startswith("liteq-worker")
    else:
        def chosen(name: str) -> bool:
            return name == threading.current_thread().name
    with open_queue(path) as (queue, tasks):
        last = scenario.prepare(queue, tasks, n)
        queue.close()  # every pass opens its connection in the work

        def work() -> None:
            scenario.work(queue, tasks, n, last)

        if kind == "sql":
            with sql_timer(chosen) as log:
                seconds = timed(work)
        elif kind == "profile" and scenario.threaded:
            with thread_profiles() as probe:
                seconds = timed(work)
        elif kind == "profile":
            probe = cProfile.Profile()
            probe.enable()
            try:
                seconds = timed(work)
            finally:
                probe.disable()
        else:
            probe, seconds = None, timed(work)
    window = None
    if scenario.threaded:  # time the worker's own work, not start/stop
        seconds = span(path, "liteq_jobs")[1]
        window = read_one(path, "SELECT min(started_at), max(finished_at) "
                                "FROM liteq_jobs")
    if kind == "sql":
        probe = log.tally(window)
    return seconds, probe


def print_sql(found: SqlTally, n: int, per_job: float,
              plain: float) -> None:
    """The statements of a traced pass; ``per_job``: that pass's time,
    ``plain``: the plain pass's (the difference is the logging's cost)."""
    calls = sum(c for c, _ in found.statements.values())
    spent = sum(s for _, s in found.statements.values())
    print(f"SQL: {calls / n:.2f} statements per job; traced pass "
          f"{per_job * 1e6:.1f} us/job ({(per_job - plain) * 1e6:+.1f} "
          f"for DEBUG logging); {spent / n * 1e6:.1f} us/job ("
          f"{spent / n / per_job:.0%}) from a statement to its thread's "
          f"next, each span holding the statement and the Python after "
          f"it:")
    count, seconds = found.held
    if count:
        print(f"  write lock held {seconds / count * 1e6:.1f} us per "
              f"transaction ({HELD}), {count / n:.2f} transactions per "
              f"job")
    if found.outside[0]:
        print(f"  outside the timed window (start-up, the last writes, "
              f"idle waits; not below): {found.outside[0]} statements, "
              f"{found.outside[1] * 1e3:.1f} ms")
    if found.longest[1]:
        print(f"  longest span {found.longest[0] * 1e6:.0f} us, after "
              f"{found.longest[1][:60]}")
    print(f"  {'calls':>6} {'us/call':>8} {'us/job':>7}  statement  (calls "
          f"per job; time to the thread's next statement)")
    ranked = sorted(found.statements.items(), key=lambda item: -item[1][1])
    for sql, (count, seconds) in ranked:
        if count / n < 0.01:
            continue
        print(f"  {count / n:6.2f} {seconds / count * 1e6:8.1f} "
              f"{seconds / n * 1e6:7.1f}  {sql[:90]}")


def print_stats(stats: pstats.Stats, n: int, top: int,
                heading: str, liteq_only: bool = False,
                key: int = 0) -> None:
    entries = []
    for (path, line, name), (_, calls, own, cum, _) in \
            stats.stats.items():  # type: ignore[attr-defined]
        if liteq_only and not path.endswith("liteq.py"):
            continue
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        entries.append((own, cum, calls, where))
    print(heading)
    print(f"  {'own':>8} {'cum':>8} {'calls':>6}  function  (us and calls "
          f"per job)")
    for own, cum, calls, where in sorted(entries,
                                         key=lambda e: -e[key])[:top]:
        print(f"  {own / n * 1e6:8.1f} {cum / n * 1e6:8.1f} {calls / n:6.2f}"
              f"  {where}")


def profile_raw(workdir: str, n: int) -> None:
    """The raw loops of section 4, in this thread, statement by statement."""
    def drain(conn: sqlite3.Connection) -> None:
        while raw_run_one(conn):
            pass

    for title, prepare, work in (
            ("raw enqueue, one INSERT per transaction (compare with 1.)",
             lambda conn: None, lambda conn: raw_enqueue(conn, n)),
            ("raw drain, claim + completion transactions (compare with "
             "2. and 3.)", lambda conn: raw_batch(conn, n), drain)):
        seconds = []
        for kind in ("plain", "sql"):
            path = os.path.join(workdir, f"profile-raw-{len(seconds)}-"
                                         f"{title[4:9]}.db")
            with contextlib.closing(raw_create(path)) as conn:
                prepare(conn)
            with contextlib.closing(raw_connect(path)) as conn:
                if kind == "plain":
                    seconds.append(timed(lambda: work(conn)))
                    continue
                logged = LoggedConnection(conn)
                with sql_timer(lambda name: True, RAW_LOGGER) as log:
                    seconds.append(timed(lambda: work(logged)))
                found = log.tally()
        print(f"\n== {title} ==")
        print(f"{seconds[0] / n * 1e6:.1f} us/job ({n / seconds[0]:,.0f} "
              f"jobs/s) plain")
        print_sql(found, n, seconds[1] / n, seconds[0] / n)


def run_profile(workdir: str, n: int, top: int) -> None:
    print(f"liteq {liteq.__version__}, Python {sys.version.split()[0]}, "
          f"SQLite {sqlite3.sqlite_version}; N = {n}; times are per job")
    for number, scenario in enumerate(SCENARIOS, 1):
        def path(kind: str) -> str:
            return os.path.join(workdir, f"profile{number}-{kind}.db")
        plain, _ = profile_pass(scenario, path("plain"), n, "plain")
        traced, found = profile_pass(scenario, path("sql"), n, "sql")
        profiled, probe = profile_pass(scenario, path("profile"), n,
                                       "profile")
        print(f"\n== {number}. {scenario.title} ==")
        print(f"{plain / n * 1e6:.1f} us/job ({n / plain:,.0f} jobs/s) "
              f"plain; {profiled / n * 1e6:.1f} us/job under cProfile")
        print_sql(found, n, traced / n, plain / n)
        if scenario.threaded and not PER_THREAD_PROFILES:
            print("(no cProfile of Worker threads on Python 3.12+: run "
                  "--profile with Python 3.11 or older for it)")
            continue
        if scenario.threaded:
            workers = [p for name, p in probe.items()
                       if name.startswith("liteq-worker")]
            others = [p for name, p in probe.items()
                      if not name.startswith("liteq-worker")]
            stats = pstats.Stats(*workers)
        else:
            stats, others = pstats.Stats(probe), []
        print_stats(stats, n, top, f"top {top} by own time:")
        print_stats(stats, n, top, f"top {top} liteq functions by "
                                   f"cumulative time:", liteq_only=True,
                    key=1)
        if others:
            print_stats(pstats.Stats(*others), n, 8,
                        "the Worker's other threads (watcher, heartbeat), "
                        "top 8 by own time (select and acquire are "
                        "waits, not CPU):")
    profile_raw(workdir, n)


# ---------------------------------------------------------------------------
# 9. Command line and child entry points
# ---------------------------------------------------------------------------


def child_raw_worker(path: str, mode: str = "drain",
                     limit: str | None = None) -> int:
    """Run raw jobs until none is ready, or with ``serve`` until SIGTERM.

    Draining, it stops early after ``limit`` steps, if given.  Serving
    (the multi-process run), it polls every millisecond when idle, counts
    the errors and prints them as JSON when it stops.
    """
    conn = raw_connect(path)
    if mode == "drain":
        left = int(limit) if limit else -1
        while left != 0 and raw_run_one(conn):
            left -= 1
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    errors: collections.Counter = collections.Counter()
    while not stop.is_set():
        try:
            if not raw_run_one(conn):
                time.sleep(0.001)
        except sqlite3.Error as exc:
            errors[error_key(exc)] += 1
    print(json.dumps({"errors": errors}))
    return 0


def produce(store: Callable[[], Any], seconds: str, start_at: str) -> int:
    """Call ``store`` until the time is up; print what happened as JSON.

    Every exception that reaches this code is counted: liteq promises
    that none does while the database is merely busy.
    """
    errors: collections.Counter = collections.Counter()
    took = []  # seconds per successful call
    time.sleep(max(0.0, float(start_at) - time.time()))
    start, cpu = time.time(), time.process_time()
    end = start + float(seconds)
    while time.time() < end:
        before = time.perf_counter()
        try:
            store()
            took.append(time.perf_counter() - before)
        except Exception as exc:
            errors[error_key(exc)] += 1
    took.sort()
    print(json.dumps({"delayed": len(took), "errors": errors, "start": start,
                      "end": time.time(), "cpu": time.process_time() - cpu,
                      "p99_ms": 1000 * took[int(len(took) * 0.99)]
                      if took else None,
                      "max_ms": 1000 * took[-1] if took else None}))
    return 0


def child_producer(path: str, seconds: str, start_at: str) -> int:
    with open_queue(path) as (_, tasks):
        return produce(tasks.noop.delay, seconds, start_at)


def child_raw_producer(path: str, seconds: str, start_at: str) -> int:
    with contextlib.closing(raw_connect(path)) as conn:
        return produce(lambda: raw_enqueue(conn, 1), seconds, start_at)


CHILDREN = {"_raw-worker": child_raw_worker, "_producer": child_producer,
            "_raw-producer": child_raw_producer}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_liteq.py",
        description="Benchmark liteq against a raw sqlite3 loop.")
    parser.add_argument("--n", type=int, default=None,
                        help="jobs per measurement (default 20000; 1000 "
                             "with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run for CI (about 45 s)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every figure to PATH")
    parser.add_argument("--only", action="append", choices=list(SECTIONS),
                        help="run only this measurement (repeatable)")
    parser.add_argument("--dir", metavar="DIR",
                        help="make the temporary directory in DIR "
                             "(default: the system's temp directory)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory")
    parser.add_argument("--profile", action="store_true",
                        help="profile .delay() and the worker instead")
    parser.add_argument("--top", type=int, default=20,
                        help="functions shown per profile (default 20)")
    opts = parser.parse_args(argv)
    if opts.n is None:
        opts.n = 1000 if opts.quick else 20000
    if opts.n < 1:
        parser.error(f"--n must be at least 1, got {opts.n}")
    return opts


def run_bench(opts: argparse.Namespace, workdir: str) -> int:
    info = meta(opts, workdir)
    print(f"liteq {info['liteq']} on Python {info['python']}, SQLite "
          f"{info['sqlite']}, {info['cpus']} CPUs; N = {opts.n}"
          f"{' (quick)' if opts.quick else ''}; files in {workdir} "
          f"({info['filesystem']})")
    if info["filesystem"] in ("tmpfs", "ramfs", "nfs", "nfs4", "cifs",
                              "smb3"):
        print(f"warning: {workdir} is on {info['filesystem']}, not local "
              f"disk: use --dir", file=sys.stderr)
    started = time.monotonic()
    # A CI timeout sends SIGTERM: unwind, so the children are killed.
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    children = Children(workdir)
    bench = Bench(opts, workdir, children)
    crashed = []
    try:
        for name, section in SECTIONS.items():
            if opts.only and name not in opts.only:
                continue
            print(f"[{time.monotonic() - started:6.1f}s] {name}",
                  flush=True)
            try:
                section(bench)
                children.reap()
            except Exception as exc:  # report it, go on with the others
                traceback.print_exc()
                crashed.append(f"{name}: {exc}")
                children.kill_all()
    finally:
        children.kill_all()
    info["seconds"] = time.monotonic() - started
    info["load_average_at_end"] = load_average()
    print(f"\nliteq benchmark, N = {opts.n}"
          f"{' (quick)' if opts.quick else ''}, {info['seconds']:.1f} s, "
          f"load average {info['load_average_at_start']} -> "
          f"{info['load_average_at_end']} on {info['cpus']} CPUs; "
          f"ratio = liteq / baseline; targets are informational\n")
    print_table(bench.rows)
    for line in crashed:
        print(f"CRASHED {line}")
    if opts.json:
        write_json(opts.json, info, bench, crashed)
    return 1 if crashed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        return CHILDREN[argv[0]](*argv[1:])
    opts = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="liteq-bench-", dir=opts.dir)
    try:
        with open(os.path.join(workdir, "benchtasks.py"), "w") as f:
            f.write(TASK_MODULE)
        if opts.profile:
            run_profile(workdir, opts.n, opts.top)
            return 0
        return run_bench(opts, workdir)
    finally:
        if opts.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
