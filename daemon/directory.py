"""The ldap3 adapter: reads a complete, frozen snapshot of users and group memberships.

Only this module imports ldap3. It never writes to the directory. Its one rule: a read is
complete or it is an error. Every search is paged; a size limit, time limit, referral or any
other non-success result raises :class:`DirectoryUnavailable` (ldap3's paged search would
otherwise stop quietly and hand back a shorter list, and a shorter list would suspend people).
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from ldap3 import ANONYMOUS, BASE, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from daemon.config import DirectoryConfig, PolicyConfig
from daemon.errors import ConfigError, DirectoryUnavailable, NotPermitted
from daemon.model import DirectoryUser, SkippedEntry, Snapshot, canonical_username

log = structlog.get_logger("groupgate.directory")

IN_CHAIN = "1.2.840.113556.1.4.1941"  # AD's LDAP_MATCHING_RULE_IN_CHAIN
CREDENTIAL_NAME = "ldap-bind-password"
ENV_BIND_PASSWORD = "GROUPGATE_BIND_PASSWORD"

RESULT_SUCCESS = 0
RESULT_NO_SUCH_OBJECT = 32
RESULT_INVALID_CREDENTIALS = 49
_NO_ATTRS = ["1.1"]


@dataclass(frozen=True)
class Flavor:
    user_filter: str
    username_attribute: str
    group_filter: str
    member_attributes: tuple[str, ...]
    membership: str  # "member": read group member attributes; "memberof": read users' memberOf
    disabled_attribute: str | None
    in_chain: bool  # AD's transitive matching rule for nested groups
    range_retrieval: bool  # AD returns huge multi-valued attributes in ranges


FLAVORS = {
    "openldap": Flavor("(objectClass=inetOrgPerson)", "uid",
                       "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)"
                       "(objectClass=posixGroup))",
                       ("member", "uniqueMember", "memberUid"), "member",
                       "pwdAccountLockedTime", False, False),
    "389ds": Flavor("(objectClass=inetOrgPerson)", "uid",
                    "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)"
                    "(objectClass=posixGroup))",
                    ("member", "uniqueMember", "memberUid"), "member", "nsAccountLock",
                    False, False),
    "ad": Flavor("(&(objectCategory=person)(objectClass=user))", "sAMAccountName",
                 "(objectClass=group)", ("member",), "member", "userAccountControl",
                 True, True),
    "generic": Flavor("(objectClass=person)", "uid",
                      "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)"
                      "(objectClass=posixGroup))",
                      ("member", "uniqueMember", "memberUid"), "member", None, False, False),
}
_DN_VALUED = {"member", "uniquemember"}
# Naming contexts AD places textually below the domain DN, which searches from the domain
# root are referred to: they hold configuration and DNS data, never users or groups.
_AD_PARTITIONS = {"cn=configuration", "dc=domaindnszones", "dc=forestdnszones"}


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def read_bind_password(cfg: DirectoryConfig, file: str = "config") -> Secret | None:
    """The service account password: config file key, systemd credential, or environment.

    A password file that other users can read is refused, like ssh refuses a loose key.
    """
    path: Path | None = None
    if cfg.bind_password_file:
        path = Path(cfg.bind_password_file)
        where = "directory.bind_password_file"
    elif os.environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if candidate.exists():
            path, where = candidate, f"credential {CREDENTIAL_NAME}"
    if path is not None:
        try:
            mode = path.stat().st_mode
            if mode & stat.S_IROTH:
                raise ConfigError(f"{file}: {where}: {path} is readable by everyone; "
                                  f"chmod 600 {path}")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{file}: {where}: {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: {where}: cannot read {path}: {exc}") from None
        return Secret(text.rstrip("\r\n"))
    env = os.environ.get(ENV_BIND_PASSWORD)
    if env is not None:
        return Secret(env)
    return None


# --- DN and value handling -----------------------------------------------------------------

_HEX_ESCAPE = re.compile(r"\\([0-9A-Fa-f]{2})|\\(.)")


def _unescape_dn_value(value: str) -> str:
    if "\\" not in value:
        return value
    raw = bytearray()
    pos = 0
    for m in _HEX_ESCAPE.finditer(value):
        raw += value[pos:m.start()].encode("utf-8")
        raw += bytes([int(m.group(1), 16)]) if m.group(1) else m.group(2).encode("utf-8")
        pos = m.end()
    raw += value[pos:].encode("utf-8")
    return raw.decode("utf-8", errors="replace")


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on `sep` outside backslash escapes and (legacy RFC 1779) double quotes."""
    parts, cur, i, quoted = [], [], 0, False
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _key_value(value: str) -> str:
    """Re-escape the characters that would make two different DNs share a key."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("+", "\\+")


def normalize_dn(dn: str) -> str:
    """A comparison key for DNs: case-folded, spaces trimmed, escapes decoded.

    Servers hand the same DN back in different spellings (``\\,`` vs ``\\2C``, ``ou=People``
    vs ``ou=people``); membership is decided on this key, never on the raw string.
    """
    if "\\" not in dn and '"' not in dn and "+" not in dn:
        out = []
        for rdn in dn.split(","):
            attr, _, value = rdn.partition("=")
            out.append(f"{attr.strip().lower()}={value.strip().casefold()}")
        return ",".join(out)
    out = []
    for rdn in _split_unescaped(dn, ","):
        avas = []
        for ava in _split_unescaped(rdn, "+"):
            attr, _, value = ava.partition("=")
            value = value.strip()
            if value.startswith('"') and value.endswith('"') and len(value) > 1:
                value = value[1:-1]
            value = _key_value(_unescape_dn_value(value).casefold())
            avas.append(f"{attr.strip().lower()}={value}")
        out.append("+".join(sorted(avas)))
    return ",".join(out)


def _strip_uid_suffix(value: str) -> str:
    """uniqueMember values may end in #'0101'B (nameAndOptionalUID); the DN is before it."""
    if value.endswith("'B") and "#'" in value:
        return value[:value.rindex("#'")]
    return value


