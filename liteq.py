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
 4. Utilities: process state, clock, durations, JSON codec
 5. Storage: SQL, schema, connections, transactions
 6. Tasks: Task, task functions, registry, chain
 7. Jobs and queues: Job, Queue, the default queue
 8. Schedules: cron, slots, declarations and firing
 9. Worker: steps, outcomes, and the statements a worker sends
10. Worker threads: the loop of each thread, the housekeeper
11. Worker helpers: faults, the lead, wake-ups
12. Worker: the class, and what its threads share
13. Testing helpers: the test clock, drain, eager, using
14. HTTP: status resource and dashboard
15. Command line
16. Dashboard page: HTML, script and style
17. python -m liteq

Licensed under the MIT licence (see LICENSE).
"""

# ---------------------------------------------------------------------------
# 1. Header: imports, version, public names
# ---------------------------------------------------------------------------

from __future__ import annotations

import argparse
import base64
import calendar
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
import pkgutil
import random
import re
import select
import shutil
import shlex
import signal
import socket
import socketserver
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import weakref
import wsgiref.simple_server
import zoneinfo
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
    "Permanent",
    "Queue",
    "SchemaError",
    "StorageError",
    "Task",
    "TaskCancelled",
    "TaskFailed",
    "TaskFunction",
    "TestClock",
    "Worker",
    "chain",
    "configure",
    "current_job",
    "default_queue",
    "deserialize_task",
    "location_header",
    "main",
    "periodic",
    "serialize_task",
    "snooze",
    "task",
    "using",
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
_SCHEMA_VERSION = 2

_MAX_DEPTH = 100  # nesting of containers in arguments and results
_MAX_INT_DIGITS = 4300  # CPython's default int/str conversion limit
_INT64 = (-(2**63), 2**63 - 1)
_WAL_LIMIT = 64 * 2**20  # bytes; past this a worker forces a checkpoint
_PURGE_CHUNK = 500  # rows deleted per purge transaction
_RESULT_POLL = 0.05  # seconds between checks of another process's job
_TOKEN_BITS = 20  # a claim's block of fencing tokens (see _SQL_CLAIM)

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
    "retry_on": None,  # None: any Exception is retried
    "dont_retry": (),
    "retry_jitter": False,
    "job_timeout": None,  # seconds from the delay to the job's deadline
}

# Values of Job.waiting.
_WAIT_TIMER, _WAIT_RETRY, _WAIT_UNKNOWN = "timer", "retry", "unknown task"
_UNKNOWN_GRACE = 300.0  # Worker(unknown_grace=...) default, seconds
_AFTER, _AT = "after", "at"  # the keys of a delayed Task's JSON form
_MAX_RETRY_DELAY = 100 * 365.25 * 86400  # seconds; also the longest wait
_MAX_SNOOZES = 100  # Task.run() re-runs a snoozing call at most this often
_MAX_EAGER_STEPS = 1_000_000  # steps of one job that eager() runs
_TICK = 1e-6  # seconds: the finest time a datetime holds
_ERRORS_KEPT = 10  # error lines Job.errors keeps

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


class Permanent(Exception):
    """Raise inside a step to fail its job at once, without retries.

    ``raise liteq.Permanent("card declined")``: the job fails with the
    traceback as its error, whatever retries its task has left.  It is
    control flow, not an error of liteq's, so it derives from Exception
    and not from liteq.Error: ``except liteq.Error`` around liteq calls
    never catches it.
    """


# ---------------------------------------------------------------------------
# 4. Utilities: process state, clock, durations, JSON codec
# ---------------------------------------------------------------------------


class _Process:
    """This process's mutable state, and what a forked child renews.

    A lock that another thread held at fork() stays held in the child
    forever, and the child has none of the parent's threads: so the child
    gets a fresh lock and fresh wake-up signals, then runs the callbacks
    given to on_fork().  Tasks, the default Queue, warnings and
    current_job() carry over.
    """

    def __init__(self) -> None:
        #: Task functions by stored name.  Only these ever run: a stored
        #: row never makes liteq import anything.
        self.tasks: dict[str, TaskFunction] = {}
        self.default_queue: Queue | None = None  # made on first use
        #: Schedules declared in code (liteq.periodic), by name.
        self.schedules: dict[str, _Declared] = {}
        self.warned: set[str] = set()  # keys _warn_once has logged
        self.current = threading.local()  # .job: see current_job()
        self._on_fork: dict[int, Callable[[], Any]] = {}
        self._renew()

    def _renew(self) -> None:
        # Held briefly to change tasks, default_queue, warned or signals.
        self.lock = threading.RLock()
        #: The _Signal of each (path, kind).
        self.signals: dict[tuple[str, str], _Signal] = {}

    def on_fork(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` in each child this process forks.

        A bound method is held weakly: it keeps nothing alive, and is
        dropped with its object.
        """
        if inspect.ismethod(callback):
            ref = weakref.WeakMethod(callback, self._drop)
        else:
            def ref() -> Callable[[], Any]:
                return callback
        self._on_fork[id(ref)] = ref

    def _drop(self, ref: weakref.WeakMethod) -> None:
        self._on_fork.pop(id(ref), None)

    def _after_fork_in_child(self) -> None:
        self._renew()
        for ref in list(self._on_fork.values()):
            callback = ref()
            if callback is not None:
                callback()


_PROCESS = _Process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_PROCESS._after_fork_in_child)


def _error_line(error: str | None) -> str:
    """The last line of a traceback text: what went wrong."""
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else ""

_SURROGATE = re.compile("[\ud800-\udfff]")  # not storable as UTF-8
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
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
    if isinstance(value, (int, float, str)):
        return _scalar_to_json(value)
    if not isinstance(value, (list, tuple, dict, Task)):
        raise _Unstorable(
            f"is a {type(value).__name__}, which liteq cannot store: use "
            f"None, bool, int, float, str, list, tuple, dict with str keys,"
            f" or a Task")
    return _container_to_json(value, depth, active)


def _scalar_to_json(value: int | float | str) -> int | float | str:
    """An int, float or str, or a subclass's value as its base type."""
    if type(value) is int:
        if not _int_ok(value):
            raise _Unstorable(f"is an int of more than {_MAX_INT_DIGITS} "
                              f"digits")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise _Unstorable(f"is {value!r}: only finite floats are JSON")
        return value
    if type(value) is str:
        return value
    # Not str(value): an Enum mixin overrides __str__.
    convert = (int.__int__ if isinstance(value, int) else
               float.__float__ if isinstance(value, float) else str.__str__)
    return _scalar_to_json(convert(value))


def _container_to_json(value: Any, depth: int, active: set | None) -> Any:
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


class _BadText(str):
    """Text of a row that is not valid UTF-8 (only a write outside liteq
    stores such text), its bad bytes shown as ``\\x`` escapes.  A store
    reads text this way only when a first read failed on it (see
    _tolerating); every reader of a row then sees what is wrong."""


def _read_text(data: bytes) -> str:
    """The text_factory of a tolerant read: UTF-8, or a _BadText."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _BadText(data.decode("utf-8", "backslashreplace"))


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
        if isinstance(text, _BadText):
            raise _Undecodable("is text that is not valid UTF-8")
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
        if (type(value) is Task and not value._then and value._wait is None
                and _plain(value.args)
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

# Version 2: time as data.  ``waiting`` says why an unfinished job out of
# line waits (its timer is then a wake time, never a lease); ``expires``
# and ``deadline`` are unix times (NULL: none), each found by a partial
# index for as long as it can still come due; ``origin`` is the first
# call, kept from the job's first continuation on (NULL: ``call`` is it);
# ``errors`` the JSON list of the current step's last error lines;
# ``unknown_since`` when a worker first met the current call's task name
# unregistered (it then waits for one that knows it, see _SQL_PARK);
# ``scheduled_for`` the slot of a job a schedule fired.  One row of
# liteq_schedules per schedule (see section 8): ``call`` fires at each
# slot, ``spec`` (JSON) says when; ``origin`` is 'code' (liteq.periodic)
# or 'api' (Queue.schedule).
_SCHEMA_2 = (
    "ALTER TABLE liteq_jobs ADD COLUMN waiting TEXT",
    "ALTER TABLE liteq_jobs ADD COLUMN expires REAL",
    "ALTER TABLE liteq_jobs ADD COLUMN deadline REAL",
    "ALTER TABLE liteq_jobs ADD COLUMN origin TEXT",
    "ALTER TABLE liteq_jobs ADD COLUMN errors TEXT",
    "ALTER TABLE liteq_jobs ADD COLUMN unknown_since REAL",
    "ALTER TABLE liteq_jobs ADD COLUMN scheduled_for REAL",
    """
    CREATE TABLE liteq_schedules (
        name        TEXT PRIMARY KEY,
        call        TEXT    NOT NULL,
        spec        TEXT    NOT NULL,
        origin      TEXT    NOT NULL,
        next_slot   REAL    NOT NULL,
        last_slot   REAL,
        last_job    INTEGER,
        skipped     INTEGER NOT NULL DEFAULT 0,
        paused      INTEGER NOT NULL DEFAULT 0,
        created_at  REAL    NOT NULL,
        updated_at  REAL    NOT NULL
    )
    """,
    "CREATE INDEX liteq_schedules_next ON liteq_schedules (next_slot)",
    """
    CREATE INDEX liteq_jobs_expires ON liteq_jobs (expires)
     WHERE expires IS NOT NULL AND started_at IS NULL
       AND finished_at IS NULL
    """,
    """
    CREATE INDEX liteq_jobs_deadline ON liteq_jobs (deadline)
     WHERE deadline IS NOT NULL AND finished_at IS NULL
    """,
    # Jobs of version 1 out of line on a timer with no worker wait on it.
    """
    UPDATE liteq_jobs
       SET waiting = CASE WHEN failures > 0 THEN 'retry' ELSE 'timer' END
     WHERE timer IS NOT NULL AND ready IS NULL AND worker IS NULL
       AND finished_at IS NULL
    """,
)

#: Migrations, indexed by the version they upgrade *from*; version 0 is an
#: empty file.  Each runs inside the write transaction that re-reads the
#: version, so concurrent openers never run one twice.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA, _SCHEMA_2)

_JOB_COLUMNS = (
    "id, name, current, call, description, queue, priority, key, status, "
    "percent, steps, attempts, failures, lost, token, cancel, result, "
    "error, eta, worker, created_at, started_at, updated_at, finished_at, "
    "waiting, expires, deadline, origin, errors, scheduled_for")

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
                            timer, waiting, created_at, updated_at)
    {} ?1, ?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8,
            CASE WHEN ?9 THEN 1 + coalesce((SELECT seq FROM sqlite_sequence
                                 WHERE name = 'liteq_jobs'), 0) END,
            CASE WHEN ?9 THEN NULL ELSE ?8 END,
            CASE WHEN ?9 THEN NULL ELSE 'timer' END, ?10, ?10{}
"""


class _NewJob(collections.namedtuple(
        "_NewJob", "name call description queue priority key percent eta "
                   "due now")):
    """A job to insert, in the order of _INSERT_JOB's parameters; ``due``
    says whether it goes in line at once (else it waits for ``eta``).
    A job with an expiry or a deadline is a _LimitedJob: they are written
    after the insert, in its transaction (binding them for every job
    would cost each insert a fifth more)."""

    __slots__ = ()
    limits: tuple[float | None, float | None] | None = None


class _LimitedJob(_NewJob):
    """A _NewJob with ``limits``: (expires, deadline)."""


_SQL_SET_LIMITS = "UPDATE liteq_jobs SET expires = ?, deadline = ? WHERE id = ?"

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

# Unfinished jobs of a task with their first call (see Queue.enqueued).
_SQL_SELECT_ENQUEUED = """
    SELECT id, current, coalesce(origin, call) FROM liteq_jobs
     WHERE finished_at IS NULL AND (:name IS NULL OR name = :name)
     ORDER BY id
"""

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

# When the next thing comes due that a sweep acts on (each from its own
# index): a timer, an expiry, a deadline of a job no step executes.
_NEXT_DUE = """
    SELECT min(timer) FROM liteq_jobs WHERE timer IS NOT NULL
     UNION ALL
    SELECT min(expires) FROM liteq_jobs
     WHERE expires IS NOT NULL AND started_at IS NULL AND finished_at IS NULL
     UNION ALL
    SELECT deadline FROM (SELECT deadline FROM liteq_jobs
     WHERE deadline IS NOT NULL AND finished_at IS NULL AND worker IS NULL
     ORDER BY deadline LIMIT 1)
"""

# An idle worker looks with this read before it takes the write lock:
# whether a claim could find work, a ready job of the worker's queue
# names (one :qN each, bound by the worker), or a schema that is not
# ours (the claim's transaction checks and reports it); and when the
# next thing comes due.
_SQL_WORK_IN_SIGHT = f"""
    SELECT (SELECT user_version FROM pragma_user_version) != {_SCHEMA_VERSION}
        OR EXISTS (SELECT 1 FROM liteq_jobs
                    WHERE queue IN ({{}}) AND ready IS NOT NULL)
     UNION ALL {_NEXT_DUE}
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

# The same, strictly after a time: where drain(until=...) moves the clock.
_SQL_NEXT_DUE_AFTER = """
    SELECT min(timer) FROM liteq_jobs WHERE timer > :after
     UNION ALL
    SELECT min(expires) FROM liteq_jobs
     WHERE expires > :after AND started_at IS NULL AND finished_at IS NULL
     UNION ALL
    SELECT min(deadline) FROM liteq_jobs
     WHERE deadline > :after AND finished_at IS NULL
"""

_SQL_READY_JOBS = """
    SELECT id, current, queue FROM liteq_jobs WHERE ready IS NOT NULL
     ORDER BY priority DESC, ready
"""

# Schedules (section 8).  Firing runs in a worker's claim transaction.
_SQL_SELECT_DUE_SCHEDULES = """
    SELECT name, call, spec, next_slot, last_job FROM liteq_schedules
     WHERE next_slot <= :now AND NOT paused AND ({}) LIMIT 100
"""

_NEXT_SCHEDULE_SLOT = """
     UNION ALL
    SELECT min(next_slot) FROM liteq_schedules WHERE NOT paused AND ({})
"""

_NEXT_SCHEDULE_SLOT_AFTER = """
     UNION ALL
    SELECT min(next_slot) FROM liteq_schedules
     WHERE next_slot > :after AND NOT paused AND ({})
"""

_SQL_ADVANCE_SCHEDULE = """
    UPDATE liteq_schedules
       SET next_slot = :next, last_slot = coalesce(:last_slot, last_slot),
           last_job = :last_job, skipped = skipped + :skipped,
           updated_at = :now
     WHERE name = :name AND next_slot = :old
"""

_SQL_LAST_RUN = """
    SELECT finished_at IS NULL, started_at IS NULL FROM liteq_jobs
     WHERE id = ?
"""

_SQL_SET_FIRED = """
    UPDATE liteq_jobs SET scheduled_for = ?, expires = ? WHERE id = ?
"""

_SQL_SELECT_SCHEDULE = """
    SELECT call, spec, origin, next_slot, last_slot FROM liteq_schedules
     WHERE name = ?
"""

_SQL_INSERT_SCHEDULE = """
    INSERT INTO liteq_schedules (name, call, spec, origin, next_slot,
                                 created_at, updated_at)
    VALUES (:name, :call, :spec, :origin, :next, :now, :now)
"""

_SQL_UPDATE_SCHEDULE = """
    UPDATE liteq_schedules
       SET call = :call, spec = :spec, origin = :origin, next_slot = :next,
           updated_at = :now
     WHERE name = :name
"""

_SQL_PAUSE_SCHEDULE = """
    UPDATE liteq_schedules SET paused = :paused, updated_at = :now
     WHERE name = :name
"""

_SQL_DELETE_SCHEDULE = "DELETE FROM liteq_schedules WHERE name = ?"

_SQL_SET_LAST_JOB = "UPDATE liteq_schedules SET last_job = ? WHERE name = ?"

_SQL_SELECT_TRIGGER = """
    SELECT call, spec, last_job FROM liteq_schedules WHERE name = ?
"""

_SQL_LIST_SCHEDULES = """
    SELECT s.name, s.call, s.spec, s.origin, s.next_slot, s.last_slot,
           s.last_job, j.status, s.skipped, s.paused
      FROM liteq_schedules AS s LEFT JOIN liteq_jobs AS j ON j.id = s.last_job
     ORDER BY s.name
"""

_SQL_COUNT_WAITING = """
    SELECT queue, count(*) FROM liteq_jobs WHERE waiting IS NOT NULL
     GROUP BY queue
"""

# The queue names that ready jobs wait under: read from the ready index
# alone, once, when a worker starts.
_SQL_READY_QUEUES = """
    SELECT DISTINCT queue FROM liteq_jobs WHERE ready IS NOT NULL
"""

_SQL_MAKE_READY = """
    UPDATE liteq_jobs SET ready = :ready, timer = NULL, worker = NULL,
                          waiting = NULL, lost = lost + :lost,
                          updated_at = :now
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

# The line of every queue name (drain() without queue names).
_SQL_LINE_ALL = """
    SELECT id, priority, ready FROM liteq_jobs WHERE ready IS NOT NULL
     ORDER BY priority DESC, ready LIMIT ?
"""

# Each claim takes a fresh block of _TOKEN_BLOCK tokens; the steps a
# worker continues in place (below) count up inside it, so a step that
# runs before its claim is written still has a token no other claim holds.
# A token that is not an integer (a row changed outside liteq) is kept as
# it is, for the worker to see and report (see _Claims.quarantine).
_NEXT_TOKEN = f"""
           token = CASE WHEN typeof(token) = 'integer'
                        THEN ((token >> {_TOKEN_BITS}) + 1) << {_TOKEN_BITS}
                        ELSE token END"""

_SQL_CLAIM = f"""
    UPDATE liteq_jobs
       SET {_NEXT_TOKEN}, ready = NULL, timer = ? + ?
     WHERE id IN ({{}})
 RETURNING id, current, call, token, attempts, steps, failures, priority,
           CASE WHEN started_at IS NULL THEN expires END, deadline
"""

# A thread that runs its steps one at a time (see Worker._may_defer)
# claims the first step of one queue name and writes its start in one
# statement: the same changes as _SQL_LINE, _SQL_CLAIM and _SQL_START.
# It returns what _SQL_CLAIM returns (``attempts`` as it was before),
# then NULL.  A place in line or an ``attempts`` that is not an integer is
# kept, like the token, and that last column is the place: for the worker
# to see and report.  A job that expired is passed over: the expiry
# sweep cancels it (an expiry that is not a number is returned, to be
# reported).  (_SQL_CLAIM_JOB claims one job by its id instead.)
_CLAIM_START = f"""
    UPDATE liteq_jobs
       SET {_NEXT_TOKEN},
           ready = CASE WHEN typeof(ready) = 'integer' THEN NULL
                        ELSE ready END,
           attempts = CASE WHEN typeof(attempts) = 'integer'
                           THEN attempts + 1 ELSE attempts END,
           timer = :now + :lease, max_lost = :max_lost, status = 'running',
           worker = :worker, started_at = coalesce(started_at, :now),
           updated_at = :now
     WHERE {{}}
 RETURNING id, current, call, token,
           CASE WHEN typeof(attempts) = 'integer' THEN attempts - 1
                ELSE attempts END, steps, failures, priority,
           CASE WHEN typeof(expires) IN ('integer', 'real', 'null')
                THEN NULL ELSE expires END, deadline, ready
"""

_SQL_CLAIM_START = _CLAIM_START.format("""
           id = (SELECT id FROM liteq_jobs
                  WHERE queue = :queue AND ready IS NOT NULL
                    AND (expires IS NULL OR expires > :now
                         OR started_at IS NOT NULL)
                  ORDER BY priority DESC, ready LIMIT 1)""")

_SQL_CLAIM_JOB = _CLAIM_START.format("id = :id AND ready IS NOT NULL")

_SQL_ADJUST_CLAIM = """
    UPDATE liteq_jobs SET timer = :now + :lease, max_lost = :max_lost
     WHERE id = :id
"""

_HELD = "id = :id AND token = :token AND ready IS NULL " \
        "AND finished_at IS NULL"

# An outcome counts only if its step ended before the job's deadline
# (``ended``: store-clock time; see refusal()).
_HELD_IN_TIME = f"{_HELD} AND (deadline IS NULL OR deadline > :ended)"

_SQL_HIGHER_READY = """
    SELECT 1 FROM liteq_jobs
     WHERE queue = ? AND ready IS NOT NULL AND priority >= ? LIMIT 1
"""

# The step starts: from here on observers see it run, and its lease is
# its task's (a step claimed ahead holds a short one until then).
_SQL_START = f"""
    UPDATE liteq_jobs
       SET status = 'running', attempts = :attempt, worker = :worker,
           started_at = coalesce(started_at, :started), updated_at = :now,
           timer = :now + :lease, max_lost = :max_lost
     WHERE {_HELD}
"""

_SQL_SET_LEASE = f"UPDATE liteq_jobs SET timer = :until WHERE {_HELD}"

# A step's own progress (current_job().set_percent), fenced like a lease
# renewal.  A step continued in place runs before the outcome that claimed
# it is written (see _SQL_CONTINUE_HERE): the row may still hold an earlier
# token of the same claim's block, and no other claim's.
_SQL_SET_PERCENT = f"""
    UPDATE liteq_jobs SET percent = :percent, updated_at = :now
     WHERE id = :id AND token >> {_TOKEN_BITS} = :token >> {_TOKEN_BITS}
       AND token <= :token AND ready IS NULL AND finished_at IS NULL
"""

# Outcomes of a step.  A step that ran without its start being written
# (see Worker._may_defer) records its start with its outcome, hence the
# attempt and started_at in each.  A cancel request turns a continuation
# or an error into 'cancelled', but a final result still counts as done.
_OUTCOME = """
           started_at = coalesce(started_at, :started), worker = NULL,
           updated_at = :now"""

# The first call is kept in ``origin`` once the job moves past it.
_CONTINUE = f"""
    UPDATE liteq_jobs
       SET call = :call, current = :current, percent = :percent,
           origin = coalesce(origin, call), errors = NULL,
           unknown_since = NULL,
           steps = steps + :n, attempts = 0, failures = 0, lost = 0,
           eta = :eta, {_OUTCOME},
           status = CASE WHEN cancel THEN 'cancelled' ELSE 'running' END,
           finished_at = CASE WHEN cancel THEN :now END,
           {{}}
     WHERE {_HELD_IN_TIME}
 RETURNING status
"""

# Back in line, behind every ready job of equal or higher priority.
_SQL_CONTINUE = _CONTINUE.format(
    "ready = CASE WHEN cancel THEN NULL ELSE :ready END, timer = NULL")

# Or out of line until its wake time (Task.after(), Task.at()).
_SQL_CONTINUE_WAIT = _CONTINUE.format(
    f"ready = NULL, timer = CASE WHEN cancel THEN NULL ELSE :eta END, "
    f"waiting = CASE WHEN cancel THEN NULL ELSE '{_WAIT_TIMER}' END")

# The same call again, in line or at its wake time (snooze()).
_SQL_SNOOZE = f"""
    UPDATE liteq_jobs
       SET attempts = 0, eta = :eta, {_OUTCOME},
           status = CASE WHEN cancel THEN 'cancelled' ELSE 'running' END,
           finished_at = CASE WHEN cancel THEN :now END,
           ready = CASE WHEN cancel OR :eta > :now THEN NULL ELSE :ready END,
           timer = CASE WHEN NOT cancel AND :eta > :now THEN :eta END,
           waiting = CASE WHEN NOT cancel AND :eta > :now
                          THEN '{_WAIT_TIMER}' END
     WHERE {_HELD_IN_TIME}
 RETURNING status
"""

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
     WHERE {_HELD_IN_TIME}
"""

_SQL_FAIL = f"""
    UPDATE liteq_jobs
       SET status = CASE WHEN cancel THEN 'cancelled' ELSE 'failed' END,
           error = :error, errors = :errors, attempts = :attempt,
           timer = NULL, finished_at = :now, {_OUTCOME}
     WHERE {_HELD_IN_TIME}
 RETURNING status
"""

_SQL_SELECT_ERRORS = "SELECT errors FROM liteq_jobs WHERE id = ?"

_SQL_FAIL_STEP = f"""
    UPDATE liteq_jobs
       SET status = CASE WHEN cancel THEN 'cancelled'
                         WHEN failures < :retries THEN 'running'
                         ELSE 'failed' END,
           failures = failures + 1, error = :error, errors = :errors,
           attempts = :attempt, unknown_since = NULL,
           eta = CASE WHEN failures < :retries THEN :now + :delay
                      ELSE :now END,
           timer = CASE WHEN NOT cancel AND failures < :retries AND :delay > 0
                        THEN :now + :delay END,
           waiting = CASE WHEN NOT cancel AND failures < :retries
                           AND :delay > 0 THEN '{_WAIT_RETRY}' END,
           ready = CASE WHEN NOT cancel AND failures < :retries AND :delay <= 0
                        THEN :ready END,
           finished_at = CASE WHEN cancel OR failures >= :retries
                              THEN :now END, {_OUTCOME}
     WHERE {_HELD_IN_TIME}
 RETURNING status, failures
"""

# A step whose task this worker does not know goes out of line unrun, to
# wait for a worker that knows it (see _Claims.unknown): observers see it
# as before it was claimed, but for ``waiting`` and the error.
_SQL_PARK = f"""
    UPDATE liteq_jobs
       SET unknown_since = coalesce(unknown_since, :now), error = :error,
           attempts = :attempts, worker = NULL, updated_at = :now,
           status = CASE WHEN cancel THEN 'cancelled'
                         WHEN steps = 0 AND :attempts = 0 THEN 'pending'
                         ELSE status END,
           started_at = CASE WHEN steps = 0 AND :attempts = 0 THEN NULL
                             ELSE started_at END,
           finished_at = CASE WHEN cancel THEN :now END,
           timer = CASE WHEN cancel THEN NULL ELSE :wake END,
           waiting = CASE WHEN cancel THEN NULL ELSE '{_WAIT_UNKNOWN}' END
     WHERE {_HELD}
 RETURNING status
"""

_SQL_SELECT_UNKNOWN_SINCE = "SELECT unknown_since FROM liteq_jobs WHERE id = ?"

# A job that ran out of time: expired before its first step started
# (cancelled), or past its deadline (failed).  Held by the step that
# found it so, or (the sweeps) by no one: the guard says which.
_SQL_OUT_OF_TIME = """
    UPDATE liteq_jobs
       SET status = :status, error = :error, finished_at = :now,
           updated_at = :now, ready = NULL, timer = NULL, worker = NULL,
           waiting = NULL
     WHERE {}
 RETURNING status
"""
_SQL_EXPIRE_HELD = _SQL_OUT_OF_TIME.format(_HELD)
_SQL_EXPIRE = _SQL_OUT_OF_TIME.format("id = :id")

# Jobs out of time that no step of theirs holds: expired before their
# first step, or past their deadline with no step executing.
_SQL_SELECT_EXPIRED = """
    SELECT id, expires FROM liteq_jobs
     WHERE expires <= ? AND started_at IS NULL AND finished_at IS NULL
     LIMIT 100
