"""Settings: server names, size parsing and validation."""

import pytest

from nbiafs.config import SERVERS, Settings, parse_size, resolve_server
from nbiafs.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500M", 500 * 1024**2), ("20G", 20 * 1024**3), ("1.5T", int(1.5 * 1024**4)), ("123456", 123456),
     ("64k", 65536), ("2GiB", 2 * 1024**3), (" 3 MB ", 3 * 1024**2), (4096, 4096)],
)
def test_parse_size_accepts_binary_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-5G", "10X", "ten", "0", 0, -1, "0.1"])
def test_parse_size_rejects_nonsense_with_config_error(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_named_servers_resolve_to_their_base_urls():
    assert resolve_server("public") == SERVERS["public"]
    assert resolve_server("nlst").startswith("https://nlst.")


@pytest.mark.parametrize(
    ("url", "base"),
    [("http://127.0.0.1:8080", "http://127.0.0.1:8080"), ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
     ("https://h.example/nbia-api", "https://h.example"), ("https://h.example/sub/nbia-api/", "https://h.example/sub")],
)
def test_url_servers_are_the_part_before_nbia_api(url, base):
    assert resolve_server(url) == base


@pytest.mark.parametrize("bad", ["localhost:8080", "ftp://x", "publik", ""])
def test_unknown_servers_are_a_clear_config_error(bad):
    with pytest.raises(ConfigError, match="server"):
        resolve_server(bad)


def test_settings_validate_rejects_unknown_layout():
    with pytest.raises(ConfigError, match="layout"):
        Settings(layout="flat").validate()
    Settings(layout="uid").validate()
