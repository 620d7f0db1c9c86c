"""An NBIA-compatible HTTP server with a deterministic sample archive (tests, benchmarks, ``nbiafs demo``).

It behaves as ``/work/shared/nbia-api.md`` says the real server does, quirks included, and can take the
shape of today's public server (anonymous v4 only), an old one (v2 + token only) or both. Public surface:
``ensure_archive`` (the sample archive or a synthetic profile), ``Archive`` and ``Emulator`` (faults,
stats, shaping, ``add_series``), plus the account constants. See the emulator section of
``docs/architecture.md``.
"""

from .accounts import GUEST_USER, TEST_PASSWORD, TEST_USER
from .archive import Archive, ensure_archive

__all__ = ["Archive", "Emulator", "ensure_archive", "GUEST_USER", "TEST_USER", "TEST_PASSWORD"]


def __getattr__(name: str) -> object:  # the server module is imported only when Emulator is used
    if name == "Emulator":
        from .server import Emulator

        return Emulator
    raise AttributeError(name)