"""

_SQL_SELECT_OVERDUE = """
    SELECT id, deadline FROM liteq_jobs
     WHERE deadline <= ? AND finished_at IS NULL AND worker IS NULL
     LIMIT 100
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

# A row liteq cannot read as it writes it (a column the claim or a sweep
# reads holds a value of the wrong type: see _Claims.quarantine) goes
# out of line and, unless it finished already, fails.
_UNFINISHED = "status = 'pending' OR status = 'running'"

_SQL_QUARANTINE = f"""
    UPDATE liteq_jobs
       SET status = CASE WHEN {_UNFINISHED} THEN 'failed' ELSE status END,
           error = CASE WHEN {_UNFINISHED} THEN :error ELSE error END,
           finished_at = CASE WHEN {_UNFINISHED} THEN :now
                              ELSE finished_at END,
           ready = NULL, timer = NULL, worker = NULL, waiting = NULL,
           updated_at = :now
     WHERE id = :id
"""

# A timer that is not a number (text or a BLOB) never comes due, and
# min(timer) returns it when no number is there: such values sort after
# every number, so the index finds them at its end.
_SQL_SELECT_BAD_TIMERS = """
    SELECT id, timer FROM liteq_jobs WHERE timer >= '' LIMIT 100
"""

_SQL_CANCEL = """
    UPDATE liteq_jobs
       SET cancel = 1, updated_at = :now,
           status = CASE WHEN worker IS NULL THEN 'cancelled' ELSE status END,
           ready = CASE WHEN worker IS NULL THEN NULL ELSE ready END,
           timer = CASE WHEN worker IS NULL THEN NULL ELSE timer END,
           waiting = CASE WHEN worker IS NULL THEN NULL ELSE waiting END,
           finished_at = CASE WHEN worker IS NULL THEN :now END
     WHERE id = :id AND status IN ('pending', 'running')
 RETURNING status
"""

_SQL_SELECT_STATUS = "SELECT status, key, cancel FROM liteq_jobs WHERE id = ?"

_SQL_SELECT_CANCEL = "SELECT cancel FROM liteq_jobs WHERE id = ?"

# Why an outcome was refused: see _Claims.refusal.
_SQL_SELECT_REFUSAL = """
    SELECT status, cancel, token, deadline, error, ready, finished_at
      FROM liteq_jobs WHERE id = ?
"""

# Steps claimed ahead that must not run: cancelled (or finished) since.
_SQL_SELECT_GONE = """
    SELECT id FROM liteq_jobs
     WHERE id IN ({}) AND (cancel OR finished_at IS NOT NULL)
"""

# A job whose eta is still ahead (cancelled or failed at its deadline
# during a countdown, a wait, a retry's backoff) resumes that wait, on its
# timer, out of line; any other job goes in line at once.  An expiry or a
# deadline already past no longer applies.  SET expressions read the row
# as it was before the UPDATE.
_SQL_RETRY = f"""
    UPDATE liteq_jobs
       SET status = CASE WHEN steps > 0 THEN 'running' ELSE 'pending' END,
           attempts = 0, failures = 0, lost = 0, cancel = 0, error = NULL,
           worker = NULL,
           timer = CASE WHEN eta > :now THEN eta END,
           waiting = CASE WHEN eta > :now THEN '{_WAIT_TIMER}' END,
           ready = CASE WHEN eta > :now THEN NULL ELSE :ready END,
           eta = CASE WHEN eta > :now THEN eta ELSE :now END,
           expires = CASE WHEN expires > :now THEN expires END,
           unknown_since = NULL,
           deadline = CASE WHEN deadline > :now THEN deadline END,
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
        _PROCESS.on_fork(self._after_fork)
        # False for readers that must never write (the CLI's read
        # commands, HTTP): an empty file is then refused, not created.
        self.creates = True

    # Connections ----------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
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

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=0,
                                   isolation_level=None,
                                   check_same_thread=False,
                                   factory=_Connection)
        except sqlite3.Error as exc:
            raise StorageError(_open_problem(self.path, exc)) from exc
        try:
            if not self._schema_ok:
                self._prepare(conn)
            _execute(conn, "PRAGMA synchronous = "
                     + ("FULL" if self.durable else "NORMAL"))
            _execute(conn, f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
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
            self._retry(lambda: _execute(conn, "PRAGMA journal_mode = WAL"))
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
        return _execute(conn, "PRAGMA journal_mode").fetchone()[0].lower()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if self._journal_mode(conn) != "wal":
            _execute(conn, "PRAGMA journal_mode = WAL")
        _execute(conn, "BEGIN IMMEDIATE")
        try:
            # Another process may have migrated since we looked.
            version = self._check_header(conn)
            for migration in _MIGRATIONS[version:]:
                for statement in migration:
                    _execute(conn, statement)
            _execute(conn, f"PRAGMA application_id = {_APPLICATION_ID}")
            _execute(conn, f"PRAGMA user_version = {_SCHEMA_VERSION}")
            _execute(conn, "COMMIT")
        except BaseException:
            _execute(conn, "ROLLBACK")
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
        if kind == "access" and os.path.isdir(self.path + "-shm"):
            hint = (f": {self.path}-shm is a directory, where SQLite "
                    f"keeps its shared memory: stop the processes that use "
                    f"the database, remove it and start them again")
        return StorageError(f"cannot use {self.path}: {exc}{hint}")

    def write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``body(conn)`` in one short BEGIN IMMEDIATE transaction.

        The whole transaction is retried while another writer holds the
        lock; any exception rolls it back.  Nothing else may run inside.
        """
        def attempt(conn: _Connection) -> Any:
            _execute(conn, "BEGIN IMMEDIATE")
            try:
                version = _execute(conn, "PRAGMA user_version").fetchone()[0]
                if version != _SCHEMA_VERSION:
                    self._check_header(conn)
                result = body(conn)
                _execute(conn, "COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    _execute(conn, "ROLLBACK")
                raise

        return self._retry(lambda: self._using(
            lambda conn: _tolerating(conn, attempt)))

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
        return self.query(lambda conn: _execute(conn, sql, params).fetchall())

    def query(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``body(conn)`` outside any transaction, after a schema
        check, retried whole while the database is busy."""
        def attempt(conn: _Connection) -> Any:
            version = _execute(conn, "PRAGMA user_version").fetchone()[0]
            if version != _SCHEMA_VERSION:
                self._check_header(conn)
            return body(conn)

        return self._retry(lambda: self._using(
            lambda conn: _tolerating(conn, attempt)))

    def peek(self, sql: str, params: Any = ()) -> tuple | None:
        """One row of an advisory query; None if it failed."""
        return self.peek_with(
            lambda conn: _execute(conn, sql, params).fetchone())

    def peek_with(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """What ``body(conn)`` returns; None if it failed.

        No separate schema check and no retry: the caller treats None as
        "go and see", and the write it then makes checks and reports.
        """
        try:
            return self._using(body)
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
    """Run one statement: the single place SQL is sent.

    At DEBUG, logger "liteq" gets one ``sql: TEXT PARAMS`` record per
    statement, to see or count what a call sends.
    """
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("sql: %s %r", " ".join(sql.split()), params)
    return conn.execute(sql, params)


# How the sqlite3 module says a TEXT value is not valid UTF-8.
_UNDECODABLE = "Could not decode to UTF-8"


def _tolerating(conn: sqlite3.Connection,
                action: Callable[[Any], Any]) -> Any:
    """``action(conn)``; if it read text that is not valid UTF-8, run it
    again reading such text as a _BadText.

    Only a row changed outside liteq holds such text, so the common case
    costs nothing.  ``action`` must be safe to run again: a whole
    transaction (rolled back when it failed), or reads.
    """
    try:
        return action(conn)
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith(_UNDECODABLE):
            raise
    conn.text_factory = _read_text
    try:
        return action(conn)
    finally:
        conn.text_factory = str


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


def _open_problem(path: str, exc: sqlite3.Error) -> str:
    """Why SQLite cannot open ``path``, in the user's terms."""
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        example = os.path.join(path, _DEFAULT_DB)
        return (f"cannot open {path}: it is a folder, not a database file "
                f"(name a file in it, e.g. {example})")
    if not os.path.isdir(folder):
        return f"cannot open {path}: its folder {folder} does not exist"
    return f"cannot open {path}: {exc}"


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

    # A delayed copy (after(), at()) waits before it runs: ("after",
    # seconds) or ("at", unix time).  Stored in its JSON form.
    _wait: tuple[str, float] | None = None

    def __init__(self, name: str, args: Sequence = (), kwargs: dict | None
                 = None, *, _then: tuple = ()) -> None:
        self.name = _check_name("task name", name)
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        # Chain frames to resume, innermost first, when this call finishes.
        self._then = tuple(_then)

    @staticmethod
    def _made(name: str, args: list, kwargs: dict, then: tuple = ()) -> Task:
        """A Task of a checked name (a chain, for the chain's name) from
        its parts: nothing is checked or copied."""
        task = object.__new__(chain if name == _CHAIN_NAME else Task)
        task.name, task.args, task.kwargs = name, args, kwargs
        task._then = then
        return task

    # Identity and form ----------------------------------------------------

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = f"{self.name}({', '.join(parts)})"
        if self._wait is not None:
            kind, value = self._wait
            text += (f".after({value:g}s)" if kind == _AFTER
                     else f".at({_iso(value)})")
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
        if self._wait is not None:
            out[self._wait[0]] = self._wait[1]
        return out

    @staticmethod
    def _from_json(value: dict, depth: int = 0) -> Task:
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
        task = Task._made(name, parts["args"], parts["kwargs"],
                          tuple(parts["then"]))
        task._wait = _wait_from_json(value)
        _check_chain_form(task)
        return task

    # Options of the registered function -----------------------------------

    @property
    def function(self) -> TaskFunction:
        """The registered task function, or LookupError if there is none."""
        found = _PROCESS.tasks.get(self.name)
        if found is None:
            raise LookupError(
                f"unknown task {self.name!r}: not registered in this "
                f"process; import the module that defines it")
        return found

    def percent(self) -> float | None:
        """Progress of the job whose current call this is, or None."""
        fn = _PROCESS.tasks.get(self.name)
        own = fn._percent_of(self.args, self.kwargs) if fn else None
        for frame in self._then:  # each enclosing chain scales it
            own = frame._scaled(own)
        return own

    # Waiting before it runs -----------------------------------------------

    def after(self, seconds: float = 0, minutes: float = 0, hours: float = 0,
              days: float = 0) -> Task:
        """A copy of this call that waits this long before it runs.

        Returned from a step, the job waits (``Job.waiting == "timer"``)
        from the step's end; given to ``delay()``, it is a countdown; in a
        chain, the chain waits before this member.
        """
        total = 0.0
        for name, value, unit in (("seconds", seconds, 1),
                                  ("minutes", minutes, 60),
                                  ("hours", hours, 3600),
                                  ("days", days, 86400)):
            total += _check_number(name, value) * unit
        if total > _MAX_RETRY_DELAY:  # else wake times past year 9999
            raise ValueError(f"after() waits at most {_MAX_RETRY_DELAY:.0f}"
                             f" seconds (100 years), got {total:g}")
        return self._waiting((_AFTER, total))

    def at(self, eta: Any) -> Task:
        """A copy of this call that waits until ``eta`` (an aware
        datetime, a naive one read as local time, or a unix timestamp)
        before it runs; a past time means at once."""
        return self._waiting((_AT, _eta_time(eta)))

    def _waiting(self, wait: tuple[str, float] | None) -> Task:
        copy = Task._made(self.name, list(self.args), dict(self.kwargs),
                          self._then)
        copy._wait = wait
        return copy

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
        call, snoozes = _roundtrip(self, ""), 0
        while True:
            value = call._run_step()
            if isinstance(value, _Snooze):  # at once, but not for ever
                snoozes += 1
                if snoozes > _MAX_SNOOZES:
                    raise RuntimeError(
                        f"{call.name} snoozed {_MAX_SNOOZES} times in a row "
                        f"in run(): it waits for something run() never "
                        f"brings; test it with Queue.drain() and a clock")
                continue
            snoozes = 0
            follow = _advance(call, value)
            if follow is None:
                return value
            call = follow  # a wait is skipped: nothing is stored

    def run_once(self) -> Any:
        """Run exactly one step here; a Task means the work continues (a
        snoozing step returns this call again)."""
        call = _roundtrip(self, "")
        value = call._run_step()
        if isinstance(value, _Snooze):
            return call
        follow = _advance(call, value)
        return value if follow is None else follow

    def _run_step(self) -> Any:
        fn = self.function
        args, kwargs = fn._bind_stored(self.args, self.kwargs)
        local = _PROCESS.current
        local.steps = getattr(local, "steps", 0) + 1  # see snooze()
        try:
            value = fn.__wrapped__(*args, **kwargs)
        finally:
            local.steps -= 1
        return value if isinstance(value, _Snooze) else _roundtrip(
            value, "result")

    # What a chain does differently (see chain) ----------------------------

    def _home(self) -> Queue | None:
        """The Queue a job of this call is stored in; None if its task is
        not registered here."""
        fn = _PROCESS.tasks.get(self.name)
        if fn is None:
            return None
        return fn._queue if fn._queue is not None else default_queue()

    def _options(self, own: TaskFunction) -> TaskFunction:
        """The task whose queue name and priority a new job takes; ``own``
        is this call's task."""
        return own

    def _description(self, own: TaskFunction) -> str:
        """The description of a new job; ``own`` is this call's task."""
        return own._description(self.args, self.kwargs)

    def _followed_by(self, frames: tuple) -> Task:
        """A copy of this call that resumes ``frames`` once it finishes."""
        task = Task._made(_check_name("task name", self.name),
                          list(self.args), dict(self.kwargs or {}),
                          self._then + frames)
        task._wait = self._wait
        return task

    def _resumes(self) -> bool:
        """As a frame: whether it has a step left to run (see _advance)."""
        return True

    def _scaled(self, percent: float | None) -> float | None:
        """As a frame: its progress while the call it waits on is at
        ``percent``."""
        return percent


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
        name, args = value[_TAG_TASK], value.get("args", [])
        kwargs = value.get("kwargs", {})
        if not (type(name) is str and type(args) is list
                and type(kwargs) is dict):
            return Task._from_json(value)  # to say what is wrong
        return Task._made(name, args, kwargs)
    except _Undecodable as exc:
        raise exc.at("call") from None


def _wait_from_json(value: dict) -> tuple[str, float] | None:
    """The wait of a serialized call (its "after" or "at" key), if any."""
    found = [(key, value[key]) for key in (_AFTER, _AT) if key in value]
    if not found:
        return None
    key, number = found[0]
    if len(found) > 1 or type(number) not in (int, float) or not (
            math.isfinite(number) and (number >= 0 or key == _AT)):
        problem = _Undecodable(
            "has both 'after' and 'at'" if len(found) > 1 else
            f"is {number!r:.60}, not a finite number"
            + (" >= 0" if key == _AFTER else ""))
        if len(found) == 1:
            problem.where.append(f".{key}")
        raise problem
    return key, float(number)


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
        return value._followed_by(call._then)
    frames = call._then
    for i, frame in enumerate(frames):
        if frame._resumes():
            return frame._followed_by(frames[i + 1:])
    return None


class _Snooze:
    """What ``snooze()`` returns: run the same call again after a delay."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"<snooze {self.seconds:g}s>"


def snooze(seconds: float) -> Any:
    """Return this from a step to run the same call again ``seconds``
    later: no retry is used, no step is completed, ``attempts`` goes back
    to 0.  Raises RuntimeError outside a step."""
    if current_job() is None and not getattr(_PROCESS.current, "steps", 0):
        raise RuntimeError("snooze() is for a task's return value: "
                           "return liteq.snooze(seconds) inside a step")
    return _Snooze(_check_seconds("seconds", seconds))


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
                    key: str | None = None, expires: Any = None,
                    deadline: Any = None) -> Job:
        """Store a call with options and return its Job.

        ``countdown`` (seconds from now) or ``eta`` (an aware datetime, a
        naive one read as local time, or a unix timestamp) delay the start;
        ``priority`` and ``queue`` override the task's; ``key`` makes the
        call idempotent among unfinished jobs.  ``expires`` (seconds from
        now, or a datetime) cancels the job if its first step has not
        started by then; past ``deadline`` (an eta form) the job fails.
        """
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args must be a list or tuple, got {args!r}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, got {kwargs!r}")
        call = self(*args, **(kwargs or {}))
        return self._queue_for(call)._enqueue(
            call, countdown=countdown, eta=eta, priority=priority,
            queue=queue, key=key, expires=expires, deadline=deadline)

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
        return call._home() or default_queue()

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


def _warn_once(key: str, message: str) -> None:
    with _PROCESS.lock:
        if key in _PROCESS.warned:
            return
        _PROCESS.warned.add(key)
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
        opts[option] = _check_seconds(option, opts[option])
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
    if "retry_on" in options and "dont_retry" in options:
        raise TypeError("give retry_on (the errors to retry) or dont_retry "
                        "(the errors never retried), not both")
    if opts["retry_on"] is not None:
        opts["retry_on"] = _check_errors("retry_on", opts["retry_on"])
    opts["dont_retry"] = _check_errors("dont_retry", opts["dont_retry"])
    if not isinstance(opts["retry_jitter"], bool):
        raise TypeError(f"retry_jitter must be True or False, got "
                        f"{opts['retry_jitter']!r}")
    if opts["job_timeout"] is not None:
        opts["job_timeout"] = _check_seconds("job_timeout",
                                             opts["job_timeout"], True)
    return opts


def _check_seconds(name: str, value: Any, strict: bool = False) -> float:
    """A number of seconds that liteq can add to a time: at most 100
    years (beyond that, times would pass year 9999)."""
    seconds = _check_number(name, value, strict=strict)
    if seconds > _MAX_RETRY_DELAY:
        raise ValueError(f"{name} must be at most {_MAX_RETRY_DELAY:.0f} "
                         f"seconds (100 years), got {value!r}")
    return seconds


def _check_errors(name: str, value: Any) -> tuple[type, ...]:
    """An exception class or a tuple or list of them, as a tuple."""
    classes = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{name} must be an exception class or a tuple "
                            f"of them, got {value!r}")
    return classes


def _register(function: Callable, queue: Queue | None,
              options: dict) -> TaskFunction:
    _check_function(function)
    wrapper = TaskFunction(function, queue, _check_options(options))
    if wrapper.name is None:
        return wrapper  # interactive: usable once given a name
    with _PROCESS.lock:
        taken = _PROCESS.tasks.get(wrapper.name)
        if taken is not None and taken._identity != wrapper._identity:
            raise ValueError(
                f"task name {wrapper.name!r} is taken by "
                f"{taken._identity}: give {wrapper._identity} another "
                f"name=")
        _PROCESS.tasks[wrapper.name] = wrapper
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
    retries, retry_delay, retry_max_delay, retry_on, dont_retry,
    retry_jitter, queue, priority, name, description, lease, max_lost,
    job_timeout.
    """
    if function is not None and not callable(function):
        raise TypeError("@task options are keyword-only, e.g. "
                        "@task(retries=3)")
    return _task_decorator(None, function, args, options)


# chain ----------------------------------------------------------------------

_CHAIN_NAME = "liteq:chain"


class chain(Task):
    """A Task that runs each task's steps to completion, in order.

    It finishes with the last task's result; it can be delayed, returned
    as a continuation, or nested in another chain.
    """

    # Stored as a call of the task liteq:chain on the list of members.  Its
    # step makes the first member current, with the chain, holding the
    # members left and how many are ``done``, as that call's next frame
    # (docs/format.md).  Decoding any call of that name gives a chain.

    def __init__(self, tasks: Sequence[Task]) -> None:
        if isinstance(tasks, (str, bytes, dict)) or not hasattr(
                tasks, "__iter__"):
            raise TypeError(f"chain() takes a list of Tasks, got {tasks!r}")
        members = [deserialize_task(t) for t in tasks]
        queues = {q.path for q in (m._home() for m in members)
                  if q is not None}
        if len(queues) > 1:
            raise ValueError("chain() members belong to different Queues: "
                             "chain tasks of one database only")
        super().__init__(_CHAIN_NAME, [members])

    @property
    def _members(self) -> list:
        return self.args[0] if self.args else []

    def _home(self) -> Queue | None:
        """The first member's Queue: a chain belongs to it."""
        members = self._members
        return deserialize_task(members[0])._home() if members else None

    def _options(self, own: TaskFunction) -> TaskFunction:
        """The first member's task, as for the Queue."""
        if not self._members:
            return own
        first = deserialize_task(self._members[0])
        return first._options(first.function)

    def _description(self, own: TaskFunction) -> str:
        names = [t.name.rpartition(":")[2] for t in self._members]
        return f"chain of {len(names)}: {', '.join(names)}"

    def _resumes(self) -> bool:
        return bool(self._members)

    def _scaled(self, percent: float | None) -> float:
        done = self.kwargs.get("done", 0)
        total = done + len(self._members)
        return 100.0 * ((done - 1) + (percent or 0.0) / 100.0) / total


def _chain_step(members: list, done: int = 0) -> Any:
    """Make the next member current; resume here when it finishes."""
    if not members:
        return None
    rest = Task._made(_CHAIN_NAME, [members[1:]], {"done": done + 1})
    return deserialize_task(members[0])._followed_by((rest,))


def _chain_percent(members: list, done: int = 0) -> float:
    total = done + len(members)
    return 100.0 * done / total if total else 0.0


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

    def __init__(self) -> None:
        self.condition = threading.Condition(threading.Lock())
        self.generation = 0
        self.local = 0  # notifications by this process's own commits
        self.waiting = 0  # threads in wait(); changed under the condition
        # Threads waiting in a select() (see _Bell.wait): rung through
        # their pipe.  Changed under the condition.
        self.bells: set[_Bell] = set()

    @classmethod
    def of(cls, path: str, kind: str = "work") -> _Signal:
        found = _PROCESS.signals.get((path, kind))
        if found is None:
            with _PROCESS.lock:
                found = _PROCESS.signals.setdefault((path, kind), cls())
        return found

    def notify(self, local: bool = True) -> None:
        # Only increments, so a waiter never mistakes a new generation for
        # the one it read.  A waiter counts itself before it compares, so
        # either it sees the new generation or this sees it waiting.
        with self.condition:  # notifiers may be several threads at once
            self.local += local
            self.generation += 1
            if self.waiting:
                self.condition.notify_all()
            for bell in self.bells:  # takes each bell's own lock
                bell.interrupt()

    def wait(self, generation: int, timeout: float) -> None:
        with self.condition:
            self.waiting += 1
            try:
                if self.generation == generation and timeout > 0:
                    self.condition.wait(timeout)
            finally:
                self.waiting -= 1


def _job_field(column: str, doc: str,
               convert: Callable = lambda v: v) -> property:
    """A read-only Job field: its column of the job's row, read fresh."""
    def read(self: Job) -> Any:
        return convert(self._row()[column])
    return property(read, doc=doc)


class Job:
    """A handle on one stored job; every field read is fresh.

    Fields: id, name, current, description, queue, priority, key, status,
    percent, steps, attempts, error, errors, waiting, eta, expires,
    deadline, created_at, started_at, updated_at, finished_at (aware UTC
    datetimes), worker.
    """

    def __init__(self, queue: Queue, job_id: int | None) -> None:
        self._q = queue
        self._id = job_id

    # Fields: each read is a query of the job's row ------------------------

    name = _job_field("name", "Stored name of the task first delayed.")
    current = _job_field("current", "Stored name of the current call.")
    description = _job_field("description", "What the job does, in words.")
    queue = _job_field("queue", "Name of the queue it waits in.")
    priority = _job_field("priority", "Higher runs first.")
    key = _job_field("key", "Its idempotency key, or None.")
    status = _job_field(
        "status", "pending, running, done, failed or cancelled.")
    percent = _job_field("percent", "Progress, 0 to 100, or None.")
    steps = _job_field("steps", "Steps completed so far.")
    attempts = _job_field("attempts", "Starts of the current step.")
    error = _job_field("error", "Traceback text of the last error, or None.")
    errors = _job_field(
        "errors", "Error lines of the current step's failed attempts, "
                  "oldest first (the last 10).", lambda v: _error_list(v))
    waiting = _job_field(
        "waiting", 'Why an unfinished job is out of line ("timer", '
                   '"retry"), or None.')
    worker = _job_field("worker", '"host:pid" while a step runs, else None.')
    eta = _job_field("eta", "When its current step is due (a waiting "
                            "job's wake time).", _utc)
    expires = _job_field(
        "expires", "When it is cancelled if its first step has not "
                   "started, or None.", _utc)
    deadline = _job_field(
        "deadline", "When it fails if still unfinished, or None.", _utc)
    scheduled_for = _job_field(
        "scheduled_for", "The slot of the schedule that fired it, or "
                         "None.", _utc)
    created_at = _job_field("created_at", "When it was stored.", _utc)
    started_at = _job_field(
        "started_at", "When its first step started, or None.", _utc)
    updated_at = _job_field("updated_at", "When its row last changed.", _utc)
    finished_at = _job_field(
        "finished_at", "When it finished, or None.", _utc)

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
        """Send a failed or cancelled job back to run its current call.

        A cancelled job whose eta is still ahead waits for it again; any
        other runs as soon as a worker is free.
        """
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


_TIME_COLUMNS = ("eta", "expires", "deadline", "scheduled_for",
                 "created_at", "started_at", "updated_at", "finished_at")


def _error_list(text: Any) -> list[str]:
    """The stored ``errors`` as a list of lines (see _errors_after)."""
    if text is None:
        return []
    try:
        errors = json.loads(text) if type(text) is str else None
    except (ValueError, RecursionError):
        errors = None
    if type(errors) is list and all(type(e) is str for e in errors):
        return errors
    raise ValueError(f"errors is {_shown(text)}, not a JSON list of "
                     f"error lines")


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
    try:
        out["errors"] = _error_list(row["errors"])
    except ValueError as exc:
        out["errors"] = []
        problems.append(str(exc))
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
                  "attempts", "error", "waiting", "worker")


def _field_problem(key: str, value: Any) -> str | None:
    """What is wrong with a stored field for to_dict(), or None."""
    if isinstance(value, _BadText):
        return f"{key} is text that is not valid UTF-8"
    if key in ("id", "priority", "steps", "attempts"):
        ok, want = type(value) is int, "an integer"
    elif key == "percent":  # liteq stores it from 0 to 100
        ok = value is None or (type(value) in (int, float)
                               and 0 <= value <= 100)
        want = "a finite number from 0 to 100"
    elif key == "status":
        ok, want = value in _STATUSES, "a status"
    else:
        ok = type(value) is str or (value is None and key in (
            "key", "error", "waiting", "worker"))
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

    def set_percent(self, percent: float) -> bool:
        """Store this step's progress now, clamped to 0..100.

        Every process reading ``Job.percent`` sees it while the step runs;
        when the step ends, the percent of the next stored call (100 when
        done) replaces it.  Returns False, storing nothing, when this step
        no longer holds its job (its lease was lost, or the job finished).

        Raises:
            TypeError: ``percent`` is not a number.
            ValueError: ``percent`` is NaN or infinite.
        """
        if isinstance(percent, bool) or not isinstance(percent,
                                                       (int, float)):
            raise TypeError(f"percent must be a number, got {percent!r}")
        if not math.isfinite(percent):
            raise ValueError(f"percent must be finite, got {percent!r}")
        store = self._q._store
        params = {"id": self.id, "token": self._token,
                  "percent": float(min(100.0, max(0.0, percent)))}

        def body(conn: sqlite3.Connection) -> int:
            params["now"] = store.clock()
            return _execute(conn, _SQL_SET_PERCENT, params).rowcount

        return bool(store.write(body))




def current_job() -> _CurrentJob | None:
    """The Job of the step running in this thread, or None outside one."""
    return getattr(_PROCESS.current, "job", None)


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
        self._eager: set[int] = set()  # threads in eager() (idents)
        self._clock: TestClock | None = None  # see clock()
        self._crews: weakref.WeakSet = weakref.WeakSet()  # running workers
        self._closed = False
        self._folder: str | None = None  # a temporary() Queue's own

    @classmethod
    def temporary(cls, **options: Any) -> Queue:
        """A Queue on a new file in a new temporary folder, both deleted
        at ``close()`` (or when the program exits).  For tests."""
        folder = tempfile.mkdtemp(prefix="liteq-")
        queue = cls(os.path.join(folder, "liteq.db"), **options)
        queue._folder = folder
        weakref.finalize(queue, shutil.rmtree, folder, True)
        return queue

    def __repr__(self) -> str:
        return f"<Queue {self.path}>"

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close this Queue's connections (it reopens if used again, but
        a temporary() Queue's file is gone).

        A query that another thread is running ends first.
        """
        self._closed = True
        self._store.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what} needs an open Queue: {self.path} "
                               f"was closed")

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
            if not isinstance(name, str):  # a BLOB, written outside liteq
                name = f"x'{name.hex()}'"  # as the sqlite3 shell writes it
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
            if threading.get_ident() in self._eager:
                for job_id in ids:
                    _Inline(self, None).run_job(job_id)

    # Schedules (see section 8) ---------------------------------------------

    def schedule(self, name: str, call: Task, cron: str | None = None,
                 every: float | None = None, **options: Any) -> None:
        """Store a schedule that fires ``call`` (a Task) at each slot of
        ``cron`` or ``every``; the same name again updates it.  Options
        as for liteq.periodic."""
        _check_name("schedule name", name)
        if not isinstance(call, Task):
            raise TypeError(f"schedule() takes a Task call, e.g. "
                            f"cleanup(days=30), got {call!r}")
        spec = _schedule_spec(cron, every, options)
        with _PROCESS.lock:
            if name in _PROCESS.schedules:
                raise ValueError(f"schedule name {name!r} is declared in "
                                 f"code (liteq.periodic): give q.schedule()"
                                 f" another name")
        text = _encode(call, "the scheduled call", self.max_payload)
        spec = _resolved(spec, call)
        self._store.write(lambda conn: _upsert_schedule(
            conn, self._store.clock(), name, text, spec, "api"))
        _Signal.of(self.path).notify()  # an idle worker reads its slot

    def unschedule(self, name: str) -> bool:
        """Delete a stored schedule; False if there was none."""
        return bool(self._store.write(lambda conn: _execute(
            conn, _SQL_DELETE_SCHEDULE, (name,)).rowcount))

    def pause_schedule(self, name: str) -> None:
        """Fire nothing until resume_schedule(); missed slots then follow
        the schedule's catchup rule."""
        self._pause(name, True)

    def resume_schedule(self, name: str) -> None:
        """Fire again (see pause_schedule)."""
        self._pause(name, False)

    def _pause(self, name: str, paused: bool) -> None:
        done = self._store.write(lambda conn: _execute(
            conn, _SQL_PAUSE_SCHEDULE, {"name": name, "paused": int(paused),
                                        "now": self._store.clock()}
        ).rowcount)
        if not done:
            raise LookupError(f"no schedule named {name!r} in {self.path}")
        _Signal.of(self.path).notify()

    def trigger(self, name: str) -> Job | None:
        """Fire one extra run now, outside the slots; None if the
        schedule's overlap rule refuses it."""
        def body(conn: sqlite3.Connection) -> int | None:
            row = _execute(conn, _SQL_SELECT_TRIGGER, (name,)).fetchone()
            if row is None:
                raise LookupError(f"no schedule named {name!r} in "
                                  f"{self.path}")
            call, spec, last_job = row
            spec = json.loads(spec)
            if not _may_fire(conn, spec["overlap"], last_job):
                return None
            now = self._store.clock()
            job_id = _insert_fired(conn, call, spec, now, now)
            _execute(conn, _SQL_SET_LAST_JOB, (job_id, name))
            return job_id

        job_id = self._store.write(body)
        if job_id is None:
            return None
        _Signal.of(self.path).notify()
        return Job(self, job_id)

    def schedules(self) -> list[dict]:
        """Every stored schedule, by name, as JSON-ready dicts."""
        return [_schedule_dict(row) for row in
                self._store.read(_SQL_LIST_SCHEDULES)]

    # Testing (see section 13) ----------------------------------------------

    @contextlib.contextmanager
    def clock(self, start: Any = None) -> Iterator[TestClock]:
        """Give this Queue, in this process, a clock that moves only when
        told to (``advance()``, ``set()``); it starts at ``start`` (an eta
        form), else now."""
        self._check_open("clock()")
        if self._clock is not None:
            raise RuntimeError(f"{self.path} has a test clock already")
        # From whole microseconds, so that the datetimes it gives (which
        # hold no finer time) name its times exactly.
        clock = TestClock(self, round(time.time(), 6) if start is None
                          else _eta_time(start, "start"))
        self._clock, self._store.clock = clock, clock.time
        try:
            yield clock
        finally:
            self._clock, self._store.clock = None, time.time
            _Signal.of(self.path).notify()  # workers see the real time

    def drain(self, queues: Sequence[str] | None = None, *, until: Any = None,
              max_steps: int = 100_000, raise_errors: bool = False,
              schedules: bool = True) -> dict[str, int]:
        """Run every ready job of these queue names (None: all) here, one
        step at a time, until none is ready; with ``until`` (inside
        ``clock()``), move the clock there, running what comes due on the
        way in time order (with ``schedules``, their slots too, as a
        worker of this process fires them).  Returns this call's counts:
        done, failed, cancelled, steps, and waiting (at the end)."""
        if isinstance(queues, str):
            queues = [queues]
        names = None if queues is None else [
            _check_name("queue name", name) for name in queues]
        _check_int("max_steps", max_steps, 1)
        return _drain_queue(self, names, until, max_steps, bool(raise_errors),
                            bool(schedules))

    @contextlib.contextmanager
    def eager(self) -> Iterator[Queue]:
        """In the block, delay() on this Queue in this thread stores the
        job and runs it to its end (or to a wait) before returning."""
        me = threading.get_ident()
        outer = me in self._eager
        self._eager.add(me)
        try:
            yield self
        finally:
            if not outer:
                self._eager.discard(me)

    def enqueued(self, task: Any = None, **match: Any) -> list[Job]:
        """The unfinished jobs, oldest first, of ``task`` (a task function
        or a stored name; None: any) whose first call's arguments match
        ``match`` (parameter names of the task)."""
        name = _task_name(task)
        if match and name is not None and name in _PROCESS.tasks:
            fn = _PROCESS.tasks[name]
            unknown = set(match) - set(fn._signature.parameters)
            if unknown:
                raise TypeError(f"task {name!r} has no parameter "
                                f"{sorted(unknown)[0]!r}")
        wanted = {key: _roundtrip(value, key) for key, value in match.items()}
        rows = self._store.read(_SQL_SELECT_ENQUEUED, {"name": name})
        return [Job(self, job_id) for job_id, current, call in rows
                if not wanted or _call_matches(call, wanted)]

    def _enqueue(self, call: Task, countdown: float | None = None,
                 eta: Any = None, priority: int | None = None,
                 queue: str | None = None, key: str | None = None,
                 expires: Any = None, deadline: Any = None) -> Job:
        if call._wait is not None:
            if countdown is not None or eta is not None:
                raise TypeError(f"{call!r} waits already: give after()/at() "
                                f"or countdown/eta, not both")
            kind, value = call._wait
            countdown, eta = (value, None) if kind == _AFTER else (None,
                                                                   value)
            call = call._waiting(None)
        row = self._job_row(call, countdown, eta, priority, queue, key,
                            (expires, deadline))
        items = getattr(self._batch, "items", None)
        if items is not None:
            job = Job(self, None)
            items.append((row, job))
            return job
        if key is None and row.limits is None:
            job_id = self._store.insert(_SQL_INSERT_CHECKED, row)
        else:
            job_id = self._store.write(lambda conn: _insert(conn, row))
        _Signal.of(self.path).notify()
        if self._eager and threading.get_ident() in self._eager:
            _Inline(self, None).run_job(job_id)
        return Job(self, job_id)

    def _job_row(self, call: Task, countdown: Any, eta: Any, priority: Any,
                 queue: Any, key: Any, limits: tuple = (None, None)
                 ) -> _NewJob:
        """Validate a call and its options into the row to insert;
        ``limits`` are apply_async's ``expires`` and ``deadline``."""
        own = call.function
        text = _encode(call, "", self.max_payload)
        if own.percent is not None or own.description is not None:
            # They see the arguments as a worker will, decoded from JSON.
            call = Task._from_json(_parse(text))
        fn = call._options(own)
        now = self._store.clock()
        start = _start_time(countdown, eta, now)
        if limits != (None, None) or fn.job_timeout is not None:
            limits = _time_limits(*limits, fn.job_timeout, now, start)
        if priority is not None:
            _check_int("priority", priority, *_INT64)
        if queue is not None:
            _check_name("queue", queue)
        if key is not None:
            _check_name("key", key)
        row = (_NewJob if limits == (None, None) else _LimitedJob)(
            call.name, text,
            _storable_text(call._description(own)),
            fn.queue if queue is None else queue,
            fn.priority if priority is None else priority,
            key, call.percent() if call._then else own._percent_of(
                call.args, call.kwargs), start, start <= now, now)
        if type(row) is _LimitedJob:
            row.limits = limits
        return row


def _task_name(task: Any) -> str | None:
    """The stored name of a task function, a stored name, or None."""
    if task is None or isinstance(task, str):
        return task
    if isinstance(task, TaskFunction):
        return task._stored_name()
    raise TypeError(f"enqueued() takes a task function or a stored task "
                    f"name, got {task!r}")


def _call_matches(text: Any, wanted: dict) -> bool:
    """Whether a stored first call binds ``wanted`` parameters to equal
    values (as stored: JSON forms)."""
    try:
        call = _decode_call(text)
        fn = _PROCESS.tasks.get(call.name)
        if fn is None:
            return False
        bound = fn._signature.bind(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return False  # it cannot run either: not what a test looks for
    bound.apply_defaults()
    arguments = bound.arguments
    return all(key in arguments and _roundtrip(arguments[key], key) == value
               for key, value in wanted.items())


def _insert_many(conn: sqlite3.Connection,
                 rows: list[_NewJob]) -> list[int]:
    """Insert rows in order; runs without a key go in one executemany."""
    ids: list[int] = []
    for keyed, run in itertools.groupby(
            rows, lambda r: r.key is not None or r.limits is not None):
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
    job_id = _execute(conn, _SQL_INSERT_JOB, row).lastrowid
    if row.limits is not None:
        _execute(conn, _SQL_SET_LIMITS, (*row.limits, job_id))
    return job_id


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
    return now if eta is None else max(now, _eta_time(eta))


def _time_limits(expires: Any, deadline: Any, job_timeout: float | None,
                 now: float, start: float) -> tuple[float | None,
                                                    float | None]:
    """A new job's expiry and deadline as unix times (None: none)."""
    if expires is not None:
        if isinstance(expires, _dt.datetime):
            expires = _eta_time(expires, "expires")
        else:
            expires = now + _check_number("expires", expires, -math.inf)
            if expires >= _LAST_START:
                raise ValueError(f"expires must be before "
                                 f"{_LAST_START_TEXT}: give fewer seconds")
        if expires <= start:
            raise ValueError(
                f"expires ({_shown_time(expires)}) must be after the job's start "
                f"({_shown_time(start)}): it would expire before it could run")
    limit = None if deadline is None else _eta_time(deadline, "deadline")
    if job_timeout is not None:
        limit = min(now + job_timeout, math.inf if limit is None else limit)
    if limit is not None and limit <= start:
        why = ("it is already past" if limit <= now
               else "the job would fail before it starts")
        raise ValueError(f"the deadline ({_shown_time(limit)}) must be after the "
                         f"job's start ({_shown_time(start)}): {why}")
    return expires, limit


def _shown_time(timestamp: float) -> str:
    """A unix time for a message: ISO 8601, or the number if no datetime
    can hold it."""
    try:
        return _iso(timestamp)
    except ValueError:
        return f"{timestamp:g}"


def _eta_time(eta: Any, what: str = "eta") -> float:
    """An eta form as a unix time: an aware datetime, a naive one read as
    local time, or a unix timestamp; TypeError or ValueError if not."""
    if isinstance(eta, _dt.datetime):
        try:
            start = eta.timestamp()  # naive: local time
        except (OverflowError, ValueError, OSError):
            if eta.utcoffset() is not None:
                raise  # aware: not a range problem
            # Naive, near year 1 or 9999: local time is out of range.
            start = -math.inf if eta.year < 5000 else math.inf
    elif isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"{what} must be a datetime or a unix timestamp, "
                        f"got {eta!r}")
    else:
        start = _check_number(what, eta, -math.inf)
    if start >= _LAST_START:
        raise ValueError(f"{what} must be before {_LAST_START_TEXT}, got "
                         f"{eta!r}: give an earlier time")
    return max(start, -_LAST_START)


def default_queue() -> Queue:
    """The Queue behind module-level @task: $LITEQ_DB, else ./liteq.db."""
    queue = _PROCESS.default_queue
    if queue is not None:
        return queue
    with _PROCESS.lock:
        if _PROCESS.default_queue is None:
            _PROCESS.default_queue = Queue(
                os.environ.get("LITEQ_DB") or _DEFAULT_DB)
        return _PROCESS.default_queue


def configure(path: str | os.PathLike, **options: Any) -> Queue:
    """Point the default Queue at ``path`` (before it is first used)."""
    queue = Queue(path, **options)
    with _PROCESS.lock:
        old = _PROCESS.default_queue
        if old is not None and old._store._connections:
            if old.path != queue.path:
                raise RuntimeError(
                    f"the default queue is already in use at {old.path}; "
                    f"call configure() before the first delay()")
        _PROCESS.default_queue = queue
    return queue


# ---------------------------------------------------------------------------
# 8. Schedules: cron, slots, declarations and firing
# ---------------------------------------------------------------------------

# A schedule is one row of liteq_schedules: the call it fires, its spec
# (JSON: see _schedule_spec) and its next slot.  A worker fires what came
# due in its claim transaction (see _Claims.fire): it inserts the jobs and
# moves ``next_slot`` past ``now`` in that one transaction, so a slot fires
# at most once, whoever fires it, and a crash never leaves a slot fired but
# unrecorded.

# Cron follows Vixie cron: five fields, names for months and weekdays,
# 7 also Sunday, "a/s" meaning "a-max/s", and the day rule: when both day
# fields are restricted a day matches if either does, where a field that
# begins with "*" (even "*/2") counts as unrestricted.  Slots are computed
# in local wall time and then placed on the timeline.  A fixed hour field
# (no "*", no "/") names wall times: one in a spring-forward gap fires at
# the end of the gap, one in a repeated hour fires at its first
# occurrence.  Otherwise the slots are the real instants whose wall time
# matches: none in a gap, both occurrences in a repeated hour.

_CRON_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG",
                "SEP", "OCT", "NOV", "DEC")
