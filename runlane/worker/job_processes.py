"""``@app.job(executor="process")``: sync jobs run in job processes of their own.

A CPU-bound sync job on a worker thread competes for the worker's GIL with the heartbeat, the claim loop and
the SQLite writer; with dozens of such threads a renewal waits seconds for its turn and leases expire under
healthy attempts (RELIABILITY.md, T06). In a job process the job has a GIL of its own: the worker stays as
responsive as if it ran nothing. A crash of the job's process (a segfault, ``os._exit``) fails that attempt
only, and a job that ignores a cancellation is terminated after a grace period instead of running on.

The pool is pebble's (it replaces a dead process without breaking the others' tasks). Children are started
by ``forkserver`` (``spawn`` off Linux), never ``fork``: the worker holds threads whose locks fork would copy.
A child imports the job's module and calls the function found there; its context relays progress, logs and
outputs to the worker in batches, and sees cancellation through a flag in shared memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import multiprocessing
import os
import pickle
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from typing import TYPE_CHECKING, Any

from runlane.context import InputStream, JobContext
from runlane.errors import JobProcessDied, JobProcessError, RunlaneError
from runlane.models import ErrorInfo
from runlane.serialization import NotSerializable, to_jsonable
from runlane.worker.heartbeat import fence_age

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import SynchronizedArray

    from pebble import ProcessPool

    from runlane.app import Runlane
    from runlane.jobs import Job
    from runlane.models import Run

log = logging.getLogger("runlane.worker")

STOP_GRACE = 2.0  # seconds a cancelled process job has to stop on its own before its process is terminated
_RELAY_WAIT = 10.0  # at most this long for a finished attempt's last events to arrive
_DIED_GRACE = 2.0  # after a job process's connection ends mid-attempt, pebble has this long to report it
_FLUSH_EVERY = 0.2  # a child sends its attempts' events this often (and at each attempt's end)
_WATCH_EVERY = 0.05  # a child checks its attempt's lease and its worker this often
# Exit codes of a job process that ended itself: its attempt's lease went unrenewed (the worker is stopped or
# cut off), or its worker is gone.
_EXIT_FENCED = 70
_EXIT_ORPHANED = 71


def job_reference(func: Any) -> tuple[str, str]:
    """Where a job process finds the function: its module and qualified name (module level only)."""
    module, qualname = func.__module__, func.__qualname__
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"job {qualname!r} uses executor='process' but is not defined at module level: a job process "
            "imports its module to find it"
        )
    return module, qualname


# -- the worker's side -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Relay:
    """Events arriving from a child for one attempt, and how many batches arrived."""

    ctx: JobContext
    batches: int = 0
    arrived: threading.Condition = field(default_factory=threading.Condition)
    on_died: Callable[[], None] | None = None  # its job process ended while it ran (see _relay_loop)


class JobProcesses:
    """The job processes of one worker, started on the first process job."""

    def __init__(
        self,
        app: Runlane,
        *,
        processes: int,
        flags: int,
        nice: int,
        lease_timeout: float,
        renewed_at: Callable[[int], float | None],
    ) -> None:
        self._app = app
        self._lease_timeout = lease_timeout
        self._renewed_at = renewed_at
        self._size = processes
        self._slots = flags
        self._nice = nice
        self._context = multiprocessing.get_context(
            "forkserver" if sys.platform.startswith("linux") else "spawn"
        )
        self._pool: ProcessPool | None = None
        # Each job process connects to this listener and sends (run_id, attempt, [(kind, data), ...]) on a
        # connection of its own: a process terminated mid-send breaks only its own connection (a queue
        # shared by all would stay locked by it for good).
        self._listener: Listener | None = None
        self._flags: SynchronizedArray[Any] | None = None
        self._renewed: SynchronizedArray[Any] | None = None  # per flag: last lease renewal (monotonic)
        self._flag_of: dict[int, int] = {}  # run id -> flag of its attempt in flight
        self._free_flags: list[int] = []
        self._relays: dict[tuple[int, int], _Relay] = {}
        self._lock = threading.Lock()
        self._relay_thread: threading.Thread | None = None

    def _start(self) -> None:
        from pebble import ProcessPool  # imported by workers that run process jobs only

        modules = sorted(
            {job.func.__module__ for job in self._app.jobs.values() if job.options.executor == "process"}
        )
        if isinstance(self._context, multiprocessing.context.ForkServerContext):
            # Children fork from a server that imported these once: dozens of them start in moments.
            self._context.set_forkserver_preload(["runlane", *modules])
        # A cancellation flag per task in flight: the worker's concurrency, plus cancelled tasks whose
        # process has not stopped yet (their slot in the worker is free again during the grace period).
        self._flags = self._context.Array("b", self._slots, lock=False)
        self._renewed = self._context.Array("d", self._slots, lock=False)
        self._free_flags = list(range(self._slots))
        authkey = secrets.token_bytes(16)
        self._listener = Listener(authkey=authkey, backlog=self._size)
        self._pool = ProcessPool(
            max_workers=self._size,
            initializer=_child_init,
            initargs=(
                modules,
                self._app.url,
                self._nice,
                self._listener.address,
                authkey,
                self._flags,
                self._renewed,
                fence_age(self._lease_timeout),
                os.getpid(),
                self._app.settings.progress_flush_interval,
            ),
            context=self._context,
        )
        self._relay_thread = threading.Thread(
            target=self._accept_loop, args=(self._listener,), name="runlane-job-process-relay", daemon=True
        )
        self._relay_thread.start()

    def submit(self, job: Job[Any, Any], ctx: JobContext) -> asyncio.Future[Any]:
        """Start ``ctx``'s attempt in a job process; the future resolves to the job's (JSON) result."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._pool is None:
                self._start()
            assert self._pool is not None and self._flags is not None and self._renewed is not None
            if not self._free_flags:
                raise RunlaneError(f"{self._slots} process job attempts in flight: no cancellation flag left")
            flag = self._free_flags.pop()
            self._flags[flag] = 0
            self._renewed[flag] = self._renewed_at(ctx.run_id) or 0.0  # none: lost already, fence at once
            self._flag_of[ctx.run_id] = flag
            key = (ctx.run_id, ctx.attempt)
            relay = self._relays[key] = _Relay(ctx)
        module, qualname = job_reference(job.func)
        done: asyncio.Future[Any] = loop.create_future()
        task = self._pool.schedule(_child_run, args=(module, qualname, job.name, ctx.run, flag))
        hard_stop: list[asyncio.TimerHandle] = []

        def cancel() -> None:  # ctx._cancel(): the run was cancelled, its lease lost, or it timed out
            assert self._flags is not None
            self._flags[flag] = 1

        def on_done_in_loop(outcome: tuple[str, Any, Any, int] | BaseException) -> None:
            for handle in hard_stop:
                handle.cancel()
            if done.done():
                return
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
                return
            status, value, error, _ = outcome
            if status == "ok":
                done.set_result(value)
            else:
                done.set_exception(_ChildError(value, error))

        def on_task_done(future: concurrent.futures.Future[Any]) -> None:  # on pebble's thread
            from pebble import ProcessExpired

            outcome: tuple[str, Any, Any, int] | BaseException
            try:
                outcome = future.result()
            except concurrent.futures.CancelledError:
                stopped = JobProcessDied(
                    f"run {ctx.run_id}: job process terminated after the attempt was cancelled"
                )
                outcome = stopped
            except ProcessExpired as exc:
                outcome = JobProcessDied(
                    f"the job process running run {ctx.run_id} died (exit code {exc.exitcode})"
                )
            except BaseException as exc:  # pebble could not run it (a broken pool, an unpicklable argument)
                outcome = exc
            if not isinstance(outcome, BaseException):
                self._await_batches(relay, outcome[3])
            with self._lock:
                self._relays.pop(key, None)
                if self._flag_of.get(ctx.run_id) == flag:
                    del self._flag_of[ctx.run_id]
                self._free_flags.append(flag)
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_done_in_loop, outcome)

        def died() -> None:  # on a relay thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(loop.call_later, _DIED_GRACE, lost)

        def lost() -> None:
            # pebble loses a task whose process dies before pebble has read the process's acknowledgement of
            # it (its check of dead processes then finds no task to fail): the attempt would wait forever.
            if task.done() or done.done():
                return
            on_done_in_loop(JobProcessDied(f"the job process running run {ctx.run_id} died"))
            task.cancel()  # type: ignore[no-untyped-call]  # pebble's bookkeeping; frees the flag (on_task_done)

        relay.on_died = died

        def on_cancelled(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() or task.done():
                return
            cancel()
            if task.running():  # give the job STOP_GRACE to notice ctx.cancelled, then end its process
                hard_stop.append(loop.call_later(STOP_GRACE, task.cancel))
            else:
                task.cancel()  # type: ignore[no-untyped-call]  # still queued for a job process: it never starts

        ctx._on_cancel(cancel)
        done.add_done_callback(on_cancelled)
        task.add_done_callback(on_task_done)
        return done

    def renewed(self, run_ids: set[int], at: float) -> None:
        """The heartbeat renewed these leases at ``at`` (monotonic): their job processes may go on."""
        with self._lock:
            if self._renewed is None:
                return
            for run_id in run_ids:
                flag = self._flag_of.get(run_id)
                if flag is not None:
                    self._renewed[flag] = at

    def _await_batches(self, relay: _Relay, sent: int) -> None:
        with relay.arrived:
            if not relay.arrived.wait_for(lambda: relay.batches >= sent, timeout=_RELAY_WAIT):
                log.warning(
                    "run %s: %d event batches of its job process did not arrive",
                    relay.ctx.run_id,
                    sent - relay.batches,
                )

    def _accept_loop(self, listener: Listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):
                return  # closed: the worker is stopping
            except Exception as exc:  # a connection that failed authentication: not one of ours
                log.warning("job process relay refused a connection: %s", exc)
                continue
            threading.Thread(
                target=self._relay_loop, args=(conn,), name="runlane-job-process-relay", daemon=True
            ).start()

    def _relay_loop(self, conn: Connection) -> None:
        running: tuple[int, int] | None = None  # the attempt this job process said it started last
        with conn:
            while True:
                try:
                    run_id, attempt, events = conn.recv()
                except (EOFError, OSError):  # the job process ended (or was terminated mid-send)
                    with self._lock:
                        relay = self._relays.get(running) if running is not None else None
                    if relay is not None and relay.on_died is not None:
                        relay.on_died()  # it ended with that attempt still in flight
                    return
                if events is None:
                    running = (run_id, attempt)
                    continue
                with self._lock:
                    relay = self._relays.get((run_id, attempt))
                if relay is None:
                    continue  # the attempt already ended (its process outlived a cancellation)
                for kind, data in events:
                    relay.ctx._emit(kind, data)
                with relay.arrived:
                    relay.batches += 1
                    relay.arrived.notify_all()

    def close(self) -> None:
        """Terminate the job processes (the worker has drained or given up on what they ran)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.stop()  # type: ignore[no-untyped-call]
        pool.join(timeout=10)
        if self._listener is not None:
            self._listener.close()  # ends the accept loop; relays end with their processes


class _ChildError(Exception):
    """A job's exception as it came back from its process (the original when it could be pickled)."""

    def __init__(self, exc: BaseException | None, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.exc = exc
        self.error = error


def unwrap(exc: BaseException) -> tuple[BaseException, ErrorInfo | None]:
    """The exception a process job raised and the error to record (with the child's traceback)."""
    if isinstance(exc, _ChildError):
        original = exc.exc if exc.exc is not None else JobProcessError(exc.error.type, exc.error.message)
        return original, exc.error
    return exc, None


# -- the child's side --------------------------------------------------------------------------------------------

_child: _ChildState | None = None


@dataclass
class _ChildState:
    url: str
    events: Connection
    flags: Any
    renewed: Any
    fence_after: float  # the heartbeat's rule: stop an attempt this long after its last renewal was sent
    worker_pid: int
    flush_every: float
    current: int | None = None  # the flag of the attempt running here
    pending: dict[tuple[int, int], list[tuple[str, Any]]] = field(default_factory=dict)
    sent: dict[tuple[int, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: tuple[int, int], kind: str, data: Any) -> None:
        with self.lock:
            items = self.pending.setdefault(key, [])
            if kind == "progress" and items and items[-1][0] == "progress":
                items[-1] = (kind, data)  # only the newest percentage matters
            else:
                items.append((kind, data))

    def flush(self, key: tuple[int, int] | None = None) -> None:
        with self.lock:
            keys = [key] if key is not None else list(self.pending)
            for k in keys:
                items = self.pending.pop(k, None)
                if items:
                    self.events.send((k[0], k[1], items))
                    self.sent[k] = self.sent.get(k, 0) + 1

    def started(self, key: tuple[int, int]) -> None:
        """Tell the worker which attempt runs here (it fails the attempt should this process die unnoticed)."""
        with self.lock:
            self.events.send((key[0], key[1], None))

    def flush_forever(self) -> None:
        while True:
            time.sleep(self.flush_every)
            self.flush()

    def watch_lease(self) -> None:
        """The heartbeat's self-fencing rule, applied here so that it holds while the worker cannot act (it
        is SIGSTOPped, starved, or dead): an attempt whose lease went unrenewed for the heartbeat's fence age
        may be running elsewhere already, so it is cancelled, and its process ends if it does not stop."""
        fenced_at: float | None = None
        while True:
            time.sleep(_WATCH_EVERY)
            if not _alive(self.worker_pid):
                os._exit(_EXIT_ORPHANED)
            flag = self.current
            if flag is None:
                fenced_at = None
                continue
            now = time.monotonic()
            if now - self.renewed[flag] < self.fence_after:
                fenced_at = None
                continue
            self.flags[flag] = 1
            if fenced_at is None:
                fenced_at = now
            elif now - fenced_at >= STOP_GRACE:
                os._exit(_EXIT_FENCED)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _child_init(
    modules: list[str],
    url: str,
    nice: int,
    address: Any,
    authkey: bytes,
    flags: Any,
    renewed: Any,
    fence_after: float,
    worker_pid: int,
    flush_every: float,
) -> None:  # pragma: no cover - runs in the job process
    global _child
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass
    for module in modules:
        importlib.import_module(module)  # surfaces an import error at start, and makes first tasks fast
    events = Client(address, authkey=authkey)
    _child = _ChildState(url, events, flags, renewed, fence_after, worker_pid, min(flush_every, _FLUSH_EVERY))
    threading.Thread(target=_child.flush_forever, name="runlane-event-relay", daemon=True).start()
    threading.Thread(target=_child.watch_lease, name="runlane-lease-watch", daemon=True).start()


class ProcessJobContext(JobContext):
    """The context of a job in a job process: reports travel to the worker, cancellation comes from it."""

    def __init__(self, app: Runlane, run: Run, state: _ChildState, flag: int) -> None:
        super().__init__(app, run)
        self._state = state
        self._flag = flag

    def _emit(self, kind: Any, data: Any) -> None:  # stamped by the worker, on the store's clock
        self._state.add((self.run_id, self.attempt), kind, data)

    @property
    def cancelled(self) -> bool:
        return bool(self._state.flags[self._flag]) or self._cancelled

    def inputs(self) -> InputStream:
        raise RunlaneError(
            f"job {self.job!r}: ctx.inputs() needs the worker's event loop; read inputs in a thread or "
            "async job (executor='thread')"
        )


_jobs: dict[tuple[str, str], Job[Any, Any]] = {}


def _find(module: str, qualname: str, name: str, url: str) -> Job[Any, Any]:
    """The job in this process: the ``Job`` at ``module.qualname``, or a plain function registered there
    with ``app.job(f)`` (argument decoding only needs its signature; the process gets an app of its own)."""
    from runlane.app import Runlane
    from runlane.jobs import Job, JobOptions

    job = _jobs.get((module, qualname))
    if job is None:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        if isinstance(target, Job):
            job = target
            if job.app.url != url and job.app._store is None:
                job.app.url = url  # the worker's store: a command-line URL wins over the module's
        elif callable(target):
            job = Job(Runlane(url), target, JobOptions(name=name))
        else:
            raise TypeError(f"{module}.{qualname} is neither a job nor a function")
        _jobs[(module, qualname)] = job
    return job


def _child_run(
    module: str, qualname: str, name: str, run: Run, flag: int
) -> tuple[str, Any, Any, int]:  # pragma: no cover - runs in the job process
    """Run one attempt; never raises: ``(status, value or exception, ErrorInfo, event batches sent)``."""
    from runlane.worker.executor import _drain_stream, error_info

    state = _child
    assert state is not None, "job process not initialised"
    key = (run.id, run.attempt)
    job = _find(module, qualname, name, state.url)
    app = job.app
    ctx = ProcessJobContext(app, run, state, flag)
    state.current = flag
    state.started(key)
    try:
        kwargs = job.load(run.args)
        if job.spec.context_param is not None:
            kwargs[job.spec.context_param] = ctx
        if job.is_generator:
            result: Any = _drain_stream(job.func(**kwargs), ctx)
        else:
            result = to_jsonable(job.func(**kwargs))
        outcome: tuple[str, Any, Any] = ("ok", result, None)
    except NotSerializable as exc:
        from runlane.errors import NonRetryable

        bad = NonRetryable(f"the result of job {job.name!r} is not JSON-serialisable: {exc}")
        outcome = ("error", bad, ErrorInfo("NotSerializable", str(bad)))
    except BaseException as exc:
        info = error_info(exc)
        try:
            pickle.loads(pickle.dumps(exc))
            travelling: BaseException | None = exc
        except Exception:
            travelling = None
        outcome = ("error", travelling, info)
    state.current = None
    state.flush(key)
    with state.lock:
        sent = state.sent.pop(key, 0)
    return (*outcome, sent)
