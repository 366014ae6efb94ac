"""Benchmark of the verify hot path against a realistically sized store.

What is measured, per backend (SQLite and PostgreSQL), on a fresh store holding N tokens
(default 100,000):

- warm verify: ``Verifier.verify`` for a token whose secret this process already proved
  (argon2 skipped, one primary-key lookup, no last_used write inside the resolution window);
- cold verify: the first use of a token in a fresh ``Verifier`` (argon2 runs, and the first-use
  ``last_used_at`` write happens);
- the cheap refusals: malformed input (no store, no argon2), unknown_token (one lookup) and
  wrong_secret for a token already cached (one lookup, one keyed digest, no argon2);
- the floor: the same primary-key lookup of the same columns issued straight through the
  driver (stdlib ``sqlite3`` on its own connection; psycopg 3, autocommit, prepared).

Why: verify runs on every authenticated request, so once argon2 is out of the way its cost
should be dominated by the one store round trip. The target is a warm verify p50 within 3x of
the bare driver lookup p50; the ratio shows how much the library adds on top of the database.

Loading N tokens through argon2 would take minutes, so only the tokens the benchmark uses get a
real hash (default SecretHasher parameters); the rest share one dummy argon2 hash and are bulk
inserted with SQLAlchemy Core executemany. Timings are per call with
``time.perf_counter_ns``, single-threaded; warm verify and the bare lookup are measured in
alternating blocks over the same rotating token ids so drift affects both alike.

Usage::

    python bench/verify.py [--tokens N] [--backend sqlite|postgresql|both] [--pg-dsn DSN]
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version as dist_version
from typing import Any

import structlog

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Before anything logs: a log line per refused verify would distort every timing below.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

import sqlalchemy as sa  # noqa: E402

from bench.scratch import cpu_summary, pg_scratch_schema  # noqa: E402
from daemon.store import TokenStore, tokens_t  # noqa: E402
from daemon.tokens import TOKEN_LEN, ParsedToken, SecretHasher, generate  # noqa: E402
from daemon.verify import Reason, Verifier, VerifyResult  # noqa: E402

DEFAULT_PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
LOOKUP_SQL = ("SELECT owner, secret_hash, status, status_reason, expires_at, last_used_at "
              "FROM tokens WHERE id = {ph}")
TARGET_RATIO = 3.0

WARM_SAMPLE = 200          # tokens with a real hash that the warm loops rotate over
COLD_SAMPLE = 100          # further tokens with a real hash, first used in the cold measurement
WARM_ITERS = 20_000        # warm verify and bare lookup, each
BLOCKS = 4                 # warm verify and bare lookup alternate in this many blocks
CHEAP_ITERS = 20_000       # malformed input
LOOKUP_ITERS = 5_000       # unknown_token, wrong_secret
ARGON2_ITERS = 50          # SecretHasher.verify alone, for context on the cold figure
INSERT_CHUNK = 5_000
OWNERS = 10_000            # user00000 .. user09999


# --- statistics and the report ----------------------------------------------------------------

def pct(sorted_ns: Sequence[int], p: float) -> float:
    """Nearest-rank percentile of sorted nanosecond samples, in microseconds."""
    idx = min(len(sorted_ns) - 1, max(0, math.ceil(p / 100 * len(sorted_ns)) - 1))
    return sorted_ns[idx] / 1000


@dataclass
class Stat:
    label: str
    samples_ns: list[int]
    note: str = ""

    def __post_init__(self) -> None:
        self.samples_ns.sort()

    @property
    def n(self) -> int:
        return len(self.samples_ns)

    @property
    def p50(self) -> float:
        return pct(self.samples_ns, 50)

    @property
    def p99(self) -> float:
        return pct(self.samples_ns, 99)

    @property
    def per_second(self) -> float:
        return self.n / (sum(self.samples_ns) / 1e9)


@dataclass
class BackendReport:
    backend: str
    tokens: int
    load_seconds: float
    stats: list[Stat] = field(default_factory=list)
    ratio: float = 0.0
    server: str = ""


def format_report(r: BackendReport) -> str:
    lines = [f"== {r.backend}: {r.tokens:,} tokens ==",
             f"load: {r.tokens:,} rows bulk-inserted in {r.load_seconds:.2f} s "
             f"({r.tokens / r.load_seconds:,.0f} rows/s)"]
    if r.server:
        lines.append(f"server: {r.server}")
    w = max(len(s.label) for s in r.stats)
    lines.append(f"{'measurement':<{w}}  {'n':>6}  {'p50 µs':>9}  {'p99 µs':>9}  note")
    lines.append(f"{'-' * w}  {'-' * 6}  {'-' * 9}  {'-' * 9}  {'-' * 24}")
    for s in r.stats:
        lines.append(f"{s.label:<{w}}  {s.n:>6}  {s.p50:>9.1f}  {s.p99:>9.1f}  {s.note}")
    verdict = "MET" if r.ratio <= TARGET_RATIO else "NOT MET"
    lines.append(f"ratio warm verify p50 / bare lookup p50: {r.ratio:.2f}x  "
                 f"(target within {TARGET_RATIO:g}x: {verdict})")
    return "\n".join(lines)


# --- timing -----------------------------------------------------------------------------------

def time_calls(fn: Callable[[Any], object], args: Sequence[Any], iters: int,
               check: Callable[[object], bool] | None = None) -> list[int]:
    """Call fn(args[i % len(args)]) `iters` times; per-call nanoseconds."""
    out: list[int] = []
    append = out.append
    clock = time.perf_counter_ns
    nargs = len(args)
    for i in range(iters):
        a = args[i % nargs]
        t0 = clock()
        res = fn(a)
        t1 = clock()
        append(t1 - t0)
        if check is not None and not check(res):
            raise AssertionError(f"unexpected result {res!r} for {a!r}")
    return out


def reason_is(reason: Reason) -> Callable[[object], bool]:
    def check(res: object) -> bool:
        return isinstance(res, VerifyResult) and res.reason is reason
    return check


# --- the token set ----------------------------------------------------------------------------

Pair = tuple[str, str]  # (username, token text)


@dataclass
class TokenSet:
    rows: list[dict[str, Any]]     # ready for insert(tokens_t)
    warm: list[Pair]               # real hash in the store; the warm loops rotate over these
    cold: list[Pair]               # real hash, never verified before the cold measurement
    unknown: list[Pair]            # well-formed tokens that are not in the store
    wrong_secret: list[Pair]       # warm ids with a different (well-formed) secret
    sample_hash: str               # one real hash and its secret, for argon2-alone timing
    sample_secret: str


def build_token_set(n: int, hasher: SecretHasher) -> TokenSet:
    sampled = WARM_SAMPLE + COLD_SAMPLE
    if n < sampled:
        raise SystemExit(f"--tokens must be at least {sampled}")
    now = datetime.now(UTC)
    expires = now + timedelta(days=30)
    dummy = hasher.hash("not-a-real-secret")  # one argon2 hash shared by the unsampled rows
    # sampled tokens are spread evenly through the table, not clustered at its start
    stride = n // sampled
    sample_pos = {k * stride: k for k in range(sampled)}

    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    picked: list[tuple[str, ParsedToken, str]] = []  # (owner, token, hash) in sample order
    for i in range(n):
        tok = generate()
        while tok.token_id in seen:
            tok = generate()
        seen.add(tok.token_id)
        owner = f"user{i % OWNERS:05d}"
        if i in sample_pos:
            secret_hash = hasher.hash(tok.secret)
            picked.append((owner, tok, secret_hash))
        else:
            secret_hash = dummy
        rows.append({"id": tok.token_id, "owner": owner, "name": f"bench-{i}",
                     "secret_hash": secret_hash, "created_at": now, "expires_at": expires,
                     "status": "active", "status_reason": None, "status_changed_at": now,
                     "last_used_at": None, "created_by": "bench"})
    unknown: list[Pair] = []
    while len(unknown) < WARM_SAMPLE:
        tok = generate()
        if tok.token_id not in seen:
            unknown.append(("user00000", str(tok)))
    warm = [(o, str(t)) for o, t, _ in picked[:WARM_SAMPLE]]
    cold = [(o, str(t)) for o, t, _ in picked[WARM_SAMPLE:]]
    wrong = [(o, str(ParsedToken(t.token_id, generate().secret)))
             for o, t, _ in picked[:WARM_SAMPLE]]
    return TokenSet(rows, warm, cold, unknown, wrong, picked[0][2], picked[0][1].secret)


# --- backends ---------------------------------------------------------------------------------

@dataclass
class Backend:
    name: str
    url: str
    bare_lookup: Callable[[str], Any]  # the same PK lookup straight through the driver
    open_bare: Callable[[], None]      # opens bare_lookup's own connection (after the load)
    server: str = ""


@contextmanager
def sqlite_backend() -> Iterator[Backend]:
    with tempfile.TemporaryDirectory(prefix="gg-bench-") as tmp:
        path = os.path.join(tmp, "groupgate.db")
        url = f"sqlite:///{path}"
        # created lazily (after the store made the file and switched it to WAL)
        state: dict[str, sqlite3.Connection] = {}
        sql = LOOKUP_SQL.format(ph="?")

        def bare(token_id: str) -> Any:
            return state["conn"].execute(sql, (token_id,)).fetchone()

        def open_bare() -> None:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                raise SystemExit(f"expected the store in WAL mode, found {mode}")
            state["conn"] = conn

        try:
            yield Backend("sqlite", url, bare, open_bare)
        finally:
            if "conn" in state:
                state["conn"].close()


@contextmanager
def postgresql_backend(dsn: str) -> Iterator[Backend]:
    import psycopg

    with pg_scratch_schema(dsn) as (url, server, schema):
        state: dict[str, Any] = {}
        sql = LOOKUP_SQL.format(ph="%s")

        def bare(token_id: str) -> Any:
            cur = state["cur"]
            cur.execute(sql, (token_id,), prepare=True)
            return cur.fetchone()

        def open_bare() -> None:
            conn = psycopg.connect(dsn, autocommit=True, options=f"-csearch_path={schema}")
            state["conn"] = conn
            state["cur"] = conn.cursor()

        try:
            yield Backend("postgresql", url, bare, open_bare,
                          server=f"PostgreSQL {server} (schema {schema})")
        finally:
            if "conn" in state:
                state["conn"].close()


# --- one backend, start to finish -------------------------------------------------------------

def load(store: TokenStore, rows: list[dict[str, Any]]) -> float:
    t0 = time.perf_counter()
    stmt = sa.insert(tokens_t)
    with store.engine.begin() as conn:
        for start in range(0, len(rows), INSERT_CHUNK):
            conn.execute(stmt, rows[start:start + INSERT_CHUNK])
    elapsed = time.perf_counter() - t0
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
        count = conn.execute(sa.select(sa.func.count()).select_from(tokens_t)).scalar_one()
    if count != len(rows):
        raise SystemExit(f"loaded {count} rows, expected {len(rows)}")
    return elapsed


def run_backend(backend: Backend, ts: TokenSet, hasher: SecretHasher) -> BackendReport:
    setup = TokenStore(backend.url, check_schema=False)
    setup.upgrade()
    report = BackendReport(backend.name, len(ts.rows), load(setup, ts.rows), server=backend.server)
    setup.close()
    backend.open_bare()

    def new_verifier() -> Verifier:
        return Verifier(TokenStore(backend.url), hasher=SecretHasher(),
                        last_used_resolution=timedelta(seconds=60))

    verifier = new_verifier()
    verify = verifier.verify

    def call(pair: Pair) -> VerifyResult:
        return verify(pair[0], pair[1])

    warm_ids = [tok[3:15] for _, tok in ts.warm]

    # Warm-up: argon2 once per sampled token, the first-use last_used write, the connection,
    # the prepared statement; then a pass through both loops so caches are hot.
    for pair in ts.warm:
        res = call(pair)
        if not res.ok:
            raise SystemExit(f"warm-up verify failed: {res.reason}")
    for tid in warm_ids:
        if backend.bare_lookup(tid) is None:
            raise SystemExit("bare lookup found no row")
    time_calls(call, ts.warm, 2_000)
    time_calls(backend.bare_lookup, warm_ids, 2_000)

    # warm verify and bare lookup, alternating blocks over the same rotating ids
    warm_ns: list[int] = []
    bare_ns: list[int] = []
    per_block = WARM_ITERS // BLOCKS
    gc.collect()
    for _ in range(BLOCKS):
        warm_ns += time_calls(call, ts.warm, per_block, reason_is(Reason.OK))
        bare_ns += time_calls(backend.bare_lookup, warm_ids, per_block)
    warm = Stat("warm verify (ok)", warm_ns)
    warm.note = f"{warm.per_second:,.0f} verifies/s"
    bare = Stat("bare driver PK lookup", bare_ns)
    bare.note = f"{bare.per_second:,.0f} lookups/s"

    # cold: a fresh Verifier, each token's first use (argon2 + the last_used_at write)
    cold_verifier = new_verifier()
    cold_verifier.verify(*ts.unknown[0])  # open its connection outside the timing
    gc.collect()
    cold = Stat("cold verify (first use, argon2)",
                time_calls(lambda p: cold_verifier.verify(p[0], p[1]), ts.cold, len(ts.cold),
                           reason_is(Reason.OK)),
                "argon2 + lookup + last_used write")
    cold_verifier.close()
    argon = Stat("  argon2 verify alone (context)",
                 time_calls(lambda _: hasher.verify(ts.sample_hash, ts.sample_secret), [None],
                            ARGON2_ITERS, lambda ok: ok is True),
                 repr(hasher))

    user, tok0 = ts.warm[0]
    bad_check = tok0[:-1] + ("A" if tok0[-1] != "A" else "B")
    assert len(bad_check) == TOKEN_LEN
    gc.collect()
    mal_short = Stat('malformed: "not-a-token"',
                     time_calls(call, [(user, "not-a-token")], CHEAP_ITERS,
                                reason_is(Reason.MALFORMED)), "length check only")
    mal_crc = Stat("malformed: 65 chars, bad checksum",
                   time_calls(call, [(user, bad_check)], CHEAP_ITERS,
                              reason_is(Reason.MALFORMED)), "regex + CRC32")
    unknown = Stat("unknown_token",
                   time_calls(call, ts.unknown, LOOKUP_ITERS, reason_is(Reason.UNKNOWN_TOKEN)),
                   "one lookup, no row")
    wrong = Stat("wrong_secret (cached token)",
                 time_calls(call, ts.wrong_secret, LOOKUP_ITERS, reason_is(Reason.WRONG_SECRET)),
                 "lookup + digest, no argon2")

    report.stats = [warm, cold, argon, mal_short, mal_crc, unknown, wrong, bare]
    report.ratio = warm.p50 / bare.p50
    verifier.close()
    return report


# --- main -------------------------------------------------------------------------------------

def machine_info() -> str:
    libs = ", ".join(f"{d} {dist_version(d)}" for d in ("SQLAlchemy", "psycopg", "argon2-cffi"))
    return "\n".join([
        f"python   {platform.python_implementation()} {sys.version.split()[0]} "
        f"on {platform.system()} {platform.release()}",
        f"sqlite   {sqlite3.sqlite_version}",
        f"cpu      {cpu_summary()}",
        f"libs     {libs}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens in the store")
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--pg-dsn", default=os.environ.get("GROUPGATE_TEST_PG", DEFAULT_PG_DSN),
                    help="libpq DSN of the PostgreSQL database to create a scratch schema in")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    print(machine_info())
    hasher = SecretHasher()
    t0 = time.perf_counter()
    ts = build_token_set(args.tokens, hasher)
    print(f"tokens   {args.tokens:,} generated, {WARM_SAMPLE + COLD_SAMPLE} real argon2 hashes "
          f"({hasher!r}), in {time.perf_counter() - t0:.2f} s")

    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    missed: list[str] = []
    for name in backends:
        print()
        ctx = sqlite_backend() if name == "sqlite" else postgresql_backend(args.pg_dsn)
        with ctx as backend:
            report = run_backend(backend, ts, hasher)
        print(format_report(report), flush=True)
        if report.ratio > TARGET_RATIO:
            missed.append(name)
    print(f"\ntotal runtime {time.perf_counter() - t_start:.1f} s")
    if missed:
        print(f"target within {TARGET_RATIO:g}x NOT met on: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