_CRON_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (name, low, high, names whose index + low is their value)
_CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _CRON_MONTHS),
    ("day of week", 0, 7, _CRON_DAYS),
)
_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_CRON_PART = re.compile(r"(\*|\w+)(?:-(\w+))?(?:/(\w+))?\Z", re.ASCII)
_CRON_LONGEST_MONTH = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_CRON_EPOCH = _dt.datetime(1970, 1, 1)
_CRON_DAY = _dt.timedelta(days=1)
_CRON_MINUTE = _dt.timedelta(minutes=1)
_CRON_YEARS = 500  # a valid expression fires within ~40 years; a guard
_EVERY_RATIO = 2.0 ** 50  # after / every beyond this: slots lose precision
# Callable (in hints only) is liteq's ``from typing import Callable``.


class _Cron:
    """A parsed five-field cron expression."""

    def __init__(self, expr: str) -> None:
        if not isinstance(expr, str):
            raise TypeError(f"a cron expression must be a str, not "
                            f"{type(expr).__name__}")
        self.text = expr.strip()
        fields = _cron_fields(self.text)
        sets = [_cron_field(self.text, i, f) for i, f in enumerate(fields)]
        (self._minutes, self._hours, self._doms, self._months,
         dows) = (tuple(sorted(s)) for s in sets)
        self._dows = frozenset(d % 7 for d in dows)
        self._dom_star = fields[2].startswith("*")
        self._dow_star = fields[4].startswith("*")
        self.fixed_hour = "*" not in fields[1] and "/" not in fields[1]
        _cron_check_days(self.text, fields, self._doms, self._months,
                         self._dom_star or self._dow_star)
        self._dom_set = frozenset(self._doms)
        self._per_day = len(self._hours) * len(self._minutes)

    def __repr__(self) -> str:
        return f"_Cron({self.text!r})"

    def matches(self, local: _dt.datetime) -> bool:
        """Whether a local wall time matches (seconds ignored)."""
        return (local.minute in self._minutes and local.hour in self._hours
                and local.month in self._months
                and self._day_ok(local.year, local.month, local.day))

    def _date_ok(self, date: _dt.date) -> bool:
        """Whether the month and the day rule match."""
        return date.month in self._months and \
            self._day_ok(date.year, date.month, date.day)

    def _day_ok(self, year: int, month: int, day: int) -> bool:
        """The day rule (Vixie): OR when both day fields restrict."""
        dom = day in self._dom_set
        dow = (calendar.weekday(year, month, day) + 1) % 7 in self._dows
        if self._dom_star or self._dow_star:
            return dom and dow
        return dom or dow


def _cron_fields(text: str) -> list[str]:
    """The five fields of an expression, aliases expanded."""
    if text.startswith("@"):
        alias = _CRON_ALIASES.get(text.lower())
        if alias is None:
            why = ("@reboot is not a periodic schedule"
                   if text.lower() == "@reboot" else
                   f"unknown alias {text!r} (known: "
                   f"{', '.join(_CRON_ALIASES)})")
            raise ValueError(f"cron {text!r}: {why}")
        text = alias
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron {text!r}: five fields are needed (minute, hour, day of "
            f"month, month, day of week), not {len(fields)}")
    return fields


def _cron_field(text: str, index: int, field: str) -> set[int]:
    """The values of one field, checked against its range."""
    name = _CRON_FIELDS[index][0]
    where = f"cron {text!r}: {name} field {field!r}"
    values: set[int] = set()
    for part in field.split(","):
        at = where if part == field else f"{where}, part {part!r}"
        values.update(_cron_part(at, part, index))
    return values


def _cron_part(at: str, part: str, index: int) -> range:
    """The values of one comma-separated part: *, a, a-b, with /step."""
    _, low, high, names = _CRON_FIELDS[index]
    m = _CRON_PART.match(part)
    if m is None:
        raise ValueError(f"{at} is not a number, a range or '*'")
    first, last, step = m.groups()
    if first == "*":
        if last is not None:
            raise ValueError(f"{at}: '*' cannot start a range")
        return range(low, high + 1, _cron_step(at, step))
    start = _cron_value(at, part, first, index)
    if last is not None:
        stop = _cron_value(at, part, last, index)
    else:
        stop = high if step is not None else start  # Vixie: a/s is a-max/s
    if start > stop:
        raise ValueError(f"{at}: the range {start}-{stop} runs backwards")
    return range(start, stop + 1, _cron_step(at, step))


def _cron_value(at: str, part: str, token: str, index: int) -> int:
    """One number or name of a field."""
    _, low, high, names = _CRON_FIELDS[index]
    if token.upper() in names:
        return names.index(token.upper()) + low
    if not token.isdigit():
        kind = f"a number or a name ({names[0]}-{names[-1]})" if names \
            else "a number"
        raise ValueError(f"{at}: {token!r} is not {kind}")
    digits = token.lstrip("0") or "0"
    value = int(digits) if len(digits) <= 6 else high + 1
    if not low <= value <= high:
        said = at if token == part else f"{at}: {token}"
        raise ValueError(f"{said} is out of range {low}-{high}")
    return value


def _cron_step(at: str, step: str | None) -> int:
    """The step after '/', 1 without one."""
    if step is None:
        return 1
    if not step.isdigit():
        raise ValueError(f"{at}: the step {step!r} is not a number")
    digits = step.lstrip("0")
    if not digits:
        raise ValueError(f"{at}: the step must be at least 1")
    return int(digits) if len(digits) <= 9 else 10 ** 9


def _cron_check_days(text: str, fields: list[str], doms: tuple[int, ...],
                     months: tuple[int, ...], and_rule: bool) -> None:
    """Refuse day-of-month and month fields that never meet.

    Under the OR rule the weekdays occur in every month; under the AND
    rule each valid (month, day) falls on every weekday in some year, so
    only the days of month against the months matter."""
    if not and_rule:
        return
    if any(d <= _CRON_LONGEST_MONTH[m] for m in months for d in doms):
        return
    names = [calendar.month_name[m] for m in months]
    said = names[0] if len(names) == 1 else \
        f"{', '.join(names[:-1])} or {names[-1]}"
    raise ValueError(f"cron {text!r}: day of month field {fields[2]!r} "
                     f"never occurs in {said} (month field {fields[3]!r})")


def _zone(name: str) -> _dt.tzinfo:
    """The time zone of an IANA name ("UTC", "Europe/London", ...)."""
    if not isinstance(name, str):
        raise TypeError(f"a time zone name must be a str, not "
                        f"{type(name).__name__}")
    try:
        return zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError) as exc:  # NotFound is a KeyError
        if name == "UTC":  # no tz database (Windows without tzdata)
            return _dt.timezone.utc
        reason = str(exc).strip("'\"") or type(exc).__name__
        raise ValueError(f"unknown time zone {name!r}: {reason}") from None


# Cron slots.  Every matching wall time w gives the instants S(w): one
# for an ordinary time, the transition for a gap time under a fixed hour
# (none otherwise), the first or both occurrences of a repeated time.
# min S(w) never decreases as w grows, so the first slot after `after`
# is found by walking the matching wall times from a little before the
# wall time of `after` (a repeated hour ahead starts it earlier) until
# one's first instant is past `after`, keeping any second occurrence
# that comes first.


def _next_cron_slot(cron: _Cron, zone: _dt.tzinfo, after: float) -> float:
    """The first slot of `cron` in `zone` strictly after unix `after`."""
    best = math.inf
    wall = _cron_wall_start(zone, after)
    limit = wall.year + _CRON_YEARS
    while True:
        wall = _cron_next_wall(cron, wall, limit)
        slots = _cron_instants(zone, wall, cron.fixed_hour)
        if slots and slots[0] >= best:
            return best
        if slots and slots[0] > after:
            return slots[0]
        if len(slots) == 2 and slots[1] > after:
            best = min(best, slots[1])
        wall += _CRON_MINUTE


def _cron_offset(zone: _dt.tzinfo, t: float) -> _dt.timedelta:
    """The UTC offset of `zone` at unix time t."""
    offset = _dt.datetime.fromtimestamp(t, zone).utcoffset()
    return offset if offset is not None else _dt.timedelta(0)


def _cron_wall_start(zone: _dt.tzinfo, after: float) -> _dt.datetime:
    """A whole-minute wall time no later than any slot past `after`.

    Within a fall-back's size before it, the repeated wall times, passed
    once already, come round again: start from the offset after it.  With
    no smaller offset ahead, the wall time of `after` itself is past."""
    now = _cron_offset(zone, after)
    back = now - _cron_offset(zone, after + 86400.0)
    offset = now
    if back > _dt.timedelta(0):
        offset = min(now, _cron_offset(zone, after + back.total_seconds()))
    minutes = math.floor((after + offset.total_seconds()) / 60.0)
    return _CRON_EPOCH + _dt.timedelta(minutes=minutes + (offset == now))


def _cron_next_wall(cron: _Cron, wall: _dt.datetime,
                    limit: int) -> _dt.datetime:
    """The first matching whole-minute wall time at or after `wall`."""
    while True:
        if wall.year > limit:
            raise ValueError(f"cron {cron.text!r} has no slot within "
                             f"{_CRON_YEARS} years")
        ahead = _cron_skip(cron, wall)
        if ahead is None:
            return wall
        wall = ahead


def _cron_skip(cron: _Cron, wall: _dt.datetime) -> _dt.datetime | None:
    """None if `wall` matches, else a later wall time that may."""
    year, month, day = wall.year, wall.month, wall.day
    if month not in cron._months:
        later = [m for m in cron._months if m > month]
        if later:
            return _dt.datetime(year, later[0], 1)
        return _dt.datetime(year + 1, cron._months[0], 1)
    if not cron._day_ok(year, month, day):
        return _cron_next_day(cron, year, month, day)
    return _cron_skip_time(cron, wall)


def _cron_skip_time(cron: _Cron,
                    wall: _dt.datetime) -> _dt.datetime | None:
    """_cron_skip within a matching day: the hour and the minute."""
    hours = [h for h in cron._hours if h >= wall.hour]
    if hours and hours[0] == wall.hour:
        minutes = [m for m in cron._minutes if m >= wall.minute]
        if minutes:
            return None if minutes[0] == wall.minute else \
                wall.replace(minute=minutes[0])
        hours = hours[1:]
    if hours:
        return wall.replace(hour=hours[0], minute=cron._minutes[0])
    return _cron_next_day(cron, wall.year, wall.month, wall.day)


def _cron_next_day(cron: _Cron, year: int, month: int,
                   day: int) -> _dt.datetime:
    """00:00 of the next matching day of the month after `day`, else the
    first of the next month."""
    for later in range(day + 1, calendar.monthrange(year, month)[1] + 1):
        if cron._day_ok(year, month, later):
            return _dt.datetime(year, month, later)
    if month == 12:
        return _dt.datetime(year + 1, 1, 1)
    return _dt.datetime(year, month + 1, 1)


