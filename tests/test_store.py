"""The store (schema, migrations, compare-and-set moves) and the server config."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from botutil import write_config

from bot import store
from bot.config import TOKEN_ENV, TOKEN_FILE_ENV, ConfigError, load_config
from bot.files import PathError, member_path


def test_migrations_run_once_and_bring_old_databases_up_to_date(tmp_path):
    path = tmp_path / "db" / "x.db"
    db = store.open_store(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(store.MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.ensure_member(db, "alice", ["r1"])
    again = store.open_store(path)  # a second start must keep the data
    assert store.member_roles(again, "alice") == ["r1"]
    empty = tmp_path / "old.db"
    sqlite3.connect(empty).close()
    assert "jobs" in store.open_store(empty).table_names()


def test_transition_is_compare_and_set(tmp_path):
    db = store.open_store(tmp_path / "x.db")
    store.ensure_member(db, "m")
    job = store.insert_job(db, "train", "m", "n", {"a": 1}, "k", 10, 5.0)
    assert store.transition(db, job, ("queued",), "running", worker="0:cpu")
    assert not store.transition(db, job, ("queued",), "running", worker="1:cpu")
    assert store.get_job(db, job).worker == "0:cpu"
    store.add_event(db, job, "stage", {"message": "キャラ ✨"})
    assert store.job_events(db, job)[0]["message"] == "キャラ ✨"


def test_cli_and_server_share_the_database(tmp_path):
    path = tmp_path / "x.db"
    db = store.open_store(path)
    store.ensure_member(db, "m")
    with store.immediate(db):
        store.insert_job(db, "gen", "m", None, {}, "k", 1, 1.0)
        code = f"from bot import store; db = store.open_store({str(path)!r}); print(len(store.list_jobs(db)))"
        # Another process waits for the write lock instead of failing, and sees the commit after.
        other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert other.communicate(timeout=60)[0].strip() == "1"


def test_config_paths_relative_to_the_file_and_token_never_from_it(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    assert cfg.store == tmp_path / "db" / "loracord.db" and cfg.data_dir == tmp_path / "data"
    assert cfg.base("tiny") == "tiny:sd15"
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        cfg.discord_token()
    secret = tmp_path / "token"
    secret.write_text("file-token\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    assert cfg.discord_token() == "file-token"
    monkeypatch.setenv(TOKEN_ENV, "env-token")
    assert cfg.discord_token() == "env-token"
    bad = tmp_path / "bad.toml"
    bad.write_text('[discord]\ntoken = "abc"\n')
    with pytest.raises(ConfigError, match="must not be in the config file"):
        load_config(bad)
    bad.write_text('[workers]\ndevices = ["gpu0"]\n')
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        load_config(bad)
    bad.write_text("[quota]\nstamina = 5\n")
    with pytest.raises(ConfigError, match="quota.stamina"):
        load_config(bad)


def test_member_paths_stay_inside_the_member_folder(tmp_path):
    assert member_path(tmp_path, "123", "datasets", "キャラ").is_relative_to(tmp_path / "members" / "123")
    for parts in (("..", "x"), ("a/../../b",), ("",)):
        with pytest.raises(PathError):
            member_path(tmp_path, "123", *parts)
    (tmp_path / "members" / "123").mkdir(parents=True)
    (tmp_path / "members" / "123" / "link").symlink_to(tmp_path)
    with pytest.raises(PathError, match="outside"):
        member_path(tmp_path, "123", "link")