def _decode_each(values: Sequence[bytes], dn: str, attr: str) -> list[str]:
    """Every value that is UTF-8; each one that is not is skipped with an event naming it,
    so one bad value never silently takes the others (a whole group's members) with it."""
    out = []
    for v in values:
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            log.warning("directory.entry_skipped", dn=dn, why=f"a {attr} value is not UTF-8")
    return out


def _decode(values: Sequence[bytes]) -> list[str] | None:
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        return None


def _attr(raw: Any, name: str) -> list[bytes]:
    values = raw.get(name)
    return list(values) if values else []


def _is_dn_name(name: str) -> bool:
    """Groups may be named by DN (``cn=x,ou=groups,dc=example,dc=org``) or by name."""
    return "=" in name and "," in name


# --- the adapter ----------------------------------------------------------------------------

@dataclass
class _UserEntry:
    username: str
    dn: str
    disabled: bool
    member_of: tuple[str, ...]
    raw_name: str = ""  # the attribute value as stored (memberUid matches it case-exactly)


class LdapDirectory:
    """Reads users and configured groups from LDAP / Active Directory; never writes."""

    def __init__(self, cfg: DirectoryConfig, policy: PolicyConfig, *,
                 password: Secret | None = None, source: str = "config") -> None:
        if not cfg.configured:
            raise ConfigError(f"{source}: directory.urls: no directory configured")
        self.cfg = cfg
        self.policy = policy
        flavor = FLAVORS[cfg.flavor]
        self.flavor = flavor
        self.user_filter = cfg.user_filter or flavor.user_filter
        self.username_attr = cfg.username_attribute or flavor.username_attribute
        self.group_filter = cfg.group_filter or flavor.group_filter
        self.member_attrs = cfg.member_attributes or flavor.member_attributes
        self.membership = cfg.membership or flavor.membership
        self.user_base = cfg.user_base_dn or cfg.base_dn
        self.group_base = cfg.group_base_dn or cfg.base_dn
        self.in_chain = flavor.in_chain and policy.nested_groups
        self.range_retrieval = flavor.range_retrieval
        self._password = password
        self._reported: set[tuple[str, str]] = set()
        if cfg.bind_dn and password is None:
            raise ConfigError(f"{source}: directory.bind_dn is set but no password: set "
                              f"directory.bind_password_file, ${ENV_BIND_PASSWORD} or the "
                              f"systemd credential {CREDENTIAL_NAME}")
        self._tls = self._make_tls(source)

    def __repr__(self) -> str:
        return f"LdapDirectory(urls={list(self.cfg.urls)!r}, flavor={self.cfg.flavor!r})"

    # -- connections --

    def _make_tls(self, source: str) -> Tls:
        if self.cfg.ca_file and not Path(self.cfg.ca_file).is_file():
            raise ConfigError(f"{source}: directory.ca_file: {self.cfg.ca_file} does not exist")
        if not self.cfg.tls_verify:
            log.warning("directory.tls_verify_disabled",
                        detail="certificates of directory servers are NOT checked")
        return Tls(validate=ssl.CERT_REQUIRED if self.cfg.tls_verify else ssl.CERT_NONE,
                   ca_certs_file=self.cfg.ca_file or None,
                   version=ssl.PROTOCOL_TLS_CLIENT)

    def _server(self, url: str) -> Server:
        return Server(url, get_info=NONE, tls=self._tls,
                      connect_timeout=self.cfg.connect_timeout_seconds)

    def _open(self, url: str, user: str | None, password: str | None) -> Connection:
        conn = Connection(
            self._server(url), user=user, password=password,
            authentication=SIMPLE if user else ANONYMOUS, raise_exceptions=False,
            auto_referrals=False, receive_timeout=self.cfg.timeout_seconds, read_only=True,
            return_empty_attributes=False, auto_range=False, check_names=False)
        if not conn.open(read_server_info=False) and conn.closed:
            raise DirectoryUnavailable(f"{url}: cannot connect")
        if self.cfg.start_tls and not conn.start_tls(read_server_info=False):
            raise DirectoryUnavailable(f"{url}: StartTLS failed: {conn.result.get('description')}")
        if url.startswith("ldap://") and not self.cfg.start_tls and user and not _loopback(url):
            log.warning("directory.insecure_transport", url=url,
                        detail="bind password sent without TLS; use ldaps:// or start_tls")
        return conn

    def _service_connection(self, url: str) -> Connection:
        pw = self._password.reveal() if self._password else None
        conn = self._open(url, self.cfg.bind_dn or None, pw)
        if not conn.bind():
            desc = conn.result.get("description", "bind failed")
            conn.unbind()
            raise DirectoryUnavailable(f"{url}: service bind as {self.cfg.bind_dn or 'anonymous'}"
                                       f" failed: {desc}")
        return conn

    def _with_failover(self, what: str, fn: Any) -> Any:
        """Run `fn(conn, url)` on the first server that answers, in configured order."""
        errors = []
        for url in self.cfg.urls:
            try:
                conn = self._service_connection(url)
            except (DirectoryUnavailable, LDAPException, OSError) as exc:
                errors.append(f"{url}: {_one_line(exc)}")
                log.warning("directory.server_failed", url=url, error=_one_line(exc))
                continue
            try:
                return fn(conn, url)
            except LDAPException as exc:
                errors.append(f"{url}: {_one_line(exc)}")
                log.warning("directory.server_failed", url=url, error=_one_line(exc))
            except DirectoryUnavailable as exc:
                errors.append(str(exc))
                log.warning("directory.server_failed", url=url, error=str(exc))
            finally:
                with contextlib.suppress(LDAPException, OSError):
                    conn.unbind()
        raise DirectoryUnavailable(f"{what}: no directory server answered: " + "; ".join(errors))

    # -- searching: complete or an error --

    def _search(self, conn: Connection, base: str, flt: str, attrs: Sequence[str], *,
                scope: Any = SUBTREE, paged: bool = True, allow_missing: bool = False
                ) -> Iterator[dict[str, Any]]:
        cookie: bytes | None = None
        while True:
            kwargs: dict[str, Any] = {"time_limit": self.cfg.timeout_seconds}
            if paged and scope is not BASE:
                kwargs.update(paged_size=self.cfg.page_size, paged_cookie=cookie)
            conn.search(base, flt, search_scope=scope, attributes=list(attrs), **kwargs)
            result = conn.result
            code = result.get("result")
            if code == RESULT_NO_SUCH_OBJECT and allow_missing:
                return
            if code != RESULT_SUCCESS:
                raise DirectoryUnavailable(
                    f"search {flt} under {base} failed: {result.get('description')}"
                    f"{': ' + result['message'] if result.get('message') else ''}")
            refs: list[str] = []
            for entry in conn.response or []:
                if entry.get("type") == "searchResEntry":
                    yield entry
                else:
                    refs.extend(entry.get("uri") or [])
            if refs:
                self._check_references(base, refs)
            if not (paged and scope is not BASE):
                return
            ctl = (result.get("controls") or {}).get("1.2.840.113556.1.4.319")
            cookie = ctl["value"]["cookie"] if ctl else None
            if not cookie:
                return

    def _check_references(self, base: str, uris: list[str]) -> None:
        """Continuation references to other naming contexts (AD's DNS zones, say) are fine;
        one into the configured user or group base means entries we would not see: error."""
        bases = {normalize_dn(self.user_base), normalize_dn(self.group_base)}
        for uri in uris:
            target = normalize_dn(uri.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0])
            if target.split(",", 1)[0] in _AD_PARTITIONS:
                continue  # AD's own naming contexts below the domain: no users or groups
            if any(target == b or target.endswith("," + b) for b in bases):
                raise DirectoryUnavailable(f"search under {base} was referred to {uri}, inside "
                                           "the configured base; groupgate does not follow "
                                           "referrals (point directory.urls at that server)")
        log.debug("directory.references_ignored", base=base, count=len(uris))

    def _read_multi(self, conn: Connection, dn: str, attr: str) -> list[bytes] | None:
        """All values of one attribute of one entry, following AD range retrieval."""
        if not self.range_retrieval:
            entries = list(self._search(conn, dn, "(objectClass=*)", [attr], scope=BASE,
                                        allow_missing=True))
            return _attr(entries[0]["raw_attributes"], attr) if entries else None
        # Ranges are positional: a change between two range reads shifts them, silently.
        # AD bumps uSNChanged on every change, so a read that spans ranges is kept only if
        # uSNChanged is the same before and after it.
        for _attempt in range(3):
            before = self._usn(conn, dn)
            values, ranges = self._read_ranges(conn, dn, attr)
            if ranges <= 1 or before == self._usn(conn, dn):
                return values
            log.info("directory.range_read_retried", dn=dn, attribute=attr)
        raise DirectoryUnavailable(f"{dn}: {attr} kept changing during range retrieval")

    def _usn(self, conn: Connection, dn: str) -> bytes | None:
        entries = list(self._search(conn, dn, "(objectClass=*)", ["uSNChanged"], scope=BASE,
                                    allow_missing=True))
        vals = _attr(entries[0]["raw_attributes"], "uSNChanged") if entries else []
        return vals[0] if vals else None

    def _read_ranges(self, conn: Connection, dn: str, attr: str
                     ) -> tuple[list[bytes] | None, int]:
        values: list[bytes] = []
        ranges = 0
        low = 0
        step = self.cfg.range_size
        while True:
            want = f"{attr};range={low}-{low + step - 1}"
            entries = list(self._search(conn, dn, "(objectClass=*)", [want], scope=BASE,
                                        allow_missing=True))
            ranges += 1
            if not entries:
                return (None if low == 0 else values), ranges
            raw = entries[0]["raw_attributes"]
            key = next((k for k in raw if k.lower().startswith(attr.lower() + ";range=")), None)
            if key is None:
                values.extend(_attr(raw, attr))  # server ignored the range: all values
                return values, ranges
            values.extend(raw[key] or [])  # ldap3 gives None for an empty last range
            high = key.rsplit("-", 1)[1]
            if high == "*":
                return values, ranges
            low = int(high) + 1

    # -- users --

    def _user_attrs(self) -> list[str]:
        attrs = [self.username_attr]
        if self.flavor.disabled_attribute:
            attrs.append(self.flavor.disabled_attribute)
        if self.membership == "memberof":
            attrs.append("memberOf")
        return attrs

    def _parse_user(self, entry: dict[str, Any], skipped: list[SkippedEntry]) -> _UserEntry | None:
        dn = entry["dn"]
        raw = entry["raw_attributes"]
        names = _attr(raw, self.username_attr)
        if not names:
            skipped.append(SkippedEntry(dn, f"no {self.username_attr}"))
            return None
        decoded = _decode(names)
        if decoded is None:
            skipped.append(SkippedEntry(dn, f"{self.username_attr} is not UTF-8"))
            return None
        if len(decoded) > 1:
            skipped.append(SkippedEntry(dn, f"several values of {self.username_attr}"))
            return None
        name = canonical_username(decoded[0])
        if not name or not name.isprintable() or len(name) > 256:
            skipped.append(SkippedEntry(dn, f"unusable {self.username_attr}"))
            return None
        member_of: tuple[str, ...] = ()
        if self.membership == "memberof":
            member_of = tuple(normalize_dn(v)
                              for v in _decode_each(_attr(raw, "memberOf"), dn, "memberOf"))
        return _UserEntry(name, dn, self._disabled(raw), member_of, decoded[0])

    def _disabled(self, raw: Any) -> bool:
        attr = self.flavor.disabled_attribute
        if attr is None:
            return False
        values = _decode(_attr(raw, attr)) or []
        if not values:
            return False
        if attr == "userAccountControl":
            try:
                return bool(int(values[0]) & 0x2)
            except ValueError:
                return True  # unreadable flags: treat as disabled, the safe side
        if attr == "nsAccountLock":
            return values[0].strip().lower() == "true"
        return True  # pwdAccountLockedTime present: locked

    def _disabled_by_filter(self, conn: Connection, base_filter: str) -> set[str]:
        if not self.cfg.disabled_filter:
            return set()
        flt = f"(&{base_filter}{self.cfg.disabled_filter})"
        return {normalize_dn(e["dn"]) for e in self._search(conn, self.user_base, flt, _NO_ATTRS)}

    # -- groups --

    def _find_group(self, conn: Connection, name: str) -> str | None:
        """The DN of a configured group, given by name or DN; None when it does not exist."""
        if _is_dn_name(name):
            found = list(self._search(conn, name, self.group_filter, _NO_ATTRS, scope=BASE,
                                      allow_missing=True))
        else:
            flt = (f"(&{self.group_filter}"
                   f"({self.cfg.group_name_attribute}={escape_filter_chars(name)}))")
            found = list(self._search(conn, self.group_base, flt, _NO_ATTRS))
        if len(found) > 1:
            raise DirectoryUnavailable(f"group {name!r} is ambiguous: {len(found)} entries match")
        return found[0]["dn"] if found else None

    def _is_group(self, conn: Connection, dn: str) -> bool:
        return bool(list(self._search(conn, dn, self.group_filter, _NO_ATTRS, scope=BASE,
                                      allow_missing=True)))

    def _members_walk(self, conn: Connection, group_dn: str, users_by_dn: dict[str, _UserEntry],
                      users_by_name: dict[str, _UserEntry]) -> set[str]:
        """Usernames in a group by walking member attributes; nested groups with cycle checks."""
        members: set[str] = set()
        seen = {normalize_dn(group_dn)}
        queue = [group_dn]
        not_groups: set[str] = set()
        while queue:
            gdn = queue.pop()
            for attr in self.member_attrs:
                raw = self._read_multi(conn, gdn, attr)
                values = _decode_each(raw or [], gdn, attr)
                if attr.lower() not in _DN_VALUED:
                    for v in values:
                        u = users_by_name.get(canonical_username(v))
                        if u is not None:
                            members.add(u.username)
                    continue
                for v in values:
                    key = normalize_dn(_strip_uid_suffix(v))
                    user = users_by_dn.get(key)
                    if user is not None:
                        members.add(user.username)
                    elif (self.policy.nested_groups and key not in seen
                          and key not in not_groups):
                        seen.add(key)
                        if self._is_group(conn, v):
                            queue.append(_strip_uid_suffix(v))
                        else:
                            not_groups.add(key)
        return members

    def _members_in_chain(self, conn: Connection, group_dn: str,
                          users_by_dn: dict[str, _UserEntry]) -> set[str]:
        flt = f"(&{self.user_filter}(memberOf:{IN_CHAIN}:={escape_filter_chars(group_dn)}))"
        out = set()
        for e in self._search(conn, self.user_base, flt, _NO_ATTRS):
            u = users_by_dn.get(normalize_dn(e["dn"]))
            if u is not None:
                out.add(u.username)
        return out

    def _members_memberof(self, conn: Connection, group_dn: str,
                          users: Sequence[_UserEntry]) -> set[str]:
        wanted = {normalize_dn(group_dn)}
        if self.policy.nested_groups:
            queue = [group_dn]
            while queue:
                flt = f"(&{self.group_filter}(memberOf={escape_filter_chars(queue.pop())}))"
                for e in self._search(conn, self.group_base, flt, _NO_ATTRS):
                    key = normalize_dn(e["dn"])
                    if key not in wanted:
                        wanted.add(key)
                        queue.append(e["dn"])
        return {u.username for u in users if wanted.intersection(u.member_of)}

    # -- the snapshot --

    def snapshot(self) -> Snapshot:
        """Read everything policy needs; raises DirectoryUnavailable rather than return less."""
        return self._with_failover("snapshot", self._snapshot)  # type: ignore[no-any-return]

    def _snapshot(self, conn: Connection, url: str) -> Snapshot:
        started = time.monotonic()
        taken_at = datetime.now(UTC)
        skipped: list[SkippedEntry] = []
        by_name: dict[str, list[_UserEntry]] = {}
        for entry in self._search(conn, self.user_base, self.user_filter, self._user_attrs()):
            user = self._parse_user(entry, skipped)
            if user is not None:
                by_name.setdefault(user.username, []).append(user)
        users_by_name: dict[str, _UserEntry] = {}
        for name, entries in by_name.items():
            if len(entries) > 1:
                skipped.extend(SkippedEntry(e.dn, f"duplicate username {name!r}") for e in entries)
            else:
                users_by_name[name] = entries[0]
        users_by_dn = {normalize_dn(u.dn): u for u in users_by_name.values()}
        disabled = self._disabled_by_filter(conn, self.user_filter)

        group_members: dict[str, set[str]] = {}
        for name in self.policy.configured_groups():
            dn = self._find_group(conn, name)
            if dn is None:
                log.warning("directory.group_not_found", group=name, base=self.group_base)
                group_members[name.casefold()] = set()
                continue
            if self.membership == "memberof":
                members = self._members_memberof(conn, dn, list(users_by_name.values()))
            elif self.in_chain:
                members = self._members_in_chain(conn, dn, users_by_dn)
            else:
                members = self._members_walk(conn, dn, users_by_dn, users_by_name)
            group_members[name.casefold()] = members

        for s in skipped:
            # Warn once per entry and process; a daemon re-reading every few minutes would
            # otherwise repeat the same warnings all day.
            level = log.debug if (s.dn, s.why) in self._reported else log.warning
            level("directory.entry_skipped", dn=s.dn, why=s.why)
            self._reported.add((s.dn, s.why))
        # Invert group -> members once, and share one frozenset per distinct combination:
        # 100,000 users fall into a handful of combinations.
        groups_of: dict[str, list[str]] = {}
        for g, members in group_members.items():
            for m in members:
                groups_of.setdefault(m, []).append(g)
        shared: dict[tuple[str, ...], frozenset[str]] = {(): frozenset()}
        users = {}
        for name, u in users_by_name.items():
            key = tuple(groups_of.get(name, ()))
            groups = shared.get(key)
            if groups is None:
                groups = shared[key] = frozenset(key)
            users[name] = self._make_user(u, groups, disabled)
        return Snapshot(taken_at=taken_at, users=users,
                        group_sizes={g: len(m) for g, m in group_members.items()},
                        skipped=tuple(skipped), server=url,
                        seconds=time.monotonic() - started)

    def _directory_user(self, u: _UserEntry, disabled_dns: set[str],
                        group_members: dict[str, set[str]]) -> DirectoryUser:
        groups = frozenset(g for g, m in group_members.items() if u.username in m)
        return self._make_user(u, groups, disabled_dns)

    def _make_user(self, u: _UserEntry, groups: frozenset[str],
                   disabled_dns: set[str]) -> DirectoryUser:
        allowed = any(g.casefold() in groups for g in self.policy.allowed_groups)
        admin = any(g.casefold() in groups for g in self.policy.admin_groups)
        disabled = u.disabled or (bool(disabled_dns) and normalize_dn(u.dn) in disabled_dns)
        return DirectoryUser(u.username, u.dn, disabled, allowed, admin, groups)

    # -- one user (token creation, `directory user`) --

    def lookup_user(self, username: str) -> DirectoryUser | None:
        """What the directory says about one user right now, groups resolved upwards."""
        return self._with_failover(  # type: ignore[no-any-return]
            "user lookup", lambda conn, url: self._lookup(conn, username))

    def _find_user(self, conn: Connection, username: str) -> _UserEntry | None:
        name = canonical_username(username)
        if not name:
            return None
        # The name as typed (stripped), not case-folded: LDAP matching ignores case but does
        # not fold (ß is not ss); entries are then compared by their canonical form.
        # A canonical name (from a session or the store) is tried as well.
        found: list[_UserEntry] = []
        for spelling in dict.fromkeys((username.strip(), name)):
            flt = f"(&{self.user_filter}({self.username_attr}={escape_filter_chars(spelling)}))"
            skipped: list[SkippedEntry] = []
            found = [u for e in self._search(conn, self.user_base, flt, self._user_attrs())
                     if (u := self._parse_user(e, skipped)) is not None and u.username == name]
            if found:
                break
        if len(found) != 1:
            if len(found) > 1:
                log.warning("directory.entry_skipped", dn=found[0].dn,
                            why=f"duplicate username {name!r}")
            return None
        return found[0]

    def _lookup(self, conn: Connection, username: str) -> DirectoryUser | None:
        user = self._find_user(conn, username)
        if user is None:
            return None
        names = self.policy.configured_groups()
        group_dns = {name.casefold(): self._find_group(conn, name) for name in names}
        found = self._groups_of(conn, user)
        members = {g: ({user.username} if dn is not None and normalize_dn(dn) in found else set())
                   for g, dn in group_dns.items()}
        disabled: set[str] = set()
        if self.cfg.disabled_filter:
            flt = f"(&{self.user_filter}{self.cfg.disabled_filter})"
            if list(self._search(conn, user.dn, flt, _NO_ATTRS, scope=BASE, allow_missing=True)):
                disabled.add(normalize_dn(user.dn))
        return self._directory_user(user, disabled, members)

    def _groups_of(self, conn: Connection, user: _UserEntry) -> set[str]:
        """Normalized DNs of every group the user is in (transitively when nesting is on)."""
        found: set[str]
        if self.membership == "memberof":
            found = set(user.member_of)
            queue = list(found)
            while self.policy.nested_groups and queue:
                raw = self._read_multi(conn, queue.pop(), "memberOf") or []
                for v in _decode_each(raw, user.dn, "memberOf"):
                    k = normalize_dn(v)
                    if k not in found:
                        found.add(k)
                        queue.append(v)
            return found
        if self.in_chain:
            flt = f"(&{self.group_filter}(member:{IN_CHAIN}:={escape_filter_chars(user.dn)}))"
            return {normalize_dn(e["dn"]) for e in
                    self._search(conn, self.group_base, flt, _NO_ATTRS)}
        terms = []
        for attr in self.member_attrs:
            if attr.lower() in _DN_VALUED:
                terms.append(f"({attr}={escape_filter_chars(user.dn)})")
                continue
            # memberUid matches case-exactly: ask for the stored spelling and the folded one
            for value in dict.fromkeys((user.raw_name or user.username, user.username)):
                terms.append(f"({attr}={escape_filter_chars(value)})")
        found = set()
        frontier = [f"(&{self.group_filter}(|{''.join(terms)}))"]
        while frontier:
            flt = frontier.pop()
            for e in self._search(conn, self.group_base, flt, _NO_ATTRS):
                key = normalize_dn(e["dn"])
                if key in found:
                    continue
                found.add(key)
                if self.policy.nested_groups:
                    dn_terms = "".join(f"({a}={escape_filter_chars(e['dn'])})"
                                       for a in self.member_attrs if a.lower() in _DN_VALUED)
                    if dn_terms:
                        frontier.append(f"(&{self.group_filter}(|{dn_terms}))")
        return found

    # -- authentication for token creation --

    def authenticate(self, username: str, password: str) -> DirectoryUser:
        """Bind as the user with their password; return what the directory says of them.

        Every failure says the same thing, so the answer does not reveal who exists.
        """
        if not password:
            raise NotPermitted("wrong username or password")  # an empty password is an
            # unauthenticated bind, which servers accept: never treat that as proof.

        def attempt(conn: Connection, url: str) -> DirectoryUser:
            user = self._find_user(conn, username)
            if user is None:
                raise NotPermitted("wrong username or password")
            probe = self._open(url, user.dn, password)
            try:
                ok = probe.bind()
                code = probe.result.get("result")
            finally:
                with contextlib.suppress(LDAPException, OSError):
                    probe.unbind()
            if not ok:
                if code == RESULT_INVALID_CREDENTIALS:
                    raise NotPermitted("wrong username or password")
                raise DirectoryUnavailable(f"{url}: bind failed: {probe.result.get('description')}")
            info = self._lookup(conn, user.raw_name or user.username)
            if info is None:
                raise NotPermitted("wrong username or password")
            return info

        return self._with_failover("authentication", attempt)  # type: ignore[no-any-return]

    # -- `groupgate directory check` --

    def check(self) -> list[tuple[str, str]]:
        """Bind, search the base, resolve each configured group; (what, result) lines."""

        def run(conn: Connection, url: str) -> list[tuple[str, str]]:
            lines = [("server", url), ("bind", self.cfg.bind_dn or "anonymous")]
            t = time.monotonic()
            n = sum(1 for _ in self._search(conn, self.user_base, self.user_filter, _NO_ATTRS))
            lines.append(("users", f"{n} under {self.user_base} matching {self.user_filter} "
                                   f"({time.monotonic() - t:.2f}s)"))
            snap = self._snapshot(conn, url)
            for name in self.policy.configured_groups():
                size = snap.group_sizes.get(name.casefold(), 0)
                lines.append((f"group {name}", f"{size} members"))
            lines.append(("skipped entries", str(len(snap.skipped))))
            lines.append(("snapshot", f"{len(snap.users)} users in {snap.seconds:.2f}s"))
            return lines

        return self._with_failover("check", run)  # type: ignore[no-any-return]


def _loopback(url: str) -> bool:
    host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


_TUPLE_TEXT = re.compile(r"""^\(+['"](.*)['"],?\)+$""", re.S)


def _one_line(exc: BaseException) -> str:
    """ldap3 wraps socket errors in (stringified) tuples; dig out the innermost message."""
    msg: object = exc
    while True:
        args = msg.args if isinstance(msg, BaseException) else msg
        if isinstance(args, tuple | list) and len(args) == 1:
            msg = args[0]
            continue
        break
    text = str(msg).strip()
    while (m := _TUPLE_TEXT.match(text)) is not None:
        text = m.group(1).strip()
    lines = text.splitlines()
    return lines[0] if lines else type(exc).__name__


def from_config(cfg: DirectoryConfig, policy: PolicyConfig, source: str = "config"
                ) -> LdapDirectory:
    return LdapDirectory(cfg, policy, password=read_bind_password(cfg, source), source=source)
