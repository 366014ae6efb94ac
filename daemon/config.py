"""One typed, frozen config object, validated completely at start-up.

The file is TOML; every section maps onto a frozen dataclass below. Unknown keys and wrong
types are errors, so a typo is never silently ignored. Every message is one line that names
the file and the dotted key: ``config.toml: policy.max_lifetime_days: must be >= 1``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

DEFAULT_PATHS = (Path("/etc/groupgate/config.toml"), Path("config.toml"))
ENV_CONFIG = "GROUPGATE_CONFIG"

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, default_unit: str = "s") -> timedelta:
    """Parse ``90``, ``45s``, ``5m``, ``12h``, ``30d`` or ``2w``; ValueError otherwise."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 12h, 30d or 2w")
    try:
        return timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2) or default_unit])
    except OverflowError:
        raise ValueError(f"{text!r} is far too long a duration") from None


# Validators take the converted value and return an error text, or None when fine.
Check = Callable[[Any], "str | None"]


def _range(lo: float | None = None, hi: float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _store_url(v: Any) -> str | None:
    if not isinstance(v, str) or not v.startswith(("sqlite://", "postgresql")):
        return "must be a sqlite:/// path URL or a postgresql+psycopg:// URL"
    if v.startswith("postgresql") and not v.startswith("postgresql+psycopg://"):
        return "PostgreSQL URLs must use the psycopg 3 driver: postgresql+psycopg://"
    return None


def _opt(check: Check | None = None, *, duration: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if check is not None:
        meta["check"] = check
    if duration:
        meta["duration"] = True
    return meta


@dataclass(frozen=True)
class StoreConfig:
    url: str = field(default="sqlite:////var/lib/groupgate/groupgate.db",
                     metadata=_opt(_store_url))
    retention_days: int = field(default=90, metadata=_opt(_range(1, 36500)))

    def __repr__(self) -> str:
        return f"StoreConfig(url={redact_url(self.url)!r}, retention_days={self.retention_days})"


@dataclass(frozen=True)
class GroupLimit:
    group: str = field(default="", metadata=_opt(lambda v: None if v else "must not be empty"))
    max_lifetime_days: int = field(default=90, metadata=_opt(_range(1, 36500)))


@dataclass(frozen=True)
class PolicyConfig:
    max_lifetime_days: int = field(default=90, metadata=_opt(_range(1, 3650)))
    default_lifetime_days: int = field(default=30, metadata=_opt(_range(1, 3650)))
    max_tokens_per_user: int = field(default=10, metadata=_opt(_range(1, 10000)))
    allowed_groups: tuple[str, ...] = ("token-users",)
    admin_groups: tuple[str, ...] = ()
    nested_groups: bool = True
    group_limits: tuple[GroupLimit, ...] = ()

    def lifetime_cap_days(self, groups: frozenset[str]) -> int:
        """The largest limit among the user's limit groups; the global maximum otherwise."""
        caps = [g.max_lifetime_days for g in self.group_limits if g.group.casefold() in groups]
        return max(caps) if caps else self.max_lifetime_days

    def configured_groups(self) -> tuple[str, ...]:
        """Every group the directory must resolve, each once, in a stable order."""
        names = [*self.allowed_groups, *self.admin_groups, *(g.group for g in self.group_limits)]
        return tuple(dict.fromkeys(names))


FLAVORS = ("openldap", "ad", "389ds", "generic")


def _ldap_urls(v: Any) -> str | None:
    for url in v:
        if not url.startswith(("ldap://", "ldaps://")):
            return f"{url!r} must start with ldap:// or ldaps://"
    return None


def _filter_text(v: Any) -> str | None:
    if v and not (v.startswith("(") and v.endswith(")") and v.count("(") == v.count(")")):
        return "must be an LDAP filter in parentheses, such as (objectClass=person)"
    return None


@dataclass(frozen=True)
class DirectoryConfig:
    """Where and how to read the directory. Empty strings mean "the flavor's default"."""

    urls: tuple[str, ...] = field(default=(), metadata=_opt(_ldap_urls))
    flavor: str = field(default="openldap", metadata=_opt(_one_of(*FLAVORS)))
    base_dn: str = ""
    user_base_dn: str = ""
    group_base_dn: str = ""
    bind_dn: str = ""
    bind_password_file: str = ""
    start_tls: bool = False
    ca_file: str = ""
    tls_verify: bool = True
    user_filter: str = field(default="", metadata=_opt(_filter_text))
    username_attribute: str = ""
    group_filter: str = field(default="", metadata=_opt(_filter_text))
    group_name_attribute: str = "cn"
    member_attributes: tuple[str, ...] = ()
    membership: str = field(default="", metadata=_opt(
        lambda v: None if v in ("", "member", "memberof") else "must be member or memberof"))
    disabled_filter: str = field(default="", metadata=_opt(_filter_text))
    page_size: int = field(default=500, metadata=_opt(_range(1, 100000)))
    range_size: int = field(default=1500, metadata=_opt(_range(1, 100000)))
    timeout_seconds: int = field(default=30, metadata=_opt(_range(1, 3600)))
    connect_timeout_seconds: int = field(default=5, metadata=_opt(_range(1, 600)))

    @property
    def configured(self) -> bool:
        return bool(self.urls)


def _min_seconds(lo: int) -> Check:
    def check(v: Any) -> str | None:
        return f"must be at least {lo}s" if v.total_seconds() < lo else None

    return check


@dataclass(frozen=True)
class SyncConfig:
    max_suspend_count: int = field(default=50, metadata=_opt(_range(0, 10_000_000)))
    max_suspend_fraction: float = field(default=0.2, metadata=_opt(_range(0.0, 1.0)))
    interval: timedelta = field(default=timedelta(minutes=5),
                                metadata=_opt(_min_seconds(1), duration=True))
    jitter: timedelta = field(default=timedelta(seconds=10),
                              metadata=_opt(_min_seconds(0), duration=True))
    expire_interval: timedelta = field(default=timedelta(minutes=1),
                                       metadata=_opt(_min_seconds(1), duration=True))


def _listen(v: Any) -> str | None:
    if v == "":
        return None
    _host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be host:port such as 127.0.0.1:9464, or empty to turn it off"
    return None


@dataclass(frozen=True)
class HttpConfig:
    """The optional HTTP service (groupgate[http]): forward auth, self-service API and page."""

    listen: str = field(default="", metadata=_opt(_listen))
    tls_cert_file: str = ""
    tls_key_file: str = ""
    allow_plain_http: bool = False
    realm: str = field(default="groupgate", metadata=_opt(
        lambda v: None if v and '"' not in v and "\\" not in v else "must be non-empty, "
        "without quotes or backslashes"))
    session_secret_file: str = ""
    session_minutes: int = field(default=60, metadata=_opt(_range(1, 24 * 60)))
    # Secure cookies go over HTTPS only: right behind a TLS proxy, which is the recommended
    # set-up even when groupgate itself listens on plain loopback HTTP.
    secure_cookies: bool = True
    login_max_failures: int = field(default=5, metadata=_opt(_range(1, 1000)))
    login_window_seconds: int = field(default=300, metadata=_opt(_range(1, 86400)))
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = field(default="", metadata=_opt(_listen))


@dataclass(frozen=True)
class Argon2Config:
    time_cost: int = field(default=1, metadata=_opt(_range(1, 100)))
    memory_kib: int = field(default=8192, metadata=_opt(_range(8, 4 * 1024 * 1024)))
    parallelism: int = field(default=1, metadata=_opt(_range(1, 64)))


@dataclass(frozen=True)
class VerifyConfig:
    last_used_resolution_seconds: int = field(default=60, metadata=_opt(_range(0, 86400)))
    cache_size: int = field(default=10000, metadata=_opt(_range(0, 10_000_000)))
    max_failures: int = field(default=10, metadata=_opt(_range(1, 100000)))
    failure_window_seconds: int = field(default=60, metadata=_opt(_range(1, 86400)))
    argon2: Argon2Config = field(default_factory=Argon2Config)


@dataclass(frozen=True)
class LogConfig:
    format: str = field(default="auto", metadata=_opt(_one_of("auto", "json", "console")))
    level: str = field(default="info",
                       metadata=_opt(_one_of("debug", "info", "warning", "error")))


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="<defaults>", compare=False)


def redact_url(url: str) -> str:
    """Hide a password in a database URL (user part or query) so it can be logged or shown."""
    shown = re.sub(r"(://[^/@]*?:)[^/]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", shown)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str, file: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {where}: must be a table")
        return _build(tp, value, where, file)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, file, meta)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {where}: must be a list")
        return tuple(_convert(v, item_tp, f"{where}[{i}]", file, {})
                     for i, v in enumerate(value))
    if meta.get("duration"):
        if isinstance(value, int) and not isinstance(value, bool):
            return timedelta(seconds=value)
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"{file}: {where}: {exc}") from None
        raise ConfigError(f"{file}: {where}: must be a duration such as \"5m\"")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{file}: {where}: must be {_type_name(tp)}, not {value!r}")
    return value


