"""Config: every mistake is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config, load_config, parse_config
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_shipped_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "config.toml")
    assert cfg.policy.max_lifetime_days == 90


def test_no_file_means_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GROUPGATE_CONFIG", raising=False)
    monkeypatch.setattr("daemon.config.DEFAULT_PATHS", (tmp_path / "none.toml",))
    assert load_config() == Config()


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "[policy]\nmax_tokens_per_user = 3\n")
    monkeypatch.setenv("GROUPGATE_CONFIG", str(p))
    assert load_config().policy.max_tokens_per_user == 3


@pytest.mark.parametrize("text,message", [
    ("[policy]\nmax_lifetime_dayz = 3\n", "policy.max_lifetime_dayz: unknown key"),
    ("[polcy]\n", "polcy: unknown key"),
    ("[policy]\nmax_lifetime_days = \"90\"\n", "policy.max_lifetime_days: must be an integer"),
    ("[policy]\nmax_lifetime_days = true\n", "policy.max_lifetime_days: must be an integer"),
    ("[policy]\nmax_lifetime_days = 0\n", "policy.max_lifetime_days: must be >= 1"),
    ("[policy]\ndefault_lifetime_days = 100\n", "policy.default_lifetime_days: must not exceed"),
    ("[store]\nurl = \"mysql://x\"\n", "store.url: must be a sqlite"),
    ("[store]\nurl = \"postgresql://x/y\"\n", "store.url: PostgreSQL URLs must use the psycopg 3"),
    ("[log]\nformat = \"xml\"\n", "log.format: must be one of auto, json, console"),
    ("[verify.argon2]\nmemory_kib = 1\n", "verify.argon2.memory_kib: must be >= 8"),
    ("policy = 3\n", "policy: must be a table"),
    ("[policy\n", "invalid TOML"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    line = str(exc.value)
    assert line.startswith(f"{p}: ")
    assert message in line
    assert "\n" not in line


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_config(tmp_path / "nope.toml")


def test_store_url_password_is_not_shown_in_repr() -> None:
    cfg = parse_config({"store": {"url": "postgresql+psycopg://gg:hunter2@db/gg"}})
    assert "hunter2" not in repr(cfg)
