"""liteq: a durable background task queue in one file, on SQLite.

Decorate top-level functions with ``@task``, call ``.delay()`` to store a
call, and run a worker (``python -m liteq run tasks``) or a ``Worker``
thread inside the application.  A task may *return the next call*: the
queue stores it in the same transaction that ends the step and runs it
next, so long work becomes a chain of small persisted steps that survives
crashes, restarts and upgrades::

    >>> import tempfile, os
    >>> q = Queue(os.path.join(tempfile.mkdtemp(), "doc.db"))
    >>> @q.task
    ... def countdown(n):
    ...     return countdown(n - 1) if n else "liftoff"
    >>> job = countdown.delay(3)
    >>> with Worker(q):
    ...     job.result(timeout=30)
    'liftoff'
    >>> job.steps
    4
    >>> q.close()

Sections (``grep -n '^# [0-9]*\\. ' liteq.py``):

 1. Header: imports, version, public names
 2. Constants and defaults
 3. Errors
 4. Utilities: clock, durations, JSON codec
 5. Storage: SQL, schema, connections, transactions
 6. Tasks: Task, task functions, registry, chain
 7. Jobs and queues: Job, Queue, the default queue
 8. Worker: threads, leases, heartbeats, wake-ups
 9. HTTP: status resource and dashboard
10. Command line
11. ``python -m liteq``

Licensed under the MIT licence (see LICENSE).
"""

# ---------------------------------------------------------------------------
# 1. Header: imports, version, public names
# ---------------------------------------------------------------------------

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import ctypes
import datetime as _dt
import functools
import hashlib
import html
import http
import importlib
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import socketserver
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse
import weakref
import wsgiref.simple_server
from typing import Any, Callable, Iterable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # not on Windows: every worker claims at once there
    fcntl = None  # type: ignore[assignment]

__version__ = "0.1.0"

__all__ = [
    "Busy",
    "Error",
    "Job",
    "JobNotFound",
    "Queue",
    "SchemaError",
    "StorageError",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskFunction",
    "Worker",
    "chain",
    "configure",
    "current_job",
    "default_queue",
    "deserialize_task",
    "location_header",
    "main",
    "serialize_task",
    "task",
    "wsgi_app",
]

logger = logging.getLogger("liteq")
logger.addHandler(logging.NullHandler())

# ---------------------------------------------------------------------------
# 2. Constants and defaults
# ---------------------------------------------------------------------------

#: Database used by the module-level ``@task`` unless configured.
_DEFAULT_DB = "liteq.db"
_DEFAULT_NAME = "default"  # queue name of tasks and workers

_PENDING, _RUNNING, _DONE = "pending", "running", "done"
_FAILED, _CANCELLED = "failed", "cancelled"
_STATUSES = (_PENDING, _RUNNING, _DONE, _FAILED, _CANCELLED)
_FINISHED = (_DONE, _FAILED, _CANCELLED)

_MIN_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING
_APPLICATION_ID = 0x6C697471  # "litq" in the database header
_SCHEMA_VERSION = 1

_MAX_DEPTH = 100  # nesting of containers in arguments and results
_MAX_INT_DIGITS = 4300  # CPython's default int/str conversion limit
_INT64 = (-(2**63), 2**63 - 1)
_WAL_LIMIT = 64 * 2**20  # bytes; past this a worker forces a checkpoint
_PURGE_CHUNK = 500  # rows deleted per purge transaction
_RESULT_POLL = 0.05  # seconds between checks of another process's job
_IDLE_MAX = 1.0  # seconds an idle worker sleeps without any signal
_PROBE = 0.05  # seconds between looks for due timers while busy
# Claiming ahead and deferred writes (see Worker, "The loop of each thread")
_FAST = 0.002  # seconds: a step shorter than this is short
_STREAK = 8  # short steps in a row before a thread defers writes
_BATCH_MAX = 32  # steps claimed at once, and outcomes written at once
_GROUP_AGE = 0.01  # seconds an outcome may wait to be written
_RESCUE = 0.05  # seconds before a long deferred step is shown running
_TOKEN_BITS = 20  # a claim's block of fencing tokens (see _SQL_CLAIM)
_CANCEL_LOOK = 0.002  # seconds between looks for cancelled steps ahead
# Several workers on one file (see _Gate): a follower takes a job that
# waited _FOLLOW_WAIT seconds for the lead, or when _FOLLOW_LOAD wait; it
# looks, and tries to lead, every _FOLLOW_LOOK seconds.
_FOLLOW_WAIT, _FOLLOW_LOAD, _FOLLOW_LOOK = 0.5, 1000, 0.05
# Another process's commits wake idle threads at once, then, while they go
# on, every _WAKE_GAP seconds.
_WAKE_GAP = 0.001
_HOST_PID = f"{socket.gethostname()}:{os.getpid()}"

_TASK_DEFAULTS = {
    "percent": None,
    "retries": 0,
    "retry_delay": 1.0,
    "retry_max_delay": 3600.0,
    "queue": _DEFAULT_NAME,
    "priority": 0,
    "name": None,
    "description": None,
    "lease": 60.0,
    "max_lost": 5,
}

# ---------------------------------------------------------------------------
# 3. Errors
# ---------------------------------------------------------------------------


class Error(Exception):
    """Base class of the errors liteq raises itself."""


class TaskFailed(Error):
    """The job failed; ``error`` holds the traceback text."""

    def __init__(self, job_id: int, error: str) -> None:
        super().__init__(_error_line(error) or "task failed")
        self.job_id = job_id
        self.error = error


class TaskCancelled(Error):
    """The job was cancelled before it finished."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class JobNotFound(Error, LookupError):
    """No job has this id (it was never stored, or was purged)."""


class Busy(Error):
    """The database stayed locked by other writers past busy_timeout."""


class StorageError(Error):
    """SQLite refused to read or write the database file."""


class SchemaError(Error):
    """The file is not a liteq database this version can use."""


# ---------------------------------------------------------------------------
# 4. Utilities: clock, durations, JSON codec
# ---------------------------------------------------------------------------


def _error_line(error: str | None) -> str:
    """The last line of a traceback text: what went wrong."""
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else ""

_SURROGATE = re.compile("[\ud800-\udfff]")  # not storable as UTF-8
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _parse_duration(text: str) -> float:
    """Read ``30s``, ``12h``, ``7d`` or ``2w`` as seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(
            f"bad duration {text!r}: use a number and a unit s, m, h, d "
            f"or w, like 30s, 12h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _utc(timestamp: float | None) -> _dt.datetime | None:
    if timestamp is None:
        return None
    try:
        return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        # Only a row changed outside liteq holds such a time.
        raise ValueError(f"stored time {timestamp!r:.60} is not a unix "
                         f"time liteq can read") from None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return _utc(timestamp).isoformat().replace("+00:00", "Z")


def _check_number(name: str, value: Any, minimum: float = 0.0,
                  strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, "
                        f"got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if minimum == -math.inf and not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not finite or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {bound} {minimum}, "
                         f"got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int | None = None,
               maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return int(value)


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {value!r}")
    if not value.strip():
        raise ValueError(f"{what} must not be empty, got {value!r}")
    if _SURROGATE.search(value):
        raise ValueError(f"{what} must be valid Unicode text (no lone "
                         f"surrogates), got {value!r}")
    return value


def _storable_text(text: str) -> str:
    """Text for a TEXT column: surrogates (invalid UTF-8) escaped."""
    if not text.isascii() and _SURROGATE.search(text):
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# The stored form is JSON.  Tuples, Tasks and dicts whose keys collide with
# these tags are wrapped in one-key objects; see docs/format.md.
_TAG_TASK, _TAG_TUPLE, _TAG_DICT = "__task__", "__tuple__", "__dict__"
_TAGS = frozenset((_TAG_TASK, _TAG_TUPLE, _TAG_DICT))


def _int_ok(value: int) -> bool:
    if value.bit_length() < 14000:  # 10**4214 > 2**14000: surely short
        return True
    try:
        return len(str(abs(value))) <= _MAX_INT_DIGITS
    except ValueError:  # over sys.get_int_max_str_digits()
        return False


class _Unstorable(TypeError):
    """A value JSON cannot hold.  Each enclosing container adds its key
    to ``where`` as the error passes through, so a path costs nothing
    until something is wrong."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.where: list[str] = []  # innermost first

    def at(self, path: str) -> TypeError:
        where = "".join(reversed(self.where))
        if not path:
            where = where.lstrip(".")
        return TypeError(f"{path}{where} {self.problem}")


def _to_json(value: Any, depth: int = 0, active: set | None = None) -> Any:
    """Return the JSON-ready form of ``value``, or raise _Unstorable."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return value
    if kind is int:
        if not _int_ok(value):
            raise _Unstorable(f"is an int of more than {_MAX_INT_DIGITS} "
                              f"digits")
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _Unstorable(f"is {value!r}: only finite floats are JSON")
        return value
    if isinstance(value, (int, float, str)):  # subclasses: base value
        # Not str(value): an Enum mixin overrides __str__.
        convert = (int.__int__ if isinstance(value, int) else
                   float.__float__ if isinstance(value, float) else
                   str.__str__)
        return _to_json(convert(value), depth, active)
    if not isinstance(value, (list, tuple, dict, Task)):
        raise _Unstorable(
            f"is a {type(value).__name__}, which liteq cannot store: use "
            f"None, bool, int, float, str, list, tuple, dict with str keys,"
            f" or a Task")
    if depth > _MAX_DEPTH:
        raise _Unstorable(f"is nested deeper than {_MAX_DEPTH} levels")
    active = set() if active is None else active
    if id(value) in active:
        raise _Unstorable(f"is a {type(value).__name__} that contains "
                          f"itself (a cycle)")
    active.add(id(value))
    try:
        if isinstance(value, Task):
            return value._to_json(depth + 1, active)
        if isinstance(value, list):
            return _items_to_json(value, depth + 1, active)
        if isinstance(value, tuple):
            return {_TAG_TUPLE: _items_to_json(value, depth + 1, active)}
        out = _dict_to_json(value, depth + 1, active)
        return {_TAG_DICT: out} if _TAGS.intersection(out) else out
    finally:
        active.discard(id(value))


def _items_to_json(items: Sequence, depth: int, active: set) -> list:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_to_json(item, depth, active))
        except _Unstorable as exc:
            exc.where.append(f"[{i}]")
            raise
    return out


def _dict_to_json(value: dict, depth: int, active: set) -> dict:
    out = {}
    for key, item in value.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise _Unstorable(f"has a key {key!r} of type "
                                  f"{type(key).__name__}: dict keys must "
                                  f"be str")
            key = str.__str__(key)
        try:
            out[key] = _to_json(item, depth, active)
        except _Unstorable as exc:
            exc.where.append(f"[{key!r}]")
            raise
    return out


class _Undecodable(ValueError):
    """A value not in liteq's stored format.  Like _Unstorable, each
    enclosing container adds its key to ``where`` on the way out."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.where: list[str] = []  # innermost first

    def at(self, path: str, top: str = "the value") -> ValueError:
        where = "".join(reversed(self.where))
        if not path:
            where = where.lstrip(".")
        return ValueError(f"{(path + where) or top} {self.problem}")


def _from_json(value: Any, depth: int = 1) -> Any:
    """Invert ``_to_json``: rebuild tuples, Tasks and escaped dicts.

    ``depth`` counts containers as _to_json does, so what it stored reads
    back and nothing deeper does (no RecursionError); a value not in the
    stored format raises _Undecodable.
    """
    if isinstance(value, list):
        if depth > _MAX_DEPTH:
            raise _Undecodable(f"is nested deeper than {_MAX_DEPTH} levels")
        return _items_from_json(value, depth + 1)
    if not isinstance(value, dict):
        return value
    if depth > _MAX_DEPTH:
        raise _Undecodable(f"is nested deeper than {_MAX_DEPTH} levels")
    if _TAG_TASK in value:
        return Task._from_json(value, depth)
    for tag, kind in ((_TAG_TUPLE, list), (_TAG_DICT, dict)):
        if tag in value:
            inner = value[tag]
            if len(value) != 1 or not isinstance(inner, kind):
                raise _Undecodable(
                    f"is not in liteq's format: a {tag!r} object must have"
                    f" that one key, holding a JSON "
                    f"{'array' if kind is list else 'object'}")
            if kind is list:
                return tuple(_items_from_json(inner, depth + 1))
            value = inner
    return _dict_from_json(value, depth + 1)


def _items_from_json(items: list, depth: int) -> list:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_from_json(item, depth))
        except _Undecodable as exc:
            exc.where.append(f"[{i}]")
            raise
    return out


def _dict_from_json(value: dict, depth: int) -> dict:
    out = {}
    for key, item in value.items():
        if type(key) is not str:  # only from a dict made in Python
            raise _Undecodable(f"has a key {key!r} of type "
                               f"{type(key).__name__}: keys must be str")
        try:
            out[key] = _from_json(item, depth)
        except _Undecodable as exc:
            exc.where.append(f"[{key!r}]")
            raise
    return out


# Text is stored as UTF-8 (ensure_ascii=False), which SQLite needs valid:
# surrogate code points, which Python strs may hold, are written as \\u
# escapes instead.  A JSON parser joins an escaped high surrogate and an
# escaped low one into a single character, so when two meet, _parse puts a
# marker character between them and takes it out again after parsing.
_ESCAPED_PAIR = re.compile(
    r"(\\u[dD][89abAB][0-9a-fA-F]{2})(?=\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _json_encoder() -> Callable[[Any], str]:
    """Compact JSON text; values come from _to_json, so no checks.

    JSONEncoder.encode builds its C encoder anew on every call, which
    costs more than encoding a small call; this builds it once.
    """
    base = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                            allow_nan=False)
    plain = base.encode
    try:
        c_encoder = json.encoder.c_make_encoder(  # type: ignore
            None, base.default, json.encoder.encode_basestring, None, ":",
            ",", False, False, False)

        def encode(value: Any) -> str:
            return "".join(c_encoder(value, 0))

        sample = {"a": [1, 2.5, None, True, "\u00e9"], "b": {}}
        if encode(sample) == plain(sample):
            return encode
    except (AttributeError, TypeError, ValueError):
        pass  # no C accelerator, or another signature
    return plain


_JSON_ENCODE = _json_encoder()


def _dumps(value: Any) -> str:
    text = _JSON_ENCODE(value)
    if not text.isascii() and _SURROGATE.search(text):
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def _refuse_constant(name: str) -> Any:
    raise _Undecodable(f"holds {name}, which liteq never stores")


# json.loads would read NaN and Infinity, which _dumps never writes.
_JSON_DECODE = json.JSONDecoder(parse_constant=_refuse_constant).decode


def _parse(text: str) -> Any:
    """json.loads that keeps escaped surrogates apart (see _dumps).

    Text that is not JSON as liteq writes it (a BLOB, bad JSON, JSON too
    deep to read) raises _Undecodable.
    """
    if type(text) is not str:
        kind = "a BLOB" if isinstance(text, bytes) else f"{text!r:.60}"
        raise _Undecodable(f"is {kind}, not JSON text")
    try:
        if "\\u" not in text or not _ESCAPED_PAIR.search(text):
            return _JSON_DECODE(text)
        marker = next(chr(c) for c in range(0xE000, 0xF900)
                      if chr(c) not in text)
        value = _JSON_DECODE(_ESCAPED_PAIR.sub(
            lambda m: m.group(1) + marker, text))
    except json.JSONDecodeError as exc:
        raise _Undecodable(f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise _Undecodable("is JSON nested too deeply to read") from None
    return _unmark(value, marker)


def _unmark(value: Any, marker: str) -> Any:
    if isinstance(value, str):
        return value.replace(marker, "")
    if isinstance(value, list):
        return [_unmark(item, marker) for item in value]
    if isinstance(value, dict):
        return {key.replace(marker, ""): _unmark(item, marker)
                for key, item in value.items()}
    return value


def _loads(text: str) -> Any:
    value = _parse(text)
    return _from_json(value, _json_depth(value)) if '"__' in text else value


def _json_depth(value: Any) -> int:
    # The depth _to_json gave the top of ``value`` (see _top_depth).
    return 0 if isinstance(value, dict) and _TAG_TASK in value else 1


def _top_depth(value: Any) -> int:
    # A call's arguments and a bare result count from the same level.
    return 0 if isinstance(value, Task) else 1


def _plain(values: Iterable) -> bool:
    """Whether every value is a str, None, bool, short int or finite
    float: JSON as it stands, with nothing to tag or check further."""
    for value in values:
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                return False
        elif not (kind is str or value is None or kind is bool
                  or (kind is int and value.bit_length() < 14000)):
            return False
    return True


def _encode(value: Any, path: str, limit: int) -> str:
    try:
        if (type(value) is Task and not value._then and _plain(value.args)
                and _plain(value.kwargs.values())):
            # The common call, without the walk _to_json makes.
            text = _dumps({_TAG_TASK: value.name, "args": list(value.args),
                           "kwargs": value.kwargs})
        else:
            text = _dumps(_to_json(value, _top_depth(value)))
    except _Unstorable as exc:
        raise exc.at(path) from None
    size = len(text) if len(text) * 4 <= limit else len(text.encode())
    if size > limit:
        raise ValueError(
            f"{path or 'the call'} encodes to {size} bytes, over max_payload "
            f"({limit}): store large data elsewhere and pass a reference")
    return text

# ---------------------------------------------------------------------------
# 5. Storage: SQL, schema, connections, transactions
# ---------------------------------------------------------------------------

# One row per job.  A waiting job has ``ready`` (its place in line) or,
# when it waits for a time, ``timer`` (its eta).  A claimed job has a
# fresh ``token`` and its lease expiry in ``timer``; once its step's start
# is written, ``worker`` too.  The status CHECK is written with OR, not
# IN: SQLite builds an IN list anew for every statement run, about 3 us
# per insert or update here.  (Files made before keep the IN form; both
# mean the same.)
_SCHEMA = (
    """
    CREATE TABLE liteq_jobs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        name        TEXT    NOT NULL,
        current     TEXT    NOT NULL,
        call        TEXT    NOT NULL,
        description TEXT    NOT NULL,
        queue       TEXT    NOT NULL,
        priority    INTEGER NOT NULL,
        key         TEXT,
        status      TEXT    NOT NULL CHECK (status = 'pending'
                    OR status = 'running' OR status = 'done'
                    OR status = 'failed' OR status = 'cancelled'),
        percent     REAL,
        steps       INTEGER NOT NULL DEFAULT 0,
        attempts    INTEGER NOT NULL DEFAULT 0,
        failures    INTEGER NOT NULL DEFAULT 0,
        lost        INTEGER NOT NULL DEFAULT 0,
        max_lost    INTEGER NOT NULL DEFAULT 5,
        token       INTEGER NOT NULL DEFAULT 0,
        cancel      INTEGER NOT NULL DEFAULT 0,
        result      TEXT,
        error       TEXT,
        eta         REAL    NOT NULL,
        ready       INTEGER,
        timer       REAL,
        worker      TEXT,
        created_at  REAL    NOT NULL,
        started_at  REAL,
        updated_at  REAL    NOT NULL,
        finished_at REAL
    )
    """,
    """
    CREATE INDEX liteq_jobs_ready ON liteq_jobs (queue, priority DESC, ready)
     WHERE ready IS NOT NULL
    """,
    "CREATE INDEX liteq_jobs_timer ON liteq_jobs (timer) "
    "WHERE timer IS NOT NULL",
    "CREATE UNIQUE INDEX liteq_jobs_key ON liteq_jobs (key) "
    "WHERE key IS NOT NULL AND finished_at IS NULL",
)

#: Migrations, indexed by the version they upgrade *from*; version 0 is an
#: empty file.  Each runs inside the write transaction that re-reads the
#: version, so concurrent openers never run one twice.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA,)

_JOB_COLUMNS = (
    "id, name, current, call, description, queue, priority, key, status, "
    "percent, steps, attempts, failures, lost, token, cancel, result, "
    "error, eta, worker, created_at, started_at, updated_at, finished_at")

# The counter AUTOINCREMENT keeps for job ids also orders ready jobs: a job
# entering the line takes the next value, so the database, not the wall
# clock, decides who came first.
_SQL_NEXT_READY = """
    UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'liteq_jobs'
 RETURNING seq
"""

# Parameters by number, from a _NewJob: positional binding is faster.
_INSERT_JOB = """
    INSERT INTO liteq_jobs (name, current, call, description, queue,
                            priority, key, status, percent, eta, ready,
                            timer, created_at, updated_at)
    {} ?1, ?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8,
            CASE WHEN ?9 THEN 1 + coalesce((SELECT seq FROM sqlite_sequence
                                 WHERE name = 'liteq_jobs'), 0) END,
            CASE WHEN ?9 THEN NULL ELSE ?8 END, ?10, ?10{}
