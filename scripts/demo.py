"""scripts/demo: groupgate end to end against a real (throwaway) OpenLDAP, in about 30 seconds.

What it does, all in a temp dir that is removed afterwards:
  * starts a throwaway slapd on 127.0.0.1 seeded with the test directory (tests/fixtures/
    openldap.ldif: alice is in token-users, her password is alice-pw);
  * writes a config (SQLite store, sync every 2s, expiry every 1s), runs `groupgate db upgrade`
    and starts the real daemon, `groupgate run`, as a subprocess;
  * walks alice's token through create, verify, suspension when she leaves token-users,
    reactivation when she is added back, and expiry, running the real `groupgate` command
    for every step a person would type, and shows the audit log.

Everything it starts (groupgate run, slapd) is stopped by PID when it ends, fails, or is
interrupted (Ctrl-C, SIGTERM). Exit status: 0 when every step did what it should, 1 when a
step failed (the message says which and why), 130/143 when interrupted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent / "groupgate"
GROUP_DN = "cn=token-users,ou=groups,dc=example,dc=org"
ALICE_DN = "uid=alice,ou=people,dc=example,dc=org"
ALICE_PW = "alice-pw"
SYNC_INTERVAL = 2        # seconds, [sync] interval in the demo config
SHORT_LIFETIME = "10s"   # the token that expires during the demo (room for a slow verify)
WAIT_TIMEOUT = 15.0      # deadline for each wait on the daemon (several sync intervals)

TTY = sys.stdout.isatty()
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \[")


def _style(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if TTY else text


def out(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    out()
    out(_style("1;34", f"== {text}"))


def say(text: str) -> None:
    out(text)


def progress(text: str) -> None:
    out(_style("2", f"   ... {text}"))


def shown_cmd(text: str) -> None:
    out(_style("1", f"$ {text}"))


class StepFailed(Exception):
    """A step did not do what it should; the message says what happened instead."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_deferring = False
