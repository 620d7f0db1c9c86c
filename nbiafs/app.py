"""The composition root: settings -> the layers (token manager, client, metadata cache, catalog, store).

What it owns: which layer gets which setting, and the order in which they start and stop. Every
command that talks to a server or reads the cache builds its layers here (the mount, and the commands
and libraries that work without FUSE), so a file fetched by one is cached for all of them.

Order of stopping matters: the HTTP client first (it cuts transfers in flight, so no worker waits out
a stalled server's read timeout), then the store (its workers then end at once), then the token
manager (it logs out with its own session), then the metadata cache (it writes what is queued).
Nothing here starts a thread: :meth:`Layers.start` does, after the mount process has daemonized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .auth import TokenManager
from .catalog import Catalog
from .client import NbiaClient
from .config import GUEST_USER, Settings
from .metacache import MetadataCache
from .metafiles import MetaFiles
from .stopping import stop_in_order
from .store import InstanceStore
from .walkahead import WalkAhead

#: Seconds a thread waiting for another thread's download allows beyond the client's deadline (the
#: leader's fetch is bounded by that deadline; the margin covers writing the bytes to the cache).
WAIT_MARGIN = 15.0


@dataclass(slots=True)
class Layers:
    """The layers of one mount or command, wired together."""

    settings: Settings
    tokens: TokenManager | None
    client: NbiaClient
    meta: MetadataCache
    catalog: Catalog
    store: InstanceStore
    walker: WalkAhead | None = None
    metafiles: MetaFiles | None = None

    def start(self) -> None:
        """Start the background threads (token refresher, store workers, walk-ahead). Idempotent."""
        if self.tokens is not None:
            self.tokens.start()  # idle until a first login: anonymous v4 never wakes it
        self.store.start()
        if self.walker is not None:
            self.walker.start()

    def close_client(self) -> None:
        """Cut every HTTP transfer in flight, then stop the walk-ahead (the first steps of stopping)."""
        self.client.close()
        if self.walker is not None:
            self.walker.stop()

    def close(self) -> None:
        """Stop everything in the order the module docstring gives; safe to call twice."""
        stop_in_order((("HTTP client", self.client.close),
                       ("walk-ahead", self.walker.stop if self.walker is not None else None),
                       ("store", self.store.close),
                       ("token manager", self.tokens.close if self.tokens is not None else None),
                       ("metadata cache", self.meta.close)))


def make_client(settings: Settings, password: str = "") -> tuple[TokenManager | None, NbiaClient]:
    """The token manager (None offline) and client for ``settings``.

    The client's search API is ``settings.api``: ``auto`` decides on its first call (or when
    :meth:`NbiaClient.resolve_api` is called), ``v2``/``v4`` are used as given. A guest's token manager
    logs in only if a call needs a token (v2, or the token drill-down).
    """
    tokens = None
    if not settings.offline:
        tokens = TokenManager(settings.base_url, settings.account, password if settings.user else "",
                              timeout=settings.timeouts)
    client = NbiaClient(settings.base_url, tokens, api=settings.api, timeout=settings.timeouts,
                        retries=settings.retries, backoff=settings.backoff, deadline=settings.deadline,
                        pool_size=settings.workers + 4, connections=settings.connections)
    return tokens, client


def build_layers(settings: Settings, password: str = "") -> Layers:
    """The layers for ``settings``; ``password`` is the named account's (never stored anywhere else)."""
    tokens, client = make_client(settings, password)
    meta = MetadataCache(settings.cache_dir / "metadata", settings.namespace, settings.metadata_ttl)
    catalog: Catalog | None = None

    def on_size_mismatch(node: object, true_size: int) -> None:
        if catalog is not None:
            catalog.correct_size(node, true_size)  # type: ignore[arg-type]

    store = InstanceStore(client, settings.cache_dir, size_limit=settings.cache_size,
                          namespace=settings.namespace, offline=settings.offline, workers=settings.workers,
                          wait_timeout=settings.deadline + WAIT_MARGIN, on_size_mismatch=on_size_mismatch,
                          series_zip=settings.series_zip and settings.prefetch)
    # Without a drill-down, exact sizes are learned by fetching: store.probe.
    scope = None
    if settings.manifest is not None:
        from .manifest import read_manifest, scope_of

        scope = scope_of(client, [read_manifest(settings.manifest)], meta, settings.offline)
    catalog = Catalog(client, meta, layout=settings.layout, offline=settings.offline,
                      use_drilldown=settings.drilldown, probe=store.probe, scope=scope,
                      meta_files=settings.metadata_files)
    walker = WalkAhead(catalog) if settings.walk_ahead and not settings.offline else None
    files = None
    if settings.metadata_files:
        files = MetaFiles(catalog, client, meta, stats=lambda: store_counters(store),
                          md5_of=store.md5_of, md5s_of=store.md5s_of, datacite_url=settings.datacite_url or None)
    return Layers(settings, tokens, client, meta, catalog, store, walker, files)


def store_counters(store: InstanceStore) -> dict[str, object]:
    """What ``.nbiafs/stats.json`` shows: the store's counters."""
    return dataclasses.asdict(store.stats())


__all__ = ["Layers", "build_layers", "make_client", "GUEST_USER"]