"""

#: A job to insert, in the order of _INSERT_JOB's parameters; ``due``
#: says whether it goes in line at once (else it waits for ``eta``).
_NewJob = collections.namedtuple(
    "_NewJob", "name call description queue priority key percent eta due now")

_SQL_INSERT_JOB = _INSERT_JOB.format("VALUES (", ")")

# The same, as a transaction of its own: it inserts nothing unless the
# schema is the one this liteq knows (see _Store.insert).
_SQL_INSERT_CHECKED = _INSERT_JOB.format("SELECT", f"""
     WHERE (SELECT user_version FROM pragma_user_version)
           = {_SCHEMA_VERSION}""")

# One statement, so one snapshot: another opener may be creating the schema.
_SQL_HEADER = """
    SELECT (SELECT application_id FROM pragma_application_id),
           (SELECT user_version FROM pragma_user_version),
           (SELECT count(*) FROM sqlite_master)
"""

_SQL_LAST_ID = "SELECT seq FROM sqlite_sequence WHERE name = 'liteq_jobs'"

_SQL_SELECT_ACTIVE_KEY = """
    SELECT id FROM liteq_jobs WHERE key = ? AND finished_at IS NULL
"""

_SQL_SELECT_JOB = f"SELECT {_JOB_COLUMNS} FROM liteq_jobs WHERE id = ?"

_SQL_SELECT_JOBS = f"""
    SELECT {_JOB_COLUMNS} FROM liteq_jobs
     WHERE (:status IS NULL OR status = :status)
       AND (:name IS NULL OR name = :name)
       AND (:queue IS NULL OR queue = :queue)
     ORDER BY id DESC LIMIT :limit
"""

_SQL_COUNT_JOBS = """
    SELECT queue, status, count(*) FROM liteq_jobs GROUP BY queue, status
"""

_SQL_SELECT_DUE = """
    SELECT id, current, worker, lost, max_lost, cancel FROM liteq_jobs
     WHERE timer <= ? LIMIT 100
"""

# An idle worker looks with this read before it takes the write lock:
# whether a claim could find work, a ready job of the worker's queue
# names (one ? each, filled in by the worker) or a due timer, or a schema
# that is not ours (the claim's transaction checks and reports it).
_SQL_WORK_IN_SIGHT = f"""
    SELECT (SELECT user_version FROM pragma_user_version) != {_SCHEMA_VERSION}
        OR EXISTS (SELECT 1 FROM liteq_jobs
                    WHERE queue IN ({{}}) AND ready IS NOT NULL)
        OR EXISTS (SELECT 1 FROM liteq_jobs WHERE timer <= ?)
"""

# A worker that does not lead looks at the line: how many wait (up to a
# bound, from the index alone) and since when the first one waits.
_SQL_LINE_LOAD = """
    SELECT (SELECT count(*) FROM (
                SELECT 1 FROM liteq_jobs
                 WHERE queue = :queue AND ready IS NOT NULL LIMIT :limit)),
           (SELECT eta FROM liteq_jobs
             WHERE queue = :queue AND ready IS NOT NULL
             ORDER BY priority DESC, ready LIMIT 1)
"""

_SQL_NEXT_TIMER = "SELECT min(timer) FROM liteq_jobs WHERE timer IS NOT NULL"

_SQL_MAKE_READY = """
    UPDATE liteq_jobs SET ready = :ready, timer = NULL, worker = NULL,
                          lost = lost + :lost, updated_at = :now
     WHERE id = :id
"""

# A worker claims steps in small batches, in line order.  Claiming takes a
# job out of line, gives it a fresh token and a lease (``timer``), and
# changes nothing an observer sees: the job stays as it was (pending, say)
# until its step starts.  A held step is one whose row still carries the
# claim's token, out of line and unfinished; every later write of the
# claimer is guarded by that, so a worker that lost its lease changes
# nothing.
_SQL_LINE = """
    SELECT id, priority, ready FROM liteq_jobs
     WHERE queue = ? AND ready IS NOT NULL
     ORDER BY priority DESC, ready LIMIT ?
"""

# Each claim takes a fresh block of _TOKEN_BLOCK tokens; the steps a
# worker continues in place (below) count up inside it, so a step that
# runs before its claim is written still has a token no other claim holds.
_SQL_CLAIM = f"""
    UPDATE liteq_jobs
       SET token = ((token >> {_TOKEN_BITS}) + 1) << {_TOKEN_BITS},
           ready = NULL, timer = ? + ?, max_lost = ?
     WHERE id IN ({{}})
 RETURNING id, current, call, token, attempts, steps, failures, priority
"""

# A thread that runs its steps one at a time (see Worker._may_defer)
# claims the first step of one queue name and writes its start in one
# statement: the same changes as _SQL_LINE, _SQL_CLAIM and _SQL_START.
# It returns what _SQL_CLAIM returns (``attempts`` as it was before).
_SQL_CLAIM_START = f"""
    UPDATE liteq_jobs
       SET token = ((token >> {_TOKEN_BITS}) + 1) << {_TOKEN_BITS},
           ready = NULL, timer = :now + :lease, max_lost = :max_lost,
           status = 'running', attempts = attempts + 1, worker = :worker,
           started_at = coalesce(started_at, :now), updated_at = :now
     WHERE id = (SELECT id FROM liteq_jobs
                  WHERE queue = :queue AND ready IS NOT NULL
                  ORDER BY priority DESC, ready LIMIT 1)
 RETURNING id, current, call, token, attempts - 1, steps, failures, priority
"""

_SQL_ADJUST_CLAIM = """
    UPDATE liteq_jobs SET timer = :now + :lease, max_lost = :max_lost
     WHERE id = :id
"""

_HELD = "id = :id AND token = :token AND ready IS NULL " \
        "AND finished_at IS NULL"

_SQL_HIGHER_READY = """
    SELECT 1 FROM liteq_jobs
     WHERE queue = ? AND ready IS NOT NULL AND priority >= ? LIMIT 1
"""

# The step starts: from here on observers see it run.
_SQL_START = f"""
    UPDATE liteq_jobs
       SET status = 'running', attempts = :attempt, worker = :worker,
           started_at = coalesce(started_at, :started), updated_at = :now
     WHERE {_HELD}
"""

_SQL_SET_LEASE = f"UPDATE liteq_jobs SET timer = :until WHERE {_HELD}"

# Outcomes of a step.  A step that ran without its start being written
# (see Worker._may_defer) records its start with its outcome, hence the
# attempt and started_at in each.  A cancel request turns a continuation
# or an error into 'cancelled', but a final result still counts as done.
_OUTCOME = """
           started_at = coalesce(started_at, :started), worker = NULL,
           updated_at = :now"""

_CONTINUE = f"""
    UPDATE liteq_jobs
       SET call = :call, current = :current, percent = :percent,
           steps = steps + :n, attempts = 0, failures = 0, lost = 0,
           eta = :now, {_OUTCOME},
           status = CASE WHEN cancel THEN 'cancelled' ELSE 'running' END,
           finished_at = CASE WHEN cancel THEN :now END,
           {{}}
     WHERE {_HELD}
 RETURNING status
"""

# Back in line, behind every ready job of equal or higher priority.
_SQL_CONTINUE = _CONTINUE.format(
    "ready = CASE WHEN cancel THEN NULL ELSE :ready END, timer = NULL")

# When no such job waits, the worker claims the job again at once, as its
# next claim would have: a fresh token, the same lease.  ``n`` steps that
# continued so, one after another, are written as one.
_SQL_CONTINUE_HERE = _CONTINUE.format(  # the token: see _SQL_CLAIM
    "token = token + :n, timer = CASE WHEN cancel THEN NULL ELSE timer END")

_SQL_DONE = f"""
    UPDATE liteq_jobs
       SET status = 'done', result = :result, percent = 100.0,
           steps = steps + 1, attempts = :attempt, timer = NULL,
           finished_at = :now, {_OUTCOME}
     WHERE {_HELD}
"""

_SQL_FAIL = f"""
    UPDATE liteq_jobs
       SET status = CASE WHEN cancel THEN 'cancelled' ELSE 'failed' END,
           error = :error, attempts = :attempt, timer = NULL,
           finished_at = :now, {_OUTCOME}
     WHERE {_HELD}
 RETURNING status
"""

_SQL_FAIL_STEP = f"""
    UPDATE liteq_jobs
       SET status = CASE WHEN cancel THEN 'cancelled'
                         WHEN failures < :retries THEN 'running'
                         ELSE 'failed' END,
           failures = failures + 1, error = :error, attempts = :attempt,
           eta = :now + :delay,
           timer = CASE WHEN NOT cancel AND failures < :retries AND :delay > 0
                        THEN :now + :delay END,
           ready = CASE WHEN NOT cancel AND failures < :retries AND :delay <= 0
                        THEN :ready END,
           finished_at = CASE WHEN cancel OR failures >= :retries
                              THEN :now END, {_OUTCOME}
     WHERE {_HELD}
 RETURNING status, failures
"""

# A claimed step goes back in line unrun (at its old place when it had
# not started), or after a KeyboardInterrupt in the task.
_SQL_RELEASE = f"""
    UPDATE liteq_jobs SET worker = NULL, timer = NULL, ready = :ready
     WHERE {_HELD}
"""

_SQL_LOSE = """
    UPDATE liteq_jobs
       SET status = CASE WHEN cancel THEN 'cancelled' ELSE 'failed' END,
           error = :error, worker = NULL, timer = NULL, ready = NULL,
           lost = lost + 1, finished_at = :now, updated_at = :now
     WHERE id = :id
"""

_SQL_CANCEL = """
    UPDATE liteq_jobs
       SET cancel = 1, updated_at = :now,
           status = CASE WHEN worker IS NULL THEN 'cancelled' ELSE status END,
           ready = CASE WHEN worker IS NULL THEN NULL ELSE ready END,
           timer = CASE WHEN worker IS NULL THEN NULL ELSE timer END,
           finished_at = CASE WHEN worker IS NULL THEN :now END
     WHERE id = :id AND status IN ('pending', 'running')
 RETURNING status
"""

_SQL_SELECT_STATUS = "SELECT status, key, cancel FROM liteq_jobs WHERE id = ?"

_SQL_SELECT_CANCEL = "SELECT cancel FROM liteq_jobs WHERE id = ?"

# Steps claimed ahead that must not run: cancelled (or finished) since.
_SQL_SELECT_GONE = """
    SELECT id FROM liteq_jobs
     WHERE id IN ({}) AND (cancel OR finished_at IS NOT NULL)
"""

_SQL_RETRY = """
    UPDATE liteq_jobs
       SET status = CASE WHEN steps > 0 THEN 'running' ELSE 'pending' END,
           attempts = 0, failures = 0, lost = 0, cancel = 0, error = NULL,
           worker = NULL, timer = NULL, ready = :ready, eta = :now,
           finished_at = NULL, updated_at = :now
     WHERE id = :id AND status IN ('failed', 'cancelled')
"""

_SQL_PURGE = """
    DELETE FROM liteq_jobs WHERE id IN (
        SELECT id FROM liteq_jobs WHERE finished_at < ? LIMIT ?)
"""


class _Connection(sqlite3.Connection):
    """A connection that a WeakSet can hold, with the lock its thread
    holds while it uses it, so _Store.close() never closes it mid-use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()
        self.closed = False


