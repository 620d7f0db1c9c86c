"""The read-ahead policy without threads: the window per series and the global budget."""

from __future__ import annotations

from nbiafs.store.readahead import (
    FIRST_WINDOW,
    WALK_ON_WITHIN,
    Budget,
    ReaderState,
    WalkOn,
    byte_offsets,
    finished_in_order,
    plan,
    read_soon_range,
    walk_on,
    wants_zip,
    zip_limit,
)


def walk(count: int, opens: list[int]) -> list[list[int]]:
    """The positions asked for after each open of ``opens`` (one series of ``count`` files)."""
    state: ReaderState | None = None
    asked = []
    for position in opens:
        state, ahead = plan(state, position, count)
        asked.append(list(ahead))
    return asked


def test_the_first_open_of_a_series_fetches_that_file_only() -> None:
    assert walk(200, [0]) == [[]]
    assert walk(200, [57]) == [[]]


def test_a_reader_walking_in_order_grows_a_doubling_window_up_to_the_whole_series() -> None:
    asked = walk(200, list(range(12)))
    assert asked[0] == [] and asked[1] == [2, 3]  # the first window: FIRST_WINDOW files ahead
    assert len(asked[1]) == FIRST_WINDOW
    ahead_of = [max(a) if a else None for a in asked]
    assert ahead_of[2] == 6 and ahead_of[3] == 11 and ahead_of[4] == 20 and ahead_of[5] == 37  # 2, 4, 8, 16, 32
    flat = [p for a in asked for p in a]
    assert len(flat) == len(set(flat))  # nothing is asked twice
    everything = walk(200, list(range(200)))
    assert sorted(p for a in everything for p in a) == list(range(2, 200))  # in the end: the whole series


def test_random_or_backwards_access_fetches_nothing_ahead() -> None:
    assert walk(200, [5, 90, 3, 150, 149, 20]) == [[]] * 6
    assert walk(200, [10, 11, 40]) [2] == []  # a jump after a short walk resets the window
    state, ahead = plan(ReaderState(10, 8, 30), 40, 200)
    assert list(ahead) == [] and state.window == 0


def test_opening_the_same_file_again_changes_nothing() -> None:
    state, _ = plan(None, 3, 10)
    state, _ = plan(state, 4, 10)
    again, ahead = plan(state, 4, 10)
    assert again == state and list(ahead) == []


def test_the_window_stops_at_the_end_of_the_series() -> None:
    asked = walk(5, [0, 1, 2, 3, 4])
    assert [p for a in asked for p in a] == [2, 3, 4]


def test_the_budget_bounds_bytes_in_flight_and_bytes_ahead_unread() -> None:
    budget = Budget(in_flight_limit=10, unread_limit=20)
    assert budget.may_start(8)
    budget.started(8)
    assert not budget.may_start(5)  # 13 > 10 in flight
    budget.ended(8, kept=True)
    assert budget.may_start(5)
    budget.started(5)
    budget.ended(5, kept=True)
    assert budget.unread == 13 and not budget.may_start(9)  # 22 > 20 fetched ahead, not read
    budget.opened(8)
    assert budget.may_start(9)
    empty = Budget(in_flight_limit=10, unread_limit=20)
    assert empty.may_start(1000)  # one file always fits when nothing else is ahead: big files still stream


# ------------------------------------------------------------------ the series zip
def _walk(positions, count=200):
    state = None
    states = []
    for p in positions:
        before = state
        state, _ahead = plan(state, p, count)
        states.append((before, state))
    return states


def test_the_zip_is_wanted_when_a_reader_starts_walking_from_the_start():
    (_, s0), (b1, s1) = _walk([0, 1])
    assert wants_zip(b1, s1, 200, rest_bytes=1000, byte_limit=10_000)
    assert not wants_zip(None, s0, 200, rest_bytes=1000, byte_limit=10_000)  # a first open: not yet


def test_the_zip_is_not_wanted_from_the_middle_for_short_series_cached_files_or_over_budget():
    (_, _), (b, s) = _walk([100, 101])
    assert not wants_zip(b, s, 200, rest_bytes=1000, byte_limit=10_000)  # from the middle
    (_, _), (b, s) = _walk([0, 1], count=10)
    assert not wants_zip(b, s, 10, rest_bytes=1000, byte_limit=10_000)  # nine files: singles alone
    (_, _), (b, s) = _walk([0, 1])
    assert not wants_zip(b, s, 200, cached_ahead=1, rest_bytes=1000, byte_limit=10_000)
    assert not wants_zip(b, s, 200, rest_bytes=20_000, byte_limit=10_000)  # more than the budget


def test_the_zip_is_wanted_once_when_the_window_opens_not_at_every_step():
    states = _walk([0, 1, 2, 3])
    assert [wants_zip(b, s, 200, rest_bytes=1, byte_limit=10) for b, s in states] == [False, True, False, False]


def test_the_zip_limit_is_the_end_of_the_window_and_the_byte_budget():
    (_, _), (_, s) = _walk([0, 1])  # window 2: positions 2 and 3 asked
    offsets = byte_offsets([100] * 200)
    assert zip_limit(s, offsets, 10_000) == 4
    assert zip_limit(s, offsets, 150) == 3  # only one file's bytes past the reader
    assert zip_limit(s, offsets, 0) == 3  # the next file always may come


