#!/usr/bin/env python3
"""Benchmark of one shared nginx cache (docs/deploy/nginx/) for N nodes reading the same series.

Starts an :class:`nbiafs.emulator.Emulator` in this process with a per-request latency standing in for
the distance to TCIA, and for each N (default 1, 2, 4, 8) starts N node processes that read the same
series at the same moment, the way a cold nbiafs mount does over HTTP: list the series' instances
(v4 ``getSOPInstanceUIDs``), then fetch every instance (v4 ``getSingleImage``) in file order with
``--workers`` parallel requests (the mount's default, 8), each body checked against the archive.
Three ways, in one run so that the figures are comparable on a noisy machine:

  * direct:      every node talks to the server (the baseline);
  * proxy cold:  every node talks to a fresh nginx started from the shipped config (empty cache);
  * proxy warm:  N new nodes (empty node caches) through the same nginx, which now holds the series.

Printed per N: requests that reached the server (the emulator's own count, all endpoints) and wall
time (first node start to last node done), each beside the direct figure of the same N.

Numbers, not a test. Usage::

    python scripts/bench_cluster.py [--nodes 1 2 4 8] [--latency 0.04] [--workers 8] [--repeat 3]

What it does not measure: FUSE (the nodes use nbiafs's HTTP client, not a mount; the mount adds the
same requests, see tests/test_cluster_proxy.py), bandwidth limits (loopback), TLS to the server.
Needs nginx (``apt install nginx``); nginx and every node process are stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_TIMEOUT = 600.0


# ----------------------------------------------------------------------------------------- one node
def node_main(base_url: str, series_uid: str, expected: dict[str, tuple[int, str, int]], workers: int,
              barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:  # type: ignore[name-defined]
    """One node: list the series, fetch every instance with ``workers`` requests at once, check bytes.

    ``expected``: SOP UID -> (size, sha256, position in file order).
    """
    from nbiafs.client import NbiaClient

    client = NbiaClient(base_url, api="v4", pool_size=workers + 4)
    try:
        barrier.wait(NODE_TIMEOUT)
        start = time.monotonic()
        sops = client.sop_instance_uids(series_uid)
        if sorted(sops) != sorted(expected):
            raise AssertionError(f"listing of {series_uid} differs from the archive")
        in_order = sorted(sops, key=lambda sop: expected[sop][2])

        def fetch(sop: str) -> None:
            size, digest, _ = expected[sop]
            body = client.single_image(series_uid, sop, expected_size=size)
            if hashlib.sha256(body).hexdigest() != digest:
                raise AssertionError(f"instance {sop}: bytes differ from the archive")

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fetch, in_order))
        results.put(("ok", start, time.monotonic()))
    except BaseException as exc:  # reported to the parent, which fails the run
        results.put(("error", repr(exc), 0.0))
    finally:
        client.close()


# ---------------------------------------------------------------------------------------- the runs
@dataclass
class Figures:
    origin: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, origin: int, seconds: float) -> None:
        self.origin.append(origin)
        self.seconds.append(seconds)

    @property
    def median_origin(self) -> float:
        return statistics.median(self.origin)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def run_nodes(ctx, emu, base_url: str, n: int, series_uid: str, expected, workers: int) -> tuple[int, float]:
    """N node processes released together; returns (server requests, wall seconds)."""
    barrier = ctx.Barrier(n + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=node_main, args=(base_url, series_uid, expected, workers, barrier, results),
                         daemon=True) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        emu.reset_stats()
        barrier.wait(NODE_TIMEOUT)          # every node has imported nbiafs and built its client
        outcomes = [results.get(timeout=NODE_TIMEOUT) for _ in procs]
        for p in procs:
            p.join(NODE_TIMEOUT)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    errors = [o[1] for o in outcomes if o[0] != "ok"]
    if errors:
        raise RuntimeError(f"a node failed: {errors[0]}")
    wall = max(o[2] for o in outcomes) - min(o[1] for o in outcomes)
    return sum(emu.stats().values()), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--latency", type=float, default=0.04, help="seconds the server waits per request")
    parser.add_argument("--workers", type=int, default=8, help="parallel requests per node (mount default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is shown)")
    parser.add_argument("--data", help="emulator archive directory (default: a temporary one)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from nginxproxy import NginxProxy  # the same rendering of the shipped config as the tests

    from nbiafs.emulator import Emulator, ensure_archive

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="nbiafs-bench-cluster-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "archive"
        archive = ensure_archive(data)
        series = max(archive.series, key=lambda s: s.image_count)
        instances = sorted(archive.instances_of(series.uid), key=lambda i: (i.instance_number, i.sop_uid))
        expected = {i.sop_uid: (i.size, hashlib.sha256(i.path.read_bytes()).hexdigest(), pos)
                    for pos, i in enumerate(instances)}
        total = sum(i.size for i in instances)
        print(f"series {series.uid}: {len(instances)} instances, {total / 1e6:.1f} MB; server latency "
              f"{args.latency * 1000:.0f} ms/request; {args.workers} requests at once per node; "
              f"median of {args.repeat}", flush=True)
        emu = Emulator(data, port=0, latency=args.latency).start()
        proxies: list[NginxProxy] = []
        rows: dict[int, dict[str, Figures]] = {}
        try:
            for n in args.nodes:
                figures = rows.setdefault(n, {"direct": Figures(), "cold": Figures(), "warm": Figures()})
                for rep in range(args.repeat):
                    figures["direct"].add(*run_nodes(ctx, emu, emu.url, n, series.uid, expected, args.workers))
                    proxy = NginxProxy(emu.url, Path(tmp) / f"nginx-{n}-{rep}").start()
                    proxies.append(proxy)
                    try:
                        figures["cold"].add(*run_nodes(ctx, emu, proxy.url, n, series.uid, expected, args.workers))
                        figures["warm"].add(*run_nodes(ctx, emu, proxy.url, n, series.uid, expected, args.workers))
                    finally:
                        proxy.stop()
                print_row(n, figures, header=n == args.nodes[0])
        finally:
            for proxy in proxies:
                proxy.stop()
            emu.stop()
    return 0


def print_row(n: int, figures: dict[str, Figures], header: bool) -> None:
    if header:
        print()
        print("| nodes | server requests: direct | proxy cold | proxy warm | wall s: direct | proxy cold | proxy warm |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    d, c, w = figures["direct"], figures["cold"], figures["warm"]

    def req(f: Figures) -> str:
        return f"{f.median_origin:.0f} ({f.median_origin / d.median_origin:.2f}x)"

    def sec(f: Figures) -> str:
        return f"{f.median_seconds:.2f} ({f.median_seconds / d.median_seconds:.2f}x)"

    print(f"| {n} | {d.median_origin:.0f} | {req(c)} | {req(w)} | {d.median_seconds:.2f} | {sec(c)} | {sec(w)} |",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