class _Store:
    """The database file: connections, transactions and error mapping.

    Each thread gets its own connection (``threading.local``); SQLite
    connections are cheap and this keeps transactions of different threads
    apart.  A forked child never touches its parent's connections.
    """

    def __init__(self, path: str, durable: bool, busy_timeout: float) -> None:
        self.path = path
        self.durable = durable
        self.busy_timeout = busy_timeout
        self.clock = time.time  # patched by tests to move time
        self._local = threading.local()
        # Guards _connections and _schema_ok across threads.
        self._lock = threading.Lock()
        # Weak, so the connection of a thread that ended is closed with it
        # (a thread-per-request server would otherwise leak one each).
        self._connections: weakref.WeakSet = weakref.WeakSet()
        self._schema_ok = False
        self._pid = os.getpid()
        # False for readers that must never write (the CLI's read
        # commands, HTTP): an empty file is then refused, not created.
        self.creates = True

    # Connections ----------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._after_fork()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        return conn

    def _after_fork(self) -> None:
        # The parent's connections belong to the parent: forget them
        # without closing, which could disturb its locks.
        self._local = threading.local()
        self._connections = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=0,
                                   isolation_level=None,
                                   check_same_thread=False,
                                   factory=_Connection)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        try:
            if not self._schema_ok:
                self._prepare(conn)
            conn.execute("PRAGMA synchronous = "
                         + ("FULL" if self.durable else "NORMAL"))
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._connections.add(conn)
        return conn

    def _using(self, action: Callable[[_Connection], Any]) -> Any:
        """Run ``action`` on this thread's connection, holding its lock.

        close() takes the lock too, so it waits until the connection is no
        longer in use; one it closed first is replaced by a fresh one.
        """
        while True:
            conn = self.connection()
            with conn.lock:
                if not conn.closed:
                    return action(conn)

    def close(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections = weakref.WeakSet()
            self._local = threading.local()
        for conn in connections:
            with conn.lock:  # in use by another thread: wait for it
                conn.closed = True
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    # Schema ---------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check the file is liteq's, then create or migrate its schema."""
        # Another process may be creating the file: retry while busy.
        version = self._retry(lambda: self._check_header(conn))
        if version == 0 and not self.creates:
            raise SchemaError(
                f"no liteq database in {self.path} yet: the file is empty "
                f"(run and demo create one)")
        if version < _SCHEMA_VERSION:
            self._retry(lambda: self._migrate(conn))
        elif self._journal_mode(conn) != "wal":
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        self._schema_ok = True

    def _check_header(self, conn: sqlite3.Connection) -> int:
        try:
            app_id, version, tables = _execute(conn, _SQL_HEADER).fetchone()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                raise  # not a verdict on the file: the caller retries
            raise self._storage_error(exc) from exc
        if app_id != _APPLICATION_ID and (app_id or tables or version):
            raise SchemaError(
                f"{self.path} is a SQLite database that liteq did not make;"
                f" it was left untouched: point liteq at another file")
        if version > _SCHEMA_VERSION:
            raise SchemaError(
                f"{self.path} has schema version {version}, made by a newer"
                f" liteq (this is {__version__}, schema {_SCHEMA_VERSION}):"
                f" upgrade liteq")
        return version

    @staticmethod
    def _journal_mode(conn: sqlite3.Connection) -> str:
        return conn.execute("PRAGMA journal_mode").fetchone()[0].lower()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if self._journal_mode(conn) != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated since we looked.
            version = self._check_header(conn)
            for migration in _MIGRATIONS[version:]:
                for statement in migration:
                    _execute(conn, statement)
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # Transactions ---------------------------------------------------------

    def _retry(self, action: Callable[[], Any]) -> Any:
        """Run ``action``, retrying it whole while the database is busy."""
        deadline = time.monotonic() + self.busy_timeout
        for attempt in itertools.count():
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise self._storage_error(exc) from exc
                if time.monotonic() >= deadline:
                    raise Busy(
                        f"{self.path} stayed locked by other writers for "
                        f"{self.busy_timeout:g}s; retry later or raise "
                        f"Queue(busy_timeout=...)") from exc
                pause = min(0.0001 * 2 ** min(attempt, 7), 0.01)
                time.sleep(pause * (0.5 + random.random()))
            except sqlite3.DatabaseError as exc:
                raise self._storage_error(exc) from exc

    def _storage_error(self, exc: sqlite3.Error) -> Error:
        """The error to raise for ``exc``: it names the real cause."""
        kind = _fault_kind(exc)
        if kind == "damaged" and not _sqlite_header(self.path):
            return SchemaError(
                f"{self.path} is not a SQLite database ({exc}): point "
                f"liteq at another file (if it held liteq's jobs, it is "
                f"damaged: keep a copy and see docs/operations.md)")
        if kind == "damaged":
            return StorageError(
                f"{self.path} is damaged ({exc}): stop the processes that "
                f"use it and copy it, with its -wal and -shm files, before "
                f"any repair; then run PRAGMA integrity_check on the copy "
                f"in the sqlite3 shell (see docs/operations.md)")
        hint = ("" if kind != "access" else
                ": liteq must be able to write the file and its directory,"
                " where SQLite keeps the -wal and -shm files")
        return StorageError(f"cannot use {self.path}: {exc}{hint}")

    def write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``body(conn)`` in one short BEGIN IMMEDIATE transaction.

        The whole transaction is retried while another writer holds the
        lock; any exception rolls it back.  Nothing else may run inside.
        """
        def attempt(conn: _Connection) -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version != _SCHEMA_VERSION:
                    self._check_header(conn)
                result = body(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return self._retry(lambda: self._using(attempt))

    def insert(self, sql: str, params: Any) -> int:
        """Run one schema-checked INSERT as its own transaction; its id.

        One statement commits by itself (autocommit), so a plain
        ``.delay()`` needs no BEGIN, COMMIT or separate version check.
        """
        def attempt(conn: _Connection) -> int:
            cursor = _execute(conn, sql, params)
            if cursor.rowcount != 1:  # another liteq changed the schema
                self._check_header(conn)
                raise SchemaError(f"{self.path}: the job was not stored")
            return cursor.lastrowid

        try:  # the common case, without the retry loop's set-up
            return self._using(attempt)
        except sqlite3.Error:
            pass  # nothing was stored: one statement is atomic
        return self._retry(lambda: self._using(attempt))

    def read(self, sql: str, params: Any = ()) -> list:
        """Run one query outside any transaction and return its rows."""
        def attempt(conn: _Connection) -> list:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != _SCHEMA_VERSION:
                self._check_header(conn)
            return _execute(conn, sql, params).fetchall()

        return self._retry(lambda: self._using(attempt))

    def peek(self, sql: str, params: Any = ()) -> tuple | None:
        """One row of an advisory query; None if it failed.

        No separate schema check and no retry: the caller treats None as
        "go and see", and the write it then makes checks and reports.
        """
        try:
            return self._using(
                lambda conn: _execute(conn, sql, params).fetchone())
        except (sqlite3.Error, Error):
            return None

    def identity(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_dev, stat.st_ino)


def _execute(conn: sqlite3.Connection, sql: str,
             params: Any = ()) -> sqlite3.Cursor:
    """Run one statement; the single place SQL is sent, logged at DEBUG."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("sql: %s %r", " ".join(sql.split()), params)
    return conn.execute(sql, params)


def _execute_many(conn: sqlite3.Connection, sql: str,
                  rows: list) -> sqlite3.Cursor:
    """Run one statement for many rows, logged at DEBUG like _execute."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("sql: %s x%d", " ".join(sql.split()), len(rows))
    return conn.executemany(sql, rows)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
    text = str(exc)
    return "locked" in text or "busy" in text


def _fault_kind(exc: sqlite3.Error) -> str:
    """"damaged", "access" (read-only, cannot open) or "" for others."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        code &= 0xFF
        return ("damaged" if code in (11, 26)  # SQLITE_CORRUPT, _NOTADB
                else "access" if code in (3, 8, 14)  # _PERM, _READONLY,
                else "")  # _CANTOPEN
    text = str(exc)
    return ("damaged" if "malformed" in text or "not a database" in text
            else "access" if "readonly" in text or "unable to open" in text
            else "")


def _sqlite_header(path: str) -> bool:
    """Whether the file starts as a SQLite database does, or as the
    beginning of one (a file cut short)."""
    magic = b"SQLite format 3\0"
    try:
        with open(path, "rb") as file:
            start = file.read(len(magic))
    except OSError:
        return True  # cannot tell: do not call it another kind of file
    if len(start) < len(magic):
        return bool(start) and magic.startswith(start)
    return start == magic


def _next_ready(conn: sqlite3.Connection) -> int:
    return _execute(conn, _SQL_NEXT_READY).fetchone()[0]

# ---------------------------------------------------------------------------
# 6. Tasks: Task, task functions, registry, chain
# ---------------------------------------------------------------------------


class Task:
    """An unscheduled call of a task: a name, ``args`` and ``kwargs``.

    ``hello("world")`` returns one instead of running ``hello``.  Store it
    with ``delay()``, run it here with ``run()``, or return it from a step
    to make it the job's next step.  Two Tasks are equal when their JSON
    forms are equal.
    """

    __hash__ = None  # type: ignore[assignment]  # equal by value, mutable

    def __init__(self, name: str, args: Sequence = (), kwargs: dict | None
                 = None, *, _then: tuple = ()) -> None:
        self.name = _check_name("task name", name)
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        # Chain frames to resume, innermost first, when this call finishes.
        self._then = tuple(_then)

    @classmethod
    def _made(cls, name: str, args: list, kwargs: dict) -> Task:
        """A Task of a registered name: no checks, nothing copied."""
        task = cls.__new__(cls)
        task.name, task.args, task.kwargs, task._then = name, args, kwargs, ()
        return task

    # Identity and form ----------------------------------------------------

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = f"{self.name}({', '.join(parts)})"
        return f"<Task {text}{' then ...' if self._then else ''}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Task):
            return NotImplemented
        return serialize_task(self) == serialize_task(other)

    def _to_json(self, depth: int = 1, active: set | None = None) -> dict:
        active = set() if active is None else active
        out: dict = {_TAG_TASK: self.name}
        for part, encode, value in (("args", _items_to_json, self.args),
                                    ("kwargs", _dict_to_json, self.kwargs),
                                    ("then", _items_to_json, self._then)):
            if value or part != "then":
                try:
                    out[part] = encode(value, depth, active)
                except _Unstorable as exc:
                    exc.where.append(f".{part}")
                    raise
        return out

    @classmethod
    def _from_json(cls, value: dict, depth: int = 0) -> Task:
        """The Task of a serialized call at ``depth`` (see _from_json)."""
        name = value[_TAG_TASK]
        try:
            _check_name("task name", name)
        except (TypeError, ValueError) as exc:
            raise _Undecodable(f"is not in liteq's format: {exc}") from None
        parts = {}
        for part, kind, default in (("args", list, []), ("kwargs", dict, {}),
                                    ("then", list, [])):
            item = value.get(part, default)
            if not isinstance(item, kind):
                problem = _Undecodable(
                    f"is {item!r:.60}, not a JSON "
                    f"{'array' if kind is list else 'object'}")
                problem.where.append(f".{part}")
                raise problem
            try:
                # The kwargs object itself is never tagged: its values are.
                parts[part] = (_dict_from_json if kind is dict
                               else _items_from_json)(item, depth + 1)
            except _Undecodable as exc:
                exc.where.append(f".{part}")
                raise
        task = cls.__new__(cls)
        task.name, task.args, task.kwargs = name, parts["args"], \
            parts["kwargs"]
        task._then = tuple(parts["then"])
        _check_chain_form(task)
        return task

    # Options of the registered function -----------------------------------

    @property
    def function(self) -> TaskFunction:
        """The registered task function, or LookupError if there is none."""
        found = _REGISTRY.get(self.name)
        if found is None:
            raise LookupError(
                f"unknown task {self.name!r}: not registered in this "
                f"process; import the module that defines it")
        return found

    def percent(self) -> float | None:
        """Progress of the job whose current call this is, or None."""
        fn = _REGISTRY.get(self.name)
        own = fn._percent_of(self.args, self.kwargs) if fn else None
        for frame in self._then:  # each enclosing chain scales it
            members, done = _chain_state(frame)
            total = done + len(members)
            own = 100.0 * ((done - 1) + (own or 0.0) / 100.0) / total
        return own

    # Storing and running --------------------------------------------------

    def delay(self) -> Job:
        """Store this call for a worker and return its Job."""
        return self.apply_async()

    def apply_async(self, **options: Any) -> Job:
        """Store this call with scheduling options (see TaskFunction)."""
        queue = self.function._queue_for(self)
        return queue._enqueue(self, **options)

    def run(self) -> Any:
        """Run this call here, following continuations; return the result.

        Every call and result goes through the JSON form a worker uses,
        and each step is attempted once: an exception propagates.
        """
        call = _roundtrip(self, "")
        while True:
            value = call._run_step()
            follow = _advance(call, value)
            if follow is None:
                return value
            call = follow

    def run_once(self) -> Any:
        """Run exactly one step here; a Task means the work continues."""
        call = _roundtrip(self, "")
        value = call._run_step()
        follow = _advance(call, value)
        return value if follow is None else follow

    def _run_step(self) -> Any:
        fn = self.function
        args, kwargs = fn._bind_stored(self.args, self.kwargs)
        return _roundtrip(fn.__wrapped__(*args, **kwargs), "result")


def _decode_call(text: str) -> Task:
    """A stored call as a Task; quick when no argument needs decoding.

    A call not in the stored format raises ValueError naming the problem
    and where it is (``call.args[0]...``).
    """
    try:
        value = _parse(text)
        if not isinstance(value, dict) or _TAG_TASK not in value:
            raise _Undecodable(f"is {text!r:.100}, not a serialized task "
                               f"(an object with a {_TAG_TASK!r} key)")
        if text.count('"__') > 1:
            return Task._from_json(value)
        # Only the __task__ tag: plain JSON inside.
        task = Task.__new__(Task)
        task.name, task._then = value[_TAG_TASK], ()
        task.args, task.kwargs = value.get("args", []), value.get(
            "kwargs", {})
        if not (type(task.name) is str and type(task.args) is list
                and type(task.kwargs) is dict):
            return Task._from_json(value)  # to say what is wrong
        return task
    except _Undecodable as exc:
        raise exc.at("call") from None


def _roundtrip(value: Any, path: str) -> Any:
    try:
        return _loads(_dumps(_to_json(value, _top_depth(value))))
    except _Unstorable as exc:
        raise exc.at(path) from None


def _advance(call: Task, value: Any) -> Task | None:
    """The call after ``call`` returned ``value``, or None if finished.

    A returned Task continues the job and inherits ``call``'s chain frames.
    A final value resumes the innermost frame that has members left; the
    value is then dropped, since a chain keeps only its last result.
    """
    if isinstance(value, Task):
        return Task(value.name, value.args, value.kwargs,
                    _then=value._then + call._then)
    frames = call._then
    for i, frame in enumerate(frames):
        if frame.name != _CHAIN_NAME or _chain_state(frame)[0]:
            return Task(frame.name, frame.args, frame.kwargs,
                        _then=frame._then + frames[i + 1:])
    return None


class TaskFunction:
    """A function registered with ``@task``: calling it makes a Task.

    ``f(*args)`` returns a Task (nothing runs); ``f.delay(*args)`` stores
    the call and returns a Job; ``f.apply_async(...)`` is the long form;
    ``f.run(*args)`` runs it here, as a worker would.
    """

    def __init__(self, function: Callable, queue: Queue | None,
                 options: dict) -> None:
        functools.update_wrapper(self, function)
        self._signature = inspect.signature(function)
        self._arity = _simple_arity(self._signature)
        self._queue = queue
        self._identity = _default_name(function)
        for key, value in options.items():
            setattr(self, key, value)
        self.name = options["name"] or self._identity

    def __repr__(self) -> str:
        return f"<TaskFunction {self.name or self.__qualname__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Task:
        if not self._fits(args, kwargs):
            try:
                self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.__name__}(): {exc}") from None
        return Task._made(self._stored_name(), list(args), kwargs)

    def _fits(self, args: Sequence, kwargs: dict) -> bool:
        """A quick yes for positional calls of plain signatures."""
        arity = self._arity
        return (arity is not None and not kwargs
                and arity[0] <= len(args) <= arity[1])

    def delay(self, *args: Any, **kwargs: Any) -> Job:
        """Store a call of this task for a worker and return its Job."""
        return self(*args, **kwargs).apply_async()

    def apply_async(self, args: Sequence = (), kwargs: dict | None = None,
                    countdown: float | None = None, eta: Any = None,
                    priority: int | None = None, queue: str | None = None,
                    key: str | None = None) -> Job:
        """Store a call with options and return its Job.

        ``countdown`` (seconds from now) or ``eta`` (an aware datetime, a
        naive one read as local time, or a unix timestamp) delay the start;
        ``priority`` and ``queue`` override the task's; ``key`` makes the
        call idempotent among unfinished jobs.
        """
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args must be a list or tuple, got {args!r}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, got {kwargs!r}")
        call = self(*args, **(kwargs or {}))
        return self._queue_for(call)._enqueue(
            call, countdown=countdown, eta=eta, priority=priority,
            queue=queue, key=key)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the call here, following continuations; return the result."""
        return self(*args, **kwargs).run()

    # Internals ------------------------------------------------------------

    def _stored_name(self) -> str:
        if self.name is None:
            raise TypeError(
                f"task {self.__qualname__} has no importable module (it was"
                f" defined interactively): give it @task(name=...)")
        return self.name

    def _queue_for(self, call: Task) -> Queue:
        return _member_queue(call) or default_queue()

    def _bind_stored(self, args: list, kwargs: dict) -> tuple[list, dict]:
        """Bind stored arguments, or raise TypeError naming the task."""
        if self._fits(args, kwargs):
            return args, kwargs
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r} cannot take its stored "
                            f"arguments: {exc}") from None
        return args, kwargs

    def _percent_of(self, args: list, kwargs: dict) -> float | None:
        if self.percent is None:
            return None
        try:
            value = self.percent(*args, **kwargs)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"returned {value!r}, not a number")
            if not math.isfinite(value):
                raise ValueError(f"returned {value!r}")
        except Exception as exc:
            _warn_once(self.name, f"percent function of task {self.name!r} "
                                  f"failed: {exc!r}; percent is None")
            return None
        return float(min(100.0, max(0.0, value)))

    def _description(self, args: Sequence, kwargs: dict) -> str:
        template = self.description
        if self.name == _CHAIN_NAME and args:
            names = [t.name.rpartition(":")[2] for t in args[0]]
            return f"chain of {len(names)}: {', '.join(names)}"
        if template is None:
            return self.__name__.replace("_", " ")
        try:
            return template.format(*args, **kwargs)
        except Exception:
            return template


def _simple_arity(signature: inspect.Signature) -> tuple[int, int] | None:
    """(required, total) when every parameter is plain positional-or-
    keyword, so a positional call fits exactly when its length is within."""
    params = list(signature.parameters.values())
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        return None
    required = sum(p.default is p.empty for p in params)
    return required, len(params)


_WARNED: set = set()  # task names whose percent failure was logged
_WARNED_LOCK = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    logger.warning(message)


def _default_name(function: Callable) -> str | None:
    """``module:qualname``, naming ``__main__`` by how it was started."""
    module = function.__module__
    if module == "__main__":
        main_module = sys.modules.get("__main__")
        spec = getattr(main_module, "__spec__", None)
        path = getattr(main_module, "__file__", None)
        if spec is not None and spec.name:
            module = spec.name
        elif path:
            module = os.path.splitext(os.path.basename(path))[0]
        else:
            return None
    return f"{module}:{function.__qualname__}"


# The process-wide registry of tasks, by stored name.  Only functions found
# here ever run; a stored row never makes liteq import anything.
_REGISTRY: dict[str, TaskFunction] = {}
_REGISTRY_LOCK = threading.Lock()


def _check_function(function: Any) -> None:
    what = getattr(function, "__qualname__", None) or repr(function)
    if not inspect.isfunction(function):
        kind = ("a functools.partial" if isinstance(function,
                                                    functools.partial)
                else f"a {type(function).__name__}")
        raise TypeError(f"@task needs a plain top-level function, got "
                        f"{kind}: {function!r}")
    if function.__name__ == "<lambda>":
        raise TypeError("@task needs a plain top-level function, got a "
                        "lambda: define it with def at module level")
    if "." in function.__qualname__:
        raise TypeError(f"@task needs a top-level function, got {what}: "
                        f"move it to module level (methods and nested "
                        f"functions cannot be found by a worker)")
    if (inspect.iscoroutinefunction(function)
            or inspect.isasyncgenfunction(function)):
        raise TypeError(f"@task cannot run async functions: {what} is "
                        f"'async def'")
    if inspect.isgeneratorfunction(function):
        raise TypeError(f"@task cannot run generator functions: {what} "
                        f"yields; return a value or the next Task instead")


_MAX_RETRY_DELAY = 100 * 365.25 * 86400  # seconds


def _check_options(options: dict) -> dict:
    unknown = set(options) - set(_TASK_DEFAULTS)
    if unknown:
        raise TypeError(f"@task got unknown options {sorted(unknown)}; "
                        f"known: {sorted(_TASK_DEFAULTS)}")
    opts = {**_TASK_DEFAULTS, **options}
    if opts["percent"] is not None and not callable(opts["percent"]):
        raise TypeError(f"percent must be callable, got {opts['percent']!r}")
    _check_int("retries", opts["retries"], 0)
    for option in ("retry_delay", "retry_max_delay"):
        opts[option] = _check_number(option, opts[option])
        if opts[option] > _MAX_RETRY_DELAY:  # else etas past year 9999
            raise ValueError(f"{option} must be at most "
                             f"{_MAX_RETRY_DELAY:.0f} seconds (100 years),"
                             f" got {options[option]!r}")
    _check_name("queue", opts["queue"])
    _check_int("priority", opts["priority"], *_INT64)
    if opts["name"] is not None:
        _check_name("name", opts["name"])
    if opts["description"] is not None and not isinstance(
            opts["description"], str):
        raise TypeError(f"description must be a str, got "
                        f"{opts['description']!r}")
    opts["lease"] = _check_number("lease", opts["lease"], strict=True)
    _check_int("max_lost", opts["max_lost"], 1)
    return opts


def _register(function: Callable, queue: Queue | None,
              options: dict) -> TaskFunction:
    _check_function(function)
    wrapper = TaskFunction(function, queue, _check_options(options))
    if wrapper.name is None:
        return wrapper  # interactive: usable once given a name
    with _REGISTRY_LOCK:
        taken = _REGISTRY.get(wrapper.name)
        if taken is not None and taken._identity != wrapper._identity:
            raise ValueError(
                f"task name {wrapper.name!r} is taken by "
                f"{taken._identity}: give {wrapper._identity} another "
                f"name=")
        _REGISTRY[wrapper.name] = wrapper
    return wrapper


def _task_decorator(queue: Queue | None, function: Callable | None,
                    args: tuple, options: dict) -> Any:
    if args:
        raise TypeError("@task options are keyword-only, e.g. "
                        "@task(retries=3)")
    if function is None:
        _check_options(options)  # fail at decoration, not at first call
        return lambda fn: _register(fn, queue, options)
    return _register(function, queue, options)


def task(function: Callable | None = None, *args: Any,
         **options: Any) -> Any:
    """Register a top-level function as a task of the default queue.

    Use bare (``@task``) or with options (``@task(retries=3)``): percent,
    retries, retry_delay, retry_max_delay, queue, priority, name,
    description, lease, max_lost.
    """
    if function is not None and not callable(function):
        raise TypeError("@task options are keyword-only, e.g. "
                        "@task(retries=3)")
    return _task_decorator(None, function, args, options)


# chain ----------------------------------------------------------------------

_CHAIN_NAME = "liteq:chain"


def _chain_state(frame: Task) -> tuple[list, int]:
    members = frame.args[0] if frame.args else []
    return members, frame.kwargs.get("done", 0)


def _chain_percent(members: list, done: int = 0) -> float:
    total = done + len(members)
    return 100.0 * done / total if total else 0.0


def _chain_step(members: list, done: int = 0) -> Any:
    """Make the next member current; resume here when it finishes."""
    if not members:
        return None
    head = deserialize_task(members[0])
    rest = Task(_CHAIN_NAME, [members[1:]], {"done": done + 1})
    return Task(head.name, head.args, head.kwargs,
                _then=head._then + (rest,))


_register(_chain_step, None, {
    "name": _CHAIN_NAME, "percent": _chain_percent, "description": "chain"})


def _check_chain_form(task: Task) -> None:
    """Raise _Undecodable if a decoded call is a chain, or carries chain
    frames, in a form liteq never writes (see docs/format.md)."""
    if task.name == _CHAIN_NAME:
        problem = _chain_problem(task, 0)
        if problem:
            raise _Undecodable(problem)
    for i, frame in enumerate(task._then):
        if isinstance(frame, Task) and frame.name == _CHAIN_NAME:
            problem = _chain_problem(frame, 1)  # frames have started
        else:
            problem = f"is {frame!r:.60}, not a chain frame (a {_CHAIN_NAME}" \
                      f" call)"
        if problem:
            exc = _Undecodable(problem)
            exc.where.append(f".then[{i}]")
            raise exc


def _chain_problem(call: Task, least: int) -> str | None:
    members = call.args[0] if len(call.args) == 1 else None
    if not (isinstance(members, list)
            and all(isinstance(m, Task) for m in members)):
        return (f"is a {_CHAIN_NAME} call whose args must be [a list of "
                f"serialized tasks], got {call.args!r:.60}")
    done = call.kwargs.get("done", 0)
    if set(call.kwargs) - {"done"} or type(done) is not int or done < least:
        return (f"is a {_CHAIN_NAME} call whose kwargs must be {{'done': "
                f"an int >= {least}}}, got {call.kwargs!r:.60}")
    return None


def chain(tasks: Sequence[Task]) -> Task:
    """A Task that runs each task's steps to completion, in order.

    It finishes with the last task's result; it can be delayed, returned
    as a continuation, or nested in another chain.
    """
    if isinstance(tasks, (str, bytes, dict)) or not hasattr(
            tasks, "__iter__"):
        raise TypeError(f"chain() takes a list of Tasks, got {tasks!r}")
    members = [deserialize_task(t) for t in tasks]
    queues = {q.path for q in map(_member_queue, members) if q is not None}
    if len(queues) > 1:
        raise ValueError("chain() members belong to different Queues: "
                         "chain tasks of one database only")
    return Task(_CHAIN_NAME, [members])


def _options_function(call: Task) -> TaskFunction:
    """The task whose queue name and priority a new job of ``call`` takes.

    A chain takes them from its first member, as it takes its Queue.
    """
    fn = call.function
    if fn.name == _CHAIN_NAME:
        members = _chain_state(call)[0]
        if members:
            first = _options_function(deserialize_task(members[0]))
            fn = first if first.name != _CHAIN_NAME else fn
    return fn


def _member_queue(call: Task) -> Queue | None:
    fn = _REGISTRY.get(call.name)
    if fn is None:
        return None
    if fn.name == _CHAIN_NAME:
        members = _chain_state(call)[0]
        return _member_queue(members[0]) if members else None
    return fn._queue if fn._queue is not None else default_queue()


def serialize_task(t: Task) -> dict:
    """Return the stable plain-JSON form of a Task (see docs/format.md)."""
    if not isinstance(t, Task):
        raise TypeError(f"serialize_task() needs a Task, got {t!r}")
    try:
        return t._to_json()
    except _Unstorable as exc:
        raise exc.at("") from None


def deserialize_task(value: Any) -> Task:
    """Turn ``serialize_task()``'s form back into a Task; never imports.

    A Task is returned unchanged.  A name not registered here still gives
    a Task that can be held and passed on; running it raises LookupError.
    A value not in the format raises ValueError naming where it is wrong
    (``args[1]['when']``).
    """
    if isinstance(value, Task):
        return value
    if not isinstance(value, dict) or _TAG_TASK not in value:
        raise TypeError(f"deserialize_task() needs a Task or its serialized"
                        f" dict, got {value!r:.200}")
    try:
        return Task._from_json(value)
    except _Undecodable as exc:
        raise exc.at("", "the task") from None

# ---------------------------------------------------------------------------
# 7. Jobs and queues: Job, Queue, the default queue
# ---------------------------------------------------------------------------


class _Signal:
    """Wake-ups within this process for one database file and one kind.

    Kind "work": a job became ready (idle workers wait on it); kind
    "finished": a job finished (``Job.result()`` waits on it).  Notifiers
    bump ``generation`` after each commit.  A waiter reads the generation
    before it looks at the database and sleeps only if nothing happened
    since, so no wake-up is lost between the look and the wait.
    """

    _by_path: dict[tuple[str, str], _Signal] = {}
    _registry_lock = threading.Lock()

    def __init__(self) -> None:
        self.condition = threading.Condition(threading.Lock())
        self.generation = 0
        self.local = 0  # notifications by this process's own commits
        self.waiting = 0  # threads in wait(); changed under the condition
        # Threads waiting in a select() (see _Inotify.wait_either): rung
        # through their pipe.  Changed under the condition.
        self.bells: set[_Inotify] = set()

    @classmethod
    def of(cls, path: str, kind: str = "work") -> _Signal:
        found = cls._by_path.get((path, kind))
        if found is None:
            with cls._registry_lock:
                found = cls._by_path.setdefault((path, kind), cls())
        return found

    def notify(self, local: bool = True) -> None:
        # Only increments, so a waiter never mistakes a new generation for
        # the one it read.  A waiter counts itself before it compares, so
        # either it sees the new generation or this sees it waiting.
        self.local += local
        self.generation += 1
        if self.waiting:
            with self.condition:
                self.condition.notify_all()
        if self.bells:
            for bell in list(self.bells):
                bell.interrupt()

    def wait(self, generation: int, timeout: float) -> None:
        with self.condition:
            self.waiting += 1
            try:
                if self.generation == generation and timeout > 0:
                    self.condition.wait(timeout)
            finally:
                self.waiting -= 1


class Job:
    """A handle on one stored job; every field read is fresh.

    Fields: id, name, current, description, queue, priority, key, status,
    percent, steps, attempts, error, eta, created_at, started_at,
    updated_at, finished_at (aware UTC datetimes), worker.
    """

    def __init__(self, queue: Queue, job_id: int | None) -> None:
        self._q = queue
        self._id = job_id

    def __repr__(self) -> str:
        return f"<Job {self._id if self._id is not None else '(batched)'}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Job):
            return NotImplemented
        return (self._q.path, self._id) == (other._q.path, other._id)

    def __hash__(self) -> int:
        return hash((self._q.path, self._id))

    @property
    def id(self) -> int:
        """The job's id: unique in its database, never reused."""
        if self._id is None:
            raise RuntimeError("this job is stored when its batch() block "
                               "exits; read its fields after the block")
        return self._id

    def _row(self) -> dict:
        rows = self._q._store.read(_SQL_SELECT_JOB, (self.id,))
        if not rows:
            raise JobNotFound(f"job {self.id} does not exist in "
                              f"{self._q.path} (never stored, or purged)")
        return _row_dict(rows[0])

    def to_dict(self) -> dict:
        """One consistent snapshot of every field, in JSON-ready form."""
        return _public_dict(self._row())

    def refresh(self) -> Job:
        """Return self: fields are read fresh anyway."""
        self._row()
        return self

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its result.

        Raises TaskFailed, TaskCancelled, TimeoutError or JobNotFound.
        """
        if timeout is not None:
            _check_number("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        signal_ = _Signal.of(self._q.path, "finished")
        while True:
            generation = signal_.generation
            row = self._row()
            if row["status"] in _FINISHED:
                return _outcome(row)
            left = _RESULT_POLL
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"job {self.id} did not finish "
                                       f"within {timeout}s")
            signal_.wait(generation, left)

    def cancel(self) -> bool:
        """Cancel the job; False if it had already finished done or failed.

        A running step is never interrupted: it is cancelled when it ends.
        """
        store = self._q._store

        def body(conn: sqlite3.Connection) -> bool:
            row = _execute(conn, _SQL_SELECT_STATUS, (self.id,)).fetchone()
            if row is None:
                raise JobNotFound(f"job {self.id} does not exist")
            if row[0] in (_DONE, _FAILED):
                return False
            _execute(conn, _SQL_CANCEL, {"id": self.id, "now": store.clock()})
            return True

        cancelled = store.write(body)
        _Signal.of(self._q.path, "finished").notify()
        return cancelled

    def retry(self) -> Job:
        """Send a failed or cancelled job back to run its current call."""
        store = self._q._store

        def body(conn: sqlite3.Connection) -> None:
            row = _execute(conn, _SQL_SELECT_STATUS, (self.id,)).fetchone()
            if row is None:
                raise JobNotFound(f"job {self.id} does not exist")
            status, key, _ = row
            if status not in (_FAILED, _CANCELLED):
                raise ValueError(f"job {self.id} is {status}: only failed or"
                                 f" cancelled jobs can be retried")
            if key is not None and _execute(
                    conn, _SQL_SELECT_ACTIVE_KEY, (key,)).fetchone():
                raise ValueError(f"job {self.id} has key {key!r}, now held "
                                 f"by another unfinished job")
            _execute(conn, _SQL_RETRY, {"id": self.id, "now": store.clock(),
                                        "ready": _next_ready(conn)})

        store.write(body)
        _Signal.of(self._q.path).notify()
        return self


def _job_field(column: str, convert: Callable = lambda v: v) -> property:
    def read(self: Job) -> Any:
        return convert(self._row()[column])
    read.__doc__ = f"The job's {column.replace('_', ' ')} (read fresh)."
    return property(read)


for _column in ("name", "current", "description", "queue", "priority",
                "key", "status", "percent", "steps", "attempts", "error",
                "worker"):
    setattr(Job, _column, _job_field(_column))
_TIME_COLUMNS = ("eta", "created_at", "started_at", "updated_at",
                 "finished_at")
for _column in _TIME_COLUMNS:
    setattr(Job, _column, _job_field(_column, _utc))
del _column


def _row_dict(row: tuple) -> dict:
    return dict(zip(_JOB_COLUMNS.split(", "), row))


def _public_dict(row: dict) -> dict:
    """The JSON form of a job row used by to_dict(), the CLI and HTTP.

    A row changed outside liteq may hold what liteq cannot read.  Each
    such field is None and ``unreadable`` says what is wrong, so one bad
    row never hides the others (see docs/format.md).
    """
    problems: list[str] = []
    out = {}
    for key in _PUBLIC_FIELDS:
        problem = _field_problem(key, row[key])
        out[key] = None if problem else row[key]
        if problem:
            problems.append(problem)
    for key in _TIME_COLUMNS:
        try:
            out[key] = _iso(row[key])
        except ValueError:
            out[key] = None
            problems.append(f"{key} is {_shown(row[key])}, not a unix time")
    out["args"] = out["kwargs"] = out["result"] = None
    try:
        _decode_call(row["call"])  # as a worker reads it
        call = _parse(row["call"])
        out["args"] = call.get("args", [])
        out["kwargs"] = call.get("kwargs", {})
    except ValueError as exc:
        problems.append(str(exc))
    if row["status"] == _DONE and row["result"] is not None:
        try:
            _loads(row["result"])
            out["result"] = _parse(row["result"])
        except _Undecodable as exc:
            problems.append(str(exc.at("result")))
    if problems:
        out["unreadable"] = "; ".join(problems)
    return out


_PUBLIC_FIELDS = ("id", "name", "current", "description", "queue",
                  "priority", "key", "status", "percent", "steps",
                  "attempts", "error", "worker")


def _field_problem(key: str, value: Any) -> str | None:
    """What is wrong with a stored field for to_dict(), or None."""
    if key in ("id", "priority", "steps", "attempts"):
        ok, want = type(value) is int, "an integer"
    elif key == "percent":
        ok = value is None or (type(value) in (int, float)
                               and math.isfinite(value))
        want = "a finite number"
    elif key == "status":
        ok, want = value in _STATUSES, "a status"
    else:
        ok = type(value) is str or (value is None and key in (
            "key", "error", "worker"))
        want = "text"
    return None if ok else f"{key} is {_shown(value)}, not {want}"


def _shown(value: Any) -> str:
    return "a BLOB" if isinstance(value, bytes) else f"{value!r:.60}"


def _outcome(row: dict) -> Any:
    if row["status"] == _DONE:
        try:
            return _loads(row["result"]) if row["result"] else None
        except _Undecodable as exc:
            raise ValueError(f"stored row of job {row['id']} is malformed: "
                             f"{exc.at('result')}") from None
    if row["status"] == _FAILED:
        error = row["error"]
        if isinstance(error, bytes):  # changed outside liteq
            error = error.decode("utf-8", "replace")
        raise TaskFailed(row["id"], error or "")
    raise TaskCancelled(row["id"])


class _CurrentJob(Job):
    """The job whose step runs in this thread (see current_job())."""

    def __init__(self, queue: Queue, job_id: int, step: int, attempt: int,
                 token: int) -> None:
        super().__init__(queue, job_id)
        self._step, self._attempt, self._token = step, attempt, token

    step = property(lambda self: self._step,
                    doc="Number of this step, from 1.")
    attempt = property(lambda self: self._attempt,
                       doc="Number of this attempt of this step, from 1.")
    token = property(lambda self: self._token,
                     doc="Fencing token: grows with every claim.")

    @property
    def cancel_requested(self) -> bool:
        """Whether cancel() was called for this job (read fresh)."""
        rows = self._q._store.read(_SQL_SELECT_CANCEL, (self.id,))
        return bool(rows and rows[0][0])


_CURRENT = threading.local()


def current_job() -> _CurrentJob | None:
    """The Job of the step running in this thread, or None outside one."""
    return getattr(_CURRENT, "job", None)


class Queue:
    """One database file holding jobs, and the tasks that delay into it.

    Opens lazily, is safe to share between threads, and releases its
    connections on ``close()`` or at the end of a ``with`` block.
    """

    def __init__(self, path: str | os.PathLike, durable: bool = False,
                 busy_timeout: float = 30, max_payload: int = 2**20) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or path in ("", ":memory:"):
            raise ValueError(f"Queue needs a file path, got {path!r}: "
                             f"workers in other processes must open it")
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise Error(f"liteq needs SQLite 3.35 or newer; this Python "
                        f"has {sqlite3.sqlite_version}")
        busy_timeout = _check_number("busy_timeout", busy_timeout)
        _check_int("max_payload", max_payload, 1)
        #: Absolute path of the database file.
        self.path = os.path.abspath(path)
        self.max_payload = max_payload
        self._store = _Store(self.path, bool(durable), busy_timeout)
        self._batch = threading.local()

    def __repr__(self) -> str:
        return f"<Queue {self.path}>"

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close this Queue's connections (it reopens if used again).

        A query that another thread is running ends first.
        """
        self._store.close()

    def task(self, function: Callable | None = None, *args: Any,
             **options: Any) -> Any:
        """Register a task whose calls are stored in this Queue."""
        if function is not None and not callable(function):
            raise TypeError("@task options are keyword-only, e.g. "
                            "@q.task(retries=3)")
        return _task_decorator(self, function, args, options)

    # Reading ---------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        """The Job with this id, or None."""
        _check_int("job id", job_id)
        if not _INT64[0] <= job_id <= _INT64[1]:
            return None  # SQLite could not even hold it
        rows = self._store.read(_SQL_SELECT_JOB, (job_id,))
        return Job(self, job_id) if rows else None

    def jobs(self, status: str | None = None, name: str | None = None,
             queue: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs newest first, filtered by status, task name, queue name."""
        return [Job(self, row["id"]) for row in
                self._job_rows(status, name, queue, limit)]

    def _job_rows(self, status: str | None = None, name: str | None = None,
                  queue: str | None = None, limit: int = 100) -> list[dict]:
        if status is not None and status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)},"
                             f" got {status!r}")
        _check_int("limit", limit, 0, _INT64[1])
        rows = self._store.read(_SQL_SELECT_JOBS, {
            "status": status, "name": name, "queue": queue, "limit": limit})
        return [_row_dict(row) for row in rows]

    def counts(self, queue: str | None = None) -> dict[str, int]:
        """Number of jobs in each of the five statuses."""
        counts = dict.fromkeys(_STATUSES, 0)
        for name, status, n in self._store.read(_SQL_COUNT_JOBS):
            if queue is None or name == queue:
                counts[status] += n
        return counts

    def _counts_by_queue(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, status, n in self._store.read(_SQL_COUNT_JOBS):
            out.setdefault(name, dict.fromkeys(_STATUSES, 0))[status] = n
        return out

    def purge(self, older_than: float) -> int:
        """Delete jobs finished more than ``older_than`` seconds ago."""
        older_than = _check_number("older_than", older_than)
        cutoff = self._store.clock() - older_than
        deleted = 0
        while True:
            n = self._store.write(lambda conn: _execute(
                conn, _SQL_PURGE, (cutoff, _PURGE_CHUNK)).rowcount)
            deleted += n
            if n < _PURGE_CHUNK:
                return deleted

    # Storing ---------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Queue]:
        """Store every delay() made on this Queue in the block at once.

        The calls are validated as they are made and stored in one
        transaction when the block exits normally; if it raises, none is.
        """
        outer = getattr(self._batch, "items", None)
        if outer is not None:  # nested: join the outer block
            yield self
            return
        self._batch.items = []
        try:
            yield self
            items = self._batch.items
        finally:
            self._batch.items = None
        if items:
            ids = self._store.write(
                lambda conn: _insert_many(conn, [row for row, _ in items]))
            for (_, job), job_id in zip(items, ids):
                job._id = job_id
            _Signal.of(self.path).notify()

    def _enqueue(self, call: Task, countdown: float | None = None,
                 eta: Any = None, priority: int | None = None,
                 queue: str | None = None, key: str | None = None) -> Job:
        row = self._job_row(call, countdown, eta, priority, queue, key)
        items = getattr(self._batch, "items", None)
        if items is not None:
            job = Job(self, None)
            items.append((row, job))
            return job
        if key is None:
            job_id = self._store.insert(_SQL_INSERT_CHECKED, row)
        else:
            job_id = self._store.write(lambda conn: _insert(conn, row))
        _Signal.of(self.path).notify()
        return Job(self, job_id)

    def _job_row(self, call: Task, countdown: Any, eta: Any, priority: Any,
                 queue: Any, key: Any) -> _NewJob:
        """Validate a call and its options into the row to insert."""
        own = call.function
        fn = own if own.name != _CHAIN_NAME else _options_function(call)
        text = _encode(call, "", self.max_payload)
        if own.percent is not None or own.description is not None:
            # They see the arguments as a worker will, decoded from JSON.
            call = Task._from_json(_parse(text))
        now = self._store.clock()
        start = _start_time(countdown, eta, now)
        if priority is not None:
            _check_int("priority", priority, *_INT64)
        if queue is not None:
            _check_name("queue", queue)
        if key is not None:
            _check_name("key", key)
        return _NewJob(
            call.name, text,
            _storable_text(own._description(call.args, call.kwargs)),
            fn.queue if queue is None else queue,
            fn.priority if priority is None else priority,
            key, call.percent() if call._then else own._percent_of(
                call.args, call.kwargs), start, start <= now, now)


def _insert_many(conn: sqlite3.Connection,
                 rows: list[_NewJob]) -> list[int]:
    """Insert rows in order; runs without a key go in one executemany."""
    ids: list[int] = []
    for keyed, run in itertools.groupby(rows, lambda r: r.key is not None):
        run = list(run)
        if keyed:
            ids += [_insert(conn, row) for row in run]
            continue
        _execute_many(conn, _SQL_INSERT_JOB, run)
        # AUTOINCREMENT hands consecutive ids to a run in one transaction.
        last = _execute(conn, _SQL_LAST_ID).fetchone()[0]
        ids += range(last - len(run) + 1, last + 1)
    return ids


def _insert(conn: sqlite3.Connection, row: _NewJob) -> int:
    if row.key is not None:
        found = _execute(conn, _SQL_SELECT_ACTIVE_KEY, (row.key,))
        existing = found.fetchone()
        if existing:
            return existing[0]
    return _execute(conn, _SQL_INSERT_JOB, row).lastrowid


# The latest start liteq stores: every stored time must read back as a
# datetime (years 1 to 9999), in any time zone it is shown in.
_LAST_START = 253370764800.0  # 9999-01-01T00:00:00Z
_LAST_START_TEXT = "9999-01-01T00:00:00Z"


def _start_time(countdown: Any, eta: Any, now: float) -> float:
    if countdown is not None and eta is not None:
        raise TypeError("give countdown or eta, not both")
    if countdown is not None:
        start = now + max(0.0, _check_number("countdown", countdown,
                                             -math.inf))
        if start >= _LAST_START:
            raise ValueError(
                f"countdown must start the job before {_LAST_START_TEXT},"
                f" got {countdown!r} seconds: give a shorter countdown")
        return start
    if eta is None:
        return now
    if isinstance(eta, _dt.datetime):
        try:
            start = eta.timestamp()  # naive: local time
        except (OverflowError, ValueError, OSError):
            if eta.utcoffset() is not None:
                raise  # aware: not a range problem
            # Naive, near year 1 or 9999: local time is out of range.
            start = -math.inf if eta.year < 5000 else math.inf
    elif isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a datetime or a unix timestamp, got "
                        f"{eta!r}")
    else:
        start = _check_number("eta", eta, -math.inf)
    if start >= _LAST_START:
        raise ValueError(f"eta must be before {_LAST_START_TEXT}, got "
                         f"{eta!r}: give an earlier time")
    return max(now, start)


_DEFAULT_QUEUE: list = []  # the default Queue, made on first use
_DEFAULT_LOCK = threading.Lock()


def default_queue() -> Queue:
    """The Queue behind module-level @task: $LITEQ_DB, else ./liteq.db."""
    with _DEFAULT_LOCK:
        if not _DEFAULT_QUEUE:
            _DEFAULT_QUEUE.append(
                Queue(os.environ.get("LITEQ_DB") or _DEFAULT_DB))
        return _DEFAULT_QUEUE[0]


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() stays held in the child
    # forever: give the child fresh ones.  Worker threads are not copied.
    global _REGISTRY_LOCK, _WARNED_LOCK, _DEFAULT_LOCK
    _REGISTRY_LOCK = threading.Lock()
    _WARNED_LOCK = threading.Lock()
    _DEFAULT_LOCK = threading.Lock()
    _Signal._by_path = {}
    _Signal._registry_lock = threading.Lock()
    for gate in list(_Gate.opened):  # the parent's lead is not the child's
        gate.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def configure(path: str | os.PathLike, **options: Any) -> Queue:
    """Point the default Queue at ``path`` (before it is first used)."""
    queue = Queue(path, **options)
    with _DEFAULT_LOCK:
        if _DEFAULT_QUEUE and _DEFAULT_QUEUE[0]._store._connections:
            old = _DEFAULT_QUEUE[0]
            if old.path != queue.path:
                raise RuntimeError(
                    f"the default queue is already in use at {old.path}; "
                    f"call configure() before the first delay()")
        _DEFAULT_QUEUE[:] = [queue]
    return queue

# ---------------------------------------------------------------------------
# 8. Worker: claiming, running and recording steps
# ---------------------------------------------------------------------------


class _Claimed:
    """A claimed step: what the worker needs to run it and record it.

    ``started`` is the store-clock time the step began (None before);
    ``shown`` whether its start is written, so observers see it run;
    ``renewed`` the monotonic time its lease was last written.
    """

    __slots__ = ("id", "current", "call", "token", "attempt", "step",
                 "failures", "priority", "ready", "limits", "lease",
                 "renewed", "started", "shown", "began", "long",
                 "confirmed", "after")

    def __init__(self, row: tuple, ready: int | None,
                 limits: tuple[float, int]) -> None:
        (self.id, self.current, self.call, self.token, attempts, steps,
         self.failures, self.priority) = row
        self.attempt, self.step = attempts + 1, steps + 1
        self.ready, self.limits, self.lease = ready, limits, limits[0]
        self.renewed = time.monotonic()
        self.started: float | None = None
        self.shown = False
        self.began = 0.0  # monotonic start, for the rescue of long steps
        self.long = False  # whether the heartbeat saw it run long
        self.confirmed = True  # False until the claim is written
        self.after: _Outcome | None = None  # the outcome that claimed it

    def refused(self) -> bool:
        """Whether the outcome that claimed this step was refused: then
        its token may be another worker's, and nothing may be written."""
        return self.after is not None and self.after.ok is False

    def follow(self, outcome: _Outcome) -> _Claimed:
        """The next step of this job, claimed again at once.

        The claim is written with this step's outcome; until then the
        lease is renewed under this step's token.
        """
        nxt = _Claimed((self.id, outcome.current, outcome.text,
                        self.token + 1, 0, self.step, 0, self.priority),
                       None, self.limits)
        nxt.renewed, nxt.confirmed, nxt.after = self.renewed, False, outcome
        outcome.follow = nxt
        return nxt


class _Outcome:
    """The end of a step, to be recorded under the claim's token.

    kind: 'continue' (text is the next call), 'continue_here' (the same,
    and this worker runs the next step), 'done' (text is the result),
    'retry' (a retryable error), 'fail' (a final error), or 'release'.
    """

    __slots__ = ("claimed", "kind", "text", "current", "percent", "error",
                 "retries", "delay", "ended", "follow", "ok")

    def __init__(self, claimed: _Claimed, kind: str, text: str | None = None,
                 current: str | None = None, percent: float | None = None,
                 error: str | None = None, retries: int = 0,
                 delay: float = 0.0) -> None:
        self.claimed, self.kind, self.text = claimed, kind, text
        self.current, self.percent, self.error = current, percent, error
        self.retries, self.delay = retries, delay
        self.ended = time.monotonic()
        self.follow: _Claimed | None = None  # see _Claimed.follow
        self.ok: bool | None = None  # whether it was written


class _Lane:
    """What one worker thread holds: steps claimed ahead, the step it runs,
    and outcomes not yet written.

    ``lock`` guards the fields against the heartbeat, which renews every
    held lease and rescues a deferred step that runs long; ``writing`` is
    held while either writes this lane's outcomes, so they land in order.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writing = threading.Lock()
        self.ahead: collections.deque[_Claimed] = collections.deque()
        self.pending: list[_Outcome] = []
        self.running: _Claimed | None = None
        self.streak = 0  # short steps in a row
        self.solo = False  # run_once(): one step, nothing kept
        # When the line was last seen clear down to a priority: (monotonic
        # time, work signal generation, priority); see _may_continue_here.
        self.clear: tuple[float, int, int] = (-math.inf, 0, 0)
        self.looked = -math.inf  # when steps ahead were last checked
        self.helping = -math.inf  # a follower claims freely until then

    def held(self) -> list[_Claimed]:
        """Every step whose lease this thread keeps (call under lock)."""
        held = list(self.ahead)
        held += [o.claimed for o in self.pending]
        if self.running is not None:
            held.append(self.running)
        return [claimed for claimed in held if claimed.confirmed]

    def take(self, release: bool) -> tuple[list[_Outcome], list[_Claimed]]:
        """Hand over the outcomes to write and, with ``release``, the
        steps claimed ahead, to put back in line (call under lock)."""
        pending, self.pending = self.pending, []
        ahead: list[_Claimed] = []
        if release:
            ahead, self.ahead = list(self.ahead), collections.deque()
        return pending, ahead

    def restore(self, pending: list[_Outcome],
                ahead: list[_Claimed]) -> None:
        """Take back what take() handed over when nothing was written."""
        with self.lock:
            self.pending[:0] = pending
            self.ahead.extendleft(reversed(ahead))


class Worker:
    """Run stored jobs in background threads of this process.

    ``Worker(queue=None, threads=1, queues=None, keep=None)``: ``queue`` is
    the Queue (default: the default queue), ``queues`` the queue names to
    serve (default: ``["default"]``), ``keep`` a duration (``"7d"`` or
    seconds) after which finished jobs are purged.  ``start()`` returns at
    once; ``stop()`` lets running steps finish.  No signal handlers.
    """

    def __init__(self, queue: Queue | None = None, threads: int = 1,
                 queues: Sequence[str] | None = None,
                 keep: str | float | None = None) -> None:
        self.queue = queue if queue is not None else default_queue()
        self.threads = _check_int("threads", threads, 1, 1024)
        if isinstance(queues, str):
            queues = [queues]
        self.queues = [_check_name("queue name", q)
                       for q in (queues or [_DEFAULT_NAME])]
        if isinstance(keep, str):
            keep = _parse_duration(keep)
        self.keep = None if keep is None else _check_number("keep", keep)
        #: Why the worker stopped by itself (e.g. its file was deleted).
        self.fatal: str | None = None
        self._store = self.queue._store
        self._signal = _Signal.of(self.queue.path)
        self._finished = _Signal.of(self.queue.path, "finished")
        # Set by stop(): no new claims; idle threads wake at once.
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._probe_at = 0.0  # store-clock time of the next timer probe
        self._lost = False  # whether the last cycle failed a lost job
        self._lifecycle = threading.Lock()  # serialises start() and stop()
        # Set while at least one thread is idle: the watcher only listens
        # for other processes' commits then (our own would wake it).
        self._someone_idle = threading.Event()
        self._idle_lock = threading.Lock()  # also guards _lanes
        self._idle = 0
        # Whether the last idle wait saw another process write (with a
        # bell, see _Watcher.start): then the next looks come _WAKE_GAP
        # apart, the last one _WAKE_GAP after the writes stop.
        self._writes_seen = False
        self._lanes: list[_Lane] = []  # one per running thread
        self._heartbeat = _Heartbeat(self)
        self._gate = _Gate(self.queue.path)
        self._watcher = _Watcher(self)

    def __repr__(self) -> str:
        return (f"<Worker {self.queue.path} queues={self.queues} "
                f"threads={self.threads}>")

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # Lifecycle ------------------------------------------------------------

    def start(self) -> Worker:
        """Start the worker's daemon threads and return at once."""
        with self._lifecycle:
            if self._threads:
                raise RuntimeError("this Worker is already started")
            self._start_threads()
        return self

    def _start_threads(self) -> None:
        # _stopping stays set if stop() came first: the threads then end
        # at once, and run_forever() returns.
        self._store.connection()  # open (and check) the file now
        # The watcher first: a thread's first idle wait must find the
        # bell (see _Watcher.start) already there.
        self._watcher.start()
        self._threads = [
            threading.Thread(target=self._run_thread, daemon=True,
                             name=f"liteq-worker-{i + 1}")
            for i in range(self.threads)]
        for thread in self._threads:
            thread.start()
        self._heartbeat.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming, wait for running steps; True if all finished."""
        self._request_stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        # Several threads may call stop(): one at a time tears down.
        with self._lifecycle:
            for thread in self._threads:
                left = None if deadline is None else max(
                    0.0, deadline - time.monotonic())
                thread.join(left)
            finished = not any(t.is_alive() for t in self._threads)
            if finished and self._threads:
                self._heartbeat.stop()
                self._watcher.stop()
                self._gate.close()
                self._threads = []
                self._stopping.clear()  # it may be started again
        return finished

    def run_forever(self) -> None:
        """Run in this thread until stop() is called from elsewhere.

        Raises StorageError if the worker had to stop by itself.
        """
        with contextlib.suppress(RuntimeError):  # already started
            self.start()
        # Ends when stop() is called, here or by a stop() elsewhere that
        # also tore the threads down.
        while self._threads and not self._stopping.wait(0.1):
            pass
        self.stop()
        if self.fatal:
            raise StorageError(self.fatal)

    def _request_stop(self) -> None:
        self._stopping.set()
        self._signal.notify()

    def _die(self, message: str) -> None:
        logger.error("worker stopping: %s", message)
        self.fatal = message
        self._request_stop()

    # The loop of each thread -----------------------------------------------
    #
    # A thread claims steps in line order, one at a time, and writes each
    # step's start before running it and its outcome with the next claim.
    # After _STREAK steps in a row shorter than _FAST it defers: it claims
    # up to _BATCH_MAX steps, runs them back to back and writes their
    # starts and outcomes together, at most _GROUP_AGE seconds later, with
    # its next claim.  A step that runs past _RESCUE seconds is seen by the
    # heartbeat: if deferred, the outcomes before it are written, its start
    # shown, and the steps claimed behind it go back to their places in
    # line.  Of several workers on one file, only the lead claims at once
    # (see _Gate); a thread of another worker claims only when work waits.

    def run_once(self) -> bool:
        """Claim and run one step in this thread; True if one ran."""
        lane = _Lane()
        lane.solo = True
        claimed, _ = self._cycle(lane, None, claim=True)
        if claimed is None:
            return False
        self._run_step(lane, claimed)
        self._cycle(lane, None, claim=False)
        return True

    def _run_thread(self) -> None:
        lane = _Lane()
        with self._idle_lock:
            self._lanes.append(lane)
        try:
            self._serve(lane)
        finally:
            with self._idle_lock:
                self._lanes.remove(lane)

    def _serve(self, lane: _Lane) -> None:
        failures = 0
        idle = False
        seen_local = self._signal.local
        step: _Claimed | None = None  # claimed ahead, to start next
        while True:
            generation, local = self._signal.generation, self._signal.local
            stopping = self._stopping.is_set()
            if step is None and not stopping and lane.ahead:
                with lane.lock:
                    step = lane.ahead.popleft() if lane.ahead else None
            if step is not None and not stopping and self._may_defer(lane):
                if self._still_wanted(lane, step):
                    self._run_step(lane, step)
                step = None
                continue
            claim = step is None and not stopping
            hold = None  # seconds a follower leaves the line to the lead
            if (claim and not lane.solo and time.monotonic() > lane.helping
                    and not self._gate.take()):
                hold = self._follower_hold()
                claim = hold is None
                if claim:  # the line needs help: give it for a while
                    lane.helping = time.monotonic() + _FOLLOW_WAIT
                if not claim and not lane.pending:
                    # Commits wake the lead, not us: look again later.
                    self._stopping.wait(hold)
                    continue
            # Woken by another process's commit: look before locking.  A
            # commit of this process that made work needs no look.
            looked = idle and claim and not lane.pending and (
                local == seen_local)
            if looked and not self._work_in_sight():
                self._idle_wait(generation, _IDLE_MAX)
                continue
            seen_local = local
            try:
                claimed, due = self._cycle(lane, step, claim)
            except SchemaError as exc:
                self._die(str(exc))
                return
            except Error as exc:  # Busy, StorageError: keep trying
                failures += 1
                logger.error("cannot use %s (attempt %d): %s; retrying",
                             self.queue.path, failures, exc)
                time.sleep(min(0.05 * 2 ** min(failures, 6), 2.0))
                continue
            except Exception:  # a bug of ours: keep the thread alive
                failures += 1
                logger.exception("worker error; the steps' outcomes are "
                                 "dropped and they will run again")
                with lane.lock:
                    lane.pending = []
                step = None
                time.sleep(min(0.05 * 2 ** min(failures, 6), 2.0))
                continue
            failures, step, idle = 0, None, False
            if claimed is not None:
                self._run_step(lane, claimed)
            elif lane.ahead:
                continue  # a batch to run deferred
            elif stopping:
                return
            else:
                pause = _IDLE_MAX if due is None else due - time.time()
                if hold is not None:
                    pause = min(pause, hold)
                self._idle_wait(generation, min(max(pause, 0.0), _IDLE_MAX))
                idle = pause >= _IDLE_MAX  # else a timer is due: claim

    def _may_defer(self, lane: _Lane) -> bool:
        """Whether to run the next step without writing its start first."""
        if lane.solo or lane.streak < _STREAK:
            return False
        pending = lane.pending
        return not pending or (
            len(pending) < _BATCH_MAX
            and time.monotonic() - pending[0].ended < _GROUP_AGE)

    def _still_wanted(self, lane: _Lane, step: _Claimed) -> bool:
        """Whether a step claimed ahead may run: not cancelled since.

        A read costs more than a short step, so it looks at most every
        _CANCEL_LOOK seconds, and then at every step ahead.
        """
        now = time.monotonic()
        if now - lane.looked < _CANCEL_LOOK:
            return True
        ids = [step.id, *(claimed.id for claimed in lane.ahead)]
        try:
            gone = {row[0] for row in self._store.read(
                _SQL_SELECT_GONE.format(",".join("?" * len(ids))), ids)}
        except Error:
            return True  # the write that follows meets the error
        lane.looked = now
        if gone:
            with lane.lock:
                lane.ahead = collections.deque(
                    c for c in lane.ahead if c.id not in gone)
            for job_id in sorted(gone):
                logger.info("job %d cancelled before its step started",
                            job_id)
        return step.id not in gone

    def _run_step(self, lane: _Lane, claimed: _Claimed) -> None:
        """Run a claimed step; keep its outcome for the lane's next write."""
        if claimed.started is None:
            claimed.started = self._store.clock()
        claimed.began = time.monotonic()
        if (claimed.attempt > 1 or claimed.step == 1) and logger.isEnabledFor(
                logging.INFO):
            logger.info("job %d started: %s (step %d, attempt %d)",
                        claimed.id, claimed.current, claimed.step,
                        claimed.attempt)
        with lane.lock:
            lane.running = claimed
        # The heartbeat looks at a step that runs past _RESCUE seconds.
        self._heartbeat.poke(_RESCUE)
        outcome = self._execute(claimed)
        follow = None
        if outcome.kind == "continue" and self._may_continue_here(
                lane, claimed, outcome):
            outcome.kind = "continue_here"
            follow = claimed.follow(outcome)
        with lane.lock:
            lane.running = None
            lane.pending.append(outcome)
            if follow is not None:
                lane.ahead.appendleft(follow)
        lane.streak = lane.streak + 1 if (
            outcome.ended - claimed.began < _FAST) else 0
        if outcome.kind == "release":  # KeyboardInterrupt in a task
            logger.warning("job %d: KeyboardInterrupt in %s: step released, "
                           "worker stopping", claimed.id, claimed.current)
            self._request_stop()

    def _may_continue_here(self, lane: _Lane, claimed: _Claimed,
                           outcome: _Outcome) -> bool:
        """Whether the job's next step would be this thread's next claim."""
        fn = _REGISTRY.get(outcome.current)
        if (lane.solo or self._stopping.is_set() or fn is None
                or (fn.lease, fn.max_lost) != claimed.limits
                or (claimed.token + 1) >> _TOKEN_BITS
                != claimed.token >> _TOKEN_BITS
                or any(c.priority >= claimed.priority for c in lane.ahead)):
            return False
        # The line was clear a moment ago, and nothing of this process has
        # joined it since: a job another process delays overtakes at most
        # _GROUP_AGE seconds of steps later.
        now, generation = time.monotonic(), self._signal.generation
        if (now - lane.clear[0] < _GROUP_AGE and generation == lane.clear[1]
                and claimed.priority >= lane.clear[2]):
            return True
        try:
            if any(self._store.read(_SQL_HIGHER_READY,
                                    (name, claimed.priority))
                   for name in self.queues):
                return False
        except Error:
            return False
        lane.clear = (now, generation, claimed.priority)
        return True

    def _work_in_sight(self) -> bool:
        """Whether a claim could find work, read without the write lock.

        Every commit wakes idle workers; without this each would take the
        write lock only to find nothing, crowding out the producers.
        """
        sql = _SQL_WORK_IN_SIGHT.format(",".join("?" * len(self.queues)))
        found = self._store.peek(sql, (*self.queues, self._store.clock()))
        return found is None or bool(found[0])

    def _follower_hold(self) -> float | None:
        """For a worker that does not lead: None if the line needs it
        now (_FOLLOW_LOAD jobs wait, or one has waited _FOLLOW_WAIT),
        else how long to leave it to the lead before looking again."""
        now, hold = self._store.clock(), _FOLLOW_LOOK
        try:
            loads = [self._store.read(_SQL_LINE_LOAD, {
                "queue": name, "limit": _FOLLOW_LOAD})[0]
                for name in self.queues]
            # A due timer (an eta, or the lease of a frozen lead) counts
            # as a job that waits since then.
            loads.append((1, self._store.read(_SQL_NEXT_TIMER)[0][0]))
        except Error:
            return None  # let the claim meet the error and report it
        for count, since in loads:
            if since is None or since > now:
                continue
            if count >= _FOLLOW_LOAD or (
                    count and now - since >= _FOLLOW_WAIT):
                return None
            if count:
                hold = min(hold, _FOLLOW_WAIT - (now - since))
        return max(hold, 0.001)

    def _idle_wait(self, generation: int, timeout: float) -> None:
        with self._idle_lock:
            self._idle += 1
            self._someone_idle.set()
        try:
            bell, streaming = self._watcher.bell, self._writes_seen
            if bell is None:
                self._signal.wait(generation, timeout)
            else:  # while writes go on, look every _WAKE_GAP, and once
                self._writes_seen = bell.wait_either(  # after they stop
                    self._signal, generation,
                    min(timeout, _WAKE_GAP) if streaming else timeout,
                    file=not streaming)
        finally:
            with self._idle_lock:
                self._idle -= 1
                if not self._idle:
                    self._someone_idle.clear()

    # The write transactions: claims, starts and outcomes --------------------
    #
    # A cycle writes what a thread has to write (outcomes, starts, steps to
    # give back) and claims what it runs next, in one transaction.  Every
    # write after a claim is guarded by the claim's token (_HELD).

    def _cycle(self, lane: _Lane, step: _Claimed | None,
               claim: bool) -> tuple[_Claimed | None, float | None]:
        """Write the lane's outcomes, then start ``step`` or claim more.

        One transaction.  Returns the step to run now, its start written,
        or None and when the next timer is due.  Claimed steps that will
        run deferred go to ``lane.ahead``.  When the worker stops, the
        steps claimed ahead go back in line.
        """
        with lane.writing:
            with lane.lock:
                outcomes, release = lane.take(self._stopping.is_set())
            self._lost = False  # set by _wake_due when it ends a job
            try:
                rows, started, batch, due = self._store.write(
                    lambda conn: self._write_cycle(conn, lane, outcomes,
                                                   release, step, claim))
            except BaseException:
                lane.restore(outcomes, release)  # nothing was written
                raise
        if batch:
            with lane.lock:
                lane.ahead.extend(batch)
        held = batch + [started] if started else batch
        if held:
            self._heartbeat.poke(min(c.lease for c in held) / 3, period=True)
        self._after_write(outcomes, rows, release)
        if step is not None and started is None:
            logger.info("job %d: cancelled or taken back before step %d of "
                        "%s started; not run", step.id, step.step,
                        step.current)
        return started, due

    def _write_cycle(self, conn: sqlite3.Connection, lane: _Lane,
                     outcomes: list[_Outcome], release: list[_Claimed],
                     step: _Claimed | None, claim: bool) -> tuple:
        now = self._store.clock()
        rows = self._write_outcomes(conn, outcomes, release, now)
        started = step if step and self._start(conn, step, now) else None
        batch: list[_Claimed] = []
        due = None
        if claim:
            defer = self._may_defer(lane)
            limit = _BATCH_MAX if defer else 1
            batch, due = self._claim_in(conn, now, limit, start=not defer)
            if batch:  # as of this claim, nothing in it was cancelled
                lane.looked = time.monotonic()
            if batch and not defer:  # its start is written
                started = batch.pop()
        return rows, started, batch, due

    def _write_outcomes(self, conn: sqlite3.Connection,
                        outcomes: list[_Outcome], release: list[_Claimed],
                        now: float) -> list:
        rows: list = []
        while len(rows) < len(outcomes):
            first = outcomes[len(rows)]
            run = [first]  # steps of one job that continued here
            while (run[-1].kind == "continue_here"
                   and len(rows) + len(run) < len(outcomes)
                   and outcomes[len(rows) + len(run)].claimed
                   is run[-1].follow):
                run.append(outcomes[len(rows) + len(run)])
            if run[-1].kind != "continue_here":
                run = run[:-1] or run  # its end is written on its own
            row = self._record(conn, run[-1], now, first, len(run))
            for outcome in run:
                outcome.ok = row is not None
                rows.append(row)
        for claimed in release:
            ready = claimed.ready
            if ready is None:  # a next step kept here: back to the end
                ready = _next_ready(conn)
            _execute(conn, _SQL_RELEASE, {"id": claimed.id, "ready": ready,
                                          "token": claimed.token})
        return rows

    def _after_write(self, outcomes: list[_Outcome], rows: list,
                     release: list[_Claimed]) -> None:
        """Log the outcomes just written and wake who waits for them."""
        finished, in_line = self._lost, bool(release)
        for outcome, row in zip(outcomes, rows):
            if outcome.follow is not None and row is not None:
                outcome.follow.confirmed = True
            self._log_outcome(outcome, row)
            status = row[0] if isinstance(row, tuple) else None
            if status in _FINISHED:
                finished = True
            elif row is not None and outcome.kind != "continue_here":
                in_line = True  # another thread may run it
        if finished:
            self._finished.notify()
        if in_line:
            self._signal.notify()

    def _long_step(self, lane: _Lane, step: _Claimed) -> None:
        """Called by the heartbeat for a step that runs past _RESCUE.

        If it runs deferred, it is shown (see _rescue).  If no thread of
        this worker is left to claim, another worker may lead (_Gate).
        """
        if not step.shown:
            self._rescue(lane)
        if not self._idle:
            self._gate.give()

    def _rescue(self, lane: _Lane) -> None:
        """Show a deferred step that runs long; free what waits behind it.

        The outcomes before the step are written, its start too, and the
        steps claimed after it go back in line.
        """
        with lane.writing:
            with lane.lock:
                step = lane.running
                if step is None or step.shown:
                    return
                step.shown = True
                lane.streak = 0
                outcomes, release = lane.take(True)

            def body(conn: sqlite3.Connection) -> list:
                now = self._store.clock()
                rows = self._write_outcomes(conn, outcomes, release, now)
                self._start(conn, step, now)
                return rows

            try:
                rows = self._store.write(body)
            except Error as exc:
                logger.error("cannot record steps in %s: %s; trying again",
                             self._store.path, exc)
                lane.restore(outcomes, release)
                step.shown = step.long = False  # the next beat retries
                return
        self._after_write(outcomes, rows, release)

    def _start(self, conn: sqlite3.Connection, claimed: _Claimed,
               now: float) -> bool:
        """Write that a claimed step starts; False if the claim was lost."""
        if claimed.started is None:
            claimed.started = now
        claimed.shown = True
        return not claimed.refused() and bool(_execute(conn, _SQL_START, {
            "id": claimed.id, "token": claimed.token, "now": now,
            "attempt": claimed.attempt, "worker": _HOST_PID,
            "started": claimed.started}).rowcount)

    def _claim_in(self, conn: sqlite3.Connection, now: float, limit: int,
                  start: bool) -> tuple[list[_Claimed], float | None]:
        """Claim up to ``limit`` ready steps, putting due timers in line.

        With ``start`` (and a limit of 1), the step's start is written too.
        """
        # While busy, look for due timers every _PROBE seconds; when
        # nothing is ready, always look before going idle.
        probed = now >= self._probe_at
        if probed:
            self._wake_due(conn, now)
        batch = self._claim(conn, now, limit, start)
        if not batch and not probed:
            self._wake_due(conn, now)
            probed = True
            batch = self._claim(conn, now, limit, start)
        if probed:
            self._probe_at = now + _PROBE
        due = None if batch else _execute(
            conn, _SQL_NEXT_TIMER).fetchone()[0]
        return batch, due

    def _wake_due(self, conn: sqlite3.Connection, now: float) -> None:
        """Put due jobs in line; release steps whose lease expired.

        A step counts as lost only if its start was written: a claim that
        lapsed before that (or a deferred step, see _may_defer) ran nothing
        anyone saw.
        """
        for job_id, current, worker, lost, max_lost, cancel in _execute(
                conn, _SQL_SELECT_DUE, (now,)).fetchall():
            params = {"id": job_id, "now": now, "lost": 0}
            if worker is not None:
                params["lost"] = 1
                logger.warning("job %d: lease of worker %s expired while "
                               "running %s", job_id, worker, current)
                if cancel or lost + 1 >= max_lost:
                    params["error"] = (f"worker lost {lost + 1} times while "
                                       f"running {current}")
                    _execute(conn, _SQL_LOSE, params)
                    self._lost = True
                    continue
            params["ready"] = _next_ready(conn)
            _execute(conn, _SQL_MAKE_READY, params)

    def _claim(self, conn: sqlite3.Connection, now: float, limit: int,
               start: bool = False) -> list[_Claimed]:
        """Claim the first ``limit`` ready steps of our queue names; with
        ``start``, also write the start of the (one) step claimed."""
        if start and len(self.queues) == 1:
            return self._claim_started(conn, now)
        batch = self._claim_line(conn, now, limit)
        if start and batch:  # a claim of this transaction: never refused
            self._start(conn, batch[0], now)
        return batch

    def _claim_started(self, conn: sqlite3.Connection,
                       now: float) -> list[_Claimed]:
        """Claim the first ready step of our one queue name, started."""
        lease, max_lost = _TASK_DEFAULTS["lease"], _TASK_DEFAULTS["max_lost"]
        row = _execute(conn, _SQL_CLAIM_START, {
            "queue": self.queues[0], "now": now, "lease": lease,
            "max_lost": max_lost, "worker": _HOST_PID}).fetchone()
        if row is None:
            return []
        claimed = _Claimed(row, None, self._limits(conn, now, row[0],
                                                   row[1]))
        claimed.started, claimed.shown = now, True
        return [claimed]

    def _limits(self, conn: sqlite3.Connection, now: float, job_id: int,
                current: str) -> tuple[float, int]:
        """The lease and max_lost of a claimed step's task; a claim wrote
        the defaults, so a task with its own is adjusted here."""
        defaults = _TASK_DEFAULTS["lease"], _TASK_DEFAULTS["max_lost"]
        fn = _REGISTRY.get(current)
        limits = (fn.lease, fn.max_lost) if fn else defaults
        if limits != defaults:
            _execute(conn, _SQL_ADJUST_CLAIM, {
                "id": job_id, "now": now, "lease": limits[0],
                "max_lost": limits[1]})
        return limits

    def _claim_line(self, conn: sqlite3.Connection, now: float,
                    limit: int) -> list[_Claimed]:
        """Claim the first ``limit`` ready steps of our queue names."""
        if len(self.queues) == 1:
            line = _execute(conn, _SQL_LINE,
                            (self.queues[0], limit)).fetchall()
        else:  # the index orders one queue name at a time: merge here
            line = sorted((row for name in self.queues for row in _execute(
                conn, _SQL_LINE, (name, limit)).fetchall()),
                key=lambda row: (-row[1], row[2]))[:limit]
        if not line:
            return []
        lease, max_lost = _TASK_DEFAULTS["lease"], _TASK_DEFAULTS["max_lost"]
        sql = _SQL_CLAIM.format(",".join("?" * len(line)))
        rows = {row[0]: row for row in _execute(
            conn, sql, (now, lease, max_lost, *(r[0] for r in line)))}
        return [_Claimed(rows[job_id], ready,
                         self._limits(conn, now, job_id, rows[job_id][1]))
                for job_id, _, ready in line]

    def _record(self, conn: sqlite3.Connection, outcome: _Outcome,
                now: float, first: _Outcome, n: int) -> Any:
        """Write an outcome; None if refused.  With n > 1, ``first`` to
        ``outcome`` are n steps of one job that continued here."""
        claimed = first.claimed
        if claimed.refused():
            return None
        params = {"id": claimed.id, "token": claimed.token, "now": now,
                  "attempt": claimed.attempt, "started": claimed.started,
                  "n": n}
        if outcome.error is not None:
            outcome.error = _storable_text(outcome.error)
        kind = outcome.kind
        if kind in ("continue", "continue_here"):
            params.update(call=outcome.text, current=outcome.current,
                          percent=outcome.percent)
            if kind == "continue":
                params["ready"] = _next_ready(conn)
                row = _execute(conn, _SQL_CONTINUE, params).fetchone()
            else:
                row = _execute(conn, _SQL_CONTINUE_HERE, params).fetchone()
        elif kind == "done":
            params["result"] = outcome.text
            row = (_DONE,) if _execute(conn, _SQL_DONE,
                                      params).rowcount else None
        elif kind == "fail":
            params["error"] = outcome.error
            row = _execute(conn, _SQL_FAIL, params).fetchone()
        elif kind == "retry":
            params.update(error=outcome.error, retries=outcome.retries,
                          delay=outcome.delay, ready=_next_ready(conn))
            row = _execute(conn, _SQL_FAIL_STEP, params).fetchone()
        else:  # release
            params["ready"] = _next_ready(conn)
            row = _execute(conn, _SQL_RELEASE, params).rowcount or None
        return row

    def _log_outcome(self, outcome: _Outcome, row: Any = None) -> None:
        claimed = outcome.claimed
        if row is None:
            logger.warning("job %d: lease lost while running %s (step %d); "
                           "its outcome was discarded", claimed.id,
                           claimed.current, claimed.step)
            return
        status = row[0] if isinstance(row, tuple) else None
        if status == _CANCELLED:
            logger.info("job %d cancelled", claimed.id)
        elif outcome.kind == "continue":
            logger.info("job %d continued: step %d of %s done, next %s",
                        claimed.id, claimed.step, claimed.current,
                        outcome.current)
        elif outcome.kind == "done":
            logger.info("job %d done", claimed.id)
        elif outcome.kind == "retry" and status != _FAILED:
            logger.info("job %d retried in %gs: %s", claimed.id,
                        outcome.delay, _error_line(outcome.error))
        elif outcome.kind in ("retry", "fail"):
            logger.info("job %d failed: %s", claimed.id,
                        _error_line(outcome.error))

    # Running one step -------------------------------------------------------

    def _execute(self, claimed: _Claimed) -> _Outcome:
        """Run one claimed step with no transaction open."""
        try:
            call = _decode_call(claimed.call)
            fn = _REGISTRY.get(call.name)
            if fn is None:
                raise LookupError(f"unknown task {call.name!r}: not "
                                  f"registered in this worker")
            args, kwargs = fn._bind_stored(call.args, call.kwargs)
        except (LookupError, TypeError, ValueError) as exc:
            logger.error("job %d: %s", claimed.id, exc)
            return _Outcome(claimed, "fail", error=str(exc))
        _CURRENT.job = _CurrentJob(self.queue, claimed.id, claimed.step,
                                   claimed.attempt, claimed.token)
        try:
            value = fn.__wrapped__(*args, **kwargs)
        except KeyboardInterrupt:
            return _Outcome(claimed, "release")
        except BaseException:  # SystemExit too: it fails this step only
            return self._failure(claimed, fn, traceback.format_exc())
        finally:
            _CURRENT.job = None
        return self._success(claimed, call, value)

    def _failure(self, claimed: _Claimed, fn: TaskFunction,
                 error: str) -> _Outcome:
        retry = claimed.failures + 1
        delay = min(fn.retry_delay * 2 ** (retry - 1), fn.retry_max_delay)
        return _Outcome(claimed, "retry", error=error, retries=fn.retries,
                        delay=delay)

    def _success(self, claimed: _Claimed, call: Task,
                 value: Any) -> _Outcome:
        limit = self.queue.max_payload
        try:
            follow = _advance(call, value)
            if follow is None:
                return _Outcome(claimed, "done",
                                _encode(value, "result", limit))
            text = _encode(follow, "continuation", limit)
            fn = _REGISTRY.get(follow.name)
            if follow._then or (fn is not None and fn.percent is not None):
                follow = deserialize_task(_parse(text))  # as stored
        except (TypeError, ValueError) as exc:
            error = f"task {call.name!r} returned a value liteq cannot " \
                    f"store: {exc}"
            return _Outcome(claimed, "fail", error=error)
        return _Outcome(claimed, "continue", text, follow.name,
                        follow.percent())


# ---------------------------------------------------------------------------
# 9. Worker helpers: the lead, heartbeats, wake-ups
# ---------------------------------------------------------------------------


class _Gate:
    """Which of the workers on one file leads: a lock on ``<db>-lead``.

    The lead claims work as soon as it sees it; the others follow: they
    claim only when the line waits on them (see Worker._follower_hold),
    so four workers on a load one can carry write no more than one.  A
    lead gives the gate up when all its threads run long steps.  The
    kernel drops the lock of a process that dies.  Where flock is
    missing, or the file cannot be made, every worker leads.
    """

    opened: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, path: str) -> None:
        self._path = path + "-lead"
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.held = False
        _Gate.opened.add(self)

    def take(self) -> bool:
        """Lead if nobody else does; True if this worker leads."""
        if self.held or fcntl is None:
            return True
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT
                                       | getattr(os, "O_CLOEXEC", 0), 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:
                return True  # no way to agree on a lead: lead
            self.held = True
            return True

    def give(self) -> None:
        with self._lock:
            if self.held and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # drops the lock too
            self._fd, self.held = None, False

    def forget(self) -> None:
        """In a forked child: close the descriptor without unlocking,
        which would unlock it for the parent too."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self.held, self._lock = None, False, threading.Lock()


class _Heartbeat:
    """Renews the leases a Worker's threads hold, every lease / 3, and
    rescues their deferred steps that run long (see Worker._rescue)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        # Notified by poke() and on stop.
        self._condition = threading.Condition(threading.Lock())
        self._wake_at = math.inf  # when the thread next wakes (monotonic)
        self._period = _TASK_DEFAULTS["lease"] / 3  # shortest seen
        self._again = False  # poked while awake: look again at once
        self._thread: threading.Thread | None = None
        self._stop = False

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="liteq-heartbeat")
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()

    def poke(self, within: float, period: bool = False) -> None:
        """Make sure the thread looks again within ``within`` seconds.

        With ``period``, ``within`` is a renewal period of steps now held.
        """
        wake_at = self._wake_at
        if (wake_at == -math.inf or time.monotonic() + within < wake_at
                or (period and within < self._period)):
            with self._condition:
                if period:
                    self._period = min(self._period, within)
                self._again = True
                self._condition.notify_all()

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            wake = self._beat(now)
            with self._condition:
                if self._stop:
                    return
                # Between steps nothing may be held: look again after the
                # shortest period seen rather than sleep for good, so a
                # claim need not wake this thread.
                wake = min(wake, now + self._period)
                if not self._again:
                    self._wake_at = wake
                    self._condition.wait(max(0.0, wake - time.monotonic()))
                self._again = False
                self._wake_at = -math.inf  # awake: poke() sets _again

    def _beat(self, now: float) -> float:
        """Renew what is due and rescue long deferred steps; next wake."""
        due: list[_Claimed] = []
        long: list[tuple[_Lane, _Claimed]] = []
        wake = math.inf
        with self._worker._idle_lock:
            lanes = list(self._worker._lanes)
        for lane in lanes:
            with lane.lock:
                for claimed in lane.held():
                    at = claimed.renewed + claimed.lease / 3
                    if at <= now:
                        due.append(claimed)
                        at = now + claimed.lease / 3
                    wake = min(wake, at)
                step = lane.running
                if step is not None and not step.long:
                    if now - step.began >= _RESCUE:
                        step.long = True
                        long.append((lane, step))
                    else:
                        wake = min(wake, step.began + _RESCUE)
                if step is not None or lane.ahead or lane.pending:
                    # Busy: look again soon, so that each step need not
                    # wake this thread (see poke).
                    wake = min(wake, now + _RESCUE)
        if due:
            self._renew(due, now)
        for lane, step in long:
            self._worker._long_step(lane, step)
        return wake

    def _renew(self, due: list[_Claimed], now: float) -> None:
        store = self._worker._store

        def body(conn: sqlite3.Connection) -> list:
            until = store.clock()
            return [_execute(conn, _SQL_SET_LEASE, {
                "id": c.id, "token": c.token,
                "until": until + c.lease}).rowcount for c in due]

        try:
            renewed = store.write(body)
        except Error as exc:
            logger.error("cannot renew leases in %s: %s", store.path, exc)
            return
        for claimed, ok in zip(due, renewed):
            claimed.renewed = now
            if not ok and self._still_held(claimed):
                logger.warning("job %d: lease lost while running %s (step "
                               "%d)", claimed.id, claimed.current,
                               claimed.step)

    def _still_held(self, claimed: _Claimed) -> bool:
        with self._worker._idle_lock:
            lanes = list(self._worker._lanes)
        for lane in lanes:
            with lane.lock:
                if any(c is claimed for c in lane.held()):
                    return True
        return False


