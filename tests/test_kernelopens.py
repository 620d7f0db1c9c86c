"""The table of files the kernel opened itself (nbiafs.kernelopens): one open per file, kept by use."""

from __future__ import annotations

import threading

import pytest

from nbiafs.kernelopens import KernelOpens


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Opener:
    """Hands out handle numbers and records which are closed."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed: list[int] = []
        self._next = 0
        self.lock = threading.Lock()

    def opener(self, key: str, gate: threading.Event | None = None, fail: BaseException | None = None):
        def open_() -> tuple[int, str]:
            if gate is not None:
                assert gate.wait(10)
            with self.lock:
                self.opened.append(key)
                self._next += 1
                number = self._next
            if fail is not None:
                raise fail
            return number, f"info of {key}"
        return open_


def make(keep: int = 64, idle: float = 30.0) -> tuple[KernelOpens, Opener, Clock]:
    files, clock = Opener(), Clock()
    return KernelOpens(files.closed.append, keep=keep, idle=idle, clock=clock), files, clock


def test_a_file_is_opened_at_its_first_read_and_kept_for_the_next():
    table, files, _ = make()
    with table.use("/a", files.opener("/a"), 1) as (handle, info):
        assert (handle, info) == (1, "info of /a")
    with table.use("/a", files.opener("/a"), 1) as (handle, _):
        assert handle == 1
    assert files.opened == ["/a"] and files.closed == [] and len(table) == 1


def test_threads_reading_a_new_file_at_once_open_it_once():
    table, files, _ = make()
    gate = threading.Event()
    got: list[int] = []
    started = threading.Barrier(5)

    def reader() -> None:
        started.wait()
        with table.use("/a", files.opener("/a", gate), 10) as (handle, _):
            got.append(handle)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    gate.set()
    for t in threads:
        t.join(10)
    assert got == [1, 1, 1, 1] and files.opened == ["/a"]


def test_a_failed_open_is_not_kept_and_its_waiters_see_its_error():
    table, files, _ = make()
    gate = threading.Event()
    errors: list[BaseException] = []
    leader_in = threading.Event()

    def leader() -> None:
        try:
            with table.use("/a", _signal(leader_in, files.opener("/a", gate, fail=TimeoutError("server"))), 10):
                pass
        except TimeoutError as exc:
            errors.append(exc)

    def waiter() -> None:
        try:
            with table.use("/a", files.opener("/a"), 10):
                pass
        except TimeoutError as exc:
            errors.append(exc)

    first = threading.Thread(target=leader)
    first.start()
    assert leader_in.wait(10)
    second = threading.Thread(target=waiter)
    second.start()
    while table._slots["/a"].users < 2:  # the waiter is in: it joins the leader's open
        threading.Event().wait(0.001)
    gate.set()
    first.join(10)
    second.join(10)
    assert [str(e) for e in errors] == ["server", "server"]
    assert len(table) == 0
    with table.use("/a", files.opener("/a"), 1) as (handle, _):  # the next read opens it again
        assert handle == 2
    assert files.closed == []  # the failed open had no handle to close


def test_the_kernels_own_retry_of_a_failed_read_ahead_fails_at_once_and_only_that_one():
    table, files, clock = make()
    me, other = (lambda: "thread 1"), (lambda: "thread 2")
    with pytest.raises(TimeoutError):
        with table.use("/a", files.opener("/a", fail=TimeoutError("server")), 1, reader=me, retried=True):
            pass
    clock.now = 0.001
    with table.use("/b", files.opener("/b"), 1, reader=me):  # another file: not held
        pass
    with table.use("/a", files.opener("/a"), 1, reader=other):  # another reader: tries
        pass
    with pytest.raises(TimeoutError, match="server"):  # the kernel's retry: the same error, no second try
        with table.use("/a", files.opener("/a"), 1, reader=me):
            pass
    assert files.opened == ["/a", "/b", "/a"]
    with table.use("/a", files.opener("/a"), 1, reader=me) as (handle, _):  # its next read goes on
        assert handle == 3  # the handle the other reader opened
    assert files.opened == ["/a", "/b", "/a"]
    # a failed read the kernel does not retry (a page read) is not held at all; a hold ends in time
    with pytest.raises(TimeoutError):
        with table.use("/c", files.opener("/c", fail=TimeoutError("x")), 1, reader=me):
            pass
    with table.use("/c", files.opener("/c"), 1, reader=me):
        pass
    with pytest.raises(OSError):  # a read that fails (its bytes) is held the same way
        with table.use("/c", files.opener("/c"), 1, reader=me, retried=True):
            raise OSError(5, "stalled")
    with pytest.raises(OSError, match="stalled"):
        with table.use("/c", files.opener("/c"), 1, reader=me):
            pass
    with pytest.raises(TimeoutError):
        with table.use("/c", files.opener("/c", fail=TimeoutError("x")), 1, reader=me, retried=True):
            pass
    clock.now = 5.0
    with table.use("/c", files.opener("/c"), 1, reader=me):
        pass


def _signal(event: threading.Event, opener):
    def open_():
        event.set()
        return opener()
    return open_


def test_a_waiter_gives_up_at_its_deadline():
    table, files, _ = make()
    gate = threading.Event()
    leader_in = threading.Event()
    t = threading.Thread(target=lambda: table.use("/a", _signal(leader_in, files.opener("/a", gate)), 10).__enter__())
    t.start()
    assert leader_in.wait(10)
    with pytest.raises(TimeoutError, match="still being opened"):
        with table.use("/a", files.opener("/a"), 0.01):
            pass
    gate.set()
    t.join(10)


def test_a_read_that_fails_drops_the_handle_once_its_other_reads_are_done():
    table, files, _ = make()
    with table.use("/a", files.opener("/a"), 1):
        pass
    inside = table.use("/a", files.opener("/a"), 1)
    inside.__enter__()  # a read still using the handle
    with pytest.raises(OSError):
        with table.use("/a", files.opener("/a"), 1):
            raise OSError(5, "stalled")
    assert files.closed == [] and len(table) == 0  # dropped, closed by its last user
    inside.__exit__(None, None, None)
    assert files.closed == [1]
    with table.use("/a", files.opener("/a"), 1) as (handle, _):
        assert handle == 2


def test_unused_handles_beyond_keep_go_least_recently_read_first():
    table, files, _ = make(keep=2)
    for key in ("/a", "/b"):
        with table.use(key, files.opener(key), 1):
            pass
    with table.use("/a", files.opener("/a"), 1):  # /a read again: /b is now the oldest
        pass
    with table.use("/c", files.opener("/c"), 1):
        pass
    assert files.closed == [2] and len(table) == 2


def test_a_handle_in_use_is_never_let_go():
    table, files, clock = make(keep=1, idle=1.0)
    held = table.use("/a", files.opener("/a"), 1)
    held.__enter__()
    clock.now = 100.0
    with table.use("/b", files.opener("/b"), 1):
        pass
    assert 1 not in files.closed
    held.__exit__(None, None, None)


def test_idle_handles_go_at_the_next_read():
    table, files, clock = make(idle=5.0)
    with table.use("/a", files.opener("/a"), 1):
        pass
    clock.now = 4.0
    with table.use("/b", files.opener("/b"), 1):
        pass
    assert files.closed == []
    clock.now = 9.5
    with table.use("/b", files.opener("/b"), 1):
        pass
    assert files.closed == [1] and len(table) == 1


def test_close():
    table, files, _ = make()
    with table.use("/b", files.opener("/b"), 1):
        pass
    held = table.use("/c", files.opener("/c"), 1)
    held.__enter__()
    table.close()
    assert files.closed == [1]  # /c is still being read: its reader closes it
    held.__exit__(None, None, None)
    assert files.closed == [1, 2]
    with pytest.raises(OSError, match="closing"):
        with table.use("/d", files.opener("/d"), 1):
            pass


def test_a_file_read_to_its_end_is_let_go_at_once_or_by_its_last_reader():
    table, files, _ = make()
    with table.use("/a", files.opener("/a"), 1):
        pass
    table.let_go("/a")
    assert files.closed == [1] and len(table) == 0
    held = table.use("/b", files.opener("/b"), 1)
    held.__enter__()
    table.let_go("/b")  # another read is still on it
    assert files.closed == [1]
    held.__exit__(None, None, None)
    assert files.closed == [1, 2]
    with table.use("/b", files.opener("/b"), 1) as (handle, _):  # a later read opens it again
        assert handle == 3
