"""The options table is the one source of every option: these tests fail when a flag, a Settings field, a
default written elsewhere, the config file or docs/usage.md drifts from it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest
from conftest import REPO, nbiafs_cli

from nbiafs import options
from nbiafs.auth import TokenManager
from nbiafs.cli import build_parser
from nbiafs.client import NbiaClient
from nbiafs.config import Settings, load_config_file, resolve
from nbiafs.errors import ConfigError
from nbiafs.fetchjob import FETCH_GROUPS
from nbiafs.http import RetryPolicy
from nbiafs.mountcmd import MOUNT_GROUPS


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_every_option_is_a_settings_field_and_every_field_an_option() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == [o.name for o in options.OPTIONS]


def test_settings_defaults_are_the_tables() -> None:
    settings = Settings()
    for opt in options.OPTIONS:
        if opt.name != "cache_dir":  # computed at run time (the platform's cache directory)
            assert getattr(settings, opt.name) == opt.default, opt.name


@pytest.mark.parametrize(("command", "groups"), [
    ("mount", MOUNT_GROUPS), ("demo", MOUNT_GROUPS), ("config", options.GROUPS),
    ("prefetch", FETCH_GROUPS), ("download", FETCH_GROUPS),
])
def test_every_flag_of_the_commands_comes_from_the_table(command, groups) -> None:
    parser = _subparser(command)
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    mine = options.in_groups(groups)
    wanted = {o.flag for o in mine}
    assert wanted <= flags
    extra = flags - wanted - {"--help", "--config", "--ready-fd", "--password-fd"}
    assert not extra, f"flags outside the options table: {extra}"
    for opt in mine:  # and their help is the table's
        action = next(a for a in parser._actions if opt.flag in a.option_strings)
        assert opt.help in (action.help or ""), opt.name
        assert action.default is None  # "not given": the config file and the environment may set it


def test_defaults_written_in_the_layers_are_the_tables() -> None:
    policy = RetryPolicy()
    assert (policy.retries, policy.backoff, policy.deadline) == (
        options.default("retries"), options.default("backoff"), options.default("deadline"))
    client = inspect.signature(NbiaClient.__init__).parameters
    assert client["retries"].default == options.default("retries")
    assert client["backoff"].default == options.default("backoff")
    assert client["deadline"].default == options.default("deadline")
    assert client["api"].default == options.default("api")
    assert client["timeout"].default == (options.default("connect_timeout"), options.default("read_timeout"))
    tokens = inspect.signature(TokenManager.__init__).parameters
    assert tokens["timeout"].default == (options.default("connect_timeout"), options.default("read_timeout"))


def test_usage_md_holds_the_generated_table() -> None:
    text = (REPO / "docs" / "usage.md").read_text()
    begin, end = text.index(options.MARKDOWN_BEGIN), text.index(options.MARKDOWN_END) + len(options.MARKDOWN_END)
    assert text[begin:end] == options.markdown_table(), "regenerate it: python scripts/gen_options_doc.py"


def test_flags_environment_and_config_file_layer_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('cache-size = "50G"\nworkers = 3\nlayout = "uid"\nprefetch = false\n')
    resolved = resolve({"workers": "5"}, environ={"NBIAFS_LAYOUT": "descriptive"}, config_path=config)
    s = resolved.settings
    assert (s.cache_size, s.workers, s.layout, s.prefetch) == (50 * 1024**3, 5, "descriptive", False)
    assert resolved.sources["cache_size"].startswith("config file")
    assert resolved.sources["workers"] == "command line"
    assert resolved.sources["layout"] == "environment NBIAFS_LAYOUT"
    assert resolved.sources["retries"] == "default"


@pytest.mark.parametrize(("text", "message"), [
    ('cache-sise = "5G"\n', "unknown option 'cache-sise'"),
    ('cache-size = "lots"\n', "bad size"),
    ('layout = "flat"\n', "not one of"),
    ("workers = 0\n", "at least 1"),
    ("retries = [\n", "config file"),
])
def test_a_bad_config_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(config) if "workers" not in text else resolve({}, environ={}, config_path=config)


def test_every_option_parses_what_it_shows() -> None:
    for opt in options.OPTIONS:
        if opt.default is not None and opt.kind != "path":
            assert opt.parse(opt.show(opt.default)) == opt.default, opt.name


def test_nbiafs_config_prints_every_setting_and_where_it_came_from(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('cache-size = "50G"\n')
    done = nbiafs_cli("config", "--workers", "3", env={"NBIAFS_CONFIG": str(config), "NBIAFS_RETRIES": "2"})
    assert done.returncode == 0, done.stderr
    lines = {line.split("=", 1)[0].strip(): line for line in done.stdout.splitlines() if "=" in line}
    assert set(lines) >= {o.name.replace("_", "-") for o in options.OPTIONS}
    assert '"50G"' in lines["cache-size"] and str(config) in lines["cache-size"]
    assert "command line" in lines["workers"] and "environment NBIAFS_RETRIES" in lines["retries"]
