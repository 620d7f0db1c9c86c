"""The shipped nginx cache (docs/deploy/nginx/) in front of the emulator: one cache for a cluster.

A real nginx is started from the shipped files (placeholders filled in, nothing else changed) on a free
127.0.0.1 port. What is shown: two mounts (two nodes, separate caches) reading one series through the
proxy make the server send each instance once; answers to calls with credentials are never stored nor
served to another client; errors, cut-off transfers and empty instances are never stored; the real
server's "do not cache" headers are overridden for anonymous v4 answers only; POST calls are keyed by
their body. Without nginx these tests are skipped (a failure under CI=true).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from conftest import require_tool
from nginxproxy import PLACEHOLDERS, SNIPPET, STANDALONE, NginxProxy, SpringLikeUpstream, placeholders_in

V4 = "/nbia-api/services/v4"
V2 = "/nbia-api/services/v2"
#: The anonymous search endpoints whose answers the proxy keeps.
CACHED_LISTINGS = ("getCollectionValues", "getPatient", "getPatientStudy", "getSeries", "getSOPInstanceUIDs",
                   "getSeriesSize")
TIMEOUT = 30


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[[str], NginxProxy]]:
    """``make(upstream_url)`` -> a running :class:`NginxProxy`; every one is stopped after the test."""
    require_tool("nginx", "nginx")
    started: list[NginxProxy] = []
    counter = iter(range(100))

    def make(upstream: str) -> NginxProxy:
        proxy = NginxProxy(upstream, tmp_path / f"nginx{next(counter)}")
        started.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture
def spring() -> Iterator[SpringLikeUpstream]:
    server = SpringLikeUpstream()
    try:
        yield server
    finally:
        server.close()


def get(proxy: NginxProxy, path: str, **kwargs: object) -> requests.Response:
    return requests.get(proxy.url + path, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def cache_status(response: requests.Response) -> str:
    return response.headers.get("X-Cache-Status", "-")


def login(proxy: NginxProxy, user: str, password: str) -> str:
    reply = requests.post(proxy.url + "/nbia-api/oauth/token", timeout=TIMEOUT,
                          data={"username": user, "password": password, "client_id": "NBIA",
                                "grant_type": "password"})
    assert reply.status_code == 200, reply.text
    assert cache_status(reply) == "-"
    return str(reply.json()["access_token"])


def restricted_collection(archive) -> str:
    public = {c.name for c in archive.visible_collections("nbia_guest")}
    return next(c.name for c in archive.visible_collections("nbiafs_test") if c.name not in public)


# ----------------------------------------------------------------------------------- the shipped files
def test_the_user_sets_exactly_three_values_in_marked_places() -> None:
    snippet = SNIPPET.read_text()
    assert placeholders_in(snippet) == set(PLACEHOLDERS)
    assert placeholders_in(STANDALONE.read_text()) == set()
    code = [line.split("#", 1)[0].strip() for line in snippet.splitlines()]
    # the server goes only into proxy_pass, the port into the one listen line, the directory only
    # into the cache paths: nothing else of the shipped file depends on where it runs
    for name, allowed in (("NBIAFS_UPSTREAM", "proxy_pass "), ("NBIAFS_LISTEN", "listen "),
                          ("NBIAFS_CACHE_DIR", "proxy_cache_path ")):
        uses = [line for line in code if "${" + name + "}" in line]
        assert uses and all(line.startswith(allowed) for line in uses), (name, uses)
    assert sum(line.startswith("listen ") for line in code) == 1
    # every location that talks to the server uses the one upstream
    assert all(line == "proxy_pass ${NBIAFS_UPSTREAM};" for line in code if line.startswith("proxy_pass"))


# ------------------------------------------------------------------------------------- two real nodes
@pytest.mark.fuse
def test_two_nodes_reading_one_series_get_each_instance_from_the_server_once(
        make_emulator, archive, mounter, proxy_factory) -> None:
    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    # --api v4: anonymous search API (cacheable); stays right once v4 becomes the default
    nodes = [mounter(server=proxy.url, layout="uid", extra=("--api", "v4")) for _ in range(2)]
    assert nodes[0].cache_dir != nodes[1].cache_dir
    series = max((s for s in archive.series if s.collection == "Demo-Chest-CT"), key=lambda s: s.image_count)
    instances = archive.instances_of(series.uid)
    assert len(instances) == series.image_count > 10
    emu.reset_stats()

    def read_series(node) -> None:
        folder = node.path / series.collection / series.patient_id / series.study_uid / series.uid
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # DICOM files only
        assert names == sorted(f"{i.sop_uid}.dcm" for i in instances)
        for inst in instances:  # every byte checked against the archive
            assert (folder / f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()

    read_series(nodes[0])
    after_first = emu.stats()
    assert after_first["getSingleImage"] == len(instances)   # reads and prefetch, each instance once
    read_series(nodes[1])
    after_second = emu.stats()
    # the second node's reads, prefetch and listings were all answered by the proxy
    assert after_second["getSingleImage"] == len(instances)
    for endpoint in CACHED_LISTINGS:
        assert after_second[endpoint] == after_first[endpoint], endpoint
    assert sum(after_first[e] for e in CACHED_LISTINGS) > 0   # the listings did go through the proxy

    for node in nodes:
        node.unmount()
    proxy.stop()  # graceful: every request finished and logged before the log is read
    lines = proxy.log_lines()
    images = [line for line in lines if line.uri.endswith("/getSingleImage")]
    assert sum(line.cache == "MISS" for line in images) == len(instances)
    assert all(line.cache in ("MISS", "HIT") and line.auth == "anon" for line in images), images
    # whatever went with a token (the login check, the advanced drill-downs) was passed through
    assert [line for line in lines if line.auth == "token" and line.cache not in ("-", "BYPASS")] == []


# ------------------------------------------------------------------------------ accounts and tokens
def test_calls_with_a_named_account_always_reach_the_server_and_are_never_shared(
        make_emulator, archive, proxy_factory) -> None:
    from nbiafs.emulator import TEST_PASSWORD
    from nbiafs.emulator.server import NO_AUTH_BODY

    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    token = login(proxy, "nbiafs_test", TEST_PASSWORD)
    assert login(proxy, "nbiafs_test", TEST_PASSWORD) != token   # the token call itself is never cached
    assert emu.stats()["token"] == 2
    restricted = f"{V2}/getSeries?Collection={restricted_collection(archive)}"
    auth = {"Authorization": f"Bearer {token}"}

    first, second = get(proxy, restricted, headers=auth), get(proxy, restricted, headers=auth)
    assert first.status_code == second.status_code == 200 and first.content and first.content == second.content
    assert emu.stats()["getSeries"] == 2                        # both reached the server
    assert cache_status(first) == cache_status(second) == "-"   # v2 goes through a location that never caches
    # the named account's answer is never served to another client
    anonymous = get(proxy, restricted)
    assert (anonymous.status_code, anonymous.content) == (500, NO_AUTH_BODY)
    guest = get(proxy, restricted, headers={"Authorization": f"Bearer {login(proxy, 'nbia_guest', '')}"})
    assert guest.status_code == 200 and guest.content == b""
    assert emu.stats()["getSeries"] == 4

    # a token on an otherwise cacheable v4 call: passed through, not stored either
    public = f"{V4}/getSeries?Collection=Demo-Head-MR"
    for _ in range(2):
        assert cache_status(get(proxy, public, headers=auth)) == "BYPASS"
    assert emu.stats()["getSeries"] == 6
    assert cache_status(get(proxy, public)) == "MISS"           # nothing was stored for it by the token calls
    assert cache_status(get(proxy, public)) == "HIT"
    assert emu.stats()["getSeries"] == 7

    for _ in range(2):
        assert requests.get(proxy.url + "/nbia-api/logout", headers=auth, timeout=TIMEOUT).status_code == 200
    assert emu.stats()["logout"] == 2


def test_a_token_in_the_query_or_form_is_never_cached(proxy_factory, spring) -> None:
    proxy = proxy_factory(spring.url)
    for _ in range(2):
        assert cache_status(get(proxy, f"{V4}/getSeries?Collection=A&access_token=secret")) == "BYPASS"
        reply = requests.post(proxy.url + f"{V4}/getImageDrillDown", data={"list": "7", "access_token": "s"},
                              timeout=TIMEOUT)
        assert cache_status(reply) == "BYPASS"
    assert len(spring.requests_to("getSeries")) == 2
    assert len(spring.requests_to("getImageDrillDown")) == 2


# ------------------------------------------------------------------------------------ what is stored
def test_the_real_servers_no_cache_headers_are_overridden_and_its_cookie_is_neither_kept_nor_given(
        proxy_factory, spring) -> None:
    proxy = proxy_factory(spring.url)
    path = f"{V4}/getSingleImage?SeriesInstanceUID=1.2&SOPInstanceUID=1.2.3"
    replies = [get(proxy, path, headers={"Cookie": "JSESSIONID=client"}) for _ in range(3)]
    assert [cache_status(r) for r in replies] == ["MISS", "HIT", "HIT"]
    assert {r.content for r in replies} == {b"DICM-1.2.3-v1"}
    assert all("Set-Cookie" not in r.headers for r in replies)
    (seen,) = spring.requests_to("getSingleImage")
    assert "cookie" not in seen.headers and "authorization" not in seen.headers
    head = requests.head(proxy.url + path, timeout=TIMEOUT)
    assert head.status_code == 200 and cache_status(head) == "HIT"   # HEAD shares GET's entry
    assert len(spring.requests_to("getSingleImage")) == 1


def test_an_empty_instance_is_never_stored_but_an_empty_listing_is(proxy_factory, spring) -> None:
    proxy = proxy_factory(spring.url)
    spring.empty_instances.add("9.9")
    path = f"{V4}/getSingleImage?SeriesInstanceUID=1.2&SOPInstanceUID=9.9"
    assert [cache_status(get(proxy, path)) for _ in range(2)] == ["MISS", "MISS"]
    assert len(spring.requests_to("getSingleImage")) == 2
    # v4's empty answer is its real "nothing found" (no token, so no hidden auth failure): kept
    spring.listing = b""
    replies = [get(proxy, f"{V4}/getSeries?Collection=Empty") for _ in range(2)]
    assert [(r.status_code, r.content, cache_status(r)) for r in replies] == [(200, b"", "MISS"), (200, b"", "HIT")]
    assert len(spring.requests_to("getSeries")) == 1


def test_post_calls_are_cached_by_their_body(proxy_factory, spring) -> None:
    proxy = proxy_factory(spring.url)
    url = proxy.url + f"{V4}/getImageDrillDown"

    def post(pk: str, **kwargs: object) -> requests.Response:
        return requests.post(url, data={"list": pk}, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]

    a1, b1, a2, b2 = post("1"), post("2"), post("1"), post("2")
    assert [cache_status(r) for r in (a1, b1, a2, b2)] == ["MISS", "MISS", "HIT", "HIT"]
    assert a1.json()["list"] == a2.json()["list"] == ["1"] and b1.json()["list"] == b2.json()["list"] == ["2"]
    assert len(spring.requests_to("getImageDrillDown")) == 2
    # a GET of the same URL is another request, not the POST's answer
    assert get(proxy, f"{V4}/getImageDrillDown").status_code == 404
    # a body too big to be kept whole in memory (and so in the key) is refused, never forwarded
    huge = requests.post(url, data={"list": "x" * (2 << 20)}, timeout=TIMEOUT)
    assert huge.status_code == 413
    assert [s.method for s in spring.requests_to("getImageDrillDown")] == ["POST", "POST", "GET"]


def test_a_client_asking_for_a_fresh_copy_replaces_the_cached_one(proxy_factory, spring) -> None:
    proxy = proxy_factory(spring.url)
    path = f"{V4}/getSingleImage?SeriesInstanceUID=1.2&SOPInstanceUID=4.5"
    assert get(proxy, path).content == b"DICM-4.5-v1"
    spring.version = 2
    assert get(proxy, path).content == b"DICM-4.5-v1"        # kept: instances do not change
    fresh = get(proxy, path, headers={"Cache-Control": "no-cache"})
    assert (fresh.content, cache_status(fresh)) == (b"DICM-4.5-v2", "BYPASS")
    after = get(proxy, path)
    assert (after.content, cache_status(after)) == (b"DICM-4.5-v2", "HIT")
    assert len(spring.requests_to("getSingleImage")) == 2


@pytest.mark.parametrize("status", [404, 429, 500, 503])
def test_error_answers_are_never_stored(make_emulator, proxy_factory, status: int) -> None:
    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    path = f"{V4}/getSeries?Collection=Demo-Chest-CT"
    emu.inject_fault("getSeries", status=status)
    failed = get(proxy, path)
    assert failed.status_code == status
    ok = get(proxy, path)                       # the failure was not kept: the server is asked again
    assert ok.status_code == 200 and ok.content and cache_status(ok) == "MISS"
    assert cache_status(get(proxy, path)) == "HIT"
    assert emu.stats()["getSeries"] == 2


def test_an_unknown_instance_is_never_stored(make_emulator, archive, proxy_factory) -> None:
    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    series = archive.series[0]
    path = f"{V4}/getSingleImage?SeriesInstanceUID={series.uid}&SOPInstanceUID=1.2.3.4.5.6.7"
    assert [get(proxy, path).status_code for _ in range(2)] == [500, 500]   # the real server's answer
    assert emu.stats()["getSingleImage"] == 2


def test_a_transfer_cut_short_is_never_stored(make_emulator, archive, proxy_factory) -> None:
    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    inst = archive.instances_of(archive.series[0].uid)[0]
    expected = inst.path.read_bytes()
    path = f"{V4}/getSingleImage?SeriesInstanceUID={inst.series_uid}&SOPInstanceUID={inst.sop_uid}"
    emu.inject_fault("getSingleImage", truncate=True)
    try:
        cut = get(proxy, path).content
    except requests.exceptions.RequestException:
        cut = None                               # the client saw the connection end early
    assert cut != expected
    whole = get(proxy, path)
    assert whole.content == expected and cache_status(whole) == "MISS"
    assert get(proxy, path).content == expected
    assert emu.stats()["getSingleImage"] == 2


def test_many_clients_missing_one_instance_at_once_cost_one_server_request(
        make_emulator, archive, proxy_factory) -> None:
    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    inst = archive.instances_of(archive.series[0].uid)[0]
    path = f"{V4}/getSingleImage?SeriesInstanceUID={inst.series_uid}&SOPInstanceUID={inst.sop_uid}"
    emu.inject_fault("getSingleImage", delay=1.0)   # the first request is slow: the others pile up behind it
    clients = 6
    start = threading.Barrier(clients)
    bodies: list[bytes] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            start.wait(TIMEOUT)
            bodies.append(get(proxy, path).content)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * TIMEOUT)
    assert not errors and len(bodies) == clients
    assert set(bodies) == {inst.path.read_bytes()}
    assert emu.stats()["getSingleImage"] == 1


def test_only_the_nbia_api_is_proxied(make_emulator, proxy_factory) -> None:
    emu = make_emulator()
    proxy = proxy_factory(emu.url)
    for path in ("/emulator/stats", "/", "/nbia-api-other/x"):
        assert get(proxy, path).status_code == 404
    assert sum(emu.stats().values()) == 0
    # an endpoint name that is not plain letters and digits is never cached (passed through as is)
    odd = get(proxy, f"{V4}/..;/v2/getSeries")
    assert cache_status(odd) == "-"
