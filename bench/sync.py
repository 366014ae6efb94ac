"""Benchmark of a full directory sync against a realistically sized OpenLDAP and token store.

What is measured, in one run, against a throwaway slapd (``tests/servers/slapd.py``, loaded
offline with ``slapadd``) holding N users (default 100,000) and a store holding M tokens
(default 200,000, spread evenly over the users):

(a) the floor: the bare paged read of the same user entries with ldap3 (cookie loop, the
    snapshot's base and filter, attributes uid + pwdAccountLockedTime, page size 500, bound
    as the service account that the 500-entry size limit applies to), three times (twice
    before the syncs, once after); the median is the reference;
(b) a full ``run_sync`` in which nothing changes, with its timings breakdown (snapshot, load
    tokens, plan, apply). The very first sync also records what the directory says about each
    token owner (``directory_users``), so it is reported separately from a repeat no-change
    sync, which is what the daemon does on every interval;
(c) a sync after 1% of the users left the allowed group (one ldap3 modify as the rootdn
    removes N/100 direct members of ``token-users``): timings and the number of tokens
    suspended (2 per removed user with the defaults);
(d) each full sync divided by the bare paged read, and the targets: "full sync of 100,000
    users under 10 s" and "within 2x of the bare paged read".

Each run also shows the CPU seconds this Python process spent (``py cpu``) and the machine's
load average and CPU pressure before and after: on a small shared machine other work inflates
wall-clock figures, and the CPU ratio is the steadier one. Targets are judged on wall clock.

Why: sync reads the whole directory and the whole live token set on every run. Most of a
sync should be the LDAP read itself; what groupgate adds on top (parsing, group resolution,
loading tokens, planning, the one write transaction) must stay a small multiple of it, or
large directories cannot be synced at a useful interval.

Directory layout: user i is a direct member of ``token-users`` when i % 10 < 4 (40%), a member
of ``token-users-nested`` (itself a member of ``token-users``) when i % 10 == 4 (10%), and in
no allowed group otherwise. Tokens of users outside the group are stored already suspended
(``not_in_group``), so the first sync changes no token. slapadd does not run overlays, so the
LDIF carries the ``memberOf`` values the memberof overlay would have written; the later modify
then keeps them consistent. Tokens get one dummy argon2 string (no hashing) and are bulk
inserted with SQLAlchemy Core executemany.

Usage::

    python bench/sync.py [--users 100000] [--tokens 200000] [--backend sqlite|postgresql]
                         [--pg-dsn DSN] [--profile]

``--profile`` adds one more no-change sync under cProfile after the measured runs (so the
figures above stay unprofiled) and prints the functions with the largest cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import structlog  # noqa: E402

from bench.scratch import cpu_summary, pg_scratch_schema  # noqa: E402

# Before anything logs: info lines per change would distort the timings.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

import ldap3  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from ldap3 import MODIFY_DELETE, SIMPLE, SUBTREE  # noqa: E402

from daemon.config import Config, parse_config  # noqa: E402
from daemon.directory import LdapDirectory, Secret  # noqa: E402
from daemon.store import TokenStore, tokens_t  # noqa: E402
from daemon.sync import SyncReport, run_sync  # noqa: E402
from daemon.tokens import ALPHABET, ID_LEN  # noqa: E402
from tests.servers.net import free_port  # noqa: E402
from tests.servers.slapd import Slapd, SlapdError  # noqa: E402

BASE_DN = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE_DN}"
GROUPS = f"ou=groups,{BASE_DN}"
GROUP_DN = f"cn=token-users,{GROUPS}"
NESTED_DN = f"cn=token-users-nested,{GROUPS}"
USER_FILTER = "(objectClass=inetOrgPerson)"  # the openldap flavor's user filter
USER_ATTRS = ["uid", "pwdAccountLockedTime"]  # what the snapshot asks for (openldap flavor)
PAGED_OID = "1.2.840.113556.1.4.319"
PAGE_SIZE = 500

DEFAULT_PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
DUMMY_HASH = ("$argon2id$v=19$m=8192,t=1,p=1$YmVuY2gtZHVtbXktc2FsdA"
              "$ZHVtbXktaGFzaC1ub3QtYS1yZWFsLXNlY3JldC0wMDA")
INSERT_CHUNK = 5_000
TARGET_SECONDS = 10.0
TARGET_USERS = 100_000
TARGET_RATIO = 2.0


# --- the directory ------------------------------------------------------------------------------

def uid(i: int) -> str:
    return f"user{i:06d}"


def user_dn(i: int) -> str:
    return f"uid={uid(i)},{PEOPLE}"


def is_direct(i: int) -> bool:
    return i % 10 < 4


def is_nested(i: int) -> bool:
    return i % 10 == 4


def write_ldif(path: Path, slapd: Slapd, n_users: int) -> tuple[int, int]:
    """Base entries, service account, policy entry, users and the two groups.

    Returns (direct members, nested members). memberOf is written as the overlay would.
    """
    direct = nested = 0
    with path.open("w", encoding="utf-8") as out:
        w = out.write
        w(f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\no: Example\n"
          "dc: example\n\n")
        for ou in ("people", "groups", "service", "policies"):
            w(f"dn: ou={ou},{BASE_DN}\nobjectClass: organizationalUnit\nou: {ou}\n\n")
        # as in tests/fixtures/openldap.ldif: the slapd.conf names this ppolicy_default
        w(f"dn: cn=default,ou=policies,{BASE_DN}\nobjectClass: organizationalRole\n"
          "objectClass: pwdPolicy\ncn: default\npwdAttribute: userPassword\npwdLockout: TRUE\n"
          "pwdMaxFailure: 0\n\n")
        w(f"dn: {slapd.service_dn}\nobjectClass: organizationalRole\n"
          "objectClass: simpleSecurityObject\ncn: groupgate\n"
          f"description: groupgate directory reader\nuserPassword: {slapd.service_password}\n\n")
        for i in range(n_users):
            u = uid(i)
            member_of = ""
            if is_direct(i):
                member_of = f"memberOf: {GROUP_DN}\n"
                direct += 1
            elif is_nested(i):
                member_of = f"memberOf: {NESTED_DN}\n"
                nested += 1
            w(f"dn: uid={u},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {u}\ncn: User {i}\n"
              f"sn: U{i}\nmail: {u}@example.org\n{member_of}\n")
        w(f"dn: {NESTED_DN}\nobjectClass: groupOfNames\ncn: token-users-nested\n"
          f"memberOf: {GROUP_DN}\n")
        for i in range(n_users):
            if is_nested(i):
                w(f"member: {user_dn(i)}\n")
        w("\n")
        w(f"dn: {GROUP_DN}\nobjectClass: groupOfNames\ncn: token-users\nmember: {NESTED_DN}\n")
        for i in range(n_users):
            if is_direct(i):
                w(f"member: {user_dn(i)}\n")
        w("\n")
    return direct, nested


@contextmanager
def bench_slapd(workdir: Path, n_users: int) -> Iterator[tuple[Slapd, dict[str, float]]]:
    """A slapd loaded offline with slapadd, then started; stopped by its own PID at exit."""
    slapd = Slapd(workdir=workdir, port=free_port())
    slapd.write_config(None)
    ldif = workdir / "bench.ldif"
    t0 = time.perf_counter()
    direct, nested = write_ldif(ldif, slapd, n_users)
    t_ldif = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = subprocess.run(["slapadd", "-q", "-f", str(slapd.conf_path), "-l", str(ldif)],
                         capture_output=True, check=False, timeout=600)
    t_add = time.perf_counter() - t0
    if res.returncode != 0:
        raise SlapdError(f"slapadd failed with {res.returncode}: "
                         f"{res.stderr.decode('utf-8', 'replace').strip()[-2000:]}")
    ldif_mb = ldif.stat().st_size / 1e6
    ldif.unlink()
    try:
        slapd.start()
        yield slapd, {"ldif": t_ldif, "slapadd": t_add, "start": slapd.last_start_seconds,
                      "ldif_mb": ldif_mb, "direct": direct, "nested": nested}
    finally:
        slapd.stop()


@dataclass(frozen=True)
class BareRead:
    seconds: float
    cpu: float  # CPU seconds of this (Python) process; slapd's are not included
    entries: int
    pages: int


def bare_paged_read(slapd: Slapd) -> BareRead:
    """Connect, bind as the service account and page through the users."""
    gc.collect()
    c0 = time.process_time()
    t0 = time.perf_counter()
    server = ldap3.Server("127.0.0.1", port=slapd.port, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, user=slapd.service_dn, password=slapd.service_password,
                            authentication=SIMPLE, raise_exceptions=False, read_only=True,
                            return_empty_attributes=False, auto_range=False, check_names=False,
                            receive_timeout=60)
    if not conn.bind():
        raise SystemExit(f"service bind failed: {conn.result}")
    entries = pages = 0
    cookie: bytes | None = None
    try:
        while True:
            conn.search(BASE_DN, USER_FILTER, search_scope=SUBTREE, attributes=USER_ATTRS,
                        paged_size=PAGE_SIZE, paged_cookie=cookie)
            if conn.result.get("result") != 0:
                raise SystemExit(f"paged search failed: {conn.result}")
            entries += sum(1 for e in conn.response or [] if e.get("type") == "searchResEntry")
            pages += 1
            ctl = (conn.result.get("controls") or {}).get(PAGED_OID)
            cookie = ctl["value"]["cookie"] if ctl else None
            if not cookie:
                break
    finally:
        conn.unbind()
    return BareRead(time.perf_counter() - t0, time.process_time() - c0, entries, pages)


def unpaged_is_capped(slapd: Slapd) -> bool:
    """Sanity: a non-paged search as the service account stops at the 500-entry size limit."""
    server = ldap3.Server("127.0.0.1", port=slapd.port, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, user=slapd.service_dn, password=slapd.service_password,
                            raise_exceptions=False, auto_bind=True)
    try:
        conn.search(BASE_DN, USER_FILTER, attributes=["1.1"])
        return conn.result.get("description") == "sizeLimitExceeded" and len(conn.response) <= 500
    finally:
        conn.unbind()


def remove_direct_members(slapd: Slapd, dns: Sequence[str]) -> float:
    """One modify as the rootdn: delete these member values from token-users."""
    conn = slapd.admin_connection()
    try:
        t0 = time.perf_counter()
        conn.modify(GROUP_DN, {"member": [(MODIFY_DELETE, list(dns))]})
        return time.perf_counter() - t0
    finally:
        conn.unbind()


# --- the store ----------------------------------------------------------------------------------

def token_rows(n_tokens: int, n_users: int, now: datetime) -> list[dict[str, Any]]:
    """Owners round-robin over the users; tokens of users outside the group already suspended."""
    rng = random.Random(20240601)
    expires = now + timedelta(days=60)
    created = now - timedelta(days=1)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for j in range(n_tokens):
        tid = "".join(rng.choices(ALPHABET, k=ID_LEN))
        while tid in seen:
            tid = "".join(rng.choices(ALPHABET, k=ID_LEN))
        seen.add(tid)
        i = j % n_users
        allowed = is_direct(i) or is_nested(i)
        rows.append({"id": tid, "owner": uid(i), "name": f"bench-{j}",
                     "secret_hash": DUMMY_HASH, "created_at": created, "expires_at": expires,
                     "status": "active" if allowed else "suspended",
                     "status_reason": None if allowed else "not_in_group",
                     "status_changed_at": created, "last_used_at": None,
                     "created_by": "bench"})
    return rows


def load_tokens(url: str, rows: list[dict[str, Any]]) -> float:
    setup = TokenStore(url, check_schema=False)
    try:
        setup.upgrade()
        t0 = time.perf_counter()
        stmt = sa.insert(tokens_t)
        with setup.engine.begin() as conn:
            for start in range(0, len(rows), INSERT_CHUNK):
                conn.execute(stmt, rows[start:start + INSERT_CHUNK])
        elapsed = time.perf_counter() - t0
        with setup.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
            count = conn.execute(sa.select(sa.func.count()).select_from(tokens_t)).scalar_one()
    finally:
        setup.close()
    if count != len(rows):
        raise SystemExit(f"loaded {count} rows, expected {len(rows)}")
    return elapsed


@contextmanager
def store_url(backend: str, pg_dsn: str, tmp: Path) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL, description); a PostgreSQL scratch schema is dropped at exit."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'groupgate.db'}", f"SQLite {sqlite3.sqlite_version} (WAL)"
        return
    with pg_scratch_schema(pg_dsn) as (url, version, schema):
        yield url, f"PostgreSQL {version} (schema {schema})"


# --- sync runs and the report -------------------------------------------------------------------

def bench_config(slapd: Slapd, url: str) -> Config:
    return parse_config({
        "store": {"url": url},
        "directory": {"urls": [slapd.url], "base_dn": slapd.base_dn, "bind_dn": slapd.service_dn,
                      "flavor": "openldap", "page_size": PAGE_SIZE, "timeout_seconds": 120},
        "policy": {"allowed_groups": ["token-users"], "nested_groups": True},
        "sync": {"max_suspend_count": 100_000},
    }, "bench-config")


@dataclass
class Run:
    label: str
    report: SyncReport
    cpu: float  # CPU seconds of this process during run_sync (not slapd's, not the DB's)
    expect_suspended: int
    note: str = ""
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = self.report.counts

    @property
    def suspended(self) -> int:
        return self.counts["suspend"] + self.counts["resuspend"]

    @property
    def ok(self) -> bool:
        c = self.counts
        return (self.suspended == self.expect_suspended and c["reactivate"] == 0
                and c["expire"] == 0)


def sync_once(directory: LdapDirectory, store: TokenStore, cfg: Config
              ) -> tuple[SyncReport, float]:
    """One run_sync and the CPU seconds this process spent in it."""
    gc.collect()
    c0 = time.process_time()
    report = run_sync(directory, store, cfg.policy, cfg.sync, now=datetime.now(UTC))
    return report, time.process_time() - c0


def format_runs(runs: Sequence[Run], bare: float) -> list[str]:
    head = (f"{'run':<30} {'snapshot':>9} {'load':>7} {'plan':>7} {'apply':>7} {'total':>8} "
            f"{'py cpu':>7} {'snap/bare':>9} {'total/bare':>10} {'suspended':>9}")
    lines = [head, "-" * len(head)]
    for r in runs:
        t = r.report.timings
        lines.append(
            f"{r.label:<30} {t['snapshot']:>8.2f}s {t['load']:>6.2f}s {t['plan']:>6.2f}s "
            f"{t.get('apply', 0.0):>6.2f}s {r.report.seconds:>7.2f}s {r.cpu:>6.2f}s "
            f"{t['snapshot'] / bare:>8.2f}x {r.report.seconds / bare:>9.2f}x {r.suspended:>9,}")
    lines.append("")
    for r in runs:
        c = r.counts
        status = "as expected" if r.ok else "UNEXPECTED"
        lines.append(f"{r.label}: users read {r.report.users_read:,}; suspended {r.suspended:,} "
                     f"(expected {r.expect_suspended:,}), reactivated {c['reactivate']:,}, "
                     f"expired {c['expire']:,}: {status}{'; ' + r.note if r.note else ''}")
    return lines


def verdicts(runs: Sequence[Run], bare: float, bare_cpu: float, n_users: int) -> list[str]:
    """The targets are judged on wall-clock seconds; the CPU ratio is printed beside them
    because it is much less disturbed by other work on the machine."""
    scale = n_users / TARGET_USERS
    limit = TARGET_SECONDS * scale
    lines = []
    if n_users != TARGET_USERS:
        lines.append(f"(targets scaled linearly to {n_users:,} users: {limit:.2f} s)")
    for r in runs:
        secs = r.report.seconds
        t1 = "MET" if secs < limit else "NOT MET"
        t2 = "MET" if secs <= TARGET_RATIO * bare else "NOT MET"
        lines.append(f"{r.label}: {secs:.2f} s -> full sync of {TARGET_USERS:,} users under "
                     f"{TARGET_SECONDS:g} s: {t1}; within {TARGET_RATIO:g}x of the bare paged "
                     f"read ({secs / bare:.2f}x): {t2}  [python cpu {r.cpu:.2f} s = "
                     f"{r.cpu / bare_cpu:.2f}x the bare read's]")
    return lines


def profile_sync(directory: LdapDirectory, store: TokenStore, cfg: Config) -> str:
    prof = cProfile.Profile()
    gc.collect()
    prof.enable()
    report = run_sync(directory, store, cfg.policy, cfg.sync, now=datetime.now(UTC))
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(40)
    buf.write("\n")
    stats.sort_stats("tottime").print_stats(25)
    t = report.timings
    head = (f"profiled no-change sync (cProfile inflates times): total {report.seconds:.2f} s; "
            + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
    return head + "\n" + buf.getvalue()


def machine_info() -> str:
    slapd_v = subprocess.run(["slapd", "-VV"], capture_output=True, text=True, check=False)
    slapd_line = (slapd_v.stderr or slapd_v.stdout).splitlines()[0:1]
    slapd_txt = slapd_line[0].split("slapd ")[-1].split(" (")[0] if slapd_line else "?"
    libs = ", ".join(f"{d} {dist_version(d)}" for d in ("ldap3", "SQLAlchemy", "psycopg"))
    return "\n".join([
        f"python   {platform.python_implementation()} {sys.version.split()[0]} "
        f"on {platform.system()} {platform.release()}",
        f"cpu      {cpu_summary()}",
        f"slapd    {slapd_txt}",
        f"libs     {libs}",
    ])


def machine_load() -> str:
    """Load average and CPU pressure: other work on a small machine skews every figure here."""
    try:
        one, five = Path("/proc/loadavg").read_text().split()[:2]
        text = f"loadavg 1m {one}, 5m {five}"
    except OSError:
        return "loadavg unknown"
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        avg = dict(kv.split("=") for kv in some[1:3])
        text += f"; CPU pressure (some) avg10 {avg['avg10']}%, avg60 {avg['avg60']}%"
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--users", type=int, default=100_000, help="users in the directory")
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens in the store")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--pg-dsn", default=os.environ.get("GROUPGATE_TEST_PG", DEFAULT_PG_DSN),
                    help="libpq DSN of the PostgreSQL database to create a scratch schema in")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more no-change sync with cProfile and print the hot spots")
    args = ap.parse_args(argv)
    if args.users < 100:
        raise SystemExit("--users must be at least 100")
    if args.tokens < args.users:
        raise SystemExit("--tokens must be at least --users (every user owns a token)")

    t_start = time.perf_counter()
    print(machine_info(), flush=True)
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="gg-bench-sync-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        slapd, setup = stack.enter_context(bench_slapd(tmp / "slapd", args.users))
        print(f"slapd    pid {slapd.pid} on {slapd.url}; LDIF {setup['ldif_mb']:.1f} MB written in "
              f"{setup['ldif']:.2f} s, slapadd -q {setup['slapadd']:.2f} s, "
              f"ready in {setup['start']:.2f} s")
        print(f"users    {args.users:,}; token-users: {setup['direct']:,.0f} direct + "
              f"token-users-nested with {setup['nested']:,.0f} = "
              f"{setup['direct'] + setup['nested']:,.0f} allowed")
        if args.users > 500:
            if not unpaged_is_capped(slapd):
                raise SystemExit("expected a non-paged search by the service account to stop "
                                 "at 500")
            print("limits   non-paged search as the service account: sizeLimitExceeded at 500 "
                  "(paging required)")

        url, store_desc = stack.enter_context(store_url(args.backend, args.pg_dsn, tmp))
        now = datetime.now(UTC)
        t0 = time.perf_counter()
        rows = token_rows(args.tokens, args.users, now)
        gen_s = time.perf_counter() - t0
        load_s = load_tokens(url, rows)
        active = sum(1 for r in rows if r["status"] == "active")
        owners = [r["owner"] for r in rows]
        # The daemon holds no such list; 200,000 live dicts here would make every garbage
        # collection during the syncs slower than it is in production.
        del rows
        gc.collect()
        # (c) will remove the first 1% of the users' worth of direct members
        removed_idx = [i for i in range(args.users) if is_direct(i)][:args.users // 100]
        removed = [user_dn(i) for i in removed_idx]
        removed_uids = {uid(i) for i in removed_idx}
        expect = sum(1 for o in owners if o in removed_uids)
        print(f"store    {store_desc}: {len(owners):,} tokens ({active:,} active, "
              f"{len(owners) - active:,} suspended not_in_group), generated in {gen_s:.2f} s, "
              f"bulk-inserted in {load_s:.2f} s", flush=True)
        del owners

        cfg = bench_config(slapd, url)
        directory = LdapDirectory(cfg.directory, cfg.policy,
                                  password=Secret(slapd.service_password), source=cfg.source)
        store = TokenStore(url)
        stack.callback(store.close)

        print(f"load     before the measurements: {machine_load()}", flush=True)
        # (a) the floor: twice before the syncs and once after; the median is the reference
        # (single runs on a small shared machine vary by +-30%)
        reads = [bare_paged_read(slapd) for _ in range(2)]
        if reads[0].entries != args.users:
            raise SystemExit(f"bare paged read returned {reads[0].entries} entries, "
                             f"expected {args.users}")

        # (b) no-change syncs
        runs = [Run("(b1) first sync, no change", *sync_once(directory, store, cfg), 0,
                    "also records directory_users for every owner")]
        runs.append(Run("(b2) repeat sync, no change", *sync_once(directory, store, cfg), 0))

        # (c) 1% of the users leave the group
        modify_s = remove_direct_members(slapd, removed)
        runs.append(Run(f"(c) sync after {len(removed):,} left", *sync_once(directory, store, cfg),
                        expect, f"one modify removing {len(removed):,} members took "
                                f"{modify_s:.2f} s"))

        reads.append(bare_paged_read(slapd))
        bare = statistics.median(r.seconds for r in reads)
        bare_cpu = statistics.median(r.cpu for r in reads)

        print(f"load     after the measurements:  {machine_load()}")
        print()
        print(f"(a) bare paged read, ldap3 cookie loop, page size {PAGE_SIZE}, service account: "
              f"{reads[-1].entries:,} entries in {reads[-1].pages} pages: "
              + ", ".join(f"{r.seconds:.2f} s" for r in reads)
              + f" (reference, the median: {bare:.2f} s; python cpu {bare_cpu:.2f} s)")
        print()
        for line in format_runs(runs, bare):
            print(line)
        print()
        print("(d) targets")
        for line in verdicts(runs, bare, bare_cpu, args.users):
            print(line)
        bad = [r.label for r in runs if not r.ok]
        if bad:
            print(f"WARNING: unexpected sync results in: {', '.join(bad)}")

        if args.profile:
            print()
            print(profile_sync(directory, store, cfg))

    print(f"\ntotal runtime {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
