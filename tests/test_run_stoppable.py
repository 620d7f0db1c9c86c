"""run_stoppable (what prefetch and download run their job in): a Ctrl-C stops the job however the
kernel delivers it."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator

import pytest
from conftest import wait_until

from nbiafs.fetchjob import EXIT_SIGINT, run_stoppable


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler (a test run in a background job may have SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def waiting_for_the_job(thread_id: int) -> bool:
    """Whether thread ``thread_id`` is blocked in run_stoppable's wait for the job (not in starting it)."""
    frame = sys._current_frames().get(thread_id)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    while frame is not None and frame.f_code.co_name == "wait":
        frame = frame.f_back
    return frame is not None and frame.f_code.co_name in ("run_stoppable", "_wait_seeing_signals")


@pytest.mark.parametrize("when", ["at-start", "while-waiting"])
def test_a_ctrl_c_the_kernel_gives_to_the_job_thread_stops_the_job(python_sigint, when) -> None:
    # A process-directed signal may land in any thread: Python only flags it there, and the handler
    # must still run in the main thread, whether it is starting the job or waiting for it (the wait
    # was once untimed, and the stop was lost: the job ran on).
    stop = threading.Event()
    cut: list[bool] = []
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main

    def work() -> str:
        if when == "while-waiting":
            assert wait_until(lambda: waiting_for_the_job(main), 10), "the main thread never waited"
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return "stopped" if stop.wait(30) else "never stopped"

    result, code = run_stoppable(work, stop, lambda: cut.append(True))
    assert (result, code, cut) == ("stopped", EXIT_SIGINT, [True])


def test_a_job_that_ends_by_itself_returns_its_result_and_no_exit_status(python_sigint) -> None:
    stop = threading.Event()
    assert run_stoppable(lambda: 42, stop, lambda: None) == (42, None)
    assert not stop.is_set()


def test_a_job_that_fails_by_itself_raises_its_error_in_the_caller() -> None:
    def work() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run_stoppable(work, threading.Event(), lambda: None)
