"""Unit tests for liteq, following the sections of SPEC.md.

Run with ``python3 -m pytest -q test_liteq.py``.  Every test gets its own
database under ``tmp_path``; task functions are plain top-level functions
below, registered on each test's Queue by the ``q`` fixture (re-registering
the same ``module:qualname`` replaces the entry, which SPEC allows).  Task
bodies make their continuations through ``T``, the namespace of the
functions as registered for the running test.

Sections: 0 helpers; 1 to 5 as in SPEC; 6 running, in this process, then
6b with real worker processes (kill -9, SIGSTOP, signals); 7 the command
line; 8 HTTP and the dashboard; 9 storage and upgrades; 10 time (waits,
snooze, expiry, deadlines); 11 the testing helpers; then the module's
public names, and last bad rows and hostile input.  Every wait for a
condition is ``wait_until(..., what=...)``;
``DEADLINE`` is the generous bound on a wait for what should happen.

Set ``LITEQ_SLOW_TESTS=1`` to run the worker memory test with 100,000 steps
instead of 20,000.
"""

import collections
import contextlib
import ctypes
import datetime as dt
import doctest
import enum
import functools
import html.parser
import http.client
import importlib
import inspect
import json
import logging
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import zoneinfo
import time
import tracemalloc
import types
import wsgiref.util

import pytest

import liteq

MOD = __name__
ALL_STATUSES = ("pending", "running", "done", "failed", "cancelled")
UTC = dt.timezone.utc
T0 = 1_700_000_000.0  # the fake clock's start (2023-11-14)
HOST_PID = f"{socket.gethostname()}:{os.getpid()}"
#: liteq.py's directory, put on the path of every Python subprocess.
LITEQ_DIR = os.path.dirname(os.path.abspath(liteq.__file__))
#: Seconds: the bound on any one wait; only a slow machine gets near it.
DEADLINE = 60.0


def stored(fn):
    """The stored name liteq gives a top-level function of this module."""
    return f"{MOD}:{fn.__name__}"


def utc(timestamp):
    return dt.datetime.fromtimestamp(timestamp, UTC)


# ---------------------------------------------------------------------------
# 0. Task functions, fixtures and helpers
# ---------------------------------------------------------------------------

#: The task functions as registered for the running test (see ``q``).
T = types.SimpleNamespace()
#: What task bodies saw or did, reset before each test.
LOG = []
SEEN = []
COUNTS = collections.Counter()
FLAGS = {}


class Gate:
    """Lets a test hold a task body inside its step, then release it."""

    def __init__(self):
        self.entered = threading.Semaphore(0)
        self.go = threading.Event()
        self.notes = []

    def wait_entered(self, timeout=DEADLINE):
        assert self.entered.acquire(timeout=timeout), "step never started"


GATE = Gate()


def hello(name):
    print(f"hello {name}!")
    return f"hello {name}!"


def wait(times):
    if times:
        return T.wait(times - 1)  # continue: stored, then run as next step
    print("finished")


def wait_sampled(times):
    """``wait`` that samples the allocated memory blocks every 1,000 steps."""
    if times % 1000 == 0:
        LOG.append(sys.getallocatedblocks())
    if times:
        return T.wait_sampled(times - 1)
    return "finished"


def add(a, b):
    return a + b


def echo(value):
    SEEN.append(value)
    return value


def echo_kwargs(**kwargs):
    SEEN.append(kwargs)
    return kwargs


def record(label):
    LOG.append(label)
    return label


def tick(label, n):
    LOG.append(label)
    return T.tick(label, n - 1) if n > 1 else label


def whose_thread(label):
    LOG.append((label, threading.get_ident()))
    return label


def count_tokens(n):
    """Note (step, token) and continue n more times."""
    job = liteq.current_job()
    LOG.append((job.step, job.token))
    return T.count_tokens(n - 1) if n else "counted"


def fail(message):
    COUNTS["fail"] += 1
    error = RuntimeError(message)
    SEEN.append(error)
    raise error


def countdown_p(total, remaining):
    if remaining:
        return T.countdown_p(total, remaining - 1)
    return "liftoff"


def no_progress(tag):
    return tag


def progress_of(value):
    return value


def percent_raises(n):
    return T.percent_raises(n - 1) if n else "done"


def send_report_now(to):
    return to


def exit_task(code):
    raise SystemExit(code)


def interrupt_once():
    job = liteq.current_job()
    LOG.append(job.attempt)
    if len(LOG) == 1:
        raise KeyboardInterrupt
    return "resumed"


def gated(mode):
    GATE.entered.release()
    assert GATE.go.wait(DEADLINE)
    GATE.notes.append(liteq.current_job().cancel_requested)
    if mode == "continue":
        return T.record("never")
    if mode == "raise":
        raise RuntimeError("gated failure")
    return "finished anyway"


def stuck(block_calls):
    n = len(GATE.notes)
    GATE.notes.append(liteq.current_job().token)
    GATE.entered.release()
    if n < block_calls:
        assert GATE.go.wait(DEADLINE)
    return n


def introspect(stage):
    job = liteq.current_job()
    LOG.append({"id": job.id, "step": job.step, "attempt": job.attempt,
                "token": job.token, "worker": job.worker,
                "status": job.status,
                "cancel_requested": job.cancel_requested})
    if stage == 1 and job.attempt == 1:
        raise RuntimeError("first attempt fails")
    if stage == 1:
        return T.introspect(2)
    return "introspected"


def spawn_then_fail():
    T.record.delay("child")
    raise RuntimeError("parent failed after spawning")


def stage_one():
    LOG.append("one")
    return T.stage_two()


def stage_two():
    LOG.append("two")
    if LOG.count("two") < 3:
        raise RuntimeError("stage two fails twice")
    return "two done"


def flaky_steps(n):
    COUNTS[n] += 1
    if COUNTS[n] == 1:
        raise RuntimeError(f"step {n} fails once")
    return T.flaky_steps(n - 1) if n > 1 else "all steps done"


def counted_step(stage):
    LOG.append(stage)
    if stage == 1:
        return T.counted_step(2)
    if FLAGS.get("broken", True):
        raise RuntimeError("stage 2 is broken")
    return "repaired"


def big_result(n):
    return "x" * n


def set_result():
    return {1, 2}


def hijack(path):
    return liteq.deserialize_task({"__task__": "os:system",
                                   "args": [f"touch {path}"], "kwargs": {}})


def chain_returner():
    return liteq.chain([T.add(1, 2), T.add(3, 4)])


def whoami():
    job = liteq.current_job()
    return [job.worker, job.status]


def spawn_chain_child():
    return T.add(20, 22)


def raise_with_surrogate(text):
    raise ValueError(f"bad {text}")


TASK_FUNCTIONS = [
    hello, wait, wait_sampled, add, echo, echo_kwargs, record, tick, fail,
    countdown_p, no_progress, progress_of, percent_raises, send_report_now,
    exit_task, interrupt_once, gated, stuck, introspect, spawn_then_fail,
    stage_one, stage_two, flaky_steps, counted_step, big_result, set_result,
    hijack, chain_returner, whoami, spawn_chain_child, count_tokens,
    whose_thread,
]

CLAMP = {"nan": math.nan, "inf": math.inf, "str": "50"}

#: Options each function is registered with unless a test says otherwise.
DEFAULT_OPTIONS = {
    "countdown_p": {
        "percent": lambda total, remaining: 100 * (total - remaining) / total},
    "progress_of": {"percent": lambda value: CLAMP.get(value, value)},
    "percent_raises": {"percent": lambda n: 1 / 0},
    "stuck": {"lease": 10, "max_lost": 2},
    "flaky_steps": {"retries": 1, "retry_delay": 0},
}


def register(where, fn, **options):
    """Register ``fn`` on the Queue ``where``; make ``T`` point at it."""
    wrapper = where.task(fn, **{**DEFAULT_OPTIONS.get(fn.__name__, {}),
                                **options})
    setattr(T, fn.__name__, wrapper)
    return wrapper


def register_all(queue):
    for fn in TASK_FUNCTIONS:
        register(queue, fn)


@pytest.fixture(autouse=True)
def fresh_state(tmp_path, monkeypatch):
    """Reset task-side state and keep the default Queue under tmp_path."""
    global GATE
    LOG.clear()
    SEEN.clear()
    COUNTS.clear()
    FLAGS.clear()
    GATE = Gate()
    monkeypatch.setenv("LITEQ_DB", str(tmp_path / "default.db"))
    monkeypatch.setattr(liteq._PROCESS, "default_queue", None)
    yield
    GATE.go.set()  # never leave a step blocked
    if liteq._PROCESS.default_queue is not None:
        liteq._PROCESS.default_queue.close()


@pytest.fixture
def make_queue(tmp_path):
    """Open Queues under tmp_path; all are closed at teardown."""
    opened = []

    def make(name="q.db", register_tasks=True, **options):
        queue = liteq.Queue(tmp_path / name, **options)
        opened.append(queue)
        if register_tasks:
            register_all(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


@pytest.fixture
def q(make_queue):
    return make_queue()


class Clock:
    """A fake store clock: ``q._store.clock`` is replaced by one."""

    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(q):
    fake = Clock()
    q._store.clock = fake
    return fake


@pytest.fixture
def start_worker(make_queue):
    """Start Workers; each is stopped (and must stop) at teardown."""
    started = []

    def start(queue, **options):
        worker = liteq.Worker(queue, **options)
        worker.start()
        started.append(worker)
        return worker

    yield start
    GATE.go.set()
    stopped = [worker.stop(timeout=DEADLINE) for worker in started]
    assert all(stopped), "a worker did not stop"


class Background:
    """Run ``fn(*args)`` in a thread; ``join()`` returns or re-raises."""

    def __init__(self, fn, *args):
        self._outcome = {}
        self.thread = threading.Thread(target=self._run, args=(fn, args),
                                       daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self._outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised in join()
            self._outcome["error"] = exc

    def join(self, timeout=DEADLINE):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background call did not end"
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome.get("value")


def join_all(calls, timeout=DEADLINE):
    """Join every background call, then re-raise the first error.

    All threads end before anything is raised, so no thread still uses a
    connection when the test's Queues are closed.
    """
    outcomes, first_error = [], None
    for call in calls:
        try:
            outcomes.append(call.join(timeout))
        except BaseException as exc:  # noqa: B902 - re-raised below
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return outcomes


def wait_until(predicate, *, what="a condition", timeout=DEADLINE,
               alive=()):
    """Poll ``predicate`` every 10 ms until it returns something true;
    return that.  Every wait of these tests for a condition is this one.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds,
    or at once if a process in ``alive`` (``subprocess.Popen``) has exited:
    then with the end of its stderr if it was written to the file
    ``proc.stderr_path`` (see ``_chaos_worker``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in alive:
            if proc.poll() is not None:
                path = getattr(proc, "stderr_path", None)
                tail = path.read_text(errors="replace")[-3000:] if path else ""
                raise AssertionError(
                    f"process {proc.pid} exited with {proc.returncode} while "
                    f"waiting for {what}; stderr tail:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting "
                                 f"for {what}")
        time.sleep(0.01)


def reap(pid, timeout=DEADLINE):
    """Wait for a forked child; kill it if it hangs.  Return its code."""
    def exit_code():
        done, status = os.waitpid(pid, os.WNOHANG)
        return done and [os.waitstatus_to_exitcode(status)]  # [0] is true

    try:
        (code,) = wait_until(exit_code, what=f"forked child {pid} to exit",
                             timeout=timeout)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return code


def subprocess_env():
    """The environment for a Python subprocess: liteq first on its path,
    no LITEQ_DB, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [LITEQ_DIR] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("LITEQ_DB", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_all(worker, limit=10_000):
    """Run steps with ``worker.run_once()`` until none is ready."""
    for n in range(limit):
        if not worker.run_once():
            return n
    pytest.fail("run_all: too many steps")


def file_state(path):
    """The bytes of a database and its WAL (the -shm index is excluded)."""
    parts = []
    for name in (path, path + "-wal"):
        try:
            with open(name, "rb") as fh:
                parts.append(fh.read())
        except FileNotFoundError:
            parts.append(None)
    return tuple(parts)


def wal_commits(path):
    """Count the commit frames in a database's current WAL."""
    try:
        with open(path + "-wal", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return 0
    if len(data) < 32:
        return 0
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    commits, offset = 0, 32
    while offset + 24 + page_size <= len(data):
        header = data[offset:offset + 24]
        if header[8:16] != salts:
            break
        if struct.unpack(">I", header[4:8])[0]:
            commits += 1
        offset += 24 + page_size
    return commits


def shape(value):
    """The exact types of a value, recursively, for strict comparisons."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [shape(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: shape(v) for k, v in value.items()})
    if isinstance(value, liteq.Task):
        return ("Task", value.name, shape(value.args), shape(value.kwargs))
    return type(value).__name__


def nested(depth):
    """A list nested ``depth`` levels deep: nested(1) == []."""
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Things @task must refuse.
async def async_function():
    return 1


def generator_function():
    yield 1


class Holder:
    def method(self):
        return 1


lambda_function = lambda: 1  # noqa: E731


class Color(enum.IntEnum):
    RED = 1


class Label(str, enum.Enum):
    HOT = "hot"


Point = collections.namedtuple("Point", "x y")


# ---------------------------------------------------------------------------
# 1. Defining and scheduling tasks
# ---------------------------------------------------------------------------


def test_hello_world_is_delayed_then_run_by_a_worker(q, start_worker,
                                                     capsys):
    job = T.hello.delay("world")
    assert isinstance(job, liteq.Job)
    assert job.status == "pending"
    assert job.name == job.current == stored(hello)
    assert capsys.readouterr().out == ""

    start_worker(q)
    assert job.result(timeout=DEADLINE) == "hello world!"
    assert job.status == "done"
    assert job.steps == 1
    assert job.attempts == 1
    assert job.percent == 100.0
    assert job.error is None
    assert job.worker is None
    assert job.finished_at is not None
    assert capsys.readouterr().out == "hello world!\n"


def test_task_decorator_works_bare_and_with_options(q):
    bare = q.task(add)
    with_options = q.task(retries=2, priority=3)(add)
    assert isinstance(bare, liteq.TaskFunction)
    assert isinstance(with_options, liteq.TaskFunction)
    assert with_options.delay(1, 2).priority == 3
    module_bare = liteq.task(add)
    module_with_options = liteq.task(priority=5)(add)
    assert isinstance(module_bare, liteq.TaskFunction)
    assert module_with_options.delay(1, 2).priority == 5


def test_calling_a_task_returns_a_task_and_runs_nothing(q, capsys):
    call = T.hello("world")
    assert isinstance(call, liteq.Task)
    assert call.name == stored(hello)
    assert call.args == ["world"]
    assert call.kwargs == {}
    assert capsys.readouterr().out == ""
    assert q.counts()["pending"] == 0


def test_task_arguments_are_bound_at_call_time(q):
    with pytest.raises(TypeError):
        T.add(1)
    with pytest.raises(TypeError):
        T.add(1, 2, 3)
    with pytest.raises(TypeError):
        T.add(1, c=2)
    call = T.add(1, b=2)
    assert call.args == [1]
    assert call.kwargs == {"b": 2}


def test_tasks_are_equal_by_json_form_and_not_hashable(q):
    assert T.add(1, 2) == T.add(1, 2)
    assert T.add(1, 2) == liteq.deserialize_task(
        {"__task__": stored(add), "args": [1, 2], "kwargs": {}})
    assert T.add(1, 2) != T.add(2, 1)
    assert T.add((1, 2), 3) != T.add([1, 2], 3)
    assert T.add(1, b=2) != T.add(1, 2)
    assert T.add(1, 2) != [1, 2]
    with pytest.raises(TypeError):
        hash(T.add(1, 2))


def test_delay_stores_pending_job_with_the_call(q):
    job = T.add.delay(2, 3)
    assert job.status == "pending"
    assert job.to_dict()["args"] == [2, 3]
    assert job.to_dict()["kwargs"] == {}
    assert q.counts() == {"pending": 1, "running": 0, "done": 0,
                          "failed": 0, "cancelled": 0}


def test_task_delay_stores_the_call(q):
    job = T.add(2, b=3).delay()
    assert job.to_dict()["args"] == [2]
    assert job.to_dict()["kwargs"] == {"b": 3}
    liteq.Worker(q).run_once()
    assert job.result(timeout=5) == 5


def test_apply_async_long_form_takes_args_kwargs_priority_queue(q):
    job = T.add.apply_async(args=(1,), kwargs={"b": 2}, priority=7,
                            queue="other")
    assert job.priority == 7
    assert job.queue == "other"
    assert job.to_dict()["args"] == [1]
    assert job.to_dict()["kwargs"] == {"b": 2}
    assert liteq.Worker(q, queues=["other"]).run_once()
    assert job.result(timeout=5) == 3


def test_apply_async_priority_must_fit_in_64_bits(q):
    assert T.add.apply_async((1, 2), priority=2**63 - 1).priority == 2**63 - 1
    assert T.add.apply_async((1, 2), priority=-2**63).priority == -2**63
    with pytest.raises(ValueError):
        T.add.apply_async((1, 2), priority=2**63)
    with pytest.raises(TypeError):
        T.add.apply_async((1, 2), priority="high")
    assert q.counts()["pending"] == 2


def test_countdown_sets_eta_from_the_store_clock(q, clock):
    job = T.add.apply_async((1, 2), countdown=30)
    assert job.eta == utc(T0 + 30)
    assert job.created_at == utc(T0)
    assert job.status == "pending"


def test_eta_accepts_an_aware_datetime(q, clock):
    eta = dt.datetime(2031, 1, 2, 12, 0, tzinfo=dt.timezone(
        dt.timedelta(hours=-5)))
    job = T.add.apply_async((1, 2), eta=eta)
    assert job.eta == dt.datetime(2031, 1, 2, 17, 0, tzinfo=UTC)


@pytest.fixture
def utc_plus_3():
    """Run the test with the local time zone at UTC+3."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "LQT-3"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_eta_reads_a_naive_datetime_as_local_time(q, clock, utc_plus_3):
    job = T.add.apply_async((1, 2), eta=dt.datetime(2031, 1, 2, 12, 0))
    assert job.eta == dt.datetime(2031, 1, 2, 9, 0, tzinfo=UTC)


def test_eta_accepts_a_unix_timestamp(q, clock):
    assert T.add.apply_async((1, 2), eta=T0 + 100).eta == utc(T0 + 100)
    assert T.add.apply_async((1, 2), eta=int(T0) + 7).eta == utc(T0 + 7)


def test_countdown_and_eta_together_raise_type_error(q, clock):
    with pytest.raises(TypeError):
        T.add.apply_async((1, 2), countdown=5, eta=T0 + 5)
    assert q.counts()["pending"] == 0


def test_past_eta_or_negative_countdown_means_now(q, clock):
    jobs = [T.add.apply_async((1, 2), countdown=-5),
            T.add.apply_async((1, 2), eta=T0 - 100),
            T.add.apply_async((1, 2), eta=utc(T0 - 3600))]
    assert [job.eta for job in jobs] == [utc(T0)] * 3
    worker = liteq.Worker(q)
    assert run_all(worker) == 3
    assert [job.status for job in jobs] == ["done"] * 3


def test_job_never_starts_before_its_eta(q, clock):
    job = T.add.apply_async((1, 2), countdown=60)
    worker = liteq.Worker(q)
    assert worker.run_once() is False
    clock.advance(59.999)
    assert worker.run_once() is False
    assert job.status == "pending"
    clock.advance(0.001)
    assert worker.run_once() is True
    assert job.result(timeout=5) == 3
    assert job.started_at == utc(T0 + 60)


def test_job_waiting_for_eta_does_not_hold_back_ready_jobs(q, clock):
    later = T.record.apply_async(("later",), countdown=60)
    now = T.record.delay("now")
    worker = liteq.Worker(q)
    assert worker.run_once() is True
    assert worker.run_once() is False
    assert LOG == ["now"]
    assert now.status == "done"
    assert later.status == "pending"


def test_description_is_filled_from_the_first_call(q):
    register(q, add, description="Adding {0} and {1}")
    assert T.add.delay(2, 3).description == "Adding 2 and 3"
    register(q, hello, description="Greeting {name}")
    assert T.hello.delay(name="ann").description == "Greeting ann"


def test_default_description_is_the_name_with_spaces(q):
    assert T.send_report_now.delay("ops").description == "send report now"


def test_description_that_cannot_be_formatted_is_stored_raw(q):
    register(q, add, description="Adding {0} and {missing}")
    job = T.add.delay(2, 3)
    assert job.description == "Adding {0} and {missing}"
    assert job.status == "pending"


NOT_TASKS = {
    "lambda": (lambda_function, "lambda"),
    "method": (Holder.method, "Holder.method"),
    "bound-method": (Holder().method, "Holder.method"),
    "async": (async_function, "async_function"),
    "generator": (generator_function, "generator_function"),
    "builtin": (len, "len"),
    "partial": (functools.partial(add, 1), "partial"),
    "class": (Holder, "Holder"),
}


@pytest.mark.parametrize("target, named", NOT_TASKS.values(), ids=NOT_TASKS)
def test_task_refuses_anything_but_a_top_level_function(q, target, named):
    with pytest.raises(TypeError) as info:
        q.task(target)
    assert named in str(info.value)
    with pytest.raises(TypeError) as info:
        liteq.task(target)
    assert named in str(info.value)


def test_task_refuses_a_nested_function(q):
    def inner(x):
        return x

    with pytest.raises(TypeError, match="inner"):
        q.task(inner)
    with pytest.raises(TypeError, match="inner"):
        liteq.task(retries=1)(inner)


def test_task_options_must_be_keywords(q):
    with pytest.raises(TypeError):
        q.task(add, 3)
    with pytest.raises(TypeError):
        q.task(3)
    with pytest.raises(TypeError):
        liteq.task(add, True)
    with pytest.raises(TypeError):
        liteq.task("my-name")


@pytest.mark.parametrize("options, error", [
    ({"retries": -1}, ValueError),
    ({"retries": 1.5}, TypeError),
    ({"retries": "3"}, TypeError),
    ({"retry_delay": -1}, ValueError),
    ({"retry_delay": math.nan}, ValueError),
    ({"retry_delay": math.inf}, ValueError),
    ({"retry_delay": "1s"}, TypeError),
    ({"retry_max_delay": -1}, ValueError),
    ({"retry_max_delay": math.inf}, ValueError),
    ({"queue": ""}, ValueError),
    ({"queue": 3}, TypeError),
    ({"priority": 2**63}, ValueError),
    ({"priority": -2**63 - 1}, ValueError),
    ({"priority": 1.5}, TypeError),
    ({"name": ""}, ValueError),
    ({"name": 3}, TypeError),
    ({"description": 3}, TypeError),
    ({"lease": -1}, ValueError),
    ({"lease": math.inf}, ValueError),
    ({"lease": "60"}, TypeError),
    ({"max_lost": -1}, ValueError),
    ({"max_lost": 2.5}, TypeError),
    ({"percent": 50}, TypeError),
    ({"no_such_option": 1}, TypeError),
])
def test_bad_option_values_raise_at_decoration(q, options, error):
    with pytest.raises(error):
        q.task(add, **options)
    with pytest.raises(error):
        q.task(**options)  # the decorator factory checks before use
    with pytest.raises(error):
        liteq.task(**options)


def test_registering_another_function_under_a_taken_name_raises(q):
    q.task(add, name="test-liteq:taken")
    with pytest.raises(ValueError, match="taken"):
        q.task(hello, name="test-liteq:taken")
    with pytest.raises(ValueError):
        q.task(hello, name="liteq:chain")


def test_reregistering_the_same_function_replaces_it(q):
    old = T.add
    register(q, add, priority=7)
    assert old.delay(1, 2).priority == 7  # the registry entry was replaced
    register(q, add, priority=0)
    assert old.delay(1, 2).priority == 0


def test_task_name_option_is_the_stored_name(q):
    renamed = q.task(send_report_now, name="reports:send")
    job = renamed.delay("ops")
    assert job.name == job.current == "reports:send"
    assert liteq.Worker(q).run_once()
    assert job.result(timeout=5) == "ops"


MAIN_SCRIPT = """
import sys
sys.path.insert(0, {liteq_dir!r})
import liteq
queue = liteq.Queue(sys.argv[1])

def ping():
    return "pong"

ping = queue.task(ping)
print(ping().name)
print(ping.delay().name)
queue.close()
"""


def _run_python(args, cwd):
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("LITEQ_DB", None)
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_task_in_main_script_is_stored_under_the_file_name(tmp_path):
    script = tmp_path / "nightly_jobs.py"
    script.write_text(MAIN_SCRIPT.format(liteq_dir=LITEQ_DIR))
    out = _run_python([str(script), str(tmp_path / "m.db")], tmp_path)
    assert out == ["nightly_jobs:ping", "nightly_jobs:ping"]


def test_task_in_main_module_run_with_m_uses_the_spec_name(tmp_path):
    package = tmp_path / "shop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(MAIN_SCRIPT.format(liteq_dir=LITEQ_DIR))
    out = _run_python(["-m", "shop.jobs", str(tmp_path / "m.db")], tmp_path)
    assert out == ["shop.jobs:ping", "shop.jobs:ping"]


def test_interactive_task_delay_asks_for_a_name(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {LITEQ_DIR!r})
        import liteq
        queue = liteq.Queue(sys.argv[1])
        def ping():
            return "pong"
        nameless = queue.task(ping)
        try:
            nameless.delay()
        except TypeError as exc:
            print("TypeError", "name=" in str(exc))
        named = queue.task(ping, name="console:ping")
        print(named.delay().name)
        queue.close()
    """)
    out = _run_python(["-c", code, str(tmp_path / "i.db")], tmp_path)
    assert out == ["TypeError", "True", "console:ping"]


def test_queue_refuses_memory_and_empty_paths():
    for path in (":memory:", ""):
        with pytest.raises(ValueError):
            liteq.Queue(path)


def test_queue_path_is_made_absolute_at_construction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    queue = liteq.Queue("relative.db")
    try:
        assert queue.path == str(tmp_path / "relative.db")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        queue.counts()
        assert (tmp_path / "relative.db").exists()
        assert not (elsewhere / "relative.db").exists()
    finally:
        queue.close()


def test_queue_opens_lazily(tmp_path):
    path = tmp_path / "lazy.db"
    queue = liteq.Queue(path)
    try:
        assert not path.exists()
        assert queue.counts()["pending"] == 0
        assert path.exists()
    finally:
        queue.close()


def test_queue_close_and_with_release_connections(tmp_path):
    path = str(tmp_path / "closing.db")
    with liteq.Queue(path) as queue:
        queue.counts()
        assert os.path.exists(path + "-wal")
    # The last connection to close checkpoints and removes the WAL.
    assert not os.path.exists(path + "-wal")
    queue.close()  # closing twice is harmless


def test_queue_is_safe_to_use_from_many_threads(q):
    q.counts()  # opened first: concurrent first use is tested in 9

    def delay_many(n):
        return [T.add.delay(n, i).id for i in range(25)]

    callers = [Background(delay_many, n) for n in range(8)]
    ids = [job_id for batch in join_all(callers) for job_id in batch]
    assert len(set(ids)) == 200
    assert q.counts()["pending"] == 200


def test_connections_of_threads_that_ended_are_closed(q):
    task_ = q.task(raise_with_surrogate)
    threads = [threading.Thread(target=task_.delay, args=("x",))
               for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    import gc
    gc.collect()
    assert q.counts()["pending"] == 20
    # This thread's connection stays; the 20 threads' ones are gone.
    assert len(q._store._connections) == 1


def test_module_level_task_uses_liteq_db_from_environment(tmp_path):
    fn = liteq.task(add)
    job = fn.delay(1, 2)
    default = liteq.default_queue()
    assert default.path == str(tmp_path / "default.db")
    assert default.get(job.id) is not None


def test_default_queue_is_liteq_db_in_working_directory(tmp_path,
                                                         monkeypatch):
    monkeypatch.delenv("LITEQ_DB")
    monkeypatch.chdir(tmp_path)
    assert liteq.default_queue().path == str(tmp_path / "liteq.db")
    assert liteq.default_queue() is liteq.default_queue()


def test_configure_points_the_default_queue_elsewhere(tmp_path):
    configured = liteq.configure(tmp_path / "configured.db")
    assert liteq.default_queue() is configured
    job = liteq.task(add).delay(2, 2)
    assert configured.get(job.id) is not None
    assert configured.path == str(tmp_path / "configured.db")
    assert not (tmp_path / "default.db").exists()


def test_task_is_stored_in_its_own_queue(q, make_queue):
    other = make_queue("other.db", register_tasks=False)
    register(other, add)
    job = T.add(1, 2).delay()
    assert other.get(job.id) is not None
    assert q.counts()["pending"] == 0


def test_chain_belongs_to_its_first_members_queue(q, make_queue):
    other = make_queue("other.db", register_tasks=False)
    register(other, add)
    register(other, record)
    job = liteq.chain([T.add(1, 2), T.record("x")]).delay()
    assert other.counts()["pending"] == 1
    assert other.get(job.id).name == "liteq:chain"
    assert q.counts()["pending"] == 0


def test_chain_of_tasks_from_different_queues_raises(q, make_queue):
    other = make_queue("other.db", register_tasks=False)
    register(other, add)
    with pytest.raises(ValueError):
        liteq.chain([T.add(1, 2), T.record("x")])
    with pytest.raises(ValueError):
        liteq.chain([T.record("x"), T.add(1, 2)])


def test_worker_runs_tasks_registered_by_any_queue_object(q, make_queue):
    elsewhere = make_queue("elsewhere.db", register_tasks=False)
    register(elsewhere, add)  # `add` now belongs to another file
    job = T.spawn_chain_child.delay()  # ... but continues with add here
    worker = liteq.Worker(q)
    assert run_all(worker) == 2
    assert job.result(timeout=5) == 42


def test_batch_stores_all_calls_in_one_transaction(q):
    q.counts()
    before = wal_commits(q.path)
    with q.batch():
        jobs = [T.add.delay(i, i) for i in range(3)]
        jobs.append(T.hello.apply_async(("x",), priority=2))
        assert q.counts()["pending"] == 0
    assert wal_commits(q.path) == before + 1
    assert q.counts()["pending"] == 4
    assert [job.status for job in jobs] == ["pending"] * 4
    assert len({job.id for job in jobs}) == 4
    T.add.delay(9, 9)  # one delay, one commit
    assert wal_commits(q.path) == before + 2


def test_batch_stores_nothing_when_the_block_raises(q):
    q.counts()
    before = file_state(q.path)
    with pytest.raises(KeyError):
        with q.batch():
            job = T.add.delay(1, 2)
            raise KeyError("abandon")
    assert file_state(q.path) == before
    assert q.counts()["pending"] == 0
    with pytest.raises(RuntimeError):
        job.id


def test_batch_validates_each_call_when_it_is_made(q):
    with q.batch():
        T.add.delay(1, 2)
        with pytest.raises(TypeError):
            T.add.delay({1}, 2)
        with pytest.raises(TypeError):
            T.add.apply_async((1, 2), countdown=1, eta=T0)
    assert q.counts()["pending"] == 1


def test_batch_job_fields_raise_runtime_error_inside_the_block(q):
    with q.batch():
        job = T.add.delay(1, 2)
        for field in ("id", "status", "name", "steps", "created_at"):
            with pytest.raises(RuntimeError):
                getattr(job, field)
        with pytest.raises(RuntimeError):
            job.to_dict()
        with pytest.raises(RuntimeError):
            job.result(timeout=0)
    assert isinstance(job.id, int)
    assert job.status == "pending"
    assert job.name == stored(add)


def test_nested_batch_blocks_join_the_outer_one(q):
    q.counts()
    before = wal_commits(q.path)
    with q.batch():
        outer = T.add.delay(1, 2)
        with q.batch():
            inner = T.add.delay(3, 4)
        assert wal_commits(q.path) == before
        with pytest.raises(RuntimeError):
            inner.status
    assert wal_commits(q.path) == before + 1
    assert outer.status == inner.status == "pending"


def test_batch_does_not_buffer_calls_from_other_threads(q):
    with q.batch():
        buffered = T.add.delay(1, 2)
        other = Background(lambda: T.add.delay(3, 4).id).join()
        assert q.get(other).status == "pending"
        with pytest.raises(RuntimeError):
            buffered.id
    assert buffered.id != other


def test_run_runs_here_following_continuations(q):
    assert T.wait.run(3) is None
    assert T.countdown_p.run(3, 3) == "liftoff"
    assert T.add(2, 3).run() == 5
    assert liteq.chain([T.wait(2), T.hello("x")]).run() == "hello x!"
    assert q.counts() == dict.fromkeys(
        ("pending", "running", "done", "failed", "cancelled"), 0)


def test_run_makes_one_attempt_and_propagates_the_exception(q):
    register(q, fail, retries=3, retry_delay=0)
    with pytest.raises(RuntimeError) as info:
        T.fail.run("boom")
    assert info.value is SEEN[-1]  # the very exception the task raised
    assert info.value.args == ("boom",)
    assert COUNTS["fail"] == 1
    with pytest.raises(RuntimeError, match="boom"):
        T.fail("boom").run()
    assert COUNTS["fail"] == 2


def test_run_applies_the_workers_json_encoding(q):
    assert T.echo.run([1, (2, 3)]) == [1, (2, 3)]
    assert SEEN[-1] == [1, (2, 3)]
    assert shape(T.echo.run(Color.RED)) == "int"
    assert shape(SEEN[-1]) == "int"
    assert shape(T.echo.run(Point(1, 2))) == ("tuple", ["int", "int"])
    with pytest.raises(TypeError):
        T.echo.run({1, 2})
    with pytest.raises(TypeError):
        T.set_result.run()


def test_run_once_runs_one_step_and_returns_the_continuation(q):
    assert T.wait(3).run_once() == T.wait(2)
    assert T.add(2, 3).run_once() == 5
    follow = liteq.chain([T.add(1, 2)]).run_once()
    assert isinstance(follow, liteq.Task)
    assert follow.name == stored(add)
    assert follow.run_once() == 3


def test_delay_inside_a_step_stores_its_job_at_once(q):
    parent = T.spawn_then_fail.delay()
    worker = liteq.Worker(q)
    assert worker.run_once()
    assert parent.status == "failed"
    children = q.jobs(name=stored(record))
    assert len(children) == 1
    assert children[0].status == "pending"
    assert worker.run_once()
    assert children[0].result(timeout=5) == "child"


# ---------------------------------------------------------------------------
# 2. Arguments and results: JSON, plus tuples and tasks
# ---------------------------------------------------------------------------

ROUND_TRIPS = {
    "none": None,
    "bools": [True, False],
    "int": 2**62,
    "int-4300-digits": 10**4299,
    "float": 1.5,
    "str": "caf\u00e9 \u2603",
    "lone-surrogates": ["\ud800", "x\udfffy", "\udbff\udc00"],
    "empty": [[], {}, ()],
    "tuple": (1, (2, 3), [4, (5,)]),
    "dict": {"a": {"b": [1, 2]}, "": 0},
    "int-enum": Color.RED,
    "namedtuple": Point(1, 2),
    "task-key-dict": {"__task__": "os:system", "args": ["rm"], "kwargs": {}},
    "tuple-key-dict": {"__tuple__": [1, 2]},
    "dict-key-dict": {"__dict__": {"__task__": "x"}},
    "all-tag-keys": {"__task__": 1, "__tuple__": 2, "__dict__": 3},
    "nested-100": nested(100),
}


def _plain(value):
    """What a value should arrive as: subclasses become their base type."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("value", ROUND_TRIPS.values(), ids=ROUND_TRIPS)
def test_argument_and_result_round_trip_through_a_worker(q, value):
    job = T.echo.delay(value)
    assert liteq.Worker(q).run_once()
    expected = _plain(value)
    assert SEEN == [expected]
    assert shape(SEEN[0]) == shape(expected)
    result = job.result(timeout=5)
    assert result == expected
    assert shape(result) == shape(expected)


def test_str_enum_member_arrives_as_its_str_value(q):
    job = T.echo.delay(Label.HOT)
    assert liteq.Worker(q).run_once()
    assert SEEN == ["hot"]
    assert type(SEEN[0]) is str
    assert job.result(timeout=5) == "hot"
    assert T.echo.run(Label.HOT) == "hot"


def test_tasks_arrive_as_tasks_at_any_depth(q):
    inner = T.hello("x")
    value = {"a": [(inner, {"deep": [T.add(1, 2)]})], "b": inner}
    job = T.echo.delay(value)
    assert liteq.Worker(q).run_once()
    received = SEEN[0]
    assert isinstance(received["b"], liteq.Task)
    assert received["b"] == inner
    assert isinstance(received["a"][0], tuple)
    assert isinstance(received["a"][0][0], liteq.Task)
    assert received["a"][0][1]["deep"][0] == T.add(1, 2)
    assert received == value
    assert job.result(timeout=5) == value
    assert received["a"][0][0].run() == "hello x!"


def test_kwargs_named_like_reserved_keys_arrive_as_kwargs(q):
    kwargs = {"__task__": "os:system", "__tuple__": [1], "__dict__": {"k": 1},
              "args": (1, 2), "kwargs": {}, "then": []}
    job = T.echo_kwargs.delay(**kwargs)
    assert liteq.Worker(q).run_once()
    assert SEEN == [kwargs]
    assert shape(SEEN[0]) == shape(kwargs)
    assert job.result(timeout=5) == kwargs
    assert T.echo_kwargs.run(**kwargs) == kwargs


def _cycle():
    value = []
    value.append(value)
    return value


BAD_ARGUMENTS = {
    "set": (("a", {"when": {1, 2}}), {}, "args[1]['when']", "set"),
    "bytes": ((b"raw", 1), {}, "args[0]", "bytes"),
    "datetime": (("a", {"when": dt.datetime(2030, 1, 1)}), {},
                 "args[1]['when']", "datetime"),
    "object": ((1, [object()]), {}, "args[1][0]", "object"),
    "non-str-key": (({1: "one"}, 2), {}, "args[0]", "int"),
    "nan": ((1, math.nan), {}, "args[1]", "nan"),
    "inf": ((math.inf, 1), {}, "args[0]", "inf"),
    "-inf": ((1, {"x": -math.inf}), {}, "args[1]['x']", "-inf"),
    "cycle": ((_cycle(), 1), {}, "args[0]", "list"),
    "nested-101": ((nested(101), 1), {}, "args[0]", "deeper"),
    "int-4301-digits": ((10**4300, 1), {}, "args[0]", "int"),
    "kwarg-set": ((1,), {"b": {3}}, "kwargs['b']", "set"),
}


@pytest.mark.parametrize("args, kwargs, path, kind", BAD_ARGUMENTS.values(),
                         ids=BAD_ARGUMENTS)
def test_non_json_argument_raises_type_error_naming_its_path(
        q, args, kwargs, path, kind):
    T.add.delay(0, 0)
    counts = q.counts()
    before = file_state(q.path)
    with pytest.raises(TypeError) as info:
        T.add.delay(*args, **kwargs)
    message = str(info.value)
    assert path in message
    assert kind in message
    with pytest.raises(TypeError):
        T.add.apply_async(args, kwargs, countdown=5)
    with pytest.raises(TypeError):
        T.add(*args, **kwargs).delay()
    with pytest.raises(TypeError):
        liteq.chain([T.add(*args, **kwargs)]).delay()
    assert q.counts() == counts
    assert file_state(q.path) == before


def test_call_over_max_payload_raises_value_error(make_queue):
    small = make_queue("small.db", max_payload=1000)
    T.echo.delay("x" * 900)
    before = file_state(small.path)
    with pytest.raises(ValueError, match="max_payload"):
        T.echo.delay("x" * 1000)
    with pytest.raises(ValueError, match="max_payload"):
        with small.batch():
            T.echo.delay("y" * 1000)
    assert file_state(small.path) == before
    assert small.counts()["pending"] == 1


def test_default_max_payload_is_one_mebibyte(q):
    T.echo.delay("x" * (2**20 - 100))
    before = file_state(q.path)
    with pytest.raises(ValueError, match="max_payload"):
        T.echo.delay("x" * 2**20)
    assert file_state(q.path) == before


def test_result_over_max_payload_fails_the_job(make_queue):
    small = make_queue("small.db", max_payload=1000)
    job = T.big_result.delay(2000)
    assert liteq.Worker(small).run_once()
    assert job.status == "failed"
    assert "max_payload" in job.error
    with pytest.raises(liteq.TaskFailed):
        job.result(timeout=5)


def test_result_that_is_not_json_fails_the_job(q):
    job = T.set_result.delay()
    assert liteq.Worker(q).run_once()
    assert job.status == "failed"
    assert "result" in job.error
    assert "set" in job.error


def test_serialize_task_returns_plain_json(q):
    call = T.echo({"t": (1, T.add(1, 2))})
    value = liteq.serialize_task(call)
    assert json.loads(json.dumps(value)) == value
    assert value["__task__"] == stored(echo)
    assert liteq.deserialize_task(value) == call
    assert liteq.deserialize_task(json.loads(json.dumps(value))) == call


def test_deserialize_task_returns_a_task_unchanged(q):
    call = T.add(1, 2)
    assert liteq.deserialize_task(call) is call


def test_deserialize_task_never_imports_and_unknown_tasks_can_be_held(q):
    name = "liteq_test_never_imported_module:launch"
    value = {"__task__": name, "args": [1], "kwargs": {"x": (2,)}}
    call = liteq.deserialize_task(value)
    assert "liteq_test_never_imported_module" not in sys.modules
    assert call.name == name
    assert call == liteq.deserialize_task(value)
    assert call.percent() is None
    with pytest.raises(LookupError, match=name):
        call.run()
    with pytest.raises(LookupError, match=name):
        call.run_once()
    job = T.echo.delay([call])  # passed on as an argument
    assert liteq.Worker(q).run_once()
    assert SEEN == [[call]]
    assert job.result(timeout=5) == [call]
    assert "liteq_test_never_imported_module" not in sys.modules


def test_delaying_an_unregistered_task_raises_lookup_error(q):
    call = liteq.deserialize_task({"__task__": "nowhere:task", "args": [],
                                   "kwargs": {}})
    with pytest.raises(LookupError, match="nowhere:task"):
        call.delay()
    assert q.counts()["pending"] == 0


# The JSON encoder is built once, on the C accelerator when there is one
# (see liteq._json_encoder); without it, json's own encoder is used.  Both
# must store the same text, and the checks before them refuse the same.

ENCODER_PAYLOAD = {
    "nested": {"list": [1, [2, [3, {}]], []], "empty": {}, "deep": nested(30)},
    "unicode": "caf\u00e9 \u2603 \u65e5\u672c \U0001f600",
    "escapes": "quote \" backslash \\ nl \n tab \t nul \x00 del \x7f "
               "ls \u2028 ps \u2029",
    "surrogates": ["\ud800", "x\udfffy", "\udbff\udc00"],
    "floats": [0.1, -2.5, 1e300, 5e-324, -0.0, 1.0, 123456789.125],
    "ints": [0, -1, 2**63 - 1, -(2**63), 10**40, Color.RED],
    "bools": [True, False],
    "none": None,
    "str-enum": Label.HOT,
    "tuple": (1, ("a", None), []),
    "namedtuple": Point(1.5, "y"),
    "reserved-keys": {"__task__": "os:system", "__tuple__": [1]},
    "": "empty key",
}


def _store_with_encoder(q, monkeypatch, encoder):
    """Delay and run representative calls with ``encoder`` as liteq's
    JSON encoder; return each job's stored call and result texts, and the
    error each bad call raises at .delay()."""
    monkeypatch.setattr(liteq, "_JSON_ENCODE", encoder)
    payload = dict(ENCODER_PAYLOAD, task=T.add(1, 2),
                   chain=liteq.chain([T.add(1, 2), T.echo("\u00e9")]))
    jobs = [
        T.echo.delay(payload),
        T.echo_kwargs.delay(a=payload["nested"], b=(1, 2), c="\u00e9"),
        T.add.delay(1, 2.5),  # the plain call, written without the walk
        T.echo.delay("caf\u00e9 \ud800 \U0001f600"),
        T.echo_kwargs.delay(n=None, t=True, f=-0.5, i=-(2**63)),
        liteq.chain([T.add(1, 2), T.add(3, 4)]).delay(),
    ]
    assert run_all(liteq.Worker(q)) >= len(jobs)
    texts = [q._store.read("SELECT call, result FROM liteq_jobs WHERE id = ?",
                           (job.id,))[0] for job in jobs]
    assert [job.status for job in jobs] == ["done"] * len(jobs)
    refused = []
    for args, kwargs in [((1, math.nan), {}), (({1: "one"}, 2), {}),
                         ((1, [object()]), {}), ((1,), {"b": math.inf}),
                         (({"k": {(1, 2): 3}}, 0), {})]:
        with pytest.raises(Exception) as info:
            T.add.delay(*args, **kwargs)
        refused.append((type(info.value), str(info.value)))
    return texts, refused


def test_stored_json_is_the_same_without_the_c_encoder(
        q, make_queue, monkeypatch):
    assert json.encoder.c_make_encoder is not None  # CPython has it
    with_c = _store_with_encoder(q, monkeypatch, liteq._JSON_ENCODE)
    # Built as at import, but as if json had no C accelerator (_json).
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    monkeypatch.setattr(json.encoder, "encode_basestring",
                        json.encoder.py_encode_basestring)
    monkeypatch.setattr(json.encoder, "encode_basestring_ascii",
                        json.encoder.py_encode_basestring_ascii)
    fallback = liteq._json_encoder()
    used = []

    def encode(value):
        used.append(1)
        return fallback(value)

    other = make_queue("fallback.db")
    without_c = _store_with_encoder(other, monkeypatch, encode)
    assert used  # every text below went through the fallback
    texts, refused = without_c
    assert texts == with_c[0]
    assert refused == with_c[1]
    assert all(kind is TypeError for kind, _ in refused), refused
    # The stored texts are what the format says: compact UTF-8 JSON, the
    # surrogates escaped; and they read back as what was delayed.
    call, result = texts[0]
    assert ", " not in call and '": ' not in call
    assert "caf\u00e9 \u2603" in call and "\\ud800" in call
    assert "\ud800" not in call
    assert json.loads(call)["args"][0] == json.loads(result)


def test_lone_surrogates_in_description_and_error_are_stored_escaped(q):
    task_ = q.task(raise_with_surrogate, description="about {0}")
    job = task_.delay("a\ud800b")
    assert job.description == "about a\\ud800b"
    assert liteq.Worker(q).run_once()
    assert job.status == "failed"
    assert job.error.strip().splitlines()[-1] == \
        "ValueError: bad a\\ud800b"


def test_names_with_lone_surrogates_raise_value_error(q):
    with pytest.raises(ValueError, match="surrogates"):
        q.task(raise_with_surrogate, name="bad\udc80name")
    task_ = q.task(raise_with_surrogate)
    with pytest.raises(ValueError, match="surrogates"):
        task_.apply_async(("x",), key="k\ud800")
    assert q.counts()["pending"] == 0


# ---------------------------------------------------------------------------
# 3. Continuations (the trampoline)
# ---------------------------------------------------------------------------


def test_continuation_keeps_the_job_id_and_counts_steps(q):
    job = T.wait.delay(3)
    worker = liteq.Worker(q)
    assert worker.run_once()
    assert job.status == "running"
    assert job.steps == 1
    assert job.attempts == 0
    assert job.current == stored(wait)
    assert job.to_dict()["args"] == [2]
    assert run_all(worker) == 3
    assert job.status == "done"
    assert job.steps == 4
    assert q.counts()["done"] == 1


def test_wait_1000_ends_with_1001_steps(q):
    job = T.wait.delay(1000)
    assert run_all(liteq.Worker(q)) == 1001
    assert job.steps == 1001
    assert job.result(timeout=5) is None


def _peak():
    return tracemalloc.get_traced_memory()[1]


def test_wait_recursion_runs_in_constant_memory_in_a_worker(q):
    # Under tracemalloc a step through Worker.run_once() costs ~1-4 ms on a
    # loaded 2-core machine, so by default this runs 10,000 steps and scales
    # the allowance: 1 MB per 100,000 steps (10 bytes a step).  Set
    # LITEQ_SLOW_TESTS=1 for the full 100,000.
    steps = 100_000 if os.environ.get("LITEQ_SLOW_TESTS") else 10_000
    allowance = 1_000_000 * steps // 100_000
    job = T.wait.delay(steps)
    worker = liteq.Worker(q)
    level = logging.getLogger("liteq").level
    logging.getLogger("liteq").setLevel(logging.WARNING)
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        for _ in range(1_000):
            assert worker.run_once()
        peak_at_1k = _peak()
        n = 1_000 + run_all(worker, limit=steps + 10)
        peak_at_end = _peak()
    finally:
        if not was_tracing:
            tracemalloc.stop()
        logging.getLogger("liteq").setLevel(level)
    assert n == steps + 1
    assert job.steps == steps + 1
    assert job.status == "done"
    assert peak_at_end < peak_at_1k + allowance, (peak_at_1k, peak_at_end)


def test_wait_100000_steps_run_in_constant_memory(q):
    # tracemalloc makes each step ~6x slower, so this 100,000-step run
    # counts Python's allocated memory blocks from inside the task, every
    # 1,000 steps, while the trampoline runs: a growing stack or chain of
    # retained calls would add blocks at every step.
    assert T.wait_sampled.run(100_000) == "finished"
    assert len(LOG) == 101
    after_1k = LOG[1]
    growth = max(LOG[1:]) - after_1k
    assert growth < 5_000, (after_1k, max(LOG[1:]))


def test_wait_recursion_does_not_grow_the_stack(q):
    depth = sys.getrecursionlimit()
    assert T.wait.run(depth * 3) is None  # a recursion would overflow


def test_chain_of_wait_and_hello_runs_member_steps_in_order(q, capsys):
    job = liteq.chain([T.wait(2), T.hello("x")]).delay()
    assert job.name == "liteq:chain"
    worker = liteq.Worker(q)
    currents = []
    while job.status in ("pending", "running"):
        currents.append(job.current)
        assert worker.run_once()
    assert currents == ["liteq:chain", stored(wait), stored(wait),
                        stored(wait), "liteq:chain", stored(hello)]
    assert job.result(timeout=5) == "hello x!"
    assert job.steps == 6
    assert job.name == "liteq:chain"
    assert capsys.readouterr().out == "finished\nhello x!\n"


def test_chain_returned_as_a_continuation_finishes_with_last_result(q):
    job = T.chain_returner.delay()
    assert run_all(liteq.Worker(q)) == 5
    assert job.result(timeout=5) == 7
    assert job.name == stored(chain_returner)


def test_nested_chains_run_every_member_in_order(q):
    inner = liteq.chain([T.record("b"), T.tick("c", 2)])
    job = liteq.chain([T.record("a"), inner, T.record("d")]).delay()
    run_all(liteq.Worker(q))
    assert LOG == ["a", "b", "c", "c", "d"]
    assert job.result(timeout=5) == "d"


def test_chain_is_a_task_stored_as_a_call_of_liteq_chain(q):
    made = liteq.chain([T.wait(2), T.hello("x")])
    assert isinstance(made, liteq.Task)
    members = [liteq.serialize_task(T.wait(2)),
               liteq.serialize_task(T.hello("x"))]
    top = {"__task__": "liteq:chain", "args": [members], "kwargs": {}}
    assert liteq.serialize_task(made) == top  # as in docs/format.md
    frame = {"__task__": "liteq:chain", "args": [members[1:]],
             "kwargs": {"done": 1}}
    follow = made.run_once()
    assert liteq.serialize_task(follow) == dict(members[0], then=[frame])
    empty = {"__task__": "liteq:chain", "args": [[]], "kwargs": {"done": 2}}
    for value in (top, frame, empty):  # stored rows decode to chains
        assert type(liteq.deserialize_task(value)) is liteq.chain
        assert liteq.serialize_task(liteq.deserialize_task(value)) == value
    assert type(liteq._decode_call(json.dumps(empty))) is liteq.chain
    assert type(follow._then[0]) is liteq.chain


def test_ready_jobs_run_by_priority_then_ready_order(q):
    T.record.delay("a")
    T.record.delay("b")
    T.record.apply_async(("urgent",), priority=5)
    T.record.apply_async(("low",), priority=-1)
    T.record.delay("c")
    run_all(liteq.Worker(q))
    assert LOG == ["urgent", "a", "b", "c", "low"]


def test_continuation_goes_behind_ready_jobs_of_equal_priority(q):
    first = T.tick.delay("A", 3)
    second = T.tick.delay("B", 3)
    run_all(liteq.Worker(q))
    assert LOG == ["A", "B", "A", "B", "A", "B"]
    assert first.result(timeout=5) == "A"
    assert second.result(timeout=5) == "B"


def test_continuation_stays_ahead_of_lower_priority_jobs(q):
    T.record.delay("low")
    T.tick.apply_async(("high", 3), priority=1)
    run_all(liteq.Worker(q))
    assert LOG == ["high", "high", "high", "low"]


def test_worker_thread_interleaves_long_jobs_step_by_step(q, start_worker):
    with q.batch():
        first = T.tick.delay("A", 3)
        second = T.tick.delay("B", 3)
        third = T.tick.delay("C", 2)
    start_worker(q)
    assert first.result(timeout=DEADLINE) == "A"
    assert second.result(timeout=DEADLINE) == "B"
    assert third.result(timeout=DEADLINE) == "C"
    assert LOG == ["A", "B", "C", "A", "B", "C", "A", "B"]


def test_worker_claims_across_queue_names_by_priority(q):
    T.record.apply_async(("a",), queue="a")
    T.record.apply_async(("b-high",), queue="b", priority=3)
    T.record.apply_async(("c",), queue="c")
    run_all(liteq.Worker(q, queues=["a", "b"]))
    assert LOG == ["b-high", "a"]


def test_fixed_fields_come_from_the_first_call_and_options_from_current(q):
    register(q, stage_two, queue="elsewhere", priority=9, retries=2,
             retry_delay=0, description="second stage",
             percent=lambda: 42)
    job = T.stage_one.apply_async(key="stages")
    worker = liteq.Worker(q)
    assert worker.run_once()
    assert job.current == stored(stage_two)
    assert job.percent == 42.0
    assert run_all(worker) == 3  # stage_two's retries apply
    assert job.result(timeout=5) == "two done"
    assert LOG == ["one", "two", "two", "two"]
    assert job.name == stored(stage_one)
    assert job.description == "stage one"
    assert job.queue == "default"
    assert job.priority == 0
    assert job.key == "stages"


def test_continuation_over_max_payload_fails_the_job(make_queue):
    small = make_queue("small.db", max_payload=100)
    job = T.chain_returner.delay()  # a short call, a longer continuation
    assert liteq.Worker(small).run_once()
    assert job.status == "failed"
    assert "max_payload" in job.error
    assert job.steps == 0


# ---------------------------------------------------------------------------
# 4. Progress
# ---------------------------------------------------------------------------


def _percents(job, worker):
    seen = [job.percent]
    while worker.run_once():
        seen.append(job.percent)
    return seen


def _distinct(values):
    out = []
    for value in values:
        if not out or out[-1] != value:
            out.append(value)
    return out


def test_percent_rises_through_intermediate_values(q):
    job = T.countdown_p.delay(4, 4)
    seen = _percents(job, liteq.Worker(q))
    assert seen == [0.0, 25.0, 50.0, 75.0, 100.0, 100.0]
    assert job.status == "done"
    assert all(isinstance(value, float) for value in seen)


def test_task_percent_uses_the_same_arguments_as_the_step(q):
    assert T.countdown_p(4, 3).percent() == 25.0
    assert T.countdown_p(total=4, remaining=1).percent() == 75.0
    assert T.add(1, 2).percent() is None


def test_percent_is_clamped_and_non_numbers_give_none(q):
    assert T.progress_of.delay(150).percent == 100.0
    assert T.progress_of.delay(-5).percent == 0.0
    assert T.progress_of.delay(42.5).percent == 42.5
    for bad in ("nan", "inf", "str"):
        job = T.progress_of.delay(bad)
        assert job.percent is None
        assert T.progress_of(bad).percent() is None
    assert q.counts()["pending"] == 6


def test_raising_percent_never_fails_and_warns_once(q, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    job = T.percent_raises.delay(2)
    assert job.percent is None
    assert T.percent_raises(1).percent() is None
    T.percent_raises.delay(5)
    worker = liteq.Worker(q)
    assert run_all(worker) == 9
    assert job.result(timeout=5) == "done"
    assert job.percent == 100.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and stored(percent_raises) in r.getMessage()]
    assert len(warnings) == 1


def test_done_job_reports_100_without_a_percent_function(q):
    job = T.add.delay(1, 2)
    assert job.percent is None
    liteq.Worker(q).run_once()
    assert job.percent == 100.0


def test_failed_or_cancelled_job_keeps_its_last_percent(q):
    cancelled = T.countdown_p.delay(4, 3)
    assert cancelled.cancel() is True
    assert cancelled.status == "cancelled"
    assert cancelled.percent == 25.0
    register(q, counted_step, percent=lambda stage: 30.0 * stage)
    failed = T.counted_step.delay(1)
    assert failed.percent == 30.0
    run_all(liteq.Worker(q))
    assert failed.status == "failed"  # at its second step
    assert failed.percent == 60.0


def test_chain_of_four_tasks_reports_quarters(q):
    job = liteq.chain([T.no_progress(tag) for tag in "abcd"]).delay()
    seen = _percents(job, liteq.Worker(q))
    assert _distinct(seen) == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert job.result(timeout=5) == "d"


def test_nested_chains_compose_their_progress(q):
    job = liteq.chain([T.no_progress("a"), liteq.chain(
        [T.no_progress("b"), T.no_progress("c")])]).delay()
    seen = _percents(job, liteq.Worker(q))
    assert _distinct(seen) == [0.0, 50.0, 75.0, 100.0]


def test_chain_progress_includes_the_current_members_percent(q):
    job = liteq.chain([T.countdown_p(4, 4), T.no_progress("z")]).delay()
    seen = _percents(job, liteq.Worker(q))
    assert _distinct(seen) == [0.0, 12.5, 25.0, 37.5, 50.0, 100.0]


# ---------------------------------------------------------------------------
# 5. Jobs: looking at and acting on stored work
# ---------------------------------------------------------------------------


def test_job_fields_read_the_current_row(q, clock):
    job = T.add.apply_async((2, 3), key="fields", priority=4)
    assert isinstance(job.id, int)
    assert job.name == stored(add)
    assert job.current == stored(add)
    assert job.description == "add"
    assert job.queue == "default"
    assert job.priority == 4
    assert job.key == "fields"
    assert job.status == "pending"
    assert job.percent is None
    assert job.steps == 0
    assert job.attempts == 0
    assert job.error is None
    assert job.eta == utc(T0)
    assert job.created_at == utc(T0)
    assert job.updated_at == utc(T0)
    assert job.started_at is None
    assert job.finished_at is None
    assert job.worker is None
    assert job.refresh() is job

    clock.advance(5)
    assert liteq.Worker(q).run_once()
    assert job.status == "done"
    assert job.started_at == utc(T0 + 5)
    assert job.finished_at == utc(T0 + 5)
    assert job.updated_at == utc(T0 + 5)
    assert job.created_at == utc(T0)
    assert job.steps == 1
    assert job.attempts == 1
    assert job.percent == 100.0
    for field in ("eta", "created_at", "started_at", "updated_at",
                  "finished_at"):
        assert getattr(job, field).utcoffset() == dt.timedelta(0)


def test_worker_field_is_host_and_pid_while_a_step_executes(q):
    job = T.whoami.delay()
    assert job.worker is None
    assert liteq.Worker(q).run_once()
    assert job.result(timeout=5) == [HOST_PID, "running"]
    assert job.worker is None


def test_to_dict_is_a_json_snapshot_of_every_field(q, clock):
    job = T.echo.apply_async(((1, 2),), key="snap")
    pending = job.to_dict()
    assert set(pending) == {
        "id", "name", "current", "description", "queue", "priority", "key",
        "status", "percent", "steps", "attempts", "error", "eta",
        "created_at", "started_at", "updated_at", "finished_at", "worker",
        "result", "args", "kwargs", "waiting", "expires", "deadline",
        "errors", "scheduled_for"}
    assert pending["result"] is None
    assert pending["args"] == [{"__tuple__": [1, 2]}]  # docs/choices.md
    assert pending["kwargs"] == {}
    clock.advance(3)
    liteq.Worker(q).run_once()
    snapshot = job.to_dict()
    assert json.loads(json.dumps(snapshot)) == snapshot
    for field in ("id", "name", "current", "description", "queue",
                  "priority", "key", "status", "percent", "steps",
                  "attempts", "error", "worker"):
        assert snapshot[field] == getattr(job, field), field
    for field in ("eta", "created_at", "started_at", "updated_at",
                  "finished_at"):
        text = snapshot[field]
        assert isinstance(text, str)
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert parsed == getattr(job, field), field
        assert parsed.utcoffset() == dt.timedelta(0)
    assert snapshot["status"] == "done"
    assert snapshot["result"] == {"__tuple__": [1, 2]}


def test_statuses_move_from_pending_through_running_to_done(q):
    job = T.wait.delay(1)
    worker = liteq.Worker(q)
    assert job.status == "pending"
    worker.run_once()
    assert job.status == "running"  # between steps
    worker.run_once()
    assert job.status == "done"


def test_result_raises_task_failed_with_the_traceback(q):
    job = T.fail.delay("boom")
    liteq.Worker(q).run_once()
    with pytest.raises(liteq.TaskFailed) as info:
        job.result(timeout=5)
    error = info.value
    assert isinstance(error, liteq.Error)
    assert error.job_id == job.id
    assert error.error == job.error
    assert "Traceback" in error.error
    assert "in fail" in error.error
    assert str(error) == "RuntimeError: boom"
    assert job.status == "failed"
    assert job.finished_at is not None


def test_result_raises_task_cancelled(q):
    job = T.add.delay(1, 2)
    job.cancel()
    with pytest.raises(liteq.TaskCancelled) as info:
        job.result(timeout=5)
    assert isinstance(info.value, liteq.Error)


def test_result_raises_timeout_error_while_unfinished(q):
    job = T.add.delay(1, 2)
    with pytest.raises(TimeoutError):
        job.result(timeout=0)
    with pytest.raises(TimeoutError):
        job.result(timeout=0.05)


def test_result_and_fields_raise_job_not_found_after_purge(q):
    job = T.add.delay(1, 2)
    liteq.Worker(q).run_once()
    assert q.purge(older_than=0) == 1
    with pytest.raises(liteq.JobNotFound) as info:
        job.result(timeout=5)
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, liteq.Error)
    with pytest.raises(liteq.JobNotFound):
        job.status
    with pytest.raises(liteq.JobNotFound):
        job.to_dict()
    assert q.get(job.id) is None


def test_result_waits_for_a_job_run_by_a_worker_thread(q, start_worker):
    job = T.wait.delay(5)
    start_worker(q)
    assert job.result(timeout=DEADLINE) is None
    assert job.steps == 6


def test_result_works_from_another_process(q):
    job = T.add.delay(40, 2)
    pid = os.fork()
    if pid == 0:  # the child runs the job and leaves at once
        code = 1
        try:
            code = 0 if liteq.Worker(q).run_once() else 3
        finally:
            os._exit(code)
    try:
        assert job.result(timeout=DEADLINE) == 42
    finally:
        code = reap(pid)
    assert code == 0


def test_cancel_pending_job_cancels_at_once(q, clock):
    job = T.record.delay("never")
    clock.advance(1)
    assert job.cancel() is True
    assert job.status == "cancelled"
    assert job.finished_at == utc(T0 + 1)
    assert liteq.Worker(q).run_once() is False
    assert LOG == []
    assert job.cancel() is True  # still not done or failed


def test_cancel_returns_false_for_done_or_failed_jobs(q):
    done = T.add.delay(1, 2)
    failed = T.fail.delay("no")
    run_all(liteq.Worker(q))
    assert done.cancel() is False
    assert failed.cancel() is False
    assert done.status == "done"
    assert failed.status == "failed"


def test_cancel_job_waiting_for_a_retry_cancels_at_once(q, clock):
    register(q, fail, retries=3, retry_delay=10)
    job = T.fail.delay("again")
    worker = liteq.Worker(q)
    worker.run_once()
    assert job.status == "running"
    assert job.cancel() is True
    assert job.status == "cancelled"
    clock.advance(100)
    assert worker.run_once() is False
    assert COUNTS["fail"] == 1


def _run_gated(q, mode):
    job = T.gated.delay(mode)
    runner = Background(liteq.Worker(q).run_once)
    GATE.wait_entered()
    assert job.status == "running"
    assert job.cancel() is True
    assert job.status == "running"  # the step is never interrupted
    GATE.go.set()
    assert runner.join() is True
    assert GATE.notes == [True]  # cancel_requested, read fresh
    return job


def test_cancel_during_step_stores_continuation_but_does_not_run_it(q):
    job = _run_gated(q, "continue")
    assert job.status == "cancelled"
    assert job.current == stored(record)
    assert job.steps == 1
    assert liteq.Worker(q).run_once() is False
    assert LOG == []
    with pytest.raises(liteq.TaskCancelled):
        job.result(timeout=5)


def test_cancel_during_step_that_raises_cancels_without_retry(q):
    register(q, gated, retries=3, retry_delay=0)
    job = _run_gated(q, "raise")
    assert job.status == "cancelled"
    assert "gated failure" in job.error
    assert liteq.Worker(q).run_once() is False


def test_cancel_during_step_that_returns_a_result_leaves_it_done(q):
    job = _run_gated(q, "return")
    assert job.status == "done"
    assert job.result(timeout=5) == "finished anyway"
    assert job.cancel() is False


def test_retry_sends_a_failed_job_back_to_pending(q):
    register(q, fail, retries=1, retry_delay=0)
    job = T.fail.delay("twice")
    worker = liteq.Worker(q)
    run_all(worker)
    assert job.status == "failed"
    assert COUNTS["fail"] == 2
    job.retry()
    assert job.status == "pending"
    assert job.attempts == 0
    run_all(worker)  # a fresh retry budget: two more attempts
    assert COUNTS["fail"] == 4
    assert job.status == "failed"


def test_retry_resumes_from_the_stored_current_call(q):
    job = T.counted_step.delay(1)
    worker = liteq.Worker(q)
    run_all(worker)
    assert job.status == "failed"
    assert job.steps == 1
    assert LOG == [1, 2]
    FLAGS["broken"] = False
    job.retry()
    assert job.status == "running"  # it completed a step
    assert job.attempts == 0
    run_all(worker)
    assert job.result(timeout=5) == "repaired"
    assert LOG == [1, 2, 2]  # step 1 never ran twice
    assert job.steps == 2


def test_retry_sends_a_cancelled_job_back(q):
    job = T.record.delay("late")
    job.cancel()
    job.retry()
    assert job.status == "pending"
    run_all(liteq.Worker(q))
    assert job.result(timeout=5) == "late"


def test_retry_of_a_cancelled_job_resumes_the_wait_for_its_eta(q, clock):
    waiting = T.record.apply_async(("waited",), countdown=100)
    due = T.record.apply_async(("due",), countdown=20)
    for job in (waiting, due):
        job.cancel()
    clock.advance(30)
    waiting.retry()  # 70 s of its wait remain
    due.retry()  # its eta has passed: it runs at once
    assert (waiting.status, waiting.eta) == ("pending", utc(T0 + 100))
    assert (due.status, due.eta) == ("pending", utc(T0 + 30))
    worker = liteq.Worker(q)
    run_all(worker)
    assert LOG == ["due"]
    clock.advance(69)
    assert worker.run_once() is False
    clock.advance(1)
    run_all(worker)
    assert LOG == ["due", "waited"]


def test_retry_of_a_failed_job_runs_it_at_once(q, clock):
    register(q, fail, retries=1, retry_delay=3600)
    job = T.fail.delay("late")
    worker = liteq.Worker(q)
    worker.run_once()
    clock.advance(3600)
    worker.run_once()
    assert job.status == "failed"
    job.retry()  # its eta is where a third attempt would have been
    assert job.eta == utc(clock.now)
    assert worker.run_once() is True
    assert COUNTS["fail"] == 3


def test_retry_of_an_unfinished_or_done_job_raises_value_error(q):
    done = T.add.delay(1, 2)
    running = T.wait.delay(2)
    worker = liteq.Worker(q)
    worker.run_once()
    worker.run_once()
    pending = T.add.delay(3, 4)
    assert [done.status, running.status, pending.status] == [
        "done", "running", "pending"]
    for job in (done, running, pending):
        with pytest.raises(ValueError):
            job.retry()
    assert [done.status, running.status, pending.status] == [
        "done", "running", "pending"]


def test_retry_raises_when_the_key_is_held_by_another_job(q):
    first = T.fail.apply_async(("x",), key="nightly")
    liteq.Worker(q).run_once()
    assert first.status == "failed"
    second = T.add.apply_async((1, 2), key="nightly")
    assert second.id != first.id
    with pytest.raises(ValueError):
        first.retry()
    assert first.status == "failed"


def test_get_returns_a_job_or_none(q):
    job = T.add.delay(1, 2)
    found = q.get(job.id)
    assert isinstance(found, liteq.Job)
    assert found.id == job.id
    assert found.name == stored(add)
    assert q.get(job.id + 1000) is None


def test_jobs_lists_newest_first_with_filters(q):
    a = T.add.delay(1, 2)
    b = T.hello.apply_async(("x",), queue="other")
    c = T.add.delay(3, 4)
    liteq.Worker(q).run_once()  # runs a
    assert [j.id for j in q.jobs()] == [c.id, b.id, a.id]
    assert [j.id for j in q.jobs(status="done")] == [a.id]
    assert [j.id for j in q.jobs(status="pending")] == [c.id, b.id]
    assert [j.id for j in q.jobs(name=stored(add))] == [c.id, a.id]
    assert [j.id for j in q.jobs(queue="other")] == [b.id]
    assert [j.id for j in q.jobs(limit=2)] == [c.id, b.id]
    assert q.jobs(status="failed") == []
    with pytest.raises(ValueError):
        q.jobs(status="queued")


def test_counts_has_all_five_statuses(q):
    assert q.counts() == {"pending": 0, "running": 0, "done": 0,
                          "failed": 0, "cancelled": 0}
    T.add.delay(1, 2)
    T.fail.delay("x")
    T.wait.delay(1)
    T.record.apply_async(("y",), queue="other")
    T.add.delay(5, 6).cancel()
    worker = liteq.Worker(q)
    for _ in range(3):
        worker.run_once()
    assert q.counts() == {"pending": 1, "running": 1, "done": 1,
                          "failed": 1, "cancelled": 1}
    assert q.counts(queue="other") == {"pending": 1, "running": 0,
                                       "done": 0, "failed": 0,
                                       "cancelled": 0}


def test_purge_deletes_finished_jobs_older_than_the_cutoff(q, clock):
    done = T.add.delay(1, 2)
    failed = T.fail.delay("x")
    cancelled = T.add.delay(3, 4)
    cancelled.cancel()
    unfinished = T.wait.delay(3)
    pending = T.record.apply_async(("later",), countdown=1000)
    worker = liteq.Worker(q)
    for _ in range(3):
        worker.run_once()
    assert unfinished.status == "running"
    clock.advance(10)
    assert q.purge(older_than=10) == 0  # finished exactly 10 s ago: kept
    assert q.purge(older_than=9.5) == 3
    for job in (done, failed, cancelled):
        assert q.get(job.id) is None
    assert q.get(unfinished.id).status == "running"
    assert q.get(pending.id).status == "pending"


def test_purge_deletes_more_than_one_chunk(q):
    with q.batch():
        jobs = [T.add.delay(i, i) for i in range(1201)]
    for job in jobs:
        job.cancel()
    assert q.purge(older_than=0) == 1201
    assert q.counts()["cancelled"] == 0


def test_job_ids_are_never_reused_after_purge(q):
    jobs = [T.add.delay(1, 2) for _ in range(3)]
    run_all(liteq.Worker(q))
    assert q.purge(older_than=0) == 3
    again = T.add.delay(1, 2)
    assert again.id > max(job.id for job in jobs)


def test_current_job_describes_the_running_step(q):
    register(q, introspect, retries=1, retry_delay=0)
    assert liteq.current_job() is None
    job = T.introspect.delay(1)
    run_all(liteq.Worker(q))
    assert job.result(timeout=5) == "introspected"
    assert [(r["step"], r["attempt"]) for r in LOG] == [(1, 1), (1, 2),
                                                         (2, 1)]
    tokens = [r["token"] for r in LOG]
    assert tokens == sorted(set(tokens))  # grows with every claim
    for entry in LOG:
        assert entry["id"] == job.id
        assert entry["worker"] == HOST_PID
        assert entry["status"] == "running"
        assert entry["cancel_requested"] is False
    assert liteq.current_job() is None


def step_progress(percent):
    """Set ``percent`` from inside the step, wait at the gate, set again."""
    job = liteq.current_job()
    LOG.append(job.set_percent(percent))
    GATE.entered.release()
    assert GATE.go.wait(DEADLINE)
    LOG.append(job.set_percent(percent + 10))
    return "reported"


def test_set_percent_is_seen_from_another_connection_while_the_step_runs(
        q, start_worker):
    register(q, step_progress)
    job = T.step_progress.delay(50)
    assert job.percent is None
    start_worker(q)
    GATE.wait_entered()
    with liteq.Queue(q.path) as other:  # as another process would read it
        assert other.get(job.id).percent == 50.0
        assert other.get(job.id).status == "running"
    GATE.go.set()
    assert job.result(timeout=DEADLINE) == "reported"
    assert LOG == [True, True]
    assert job.percent == 100.0  # done: the stored outcome takes over


def test_set_percent_of_a_stale_step_is_refused(q, start_worker):
    register(q, step_progress)
    job = T.step_progress.delay(20)
    start_worker(q)
    GATE.wait_entered()
    conn = sqlite3.connect(q.path)  # another worker claims the job
    with conn:
        conn.execute("UPDATE liteq_jobs SET token = token + ? WHERE id = ?",
                     (2**20, job.id))
    conn.close()
    GATE.go.set()
    deadline = time.monotonic() + DEADLINE
    while len(LOG) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert LOG == [True, False]
    assert job.percent == 20.0  # the stale step's 30 was not stored


def clamped_progress(values):
    job = liteq.current_job()
    for value in values:
        job.set_percent(value)
        LOG.append(job.percent)
    for bad, error in ((math.nan, ValueError), (math.inf, ValueError),
                       ("50", TypeError), (None, TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="percent"):
            job.set_percent(bad)
    return "ok"


def test_set_percent_clamps_and_refuses_what_is_not_a_finite_number(q):
    register(q, clamped_progress)
    job = T.clamped_progress.delay([250, -3, 12.5, 7])
    run_all(liteq.Worker(q))
    assert job.result(timeout=5) == "ok"
    assert LOG == [100.0, 0.0, 12.5, 7.0]


def progress_steps(n):
    """Set a percent in each of n steps, noting whether it was stored."""
    job = liteq.current_job()
    LOG.append((job.set_percent(100 - n), job.percent))
    return T.progress_steps(n - 1) if n else "done"


def test_set_percent_holds_in_steps_run_before_their_claim_is_written(
        q, hand):
    register(q, progress_steps,
             percent=lambda n: 200)  # clamped: 100 once a step is stored
    worker = hand(**DEFER)  # steps continue in place, nothing written
    job = T.progress_steps.delay(3)
    worker.turn_until_idle()
    assert LOG == [(True, 97.0), (True, 98.0), (True, 99.0), (True, 100.0)]
    assert job.status == "done" and job.percent == 100.0


def test_error_classes_form_one_tree():
    for cls in (liteq.TaskFailed, liteq.TaskCancelled, liteq.JobNotFound,
                liteq.Busy, liteq.StorageError, liteq.SchemaError):
        assert issubclass(cls, liteq.Error)
    assert issubclass(liteq.Error, Exception)
    assert issubclass(liteq.JobNotFound, LookupError)


# ---------------------------------------------------------------------------
# 6. Running: workers and guarantees
# ---------------------------------------------------------------------------
# Workers in this process first; 6b, at the end of the section, runs
# real worker processes and kills, freezes and signals them.


def test_idle_worker_thread_runs_a_job_delayed_afterwards(q, start_worker):
    start_worker(q)
    job = T.add.delay(2, 2)
    assert job.result(timeout=DEADLINE) == 4


def test_idle_worker_wakes_for_a_job_from_another_queue_object(
        q, make_queue, start_worker):
    start_worker(q)
    twin = make_queue("q.db", register_tasks=False)  # the same file
    register(twin, add)
    job = T.add.delay(3, 3)
    assert twin.path == q.path
    assert job.result(timeout=DEADLINE) == 6


def test_worker_serves_only_its_queue_names(q, start_worker):
    other = T.record.apply_async(("other",), queue="other")
    default = T.record.delay("default")
    start_worker(q)
    assert default.result(timeout=DEADLINE) == "default"
    assert other.status == "pending"
    start_worker(q, queues=["other"])
    assert other.result(timeout=DEADLINE) == "other"


def test_worker_with_threads_runs_jobs_concurrently(q, start_worker):
    jobs = [T.gated.delay("return") for _ in range(2)]
    start_worker(q, threads=2)
    GATE.wait_entered()
    GATE.wait_entered()  # both steps are inside at once
    GATE.go.set()
    assert [job.result(timeout=DEADLINE) for job in jobs] == [
        "finished anyway"] * 2


def test_worker_stop_waits_for_running_steps(q):
    job = T.gated.delay("return")
    worker = liteq.Worker(q).start()
    try:
        GATE.wait_entered()
        assert worker.stop(timeout=0.1) is False
        GATE.go.set()
        assert worker.stop(timeout=DEADLINE) is True
    finally:
        GATE.go.set()
        worker.stop(timeout=DEADLINE)
    assert job.status == "done"
    assert job.result(timeout=5) == "finished anyway"


def test_worker_as_context_manager_runs_jobs_then_stops(q):
    with liteq.Worker(q) as worker:
        assert isinstance(worker, liteq.Worker)
        assert T.add.delay(1, 1).result(timeout=DEADLINE) == 2
    job = T.add.delay(2, 2)  # the worker has stopped: nothing runs it
    with pytest.raises(TimeoutError):
        job.result(timeout=0.3)
    assert job.status == "pending"


def test_run_forever_runs_until_stop_is_called_elsewhere(q):
    worker = liteq.Worker(q).start()  # already started: see below
    runner = Background(worker.run_forever)
    try:
        assert T.add.delay(2, 2).result(timeout=DEADLINE) == 4
    finally:
        assert worker.stop(timeout=DEADLINE) is True
        assert runner.join() is None


def test_stop_right_after_run_forever_starts_makes_it_return(q):
    q.counts()
    for _ in range(5):  # stop() lands at a different moment each round
        worker = liteq.Worker(q)
        runner = Background(worker.run_forever)
        try:
            assert worker.stop(timeout=DEADLINE) is True
            runner.thread.join(DEADLINE)
            assert not runner.thread.is_alive(), "run_forever ignored stop()"
            assert runner.join() is None
        finally:
            deadline = time.monotonic() + DEADLINE
            while runner.thread.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(RuntimeError):
                    worker.stop(timeout=5)
                runner.thread.join(0.5)
            with contextlib.suppress(RuntimeError):
                worker.stop(timeout=5)  # joins the heartbeat and watcher


def test_worker_installs_no_signal_handlers(q, start_worker):
    before = (signal.getsignal(signal.SIGINT),
              signal.getsignal(signal.SIGTERM))
    start_worker(q)
    assert T.add.delay(1, 1).result(timeout=DEADLINE) == 2
    assert (signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGTERM)) == before


def test_failing_step_is_retried_with_exponential_backoff(q, clock):
    register(q, fail, retries=3, retry_delay=2, retry_max_delay=5)
    job = T.fail.delay("flaky")
    worker = liteq.Worker(q)
    assert worker.run_once()
    assert job.status == "running"  # waiting for a retry
    assert job.attempts == 1
    assert "RuntimeError: flaky" in job.error
    failed_at = clock.now
    for attempt, delay in ((2, 2), (3, 4), (4, 5)):  # capped at 5, not 8
        clock.now = failed_at + delay - 0.01
        assert worker.run_once() is False, f"retry {attempt - 1} too early"
        clock.now = failed_at + delay * 1.5  # jitter, if any, only adds
        assert worker.run_once() is True
        assert job.attempts == attempt
        failed_at = clock.now
    assert job.status == "failed"
    assert COUNTS["fail"] == 4
    with pytest.raises(liteq.TaskFailed, match="flaky"):
        job.result(timeout=5)


ERRORS = {"connection": ConnectionError, "timeout": TimeoutError,
          "value": ValueError, "permanent": liteq.Permanent}


def raise_error(kind):
    """Raise the exception class named ``kind`` (see ERRORS)."""
    COUNTS["raise_error"] += 1
    raise ERRORS[kind](f"{kind} trouble")


@pytest.mark.parametrize("options, kind, attempts", [
    ({"retry_on": (ConnectionError,)}, "connection", 3),
    ({"retry_on": ConnectionError}, "timeout", 1),  # a class alone works
    ({"retry_on": [OSError]}, "timeout", 3),  # subclasses count
    ({"retry_on": (ConnectionError,)}, "value", 1),
    ({"dont_retry": (ValueError,)}, "value", 1),
    ({"dont_retry": (ValueError,)}, "connection", 3),
    ({}, "value", 3),  # by default any Exception is retried
    ({}, "permanent", 1),
    ({"retry_on": (Exception,)}, "permanent", 1),
])
def test_retry_on_and_dont_retry_choose_the_errors_retried(
        q, options, kind, attempts):
    register(q, raise_error, retries=2, retry_delay=0, **options)
    job = T.raise_error.delay(kind)
    run_all(liteq.Worker(q))
    assert job.status == "failed"
    assert job.attempts == attempts
    assert COUNTS["raise_error"] == attempts
    assert f"{ERRORS[kind].__name__}: {kind} trouble" in job.error
    assert "Traceback" in job.error


def test_permanent_fails_the_job_at_once_and_says_failed(q, caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    register(q, raise_error, retries=5, retry_delay=0)
    job = T.raise_error.delay("permanent")
    assert liteq.Worker(q).run_once()
    assert job.status == "failed"
    with pytest.raises(liteq.TaskFailed, match="permanent trouble"):
        job.result(timeout=5)
    assert f"job {job.id} failed: liteq.Permanent: permanent trouble" in \
        caplog.messages
    assert not [m for m in caplog.messages if "retried" in m]


def test_permanent_is_control_flow_not_a_liteq_error():
    assert issubclass(liteq.Permanent, Exception)
    assert not issubclass(liteq.Permanent, liteq.Error)
    assert "Permanent" in liteq.__all__


def test_run_propagates_errors_whatever_the_retry_options(q):
    register(q, raise_error, retries=3, retry_on=(ConnectionError,))
    for kind in ("connection", "value", "permanent"):
        with pytest.raises(ERRORS[kind], match="trouble"):
            T.raise_error.run(kind)
    assert COUNTS["raise_error"] == 3  # one attempt each


@pytest.mark.parametrize("options, match", [
    ({"retry_on": (ValueError,), "dont_retry": (KeyError,)}, "not both"),
    ({"retry_on": ValueError, "dont_retry": ()}, "not both"),
    ({"retry_on": "ValueError"}, "retry_on"),
    ({"retry_on": (ValueError, 3)}, "retry_on"),
    ({"retry_on": ValueError("x")}, "retry_on"),
    ({"dont_retry": int}, "dont_retry"),
    ({"dont_retry": [None]}, "dont_retry"),
    ({"retry_jitter": 1}, "retry_jitter"),
    ({"retry_jitter": "yes"}, "retry_jitter"),
])
def test_bad_retry_options_raise_type_error_at_decoration(q, options, match):
    with pytest.raises(TypeError, match=match):
        q.task(add, **options)
    with pytest.raises(TypeError, match=match):
        q.task(**options)


def test_retry_jitter_only_adds_up_to_the_backoff_again(q, clock):
    register(q, fail, retries=3, retry_delay=10, retry_max_delay=25,
             retry_jitter=True)
    jobs = [T.fail.delay("flaky") for _ in range(30)]
    worker = liteq.Worker(q)
    for backoff in (10, 20, 25):  # the third is capped at 25, not 40
        failed_at = clock.now
        assert run_all(worker) == len(jobs)
        delays = [job.eta.timestamp() - failed_at for job in jobs]
        assert all(backoff <= d <= 2 * backoff for d in delays), delays
        assert len(set(delays)) > 1  # jittered, not one fixed delay
        clock.now = failed_at + backoff - 0.01
        assert worker.run_once() is False  # never sooner than the backoff
        clock.now = failed_at + 2 * backoff
    assert run_all(worker) == len(jobs)
    assert all(job.status == "failed" for job in jobs)


def test_retry_without_jitter_waits_exactly_the_backoff(q, clock):
    register(q, fail, retries=1, retry_delay=7)
    job = T.fail.delay("flaky")
    assert liteq.Worker(q).run_once()
    assert job.eta.timestamp() == clock.now + 7


def test_worker_warns_at_start_of_ready_jobs_under_names_it_does_not_serve(
        q, start_worker, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    for name in ("emails", "reports", "emails"):
        T.record.apply_async((name,), queue=name)
    T.record.apply_async(("later",), queue="later", countdown=3600)
    T.record.delay("here")
    worker = start_worker(q)
    wait_until(lambda: LOG == ["here"], what="the default job to run")
    assert worker.stop(timeout=DEADLINE)
    worker.start()  # the same warning is not given twice
    assert [r.getMessage() for r in caplog.records] == [
        "ready jobs wait under queue name(s) emails, reports, which this "
        "worker does not serve (it serves default): unless another worker "
        "serves them, add --queue emails --queue reports to liteq run (or "
        "to Worker(queues=...))"]
    assert caplog.records[0].levelno == logging.WARNING
    start_worker(q, queues=["default", "emails", "reports"])
    wait_until(lambda: sorted(LOG) == ["emails", "emails", "here",
                                       "reports"],
               what="the other queue names to be served")
    assert len(caplog.records) == 1


def test_retry_budget_is_per_step(q):
    job = T.flaky_steps.delay(3)  # retries=1: each step fails once
    run_all(liteq.Worker(q))
    assert job.result(timeout=5) == "all steps done"
    assert job.steps == 3


UNKNOWN = "unknown task 'os:system': not registered in this worker"


def test_unknown_task_fails_the_job_after_its_grace_and_runs_nothing(
        q, tmp_path):
    marker = tmp_path / "pwned"
    job = T.hijack.delay(str(marker))
    worker = liteq.Worker(q, unknown_grace=0)
    assert worker.run_once()
    assert job.current == "os:system"
    assert worker.run_once()
    assert job.status == "failed"
    assert job.error.startswith(UNKNOWN)
    with pytest.raises(liteq.TaskFailed) as info:
        job.result(timeout=5)
    assert str(info.value).startswith(UNKNOWN)
    assert f"then `liteq retry {job.id}`" in str(info.value)
    assert not marker.exists()


def test_a_job_of_an_unknown_task_waits_for_a_worker_that_knows_it(
        q, clock, caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    job = T.add.delay(1, 2)
    _bad_tamper(q.path, job.id, "call",
                '{"__task__": "later:task", "args": [1, 2], "kwargs": {}}')
    _bad_tamper(q.path, job.id, "current", "later:task")
    worker = liteq.Worker(q, unknown_grace=60)
    assert worker.run_once()
    assert (job.status, job.waiting, job.attempts, job.started_at) == (
        "pending", "unknown task", 0, None)
    assert job.error.startswith("unknown task 'later:task': not registered")
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test_liteq" in warnings[0]
    assert not worker.run_once()  # it looks again later, not at once
    clock.advance(30)
    assert worker.run_once()  # looked again: still unknown, still waits
    assert job.waiting == "unknown task"
    assert len([r for r in caplog.records
                if r.levelno == logging.WARNING]) == 1  # once per name
    register(q, add, name="later:task")  # a deploy that knows it
    try:
        clock.advance(30)
        assert worker.run_once()
        assert (job.status, job.result(timeout=5)) == ("done", 3)
    finally:
        liteq._PROCESS.tasks.pop("later:task", None)


def test_a_job_of_an_unknown_task_fails_when_its_grace_ends(q, clock):
    job = T.add.delay(1, 2)
    _bad_tamper(q.path, job.id, "call",
                '{"__task__": "gone:task", "args": [], "kwargs": {}}')
    worker = liteq.Worker(q, unknown_grace="1m")
    for _ in range(13):
        worker.run_once()
        clock.advance(5)
    assert job.status == "failed"
    assert job.error.startswith("unknown task 'gone:task'")
    assert job.errors == [job.error]


@pytest.mark.parametrize("grace", [-1, math.inf, "soon", "5x"])
def test_a_bad_unknown_grace_is_refused(q, grace):
    with pytest.raises((TypeError, ValueError)):
        liteq.Worker(q, unknown_grace=grace)


UPGRADE_V1 = "def step(a):\n    return a\n"
UPGRADE_V2 = textwrap.dedent("""
    CALLS = []

    def step(a, b):
        CALLS.append((a, b))
        return a + b
""")


def test_revision_mismatch_fails_at_once_and_the_worker_goes_on(
        q, tmp_path, monkeypatch):
    name = "liteq_test_upgraded_tasks"
    monkeypatch.syspath_prepend(str(tmp_path))
    module_file = tmp_path / f"{name}.py"
    module_file.write_text(UPGRADE_V1)
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    try:
        old = q.task(module.step, retries=3, retry_delay=0)
        job = old.delay(1)
        module_file.write_text(UPGRADE_V2)  # a new revision is deployed
        importlib.invalidate_caches()
        module = importlib.reload(module)
        new = q.task(module.step, retries=3, retry_delay=0)
        assert new.name == old.name == f"{name}:step"
        worker = liteq.Worker(q)
        assert worker.run_once()
        assert job.status == "failed"  # at once: no retries used
        assert job.attempts == 1
        assert f"{name}:step" in job.error
        assert "'b'" in job.error
        assert module.CALLS == []
        later = new.delay(1, 2)
        assert worker.run_once()
        assert later.result(timeout=5) == 3
    finally:
        sys.modules.pop(name, None)


def test_system_exit_in_a_task_fails_the_step_and_worker_goes_on(
        q, start_worker):
    start_worker(q)
    job = T.exit_task.delay(3)
    with pytest.raises(liteq.TaskFailed) as info:
        job.result(timeout=DEADLINE)
    assert str(info.value) == "SystemExit: 3"
    assert T.add.delay(1, 2).result(timeout=DEADLINE) == 3


def test_keyboard_interrupt_releases_the_step_without_failing_it(q):
    job = T.interrupt_once.delay()
    worker = liteq.Worker(q)
    with contextlib.suppress(KeyboardInterrupt):
        worker.run_once()
    assert job.status in ("pending", "running")
    assert job.error is None
    assert job.steps == 0
    assert worker.run_once()
    assert job.result(timeout=5) == "resumed"


def test_keyboard_interrupt_in_a_worker_thread_stops_that_worker(
        q, start_worker, caplog):
    # docs/choices.md: the step is released, a WARNING is logged and the
    # Worker stops claiming, as if stop() had been called.
    caplog.set_level(logging.WARNING, logger="liteq")
    job = T.interrupt_once.delay()
    worker = start_worker(q)
    wait_until(lambda: any("KeyboardInterrupt" in r.getMessage()
                           for r in caplog.records),
               what="the KeyboardInterrupt warning")
    assert worker.stop(timeout=DEADLINE) is True
    assert LOG == [1]  # released, not claimed again by the same worker
    assert job.status in ("pending", "running")
    assert job.error is None
    start_worker(q)
    assert job.result(timeout=DEADLINE) == "resumed"


def test_keyboard_interrupt_counts_the_interrupted_attempt(q):
    job = T.interrupt_once.delay()
    worker = liteq.Worker(q)
    with contextlib.suppress(KeyboardInterrupt):
        worker.run_once()
    assert job.attempts == 1
    assert worker.run_once()
    assert job.result(timeout=5) == "resumed"
    assert LOG == [1, 2]


def test_step_whose_lease_is_lost_max_lost_times_fails_the_job(q, clock):
    job = T.stuck.delay(2)  # lease 10 s, max_lost 2
    first = Background(liteq.Worker(q).run_once)
    GATE.wait_entered()
    clock.advance(11)  # the first worker's lease expires
    second = Background(liteq.Worker(q).run_once)
    GATE.wait_entered()
    assert job.status == "running"
    clock.advance(11)  # ... and the second's
    assert liteq.Worker(q).run_once() is False
    assert job.status == "failed"
    assert job.error == f"worker lost 2 times while running {stored(stuck)}"
    GATE.go.set()
    assert first.join() is True
    assert second.join() is True
    assert job.status == "failed"  # the stale outcomes were refused
    assert GATE.notes[0] < GATE.notes[1]  # the token grew


def test_outcome_of_a_step_whose_lease_was_lost_is_refused(q, clock,
                                                          caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    job = T.stuck.delay(1)  # only the first execution blocks
    stale = Background(liteq.Worker(q).run_once)
    GATE.wait_entered()
    clock.advance(11)
    assert liteq.Worker(q).run_once() is True  # runs the step again
    assert job.result(timeout=5) == 1
    GATE.go.set()
    assert stale.join() is True
    assert job.result(timeout=5) == 1
    assert job.steps == 1
    assert any("lease lost" in r.getMessage() for r in caplog.records)


def test_key_returns_the_unfinished_job_unchanged(q):
    first = T.add.apply_async((1, 2), key="k")
    again = T.add.apply_async((5, 6), key="k")
    other_task = T.hello.apply_async(("x",), key="k", queue="other",
                                     priority=3)
    assert again.id == first.id
    assert other_task.id == first.id
    assert other_task.name == stored(add)
    assert other_task.queue == "default"
    assert first.to_dict()["args"] == [1, 2]
    assert q.counts()["pending"] == 1


def test_key_is_free_again_once_the_job_finishes(q):
    first = T.add.apply_async((1, 2), key="k")
    liteq.Worker(q).run_once()
    second = T.add.apply_async((3, 4), key="k")
    assert second.id != first.id
    assert second.status == "pending"
    cancelled = T.add.apply_async((5, 6), key="c")
    cancelled.cancel()
    assert T.add.apply_async((7, 8), key="c").id != cancelled.id


def test_key_is_unique_when_many_threads_delay_at_once(q):
    barrier = threading.Barrier(8)

    def delay_with_key(n):
        barrier.wait(DEADLINE)
        return T.add.apply_async((n, n), key="once").id

    q.counts()
    callers = [Background(delay_with_key, n) for n in range(8)]
    ids = set(join_all(callers))
    assert len(ids) == 1
    assert len(q.jobs()) == 1


def test_key_in_a_batch_stores_one_job(q):
    with q.batch():
        first = T.add.apply_async((1, 2), key="b")
        second = T.add.apply_async((3, 4), key="b")
    assert first.id == second.id
    assert q.counts()["pending"] == 1


def _hold_write_lock(path):
    conn = sqlite3.connect(path, isolation_level=None,
                           check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_delay_waits_out_a_brief_write_lock(q):
    q.counts()
    holder = _hold_write_lock(q.path)
    release = threading.Timer(0.3, holder.execute, ("COMMIT",))
    release.start()
    try:
        job = T.add.delay(1, 2)  # blocked until the timer commits
    finally:
        release.join()
        holder.close()
    assert job.status == "pending"
    assert q.counts()["pending"] == 1


def test_lock_held_past_busy_timeout_raises_busy(make_queue):
    impatient = make_queue("busy.db", busy_timeout=0.2)
    impatient.counts()
    holder = _hold_write_lock(impatient.path)
    try:
        with pytest.raises(liteq.Busy) as info:
            T.add.delay(1, 2)
        assert not isinstance(info.value, sqlite3.OperationalError)
        assert isinstance(info.value, liteq.Error)
        assert impatient.path in str(info.value)
        assert impatient.counts()["pending"] == 0  # reads still work
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert impatient.counts()["pending"] == 0
    assert T.add.delay(1, 2).status == "pending"


def test_worker_that_meets_busy_retries_and_never_fails_the_job(
        make_queue, start_worker, caplog):
    caplog.set_level(logging.ERROR, logger="liteq")
    impatient = make_queue("busy.db", busy_timeout=0.1)
    job = T.add.delay(1, 2)
    holder = _hold_write_lock(impatient.path)
    try:
        start_worker(impatient)
        wait_until(lambda: any(r.levelno == logging.ERROR
                               for r in caplog.records),
                   what="the worker to log that the file is busy")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert job.result(timeout=DEADLINE) == 3
    assert job.error is None


@pytest.fixture
def drop_file_override():
    """Run a callable where file permissions apply, even to root.

    As root, a 0o444 file is writable; a thread without CAP_DAC_OVERRIDE
    (capabilities are per thread on Linux) sees it as read-only.
    """
    def run(fn):
        if os.geteuid() != 0:
            return fn()
        if not sys.platform.startswith("linux"):
            pytest.skip("needs Linux capabilities to drop root's override")
        libc = ctypes.CDLL(None, use_errno=True)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32),
                        ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        def limited():
            header, data = Header(0x20080522, 0), (Data * 2)()
            if libc.capget(ctypes.byref(header), data) != 0:
                pytest.skip("capget failed")
            data[0].effective &= ~0b1110  # DAC_OVERRIDE, READ_SEARCH, FOWNER
            if libc.capset(ctypes.byref(header), data) != 0:
                pytest.skip("capset failed")
            return fn()

        return Background(limited).join()

    return run


def test_write_to_a_read_only_file_raises_storage_error(q,
                                                        drop_file_override):
    T.add.delay(1, 2)
    q.close()
    os.chmod(q.path, 0o444)

    def attempt():
        try:
            with open(q.path, "r+b"):
                pytest.skip("the file stayed writable")
        except PermissionError:
            pass
        with pytest.raises(liteq.StorageError) as info:
            T.add.delay(3, 4)
        return str(info.value)

    try:
        message = drop_file_override(attempt)
    finally:
        q.close()
        os.chmod(q.path, 0o644)
    assert q.path in message
    assert "readonly" in message or "read-only" in message
    assert q.counts()["pending"] == 1


def test_durable_queue_uses_synchronous_full(tmp_path):
    # Power loss cannot be staged here; the setting that decides it can.
    for durable, expected in ((False, 1), (True, 2)):  # NORMAL, FULL
        queue = liteq.Queue(tmp_path / f"durable-{durable}.db",
                            durable=durable)
        try:
            conn = queue._store.connection()
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == \
                expected
        finally:
            queue.close()


# Claiming ahead, deferred writes, rescues, the lead ------------------------
#
# These tests turn a worker's threads by hand: ``_WorkerThread.run_once(now)``
# and ``_Housekeeper.run_once(now)``, with the store clock (``clock``) and
# the pacing clock (``Pacing``) both fake, and a ``_Tuning`` replaced whole.
# Nothing in them depends on the machine's speed.


class Pacing:
    """A fake pacing clock (the worker's time.monotonic)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def observe(label):
    """Note the label and the job's status as others see it right now."""
    LOG.append((label, liteq.current_job().status))
    return label


def meanwhile(label):
    """Run FLAGS["meanwhile"]() inside the step, then note the label."""
    FLAGS["meanwhile"]()
    LOG.append(label)
    return label


def cancel_self(label):
    """Cancel this job from inside its own step."""
    liteq.current_job().cancel()
    LOG.append(label)
    return label


class HandWorker:
    """A worker whose threads and housekeeper the test turns by hand."""

    def __init__(self, queue, clock, threads=1, unknown_grace=300,
                 **tuning):
        for fn in (observe, meanwhile, cancel_self):
            register(queue, fn)
        self.queue, self.clock, self.pace = queue, clock, Pacing()
        queue.counts()  # the file exists before the housekeeper looks
        self.worker = liteq.Worker(queue, threads=threads,
                                   unknown_grace=unknown_grace)
        self.worker.tuning = liteq._Tuning(**tuning)
        self.crew = self.worker._crew(self.pace)
        self.housekeeper = liteq._Housekeeper(self.crew, [])
        self.crew.housekeeper = self.housekeeper
        self.threads = [liteq._WorkerThread(self.crew, f"t{i}")
                        for i in range(threads)]
        self.housekeeper.threads.extend(self.threads)

    @property
    def thread(self):
        return self.threads[0]

    def turn(self, thread=None):
        """One turn of a thread; what it returned."""
        return (thread or self.thread).run_once(self.clock())

    def turn_until_idle(self, thread=None, limit=10_000):
        """Turn until the thread would wait; what it returned."""
        for _ in range(limit):
            pause = self.turn(thread)
            if pause is None or pause > 0:
                return pause
        pytest.fail("the thread never went idle")

    def close(self):
        self.worker._lead.close()


@pytest.fixture
def hand(q, clock):
    made = []

    def make(**tuning):
        made.append(HandWorker(q, clock, **tuning))
        return made[-1]

    yield make
    for worker in made:
        worker.close()


# Defer from the first step, keep every step short (the pacing clock does
# not move), and let outcomes wait as long as the test likes.
DEFER = {"streak": 0, "group_age": 3600.0, "rescue": 3600.0}


def ready_of(queue, job):
    """A job's place in line (None: out of line), read from the file."""
    conn = sqlite3.connect(queue.path)
    try:
        return conn.execute("SELECT ready FROM liteq_jobs WHERE id = ?",
                            (job.id,)).fetchone()[0]
    finally:
        conn.close()


def paced_steps(n):
    """Take 3 s of the hand worker's pacing clock, then continue n times."""
    FLAGS["pace"].advance(3)
    return T.paced_steps(n - 1) if n else "done"


def messages(caplog, part, level=None):
    return [r.getMessage() for r in caplog.records if part in r.getMessage()
            and (level is None or r.levelno == level)]


def test_a_job_whose_steps_keep_going_logs_progress_every_10_s(
        q, hand, caplog):
    caplog.set_level(logging.DEBUG, logger="liteq")
    register(q, paced_steps, percent=lambda n: 100 * (12 - n) / 12)
    worker = hand()
    FLAGS["pace"] = worker.pace
    job = T.paced_steps.delay(12)  # 13 steps of 3 s each
    worker.turn_until_idle()
    assert job.status == "done"
    name = stored(paced_steps)
    assert messages(caplog, " running: ") == [
        f"job {job.id} running: step 5 of {name}, 33% (12 s)",
        f"job {job.id} running: step 9 of {name}, 67% (24 s)",
        f"job {job.id} running: step 13 of {name}, 100% (36 s)"]
    assert messages(caplog, " running: ", logging.INFO) == messages(
        caplog, " running: ")
    # Every step that continued says so at DEBUG, in place or not.
    assert len(messages(caplog, "continued", logging.DEBUG)) == 12
    assert messages(caplog, "continued", logging.INFO) == []
    assert not worker.thread.progress._jobs  # forgotten once done


def test_progress_lines_leave_out_an_unknown_percent_and_count_waits(
        q, hand, caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    register(q, paced_steps)  # no percent function
    worker = hand()
    FLAGS["pace"] = worker.pace
    job = T.paced_steps.delay(4)  # continues at 3, 6, 9 and 12 s
    # Its steps take no time, but it waits in line behind the other job's:
    # it too is still running 12 s after its first step.
    quick = T.wait.delay(5)
    worker.turn_until_idle()
    assert (job.status, quick.status) == ("done", "done")
    assert messages(caplog, " running: ") == [
        f"job {job.id} running: step 5 of {stored(paced_steps)} (12 s)",
        f"job {quick.id} running: step 6 of {stored(wait)} (12 s)"]
    assert messages(caplog, "continued") == []  # DEBUG only


def test_a_thread_defers_after_a_streak_of_short_steps(q, hand):
    worker = hand(streak=3, batch=8, group_age=3600.0)
    jobs = [T.observe.delay(i) for i in range(20)]
    assert worker.turn_until_idle() == worker.worker.tuning.idle_max
    # Three steps one at a time, their starts written before they ran;
    # then batches of eight, run before anything about them was written.
    assert [status for _, status in LOG] == ["running"] * 3 + [
        "pending"] * 17
    assert [label for label, _ in LOG] == list(range(20))
    for i, job in enumerate(jobs):
        row = job.to_dict()
        assert (row["status"], row["result"], row["steps"], row["attempts"],
                row["worker"]) == ("done", i, 1, 1, None), row
        assert row["created_at"] <= row["started_at"] <= row["finished_at"]


def test_a_batch_is_claimed_at_once_and_its_outcomes_written_together(
        q, hand):
    worker = hand(batch=8, **DEFER)
    jobs = [T.observe.delay(i) for i in range(10)]
    assert worker.turn() == 0  # one claim takes eight
    assert len(worker.thread.ahead) == 8
    assert [job.status for job in jobs] == ["pending"] * 10
    assert [ready_of(q, job) is None for job in jobs] == [True] * 8 + [
        False] * 2
    for _ in range(8):
        assert worker.turn() == 0
    # Eight ran; nothing of them is written yet.
    assert len(LOG) == 8 and len(worker.thread.pending) == 8
    assert [job.status for job in jobs] == ["pending"] * 10
    assert worker.turn() == 0  # one write: eight outcomes, two claims
    assert [job.status for job in jobs] == ["done"] * 8 + ["pending"] * 2


def test_outcomes_wait_at_most_group_age_to_be_written(q, hand):
    worker = hand(streak=0, group_age=0.01, rescue=3600.0)
    first = T.observe.delay("a")
    T.observe.delay("b")
    worker.turn()  # claims both, to run deferred
    worker.turn()  # runs the first
    assert first.status == "pending"
    worker.pace.advance(0.02)  # its outcome is now older than group_age
    worker.turn()  # writes it, with the second's start, then runs that
    assert first.status == "done"
    assert LOG == [("a", "pending"), ("b", "running")]


def test_a_step_that_is_not_short_ends_the_streak(q, hand):
    worker = hand(streak=2, group_age=3600.0, rescue=3600.0, fast=0.5)
    FLAGS["meanwhile"] = lambda: worker.pace.advance(1.0)  # a long step
    T.observe.delay(0), T.observe.delay(1), T.meanwhile.delay("long")
    T.observe.delay(2), T.observe.delay(3)
    worker.turn_until_idle()
    # Two short steps start a streak, the long one ends it: the two after
    # it run one at a time again, their starts written first.
    assert LOG == [(0, "running"), (1, "running"), "long", (2, "running"),
                   (3, "running")]


def test_a_continuing_job_runs_on_in_place_with_a_fresh_token_per_step(
        q, hand):
    worker = hand(**DEFER)
    job = T.count_tokens.delay(99)
    worker.turn_until_idle()
    assert [step for step, _ in LOG] == list(range(1, 101))
    tokens = [token for _, token in LOG]
    assert tokens == sorted(set(tokens))  # grows with every step
    assert (job.steps, job.attempts, job.status) == (100, 1, "done")


def test_a_continuation_goes_behind_the_jobs_claimed_with_it(q, hand):
    worker = hand(**DEFER)
    T.tick.delay("a", 3)
    T.record.delay("b")
    T.record.delay("c")
    worker.turn_until_idle()
    # One claim takes all three; a's next steps wait behind b and c, then
    # run in place once nothing else is ready.
    assert LOG == ["a", "b", "c", "a", "a"]
    assert q.counts()["done"] == 3


def test_a_deferred_step_that_runs_long_is_shown_and_frees_the_jobs_behind(
        q, hand):
    worker = hand(streak=0, group_age=3600.0, rescue=0.05)
    before = [T.record.delay(f"before{i}") for i in range(3)]
    held = T.meanwhile.delay("held")
    behind = [T.record.delay(f"behind{i}") for i in range(4)]
    places = [ready_of(q, job) for job in behind]
    seen = {}

    def housekeeper_looks():
        # Inside the held step: it has run past ``rescue``.
        worker.pace.advance(0.06)
        assert held.status == "pending"  # nothing written about it yet
        worker.housekeeper.run_once(worker.pace())
        seen.update(held=(held.status, held.worker),
                    before=[job.status for job in before],
                    behind=[ready_of(q, job) for job in behind])

    FLAGS["meanwhile"] = housekeeper_looks
    worker.turn_until_idle()
    # The rescue wrote the outcomes before the step, showed it running,
    # and put the jobs claimed behind it back in line at their places.
    assert seen == {"held": ("running", worker.crew.claims.identity),
                    "before": ["done"] * 3, "behind": places}
    assert LOG == [*(f"before{i}" for i in range(3)), "held",
                   *(f"behind{i}" for i in range(4))]
    for job in [*before, held, *behind]:
        assert (job.status, job.attempts, job.steps) == ("done", 1, 1), job


def _fail_starts(path):
    """Make every write of a step's start fail, as a broken disk would."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TRIGGER fail_starts BEFORE UPDATE OF worker ON "
                 "liteq_jobs WHEN NEW.worker IS NOT NULL BEGIN "
                 "SELECT RAISE(ABORT, 'disk I/O error (injected)'); END")
    conn.close()


def _heal(path, trigger):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"DROP TRIGGER {trigger}")
    conn.close()


def test_a_rescue_that_cannot_write_is_tried_again_and_loses_nothing(
        q, hand, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    worker = hand(streak=0, group_age=3600.0, rescue=0.05)
    before = [T.record.delay(f"before{i}") for i in range(3)]
    held = T.meanwhile.delay("held")
    behind = [T.record.delay(f"behind{i}") for i in range(2)]
    seen = []

    def housekeeper_looks():
        _fail_starts(q.path)
        worker.pace.advance(0.06)
        worker.housekeeper.run_once(worker.pace())  # the rescue fails
        seen.append([job.status for job in [*before, held]])
        _heal(q.path, "fail_starts")
        worker.pace.advance(0.06)
        worker.housekeeper.run_once(worker.pace())  # and is tried again
        seen.append([job.status for job in [*before, held]])

    FLAGS["meanwhile"] = housekeeper_looks
    worker.turn_until_idle()
    assert seen == [["pending"] * 4, ["done"] * 3 + ["running"]]
    errors = [r.getMessage() for r in caplog.records
              if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "disk I/O error (injected)" in errors[0]
    assert any("works again" in r.getMessage() for r in caplog.records)
    for job in [*before, held, *behind]:
        assert (job.status, job.attempts, job.steps) == ("done", 1, 1), job


def test_stop_puts_the_jobs_claimed_ahead_back_in_line_unstarted(q, hand):
    worker = hand(**DEFER)
    first = T.record.delay("first")
    behind = [T.record.delay(f"r{i}") for i in range(5)]
    places = [ready_of(q, job) for job in behind]
    worker.turn()  # claims all six
    worker.turn()  # runs the first
    # Claimed ahead: out of line, yet pending for every observer.
    assert [ready_of(q, job) for job in behind] == [None] * 5
    assert [(job.status, job.worker) for job in behind] == [
        ("pending", None)] * 5
    worker.worker._request_stop()
    assert worker.turn() is None  # the outcome written, the rest given back
    assert first.result(timeout=5) == "first"
    assert [ready_of(q, job) for job in behind] == places
    for job in behind:
        row = job.to_dict()
        assert (row["status"], row["attempts"], row["started_at"],
                row["worker"]) == ("pending", 0, None, None), row
    run_all(liteq.Worker(q))
    assert LOG == ["first", *(f"r{i}" for i in range(5))]


def test_a_job_cancelled_while_claimed_ahead_never_runs(q, hand, caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    worker = hand(cancel_look=0.0, **DEFER)
    first, victim, after = (T.record.delay(label)
                            for label in ("first", "victim", "after"))
    worker.turn()  # claims all three
    assert ready_of(q, victim) is None
    assert victim.cancel() is True
    assert victim.status == "cancelled"
    worker.turn_until_idle()
    assert LOG == ["first", "after"]
    assert victim.status == "cancelled" and victim.started_at is None
    assert f"job {victim.id} cancelled before its step started" in [
        r.getMessage() for r in caplog.records]


def test_a_cancel_that_lands_while_a_step_runs_unrecorded_is_logged_as_such(
        q, hand, caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    worker = hand(**DEFER)
    job = T.cancel_self.delay("ran")
    worker.turn_until_idle()
    # The step ran claimed ahead, its start not written: the cancel made
    # the job cancelled at once, and its outcome is discarded.
    assert LOG == ["ran"] and job.status == "cancelled"
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, f"job {job.id} cancelled while claimed; its "
            f"outcome was discarded") in messages
    assert not [m for level, m in messages if level >= logging.WARNING]


def test_steps_claimed_ahead_by_a_worker_that_died_wait_only_the_hold(
        q, hand):
    worker = hand(hold=2.0, **DEFER)
    jobs = [T.record.delay(f"j{i}") for i in range(4)]
    worker.turn()  # claims all four; then the worker "dies"
    assert [ready_of(q, job) for job in jobs] == [None] * 4
    other = liteq.Worker(q)
    assert run_all(other) == 0  # still held
    worker.clock.advance(2.1)  # the hold lapses, not the 60 s lease
    assert run_all(other) == 4
    for job in jobs:
        assert (job.status, job.attempts) == ("done", 1)


def test_the_housekeeper_renews_held_steps_and_logs_a_lost_lease_once(
        q, hand, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    worker = hand(streak=10**9)  # one step at a time, its start written
    job = T.meanwhile.delay("held")
    leases = []

    def meanwhile():
        conn = sqlite3.connect(q.path, isolation_level=None)
        lease = lambda: conn.execute(  # noqa: E731
            "SELECT timer FROM liteq_jobs WHERE id = ?",
            (job.id,)).fetchone()[0]
        for _ in range(2):  # two renewals, 20 s apart (lease 60 s)
            worker.pace.advance(20.0)
            worker.clock.advance(20.0)
            worker.housekeeper.run_once(worker.pace())
            leases.append(lease())
        # Another worker takes the step over; renewals now fail.
        conn.execute("UPDATE liteq_jobs SET token = token + 1 WHERE id = ?",
                     (job.id,))
        for _ in range(3):
            worker.pace.advance(20.0)
            worker.housekeeper.run_once(worker.pace())
        conn.close()

    FLAGS["meanwhile"] = meanwhile
    start = worker.clock()
    worker.turn_until_idle()
    assert leases == [start + 80.0, start + 100.0]
    lost = [r.getMessage() for r in caplog.records if "lease lost" in
            r.getMessage()]
    assert lost == [f"job {job.id}: lease lost while running "
                    f"{T.meanwhile.name} (step 1); its outcome will be "
                    f"discarded"]
    assert job.status == "running"  # the outcome was refused


def test_an_idle_pause_is_measured_on_the_store_clock(q, hand):
    # The store clock is far from the wall clock: the pause to the next
    # timer is still the time between the two, not a negative number.
    worker = hand(idle_max=3600.0)
    T.add.apply_async((1, 2), countdown=100)
    assert worker.turn() == pytest.approx(100.0)


# Several workers on one file: one leads ----------------------------------


def test_the_follower_policy():
    tuning = liteq._Tuning(follow_wait=0.5, follow_load=10, follow_look=0.05)
    hold = liteq._Lead.hold
    assert hold([], 100.0, tuning) == 0.05  # nothing waits: look later
    assert hold([(0, None), (1, None)], 100.0, tuning) == 0.05
    assert hold([(3, 99.9)], 100.0, tuning) == pytest.approx(0.05)
    assert hold([(3, 99.8)], 100.0, tuning) == pytest.approx(0.05)
    assert hold([(3, 99.52)], 100.0, tuning) == pytest.approx(0.02)
    assert hold([(3, 99.5)], 100.0, tuning) is None  # waited follow_wait
    assert hold([(10, 100.0)], 100.0, tuning) is None  # follow_load wait
    assert hold([(1, 101.0)], 100.0, tuning) == 0.05  # a timer not due
    assert hold([(2, 100.0), (1, 99.0)], 100.0, tuning) is None


def test_a_follower_leaves_the_line_to_the_lead_until_it_needs_help(
        q, hand):
    lead = hand(follow_load=3, follow_wait=0.5, **DEFER)
    follower = hand(follow_load=3, follow_wait=0.5, **DEFER)
    assert lead.turn() == lead.worker.tuning.idle_max  # takes the lead
    few = [T.record.delay(f"j{i}") for i in range(2)]
    # Two wait, for no time yet: the follower leaves them to the lead.
    assert follower.turn() == pytest.approx(0.05)
    assert [ready_of(q, job) is not None for job in few] == [True, True]
    more = T.record.delay("j2")  # three wait: the line needs help
    assert follower.turn() == 0
    assert [ready_of(q, job) for job in [*few, more]] == [None] * 3
    follower.turn_until_idle()
    assert LOG == ["j0", "j1", "j2"]
    # In its help window it claims a lone job without looking.
    assert follower.thread.helping == follower.pace() + 0.5
    T.record.delay("j3")
    follower.turn_until_idle()
    assert LOG[-1] == "j3"
    # Once the window is over, a lone job is the lead's again.
    follower.pace.advance(0.6)
    late = T.record.delay("late")
    assert follower.turn() == pytest.approx(0.05)
    assert late.status == "pending" and ready_of(q, late) is not None
    lead.turn_until_idle()
    assert LOG[-1] == "late"


def test_a_follower_helps_once_a_job_has_waited_follow_wait(q, hand):
    lead = hand(follow_wait=0.5, **DEFER)
    follower = hand(follow_wait=0.5, **DEFER)
    lead.turn()
    job = T.record.delay("waited")
    assert follower.turn() == pytest.approx(0.05)
    follower.clock.advance(0.47)  # the store clock: how long it waited
    assert follower.turn() == pytest.approx(0.03)  # looks when it is due
    follower.clock.advance(0.03)
    follower.turn_until_idle()
    assert job.status == "done" and LOG == ["waited"]


def test_a_lead_whose_threads_all_run_long_steps_lets_another_lead(
        q, hand):
    worker = hand(streak=10**9, rescue=0.05)
    seen = []

    def meanwhile():
        assert worker.crew.lead.held
        worker.pace.advance(0.06)
        worker.housekeeper.run_once(worker.pace())
        seen.append(worker.crew.lead.held)

    FLAGS["meanwhile"] = meanwhile
    T.meanwhile.delay("long")
    worker.turn_until_idle()
    assert seen == [False]  # it let go while the step ran
    assert worker.crew.lead.take()  # and leads again once it claims


def test_a_lead_that_runs_only_short_steps_keeps_the_lead(q):
    # Real threads: of two workers, every job runs in the lead's thread
    # (the follower never finds a job that waited, nor a thousand).
    lead, follower = liteq.Worker(q), liteq.Worker(q)
    lead.tuning = liteq._Tuning(rescue=3600.0)
    follower.tuning = liteq._Tuning(follow_wait=3600.0, follow_load=10**9)
    with lead:
        wait_until(lambda: lead._lead.held, what="the first to lead")
        with follower:
            jobs = [T.whose_thread.delay(f"j{i}") for i in range(20)]
            assert [job.result(timeout=30) for job in jobs] == [
                f"j{i}" for i in range(20)]
    assert len({ident for _, ident in LOG}) == 1, LOG


# Idle threads wake for commits --------------------------------------------


def _make_due_elsewhere(path, job_id):
    """Make a job's timer due through a plain sqlite3 connection: a commit
    that, like another process's, rings nothing in this process."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("UPDATE liteq_jobs SET timer = 0 WHERE id = ?",
                     (job_id,))
    finally:
        conn.close()


def _idle_threads(worker):
    return [unit for unit in worker._running.housekeeper.threads
            if unit.idle and unit.settle is None]


def _wait_asleep(worker):
    """Wait until every thread of ``worker`` waits for a commit, past the
    looks that follow a stream of writes.  A commit that lands before a
    thread enters its select() still wakes it: the watch keeps it."""
    wait_until(lambda: len(_idle_threads(worker)) == worker.threads,
               what="the worker to go idle")


@pytest.mark.parametrize("mode", ["inotify, 1 thread", "inotify, 2 threads",
                                  "poll"])
def test_an_idle_worker_wakes_for_another_connections_commit(q, mode):
    # With idle waits of an hour, only the wake-up under test can start
    # the jobs: each thread waits on the -wal file's inotify watch and on
    # this process's wake-ups in one select(), or polls data_version.
    worker = liteq.Worker(q, threads=2 if "2" in mode else 1)
    worker.tuning = liteq._Tuning(idle_max=3600.0,
                                  inotify=mode != "poll")
    with worker:
        if sys.platform.startswith("linux"):
            assert (worker._running.watch is None) == (mode == "poll")
        for n in range(3):
            job = T.add.apply_async((n, 1), countdown=3600)
            _wait_asleep(worker)
            _make_due_elsewhere(q.path, job.id)
            assert job.result(timeout=30) == n + 1


def test_an_idle_worker_still_hears_other_processes_after_the_wal_is_gone(
        q):
    # Closing every connection to the file deletes its -wal; the next
    # commit makes a new one, which the watch must follow.
    worker = liteq.Worker(q)
    worker.tuning = liteq._Tuning(idle_max=3600.0)
    with worker:
        for n in range(2):
            job = T.add.apply_async((n, 1), countdown=3600)
            _wait_asleep(worker)
            q.close()  # the worker's connection too: the -wal goes
            _wait_asleep(worker)
            _make_due_elsewhere(q.path, job.id)
            assert job.result(timeout=30) == n + 1


def test_an_idle_worker_wakes_at_once_for_its_own_process(q):
    worker = liteq.Worker(q)
    worker.tuning = liteq._Tuning(idle_max=3600.0)
    worker.start()
    for n in range(3):
        _wait_asleep(worker)
        assert T.add.delay(n, 1).result(timeout=30) == n + 1
    _wait_asleep(worker)
    # A stop writes nothing: only this process's wake-up ends the wait.
    assert worker.stop(timeout=30)


# Faults are logged quietly ------------------------------------------------


def test_a_lasting_fault_is_logged_when_it_starts_then_and_when_it_ends(
        caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    pace = Pacing()
    fault = liteq._Fault("cannot write things", pace)
    delays = []
    for _ in range(600):  # a failure every 0.5 s for 300 s
        delays.append(fault.failed(OSError("disk full")))
        pace.advance(0.5)
    fault.ok()
    fault.ok()  # nothing more to say
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("ERROR", "cannot write things: disk full; retrying")
    # Then every 10, 20, 40, 80 s (the report period doubles), counted.
    assert [m for _, m in lines[1:-1]] == [
        f"cannot write things: disk full ({n} failures in {s}s); still "
        f"retrying" for n, s in ((21, 10), (61, 30), (141, 70),
                                 (301, 150))]
    assert lines[-1] == ("WARNING", "cannot write things: works again "
                         "after 600 failure(s) in 300.0s")
    assert all(0 < delay <= 2.0 for delay in delays)


def test_a_worker_whose_lease_writes_fail_logs_it_once_not_every_beat(
        q, start_worker, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    register(q, gated, lease=0.3)  # renewed every 0.1 s
    job = T.gated.delay("finish")
    worker = liteq.Worker(q)
    worker.tuning = liteq._Tuning(streak=10**9)
    try:
        worker.start()
        GATE.wait_entered()
        conn = sqlite3.connect(q.path, isolation_level=None)
        conn.execute("CREATE TRIGGER fail_leases BEFORE UPDATE OF timer ON "
                     "liteq_jobs BEGIN SELECT RAISE(ABORT, 'disk I/O "
                     "error (injected)'); END")
        conn.close()
        fault = worker._running.lease_fault
        wait_until(lambda: fault.count >= 5, what="five failed renewals")
        _heal(q.path, "fail_leases")
        wait_until(lambda: fault.count == 0, what="a renewal that works")
        GATE.go.set()
        assert job.result(timeout=30) == "finished anyway"
    finally:
        GATE.go.set()
        assert worker.stop(timeout=30)
    messages = [r.getMessage() for r in caplog.records
                if "leases" in r.getMessage()]
    assert len(messages) == 2, messages
    assert "disk I/O error (injected); retrying" in messages[0]
    assert "works again after" in messages[1]


# A worker started in a forked child ---------------------------------------


def whose_worker():
    return liteq.current_job().worker


def test_a_worker_started_in_a_forked_child_records_the_childs_pid(q):
    register(q, whose_worker)
    job = T.whose_worker.delay()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with liteq.Worker(q):
                job.result(timeout=30)
            code = 0
        finally:
            os._exit(code)
    assert reap(pid) == 0
    assert job.result(timeout=5) == f"{socket.gethostname()}:{pid}"


# Stopping and dying with steps held, in real worker processes -------------

HELD_TASKS = r'''
import os
import signal
import time

from liteq import task

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.path.join(HERE, name)


@task(lease=2.0)
def hold(name):
    """Note that the step started, then wait for NAME.go."""
    open(_flag(name + ".started"), "w").close()
    while not os.path.exists(_flag(name + ".go")):
        time.sleep(0.01)
    return name


@task(lease=60.0)
def short(n, die_at):
    """A short step; the first time it runs as job number die_at, its
    worker is killed (kill -9) in the middle of the batch it claimed."""
    if n == die_at and not os.path.exists(_flag("died")):
        open(_flag("died"), "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return n
'''


def _held_setup(tmp_path):
    (tmp_path / "heldtasks.py").write_text(HELD_TASKS)
    return tmp_path / "held.db"


def _held_delay(tmp_path, db, body):
    env = subprocess_env()
    env["LITEQ_DB"] = str(db)
    done = subprocess.run(
        [sys.executable, "-c", f"import heldtasks\n{body}"], cwd=tmp_path,
        env=env, capture_output=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr.decode()


def _held_worker(tmp_path, db, procs, name):
    err_path = tmp_path / f"{name}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "liteq", "run", "heldtasks", "--db",
             str(db), "--log-level", "INFO"],
            cwd=tmp_path, env=subprocess_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err)
    proc.stderr_path = err_path
    procs.append(proc)
    return proc


def _corrupt_page(conn, db):
    """Fill the jobs table's page in the file with garbage, as a failing
    disk would, and make every reader drop the pages it cached.

    The WAL is checkpointed into the file first and the page replaced
    under the write lock, so no frame in the WAL hides it; a commit to
    another table then tells every connection its cache is stale.
    """
    root, = conn.execute("SELECT rootpage FROM sqlite_master "
                         "WHERE name = 'liteq_jobs'").fetchone()
    size, = conn.execute("PRAGMA page_size").fetchone()

    def locked_with_empty_wal():
        if conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            return False  # a reader or writer was in the way
        conn.execute("BEGIN IMMEDIATE")
        if os.path.getsize(f"{db}-wal") == 0:
            return True
        conn.execute("ROLLBACK")  # a write came in between: again
        return False

    wait_until(locked_with_empty_wal, what="a quiet moment to damage")
    with open(db, "r+b") as fh:
        fh.seek((root - 1) * size)
        _SAVED_PAGES[str(db)] = ((root - 1) * size, fh.read(size))
        fh.seek((root - 1) * size)
        fh.write(b"\xff" * size)
    # A change, so that it reaches the WAL (one that changes nothing is
    # not written); _restore_page takes it back.
    conn.execute("UPDATE sqlite_sequence SET seq = seq + 1")
    conn.execute("COMMIT")
    assert os.path.getsize(f"{db}-wal") > 0


def _restore_page(conn, db):
    offset, page = _SAVED_PAGES.pop(str(db))
    conn.execute("BEGIN IMMEDIATE")
    with open(db, "r+b") as fh:
        fh.seek(offset)
        fh.write(page)
    conn.execute("UPDATE sqlite_sequence SET seq = seq - 1")
    conn.execute("COMMIT")


_SAVED_PAGES = {}

# Writes that fail as a broken disk's would: every UPDATE is refused, a
# column the outcome writes is gone, or the page that holds the job is
# garbage.  Each is (break, heal): SQL, or a function of (conn, db).
STORAGE_FAULTS = {
    "refused writes": ("CREATE TRIGGER broken BEFORE UPDATE ON liteq_jobs "
                       "BEGIN SELECT RAISE(ABORT, 'disk I/O error "
                       "(injected)'); END", "DROP TRIGGER broken"),
    "a dropped column": ("ALTER TABLE liteq_jobs DROP COLUMN percent",
                         "ALTER TABLE liteq_jobs ADD COLUMN percent REAL"),
    "a corrupted page": (_corrupt_page, _restore_page),
}

#: What the worker's log says of each.
STORAGE_FAULT_LINES = {
    "refused writes": "disk I/O error (injected)",
    "a dropped column": "percent",
    "a corrupted page": "is damaged (database disk image is malformed)",
}


def _storage_fault(conn, db, action):
    if callable(action):
        action(conn, db)
    else:
        conn.execute(action)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="signals and /proc")
@pytest.mark.parametrize("fault", sorted(STORAGE_FAULTS))
def test_sigterm_stops_a_worker_whose_writes_fail(tmp_path, fault):
    db = _held_setup(tmp_path)
    _held_delay(tmp_path, db, "heldtasks.hold.delay('a')")
    procs = []
    queue = liteq.Queue(db)
    try:
        worker = _held_worker(tmp_path, db, procs, "w1")
        wait_until(lambda: (tmp_path / "a.started").exists(),
                   what="the step to start", alive=[worker])
        breaks, heals = STORAGE_FAULTS[fault]
        conn = sqlite3.connect(db, isolation_level=None, timeout=30)
        _storage_fault(conn, db, breaks)
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: "signal 15" in _chaos_stderr(worker),
                   what="the worker to take the signal", alive=[worker])
        (tmp_path / "a.go").touch()  # the step ends; its outcome can't
        # be written, and the stop does not wait for the disk.
        assert _chaos_exit(worker, None, "worker after SIGTERM") == 1
        err = _chaos_stderr(worker)
        assert "worker stopping without writing 1 step(s)" in err, err
        assert STORAGE_FAULT_LINES[fault] in err, err
        assert "Traceback" not in err, err
        _storage_fault(conn, db, heals)
        conn.close()
        # The step runs again once its lease (2 s) expires.
        again = _held_worker(tmp_path, db, procs, "w2")
        wait_until(lambda: queue.get(1).status == "done",
                   what="the job to finish", alive=[again])
        assert queue.get(1).attempts == 2
    finally:
        _chaos_reap(procs)
        queue.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="signals and /proc")
def test_jobs_claimed_by_a_worker_killed_mid_batch_wait_only_seconds(
        tmp_path):
    db = _held_setup(tmp_path)
    # 60 short jobs of lease 60 s; the 30th kills its worker, which by
    # then runs them in claimed batches, their starts unwritten.
    _held_delay(tmp_path, db, "with __import__('liteq').default_queue()"
                ".batch():\n    for n in range(60):\n"
                "        heldtasks.short.delay(n, 30)")
    procs = []
    queue = liteq.Queue(db)
    try:
        first = _held_worker(tmp_path, db, procs, "w1")
        assert _chaos_exit(first, None, "the worker that kills itself") \
            == -signal.SIGKILL
        pending = queue.counts()["pending"]
        assert pending > 1, queue.counts()  # a batch was held unstarted
        # Not the 60 s lease: the jobs it held unstarted (and the step it
        # ran unrecorded) come back after their 2 s claim.
        second = _held_worker(tmp_path, db, procs, "w2")
        wait_until(lambda: queue.counts()["done"] == 60,
                   what="every job to finish", timeout=30, alive=[second])
        lost = [job for job in queue.jobs(limit=100) if job.attempts != 1]
        assert lost == [], [job.to_dict() for job in lost]
    finally:
        _chaos_reap(procs)
        queue.close()


# 6b. Multi-process guarantees: kill -9, SIGSTOP, signals, contention -----
# Multi-process guarantee tests for liteq (SPEC section 6).
#
# Real worker processes (``python -m liteq run``) share one database file
# while the tests kill them with SIGKILL, freeze them with SIGSTOP, stop them
# with SIGTERM/SIGINT, flood the file with producers and delete it under
# them.  The task module is written into ``tmp_path`` at run time; every
# execution of a step appends ``start``/``end`` lines to ``chaos.log`` next
# to it (one ``os.write`` on an ``O_APPEND`` descriptor per line, so lines
# from different processes never interleave), stamped with
# ``time.monotonic_ns()``, which on Linux is one clock for every process.
#
# Every wait polls a condition (``wait_until``) up to ``DEADLINE``; every
# subprocess is killed in a ``finally`` block.


CHAOS_LINUX = sys.platform.startswith("linux")
CHAOS_JOBS = 40  # jobs in the kill -9 test
CHAOS_STEPS = 35  # continuations per job there (CHAOS_STEPS + 1 steps)
CHAOS_KILLS = 15  # SIGKILLs the killer loop sends
CHAOS_WORKERS = 3

# The task module the workers import (``python -m liteq run chaostasks``).
CHAOS_TASKS = r'''
import os
import random
import time

from liteq import current_job, task

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chaos.log")


def mark(kind):
    """Append 'KIND JOB STEP PID TOKEN MONOTONIC_NS' as one atomic write."""
    job = current_job()
    line = "%s %d %d %d %d %d\n" % (kind, job.id, job.step, os.getpid(),
                                    job.token, time.monotonic_ns())
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@task(lease=1.5, max_lost=1000)
def step(key, n, trail, long_step=0):
    """One of n + 1 steps; step number long_step outlasts the lease."""
    mark("start")
    if current_job().step == long_step:
        time.sleep(1.8)  # only the heartbeat keeps other workers off
    else:
        time.sleep(random.uniform(0.01, 0.03))
    trail = trail + [current_job().step]
    mark("end")
    if n > 0:
        return step(key, n - 1, trail, long_step)
    return {"key": key, "trail": trail}


@task(lease=1.0, max_lost=1000)
def brief(key, n, trail):
    """A step of about half a millisecond: workers defer its writes."""
    mark("start")
    time.sleep(0.0003)
    trail = trail + [current_job().step]
    mark("end")
    if n > 0:
        return brief(key, n - 1, trail)
    return {"key": key, "trail": trail}


@task(lease=1.0)
def slow(n, pids):
    mark("start")
    time.sleep(0.5)
    pids = pids + [os.getpid()]
    mark("end")
    if n > 0:
        return slow(n - 1, pids)
    return {"pids": pids}


@task(lease=1.5)
def nap(first, later):
    """Sleep `first` seconds on the first attempt, `later` on the others."""
    job = current_job()
    mark("start")
    time.sleep(first if job.attempt == 1 else later)
    mark("end")
    return {"attempt": job.attempt, "pid": os.getpid()}


@task
def quick(value, hops):
    if hops > 0:
        return quick(value, hops - 1)
    return value * 2
'''

# A producer's own task module: registers a name no worker imports.
CHAOS_ROGUE = r'''
from liteq import task


@task(name="os:system")
def rogue(command):
    raise AssertionError("a worker must never run this")
'''

# Run with cwd=tmp_path and LITEQ_DB set; BODY appends to `out`.
CHAOS_PRODUCER = r'''
import json
import liteq
import chaostasks
out = []
{body}
print(json.dumps(out))
'''

# Waits for the shared start time, then stores one job.
CHAOS_OPENER = r'''
import sys, time
import chaostasks
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
chaostasks.quick(1, 0).delay()
'''


# Helpers ------------------------------------------------------------------


def _chaos_setup(tmp_path):
    (tmp_path / "chaostasks.py").write_text(CHAOS_TASKS)
    (tmp_path / "chaosrogue.py").write_text(CHAOS_ROGUE)
    return tmp_path / "chaos.db"


def _chaos_worker(tmp_path, db, procs, name, *extra):
    """Start `python -m liteq run chaostasks`; stderr goes to NAME.err."""
    err_path = tmp_path / f"{name}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "liteq", "run", "chaostasks", "--db",
             str(db), "--log-level", "INFO", *extra],
            cwd=tmp_path, env=subprocess_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err)
    proc.stderr_path = err_path
    procs.append(proc)
    return proc


def _chaos_producer(tmp_path, db, body, procs=None):
    """Run BODY in a producer process; Popen if procs is given, else run."""
    env = subprocess_env()
    env["LITEQ_DB"] = str(db)
    argv = [sys.executable, "-c", CHAOS_PRODUCER.format(body=body)]
    if procs is None:
        done = subprocess.run(argv, cwd=tmp_path, env=env,
                              capture_output=True, timeout=DEADLINE)
        assert done.returncode == 0 and not done.stderr, done.stderr.decode()
        return json.loads(done.stdout)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    return proc


def _chaos_reap(procs):
    """Kill whatever is still running (stopped ones too) and wait."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            pass


def _chaos_stderr(proc):
    return proc.stderr_path.read_text(errors="replace")


def _chaos_exit(proc, sig, what, timeout=DEADLINE):
    """Send sig (if not None) and wait for the process to exit."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} (pid {proc.pid}) did not exit within "
                             f"{timeout:g}s; stderr tail:\n"
                             + _chaos_stderr(proc)[-3000:]) from None


def _chaos_executions(tmp_path):
    """Parse chaos.log into {(job, token): execution dict}."""
    path = tmp_path / "chaos.log"
    if not path.exists():
        return {}
    text = path.read_text()
    executions = {}
    for line in text.split("\n")[:-1]:  # a last piece may be half written
        kind, job, step, pid, token, ns = line.split()
        ex = executions.setdefault((int(job), int(token)), {
            "job": int(job), "step": int(step), "pid": int(pid),
            "token": int(token), "start": None, "end": None})
        assert ex["pid"] == int(pid) and ex["step"] == int(step), line
        assert ex[kind] is None, f"two {kind} lines for one claim: {line}"
        ex[kind] = int(ns)
    return executions


def _chaos_open(tmp_path, pid):
    """The execution pid has started but not ended, or None."""
    for ex in _chaos_executions(tmp_path).values():
        if ex["pid"] == pid and ex["start"] is not None and ex["end"] is None:
            return ex
    return None


def _chaos_stopped(pid):
    """True once the kernel reports the process as stopped (SIGSTOP)."""
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def _chaos_write_locked(db):
    """True if another process holds the database's write lock."""
    conn = sqlite3.connect(str(db), timeout=0.3, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def _chaos_result(queue, job_id, alive, timeout=DEADLINE):
    """Wait for a job to finish while its workers live; return result()."""
    job = queue.get(job_id)
    wait_until(lambda: job.status in ("done", "failed", "cancelled"),
               what=f"job {job_id} to finish", timeout=timeout, alive=alive)
    return job.result(timeout=1)


def _chaos_kill_loop(tmp_path, db, procs, queue, ids, slots, kills, rng,
                     count, pause):
    """kill -9 a random worker of ``slots`` every ``pause`` (a range of
    seconds) and restart it, ``count`` times or until the jobs finish.
    Records pid -> monotonic_ns in ``kills`` once each is reaped."""
    deadline = time.monotonic() + DEADLINE
    while len(kills) < count and time.monotonic() < deadline:
        time.sleep(rng.uniform(*pause))
        if _chaos_all_finished(queue, ids):
            break
        i = rng.randrange(len(slots))
        victim = slots[i]
        assert victim.poll() is None, (
            f"worker {victim.pid} exited by itself with "
            f"{victim.returncode}:\n{_chaos_stderr(victim)[-3000:]}")
        victim.kill()
        victim.wait(DEADLINE)
        kills[victim.pid] = time.monotonic_ns()
        assert victim.returncode == -signal.SIGKILL
        slots[i] = _chaos_worker(tmp_path, db, procs, f"w{i}-{len(kills)}")


def _chaos_all_finished(queue, ids):
    counts = queue.counts()
    return counts["done"] + counts["failed"] + counts["cancelled"] >= len(
        ids)


# 6b.1 kill -9 chaos --------------------------------------------------------


@pytest.mark.skipif(not CHAOS_LINUX, reason="needs Linux (monotonic clock "
                                            "shared by processes, /proc)")
def test_chaos_kill9_loses_nothing_and_never_overlaps(tmp_path):
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills = {}  # pid -> monotonic_ns once the kernel had reaped it
    try:
        ids = _chaos_producer(tmp_path, db, (
            f"for k in range({CHAOS_JOBS}):\n"
            f"    long_step = 5 + k // 2 if k % 5 == 0 else 0\n"
            f"    out.append(chaostasks.step('job%d' % k, {CHAOS_STEPS}, [],"
            f" long_step).delay().id)"))
        assert len(set(ids)) == CHAOS_JOBS
        slots = [_chaos_worker(tmp_path, db, procs, f"w{i}")
                 for i in range(CHAOS_WORKERS)]
        _chaos_kill_loop(tmp_path, db, procs, queue, ids, slots, kills,
                         rng, CHAOS_KILLS, (0.2, 0.8))

        try:
            wait_until(lambda: _chaos_all_finished(queue, ids),
                       what="every job to finish after the kills", alive=slots)
            unfinished = None
        except AssertionError as exc:
            unfinished = str(exc)  # check the log first: it says why
        for proc in slots:
            if unfinished is None:
                assert _chaos_exit(proc, signal.SIGTERM, "worker") == 0
            else:
                proc.kill()
                proc.wait(DEADLINE)
                kills[proc.pid] = time.monotonic_ns()

        # Executions: one per claim that reached user code.
        executions = _chaos_executions(tmp_path)
        interrupted = 0
        by_job = {}
        for ex in executions.values():
            if ex["end"] is None:
                assert ex["pid"] in kills, (
                    f"execution without an end in a worker that was never "
                    f"killed: {ex}")
                ex["end"] = kills[ex["pid"]]
                ex["killed"] = True
                interrupted += 1
            by_job.setdefault(ex["job"], []).append(ex)
        stale = [line for p in procs for line in _chaos_stderr(p).splitlines()
                 if "lease lost" in line]
        for job_id, runs in by_job.items():
            runs.sort(key=lambda ex: ex["start"])
            last_end, last = None, None
            for ex in runs:
                # Guarantee 2: never two executions of a job at once.
                assert last_end is None or ex["start"] >= last_end, (
                    f"job {job_id}: execution {ex} started before {last} "
                    f"ended (seed {seed}); 'lease lost' lines: {stale[:5]}")
                # Guarantee 3: once a later step ran, no earlier one runs.
                assert last is None or ex["step"] >= last["step"], (
                    f"job {job_id}: step {ex['step']} ran after step "
                    f"{last['step']}: {ex} after {last}")
                if last_end is None or ex["end"] > last_end:
                    last_end, last = ex["end"], ex
        assert unfinished is None, (unfinished, queue.counts())

        # Guarantee 1: every job done, each step counted exactly once.
        assert set(by_job) == set(ids)
        for k, job_id in enumerate(ids):
            job = queue.get(job_id)
            assert job.result(timeout=10) == {
                "key": f"job{k}",
                "trail": list(range(1, CHAOS_STEPS + 2))}, job.to_dict()
            assert job.status == "done"
            assert job.steps == CHAOS_STEPS + 1, job.to_dict()
            finished = {ex["step"] for ex in by_job[job_id]
                        if not ex.get("killed")}
            assert finished == set(range(1, CHAOS_STEPS + 2)), job_id
        for proc in procs:
            text = _chaos_stderr(proc)
            assert "Traceback" not in text and "locked" not in text, text
        print(f"\nCHAOS kills={len(kills)} jobs={CHAOS_JOBS} "
              f"steps={CHAOS_JOBS * (CHAOS_STEPS + 1)} "
              f"executions={len(executions)} interrupted={interrupted} "
              f"seed={seed}")
        assert len(kills) == CHAOS_KILLS, (
            f"the jobs finished after only {len(kills)} kills")
    finally:
        _chaos_reap(procs)
        queue.close()


def test_chaos_kill9_with_short_steps_written_late_loses_nothing(tmp_path):
    """kill -9 while workers run short steps whose writes are deferred.

    Steps ran but not yet written run again (at-least-once); what is
    stored stays exact: every job done, each step in its trail once.
    """
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Two long jobs first, one per worker, each run on in place (nothing
    # of their priority waits); then many short jobs claimed in batches.
    lengths = [1500, 1500] + [200] * 20
    kills = {}
    try:
        ids = _chaos_producer(tmp_path, db, (
            f"for k, n in enumerate({lengths}):\n"
            f"    out.append(chaostasks.brief('job%d' % k, n - 1, [])"
            f".apply_async(priority=5 if n > 200 else 0).id)"))
        slots = [_chaos_worker(tmp_path, db, procs, f"w{i}")
                 for i in range(2)]
        _chaos_kill_loop(tmp_path, db, procs, queue, ids, slots, kills,
                         rng, 8, (0.1, 0.3))
        wait_until(lambda: _chaos_all_finished(queue, ids),
                   what="every job to finish after the kills", alive=slots)
        for proc in slots:
            assert _chaos_exit(proc, signal.SIGTERM, "worker") == 0

        by_job = {}
        for ex in _chaos_executions(tmp_path).values():
            if ex["end"] is None:
                assert ex["pid"] in kills, ex
                ex["end"] = kills[ex["pid"]]
            by_job.setdefault(ex["job"], []).append(ex)
        for job_id, runs in by_job.items():
            runs.sort(key=lambda ex: ex["start"])
            for before, after in zip(runs, runs[1:]):
                assert after["start"] >= before["end"], (
                    f"job {job_id}: {after} started before {before} ended "
                    f"(seed {seed})")
        for k, (job_id, steps) in enumerate(zip(ids, lengths)):
            job = queue.get(job_id)
            assert job.result(timeout=10) == {
                "key": f"job{k}", "trail": list(range(1, steps + 1))}
            assert (job.status, job.steps) == ("done", steps), job.to_dict()
        for proc in procs:
            text = _chaos_stderr(proc)
            assert "Traceback" not in text and "locked" not in text, text
        runs = sum(len(r) for r in by_job.values())
        print(f"\nCHAOS short steps: kills={len(kills)} "
              f"steps={sum(lengths)} executions={runs} seed={seed}")
        assert len(kills) >= 3, f"the jobs finished after {len(kills)} kills"
    finally:
        _chaos_reap(procs)
        queue.close()


# 6b.2 SIGSTOP: a stale worker's outcome is refused -------------------------


@pytest.mark.skipif(not CHAOS_LINUX, reason="needs Linux (/proc, SIGSTOP)")
def test_chaos_sigstop_stale_worker_outcome_is_refused(tmp_path):
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    try:
        (job_id,) = _chaos_producer(
            tmp_path, db, "out.append(chaostasks.slow(5, []).delay().id)")
        job = queue.get(job_id)
        a = _chaos_worker(tmp_path, db, procs, "a")

        # Freeze A inside a step: after its start line, before its end
        # line, and not while it holds the write lock (a frozen writer
        # would block every process, which no lease can help).
        target = None
        deadline = time.monotonic() + DEADLINE
        while target is None:
            assert time.monotonic() < deadline, "A never ran a step"
            ex = wait_until(lambda: _chaos_open(tmp_path, a.pid),
                            what="A to start a step")
            a.send_signal(signal.SIGSTOP)
            wait_until(lambda: _chaos_stopped(a.pid), what="A to stop")
            still = _chaos_executions(tmp_path)[ex["job"], ex["token"]]
            if still["end"] is None and not _chaos_write_locked(db):
                target = still
                break
            a.send_signal(signal.SIGCONT)  # missed: try the next step
            wait_until(lambda: _chaos_executions(tmp_path)[
                ex["job"], ex["token"]]["end"], what="A to end that step")
        s = target["step"]

        b = _chaos_worker(tmp_path, db, procs, "b")
        # B presumes A dead once the lease runs out, runs step s, commits.
        wait_until(lambda: job.steps >= s, what=f"B to commit step {s}",
                   alive=[b])
        b_runs = [ex for ex in _chaos_executions(tmp_path).values()
                  if ex["pid"] == b.pid and ex["step"] == s]
        assert len(b_runs) == 1 and b_runs[0]["end"] is not None, b_runs
        assert _chaos_executions(tmp_path)[
            target["job"], target["token"]]["end"] is None, "A ran on"

        a.send_signal(signal.SIGCONT)
        result = _chaos_result(queue, job_id, [a, b])
        assert job.steps == 6, job.to_dict()
        pids = result["pids"]
        assert len(pids) == 6, result
        assert pids[:s - 1] == [a.pid] * (s - 1), (s, result, a.pid)
        assert pids[s - 1] == b.pid, (
            f"step {s} was recorded from {pids[s - 1]}, not from B "
            f"({b.pid}); A is {a.pid}")
        assert set(pids) <= {a.pid, b.pid}, result

        # A finished its stale execution, logged "lease lost" and went on.
        wait_until(lambda: _chaos_executions(tmp_path)[
            target["job"], target["token"]]["end"], what="A to end its step")
        wait_until(lambda: [line for line in _chaos_stderr(a).splitlines()
                            if "WARNING" in line and "lease lost" in line],
                   what="A to log 'lease lost' at WARNING")
        assert a.poll() is None, _chaos_stderr(a)
        assert _chaos_exit(b, signal.SIGTERM, "worker B") == 0
        (later,) = _chaos_producer(
            tmp_path, db, "out.append(chaostasks.quick(21, 1).delay().id)")
        assert _chaos_result(queue, later, [a]) == 42
        assert _chaos_exit(a, signal.SIGTERM, "worker A") == 0
        for proc in (a, b):
            assert "Traceback" not in _chaos_stderr(proc)
    finally:
        _chaos_reap(procs)
        queue.close()


# 6b.3 SIGTERM finishes the step; a second signal exits at once -------------


def test_chaos_graceful_shutdown_then_second_signal(tmp_path):
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    try:
        # SIGTERM during a 2 s step: the step ends, exit status 0.
        (first,) = _chaos_producer(
            tmp_path, db, "out.append(chaostasks.nap(2.0, 0.0).delay().id)")
        w1 = _chaos_worker(tmp_path, db, procs, "w1")
        ex = wait_until(lambda: _chaos_open(tmp_path, w1.pid),
                        what="the 2 s step to start")
        assert _chaos_exit(w1, signal.SIGTERM, "worker after SIGTERM") == 0
        end = _chaos_executions(tmp_path)[ex["job"], ex["token"]]["end"]
        assert end is not None, "SIGTERM interrupted the running step"
        job = queue.get(first)
        assert job.status == "done", job.to_dict()
        assert job.result(timeout=1) == {"attempt": 1, "pid": w1.pid}
        assert "Traceback" not in _chaos_stderr(w1)

        # SIGINT twice during a 10 s step: exit 130 at once, step unfinished.
        (second,) = _chaos_producer(
            tmp_path, db, "out.append(chaostasks.nap(10.0, 0.0).delay().id)")
        w2 = _chaos_worker(tmp_path, db, procs, "w2")
        ex = wait_until(lambda: _chaos_open(tmp_path, w2.pid),
                        what="the 10 s step to start")
        w2.send_signal(signal.SIGINT)
        # The second signal must come after the first was handled (equal
        # pending signals merge): wait for the worker to say so.
        wait_until(lambda: "signal 2" in _chaos_stderr(w2),
                   what="the worker to log that it handled the first SIGINT")
        assert _chaos_exit(w2, signal.SIGINT, "worker after 2nd SIGINT") \
            == 128 + signal.SIGINT
        assert _chaos_executions(tmp_path)[
            ex["job"], ex["token"]]["end"] is None, "the step had finished"
        job = queue.get(second)
        assert job.status == "running", job.to_dict()
        assert job.steps == 0

        # The step runs again once its lease has expired.
        w3 = _chaos_worker(tmp_path, db, procs, "w3")
        result = _chaos_result(queue, second, [w3])
        assert result["attempt"] == 2 and result["pid"] != w2.pid, result
        assert job.steps == 1
    finally:
        _chaos_reap(procs)
        queue.close()


# 6b.4 No "database is locked" ----------------------------------------------


def test_chaos_no_database_is_locked(tmp_path):
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    body = (
        "base = {base}\n"
        "for chunk in range(12):\n"
        "    values = [base + chunk * 25 + i for i in range(25)]\n"
        "    if chunk % 2:\n"
        "        with liteq.default_queue().batch():\n"
        "            jobs = [chaostasks.quick(v, v % 3).delay()"
        " for v in values]\n"
        "    else:\n"
        "        jobs = [chaostasks.quick(v, v % 3).delay()"
        " for v in values]\n"
        "    out.extend([job.id, v] for job, v in zip(jobs, values))\n")
    try:
        # The file exists (the race of first opens is the next test's);
        # then all five processes start at once.
        queue.counts()
        workers = [_chaos_worker(tmp_path, db, procs, f"w{i}")
                   for i in range(3)]
        producers = [_chaos_producer(tmp_path, db, body.format(base=base),
                                     procs)
                     for base in (0, 100000)]
        pairs = []
        for proc in producers:
            try:
                out, err = proc.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                raise AssertionError("a producer hung") from None
            assert proc.returncode == 0 and err == b"", err.decode()
            pairs += json.loads(out)
        assert len(pairs) == 600 and len({i for i, _ in pairs}) == 600
        wait_until(lambda: queue.counts()["done"] == 600,
                   what="600 jobs to be done", alive=workers)
        assert queue.counts() == {"pending": 0, "running": 0, "done": 600,
                                  "failed": 0, "cancelled": 0}
        for job_id, value in pairs:
            job = queue.get(job_id)
            assert job.result(timeout=1) == value * 2
            assert job.steps == value % 3 + 1
        for proc in workers:
            assert proc.poll() is None, _chaos_stderr(proc)[-3000:]
            assert _chaos_exit(proc, signal.SIGTERM, "worker") == 0
            text = _chaos_stderr(proc)
            for word in ("locked", "Traceback", "Busy"):
                assert word not in text, text
    finally:
        _chaos_reap(procs)
        queue.close()


# 6b.5 Many processes opening a brand-new file at the same moment -----------

def test_chaos_concurrent_first_open_of_a_new_file(tmp_path):
    _chaos_setup(tmp_path)
    procs = []
    try:
        for round_ in range(5):
            db = tmp_path / f"fresh{round_}.db"
            env = subprocess_env()
            env["LITEQ_DB"] = str(db)
            start = time.time() + 1.0  # after every interpreter is up
            openers = []
            for _ in range(6):
                openers.append(subprocess.Popen(
                    [sys.executable, "-c", CHAOS_OPENER, repr(start)],
                    cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            procs += openers
            for proc in openers:
                try:
                    out, err = proc.communicate(timeout=DEADLINE)
                except subprocess.TimeoutExpired:
                    raise AssertionError("an opener hung") from None
                assert proc.returncode == 0 and err == b"", (
                    f"round {round_}: a process opening a new file at the "
                    f"same moment as others failed:\n{err.decode()}")
            with liteq.Queue(db) as queue:
                assert queue.counts()["pending"] == 6
    finally:
        _chaos_reap(procs)


# 6b.6 A stored name no worker registered runs nothing ----------------------


def test_chaos_unknown_task_fails_the_job_and_worker_goes_on(tmp_path):
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    marker = tmp_path / "pwned"
    try:
        queue.counts()  # create the file (first opens race: 6b.5)
        worker = _chaos_worker(tmp_path, db, procs, "w", "--unknown-grace",
                               "0")
        (rogue,) = _chaos_producer(tmp_path, db, (
            "import chaosrogue\n"
            f"out.append(chaosrogue.rogue('touch {marker}').delay().id)"))
        job = queue.get(rogue)
        with pytest.raises(liteq.TaskFailed) as failed:
            _chaos_result(queue, rogue, [worker])
        assert ("unknown task 'os:system': not registered in this worker"
                in failed.value.error), failed.value.error
        assert job.status == "failed"
        assert not marker.exists()
        (normal,) = _chaos_producer(
            tmp_path, db, "out.append(chaostasks.quick(5, 2).delay().id)")
        assert _chaos_result(queue, normal, [worker]) == 10
        assert worker.poll() is None, _chaos_stderr(worker)
        assert _chaos_exit(worker, signal.SIGTERM, "worker") == 0
        assert not marker.exists()
    finally:
        _chaos_reap(procs)
        queue.close()


# 6b.7 The database file deleted or replaced under a running worker ---------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_chaos_database_deleted_under_worker_exits_1(tmp_path, how):
    db = _chaos_setup(tmp_path)
    procs = []
    queue = liteq.Queue(db)
    try:
        queue.counts()  # create the file (first opens race: 6b.5)
        worker = _chaos_worker(tmp_path, db, procs, "w")
        (job_id,) = _chaos_producer(
            tmp_path, db, "out.append(chaostasks.quick(1, 0).delay().id)")
        assert _chaos_result(queue, job_id, [worker]) == 2
        queue.close()
        if how == "deleted":
            os.remove(db)
        else:
            other = tmp_path / "other" / "chaos.db"
            other.parent.mkdir()
            fresh = liteq.Queue(other)
            fresh.counts()  # a fresh, valid liteq file
            fresh.close()
            os.replace(other, db)
        status = _chaos_exit(worker, None, "worker on a vanished file")
        text = _chaos_stderr(worker)
        assert status == 1, text
        assert "Traceback" not in text, text
        last = text.strip().splitlines()[-1]
        assert str(db) in last and how in last, text
    finally:
        _chaos_reap(procs)
        queue.close()


# ---------------------------------------------------------------------------
# 7. The command line
# ---------------------------------------------------------------------------
# Operations: the command line (7), and the HTTP API and the dashboard
# (8), which use the same helpers.
#
# The commands and the server run as real subprocesses (``python -m liteq``)
# against a database filled here, with one job held mid-run by a worker
# thread of this process, so every status is on show.


# Tasks of the test database.  Names are explicit so the tests do not
# depend on the name of this module.

def _ops_add(a, b):
    return a + b


def _ops_fail(reason):
    raise RuntimeError(reason)


def _ops_echo(text):
    return text


def _ops_walk(n, total, gate):
    # Step 3 waits until the file `gate` exists, so a test can look at a
    # job that is running with some progress for as long as it needs.
    if n == total - 2:
        wait_until(lambda: os.path.exists(gate), what="the file gate")
    return liteq.Task("ops-walk", [n - 1, total, gate]) if n else "walked"


def _ops_walk_percent(n, total, gate):
    return 100 * (total - n) / total


def _ops_register(queue):
    return {
        "add": queue.task(_ops_add, name="ops-add", queue="ops-work",
                          description="add {0} and {1}"),
        "fail": queue.task(_ops_fail, name="ops-fail", queue="ops-work",
                           description="fail with {0!r}"),
        "echo": queue.task(_ops_echo, name="ops-echo", queue="ops-wait",
                           description="{0}"),
        "walk": queue.task(_ops_walk, name="ops-walk", queue="ops-live",
                           description="walk {1} steps",
                           percent=_ops_walk_percent),
    }


@contextlib.contextmanager
def _ops_world(tmp_path):
    """A database with jobs in every status; yields (path, ids, gate).

    ids: done (2 + 3), failed ("boom"), pending (walk at 25%), cancelled,
    running (walk of 5, held in step 3 at 40% by a worker thread until
    the file `gate` exists).
    """
    db, gate = str(tmp_path / "ops.db"), str(tmp_path / "gate")
    queue = liteq.Queue(db)
    tasks = _ops_register(queue)
    worker = liteq.Worker(queue, queues=["ops-work", "ops-live"])
    worker.start()
    try:
        jobs = {"done": tasks["add"].delay(2, 3),
                "failed": tasks["fail"].delay("boom")}
        assert jobs["done"].result(timeout=DEADLINE) == 5
        with pytest.raises(liteq.TaskFailed):
            jobs["failed"].result(timeout=DEADLINE)
        jobs["pending"] = tasks["walk"].apply_async((3, 4, gate),
                                                    queue="ops-wait")
        jobs["cancelled"] = tasks["add"].apply_async((1, 1),
                                                     queue="ops-wait")
        jobs["cancelled"].cancel()
        jobs["running"] = running = tasks["walk"].delay(5, 5, gate)
        wait_until(lambda: running.steps == 2 and running.worker is not None,
                   what="the walk to reach its gate")
        yield db, {key: job.id for key, job in jobs.items()}, gate
    finally:
        with open(gate, "w"):
            pass
        worker.stop(timeout=DEADLINE)
        queue.close()


def _ops_cli(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "liteq", *args], cwd=str(cwd),
        env=subprocess_env(), capture_output=True, text=True,
        timeout=DEADLINE)


def _ops_popen(cwd, *args, **options):
    options.setdefault("stdout", subprocess.PIPE)
    options.setdefault("stderr", subprocess.PIPE)
    # Unbuffered pipes: readline() takes no more than one line, so a
    # select() on the pipe afterwards sees every line still to come.
    return subprocess.Popen(
        [sys.executable, "-m", "liteq", *args], cwd=str(cwd),
        env=subprocess_env(), bufsize=0, **options)


def _ops_readline(stream, what):
    """One line from a subprocess pipe, waiting at most the deadline."""
    ready, _, _ = select.select([stream], [], [], DEADLINE)
    assert ready, f"timed out waiting for {what}"
    return stream.readline().decode()


def _ops_stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def _ops_serve(cwd, db, *extra):
    """Run `serve` on a free loopback port; yield (host, port, process)."""
    process = _ops_popen(cwd, "serve", "--db", db, "--port", "0", *extra)
    try:
        line = _ops_readline(process.stdout, "serve to start")
        match = re.search(r"http://(\S+):(\d+)/", line)
        assert match, f"serve printed {line!r}, not its address"
        yield match[1], int(match[2]), process
    finally:
        _ops_stop(process)


def _ops_request(port, method, path, host=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port,
                                            timeout=DEADLINE)
    try:
        connection.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            connection.putheader("Host", host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _ops_json(port, path):
    status, headers, body = _ops_request(port, "GET", path)
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    return status, json.loads(body)


# The commands -------------------------------------------------------------


def test_status_prints_counts_per_queue_as_an_aligned_table(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "status", "--db", db)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["QUEUE", "PENDING", "RUNNING", "DONE",
                                "FAILED", "CANCELLED", "TOTAL"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows == {"ops-live": ["0", "1", "0", "0", "0", "1"],
                    "ops-wait": ["1", "0", "0", "0", "1", "2"],
                    "ops-work": ["0", "0", "1", "1", "0", "2"]}
    # Aligned: every right-aligned count ends in the column of its title.
    ends = [m.end() for m in re.finditer(r"\S+", lines[0])]
    for line in lines[1:]:
        assert [m.end() for m in re.finditer(r"\S+", line)][1:] == ends[1:]


def test_status_json_maps_queue_names_to_counts_of_every_status(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "status", "--json", "--db", db)
    assert out.returncode == 0, out.stderr
    zero = dict.fromkeys(ALL_STATUSES, 0)
    assert json.loads(out.stdout) == {
        "ops-live": {**zero, "running": 1},
        "ops-wait": {**zero, "pending": 1, "cancelled": 1},
        "ops-work": {**zero, "done": 1, "failed": 1}}


def test_list_prints_jobs_newest_first_with_progress(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "list", "--db", db)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "STATUS", "PROGRESS", "STEPS", "TRIES", "QUEUE", "TASK",
        "NEXT", "UPDATED", "DESCRIPTION", "LAST", "ERROR"]
    first = [line.split()[:6] for line in lines[1:]]
    assert first == [
        [str(ids["running"]), "running", "40%", "2", "1", "ops-live"],
        [str(ids["cancelled"]), "cancelled", "-", "0", "0", "ops-wait"],
        [str(ids["pending"]), "pending", "25%", "0", "0", "ops-wait"],
        [str(ids["failed"]), "failed", "-", "0", "1", "ops-work"],
        [str(ids["done"]), "done", "100%", "1", "1", "ops-work"]]
    assert "walk 5 steps" in lines[1] and "add 2 and 3" in lines[-1]
    assert lines[-2].rstrip().endswith("RuntimeError: boom")
    assert len({line.index(" ops-") for line in lines[1:]}) == 1


def test_list_and_show_say_why_a_job_waits_and_when_it_wakes(q, capsys):
    waiting = T.add.apply_async((1, 2), countdown=7200)
    assert liteq.main(["list", "--db", q.path]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[:8] == [str(waiting.id), "pending", "-", "0", "0",
                               "default", stored(add), "timer"]
    assert " timer in 1h " in row or " timer in 2h " in row
    assert liteq.main(["show", str(waiting.id), "--db", q.path]) == 0
    out = capsys.readouterr().out
    assert "waiting       timer\n" in out
    assert re.search(r"^eta +\S+ \(in (1|2)h\)$", out, re.M), out


def test_list_filters_and_prints_to_dict_objects_as_json(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "list", "--json", "--db", db)
        by_status = _ops_cli(tmp_path, "list", "--json", "--status",
                             "failed", "--db", db)
        by_queue = _ops_cli(tmp_path, "list", "--json", "--queue",
                            "ops-wait", "--limit", "1", "--db", db)
        by_name = _ops_cli(tmp_path, "list", "--json", "--name", "ops-walk",
                           "--db", db)
        with liteq.Queue(db) as queue:
            expected = [job.to_dict() for job in queue.jobs()]
    jobs = json.loads(out.stdout)
    assert [job["id"] for job in jobs] == [job["id"] for job in expected]
    assert set(jobs[0]) == set(expected[0]) >= {
        "id", "name", "current", "description", "queue", "priority",
        "key", "status", "percent", "steps", "attempts", "error", "eta",
        "created_at", "started_at", "updated_at", "finished_at", "worker",
        "result", "args", "kwargs"}
    done = next(job for job in jobs if job["id"] == ids["done"])
    assert done == next(job for job in expected if job["id"] == ids["done"])
    assert [j["id"] for j in json.loads(by_status.stdout)] == [ids["failed"]]
    assert [j["id"] for j in json.loads(by_queue.stdout)] == [
        ids["cancelled"]]
    assert [j["id"] for j in json.loads(by_name.stdout)] == [
        ids["running"], ids["pending"]]


def test_list_says_so_when_no_job_matches(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "list", "--queue", "nothing", "--db", db)
        as_json = _ops_cli(tmp_path, "list", "--json", "--queue", "nothing",
                           "--db", db)
    assert (out.returncode, out.stdout) == (0, "no jobs\n")
    assert json.loads(as_json.stdout) == []


def test_show_prints_every_field_and_the_error_of_a_failed_job(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "show", str(ids["failed"]), "--db", db)
    assert out.returncode == 0, out.stderr
    fields = dict(re.findall(r"^(\w+) +(.*)$", out.stdout, re.M))
    assert fields["id"] == str(ids["failed"])
    assert fields["status"] == "failed"
    assert fields["description"] == "fail with 'boom'"
    assert fields["args"] == '["boom"]' and fields["key"] == "-"
    for name in ("name", "current", "queue", "priority", "percent", "steps",
                 "attempts", "worker", "eta", "created_at", "started_at",
                 "updated_at", "finished_at", "kwargs", "result"):
        assert name in fields
    error = out.stdout.split("\nerror:\n", 1)[1]
    assert "Traceback" in error and "RuntimeError: boom" in error


def test_show_json_prints_the_jobs_to_dict(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "show", str(ids["done"]), "--json",
                       "--db", db)
        with liteq.Queue(db) as queue:
            expected = queue.get(ids["done"]).to_dict()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected
    assert expected["result"] == 5 and expected["percent"] == 100


def test_show_follow_prints_a_line_per_change_and_exits_0_when_done(
        tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        follow = _ops_popen(tmp_path, "show", str(ids["running"]),
                            "--follow", "--db", db)
        try:
            first = _ops_readline(follow.stdout, "the first progress line")
            with open(gate, "w"):
                pass
            rest, err = follow.communicate(timeout=DEADLINE)
        finally:
            _ops_stop(follow)
    assert follow.returncode == 0, err
    lines = [first.rstrip("\n")] + rest.decode().splitlines()
    assert re.match(rf"job {ids['running']} \S+ +40%  steps 2  \d+:\d\d  "
                    rf"running$", lines[0]), lines
    assert re.search(r" 100%  steps 6  \d+:\d\d  done$", lines[-1]), lines
    changes = [re.sub(r"\d+:\d\d", "", line) for line in lines]
    assert len(set(changes)) == len(changes), lines  # only changes
    assert "\x1b" not in "".join(lines) and "\r" not in "".join(lines)


def test_show_follow_exits_1_for_failed_or_cancelled_jobs(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        failed = _ops_cli(tmp_path, "show", str(ids["failed"]), "--follow",
                          "--db", db)
        cancelled = _ops_cli(tmp_path, "show", str(ids["cancelled"]),
                             "--follow", "--db", db)
        as_json = _ops_cli(tmp_path, "show", str(ids["failed"]),
                           "--follow", "--json", "--db", db)
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.splitlines()[0].endswith("failed")
    assert failed.stdout.splitlines()[1] == "error: RuntimeError: boom"
    assert cancelled.returncode == 1
    assert cancelled.stdout.strip().endswith("cancelled")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["status"] == "failed"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_show_follow_redraws_in_place_on_a_terminal(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        master, slave = os.openpty()
        follow = _ops_popen(tmp_path, "show", str(ids["running"]),
                            "--follow", "--db", db, stdout=slave)
        os.close(slave)
        output = b""
        try:
            while b"40%" not in output:
                output += _ops_read_pty(master)
            with open(gate, "w"):
                pass
            while True:
                chunk = _ops_read_pty(master)
                if not chunk:
                    break
                output += chunk
            follow.wait(DEADLINE)
        finally:
            os.close(master)
            _ops_stop(follow)
    assert follow.returncode == 0
    text = output.decode()
    assert "\x1b[1F" in text and "\x1b[K" in text  # up one line, redraw
    assert re.search(r" 100%  steps 6  \d+:\d\d  done\x1b\[K", text)


def _ops_read_pty(fd):
    ready, _, _ = select.select([fd], [], [], DEADLINE)
    assert ready, "timed out reading the terminal"
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other side closed
        return b""


def test_cancel_cancels_and_exits_1_when_the_job_had_finished(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        pending = _ops_cli(tmp_path, "cancel", str(ids["pending"]), "--db",
                           db)
        again = _ops_cli(tmp_path, "cancel", str(ids["pending"]), "--db", db)
        done = _ops_cli(tmp_path, "cancel", str(ids["done"]), "--db", db)
        running = _ops_cli(tmp_path, "cancel", str(ids["running"]), "--db",
                           db)
        with liteq.Queue(db) as queue:
            status = {key: queue.get(ids[key]).status
                      for key in ("pending", "done")}
            requested = queue.get(ids["running"]).status
    assert (pending.returncode, pending.stdout) == (
        0, f"job {ids['pending']} cancelled\n")
    assert status == {"pending": "cancelled", "done": "done"}
    assert again.returncode == 1 and "cancelled" in again.stderr
    assert done.returncode == 1
    assert done.stderr == (f"liteq: job {ids['done']} has already finished "
                           f"(done): not cancelled\n")
    assert running.returncode == 0 and "cancel requested" in running.stdout
    assert requested == "running"  # its executing step is not interrupted


def test_retry_command_sends_a_failed_job_back_to_pending(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "retry", str(ids["failed"]), "--db", db)
        twice = _ops_cli(tmp_path, "retry", str(ids["failed"]), "--db", db)
        with liteq.Queue(db) as queue:
            job = queue.get(ids["failed"])
            status, attempts = job.status, job.attempts
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"job {ids['failed']} is pending again")
    assert (status, attempts) == ("pending", 0)
    assert twice.returncode == 2
    assert twice.stderr.count("\n") == 1 and "only failed or" in twice.stderr


def test_retry_command_names_the_eta_a_cancelled_job_waits_for(q, capsys):
    job = T.record.apply_async(("later",), countdown=3600)
    job.cancel()
    assert liteq.main(["retry", str(job.id), "--db", q.path]) == 0
    eta = job.to_dict()["eta"]
    assert capsys.readouterr().out == (
        f"job {job.id} is pending again: it resumes at step 1 "
        f"({stored(record)}) at its eta, {eta}\n")
    assert job.eta > dt.datetime.now(UTC) + dt.timedelta(minutes=59)


def test_purge_deletes_finished_jobs_older_than_a_duration(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        week = _ops_cli(tmp_path, "purge", "--older-than", "7d", "--db", db)
        now = _ops_cli(tmp_path, "purge", "--older-than", "0s", "--db", db)
        with liteq.Queue(db) as queue:
            left = sorted(job.id for job in queue.jobs())
    assert (week.returncode, week.stdout) == (
        0, "purged 0 jobs finished more than 7d ago\n")
    assert (now.returncode, now.stdout) == (
        0, "purged 3 jobs finished more than 0s ago\n")
    assert left == sorted([ids["pending"], ids["running"]])


@pytest.mark.parametrize("command", [
    ["status"], ["status", "--json"], ["list"], ["show", "1"],
    ["show", "1", "--follow"], ["cancel", "1"], ["retry", "1"],
    ["purge", "--older-than", "1d"], ["serve", "--port", "0"]])
def test_commands_on_a_missing_database_exit_2_and_create_nothing(
        tmp_path, command):
    out = _ops_cli(tmp_path, *command, "--db", "missing.db")
    path = tmp_path / "missing.db"
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and str(path) in out.stderr
    assert out.stderr.startswith("liteq: error: no database at ")
    assert os.listdir(tmp_path) == []


def test_the_default_database_comes_from_liteq_db_and_is_not_created(
        tmp_path):
    env = dict(subprocess_env(), LITEQ_DB=str(tmp_path / "env.db"))
    out = subprocess.run([sys.executable, "-m", "liteq", "status"],
                         cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=DEADLINE)
    default = _ops_cli(tmp_path, "list")
    assert out.returncode == 2 and "env.db" in out.stderr
    assert default.returncode == 2 and "liteq.db" in default.stderr
    assert os.listdir(tmp_path) == []


def test_unknown_or_malformed_job_ids_exit_2_with_one_line(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        outs = {text: _ops_cli(tmp_path, command, text, "--db", db)
                for command, text in [("show", "999"), ("cancel", "abc"),
                                      ("retry", "0"),
                                      ("show", "9" * 30)]}
    for text, out in outs.items():
        assert out.returncode == 2, text
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert outs["999"].stderr == f"liteq: error: no job 999 in {db}\n"
    assert "positive integer, got 'abc'" in outs["abc"].stderr
    assert "positive integer, got '0'" in outs["0"].stderr
    assert "no job 999999" in outs["9" * 30].stderr


@pytest.mark.parametrize("duration", ["3x", "-1d", "7 days", ""])
def test_purge_with_a_bad_duration_exits_2_with_one_line(tmp_path,
                                                         duration):
    with _ops_world(tmp_path) as (db, ids, gate):
        out = _ops_cli(tmp_path, "purge", f"--older-than={duration}",
                       "--db", db)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"liteq: error: bad duration {duration!r}")


def test_run_exits_2_when_a_module_fails_to_import(tmp_path):
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('oops')\n")
    broken = _ops_cli(tmp_path, "run", "broken_tasks", "--db", "w.db")
    missing = _ops_cli(tmp_path, "run", "no_such_tasks", "--db", "w.db")
    assert broken.returncode == 2
    assert broken.stderr.splitlines()[-1] == (
        "liteq: error: cannot import broken_tasks: RuntimeError: oops")
    assert "Traceback" not in broken.stderr
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1].startswith(
        "liteq: error: cannot import no_such_tasks: ModuleNotFoundError")


def test_run_of_a_file_name_suggests_the_module_name(tmp_path):
    (tmp_path / "jobs.py").write_text("")
    (tmp_path / "app").mkdir()
    plain = _ops_cli(tmp_path, "run", "jobs.py", "--db", "w.db")
    nested = _ops_cli(tmp_path, "run", "app/jobs.py", "--db", "w.db")
    assert plain.returncode == nested.returncode == 2
    assert plain.stderr.endswith(
        "; did you mean run jobs? (MODULE is a module name, not a file)\n")
    assert plain.stderr.count("\n") == 1
    assert nested.stderr.endswith(
        "; did you mean run app.jobs? (MODULE is a module name, not a "
        "file)\n")


def _ops_warnings(tmp_path, *args):
    """The WARNING lines a worker started with ``run ARGS`` logs before
    it serves, and the line that says what it serves."""
    worker = _ops_popen(tmp_path, "run", *args)
    try:
        lines = []
        while "serving" not in (lines or [""])[-1]:
            lines.append(_ops_readline(worker.stderr, "the worker's log"))
            assert lines[-1], worker.wait(DEADLINE)
        worker.send_signal(signal.SIGINT)
        worker.communicate(timeout=DEADLINE)
    finally:
        _ops_stop(worker)
    assert worker.returncode == 0
    warnings = [line.split(" WARNING liteq: ", 1)[1].rstrip("\n")
                for line in lines if " WARNING liteq: " in line]
    return warnings, lines[-1]


def test_run_warns_of_modules_without_tasks_and_tasks_of_other_files(
        tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "tasks.py").write_text(
        "from liteq import task\n\n@task\ndef ping():\n    pass\n")
    (tmp_path / "mine.py").write_text(
        "import liteq\n\n"
        "q = liteq.Queue('jobs.db')\n\n"
        "@q.task\ndef hello(name):\n    pass\n")
    warnings, serving = _ops_warnings(tmp_path, "app", "mine", "--db",
                                      "w.db")
    assert warnings == [
        "module app registers no task: did you mean app.tasks?",
        f"task mine:hello stores its jobs in {tmp_path}/jobs.db, but "
        f"this worker serves {tmp_path}/w.db: run it with --db "
        f"{tmp_path}/jobs.db"]
    assert f"serving default on {tmp_path}/w.db" in serving
    warnings, _ = _ops_warnings(tmp_path, "mine", "--db", "jobs.db")
    assert warnings == []


def test_run_serves_the_file_a_task_module_configures(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "configured.py").write_text(
        "import liteq\n\n"
        "liteq.configure('var/jobs.db')\n\n"
        "@liteq.task\ndef hello(name):\n    pass\n")
    warnings, serving = _ops_warnings(tmp_path, "configured")
    assert warnings == []
    assert f"serving default on {tmp_path}/var/jobs.db" in serving
    assert not (tmp_path / "liteq.db").exists()
    warnings, serving = _ops_warnings(tmp_path, "configured", "--db",
                                      "w.db")  # an explicit --db wins
    assert f"serving default on {tmp_path}/w.db" in serving
    assert warnings == [
        f"task configured:hello stores its jobs in {tmp_path}/var/jobs.db, "
        f"but this worker serves {tmp_path}/w.db: run it with --db "
        f"{tmp_path}/var/jobs.db"]


def test_run_and_status_of_a_folder_exit_2_before_anything(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "loud.py").write_text("print('imported')\n")
    run = _ops_cli(tmp_path, "run", "loud", "--db", "adir")
    status = _ops_cli(tmp_path, "status", "--db", "adir")
    nowhere = _ops_cli(tmp_path, "run", "loud", "--db", "no/w.db")
    folder = tmp_path / "adir"
    for out in (run, status):
        assert (out.returncode, out.stdout, out.stderr) == (
            2, "", f"liteq: error: {folder} is a folder, not a database "
                   f"file: pass --db adir/liteq.db, say\n")
    assert (nowhere.returncode, nowhere.stdout, nowhere.stderr) == (
        2, "", f"liteq: error: cannot open {tmp_path}/no/w.db: its folder "
               f"{tmp_path}/no does not exist\n")
    assert sorted(os.listdir(tmp_path)) == ["adir", "loud.py"]


def test_run_works_jobs_logs_one_line_each_and_stops_on_sigint(tmp_path):
    (tmp_path / "ops_tasks.py").write_text(
        "from liteq import task\n\n"
        "@task\n"
        "def double(x):\n"
        "    return 2 * x\n")
    worker = _ops_popen(tmp_path, "run", "ops_tasks", "--db", "w.db")
    try:
        line = _ops_readline(worker.stderr, "the worker's first log line")
        assert "INFO liteq: worker" in line and "serving default" in line
        delay = subprocess.run(
            [sys.executable, "-c",
             "import ops_tasks; print(ops_tasks.double.delay(21).id)"],
            cwd=str(tmp_path), env=dict(subprocess_env(), LITEQ_DB="w.db"),
            capture_output=True, text=True, timeout=DEADLINE)
        job_id = int(delay.stdout)
        with liteq.Queue(str(tmp_path / "w.db")) as queue:
            assert queue.get(job_id).result(timeout=DEADLINE) == 42
        worker.send_signal(signal.SIGINT)
        out, err = worker.communicate(timeout=DEADLINE)
    finally:
        _ops_stop(worker)
    assert worker.returncode == 0
    log = line + err.decode()
    assert f"liteq: job {job_id} started: ops_tasks:double" in log
    assert f"liteq: job {job_id} done" in log
    assert "stopped" in log.splitlines()[-1]


def test_demo_runs_its_jobs_to_the_end(tmp_path):
    out = _ops_cli(tmp_path, "demo", "--db", "demo.db")
    assert out.returncode == 0, out.stderr
    assert "result 'liftoff'" in out.stdout
    assert out.stdout.count(" done: result") == 3


def test_every_subcommand_has_help_and_a_db_option(capsys):
    commands = ["run", "demo", "status", "list", "show", "cancel", "retry",
                "purge", "serve"]
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            liteq.main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "--db PATH" in text, command
        assert ("--json" in text) == (command in ("status", "list",
                                                   "show")), command
    with pytest.raises(SystemExit):
        liteq.main(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in commands)


def test_json_help_says_what_each_command_prints(capsys):
    helps = {}
    for command in ("status", "list", "show"):
        with pytest.raises(SystemExit):
            liteq.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        helps[command] = text[text.index("--json print"):]
    assert helps["status"].startswith(
        "--json print JSON: {queue name: {status: count}}")
    assert helps["list"].startswith(
        "--json print JSON: a list of Job.to_dict() objects")
    assert helps["show"].startswith(
        "--json print JSON: the job's Job.to_dict()")


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND (see python -m "
         "liteq --help)"),
    (["list", "--limit", "ten"], "argument --limit: invalid int value: "
                                 "'ten' (see python -m liteq list --help)"),
    (["show"], "the following arguments are required: ID (see python -m "
               "liteq show --help)"),
    (["status", "--frobnicate"], "unrecognized arguments: --frobnicate "
                                 "(see python -m liteq --help)"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys,
                                              monkeypatch):
    monkeypatch.setattr(sys, "argv", ["liteq.py"])
    assert liteq.main(argv) == 2
    assert capsys.readouterr() == ("", f"liteq: error: {message}\n")


def test_list_limit_must_be_at_least_1(q, capsys):
    T.add.delay(1, 2)
    assert liteq.main(["list", "--limit", "0", "--db", q.path]) == 2
    assert capsys.readouterr().err == (
        f"liteq: error: --limit must be from 1 to {2**63 - 1}, got 0\n")
    assert liteq.main(["list", "--limit", "1", "--db", q.path]) == 0
    assert "add" in capsys.readouterr().out


def test_main_reports_user_errors_in_process(tmp_path, capsys):
    code = liteq.main(["show", "1", "--db", str(tmp_path / "none.db")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"liteq: error: no database at {tmp_path / 'none.db'} (pass --db "
        f"or set LITEQ_DB; run and demo create one)\n")
    assert not (tmp_path / "none.db").exists()


def test_human_output_never_prints_control_characters_from_jobs(tmp_path):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        job = _ops_register(queue)["echo"].delay("\x1b[2Jevil\nline\x07")
    listed = _ops_cli(tmp_path, "list", "--db", db)
    shown = _ops_cli(tmp_path, "show", str(job.id), "--db", db)
    as_json = _ops_cli(tmp_path, "show", str(job.id), "--json", "--db", db)
    assert listed.returncode == shown.returncode == 0
    assert "\x1b" not in listed.stdout + shown.stdout
    assert "?[2Jevil line?" in listed.stdout
    assert "description   ?[2Jevil line?\n" in shown.stdout
    assert json.loads(as_json.stdout)["description"] == (
        "\x1b[2Jevil\nline\x07")


# Schedules on the command line --------------------------------------------


def _ops_schedules(db):
    """Store two schedules in ``db``: "hourly" (ops-add every hour, its
    last run triggered: pending) and "nightly" (ops-echo every day in
    Paris, paused).  Returns (their Queue.schedules(), the triggered
    job)."""
    with liteq.Queue(db) as queue:
        tasks = _ops_register(queue)
        queue.schedule("hourly", tasks["add"](1, 2), every=3600)
        queue.schedule("nightly", tasks["echo"]("hi"), every=86400,
                       tz="Europe/Paris")
        queue.pause_schedule("nightly")
        job = queue.trigger("hourly")
        return queue.schedules(), job


def _ops_clock_text(iso):
    """How the table shows an ISO time: to the second, with its offset
    unless UTC."""
    when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    offset = "" if iso.endswith("Z") else when.isoformat()[-6:]
    return when.strftime("%Y-%m-%d %H:%M:%S") + offset


def test_schedules_prints_a_table_of_every_schedule(tmp_path):
    db = str(tmp_path / "ops.db")
    (hourly, nightly), job = _ops_schedules(db)
    out = _ops_cli(tmp_path, "schedules", "--db", db)
    assert (out.returncode, out.stderr) == (0, "")
    lines = out.stdout.splitlines()
    assert re.split(r"  +", lines[0]) == [
        "NAME", "TASK", "SPEC", "TZ", "NEXT (UTC)", "NEXT (LOCAL)",
        "LAST (UTC)", "LAST JOB", "SKIPPED", "PAUSED"]
    rows = {line.split()[0]: re.split(r"  +", line) for line in lines[1:]}
    assert sorted(rows) == ["hourly", "nightly"]
    assert rows["hourly"][:4] == ["hourly", "ops-add", "every 3600s", "UTC"]
    assert re.fullmatch(re.escape(_ops_clock_text(hourly["next"])) +
                        r" \((in \d+[smh]|now)\)", rows["hourly"][4])
    assert rows["hourly"][5:] == [
        _ops_clock_text(hourly["next_local"]), "-", f"{job.id} pending",
        "0", "no"]
    assert rows["nightly"] == [
        "nightly", "ops-echo", "every 86400s", "Europe/Paris",
        _ops_clock_text(nightly["next"]),  # paused: no "in ..."
        _ops_clock_text(nightly["next_local"]), "-", "-", "0", "yes"]
    assert re.search(r"\+0[12]:00$", rows["nightly"][5])
    # Aligned: every column starts where its title does (SKIPPED, the
    # ninth, is right-aligned: it ends where its title does).
    for line in lines[1:]:
        assert _ops_columns(line) == _ops_columns(lines[0])


def _ops_columns(line):
    starts = [m.start(1) for m in re.finditer(r"(?:^| {2,})(\S)", line)]
    ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)]
    return starts[:8] + ends[8:9] + starts[9:]


def test_schedules_json_prints_queue_schedules(tmp_path):
    db = str(tmp_path / "ops.db")
    found, _ = _ops_schedules(db)
    out = _ops_cli(tmp_path, "schedules", "--json", "--db", db)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == found
    assert [item["paused"] for item in found] == [False, True]


def test_schedules_says_when_there_are_none(tmp_path, capsys):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        _ops_register(queue)["add"].delay(1, 1)  # a file, no schedule
    assert liteq.main(["schedules", "--db", db]) == 0
    assert capsys.readouterr().out == f"no schedules in {db}\n"
    assert liteq.main(["schedules", "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out) == []
    gone = str(tmp_path / "gone.db")
    assert liteq.main(["schedules", "--db", gone]) == 2
    assert capsys.readouterr().err == (
        f"liteq: error: no database at {gone} (pass --db or set LITEQ_DB; "
        f"run and demo create one)\n")
    assert not os.path.exists(gone)


def test_trigger_fires_a_run_now_unless_the_overlap_rule_refuses(
        tmp_path, capsys):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        queue.schedule("hourly", _ops_register(queue)["add"](1, 2),
                       every=3600)
    assert liteq.main(["trigger", "hourly", "--db", db]) == 0
    out = capsys.readouterr()
    job_id = int(re.fullmatch(r"job (\d+) triggered for schedule hourly\n",
                              out.out)[1])
    assert out.err == ""
    assert liteq.main(["trigger", "hourly", "--db", db]) == 1
    assert capsys.readouterr() == ("", (
        f"liteq: schedule hourly not triggered: its overlap rule (skip) "
        f"refuses a run while its last run, job {job_id}, is pending\n"))
    with liteq.Queue(db) as queue:
        job = queue.get(job_id)
        assert job.name == "ops-add" and job.scheduled_for is not None
        assert [j.id for j in queue.jobs()] == [job_id]
        assert queue.schedules()[0]["last_job"] == job_id


def test_pause_and_resume_schedule_print_one_line(tmp_path, capsys):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        queue.schedule("hourly", _ops_register(queue)["add"](1, 2),
                       every=3600)

        def paused():
            return queue.schedules()[0]["paused"]

        assert liteq.main(["pause-schedule", "hourly", "--db", db]) == 0
        assert capsys.readouterr() == (
            "schedule hourly paused: it fires nothing until "
            "resume-schedule\n", "")
        assert paused()
        assert liteq.main(["resume-schedule", "hourly", "--db", db]) == 0
        assert capsys.readouterr() == ("schedule hourly resumed\n", "")
        assert not paused()


@pytest.mark.parametrize("command", ["trigger", "pause-schedule",
                                     "resume-schedule"])
def test_schedule_commands_exit_2_for_an_unknown_name(command, tmp_path,
                                                      capsys):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        _ops_register(queue)["add"].delay(1, 1)  # a file, no schedule
    assert liteq.main([command, "nope", "--db", db]) == 2
    assert capsys.readouterr() == (
        "", f"liteq: error: no schedule named 'nope' in {db}\n")
    assert liteq.main([command, "--db", db]) == 2
    assert "required: NAME" in capsys.readouterr().err


def test_schedule_commands_have_help(capsys):
    for command in ("schedules", "trigger", "pause-schedule",
                    "resume-schedule"):
        with pytest.raises(SystemExit) as exit_:
            liteq.main([command, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--db PATH" in text, command
        assert ("--json print JSON: a list of Queue.schedules() objects"
                in text) == (command == "schedules"), command
    with pytest.raises(SystemExit):
        liteq.main(["run", "--help"])
    assert "--no-schedules" in capsys.readouterr().out


def test_show_prints_the_slot_of_a_scheduled_job(tmp_path):
    db = str(tmp_path / "ops.db")
    _, fired = _ops_schedules(db)
    with liteq.Queue(db) as queue:
        plain = _ops_register(queue)["add"].delay(1, 1)
        slot = queue.get(fired.id).to_dict()["scheduled_for"]
    shown = _ops_cli(tmp_path, "show", str(fired.id), "--db", db)
    other = _ops_cli(tmp_path, "show", str(plain.id), "--db", db)
    assert shown.returncode == other.returncode == 0
    fields = [line.split(None, 1) for line in shown.stdout.splitlines()]
    names = [pair[0] for pair in fields]
    assert names.index("scheduled_for") == names.index("eta") + 1
    assert f"\nscheduled_for {slot}\n" in shown.stdout
    assert "\nscheduled_for -\n" in other.stdout
    # Every value starts in one column.
    assert {line.index(pair[1]) for line, pair in zip(
        shown.stdout.splitlines()[:20], fields[:20])} == {14}


def _ops_tick():
    return "tick"


def _ops_mark():
    return "mark"


_OPS_SCHEDULED = """\
import liteq


@liteq.task(name="ops-tick")
def tick():
    return "tick"


@liteq.task(name="ops-mark")
def mark():
    return "mark"
"""


def test_run_fires_due_schedules_unless_told_no_schedules(tmp_path):
    (tmp_path / "ops_sched.py").write_text(_OPS_SCHEDULED)
    db = str(tmp_path / "w.db")
    with liteq.Queue(db) as queue:
        tick = queue.task(_ops_tick, name="ops-tick")
        mark = queue.task(_ops_mark, name="ops-mark")
        queue.schedule("ticker", tick(), every=1)
        due = liteq._seconds(queue.schedules()[0]["next"])
        wait_until(lambda: time.time() > due + 0.01, what="a due slot")
        worker = _ops_popen(tmp_path, "run", "ops_sched", "--db", db,
                            "--no-schedules", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        try:
            # The worker claims this job after the slot came due: a
            # worker that fires schedules fires it in that claim.
            assert mark.delay().result(timeout=DEADLINE) == "mark"
            assert queue.jobs(name="ops-tick") == []
            assert queue.schedules()[0]["last_job"] is None
        finally:
            _ops_stop(worker)
        assert worker.returncode == 0
        worker = _ops_popen(tmp_path, "run", "ops_sched", "--db", db,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        try:
            fired = wait_until(
                lambda: [job for job in queue.jobs(name="ops-tick")
                         if job.status == "done"],
                what="the worker to fire and run the schedule",
                alive=[worker])
        finally:
            _ops_stop(worker)
        assert fired[0].result() == "tick"
        assert fired[0].scheduled_for.timestamp() >= due


# ---------------------------------------------------------------------------
# 8. HTTP: status resource, Location header, dashboard
# ---------------------------------------------------------------------------

def test_location_header_names_the_jobs_status_resource(tmp_path):
    with liteq.Queue(str(tmp_path / "ops.db")) as queue:
        job = _ops_register(queue)["add"].delay(1, 2)
        assert liteq.location_header(job) == (
            "Taskqueue-Location", f"/tasks/{job.id}")
        assert liteq.location_header(job, prefix="/jobs/api/tasks/") == (
            "Taskqueue-Location", f"/jobs/api/tasks/{job.id}")
    assert liteq.location_header(7) == ("Taskqueue-Location", "/tasks/7")
    with pytest.raises(TypeError):
        liteq.location_header("7")


def test_http_lists_tasks_as_json_with_filters(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        assert host == "127.0.0.1"
        status, jobs = _ops_json(port, "/tasks")
        _, slash = _ops_json(port, "/tasks/")
        _, failed = _ops_json(port, "/tasks?status=failed")
        _, waiting = _ops_json(port, "/tasks?queue=ops-wait&limit=1")
        _, walks = _ops_json(port, "/tasks?name=ops-walk&status=")
        _, none = _ops_json(port, "/tasks?limit=0")
        with liteq.Queue(db) as queue:
            expected = queue.get(ids["done"]).to_dict()
    assert status == 200
    assert [job["id"] for job in jobs] == sorted(ids.values(), reverse=True)
    assert jobs == slash
    assert next(job for job in jobs if job["id"] == ids["done"]) == expected
    assert [job["id"] for job in failed] == [ids["failed"]]
    assert [job["id"] for job in waiting] == [ids["cancelled"]]
    assert [job["id"] for job in walks] == [ids["running"], ids["pending"]]
    assert none == []


def test_http_serves_one_task_and_json_errors(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        found = _ops_json(port, f"/tasks/{ids['running']}")
        answers = {path: _ops_json(port, path) for path in (
            "/tasks/999", "/tasks/" + "9" * 25, "/tasks/abc", "/tasks/-1",
            "/tasks/0", "/tasks?limit=x", "/tasks?limit=-1",
            "/tasks?limit=100000", "/tasks?status=lost", "/nowhere")}
    assert found[0] == 200
    assert found[1]["status"] == "running" and found[1]["percent"] == 40
    assert found[1]["steps"] == 2 and found[1]["worker"]
    codes = {path: code for path, (code, _) in answers.items()}
    assert codes == {
        "/tasks/999": 404, "/tasks/" + "9" * 25: 404, "/tasks/abc": 400,
        "/tasks/-1": 400, "/tasks/0": 400, "/tasks?limit=x": 400,
        "/tasks?limit=-1": 400, "/tasks?limit=100000": 400,
        "/tasks?status=lost": 400, "/nowhere": 404}
    for _, body in answers.values():
        assert list(body) == ["error"] and body["error"]
    assert answers["/tasks/999"][1]["error"].startswith("no job 999")


def test_http_counts_jobs_per_queue_and_status(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        status, counts = _ops_json(port, "/counts")
    zero = dict.fromkeys(ALL_STATUSES, 0)
    assert status == 200
    assert counts == {"ops-live": {**zero, "running": 1},
                      "ops-wait": {**zero, "pending": 1, "cancelled": 1},
                      "ops-work": {**zero, "done": 1, "failed": 1}}


def test_http_refuses_every_method_but_get_and_head_with_405(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        answers = [_ops_request(port, method, path, headers={
            "Content-Length": "0"})
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS")
            for path in ("/", "/tasks", f"/tasks/{ids['pending']}")]
        with liteq.Queue(db) as queue:
            status = queue.get(ids["pending"]).status
    for code, headers, body in answers:
        assert code == 405
        assert headers["Allow"] == "GET, HEAD"
        assert headers["Content-Type"] == "application/json"
        assert headers["Cache-Control"] == "no-store"
        assert "read-only" in json.loads(body)["error"]
    assert status == "pending"


def test_http_head_sends_the_headers_of_get_without_a_body(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        get = _ops_request(port, "GET", "/tasks")
        head = _ops_request(port, "HEAD", "/tasks")
        page = _ops_request(port, "HEAD", "/")
    assert head[0] == 200 and head[2] == b""
    assert head[1]["Content-Length"] == str(len(get[2]))
    assert head[1]["Content-Type"] == "application/json"
    assert page[0] == 200 and page[2] == b""
    assert page[1]["Content-Type"] == "text/html; charset=utf-8"


def test_http_on_loopback_refuses_requests_for_other_host_names(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        codes = {name: _ops_request(port, "GET", "/tasks", host=name)[0]
                 for name in ("localhost", f"localhost:{port}", "127.0.0.1",
                              f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}",
                              "LOCALHOST", "evil.example",
                              f"evil.example:{port}", "localhost.evil.example",
                              "127.0.0.1.nip.io", "")}
        status, headers, body = _ops_request(port, "GET", "/",
                                             host="rebind.example")
    allowed = {"localhost", f"localhost:{port}", "127.0.0.1",
               f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}", "LOCALHOST"}
    assert {name for name, code in codes.items() if code == 200} == allowed
    assert codes["evil.example"] == 403
    assert codes["localhost.evil.example"] == 403
    assert codes[""] == 400
    assert status == 403 and b"<html" not in body
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"


def test_serve_warns_that_the_api_is_unauthenticated_off_loopback(
        tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), _ops_serve(
            tmp_path, db, "--host", "0.0.0.0") as (host, port, server):
        warning = _ops_readline(server.stderr, "the warning")
        code, _, _ = _ops_request(port, "GET", "/tasks",
                                  host="queue.internal.example")
    assert "WARNING" in warning and "unauthenticated" in warning
    assert code == 200


def test_serve_logs_requests_to_the_liteq_logger_only_at_debug(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        with _ops_serve(tmp_path, db) as (host, port, quiet):
            assert _ops_request(port, "GET", "/tasks")[0] == 200
            quiet.send_signal(signal.SIGTERM)
            _, quiet_err = quiet.communicate(timeout=DEADLINE)
        with _ops_serve(tmp_path, db, "--log-level", "DEBUG") as (
                host, port, chatty):
            assert _ops_request(port, "GET", "/tasks?limit=1")[0] == 200
            line = ""
            while "/tasks?limit=1" not in line:
                line = _ops_readline(chatty.stderr, "the request log line")
    assert quiet.returncode == 0  # SIGTERM stops it cleanly
    assert b"GET" not in quiet_err
    assert " DEBUG liteq: http: " in line
    assert '"GET /tasks?limit=1 HTTP/1.1" 200' in line


def test_serve_serves_a_slow_client_and_others_at_once(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /tasks HTTP/1.1\r\nHost: loc")  # and stalls
            code, _, _ = _ops_request(port, "GET", "/tasks")
    assert code == 200


def _ops_environ(path, script_name="", method="GET", query=""):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path,
               "SCRIPT_NAME": script_name, "QUERY_STRING": query}
    wsgiref.util.setup_testing_defaults(environ)
    return environ


def _ops_call(app, environ):
    answer = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


def test_wsgi_app_mounts_under_a_prefix(tmp_path):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        job = _ops_register(queue)["add"].delay(1, 2)
        app = liteq.wsgi_app(queue)
        listed = _ops_call(app, _ops_environ("/tasks", "/ops/jobs"))
        one = _ops_call(app, _ops_environ(f"/tasks/{job.id}", "/ops/jobs"))
        page = _ops_call(app, _ops_environ("/", "/ops/jobs"))
        bare = _ops_call(app, _ops_environ("", "/ops/jobs/"))
    assert listed[0] == "200 OK"
    assert [item["id"] for item in json.loads(listed[2])] == [job.id]
    assert json.loads(one[2]) == job.to_dict()
    for status, _, body in (page, bare):
        assert status == "200 OK"
        assert b'<meta name="liteq-base" content="/ops/jobs/">' in body


def test_wsgi_app_escapes_the_mount_point_into_the_page(tmp_path):
    with liteq.Queue(str(tmp_path / "ops.db")) as queue:
        page = _ops_call(liteq.wsgi_app(queue),
                         _ops_environ("/", '/x"><script>alert(1)</script>'))
    assert b"<script>alert" not in page[2]
    assert b'content="/x&quot;&gt;&lt;script&gt;' in page[2]


def test_wsgi_app_never_creates_a_missing_database(tmp_path):
    queue = liteq.Queue(str(tmp_path / "gone.db"))
    status, headers, body = _ops_call(liteq.wsgi_app(queue),
                                      _ops_environ("/tasks"))
    assert status == "503 Service Unavailable"
    assert "missing" in json.loads(body)["error"]
    assert str(tmp_path) not in body.decode()  # no paths to clients
    assert os.listdir(tmp_path) == []


def test_wsgi_app_logs_why_it_answers_503(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="liteq")
    empty, gone = tmp_path / "empty.db", tmp_path / "gone.db"
    empty.write_bytes(b"")
    for path in (empty, gone):
        status, _, body = _ops_call(liteq.wsgi_app(liteq.Queue(path)),
                                    _ops_environ("/counts"))
        assert status == "503 Service Unavailable"
        assert "see the server log" in json.loads(body)["error"]
    first, second = [r for r in caplog.records if r.name == "liteq"]
    assert first.levelno == second.levelno == logging.ERROR
    assert f"no liteq database in {empty} yet" in first.getMessage()
    assert isinstance(first.exc_info[1], liteq.SchemaError)
    assert f"no database at {gone}" in second.getMessage()


def test_wsgi_app_uses_the_default_queue_when_given_none(tmp_path,
                                                         monkeypatch):
    db = str(tmp_path / "default.db")
    with liteq.Queue(db) as queue:
        job = _ops_register(queue)["add"].delay(4, 4)
    app = liteq.wsgi_app()
    monkeypatch.setattr(liteq, "default_queue", lambda: liteq.Queue(db))
    status, headers, body = _ops_call(app, _ops_environ(f"/tasks/{job.id}"))
    assert status == "200 OK" and json.loads(body)["args"] == [4, 4]
    with pytest.raises(TypeError):
        liteq.wsgi_app("liteq.db")


def test_dashboard_is_one_self_contained_page(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate), \
            _ops_serve(tmp_path, db) as (host, port, server):
        status, headers, body = _ops_request(port, "GET", "/")
    page = body.decode()
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "@import" not in page and "url(" not in page
    assert "innerHTML" not in page and "textContent" in page
    assert page.count("<script>") == 1 and page.count("<style>") == 1


# Dashboard in a real browser ----------------------------------------------


_OPS_CHROMIUM = "/usr/bin/chromium"


class _OpsTags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)


def _ops_tags(page):
    parser = _OpsTags()
    parser.feed(page)
    return parser.tags


def _ops_chromium(url, *options):
    profile = tempfile.mkdtemp(prefix="liteq-chromium-")
    try:
        out = subprocess.run(
            [_OPS_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000",
             *options, url],
            capture_output=True, text=True, timeout=DEADLINE)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out.stdout, f"exit {out.returncode}: {out.stderr[-2000:]}"


@pytest.mark.skipif(not os.path.exists(_OPS_CHROMIUM),
                    reason=f"no browser at {_OPS_CHROMIUM} (Debian: "
                           f"apt-get install chromium; .ci/run does)")
def test_dashboard_renders_jobs_and_progress_in_a_real_browser(tmp_path):
    with _ops_world(tmp_path) as (db, ids, gate):
        with liteq.Queue(db) as queue:
            evil = _ops_register(queue)["echo"].delay(
                "<img src=x onerror=alert(1)> & co")
        with _ops_serve(tmp_path, db) as (host, port, server):
            dom, log = _ops_chromium(f"http://127.0.0.1:{port}/"
                                     f"#job-{ids['failed']}", "--dump-dom")
    assert "<tr data-id=" in dom, log
    rows = dict(re.findall(r'<tr data-id="(\d+)" data-status="(\w+)"', dom))
    assert rows == {str(ids[key]): key for key in ids} | {
        str(evil.id): "pending"}
    row = {key: re.search(rf'<tr data-id="{ids[key]}".*?</tr>', dom,
                          re.S)[0] for key in ids}
    assert 'class="pct">40%<' in row["running"]
    assert 'class="pct">25%<' in row["pending"]
    assert 'class="pct">100%<' in row["done"]
    assert 'status done">done<' in row["done"]
    assert "walk 5 steps" in row["running"] and "ops-walk" in row["running"]
    assert "RuntimeError: boom" in row["failed"]  # the error's last line
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; co" in dom
    assert "img" not in _ops_tags(dom)  # job text never became markup
    counts = dict(re.findall(
        r'data-status="(\w+)"><b>(\d+)</b><span>\w+</span>', dom))
    assert counts == {"all": "6", "pending": "2", "running": "1",
                      "done": "1", "failed": "1", "cancelled": "1"}
    detail = dom.split('id="detail"', 1)[1]
    assert f"Job {ids['failed']}" in detail
    assert "Traceback (most recent call last)" in detail
    assert "RuntimeError: boom" in detail
    assert 'class="ok"' in dom  # the page reached the API


# Schedules over HTTP and on the dashboard ---------------------------------


def test_http_lists_schedules_as_json(tmp_path):
    db = str(tmp_path / "ops.db")
    found, _ = _ops_schedules(db)
    with liteq.Queue(db) as queue:
        app = liteq.wsgi_app(queue)
        listed = _ops_call(app, _ops_environ("/schedules"))
        slash = _ops_call(app, _ops_environ("/schedules/", "/ops"))
        head = _ops_call(app, _ops_environ("/schedules", method="HEAD"))
        post = _ops_call(app, _ops_environ("/schedules", method="POST"))
        missing = _ops_call(app, _ops_environ("/schedule"))
        queue.unschedule("hourly")
        queue.unschedule("nightly")
        empty = _ops_call(app, _ops_environ("/schedules"))
    assert listed[0] == slash[0] == head[0] == "200 OK"
    assert listed[1]["Content-Type"] == "application/json"
    assert listed[1]["Cache-Control"] == "no-store"
    assert json.loads(listed[2]) == json.loads(slash[2]) == found
    assert head[2] == b""
    assert head[1]["Content-Length"] == str(len(listed[2]))
    assert post[0].startswith("405") and post[1]["Allow"] == "GET, HEAD"
    assert missing[0].startswith("404")
    assert json.loads(missing[2])["error"].endswith(
        "the routes are /, /tasks, /tasks/<id>, /counts and /schedules")
    assert json.loads(empty[2]) == []


def test_http_schedules_never_creates_a_missing_database(tmp_path):
    app = liteq.wsgi_app(liteq.Queue(str(tmp_path / "gone.db")))
    status, _, body = _ops_call(app, _ops_environ("/schedules"))
    assert status == "503 Service Unavailable"
    assert "missing" in json.loads(body)["error"]
    assert os.listdir(tmp_path) == []


def _ops_schedule_rows(dom):
    panel = dom.split('id="schedules-panel"', 1)[1].split("</section>")[0]
    return panel, {html.unescape(name): row for name, row in re.findall(
        r'<tr[^>]* data-schedule="([^"]*)"[^>]*>(.*?)</tr>', panel, re.S)}


@pytest.mark.skipif(not os.path.exists(_OPS_CHROMIUM),
                    reason=f"no browser at {_OPS_CHROMIUM} (Debian: "
                           f"apt-get install chromium; .ci/run does)")
def test_dashboard_shows_schedules_in_a_real_browser(tmp_path,
                                                     monkeypatch):
    # The browser's time zone: half an hour off UTC, so its local times
    # of the hourly slots (on the hour in UTC) end in :30:00.
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        _ops_register(queue)["add"].delay(1, 1)  # the file, no schedule
    with _ops_serve(tmp_path, db) as (host, port, server):
        bare, bare_log = _ops_chromium(f"http://127.0.0.1:{port}/",
                                       "--dump-dom")
        (hourly, nightly), job = _ops_schedules(db)
        evil = "<img src=x onerror=alert(1)> & co"
        with liteq.Queue(db) as queue:
            queue.schedule(evil, _ops_register(queue)["echo"]("x"),
                           every=7200)
        dom, log = _ops_chromium(f"http://127.0.0.1:{port}/#job-{job.id}",
                                 "--dump-dom")
    assert 'class="ok"' in bare, bare_log
    assert '<section id="schedules-panel" class="panel" hidden=' in bare
    assert 'class="ok"' in dom, log
    panel, rows = _ops_schedule_rows(dom)
    assert "hidden" not in panel.split(">", 1)[0]
    assert sorted(rows) == sorted(["hourly", "nightly", evil])
    cells = {name: [html.unescape(re.sub(r"<[^>]*>", "|", cell)).strip("|")
                    for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
             for name, row in rows.items()}
    name, task, spec, upcoming, local, last, skipped, state = cells["hourly"]
    assert (name, task, spec) == ("hourly", "ops-add", "every 3600s|UTC")
    assert upcoming.startswith(hourly["next"][:19].replace("T", " ") + "|in ")
    assert local.endswith(":30:00 AM") or local.endswith(":30:00 PM")
    assert f'href="#job-{job.id}"' in rows["hourly"]
    assert last == f"pending| job {job.id}"
    assert (skipped, state) == ("0", "active")
    name, task, spec, upcoming, local, last, skipped, state = \
        cells["nightly"]
    assert spec == "every 86400s|Europe/Paris"
    assert upcoming == nightly["next"][:19].replace("T", " ")  # no "in"
    assert ":30:00" in local
    assert (last, skipped, state) == ("-", "0", "paused")
    assert 'class="badge paused">paused<' in rows["nightly"]
    assert 'class="paused"' in dom.split('data-schedule="nightly"')[0][-40:]
    assert cells[evil][0] == evil
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; co" in panel
    assert "img" not in _ops_tags(dom)  # no text became markup
    detail = dom.split('id="detail"', 1)[1]
    scheduled = re.search(r"<dt>scheduled_for</dt><dd><span>([^<]*)<",
                          detail)
    assert scheduled and scheduled[1] not in ("", "-"), detail[:3000]


# ---------------------------------------------------------------------------
# 9. Storage and upgrades
# ---------------------------------------------------------------------------


def test_database_is_in_wal_mode(q):
    q.counts()
    conn = sqlite3.connect(q.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_sqlite_file_of_another_application_is_refused_untouched(
        make_queue, tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ann')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    foreign = make_queue("app.db", register_tasks=False)
    with pytest.raises(liteq.SchemaError) as info:
        foreign.counts()
    assert str(path) in str(info.value)
    register(foreign, add)
    with pytest.raises(liteq.SchemaError):
        T.add.delay(1, 2)
    with pytest.raises(liteq.SchemaError):
        liteq.Worker(foreign).run_once()
    foreign.close()
    assert path.read_bytes() == before
    assert not os.path.exists(str(path) + "-wal")


def test_file_that_is_not_sqlite_is_refused_untouched(make_queue, tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = path.read_bytes()
    foreign = make_queue("notes.db")
    with pytest.raises(liteq.SchemaError):
        foreign.counts()
    with pytest.raises(liteq.SchemaError):
        T.add.delay(1, 2)
    foreign.close()
    assert path.read_bytes() == before


def test_a_missing_folder_or_a_folder_given_as_the_file_is_named(
        make_queue, tmp_path):
    missing = make_queue("no/such/jobs.db", register_tasks=False)
    folder = tmp_path / "jobs"
    folder.mkdir()
    given_a_folder = make_queue("jobs", register_tasks=False)
    with pytest.raises(liteq.StorageError) as info:
        missing.counts()
    assert str(info.value).startswith(
        f"cannot open {tmp_path}/no/such/jobs.db: its folder "
        f"{tmp_path}/no/such does not exist")
    with pytest.raises(liteq.StorageError) as info:
        given_a_folder.counts()
    assert str(info.value).startswith(
        f"cannot open {folder}: it is a folder, not a database file")
    assert sorted(os.listdir(tmp_path)) == ["jobs"]
    assert os.listdir(folder) == []


def _set_user_version(path, version):
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA user_version = {int(version)}")
    finally:
        conn.close()


def test_database_from_a_newer_liteq_raises_schema_error(make_queue):
    q = make_queue("newer.db")
    T.add.delay(1, 2)
    q.close()
    _set_user_version(q.path, 99)
    reopened = make_queue("newer.db")
    with pytest.raises(liteq.SchemaError) as info:
        reopened.counts()
    assert "99" in str(info.value)
    assert reopened.path in str(info.value)
    with pytest.raises(liteq.SchemaError):
        T.add.delay(1, 2)


def test_open_queue_checks_the_schema_at_its_next_write(q):
    job = T.add.delay(1, 2)
    _set_user_version(q.path, 99)
    with pytest.raises(liteq.SchemaError):
        T.add.delay(3, 4)
    with pytest.raises(liteq.SchemaError):
        job.cancel()
    with pytest.raises(liteq.SchemaError):
        liteq.Worker(q).run_once()


def test_open_queue_checks_the_schema_at_its_next_read(q):
    job = T.add.delay(1, 2)
    _set_user_version(q.path, 99)
    with pytest.raises(liteq.SchemaError):
        q.counts()
    with pytest.raises(liteq.SchemaError):
        job.status


def test_running_worker_stops_when_the_schema_becomes_newer(q,
                                                            start_worker):
    worker = start_worker(q)
    assert T.add.delay(1, 2).result(timeout=DEADLINE) == 3
    _set_user_version(q.path, 99)
    wait_until(lambda: worker.fatal is not None,
               what="the worker to stop on a newer schema")
    assert "99" in worker.fatal


def test_opener_overtaken_by_another_openers_schema_creation_succeeds(
        tmp_path, monkeypatch):
    # Deterministic form of the race between openers of a new file (SPEC
    # 9): the first connection opened is traced, and as it starts its
    # second statement, after its first look at the header, another Queue
    # creates the schema.  The header must be judged from one snapshot,
    # so the overtaken opener must still accept the file.  (A top-level
    # statement is traced before it takes any lock.)
    path = str(tmp_path / "overtaken.db")
    real_connect = sqlite3.connect
    state = {"traced": False, "other": None}

    def create_schema_elsewhere():
        other = liteq.Queue(path)
        try:
            return other.counts()
        finally:
            other.close()

    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        if not state["traced"]:
            state["traced"] = True
            seen = []

            def trace(statement):
                if statement.startswith("--"):
                    return  # a nested event inside a running statement
                seen.append(statement)
                if len(seen) == 2:
                    state["other"] = Background(create_schema_elsewhere)
                    state["other"].thread.join(5)

            conn.set_trace_callback(trace)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    opener = liteq.Queue(path)
    try:
        counts = opener.counts()
    finally:
        opener.close()
        if state["other"] is not None:
            state["other"].join(DEADLINE)
    assert state["other"] is not None, "the race was not staged"
    assert counts == {"pending": 0, "running": 0, "done": 0, "failed": 0,
                      "cancelled": 0}


def test_many_openers_of_a_new_file_create_the_schema_once(tmp_path):
    # Several rounds: the race between openers is met on almost every run.
    empty = {"pending": 0, "running": 0, "done": 0, "failed": 0,
             "cancelled": 0}
    for round_ in range(10):
        path = tmp_path / f"fresh{round_}.db"
        barrier = threading.Barrier(8)
        queues = [liteq.Queue(path) for _ in range(8)]

        def open_and_count(queue):
            barrier.wait(DEADLINE)
            return queue.counts()

        try:
            outcomes = join_all([Background(open_and_count, queue)
                                 for queue in queues])
        finally:
            for queue in queues:
                queue.close()
        assert outcomes == [empty] * 8
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_new_queue_first_used_by_many_threads_at_once(make_queue):
    for round_ in range(10):
        queue = make_queue(f"threads{round_}.db")
        barrier = threading.Barrier(8)

        def delay_one(n):
            barrier.wait(DEADLINE)
            return T.add.delay(n, n).id

        ids = join_all([Background(delay_one, n) for n in range(8)])
        assert len(set(ids)) == 8
        assert queue.counts()["pending"] == 8


def test_queue_used_in_a_forked_child_opens_its_own_connections(q):
    first = T.add.delay(1, 2)  # the parent's connection is open
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child_job = T.add.delay(3, 4)
            code = 0 if child_job.status == "pending" else 2
        finally:
            os._exit(code)
    assert reap(pid) == 0
    assert q.counts()["pending"] == 2
    assert T.add.delay(5, 6).status == "pending"  # the parent goes on
    run_all(liteq.Worker(q))
    assert sorted(job.result(timeout=5) for job in q.jobs()) == [3, 7, 11]
    assert first.status == "done"


class ForkProbe:
    def __init__(self, path):
        self.path = path

    def after_fork(self):
        with open(self.path, "a") as file:
            file.write("ran\n")


def test_forked_child_renews_the_lock_and_runs_on_fork_callbacks(
        q, tmp_path):
    kept = ForkProbe(tmp_path / "kept")
    liteq._PROCESS.on_fork(kept.after_fork)
    dropped = ForkProbe(tmp_path / "dropped")
    liteq._PROCESS.on_fork(dropped.after_fork)
    del dropped  # held weakly: nothing keeps it
    held, release = threading.Event(), threading.Event()

    def hold():
        with liteq._PROCESS.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(30)
        pid = os.fork()
        if pid == 0:  # the holder is not here: the lock must be fresh
            code = 1
            try:
                code = 0 if T.add.delay(1, 2).status == "pending" else 2
            finally:
                os._exit(code)
        assert reap(pid) == 0
    finally:
        release.set()
        holder.join()
    assert (tmp_path / "kept").read_text() == "ran\n"
    assert not (tmp_path / "dropped").exists()


def test_wal_file_stays_bounded(make_queue):
    bulk = make_queue("bulk.db")
    bulk.counts()
    reader = sqlite3.connect(bulk.path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM liteq_jobs").fetchone()
        payload = "x" * 1_000_000
        for _ in range(70):  # a pinned reader lets the WAL pass 64 MiB
            T.echo.apply_async((payload,), queue="bulk")
        reader.execute("COMMIT")
    finally:
        reader.close()
    limit = 64 * 2**20 + 2**20

    def bounded():
        T.add.apply_async((1, 2), queue="bulk")
        return os.path.getsize(bulk.path + "-wal") <= limit

    wait_until(bounded, what="the -wal file to shrink to its limit")
    assert bulk.counts()["pending"] >= 71


def test_worker_keep_purges_old_finished_jobs(q, clock, start_worker):
    old = T.add.delay(1, 2)
    liteq.Worker(q).run_once()
    clock.advance(6 * 86400)
    young = T.add.delay(3, 4)
    liteq.Worker(q).run_once()
    unfinished = T.record.apply_async(("later",), queue="elsewhere")
    clock.advance(2 * 86400)  # old finished 8 days ago, young 2 days ago
    start_worker(q, keep="7d")
    wait_until(lambda: q.get(old.id) is None, what="the purge")
    assert young.status == "done"
    assert unfinished.status == "pending"


def test_worker_keep_rejects_a_bad_duration(q):
    with pytest.raises(ValueError):
        liteq.Worker(q, keep="seven days")


@pytest.mark.parametrize("sql", ["_SQL_LINE", "_SQL_HIGHER_READY",
                                 "_SQL_READY_QUEUES"])
def test_claim_queries_use_the_ready_index(q, sql):
    q.counts()
    text = getattr(liteq, sql)
    conn = sqlite3.connect(q.path)
    try:
        plan = conn.execute("EXPLAIN QUERY PLAN " + text,
                            ("default", 5)[:text.count("?")]).fetchall()
    finally:
        conn.close()
    details = " ".join(row[-1] for row in plan)
    assert "INDEX liteq_jobs_ready" in details
    assert "TEMP B-TREE" not in details


def sent_sql(caplog, action):
    """The statements ``action()`` sends, from liteq's DEBUG records."""
    caplog.set_level(logging.DEBUG, logger="liteq")
    caplog.clear()
    action()
    return [r.getMessage()[5:] for r in caplog.records
            if r.getMessage().startswith("sql: ")]


def test_delay_sends_one_statement_and_a_write_five(q, caplog):
    job = T.add.delay(1, 2)  # the connection is open and checked
    assert len(sent_sql(caplog, lambda: T.add.delay(3, 4))) == 1
    sent = sent_sql(caplog, job.cancel)
    assert len(sent) == 5
    assert sent[0].startswith("BEGIN IMMEDIATE")
    assert sent[1].startswith("PRAGMA user_version")
    assert sent[-1].startswith("COMMIT")


CLOSE_WHILE_IN_USE = """
import sys, threading
sys.path.insert(0, {liteq_dir!r})
import liteq

def ping(x):
    return x

for n in range(40):
    queue = liteq.Queue(sys.argv[1] + str(n) + ".db")
    task = queue.task(name="ping")(ping)
    for i in range(50):
        task.delay(i)
    stop, errors = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                queue.counts()
                queue.jobs(limit=20)
            except Exception as exc:
                errors.append(repr(exc))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for _ in range(5):
        queue.close()  # while the readers are inside their queries
    stop.set()
    for thread in readers:
        thread.join()
    queue.close()
    assert not errors, errors[:3]
print("survived")
"""


def test_close_while_other_threads_query_neither_crashes_nor_fails(tmp_path):
    # close() used to close connections under threads still inside a
    # query: the interpreter crashed (SIGSEGV) within a few rounds.  A
    # subprocess, so that a crash fails this test, not the whole run.
    script = tmp_path / "close_in_use.py"
    script.write_text(CLOSE_WHILE_IN_USE.format(liteq_dir=LITEQ_DIR))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=DEADLINE,
                          check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["survived"]


# Version-1 files (before time as data) open as version 2 ----------------


def _version_1_file(path, rows):
    """A file as liteq's schema version 1 wrote it, holding ``rows``
    (dicts of column values)."""
    conn = sqlite3.connect(path)
    try:
        for sql in liteq._MIGRATIONS[0]:
            conn.execute(sql)
        conn.execute("PRAGMA application_id = 0x6C697471")
        conn.execute("PRAGMA user_version = 1")
        for row in rows:
            conn.execute(
                f"INSERT INTO liteq_jobs ({', '.join(row)}) VALUES "
                f"({', '.join('?' * len(row))})", tuple(row.values()))
        conn.commit()
    finally:
        conn.close()


def _v1_row(label, **columns):
    call = json.dumps({"__task__": stored(record), "args": [label],
                       "kwargs": {}})
    return {"name": stored(record), "current": stored(record), "call": call,
            "description": f"record {label}", "queue": "default",
            "priority": 0, "status": "pending", "eta": T0,
            "created_at": T0, "updated_at": T0, **columns}


def test_a_version_1_file_is_migrated_keeping_every_job(make_queue,
                                                        tmp_path):
    path = tmp_path / "v1.db"
    _version_1_file(path, [
        _v1_row("now", ready=1),
        _v1_row("later", eta=T0 + 600, timer=T0 + 600),
        _v1_row("backoff", status="running", failures=1, attempts=1,
                steps=0, eta=T0 + 30, timer=T0 + 30, started_at=T0,
                error="Traceback...\nRuntimeError: once"),
        _v1_row("done", status="done", result='"done"', steps=1,
                attempts=1, started_at=T0, finished_at=T0),
        _v1_row("held", status="running", attempts=1, timer=T0 + 60,
                worker="gone:1", started_at=T0)])
    queue = make_queue("v1.db")
    jobs = queue.jobs()[::-1]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    finally:
        conn.close()
    assert [job.id for job in jobs] == [1, 2, 3, 4, 5]
    assert [(job.status, job.waiting) for job in jobs] == [
        ("pending", None), ("pending", "timer"), ("running", "retry"),
        ("done", None), ("running", None)]
    assert [job.to_dict()["waiting"] for job in jobs] == [
        None, "timer", "retry", None, None]
    assert [(job.expires, job.deadline, job.errors) for job in jobs] == [
        (None, None, [])] * 5
    assert queue.enqueued(T.record, label="later") == [jobs[1]]
    with queue.clock(start=T0) as test_clock:
        assert queue.drain()["done"] == 1
        test_clock.advance(3600)  # the lease of "held" expires too
        assert queue.drain() == {"done": 3, "failed": 0, "cancelled": 0,
                                 "steps": 3, "waiting": 0}
    assert [job.result() for job in jobs] == [
        "now", "later", "backoff", "done", "held"]
    assert LOG[0] == "now"
    assert sorted(LOG[1:]) == ["backoff", "held", "later"]


# ---------------------------------------------------------------------------
# 10. Time: waits, snooze, expiry, deadlines
# ---------------------------------------------------------------------------
# Waits are stored data.  Most tests here run on the Queue's test clock
# (``q.clock()``) and ``q.drain()``; those with a worker use the store's
# fake clock (``clock``) and a ``HandWorker``, or a real Worker inside
# ``q.clock()``.  Task bodies read the test clock from FLAGS["clock"].


def iso(timestamp):
    """A unix time as liteq writes it in messages: ISO 8601, Z."""
    return utc(timestamp).isoformat().replace("+00:00", "Z")


def clock_time():
    """The time of the test clock in FLAGS["clock"], inside a step."""
    return FLAGS["clock"].time()


def nap_then(label, seconds):
    """Note the label; its job then waits, then records the label."""
    LOG.append(label)
    FLAGS.get("during", lambda: None)()
    return T.record(label).after(seconds=seconds)


def record_at(label, eta):
    LOG.append(label)
    return T.record(label).at(eta)


def snoozer(times):
    """Snooze 60 s ``times`` times, then finish; notes what it saw."""
    job = liteq.current_job()
    if job is not None:
        LOG.append((job.attempt, job.steps, job.attempts))
    else:
        LOG.append("run")
    if len(LOG) <= times:
        return liteq.snooze(60)
    return "awake"


def snooze_cancelled():
    LOG.append("ran")
    liteq.current_job().cancel()
    return liteq.snooze(60)


def fail_numbered():
    raise RuntimeError(f"attempt {liteq.current_job().attempt}")


def every(label, n, hours):
    """Note (clock time, label), then again every ``hours``, n times."""
    LOG.append((clock_time(), label))
    if n > 1:
        return T.every(label, n - 1, hours).after(hours=hours)
    return label


def remind(user, left):
    """A daily reminder until the user answers or ``left`` runs out."""
    answered = FLAGS["answers"].get(user)
    if answered is not None and clock_time() >= answered:
        return f"{user} answered"
    LOG.append((user, (clock_time() - T0) / 86400))
    if left > 1:
        return T.remind(user, left - 1).after(days=1)
    return f"{user} never answered"


def flaky_until(failures):
    """Fail the first ``failures`` attempts; note each attempt's time."""
    LOG.append(clock_time())
    if len(LOG) <= failures:
        raise RuntimeError(f"not yet ({len(LOG)})")
    return "made it"


TIME_FUNCTIONS = [nap_then, record_at, snoozer, snooze_cancelled,
                  fail_numbered, every, remind, flaky_until]


@pytest.fixture
def tq(q):
    """``q`` with this section's task functions registered too."""
    for fn in TIME_FUNCTIONS:
        register(q, fn)
    return q


@pytest.fixture
def tclock(tq):
    """The test clock of ``tq``, from T0, also in FLAGS["clock"]."""
    with tq.clock(start=T0) as test_clock:
        FLAGS["clock"] = test_clock
        yield test_clock


# after() and at(): waits between steps ------------------------------------


def test_a_step_returning_after_leaves_its_job_running_until_wake_time(
        tq, tclock):
    job = T.nap_then.delay("a", 3600)
    assert tq.drain()["steps"] == 1
    assert (job.status, job.waiting, job.eta) == (
        "running", "timer", utc(T0 + 3600))
    assert job.to_dict()["waiting"] == "timer"
    assert job.to_dict()["eta"] == iso(T0 + 3600)
    assert tq.drain(until=T0 + 3599.5)["steps"] == 0
    assert (job.status, LOG) == ("running", ["a"])
    assert tq.drain(until=T0 + 3600) == {
        "done": 1, "failed": 0, "cancelled": 0, "steps": 1, "waiting": 0}
    assert (job.result(), job.steps, job.waiting, LOG) == (
        "a", 2, None, ["a", "a"])


def test_the_wake_time_counts_from_the_commit_not_the_start_of_the_step(
        tq, tclock):
    FLAGS["during"] = lambda: tclock.advance(seconds=45)  # a long step
    job = T.nap_then.delay("a", 600)
    tq.drain()
    assert job.eta == utc(T0 + 45 + 600)


def test_a_worker_never_runs_a_waiting_job_before_its_wake_time(
        tq, clock, hand):
    worker = hand()
    job = T.nap_then.delay("a", 3600)
    other = T.record.delay("other")
    assert worker.turn_until_idle() > 0
    assert (job.status, job.waiting, other.status) == (
        "running", "timer", "done")
    clock.advance(3599.9)
    assert worker.turn_until_idle() > 0
    assert (job.status, LOG) == ("running", ["a", "other"])
    clock.advance(0.1)
    assert worker.turn_until_idle() > 0
    assert (job.status, job.result(), LOG) == (
        "done", "a", ["a", "other", "a"])


def test_at_from_a_step_wakes_at_that_time_and_a_past_time_at_once(
        tq, tclock):
    later = T.record_at.delay("later", T0 + 7200)
    past = T.record_at.delay("past", T0 - 10)
    tq.drain()
    assert (later.waiting, later.eta) == ("timer", utc(T0 + 7200))
    assert (past.status, past.waiting) == ("done", None)
    tq.drain(until=T0 + 7200)
    assert later.result() == "later"
    assert LOG == ["later", "past", "past", "later"]


def test_after_or_at_given_to_delay_is_a_countdown_or_an_eta(q, clock):
    jobs = [T.record("a").after(minutes=2).delay(),
            T.record.apply_async(("b",), countdown=120),
            T.record("c").at(T0 + 120).apply_async(priority=3),
            T.record.apply_async(("d",), eta=utc(T0 + 120))]
    for job in jobs:
        assert (job.status, job.waiting, job.eta) == (
            "pending", "timer", utc(T0 + 120))
    # The stored call is the plain one: the wait became the job's eta.
    assert [job.to_dict()["args"] for job in jobs] == [
        ["a"], ["b"], ["c"], ["d"]]
    worker = liteq.Worker(q)
    assert worker.run_once() is False
    clock.advance(120)
    run_all(worker)
    assert LOG[0] == "c" and sorted(LOG) == ["a", "b", "c", "d"]
    assert [job.waiting for job in jobs] == [None] * 4


@pytest.mark.parametrize("option", [{"countdown": 5}, {"eta": T0 + 5}])
def test_a_delayed_call_with_a_countdown_or_eta_too_is_a_type_error(
        q, clock, option):
    for call in (T.record("x").after(seconds=5), T.record("x").at(T0 + 5)):
        with pytest.raises(TypeError, match="not both"):
            call.apply_async(**option)
    assert sum(q.counts().values()) == 0


def test_a_chain_waits_before_its_delayed_member(tq, tclock):
    job = liteq.chain([T.record("one"), T.record("two").after(days=1),
                       T.record("three")]).delay()
    tq.drain()
    assert (LOG, job.status, job.waiting, job.eta) == (
        ["one"], "running", "timer", utc(T0 + 86400))
    tq.drain(until=T0 + 86399)
    assert LOG == ["one"]
    tq.drain(until=T0 + 86400)
    assert (LOG, job.status, job.result()) == (
        ["one", "two", "three"], "done", "three")


def test_a_chain_whose_first_member_waits_starts_late(tq, tclock):
    job = liteq.chain([T.record("one").after(hours=2),
                       T.record("two")]).delay()
    tq.drain(until=T0 + 7199)
    assert (LOG, job.waiting, job.eta) == ([], "timer", utc(T0 + 7200))
    tq.drain(until=T0 + 7200)
    assert (LOG, job.status) == (["one", "two"], "done")


def test_a_delayed_task_keeps_its_wait_in_its_json_form(q):
    plain = T.record("x")
    after = plain.after(seconds=30, minutes=1, hours=1, days=1)
    at = plain.at(dt.datetime(2030, 1, 1, tzinfo=UTC))
    assert liteq.serialize_task(after) == {
        "__task__": stored(record), "args": ["x"], "kwargs": {},
        "after": 90090.0}
    assert liteq.serialize_task(at)["at"] == 1893456000.0
    assert plain.after() != plain  # a wait of 0 is still a wait
    assert after != plain and at != plain and after != at
    assert after == plain.after(seconds=90090)
    assert liteq.serialize_task(plain) == {
        "__task__": stored(record), "args": ["x"], "kwargs": {}}
    for call in (after, at):
        value = liteq.serialize_task(call)
        assert liteq.deserialize_task(json.loads(json.dumps(value))) == call
    assert T.echo([after, at]).run() == [after, at]  # in values too


@pytest.mark.parametrize("wait, problem", [
    ({"after": -1}, "after is -1, not a finite number >= 0"),
    ({"after": "x"}, "after is 'x', not a finite number >= 0"),
    ({"after": math.inf}, "after is inf, not a finite number >= 0"),
    ({"at": None}, "at is None, not a finite number"),
    ({"after": 1, "at": 1}, "the task has both 'after' and 'at'"),
], ids=["negative", "text", "inf", "at-null", "both"])
def test_a_malformed_wait_in_a_serialized_task_is_a_value_error(
        wait, problem):
    value = {"__task__": "m:f", "args": [], "kwargs": {}, **wait}
    with pytest.raises(ValueError) as info:
        liteq.deserialize_task(value)
    assert str(info.value) == problem
    with pytest.raises(ValueError) as info:
        liteq.deserialize_task({"__task__": "m:g", "args": [value]})
    assert str(info.value).startswith("args[0]")


@pytest.mark.parametrize("store", [
    lambda q: T.record("x").after(-1).delay(),
    lambda q: T.record("x").after(minutes=math.nan).delay(),
    lambda q: T.record("x").after(hours=math.inf).delay(),
    lambda q: T.record("x").after(days=1e9).delay(),
    lambda q: T.record("x").at(dt.datetime(9999, 12, 31, tzinfo=UTC)),
    lambda q: T.record("x").at(1e300),
    lambda q: T.record.apply_async(("x",), expires=0),
    lambda q: T.record.apply_async(("x",), expires=-5),
    lambda q: T.record.apply_async(("x",), countdown=60, expires=30),
    lambda q: T.record("x").after(seconds=60).apply_async(expires=60),
    lambda q: T.record.apply_async(("x",), expires=utc(T0)),
    lambda q: T.record.apply_async(("x",), deadline=T0),
    lambda q: T.record.apply_async(("x",), deadline=utc(T0 - 60)),
    lambda q: T.record.apply_async(("x",), countdown=60, deadline=T0 + 30),
    lambda q: register(q, record, job_timeout=0),
    lambda q: register(q, record, job_timeout=-1),
    lambda q: register(q, record, job_timeout=math.inf),
], ids=["after-negative", "after-nan", "after-inf", "after-too-long",
        "at-year-9999", "at-too-late", "expires-now", "expires-past",
        "expires-before-countdown", "expires-at-after", "expires-datetime-now",
        "deadline-now", "deadline-past", "deadline-before-countdown",
        "job-timeout-0", "job-timeout-negative", "job-timeout-inf"])
def test_bad_delays_and_time_limits_are_refused_and_store_nothing(
        q, clock, store):
    with pytest.raises(ValueError):
        store(q)
    assert sum(q.counts().values()) == 0


@pytest.mark.parametrize("store", [
    lambda: T.record("x").at("tomorrow"),
    lambda: T.record("x").at(None),
    lambda: T.record.apply_async(("x",), expires="1h"),
    lambda: T.record.apply_async(("x",), deadline="soon"),
    lambda: T.record.apply_async(("x",), deadline=True),
], ids=["at-text", "at-none", "expires-text", "deadline-text",
        "deadline-bool"])
def test_times_of_the_wrong_type_are_type_errors(q, clock, store):
    with pytest.raises(TypeError):
        store()
    assert sum(q.counts().values()) == 0


# Job.waiting and Job.errors -----------------------------------------------


def test_job_waiting_is_retry_during_a_backoff_and_none_in_line_or_done(
        q, clock):
    register(q, fail, retries=1, retry_delay=30)
    job = T.fail.delay("boom")
    assert (job.status, job.waiting) == ("pending", None)  # in line
    worker = liteq.Worker(q)
    assert worker.run_once() is True
    assert (job.status, job.waiting, job.eta) == (
        "running", "retry", utc(T0 + 30))
    assert job.to_dict()["waiting"] == "retry"
    assert worker.run_once() is False
    clock.advance(30)
    assert worker.run_once() is True
    assert (job.status, job.waiting, job.to_dict()["waiting"]) == (
        "failed", None, None)
    done = T.record.delay("x")
    run_all(worker)
    assert (done.status, done.waiting) == ("done", None)


def test_job_errors_lists_the_current_steps_last_ten_failed_attempts(
        q, clock):
    register(q, fail_numbered, retries=11, retry_delay=0)
    job = T.fail_numbered.delay()
    assert job.errors == [] and job.to_dict()["errors"] == []
    run_all(liteq.Worker(q))
    assert (job.status, job.attempts) == ("failed", 12)
    assert job.errors == [f"RuntimeError: attempt {n}" for n in range(3, 13)]
    assert job.to_dict()["errors"] == job.errors
    assert job.error.startswith("Traceback")  # the last one, in full


def test_job_errors_start_again_when_a_continuation_is_stored(q, clock):
    job = T.flaky_steps.delay(2)  # each step fails once, then continues
    worker = liteq.Worker(q)
    worker.run_once()
    assert job.errors == ["RuntimeError: step 2 fails once"]
    worker.run_once()
    assert (job.steps, job.errors) == (1, [])
    worker.run_once()
    assert job.errors == ["RuntimeError: step 1 fails once"]
    run_all(worker)
    assert (job.status, job.errors) == ("done", [
        "RuntimeError: step 1 fails once"])


def test_the_cli_and_http_show_why_a_job_waits(tq, tclock, capsys):
    job = T.nap_then.apply_async(("a", 3600), deadline=T0 + 7200)
    tq.drain()
    assert liteq.main(["list", "--json", "--db", tq.path]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["waiting"], listed["deadline"]) == (
        "timer", iso(T0 + 7200))
    status, _, body = _ops_call(liteq.wsgi_app(tq),
                                _ops_environ(f"/tasks/{job.id}"))
    assert status == "200 OK"
    assert json.loads(body)["waiting"] == "timer"


def test_liteq_show_says_why_a_job_waits(tq, tclock, capsys):
    job = T.nap_then.delay("a", 3600)
    tq.drain()
    assert liteq.main(["show", str(job.id), "--db", tq.path]) == 0
    assert re.search(r"^waiting +timer$", capsys.readouterr().out, re.M)


# snooze() ------------------------------------------------------------------


def test_a_snoozing_step_runs_again_later_using_no_retry_and_no_step(
        tq, tclock):
    register(tq, snoozer, retries=0)
    job = T.snoozer.delay(2)
    tq.drain()
    assert (job.status, job.waiting, job.eta) == (
        "running", "timer", utc(T0 + 60))
    assert (job.steps, job.attempts, job.errors) == (0, 0, [])
    assert tq.drain(until=T0 + 59)["steps"] == 0
    counts = tq.drain(until=T0 + 120)
    assert counts == {"done": 1, "failed": 0, "cancelled": 0, "steps": 2,
                      "waiting": 0}
    assert (job.result(), job.steps, job.attempts) == ("awake", 1, 1)
    # (attempt, steps, attempts) inside: a first attempt each time.
    assert LOG == [(1, 0, 1)] * 3


def test_a_snooze_from_a_step_cancelled_meanwhile_cancels_the_job(
        tq, tclock):
    job = T.snooze_cancelled.delay()
    assert tq.drain() == {"done": 0, "failed": 0, "cancelled": 1,
                          "steps": 1, "waiting": 0}
    assert (job.status, job.waiting) == ("cancelled", None)
    tq.drain(until=T0 + 3600)
    assert LOG == ["ran"]


def test_snooze_outside_a_step_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="inside a step"):
        liteq.snooze(5)


def test_task_run_reruns_a_snooze_at_once_at_most_100_times(tq):
    assert T.snoozer(100).run() == "awake"
    assert LOG == ["run"] * 101
    LOG.clear()
    with pytest.raises(RuntimeError, match="snoozed 100 times"):
        T.snoozer(101).run()


def test_run_once_returns_the_same_call_for_a_snooze(tq):
    assert T.snoozer(1).run_once() == T.snoozer(1)
    assert LOG == ["run"]


def test_task_run_skips_waits_and_run_once_returns_the_delayed_call(tq):
    assert T.nap_then("a", 3600).run() == "a"
    assert liteq.chain([T.record("b").after(days=9),
                        T.record_at("c", T0 + 10**6)]).run() == "c"
    assert LOG == ["a", "a", "b", "c", "c"]
    assert T.nap_then("d", 60).run_once() == T.record("d").after(seconds=60)


# expires -------------------------------------------------------------------


def test_a_job_not_started_by_its_expiry_is_cancelled_and_never_runs(
        tq, tclock):
    seconds = T.record.apply_async(("seconds",), expires=60)
    when = T.record.apply_async(("when",), expires=utc(T0 + 90))
    assert (seconds.expires, when.expires) == (utc(T0 + 60), utc(T0 + 90))
    assert seconds.to_dict()["expires"] == iso(T0 + 60)
    tclock.advance(90)
    assert tq.drain() == {
        "done": 0, "failed": 0, "cancelled": 2, "steps": 0, "waiting": 0}
    assert LOG == []
    assert (seconds.status, seconds.error) == (
        "cancelled", f"expired at {iso(T0 + 60)}")
    assert (when.status, when.error) == (
        "cancelled", f"expired at {iso(T0 + 90)}")
    with pytest.raises(liteq.TaskCancelled):
        when.result(timeout=0)


def test_an_expiry_no_longer_applies_once_the_first_step_started(
        tq, tclock):
    job = T.nap_then.apply_async(("a", 3600), expires=60)
    tq.drain(until=T0 + 7200)
    assert (job.status, LOG) == ("done", ["a", "a"])


@pytest.mark.parametrize("pace", [{}, DEFER], ids=["steady", "deferred"])
def test_a_job_that_expires_in_line_behind_others_is_never_run(
        q, clock, hand, pace):
    worker = hand(**pace)
    FLAGS["meanwhile"] = lambda: clock.advance(120)
    first = T.meanwhile.delay("first")
    expiring = T.record.apply_async(("expiring",), expires=60)
    last = T.record.delay("last")
    assert worker.turn_until_idle() > 0
    assert (first.status, expiring.status, last.status) == (
        "done", "cancelled", "done")
    assert expiring.error == f"expired at {iso(T0 + 60)}"
    assert LOG == ["first", "last"]


def test_a_real_worker_cancels_a_job_that_expired_while_it_was_busy(
        q, start_worker):
    with q.clock(start=T0) as test_clock:
        worker = start_worker(q)
        busy = T.gated.delay("finish")
        GATE.wait_entered()
        expiring = T.record.apply_async(("expiring",), expires=60)
        later = T.record.delay("later")
        test_clock.advance(61)
        GATE.go.set()
        wait_until(lambda: later.status == "done" and expiring.status
                   == "cancelled", what="the line to be worked through")
        assert worker.stop(timeout=DEADLINE)
    assert busy.result() == "finished anyway"
    assert expiring.error == f"expired at {iso(T0 + 60)}"
    assert LOG == ["later"]


# deadline and job_timeout --------------------------------------------------


def test_a_waiting_job_past_its_deadline_fails_at_once(tq, tclock):
    job = T.nap_then.apply_async(("a", 3600), deadline=T0 + 1800)
    assert job.deadline == utc(T0 + 1800)
    assert job.to_dict()["deadline"] == iso(T0 + 1800)
    tq.drain()
    assert job.waiting == "timer"
    tclock.advance(1800)
    assert tq.drain() == {"done": 0, "failed": 1, "cancelled": 0,
                          "steps": 0, "waiting": 0}
    assert (job.status, job.error, job.waiting) == (
        "failed", f"deadline exceeded at {iso(T0 + 1800)}", None)
    assert job.finished_at == utc(T0 + 1800)
    assert LOG == ["a"]
    with pytest.raises(liteq.TaskFailed, match="deadline exceeded"):
        job.result(timeout=0)


def test_drain_until_fails_a_job_at_its_deadline_on_the_way(tq, tclock):
    job = T.nap_then.apply_async(("a", 3600),
                                 deadline=utc(T0) + dt.timedelta(hours=1))
    tq.drain(until=T0 + 86400)
    assert (job.status, job.error, job.finished_at) == (
        "failed", f"deadline exceeded at {iso(T0 + 3600)}", utc(T0 + 3600))


def test_job_timeout_counts_from_the_delay_over_all_the_waits(tq, tclock):
    register(tq, nap_then, job_timeout=600)
    job = T.nap_then.apply_async(("a", 3600), countdown=100)
    assert job.deadline == utc(T0 + 600)  # from the delay, not the start
    quick = T.nap_then.delay("b", 60)
    tq.drain(until=T0 + 3600)
    assert (job.status, job.error) == (
        "failed", f"deadline exceeded at {iso(T0 + 600)}")
    assert (quick.status, LOG) == ("done", ["b", "b", "a"])


def test_a_deadline_keeps_the_earlier_of_job_timeout_and_the_option(
        tq, tclock):
    register(tq, record, job_timeout=600)
    assert T.record.apply_async(("x",), deadline=T0 + 300).deadline == utc(
        T0 + 300)
    assert T.record.apply_async(("x",), deadline=T0 + 900).deadline == utc(
        T0 + 600)


def test_a_step_that_ends_past_the_deadline_has_its_outcome_refused(
        tq, tclock):
    register(tq, meanwhile)
    FLAGS["meanwhile"] = lambda: tclock.advance(hours=1)
    job = T.meanwhile.apply_async(("late",), deadline=T0 + 60)
    assert tq.drain() == {"done": 0, "failed": 1, "cancelled": 0,
                          "steps": 1, "waiting": 0}
    assert (job.status, job.error, job.steps) == (
        "failed", f"deadline exceeded at {iso(T0 + 60)}", 0)
    assert LOG == ["late"]  # it ran: only its outcome was refused


def test_a_continuation_returned_past_the_deadline_is_never_stored(
        tq, tclock):
    FLAGS["during"] = lambda: tclock.advance(hours=1)
    job = T.nap_then.apply_async(("a", 1), deadline=T0 + 60)
    tq.drain(until=T0 + 86400)
    assert (job.status, job.current, LOG) == (
        "failed", stored(nap_then), ["a"])


@pytest.mark.parametrize("pace", [{}, DEFER], ids=["steady", "deferred"])
def test_a_worker_runs_no_step_of_a_job_past_its_deadline(
        q, clock, hand, pace):
    worker = hand(**pace)
    FLAGS["meanwhile"] = lambda: clock.advance(60)
    ticking = T.tick.apply_async(("a", 3), deadline=T0 + 30)
    slow = T.meanwhile.apply_async(("slow",), deadline=T0 + 30)
    later = T.tick.apply_async(("later", 2), deadline=T0 + 3600)
    assert worker.turn_until_idle() > 0
    for job in (ticking, slow):
        assert (job.status, job.error) == (
            "failed", f"deadline exceeded at {iso(T0 + 30)}")
    assert (LOG, later.status) == (["a", "slow", "later", "later"], "done")


def test_a_step_that_ended_before_the_deadline_counts_if_written_after(
        q, clock, hand):
    worker = hand(**DEFER)
    FLAGS["meanwhile"] = lambda: clock.advance(60)
    quick = T.record.apply_async(("quick",), deadline=T0 + 30)
    T.meanwhile.delay("slow")  # its step ends before quick's is written
    assert worker.turn_until_idle() > 0
    assert LOG == ["quick", "slow"]
    assert (quick.status, quick.error) == ("done", None)


def test_a_worker_fails_a_job_past_its_deadline_when_its_step_ends(
        q, start_worker):
    with q.clock(start=T0) as test_clock:
        worker = start_worker(q, threads=2)
        job = T.gated.apply_async(("continue",), deadline=T0 + 60)
        GATE.wait_entered()
        wait_until(lambda: job.worker is not None, what="the step shown")
        test_clock.advance(120)
        # Another job runs to its end: the sweeps ran, and left this one.
        assert T.record.delay("other").result(timeout=DEADLINE) == "other"
        assert job.status == "running"
        GATE.go.set()
        wait_until(lambda: job.status == "failed", what="the job to fail")
        assert worker.stop(timeout=DEADLINE)
    assert job.error == f"deadline exceeded at {iso(T0 + 60)}"
    assert LOG == ["other"]  # the continuation was refused: never run


def test_a_worker_fails_a_waiting_job_at_its_deadline(q, start_worker):
    register(q, nap_then)
    with q.clock(start=T0) as test_clock:
        worker = start_worker(q)
        job = T.nap_then.apply_async(("a", 3600), deadline=T0 + 600)
        wait_until(lambda: job.waiting == "timer", what="the job to wait")
        test_clock.advance(600)
        wait_until(lambda: job.status == "failed", what="the job to fail")
        assert worker.stop(timeout=DEADLINE)
    assert job.error == f"deadline exceeded at {iso(T0 + 600)}"


# cancel() and retry() of a waiting job -------------------------------------


def test_cancel_of_a_waiting_job_is_immediate(tq, tclock):
    job = T.nap_then.delay("a", 3600)
    tq.drain()
    assert job.cancel() is True
    assert (job.status, job.waiting, job.finished_at) == (
        "cancelled", None, utc(T0))
    tq.drain(until=T0 + 7200)
    assert LOG == ["a"]


def test_retry_of_a_cancelled_waiting_job_keeps_its_wake_time(tq, tclock):
    job = T.nap_then.delay("a", 3600)
    tq.drain()
    job.cancel()
    tclock.advance(600)
    assert job.retry() is job
    assert (job.status, job.waiting, job.eta) == (
        "running", "timer", utc(T0 + 3600))
    tq.drain(until=T0 + 3599)
    assert LOG == ["a"]
    tq.drain(until=T0 + 3600)
    assert (job.status, LOG) == ("done", ["a", "a"])


def test_retry_of_a_cancelled_waiting_job_past_its_wake_time_runs_at_once(
        tq, tclock):
    job = T.nap_then.delay("a", 3600)
    tq.drain()
    job.cancel()
    tclock.advance(7200)
    job.retry()
    assert (job.status, job.waiting) == ("running", None)
    assert tq.drain()["done"] == 1
    assert LOG == ["a", "a"]


def test_retry_of_an_expired_job_runs_it_as_its_expiry_is_past(tq, tclock):
    job = T.record.apply_async(("late",), expires=60)
    tclock.advance(60)
    tq.drain()
    assert job.retry().expires is None  # past: it no longer applies
    assert tq.drain()["done"] == 1
    assert (job.result(), LOG) == ("late", ["late"])


def test_retry_of_a_job_failed_at_its_deadline_keeps_its_wake_time(
        tq, tclock):
    job = T.nap_then.apply_async(("a", 3600), deadline=T0 + 600)
    tq.drain(until=T0 + 600)
    assert (job.status, job.eta) == ("failed", utc(T0 + 3600))
    job.retry()
    assert (job.waiting, job.eta) == ("timer", utc(T0 + 3600))
    assert tq.drain()["steps"] == 0


# A waiting job holds nothing -----------------------------------------------


def test_a_one_thread_worker_runs_other_jobs_while_10000_jobs_wait(
        tq, start_worker):
    with tq.batch():
        for i in range(10_000):
            T.record.apply_async((i,), countdown=3600)
    waiting = [T.nap_then.delay(f"w{i}", 3600) for i in range(20)]
    worker = start_worker(tq, threads=1)
    wait_until(lambda: all(job.waiting == "timer" for job in waiting),
               what="the waits to be stored")
    others = [T.add.delay(i, i) for i in range(20)]
    assert [job.result(timeout=DEADLINE) for job in others] == [
        2 * i for i in range(20)]
    assert tq.counts()["pending"] == 10_000
    conn = sqlite3.connect(tq.path)
    try:  # no waiting job is in line or held by a worker
        assert conn.execute(
            "SELECT count(*), count(worker), count(ready) FROM liteq_jobs "
            "WHERE waiting = 'timer'").fetchone() == (10_020, 0, 0)
    finally:
        conn.close()
    assert worker.stop(timeout=DEADLINE) is True
    assert all(job.status == "running" for job in waiting)


WAKE_TASKS = r'''
import json
import os
import time

from liteq import current_job, task

LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "woke.log")


@task
def sleeper(label, seconds):
    # The wake time counts from the commit, after this line.
    return woke(label, time.time() + seconds).after(seconds=seconds)


@task
def woke(label, due):
    line = json.dumps([label, due, time.time(), current_job().id]) + "\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return label
'''


def _wake_worker(tmp_path, db, procs, name):
    err_path = tmp_path / f"{name}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "liteq", "run", "waketasks", "--db",
             str(db)], cwd=tmp_path, env=subprocess_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    proc.stderr_path = err_path
    procs.append(proc)
    return proc


def test_jobs_waiting_in_a_killed_worker_each_run_once_after_their_time(
        tmp_path):
    (tmp_path / "waketasks.py").write_text(WAKE_TASKS)
    db = tmp_path / "wake.db"
    env = subprocess_env()
    env["LITEQ_DB"] = str(db)
    produced = subprocess.run(
        [sys.executable, "-c", "import json, waketasks\nprint(json.dumps(["
         "waketasks.sleeper(f'j{i}', 4 + i / 10).delay().id "
         "for i in range(20)]))"],
        cwd=tmp_path, env=env, capture_output=True, timeout=DEADLINE)
    assert produced.returncode == 0, produced.stderr.decode()
    ids = json.loads(produced.stdout)
    queue = liteq.Queue(db)
    procs = []
    try:
        first = _wake_worker(tmp_path, db, procs, "first")
        jobs = [queue.get(job_id) for job_id in ids]
        wait_until(lambda: all(job.waiting == "timer" or job.status == "done"
                               for job in jobs),
                   what="every job to wait", alive=[first])
        waiting_at_kill = sum(job.waiting == "timer" for job in jobs)
        first.kill()
        first.wait(DEADLINE)
        second = _wake_worker(tmp_path, db, procs, "second")
        wait_until(lambda: queue.counts()["done"] == 20,
                   what="every job to finish", alive=[second])
        second.send_signal(signal.SIGTERM)
        assert second.wait(DEADLINE) == 0
        runs = [json.loads(line) for line in
                (tmp_path / "woke.log").read_text().splitlines()]
        assert sorted(label for label, *_ in runs) == sorted(
            f"j{i}" for i in range(20))  # each once, none lost
        for label, due, ran, job_id in runs:
            assert ran >= due, f"{label} ran {due - ran:.3f} s early"
            assert queue.get(job_id).result() == label
        assert waiting_at_kill > 0  # the kill came while jobs waited
        for proc in procs:
            assert "Traceback" not in proc.stderr_path.read_text()
    finally:
        _chaos_reap(procs)
        queue.close()


# ---------------------------------------------------------------------------
# 11. Testing helpers: clock, drain, eager, enqueued
# ---------------------------------------------------------------------------


@liteq.task
def greet(name):
    """A module-level task on the default queue (see liteq.using)."""
    return f"hi {name}"


# The test clock ------------------------------------------------------------


def test_thirty_days_of_daily_reminders_run_in_one_drain(tq, tclock):
    FLAGS["answers"] = {"ann": T0 + 12.5 * 86400}  # bob never answers
    ann = T.remind.delay("ann", 30)
    bob = T.remind.delay("bob", 30)
    counts = tq.drain(until=tclock.now() + dt.timedelta(days=30))
    assert counts == {"done": 2, "failed": 0, "cancelled": 0,
                      "steps": 14 + 30, "waiting": 0}
    assert (ann.result(), bob.result()) == ("ann answered",
                                            "bob never answered")
    assert [day for user, day in LOG if user == "ann"] == list(range(13))
    assert [day for user, day in LOG if user == "bob"] == list(range(30))
    assert tclock.now() == utc(T0 + 30 * 86400)  # drain moved it there
    assert (ann.finished_at, bob.finished_at) == (
        utc(T0 + 13 * 86400), utc(T0 + 29 * 86400))


def test_retry_backoff_runs_on_the_test_clock(tq, tclock):
    register(tq, flaky_until, retries=3, retry_delay=60)
    job = T.flaky_until.delay(3)
    tq.drain()
    assert (job.waiting, job.eta) == ("retry", utc(T0 + 60))
    assert tq.drain(until=T0 + 3600)["done"] == 1
    assert LOG == [T0, T0 + 60, T0 + 180, T0 + 420]  # 60, 120, 240 s
    assert (job.result(), job.attempts) == ("made it", 4)


def test_a_worker_started_inside_a_test_clock_follows_it(q, start_worker):
    with q.clock(start=T0) as test_clock:
        worker = start_worker(q)
        job = T.record("late").after(hours=1).delay()
        assert T.record.delay("now").result(timeout=DEADLINE) == "now"
        assert (job.status, job.waiting) == ("pending", "timer")
        test_clock.advance(hours=1)
        assert job.result(timeout=DEADLINE) == "late"
        assert job.started_at == utc(T0 + 3600)
        assert worker.stop(timeout=DEADLINE)
    assert LOG == ["now", "late"]


def test_a_long_step_keeps_its_lease_while_the_test_clock_jumps_a_day(
        q, start_worker, caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    with q.clock(start=T0) as test_clock:
        worker = start_worker(q, threads=2)
        job = T.gated.delay("finish")
        GATE.wait_entered()
        test_clock.advance(days=1)
        # The other thread claims and runs a job: the claim's sweeps look
        # at every lease, this step's too.
        assert T.record.delay("meanwhile").result(timeout=DEADLINE) == \
            "meanwhile"
        GATE.go.set()
        assert job.result(timeout=DEADLINE) == "finished anyway"
        assert worker.stop(timeout=DEADLINE)
    assert (job.attempts, job.steps, len(GATE.notes)) == (1, 1, 1)
    assert job.finished_at == utc(T0 + 86400)
    assert "lease" not in caplog.text


def test_the_clock_moves_only_when_told_and_refuses_bad_moves(q):
    with q.clock(start=utc(T0)) as test_clock:
        assert (test_clock.time(), test_clock.now()) == (T0, utc(T0))
        assert T.record.delay("x").created_at == utc(T0)
        assert test_clock.advance(minutes=1, seconds=1) == utc(T0 + 61)
        assert test_clock.set(T0 - 3600) == utc(T0 - 3600)  # back too
        with pytest.raises(ValueError):
            test_clock.advance(-1)
        with pytest.raises(ValueError):
            test_clock.set(dt.datetime(9999, 12, 31, tzinfo=UTC))
        with pytest.raises(RuntimeError):
            with q.clock():
                pass
        assert test_clock.time() == T0 - 3600
    with pytest.raises(RuntimeError):
        test_clock.advance(1)  # its block has ended
    assert abs(T.record.delay("y").created_at.timestamp() - time.time()) \
        < 3600  # the real clock again


def test_a_closed_queue_has_no_clock(q):
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        with q.clock():
            pass


# drain() -------------------------------------------------------------------


def test_drain_runs_every_ready_job_and_counts_what_it_did(tq, tclock):
    register(tq, fail, retries=0)
    register(tq, meanwhile)
    FLAGS["meanwhile"] = lambda: tclock.advance(30)
    done = [T.wait.delay(2), T.record.delay("x"), T.meanwhile.delay("m")]
    expired = T.record.apply_async(("never",), expires=20)  # behind "m"
    failed = T.fail.delay("boom")
    waiting = T.nap_then.delay("w", 60)
    assert tq.drain() == {"done": 3, "failed": 1, "cancelled": 1,
                          "steps": 3 + 1 + 1 + 1 + 1, "waiting": 1}
    assert [job.status for job in done] == ["done"] * 3
    assert (failed.status, expired.status, waiting.waiting) == (
        "failed", "cancelled", "timer")
    assert tq.drain() == {"done": 0, "failed": 0, "cancelled": 0,
                          "steps": 0, "waiting": 1}
    assert tq.drain(until=T0 + 90) == {
        "done": 1, "failed": 0, "cancelled": 0, "steps": 1, "waiting": 0}
    assert LOG == ["x", "m", "w", "w"]


def test_drain_with_raise_errors_reraises_the_tasks_own_exception(q):
    register(q, fail, retries=0)
    job = T.fail.delay("boom")
    after = T.record.delay("after")
    with pytest.raises(RuntimeError) as info:
        q.drain(raise_errors=True)
    assert info.value is SEEN[0]  # unchanged: the very object raised
    assert (job.status, job.error.splitlines()[-1]) == (
        "failed", "RuntimeError: boom")  # its outcome was written first
    assert after.status == "pending"
    assert q.drain()["done"] == 1


def test_drain_raises_when_a_job_never_ends(q):
    job = T.wait.delay(50)
    with pytest.raises(RuntimeError, match="drain\\(\\) ran 10 steps"):
        q.drain(max_steps=10)
    assert (job.status, job.steps) == ("running", 10)


def test_drain_past_max_steps_leaves_the_job_for_the_next_drain(q):
    job = T.wait.delay(50)
    with pytest.raises(RuntimeError):
        q.drain(max_steps=10)
    assert job.worker is None  # no step of it executes
    assert q.drain()["steps"] == 41
    assert (job.status, job.steps) == ("done", 51)


def test_drain_runs_only_the_queue_names_given(q):
    alpha = T.record.apply_async(("a",), queue="alpha")
    beta = T.record.apply_async(("b",), queue="beta")
    default = T.record.delay("d")
    assert q.drain(["alpha"])["done"] == 1
    assert q.drain("beta")["done"] == 1
    assert (alpha.status, beta.status, default.status) == (
        "done", "done", "pending")
    assert LOG == ["a", "b"]
    assert q.drain()["done"] == 1


def test_drain_until_runs_what_comes_due_in_time_order(tq, tclock):
    T.every.delay("x", 3, 2)  # at 0, 2 and 4 h
    T.every("y", 3, 2).after(hours=1).delay()  # at 1, 3 and 5 h
    T.every("z", 1, 0).at(T0 + 4.5 * 3600).delay()
    tq.drain(until=T0 + 10 * 3600)
    assert LOG == [(T0 + h * 3600, label) for h, label in [
        (0, "x"), (1, "y"), (2, "x"), (3, "y"), (4, "x"), (4.5, "z"),
        (5, "y")]]
    assert tclock.time() == T0 + 10 * 3600


def test_drain_until_needs_a_clock_and_a_time_ahead(tq):
    with pytest.raises(RuntimeError, match="clock"):
        tq.drain(until=time.time() + 60)
    with tq.clock(start=T0):
        with pytest.raises(ValueError):
            tq.drain(until=T0 - 1)
        with pytest.raises(TypeError):
            tq.drain(until="tomorrow")
    assert sum(tq.counts().values()) == 0


# eager() -------------------------------------------------------------------


def test_delay_inside_eager_runs_the_job_to_its_end_before_returning(q):
    register(q, fail, retries=0)
    with q.eager():
        job = T.tick.delay("t", 3)
        assert LOG == ["t"] * 3
        failed = T.fail.delay("boom")
    assert (job.status, job.steps, job.result()) == ("done", 3, "t")
    assert failed.status == "failed"
    with pytest.raises(liteq.TaskFailed, match="boom"):
        failed.result()
    later = T.record.delay("later")  # outside the block: stored only
    assert later.status == "pending"


def test_eager_stops_at_a_wait(tq, tclock):
    with tq.eager():
        job = T.nap_then.delay("a", 60)
    assert (job.status, job.waiting, LOG) == ("running", "timer", ["a"])
    tq.drain(until=T0 + 60)
    assert job.result() == "a"


def test_keys_behave_under_eager_as_without_it(tq, tclock):
    with tq.eager():
        first = T.nap_then.apply_async(("k", 60), key="k")
        again = T.nap_then.apply_async(("k", 60), key="k")
        assert again == first  # the unfinished job holds the key
        quick = T.record.apply_async(("q",), key="q")
        fresh = T.record.apply_async(("q",), key="q")
    assert quick.status == "done" and fresh != quick  # key freed
    assert LOG == ["k", "q", "q"]


def test_jobs_delayed_in_a_batch_inside_eager_run_at_batch_exit(q):
    with q.eager():
        with q.batch():
            jobs = [T.record.delay(i) for i in range(3)]
            assert LOG == []
        assert LOG == [0, 1, 2]
    assert [job.status for job in jobs] == ["done"] * 3


def test_eager_applies_only_to_its_own_thread(q):
    with q.eager():
        other = Background(T.record.delay, "other").join()
        own = T.record.delay("own")
    assert (other.status, own.status, LOG) == ("pending", "done", ["own"])


# enqueued() ----------------------------------------------------------------


def test_enqueued_finds_unfinished_jobs_by_task_and_argument(q):
    one = T.add.delay(1, 2)
    two = T.add.apply_async((1,), {"b": 5})
    three = T.add.delay(2, 5)
    other = T.record.delay(1)
    assert q.enqueued(T.add) == [one, two, three]  # oldest first
    assert q.enqueued(T.add, a=1) == [one, two]
    assert q.enqueued(T.add, b=5) == [two, three]  # by keyword or not
    assert q.enqueued(stored(add), a=1, b=5) == [two]
    assert q.enqueued(T.add, a=7) == []
    assert q.enqueued() == [one, two, three, other]
    assert q.enqueued(label=1) == [other]
    one.cancel()
    assert q.enqueued(T.add, a=1) == [two]


def test_enqueued_leaves_out_finished_jobs(q):
    jobs = [T.add.delay(1, i) for i in range(3)]
    q.drain()
    later = T.add.delay(1, 9)
    assert [job.status for job in jobs] == ["done"] * 3
    assert q.enqueued(T.add, a=1) == [later]


def test_enqueued_matches_the_first_call_after_the_job_continued(
        tq, tclock):
    job = T.nap_then.delay("x", 60)
    tq.drain()
    assert job.current == stored(record)  # it continued
    assert tq.enqueued(T.nap_then, label="x", seconds=60) == [job]
    assert tq.enqueued(T.record) == []  # the first call's task
    assert tq.enqueued(T.nap_then, label="y") == []


def test_enqueued_with_an_unknown_parameter_is_a_type_error(q):
    T.add.delay(1, 2)
    with pytest.raises(TypeError, match="no parameter 'c'"):
        q.enqueued(T.add, c=1)
    with pytest.raises(TypeError):
        q.enqueued(42)


# Queue.temporary() and liteq.using() ---------------------------------------


def test_a_temporary_queue_deletes_its_folder_at_close():
    queue = liteq.Queue.temporary()
    try:
        register(queue, add)
        assert T.add.delay(1, 2).status == "pending"
        folder = os.path.dirname(queue.path)
        assert os.path.isfile(queue.path)
    finally:
        queue.close()
    assert not os.path.exists(folder)
    other = liteq.Queue.temporary()
    other.close()
    assert os.path.dirname(other.path) != folder  # a new folder each


def test_using_makes_a_queue_the_default_for_module_level_tasks(tmp_path):
    queue = liteq.Queue.temporary()
    try:
        with liteq.using(queue) as used:
            assert used is queue and liteq.default_queue() is queue
            job = greet.delay("ann")
            assert queue.get(job.id) == job
            with queue.eager():
                assert greet.delay("bob").result() == "hi bob"
        assert liteq.default_queue().path == str(tmp_path / "default.db")
        assert queue.drain()["done"] == 1
        assert job.result() == "hi ann"
    finally:
        queue.close()
    with pytest.raises(TypeError):
        with liteq.using(str(tmp_path / "x.db")):
            pass


# ---------------------------------------------------------------------------
# Schedules: slots, catch-up, overlap, who fires
# ---------------------------------------------------------------------------
# SPEC section 12.  Most tests run on the test clock from just after D0, a
# UTC midnight, so every ``every=`` slot of a divisor of a day falls on a
# round offset from it; ``fired(q)`` gives the offsets of the slots fired.
# Declarations made with liteq.periodic live in ``_PROCESS.schedules``:
# the ``declared`` fixture gives each test an empty one, so none leaks into
# another test's drain.  Tests of cron slots use only simple expressions
# and depend on the full parser (see CRON_PARSED): they run once it lands.

D0 = 1_699_920_000.0  # 2023-11-14T00:00:00Z: a slot of every day divisor


def slot_noted(label):
    """Note (label, the job's slot as an offset from D0)."""
    slot = liteq.current_job().scheduled_for
    LOG.append((label, None if slot is None else slot.timestamp() - D0))
    return label


SCHEDULE_FUNCTIONS = [slot_noted, nap_then]


@pytest.fixture
def declared(monkeypatch):
    """An empty registry of code declarations for this test."""
    monkeypatch.setattr(liteq._PROCESS, "schedules", {})
    return liteq._PROCESS.schedules


@pytest.fixture
def sq(q, declared):
    """``q`` with this section's task functions, and no declarations."""
    for fn in SCHEDULE_FUNCTIONS:
        register(q, fn)
    return q


@pytest.fixture
def sclock(sq):
    """The test clock of ``sq``, from one second after D0."""
    with sq.clock(start=D0 + 1) as test_clock:
        FLAGS["clock"] = test_clock
        yield test_clock


def fired(queue, label=None):
    """Slots (offsets from D0) of the jobs schedules fired, by job id; only
    those whose first argument is ``label`` if given."""
    jobs = sorted(queue.jobs(limit=10**6), key=lambda job: job.id)
    return [job.scheduled_for.timestamp() - D0 for job in jobs
            if job.scheduled_for is not None
            and (label is None or job.args[:1] == [label])]


def from_iso(text):
    """A schedules() time (ISO, UTC) as a unix time."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def schedule_of(queue, name):
    (found,) = [s for s in queue.schedules() if s["name"] == name]
    return found


# Declaring ---------------------------------------------------------------

PERIODIC_MODULE = '''
import liteq


@liteq.periodic(every=3600, name="{prefix}-hourly")
@liteq.periodic("0 3 * * *", name="{prefix}-nightly", kwargs={{"label": "n"}},
                tz="Europe/Paris")
@liteq.task
def report(label="h"):
    return label


@liteq.periodic(every=600)
@liteq.task
def sweep():
    return "swept"
'''


def test_periodic_above_task_declares_schedules_stored_at_drain(
        sq, declared, tmp_path, monkeypatch):
    (tmp_path / "periodic_mod.py").write_text(
        PERIODIC_MODULE.format(prefix="rep"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "periodic_mod", raising=False)
    module = importlib.import_module("periodic_mod")
    try:
        assert sorted(declared) == ["periodic_mod:sweep", "rep-hourly",
                                    "rep-nightly"]
        assert module.report("x").run() == "x"  # still the task
        assert sq.schedules() == []  # stored when a worker or drain starts
        with liteq.using(sq):
            sq.drain()
        found = {s["name"]: s for s in sq.schedules()}
        assert sorted(found) == sorted(declared)
        assert {name: (s["task"], s["origin"], s["every"], s["cron"],
                       s["tz"]) for name, s in found.items()} == {
            "periodic_mod:sweep": ("periodic_mod:sweep", "code", 600, None,
                                   "UTC"),
            "rep-hourly": ("periodic_mod:report", "code", 3600, None, "UTC"),
            "rep-nightly": ("periodic_mod:report", "code", None, "0 3 * * *",
                            "Europe/Paris")}
    finally:
        sys.modules.pop("periodic_mod", None)


def test_periodic_called_on_a_task_function_binds_args_and_kwargs(
        sq, sclock, declared):
    liteq.periodic(every=60, name="a", args=("first",))(T.slot_noted)
    liteq.periodic(every=120, name="b", kwargs={"label": "second"})(
        T.slot_noted)
    assert sorted(declared) == ["a", "b"]
    sq.drain(until=D0 + 121)
    assert sorted(LOG, key=lambda e: (e[1], e[0])) == [
        ("first", 60), ("first", 120), ("second", 120)]
    assert {s["name"]: s["task"] for s in sq.schedules()} == {
        "a": stored(slot_noted), "b": stored(slot_noted)}


def test_periodic_name_defaults_to_the_tasks_stored_name(sq, declared):
    assert liteq.periodic(every=60, args=("x",))(T.record) is T.record
    assert list(declared) == [stored(record)]
    sq.drain()
    assert [s["name"] for s in sq.schedules()] == [stored(record)]


@pytest.mark.parametrize("args, kwargs", [
    ((), None), (("a", "b"), None), ((), {"nope": 1}),
    (("a",), {"label": "b"})])
def test_periodic_args_that_do_not_fit_the_task_raise_type_error(
        sq, declared, args, kwargs):
    with pytest.raises(TypeError):
        liteq.periodic(every=60, name="x", args=args, kwargs=kwargs)(
            T.record)
    assert declared == {}


def test_periodic_below_task_raises_type_error(sq, declared):
    with pytest.raises(TypeError, match="above @task"):
        liteq.periodic(every=60)(record)  # a plain function
    with pytest.raises(TypeError):
        @liteq.task
        @liteq.periodic(every=60)
        def plain():  # pragma: no cover - never defined
            pass
    assert declared == {}


@pytest.mark.parametrize("options, error, named", [
    ({"every": 0}, ValueError, "every"),
    ({"every": -60}, ValueError, "every"),
    ({"every": 60, "grace": -1}, ValueError, "grace"),
    ({"every": 60, "window": -1}, ValueError, "window"),
    ({"every": 60, "max_catchup": -1}, ValueError, "max_catchup"),
    ({"every": 60, "expires": -1}, ValueError, "expires"),
    ({"every": 60, "catchup": "never"}, ValueError, "catchup"),
    ({"every": 60, "overlap": "queue"}, ValueError, "overlap"),
    ({"every": 60, "tz": "Mars/Olympus"}, ValueError, "Mars/Olympus"),
    ({"cron": "0 3 * * *", "tz": "Nowhere/City"}, ValueError, "Nowhere/City"),
    ({"every": 60, "catch_up": "all"}, TypeError, "catch_up"),
    ({"every": 60, "tz": "UTC", "retries": 3}, TypeError, "retries"),
])
def test_bad_schedule_options_are_refused_naming_what_is_wrong(
        sq, declared, options, error, named):
    with pytest.raises(error, match=re.escape(named)):
        liteq.periodic(**options)
    with pytest.raises(error, match=re.escape(named)):
        sq.schedule("s", T.record("x"), **options)
    assert declared == {} and sq.schedules() == []


@pytest.mark.parametrize("options", [
    {}, {"cron": "0 3 * * *", "every": 60}, {"cron": None, "every": None}])
def test_a_schedule_needs_exactly_one_of_cron_and_every(sq, options):
    # SPEC 12 says "exactly one"; it names no exception type.  liteq raises
    # TypeError, as for countdown= with eta= (SPEC 1).
    with pytest.raises((TypeError, ValueError), match="cron.*every"):
        liteq.periodic(**options)
    with pytest.raises((TypeError, ValueError), match="cron.*every"):
        sq.schedule("s", T.record("x"), **options)
    assert sq.schedules() == []


def test_schedule_with_a_name_declared_in_code_raises_value_error(
        sq, declared):
    liteq.periodic(every=60, name="nightly", args=("x",))(T.record)
    with pytest.raises(ValueError, match="nightly"):
        sq.schedule("nightly", T.record("x"), every=60)
    sq.drain()  # stored as code; now forgotten by this process
    declared.clear()
    with pytest.raises(ValueError, match="nightly"):
        sq.schedule("nightly", T.record("x"), every=60)
    assert [(s["name"], s["origin"], s["every"]) for s in sq.schedules()] \
        == [("nightly", "code", 60)]


def test_schedule_again_with_the_same_name_updates_it(sq, sclock):
    sq.schedule("sync", T.slot_noted("old"), every=60)
    sq.schedule("sync", T.slot_noted("new"), every=120, priority=3)
    (found,) = sq.schedules()
    assert (found["name"], found["origin"], found["every"],
            found["priority"]) == ("sync", "api", 120, 3)
    sq.drain(until=D0 + 241)
    assert LOG == [("new", 120), ("new", 240)]
    assert {job.priority for job in sq.jobs()} == {3}
    assert sq.unschedule("sync") is True
    assert sq.unschedule("sync") is False
    sq.drain(until=D0 + 1000)
    assert fired(sq) == [120, 240] and sq.schedules() == []


def test_schedule_takes_a_task_call(sq):
    with pytest.raises(TypeError):
        sq.schedule("s", T.record, every=60)  # the function, not a call
    with pytest.raises(ValueError):
        sq.schedule("", T.record("x"), every=60)
    assert sq.schedules() == []


# Firing on the test clock --------------------------------------------------


def test_a_month_of_daily_slots_fires_once_each_at_the_slot(sq, declared):
    with sq.clock(start=D0 + 5.5 * 3600):  # not on a slot
        liteq.periodic(every=86400, name="daily", args=("d",))(T.slot_noted)
        counts = sq.drain(until=D0 + 30 * 86400 + 5.5 * 3600)
    assert counts["done"] == 30
    days = [86400 * k for k in range(1, 31)]
    assert LOG == [("d", day) for day in days]
    assert fired(sq) == days  # aligned to the epoch, oldest first
    jobs = sorted(sq.jobs(limit=100), key=lambda job: job.id)
    assert [job.created_at for job in jobs] == [utc(D0 + d) for d in days]
    assert all(job.scheduled_for.tzinfo == UTC for job in jobs)
    found = schedule_of(sq, "daily")
    assert (from_iso(found["last"]), from_iso(found["next"]),
            found["skipped"]) == (D0 + 30 * 86400, D0 + 31 * 86400, 0)


def test_every_slots_are_aligned_to_the_epoch_whenever_stored(sq):
    for start in (D0 + 7, D0 + 1234.5):
        with sq.clock(start=start):
            sq.schedule("s", T.slot_noted("e"), every=900)
            sq.drain(until=start + 1800)
        sq.unschedule("s")
    assert fired(sq) == [900, 1800, 1800, 2700]


def test_a_job_not_fired_by_a_schedule_has_no_slot(sq, sclock):
    job = T.slot_noted.delay("plain")
    sq.drain()
    assert job.scheduled_for is None and LOG == [("plain", None)]
    assert job.to_dict()["scheduled_for"] is None


def test_current_job_knows_its_slot(sq, sclock):
    sq.schedule("s", T.slot_noted("x"), every=300)
    sq.drain(until=D0 + 301)  # fires at 300, runs at once
    sclock.advance(1000)  # 600, 900, 1200 late: latest fires 1200, late
    sq.drain()
    assert LOG == [("x", 300), ("x", 1200)]
    (late,) = [job for job in sq.jobs() if job.scheduled_for == utc(
        D0 + 1200)]
    assert late.created_at == utc(D0 + 1301)


def test_schedule_expires_cancels_a_fired_job_not_started_in_time(
        sq, sclock):
    sq.schedule("e", T.slot_noted("e"), every=60, expires=30,
                queue="nightly")
    sq.drain(["default"], until=D0 + 61)  # fires, runs nothing
    (job,) = sq.jobs()
    assert (job.status, job.scheduled_for, job.expires, job.queue) == (
        "pending", utc(D0 + 60), utc(D0 + 90), "nightly")
    sclock.advance(31)
    assert sq.drain("nightly")["cancelled"] == 1
    assert job.status == "cancelled" and "expired at" in job.error
    sq.drain("nightly", until=D0 + 121)  # started in time: runs
    assert LOG == [("e", 120)]


# Catch-up after downtime ---------------------------------------------------
# Nothing runs from D0 + 1 until the clock has moved past the slots; then
# one drain.  Slots of every=60: 60, 120, ... 600 all missed by D0 + 630.


def _after_downtime(queue, test_clock, until, **options):
    """Store schedule "c" (every 60 s unless told), let time pass to
    ``until`` with nothing running, drain once: the slots fired, and the
    schedule's skipped count."""
    options.setdefault("every", 60)
    queue.schedule("c", T.slot_noted("c"), **options)
    queue.drain()
    test_clock.set(D0 + until)
    queue.drain()
    return fired(queue), schedule_of(queue, "c")["skipped"]


def test_catchup_latest_fires_the_most_recent_missed_slot_once(sq, sclock):
    assert _after_downtime(sq, sclock, 630, catchup="latest", grace=10,
                           overlap="allow") == ([600], 9)
    assert from_iso(schedule_of(sq, "c")["next"]) == D0 + 660
    assert sq.drain(until=D0 + 661)["done"] == 1
    assert fired(sq) == [600, 660]  # back on its slots


def test_catchup_latest_is_the_default(sq, sclock):
    assert _after_downtime(sq, sclock, 630) == ([600], 9)


def test_catchup_skip_fires_no_late_slot(sq, sclock):
    assert _after_downtime(sq, sclock, 630, catchup="skip", grace=10,
                           overlap="allow") == ([], 10)
    sq.drain(until=D0 + 661)
    assert fired(sq) == [660]


def test_catchup_all_fires_every_missed_slot_oldest_first(sq, sclock):
    assert _after_downtime(sq, sclock, 630, catchup="all", grace=10,
                           overlap="allow") == (
        [60 * k for k in range(1, 11)], 0)
    assert [label for label, _ in LOG] == ["c"] * 10


def test_catchup_all_keeps_the_most_recent_max_catchup(sq, sclock):
    assert _after_downtime(sq, sclock, 630, catchup="all", max_catchup=3,
                           grace=10, overlap="allow") == ([480, 540, 600], 7)


@pytest.mark.parametrize("catchup, expected", [
    ("all", ([480, 540, 600], 7)),
    ("latest", ([600], 9)),
    ("skip", ([], 10))])
def test_window_drops_missed_slots_older_than_it(sq, sclock, catchup,
                                                 expected):
    assert _after_downtime(sq, sclock, 630, catchup=catchup, window=200,
                           grace=10, overlap="allow") == expected


@pytest.mark.parametrize("catchup", ["latest", "all", "skip"])
def test_window_shorter_than_the_newest_miss_fires_nothing_late(
        sq, sclock, catchup):
    assert _after_downtime(sq, sclock, 630, catchup=catchup, window=20,
                           grace=10, overlap="allow") == ([], 10)


@pytest.mark.parametrize("catchup", ["latest", "all", "skip"])
def test_a_slot_within_grace_fires_under_any_catchup(sq, sclock, catchup):
    slots, skipped = _after_downtime(sq, sclock, 605, catchup=catchup,
                                     grace=10, overlap="allow")
    assert slots[-1:] == [600]  # 5 s past: on time
    assert len(slots) + skipped == 10
    assert slots == {"latest": [600], "skip": [600],
                     "all": [60 * k for k in range(1, 11)]}[catchup]


def test_grace_decides_what_is_late(sq, sclock):
    # every 10 s, 300 s down: grace 0 makes all but the slot at "now"
    # late; latest then fires just that one.
    slots, skipped = _after_downtime(sq, sclock, 300, every=10, grace=0,
                                     overlap="allow")
    assert (slots, skipped) == ([300], 29)


@pytest.mark.parametrize("catchup", ["latest", "all", "skip"])
def test_a_day_down_is_never_a_flood(sq, sclock, catchup):
    slots, skipped = _after_downtime(
        sq, sclock, 86400.5, every=1, catchup=catchup, max_catchup=5,
        grace=0, overlap="allow")
    assert slots == {"latest": [86400], "skip": [],
                     "all": [86396, 86397, 86398, 86399, 86400]}[catchup]
    assert len(slots) + skipped == 86399  # 2 .. 86400


def test_catchup_all_fires_only_the_most_recent_slots(sq, sclock):
    # every 10 s, down from D0 + 1 to D0 + 305: slots 10 .. 300 missed,
    # 250 .. 300 within grace.  "all" fires the most recent max_catchup,
    # oldest first, and skips the older ones: never an older slot fired
    # while a newer one is skipped, never more than max_catchup.
    slots, skipped = _after_downtime(sq, sclock, 305, every=10,
                                     catchup="all", max_catchup=3,
                                     grace=60, overlap="allow")
    assert len(slots) + skipped == 30
    assert slots == [10 * k for k in range(31 - len(slots), 31)]
    assert len(slots) <= 3


# Overlap -------------------------------------------------------------------
# nap_then(label, 150) leaves its job unfinished for 150 s after its first
# step.  Schedules put their jobs in the queue "sched": a drain of
# "default" fires slots but starts no job of theirs.


def _overlapping(queue, overlap):
    queue.schedule("o", T.nap_then("o", 150), every=60, overlap=overlap,
                   queue="sched")
    queue.drain(until=D0 + 61)  # 60 fires and runs: unfinished until 210
    (first,) = queue.jobs()
    assert (first.status, first.waiting) == ("running", "timer")
    queue.drain(["default"], until=D0 + 301)  # 120 .. 300 fire, none runs
    return fired(queue), schedule_of(queue, "o")["skipped"]


def test_overlap_skip_skips_slots_while_the_last_run_is_unfinished(
        sq, sclock):
    assert _overlapping(sq, "skip") == ([60], 4)
    sq.drain(until=D0 + 421)  # 60 ends at 210; 360 fires, 420 skipped
    assert fired(sq) == [60, 360]
    assert schedule_of(sq, "o")["skipped"] == 5


def test_overlap_skip_with_every_run_drained(sq, sclock):
    sq.schedule("o", T.nap_then("o", 150), every=60)
    sq.drain(until=D0 + 301)
    # 60 runs until 210: 120, 180 skipped; 240 runs until 390: 300 too.
    assert fired(sq) == [60, 240]
    assert schedule_of(sq, "o")["skipped"] == 3


def test_overlap_queue_one_lets_one_run_wait_while_one_runs(sq, sclock):
    assert _overlapping(sq, "queue_one") == ([60, 120], 3)
    waiting = [job for job in sq.jobs() if job.status == "pending"]
    assert [job.scheduled_for for job in waiting] == [utc(D0 + 120)]
    sq.drain(until=D0 + 301)  # the waiting run starts: another may wait
    assert fired(sq) == [60, 120]
    sq.drain(["default"], until=D0 + 361)
    assert fired(sq) == [60, 120, 360]


def test_overlap_allow_always_fires(sq, sclock):
    assert _overlapping(sq, "allow") == ([60, 120, 180, 240, 300], 0)


# pause, resume, trigger, unschedule ----------------------------------------


@pytest.mark.parametrize("catchup, expected", [
    ("latest", ([60, 120, 600], 7)),
    ("skip", ([60, 120], 8)),
    ("all", ([60, 120] + [60 * k for k in range(3, 11)], 0))])
def test_slots_missed_while_paused_follow_catchup(sq, sclock, catchup,
                                                  expected):
    sq.schedule("p", T.slot_noted("p"), every=60, catchup=catchup,
                grace=10, overlap="allow")
    sq.drain(until=D0 + 121)
    sq.pause_schedule("p")
    assert schedule_of(sq, "p")["paused"] is True
    sq.drain(until=D0 + 630)  # paused: 180 .. 600 fire nothing
    assert fired(sq) == [60, 120]
    sq.resume_schedule("p")
    assert schedule_of(sq, "p")["paused"] is False
    sq.drain()
    assert (fired(sq), schedule_of(sq, "p")["skipped"]) == expected
    sq.drain(until=D0 + 661)
    assert fired(sq)[-1] == 660


def test_pause_resume_and_trigger_of_an_unknown_name_raise_lookup_error(
        sq):
    for act in (sq.pause_schedule, sq.resume_schedule, sq.trigger):
        with pytest.raises(LookupError, match="nope"):
            act("nope")
    assert sq.jobs() == []


def test_trigger_fires_one_extra_run_now_outside_the_slots(sq, sclock):
    sq.schedule("t", T.slot_noted("t"), every=3600, queue="sched")
    sclock.advance(100)
    job = sq.trigger("t")
    assert (job.scheduled_for, job.created_at, job.queue) == (
        utc(D0 + 101), utc(D0 + 101), "sched")
    assert from_iso(schedule_of(sq, "t")["next"]) == D0 + 3600  # unchanged
    assert schedule_of(sq, "t")["last_job"] == job.id
    sq.drain()
    assert LOG == [("t", 101)] and job.status == "done"
    sq.drain(until=D0 + 3601)
    assert fired(sq) == [101, 3600]


def test_trigger_obeys_overlap_and_returns_none_when_refused(sq, sclock):
    sq.schedule("t", T.slot_noted("t"), every=3600, queue="sched")
    first = sq.trigger("t")
    assert sq.trigger("t") is None  # "skip": the first is unfinished
    sq.schedule("t", T.slot_noted("t"), every=3600, queue="sched",
                overlap="queue_one")
    assert sq.trigger("t") is None  # the first has not started
    sq.schedule("t", T.slot_noted("t"), every=3600, queue="sched",
                overlap="allow")
    second = sq.trigger("t")
    assert second is not None and second.id != first.id
    assert sq.drain()["done"] == 2
    sq.schedule("t", T.slot_noted("t"), every=3600, queue="sched")
    assert sq.trigger("t") is not None  # the last run has finished


def test_a_slot_after_a_triggered_run_obeys_overlap(sq, sclock):
    sq.schedule("t", T.slot_noted("t"), every=60, queue="sched")
    sq.trigger("t")
    sq.drain(["default"], until=D0 + 61)
    assert fired(sq) == [1] and schedule_of(sq, "t")["skipped"] == 1


def test_unschedule_stops_firing(sq, sclock):
    sq.schedule("u", T.slot_noted("u"), every=60)
    sq.drain(until=D0 + 121)
    assert sq.unschedule("u") is True
    sq.drain(until=D0 + 600)
    assert fired(sq) == [60, 120] and sq.schedules() == []
    with pytest.raises(LookupError):
        sq.trigger("u")


# Who fires -----------------------------------------------------------------


def test_a_worker_fires_stored_schedules_following_the_test_clock(
        sq, start_worker):
    with sq.clock(start=D0 + 1) as test_clock:
        sq.schedule("w", T.slot_noted("w"), every=60)
        start_worker(sq)
        test_clock.set(D0 + 61)
        # Firing is part of a claim's transaction: the claim of this job,
        # after the slot came due, fired it if nothing had before.
        assert T.echo.delay("after").result(timeout=DEADLINE) == "after"
        assert fired(sq) == [60]
        test_clock.set(D0 + 121)
        wait_until(lambda: fired(sq) == [60, 120], what="slot 120 to fire")
        wait_until(lambda: len(LOG) == 2, what="both runs")
    assert LOG == [("w", 60), ("w", 120)]


def test_a_worker_without_schedules_fires_nothing(sq, start_worker,
                                                  declared):
    liteq.periodic(every=60, name="code", args=("code",))(T.slot_noted)
    with sq.clock(start=D0 + 1) as test_clock:
        sq.schedule("api", T.slot_noted("api"), every=60)
        start_worker(sq, schedules=False)
        test_clock.set(D0 + 61)
        # Its claim of this job is a transaction after the slot came due.
        assert T.echo.delay("after").result(timeout=DEADLINE) == "after"
        assert fired(sq) == []
        assert [s["name"] for s in sq.schedules()] == ["api"]  # no upsert
        sq.drain()  # a drain fires what is due (and stores "code")
        wait_until(lambda: LOG == [("api", 60)], what="slot 60 to run")
        assert fired(sq) == [60]


def test_a_worker_fires_the_code_declarations_of_its_process(
        sq, start_worker, declared):
    liteq.periodic(every=60, name="code", args=("code",))(T.slot_noted)
    with sq.clock(start=D0 + 1) as test_clock:
        start_worker(sq)
        assert [s["origin"] for s in sq.schedules()] == ["code"]
        test_clock.set(D0 + 61)
        wait_until(lambda: LOG == [("code", 60)], what="slot 60 to run")


SCHEDULE_PLAIN_MODULE = '''
import liteq


@liteq.task
def plain(label):
    return label
'''


def test_a_worker_process_fires_api_schedules_but_not_code_ones_it_lacks(
        tmp_path, q, declared):
    (tmp_path / "plainmod.py").write_text(SCHEDULE_PLAIN_MODULE)
    # Stored 10 s in the past: both schedules are due (within grace) the
    # moment the worker process starts.
    with q.clock(start=round(time.time()) - 10):
        # A task of plainmod, which this process does not import.
        q.schedule("api", liteq.deserialize_task(
            {"__task__": "plainmod:plain", "args": ["api"], "kwargs": {}}),
            every=1)
        liteq.periodic(every=1, name="code", args=("code",))(T.record)
        q.drain()  # stores "code"; the clock stands still: nothing fires
    assert sorted((s["name"], s["origin"]) for s in q.schedules()) == [
        ("api", "api"), ("code", "code")]
    declared.clear()  # this process fires nothing from here on
    procs = []
    try:
        err_path = tmp_path / "plain.err"
        with open(err_path, "wb") as err:
            worker = subprocess.Popen(
                [sys.executable, "-m", "liteq", "run", "plainmod", "--db",
                 q.path], cwd=tmp_path, env=subprocess_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
        worker.stderr_path = err_path
        procs.append(worker)
        # Each firing of "api" is a claim transaction in which "code", as
        # due as "api", would have fired too if the worker fired it.
        wait_until(lambda: q.counts()["done"] >= 3, alive=procs,
                   what="three runs of the api schedule")
    finally:
        _chaos_reap(procs)
    jobs = q.jobs(limit=1000)
    assert {job.name for job in jobs} == {"plainmod:plain"}
    assert all(job.scheduled_for is not None for job in jobs)
    code = schedule_of(q, "code")
    assert (code["last"], code["last_job"], code["skipped"]) == (None, None,
                                                                 0)


def test_run_with_no_schedules_fires_nothing(tmp_path, q):
    (tmp_path / "plainmod.py").write_text(SCHEDULE_PLAIN_MODULE)
    with q.clock(start=round(time.time()) - 10):  # due at once
        q.schedule("api", liteq.deserialize_task(
            {"__task__": "plainmod:plain", "args": ["api"], "kwargs": {}}),
            every=1, overlap="allow")
    procs = []
    try:
        err_path = tmp_path / "plain.err"
        with open(err_path, "wb") as err:
            worker = subprocess.Popen(
                [sys.executable, "-m", "liteq", "run", "plainmod", "--db",
                 q.path, "--no-schedules"], cwd=tmp_path,
                env=subprocess_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)
        worker.stderr_path = err_path
        procs.append(worker)
        # An extra run, stored here: the worker's claim of it is a
        # transaction after the slots came due.
        job = q.trigger("api")
        wait_until(lambda: job.status == "done", alive=procs,
                   what="the triggered run")
    finally:
        _chaos_reap(procs)
    assert [j.id for j in q.jobs()] == [job.id]


# A changed spec ------------------------------------------------------------


def test_a_changed_every_never_fires_a_slot_twice_nor_replays_history(
        sq, sclock):
    sq.schedule("c", T.slot_noted("c"), every=60)
    sq.drain(until=D0 + 601)
    assert fired(sq) == [60 * k for k in range(1, 11)]
    sq.schedule("c", T.slot_noted("c"), every=200)  # 600 is one of its own
    sq.drain(until=D0 + 1001)
    assert fired(sq)[10:] == [800, 1000]
    sq.schedule("c", T.slot_noted("c"), every=50)  # 1000 is one too
    sclock.set(D0 + 1301)  # down for a while: 1050 .. 1300 missed
    sq.schedule("c", T.slot_noted("c"), every=25)
    sq.drain(until=D0 + 1401)
    # The change at 1301 starts after it: nothing missed is replayed.
    assert fired(sq)[12:] == [1000 + 25 * k for k in range(13, 17)]
    assert len(set(fired(sq))) == len(fired(sq))


def test_a_changed_spec_after_the_clock_went_back_fires_no_slot_again(
        sq, sclock):
    sq.schedule("c", T.slot_noted("c"), every=60)
    sq.drain(until=D0 + 601)
    sclock.set(D0 + 100)  # a clock jump back
    sq.schedule("c", T.slot_noted("c"), every=30)
    sq.drain(until=D0 + 701)
    slots = fired(sq)
    assert slots == [60 * k for k in range(1, 11)] + [630, 660, 690]


def test_a_redeclared_code_schedule_changes_without_firing_twice(
        sq, sclock, declared, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    liteq.periodic(every=60, name="d", args=("d",))(T.slot_noted)
    sq.drain(until=D0 + 301)
    liteq.periodic(every=100, name="d", args=("d",))(T.slot_noted)
    sq.drain(until=D0 + 601)
    assert fired(sq) == [60, 120, 180, 240, 300, 400, 500, 600]
    assert schedule_of(sq, "d")["every"] == 100
    warned = [r for r in caplog.records if r.levelno == logging.WARNING
              and "'d'" in r.getMessage()]
    assert len(warned) == 1  # the last start wins, logged once
    sq.drain(until=D0 + 701)
    assert len([r for r in caplog.records if "'d'" in r.getMessage()]) == 1


# Cron slots (need the full cron parser) -------------------------------------


def test_cron_daily_at_three_fires_once_a_day_at_three(sq, sclock):
    # Depends on full cron semantics: re-run after the parser lands.
    sq.schedule("n", T.slot_noted("n"), cron="0 3 * * *")
    sq.drain(until=D0 + 3 * 3600 + 1)
    assert fired(sq) == [3 * 3600]
    sq.drain(until=D0 + 3 * 86400)
    assert fired(sq) == [3 * 3600 + 86400 * k for k in range(3)]


def test_cron_daily_alias_fires_at_midnight_utc(sq, sclock):
    # Depends on full cron semantics: re-run after the parser lands.
    sq.schedule("n", T.slot_noted("n"), cron="@daily")
    sq.drain(until=D0 + 3600)
    assert fired(sq) == []
    sq.drain(until=D0 + 3 * 86400 + 1)
    assert fired(sq) == [86400, 2 * 86400, 3 * 86400]


@pytest.mark.parametrize("expr, named", [
    ("61 * * * *", "minute"), ("0 24 * * *", "hour"),
    ("@fortnightly", "fortnightly")])
def test_a_bad_cron_expression_raises_value_error(sq, expr, named):
    # Depends on full cron semantics: re-run after the parser lands.
    with pytest.raises(ValueError, match=re.escape(named)):
        liteq.periodic(expr)
    with pytest.raises(ValueError, match=re.escape(named)):
        sq.schedule("n", T.record("x"), cron=expr)


# Real workers --------------------------------------------------------------


def test_an_idle_worker_fires_an_every_second_slot(sq, start_worker):
    start_worker(sq)
    sq.schedule("s", T.slot_noted("s"), every=1)
    job = wait_until(lambda: sq.jobs(), what="a slot to fire")[-1]
    slot = job.scheduled_for.timestamp()
    assert slot == int(slot) and job.created_at >= job.scheduled_for
    assert job.result(timeout=DEADLINE) == "s"


# Exactly once, with worker processes killed at random ----------------------

SLOT_MODULE = '''
import liteq


@liteq.periodic(every=1, overlap="allow")
@liteq.task
def tick():
    return 1
'''

SLOT_CHAOS_SECONDS = 60  # of kills and restarts
SLOT_WARMUP = 2.0  # seconds a worker process gets to start


@pytest.mark.skipif(not CHAOS_LINUX, reason="needs Linux")
def test_every_slot_fires_exactly_once_while_workers_are_killed(tmp_path):
    """3 worker processes declare an every-second schedule; they are
    killed with SIGKILL and restarted at random for a minute.  No slot
    fires twice, and every slot during which a worker had been up for
    SLOT_WARMUP seconds fires."""
    (tmp_path / "slotmod.py").write_text(SLOT_MODULE)
    db = tmp_path / "slots.db"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    procs, lives = [], []  # lives: [proc, started, ended] in wall time

    def start():
        err_path = tmp_path / f"slot{len(lives)}.err"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "liteq", "run", "slotmod", "--db",
                 str(db)], cwd=tmp_path, env=subprocess_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
        proc.stderr_path = err_path
        procs.append(proc)
        lives.append([proc, time.time(), None])
        return lives[-1]

    def kill(life):
        proc = life[0]
        assert proc.poll() is None, (
            f"worker {proc.pid} exited by itself with {proc.returncode} "
            f"(seed {seed}):\n{_chaos_stderr(proc)[-3000:]}")
        life[2] = time.time()
        proc.kill()
        proc.wait(DEADLINE)

    kills = 0
    try:
        running = [start() for _ in range(3)]
        end = time.monotonic() + SLOT_CHAOS_SECONDS
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.2, 2.5))
            if rng.random() < 0.1:  # all at once; back after a gap
                for life in running:
                    kill(life)
                kills += len(running)
                time.sleep(rng.uniform(0, 2))
                running = [start() for _ in range(3)]
                continue
            i = rng.randrange(len(running))
            kill(running[i])
            kills += 1
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 1))
            running[i] = start()
        for life in running:
            assert life[0].poll() is None, _chaos_stderr(life[0])[-3000:]
            life[2] = time.time()
            life[0].terminate()
        for life in running:
            life[0].wait(DEADLINE)
    finally:
        _chaos_reap(procs)

    with liteq.Queue(db) as queue:
        jobs = queue.jobs(limit=10**6)
        slots = [job.scheduled_for.timestamp() for job in jobs]
        late = [job.id for job in jobs
                if job.created_at < job.scheduled_for]
    twice = sorted(s for s, n in collections.Counter(slots).items() if n > 1)
    assert not twice, f"slots fired twice: {twice[:10]} (seed {seed})"
    assert all(s == int(s) for s in slots), slots
    assert not late, f"jobs fired before their slot: {late}"
    first, last = int(min(slots)), int(max(slots))
    covered = [s for s in range(first, last + 1) if any(
        started + SLOT_WARMUP < s <= ended for _, started, ended in lives)]
    missing = sorted(set(covered) - set(slots))
    assert not missing, (
        f"slots with a worker up that never fired: {missing[:20]} "
        f"(seed {seed}, {kills} kills)")
    assert len(covered) >= SLOT_CHAOS_SECONDS // 2, (len(covered), seed)
    for proc in procs:
        text = _chaos_stderr(proc)
        assert "Traceback" not in text and "locked" not in text, text
    print(f"\nSLOTS fired={len(slots)} covered={len(covered)} "
          f"kills={kills} processes={len(lives)} seed={seed}")


# ---------------------------------------------------------------------------
# The module: public names and documentation
# ---------------------------------------------------------------------------


def test_every_public_name_exists_and_has_a_docstring():
    for name in liteq.__all__:
        assert hasattr(liteq, name), name
        doc = inspect.getdoc(getattr(liteq, name))
        assert doc and doc.strip(), f"{name} has no docstring"


def test_ci_runs_the_readmes_test_command_exactly():
    with open(os.path.join(LITEQ_DIR, "README.md")) as readme:
        first_block = readme.read().split("```sh\n", 1)[1].split("```")[0]
    demo, tests = first_block.splitlines()
    assert demo == "python3 liteq.py demo"
    with open(os.path.join(LITEQ_DIR, ".ci", "run")) as ci:
        assert f"\n{tests} || exit\n" in ci.read()
    with open(os.path.join(LITEQ_DIR, ".gitignore")) as ignored:
        assert ".venv/" in ignored.read().split()


def test_module_docstring_example_runs():
    results = doctest.testmod(liteq, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0
    assert results.failed == 0


def test_module_docstring_lists_the_section_banners_exactly():
    listed = liteq.__doc__.split("Sections (", 1)[1].split("\n\n")[1]
    contents = [line.strip() for line in listed.splitlines()]
    with open(liteq.__file__, encoding="utf-8") as file:
        banners = [line[2:].rstrip("\n") for line in file
                   if re.match(r"# [0-9]+\. ", line)]
    assert contents == banners
    numbers = [int(line.split(".")[0]) for line in banners]
    assert numbers == list(range(1, len(banners) + 1))


# ---------------------------------------------------------------------------
# Bad rows and hostile input
# ---------------------------------------------------------------------------
# Options that would store a time no datetime can hold, rows changed outside
# liteq (with the sqlite3 module, as an operator or another program could),
# malformed serialized tasks, files liteq cannot use, and a command line
# whose output goes nowhere.  Each is refused or reported in one clear line,
# and one bad row never hides the others.


# Malformed serialized tasks and stored calls: ValueError naming the path.

def _bad_tamper(path, job_id, column, value):
    """Set one column of one job row behind liteq's back."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"UPDATE liteq_jobs SET {column} = ? WHERE id = ?",
                     (value, job_id))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("text", [
    "[]", "5", "null", '{"args": []}', '{"__task__": 5, "args": []}',
    '{"__task__": "x", "args": 5}', "[" * 100_000 + "]" * 100_000,
    '{"__task__": "x", "args": [{"__tuple__": 5}], "kwargs": {}}',
], ids=["list", "number", "null", "no-name", "name-number", "args-number",
        "deep", "bad-tuple"])
def test_a_stored_call_liteq_cannot_read_fails_its_job_with_its_problem(
        q, text):
    job = T.add.delay(1, 2)
    _bad_tamper(q.path, job.id, "call", text)
    liteq.Worker(q).run_once()
    assert job.status == "failed"
    assert "call" in job.error and "Traceback" not in job.error


_DEEP = functools.reduce(lambda inner, _: [inner], range(10_000), [])


@pytest.mark.parametrize("value, path, problem", [
    ({"__task__": "x", "args": [{"__dict__": [1]}]}, "args[0]",
     "'__dict__' object must have that one key, holding a JSON object"),
    ({"__task__": "x", "args": [1, {"__tuple__": 5}]}, "args[1]",
     "'__tuple__' object must have that one key, holding a JSON array"),
    ({"__task__": "x", "kwargs": {"a": {"__tuple__": [1], "b": 2}}},
     "kwargs['a']", "'__tuple__' object must have that one key"),
    ({"__task__": "x", "args": 5}, "args", "is 5, not a JSON array"),
    ({"__task__": "x", "kwargs": [1]}, "kwargs", "not a JSON object"),
    ({"__task__": "x", "kwargs": {1: 2}}, "kwargs", "has a key 1 of type"),
    ({"__task__": 5}, "the task", "task name must be a str"),
    ({"__task__": "x", "args": [_DEEP]}, "args" + "[0]" * 101,
     "is nested deeper than 100 levels"),
    ({"__task__": "x", "then": [{"__task__": "liteq:chain",
                                 "args": [[]]}]}, "then[0]",
     "kwargs must be {'done': an int >= 1}"),
    ({"__task__": "x", "then": [5]}, "then[0]", "is 5, not a chain frame"),
    ({"__task__": "liteq:chain", "args": [["x"]]}, "the task",
     "args must be [a list of serialized tasks]"),
    ({"__task__": "x", "args": [{"__task__": "y", "args": [{
        "__dict__": 1}]}]}, "args[0].args[0]", "'__dict__' object"),
], ids=["dict-tag-list", "tuple-tag-int", "tuple-tag-extra-key",
        "args-int", "kwargs-list", "kwargs-int-key", "name-int",
        "10000-deep", "then-empty-chain", "then-not-a-task",
        "chain-of-plain-values", "nested-task"])
def test_deserialize_task_refuses_malformed_input_naming_the_path(
        q, value, path, problem):
    with pytest.raises(ValueError) as info:
        liteq.deserialize_task(value)
    assert str(info.value).startswith(f"{path} ")
    assert problem in str(info.value)
    with pytest.raises(ValueError):
        liteq.chain([T.add(1, 2), value])
    assert sum(q.counts().values()) == 0


def test_a_chain_of_plain_dicts_too_deep_is_a_value_error(q):
    deep = {"__task__": stored(echo), "args": [_DEEP], "kwargs": {}}
    with pytest.raises(ValueError, match="nested deeper than 100"):
        liteq.chain([deep, deep]).delay()
    assert sum(q.counts().values()) == 0


def _bad_nest(kinds):
    value = 1
    for kind in reversed(kinds):
        value = {"list": lambda v: [v], "tuple": lambda v: (v,),
                 "dict": lambda v: {"k": v},
                 "tagged": lambda v: {"__tuple__": v},
                 "task": lambda v: liteq.Task("x", [v]),
                 "kwarg": lambda v: liteq.Task("x", [], {"k": v})}[kind](
            value)
    return value


def test_what_liteq_stores_at_the_depth_limit_reads_back(monkeypatch):
    # Decoding counts depth as encoding does: a value encoded within the
    # limit always decodes, and one past it (written by hand) never does.
    rng = random.Random(7)
    kinds = ["list", "tuple", "dict", "tagged", "task", "kwarg"]
    outcomes = set()
    for _ in range(200):
        call = liteq.Task("x", [_bad_nest(
            [rng.choice(kinds) for _ in range(rng.randint(96, 104))])])
        try:
            text, stored_ok = liteq._encode(call, "", 2**30), True
        except TypeError:
            with monkeypatch.context() as patch:
                patch.setattr(liteq, "_MAX_DEPTH", 10**6)
                text, stored_ok = liteq._encode(call, "", 2**30), False
        try:
            assert liteq._decode_call(text) == call
            read_ok = True
        except ValueError:
            read_ok = False
        assert read_ok == stored_ok
        outcomes.add(stored_ok)
    assert outcomes == {True, False}


# Rows liteq cannot read: marked in every listing, never hiding the others.

#: Rows changed outside liteq: (column, value, what to_dict() says).
_BAD_ROWS = {
    "call-list": ("call", "[]", "call is '[]', not a serialized task"),
    "call-number": ("call", "5", "call is '5', not a serialized task"),
    "call-null": ("call", "null", "call is 'null', not a serialized task"),
    "call-blob": ("call", b"\x00\x01", "call is a BLOB, not JSON text"),
    "call-deep": ("call", "[" * 100_000 + "]" * 100_000,
                  "call is JSON nested too deeply"),
    "call-invalid": ("call", '{"__task__": "x", "args": [1',
                     "call is not valid JSON (Expecting"),
    "call-nan": ("call", '{"__task__": "x", "args": [NaN], "kwargs": {}}',
                 "call holds NaN"),
    "call-bad-tag": ("call", '{"__task__": "x", "args": [{"__dict__": [1]}],'
                             ' "kwargs": {}}', "call.args[0] is not in"),
    "eta-text": ("eta", "x", "eta is 'x', not a unix time"),
    "created-far": ("created_at", -1e18, "created_at is -1e+18, not a unix"),
    "error-blob": ("error", b"\xff\xfe", "error is a BLOB, not text"),
    "percent-inf": ("percent", math.inf, "percent is inf, not a finite"),
}


@pytest.fixture
def bad_rows(q):
    """One good job before and after one tampered job per _BAD_ROWS case;
    returns (good ids, {case: tampered id})."""
    good = [T.add.delay(1, 2).id]
    bad = {case: T.add.delay(3, 4).id for case in _BAD_ROWS}
    good.append(T.echo.delay({"__task__": "not a task"}).id)
    q.close()
    for case, (column, value, _) in _BAD_ROWS.items():
        _bad_tamper(q.path, bad[case], column, value)
    return good, bad


def test_listings_mark_each_bad_row_and_show_every_other_row(q, bad_rows):
    good, bad = bad_rows
    jobs = {job.id: job.to_dict() for job in q.jobs()}
    assert sorted(jobs) == sorted(good + list(bad.values()))
    for job_id in good:
        assert "unreadable" not in jobs[job_id]
    assert jobs[good[0]]["args"] == [1, 2]
    for case, (column, _, what) in _BAD_ROWS.items():
        data = jobs[bad[case]]
        assert what in data["unreadable"], case
        assert data["id"] == bad[case]
        assert data["name"] == stored(add)  # what could be read, is
        assert data[column if column in data else "args"] is None
        # Every listing is still one valid JSON document.
        json.dumps(data, allow_nan=False)
    assert jobs[bad["eta-text"]]["eta"] is None
    assert jobs[bad["eta-text"]]["args"] == [3, 4]
    assert jobs[bad["call-blob"]]["args"] is None
    assert set(jobs[bad["call-list"]]) == set(jobs[good[0]]) | {
        "unreadable"}


def test_http_lists_bad_rows_marked_among_the_others(q, bad_rows):
    good, bad = bad_rows
    app = liteq.wsgi_app(q)
    status, _, body = _ops_call(app, _ops_environ("/tasks",
                                                  query="limit=1000"))
    assert status == "200 OK"
    listed = {job["id"]: job for job in json.loads(body)}
    assert sorted(listed) == sorted(good + list(bad.values()))
    assert "unreadable" not in listed[good[0]]
    assert "call is a BLOB" in listed[bad["call-blob"]]["unreadable"]
    status, _, body = _ops_call(app, _ops_environ(f"/tasks/{bad['eta-text']}"))
    assert status == "200 OK"
    assert json.loads(body)["unreadable"] == "eta is 'x', not a unix time"


def test_cli_lists_bad_rows_and_show_prints_one_line_exit_1(q, bad_rows,
                                                            capsys):
    good, bad = bad_rows
    assert liteq.main(["list", "--limit", "100", "--db", q.path]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert sorted(map(int, lines)) == sorted(good + list(bad.values()))
    assert "UNREADABLE" not in lines[str(good[0])]
    assert "UNREADABLE: call is a BLOB" in lines[str(bad["call-blob"])]
    assert liteq.main(["list", "--json", "--db", q.path]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(lines)
    for args in ([], ["--follow"]):
        job_id = bad["call-invalid"]
        assert liteq.main(["show", str(job_id), "--db", q.path, *args]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1
        assert captured.err.startswith(
            f"liteq: error: the stored row of job {job_id} in {q.path} is "
            f"unreadable: call is not valid JSON (Expecting")
        assert '"Bad rows" in docs/guarantees.md' in captured.err
    assert liteq.main(["show", str(bad["eta-text"]), "--json",
                       "--db", q.path]) == 1
    assert json.loads(capsys.readouterr().out)["unreadable"]
    assert liteq.main(["show", str(good[0]), "--db", q.path]) == 0


def test_result_of_a_tampered_done_job_is_a_value_error_naming_it(q):
    job = T.add.delay(1, 2)
    assert liteq.Worker(q).run_once()
    _bad_tamper(q.path, job.id, "result", '{"__tuple__": 5}')
    with pytest.raises(ValueError) as info:
        job.result(timeout=5)
    assert str(info.value).startswith(
        f"stored row of job {job.id} is malformed: result is not in")
    assert "unreadable" in job.to_dict()


# The dashboard's own script, run by Node.js against a minimal stand-in for
# the DOM and fetch(), fed the JSON that wsgi_app serves.  It prints what
# the page shows: the live indicator, each job row, the detail panel.
_BAD_DOM = r"""
"use strict";
const fs = require("fs");
const [script, answers, hash] = process.argv.slice(2);
const bodies = JSON.parse(fs.readFileSync(answers, "utf8"));
const later = setTimeout;
class Node {
  constructor(tag) {
    Object.assign(this, {tag, children: [], className: "", dataset: {},
                         style: {}, attrs: {}, own: "", hidden: false,
                         title: "", value: ""});
    const node = this;
    this.classList = {
      toggle(name, on) {
        const names = node.className.split(" ").filter((n) => n !== name);
        if (on) names.push(name);
        node.className = names.join(" ");
      },
    };
  }
  get textContent() {
    return this.own + this.children.map((c) => c.textContent).join("");
  }
  set textContent(text) { this.own = String(text); this.children = []; }
  get firstChild() { return this.children[0]; }
  get options() { return this.children; }
  appendChild(child) { this.children.push(child); return child; }
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren(...nodes) { this.children = nodes; }
  setAttribute(name, value) { this.attrs[name] = String(value); }
  addEventListener() {}
}
const byId = {};
globalThis.document = {
  getElementById: (id) => byId[id] || (byId[id] = new Node("div")),
  querySelector: () => ({content: "/"}),
  createElement: (tag) => new Node(tag),
  addEventListener() {},
};
globalThis.window = {addEventListener() {}};
globalThis.location = {hash, pathname: "/", search: ""};
globalThis.history = {replaceState() {}};
globalThis.setTimeout = () => 0;  // one refresh only
globalThis.fetch = async (url) => {
  const body = bodies[url.split("?")[0]];
  return {status: body ? 200 : 404, ok: !!body,
          json: async () => body || {error: "no route"}};
};
new Function(fs.readFileSync(script, "utf8"))();
later(() => {
  const rows = byId.jobs.children.map((row) => ({
    id: Number(row.dataset.id), text: row.textContent}));
  console.log(JSON.stringify({live: byId.live.className,
                              said: byId.live.textContent, rows,
                              detail: byId.fields.textContent}));
}, 300);
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_dashboard_shows_bad_rows_marked_among_the_others(q, bad_rows,
                                                          tmp_path):
    good, bad = bad_rows
    app = liteq.wsgi_app(q)
    bodies = {}
    for route in ("/counts", "/tasks", f"/tasks/{bad['call-blob']}"):
        status, _, body = _ops_call(app, _ops_environ(route,
                                                      query="limit=50"))
        assert status == "200 OK", (route, body)
        bodies[route] = json.loads(body)
    (tmp_path / "answers.json").write_text(json.dumps(bodies))
    (tmp_path / "page.js").write_text(
        liteq._DASHBOARD.split("<script>", 1)[1].split("</script>", 1)[0])
    (tmp_path / "dom.js").write_text(_BAD_DOM)
    out = subprocess.run(
        ["node", str(tmp_path / "dom.js"), str(tmp_path / "page.js"),
         str(tmp_path / "answers.json"), f"#job-{bad['call-blob']}"],
        capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    page = json.loads(out.stdout)
    assert (page["live"], page["said"][:4]) == ("ok", "live"), page["said"]
    rows = {row["id"]: row["text"] for row in page["rows"]}
    assert sorted(rows) == sorted(good + list(bad.values()))
    assert "unreadable row" not in rows[good[0]]
    assert "pending" in rows[good[0]]
    assert "unreadable row: call is a BLOB, not JSON text" in rows[
        bad["call-blob"]]
    assert "unreadable row: eta is 'x'" in rows[bad["eta-text"]]
    assert "unreadablecall is a BLOB" in page["detail"]


# Times no datetime can hold, refused at the call.

@pytest.mark.parametrize("options", [
    {"countdown": 1e308}, {"eta": 1e300}, {"eta": dt.datetime.max},
    {"eta": dt.datetime.max.replace(tzinfo=UTC)},
    {"eta": dt.datetime(9999, 1, 1, tzinfo=UTC)},
], ids=["countdown", "eta-number", "eta-naive-max", "eta-aware-max",
        "eta-bound"])
def test_a_start_time_past_year_9998_is_refused_and_nothing_stored(q,
                                                                   options):
    with pytest.raises(ValueError, match="before 9999-01-01T00:00:00Z") \
            as info:
        T.add.apply_async((1, 2), **options)
    name = next(iter(options))
    assert str(info.value).startswith(f"{name} must ")
    assert repr(options[name]) in str(info.value)
    with pytest.raises(ValueError):
        with q.batch():
            T.add.apply_async((1, 2), **options)
    assert sum(q.counts().values()) == 0


@pytest.mark.parametrize("countdown", [math.inf, -math.inf, math.nan,
                                       10**400],
                         ids=["inf", "-inf", "nan", "10**400"])
def test_a_non_finite_countdown_is_a_value_error(q, countdown):
    with pytest.raises(ValueError, match="countdown must be a finite "
                                         "number, got"):
        T.add.apply_async((1, 2), countdown=countdown)
    assert sum(q.counts().values()) == 0


def test_the_latest_and_earliest_start_times_read_back(q, clock):
    late = dt.datetime(9998, 12, 31, 23, 59, tzinfo=UTC)
    job = T.add.apply_async((1, 2), eta=late)
    assert job.eta == late
    assert job.to_dict()["eta"] == "9998-12-31T23:59:00Z"
    for early in (dt.datetime.min, dt.datetime.min.replace(tzinfo=UTC)):
        assert T.add.apply_async((1, 2), eta=early).eta == utc(clock.now)
    assert "unreadable" not in job.to_dict()


def test_retry_delays_longer_than_a_century_are_refused(q):
    for option in ("retry_delay", "retry_max_delay"):
        with pytest.raises(ValueError, match=f"{option} must be at most "
                                             f"3155760000 seconds"):
            q.task(add, **{option: 1e300})


def test_huge_ints_for_durations_are_value_errors(q, tmp_path):
    with pytest.raises(ValueError, match="busy_timeout must be finite"):
        liteq.Queue(tmp_path / "x.db", busy_timeout=10**400)
    with pytest.raises(ValueError, match="older_than must be finite"):
        q.purge(older_than=10**400)


# Files liteq cannot use: the real cause, and never "another file" for a
# damaged queue.

def _bad_copy(path, keep):
    """Damage a copy of a liteq database: keep(data) gives its bytes."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(keep(data))
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


@pytest.mark.parametrize("keep", [
    lambda data: data[:100], lambda data: data[:5000],
    lambda data: data[:10],
    lambda data: data[:4096] + bytes(len(data) - 4096),
], ids=["cut-at-100", "cut-at-5000", "cut-at-10", "pages-zeroed"])
def test_a_damaged_liteq_file_is_reported_damaged_never_foreign(
        make_queue, tmp_path, capsys, keep):
    queue = make_queue("hurt.db")
    for i in range(20):
        T.add.delay(i, i)
    queue.close()
    _bad_copy(queue.path, keep)
    before = file_state(queue.path)
    with pytest.raises(liteq.StorageError) as info:
        queue.counts()
    message = str(info.value)
    assert message.startswith(f"{queue.path} is damaged (")
    assert "copy it" in message and "before any repair" in message
    assert "PRAGMA integrity_check" in message
    assert "another file" not in message
    queue.close()
    assert liteq.main(["status", "--db", queue.path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err
    assert file_state(queue.path) == before


def test_a_read_only_directory_is_a_storage_error(make_queue, tmp_path,
                                                 capsys, drop_file_override):
    # As root, permissions only apply in a thread without CAP_DAC_OVERRIDE
    # (see drop_file_override).
    folder = tmp_path / "ro"
    folder.mkdir()
    queue = make_queue("ro/q.db")
    T.add.delay(1, 2)
    queue.close()
    os.chmod(folder, 0o555)

    def attempt():
        try:
            open(folder / "probe", "w").close()
            pytest.skip("the directory stayed writable")
        except PermissionError:
            pass
        with pytest.raises(liteq.StorageError) as info:
            liteq.Queue(queue.path).counts()
        return str(info.value), liteq.main(["status", "--db", queue.path])

    try:
        message, code = drop_file_override(attempt)
    finally:
        os.chmod(folder, 0o755)
    assert message.startswith(f"cannot use {queue.path}: ")
    assert "readonly" in message and "not a liteq" not in message
    assert "write the file and its directory" in message
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "readonly" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="signals and /proc")
def test_a_shm_that_is_a_directory_is_named_and_sigterm_stops_at_once(
        tmp_path):
    # SQLite then opens the file read-only: every write of the worker
    # fails, and it says why once, holding nothing, until it is stopped.
    # (Made while a worker runs, such a directory changes nothing for it:
    # it keeps the shared memory it mapped.)
    db = _held_setup(tmp_path)
    _held_delay(tmp_path, db, "heldtasks.hold.delay('a')")
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{db}{suffix}")
    os.mkdir(f"{db}-shm")
    procs = []
    try:
        worker = _held_worker(tmp_path, db, procs, "w1")
        wait_until(lambda: "is a directory" in _chaos_stderr(worker),
                   what="the worker to name the -shm", alive=[worker])
        signalled = time.monotonic()
        assert _chaos_exit(worker, signal.SIGTERM, "worker after SIGTERM") \
            == 0  # it held nothing
        assert time.monotonic() - signalled < 2.5  # not stop_grace (3 s)
        err = _chaos_stderr(worker)
        assert f"{db}-shm is a directory, where SQLite keeps its shared " \
               f"memory: stop the processes that use the database, remove " \
               f"it and start them again" in err, err
        assert err.count(" ERROR ") == 1 and "Traceback" not in err, err
        assert "without writing" not in err, err
        assert not (tmp_path / "a.started").exists()
        os.rmdir(f"{db}-shm")
        (tmp_path / "a.go").touch()
        again = _held_worker(tmp_path, db, procs, "w2")
        with liteq.Queue(db) as queue:
            wait_until(lambda: queue.get(1).status == "done",
                       what="the job to finish", alive=[again])
    finally:
        _chaos_reap(procs)


# The command line: one line and an exit status, never a traceback or a
# write.

def test_read_commands_and_http_never_write_an_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    for command in (["status"], ["list"], ["show", "1"], ["status",
                                                          "--json"]):
        assert liteq.main([*command, "--db", str(path)]) == 2
        assert capsys.readouterr().err == (
            f"liteq: error: no liteq database in {path} yet: the file is "
            f"empty (run and demo create one)\n")
    app = liteq.wsgi_app(liteq.Queue(path))
    for route in ("/counts", "/tasks", "/tasks/1"):
        status, _, body = _ops_call(app, _ops_environ(route))
        assert status.startswith("503"), route
    assert path.read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == ["empty.db"]


def test_list_limit_beyond_64_bits_is_a_one_line_user_error(q, capsys):
    big = str(2**63)
    assert liteq.main(["list", "--limit", big, "--db", q.path]) == 2
    assert capsys.readouterr().err == (
        f"liteq: error: --limit must be from 1 to {2**63 - 1}, got {big}\n")
    with pytest.raises(ValueError, match="limit must be <= "):
        q.jobs(limit=2**63)
    assert q.get(2**63) is None and q.get(-2**63 - 1) is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_or_closed_stdout_exits_1_with_one_line(tmp_path):
    db = str(tmp_path / "ops.db")
    with liteq.Queue(db) as queue:
        _ops_register(queue)["add"].delay(1, 2)
    with open("/dev/full", "w") as full:
        out = subprocess.run(
            [sys.executable, "-m", "liteq", "status", "--db", db],
            stdout=full, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(), cwd=str(tmp_path), timeout=DEADLINE)
    assert (out.returncode, out.stderr) == (
        1, "liteq: error: cannot write the output: [Errno 28] No space "
           "left on device\n")
    for command in ("list", "show 1", "status --json"):
        out = subprocess.run(
            ["sh", "-c", f'exec "$0" -m liteq {command} --db "$1" >&-',
             sys.executable, db], stderr=subprocess.PIPE, text=True,
            env=subprocess_env(), cwd=str(tmp_path), timeout=DEADLINE)
        assert (out.returncode, out.stderr) == (
            1, "liteq: error: cannot write the output: standard output is "
               "closed\n"), command


# The worker and rows changed outside liteq: a bad row fails its own job,
# with an error naming what is wrong, and never the thread; no other job
# waits on it.

def _bad_update(path, job_id, assignments):
    """``UPDATE liteq_jobs SET <assignments>`` for one job behind liteq's
    back: SQL, for values no parameter holds (text that is not UTF-8)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"UPDATE liteq_jobs SET {assignments} WHERE id = ?",
                     (job_id,))
        conn.commit()
    finally:
        conn.close()


def _bad_outcome(queue, job_id):
    return queue._store.read(
        "SELECT status, error, ready, timer, worker, finished_at IS NOT NULL"
        " FROM liteq_jobs WHERE id = ?", (job_id,))[0]


#: Stored calls liteq cannot have written: (call, its problem).
_BAD_CALLS = {
    "dict-tag-list": (
        '{"__task__": "ADD", "args": [{"__dict__": [1]}], "kwargs": {}}',
        "call.args[0] is not in liteq's format: a '__dict__' object must "
        "have that one key, holding a JSON object"),
    "frame-done-negative": (
        '{"__task__": "ADD", "args": [1, 2], "kwargs": {}, "then": [{'
        '"__task__": "liteq:chain", "args": [[]], "kwargs": {"done": -1}}]}',
        "call.then[0] is a liteq:chain call whose kwargs must be {'done': "
        "an int >= 0}, got {'done': -1}"),
    "frame-args-number": (
        '{"__task__": "ADD", "args": [1, 2], "kwargs": {}, "then": [{'
        '"__task__": "liteq:chain", "args": [5], "kwargs": {"done": 1}}]}',
        "call.then[0] is a liteq:chain call whose args must be [a list of "
        "serialized tasks], got [5]"),
    "deep": ("[" * 100_000 + "]" * 100_000,
             "call is JSON nested too deeply to read"),
    "nan": ('{"__task__": "ADD", "args": [NaN], "kwargs": {}}',
            "call holds NaN, which liteq never stores"),
}


@pytest.mark.parametrize("pace", [{}, DEFER], ids=["steady", "deferred"])
@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_a_malformed_stored_call_fails_its_job_at_once_naming_the_row(
        q, hand, caplog, case, pace):
    caplog.set_level(logging.INFO, logger="liteq")
    register(q, add, retries=3, retry_delay=0)
    text, problem = _BAD_CALLS[case]
    jobs = [T.add.delay(i, i) for i in range(5)]
    bad = jobs.pop(2)
    _bad_tamper(q.path, bad.id, "call", text.replace("ADD", stored(add)))
    worker = hand(**pace)
    assert worker.turn_until_idle() > 0
    assert [job.status for job in jobs] == ["done"] * 4
    error = f"stored row of job {bad.id} is malformed: {problem}"
    assert _bad_outcome(q, bad.id) == ("failed", error, None, None, None, 1)
    assert bad.attempts == 1  # no retry: it cannot help
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR]
    assert errors == [error]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("call, error", [
    ('{"__task__": "os:system", "args": ["true"], "kwargs": {}}',
     "unknown task 'os:system': not registered in this worker"),
    ('{"__task__": "ADD", "args": [1], "kwargs": {}}',
     "task 'ADD' cannot take its stored arguments: missing a required "
     "argument: 'b'"),
], ids=["unknown-task", "signature-changed"])
def test_an_unknown_task_or_a_changed_signature_keeps_its_own_error(
        q, hand, call, error):
    register(q, add, retries=3, retry_delay=0)
    job = T.add.delay(1, 2)
    _bad_tamper(q.path, job.id, "call", call.replace("ADD", stored(add)))
    hand(unknown_grace=0).turn_until_idle()
    assert (job.status, job.attempts) == ("failed", 1)
    assert job.error.startswith(error.replace("ADD", stored(add)))


def test_text_that_is_not_utf8_is_marked_in_listings_never_an_error(
        q, capsys):
    good, bad = T.add.delay(1, 2), T.add.delay(3, 4)
    _bad_update(q.path, bad.id, "name = CAST(x'ff' AS TEXT), "
                "error = CAST(x'c3' AS TEXT), queue = CAST(x'80' AS TEXT)")
    jobs = {job.id: job.to_dict() for job in q.jobs()}
    assert "unreadable" not in jobs[good.id]
    assert jobs[bad.id]["unreadable"] == (
        "name is text that is not valid UTF-8; queue is text that is not "
        "valid UTF-8; error is text that is not valid UTF-8")
    assert (jobs[bad.id]["name"], jobs[bad.id]["args"]) == (None, [3, 4])
    assert bad.name == "\\xff"  # a field read shows the bad bytes
    assert sum(q.counts().values()) == 2
    assert liteq.main(["list", "--db", q.path]) == 0
    assert "UNREADABLE: name is text that is not valid UTF-8" in \
        capsys.readouterr().out
    app = liteq.wsgi_app(q)
    for route in ("/tasks", f"/tasks/{bad.id}", "/counts"):
        status, _, body = _ops_call(app, _ops_environ(route))
        assert status == "200 OK", (route, body)
        json.loads(body)


#: Columns the claim or a sweep reads, changed outside liteq: the SET
#: clause, and what the job's error says after "column " (None: the
#: worker does not read it and the job runs).  A job whose timer is due
#: while a worker holds it is one whose lease expired.
_EXPIRED = "status = 'running', worker = 'gone:1', ready = NULL, timer = 0"
_BAD_COLUMNS = {
    "steps-text": ("steps = 'many'", "steps holds 'many', not an integer"),
    "attempts-text": ("attempts = 'x'",
                      "attempts holds 'x', not an integer"),
    "attempts-negative": ("attempts = -1", "attempts holds -1, not an "
                                           "integer from 0 to 2**62"),
    "failures-text": ("failures = 'x'",
                      "failures holds 'x', not an integer"),
    "failures-real": ("failures = 0.5",
                      "failures holds 0.5, not an integer"),
    "priority-text": ("priority = 'high'",
                      "priority holds 'high', not an integer"),
    "priority-blob": ("priority = x'00'",
                      "priority holds a BLOB, not an integer"),
    "ready-text": ("ready = 'x'", "ready holds 'x', not an integer"),
    "ready-real": ("ready = 1.5", "ready holds 1.5, not an integer"),
    "token-text": ("token = 't'", "token holds 't', not an integer"),
    "call-utf8": ("call = CAST(x'ff' AS TEXT)",
                  "call holds text that is not valid UTF-8"),
    "call-blob": ("call = x'7b7d'", "call holds a BLOB, not text"),
    "current-utf8": ("current = CAST(x'ff' AS TEXT)",
                     "current holds text that is not valid UTF-8"),
    "current-blob": ("current = x'00'", "current holds a BLOB, not text"),
    "name-utf8": ("name = CAST(x'ff' AS TEXT)", None),
    "timer-text": ("ready = NULL, timer = 'soon'",
                   "timer holds 'soon', not a number"),
    "timer-blob": ("ready = NULL, timer = x'00'",
                   "timer holds a BLOB, not a number"),
    "lost-text": (f"{_EXPIRED}, lost = 'x'",
                  "lost holds 'x', not an integer"),
    "max-lost-text": (f"{_EXPIRED}, max_lost = 'x'",
                      "max_lost holds 'x', not an integer"),
    "worker-blob": ("status = 'running', worker = x'00', ready = NULL, "
                    "timer = 0", "worker holds a BLOB, not text or NULL"),
    "expired-current-utf8": (f"{_EXPIRED}, current = CAST(x'ff' AS TEXT)",
                             "current holds text that is not valid UTF-8"),
    "expires-text": ("expires = 'x'",
                     "expires holds 'x', not a number or NULL"),
    "expires-blob": ("expires = x'00'",
                     "expires holds a BLOB, not a number or NULL"),
    "deadline-text": ("deadline = 'x'",
                      "deadline holds 'x', not a number or NULL"),
    "deadline-blob": ("deadline = x'00'",
                      "deadline holds a BLOB, not a number or NULL"),
    "waiting-number": ("waiting = 5", None),
    "origin-blob": ("origin = x'00'", None),
    "errors-text": ("errors = 'not json'", None),
}


@pytest.mark.parametrize("pace", [{}, DEFER], ids=["steady", "deferred"])
@pytest.mark.parametrize("case", sorted(_BAD_COLUMNS))
def test_a_bad_value_in_a_column_the_claim_reads_fails_only_its_job(
        q, hand, caplog, case, pace):
    caplog.set_level(logging.INFO, logger="liteq")
    assignments, problem = _BAD_COLUMNS[case]
    jobs = [T.add.delay(i, i) for i in range(5)]
    bad = jobs.pop(2)
    _bad_update(q.path, bad.id, assignments)
    worker = hand(**pace)
    assert worker.turn_until_idle() > 0
    assert [job.status for job in jobs] == ["done"] * 4
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR]
    if problem is None:
        assert _bad_outcome(q, bad.id)[0] == "done"
        assert errors == []
        return
    error = f"stored row of job {bad.id} is malformed: column {problem}"
    assert _bad_outcome(q, bad.id) == ("failed", error, None, None, None, 1)
    assert errors == [f"{error}; the job failed"]  # once
    assert "Traceback" not in caplog.text
    # Quarantined: later turns and later jobs never meet it again.
    later = T.add.delay(7, 7)
    assert worker.turn_until_idle() > 0
    assert later.status == "done"
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) \
        == 1


def test_bad_rows_of_every_kind_at_once_never_hold_up_the_line(q, hand,
                                                               caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    good = [T.add.delay(i, i).id for i in range(3)]
    bad = {}
    for case, (assignments, problem) in sorted(_BAD_COLUMNS.items()):
        bad[case] = T.add.delay(1, 1).id
        _bad_update(q.path, bad[case], assignments)
    good += [T.add.delay(i, i).id for i in range(3)]
    worker = hand(threads=1, batch=4)
    assert worker.turn_until_idle() > 0
    assert [q.get(i).status for i in good] == ["done"] * 6
    for case, job_id in bad.items():
        status, error = _bad_outcome(q, job_id)[:2]
        if _BAD_COLUMNS[case][1] is None:
            assert status == "done", case
        else:
            assert (status, error) == ("failed", f"stored row of job "
                                       f"{job_id} is malformed: column "
                                       f"{_BAD_COLUMNS[case][1]}"), case
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("value", ["not json", '{"a": 1}', "[1, 2]",
                                   b"\x00"], ids=["text", "object",
                                                  "numbers", "blob"])
def test_a_tampered_errors_column_is_named_and_never_stops_the_worker(
        q, hand, caplog, value):
    caplog.set_level(logging.INFO, logger="liteq")
    register(q, fail, retries=1, retry_delay=0)
    job = T.fail.delay("boom")
    _bad_tamper(q.path, job.id, "errors", value)
    with pytest.raises(ValueError) as info:
        job.errors
    assert str(info.value).startswith("errors is ")
    assert str(info.value).endswith(", not a JSON list of error lines")
    listed = job.to_dict()
    assert listed["errors"] == [] and str(info.value) in listed["unreadable"]
    others = [T.add.delay(i, i) for i in range(3)]
    assert hand().turn_until_idle() > 0
    assert [other.status for other in others] == ["done"] * 3
    assert (job.status, job.attempts) == ("failed", 2)
    assert job.errors == ["RuntimeError: boom"] * 2  # started again
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("column", ["priority", "ready", "steps"])
def test_bad_rows_filling_whole_batches_leave_no_wait_for_the_next(
        q, hand, column):
    # A text priority sorts before every number: these come first in line.
    bad = [T.add.delay(1, 1) for _ in range(5)]
    good = [T.add.delay(i, i) for i in range(3)]
    for job in bad:
        _bad_update(q.path, job.id, f"priority = 'high', {column} = 'x'")
    worker = hand(**{**DEFER, "batch": 2})
    assert worker.turn() == 0  # the first turn finds the good ones
    assert worker.turn_until_idle() > 0
    assert [job.status for job in good] == ["done"] * 3
    assert {job.status for job in bad} == {"failed"}


def test_a_follower_reads_a_bad_eta_in_line_as_no_wait():
    tuning = liteq._Tuning()
    assert liteq._Lead.hold([(3, "x"), (1, b"\x00"), (1, None)], 100.0,
                            tuning) == tuning.follow_look
    assert liteq._Lead.hold([(3, "x"), (1, 10.0)], 100.0, tuning) is None


class _BadFilter(logging.Filter):
    """Make liteq's own logging raise ``exc`` for the first ``times``
    records whose message starts with ``prefix``: an error no part of the
    worker expects, through a public seam."""

    def __init__(self, prefix, exc, times):
        super().__init__()
        self.prefix, self.exc, self.left = prefix, exc, times

    def filter(self, record):
        if self.left and record.getMessage().startswith(self.prefix):
            self.left -= 1
            raise self.exc
        return True


@pytest.fixture
def bad_filter():
    made = []

    def install(prefix, exc, times=1):
        made.append(_BadFilter(prefix, exc, times))
        logging.getLogger("liteq").addFilter(made[-1])
        return made[-1]

    yield install
    for bad in made:
        logging.getLogger("liteq").removeFilter(bad)


def test_an_unexpected_error_in_a_thread_is_logged_once_and_it_goes_on(
        q, hand, clock, caplog, bad_filter):
    caplog.set_level(logging.INFO, logger="liteq")
    jobs = [T.add.delay(i, i) for i in range(6)]
    bad_filter("job ", RuntimeError("injected"), times=3)
    worker = hand()
    for _ in range(3):  # each turn claims a step, then meets the error
        pause = worker.turn()
        assert 0 < pause <= 2.0
    assert worker.turn_until_idle() > 0
    # The three steps claimed when it struck run again after their lease.
    assert [job.status for job in jobs].count("done") == 3
    clock.advance(61)
    assert worker.turn_until_idle() > 0
    assert [job.status for job in jobs] == ["done"] * 6
    reported = [r for r in caplog.records if "unexpected error" in
                r.getMessage()]
    assert len(reported) == 1, [r.getMessage() for r in reported]
    assert reported[0].levelno == logging.ERROR
    assert reported[0].exc_info[0] is RuntimeError
    assert "RuntimeError: injected" in reported[0].getMessage()


def test_a_bug_met_on_every_turn_is_reported_with_its_count_not_each_time(
        caplog):
    caplog.set_level(logging.INFO, logger="liteq")
    pacing = Pacing()
    bugs = liteq._Bugs("unexpected error in a test", pacing)

    def meet():
        try:
            raise KeyError("same place")
        except KeyError as exc:
            return bugs.met(exc)

    pauses = []
    for _ in range(15):  # one a second
        pauses.append(meet())
        pacing.advance(1.0)
    assert max(pauses) <= 2.0 and pauses[-1] > 0.5  # backs off
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # the first, then one report at 10 s
    assert caplog.records[0].exc_info is not None
    assert caplog.records[1].exc_info is None
    assert "since the last report" not in lines[0]
    assert "KeyError: 'same place' (10 time(s) since the last report" in \
        lines[1]
    bugs.ok()
    assert bugs.count == 0


def test_a_worker_thread_that_cannot_go_on_stops_the_worker_loudly(
        q, bad_filter, caplog):
    class Fatal(BaseException):
        pass

    caplog.set_level(logging.INFO, logger="liteq")
    T.add.delay(1, 2)
    bad_filter("job ", Fatal("injected"))
    worker = liteq.Worker(q)
    with pytest.raises(liteq.StorageError) as info:
        worker.run_forever()
    assert str(info.value) == ("worker thread liteq-worker-1 ended: Fatal: "
                               "injected")
    assert worker.fatal == str(info.value)


# A property: rows tampered at random, never a dead thread, a held-up job
# or a listing that fails.

class _NotUtf8(bytes):
    """A value stored as TEXT that is not valid UTF-8."""


#: Every column but id, and whether it is NOT NULL.
_TAMPER_COLUMNS = [
    ("name", True), ("current", True), ("call", True),
    ("description", True), ("queue", True), ("priority", True),
    ("key", False), ("status", True), ("percent", False), ("steps", True),
    ("attempts", True), ("failures", True), ("lost", True),
    ("max_lost", True), ("token", True), ("cancel", True),
    ("result", False), ("error", False), ("eta", True), ("ready", False),
    ("timer", False), ("worker", False), ("created_at", True),
    ("started_at", False), ("updated_at", True), ("finished_at", False),
    ("waiting", False), ("expires", False), ("deadline", False),
    ("origin", False), ("errors", False), ("unknown_since", False),
    ("scheduled_for", False)]


def _tamper_value(rng):
    """A value of some type liteq would not store there, most likely."""
    return rng.choice([
        lambda: rng.choice([0, 1, -1, 2**63 - 1, -2**63, 2**62, 2**53 + 1]),
        lambda: rng.randint(-2**63, 2**63 - 1),
        lambda: rng.choice([0.5, -1e300, 1e300, math.inf, -math.inf, 1e-9]),
        lambda: rng.uniform(-1e12, 1e12),
        lambda: rng.choice(["", "x", "many", "soon", "high", "t", "[]", "{}",
                            "null", "5", "NaN", '{"__task__": 5}',
                            '{"__task__": "x", "args": [{"__dict__": 1}]}',
                            "[" * 200 + "]" * 200]),
        lambda: "".join(rng.choice('ab{}[]":,0_\\') for _ in range(
            rng.randint(0, 30))),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(0, 8))),
        lambda: _NotUtf8(rng.choice([b"\xff", b"ab\xfe", b"\xc3", b"\x80x"])),
        lambda: None,
    ])()


def _tamper_rows(path, job_ids, rng, counted):
    """Change 1-3 random columns of each job behind liteq's back; adds
    the ids of the rows it changed to ``counted``."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for job_id in job_ids:
            for _ in range(rng.randint(1, 3)):
                column, not_null = rng.choice(_TAMPER_COLUMNS)
                value = _tamper_value(rng)
                if value is None and not_null:
                    continue  # the schema refuses it: nothing to test
                sql = "CAST(? AS TEXT)" if isinstance(value, _NotUtf8) \
                    else "?"
                try:
                    conn.execute(f"UPDATE liteq_jobs SET {column} = {sql} "
                                 f"WHERE id = ?", (value, job_id))
                except sqlite3.IntegrityError:
                    continue  # a CHECK or a unique key refused it
                counted.add(job_id)
    finally:
        conn.close()


def _tamper_listings_answer(queue, capsys, job_ids):
    """Every listing returns; one bad row marks only itself."""
    jobs = queue.jobs(limit=10_000)
    assert sorted(job.id for job in jobs) == sorted(job_ids)
    for job in jobs:
        json.dumps(job.to_dict(), allow_nan=False)
    assert sum(queue.counts().values()) == len(job_ids)
    for args in ([], ["--json"]):
        code = liteq.main(["list", "--limit", "10000", "--db", queue.path,
                           *args])
        out, err = capsys.readouterr()
        assert code == 0 or (code == 1 and err.count("\n") == 1), err
    for job_id in job_ids[:5]:
        code = liteq.main(["show", str(job_id), "--db", queue.path])
        out, err = capsys.readouterr()
        assert code in (0, 1) and err.count("\n") == int(code == 1), err
    app = liteq.wsgi_app(queue)
    for route in ("/tasks", "/counts"):
        status, _, body = _ops_call(app, _ops_environ(route,
                                                      query="limit=1000"))
        assert status == "200 OK", (route, body)
        json.loads(body)
    for job_id in job_ids:
        status, _, body = _ops_call(app, _ops_environ(f"/tasks/{job_id}"))
        assert status == "200 OK" or "error" in json.loads(body), body


def _tamper_by_hand(queue, clock, ids, rng, tampered, pace):
    """Turn two threads of a HandWorker by hand while rows change."""
    worker = HandWorker(queue, clock, threads=2, **pace)
    try:
        for _ in range(40):  # some steps run, then more rows change
            for thread in worker.threads:
                assert worker.turn(thread) is not None
        _tamper_rows(queue.path, rng.sample(ids, 50), rng, tampered)
        for _ in range(3):  # leases of stuck steps expire in between
            for thread in worker.threads:
                assert worker.turn_until_idle(thread) is not None
            clock.advance(3600)
    finally:
        worker.close()
    assert worker.worker.fatal is None


def _tamper_in_threads(queue, ids, rng, tampered):
    """Run a real Worker of two threads while rows change."""
    worker = liteq.Worker(queue, threads=2).start()
    try:
        _tamper_rows(queue.path, rng.sample(ids, 50), rng, tampered)
        untouched = [i for i in ids if i not in tampered]
        wait_until(lambda: all(queue.get(i).status == "done"
                               for i in untouched),
                   what="every job no one changed to finish")
        assert all(thread.is_alive() for thread in worker._threads)
    finally:
        assert worker.stop(timeout=DEADLINE)
    assert worker.fatal is None


def test_rows_tampered_at_random_never_stop_a_thread_or_the_others(
        make_queue, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="liteq")
    rng = random.Random(20261206)
    tampered_rows = 0
    for round_no in range(24):
        queue = make_queue(f"tampered-{round_no}.db")
        register(queue, add)
        with queue.batch():
            jobs = [T.add.delay(i, i) for i in range(130)]
        ids = [job.id for job in jobs]
        tampered = set()
        _tamper_rows(queue.path, rng.sample(ids, 70), rng, tampered)
        if round_no % 4 == 3:
            _tamper_in_threads(queue, ids, rng, tampered)
        else:
            clock = Clock()
            queue._store.clock = clock
            _tamper_by_hand(queue, clock, ids, rng, tampered,
                            DEFER if round_no % 2 else {})
        untouched = [job_id for job_id in ids if job_id not in tampered]
        statuses = {job_id: queue.get(job_id).status
                    for job_id in untouched}
        assert set(statuses.values()) == {"done"}, statuses
        _tamper_listings_answer(queue, capsys, ids)
        tampered_rows += len(tampered)
        queue.close()
    assert tampered_rows >= 2000
    bugs = [r.getMessage() for r in caplog.records
            if "unexpected error" in r.getMessage()]
    assert bugs == []


#: Every column of liteq_schedules but name, and whether it is NOT NULL.
_TAMPER_SCHEDULE_COLUMNS = [
    ("call", True), ("spec", True), ("origin", True), ("next_slot", True),
    ("last_slot", False), ("last_job", False), ("skipped", True),
    ("paused", True), ("created_at", True), ("updated_at", True)]


def test_schedules_tampered_at_random_never_stop_firing_the_others(
        make_queue, caplog):
    caplog.set_level(logging.WARNING, logger="liteq")
    rng = random.Random(20261207)
    for round_no in range(6):
        queue = make_queue(f"tampered-schedules-{round_no}.db")
        register(queue, add)
        names = [f"s{i}" for i in range(30)]
        with queue.clock(start=T0):
            for i, name in enumerate(names):
                queue.schedule(name, T.add(i, i), every=60 * (1 + i % 3),
                               overlap="allow")
            tampered = set(rng.sample(names, 15))
            conn = sqlite3.connect(queue.path, isolation_level=None)
            try:
                for name in tampered:
                    column, not_null = rng.choice(_TAMPER_SCHEDULE_COLUMNS)
                    value = _tamper_value(rng)
                    if value is None and not_null:
                        value = "x"
                    sql = "CAST(? AS TEXT)" if isinstance(
                        value, _NotUtf8) else "?"
                    conn.execute(f"UPDATE liteq_schedules SET {column} = "
                                 f"{sql} WHERE name = ?", (value, name))
            finally:
                conn.close()
            counts = queue.drain(until=T0 + 3600)
            assert counts["failed"] == 0
        fired = {job.scheduled_for for job in queue.jobs(limit=100_000)
                 if job.status == "done"}
        assert fired, "the schedules no one changed fire"
        listed = queue.schedules()
        assert sorted(s["name"] for s in listed) == sorted(names)
        json.dumps(listed, allow_nan=False)
        untouched = [s for s in listed if s["name"] not in tampered]
        assert all(s["last_status"] == "done" and not s["paused"]
                   for s in untouched), untouched
        queue.close()
    bugs = [r.getMessage() for r in caplog.records
            if "unexpected error" in r.getMessage()]
    assert bugs == []


# ---------------------------------------------------------------------------
# Schedules: cron expressions and DST
# ---------------------------------------------------------------------------
# The parser and the slot calculator are pure functions of liteq's section
# 8; these tests call them through one seam, ``C`` (liteq itself), to check
# thousands of slots without a database.  test_cron_* through Queue.schedule
# and the test clock below show the same through the public API.

C = liteq
UTC = dt.timezone.utc
NY, LONDON = "America/New_York", "Europe/London"
LORD_HOWE, SANTIAGO = "Australia/Lord_Howe", "America/Santiago"
HAVANA = "America/Havana"


def cron_utc(text: str) -> float:
    """Unix time of 'YYYY-MM-DD HH:MM' read as UTC."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def cron_iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


def cron_slots(expr: str, zone: str, start: str, end: str) -> list[str]:
    """Our slots in (start, end], stepping _next_cron_slot."""
    cron, tz = C._Cron(expr), C._zone(zone)
    out, t, stop = [], cron_utc(start), cron_utc(end)
    while True:
        t = C._next_cron_slot(cron, tz, t)
        if t > stop:
            return out
        out.append(cron_iso(t))


def cron_minutes_of(expr: str) -> set[int]:
    cron = C._Cron(expr)
    return {m for m in range(60)
            if cron.matches(dt.datetime(2026, 1, 5, 0, m))}


def cron_hours_of(expr: str) -> set[int]:
    cron = C._Cron(expr)
    return {h for h in range(24)
            if cron.matches(dt.datetime(2026, 1, 5, h, 0))}


def cron_months_of(expr: str) -> set[int]:
    cron = C._Cron(expr)
    return {m for m in range(1, 13)
            if cron.matches(dt.datetime(2026, m, 1, 0, 0))}


def cron_days_of(expr: str, year: int = 2026, month: int = 3) -> set[int]:
    """Matching days of a month (March 2026 starts on a Sunday)."""
    cron = C._Cron(expr)
    last = (dt.date(year + month // 12, month % 12 + 1, 1)
            - dt.timedelta(days=1)).day
    return {d for d in range(1, last + 1)
            if cron.matches(dt.datetime(year, month, d, 0, 0))}


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("field, expected", [
    ("*", set(range(60))),
    ("7", {7}),
    ("07", {7}),
    ("10-13", {10, 11, 12, 13}),
    ("*/15", {0, 15, 30, 45}),
    ("10-30/10", {10, 20, 30}),
    ("10-31/10", {10, 20, 30}),
    ("50/3", {50, 53, 56, 59}),  # Vixie: a/s is a-max/s
    ("1,2,5-6,*/20", {0, 1, 2, 5, 6, 20, 40}),
    ("59", {59}),
    ("*/100", {0}),
    ("0-59/59", {0, 59}),
])
def test_minute_field_forms(field, expected):
    assert cron_minutes_of(f"{field} * * * *") == expected


def test_hour_field_forms():
    assert cron_hours_of("0 */6 * * *") == {0, 6, 12, 18}
    assert cron_hours_of("0 1-10/3 * * *") == {1, 4, 7, 10}
    assert cron_hours_of("0 22/1 * * *") == {22, 23}
    assert cron_hours_of("0 0,23 * * *") == {0, 23}


def test_month_names_any_case_and_in_ranges():
    assert cron_months_of("0 0 1 JAN *") == {1}
    assert cron_months_of("0 0 1 jan-Mar *") == {1, 2, 3}
    assert cron_months_of("0 0 1 feb,AUG,dec *") == {2, 8, 12}
    assert cron_months_of("0 0 1 */4 *") == {1, 5, 9}
    assert cron_months_of("0 0 1 Jun/2 *") == {6, 8, 10, 12}
    assert cron_months_of("0 0 1 1-12 *") == set(range(1, 13))


def test_weekday_names_and_seven_is_sunday():
    # March 2026: the 1st, 8th, 15th, 22nd, 29th are Sundays.
    sundays = {1, 8, 15, 22, 29}
    assert cron_days_of("0 0 * * 0") == sundays
    assert cron_days_of("0 0 * * 7") == sundays
    assert cron_days_of("0 0 * * sun") == sundays
    mon_fri = {d for d in range(1, 32) if (d - 1) % 7 not in (0, 6)}
    assert cron_days_of("0 0 * * MON-FRI") == mon_fri
    assert cron_days_of("0 0 * * 1-5") == mon_fri
    weekend = {d for d in range(1, 32) if (d - 1) % 7 in (0, 6)}
    assert cron_days_of("0 0 * * 6-7") == weekend
    assert cron_days_of("0 0 * * Sat,SUN") == weekend
    assert cron_days_of("0 0 * * 5-7") == weekend | {6, 13, 20, 27}
    assert cron_days_of("0 0 * * 0-7") == set(range(1, 32))
    assert cron_days_of("0 0 * * */2") == {d for d in range(1, 32)
                                      if (d - 1) % 7 in (0, 2, 4, 6)}


@pytest.mark.parametrize("alias, same", [
    ("@hourly", "0 * * * *"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@Daily", "0 0 * * *"),
])
def test_aliases(alias, same):
    cron, plain = C._Cron(f"  {alias} "), C._Cron(same)
    assert cron.text == alias  # kept as written, stripped
    assert cron.fixed_hour == plain.fixed_hour
    t = cron_utc("2026-01-01 00:00")
    for _ in range(5):
        a = C._next_cron_slot(cron, UTC, t)
        assert a == C._next_cron_slot(plain, UTC, t)
        t = a


def test_text_is_the_stripped_expression():
    assert C._Cron("\t*/5  *  * * *\n").text == "*/5  *  * * *"


@pytest.mark.parametrize("expr, fixed", [
    ("0 3 * * *", True),
    ("0 1,13 * * *", True),
    ("0 2-4 * * *", True),
    ("*/10 2 * * *", True),
    ("@daily", True),
    ("0 * * * *", False),
    ("0 */2 * * *", False),
    ("0 1-10/3 * * *", False),
    ("0 3/1 * * *", False),
    ("@hourly", False),
])
def test_fixed_hour(expr, fixed):
    assert C._Cron(expr).fixed_hour is fixed


def test_matches_ignores_seconds():
    cron = C._Cron("30 2 * * *")
    assert cron.matches(dt.datetime(2026, 5, 5, 2, 30, 59, 999999))
    assert not cron.matches(dt.datetime(2026, 5, 5, 2, 31))
    assert not cron.matches(dt.datetime(2026, 5, 5, 3, 30))


# ---------------------------------------------------------------------------
# The day rule
# ---------------------------------------------------------------------------
# March 2026: Fridays are the 6th, 13th, 20th and 27th.
FRIDAYS = {6, 13, 20, 27}


def test_both_day_fields_restricted_is_or():
    assert cron_days_of("0 0 13 * 5") == FRIDAYS | {13}
    assert cron_days_of("0 0 1,2 * FRI") == FRIDAYS | {1, 2}
    assert cron_days_of("0 0 31 * 0") == {1, 8, 15, 22, 29, 31}


def test_one_day_field_star_only_the_other_restricts():
    assert cron_days_of("0 0 13 * *") == {13}
    assert cron_days_of("0 0 * * 5") == FRIDAYS


def test_vixie_field_beginning_with_star_is_unrestricted():
    # dom '*/2' begins with '*': the AND rule applies, so only odd days
    # that are Fridays match (not odd days or Fridays).
    assert cron_days_of("0 0 */2 * 5") == {13, 27}
    # dow '*/2' (Sun, Tue, Thu, Sat) begins with '*': the 13th only when
    # it is one of those; March 13, 2026 is a Friday.
    assert cron_days_of("0 0 13 * */2") == set()
    assert cron_days_of("0 0 12 * */2") == {12}  # a Thursday
    # the same sets written without '*' are restricted: OR again
    assert cron_days_of("0 0 1-31/2 * 0-6/2") == ({d for d in range(1, 32, 2)}
                                             | cron_days_of("0 0 * * */2"))


def test_or_rule_slots_over_time():
    # Friday the 13th or any 13th or any Friday, in UTC.
    got = cron_slots("0 12 13 * 5", "UTC", "2026-03-01 00:00", "2026-03-31 00:00")
    assert got == ["2026-03-06 12:00", "2026-03-13 12:00",
                   "2026-03-20 12:00", "2026-03-27 12:00"]
    got = cron_slots("0 12 14 * 5", "UTC", "2026-03-01 00:00", "2026-03-16 00:00")
    assert got == ["2026-03-06 12:00", "2026-03-13 12:00",
                   "2026-03-14 12:00"]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("expr, fragments", [
    ("61 * * * *", ["'61 * * * *'", "minute field '61'",
                    "out of range 0-59"]),
    ("* 24 * * *", ["hour field '24'", "out of range 0-23"]),
    ("* * 0 * *", ["day of month field '0'", "out of range 1-31"]),
    ("* * 32 * *", ["day of month field '32'", "1-31"]),
    ("* * * 13 *", ["month field '13'", "1-12"]),
    ("* * * 0 *", ["month field '0'", "1-12"]),
    ("* * * * 8", ["day of week field '8'", "0-7"]),
    ("1,61 * * * *", ["minute field '1,61'", "'61'", "out of range"]),
    ("50-61 * * * *", ["minute field '50-61'", "61 is out of range"]),
    ("99999999999 * * * *", ["minute field", "out of range"]),
    ("0 5-2 * * *", ["hour field '5-2'", "5-2", "backwards"]),
    ("0 0 * DEC-JAN *", ["month field 'DEC-JAN'", "12-1", "backwards"]),
    ("0 0 * * SAT-SUN", ["day of week field 'SAT-SUN'", "backwards"]),
    ("*/0 * * * *", ["minute field '*/0'", "step", "at least 1"]),
    ("0 1-5/0 * * *", ["hour field '1-5/0'", "step"]),
    ("*/x * * * *", ["minute field '*/x'", "step 'x'"]),
    ("0 0 * FOO *", ["month field 'FOO'", "'FOO'", "JAN-DEC"]),
    ("0 0 * * Funday", ["day of week field 'Funday'", "SUN-SAT"]),
    ("MON * * * *", ["minute field 'MON'", "not a number"]),
    ("1,,2 * * * *", ["minute field '1,,2'", "part ''"]),
    ("1- * * * *", ["minute field '1-'"]),
    ("*-5 * * * *", ["minute field '*-5'", "'*'"]),
    ("0 0 */ * *", ["day of month field '*/'"]),
    ("0 0 * * 1/", ["day of week field '1/'"]),
    ("0 0 * * * *", ["'0 0 * * * *'", "five fields", "6"]),
    ("0 0 * *", ["five fields", "4"]),
    ("", ["five fields", "0"]),
    ("@reboot", ["'@reboot'", "@reboot"]),
    ("@fortnightly", ["unknown alias", "'@fortnightly'"]),
    ("0 0 30 2 *", ["day of month field '30'", "never occurs",
                    "February"]),
    ("0 0 31 4,6,9,11 *", ["day of month field '31'", "never occurs",
                           "April, June, September or November"]),
    ("0 0 30,31 FEB *", ["'30,31'", "February"]),
    # Vixie: a weekday field beginning with '*' is unrestricted, so the
    # AND rule applies and February 31st never comes.
    ("0 0 31 2 *,1", ["day of month field '31'", "February"]),
])
def test_errors_name_field_and_part(expr, fragments):
    with pytest.raises(ValueError) as info:
        C._Cron(expr)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("expr", [
    "0 0 29 2 *",  # leap years
    "0 0 30 2 1",  # OR rule: the Mondays of February
    "0 0 31 2 1-5",  # ditto, weekdays
    "0 0 30,31 2,3 *",  # March 30 and 31
    "0 0 31 * *",
    "0 0 */30 2 *",  # '*/30' is 1 and 31: February 1st
])
def test_rare_but_possible_expressions_are_accepted(expr):
    C._Cron(expr)


@pytest.mark.parametrize("bad", [None, 5, b"* * * * *", ["*"] * 5])
def test_non_str_expression_is_type_error(bad):
    with pytest.raises(TypeError):
        C._Cron(bad)


def test_zone():
    assert C._zone("UTC").utcoffset(dt.datetime(2026, 1, 1)) == \
        dt.timedelta(0)
    assert isinstance(C._zone(NY), zoneinfo.ZoneInfo)
    for bad in ["Mars/Olympus", "", "America", "../etc/passwd", "\0",
                "x" * 500]:
        with pytest.raises(ValueError) as info:
            C._zone(bad)
        assert str(info.value).startswith(f"unknown time zone {bad!r}: ")
    for bad in [None, 3, b"UTC"]:
        with pytest.raises(TypeError):
            C._zone(bad)


# ---------------------------------------------------------------------------
# Next cron slot: plain zones, sparse expressions
# ---------------------------------------------------------------------------


def test_next_slot_is_strictly_after():
    cron = C._Cron("*/15 * * * *")
    t = cron_utc("2026-06-01 10:15")
    assert C._next_cron_slot(cron, UTC, t) == cron_utc("2026-06-01 10:30")
    assert C._next_cron_slot(cron, UTC, t - 1e-6) == t
    assert C._next_cron_slot(cron, UTC, t - 0.5) == t
    assert C._next_cron_slot(cron, UTC, t + 1e-6) == cron_utc("2026-06-01 10:30")


def test_fixed_offset_zone_is_plain():
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    got = C._next_cron_slot(C._Cron("0 9 * * *"), india,
                            cron_utc("2026-01-01 00:00"))
    assert cron_iso(got) == "2026-01-01 03:30"  # 09:00 +05:30


@pytest.mark.parametrize("expr, after, expected", [
    # 2100 is not a leap year: from 2097 the next February 29 is in 2104.
    ("0 0 29 2 *", "2097-03-01 00:00", "2104-02-29 00:00"),
    ("0 0 29 2 *", "2026-01-01 00:00", "2028-02-29 00:00"),
    # February 29 on a Sunday (AND rule: dow begins with '*'): 2032.
    ("0 0 29 2 */7", "2026-01-01 00:00", "2032-02-29 00:00"),
    ("0 0 1 1 *", "2026-01-01 00:00", "2027-01-01 00:00"),
    ("59 23 31 12 *", "2026-01-01 00:00", "2026-12-31 23:59"),
    ("0 0 31 * *", "2026-01-31 00:00", "2026-03-31 00:00"),
    ("0 0 13 * 5", "2026-03-13 00:00", "2026-03-20 00:00"),
    ("0 0 */2 * 5", "2026-03-13 00:00", "2026-03-27 00:00"),
])
def test_sparse_expressions(expr, after, expected):
    got = C._next_cron_slot(C._Cron(expr), C._zone("UTC"), cron_utc(after))
    assert cron_iso(got) == expected


# ---------------------------------------------------------------------------
# DST tables (2026).  Each expected instant is derived by hand from the
# zone's rules; a brute-force reference below checks the same days.
# ---------------------------------------------------------------------------

DST_TABLE = [
    # New York, spring: 2026-03-08 07:00Z, 02:00 EST -> 03:00 EDT, so
    # 02:00-02:59 does not exist.  Fixed hour 2: 02:30 EST (-5) on the
    # 7th = 07:30Z; on the 8th the gap -> the transition, 07:00Z; 02:30
    # EDT (-4) on the 9th = 06:30Z.
    ("30 2 * * *", NY, "2026-03-07 00:00", "2026-03-10 00:00",
     ["2026-03-07 07:30", "2026-03-08 07:00", "2026-03-09 06:30"]),
    # Wildcard hour: 00:30, 01:30 EST (05:30Z, 06:30Z), no 02:30, then
    # 03:30, 04:30 EDT (07:30Z, 08:30Z).
    ("30 * * * *", NY, "2026-03-08 05:00", "2026-03-08 09:00",
     ["2026-03-08 05:30", "2026-03-08 06:30", "2026-03-08 07:30",
      "2026-03-08 08:30"]),
    # Every 30 real minutes: 01:30 EST = 06:30Z, then 03:00 EDT = 07:00Z.
    ("*/30 * * * *", NY, "2026-03-08 05:00", "2026-03-08 08:00",
     ["2026-03-08 05:30", "2026-03-08 06:00", "2026-03-08 06:30",
      "2026-03-08 07:00", "2026-03-08 07:30", "2026-03-08 08:00"]),
    # New York, autumn: 2026-11-01 06:00Z, 02:00 EDT -> 01:00 EST, so
    # 01:00-01:59 comes twice.  Fixed hour 1: 01:30 EDT (-4) on Oct 31 =
    # 05:30Z; on Nov 1 once, at the first 01:30 (EDT) = 05:30Z; 01:30 EST
    # (-5) on Nov 2 = 06:30Z.
    ("30 1 * * *", NY, "2026-10-31 00:00", "2026-11-03 00:00",
     ["2026-10-31 05:30", "2026-11-01 05:30", "2026-11-02 06:30"]),
    # 02:30 is not repeated: EDT 06:30Z on Oct 31, EST 07:30Z after.
    ("30 2 * * *", NY, "2026-10-31 00:00", "2026-11-03 00:00",
     ["2026-10-31 06:30", "2026-11-01 07:30", "2026-11-02 07:30"]),
    # Wildcard: 00:30 EDT 04:30Z, 01:30 EDT 05:30Z, 01:30 EST 06:30Z,
    # 02:30 EST 07:30Z: twice in the repeated hour.
    ("30 * * * *", NY, "2026-11-01 04:00", "2026-11-01 08:00",
     ["2026-11-01 04:30", "2026-11-01 05:30", "2026-11-01 06:30",
      "2026-11-01 07:30"]),
    ("*/30 * * * *", NY, "2026-11-01 04:45", "2026-11-01 07:15",
     ["2026-11-01 05:00", "2026-11-01 05:30", "2026-11-01 06:00",
      "2026-11-01 06:30", "2026-11-01 07:00"]),
    # London, spring: 2026-03-29 01:00Z, 01:00 GMT -> 02:00 BST (gap
    # 01:00-01:59).  Fixed hour 1: 01:30 GMT on the 28th = 01:30Z; the
    # gap on the 29th -> 01:00Z; 01:30 BST on the 30th = 00:30Z.
    ("30 1 * * *", LONDON, "2026-03-28 00:00", "2026-03-31 00:00",
     ["2026-03-28 01:30", "2026-03-29 01:00", "2026-03-30 00:30"]),
    # 02:30 exists in London on the 29th (BST): 01:30Z.
    ("30 2 * * *", LONDON, "2026-03-28 00:00", "2026-03-31 00:00",
     ["2026-03-28 02:30", "2026-03-29 01:30", "2026-03-30 01:30"]),
    # Wildcard: 23:30 and 00:30 GMT, no 01:30, 02:30 BST = 01:30Z.
    ("30 * * * *", LONDON, "2026-03-28 23:00", "2026-03-29 03:00",
     ["2026-03-28 23:30", "2026-03-29 00:30", "2026-03-29 01:30",
      "2026-03-29 02:30"]),
    ("*/30 * * * *", LONDON, "2026-03-29 00:00", "2026-03-29 02:00",
     ["2026-03-29 00:30", "2026-03-29 01:00", "2026-03-29 01:30",
      "2026-03-29 02:00"]),
    # London, autumn: 2026-10-25 01:00Z, 02:00 BST -> 01:00 GMT (01:00-
    # 01:59 twice).  Fixed hour 1: 01:30 BST on the 24th = 00:30Z; on the
    # 25th the first 01:30 (BST) = 00:30Z; 01:30 GMT on the 26th.
    ("30 1 * * *", LONDON, "2026-10-24 00:00", "2026-10-27 00:00",
     ["2026-10-24 00:30", "2026-10-25 00:30", "2026-10-26 01:30"]),
    ("30 2 * * *", LONDON, "2026-10-24 00:00", "2026-10-27 00:00",
     ["2026-10-24 01:30", "2026-10-25 02:30", "2026-10-26 02:30"]),
    # Wildcard: 00:30 BST 23:30Z, 01:30 BST 00:30Z, 01:30 GMT 01:30Z,
    # 02:30 GMT 02:30Z.
    ("30 * * * *", LONDON, "2026-10-24 23:00", "2026-10-25 03:00",
     ["2026-10-24 23:30", "2026-10-25 00:30", "2026-10-25 01:30",
      "2026-10-25 02:30"]),
    # Lord Howe, spring: 2026-10-03 15:30Z, 02:00 +10:30 -> 02:30 +11
    # (gap 02:00-02:29 on Oct 4).  Fixed hour 2: 02:15 +10:30 on Oct 3 =
    # Oct 2 15:45Z; the gap on Oct 4 -> 15:30Z; 02:15 +11 on Oct 5 = Oct 4
    # 15:15Z.
    ("15 2 * * *", LORD_HOWE, "2026-10-02 00:00", "2026-10-05 00:00",
     ["2026-10-02 15:45", "2026-10-03 15:30", "2026-10-04 15:15"]),
    # Hour field 2 is fixed: 02:00, 02:10, 02:20 fall in the gap and fire
    # at the transition, 15:30Z, which is also 02:30 +11: one slot; then
    # 02:40 and 02:50 +11.  Oct 5: 02:00 +11 = Oct 4 15:00Z.
    ("*/10 2 * * *", LORD_HOWE, "2026-10-03 12:00", "2026-10-04 15:10",
     ["2026-10-03 15:30", "2026-10-03 15:40", "2026-10-03 15:50",
      "2026-10-04 15:00", "2026-10-04 15:10"]),
    # Wildcard: 01:30 +10:30 = 15:00Z, no 02:00, 02:30 +11 = 15:30Z.
    ("*/30 * * * *", LORD_HOWE, "2026-10-03 14:45", "2026-10-03 16:30",
     ["2026-10-03 15:00", "2026-10-03 15:30", "2026-10-03 16:00",
      "2026-10-03 16:30"]),
    # 01:30 (15:00Z) and 02:30 (15:30Z) are 30 real minutes apart.
    ("30 * * * *", LORD_HOWE, "2026-10-03 14:00", "2026-10-03 17:00",
     ["2026-10-03 15:00", "2026-10-03 15:30", "2026-10-03 16:30"]),
    # Lord Howe, autumn: 2026-04-04 15:00Z, 02:00 +11 -> 01:30 +10:30
    # (01:30-01:59 twice on Apr 5).  02:15 is not repeated: 02:15 +11 on
    # Apr 4 = Apr 3 15:15Z, +10:30 after = 15:45Z.
    ("15 2 * * *", LORD_HOWE, "2026-04-03 00:00", "2026-04-06 00:00",
     ["2026-04-03 15:15", "2026-04-04 15:45", "2026-04-05 15:45"]),
    # 01:45 is repeated on Apr 5: once, the first (+11) = Apr 4 14:45Z.
    ("45 1 * * *", LORD_HOWE, "2026-04-03 00:00", "2026-04-06 00:00",
     ["2026-04-03 14:45", "2026-04-04 14:45", "2026-04-05 15:15"]),
    # Fixed hour 1: 01:00..01:50 +11 = 14:00Z..14:50Z, each once.
    ("*/10 1 * * *", LORD_HOWE, "2026-04-04 12:00", "2026-04-04 16:00",
     ["2026-04-04 14:00", "2026-04-04 14:10", "2026-04-04 14:20",
      "2026-04-04 14:30", "2026-04-04 14:40", "2026-04-04 14:50"]),
    # Fixed hour 2 (not repeated): 02:00..02:50 +10:30 = 15:30Z..16:20Z.
    ("*/10 2 * * *", LORD_HOWE, "2026-04-04 12:00", "2026-04-04 17:00",
     ["2026-04-04 15:30", "2026-04-04 15:40", "2026-04-04 15:50",
      "2026-04-04 16:00", "2026-04-04 16:10", "2026-04-04 16:20"]),
    # Wildcard: 01:00 +11 14:00Z, 01:30 +11 14:30Z, 01:30 +10:30 15:00Z,
    # 02:00 +10:30 15:30Z: every 30 real minutes.
    ("*/30 * * * *", LORD_HOWE, "2026-04-04 13:45", "2026-04-04 15:45",
     ["2026-04-04 14:00", "2026-04-04 14:30", "2026-04-04 15:00",
      "2026-04-04 15:30"]),
    ("30 * * * *", LORD_HOWE, "2026-04-04 13:00", "2026-04-04 16:30",
     ["2026-04-04 13:30", "2026-04-04 14:30", "2026-04-04 15:00",
      "2026-04-04 16:00"]),
    # Santiago changes at midnight.  Spring: 2026-09-06 04:00Z, 00:00 -04
    # -> 01:00 -03, so 00:00-00:59 on Sep 6 does not exist.  Midnight:
    # Sep 5 00:00 -04 = 04:00Z; Sep 6 in the gap -> the transition,
    # 04:00Z (01:00 -03); Sep 7 00:00 -03 = 03:00Z.
    ("0 0 * * *", SANTIAGO, "2026-09-05 00:00", "2026-09-08 00:00",
     ["2026-09-05 04:00", "2026-09-06 04:00", "2026-09-07 03:00"]),
    # 23:30 -04 on Sep 4 and 5 = 03:30Z the next day; 23:30 -03 on Sep 6
    # = Sep 7 02:30Z.
    ("30 23 * * *", SANTIAGO, "2026-09-05 00:00", "2026-09-08 00:00",
     ["2026-09-05 03:30", "2026-09-06 03:30", "2026-09-07 02:30"]),
    # Wildcard: 22:30 and 23:30 -04, no 00:30, 01:30 -03 = 04:30Z.
    ("30 * * * *", SANTIAGO, "2026-09-06 02:00", "2026-09-06 06:00",
     ["2026-09-06 02:30", "2026-09-06 03:30", "2026-09-06 04:30",
      "2026-09-06 05:30"]),
    ("*/30 * * * *", SANTIAGO, "2026-09-06 03:00", "2026-09-06 05:00",
     ["2026-09-06 03:30", "2026-09-06 04:00", "2026-09-06 04:30",
      "2026-09-06 05:00"]),
    # Autumn: 2026-04-05 03:00Z, 00:00 -03 -> 23:00 -04 on Apr 4, so
    # 23:00-23:59 on Apr 4 comes twice.  Midnight: Apr 4 00:00 -03 =
    # 03:00Z; Apr 5 00:00 -04 = 04:00Z.
    ("0 0 * * *", SANTIAGO, "2026-04-04 00:00", "2026-04-07 00:00",
     ["2026-04-04 03:00", "2026-04-05 04:00", "2026-04-06 04:00"]),
    # 23:30 -03 on Apr 2 and 3 = 02:30Z the next day; on Apr 4 once, the
    # first (-03) = Apr 5 02:30Z; 23:30 -04 on Apr 5 = Apr 6 03:30Z.
    ("30 23 * * *", SANTIAGO, "2026-04-03 00:00", "2026-04-07 00:00",
     ["2026-04-03 02:30", "2026-04-04 02:30", "2026-04-05 02:30",
      "2026-04-06 03:30"]),
    # Wildcard: 22:30 -03 01:30Z, 23:30 -03 02:30Z, 23:30 -04 03:30Z,
    # 00:30 -04 (Apr 5) 04:30Z.
    ("30 * * * *", SANTIAGO, "2026-04-05 01:00", "2026-04-05 05:00",
     ["2026-04-05 01:30", "2026-04-05 02:30", "2026-04-05 03:30",
      "2026-04-05 04:30"]),
]


@pytest.mark.parametrize("expr, zone, start, end, expected", DST_TABLE)
def test_dst_table(expr, zone, start, end, expected):
    assert cron_slots(expr, zone, start, end) == expected


# The brute-force reference: scan real minutes.  Wildcard hour: the
# instants whose wall time matches.  Fixed hour: for each matching wall
# time w, the first instant whose wall time reaches w (its first
# occurrence, or for a time in a gap the end of the gap).


def cron_brute(expr: str, zone: str, start: str, end: str) -> list[str]:
    cron, tz = C._Cron(expr), zoneinfo.ZoneInfo(zone)
    t0, t1 = int(cron_utc(start)), int(cron_utc(end))
    found = set()
    reached = None
    for t in range(t0 - 86400, t1 + 1, 60):
        wall = dt.datetime.fromtimestamp(t, tz).replace(tzinfo=None)
        if not cron.fixed_hour:
            if cron.matches(wall):
                found.add(t)
            continue
        if reached is None:
            reached = wall
        while reached < wall:
            reached += dt.timedelta(minutes=1)
            if cron.matches(reached):
                found.add(t)
    return [cron_iso(t) for t in sorted(found) if t0 < t <= t1]


CHANGE_DAYS = [
    (NY, "2026-03-07 00:00", "2026-03-10 00:00"),
    (NY, "2026-10-31 00:00", "2026-11-03 00:00"),
    (LONDON, "2026-03-28 00:00", "2026-03-31 00:00"),
    (LONDON, "2026-10-24 00:00", "2026-10-27 00:00"),
    (LORD_HOWE, "2026-10-02 00:00", "2026-10-05 00:00"),
    (LORD_HOWE, "2026-04-03 00:00", "2026-04-06 00:00"),
    (SANTIAGO, "2026-09-05 00:00", "2026-09-08 00:00"),
    (SANTIAGO, "2026-04-03 00:00", "2026-04-06 00:00"),
    (HAVANA, "2026-03-07 00:00", "2026-03-10 00:00"),
    (HAVANA, "2026-10-31 00:00", "2026-11-03 00:00"),
]
BRUTE_EXPRS = ["30 2 * * *", "30 1 * * *", "0 0 * * *", "30 23 * * *",
               "*/30 * * * *", "30 * * * *", "*/10 2 * * *",
               "0,30 1-3 * * *", "*/7 */2 * * *", "15 0-2/1 * * *"]


@pytest.mark.parametrize("zone, start, end", CHANGE_DAYS)
def test_against_brute_force(zone, start, end):
    for expr in BRUTE_EXPRS:
        assert cron_slots(expr, zone, start, end) == \
            cron_brute(expr, zone, start, end), expr


def test_brute_force_reference_agrees_with_the_table():
    for expr, zone, start, end, expected in DST_TABLE:
        assert cron_brute(expr, zone, start, end) == expected, (expr, zone)


def test_every_minute_across_changes_is_every_real_minute():
    cron = C._Cron("* * * * *")
    for zone, start, _ in CHANGE_DAYS:  # the middle day: the change
        tz, t = C._zone(zone), cron_utc(start) + 86400
        while t < cron_utc(start) + 2 * 86400:
            nxt = C._next_cron_slot(cron, tz, t)
            assert nxt == t + 60, (zone, cron_iso(t))
            t = nxt


# ---------------------------------------------------------------------------
# Every-N-seconds slots
# ---------------------------------------------------------------------------


def test_every_slots_align_to_the_epoch():
    assert C._next_every_slot(60, 119.5) == 120
    assert C._next_every_slot(60, 120) == 180  # strictly after
    assert C._next_every_slot(60, -1) == 0
    assert C._next_every_slot(3600, cron_utc("2026-05-05 10:59")) == \
        cron_utc("2026-05-05 11:00")
    assert C._next_every_slot(86400, cron_utc("2026-05-05 00:00")) == \
        cron_utc("2026-05-06 00:00")
    assert C._next_every_slot(7, 0) == 7


@pytest.mark.parametrize("every", [0.1, 0.2, 0.3, 1 / 3, 0.7, 2.5, 7.0,
                                   86400.0, 1e-3])
def test_every_slots_are_float_safe(every):
    rng = random.Random(every)
    base = cron_utc("2026-05-05 10:00")
    for _ in range(2000):
        k = int(base / every) + rng.randrange(-1000, 1000)
        for after in (k * every, k * every + every / 2,
                      math.nextafter(k * every, -math.inf),
                      math.nextafter(k * every, math.inf)):
            s = C._next_every_slot(every, after)
            assert s > after
            n = round(s / every)
            assert s == n * every
            assert (n - 1) * every <= after
    # an exact slot leads to the next one
    assert C._next_every_slot(0.1, 3 * 0.1) == 4 * 0.1


@pytest.mark.parametrize("every", [0, -1, math.inf, math.nan])
def test_every_must_be_positive(every):
    with pytest.raises(ValueError):
        C._next_every_slot(every, 100.0)


# ---------------------------------------------------------------------------
# Slots between two times (catch-up)
# ---------------------------------------------------------------------------


def test_slots_between_every_small_range():
    step = functools.partial(C._next_every_slot, 10.0)
    assert C._slots_between(step, 0, 55, 10) == ([10, 20, 30, 40, 50], 0)
    assert C._slots_between(step, 0, 50, 2) == ([40, 50], 3)
    assert C._slots_between(step, 10, 10, 5) == ([], 0)
    assert C._slots_between(step, 20, 10, 5) == ([], 0)
    assert C._slots_between(step, 0, 55, 0) == ([], 5)
    # a plain callable with every= given, and without (stepping)
    call = lambda after: C._next_every_slot(10.0, after)  # noqa: E731
    assert C._slots_between(call, 0, 50, 2, every=10.0) == ([40, 50], 3)
    assert C._slots_between(call, 0, 50, 2) == ([40, 50], 3)
    with pytest.raises(ValueError):
        C._slots_between(step, 0, 50, -1)


def test_slots_between_every_matches_stepping():
    rng = random.Random(7)
    for every in (0.1, 0.3, 1 / 3, 2.5, 60.0):
        for _ in range(50):
            start = cron_utc("2026-01-01 00:00") + rng.uniform(0, 1000)
            end = start + rng.uniform(-5, 200) * every
            limit = rng.randrange(0, 30)
            call = functools.partial(C._next_every_slot, every)
            stepped = C._slots_collect(call, start, end)
            got = C._slots_between(call, start, end, limit)
            kept = stepped[max(0, len(stepped) - limit):] if limit else []
            assert got == (kept, len(stepped) - len(kept))


def test_slots_between_every_huge_range():
    # 10**12 slots of a millisecond: counted, not stepped.
    step = functools.partial(C._next_every_slot, 0.001)
    got, skipped = C._slots_between(step, 0.0, 1e9, 3)
    assert got == [(10 ** 12 - 2) * 0.001, (10 ** 12 - 1) * 0.001, 1e9]
    assert skipped == 10 ** 12 - 3
    got, skipped = C._slots_between(step, 0.0, 1e9, 0)
    assert (got, skipped) == ([], 10 ** 12)
    start = cron_utc("2026-01-01 00:00")
    got, skipped = C._slots_between(lambda a: a + 1, start, start + 3e7, 2,
                                    every=0.01)
    assert len(got) == 2 and skipped == 3 * 10 ** 9 - 2


def cron_step(expr: str, zone: str):
    return functools.partial(C._next_cron_slot, C._Cron(expr),
                             C._zone(zone))


def test_slots_between_cron_huge_range():
    # Every minute over three years: about 1.6 million slots.  Wildcard:
    # every real minute, whatever the clock changes.
    start, end = cron_utc("2025-01-01 00:00"), cron_utc("2028-01-01 00:00")
    got, skipped = C._slots_between(cron_step("* * * * *", NY), start, end,
                                    3)
    assert got == [end - 120, end - 60, end]
    assert skipped == (end - start) / 60 - 3
    # Fixed hour: once every local day, gap and repeated days included.
    got, skipped = C._slots_between(cron_step("30 2 * * *", NY), start, end,
                                    2)
    assert [cron_iso(s) for s in got] == ["2027-12-30 07:30", "2027-12-31 07:30"]
    assert skipped == 365 * 3 - 2
    # Ten years of every five minutes in UTC.
    start, end = cron_utc("2020-01-01 00:00"), cron_utc("2030-01-01 00:00")
    got, skipped = C._slots_between(cron_step("*/5 * * * *", "UTC"), start,
                                    end, 1)
    assert got == [end]
    assert skipped == (end - start) / 300 - 1


@pytest.mark.parametrize("zone, start, end", CHANGE_DAYS)
def test_slots_between_cron_counts_match_stepping(zone, start, end):
    rng = random.Random(zone + start)
    t0, t1 = cron_utc(start), cron_utc(end)
    for expr in BRUTE_EXPRS + ["* * * * *", "*/10 1-3 * * *"]:
        call = cron_step(expr, zone)
        for lo, hi in [(t0, t1), (t0 + 0.5, t1 - 30.25),
                       (t0 + rng.uniform(0, 86400), t1)]:
            stepped = C._slots_collect(call, lo, hi)
            count = C._count_cron_slots(call.args[0], call.args[1], lo, hi)
            assert count == len(stepped), (expr, cron_iso(lo), cron_iso(hi))
            got = C._slots_between(call, lo, hi, 4)
            assert got == (stepped[-4:], len(stepped) - len(stepped[-4:]))


def test_slots_between_cron_sparse_tail():
    # Few slots in a long range: the tail search widens its window.
    call = cron_step("0 0 29 2 *", "UTC")
    start, end = cron_utc("2000-01-01 00:00"), cron_utc("2030-01-01 00:00")
    got, skipped = C._slots_between(call, start, end, 2)
    assert [cron_iso(s) for s in got] == ["2024-02-29 00:00", "2028-02-29 00:00"]
    assert skipped == 6  # 2000, 2004, ..., 2020
    got, skipped = C._slots_between(call, start, end, 100)
    assert len(got) == 8 and skipped == 0


@pytest.mark.parametrize("zone, start, end", CHANGE_DAYS)
def test_a_cron_schedule_fires_across_a_clock_change_as_the_rules_say(
        q, zone, start, end):
    exprs = ["30 2 * * *", "30 1 * * *", "0 0 * * *", "*/30 * * * *",
             "30 * * * *"]
    with q.clock(start=cron_utc(start)):
        for i, expr in enumerate(exprs):  # add(i, 0) tells them apart
            q.schedule(expr, T.add(i, 0), cron=expr, tz=zone,
                       overlap="allow")
        q.drain(until=cron_utc(end))
    jobs = q.jobs(limit=10_000)
    for i, expr in enumerate(exprs):
        fired = sorted(cron_iso(job.scheduled_for.timestamp())
                       for job in jobs if job.result() == i)
        assert fired == cron_brute(expr, zone, start, end), (expr, zone)