def _cron_instants(zone: _dt.tzinfo, wall: _dt.datetime,
                   fixed: bool) -> tuple[float, ...]:
    """The slot instants of one matching wall time, in time order.

    PEP 495: fold=0 and fold=1 agree for an ordinary time; for a
    repeated time fold=0 is the earlier instant; for a time in a gap
    fold=0 comes out later (the offset before the change)."""
    first = wall.replace(tzinfo=zone).timestamp()
    second = wall.replace(tzinfo=zone, fold=1).timestamp()
    if first == second:
        return (first,)
    if first < second:  # a repeated wall time
        return (first,) if fixed else (first, second)
    return (_cron_gap_end(zone, second, first),) if fixed else ()


def _cron_gap_end(zone: _dt.tzinfo, before: float, after: float) -> float:
    """The transition between `before` (old offset) and `after` (new):
    the first instant after the gap (tz transitions are whole seconds)."""
    old = _cron_offset(zone, before)
    low, high = math.floor(before), math.ceil(after)
    while high - low > 1:
        mid = (low + high) // 2
        if _cron_offset(zone, mid) == old:
            low = mid
        else:
            high = mid
    return float(high)


# Every-N-seconds slots: the multiples of `every` since the epoch.


def _every_index(every: float, after: float) -> int:
    """The least k with k * every > after."""
    if not (every > 0 and math.isfinite(every)):
        raise ValueError(f"every must be a positive number of seconds, "
                         f"not {every!r}")
    if not math.isfinite(after) or abs(after) / every > _EVERY_RATIO:
        raise ValueError(f"every={every!r} is too fine for the time "
                         f"{after!r}")
    k = math.floor(after / every) + 1
    while k * every <= after:
        k += 1
    while (k - 1) * every > after:
        k -= 1
    return k


def _next_every_slot(every: float, after: float) -> float:
    """The least multiple of `every` strictly after `after`."""
    return _every_index(every, after) * every


# Catch-up: the slots of a range, at most the last `limit` of them, with
# the count of the rest, without stepping through millions of slots.


def _slots_between(next_slot: Callable[[float], float], start: float,
                   end: float, limit: int, every: float | None = None,
                   count: Callable[[float, float], int] | None = None,
                   ) -> tuple[list[float], int]:
    """(slots, skipped): the last `limit` slots s with start < s <= end,
    oldest first, and how many earlier ones were left out.

    next_slot(after) -> slot.  every=: slots are multiples of it (counted
    arithmetically); count(start, end) -> the number of slots in the range
    (a bound on the work for long ranges).  A functools.partial of
    _next_every_slot or _next_cron_slot supplies them itself."""
    if limit < 0:
        raise ValueError(f"limit must be at least 0, not {limit!r}")
    every, count = _slot_helpers(next_slot, every, count)
    if every is not None:
        return _every_between(every, start, end, limit)
    if not end > start:
        return [], 0
    if count is None:
        slots = _slots_collect(next_slot, start, end)
        kept = slots[max(0, len(slots) - limit):] if limit else []
        return kept, len(slots) - len(kept)
    total = count(start, end)
    kept = _slots_tail(next_slot, start, end, min(limit, total), total)
    return kept, max(0, total - len(kept))


def _slot_helpers(next_slot: Callable[[float], float],
                  every: float | None,
                  count: Callable[[float, float], int] | None) -> tuple[
                      float | None, Callable[[float, float], int] | None]:
    """The every= and count= to use, from a partial when not given."""
    if not isinstance(next_slot, functools.partial) or next_slot.keywords:
        return every, count
    args = next_slot.args
    if every is None and next_slot.func is _next_every_slot \
            and len(args) == 1:
        every = args[0]
    if count is None and next_slot.func is _next_cron_slot \
            and len(args) == 2:
        count = functools.partial(_count_cron_slots, *args)
    return every, count


def _every_between(every: float, start: float, end: float,
                   limit: int) -> tuple[list[float], int]:
    """_slots_between for multiples of `every`, by arithmetic."""
    first = _every_index(every, start)
    last = _every_index(every, end) - 1
    total = max(0, last - first + 1)
    kept = min(total, limit)
    return [k * every for k in range(last - kept + 1, last + 1)], \
        total - kept


def _slots_collect(next_slot: Callable[[float], float], start: float,
                   end: float) -> list[float]:
    """Every slot s with start < s <= end, by stepping."""
    slots: list[float] = []
    s = next_slot(start)
    while s <= end:
        slots.append(s)
        s = next_slot(s)
    return slots


def _slots_tail(next_slot: Callable[[float], float], start: float,
                end: float, want: int, total: int = 0) -> list[float]:
    """The last `want` of the `total` slots in (start, end]: step through
    windows that end at `end`, from the width that holds `want` slots on
    average (and at least `want` minutes), growing fourfold until one
    holds enough."""
    if want <= 0:
        return []
    span = 60.0 * want
    if total:
        span = max(span, (end - start) * want / total)
    while True:
        low = max(start, end - span)
        slots = _slots_collect(next_slot, low, end)
        if len(slots) >= want or low == start:
            return slots[max(0, len(slots) - want):]
        span *= 4.0


# Counting cron slots day by day: a day with one offset at both its
# midnights holds its matching wall times minus the offset, counted by
# arithmetic; a day with a change hour by hour, and an hour with the
# change in it wall time by wall time.  A gap's wall
# times (fixed hour) fire at its end, which is the first occurrence of
# the wall time G there: count that instant once, and only when G does
# not match (if it does, G counts it).


def _count_cron_slots(cron: _Cron, zone: _dt.tzinfo, start: float,
                      end: float) -> int:
    """The number of slots of `cron` in `zone` with start < s <= end."""
    if not end > start:
        return 0
    day = _cron_wall_start(zone, start).date() - _CRON_DAY
    last = (_CRON_EPOCH + _dt.timedelta(seconds=end)).date() + 2 * _CRON_DAY
    gap_ends: set[float] = set()
    total = 0
    midnight = _cron_midnight(zone, day)
    while day <= last:
        following = _cron_midnight(zone, day + _CRON_DAY)
        if None in (midnight, following) or midnight != following:
            if cron._date_ok(day):
                total += _cron_count_walls(cron, zone, day, start, end,
                                           gap_ends)
        else:
            total += _cron_count_day(cron, day, midnight, start, end)
        day, midnight = day + _CRON_DAY, following
    return total + len(gap_ends)


def _cron_midnight(zone: _dt.tzinfo,
                   day: _dt.date) -> _dt.timedelta | None:
    """The offset at the day's 00:00, None if it is repeated or missing."""
    return _cron_ordinary(zone, _dt.datetime(day.year, day.month, day.day))


def _cron_ordinary(zone: _dt.tzinfo,
                   wall: _dt.datetime) -> _dt.timedelta | None:
    """The offset at a wall time, None if it is repeated or missing."""
    offset = wall.replace(tzinfo=zone).utcoffset()
    return offset if offset == wall.replace(tzinfo=zone, fold=1) \
        .utcoffset() else None


def _cron_count_day(cron: _Cron, day: _dt.date, offset: _dt.timedelta,
                    start: float, end: float) -> int:
    """Slots of a day with one offset throughout, by arithmetic."""
    if not cron._date_ok(day):
        return 0
    zero = (_dt.datetime(day.year, day.month, day.day) - offset
            - _CRON_EPOCH).total_seconds()
    if zero > start and zero + 86340.0 <= end:
        return cron._per_day
    low = math.floor((start - zero) / 60.0) + 1  # first minute past start
    high = math.floor((end - zero) / 60.0)  # last minute up to end
    if high < 0 or low > 1439:
        return 0
    return sum(1 for h in cron._hours for m in cron._minutes
               if low <= h * 60 + m <= high)


def _cron_count_walls(cron: _Cron, zone: _dt.tzinfo, day: _dt.date,
                      start: float, end: float,
                      gap_ends: set[float]) -> int:
    """Slots of a day with a change: an hour with one offset at both ends
    by arithmetic, the others minute by minute."""
    count = 0
    for h in cron._hours:
        top = _dt.datetime(day.year, day.month, day.day, h)
        offset = _cron_ordinary(zone, top)
        if offset is not None and offset == _cron_ordinary(
                zone, top + _dt.timedelta(hours=1)):
            base = (top - offset - _CRON_EPOCH).total_seconds()
            count += sum(1 for m in cron._minutes
                         if start < base + 60 * m <= end)
        else:
            count += _cron_count_hour(cron, zone, top, start, end, gap_ends)
    return count


def _cron_count_hour(cron: _Cron, zone: _dt.tzinfo, top: _dt.datetime,
                     start: float, end: float, gap_ends: set[float]) -> int:
    """Slots of one hour's matching wall times, one by one; the ends of
    gaps whose own wall time does not match go to `gap_ends` instead."""
    count = 0
    for m in cron._minutes:
        wall = top.replace(minute=m)
        for s in _cron_instants(zone, wall, cron.fixed_hour):
            if not start < s <= end:
                continue
            if not _cron_in_gap(zone, wall):
                count += 1
            elif not cron.matches(_cron_wall(zone, s)):
                gap_ends.add(s)
    return count


def _cron_in_gap(zone: _dt.tzinfo, wall: _dt.datetime) -> bool:
    """Whether a wall time is skipped by a spring-forward (PEP 495)."""
    return wall.replace(tzinfo=zone).timestamp() > \
        wall.replace(tzinfo=zone, fold=1).timestamp()


def _cron_wall(zone: _dt.tzinfo, t: float) -> _dt.datetime:
    """The naive wall time of unix time t."""
    return _dt.datetime.fromtimestamp(t, zone).replace(tzinfo=None)


# Schedules ------------------------------------------------------------------

_CATCHUPS = ("latest", "skip", "all")
_OVERLAPS = ("skip", "queue_one", "allow")
_SCHEDULE_DEFAULTS = {
    "tz": "UTC", "catchup": "latest", "window": None, "max_catchup": 100,
    "overlap": "skip", "queue": None, "priority": None, "grace": 60.0,
    "expires": None}


def _schedule_spec(cron: Any, every: Any, options: dict) -> dict:
    """Check a schedule's options; its spec as stored (JSON-ready)."""
    unknown = set(options) - set(_SCHEDULE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown schedule options {sorted(unknown)}; "
                        f"known: {sorted(_SCHEDULE_DEFAULTS)}")
    spec = {**_SCHEDULE_DEFAULTS, **options}
    if (cron is None) == (every is None):
        raise TypeError("give a schedule exactly one of cron= (a cron "
                        "expression) or every= (seconds)")
    spec["cron"], spec["every"] = cron, every
    if cron is not None:
        _Cron(cron)  # ValueError naming the bad field
    else:
        spec["every"] = _check_seconds("every", every, strict=True)
    _zone(spec["tz"])
    for name, allowed in (("catchup", _CATCHUPS), ("overlap", _OVERLAPS)):
        if spec[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                             f"got {spec[name]!r}")
    spec["grace"] = _check_seconds("grace", spec["grace"])
    for name in ("window", "expires"):
        if spec[name] is not None:
            spec[name] = _check_seconds(name, spec[name], strict=True)
    _check_int("max_catchup", spec["max_catchup"], 0, 1_000_000)
    if spec["queue"] is not None:
        _check_name("queue", spec["queue"])
    if spec["priority"] is not None:
        _check_int("priority", spec["priority"], *_INT64)
    return spec


def _spec_text(spec: dict) -> str:
    """A spec in words: the cron expression, or ``every 900s``."""
    return spec["cron"] if spec["cron"] is not None else \
        f"every {spec['every']:g}s"


@functools.lru_cache(maxsize=1024)
def _parsed_cron(text: str) -> _Cron:
    return _Cron(text)


def _next_slot(spec: dict, after: float) -> float:
    """The schedule's first slot strictly after ``after``."""
    return _slot_function(spec)(after)


def _slots_from(spec: dict, first: float, end: float,
                keep: int) -> tuple[list[float], int]:
    """Of the slots from ``first`` (a slot) to before ``end``: the last
    ``keep``, oldest first, and how many others there are (counted, not
    walked: a month of minutes costs no more than a day)."""
    if end <= first:
        return [], 0
    # _slots_between takes (start, end]: move both ends back by less than
    # the gap between two slots (cron slots are a minute apart at least).
    shift = 1e-3 if spec["every"] is None else min(1e-3, spec["every"] / 4)
    return _slots_between(_slot_function(spec), first - shift, end - shift,
                          keep)


def _slot_function(spec: dict) -> Callable[[float], float]:
    """The schedule's next-slot function, in the form _slots_between
    counts without walking."""
    if spec["every"] is not None:
        return functools.partial(_next_every_slot, spec["every"])
    return functools.partial(_next_cron_slot, _parsed_cron(spec["cron"]),
                             _zone(spec["tz"]))


def _first_at(spec: dict, when: float) -> float:
    """The schedule's first slot at or after ``when``."""
    return _next_slot(spec, when - 1e-6)


def _plan_slots(spec: dict, first: float, now: float
                ) -> tuple[list[float], int, float]:
    """The due slots from ``first`` to ``now``: those that fire, oldest
    first; how many are skipped (before the overlap rule); and the next
    slot.  A slot more than ``grace`` past is late: ``catchup`` decides
    which late slots fire; ``window`` drops any slot older than it; the
    slots on time fire.  At most ``max_catchup`` fire (the most recent):
    never a flood."""
    after = _next_slot(spec, now)
    cap = max(spec["max_catchup"], 1)
    kept = first if spec["window"] is None else max(
        first, _first_at(spec, now - spec["window"]))
    on_start = max(kept, _first_at(spec, now - spec["grace"]))
    on_time, skipped = _slots_from(spec, on_start, after, cap)
    keep = {"latest": 0 if on_time else 1, "skip": 0,
            "all": spec["max_catchup"] - len(on_time)}[spec["catchup"]]
    late, passed = _slots_from(spec, kept, on_start, max(keep, 0))
    dropped = _slots_from(spec, first, kept, 0)[1]
    return late + on_time, skipped + passed + dropped, after


# Declarations in code ------------------------------------------------------

class _Declared:
    """A schedule declared in code (liteq.periodic): fired by the workers
    of the processes that declare it."""

    def __init__(self, name: str, fn: TaskFunction, call: Task,
                 spec: dict) -> None:
        self.name, self.fn, self.call, self.spec = name, fn, call, spec

    def text(self) -> str:
        return _encode(self.call, "the scheduled call", 2**20)


def periodic(cron: str | None = None, *, every: float | None = None,
             name: str | None = None, args: Sequence = (),
             kwargs: dict | None = None, **options: Any) -> Callable:
    """Declare a schedule for a task: ``@periodic("0 3 * * *")`` above
    ``@task``, or ``periodic(every=900, name=...)(task_function)``.

    Options: tz, catchup ("latest", "skip", "all"), window, max_catchup,
    overlap ("skip", "queue_one", "allow"), queue, priority, grace,
    expires.  Workers of this process fire it (see Worker(schedules=)).
    """
    spec = _schedule_spec(cron, every, options)
    if name is not None:
        _check_name("schedule name", name)
    if not isinstance(args, (list, tuple)) or not isinstance(
            kwargs or {}, dict):
        raise TypeError("periodic() takes args as a list or tuple and "
                        "kwargs as a dict")

    def declare(fn: Any) -> Any:
        if not isinstance(fn, TaskFunction):
            raise TypeError(f"periodic() declares a schedule for a task: "
                            f"put @periodic above @task, got {fn!r}")
        call = fn(*args, **(kwargs or {}))  # TypeError if they do not fit
        found = _Declared(name or fn._stored_name(), fn, call, spec)
        found.text()  # JSON, within max_payload
        with _PROCESS.lock:
            _PROCESS.schedules[found.name] = found
        return fn

    return declare


def _declare_all(queue: Queue) -> _Firing:
    """Store the schedules this process declares for ``queue`` (as a
    worker does when it starts); what it may fire."""
    declared = _declarations(queue)

    def body(conn: sqlite3.Connection) -> None:
        now = queue._store.clock()
        for found in declared:
            _upsert_schedule(conn, now, found.name, found.text(),
                             _resolved(found.spec, found.call), "code")

    if declared:
        queue._store.write(body)
    return _Firing([found.name for found in declared])


def _declarations(queue: Queue) -> list[_Declared]:
    """The schedules this process declares whose jobs go to ``queue``."""
    with _PROCESS.lock:
        found = list(_PROCESS.schedules.values())
    return [d for d in found if (d.call._home() or queue).path == queue.path]


# Storing and firing ---------------------------------------------------------

def _upsert_schedule(conn: sqlite3.Connection, now: float, name: str,
                     call: str, spec: dict, origin: str) -> None:
    """Store a schedule, or update it.  A changed spec starts after now
    and after its last slot: no slot fires twice, none is replayed."""
    text = json.dumps(spec, sort_keys=True)
    row = _execute(conn, _SQL_SELECT_SCHEDULE, (name,)).fetchone()
    if row is None:
        _execute(conn, _SQL_INSERT_SCHEDULE, {
            "name": name, "call": call, "spec": text, "origin": origin,
            "next": _next_slot(spec, now), "now": now})
        return
    old_call, old_spec, old_origin, next_slot, last_slot = row
    if origin == "api" and old_origin == "code":
        raise ValueError(f"schedule name {name!r} is declared in code "
                         f"(liteq.periodic): give q.schedule() another name")
    if (old_call, old_spec, old_origin) == (call, text, origin):
        return
    if old_spec != text:
        if old_origin == origin == "code":
            _warn_once(f"schedule {name} {text}", (
                f"schedule {name!r} changes from {old_spec} to {text}: "
                f"workers declare it differently; the last to start wins"))
        since = max(now, last_slot if _time_or_none(last_slot)
                    and last_slot is not None else now)
        next_slot = _next_slot(spec, since)
    _execute(conn, _SQL_UPDATE_SCHEDULE, {
        "name": name, "call": call, "spec": text, "origin": origin,
        "next": next_slot, "now": now})


def _schedule_dict(row: tuple) -> dict:
    """A schedule row as Queue.schedules() gives it.  What a row changed
    outside liteq holds that liteq cannot read is None, and
    ``unreadable`` says why."""
    (name, call, spec, origin, next_slot, last_slot, last_job, status,
     skipped, paused) = row
    out = {"name": _text_or_shown(name), "origin": _text_or_shown(origin),
           "task": None, "spec": None, "cron": None, "every": None,
           "tz": None, "next": None, "next_local": None, "last": None,
           "last_job": last_job if type(last_job) is int else None,
           "last_status": status if status in _STATUSES else None,
           "skipped": skipped if type(skipped) is int else None,
           "paused": bool(paused)}
    try:
        out["next"], out["last"] = _iso(next_slot), _iso(last_slot)
        out["task"] = _decode_call(call).name
        spec = json.loads(spec)
        out.update({key: spec[key] for key in (
            "cron", "every", "tz", "catchup", "overlap", "grace", "window",
            "max_catchup", "expires", "queue", "priority")})
        out["spec"] = _spec_text(spec)
        out["next_local"] = _dt.datetime.fromtimestamp(
            next_slot, _zone(spec["tz"])).isoformat()
    except (ValueError, TypeError, LookupError, ArithmeticError,
            RecursionError) as exc:
        out["unreadable"] = f"{type(exc).__name__}: {exc}"[:300]
    if not isinstance(name, str) or isinstance(name, _BadText):
        out.setdefault("unreadable", "name is not text")
    return out


def _text_or_shown(value: Any) -> str:
    """Text for JSON: a value that is not (a BLOB, a number) as shown."""
    if type(value) is str:
        return value
    if isinstance(value, bytes):
        return f"x'{value.hex()}'"
    return str(value)


def _resolved(spec: dict, call: Task) -> dict:
    """A spec with the queue name, priority and description its jobs
    take, read from the task where it is registered: a process that
    fires the schedule need not know the task."""
    fn = _PROCESS.tasks.get(call.name)
    options = call._options(fn) if fn is not None else None
    spec = dict(spec)
    if spec["queue"] is None:
        spec["queue"] = options.queue if options else _DEFAULT_NAME
    if spec["priority"] is None:
        spec["priority"] = options.priority if options else 0
    spec["description"] = _storable_text(
        call._description(fn) if fn else call.name)
    return spec


def _fired_row(call_text: str, spec: dict, now: float) -> _NewJob:
    """The job a schedule fires, as delay() would store it now."""
    call = _decode_call(call_text)
    return _NewJob(call.name, call_text, spec["description"],
                   spec["queue"], spec["priority"], None, call.percent(),
                   now, True, now)


class _Firing:
    """What a worker may fire, and the statements that fire it: the
    schedules stored by q.schedule(), and those its process declares."""

    def __init__(self, declared: list[str]) -> None:
        #: The declared names, bound as :s0, :s1 ... in the statements.
        self.params = {f"s{i}": name for i, name in enumerate(declared)}
        names = ", ".join(f":{key}" for key in self.params)
        mine = f"origin = 'api' OR name IN ({names})" if declared \
            else "origin = 'api'"
        self.select_due = _SQL_SELECT_DUE_SCHEDULES.format(mine)
        #: Added to _NEXT_DUE: when the next slot of ours is (and, for
        #: drain(), the next one after a time).
        self.next_due = _NEXT_SCHEDULE_SLOT.format(mine)
        self.next_due_after = _NEXT_SCHEDULE_SLOT_AFTER.format(mine)
        self._reported: set[str] = set()

    def fire(self, conn: sqlite3.Connection, now: float) -> None:
        """Fire every due slot of ours; a schedule liteq cannot read is
        paused, and logged once."""
        for name, call, spec_text, first, last_job in _execute(
                conn, self.select_due, {"now": now, **self.params}
        ).fetchall():
            try:
                spec = json.loads(spec_text)
                slots, skipped, after = _plan_slots(spec, first, now)
                self._fire_slots(conn, now, name, call, spec, first, slots,
                                 skipped, after, last_job)
            except (ValueError, TypeError, LookupError, ArithmeticError,
                    RecursionError) as exc:  # a row changed outside liteq
                self._pause_broken(conn, now, name, exc)

    def _fire_slots(self, conn: sqlite3.Connection, now: float, name: str,
                    call: str, spec: dict, first: float, slots: list,
                    skipped: int, after: float, last_job: Any) -> None:
        # The slots of one round (catch-up included) pass the overlap rule
        # together, against the run before them; "queue_one" lets the
        # newest of them wait, alone.
        fired = None
        if slots and not _may_fire(conn, spec["overlap"], last_job):
            slots, skipped = [], skipped + len(slots)
        elif len(slots) > 1 and spec["overlap"] == "queue_one":
            slots, skipped = slots[-1:], skipped + len(slots) - 1
        for slot in slots:
            last_job = _insert_fired(conn, call, spec, now, slot)
            fired = slot
        _execute(conn, _SQL_ADVANCE_SCHEDULE, {
            "name": name, "old": first, "next": after, "now": now,
            "last_slot": fired, "last_job": last_job, "skipped": skipped})

    def _pause_broken(self, conn: sqlite3.Connection, now: float, name: str,
                      exc: Exception) -> None:
        if name not in self._reported:
            self._reported.add(name)
            logger.error("schedule %r cannot fire (%s: %s): paused; correct"
                         " it (q.schedule(), or restart the workers that "
                         "declare it), then resume it (liteq resume-schedule"
                         " NAME), or unschedule it", name,
                         type(exc).__name__, exc)
        _execute(conn, _SQL_PAUSE_SCHEDULE, {"name": name, "paused": 1,
                                             "now": now})


def _may_fire(conn: sqlite3.Connection, overlap: str, last_job: Any) -> bool:
    """Whether the overlap rule lets the next run fire: "skip" while the
    last run is unfinished, "queue_one" while it has not started."""
    if overlap == "allow" or last_job is None:
        return True
    row = _execute(conn, _SQL_LAST_RUN, (last_job,)).fetchone()
    if row is None:
        return True  # purged: finished
    unfinished, unstarted = row
    return not (unstarted if overlap == "queue_one" else unfinished)


def _insert_fired(conn: sqlite3.Connection, call: str, spec: dict,
                  now: float, slot: float) -> int:
    job_id = _insert(conn, _fired_row(call, spec, now))
    expires = None if spec["expires"] is None else now + spec["expires"]
    _execute(conn, _SQL_SET_FIRED, (slot, expires, job_id))
    return job_id


# ---------------------------------------------------------------------------
# 9. Worker: steps, outcomes, and the statements a worker sends
# ---------------------------------------------------------------------------
#
# How the parts fit:
#
#   Worker            validation, start/stop, run_forever, run_once
#   _WorkerThread     one thread's holdings and its loop (run_once(now))
#   _Claims           every statement a worker sends; rules plug in here
#   _run_step         decode, bind, call and encode one step
#   _Step, _Outcome   one claimed step, and how it ended
#   _Housekeeper      the one background thread: leases, rescues, chores
#   _Lead, _Bell, _WalWatch, _Fault, _Bugs   (section 10)
#
# Threads: a Worker runs ``threads`` _WorkerThreads and one _Housekeeper.
# Locks, in the order they are taken: _WorkerThread.writing, then
# _WorkerThread.lock; the _Housekeeper's condition and _Fault's lock are
# never held while another is taken.


class _Tuning:
    """How a worker paces itself: one object, which a test replaces whole.

    Durations are seconds; ``hold``, ``probe`` and ``follow_wait`` are
    store-clock seconds (they compare with stored times), the rest are
    measured on the pacing clock (time.monotonic).
    """

    fast = 0.002  # a step shorter than this is short
    streak = 8  # short steps in a row before a thread defers writes
    batch = 32  # steps claimed at once, and outcomes written at once
    group_age = 0.01  # an outcome waits at most this long to be written
    rescue = 0.05  # a deferred step running this long is shown running
    cancel_look = 0.002  # between looks for cancels of steps claimed ahead
    hold = 2.0  # the lease of a step claimed ahead and not started
    probe = 0.05  # between sweeps for things that came due, while busy
    idle_max = 1.0  # the longest idle wait without any wake-up
    poll = 0.005  # between looks at data_version where inotify is missing
    wake_gap = 0.001  # another process's commits wake a thread this often
    settle_max = 0.064  # the last look after them (see _bell_wait)
    # Several workers on one file (see _Lead): a follower claims when a
    # job waited follow_wait, or when follow_load wait; it looks again
    # every follow_look, and once it helps, it helps for follow_wait.
    follow_wait, follow_load, follow_look = 0.5, 1000, 0.05
    stop_grace = 3.0  # a stopping thread retries its last writes this long
    unknown_look = 5.0  # a job of an unknown task is looked at this often
    chores = 1.0  # between checks of the file and of the WAL's size
    purge_every = 3600.0  # between purges, with Worker(keep=...)
    inotify = True  # watch the -wal file where the system can

    def __init__(self, **changes: float) -> None:
        for name, value in changes.items():
            if not hasattr(_Tuning, name):
                raise TypeError(f"no such tuning: {name!r}")
            setattr(self, name, value)


