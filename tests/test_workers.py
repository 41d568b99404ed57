"""dagan_gn.workers: ordered results, bounded pool, a dead worker's task named and the others kept."""

from __future__ import annotations

import os
import signal

import pytest

from dagan_gn.workers import describe_exit, ordered_results

_STATE: dict[str, int] = {}


def _init(offset: int) -> None:
    _STATE["offset"] = offset


def _square_or_die(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x + _STATE["offset"]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_in_task_order(workers):
    tasks = [(x,) for x in range(7) if x != 3]
    out = list(ordered_results(tasks, _square_or_die, workers=workers, initializer=_init, initargs=(10,),
                               on_death=lambda task, code: None))
    assert out == [x * x + 10 for x, in tasks]


def test_the_task_that_kills_its_worker_is_named_and_the_rest_are_kept():
    deaths = []

    def died(task, exitcode):
        deaths.append((task, exitcode))
        return "dead"

    out = list(ordered_results([(x,) for x in range(9)], _square_or_die, workers=2, initializer=_init,
                               initargs=(1,), on_death=died))
    assert out == [x * x + 1 if x != 3 else "dead" for x in range(9)]
    assert deaths == [((3,), -signal.SIGKILL)]


def test_describe_exit():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
