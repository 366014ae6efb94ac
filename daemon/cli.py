"""The `groupgate` command. `main(argv)` is the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO

from daemon import logs
from daemon.config import Config, load_config, redact_url
from daemon.errors import BadInput, GroupgateError
from daemon.model import AuditRecord, Status, TokenRecord, canonical_username
from daemon.tokens import normalize_token_id

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
ENV_TOKEN = "GROUPGATE_TOKEN"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as BadInput (one line, exit 65) instead of exit 2."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{self.prog}: {message}")


@dataclass
class Context:
    """What every command gets: the validated config, the args and the output streams."""

    config: Config
    args: argparse.Namespace
    out: TextIO
    err: TextIO

    def now(self) -> datetime:
        return datetime.now(UTC)

    def store(self, *, check_schema: bool = True) -> Any:
        from daemon.store import TokenStore

        return TokenStore(self.config.store.url, check_schema=check_schema)

    def directory(self) -> Any:
        from daemon.directory import from_config

        return from_config(self.config.directory, self.config.policy, self.config.source)

    def hasher(self) -> Any:
        from daemon.tokens import SecretHasher

        a = self.config.verify.argon2
        return SecretHasher(a.time_cost, a.memory_kib, a.parallelism)


def _fmt_time(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if dt else "-"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], out: TextIO) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
                  + "\n")


def token_json(t: TokenRecord) -> dict[str, Any]:
    return {"id": t.display_id, "owner": t.owner, "name": t.name, "status": t.status.value,
            "status_reason": t.status_reason, "created_at": t.created_at.isoformat(),
            "expires_at": t.expires_at.isoformat(),
            "status_changed_at": t.status_changed_at.isoformat(),
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
            "created_by": t.created_by}


def _audit_json(a: AuditRecord) -> dict[str, Any]:
    return {"id": a.id, "at": a.at.isoformat(), "actor": a.actor, "action": a.action,
            "token_id": f"gg_{a.token_id}" if a.token_id else None, "owner": a.owner,
            "reason": a.reason, "details": a.details}


def _token_id_arg(text: str) -> str:
    tid = normalize_token_id(text)
    if tid is None:
        raise BadInput(f"not a token id: {text!r} (expected gg_ and 12 letters or digits)")
    return tid


# --- commands -------------------------------------------------------------------------------

def cmd_db_upgrade(ctx: Context) -> int:
    url = ctx.config.store.url
    if url.startswith("sqlite:///"):
        from daemon.store import _sqlite_path

        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = ctx.store(check_schema=False)
    before, after = store.upgrade()
    store.close()
    where = redact_url(url)
    if before == after:
        ctx.out.write(f"store {where} is up to date (schema {after})\n")
    else:
        ctx.out.write(f"store {where} upgraded: {before or 'empty'} -> {after}\n")
    return EXIT_OK


def cmd_db_status(ctx: Context) -> int:
    store = ctx.store(check_schema=False)
    current, head = store.schema_state()
    store.close()
    ctx.out.write(f"store {redact_url(ctx.config.store.url)}: schema {current or 'none'}, "
                  f"this groupgate expects {head}\n")
    return EXIT_OK if current == head else EXIT_VERIFY_FAILED


def cmd_token_list(ctx: Context) -> int:
    a = ctx.args
    status = Status(a.status) if a.status else None
    owner = canonical_username(a.user) if a.user else None
    tokens = ctx.store().list_tokens(owner=owner, status=status)
    if a.json:
        json.dump([token_json(t) for t in tokens], ctx.out, indent=2)
        ctx.out.write("\n")
        return EXIT_OK
    rows = [(t.display_id, t.owner, t.name, t.status.value, t.status_reason or "-",
             _fmt_time(t.expires_at), _fmt_time(t.last_used_at)) for t in tokens]
    _table(rows, ("ID", "OWNER", "NAME", "STATUS", "REASON", "EXPIRES", "LAST USED"), ctx.out)
    return EXIT_OK


def cmd_token_show(ctx: Context) -> int:
    tid = _token_id_arg(ctx.args.id)
    tok = ctx.store().get_token(tid)
    if tok is None:
        raise BadInput(f"no token gg_{tid}")
    data = token_json(tok)
    if ctx.args.json:
        json.dump(data, ctx.out, indent=2)
        ctx.out.write("\n")
    else:
        for k, v in data.items():
            ctx.out.write(f"{k + ':':<19} {v if v is not None else '-'}\n")
    return EXIT_OK


def cmd_token_revoke(ctx: Context) -> int:
    from daemon.service import TokenService

    tid = _token_id_arg(ctx.args.id)
    svc = TokenService(ctx.store(), ctx.hasher(), ctx.config.policy)
    tok = svc.revoke(tid, actor=_local_actor(), now=ctx.now(), reason=ctx.args.reason)
    ctx.out.write(f"revoked {tok.display_id} of {tok.owner}\n")
    return EXIT_OK


def cmd_audit(ctx: Context) -> int:
    a = ctx.args
    tid = _token_id_arg(a.token) if a.token else None
    owner = canonical_username(a.user) if a.user else None
    events = ctx.store().audit_events(owner=owner, token_id=tid, limit=a.limit)
    if a.json:
        json.dump([_audit_json(e) for e in events], ctx.out, indent=2)
        ctx.out.write("\n")
        return EXIT_OK
    rows = [(_fmt_time(e.at), e.actor, e.action, f"gg_{e.token_id}" if e.token_id else "-",
             e.owner or "-", e.reason or "-") for e in events]
    _table(rows, ("AT", "ACTOR", "ACTION", "TOKEN", "OWNER", "REASON"), ctx.out)
    return EXIT_OK


def _print_plan(ctx: Context, changes: Sequence[Any], *, dry_run: bool) -> None:
    for ch in changes:
        ctx.out.write(ch.describe(dry_run=dry_run) + "\n")


def cmd_sync(ctx: Context) -> int:
    from daemon.sync import run_sync

    a = ctx.args
    dry = a.dry_run or a.check
    report = run_sync(ctx.directory(), ctx.store(), ctx.config.policy, ctx.config.sync,
                      now=ctx.now(), dry_run=dry, force=a.force)
    _print_plan(ctx, report.plan if dry else report.applied, dry_run=dry)
    c = report.counts
    ctx.out.write(f"{'plan' if dry else 'applied'}: {c['suspend'] + c['resuspend']} suspend, "
                  f"{c['reactivate']} reactivate, {c['expire']} expire; "
                  f"{report.users_read} directory users read in {report.seconds:.2f}s\n")
    if a.check and report.plan:
        return EXIT_VERIFY_FAILED
    return EXIT_OK


def cmd_expire(ctx: Context) -> int:
    from daemon.sync import run_expire

    report = run_expire(ctx.store(), now=ctx.now(), dry_run=ctx.args.dry_run)
    changes = report.plan if ctx.args.dry_run else report.applied
    _print_plan(ctx, changes, dry_run=ctx.args.dry_run)
    ctx.out.write(f"{'would expire' if ctx.args.dry_run else 'expired'}: {len(changes)}\n")
    return EXIT_OK


def cmd_directory_check(ctx: Context) -> int:
    for what, result in ctx.directory().check():
        ctx.out.write(f"{what + ':':<22} {result}\n")
    return EXIT_OK


def cmd_directory_user(ctx: Context) -> int:
    from daemon.policy import wanted_state

    name = canonical_username(ctx.args.name)
    user = ctx.directory().lookup_user(name)
    store = ctx.store()
    ctx.out.write(f"user:        {name}\n")
    if user is None:
        ctx.out.write("directory:   not found (or ambiguous) under the configured base "
                      "and filter\n")
    else:
        groups = ", ".join(sorted(user.groups)) or "none of the configured groups"
        ctx.out.write(f"dn:          {user.dn}\n"
                      f"disabled:    {'yes' if user.disabled else 'no'}\n"
                      f"allowed:     {'yes' if user.allowed else 'no'} "
                      f"(allowed groups: {', '.join(ctx.config.policy.allowed_groups)})\n"
                      f"admin:       {'yes' if user.admin else 'no'}\n"
                      f"groups:      {groups}\n"
                      f"max lifetime: {ctx.config.policy.lifetime_cap_days(user.groups)} days\n")
    status, reason = wanted_state(user)
    ctx.out.write(f"tokens should be: {status.value}{' (' + reason + ')' if reason else ''}\n")
    recorded = store.directory_user(name)
    if recorded is not None:
        ctx.out.write(f"last sync recorded: present={recorded['present']} "
                      f"allowed={recorded['allowed']} disabled={recorded['disabled']} "
                      f"(changed {_fmt_time(recorded['changed_at'])})\n")
    tokens = store.list_tokens(owner=name)
    rows = [(t.display_id, t.name, t.status.value, t.status_reason or "-",
             _fmt_time(t.expires_at)) for t in tokens]
    if rows:
        _table(rows, ("ID", "NAME", "STATUS", "REASON", "EXPIRES"), ctx.out)
    else:
        ctx.out.write("no tokens\n")
    return EXIT_OK


def cmd_run(ctx: Context) -> int:
    from daemon.scheduler import Daemon

    return Daemon(ctx.config, ctx.args.config).run()


def cmd_serve(ctx: Context) -> int:
    """The HTTP service alone, in the foreground (uvicorn handles SIGTERM/SIGINT)."""
    if not ctx.config.http.listen:
        raise BadInput("http.listen is not set in the config; nothing to serve")
    try:
        from daemon import web
    except ImportError as exc:
        raise BadInput(f"the HTTP service needs groupgate[http]: {exc.name} is missing") \
            from None
    _web, app = web.build(ctx.config)
    web.server(ctx.config, app).run()
    return EXIT_OK


def _read_password(ctx: Context) -> str:
    if ctx.args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    try:
        return getpass.getpass(f"Directory password for {ctx.args.user}: ")
    except (EOFError, OSError):
        raise BadInput("no terminal to read the password from; use --password-stdin") from None


def cmd_token_create(ctx: Context) -> int:
    from datetime import timedelta

    from daemon.config import parse_duration
    from daemon.errors import NotPermitted
    from daemon.service import TokenService

    a = ctx.args
    policy = ctx.config.policy
    directory = ctx.directory()
    password = _read_password(ctx)
    user = directory.authenticate(a.user, password)
    if user.disabled:
        raise NotPermitted(f"{user.username}: the account is disabled in the directory")
    if not user.allowed:
        raise NotPermitted(f"{user.username} is not a member of an allowed group "
                           f"({', '.join(policy.allowed_groups)})")
    cap = policy.lifetime_cap_days(user.groups)
    if a.expires_in is None:
        lifetime = timedelta(days=min(policy.default_lifetime_days, cap))
    else:
        try:
            lifetime = parse_duration(a.expires_in, default_unit="d")
        except ValueError as exc:
            raise BadInput(f"--expires-in: {exc}") from None
    svc = TokenService(ctx.store(), ctx.hasher(), policy)
    created = svc.create(user.username, a.name, lifetime, ctx.now(),
                         created_by=user.username, max_lifetime_days=cap)
    rec = created.record
    if a.json:
        json.dump({**token_json(rec), "token": created.token}, ctx.out, indent=2)
        ctx.out.write("\n")
    else:
        ctx.err.write(f"Created {rec.display_id} ({rec.name!r}) for {rec.owner}, expires "
                      f"{_fmt_time(rec.expires_at)} UTC. It is shown only this once:\n")
        ctx.out.write(created.token + "\n")
    return EXIT_OK


def _read_secret_input(env_name: str, what: str) -> str:
    value = os.environ.get(env_name)
    if value is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise BadInput(f"give the {what} on standard input or in ${env_name}")
        value = sys.stdin.readline()
    return value.strip()


def cmd_verify(ctx: Context) -> int:
    from daemon.verify import Verifier

    token = _read_secret_input(ENV_TOKEN, "token")
    verifier = Verifier.from_settings(ctx.config)
    result = verifier.verify(ctx.args.user, token)
    verifier.close()
    if result.ok:
        ctx.out.write(f"ok: gg_{result.token_id} of {result.owner}, expires "
                      f"{_fmt_time(result.expires_at)}\n")
        return EXIT_OK
    reason = result.status_reason
    detail = f" ({reason})" if reason and reason != result.reason.value else ""
    ctx.out.write(f"{result.reason.value}{detail}\n")
    return EXIT_VERIFY_FAILED


def _local_actor() -> str:
    """The local CLI is trusted as admin; the audit names the Unix user who ran it."""
    try:
        import pwd

        return "cli:" + pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return f"cli:uid{os.getuid()}"


# --- the parser -----------------------------------------------------------------------------

Handler = Callable[[Context], int]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="groupgate", description="Govern personal API tokens by directory group "
                "membership.")
    p.add_argument("--config", metavar="PATH", help="config file (default: $GROUPGATE_CONFIG, "
                   "then /etc/groupgate/config.toml, then ./config.toml)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    db = sub.add_parser("db", help="create, upgrade or inspect the store schema")
    dbs = db.add_subparsers(dest="db_command", metavar="ACTION", parser_class=_Parser)
    dbs.required = True
    dbs.add_parser("upgrade", help="create or upgrade the schema").set_defaults(
        handler=cmd_db_upgrade)
    dbs.add_parser("status", help="show the schema revision").set_defaults(
        handler=cmd_db_status)

    tok = sub.add_parser("token", help="create, list, show and revoke tokens")
    toks = tok.add_subparsers(dest="token_command", metavar="ACTION", parser_class=_Parser)
    toks.required = True
    tl = toks.add_parser("list", help="list tokens")
    tl.add_argument("--user", help="only this owner's tokens")
    tl.add_argument("--status", choices=[s.value for s in Status])
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(handler=cmd_token_list)
    ts = toks.add_parser("show", help="show one token")
    ts.add_argument("id", help="token id (gg_...)")
    ts.add_argument("--json", action="store_true")
    ts.set_defaults(handler=cmd_token_show)
    tr = toks.add_parser("revoke", help="revoke a token (final)")
    tr.add_argument("id", help="token id (gg_...)")
    tr.add_argument("--reason", help="why, for the audit log")
    tr.set_defaults(handler=cmd_token_revoke)
    tc = toks.add_parser("create", help="create a token for your own account (asks your "
                         "directory password)")
    tc.add_argument("--user", required=True, help="your directory username")
    tc.add_argument("--name", required=True, help="what the token is for (1-64 characters)")
    tc.add_argument("--expires-in", metavar="DURATION",
                    help="lifetime such as 30d or 12h (default: policy.default_lifetime_days)")
    tc.add_argument("--password-stdin", action="store_true",
                    help="read the directory password from standard input")
    tc.add_argument("--json", action="store_true")
    tc.set_defaults(handler=cmd_token_create)

    au = sub.add_parser("audit", help="show the audit log")
    au.add_argument("--user")
    au.add_argument("--token", metavar="ID")
    au.add_argument("--limit", type=_positive_int, default=None, help="only the last N events")
    au.add_argument("--json", action="store_true")
    au.set_defaults(handler=cmd_audit)

    ve = sub.add_parser("verify", help="check a token (read from stdin or $GROUPGATE_TOKEN)")
    ve.add_argument("--user", required=True)
    ve.set_defaults(handler=cmd_verify)

    ru = sub.add_parser("run", help="run the daemon: scheduled sync, expiry and purge")
    ru.set_defaults(handler=cmd_run)
    se = sub.add_parser("serve", help="run only the HTTP service (forward auth, API, page)")
    se.set_defaults(handler=cmd_serve)

    sy = sub.add_parser("sync", help="make tokens follow the directory now")
    sy.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sy.add_argument("--check", action="store_true",
                    help="like --dry-run, and exit 1 when the plan is not empty")
    sy.add_argument("--force", action="store_true",
                    help="apply a plan the mass-suspension brake refused (after review)")
    sy.set_defaults(handler=cmd_sync)
    ex = sub.add_parser("expire", help="mark tokens past their expiry as expired")
    ex.add_argument("--dry-run", action="store_true")
    ex.set_defaults(handler=cmd_expire)

    di = sub.add_parser("directory", help="inspect the directory as groupgate sees it")
    dis = di.add_subparsers(dest="directory_command", metavar="ACTION", parser_class=_Parser)
    dis.required = True
    dis.add_parser("check", help="bind, search, resolve each configured group").set_defaults(
        handler=cmd_directory_check)
    du = dis.add_parser("user", help="what the directory says about one user, and why their "
                        "tokens are in their state")
    du.add_argument("name")
    du.set_defaults(handler=cmd_directory_user)
    return p


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= 1_000_000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000000")
    return n


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run one command; returns the exit code (callable in-process, as the tests do)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
        config = load_config(args.config)
        logs.configure(config.log.format, config.log.level, stream=err)
        handler: Handler = args.handler
        return handler(Context(config, args, out, err))
    except GroupgateError as exc:
        err.write(f"groupgate: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write("groupgate: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK


def run() -> None:
    sys.exit(main())