def test_the_zip_limit_with_prefix_sums_is_the_walk_it_replaced():
    import random

    def walked(state: ReaderState, sizes: list[int], byte_limit: int) -> int:  # the former loop
        stop = min(state.asked + 1, len(sizes))
        total = 0
        for position in range(state.last + 1, stop):
            total += sizes[position]
            if total > byte_limit:
                return max(position, state.last + 2)
        return stop

    rng = random.Random(7)
    for _ in range(2000):
        sizes = [rng.choice((0, 1, 100, 5000, 525_000)) for _ in range(rng.randint(1, 60))]
        last = rng.randint(0, len(sizes) - 1)
        state = ReaderState(last, 4, rng.randint(last, len(sizes) + 3))
        limit = rng.choice((0, 99, 100, 5000, 1_000_000, 10**9))
        assert zip_limit(state, byte_offsets(sizes), limit) == walked(state, sizes, limit), (sizes, state, limit)


# ------------------------------------------------------------------ from series to series (walk_on)
def read_through(count: int) -> tuple[ReaderState | None, bool]:
    """A reader walking a whole series of ``count`` files in order: its last state before the last file,
    and whether that last open finished the series in order."""
    state: ReaderState | None = None
    for position in range(count - 1):
        state, _ = plan(state, position, count)
    return state, finished_in_order(state, count - 1, count)


def test_a_series_read_to_its_end_in_order_is_finished_and_nothing_else_is() -> None:
    assert read_through(200)[1] and read_through(3)[1]
    state, _ = plan(None, 198, 200)  # a reader that jumped near the end: no window open
    assert not finished_in_order(state, 199, 200)
    state = ReaderState(last=150, window=8, asked=160)
    assert not finished_in_order(state, 151, 200)  # in order, but not the last file
    assert not finished_in_order(None, 199, 200)


def test_the_first_file_of_the_next_series_opens_its_window_at_once_and_may_start_its_zip() -> None:
    sign, start, abandoned = walk_on(WalkOn(finished_at=100.0), 101.0, "B", 0, None)
    assert sign == WalkOn(100.0, "B") and abandoned is None and start is not None
    state, ahead = plan(start, 0, 200)
    assert list(ahead) == list(range(1, 1 + FIRST_WINDOW)) and state.window == FIRST_WINDOW
    assert wants_zip(start, state, 200, rest_bytes=1, byte_limit=10)
    # without the sign, the same open fetches its file only (and no zip)
    assert walk_on(None, 101.0, "B", 0, None) == (None, None, None)


def test_the_sign_lasts_its_time_and_only_a_first_file_walks_on() -> None:
    sign = WalkOn(finished_at=100.0)
    assert walk_on(sign, 100.0 + WALK_ON_WITHIN + 0.1, "B", 0, None) == (None, None, None)
    assert walk_on(sign, 101.0, "B", 57, None) == (sign, None, None)  # kept for a first file later


def test_a_scan_after_a_walk_pays_for_one_guessed_series_then_the_sign_is_gone() -> None:
    sign = WalkOn(finished_at=100.0, guessed="B")
    left_after_its_first_file = ReaderState(last=0, window=FIRST_WINDOW, asked=2)
    assert walk_on(sign, 101.0, "C", 0, left_after_its_first_file) == (None, None, "B")
    walked_on = ReaderState(last=40, window=16, asked=56)  # the reader went on through B: C is next
    kept, start, abandoned = walk_on(sign, 101.0, "C", 0, walked_on)
    assert kept == WalkOn(100.0, "C") and start is not None and abandoned is None


def hints_of_a_walk(count: int, opens: list[int], size: int, limit: int) -> list[list[int]]:
    """The positions :func:`read_soon_range` hints after each open (files of ``size`` bytes)."""
    offsets = byte_offsets([size] * count)
    state: ReaderState | None = None
    hinted: int | None = None
    out = []
    for position in opens:
        state, _ = plan(state, position, count)
        hinted, soon = read_soon_range(state, offsets, hinted, limit)
        out.append(list(soon))
    return out


def test_cached_files_are_hinted_a_bounded_distance_ahead_one_more_per_open() -> None:
    hints = hints_of_a_walk(200, list(range(40)), size=100, limit=500)  # 5 files' worth ahead at most
    assert hints[0] == []  # a first open: no window, nothing asked of the disk
    assert hints[1] == [2, 3]  # the first window (2 files) is within the bound
    flat = [p for h in hints for p in h]
    assert flat == sorted(set(flat))  # each file hinted once, in reading order
    for opened, h in enumerate(hints):
        assert all(opened < p <= opened + 5 for p in h)  # never past the bound, never behind the reader
    assert all(len(h) == 1 for h in hints[8:])  # walking on: one more file per open, not a window at once
    assert flat[-1] == 39 + 5


def test_hints_stay_within_the_window_and_a_jump_starts_over() -> None:
    offsets = byte_offsets([100] * 50)
    state, _ = plan(None, 0, 50)
    state, _ = plan(state, 1, 50)  # window of FIRST_WINDOW: positions 2, 3
    hinted, soon = read_soon_range(state, offsets, None, 10_000)
    assert list(soon) == [2, 3] and hinted == 3  # a large bound: the window's end
    jumped, _ = plan(state, 30, 50)
    assert read_soon_range(jumped, offsets, hinted, 10_000) == (30, range(0))
    again, _ = plan(jumped, 31, 50)  # walking again from there: on from the new place
    assert list(read_soon_range(again, offsets, 30, 10_000)[1]) == [32, 33]
    last, _ = plan(ReaderState(47, 8, 49), 48, 50)
    assert list(read_soon_range(last, offsets, 49, 10_000)[1]) == []  # everything hinted already


def test_the_next_file_is_hinted_whatever_its_size() -> None:
    offsets = byte_offsets([10] + [1 << 30] * 5)  # files far bigger than the bound
    state, _ = plan(None, 0, 6)
    state, _ = plan(state, 1, 6)
    assert list(read_soon_range(state, offsets, None, 1 << 20)[1]) == [2]
