"""A throwaway groupgate HTTP service for bench/http_auth.sh (no directory, SQLite store).

Builds a fresh SQLite store in DIR (``db upgrade``), mints one token for ``alice`` through
TokenService with the default argon2 settings, writes ``alice:<token>`` to DIR/credentials
(mode 0600) and then serves exactly as ``groupgate serve`` does (web.build + web.server:
uvicorn, one process, no access log) on 127.0.0.1:PORT until SIGTERM/SIGINT. The directory
is not configured: /auth and /healthz never touch it.

Usage::

    python bench/http_auth_server.py DIR PORT
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    workdir, port = Path(argv[0]), int(argv[1])

    from daemon import logs, web
    from daemon.config import parse_config
    from daemon.service import TokenService
    from daemon.store import TokenStore
    from daemon.tokens import SecretHasher

    cfg = parse_config({"store": {"url": f"sqlite:///{workdir / 'groupgate.db'}"},
                        "http": {"listen": f"127.0.0.1:{port}"},
                        "log": {"level": "warning"}}, "bench")
    logs.configure(cfg.log.format, cfg.log.level)

    store = TokenStore(cfg.store.url, check_schema=False)
    store.upgrade()
    a = cfg.verify.argon2  # the defaults: what a production config without [verify] gets
    created = TokenService(store, SecretHasher(a.time_cost, a.memory_kib, a.parallelism),
                           cfg.policy).create("alice", "bench", timedelta(days=1),
                                              datetime.now(UTC))
    store.close()
    cred = workdir / "credentials"
    fd = os.open(cred, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"alice:{created.token}\n")

    _web, app = web.build(cfg)
    web.server(cfg, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
