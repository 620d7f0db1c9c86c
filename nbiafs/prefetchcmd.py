"""``nbiafs prefetch (PATH... | --manifest FILE.tcia)``: fill the cache a mount reads, every file checked.

What it owns: the plan of a prefetch (per series, the files not cached yet; whether all that is asked
fits the cache's bound), the dry run that prints it, the refusal of a prefetch bigger than the cache,
and the run: the store's ``ensure`` over every file asked (what is cached and verified is skipped,
what is cached but never compared with the server's MD5 is compared, the rest is fetched and checked;
a mismatch is fetched again once and never kept), with the progress display of
:mod:`nbiafs.progress` and a clean stop on Ctrl-C (:func:`nbiafs.fetchjob.run_stoppable`).

Why it is shaped so: a prefetch exists to make later reads free, so one bigger than the cache would
evict its own first files before the last arrive; it is refused before anything is fetched (with the
way out: a bigger ``--cache-size``, or ``nbiafs download``, which streams through the cache). When
what is asked fits but the cache must evict for it, the files asked that are cached already are used
once first (an open and a close through the store), so that eviction takes older files, not them.
Exit status: 0 only when every file asked is cached (and verified, unless ``--no-verify-md5``); 1 with
the failures listed; 130 (143 for SIGTERM) after an interruption.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import NbiaError
from .fetchjob import (
    FETCH_GROUPS,
    Target,
    cache_usage,
    ensure_healing,
    lost_under_the_store,
    open_targets,
    resolve_command,
    run_stoppable,
    start,
)
from .progress import Progress, human_bytes, human_rate, human_seconds


@dataclass(slots=True)
class SeriesPlan:
    """One series asked for: its label, files and bytes asked, and those not cached yet."""

    label: str
    files: int
    size: int
    to_fetch: list[Any] = field(default_factory=list)

    @property
    def fetch_bytes(self) -> int:
        return sum(int(f.size) for f in self.to_fetch)


@dataclass(slots=True)
class Plan:
    """What a prefetch of one target would do."""

    target: Target
    series: list[SeriesPlan]
    cached: list[Any]  # the files asked that are in the cache already
    used: int  # bytes the cache dir holds now
    bound: int

    @property
    def files(self) -> int:
        return sum(s.files for s in self.series)

    @property
    def asked_bytes(self) -> int:
        return sum(s.size for s in self.series)

    @property
    def fetch_files(self) -> int:
        return sum(len(s.to_fetch) for s in self.series)

    @property
    def fetch_bytes(self) -> int:
        return sum(s.fetch_bytes for s in self.series)

    @property
    def fits(self) -> bool:
        return self.asked_bytes <= self.bound

    @property
    def evicts(self) -> int:
        """Bytes of other files the cache evicts to make room (about)."""
        return max(0, self.used + self.fetch_bytes - self.bound)


def plan_of(target: Target) -> Plan:
    store = target.layers.store
    info = cache_usage(target.settings)  # the real store's scan would already evict to its bound
    series: list[SeriesPlan] = []
    cached: list[Any] = []
    for p in target.picks:
        entry = SeriesPlan(target.label(p.series), len(p.files), p.size)
        for f in p.files:
            (cached if store.contains(f) else entry.to_fetch).append(f)
        series.append(entry)
    return Plan(target, series, cached, info.bytes, target.settings.cache_size)


def prefetch(args: argparse.Namespace) -> int:
    try:
        return _prefetch(args)
    except OSError as exc:  # a disk error nothing below expected: one line, not a traceback
        raise NbiaError(f"{exc.filename or 'prefetch'}: {exc.strerror or exc}") from None


def _prefetch(args: argparse.Namespace) -> int:
    resolved = resolve_command(args, FETCH_GROUPS)
    with open_targets(args, args.paths, resolved) as targets:
        for target in targets:
            for note in target.notes:
                print(note, file=sys.stderr)
        plans = [plan_of(t) for t in targets]
        if resolved.settings.dry_run:
            return dry_run(plans)
        for plan in plans:
            if not plan.fits:
                raise NbiaError(too_big(plan))
        return run(plans)


def too_big(plan: Plan) -> str:
    asked, bound = human_bytes(plan.asked_bytes), human_bytes(plan.bound)
    if plan.target.mountpoint:
        return (f"the prefetch asks for {asked}, but the cache of the mount on {plan.target.mountpoint} holds at most "
                f"{bound}: it would evict its own first files before the last arrive. Remount with a bigger "
                "--cache-size, or write the files into a folder: nbiafs download PATH... DEST")
    return (f"the prefetch asks for {asked}, but the cache ({plan.target.settings.cache_dir}) holds at most {bound} "
            "(--cache-size): it would evict its own first files before the last arrive. Give a bigger --cache-size, "
            "or write the files into a folder: nbiafs download --manifest FILE DEST")


def dry_run(plans: list[Plan]) -> int:
    """Print what a prefetch would fetch and whether it fits; 1 when it would be refused."""
    fits = True
    for plan in plans:
        for s in plan.series:
            if s.to_fetch:
                print(f"{s.label}: {len(s.to_fetch)} of {s.files} files to fetch, {human_bytes(s.fetch_bytes)}")
        for uid in plan.target.missing:
            print(f"series {uid}: not on the server (or this account may not see it)")
        wanted = sum(1 for s in plan.series if s.to_fetch)
        print(f"would fetch {wanted} series, {plan.fetch_files} files, {human_bytes(plan.fetch_bytes)}; "
              f"{len(plan.cached)} of {plan.files} files asked for are cached already")
        where = (f"the cache of the mount on {plan.target.mountpoint}" if plan.target.mountpoint
                 else f"the cache {plan.target.settings.cache_dir}")
        state = f"{where}: bound {human_bytes(plan.bound)}, {human_bytes(plan.used)} used"
        if plan.fits:
            evicting = f", evicting about {human_bytes(plan.evicts)} of other files" if plan.evicts else ""
            print(f"{state}: the {human_bytes(plan.asked_bytes)} asked for fit{evicting}")
        else:
            fits = False
            print(f"{state}: the {human_bytes(plan.asked_bytes)} asked for do NOT fit; a prefetch would be refused "
                  "(raise --cache-size, or use nbiafs download)")
    return 0 if fits else 1


def run(plans: list[Plan]) -> int:
    total = sum(p.files for p in plans)
    total_bytes = sum(p.asked_bytes for p in plans)
    missing = [uid for p in plans for uid in p.target.missing]
    for uid in missing:
        print(f"nbiafs: failed: series {uid}: the server does not know it (or this account may not see it)",
              file=sys.stderr)
    start([p.target for p in plans])
    stop = threading.Event()
    progress = Progress("prefetch", total, total_bytes)

    def work() -> None:
        for plan in plans:
            if stop.is_set():
                return
            target = plan.target
            store = target.layers.store
            if plan.evicts:
                _use(store, plan.cached)

            def handle(outcome: Any, last: bool, target: Target = target) -> bool:
                if outcome.status == "failed":
                    if stop.is_set():
                        return False  # cut by the interruption: not a failure
                    if not last and lost_under_the_store(outcome):
                        return True
                    progress.fail(target.label(outcome.node), str(outcome.error or "failed"), int(outcome.size))
                    return False
                progress.add(int(outcome.size), fetched=outcome.status == "fetched")
                return False

            ensure_healing(store, target.nodes(), verify_md5=target.settings.verify_md5,
                           workers=target.settings.workers, stop=stop, handle=handle)

    def on_stop() -> None:
        for plan in plans:
            plan.target.layers.close_client()

    try:
        _, code = run_stoppable(work, stop, on_stop)
    finally:
        progress.close()
    verified = all(p.target.settings.verify_md5 for p in plans)
    progress.close(summary(progress, plans, total, missing, code, verified))
    if code is not None:
        return code
    return 0 if progress.tally.done == total and not progress.tally.failed and not missing else 1


def summary(progress: Progress, plans: list[Plan], total: int, missing: list[str], code: int | None,
            verified: bool) -> str:
    t = progress.tally
    seconds = progress.elapsed
    fetched = f"{t.fetched} fetched"
    if t.fetched:
        fetched += f" ({human_bytes(t.fetched_bytes)}, {human_rate(t.fetched_bytes, seconds)})"
    series = sum(len(p.series) for p in plans)
    if code is not None:
        return (f"prefetch stopped after {human_seconds(seconds)}: {t.done} of {total} files done ({fetched}, "
                f"{t.cached} already cached); run it again to fetch the rest")
    what = "cached and verified" if verified else "cached"
    if t.failed or missing or t.done < total:
        gone = f", {len(missing)} series not on the server" if missing else ""
        return (f"prefetch incomplete: {t.done} of {total} files of {series} series {what} ({fetched}, {t.cached} "
                f"already cached), {t.failed} failed{gone}, in {human_seconds(seconds)}")
    size = sum(p.asked_bytes for p in plans)
    return (f"prefetched {series} series, {total} files, {human_bytes(size)}, {what}: {fetched}, {t.cached} "
            f"already cached, in {human_seconds(seconds)}")


def _use(store: Any, nodes: list[Any]) -> None:
    """Open and close each cached file once: the most recently used now, so eviction takes others."""
    for node in nodes:
        try:
            store.release(store.open(node))
        except (NbiaError, OSError):
            continue