class _Watcher:
    """Wakes a Worker's idle threads when another process commits.

    On Linux it watches the database's ``-wal`` file with inotify (every
    commit writes to it), so an idle worker uses no CPU and wakes within
    a millisecond; a worker of one thread waits on that watch itself
    (``bell``).  Elsewhere it polls ``PRAGMA data_version``.  It also
    checks, about once a second, that the file was not deleted or
    replaced, keeps the WAL bounded and purges old jobs (``keep``).
    """

    _POLL = 0.005  # seconds between data_version checks without inotify

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._inotify: _Inotify | None = None
        # A worker of one thread listens to the watch itself, in the same
        # select() as its own process's wake-ups: one thread woken, not
        # two.  Then this thread only keeps house.
        self.bell: _Inotify | None = None

    def start(self) -> None:
        self._stop.clear()
        self._inotify = _Inotify.watch(self._worker._store.path + "-wal")
        if self._worker.threads == 1:
            self.bell = self._inotify
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="liteq-watch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._worker._someone_idle.set()  # wake the thread if it waits
        if self._inotify is not None:
            self._inotify.interrupt()
        if self._thread is not None:
            self._thread.join()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = self.bell = None

    def _run(self) -> None:
        worker, store = self._worker, self._worker._store
        identity = store.identity()
        version = None
        next_check = next_purge = 0.0
        while not self._stop.is_set():
            if self.bell is not None:
                changed = False  # the worker's thread listens itself
                self._stop.wait(1.0)
            elif not worker._someone_idle.wait(1.0):
                changed = False  # all threads busy: nobody to wake
            elif self._inotify is not None:
                changed = False
                if self._inotify.wait(1.0):
                    self._settle()
            else:
                self._stop.wait(self._POLL)
                seen = self._data_version()
                changed, version = seen != version, seen
            if changed:
                worker._signal.notify(local=False)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 1.0
                if store.identity() != identity:
                    worker._die(f"database file {store.path} was deleted "
                                f"or replaced")
                    return
                self._bound_wal()
            if worker.keep is not None and now >= next_purge:
                next_purge = now + 3600.0
                self._purge()

    def _settle(self) -> None:
        """Wake the threads, and once more when the writes stop.

        A commit's last write to the WAL comes a moment before SQLite
        publishes it in the shared-memory index, so a thread woken by that
        write can look too early; the last wake-up, _WAKE_GAP after the
        last write, finds it.
        """
        signal_ = self._worker._signal
        signal_.notify(local=False)
        # While writes go on, wake the threads once per _WAKE_GAP: other
        # processes may commit thousands of times a second, and waking
        # for each would spend the CPU they need.
        while not self._stop.wait(_WAKE_GAP) and (
                self._inotify is not None and self._inotify.wait(0)):
            signal_.notify(local=False)
        signal_.notify(local=False)

    def _data_version(self) -> int | None:
        with contextlib.suppress(Error):
            rows = self._worker._store.read("PRAGMA data_version")
            return rows[0][0]
        return None

    def _bound_wal(self) -> None:
        store = self._worker._store
        try:
            size = os.path.getsize(store.path + "-wal")
        except OSError:
            return
        if size > _WAL_LIMIT:
            with contextlib.suppress(Error):
                store.read("PRAGMA wal_checkpoint(RESTART)")

    def _purge(self) -> None:
        try:
            n = self._worker.queue.purge(self._worker.keep)
        except Error as exc:
            logger.error("purge failed: %s", exc)
            return
        if n:
            logger.info("purged %d finished jobs", n)


