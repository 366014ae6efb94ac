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
    detail = f" ({result.status_reason})" if result.status_reason else ""
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

    tok = sub.add_parser("token", help="list, show and revoke tokens")
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

    au = sub.add_parser("audit", help="show the audit log")
    au.add_argument("--user")
    au.add_argument("--token", metavar="ID")
    au.add_argument("--limit", type=_positive_int, default=None, help="only the last N events")
    au.add_argument("--json", action="store_true")
    au.set_defaults(handler=cmd_audit)

    ve = sub.add_parser("verify", help="check a token (read from stdin or $GROUPGATE_TOKEN)")
    ve.add_argument("--user", required=True)
    ve.set_defaults(handler=cmd_verify)
    return p


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
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

