"""The mount(8) helper's argument and option handling, without mounting: mount(8)'s calling convention,
the options table's names and parsers, the generic options it must ignore, and clear refusals."""

from __future__ import annotations

import argparse

import pytest

from nbiafs import cli, mounthelper, options
from nbiafs.errors import ConfigError
from nbiafs.mounthelper import mount_arguments, parse_call, parse_options, split_options


def test_split_options_keeps_quoted_commas() -> None:
    assert split_options('ro,cache_dir="/a,b",server=public,,') == ["ro", "cache_dir=/a,b", "server=public"]
    with pytest.raises(ConfigError, match="quote"):
        split_options('cache_dir="/a')


def test_what_mount_passes_for_an_fstab_line() -> None:
    # exactly what util-linux 2.38 passed to a probe helper for the line
    # "public /mnt fuse.nbiafs cache_dir=/y,cache_size=20G,allow_other,noauto,_netdev,user,x-systemd.automount 0 0"
    call = parse_call(["public", "/mnt", "-o", "rw,noexec,nosuid,nodev,cache_dir=/y,cache_size=20G,allow_other,"
                       "_netdev,user"])
    assert call.source == "public" and call.mountpoint == "/mnt"
    assert call.values == {"server": "public", "cache_dir": "/y", "cache_size": "20G", "allow_other": True}
    assert call.ignored == ["rw", "noexec", "nosuid", "nodev", "_netdev", "user"]


def test_generic_options_of_mount_fuse_and_systemd_are_ignored() -> None:
    items = ["ro", "rw", "defaults", "nofail", "noauto", "auto", "user", "users", "_netdev", "nosuid", "nodev",
             "noexec", "noatime", "x-systemd.automount", "x-systemd.requires=network-online.target",
             "x-systemd.mount-timeout=90", "comment=systemd.automount"]
    values, config, ignored = parse_options(items)
    assert values == {} and config is None and ignored == items


def test_table_names_values_and_booleans() -> None:
    values, config, _ = parse_options(["cache-size=1.5T", "umask=077", "uid=1000", "offline", "noprefetch",
                                       "drilldown=false", "layout=uid", "log_level=INFO", "user=alice",
                                       "config=/etc/nbiafs/tcia.toml"])
    assert values == {"cache_size": "1.5T", "umask": "077", "uid": "1000", "offline": True, "prefetch": False,
                      "drilldown": "false", "layout": "uid", "log_level": "INFO", "user": "alice"}
    assert config == "/etc/nbiafs/tcia.toml"
    assert parse_options(["no_prefetch"])[0] == {"prefetch": False}
    assert parse_options(["prefetch=no"])[0] == {"prefetch": "no"}


@pytest.mark.parametrize(("items", "message"), [
    (["cache_sise=2G"], "unknown mount option cache_sise=2G"),
    (["bogus", "also=1"], "unknown mount options bogus, also=1"),
    (["cache_size=lots"], "cache_size=lots"),
    (["layout=flat"], "layout"),
    (["cache_size"], "needs a value"),
    (["umask=999"], "umask"),
    (["noserver"], "unknown mount option noserver"),
])
def test_bad_options_are_refused_clearly(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options(items)


def test_sloppy_mounts_ignore_unknown_options() -> None:
    values, _, ignored = parse_options(["bogus=1", "cache_size=2G"], sloppy=True)
    assert values == {"cache_size": "2G"} and ignored == ["bogus=1"]
    assert parse_call(["public", "/m", "-s", "-o", "bogus"]).ignored == ["bogus"]


def test_the_source_is_the_server() -> None:
    assert parse_call(["nlst", "/m"]).values == {"server": "nlst"}
    assert parse_call(["http://127.0.0.1:8080", "/m"]).values == {"server": "http://127.0.0.1:8080"}
    for default in ("nbiafs", "none", "NONE", ""):
        assert "server" not in parse_call([default, "/m"]).values
    assert parse_call(["nbiafs", "/m", "-o", "server=nlst"]).values == {"server": "nlst"}
    assert parse_call(["nlst", "/m", "-o", "server=nlst"]).values == {"server": "nlst"}
    # mount -t nbiafs makes a path of a source that names a file in its working directory
    assert parse_call(["/home/me/nbiafs", "/m"]).values == {}
    assert parse_call(["/srv/x/nlst/", "/m"]).values == {"server": "nlst"}
    with pytest.raises(ConfigError, match="is a path"):
        parse_call(["/dev/sda1", "/m"])
    with pytest.raises(ConfigError, match="two servers"):
        parse_call(["public", "/m", "-o", "server=nlst"])


def test_mount_8s_flags() -> None:
    call = parse_call(["public", "/m", "-v", "-n", "-f", "-o", "ro", "-o", "cache_size=1G", "-t", "fuse.nbiafs"])
    assert call.verbose and call.fake and call.values == {"server": "public", "cache_size": "1G"}
    assert parse_call(["public", "/m", "-t", "nbiafs"]).values == {"server": "public"}
    with pytest.raises(ConfigError, match="namespace"):
        parse_call(["public", "/m", "-N", "/proc/1/ns/mnt"])
    with pytest.raises(ConfigError, match="sshfs"):
        parse_call(["public", "/m", "-t", "fuse.sshfs"])


def test_the_arguments_are_those_nbiafs_mount_parses() -> None:
    call = parse_call(["public", "/mnt/tcia", "-o", "cache_dir=/c,cache_size=20G,allow_other,noprefetch,uid=7"])
    parsed = cli.build_parser().parse_args(["mount", "/mnt/tcia", "--server", "public", "--cache-dir", "/c",
                                           "--cache-size", "20G", "--allow-other", "--no-prefetch", "--uid", "7"])
    ours = mount_arguments(call)
    groups = mounthelper.GROUPS
    assert {k: str(v) for k, v in options.given_flags(ours, groups).items()} == \
        {k: str(v) for k, v in options.given_flags(parsed, groups).items()}
    assert set(vars(parsed)) - {"command"} <= set(vars(ours))
    assert isinstance(ours, argparse.Namespace) and ours.ready_fd is None and ours.mountpoint == "/mnt/tcia"


def test_main_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NBIAFS_CONFIG", str(tmp_path / "none.toml"))
    assert mounthelper.main(["public", str(tmp_path), "-o", "bogus"]) == mounthelper.EXIT_USAGE
    assert "unknown mount option bogus" in capsys.readouterr().err
    assert mounthelper.main(["public", str(tmp_path / "missing"), "-f"]) == mounthelper.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert mounthelper.main(["public", str(tmp_path), "-f", "-o", "cache_dir=/c,ro"]) == 0  # fake: checks only
    assert mounthelper.main([]) == mounthelper.EXIT_USAGE