class _Inotify:
    """A minimal Linux inotify watch through ctypes (IN_MODIFY only)."""

    _IN_MODIFY = 0x2

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # interrupt() writes to this pipe to end a wait() at once.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def watch(cls, path: str) -> _Inotify | None:
        """Watch ``path``, or return None where inotify is unavailable."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, os.fsencode(path),
                                      cls._IN_MODIFY) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if the file changed."""
        ready, _, _ = select.select([self.fd, self._wake_read], [], [],
                                    timeout)
        if self.fd not in ready:
            return False
        self._drain(self.fd)
        return True

    def wait_either(self, signal_: _Signal, generation: int,
                    timeout: float, file: bool = True) -> bool:
        """Wait for ``signal_`` to pass ``generation``, or (with
        ``file``) the file to change, or ``timeout``; True if the file
        changed, looked at without waiting when not ``file``."""
        with signal_.condition:
            signal_.bells.add(self)
        try:
            if signal_.generation == generation and timeout > 0:
                fds = [self._wake_read, self.fd] if file else [
                    self._wake_read]
                select.select(fds, [], [], timeout)
        finally:
            with signal_.condition:
                signal_.bells.discard(self)
        self._drain(self._wake_read)
        return self._drain(self.fd)

    @staticmethod
    def _drain(fd: int) -> bool:
        """Read what waits in ``fd`` (non-blocking); True if anything."""
        found = False
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 65536):
                found = True
        return found

    def interrupt(self) -> None:
        # Any thread may ring (see _Signal.notify), even as close() runs.
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: rung
                os.write(self._wake_write, b"x")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in (self.fd, self._wake_read, self._wake_write):
                os.close(fd)