_pending: int | None = None


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _pending
    if _deferring:
        _pending = signum  # raised when the critical section ends
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a server starts, so its PID is recorded before we unwind."""
    global _deferring, _pending
    _deferring, _pending = True, None
    try:
        yield
    finally:
        _deferring = False
        if _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def _now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")


class Demo:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="groupgate-demo-"))
        self.cfg = self.work / "config.toml"
        self.db = self.work / "groupgate.db"
        self.log = self.work / "groupgate-run.log"
        self.slapd: Any = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.store: Any = None
        self.env: dict[str, str] = {}
        self.log_offset = 0

    # -- running the real command -------------------------------------------------------

    def gg(self, *args: str, stdin: str | None = None, show_stdin: str | None = None,
           expect_rc: int = 0, expect: str | None = None) -> str:
        """Run `groupgate ARGS`, show the command line and its output, check the outcome."""
        line = shlex.join(["groupgate", *args])
        if show_stdin is not None:
            line = f"{show_stdin} | {line}"
        shown_cmd(line)
        try:
            proc = subprocess.run([str(BIN), *args], input=stdin, text=True,
                                  capture_output=True, env=self.env, timeout=60)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"'{line}' did not finish within 60s") from None
        for ln in proc.stderr.splitlines():
            # structlog lines (the config's log level is info) dimmed; messages as they are
            out(_style("2", ln) if LOG_LINE.match(ln) else ln)
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
        if proc.returncode != expect_rc or (expect is not None and expect not in proc.stdout):
            want = f"exit {expect_rc}" + (f" and output containing {expect!r}" if expect else "")
            raise StepFailed(f"'{line}' exited {proc.returncode}, expected {want}\n"
                             f"stdout: {proc.stdout.strip() or '(empty)'}\n"
                             f"stderr: {proc.stderr.strip() or '(empty)'}")
        return proc.stdout

    def verify(self, token: str, expect_rc: int, expect: str) -> None:
        self.gg("verify", "--user", "alice", stdin=token + "\n", show_stdin='echo "$TOKEN"',
                expect_rc=expect_rc, expect=expect)

    def create(self, name: str, expires_in: str) -> str:
        stdout = self.gg("token", "create", "--user", "alice", "--name", name,
                         "--expires-in", expires_in, "--password-stdin",
                         stdin=ALICE_PW + "\n", show_stdin=f"echo {ALICE_PW}")
        token = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        if not token.startswith("gg_"):
            raise StepFailed(f"token create printed no token: {stdout!r}")
        return token

    # -- waiting on the daemon ----------------------------------------------------------

    def daemon_alive(self) -> None:
        if self.daemon is not None and self.daemon.poll() is not None:
            rc = self.daemon.returncode
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
            raise StepFailed(f"groupgate run {how}:\n{self.log_tail()}")

    def wait_for(self, what: str, check: Callable[[], bool], state: Callable[[], str],
                 timeout: float = WAIT_TIMEOUT) -> None:
        """Poll `check` until true; print the state whenever it changes (or every 2s)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last_shown, last_at = "", 0.0
        while True:
            self.daemon_alive()
            if check():
                progress(f"{time.monotonic() - t0:4.1f}s  {state()}  -> {what}")
                return
            now = time.monotonic()
            current = state()
            if current != last_shown or now - last_at >= 2.0:
                progress(f"{now - t0:4.1f}s  {current}")
                last_shown, last_at = current, now
            if now >= deadline:
                raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"last state: {current}\n{self.log_tail()}")
            time.sleep(0.1)

    def token_state(self, token: str) -> tuple[str, str | None]:
        """The token's status and reason as the store has them now (read-only)."""
        from daemon.tokens import parse

        parsed = parse(token)
        t = self.store.get_token(parsed.token_id) if parsed is not None else None
        if t is None:
            raise StepFailed(f"the store has no token {token[:15]}...")
        return t.status.value, t.status_reason

    def describe(self, token: str, *, expiry: bool = False) -> str:
        status, reason = self.token_state(token)
        text = f"{_now()} token {status}{' (' + reason + ')' if reason else ''}"
        if expiry:
            from daemon.tokens import parse

            parsed = parse(token)
            t = self.store.get_token(parsed.token_id) if parsed is not None else None
            return f"{text}, expires at {t.expires_at:%H:%M:%S}" if t is not None else text
        sync = self.store.sync_state() or {}
        at = sync.get("last_attempt_at")
        return f"{text}; " + (f"last sync {at:%H:%M:%S}" if at else "no sync yet")

    def daemon_events(self, *names: str) -> None:
        """Show the daemon's log lines for these events written since the last call."""
        try:
            with self.log.open("rb") as f:
                f.seek(self.log_offset)
                data = f.read()
        except OSError:
            return
        self.log_offset += len(data)
        lines = [ln for ln in data.decode("utf-8", "replace").splitlines()
                 if any(n in ln for n in names)]
        if lines:
            say(f"The daemon's log ({self.log.name}) says:")
            for ln in lines:
                out(_style("2", f"   {ln.strip()}"))

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no daemon log)"
        return "last lines of the daemon log:\n" + "\n".join("  " + ln for ln in lines[-n:])

    # -- the directory ------------------------------------------------------------------

    def membership(self, op: str) -> None:
        import ldap3

        s = self.slapd
        kind = "delete" if op == "remove" else "add"
        shown_cmd(f"ldapmodify -x -H {s.url} -D {s.admin_dn} -w {s.admin_password} <<EOF")
        for ln in (f"dn: {GROUP_DN}", "changetype: modify", f"{kind}: member",
                   f"member: {ALICE_DN}", "EOF"):
            out(_style("1", ln))
        conn = s.admin_connection()
        try:
            change = ldap3.MODIFY_DELETE if op == "remove" else ldap3.MODIFY_ADD
            if not conn.modify(GROUP_DN, {"member": [(change, [ALICE_DN])]}):
                raise StepFailed(f"ldap modify failed: {conn.result}")
        finally:
            conn.unbind()
        out(f'modifying entry "{GROUP_DN}"')
        out(f"(done at {_now()}, with ldap3 as the slapd admin; the same change as above)")

    # -- the tour -----------------------------------------------------------------------

    def setup(self) -> None:
        from tests.servers.slapd import SlapdError, start_slapd

        heading("Setting up: a throwaway OpenLDAP, a config, the store, the daemon")
        say(f"Everything lives in {self.work}; Ctrl-C stops the demo and cleans up.")
        try:
            with signals_deferred():
                self.slapd = start_slapd(self.work / "slapd")
        except (SlapdError, OSError) as exc:
            raise StepFailed(f"could not start slapd: {exc}") from None
        s = self.slapd
        say(f"slapd (pid {s.proc.pid}) listens on {s.url} only, seeded from "
            "tests/fixtures/openldap.ldif;")
        say("alice (password alice-pw) is a member of cn=token-users. groupgate reads the "
            f"directory as {s.service_dn}.")
        self.cfg.write_text(f"""\
[store]
url = "sqlite:///{self.db}"

[directory]
urls = ["{s.url}"]
flavor = "openldap"
base_dn = "{s.base_dn}"
bind_dn = "{s.service_dn}"
# the bind password comes from $GROUPGATE_BIND_PASSWORD

[policy]
allowed_groups = ["token-users"]
admin_groups = ["token-admins"]

[sync]
interval = "{SYNC_INTERVAL}s"
jitter = "0s"
expire_interval = "1s"

[log]
format = "console"
level = "info"
""")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GROUPGATE_")}
        self.env.update(GROUPGATE_CONFIG=str(self.cfg),
                        GROUPGATE_BIND_PASSWORD=s.service_password)
        say(f"\nThe config, {self.cfg} (GROUPGATE_CONFIG points at it):")
        for ln in self.cfg.read_text().splitlines():
            out(_style("2", f"   {ln}"))
        out()
        self.gg("db", "upgrade")
        self.gg("directory", "check")
        say("(The skipped entries are the seed's deliberately awkward ones: no uid, a "
            "duplicate uid.)")

        from daemon.store import TokenStore

        self.store = TokenStore(f"sqlite:///{self.db}")
        shown_cmd(f"groupgate run 2>{self.log} &")
        with signals_deferred(), self.log.open("ab") as log:
            self.daemon = subprocess.Popen([str(BIN), "run"], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=log, env=self.env,
                                           start_new_session=True)
        say(f"The daemon runs as pid {self.daemon.pid}: it syncs with the directory every "
            f"{SYNC_INTERVAL}s and marks expired tokens every 1s.")

        def synced() -> bool:
            st = self.store.sync_state()
            return bool(st and st["last_result"] == "ok")

        def state() -> str:
            st = self.store.sync_state()
            return f"{_now()} " + ("no sync yet" if not st else f"last sync: {st['last_result']}")

        self.wait_for("the first sync is done", synced, state)
        self.daemon_events("daemon.started", "sync.finished")

    def tour(self) -> None:
        heading("1. alice creates a token with her directory password, and it works")
        say("groupgate checks her password against the directory and that she is in "
            "token-users;")
        say("the token is printed once (the demo keeps it in $TOKEN); only an argon2id hash "
            "is stored.")
        token = self.create("demo-laptop", "30d")
        say("An application checks the username and token it was given:")
        self.verify(token, 0, "ok: ")

        heading("2. alice leaves token-users: the daemon suspends her token")
        self.membership("remove")
        say(f"Nothing else to do: the running daemon notices at its next sync "
            f"(every {SYNC_INTERVAL}s).")
        self.wait_for("suspended", lambda: self.token_state(token)[0] == "suspended",
                      lambda: self.describe(token))
        self.daemon_events("token.suspended", "sync.failed", "sync.refused")
        self.verify(token, 1, "suspended (not_in_group)")

        heading("3. alice is added back: the daemon reactivates the same token")
        self.membership("add")
        self.wait_for("active again", lambda: self.token_state(token)[0] == "active",
                      lambda: self.describe(token))
        self.daemon_events("token.reactivated", "sync.failed", "sync.refused")
        self.verify(token, 0, "ok: ")

        heading(f"4. Tokens expire: a second token that lives {SHORT_LIFETIME}")
        short = self.create("demo-short", SHORT_LIFETIME)
        self.verify(short, 0, "ok: ")
        say("Once its time is up, verify refuses it at once, and the daemon's expire job "
            "(every 1s) records it as expired:")
        self.wait_for("expired", lambda: self.token_state(short)[0] == "expired",
                      lambda: self.describe(short, expiry=True), timeout=WAIT_TIMEOUT + 10)
        self.daemon_events("token.expired")
        self.verify(short, 1, "expired")

        heading("5. What happened, as an operator sees it")
        self.gg("token", "list", "--user", "alice")
        out()
        self.gg("audit", "--user", "alice", expect="suspend")
        out()
        self.gg("directory", "user", "alice", expect="tokens should be: active")

    # -- stopping -----------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Stop what we started (by PID), remove the temp dir; return any problems."""
        problems: list[str] = []
        d = self.daemon
        if d is not None and d.poll() is None:
            d.send_signal(signal.SIGTERM)
            try:
                d.wait(timeout=25)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait(timeout=5)
                problems.append(f"groupgate run (pid {d.pid}) ignored SIGTERM; killed it")
        if self.store is not None:
            try:
                self.store.close()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                problems.append(f"closing the store: {exc}")
        if self.slapd is not None:
            try:
                self.slapd.stop()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"stopping slapd: {exc}")
        shutil.rmtree(self.work, ignore_errors=True)
        if self.work.exists():
            problems.append(f"could not remove {self.work}")
        return problems

    def describe_cleanup(self) -> str:
        """What cleanup() is about to do, in words (called just before it)."""
        stopped: list[str] = []
        gone: list[str] = []
        if self.daemon is not None:
            (stopped if self.daemon.poll() is None else gone).append(
                f"groupgate run (pid {self.daemon.pid})")
        if self.slapd is not None and self.slapd.proc is not None:
            (stopped if self.slapd.running else gone).append(f"slapd (pid {self.slapd.proc.pid})")
        words = [f"stopped {' and '.join(stopped)}"] if stopped else []
        words += [f"{' and '.join(gone)} had already exited"] if gone else []
        return ", ".join([*words, f"removed {self.work}"])


