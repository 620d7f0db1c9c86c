"""``nbiafs refresh PATH...``: ask the mount holding each PATH to list it again now.

Collections gain patients and series; a mount keeps listings for ``--metadata-ttl`` (a day by default).
This asks the running mount (through its control socket, :mod:`nbiafs.control`) to list PATH again at
once and to forget what may have changed below it (see :meth:`nbiafs.catalog.Catalog.refresh`), and
prints what appeared and what went.
"""

from __future__ import annotations

import argparse
import sys

from . import control, daemon
from .errors import NbiaError


def refresh(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.paths:
        try:
            mountpoint, inside = daemon.mount_containing(path)
            record = daemon.mount_record(mountpoint)
            if record is None or not record.get("control"):
                raise NbiaError(f"the mount on {mountpoint} has no running process to ask (is it stale?)")
            reply = control.request(record["control"], {"op": "refresh", "path": inside})
            if not reply.get("ok"):
                raise NbiaError(str(reply.get("error") or "refused"))
        except NbiaError as exc:
            print(f"nbiafs: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        added, removed = reply.get("added") or [], reply.get("removed") or []
        changed = reply.get("changed_series")
        how = f"; getUpdatedSeries: {changed} changed series" if changed is not None else ""
        print(f"{path}: {reply.get('note')}: {len(added)} new, {len(removed)} gone, "
              f"{reply.get('forgotten')} listing(s) to ask again{how}")
        for name in added:
            print(f"  + {name}")
        for name in removed:
            print(f"  - {name}")
    return 1 if failed else 0
