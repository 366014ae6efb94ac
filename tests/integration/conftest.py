"""Real directory servers for the integration tests.

A session-scoped slapd (with TLS) serves read-only tests; tests that change the directory get
their own slapd (about 0.1 s to start and seed). Samba AD works the same way: the domain is
provisioned once per session into a template, and each test that needs one gets a copy
(about 0.2 s). Servers are stopped by their own PID.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, parse_config
from tests.conftest import require_server
from tests.servers.certs import TestCerts, make_test_certs

SLAPD_BIN = "/usr/sbin/slapd"
SAMBA_BIN = "/usr/sbin/samba"


def _need_slapd() -> None:
    for tool in (SLAPD_BIN, "/usr/bin/ldapadd", "/usr/bin/setpriv"):
        if not os.path.exists(tool):
            require_server("OpenLDAP slapd",
                           f"{tool} is missing (apt-get install slapd ldap-utils)")


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    from tests.servers.samba import CANDIDATE_HOSTS

    return make_test_certs(tmp_path_factory.mktemp("certs"), ips=(*CANDIDATE_HOSTS, "127.0.0.1"),
                           dns=("localhost", "dc1.example.org"))


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory, test_certs: TestCerts) -> Iterator[Any]:
    """A seeded slapd for tests that only read; do not change its data."""
    _need_slapd()
    from tests.servers.slapd import start_slapd

    server = start_slapd(tmp_path_factory.mktemp("slapd"), tls=test_certs)
    yield server
    server.stop()


@pytest.fixture
def fresh_slapd(tmp_path: Path, test_certs: TestCerts) -> Iterator[Any]:
    """A seeded slapd of this test's own, free to change."""
    _need_slapd()
    from tests.servers.slapd import start_slapd

    server = start_slapd(tmp_path / "slapd", tls=test_certs)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def samba_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.path.exists(SAMBA_BIN):
        require_server("Samba AD DC", "samba is missing (apt-get install samba-ad-dc "
                       "samba-ad-provision)")
    if os.geteuid() != 0:
        require_server("Samba AD DC", "a Samba DC must run as root")
    return tmp_path_factory.mktemp("samba-template") / "t"


@pytest.fixture
def samba(samba_template: Path, tmp_path: Path, test_certs: TestCerts) -> Iterator[Any]:
    """A fresh seeded Samba AD DC of this test's own (copied from the session template)."""
    from tests.servers.samba import start_samba

    dc = start_samba(tmp_path / "samba", certs_dir=test_certs.dir, template_dir=samba_template)
    yield dc
    dc.stop()


def slapd_config(server: Any, **sections: dict[str, Any]) -> Config:
    """A groupgate Config pointing at a test slapd, with per-test overrides per section."""
    directory = {"urls": [server.url], "base_dn": server.base_dn, "bind_dn": server.service_dn,
                 "flavor": "openldap", "page_size": 50}
    policy = {"allowed_groups": ["token-users"], "admin_groups": ["token-admins"],
              "max_tokens_per_user": 10}
    data: dict[str, Any] = {"directory": {**directory, **sections.pop("directory", {})},
                            "policy": {**policy, **sections.pop("policy", {})}}
    data.update(sections)
    return parse_config(data, "test-config")


def samba_config(dc: Any, **sections: dict[str, Any]) -> Config:
    directory = {"urls": [dc.url], "base_dn": dc.base_dn, "bind_dn": dc.service_dn,
                 "flavor": "ad", "page_size": 50}
    policy = {"allowed_groups": ["token-users"], "admin_groups": ["token-admins"]}
    data: dict[str, Any] = {"directory": {**directory, **sections.pop("directory", {})},
                            "policy": {**policy, **sections.pop("policy", {})}}
    data.update(sections)
    return parse_config(data, "test-config")


@pytest.fixture
def bind_password(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Provide the service password the way an admin would: through the environment."""
    def _set(pw: str) -> None:
        monkeypatch.setenv("GROUPGATE_BIND_PASSWORD", pw)
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    return _set





class HttpService:
    """A real groupgate HTTP service (uvicorn in a thread) on a loopback port."""

    def __init__(self, config: Config) -> None:
        import threading

        from daemon import web

        self.config = config
        self.web, self.app = web.build(config)
        self.server = web.server(config, self.app)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://{config.http.listen}"

    def start(self) -> None:
        from tests.servers.net import wait_until

        self.thread.start()
        wait_until(lambda: bool(self.server.started) or not self.thread.is_alive(),
                   timeout=15, what="the HTTP service to start")
        assert self.server.started, "the HTTP service did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def http_service(fresh_slapd: Any, store: Any, bind_password: Callable[[str], None]
                 ) -> Iterator[Callable[..., HttpService]]:
    """Start groupgate's HTTP service over this test's slapd and store; stopped afterwards.

    Call it with config overrides per section: ``http_service(http={"realm": "x"})``.
    """
    from tests.servers.net import free_port

    started: list[HttpService] = []
    bind_password(fresh_slapd.service_password)

    def _start(**sections: dict[str, Any]) -> HttpService:
        http = {"listen": f"127.0.0.1:{free_port()}", **sections.pop("http", {})}
        if "tls_cert_file" not in http:  # plain HTTP on loopback: cookies cannot be Secure
            http.setdefault("secure_cookies", False)
        verify = {"argon2": {"memory_kib": 1024}, **sections.pop("verify", {})}
        cfg = slapd_config(fresh_slapd, store={"url": store.url}, http=http, verify=verify,
                           **sections)
        svc = HttpService(cfg)
        svc.start()
        started.append(svc)
        return svc

    yield _start
    for svc in started:
        svc.stop()