def preflight() -> None:
    if not BIN.exists():
        raise StepFailed(f"{BIN} is missing: run scripts/demo (it installs groupgate into "
                         ".venv), not scripts/demo.py directly")
    # Debian keeps slapd in /usr/sbin, which is not on a normal user's PATH.
    path = os.environ.get("PATH", "")
    if "/usr/sbin" not in path.split(":") and os.path.exists("/usr/sbin/slapd"):
        os.environ["PATH"] = f"{path}:/usr/sbin" if path else "/usr/sbin"
    missing = [tool for tool, pkg in (("slapd", "slapd"), ("ldapadd", "ldap-utils"),
                                      ("setpriv", "util-linux")) if not shutil.which(tool)]
    if missing:
        pkgs = " ".join(dict.fromkeys({"slapd": "slapd", "ldapadd": "ldap-utils",
                                       "setpriv": "util-linux"}[t] for t in missing))
        raise StepFailed(f"missing {', '.join(missing)}: run 'sudo apt-get install {pkgs}' "
                         "(scripts/demo does this itself when run as root)")


def main(argv: Sequence[str]) -> int:
    if argv:
        print("usage: scripts/demo   (no arguments; see the top of scripts/demo.py)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started = time.monotonic()
    demo: Demo | None = None
    rc = 0
    try:
        preflight()
        demo = Demo()
        demo.setup()
        demo.tour()
    except StepFailed as exc:
        rc = 1
        print(_style("1;31", f"\ndemo FAILED: {exc}"), flush=True)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        rc = 128 + signum
        print(_style("1;33", f"\ndemo interrupted ({signal.Signals(signum).name})"),
              flush=True)
    finally:
        # No second Ctrl-C may cut the clean-up short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if demo is not None:
            what = demo.describe_cleanup()
            problems = demo.cleanup()
            heading("Cleaned up")
            say(f"{what}.")
            for p in problems:
                print(_style("1;31", f"clean-up problem: {p}"), flush=True)
                rc = rc or 1
    if rc == 0:
        say(f"Done in {time.monotonic() - started:.0f}s: every step did what it should.")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
