#!/usr/bin/env python3
"""Benchmark of the instance store against the emulator with a per-request latency.

Reads the sample archive's 120-instance series through :class:`nbiafs.store.InstanceStore` and prints:
  * cold, sequential: one single_image fetch after another (no prefetch), as a naive reader would;
  * cold, with prefetch: the first open schedules the rest of the series on N workers (``on_open``);
  * warm: the same files read again from the on-disk cache, vs reading the archive's own files from
    the local directory they live in (the best a cache can hope for).
Numbers, not a test. Usage: ``python scripts/bench_store.py [--latency 0.05] [--workers 4 8 16]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from nbiafs.catalog import Node
from nbiafs.client import NbiaClient
from nbiafs.emulator import Emulator
from nbiafs.store import InstanceStore

CHUNK = 128 * 1024  # what the kernel asks per read with big_writes/max_read on a FUSE mount
SERIES_LENGTH = 120


def series_nodes(emu: Emulator) -> tuple[list[Node], list[Path]]:
    """Nodes of the first 120-instance series, in instance order, and the archive's local files."""
    archive = emu.archive
    for coll in archive.public_collections():
        for study in archive.studies_of(coll.name):
            for series in archive.series_of_study(study.uid):
                instances = sorted(archive.instances_of(series.uid), key=lambda i: i.instance_number)
                if len(instances) == SERIES_LENGTH:
                    nodes = [Node("instance", f"/{coll.name}/{i.instance_number}.dcm", ino=1000 + k, mtime=0.0,
                                  size=i.size, series_uid=i.series_uid, sop_uid=i.sop_uid,
                                  study_uid=i.study_uid, collection=coll.name)
                             for k, i in enumerate(instances)]
                    return nodes, [i.path for i in instances]
    raise SystemExit(f"no {SERIES_LENGTH}-instance series in the emulator archive")


def read_through(store: InstanceStore, node: Node) -> int:
    handle = store.open(node)
    try:
        total, offset = 0, 0
        while True:
            chunk = store.read(handle, CHUNK, offset)
            if not chunk:
                return total
            total += len(chunk)
            offset += len(chunk)
    finally:
        store.release(handle)


def read_local(path: Path) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
    return total


def timed(label: str, fn, total_bytes: int) -> float:
    start = time.perf_counter()
    got = fn()
    seconds = time.perf_counter() - start
    assert got == total_bytes, f"{label}: read {got} bytes, expected {total_bytes}"
    print(f"  {label:<38} {seconds:8.3f} s  {total_bytes / seconds / 1e6:9.1f} MB/s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="emulator seconds per request")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--data", default=None, help="emulator archive dir (default: a temporary one)")
    parser.add_argument("--warm-passes", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "archive"
        with Emulator(data, latency=args.latency) as emu:
            nodes, local_files = series_nodes(emu)
            total = sum(n.size for n in nodes)
            print(f"series of {len(nodes)} instances, {total / 1e6:.1f} MB, emulator latency {args.latency}s")

            def cold(workers: int, cache: Path) -> tuple[float, InstanceStore, NbiaClient]:
                client = NbiaClient(emu.url, pool_size=max(workers, 1) + 1)
                client.tokens.get_token()  # log in before timing: we measure bytes, not the login
                store = InstanceStore(client, cache, size_limit=10 * 1024**3, namespace=f"{emu.url}|guest",
                                      workers=workers)
                store.start()

                def run() -> int:
                    got = 0
                    for k, node in enumerate(nodes):
                        got += read_through(store, node)
                        if k == 0 and workers:
                            store.on_open(node, nodes)
                    return got

                label = "cold, sequential (no prefetch)" if not workers else f"cold, prefetch with {workers} workers"
                return timed(label, run, total), store, client

            print("cold reads (empty cache):")
            baseline, store, client = cold(0, Path(tmp) / "cache-seq")
            store.close()
            client.close()
            best: tuple[float, int] | None = None
            for workers in args.workers:
                seconds, store, client = cold(workers, Path(tmp) / f"cache-{workers}")
                print(f"    -> {baseline / seconds:5.1f}x faster than sequential; "
                      f"fetches={store.stats().fetches} joined={store.stats().joined}")
                if best is None or seconds < best[0]:
                    best = (seconds, workers)
                if workers != args.workers[-1]:
                    store.close()
                    client.close()
            warm_store, warm_client = store, client  # the last run's cache is full: read it warm

            print(f"warm reads ({args.warm_passes} passes, cache of the last run):")
            calls_before = warm_store.stats().fetches
            warm = timed("warm, from the instance cache",
                         lambda: sum(read_through(warm_store, n) for _ in range(args.warm_passes) for n in nodes),
                         total * args.warm_passes)
            assert warm_store.stats().fetches == calls_before, "warm reads must not fetch"
            local = timed("local directory (archive files)",
                          lambda: sum(read_local(p) for _ in range(args.warm_passes) for p in local_files),
                          total * args.warm_passes)
            print(f"    -> cached reads take {warm / local:.2f}x the time of local reads")
            warm_store.close()
            warm_client.close()
            if best:
                warm_rate, local_rate = (total * args.warm_passes / t / 1e6 for t in (warm, local))
                print(f"summary: cold sequential {baseline:.2f} s, best prefetch {best[0]:.2f} s "
                      f"({best[1]} workers, {baseline / best[0]:.1f}x), "
                      f"warm {warm_rate:.0f} MB/s vs local {local_rate:.0f} MB/s")


if __name__ == "__main__":
    main()
