"""Stopping the parts of a mount in a given order, whatever one of them raises.

Why its own module: a mount stops from two places (``App.close`` when the CLI or a library user
ends it, ``NbiaFS.destroy`` when the kernel unmounts it), each with its own list of parts, and both
must keep the same promise: every part is asked to stop, in order, and a part that fails to stop is
logged, never allowed to leave the ones after it running (a store worker or a token refresher left
behind would keep the process alive after the unmount).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


def stop_in_order(parts: Iterable[tuple[str, Callable[[], object] | None]]) -> None:
    """Call each ``(name, stop)`` in order (None: that part is absent); a failure is logged with its
    name and the next part is stopped all the same."""
    for name, stop in parts:
        if stop is None:
            continue
        try:
            stop()
        except Exception:
            log.exception("error while stopping the %s", name)