# ---------------------------------------------------------------------------
# 10. HTTP: status resource and dashboard
# ---------------------------------------------------------------------------

_JSON_TYPE = "application/json"
_HTML_TYPE = "text/html; charset=utf-8"
_HTTP_LIMIT = 100  # jobs in GET /tasks without ?limit=
_HTTP_MAX_LIMIT = 1000  # most jobs one GET /tasks returns
_TASK_PATH = re.compile(r"/tasks/([^/]*)/?\Z")
_DIGITS = re.compile(r"[0-9]{1,30}\Z")


def location_header(job: Job | int, prefix: str = "/tasks/"
                    ) -> tuple[str, str]:
    """Return the ``Taskqueue-Location`` header naming a job's resource.

    A web view that has just scheduled work adds it to its response, so
    the client knows where to poll the job's status (``GET /tasks/<id>``
    of ``wsgi_app``); ``prefix`` is where that app is mounted::

        >>> location_header(42)
        ('Taskqueue-Location', '/tasks/42')
    """
    job_id = job.id if isinstance(job, Job) else job
    _check_int("job id", job_id, 1)
    return ("Taskqueue-Location", f"{prefix}{job_id}")


class _HTTPError(Exception):
    """An error response: its status code and a JSON body {"error": ...}."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def wsgi_app(queue: Queue | None = None) -> Callable:
    """Return a read-only WSGI application serving the jobs of ``queue``.

    Routes, matched on ``PATH_INFO`` so the app can be mounted under any
    prefix (links follow ``SCRIPT_NAME``):

    - ``GET /``: the dashboard, one self-contained HTML page;
    - ``GET /tasks``: a JSON list of ``to_dict()`` objects, newest first,
      filtered by ``?status=&queue=&name=&limit=`` (limit 0..1000,
      default 100);
    - ``GET /tasks/<id>``: one job's ``to_dict()``;
    - ``GET /counts``: ``{queue name: {status: n}}``.

    Errors have JSON bodies ``{"error": "..."}``: 404 for an unknown job
    or route, 400 for a malformed id or parameter, 405 for any method but
    GET or HEAD, 503 when the database is missing or unusable.  Every
    response has ``Cache-Control: no-store``.  ``queue`` defaults to the
    default Queue, looked up at each request.  The app never writes.
    """
    if queue is not None and not isinstance(queue, Queue):
        raise TypeError(f"queue must be a liteq.Queue or None, "
                        f"got {queue!r}")

    def application(environ: dict, start_response: Callable) -> list:
        target = queue if queue is not None else default_queue()
        try:
            code, kind, body = _http_dispatch(target, environ)
        except _HTTPError as exc:
            return _http_error(environ, start_response, exc.code, str(exc))
        except Exception:
            logger.exception("http: %s %s failed",
                             environ.get("REQUEST_METHOD"),
                             environ.get("PATH_INFO"))
            return _http_error(environ, start_response, 500,
                               "internal error: see the server log")
        return _http_respond(environ, start_response, code, kind, body)

    return application


def _http_dispatch(queue: Queue, environ: dict) -> tuple[int, str, bytes]:
    method = environ.get("REQUEST_METHOD", "GET")
    if method not in ("GET", "HEAD"):
        raise _HTTPError(405, f"method {method} is not allowed: this API "
                              f"is read-only (GET, HEAD)")
    path = environ.get("PATH_INFO", "")
    if path in ("", "/"):
        return 200, _HTML_TYPE, _dashboard_page(environ)
    if path in ("/tasks", "/tasks/"):
        filters = _http_filters(environ.get("QUERY_STRING", ""))
        rows = _http_read(queue, lambda q: q._job_rows(**filters))
        return 200, _JSON_TYPE, _json_body([_public_dict(r) for r in rows])
    if path in ("/counts", "/counts/"):
        counts = _http_read(queue, lambda q: q._counts_by_queue())
        return 200, _JSON_TYPE, _json_body(dict(sorted(counts.items())))
    match = _TASK_PATH.match(path)
    if match:
        return 200, _JSON_TYPE, _json_body(_http_job(queue, match[1]))
    raise _HTTPError(404, f"no resource at {path!r}: the routes are /, "
                          f"/tasks, /tasks/<id> and /counts")


def _http_filters(query_string: str) -> dict:
    query = urllib.parse.parse_qs(query_string, keep_blank_values=True)

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values and values[-1] != "" else None

    status, limit = one("status"), one("limit")
    if status is not None and status not in _STATUSES:
        raise _HTTPError(400, f"status must be one of "
                              f"{', '.join(_STATUSES)}, got {status!r}")
    if limit is None:
        limit = str(_HTTP_LIMIT)
    if not _DIGITS.match(limit) or int(limit) > _HTTP_MAX_LIMIT:
        raise _HTTPError(400, f"limit must be an integer from 0 to "
                              f"{_HTTP_MAX_LIMIT}, got {limit!r}")
    return {"status": status, "queue": one("queue"), "name": one("name"),
            "limit": int(limit)}


def _http_job(queue: Queue, text: str) -> dict:
    if not _DIGITS.match(text) or int(text) < 1:
        raise _HTTPError(400, f"a job id is a positive integer, "
                              f"got {text!r}")
    job_id = int(text)

    def read(reader: Queue) -> dict | None:
        job = reader.get(job_id) if job_id <= _INT64[1] else None
        try:
            return None if job is None else job.to_dict()
        except JobNotFound:  # purged between the two reads
            return None

    found = _http_read(queue, read)
    if found is None:
        raise _HTTPError(404, f"no job {job_id} (never stored, or purged)")
    return found


def _http_read(queue: Queue, read: Callable[[Queue], Any]) -> Any:
    """Run ``read`` on a Queue opened for this request only.

    A Queue keeps one connection per thread until it is closed, so a
    server that starts a thread per request would leak one per request.
    The file is checked first: the app must never create a database.
    """
    if not os.path.isfile(queue.path):
        logger.error("http: no database at %s", queue.path)
        raise _HTTPError(503, "the database is missing: see the server log")
    try:
        with Queue(queue.path) as reader:
            reader._store.creates = False  # an empty file stays empty
            return read(reader)
    except Error as exc:
        logger.error("http: %s", exc)
        raise _HTTPError(503, f"the database is unavailable "
                              f"({type(exc).__name__}): see the server "
                              f"log") from None


def _json_body(value: Any) -> bytes:
    return (json.dumps(value, allow_nan=False) + "\n").encode("ascii")


def _http_error(environ: dict, start_response: Callable, code: int,
                message: str) -> list:
    extra = [("Allow", "GET, HEAD")] if code == 405 else []
    return _http_respond(environ, start_response, code, _JSON_TYPE,
                         _json_body({"error": message}), extra)


def _http_respond(environ: dict, start_response: Callable, code: int,
                  kind: str, body: bytes, extra: Sequence = ()) -> list:
    headers = [("Content-Type", kind), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"),
               ("X-Content-Type-Options", "nosniff")]
    if kind == _HTML_TYPE:
        headers += [("Content-Security-Policy", _DASHBOARD_CSP),
                    ("Referrer-Policy", "no-referrer")]
    start_response(f"{code} {http.HTTPStatus(code).phrase}",
                   headers + list(extra))
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _dashboard_page(environ: dict) -> bytes:
    # The page fetches BASE + "tasks", so it works under any mount point.
    base = environ.get("SCRIPT_NAME", "").rstrip("/") + "/"
    return _DASHBOARD.replace("__LITEQ_BASE__",
                              html.escape(base, quote=True)).encode()


# The dashboard: one page, no external assets.  It polls /counts and
# /tasks and builds every row with textContent, so job text is never
# parsed as HTML.  The CSP below allows only this script and this style.
_DASHBOARD = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="liteq-base" content="__LITEQ_BASE__">
<link rel="icon" href="data:,">
<title>liteq</title>
<style>
:root {
  --bg: #f6f7f9; --card: #fff; --text: #1f2328; --muted: #656d76;
  --line: #d0d7de; --soft: #eaeef2; --pending: #9a6700;
  --running: #0969da; --done: #1a7f37; --failed: #cf222e;
  --cancelled: #6e7781;
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body {
  margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
        "Helvetica Neue", Arial, sans-serif;
}
header {
  display: flex; align-items: center; gap: 16px; padding: 10px 24px;
  background: #24292f; color: #fff;
}
header h1 { margin: 0; font-size: 18px; letter-spacing: .5px; }
header select {
  font: inherit; padding: 3px 6px; border-radius: 6px;
  border: 1px solid #57606a; background: #32383f; color: #fff;
}
#live { margin-left: auto; font-size: 12px; color: #d0d7de; }
#live::before {
  content: ""; display: inline-block; width: 8px; height: 8px;
  margin-right: 6px; border-radius: 50%; background: #8c959f;
}
#live.ok::before { background: #2da44e; }
#live.down { color: #ffb3ad; }
#live.down::before { background: #fa4549; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 40px; }
.counts {
  display: grid; grid-template-columns: repeat(6, minmax(0, 1fr));
  gap: 12px; margin-bottom: 20px;
}
.count {
  font: inherit; text-align: left; cursor: pointer; padding: 10px 14px;
  color: var(--muted); background: var(--card);
  border: 1px solid var(--line); border-top: 3px solid var(--line);
  border-radius: 8px;
}
.count b {
  display: block; font-size: 24px; color: var(--text);
  font-variant-numeric: tabular-nums;
}
.count:hover { border-color: #8c959f; }
.count.active { box-shadow: 0 0 0 2px var(--running); }
.count.pending { border-top-color: var(--pending); }
.count.running { border-top-color: var(--running); }
.count.done { border-top-color: var(--done); }
.count.failed { border-top-color: var(--failed); }
.count.cancelled { border-top-color: var(--cancelled); }
.panel {
  background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; overflow: hidden; margin-bottom: 20px;
}
.panel-head {
  display: flex; align-items: baseline; gap: 12px; padding: 10px 14px;
  border-bottom: 1px solid var(--line);
}
.panel-head h2 { margin: 0; font-size: 15px; }
.muted { color: var(--muted); font-size: 12px; }
.panel-head a { margin-left: auto; color: var(--running); }
table { width: 100%; border-collapse: collapse; table-layout: fixed; }
th {
  text-align: left; font-size: 12px; font-weight: 600;
  color: var(--muted); background: #f6f8fa; padding: 8px 12px;
  border-bottom: 1px solid var(--line);
}
td {
  padding: 8px 12px; border-bottom: 1px solid var(--soft);
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
}
tbody tr:last-child td { border-bottom: 0; }
tbody tr { cursor: pointer; }
tbody tr:hover { background: #f6f8fa; }
tbody tr.selected { background: #ddf4ff; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.mono {
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px;
}
.c-id { width: 64px; } .c-task { width: 17%; } .c-status { width: 112px; }
.c-progress { width: 210px; } .c-steps { width: 64px; }
.c-updated { width: 96px; }
.status {
  display: inline-block; padding: 1px 9px; border-radius: 999px;
  font-size: 12px; font-weight: 600;
}
.status.pending { color: var(--pending); background: #fff8c5; }
.status.running { color: var(--running); background: #ddf4ff; }
.status.done { color: var(--done); background: #dafbe1; }
.status.failed { color: var(--failed); background: #ffebe9; }
.status.cancelled { color: #57606a; background: var(--soft); }
.progress { display: flex; align-items: center; gap: 8px; }
.bar {
  flex: 1; height: 8px; border-radius: 4px; overflow: hidden;
  background: var(--soft);
}
.fill { height: 100%; border-radius: 4px; transition: width .4s ease; }
.bar.pending .fill { background: #d4a72c; }
.bar.running .fill { background: var(--running); }
.bar.done .fill { background: var(--done); }
.bar.failed .fill { background: var(--failed); }
.bar.cancelled .fill { background: #8c959f; }
.bar.unknown .fill {
  width: 100% !important; opacity: .35;
  background: repeating-linear-gradient(45deg, var(--running) 0 6px,
                                        transparent 6px 12px);
}
.pct { width: 40px; text-align: right; font-variant-numeric: tabular-nums; }
.empty { margin: 0; padding: 24px; text-align: center; color: var(--muted); }
.why, .note {
  display: block; font-size: 12px; color: var(--failed);
  overflow: hidden; text-overflow: ellipsis;
}
.note { color: var(--muted); }
#detail {
  position: fixed; top: 0; right: 0; bottom: 0; z-index: 10;
  width: min(520px, 100%); margin: 0; border-radius: 0; border-width: 0;
  border-left: 1px solid var(--line); overflow-y: auto;
  box-shadow: -8px 0 24px rgba(31, 35, 40, .15);
}
#detail .panel-head {
  position: sticky; top: 0; background: var(--card); padding: 14px;
}
dl {
  display: grid; grid-template-columns: max-content 1fr; gap: 6px 20px;
  margin: 0; padding: 14px;
}
dt { color: var(--muted); }
dd .progress { max-width: 280px; }
dd { margin: 0; overflow-wrap: anywhere; }
pre.error {
  margin: 0 14px 14px; padding: 12px; overflow: auto;
  background: #fff5f5; border: 1px solid #ffcecb; border-radius: 6px;
  color: #82071e; font-size: 12.5px; white-space: pre-wrap;
}
@media (max-width: 800px) {
  .counts { grid-template-columns: repeat(3, minmax(0, 1fr)); }
  .c-task, .c-updated { display: none; }
  .c-progress { width: 130px; } .c-status { width: 96px; }
  main { padding: 12px; }
}
</style>
</head>
<body>
<header>
  <h1>liteq</h1>
  <select id="queue" aria-label="queue name">
    <option value="">all queues</option>
  </select>
  <span id="live">connecting&hellip;</span>
</header>
<main>
  <section id="counts" class="counts" aria-label="jobs per status"></section>
  <section class="panel">
    <div class="panel-head">
      <h2 id="title">Recent jobs</h2><span id="shown" class="muted"></span>
    </div>
    <table>
      <colgroup>
        <col class="c-id"><col class="c-task"><col><col class="c-status">
        <col class="c-progress"><col class="c-steps"><col class="c-updated">
      </colgroup>
      <thead><tr>
        <th class="num">ID</th><th class="c-task">Task</th>
        <th>Description</th><th>Status</th><th>Progress</th>
        <th class="num">Steps</th><th class="c-updated">Updated</th>
      </tr></thead>
      <tbody id="jobs"></tbody>
    </table>
    <p id="empty" class="empty" hidden>No jobs.</p>
  </section>
  <section id="detail" class="panel" hidden>
    <div class="panel-head">
      <h2 id="detail-title"></h2><span id="detail-status"></span>
      <a href="#" id="close">close</a>
    </div>
    <dl id="fields"></dl>
    <pre id="error" class="error" hidden></pre>
  </section>
</main>
<script>
"use strict";
const BASE = document.querySelector('meta[name="liteq-base"]').content;
const STATUSES = ["pending", "running", "done", "failed", "cancelled"];
const LIMIT = 50, PERIOD = 1500;
const view = {status: "", queue: "", selected: null};
const loop = {timer: null, busy: false, again: false};
const $ = (id) => document.getElementById(id);

function node(tag, cls, text) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (text !== undefined && text !== null) el.textContent = String(text);
  return el;
}

async function getJSON(path) {
  const response = await fetch(BASE + path, {
    cache: "no-store", headers: {Accept: "application/json"}});
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 404 && body) return null;
  if (!response.ok) {
    throw new Error((body && body.error) || "HTTP " + response.status);
  }
  return body;
}

function when(iso) {
  return iso ? Date.parse(iso.replace(/(\.\d{3})\d+/, "$1")) : NaN;
}

function ago(iso) {
  const t = when(iso);
  if (isNaN(t)) return "";
  const s = Math.max(0, Math.floor((Date.now() - t) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return Math.floor(s / 86400) + "d ago";
}

function ahead(iso) {
  const s = Math.max(0, Math.round((when(iso) - Date.now()) / 1000));
  const m = Math.round(s / 60), h = Math.round(s / 3600);
  if (s < 60) return "in " + s + "s";
  if (m < 60) return "in " + m + "m";
  return h < 24 ? "in " + h + "h" : "in " + Math.round(s / 86400) + "d";
}

function localTime(iso) {
  const t = when(iso);
  return isNaN(t) ? "" : new Date(t).toLocaleString();
}

function progress(job) {
  const known = typeof job.percent === "number";
  const percent = known ? Math.max(0, Math.min(100, job.percent)) : 0;
  const unknown = !known && job.status === "running";
  const bar = node("div", "bar " + (unknown ? "unknown" : job.status));
  const fill = node("div", "fill");
  fill.style.width = percent + "%";
  bar.appendChild(fill);
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  if (known) bar.setAttribute("aria-valuenow", String(percent));
  const box = node("div", "progress");
  box.append(bar, node("span", "pct",
                       known ? Math.floor(percent) + "%" : "\u2014"));
  return box;
}

function lastLine(text) {
  const lines = text.trim().split("\n");
  return lines[lines.length - 1];
}

function statusWord(status) {
  return node("span", "status " + status, status);
}

function renderQueues(names) {
  const select = $("queue");
  if (view.queue && !names.includes(view.queue)) names.push(view.queue);
  const known = Array.from(select.options).slice(1).map((o) => o.value);
  if (known.join("\n") !== names.join("\n")) {
    const options = [node("option", "", "all queues")];
    options[0].value = "";
    for (const name of names) {
      const option = node("option", "", name);
      option.value = name;
      options.push(option);
    }
    select.replaceChildren(...options);
  }
  select.value = view.queue;
}

function countCards() {
  if ($("counts").children.length) return $("counts").children;
  for (const s of ["all"].concat(STATUSES)) {
    const card = node("button", "count " + s);
    card.type = "button";
    card.dataset.status = s;
    card.append(node("b", "", "0"), node("span", "", s));
    card.addEventListener("click", () => {
      view.status = s === "all" || view.status === s ? "" : s;
      refreshSoon();
    });
    $("counts").appendChild(card);
  }
  return $("counts").children;
}

function renderCounts(byQueue) {
  const names = Object.keys(byQueue).sort();
  renderQueues(names.slice());
  const totals = {all: 0};
  for (const s of STATUSES) totals[s] = 0;
  for (const name of names) {
    if (view.queue && name !== view.queue) continue;
    for (const s of STATUSES) {
      const n = byQueue[name][s] || 0;
      totals[s] += n;
      totals.all += n;
    }
  }
  for (const card of countCards()) {
    const s = card.dataset.status;
    card.firstChild.textContent = String(totals[s]);
    card.classList.toggle("active", (view.status || "all") === s);
  }
}

function jobRow(job) {
  const row = node("tr");
  row.dataset.id = job.id;
  row.dataset.status = job.status;
  if (job.id === view.selected) row.className = "selected";
  const updated = node("td", "c-updated", ago(job.updated_at));
  updated.title = localTime(job.updated_at);
  const task = node("td", "c-task mono", job.name);
  task.title = job.name || "";
  const description = node("td", "", job.description);
  description.title = job.description || "";
  if (job.unreadable) {
    // A row changed outside liteq: its unreadable fields are null.
    const why = node("span", "why", "unreadable row: " + job.unreadable);
    description.appendChild(why);
    description.title = why.textContent;
  } else if (job.status === "failed" && job.error) {
    const why = node("span", "why", lastLine(job.error));
    description.appendChild(why);
    description.title = job.description + "\n" + why.textContent;
  } else if (job.status === "pending" && when(job.eta) > Date.now()) {
    description.appendChild(node("span", "note", "runs " + ahead(job.eta)));
  }
  const status = node("td");
  status.appendChild(statusWord(job.status || "unknown"));
  const bar = node("td");
  bar.appendChild(progress(job));
  row.append(node("td", "num", job.id), task, description, status, bar,
             node("td", "num", job.steps), updated);
  row.tabIndex = 0;
  row.addEventListener("click", () => { location.hash = "job-" + job.id; });
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter") location.hash = "job-" + job.id;
  });
  return row;
}

function renderJobs(jobs) {
  $("jobs").replaceChildren(...jobs.map(jobRow));
  $("empty").hidden = jobs.length > 0;
  const words = [view.status || "recent", "jobs"];
  if (view.queue) words.push("in " + view.queue);
  $("title").textContent = words.join(" ").replace(/^./, (c) =>
    c.toUpperCase());
  $("shown").textContent = jobs.length >= LIMIT ?
    "newest " + LIMIT + " shown" : "";
}

const FIELDS = ["id", "name", "current", "description", "queue",
                "priority", "key", "status", "percent", "steps", "attempts",
                "worker", "eta", "created_at", "started_at", "updated_at",
                "finished_at", "args", "kwargs", "result"];

function fieldValue(job, field) {
  const value = job[field];
  if (field === "percent") return progress(job);
  if (field === "status") return statusWord(value);
  if (["args", "kwargs", "result"].includes(field)) {
    return node("span", "mono", JSON.stringify(value));
  }
  if (value === null || value === undefined) return node("span", "", "-");
  if (field.endsWith("_at") || field === "eta") {
    return node("span", "", localTime(value) + " (" + ago(value) + ")");
  }
  return node("span", field === "name" || field === "current" ?
              "mono" : "", value);
}

function renderDetail(job, id) {
  $("detail").hidden = false;
  $("detail-title").textContent = "Job " + id;
  if (job === null) {
    $("detail-status").textContent = "not found (never stored, or purged)";
    $("fields").replaceChildren();
    $("error").hidden = true;
    return;
  }
  $("detail-status").replaceChildren(statusWord(job.status || "unknown"));
  const items = [];
  for (const field of FIELDS) {
    const dd = node("dd");
    dd.appendChild(fieldValue(job, field));
    items.push(node("dt", "", field), dd);
  }
  if (job.unreadable) {
    items.push(node("dt", "", "unreadable"),
               node("dd", "why", job.unreadable));
  }
  $("fields").replaceChildren(...items);
  $("error").hidden = !job.error;
  $("error").textContent = job.error || "";
}

function selectedId() {
  const match = /^#job-(\d+)$/.exec(location.hash);
  return match ? Number(match[1]) : null;
}

async function refresh() {
  loop.busy = true;
  const query = new URLSearchParams({limit: String(LIMIT)});
  if (view.status) query.set("status", view.status);
  if (view.queue) query.set("queue", view.queue);
  view.selected = selectedId();
  try {
    const [counts, jobs] = await Promise.all(
      [getJSON("counts"), getJSON("tasks?" + query)]);
    renderCounts(counts);
    renderJobs(jobs);
    if (view.selected === null) $("detail").hidden = true;
    else renderDetail(await getJSON("tasks/" + view.selected),
                      view.selected);
    $("live").className = "ok";
    $("live").textContent = "live \u00b7 " +
      new Date().toLocaleTimeString();
  } catch (err) {
    $("live").className = "down";
    $("live").textContent = "cannot reach the server (" + err.message +
      "): retrying";
  }
  loop.busy = false;
  loop.timer = setTimeout(refresh, loop.again ? 0 : PERIOD);
  loop.again = false;
}

function refreshSoon() {
  if (loop.busy) { loop.again = true; return; }
  clearTimeout(loop.timer);
  refresh();
}

$("queue").addEventListener("change", (event) => {
  view.queue = event.target.value;
  refreshSoon();
});
function closeDetail(event) {
  event.preventDefault();
  history.replaceState(null, "", location.pathname + location.search);
  refreshSoon();
}

$("close").addEventListener("click", closeDetail);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && selectedId() !== null) closeDetail(event);
});
window.addEventListener("hashchange", refreshSoon);
refresh();
</script>
</body>
</html>
"""


