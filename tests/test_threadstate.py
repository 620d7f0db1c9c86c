"""nbiafs.threadstate: the bound on kept thread states (the mount test in test_mount_process proves the
states survive libfuse's callbacks)."""

from __future__ import annotations

import threading

from nbiafs.threadstate import ThreadStates


def run_in_threads(states: ThreadStates, threads: int, calls: int) -> None:
    def body() -> None:
        for _ in range(calls):
            states.keep()

    workers = [threading.Thread(target=body) for _ in range(threads)]
    for w in workers:  # one after another: which threads come first within the bound is then fixed
        w.start()
        w.join()


def test_each_thread_keeps_its_state_once_and_finds_it_kept_afterwards() -> None:
    states = ThreadStates(limit=10)
    run_in_threads(states, threads=3, calls=4)
    assert states.counts() == {"kept": 3, "reused": 9}


def test_past_the_bound_no_thread_keeps_a_state_and_none_is_counted_as_found() -> None:
    states = ThreadStates(limit=2)
    run_in_threads(states, threads=5, calls=3)
    assert states.counts() == {"kept": 2, "reused": 4}  # only the first two threads, on their later calls