def _build(cls: Any, table: Mapping[str, Any], prefix: str, file: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in table:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{file}: {where}: unknown key (known here: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in table:
            continue
        where = f"{prefix}.{name}" if prefix else name
        value = _convert(table[name], hints[name], where, file, f.metadata)
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{file}: {where}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


_INLINE_SECRETS = {"bind_password": "directory.bind_password"}


def _cross_checks(cfg: Config, file: str) -> None:
    if cfg.policy.default_lifetime_days > cfg.policy.max_lifetime_days:
        raise ConfigError(f"{file}: policy.default_lifetime_days: must not exceed "
                          f"policy.max_lifetime_days ({cfg.policy.max_lifetime_days})")
    if cfg.directory.configured and not cfg.policy.allowed_groups:
        raise ConfigError(f"{file}: policy.allowed_groups: must name at least one group")
    for i, name in enumerate(cfg.policy.configured_groups()):
        if not name.strip():
            raise ConfigError(f"{file}: policy: group name #{i + 1} is empty")
    if cfg.directory.configured and not cfg.directory.base_dn:
        raise ConfigError(f"{file}: directory.base_dn: must be set when directory.urls is")
    h = cfg.http
    if bool(h.tls_cert_file) != bool(h.tls_key_file):
        raise ConfigError(f"{file}: http.tls_key_file: set both tls_cert_file and tls_key_file")
    if h.listen and not h.tls_cert_file and not h.allow_plain_http:
        host = h.listen.rpartition(":")[0].strip("[]")
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise ConfigError(f"{file}: http.listen: {h.listen} is not loopback; plain HTTP is "
                              "served on loopback only (put a TLS proxy in front), unless "
                              "http.tls_cert_file/tls_key_file are set or "
                              "http.allow_plain_http = true")
    if cfg.directory.start_tls and any(u.startswith("ldaps://") for u in cfg.directory.urls):
        raise ConfigError(f"{file}: directory.start_tls: not with ldaps:// URLs (already TLS)")


def _refuse_inline_secrets(data: Mapping[str, Any], file: str) -> None:
    directory = data.get("directory")
    if isinstance(directory, dict) and "bind_password" in directory:
        raise ConfigError(
            f"{file}: directory.bind_password: inline secrets are not accepted; use "
            "directory.bind_password_file, $GROUPGATE_BIND_PASSWORD or the systemd credential "
            "ldap-bind-password")


def parse_config(data: Mapping[str, Any], file: str = "<config>") -> Config:
    _refuse_inline_secrets(data, file)
    cfg = _build(Config, data, "", file)
    cfg = dataclasses.replace(cfg, source=file)
    _cross_checks(cfg, file)
    return typing.cast(Config, cfg)


def find_config(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The explicit path, else $GROUPGATE_CONFIG, else the first default path that exists."""
    if path is not None:
        return Path(path)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config; without any file the embedded defaults apply."""
    found = find_config(path)
    if found is None:
        return Config()
    name = str(found)
    try:
        raw = found.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    return parse_config(data, name)