def _csp_source(page: str, tag: str) -> str:
    """The CSP hash source allowing the page's one inline ``tag``."""
    body = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    digest = hashlib.sha256(body.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


_DASHBOARD_CSP = (
    f"default-src 'none'; script-src {_csp_source(_DASHBOARD, 'script')}; "
    f"style-src {_csp_source(_DASHBOARD, 'style')}; connect-src 'self'; "
    f"img-src data:; base-uri 'none'; form-action 'none'; "
    f"frame-ancestors 'none'")


# ---------------------------------------------------------------------------
# 11. Command line
# ---------------------------------------------------------------------------

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LIST_LIMIT = 20  # jobs `list` shows without --limit
_FOLLOW_POLL = 0.2  # seconds between looks at a followed job
_BAR_WIDTH = 24  # characters in a progress bar
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_HOST_HEADER = re.compile(r"(\[[0-9a-fA-F:.]*\]|[^:\[\]]*)(:[0-9]{1,5})?\Z")


class _UsageError(Exception):
    """A user error on the command line: one line on stderr, exit 2."""


class _OutputError(Exception):
    """Standard output is closed or refuses writes (a full disk): one
    line on stderr, exit 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``python -m liteq``); return the exit status.

    0 on success; 1 when the command ran but the outcome is a failure
    (``show --follow`` of a failed job, ``cancel`` of a finished one, a
    job whose stored row is unreadable), or a storage error, or when
    standard output is closed or full; 2 for a user error (missing
    database, unknown id, bad duration, a module that cannot be
    imported).  Errors are reported in one line on stderr.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
        _flush(sys.stdout)  # a full disk shows only now
        return code
    except (_UsageError, Error, ValueError, _OutputError) as exc:
        print(f"liteq: error: {exc}", file=sys.stderr)
        if isinstance(exc, _OutputError):
            _drop_stdout()
        return 1 if isinstance(exc, (StorageError, _OutputError)) else 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `liteq list | head`: the reader left.
        _drop_stdout()
        return 1


def _drop_stdout() -> None:
    # Point stdout at devnull, so that the interpreter's final flush of
    # what is left in its buffer does not fail again.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _build_parser() -> argparse.ArgumentParser:
    console = os.path.basename(sys.argv[0] if sys.argv else "") == "liteq"
    parser = argparse.ArgumentParser(
        prog="liteq" if console else "python -m liteq",
        description="A durable background task queue on SQLite.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="COMMAND")
    add = functools.partial(_add_command, commands)
    _add_worker_commands(add)
    _add_read_commands(add)
    _add_write_commands(add)
    return parser


def _add_command(commands: Any, name: str, handler: Callable, text: str,
                 json_output: bool = False) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=text, description=text)
    sub.add_argument("--db", metavar="PATH",
                     help="database file (default: $LITEQ_DB, else "
                          "./liteq.db)")
    if json_output:
        sub.add_argument("--json", action="store_true",
                         help="print JSON (the fields of Job.to_dict())")
    sub.set_defaults(handler=handler)
    return sub


def _add_worker_commands(add: Callable) -> None:
    run = add("run", _cmd_run, "run a worker for the tasks of MODULEs")
    run.add_argument("modules", nargs="+", metavar="MODULE",
                     help="module defining tasks, e.g. app.tasks")
    run.add_argument("--threads", type=int, default=1,
                     help="worker threads (default 1)")
    run.add_argument("--queue", action="append", dest="queues",
                     metavar="NAME", help="queue name to serve (repeat; "
                                          "default: default)")
    run.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS)
    demo = add("demo", _cmd_demo,
               "enqueue demo jobs and run a worker until they finish")
    demo.add_argument("--log-level", default="WARNING", choices=_LOG_LEVELS)


def _add_read_commands(add: Callable) -> None:
    add("status", _cmd_status, "count jobs per status per queue name",
        json_output=True)
    jobs = add("list", _cmd_list, "list jobs, newest first",
               json_output=True)
    jobs.add_argument("--status", choices=_STATUSES)
    jobs.add_argument("--queue", metavar="NAME", help="queue name")
    jobs.add_argument("--name", metavar="TASK", help="stored task name")
    jobs.add_argument("--limit", type=int, default=_LIST_LIMIT,
                      help=f"most jobs to show (default {_LIST_LIMIT})")
    show = add("show", _cmd_show, "show every field of a job",
               json_output=True)
    show.add_argument("id", metavar="ID")
    show.add_argument("--follow", action="store_true",
                      help="draw a progress bar until the job finishes; "
                           "exit 0 if done, 1 if failed or cancelled")
    serve = add("serve", _cmd_serve,
                "serve the HTTP API and dashboard (read-only)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080,
                       help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS,
                       help="DEBUG also logs every request")


def _add_write_commands(add: Callable) -> None:
    cancel = add("cancel", _cmd_cancel,
                 "cancel a job (exit 1 if it had already finished)")
    cancel.add_argument("id", metavar="ID")
    retry = add("retry", _cmd_retry, "run a failed or cancelled job again")
    retry.add_argument("id", metavar="ID")
    purge = add("purge", _cmd_purge, "delete jobs finished long ago")
    purge.add_argument("--older-than", required=True, metavar="DURATION",
                       help="e.g. 30s, 12h, 7d, 2w (0s: every finished job)")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cli_queue(args: argparse.Namespace, create: bool) -> Queue:
    """The Queue of ``--db``; only ``create`` commands may make the file.

    Commands that create (run, demo) point the default Queue at the file,
    so the task modules they import store their jobs there too.  The
    others get a Queue of their own, to close when done.
    """
    path = args.db or os.environ.get("LITEQ_DB") or _DEFAULT_DB
    if create:
        return configure(path)
    if not os.path.isfile(path):
        raise _UsageError(f"no database at {os.path.abspath(path)} (pass "
                          f"--db or set LITEQ_DB; run and demo create one)")
    queue = Queue(path)
    queue._store.creates = False
    return queue


def _job_id(text: str) -> int:
    if not _DIGITS.match(text) or int(text) < 1:
        raise _UsageError(f"a job id is a positive integer, got {text!r}")
    return int(text)


def _find_job(queue: Queue, text: str) -> Job:
    job_id = _job_id(text)
    job = queue.get(job_id) if job_id <= _INT64[1] else None
    if job is None:
        raise _UsageError(f"no job {job_id} in {queue.path}")
    return job

# Worker commands -----------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    queue = _cli_queue(args, create=True)
    sys.path.insert(0, os.getcwd())
    for module in args.modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise _UsageError(f"cannot import {module}: "
                              f"{type(exc).__name__}: {exc}") from None
    worker = Worker(queue, threads=args.threads, queues=args.queues)
    _on_stop_signals(worker)
    logger.info("worker %s serving %s on %s with %d thread(s)", _HOST_PID,
                ", ".join(worker.queues), queue.path, worker.threads)
    worker.run_forever()
    logger.info("worker %s stopped", _HOST_PID)
    return 0


def _on_stop_signals(worker: Worker) -> None:
    """First SIGINT/SIGTERM: stop gracefully; second: exit at once."""
    def handle(signum: int, frame: Any) -> None:
        if worker._stopping.is_set():
            os._exit(128 + signum)
        logger.info("signal %d: finishing running steps (again to exit "
                    "now)", signum)
        worker._request_stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


# The demo's tasks are registered only by `demo`, so no other worker
# runs them.
def _demo_countdown(n: int, total: int) -> Any:
    time.sleep(0.15)
    return Task(_DEMO + "countdown", [n - 1, total]) if n else "liftoff"


def _demo_step(word: str) -> str:
    time.sleep(0.3)
    return word.upper()


def _demo_flaky(label: str) -> str:
    time.sleep(0.2)
    job = current_job()
    if job is not None and job.attempt == 1:
        raise RuntimeError(f"{label}: failing on purpose, once")
    return f"{label} succeeded on attempt {job.attempt if job else 1}"


_DEMO = "liteq-demo:"


def _register_demo(queue: Queue) -> tuple[TaskFunction, ...]:
    opts = {"queue": "liteq-demo"}
    return (
        queue.task(_demo_countdown, name=_DEMO + "countdown", **opts,
                   description="countdown from {0}",
                   percent=lambda n, total: 100 * (total - n) / total),
        queue.task(_demo_step, name=_DEMO + "step", **opts,
                   description="shout {0!r}"),
        queue.task(_demo_flaky, name=_DEMO + "flaky", **opts, retries=2,
                   retry_delay=0.5, description="flaky {0}"),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    queue = _cli_queue(args, create=True)
    countdown, step, flaky = _register_demo(queue)
    with queue.batch():
        jobs = [countdown.apply_async((12, 12)),
                chain([step("one"), step("two"), step("three")]).delay(),
                flaky.delay("flaky job")]
    print(f"liteq demo: {len(jobs)} jobs in {queue.path}, queue liteq-demo")
    screen = _Screen(sys.stdout)
    with Worker(queue, threads=3, queues=["liteq-demo"]):
        while True:
            rows = [job.to_dict() for job in jobs]
            screen.draw([_demo_line(row) for row in rows])
            if all(row["status"] in _FINISHED for row in rows):
                break
            time.sleep(0.2)
    for job in jobs:
        print(f"job {job.id} {job.status}: result {job.to_dict()['result']!r}")
    return 0 if all(job.status == _DONE for job in jobs) else 1


def _demo_line(row: dict) -> str:
    return (f"  job {row['id']:>4} {_bar(row['percent'])} "
            f"{_percent_text(row['percent'])} {row['status']:<9} "
            f"steps {row['steps']:>2}  {_clean(row['description'])}")

# Terminal output -----------------------------------------------------------


class _Screen:
    """Lines that redraw in place on a terminal.

    Elsewhere (a pipe, a log file) a line is printed again only when its
    key changes, so the output stays short and every line is news.
    """

    def __init__(self, stream: Any, redraw: bool = True) -> None:
        self.stream = stream
        self.tty = redraw and stream is not None and stream.isatty()
        self.keys: list = []  # per line, as drawn last time

    def draw(self, lines: list[str], keys: list | None = None) -> None:
        keys = lines if keys is None else keys
        if self.tty:
            # A line that wrapped would take two rows: cut it to fit.
            width = self._width()
            lines = [line[:width - 1] if width else line for line in lines]
            up = f"\x1b[{len(self.keys)}F" if self.keys else ""
            _emit(up + "".join(f"{line}\x1b[K\n" for line in lines),
                  self.stream)
        else:
            old = self.keys or [None] * len(lines)
            _emit("".join(f"{line}\n" for line, key, was in
                          zip(lines, keys, old) if key != was), self.stream)
        self.keys = list(keys)
        _flush(self.stream)

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 0


def _emit(text: str, stream: Any = None) -> None:
    """Write ``text``; characters the stream cannot encode become '?'."""
    stream = sys.stdout if stream is None else stream
    try:
        try:
            stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "ascii"
            stream.write(text.encode(encoding, "replace").decode(encoding))
    except AttributeError:
        if stream is not None:
            raise
        # Python sets sys.stdout to None when it started without one.
        raise _OutputError("cannot write the output: standard output is "
                           "closed") from None
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _OutputError(f"cannot write the output: {exc}") from None


def _flush(stream: Any) -> None:
    if stream is None:
        return
    try:
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _OutputError(f"cannot write the output: {exc}") from None


def _clean(value: Any, width: int | None = None) -> str:
    """``value`` as one printable line, cut to ``width`` characters.

    Job text comes from users: control characters (escape sequences
    included) must not reach the terminal.
    """
    text = "".join(ch if ch.isprintable() else " " if ch in "\t\n\r"
                   else "?" for ch in str(value))
    if width is not None and len(text) > width:
        text = text[:width - 3] + "..."
    return text


def _unicode_ok(stream: Any) -> bool:
    try:
        "\u2588\u2591".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _bar(percent: float | None, width: int = _BAR_WIDTH) -> str:
    full, empty = ("\u2588", "\u2591") if _unicode_ok(sys.stdout) else "#-"
    filled = 0 if percent is None else int(width * percent / 100)
    return full * filled + empty * (width - filled)


def _percent_text(percent: float | None) -> str:
    return "   -" if percent is None else f"{int(percent):>3d}%"


def _seconds(iso: str | None) -> float | None:
    if iso is None:
        return None
    return _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _duration_text(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}:{minutes:02d}:{secs:02d}" if hours
            else f"{minutes}:{secs:02d}")


def _age_text(iso: str | None, now: float) -> str:
    if iso is None:
        return "-"
    seconds = max(0, int(now - _seconds(iso)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _table(headers: Sequence[str], rows: list[list[str]],
           right: Sequence[int] = ()) -> str:
    """An aligned text table; columns in ``right`` are right-aligned."""
    widths = [max(len(cell) for cell in column)
              for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return "".join(line(cells) + "\n" for cells in [headers, *rows])


def _print_json(value: Any) -> None:
    _emit(json.dumps(value, indent=2) + "\n")

# Read commands -------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        counts = dict(sorted(queue._counts_by_queue().items()))
    if args.json:
        _print_json(counts)
    elif not counts:
        _emit(f"no jobs in {queue.path}\n")
    else:
        rows = [[_clean(name), *(str(n[s]) for s in _STATUSES),
                 str(sum(n.values()))] for name, n in counts.items()]
        _emit(_table(["QUEUE", *(s.upper() for s in _STATUSES), "TOTAL"],
                     rows, right=range(1, len(_STATUSES) + 2)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if not 0 <= args.limit <= _INT64[1]:
        raise _UsageError(f"--limit must be from 0 to {_INT64[1]}, got "
                          f"{args.limit}")
    with _cli_queue(args, create=False) as queue:
        rows = queue._job_rows(args.status, args.name, args.queue,
                               args.limit)
    jobs = [_public_dict(row) for row in rows]
    if args.json:
        _print_json(jobs)
    elif not jobs:
        _emit("no jobs\n")
    else:
        now = time.time()
        _emit(_table(
            ["ID", "STATUS", "PROGRESS", "STEPS", "QUEUE", "TASK",
             "DESCRIPTION", "UPDATED"],
            [_list_row(job, now) for job in jobs], right=(0, 2, 3)))
    return 0


def _list_row(job: dict, now: float) -> list[str]:
    def cell(key: str, width: int | None = None) -> str:
        return "-" if job[key] is None else _clean(job[key], width)

    about = cell("description", 40)
    if "unreadable" in job:  # its fields that liteq could read, and why
        about = _clean(f"UNREADABLE: {job['unreadable']}", 60)
    return [cell("id"), cell("status"), _percent_text(job["percent"]).strip(),
            cell("steps"), cell("queue", 20), cell("name", 32), about,
            _age_text(job["updated_at"], now)]


def _cmd_show(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        job = _find_job(queue, args.id)
        if args.follow:
            return _follow(job, args.json)
        data = job.to_dict()
    if args.json:
        _print_json(data)
    elif "unreadable" not in data:
        _emit(_show_text(data))
    return _unreadable(job, data)


def _unreadable(job: Job, data: dict) -> int:
    """Exit status 1, and one line on stderr, if the job's row is
    unreadable; else 0.  Not the user's error: the row's (exit 1)."""
    if "unreadable" not in data:
        return 0
    print(f"liteq: error: the stored row of job {job.id} in {job._q.path} "
          f"is unreadable: {_clean(data['unreadable'])}; see \"Bad rows\" "
          f"in docs/guarantees.md to fix or delete it", file=sys.stderr)
    return 1


_SHOW_FIELDS = (
    "id", "name", "current", "description", "queue", "priority", "key",
    "status", "percent", "steps", "attempts", "worker", "eta",
    "created_at", "started_at", "updated_at", "finished_at", "args",
    "kwargs", "result")


def _show_text(data: dict) -> str:
    lines = []
    for field in _SHOW_FIELDS:
        value = data[field]
        if field in ("args", "kwargs", "result"):
            text = json.dumps(value)
        elif field == "percent":
            text = f"{_bar(value)} {_percent_text(value).strip()}"
        else:
            text = "-" if value is None else _clean(value)
        lines.append(f"{field:<12} {text}")
    if data["error"]:
        lines.append("error:")
        lines += [f"  {_clean(line)}"
                  for line in data["error"].rstrip().splitlines()]
    return "".join(line + "\n" for line in lines)


def _follow(job: Job, as_json: bool) -> int:
    """Redraw the job's progress until it finishes; 0 if done, else 1."""
    screen = _Screen(sys.stdout, redraw=not as_json)
    while True:
        data = job.to_dict()
        if "unreadable" in data:
            return _unreadable(job, data)
        key = (data["status"], data["percent"], data["steps"])
        if as_json:
            screen.draw([json.dumps(data)], [key])
        else:
            screen.draw([_follow_line(data, time.time())], [key])
        if data["status"] in _FINISHED:
            break
        time.sleep(_FOLLOW_POLL)
    if data["error"] and not as_json:
        _emit(f"error: {_clean(_error_line(data['error']))}\n")
    return 0 if data["status"] == _DONE else 1


def _follow_line(data: dict, now: float) -> str:
    start = _seconds(data["started_at"] or data["created_at"])
    end = _seconds(data["finished_at"]) or now
    return (f"job {data['id']} {_bar(data['percent'])} "
            f"{_percent_text(data['percent'])}  steps {data['steps']}  "
            f"{_duration_text(end - start)}  {data['status']}")

# Write commands ------------------------------------------------------------


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        job = _find_job(queue, args.id)
        before = job.status
        cancelled = before not in _FINISHED and job.cancel()
        after = job.status
    if not cancelled:
        print(f"liteq: job {job.id} has already finished ({after}): not "
              f"cancelled", file=sys.stderr)
        return 1
    if after == _CANCELLED:
        _emit(f"job {job.id} cancelled\n")
    else:
        _emit(f"job {job.id}: cancel requested; the step running now "
              f"finishes first\n")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        job = _find_job(queue, args.id)
        job.retry()
        data = job.to_dict()
    if "unreadable" in data:
        _emit(f"job {job.id} is {data['status']} again\n")
        return _unreadable(job, data)
    _emit(f"job {data['id']} is {data['status']} again: it resumes at step "
          f"{data['steps'] + 1} ({_clean(data['current'])})\n")
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    seconds = _parse_duration(args.older_than)
    with _cli_queue(args, create=False) as queue:
        deleted = queue.purge(seconds)
    _emit(f"purged {deleted} job{'' if deleted == 1 else 's'} finished "
          f"more than {args.older_than.strip()} ago\n")
    return 0

# serve ---------------------------------------------------------------------


class _WSGIServer(socketserver.ThreadingMixIn,
                  wsgiref.simple_server.WSGIServer):
    """wsgiref's server with a thread per request: a slow client does not
    hold up the others."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response is not worth a traceback.
        logger.debug("http: request from %s failed", client_address[0],
                     exc_info=True)


class _WSGIServer6(_WSGIServer):
    address_family = socket.AF_INET6


class _RequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    """Sends the access log to the ``liteq`` logger, not to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: %s %s", self.address_string(), format % args)


def _cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    queue = _cli_queue(args, create=False)
    app = wsgi_app(queue)
    if _is_loopback(args.host):
        app = _loopback_only(app, args.host)
    else:
        logger.warning(
            "serving on %s: the API and dashboard are unauthenticated, "
            "anyone who can reach this address can read every job's "
            "arguments, results and errors", args.host or "every address")
    server = _make_server(args.host, args.port, app)
    port = server.server_address[1]
    host = f"[{args.host}]" if ":" in args.host else args.host or "0.0.0.0"
    print(f"liteq: serving {queue.path} at http://{host}:{port}/ "
          f"(Ctrl-C to stop)", flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops `serve` as Ctrl-C does


def _make_server(host: str, port: int, app: Callable) -> _WSGIServer:
    server_class = _WSGIServer6 if ":" in host else _WSGIServer
    try:
        return wsgiref.simple_server.make_server(
            host, port, app, server_class, _RequestHandler)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise _UsageError(f"cannot listen on {host}:{port}: "
                          f"{reason}") from None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_only(app: Callable, bound: str) -> Callable:
    """Answer only requests addressed to a loopback name.

    A page elsewhere can point a host name it controls at 127.0.0.1 (DNS
    rebinding) and read the API from the victim's browser; such requests
    still carry that name in ``Host``, so they are refused.
    """
    bound = f"[{bound}]" if ":" in bound else bound
    allowed = {name.lower() for name in (*_LOOPBACK_NAMES, bound)}

    def guarded(environ: dict, start_response: Callable) -> list:
        header = environ.get("HTTP_HOST", "")
        match = _HOST_HEADER.match(header)
        if not header or not match:
            return _http_error(environ, start_response, 400,
                               "a valid Host header is required")
        if match[1].lower() not in allowed:
            return _http_error(environ, start_response, 403,
                               f"host {header!r} is not allowed: use "
                               f"http://127.0.0.1 or http://localhost")
        return app(environ, start_response)

    return guarded


# ---------------------------------------------------------------------------
# 12. python -m liteq
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    # Under `python -m liteq` this file is __main__.  Register it as
    # `liteq` too, so task modules that import liteq share its registry.
    sys.modules.setdefault("liteq", sys.modules[__name__])
    sys.exit(main())