# A step's state: claimed ahead, not started; running with its start not
# yet written; shown (its start written: observers see it run); ended (its
# outcome kept, to be written).
_AHEAD, _HIDDEN, _SHOWN, _ENDED = "ahead", "hidden", "shown", "ended"


class _Step:
    """One claimed step: what a thread needs to run it and record it.

    ``lease`` is the lease now written for it (``_Tuning.hold`` until its
    start is written, then its task's); ``renewed`` the pacing-clock time
    it was last written; ``after`` the outcome of the step before it, when
    this one was claimed by continuing in place (then its claim is written
    with that outcome).
    """

    __slots__ = ("id", "current", "call", "token", "attempt", "number",
                 "failures", "priority", "expires", "deadline", "ready",
                 "limits", "lease", "renewed", "started", "began", "state",
                 "long", "after", "lost_logged")

    def __init__(self, row: tuple, ready: int | None,
                 limits: tuple[float, int], lease: float, state: str,
                 renewed: float) -> None:
        # expires: only while the job's first step has not started.
        (self.id, self.current, self.call, self.token, attempts, steps,
         self.failures, self.priority, self.expires, self.deadline) = row
        self.attempt, self.number = attempts + 1, steps + 1
        self.ready, self.limits = ready, limits
        self.lease, self.state, self.renewed = lease, state, renewed
        self.started: float | None = None  # store-clock start
        self.began = 0.0  # pacing-clock start
        self.long = False  # the housekeeper saw it run long
        self.after: _Outcome | None = None
        self.lost_logged = False

    def confirmed(self) -> bool:
        """Whether its claim is written (so its lease may be renewed)."""
        return self.after is None or self.after.ok is True

    def refused(self) -> bool:
        """Whether the outcome that claimed it was refused: then its token
        may be another worker's, and nothing may be written for it."""
        return self.after is not None and self.after.ok is False

    def follow(self, outcome: _Outcome) -> _Step:
        """The job's next step, claimed again by this thread at once."""
        nxt = _Step((self.id, outcome.current, outcome.text, self.token + 1,
                     0, self.number, 0, self.priority, None, self.deadline),
                    None, self.limits, self.lease, _AHEAD, self.renewed)
        nxt.after = outcome
        outcome.follow = nxt
        return nxt


class _Outcome:
    """How a step ended, to be written under its claim's token.

    kind: 'continue' (text is the next call; ``wait`` its wait, if any),
    'continue_here' (the same, and this thread runs the next step),
    'done' (text is the result), 'retry' (a retryable error), 'fail' (a
    final error), 'snooze' (run again in ``delay`` seconds), 'expired'
    or 'overdue' (not run: out of time), or 'release'.  ``exc`` is the
    exception a task raised.  ``ok`` is None until written, then whether
    it was; ``refusal`` says why it was not ('cancelled', 'finished',
    'expired', 'deadline exceeded' or 'lease lost').
    """

    __slots__ = ("step", "kind", "text", "current", "percent", "error",
                 "retries", "delay", "wait", "exc", "ended", "at", "follow",
                 "ok", "refusal")

    def __init__(self, step: _Step, kind: str, text: str | None = None,
                 current: str | None = None, percent: float | None = None,
                 error: str | None = None, retries: int = 0,
                 delay: float = 0.0, ended: float = 0.0) -> None:
        self.step, self.kind, self.text = step, kind, text
        self.current, self.percent, self.error = current, percent, error
        self.retries, self.delay, self.ended = retries, delay, ended
        self.wait: tuple[str, float] | None = None
        self.exc: BaseException | None = None
        self.at: float | None = None  # store-clock end (``ended``: pacing)
        self.follow: _Step | None = None  # see _Step.follow
        self.ok: bool | None = None
        self.refusal: str | None = None


# Running one step -----------------------------------------------------------


def _run_step(step: _Step, queue: Queue) -> _Outcome:
    """Decode, bind, call and encode one claimed step (no transaction is
    open); ``current_job()`` is its job while the function runs."""
    try:
        call = _decode_call(step.call)
    except Exception as exc:  # a row no liteq wrote: fail the job only
        return _malformed_step(step, exc)
    fn = _PROCESS.tasks.get(call.name)
    if fn is None:  # never run: it waits for a worker that knows it
        return _Outcome(step, "unknown", current=call.name,
                        error=_unknown_task(call.name))
    try:
        args, kwargs = fn._bind_stored(call.args, call.kwargs)
    except TypeError as exc:  # the task's signature changed since
        return _step_refused(step, str(exc))
    except Exception as exc:
        return _malformed_step(step, exc)
    _PROCESS.current.job = _CurrentJob(queue, step.id, step.number,
                                       step.attempt, step.token)
    try:
        value = fn.__wrapped__(*args, **kwargs)
    except KeyboardInterrupt:
        return _Outcome(step, "release")
    except BaseException:  # SystemExit too: it fails this step only
        return _failed_step(step, fn, traceback.format_exc())
    finally:
        _PROCESS.current.job = None
    return _finished_step(step, call, value, queue.max_payload)


def _out_of_time(step: _Step, now: float) -> _Outcome | None:
    """The outcome of a claimed step that must not run: its job expired
    before its first step started, or is past its deadline."""
    if step.expires is not None and step.expires <= now:
        return _Outcome(step, "expired",
                        error=f"expired at {_shown_time(step.expires)}")
    if step.deadline is not None and step.deadline <= now:
        return _Outcome(step, "overdue", error=_overdue(step.deadline))
    return None


def _overdue(deadline: float) -> str:
    return f"deadline exceeded at {_shown_time(deadline)}"


def _unknown_task(name: str) -> str:
    modules = sorted({fn.__module__ for fn in _PROCESS.tasks.values()
                      if fn.name != _CHAIN_NAME})
    return (f"unknown task {name!r}: not registered in this worker (its "
            f"tasks come from {', '.join(modules) or 'no module'}); deploy "
            f"the module that defines it to every worker serving this "
            f"queue name, or give it name={name!r}")


def _step_refused(step: _Step, error: str) -> _Outcome:
    """Fail the job without running its step: retrying cannot help."""
    logger.error("job %d: %s", step.id, error)
    return _Outcome(step, "fail", error=error)


def _malformed_step(step: _Step, exc: Exception) -> _Outcome:
    # _decode_call's ValueError names where the call is wrong; any other
    # error in reading a row is named by its type.
    problem = (str(exc) if type(exc) is ValueError
               else f"{type(exc).__name__}: {exc}")
    error = _malformed_row(step.id, problem)
    logger.error("%s", error)
    return _Outcome(step, "fail", error=error)


def _malformed_row(job_id: int, problem: str) -> str:
    """The error of a job whose stored row liteq cannot have written."""
    return f"stored row of job {job_id} is malformed: {problem}"


def _failed_step(step: _Step, fn: TaskFunction, error: str) -> _Outcome:
    """The outcome of a step whose function raised; called in the except
    clause, so the exception is sys.exc_info()'s."""
    exc = sys.exc_info()[1]
    if not _worth_retrying(fn, exc):
        outcome = _Outcome(step, "fail", error=error)
    else:
        retry = step.failures + 1
        # The exponent is capped: past it the delay is retry_max_delay.
        delay = min(fn.retry_delay * 2.0 ** min(retry - 1, 64),
                    fn.retry_max_delay)
        if fn.retry_jitter:  # full jitter, added: never sooner
            delay += random.uniform(0.0, delay)
        outcome = _Outcome(step, "retry", error=error, retries=fn.retries,
                           delay=delay)
    outcome.exc = exc
    return outcome


def _worth_retrying(fn: TaskFunction, exc: BaseException | None) -> bool:
    """Whether a task's options let this error be retried."""
    if isinstance(exc, Permanent) or isinstance(exc, fn.dont_retry):
        return False
    return fn.retry_on is None or isinstance(exc, fn.retry_on)


def _finished_step(step: _Step, call: Task, value: Any,
                   limit: int) -> _Outcome:
    if type(value) is _Snooze:
        return _Outcome(step, "snooze", delay=value.seconds)
    try:
        follow = _advance(call, value)
        if follow is None:
            return _Outcome(step, "done", _encode(value, "result", limit))
        wait = follow._wait
        if wait is not None:  # stored as the job's wake time instead
            follow = follow._waiting(None)
        text = _encode(follow, "continuation", limit)
        fn = _PROCESS.tasks.get(follow.name)
        if follow._then or (fn is not None and fn.percent is not None):
            follow = deserialize_task(_parse(text))  # as stored
        percent = follow.percent()
    except Exception as exc:  # e.g. a value whose methods raise
        problem = (str(exc) if isinstance(exc, (TypeError, ValueError))
                   else f"{type(exc).__name__}: {exc}")
        error = f"task {call.name!r} returned a value liteq cannot " \
                f"store: {problem}"
        return _Outcome(step, "fail", error=error)
    outcome = _Outcome(step, "continue", text, follow.name, percent)
    outcome.wait = wait
    return outcome


def _task_limits(current: str) -> tuple[float, int]:
    """The lease and max_lost of the task a stored call names."""
    fn = _PROCESS.tasks.get(current)
    if fn is None:
        return _TASK_DEFAULTS["lease"], _TASK_DEFAULTS["max_lost"]
    return fn.lease, fn.max_lost


# Rows changed outside liteq ------------------------------------------------
#
# liteq writes every row itself; a column holding a value of another type
# (edited in the sqlite3 shell, another program) would make the claim or a
# sweep fail for every job of the queue.  What the worker reads is checked
# where it reads it, and such a row is quarantined: failed, with an error
# naming the column, and taken out of line (see _Claims.quarantine).

_MAX_COUNT = 2**62  # beyond it, a count + 1 may not fit back in SQLite

# What the worker reads of a row: each column with what it must hold.
_CLAIMED = (("id", "integer"), ("current", "text"), ("call", "text"),
            ("token", "integer"), ("attempts", "count"), ("steps", "count"),
            ("failures", "count"), ("priority", "integer"),
            ("expires", "a number or NULL"), ("deadline", "a number or NULL"))
_CLAIMED_STARTED = _CLAIMED + (("ready", "cleared"),)
_IN_LINE = (("id", "integer"), ("priority", "integer"), ("ready", "integer"))
_DUE = (("id", "integer"), ("current", "text"), ("worker", "text or NULL"),
        ("lost", "count"), ("max_lost", "count"))
_TIMER = (("id", "integer"), ("timer", "a number"))
_EXPIRES = (("id", "integer"), ("expires", "a number"))
_DEADLINE = (("id", "integer"), ("deadline", "a number"))

_WANTED = {"integer": "an integer", "count": "an integer", "text": "text",
           "text or NULL": "text or NULL", "a number": "a number",
           "a number or NULL": "a number or NULL", "cleared": "an integer"}


def _claimed_sound(row: tuple) -> bool:
    """Whether a row _SQL_CLAIM returned holds what liteq writes: the
    claim's quick check of _CLAIMED (_row_problem says what is wrong)."""
    current, call, token, attempts, steps, failures, priority = row[1:8]
    return ((row[8] is None and row[9] is None or _time_or_none(row[8])
             and _time_or_none(row[9]))
            and type(current) is str and type(call) is str
            and type(token) is int and type(priority) is int
            and type(attempts) is int and type(steps) is int
            and type(failures) is int and 0 <= attempts <= _MAX_COUNT
            and 0 <= steps <= _MAX_COUNT and 0 <= failures <= _MAX_COUNT)


def _time_or_none(value: Any) -> bool:
    return value is None or type(value) in (int, float) and not (
        math.isnan(value))


def _row_problem(row: tuple, columns: tuple) -> str | None:
    """What is wrong with a row the worker read, naming the column; None
    if each column holds what liteq writes there."""
    for value, (column, kind) in zip(row, columns):
        if kind == "text":
            ok = type(value) is str  # not a _BadText
        elif kind == "text or NULL":
            ok = value is None or type(value) is str
        elif kind == "a number":
            ok = type(value) in (int, float)
        elif kind == "a number or NULL":
            ok = _time_or_none(value)
        elif kind == "cleared":  # see _SQL_CLAIM_START
            ok = value is None
        else:
            ok = type(value) is int
        if ok and kind == "count" and not 0 <= value <= _MAX_COUNT:
            return (f"column {column} holds {value}, not an integer from 0 "
                    f"to 2**62")
        if ok:
            continue
        if isinstance(value, _BadText):
            return f"column {column} holds text that is not valid UTF-8"
        shown = ("NULL" if value is None else "a BLOB"
                 if isinstance(value, bytes) else f"{value!r:.60}")
        return f"column {column} holds {shown}, not {_WANTED[kind]}"
    return None


def _wake_time(wait: tuple[str, float], now: float) -> float:
    """When a delayed continuation wakes, written at store time ``now``."""
    kind, value = wait
    return min(now + value if kind == _AFTER else value, _LAST_START)


def _errors_after(conn: sqlite3.Connection, job_id: int,
                  error: str | None) -> str:
    """A job's ``errors`` with the last line of ``error`` added: the JSON
    list of its current step's last _ERRORS_KEPT error lines."""
    row = _execute(conn, _SQL_SELECT_ERRORS, (job_id,)).fetchone()
    try:
        errors = json.loads(row[0]) if row and type(row[0]) is str else []
    except (ValueError, RecursionError):
        errors = []  # changed outside liteq: start again
    if not (type(errors) is list and all(type(e) is str for e in errors)):
        errors = []
    errors.append(_error_line(error))
    return _dumps(errors[-_ERRORS_KEPT:])


#: Which _Claims method writes each kind of _Outcome.
_WRITERS = {"continue": "_continued", "continue_here": "_continued",
            "done": "_done", "fail": "_failed", "retry": "_failed",
            "snooze": "_snoozed", "unknown": "unknown",
            "expired": "_out_of_time_held", "overdue": "_out_of_time_held",
            "release": "_released"}


def _earliest(rows: list) -> float | None:
    """The least of one-column rows that hold a time, if any."""
    times = [row[0] for row in rows if type(row[0]) in (int, float)]
    return min(times) if times else None


# The statements a worker sends -------------------------------------------


