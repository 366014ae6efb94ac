"""A scripted tour of groupgate on SQLite: create the store, mint, verify, revoke, verify again.

It runs the real `groupgate` command for every step a person would type, in a temp dir that is
removed afterwards. Minting uses the library (token creation with directory authentication
comes with `groupgate token create` once a directory is configured).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

BIN = Path(sys.executable).parent / "groupgate"


def step(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m", flush=True)


def sh(*args: str, stdin: str | None = None, env: dict[str, str]) -> int:
    shown = " ".join(["groupgate", *args])
    print(f"$ {shown}" + (" <<< $TOKEN" if stdin else ""), flush=True)
    proc = subprocess.run([str(BIN), *args], input=stdin, text=True, env=env)
    print(f"(exit {proc.returncode})", flush=True)
    return proc.returncode


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="groupgate-tour-"))
    try:
        cfg = work / "config.toml"
        cfg.write_text(f'[store]\nurl = "sqlite:///{work}/groupgate.db"\n'
                       '[log]\nformat = "console"\nlevel = "warning"\n')
        env = {**os.environ, "GROUPGATE_CONFIG": str(cfg)}
        step(f"A config with a SQLite store in {work}; create the schema")
        assert sh("db", "upgrade", env=env) == 0

        step("Mint a 30-day token for alice (library API: TokenService.create)")
        from daemon.config import load_config
        from daemon.service import TokenService
        from daemon.store import TokenStore
        from daemon.tokens import SecretHasher

        config = load_config(cfg)
        store = TokenStore(config.store.url)
        created = TokenService(store, SecretHasher(), config.policy).create(
            "alice", "laptop", timedelta(days=30), datetime.now(UTC))
        store.close()
        token = created.token
        print(f"token (shown once, stored only as an argon2id hash): {token}")

        step("List tokens")
        sh("token", "list", env=env)
        step("Verify it as alice (token on stdin, never on the command line)")
        assert sh("verify", "--user", "alice", stdin=token, env=env) == 0
        step("The same token for bob is refused")
        assert sh("verify", "--user", "bob", stdin=token, env=env) == 1
        step("Revoke it")
        assert sh("token", "revoke", created.record.display_id, "--reason", "tour", env=env) == 0
        step("Verify again: refused, revoked is final")
        assert sh("verify", "--user", "alice", stdin=token, env=env) == 1
        step("The audit log")
        sh("audit", env=env)
        print("\nDone. Everything the tour made is removed.")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
