"""A process pool for per-item work that survives the death of a worker (used by ``extract-patches``).

:func:`ordered_results` runs ``work(*task)`` for every task and yields the results in task order, with at most
``2 * workers`` tasks in flight, so memory stays flat even when the consumer is slower than the workers. A worker
killed while working (the OOM killer, a crashing native decoder) breaks a :class:`ProcessPoolExecutor` and fails every
task in flight; those are run again one at a time in processes of their own (quarantine), so the task that kills its
process is named (``on_death(task, exitcode)`` gives its result) and the others are kept, then a new pool goes on with
the rest. Workers are forked (they inherit the parent's imports) and end when the parent does.

``workers=1`` runs everything in this process: no pool, no quarantine.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence, TypeVar

from dagan_gn.errors import DaganError

__all__ = ["WorkerStartError", "describe_exit", "exit_with_parent", "fork_context", "ordered_results", "run_alone"]

log = logging.getLogger(__name__)

R = TypeVar("R")
Task = Sequence[Any]


class WorkerStartError(DaganError, RuntimeError):
    """The worker processes could not be started (too many processes, no memory)."""


def fork_context():
    """The ``fork`` multiprocessing context where the platform has it (workers inherit the parent's imports)."""
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def exit_with_parent() -> None:
    """Make this worker process end when its parent does (``kill -9``, the OOM killer): an orphaned worker would
    otherwise wait on its task queue forever, holding memory and the parent's stdout open."""
    parent = os.getppid()
    try:  # Linux: the kernel kills us the moment the parent dies
        import ctypes

        PR_SET_PDEATHSIG = 1
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # elsewhere: look every half second
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    import threading

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def describe_exit(exitcode: int | None) -> str:
    """How a process ended: ``"killed by SIGKILL"`` or ``"exit code 3"``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exit code {exitcode}"


def _start_worker(initializer: Callable[..., None], initargs: tuple) -> None:
    exit_with_parent()
    initializer(*initargs)


def _alone_main(conn, initializer: Callable[..., None], initargs: tuple, work: Callable[..., Any], task: Task) -> None:
    _start_worker(initializer, initargs)
    conn.send(work(*task))
    conn.close()


def run_alone(work: Callable[..., R], task: Task, initializer: Callable[..., None],
              initargs: tuple = ()) -> tuple[R | None, int | None]:
    """Run one task in a process of its own: ``(result, exitcode)``, the result None when the process died."""
    ctx = fork_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_alone_main, args=(send, initializer, initargs, work, task), daemon=True)
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the process died before it could answer
        result = None
    finally:
        receive.close()
        proc.join()
    return result, proc.exitcode


def ordered_results(
    tasks: Sequence[Task],
    work: Callable[..., R],
    *,
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple = (),
    on_death: Callable[[Task, int | None], R],
    what: str = "worker",
) -> Iterator[R]:
    """``work(*task)`` for every task, in order, in ``workers`` forked processes each set up by
    ``initializer(*initargs)``; a task whose process dies gives ``on_death(task, exitcode)`` instead.

    ``work`` must be picklable by name (a module-level function). ``what`` names the processes in messages.

    Raises:
        WorkerStartError: the pool could not be started.
    """
    if workers == 1:
        initializer(*initargs)
        for task in tasks:
            yield work(*task)
        return
    yield from _pool_results(tasks, work, workers, initializer, initargs, on_death, what)


def _pool_results(tasks, work, workers, initializer, initargs, on_death, what) -> Iterator:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    def new_pool() -> ProcessPoolExecutor:
        try:
            return ProcessPoolExecutor(workers, mp_context=fork_context(), initializer=_start_worker,
                                       initargs=(initializer, initargs))
        except OSError as exc:
            raise WorkerStartError(f"cannot start {workers} {what} processes ({exc})") from exc

    waiting = deque(tasks)
    in_flight: deque = deque()
    pool = new_pool()
    try:
        while waiting or in_flight:
            try:
                while waiting and len(in_flight) < 2 * workers:
                    in_flight.append((waiting[0], pool.submit(work, *waiting[0])))
                    waiting.popleft()
                result = in_flight[0][1].result()
            except BrokenProcessPool:  # from result(), or from submit() when the death was noticed first
                suspects = list(in_flight)
                in_flight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                log.warning("a %s process died; running the %d task(s) it may have held one at a time", what,
                            len(suspects))
                for task, done in suspects:
                    if done.done() and not done.cancelled() and done.exception() is None:
                        yield done.result()
                        continue
                    alone, exitcode = run_alone(work, task, initializer, initargs)
                    yield alone if alone is not None else on_death(task, exitcode)
                pool = new_pool()
                continue
            in_flight.popleft()
            yield result
    finally:
        # Wait for the workers to exit: forked after the caller opened its files, they share those descriptors (and,
        # for HDF5, its file lock), which must be gone before the caller reopens a finished file.
        pool.shutdown(wait=True, cancel_futures=True)