class _Claims:
    """Every statement a worker sends, each a method that takes a
    connection and returns what it found.

    Two places are meant to grow.  ``sweeps`` are the things that come
    due with time, each a method ``(self, conn, now) -> statuses`` of the
    jobs it finished (those it quarantined are counted in
    ``quarantined`` instead), run by ``sweep`` in the claim transaction;
    what comes due next is read by ``next_due``.  ``rules`` decide whether a job in
    line may start now, each ``(conn, now, line) -> line`` keeping the
    rows that may; the claim runs them between reading the line and
    taking it (with no rule, one statement claims and starts a step).
    """

    def __init__(self, queues: list[str] | None, identity: str,
                 tuning: _Tuning) -> None:
        #: ``host:pid``, written in ``worker`` while a step runs.
        self.identity = identity
        #: The queue names served (None: all, for drain()).
        self.queues, self.tuning = queues, tuning
        self.rules: tuple[Callable[[Any, float, list], list], ...] = ()
        #: A job id: claim only that job (for eager()).
        self.only: int | None = None
        #: How long a job of a task unknown here waits for another worker.
        self.unknown_grace = _UNKNOWN_GRACE
        #: The schedules this worker fires (None: none; see fire()).
        self.firing: _Firing | None = None
        self._queue_params = {f"q{i}": name
                              for i, name in enumerate(queues or ())}
        self._in_queues = ", ".join(f":{key}" for key in self._queue_params)
        #: How many rows this worker quarantined (see quarantine()).
        self.quarantined = 0
        # Guards quarantined and _reported: threads share these claims.
        self._lock = threading.Lock()
        self._reported: set[tuple[int, str]] = set()

    # Rows changed outside liteq ---------------------------------------------

    def quarantine(self, conn: sqlite3.Connection, now: float, job_id: int,
                   problem: str) -> None:
        """Fail a job whose row liteq cannot have written, out of line, with
        an error naming the column; logged once at ERROR (a transaction
        that is tried again quarantines it again, silently)."""
        error = _malformed_row(job_id, problem)
        with self._lock:
            self.quarantined += 1
            first = (job_id, problem) not in self._reported
            self._reported.add((job_id, problem))
        if first:
            logger.error("%s; the job failed", error)
        _execute(conn, _SQL_QUARANTINE, {"id": job_id, "error": error,
                                         "now": now})

    def _sound(self, conn: sqlite3.Connection, now: float, rows: list,
               columns: tuple) -> list:
        """The rows that hold what liteq writes; the others quarantined."""
        sound = []
        for row in rows:
            problem = _row_problem(row, columns)
            if problem is None:
                sound.append(row)
            else:
                self.quarantine(conn, now, row[0], problem)
        return sound

    # Things that come due -------------------------------------------------

    def sweep(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Run every sweep; the statuses of the jobs they finished."""
        return [status for sweep in self.sweeps
                for status in sweep(self, conn, now)]

    def wake_timers(self, conn: sqlite3.Connection,
                    now: float) -> list[str]:
        """Put jobs whose timer is due in line: etas, waits, retries, and
        claims and leases that expired.  A step counts as lost only if its
        start was written: a claim that lapsed before ran nothing anyone
        saw."""
        finished = []
        for row in _execute(conn, _SQL_SELECT_DUE, (now,)).fetchall():
            problem = _row_problem(row, _DUE)  # ``cancel`` is any truth
            if problem is not None:
                self.quarantine(conn, now, row[0], problem)
                continue
            job_id, current, worker, lost, max_lost, cancel = row
            params = {"id": job_id, "now": now, "lost": 0}
            if worker is not None:
                params["lost"] = 1
                logger.warning("job %d: lease of worker %s expired while "
                               "running %s", job_id, worker, current)
                if cancel or lost + 1 >= max_lost:
                    params["error"] = (f"worker lost {lost + 1} times while "
                                       f"running {current}")
                    _execute(conn, _SQL_LOSE, params)
                    finished.append(_CANCELLED if cancel else _FAILED)
                    continue
            params["ready"] = _next_ready(conn)
            _execute(conn, _SQL_MAKE_READY, params)
        return finished

    def bad_timers(self, conn: sqlite3.Connection,
                   now: float) -> list[str]:
        """Quarantine jobs whose timer is not a number: it would never come
        due, and the next timer would not be a time."""
        for row in _execute(conn, _SQL_SELECT_BAD_TIMERS).fetchall():
            problem = _row_problem(row, _TIMER)
            if problem is not None:  # always, as the query reads
                self.quarantine(conn, now, row[0], problem)
        return []  # counted in ``quarantined``

    def expire(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Cancel the jobs whose first step did not start by their expiry
        (one claimed ahead too: its start is then refused)."""
        return self._out_of_time(conn, now, _SQL_SELECT_EXPIRED, _EXPIRES,
                                 _CANCELLED, "expired at {}")

    def overdue(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Fail the jobs past their deadline with no step executing; an
        executing step's outcome is refused when it ends (see refusal)."""
        return self._out_of_time(conn, now, _SQL_SELECT_OVERDUE, _DEADLINE,
                                 _FAILED, "deadline exceeded at {}")

    def _out_of_time(self, conn: sqlite3.Connection, now: float, sql: str,
                     columns: tuple, status: str, error: str) -> list[str]:
        finished = []
        for job_id, when in self._sound(conn, now, _execute(
                conn, sql, (now,)).fetchall(), columns):
            text = error.format(_shown_time(when))
            _execute(conn, _SQL_EXPIRE, {"id": job_id, "now": now,
                                         "status": status, "error": text})
            logger.info("job %d %s: %s", job_id, status, text)
            finished.append(status)
        return finished

    def fire(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Fire the slots of our schedules that came due (section 8)."""
        if self.firing is not None:
            self.firing.fire(conn, now)
        return []

    def next_due(self, conn: sqlite3.Connection) -> float | None:
        """The store-clock time the next sweep has work, if any: a timer,
        an expiry, a deadline or a slot of ours (a value that is not a
        number is left to the sweeps and the claim, which quarantine its
        job)."""
        return _earliest(_execute(conn, *self._due_sql(_NEXT_DUE, {}))
                         .fetchall())

    def _due_sql(self, sql: str, params: dict) -> tuple[str, dict]:
        """A next-due statement, with our schedules' next slot added."""
        if self.firing is None:
            return sql, params
        return sql + self.firing.next_due, {**params, **self.firing.params}

    # Unbound, so that claims are freed as soon as dropped (no cycle).
    sweeps: tuple[Callable[[Any, Any, float], list], ...] = (
        bad_timers, wake_timers, expire, overdue, fire)

    # Claims -----------------------------------------------------------------

    def claim(self, conn: sqlite3.Connection, now: float, limit: int,
              start: bool, renewed: float) -> list[_Step]:
        """Claim up to ``limit`` steps in line order; with ``start`` (and
        a limit of 1), write the start of the step claimed too.  Rows
        changed outside liteq met on the way are quarantined."""
        if self.only is not None:
            return self.claim_started(conn, now, renewed, _SQL_CLAIM_JOB,
                                      {"id": self.only})
        if (start and not self.rules and self.queues is not None
                and len(self.queues) == 1):
            return self.claim_started(conn, now, renewed, _SQL_CLAIM_START,
                                      {"queue": self.queues[0]})
        lease, steps = self.tuning.hold, []
        while not steps:
            quarantined = self.quarantined
            line = self.line(conn, now, limit)
            for rule in self.rules:
                line = rule(conn, now, line)
            if line:
                sql = _SQL_CLAIM.format(",".join("?" * len(line)))
                rows = {row[0]: row for row in _execute(
                    conn, sql, (now, lease, *(row[0] for row in line))
                ).fetchall() if _claimed_sound(row) or self._sound(
                    conn, now, [row], _CLAIMED)}
                steps = [_Step(rows[job_id], ready,
                               _task_limits(rows[job_id][1]), lease,
                               _AHEAD, renewed)
                         for job_id, _, ready in line if job_id in rows]
            if self.quarantined == quarantined:
                break  # else every row it met was quarantined: look again
        if steps and start:  # a claim of this transaction: never refused
            self.start(conn, steps[0], now)
        return steps

    def line(self, conn: sqlite3.Connection, now: float,
             limit: int) -> list[tuple]:
        """The first ``limit`` ready jobs: (id, priority, place)."""
        if self.queues is None:
            rows = _execute(conn, _SQL_LINE_ALL, (limit,)).fetchall()
        elif len(self.queues) == 1:
            rows = _execute(conn, _SQL_LINE,
                            (self.queues[0], limit)).fetchall()
        else:
            rows = [row for name in self.queues for row in _execute(
                conn, _SQL_LINE, (name, limit)).fetchall()]
        if not all(type(priority) is int and type(ready) is int
                   for _, priority, ready in rows):
            rows = self._sound(conn, now, rows, _IN_LINE)
        if self.queues is None or len(self.queues) == 1:
            return rows
        # The index orders one queue name at a time: merge them here.
        return sorted(rows, key=lambda row: (-row[1], row[2]))[:limit]

    def claim_started(self, conn: sqlite3.Connection, now: float,
                      renewed: float, sql: str,
                      which: dict) -> list[_Step]:
        """Claim the first ready step of our one queue name (or, with
        _SQL_CLAIM_JOB, the job ``which`` names), started, in one
        statement (it writes the default lease; a task with its own is
        adjusted after).  A row changed outside liteq is quarantined, and
        the next one claimed."""
        lease, max_lost = _TASK_DEFAULTS["lease"], _TASK_DEFAULTS["max_lost"]
        while True:
            row = _execute(conn, sql, {
                **which, "now": now, "lease": lease,
                "max_lost": max_lost, "worker": self.identity}).fetchone()
            if row is None:
                return []
            if (row[10] is None and _claimed_sound(row)) or self._sound(
                    conn, now, [row], _CLAIMED_STARTED):
                break
        row = row[:10]
        limits = _task_limits(row[1])
        if limits != (lease, max_lost):
            _execute(conn, _SQL_ADJUST_CLAIM, {
                "id": row[0], "now": now, "lease": limits[0],
                "max_lost": limits[1]})
        step = _Step(row, None, limits, limits[0], _SHOWN, renewed)
        step.started = now
        return [step]

    def start(self, conn: sqlite3.Connection, step: _Step,
              now: float) -> bool:
        """Write that a claimed step starts, with its task's lease; False
        if the claim was lost meanwhile."""
        if step.refused():
            return False
        lease, max_lost = step.limits
        return bool(_execute(conn, _SQL_START, {
            "id": step.id, "token": step.token, "now": now,
            "attempt": step.attempt, "worker": self.identity,
            "started": step.started if step.started is not None else now,
            "lease": lease, "max_lost": max_lost}).rowcount)

    # Outcomes ----------------------------------------------------------------

    def record(self, conn: sqlite3.Connection, outcomes: list[_Outcome],
               now: float) -> list:
        """Write outcomes in order; for each, its row (None if refused).

        Steps of one job that continued in place, one after another, are
        written as one statement.
        """
        rows: list = []
        while len(rows) < len(outcomes):
            first = outcomes[len(rows)]
            run = [first]
            while (run[-1].kind == "continue_here"
                   and len(rows) + len(run) < len(outcomes)
                   and outcomes[len(rows) + len(run)].step
                   is run[-1].follow):
                run.append(outcomes[len(rows) + len(run)])
            if run[-1].kind != "continue_here":
                run = run[:-1] or run  # its end is written on its own
            row = self._record_one(conn, run[-1], now, first.step, len(run))
            ended = run[-1].at if run[-1].at is not None else now
            refusal = None if row is not None else self.refusal(
                conn, first.step, now, ended)
            for outcome in run:
                outcome.ok, outcome.refusal = row is not None, refusal
                rows.append(row)
        return rows

    def _record_one(self, conn: sqlite3.Connection, outcome: _Outcome,
                    now: float, step: _Step, n: int) -> Any:
        if step.refused():
            return None
        params = {"id": step.id, "token": step.token, "now": now,
                  "attempt": step.attempt, "started": step.started, "n": n,
                  "ended": outcome.at if outcome.at is not None else now}
        if outcome.error is not None:
            outcome.error = _storable_text(outcome.error)
        write = getattr(self, _WRITERS[outcome.kind])
        return write(conn, outcome, now, params)

    def _continued(self, conn: sqlite3.Connection, outcome: _Outcome,
                   now: float, params: dict) -> Any:
        params.update(call=outcome.text, current=outcome.current,
                      percent=outcome.percent, eta=now)
        if outcome.kind == "continue_here":
            return _execute(conn, _SQL_CONTINUE_HERE, params).fetchone()
        if outcome.wait is not None:
            wake = _wake_time(outcome.wait, now)
            if wake > now:
                params["eta"] = wake
                return _execute(conn, _SQL_CONTINUE_WAIT, params).fetchone()
        params["ready"] = _next_ready(conn)
        return _execute(conn, _SQL_CONTINUE, params).fetchone()

    def _done(self, conn: sqlite3.Connection, outcome: _Outcome,
              now: float, params: dict) -> Any:
        params["result"] = outcome.text
        done = _execute(conn, _SQL_DONE, params).rowcount
        return (_DONE,) if done else None

    def _failed(self, conn: sqlite3.Connection, outcome: _Outcome,
                now: float, params: dict) -> Any:
        params.update(error=outcome.error, errors=_errors_after(
            conn, outcome.step.id, outcome.error))
        if outcome.kind == "fail":
            return _execute(conn, _SQL_FAIL, params).fetchone()
        params.update(retries=outcome.retries, delay=outcome.delay,
                      ready=_next_ready(conn))
        return _execute(conn, _SQL_FAIL_STEP, params).fetchone()

    def _snoozed(self, conn: sqlite3.Connection, outcome: _Outcome,
                 now: float, params: dict) -> Any:
        params.update(eta=now + outcome.delay, ready=_next_ready(conn))
        return _execute(conn, _SQL_SNOOZE, params).fetchone()

    def _out_of_time_held(self, conn: sqlite3.Connection,
                          outcome: _Outcome, now: float,
                          params: dict) -> Any:
        params.update(error=outcome.error, status=_CANCELLED if
                      outcome.kind == "expired" else _FAILED)
        return _execute(conn, _SQL_EXPIRE_HELD, params).fetchone()

    def _released(self, conn: sqlite3.Connection, outcome: _Outcome,
                  now: float, params: dict) -> Any:
        params["ready"] = _next_ready(conn)
        return _execute(conn, _SQL_RELEASE, params).rowcount or None

    def unknown(self, conn: sqlite3.Connection, outcome: _Outcome,
                now: float, params: dict) -> Any:
        """A step whose task is not registered here: wait for a worker
        that knows it, looking again every ``unknown_look`` seconds, up to
        ``unknown_grace`` from the first time a worker met it; then fail
        (the kind becomes 'fail', for the log)."""
        step = outcome.step
        since = _execute(conn, _SQL_SELECT_UNKNOWN_SINCE,
                         (step.id,)).fetchone()
        since = since[0] if since and _time_or_none(since[0]) else None
        since = now if since is None else min(since, now)
        left = since + self.unknown_grace - now
        if left <= 0:
            outcome.kind = "fail"
            outcome.error += f"; then `liteq retry {step.id}`"
            params.update(error=outcome.error, errors=_errors_after(
                conn, step.id, outcome.error))
            return _execute(conn, _SQL_FAIL, params).fetchone()
        params.update(error=outcome.error, attempts=step.attempt - 1,
                      wake=now + min(left, self.tuning.unknown_look))
        return _execute(conn, _SQL_PARK, params).fetchone()

    def refusal(self, conn: sqlite3.Connection, step: _Step, now: float,
                ended: float) -> str:
        """Why an outcome of ``step`` (which ended at ``ended``) was
        refused.  Past the job's deadline, the step's job fails here (no
        sweep touches a job while a step of it executes)."""
        row = _execute(conn, _SQL_SELECT_REFUSAL, (step.id,)).fetchone()
        if row is None:
            return "finished"  # and purged since
        status, cancel, token, deadline, error, ready, finished = row
        if token != step.token or ready is not None:
            return "lease lost"
        if finished is None and _time_or_none(deadline) and (
                deadline is not None and deadline <= ended):
            _execute(conn, _SQL_EXPIRE_HELD, {
                "id": step.id, "token": step.token, "now": now,
                "status": _FAILED, "error": _overdue(deadline)})
            return "deadline exceeded"
        if status == _CANCELLED and cancel:
            return "cancelled"
        if type(error) is str and error.startswith(("expired at",
                                                    "deadline exceeded")):
            return error.partition(" at ")[0]  # by a sweep
        return "lease lost"

    def release(self, conn: sqlite3.Connection, steps: list[_Step]) -> None:
        """Put claimed steps back in line unrun, at their old places."""
        for step in steps:
            ready = step.ready
            if ready is None:  # a next step kept here: to the end
                ready = _next_ready(conn)
            _execute(conn, _SQL_RELEASE, {"id": step.id, "ready": ready,
                                          "token": step.token})

    def renew(self, conn: sqlite3.Connection, steps: list[_Step],
              now: float) -> list[bool]:
        """Extend the leases of held steps; for each, whether it held."""
        return [bool(_execute(conn, _SQL_SET_LEASE, {
            "id": step.id, "token": step.token,
            "until": now + step.lease}).rowcount) for step in steps]

    # Looks, outside any transaction ----------------------------------------

    def gone(self, conn: sqlite3.Connection, ids: list[int]) -> set[int]:
        """Which of these jobs were cancelled or finished."""
        sql = _SQL_SELECT_GONE.format(",".join("?" * len(ids)))
        return {row[0] for row in _execute(conn, sql, ids).fetchall()}

    def higher_ready(self, conn: sqlite3.Connection, priority: int) -> bool:
        """Whether a ready job of ours has at least this priority."""
        return any(_execute(conn, _SQL_HIGHER_READY, (name, priority))
                   .fetchone() for name in self.queues)

    def in_sight(self, conn: sqlite3.Connection,
                 now: float) -> tuple[bool, float | None]:
        """Whether a claim could find work (or a schema to report), and
        when the next thing comes due (see next_due)."""
        rows = _execute(conn, *self._due_sql(_SQL_WORK_IN_SIGHT.format(
            self._in_queues), self._queue_params)).fetchall()
        due = _earliest(rows[1:])
        return bool(rows[0][0]) or (due is not None and due <= now), due

    def loads(self, conn: sqlite3.Connection) -> list[tuple]:
        """How many jobs wait per queue name (up to follow_load) and since
        when the first one waits; a due timer counts as a job waiting
        since then (an eta, or the lease of a frozen worker)."""
        loads = [_execute(conn, _SQL_LINE_LOAD, {
            "queue": name, "limit": self.tuning.follow_load}).fetchone()
            for name in self.queues]
        loads.append((1, self.next_due(conn)))
        return loads


# ---------------------------------------------------------------------------
# 10. Worker threads: the loop of each thread, the housekeeper
# ---------------------------------------------------------------------------

#
# A thread claims steps in line order, one at a time, and writes each
# step's start before running it and its outcome with the next claim.
# After ``streak`` steps in a row shorter than ``fast`` it defers: it
# claims up to ``batch`` steps, runs them back to back and writes their
# starts and outcomes together, at most ``group_age`` later, with its next
# claim.  A deferred step that runs past ``rescue`` is shown by the
# housekeeper (see rescue()), and the steps claimed behind it go back in
# line.  Of several workers on one file only the lead claims at once (see
# _Lead); a thread of another worker claims when work waits on it.


class _WorkerThread:
    """One worker thread: what it holds, and its loop as ``run_once(now)``.

    It holds steps claimed ahead (``ahead``), the step it runs
    (``running``) and outcomes not yet written (``pending``).
    """

    def __init__(self, crew: _Crew, name: str, solo: bool = False) -> None:
        self.crew, self.name, self.solo = crew, name, solo
        self.tick, self.tuning = crew.tick, crew.tuning
        self.store, self.claims = crew.store, crew.claims
        self.wakeups, self.stopping = crew.wakeups, crew.stopping
        self.lead, self.watch = crew.lead, crew.watch
        # Guards ahead, pending and running against the housekeeper.
        self.lock = threading.Lock()
        # Held while this thread's outcomes are written, by the thread or
        # by a rescue, so they land in order.  Taken before ``lock``.
        self.writing = threading.Lock()
        self.ahead: collections.deque[_Step] = collections.deque()
        self.pending: list[_Outcome] = []
        self.running: _Step | None = None
        # The rest is this thread's own.
        self.bell = _Bell() if self.watch is not None else None
        self.idle = False  # in an idle wait (read by the housekeeper)
        self.streak = 0  # short steps in a row
        self.next_sweep = -math.inf  # store clock: see _claim_in
        self.clear: tuple[float, int, int] = (-math.inf, 0, 0)
        self.looked = -math.inf  # when steps ahead were last checked
        self.helping = -math.inf  # a follower claims freely until then
        self.woken = False  # the last wait may have been another process
        self.seen_local = self.wakeups.local
        self.generation = self.wakeups.generation
        self.listen = True  # whether the next wait listens for commits
        # After another process's writes: whether they go on, and the
        # gap to the next look once they stop (see _bell_wait).
        self.streaming = False
        self.settle: float | None = None
        self.data_version: int | None = None
        self.stop_by: float | None = None
        self.fault = crew.write_fault
        self.poke = crew.housekeeper.poke
        self.bugs = crew.bugs
        self.progress = _ProgressLog()
        #: Counts the statuses of the jobs finished (drain() sets it).
        self.tally: collections.Counter | None = None

    # The loop ----------------------------------------------------------------

    def run(self) -> None:
        """The thread's body: turn until the worker stops.

        An error no turn expects is logged (with its traceback the first
        time, see _Fault) and the thread goes on.  If even that fails, the
        thread cannot go on: it stops the whole worker, which then exits
        with status 1 (``run_forever`` raises), never dies silently.
        """
        try:
            while True:
                try:
                    pause = self.run_once(self.store.clock())
                    if pause is None:
                        return
                    if pause > 0:
                        self.wait(pause)
                except Exception as exc:  # a bug of ours: the thread goes on
                    self.stopping.wait(self.crew.bugs.met(exc))
        except BaseException as exc:
            self.crew.die(f"worker thread {self.name} ended: "
                          f"{type(exc).__name__}: {exc}")
        finally:
            if self.bell is not None:
                self.bell.close()

    def run_once(self, now: float) -> float | None:
        """One turn at store-clock time ``now``: run a step, or write and
        claim.  Returns how long to wait before the next turn (0: go on
        at once), or None when the worker stops and nothing is held."""
        self.generation = self.wakeups.generation
        self.listen = True
        try:
            if self.stopping.is_set():
                return self._finish()
            with self.lock:
                step = self.ahead.popleft() if self.ahead else None
            pause = (self._run_ahead(step) if step is not None
                     else self._claim_or_wait(now))
        except SchemaError as exc:
            self.crew.die(str(exc))
            return None  # what it holds is left to its leases
        except Error as exc:  # Busy, StorageError: keep trying
            self.listen = False
            return self.fault.failed(exc)
        except Exception as exc:  # a bug of ours: the thread goes on
            # What it held is dropped (its steps run again after their
            # leases): an outcome that cannot be written would otherwise
            # fail every turn.
            self.listen = False
            with self.lock:
                self.pending = []
            return self.crew.bugs.met(exc)
        if self.bugs.count:
            self.bugs.ok()
        return pause

    def _run_ahead(self, step: _Step) -> float:
        """Run a step claimed ahead: deferred, or after writing its start."""
        if self.may_defer():
            if self._still_wanted(step):
                self.run_step(step)
            return 0.0
        try:
            started, _ = self.write_and_claim(step, claim=False)
        except BaseException:
            with self.lock:
                self.ahead.appendleft(step)  # tried again next turn
            raise
        if self.fault.count:
            self.fault.ok()
        if started is not None:
            self.run_step(started)
        else:
            logger.info("job %d: cancelled or taken back before step %d of "
                        "%s started; not run", step.id, step.number,
                        step.current)
        return 0.0

    def _claim_or_wait(self, now: float) -> float:
        hold = None  # seconds a follower leaves the line to the lead
        if (not self.solo and self.tick() > self.helping
                and not self.lead.take()):
            hold = self._follower_hold(now)
            if hold is None:  # the line needs help: give it for a while
                self.helping = self.tick() + self.tuning.follow_wait
            elif not self.pending:
                self.listen = False  # commits wake the lead, not us
                return hold
        # Woken by another process's commit: look before taking the write
        # lock.  A commit of this process that made work needs no look.
        local = self.wakeups.local
        if hold is None and self.woken and not self.pending \
                and local == self.seen_local:
            found, due = self._in_sight(now)
            if not found:  # a wait another process stored may be sooner
                return min(self.tuning.idle_max, self.tuning.idle_max
                           if due is None else max(due - now, 0.0))
        self.seen_local = local
        started, due = self.write_and_claim(None, claim=hold is None)
        if self.fault.count:
            self.fault.ok()
        self.woken = False
        if started is not None:
            self.run_step(started)
            return 0.0
        if self.ahead:
            return 0.0  # a batch to run deferred
        pause = self.tuning.idle_max if due is None else due - now
        if hold is not None:
            pause = min(pause, hold)
        pause = min(max(pause, 0.0), self.tuning.idle_max)
        # A full idle wait looks before it claims; a due timer does not.
        self.woken = pause >= self.tuning.idle_max
        return pause

    def _finish(self) -> float | None:
        """Write what is held and give back the steps claimed ahead.

        While writes fail, retry for ``stop_grace`` seconds, then leave
        what is held to its leases: a stop never waits on a broken disk.
        """
        with self.lock:
            if not self.pending and not self.ahead:
                return None  # nothing to write
        try:
            self.write_and_claim(None, claim=False)
        except Error as exc:
            if self.stop_by is None:
                self.stop_by = self.tick() + self.tuning.stop_grace
            if self.tick() < self.stop_by:
                self.listen = False
                return min(self.fault.failed(exc), 0.5)
            with self.lock:
                left = len(self.pending) + len(self.ahead)
                self.pending, self.ahead = [], collections.deque()
            self.crew.left_to_leases(left, exc)
        else:
            self.fault.ok()
        return None

    # Running steps -----------------------------------------------------------

    def may_defer(self) -> bool:
        """Whether to run the next step without writing its start first."""
        if self.solo or self.streak < self.tuning.streak:
            return False
        pending = self.pending
        return not pending or (
            len(pending) < self.tuning.batch
            and self.tick() - pending[0].ended < self.tuning.group_age)

    def _still_wanted(self, step: _Step) -> bool:
        """Whether a step claimed ahead may run: not cancelled since.

        A read costs more than a short step, so it looks at most every
        ``cancel_look`` seconds, and then at every step ahead.
        """
        now = self.tick()
        if now - self.looked < self.tuning.cancel_look:
            return True
        ids = [step.id, *(other.id for other in self.ahead)]
        try:
            gone = self.store.query(lambda conn: self.claims.gone(conn, ids))
        except Error:
            return True  # the write that follows meets the error
        self.looked = now
        if gone:
            with self.lock:
                self.ahead = collections.deque(
                    other for other in self.ahead if other.id not in gone)
            for job_id in sorted(gone):
                logger.info("job %d cancelled before its step started",
                            job_id)
        return step.id not in gone

    def run_step(self, step: _Step) -> None:
        """Run a claimed step; keep its outcome for the next write."""
        if step.started is None:
            step.started = self.store.clock()
        step.began = self.tick()
        if step.state == _AHEAD:
            step.state = _HIDDEN
        late = None
        if step.expires is not None or step.deadline is not None:
            late = _out_of_time(step, step.started)
        if late is None and (step.attempt > 1 or step.number == 1) and \
                logger.isEnabledFor(logging.INFO) and \
                step.current in _PROCESS.tasks:  # else it waits, unrun
            logger.info("job %d started: %s (step %d, attempt %d)",
                        step.id, step.current, step.number, step.attempt)
        with self.lock:
            self.running = step
        self.poke(self.tuning.rescue)
        outcome = late or _run_step(step, self.crew.queue)
        outcome.ended = self.tick()
        if step.deadline is not None:
            outcome.at = self.store.clock()
        follow = None
        if outcome.kind == "continue" and self._may_continue_here(
                step, outcome):
            outcome.kind = "continue_here"
            follow = step.follow(outcome)
        short = outcome.ended - step.began < self.tuning.fast
        with self.lock:
            step.state = _ENDED
            self.running = None
            self.pending.append(outcome)
            if follow is not None:
                self.ahead.appendleft(follow)
            self.streak = self.streak + 1 if short else 0
        if outcome.kind == "release":  # KeyboardInterrupt in a task
            logger.warning("job %d: KeyboardInterrupt in %s: step released, "
                           "worker stopping", step.id, step.current)
            self.crew.request_stop()

    def _may_continue_here(self, step: _Step, outcome: _Outcome) -> bool:
        """Whether the job's next step would be this thread's next claim."""
        fn = _PROCESS.tasks.get(outcome.current)
        if (self.solo or self.stopping.is_set() or fn is None
                or outcome.wait is not None
                or (fn.lease, fn.max_lost) != step.limits
                or (step.token + 1) >> _TOKEN_BITS != step.token >> _TOKEN_BITS
                or (self.ahead and any(other.priority >= step.priority
                                       for other in self.ahead))):
            return False
        # The line was clear a moment ago, and nothing of this process
        # joined it since: a job another process delays overtakes at most
        # ``group_age`` of steps later.
        now, generation = self.tick(), self.wakeups.generation
        since, seen, priority = self.clear
        if (now - since < self.tuning.group_age and generation == seen
                and step.priority >= priority):
            return True
        try:
            if self.store.query(lambda conn: self.claims.higher_ready(
                    conn, step.priority)):
                return False
        except Error:
            return False
        self.clear = (now, generation, step.priority)
        return True

    # Looks and waits ---------------------------------------------------------

    def _in_sight(self, now: float) -> tuple[bool, float | None]:
        """Whether a claim could find work, read without the write lock,
        and when the next thing comes due.

        Every commit wakes idle workers; without this look each would
        take the write lock only to find nothing, crowding out producers.
        """
        found = self.store.peek_with(
            lambda conn: self.claims.in_sight(conn, now))
        return (True, None) if found is None else found

    def _follower_hold(self, now: float) -> float | None:
        try:
            loads = self.store.query(self.claims.loads)
        except Error:
            return None  # let the claim meet the error and report it
        return self.lead.hold(loads, now, self.tuning)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds, or until work may be in sight:
        a commit of this process, or (if ``listen``) of another one."""
        if not self.listen:
            self.stopping.wait(timeout)
            return
        self.idle = True
        try:
            if self.bell is None:
                self._poll_wait(timeout)
            else:
                self._bell_wait(timeout)
        finally:
            self.idle = False
        if self.wakeups.generation != self.generation:
            self.woken = self.woken or self.wakeups.local == self.seen_local

    def _bell_wait(self, timeout: float) -> None:
        # While another process's writes go on (``streaming``), look at
        # most every wake_gap, without waking for each write.  A commit's
        # last write to the -wal comes a moment before SQLite publishes
        # it, so once the writes stop, look again at growing gaps
        # (``settle``: doubling up to settle_max), while listening again.
        if self.streaming:
            timeout, listen = min(timeout, self.tuning.wake_gap), False
        elif self.settle is not None:
            timeout, listen = min(timeout, self.settle), True
        else:
            listen = True
        changed = self.bell.wait(self.wakeups, self.generation, timeout,
                                 self.watch, listen)
        if changed:
            self.streaming, self.settle = True, self.tuning.wake_gap
            self.woken = True
            if self.crew.threads > 1:  # the others may be asleep
                self.wakeups.notify(local=False)
        elif self.streaming:
            self.streaming = False
        elif self.settle is not None:
            self.settle *= 2
            if self.settle > self.tuning.settle_max:
                self.settle = None

    def _poll_wait(self, timeout: float) -> None:
        """Without inotify: look at data_version every ``poll`` seconds."""
        deadline = self.tick() + timeout
        while True:
            found = self.store.peek("PRAGMA data_version")
            version = None if found is None else found[0]
            if self.data_version is not None and version != \
                    self.data_version:
                self.data_version, self.woken = version, True
                return
            self.data_version = version
            left = deadline - self.tick()
            if left <= 0 or self.wakeups.generation != self.generation:
                return
            self.wakeups.wait(self.generation, min(left, self.tuning.poll))

    # Writes ------------------------------------------------------------------

    def held(self) -> list[_Step]:
        """Every step whose lease this thread keeps (call under lock)."""
        held = list(self.ahead)
        held += [outcome.step for outcome in self.pending]
        if self.running is not None:
            held.append(self.running)
        return [step for step in held if step.confirmed()]

    def _take(self, release: bool) -> tuple[list[_Outcome], list[_Step]]:
        """Hand over the outcomes to write and, with ``release``, the
        steps claimed ahead, to put back in line (call under lock)."""
        pending, self.pending = self.pending, []
        ahead: list[_Step] = []
        if release:
            ahead, self.ahead = list(self.ahead), collections.deque()
        return pending, ahead

    def _restore(self, pending: list[_Outcome], ahead: list[_Step]) -> None:
        """Take back what _take() handed over when nothing was written."""
        with self.lock:
            self.pending[:0] = pending
            self.ahead.extendleft(reversed(ahead))

    def write_and_claim(
            self, step: _Step | None = None,
            claim: bool = True) -> tuple[_Step | None, float | None]:
        """Write the held outcomes, then start ``step`` or claim more.

        One transaction.  Returns the step to run now, its start written,
        and when the next timer is due.  Claimed steps that will run
        deferred go to ``ahead``.  When the worker stops, the steps
        claimed ahead go back in line.
        """
        with self.writing:
            with self.lock:
                outcomes, release = self._take(self.stopping.is_set())
            try:
                now, rows, started, batch, due, finished = self.store.write(
                    lambda conn: self._write_cycle(conn, outcomes, release,
                                                   step, claim))
            except BaseException:
                self._restore(outcomes, release)
                raise
        if started is not None:
            started.state, started.started = _SHOWN, started.started or now
            started.renewed = self.tick()
        if batch:
            with self.lock:
                self.ahead.extend(batch)
        held = batch + [started] if started else batch
        if held:
            self.poke(min(step.lease for step in held) / 3, period=True)
        self._after_write(outcomes, rows, release, finished)
        return started, due

    def _write_cycle(self, conn: sqlite3.Connection,
                     outcomes: list[_Outcome], release: list[_Step],
                     step: _Step | None, claim: bool) -> tuple:
        now = self.store.clock()
        rows = self.claims.record(conn, outcomes, now)
        self.claims.release(conn, release)
        started = step if step and self.claims.start(conn, step, now) \
            else None
        batch: list[_Step] = []
        due, finished = None, []
        if claim:
            defer = self.may_defer()
            limit = self.tuning.batch if defer else 1
            batch, due, finished = self._claim_in(conn, now, limit, defer)
            if batch:  # as of this claim, nothing in it was cancelled
                self.looked = self.tick()
            if batch and not defer:  # its start is written
                started = batch.pop()
        return now, rows, started, batch, due, finished

    def _claim_in(self, conn: sqlite3.Connection, now: float, limit: int,
                  defer: bool) -> tuple[list[_Step], float | None,
                                        list[str]]:
        """Claim, sweeping what came due first: every ``probe`` seconds
        while busy, and always before finding nothing.  Also returns the
        statuses of the jobs the sweeps finished."""
        claims, renewed = self.claims, self.tick()
        quarantined = claims.quarantined
        swept = now >= self.next_sweep
        finished = claims.sweep(conn, now) if swept else []
        batch = claims.claim(conn, now, limit, not defer, renewed)
        if not batch and not swept:
            finished += claims.sweep(conn, now)
            swept = True
            batch = claims.claim(conn, now, limit, not defer, renewed)
        finished += [_FAILED] * (claims.quarantined - quarantined)
        if swept:
            self.next_sweep = now + self.tuning.probe
        due = None if batch else self.claims.next_due(conn)
        return batch, due, finished

    def _after_write(self, outcomes: list[_Outcome], rows: list,
                     release: list[_Step], finished: list[str]) -> None:
        """Log the outcomes just written and wake who waits for them;
        ``finished``: the statuses of the jobs the sweeps finished."""
        in_line, finished = bool(release), list(finished)
        debug = logger.isEnabledFor(logging.DEBUG)
        for outcome, row in zip(outcomes, rows):
            first_loss = row is None and self.note_lost(outcome.step)
            _log_outcome(outcome, row, first_loss, debug)
            if outcome.kind != "done" or self.progress.tracking:
                self.progress.note(outcome, row)
            status = row[0] if isinstance(row, tuple) else None
            if status in _FINISHED:
                finished.append(status)
            elif row is not None and outcome.kind != "continue_here":
                in_line = True  # another thread may run it
            elif row is None and outcome.refusal == "deadline exceeded":
                finished.append(_FAILED)  # failed by refusal()
        if self.tally is not None:
            self.tally.update(finished)
        if finished:
            self.crew.finished.notify()
        if in_line:
            self.wakeups.notify()

    def rescue(self) -> None:
        """Show a deferred step that runs long; free what waits behind it.

        Called by the housekeeper.  The outcomes before the step are
        written, its start too, and the steps claimed after it go back in
        line, all in one transaction.
        """
        with self.writing:
            with self.lock:
                step = self.running
                if step is None or step.state != _HIDDEN:
                    return
                self.streak = 0
                outcomes, release = self._take(True)

            def body(conn: sqlite3.Connection) -> tuple:
                now = self.store.clock()
                rows = self.claims.record(conn, outcomes, now)
                self.claims.release(conn, release)
                return now, rows, self.claims.start(conn, step, now)

            try:
                now, rows, shown = self.store.write(body)
            except Error as exc:
                self._restore(outcomes, release)
                step.long = False  # the next look tries again
                self.crew.lease_fault.failed(exc)
                return
        self.crew.lease_fault.ok()
        if shown:
            with self.lock:
                if step.state == _HIDDEN:
                    step.state = _SHOWN
            step.lease, step.renewed = step.limits[0], self.tick()
        self._after_write(outcomes, rows, release, [])

    def survey(self, now: float) -> tuple[list[_Step], bool, float]:
        """For the housekeeper at pacing time ``now``: the held steps whose
        lease is due for renewal, whether the running step has just run
        past ``rescue``, and when to look again."""
        due: list[_Step] = []
        wake, rescue = math.inf, self.tuning.rescue
        with self.lock:
            for step in self.held():
                at = step.renewed + step.lease / 3
                if at <= now:
                    due.append(step)
                    at = now + step.lease / 3
                wake = min(wake, at)
            step = self.running
            busy = step is not None or bool(self.ahead or self.pending)
            turned_long = False
            if step is not None and not step.long:
                turned_long = step.long = now - step.began >= rescue
                if not turned_long:
                    wake = min(wake, step.began + rescue)
        if busy:  # look again soon, so that each step need not poke
            wake = min(wake, now + rescue)
        return due, turned_long, wake

    def note_lost(self, step: _Step) -> bool:
        """Mark that ``step`` lost its lease; True the first time, so that
        it is logged once (the thread and the housekeeper both see it)."""
        with self.lock:
            first, step.lost_logged = not step.lost_logged, True
        return first

    def drop_lapsed(self, step: _Step) -> bool:
        """Forget a step claimed ahead whose claim lapsed (another worker
        may hold it now); True if it was still ahead (call under lock)."""
        if step in self.ahead:
            self.ahead.remove(step)
            return True
        return False


class _ProgressLog:
    """When a worker thread last logged the progress line of each job
    whose steps keep going, so that it logs one per ``every`` seconds of
    the pacing clock at most.  It forgets a job when it finishes, and the
    least recently seen ones past ``size`` (their steps went elsewhere)."""

    every = 10.0  # seconds between two progress lines of one job
    size = 1024  # jobs remembered

    def __init__(self) -> None:
        # Guards _jobs: the thread and a rescue (see
        # _WorkerThread.rescue) both log outcomes.
        self._lock = threading.Lock()
        # job id -> (when this thread first ran a step of it, when it
        # last logged its line), on the pacing clock.
        self._jobs: collections.OrderedDict[int, tuple[float, float]] = \
            collections.OrderedDict()

    @property
    def tracking(self) -> bool:
        """Whether any job is remembered (a done outcome may be one)."""
        return bool(self._jobs)

    def note(self, outcome: _Outcome, row: Any) -> None:
        """Log the progress line of a written outcome's job, if due."""
        step = outcome.step
        status = row[0] if isinstance(row, tuple) else None
        if (row is None or status == _CANCELLED
                or outcome.kind not in ("continue", "continue_here")):
            if status != _RUNNING and self._jobs:  # a retry: running
                with self._lock:
                    self._jobs.pop(step.id, None)
            return
        now = outcome.ended
        known = self._jobs.get(step.id)  # a dict read needs no lock
        if known is not None and now - known[1] < self.every:
            return  # the common case: logged or first seen lately
        with self._lock:
            first, last = self._jobs.pop(step.id, (step.began, step.began))
            due = now - last >= self.every
            self._jobs[step.id] = (first, now if due else last)
            if len(self._jobs) > self.size:
                self._jobs.popitem(last=False)
        if not due:
            return
        if outcome.percent is None:
            logger.info("job %d running: step %d of %s (%.0f s)", step.id,
                        step.number + 1, outcome.current, now - first)
        else:
            logger.info("job %d running: step %d of %s, %.0f%% (%.0f s)",
                        step.id, step.number + 1, outcome.current,
                        outcome.percent, now - first)


def _log_refused(outcome: _Outcome, first_loss: bool) -> None:
    """Log why an outcome was refused (a lost lease once per step)."""
    step = outcome.step
    if outcome.refusal == "cancelled":
        logger.info("job %d cancelled while claimed; its outcome was "
                    "discarded", step.id)
    elif outcome.refusal == "finished":
        logger.info("job %d was finished and purged while claimed; its "
                    "outcome was discarded", step.id)
    elif outcome.refusal in ("expired", "deadline exceeded"):
        logger.info("job %d %s while %s ran; its outcome was discarded",
                    step.id, outcome.refusal, step.current)
    elif first_loss:
        logger.warning("job %d: lease lost while running %s (step %d); "
                       "its outcome was discarded", step.id, step.current,
                       step.number)


def _log_outcome(outcome: _Outcome, row: Any, first_loss: bool,
                 debug: bool = True) -> None:
    """Log a written outcome; ``first_loss``: no lost lease of its step
    was logged yet."""
    step = outcome.step
    if row is None:
        _log_refused(outcome, first_loss)
        return
    status = row[0] if isinstance(row, tuple) else None
    if outcome.kind in ("continue", "continue_here") and status != \
            _CANCELLED:
        if debug:
            logger.debug("job %d continued: step %d of %s done, next %s",
                         step.id, step.number, step.current,
                         outcome.current)
    elif outcome.kind in ("expired", "overdue"):
        logger.info("job %d %s: %s; not run", step.id, status,
                    outcome.error)
    elif status == _CANCELLED:
        logger.info("job %d cancelled", step.id)
    else:
        _log_ended(outcome, status)


def _log_ended(outcome: _Outcome, status: str | None) -> None:
    """Log an outcome written that did not continue the job."""
    step = outcome.step
    if outcome.kind == "done":
        logger.info("job %d done", step.id)
    elif outcome.kind == "retry" and status != _FAILED:
        logger.info("job %d retried in %gs: %s", step.id, outcome.delay,
                    _error_line(outcome.error))
    elif outcome.kind in ("retry", "fail"):
        logger.info("job %d failed: %s", step.id, _error_line(outcome.error))
    elif outcome.kind == "snooze":
        logger.info("job %d snoozed for %gs", step.id, outcome.delay)
    elif outcome.kind == "unknown":
        _warn_once(f"unknown task {outcome.current}",
                   f"job {step.id} waits: {outcome.error}.  Jobs of "
                   f"{outcome.current!r} wait for a worker that knows it, "
                   f"each up to this worker's unknown_grace, then fail")


# The housekeeper ------------------------------------------------------------


class _Housekeeper:
    """A Worker's one background thread, keeping a small schedule of
    chores: renew the leases its threads hold (every lease / 3), show
    deferred steps that run long (see _WorkerThread.rescue), hand the lead
    over when every thread runs long, check that the file is still there,
    keep the WAL bounded, and purge old jobs (``keep``)."""

    def __init__(self, crew: _Crew, threads: list[_WorkerThread]) -> None:
        self.crew, self.threads, self.tick = crew, threads, crew.tick
        self.store, self.tuning = crew.store, crew.tuning
        self.fault = crew.lease_fault
        # Guards _wake_at, _again, _period and _stop; notified by poke().
        self._condition = threading.Condition(threading.Lock())
        self._wake_at = math.inf  # when the thread next wakes (pacing)
        self._again = False  # poked while awake: look again at once
        self._period = _TASK_DEFAULTS["lease"] / 3  # the shortest seen
        self._stop = False
        self._thread: threading.Thread | None = None
        # The thread's own.
        self._identity = self.store.identity()
        self._next_chores = self._next_purge = -math.inf
        self._renew_at = -math.inf  # after a failed renewal: its backoff

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="liteq-housekeeper")
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
        Cheap when the thread will look soon enough anyway.
        """
        wake_at = self._wake_at
        if (wake_at == -math.inf or self.tick() + within < wake_at
                or (period and within < self._period)):
            with self._condition:
                if period:
                    self._period = min(self._period, within)
                self._again = True
                self._condition.notify_all()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # it cannot go on: nor can the worker
            self.crew.die(f"the worker's housekeeper ended: "
                          f"{type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while True:
            now = self.tick()
            try:
                wake = now + self.run_once(now)
                self.crew.chore_bugs.ok()
            except Exception as exc:  # a bug of ours: the thread goes on
                self.crew.chore_bugs.met(exc)
                wake = now + 1.0
            with self._condition:
                if self._stop:
                    return
                # Between steps nothing may be held: look again after the
                # shortest period seen rather than sleep for good, so a
                # claim need not wake this thread.
                wake = min(wake, now + self._period)
                if not self._again:
                    self._wake_at = wake
                    self._condition.wait(max(0.0, wake - self.tick()))
                self._again = False
                self._wake_at = -math.inf  # awake: poke() sets _again

    def run_once(self, now: float) -> float:
        """Do the chores due at pacing-clock ``now``; seconds to the next."""
        wake = self._leases_and_rescues(now)
        if now >= self._next_chores:
            self._next_chores = now + self.tuning.chores
            self._check_file()
            self._bound_wal()
        wake = min(wake, self._next_chores)
        if self.crew.keep is not None:
            if now >= self._next_purge:
                self._next_purge = now + self.tuning.purge_every
                self._purge()
            wake = min(wake, self._next_purge)
        return max(0.0, wake - now)

    def _leases_and_rescues(self, now: float) -> float:
        """Renew what is due and rescue long steps; the next time to look."""
        due: list[tuple[_WorkerThread, _Step]] = []
        long: list[_WorkerThread] = []
        wake = math.inf
        for thread in self.threads:
            steps, turned_long, at = thread.survey(now)
            due += [(thread, step) for step in steps]
            if turned_long:
                long.append(thread)
            wake = min(wake, at)
        if due and now >= self._renew_at:
            self._renew(due, now)
        elif due:
            wake = min(wake, self._renew_at)
        for thread in long:
            thread.rescue()
        if long and not any(thread.idle for thread in self.threads):
            self.crew.lead.give()  # no thread left to claim: let go
        return wake

    def _renew(self, due: list[tuple[_WorkerThread, _Step]],
               now: float) -> None:
        steps = [step for _, step in due]
        try:
            held = self.store.write(lambda conn: self.crew.claims.renew(
                conn, steps, self.store.clock()))
        except Error as exc:
            self._renew_at = now + self.fault.failed(exc)
            return
        self.fault.ok()
        for (thread, step), ok in zip(due, held):
            step.renewed = now
            if not ok:
                self._lost(thread, step)

    @staticmethod
    def _lost(thread: _WorkerThread, step: _Step) -> None:
        with thread.lock:
            if thread.drop_lapsed(step):
                logger.info("job %d: claim lapsed before its step started; "
                            "not run here", step.id)
                return
            held = any(other is step for other in thread.held())
        if held and thread.note_lost(step):
            logger.warning("job %d: lease lost while running %s (step %d); "
                           "its outcome will be discarded", step.id,
                           step.current, step.number)

    def _check_file(self) -> None:
        if self.store.identity() != self._identity:
            self.crew.die(f"database file {self.store.path} was deleted "
                       f"or replaced")

    def _bound_wal(self) -> None:
        try:
            size = os.path.getsize(self.store.path + "-wal")
        except OSError:
            return
        if size > _WAL_LIMIT:
            with contextlib.suppress(Error):
                self.store.read("PRAGMA wal_checkpoint(RESTART)")

    def _purge(self) -> None:
        try:
            n = self.crew.queue.purge(self.crew.keep)
        except Error as exc:
            logger.error("purge failed: %s", exc)
            return
        if n:
            logger.info("purged %d finished jobs", n)


# ---------------------------------------------------------------------------
# 11. Worker helpers: faults, the lead, wake-ups
# ---------------------------------------------------------------------------


def _host_pid() -> str:
    """This process as ``host:pid``, read now (a forked child differs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Fault:
    """A failure that may last, logged quietly: at ERROR when it starts,
    then at most once per report period (10 s, doubling up to 5 min) with
    a count, and at WARNING when it ends.  ``failed()`` also gives the
    backoff before the next try.  Several threads may share one."""

    def __init__(self, what: str,
                 tick: Callable[[], float] = time.monotonic) -> None:
        self.what, self.tick = what, tick
        self._lock = threading.Lock()  # guards the fields below
        self.count = 0  # failures in a row
        self._since = self._next_report = 0.0
        self._every = 10.0

    def failed(self, exc: BaseException | None) -> float:
        """Note one failure; seconds to wait before trying again."""
        reason = "an unexpected error" if exc is None else str(exc)
        with self._lock:
            self.count += 1
            count, now = self.count, self.tick()
            if count == 1:
                self._since, self._every = now, 10.0
                self._next_report = now + self._every
                logger.error("%s: %s; retrying", self.what, reason)
            elif now >= self._next_report:
                self._every = min(self._every * 2, 300.0)
                self._next_report = now + self._every
                logger.error("%s: %s (%d failures in %.0fs); still "
                             "retrying", self.what, reason, count,
                             now - self._since)
        return min(0.05 * 2 ** min(count, 6), 2.0) * (
            0.5 + random.random() / 2)

    def ok(self) -> None:
        """Note a success: the end of the failure, if one lasted."""
        if not self.count:
            return
        with self._lock:
            count, self.count = self.count, 0
            if count:
                logger.warning("%s: works again after %d failure(s) in "
                               "%.1fs", self.what, count,
                               self.tick() - self._since)


class _Bugs:
    """Errors of liteq's own that a thread met and went on from.  Each
    kind (type and place) is logged at ERROR with its traceback the first
    time; repeats are counted and reported at most every 10 s (doubling
    up to 5 min), so a bug met on every turn never floods the log.
    ``met()`` gives the backoff before the next turn.  Threads share one.
    """

    def __init__(self, what: str,
                 tick: Callable[[], float] = time.monotonic) -> None:
        self.what, self.tick = what, tick
        self._lock = threading.Lock()  # guards the fields below
        self.count = 0  # met in a row: the backoff grows with it
        self._seen: set[tuple] = set()
        self._repeats = 0  # not reported yet
        self._every, self._next_report = 10.0, -math.inf

    def met(self, exc: BaseException) -> float:
        """Note one error; seconds to wait before going on."""
        frames = traceback.extract_tb(exc.__traceback__)
        kind = (type(exc), frames[-1].filename, frames[-1].lineno) \
            if frames else (type(exc),)
        with self._lock:
            self.count += 1
            count, now = self.count, self.tick()
            first = kind not in self._seen
            if first:
                self._seen.add(kind)
                self._next_report = max(self._next_report, now + 10.0)
            else:
                self._repeats += 1
            report = not first and now >= self._next_report
            if report:
                repeats, self._repeats = self._repeats, 0
                self._next_report = now + self._every
                self._every = min(self._every * 2, 300.0)
        if first:
            logger.error("%s: %s: %s", self.what, type(exc).__name__, exc,
                         exc_info=exc)
        elif report:
            logger.error("%s: %s: %s (%d time(s) since the last report; "
                         "its traceback was logged the first time)",
                         self.what, type(exc).__name__, exc, repeats)
        return min(0.05 * 2 ** min(count, 6), 2.0) * (
            0.5 + random.random() / 2)

    def ok(self) -> None:
        """Note a turn that went well: the backoff starts again."""
        if self.count:
            with self._lock:
                self.count = 0


class _Lead:
    """Which of the workers on one file leads: a lock on ``<db>-lead``.

    The lead claims work as soon as it sees it; the others follow: they
    claim only when the line waits on them (``hold``), so four workers on
    a load one can carry write no more than one.  A lead lets go when all
    its threads run long steps.  The kernel drops the lock of a process
    that dies.  Where flock is missing, or the file cannot be made, every
    worker leads.
    """

    def __init__(self, path: str) -> None:
        self._path = path + "-lead"
        self._lock = threading.Lock()  # guards _fd and held
        self._fd: int | None = None
        self.held = False
        _PROCESS.on_fork(self.forget)  # the parent's lead is not the child's

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

    @staticmethod
    def hold(loads: list[tuple], now: float,
             tuning: _Tuning) -> float | None:
        """The follower policy.  ``loads`` are (jobs waiting, since when
        the first waits) per queue name (see _Claims.loads).  None if the
        line needs this follower now (``follow_load`` jobs wait, or one
        has waited ``follow_wait``), else how long to leave it to the
        lead before looking again."""
        hold = tuning.follow_look
        for count, since in loads:
            # A time that is not a number (a row changed outside liteq)
            # says nothing of how long the line waits.
            if type(since) not in (int, float) or since > now:
                continue
            if count >= tuning.follow_load or (
                    count and now - since >= tuning.follow_wait):
                return None
            if count:
                hold = min(hold, tuning.follow_wait - (now - since))
        return max(hold, 0.001)


def _drain(fd: int) -> bytes:
    """Read what waits in ``fd`` (non-blocking)."""
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class _Bell:
    """A pipe that rings one idle thread out of its select(): _Signal
    rings every bell it holds when this process commits (``interrupt``)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()  # guards _closed against interrupt()
        self._closed = False

    def wait(self, signal_: _Signal, generation: int, timeout: float,
             watch: _WalWatch, listen: bool) -> bool:
        """Wait for ``signal_`` to pass ``generation``, or (with
        ``listen``) another process's commit, or ``timeout``; True if
        another process committed (looked at without waiting if not
        ``listen``)."""
        with signal_.condition:
            signal_.bells.add(self)
        try:
            if signal_.generation == generation and timeout > 0:
                fds = [self._read, watch.fd] if listen else [self._read]
                select.select(fds, [], [], timeout)
        finally:
            with signal_.condition:
                signal_.bells.discard(self)
        _drain(self._read)
        return watch.changed()

    def interrupt(self) -> None:
        # Any thread may ring (see _Signal.notify), even as close() runs.
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: rung
                os.write(self._write, b"x")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._read)
            os.close(self._write)


class _WalWatch:
    """Whether another process committed: a Linux inotify watch on the
    database's ``-wal`` file (every commit writes to it), through ctypes.

    The last connection to close deletes ``-wal`` and the next one makes
    it anew, so the watch also watches the directory for the file's
    creation and re-arms itself on the new file.
    """

    _IN_MODIFY, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x80, 0x100
    _IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR = 0x4000, 0x8000, 0x1000000
    _EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name

    def __init__(self, fd: int, libc: Any, path: str) -> None:
        self.fd, self._libc, self._path = fd, libc, path
        self._name = os.fsencode(os.path.basename(path))
        self._lock = threading.Lock()  # guards _wd
        self._wd: int | None = None

    @classmethod
    def open(cls, path: str) -> _WalWatch | None:
        """Watch ``path``, or None where inotify is unavailable."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            folder = os.fsencode(os.path.dirname(path) or ".")
            if libc.inotify_add_watch(fd, folder, cls._IN_CREATE
                                      | cls._IN_MOVED_TO
                                      | cls._IN_ONLYDIR) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        watch = cls(fd, libc, path)
        watch._arm()
        return watch

    def _arm(self) -> None:
        with self._lock:
            wd = self._libc.inotify_add_watch(
                self.fd, os.fsencode(self._path), self._IN_MODIFY)
            self._wd = wd if wd >= 0 else None  # not there yet: see changed

    def changed(self) -> bool:
        """Read the events that wait, without waiting; True if the file
        was written or made anew."""
        data, changed, rearm = _drain(self.fd), False, False
        offset = 0
        while offset + self._EVENT.size <= len(data):
            wd, mask, _, size = self._EVENT.unpack_from(data, offset)
            name = data[offset + self._EVENT.size:
                        offset + self._EVENT.size + size].rstrip(b"\0")
            offset += self._EVENT.size + size
            if mask & self._IN_Q_OVERFLOW or name == self._name:
                changed = rearm = True
            elif wd == self._wd:
                changed = changed or bool(mask & self._IN_MODIFY)
                rearm = rearm or bool(mask & self._IN_IGNORED)
        if rearm:
            self._arm()
        return changed

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------
# 12. Worker: the class, and what its threads share
# ---------------------------------------------------------------------------


class _NoHousekeeper:
    """The housekeeper of a crew that has none (Worker.run_once, whose one
    step is written before it returns): nothing to renew or rescue."""

    @staticmethod
    def poke(within: float, period: bool = False) -> None:
        pass


_NO_HOUSEKEEPER = _NoHousekeeper()


class _Crew:
    """What the threads of one Worker share: its file and Queue, its
    claims, lead, watch, wake-ups, faults and tuning, the pacing clock
    (``tick``), and the calls back into the Worker."""

    def __init__(self, worker: Worker, stopping: threading.Event,
                 request_stop: Callable[[], None],
                 die: Callable[[str], None],
                 left_to_leases: Callable[[int, Exception], None],
                 lead: _Lead, tick: Callable[[], float]) -> None:
        self.queue, self.store = worker.queue, worker.queue._store
        self.tuning, self.tick = worker.tuning, tick
        self.threads, self.keep = worker.threads, worker.keep
        self.claims = _Claims(worker.queues, _host_pid(), self.tuning)
        self.claims.unknown_grace = worker.unknown_grace
        self.wakeups = _Signal.of(self.queue.path)
        self.finished = _Signal.of(self.queue.path, "finished")
        self.stopping, self.request_stop = stopping, request_stop
        self.die, self.left_to_leases = die, left_to_leases
        self.lead = lead
        self.watch: _WalWatch | None = None  # opened by open_watch()
        path = self.store.path
        self.write_fault = _Fault(f"cannot record steps in {path}", tick)
        self.lease_fault = _Fault(f"cannot write leases in {path}", tick)
        # Bugs of ours, met by a thread (never by a task: see _run_step).
        self.bugs = _Bugs(f"unexpected error in a worker thread on {path} "
                          f"(the steps it held run again after their "
                          f"leases)", tick)
        self.chore_bugs = _Bugs(f"unexpected error in the housekeeper of "
                                f"a worker on {path}", tick)
        self.housekeeper: Any = _NO_HOUSEKEEPER  # see _start_threads
        self.units: list[_WorkerThread] = []  # see _start_threads

    def renew_all(self, until: float) -> None:
        """Renew every lease the threads hold as if it were ``until`` on
        the store clock (a test clock about to move there)."""
        steps = []
        for unit in self.units:
            with unit.lock:
                steps += unit.held()
        if steps:
            self.store.write(lambda conn: self.claims.renew(conn, steps,
                                                            until))

    def open_watch(self) -> None:
        if self.tuning.inotify:
            self.watch = _WalWatch.open(self.store.path + "-wal")

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None


class Worker:
    """Run stored jobs in background threads of this process.

    ``Worker(queue=None, threads=1, queues=None, keep=None,
    unknown_grace=300, schedules=True)``: ``queue`` is the Queue (default: the default
    queue), ``queues`` the queue names to serve (default:
    ``["default"]``), ``keep`` a duration (``"7d"`` or seconds) after which
    finished jobs are purged, ``unknown_grace`` how long (seconds or a
    duration) a job of a task this worker does not know waits for one
    that knows it before it fails, ``schedules`` whether it fires
    periodic schedules.  ``start()`` returns at once; ``stop()``
    lets running steps finish.  No signal handlers.
    """

    def __init__(self, queue: Queue | None = None, threads: int = 1,
                 queues: Sequence[str] | None = None,
                 keep: str | float | None = None,
                 unknown_grace: str | float = _UNKNOWN_GRACE,
                 schedules: bool = True) -> None:
        self.queue = queue if queue is not None else default_queue()
        self.threads = _check_int("threads", threads, 1, 1024)
        if isinstance(queues, str):
            queues = [queues]
        self.queues = [_check_name("queue name", q)
                       for q in (queues or [_DEFAULT_NAME])]
        if isinstance(keep, str):
            keep = _parse_duration(keep)
        self.keep = None if keep is None else _check_number("keep", keep)
        if isinstance(unknown_grace, str):
            unknown_grace = _parse_duration(unknown_grace)
        self.unknown_grace = _check_number("unknown_grace", unknown_grace)
        #: Whether it fires schedules (those of q.schedule(), and those
        #: this process declares with liteq.periodic).
        self.schedules = bool(schedules)
        #: Why the worker stopped by itself (e.g. its file was deleted).
        self.fatal: str | None = None
        #: Steps that a stop left to their leases, as writes failed.
        self.left_to_leases = 0
        self.tuning = _Tuning()
        # Set by stop(): no new claims; idle threads wake at once.
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()  # serialises start() and stop()
        # Guards fatal and left_to_leases: any of its threads may set them.
        self._notes = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._lead = _Lead(self.queue.path)
        self._running: _Crew | None = None

    def __repr__(self) -> str:
        return (f"<Worker {self.queue.path} queues={self.queues} "
                f"threads={self.threads}>")

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> Worker:
        """Start the worker's daemon threads and return at once."""
        with self._lifecycle:
            if self._threads:
                raise RuntimeError("this Worker is already started")
            self._start_threads()
        return self

    def _crew(self, tick: Callable[[], float] = time.monotonic) -> _Crew:
        """A crew for this worker's threads (the seam tests drive)."""
        return _Crew(self, self._stopping, self._request_stop, self._die,
                     self._left, self._lead, tick)

    def _start_threads(self) -> None:
        # _stopping stays set if stop() came first: the threads then end
        # at once, and run_forever() returns.
        self.queue._store.connection()  # open (and check) the file now
        self._warn_unserved()
        self.left_to_leases = 0
        crew = self._running = self._crew()
        if self.schedules:
            crew.claims.firing = _declare_all(self.queue)
        # The watch first, so a thread's first idle wait listens to it.
        crew.open_watch()
        crew.housekeeper = _Housekeeper(crew, [])  # before its threads
        units = [_WorkerThread(crew, f"liteq-worker-{i + 1}")
                 for i in range(self.threads)]
        crew.housekeeper.threads.extend(units)
        crew.units = units
        self.queue._crews.add(crew)  # its test clock renews their leases
        self._threads = [threading.Thread(target=unit.run, daemon=True,
                                          name=unit.name) for unit in units]
        logger.info("worker %s serving %s on %s with %d thread(s)",
                    crew.claims.identity, ", ".join(self.queues),
                    self.queue.path, self.threads)
        for thread in self._threads:
            thread.start()
        crew.housekeeper.start()

    def _warn_unserved(self) -> None:
        """Warn of ready jobs under queue names this worker does not serve:
        `@task(queue="emails")` with a worker of the default name only."""
        try:
            ready = self.queue._store.read(_SQL_READY_QUEUES)
        except Error:
            return  # the threads meet it, and say so
        names = {name for (name,) in ready if isinstance(name, str)}
        unserved = sorted(names - set(self.queues))  # bad rows: not names
        if unserved:
            names = ", ".join(unserved)
            options = " ".join(f"--queue {shlex.quote(name)}"
                               for name in unserved)
            _warn_once(
                f"unserved {self.queue.path} {unserved} {self.queues}",
                f"ready jobs wait under queue name(s) {names}, which this "
                f"worker does not serve (it serves "
                f"{', '.join(self.queues)}): unless another worker serves "
                f"them, add {options} to liteq run (or to "
                f"Worker(queues=...))")

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
            crew = self._running
            if finished and self._threads and crew is not None:
                crew.housekeeper.stop()
                crew.close()
                self.queue._crews.discard(crew)
                self._lead.close()
                self._threads, self._running = [], None
                self._stopping.clear()  # it may be started again
                logger.info("worker %s stopped", crew.claims.identity)
        return finished

    def run_forever(self) -> None:
        """Run in this thread until stop() is called from elsewhere.

        Raises StorageError if the worker had to stop by itself.
        """
        with contextlib.suppress(RuntimeError):  # already started
            self.start()
        # Ends when stop() is called, here or by a stop() elsewhere that
        # also tore the threads down.
        while self._threads and not self._stopping.wait(1.0):
            pass
        self.stop()
        if self.fatal:
            raise StorageError(self.fatal)

    def run_once(self) -> bool:
        """Claim and run one step in this thread; True if one ran."""
        unit = _WorkerThread(self._crew(), "run_once", solo=True)
        started, _ = unit.write_and_claim()
        if started is None:
            return False
        unit.run_step(started)
        unit.write_and_claim(claim=False)
        return True

    def _request_stop(self) -> None:
        self._stopping.set()
        _Signal.of(self.queue.path).notify()

    def _die(self, message: str) -> None:
        with self._notes:  # first: logging may be what fails
            self.fatal = message
        self._request_stop()
        logger.error("worker stopping: %s", message)

    def _left(self, count: int, exc: Exception) -> None:
        with self._notes:
            self.left_to_leases += count
        logger.error("worker stopping without writing %d step(s): %s; "
                     "they run again after their leases", count, exc)


# ---------------------------------------------------------------------------
# 13. Testing helpers: the test clock, drain, eager, using
# ---------------------------------------------------------------------------


class TestClock:
    """A Queue's clock in tests (``with q.clock() as clock:``).

    While it is active, every time liteq reads or stores for its Queue in
    this process comes from it: etas, waits, retries, leases, expiries,
    deadlines.  It moves only when told to: ``advance()`` or ``set()``.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, queue: Queue, now: float) -> None:
        self._queue, self._now = queue, now

    def __repr__(self) -> str:
        return f"<TestClock {_iso(self._now)} of {self._queue.path}>"

    def time(self) -> float:
        """The clock's time as a unix timestamp."""
        return self._now

    def now(self) -> _dt.datetime:
        """The clock's time, an aware UTC datetime."""
        return _utc(self._now)

    def advance(self, seconds: float = 0, minutes: float = 0,
                hours: float = 0, days: float = 0) -> _dt.datetime:
        """Move forward; return the new time."""
        total = sum(_check_number(name, value) * unit for name, value, unit
                    in (("seconds", seconds, 1), ("minutes", minutes, 60),
                        ("hours", hours, 3600), ("days", days, 86400)))
        return self._move(self._now + total)

    def set(self, eta: Any) -> _dt.datetime:
        """Move to ``eta`` (a datetime or a unix timestamp), forward or
        back (as a wall clock may jump); return the new time."""
        return self._move(_eta_time(eta))

    def _move(self, when: float) -> _dt.datetime:
        """Move to ``when``: the leases this process holds on the Queue
        are renewed first, so no step of its own is taken from it; then
        its idle workers wake to look."""
        self._queue._check_open("its clock")
        if self._queue._clock is not self:
            raise RuntimeError("this clock's block has ended")
        if when >= _LAST_START:
            raise ValueError(f"the clock must stay before "
                             f"{_LAST_START_TEXT}")
        for crew in list(self._queue._crews):
            crew.renew_all(when)
        self._now = when
        _Signal.of(self._queue.path).notify()
        return self.now()


class _Inline:
    """Runs steps of a Queue in the calling thread, as a worker of this
    process: Queue.drain() and Queue.eager()."""

    def __init__(self, queue: Queue, names: list[str] | None,
                 schedules: bool = False) -> None:
        worker = Worker(queue, queues=names)
        worker.tuning = _Tuning(inotify=False)
        self.crew = worker._crew()
        self.crew.claims = _Claims(names, self.crew.claims.identity,
                                   worker.tuning)
        self.crew.claims.unknown_grace = worker.unknown_grace
        if schedules:
            self.crew.claims.firing = _declare_all(queue)
        self.unit = _WorkerThread(self.crew, "drain", solo=True)
        #: The statuses of the jobs finished here (see _after_write).
        self.tally = self.unit.tally = collections.Counter()
        self.steps = 0

    def run_ready(self, max_steps: int, raise_errors: bool) -> None:
        """Run steps until none is ready; with ``raise_errors``, raise the
        first exception a task raises (its outcome written first)."""
        unit = self.unit
        while True:
            if self.steps >= max_steps:
                self._refuse_more(max_steps)
                return
            started, _ = unit.write_and_claim()
            if started is None:
                return
            self.steps += 1
            unit.run_step(started)
            exc = unit.pending[-1].exc if unit.pending else None
            if raise_errors and exc is not None:
                unit.write_and_claim(None, claim=False)
                raise exc

    def _refuse_more(self, max_steps: int) -> None:
        """At ``max_steps``: write what is held, then raise RuntimeError if
        a job is still ready (nothing stays claimed)."""
        self.unit.write_and_claim(None, claim=False)
        names = self.crew.claims.queues
        for job_id, current, name in self.crew.store.read(_SQL_READY_JOBS):
            if names is None or name in names:
                raise RuntimeError(
                    f"drain() ran {max_steps} steps and job {job_id} "
                    f"({current}) is ready still: a job that never ends?  "
                    f"Raise max_steps if it is only long")

    def run_job(self, job_id: int) -> None:
        """Run one job's steps while it is ready (eager())."""
        self.crew.claims.only = job_id
        self.run_ready(_MAX_EAGER_STEPS, False)

    def next_due(self, after: float) -> float | None:
        """When the next timer, expiry or deadline after ``after`` is."""
        firing = self.crew.claims.firing
        sql, params = _SQL_NEXT_DUE_AFTER, {"after": after}
        if firing is not None:
            sql, params = sql + firing.next_due_after, {**params,
                                                        **firing.params}
        rows = self.crew.store.read(sql, params)
        return _earliest(rows)

    def waiting(self, names: list[str] | None) -> int:
        rows = self.crew.store.read(_SQL_COUNT_WAITING)
        return sum(n for name, n in rows if names is None or name in names)


def _drain_queue(queue: Queue, names: list[str] | None, until: Any,
                 max_steps: int, raise_errors: bool,
                 schedules: bool = True) -> dict[str, int]:
    clock, target = queue._clock, None
    if until is not None:
        if clock is None:
            raise RuntimeError("drain(until=...) moves the queue's test "
                               "clock: call it inside `with q.clock():`")
        target = _eta_time(until, "until")
        if target < clock.time():
            raise ValueError(f"until ({_shown_time(target)}) is before the"
                             f" clock's time ({_iso(clock.time())})")
    inline = _Inline(queue, names, schedules)
    while True:
        inline.run_ready(max_steps, raise_errors)
        if target is None:
            break
        due = inline.next_due(clock.time())
        if due is not None and target < due <= target + _TICK:
            target = due  # the same microsecond, which is all until can say
        if due is None or due > target:
            if clock.time() < target:
                clock._move(target)
                continue  # what came due on the way runs, then stop
            break
        clock._move(due)
    counts = {status: inline.tally[status] for status in _FINISHED}
    counts["steps"] = inline.steps
    counts["waiting"] = inline.waiting(names)
    return counts


@contextlib.contextmanager
def using(queue: Queue) -> Iterator[Queue]:
    """Make ``queue`` the default queue for the block (and every thread
    of this process): module-level @task functions delay into it."""
    if not isinstance(queue, Queue):
        raise TypeError(f"using() takes a Queue, got {queue!r}")
    with _PROCESS.lock:
        old, _PROCESS.default_queue = _PROCESS.default_queue, queue
    try:
        yield queue
    finally:
        with _PROCESS.lock:
            _PROCESS.default_queue = old



# ---------------------------------------------------------------------------
# 14. HTTP: status resource and dashboard
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
    - ``GET /counts``: ``{queue name: {status: n}}``;
    - ``GET /schedules``: a JSON list of the periodic schedules, as
      ``Queue.schedules()`` gives them.

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
    if path in ("/schedules", "/schedules/"):
        found = _http_read(queue, lambda q: q.schedules())
        return 200, _JSON_TYPE, _json_body(found)
    match = _TASK_PATH.match(path)
    if match:
        return 200, _JSON_TYPE, _json_body(_http_job(queue, match[1]))
    raise _HTTPError(404, f"no resource at {path!r}: the routes are /, "
                          f"/tasks, /tasks/<id>, /counts and /schedules")


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
        logger.error("http: answering 503: no database at %s", queue.path)
        raise _HTTPError(503, "the database is missing: see the server log")
    try:
        with Queue(queue.path) as reader:
            reader._store.creates = False  # an empty file stays empty
            return read(reader)
    except Error as exc:
        logger.error("http: answering 503: %s", exc, exc_info=exc)
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
    # The page, _DASHBOARD, is long: it has section 14 to itself.  It
    # fetches BASE + "tasks", so it works under any mount point.
    base = environ.get("SCRIPT_NAME", "").rstrip("/") + "/"
    return _DASHBOARD.replace("__LITEQ_BASE__",
                              html.escape(base, quote=True)).encode()


# ---------------------------------------------------------------------------
# 15. Command line
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
    imported, a bad option).  Errors are reported in one line on stderr.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
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


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other
    error of the command line (argparse prints the usage first)."""

    def error(self, message: str) -> Any:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    console = os.path.basename(sys.argv[0] if sys.argv else "") == "liteq"
    parser = _Parser(
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
    _add_schedule_commands(add)
    return parser


def _add_command(commands: Any, name: str, handler: Callable, text: str,
                 json_output: str | None = None) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=text, description=text)
    sub.add_argument("--db", metavar="PATH",
                     help="database file (default: $LITEQ_DB, else "
                          "./liteq.db)")
    if json_output:
        sub.add_argument("--json", action="store_true",
                         help=f"print JSON: {json_output}")
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
    run.add_argument("--unknown-grace", default="300s", metavar="DURATION",
                     help="how long a job of a task no module given here "
                          "defines waits for a worker that knows it, "
                          "then fails (default 300s)")
    run.add_argument("--no-schedules", dest="schedules",
                     action="store_false",
                     help="fire no periodic schedule: this worker only "
                          "runs jobs")
    run.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS)
    demo = add("demo", _cmd_demo,
               "enqueue demo jobs and run a worker until they finish")
    demo.add_argument("--log-level", default="WARNING", choices=_LOG_LEVELS)


def _add_read_commands(add: Callable) -> None:
    add("status", _cmd_status, "count jobs per status per queue name",
        json_output="{queue name: {status: count}}")
    jobs = add("list", _cmd_list, "list jobs, newest first",
               json_output="a list of Job.to_dict() objects")
    jobs.add_argument("--status", choices=_STATUSES)
    jobs.add_argument("--queue", metavar="NAME", help="queue name")
    jobs.add_argument("--name", metavar="TASK", help="stored task name")
    jobs.add_argument("--limit", type=int, default=_LIST_LIMIT,
                      help=f"most jobs to show, 1 or more (default "
                           f"{_LIST_LIMIT})")
    show = add("show", _cmd_show, "show every field of a job",
               json_output="the job's Job.to_dict() (with --follow, one "
                           "per line at each change)")
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


def _add_schedule_commands(add: Callable) -> None:
    add("schedules", _cmd_schedules, "list the periodic schedules",
        json_output="a list of Queue.schedules() objects")
    for name, handler, text in (
            ("trigger", _cmd_trigger, "fire one extra run of a schedule "
             "now (exit 1 if its overlap rule refuses)"),
            ("pause-schedule", _cmd_pause_schedule,
             "stop a schedule firing until resume-schedule"),
            ("resume-schedule", _cmd_resume_schedule,
             "let a paused schedule fire again (missed slots follow its "
             "catchup rule)")):
        add(name, handler, text).add_argument(
            "name", metavar="NAME", help="schedule name")


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
    if os.path.isdir(path):
        raise _UsageError(f"{os.path.abspath(path)} is a folder, not a "
                          f"database file: pass --db "
                          f"{os.path.join(path, _DEFAULT_DB)}, say")
    folder = os.path.dirname(os.path.abspath(path))
    if create and not os.path.isdir(folder):
        raise _UsageError(f"cannot open {os.path.abspath(path)}: its "
                          f"folder {folder} does not exist")
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
    # User errors first, before a module runs or anything is printed.
    _check_int("--threads", args.threads, 1, 1024)
    for name in args.queues or ():
        _check_name("queue name", name)
    grace = args.unknown_grace.strip()
    grace = float(grace) if _NUMBER.match(grace) else _parse_duration(grace)
    queue = _cli_queue(args, create=True)
    _setup_logging(args.log_level)
    sys.path.insert(0, os.getcwd())
    for module in args.modules:
        _import_tasks(module)
    if not (args.db or os.environ.get("LITEQ_DB")):
        queue = default_queue()  # as a module's liteq.configure() set it
    _warn_other_files(queue)
    worker = Worker(queue, threads=args.threads, queues=args.queues,
                    unknown_grace=grace, schedules=args.schedules)
    _on_stop_signals(worker)
    worker.run_forever()
    return 1 if worker.left_to_leases else 0


def _import_tasks(name: str) -> None:
    """Import a MODULE given to ``run``; warn if it registers no task."""
    before = set(_PROCESS.tasks)
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        raise _UsageError(f"cannot import {name}: {type(exc).__name__}: "
                          f"{exc}{_file_hint(name)}") from None
    if set(_PROCESS.tasks) - before or any(
            fn.__module__ == name or fn.__module__.startswith(name + ".")
            for fn in list(_PROCESS.tasks.values())):
        return
    logger.warning("module %s registers no task: %s", name,
                   _taskless_hint(name, module))


def _file_hint(name: str) -> str:
    """For ``run jobs.py``: the module name that was meant."""
    stem = name[:-3] if name.endswith(".py") else name
    if stem == name and "/" not in name and os.sep not in name:
        return ""
    folder, base = os.path.split(stem)
    parts = [p for p in re.split(r"[/\\]", stem) if p not in ("", ".")]
    if os.path.isabs(stem) or ".." in parts or not parts:
        return (f"; did you mean run {base}, in the folder {folder}? "
                f"(MODULE is a module name, not a file)")
    return (f"; did you mean run {'.'.join(parts)}? (MODULE is a module "
            f"name, not a file)")


def _taskless_hint(name: str, module: Any) -> str:
    """What to say of a module given to ``run`` that registers no task."""
    local = os.path.join(os.getcwd(), *name.split(".")) + ".py"
    where = getattr(module, "__file__", None) or "a module built in"
    if os.path.isfile(local) and os.path.abspath(where) != local:
        return (f"the name {name} was already taken by {where}, so "
                f"{local} was not imported: rename that file")
    guesses = [f"{name}.{info.name}" for info in
               pkgutil.iter_modules(getattr(module, "__path__", []))
               if "task" in info.name]
    guesses += sorted(entry[:-3] for entry in os.listdir(os.getcwd())
                      if entry.endswith(".py") and "task" in entry
                      and entry[:-3] != name)
    if guesses:
        return f"did you mean {' or '.join(guesses[:3])}?"
    return ("name the module that defines your @task functions (a worker "
            "runs only the tasks its modules register)")


def _warn_other_files(queue: Queue) -> None:
    """Warn of registered tasks whose jobs go to another database file."""
    elsewhere: dict[str, list[str]] = {}
    for fn in list(_PROCESS.tasks.values()):
        if fn.__module__ == __name__:
            continue  # liteq's own (chain): it runs in any file
        home = (fn._queue or default_queue()).path
        if os.path.realpath(home) != os.path.realpath(queue.path):
            elsewhere.setdefault(home, []).append(fn.name)
    for path, names in sorted(elsewhere.items()):
        shown = ", ".join(sorted(names)[:5])
        if len(names) > 5:
            shown += f" and {len(names) - 5} more"
        they = ("task %s stores its" if len(names) == 1 else
                "tasks %s store their")
        logger.warning(they + " jobs in %s, but this worker serves %s: run "
                       "it with --db %s", shown, path, queue.path, path)


def _on_stop_signals(worker: Worker) -> None:
    """First SIGINT/SIGTERM: stop gracefully; second: exit at once."""
    received: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        if received:
            os._exit(128 + signum)
        received.append(signum)
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
    if not 1 <= args.limit <= _INT64[1]:
        raise _UsageError(f"--limit must be from 1 to {_INT64[1]}, got "
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
            ["ID", "STATUS", "PROGRESS", "STEPS", "TRIES", "QUEUE", "TASK",
             "NEXT", "UPDATED", "DESCRIPTION", "LAST ERROR"],
            [_list_row(job, now) for job in jobs], right=(0, 2, 3, 4)))
    return 0


def _cell(row: dict, key: str, width: int | None = None) -> str:
    """A table cell: the field cleaned (and cut to ``width``), or ``-``."""
    return "-" if row[key] is None else _clean(row[key], width)


def _list_row(job: dict, now: float) -> list[str]:
    cell = functools.partial(_cell, job)
    about = cell("description", 40)
    if "unreadable" in job:  # its fields that liteq could read, and why
        about = _clean(f"UNREADABLE: {job['unreadable']}", 60)
    error = _error_line(job["error"]) if job["error"] else "-"
    return [cell("id"), cell("status"), _percent_text(job["percent"]).strip(),
            cell("steps"), cell("attempts"), cell("queue", 20),
            cell("name", 32), _next_text(job, now),
            _age_text(job["updated_at"], now), about, _clean(error, 50)]


def _next_text(job: dict, now: float) -> str:
    """Why an unfinished job waits and when it wakes: ``timer in 23h``."""
    if job["waiting"] is None:
        return "-"
    return f"{_clean(job['waiting'], 20)} {_in_text(job['eta'], now)}"


def _in_text(iso: str | None, now: float) -> str:
    if iso is None:
        return "-"
    seconds = int(_seconds(iso) - now + 0.999)
    if seconds <= 0:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"in {seconds // size}{unit}"
    return f"in {seconds}s"


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
    "status", "waiting", "percent", "steps", "attempts", "worker", "eta",
    "scheduled_for", "expires", "deadline", "created_at", "started_at",
    "updated_at", "finished_at", "args", "kwargs", "result")


def _show_text(data: dict) -> str:
    lines = []
    for field in _SHOW_FIELDS:
        value = data[field]
        if field in ("args", "kwargs", "result"):
            text = json.dumps(value)
        elif field == "percent":
            text = f"{_bar(value)} {_percent_text(value).strip()}"
        elif field == "eta" and data["waiting"] is not None:
            text = f"{_clean(value)} ({_in_text(value, time.time())})"
        else:
            text = "-" if value is None else _clean(value)
        lines.append(f"{field:<13} {text}")
    if len(data["errors"]) > 1:  # the last one is the error's last line
        lines.append("errors:")
        lines += [f"  {_clean(line)}" for line in data["errors"]]
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
    wait = ""
    if data["eta"] and _seconds(data["eta"]) > time.time():
        wait = f" at its eta, {data['eta']}"
    _emit(f"job {data['id']} is {data['status']} again: it resumes at step "
          f"{data['steps'] + 1} ({_clean(data['current'])}){wait}\n")
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    seconds = _parse_duration(args.older_than)
    with _cli_queue(args, create=False) as queue:
        deleted = queue.purge(seconds)
    _emit(f"purged {deleted} job{'' if deleted == 1 else 's'} finished "
          f"more than {args.older_than.strip()} ago\n")
    return 0

# Schedule commands ---------------------------------------------------------


def _cmd_schedules(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        found = queue.schedules()
    if args.json:
        _print_json(found)
    elif not found:
        _emit(f"no schedules in {queue.path}\n")
    else:
        now = time.time()
        _emit(_table(
            ["NAME", "TASK", "SPEC", "TZ", "NEXT (UTC)", "NEXT (LOCAL)",
             "LAST (UTC)", "LAST JOB", "SKIPPED", "PAUSED"],
            [_schedule_row(item, now) for item in found], right=(8,)))
    return 0


def _schedule_row(item: dict, now: float) -> list[str]:
    cell = functools.partial(_cell, item)
    spec = cell("spec", 30)
    if "unreadable" in item:  # its fields that liteq could read, and why
        spec = _clean(f"UNREADABLE: {item['unreadable']}", 60)
    upcoming = _clock_text(item["next"])
    if item["next"] is not None and not item["paused"]:
        upcoming += f" ({_in_text(item['next'], now)})"
    last_job = "-" if item["last_job"] is None else (
        f"{item['last_job']} {item['last_status'] or 'purged'}")
    return [cell("name", 32), cell("task", 32), spec, cell("tz"), upcoming,
            _clock_text(item["next_local"]), _clock_text(item["last"]),
            _clean(last_job), _clean(item["skipped"]),
            "yes" if item["paused"] else "no"]


def _clock_text(iso: str | None) -> str:
    """An ISO time to the second: ``2024-05-01 12:00:00`` in UTC, else
    with its offset, ``2024-05-01 14:00:00+02:00``."""
    if iso is None:
        return "-"
    return _clean(re.sub(r"\.[0-9]+", "", iso).replace("T", " ")
                  .replace("Z", ""))


def _schedule_call(method: Callable[[str], Any], name: str) -> Any:
    """``method(name)``; no such schedule is the user's error."""
    try:
        return method(name)
    except LookupError as exc:
        raise _UsageError(str(exc)) from None


def _cmd_trigger(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        job = _schedule_call(queue.trigger, args.name)
        found = [] if job is not None else [
            item for item in queue.schedules() if item["name"] == args.name]
    name = _clean(args.name)
    if job is not None:
        _emit(f"job {job.id} triggered for schedule {name}\n")
        return 0
    why = "its overlap rule refuses another run now"
    if found and found[0]["last_job"] is not None:
        item = found[0]
        why = (f"its overlap rule ({_clean(item['overlap'])}) refuses a "
               f"run while its last run, job {item['last_job']}, is "
               f"{item['last_status'] or 'unfinished'}")
    print(f"liteq: schedule {name} not triggered: {why}", file=sys.stderr)
    return 1


def _cmd_pause_schedule(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        _schedule_call(queue.pause_schedule, args.name)
    _emit(f"schedule {_clean(args.name)} paused: it fires nothing until "
          f"resume-schedule\n")
    return 0


def _cmd_resume_schedule(args: argparse.Namespace) -> int:
    with _cli_queue(args, create=False) as queue:
        _schedule_call(queue.resume_schedule, args.name)
    _emit(f"schedule {_clean(args.name)} resumed\n")
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
# 16. Dashboard page: HTML, script and style
# ---------------------------------------------------------------------------

# The dashboard: one page, no external assets.  It polls /counts, /tasks
# and /schedules and builds every row with textContent, so job text is never
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
.errors { white-space: pre-wrap; }
.c-id { width: 64px; } .c-task { width: 17%; } .c-status { width: 112px; }
.c-progress { width: 210px; } .c-steps, .c-tries { width: 64px; }
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
#schedules tr { cursor: default; }
#schedules tr:hover { background: none; }
#schedules tr.paused td { color: var(--muted); }
.c-next, .c-local { width: 204px; } .c-last { width: 160px; }
.c-skipped { width: 76px; } .c-state { width: 92px; }
.badge {
  display: inline-block; padding: 1px 9px; border-radius: 999px;
  font-size: 12px; font-weight: 600;
}
.badge.active { color: var(--done); background: #dafbe1; }
.badge.paused { color: var(--pending); background: #fff8c5; }
a.last-run { color: inherit; text-decoration: none; }
a.last-run:hover { text-decoration: underline; }
@media (max-width: 800px) {
  .counts { grid-template-columns: repeat(3, minmax(0, 1fr)); }
  .c-task, .c-updated, .c-tries, .c-local { display: none; }
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
        <col class="c-progress"><col class="c-steps"><col class="c-tries">
        <col class="c-updated">
      </colgroup>
      <thead><tr>
        <th class="num">ID</th><th class="c-task">Task</th>
        <th>Description</th><th>Status</th><th>Progress</th>
        <th class="num">Steps</th><th class="num c-tries">Tries</th>
        <th class="c-updated">Updated</th>
      </tr></thead>
      <tbody id="jobs"></tbody>
    </table>
    <p id="empty" class="empty" hidden>No jobs.</p>
  </section>
  <section id="schedules-panel" class="panel" hidden>
    <div class="panel-head">
      <h2>Schedules</h2>
      <span class="muted">times of the next slot; last run links to its
        job</span>
    </div>
    <table>
      <colgroup>
        <col><col class="c-task"><col><col class="c-next">
        <col class="c-local"><col class="c-last"><col class="c-skipped">
        <col class="c-state">
      </colgroup>
      <thead><tr>
        <th>Name</th><th class="c-task">Task</th><th>Schedule</th>
        <th>Next (UTC)</th><th class="c-local">Next (your time)</th>
        <th>Last run</th>
        <th class="num">Skipped</th><th>State</th>
      </tr></thead>
      <tbody id="schedules"></tbody>
    </table>
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
  } else if (job.error && (job.status === "failed" || job.waiting)) {
    const why = node("span", "why", lastLine(job.error));
    description.appendChild(why);
    description.title = job.description + "\n" + why.textContent;
  }
  if (job.waiting && !job.unreadable) {
    description.appendChild(node("span", "note", "waits (" + job.waiting +
                                 "), wakes " + ahead(job.eta)));
  }
  const status = node("td");
  status.appendChild(statusWord(job.status || "unknown"));
  const bar = node("td");
  bar.appendChild(progress(job));
  row.append(node("td", "num", job.id), task, description, status, bar,
             node("td", "num", job.steps),
             node("td", "num c-tries", job.attempts), updated);
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

function utcTime(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+|Z$/g, "") : "-";
}

function lastRun(item) {
  const cell = node("td");
  if (!Number.isInteger(item.last_job)) {
    cell.textContent = "-";
    return cell;
  }
  const link = node("a", "last-run");
  link.href = "#job-" + item.last_job;
  link.append(statusWord(item.last_status || "purged"),
              " job " + item.last_job);
  cell.appendChild(link);
  if (item.last) {
    cell.appendChild(node("span", "note", "slot " + ago(item.last)));
    cell.title = "last slot fired: " + localTime(item.last);
  }
  return cell;
}

function scheduleRow(item) {
  const row = node("tr", item.paused ? "paused" : "");
  row.dataset.schedule = item.name;
  row.dataset.paused = String(Boolean(item.paused));
  const name = node("td", "mono", item.name);
  name.title = item.name + (item.origin === "code" ?
    " (declared in code)" : " (stored with Queue.schedule)");
  const task = node("td", "c-task mono", item.task || "-");
  task.title = item.task || "";
  const spec = node("td", "mono", item.spec || "-");
  spec.appendChild(node("span", "note", item.tz || ""));
  if (item.unreadable) {
    spec.appendChild(node("span", "why", "unreadable: " + item.unreadable));
  }
  const next = node("td", "", utcTime(item.next));
  if (item.next && !item.paused) {
    next.appendChild(node("span", "note", ahead(item.next)));
  }
  if (item.next_local) next.title = item.tz + ": " + item.next_local;
  const local = node("td", "c-local", localTime(item.next) || "-");
  const state = node("td");
  state.appendChild(node("span", "badge " + (item.paused ? "paused" :
                                             "active"),
                         item.paused ? "paused" : "active"));
  row.append(name, task, spec, next, local, lastRun(item),
             node("td", "num", item.skipped), state);
  return row;
}

function renderSchedules(items) {
  const list = Array.isArray(items) ? items : [];
  $("schedules-panel").hidden = list.length === 0;
  $("schedules").replaceChildren(...list.map(scheduleRow));
}

const FIELDS = ["id", "name", "current", "description", "queue",
                "priority", "key", "status", "waiting", "percent", "steps",
                "attempts", "errors", "worker", "eta", "scheduled_for",
                "expires", "deadline", "created_at", "started_at",
                "updated_at", "finished_at", "args", "kwargs", "result"];
const TIMES = ["eta", "scheduled_for", "expires", "deadline"];

function fieldValue(job, field) {
  const value = job[field];
  if (field === "percent") return progress(job);
  if (field === "status") return statusWord(value);
  if (["args", "kwargs", "result"].includes(field)) {
    return node("span", "mono", JSON.stringify(value));
  }
  if (field === "errors") {
    return node("span", "mono errors", (value || []).join("\n") || "-");
  }
  if (value === null || value === undefined) return node("span", "", "-");
  if (field === "eta" && job.waiting) {
    return node("span", "", localTime(value) + " (wakes " + ahead(value) +
                ")");
  }
  if (field.endsWith("_at") || TIMES.includes(field)) {
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
    const [counts, jobs, schedules] = await Promise.all(
      [getJSON("counts"), getJSON("tasks?" + query),
       getJSON("schedules")]);
    renderCounts(counts);
    renderJobs(jobs);
    renderSchedules(schedules);
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
# 17. python -m liteq
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    # Under `python -m liteq` this file is __main__.  Register it as
    # `liteq` too, so task modules that import liteq share its registry.
    sys.modules.setdefault("liteq", sys.modules[__name__])
    sys.exit(main())
