"""The OpenAPI document is part of the product: schemathesis fuzzes the live service against it.

One groupgate HTTP service (real uvicorn on a loopback port) serves the whole module, over a
module-scoped seeded slapd and a SQLite store. Every operation of the live
/api/openapi.json is called with generated valid and invalid data three ways: without
credentials, as alice (a token user) and as carol (an administrator), both by HTTP Basic with
the directory password.

Checks (schemathesis' own): no 5xx answer, every body matches its documented schema, every
status code is documented and every Content-Type is documented.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis  # a dev dependency: missing means a broken install, not a skip
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import HttpService, _need_slapd, slapd_config
from tests.servers.net import free_port

pytestmark = pytest.mark.slapd

SAFE_AND_SCHEMA = [not_a_server_error, response_schema_conformance]
DOCUMENTED = [status_code_conformance, content_type_conformance]
CREDENTIALS: dict[str, tuple[str, str] | None] = {
    "anonymous": None, "alice": ("alice", "alice-pw"), "carol": ("carol", "carol-pw")}
FUZZ = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpService]:
    """groupgate's HTTP service over its own slapd and SQLite store, for this module."""
    _need_slapd()
    from daemon.store import TokenStore
    from tests.servers.slapd import start_slapd

    slapd = start_slapd(tmp_path_factory.mktemp("openapi-slapd"))
    try:
        db = tmp_path_factory.mktemp("openapi-store") / "groupgate.db"
        store = TokenStore(f"sqlite:///{db}", check_schema=False)
        store.upgrade()
        store.close()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GROUPGATE_BIND_PASSWORD", slapd.service_password)
            mp.delenv("CREDENTIALS_DIRECTORY", raising=False)
            cfg = slapd_config(
                slapd, store={"url": f"sqlite:///{db}"},
                # generated requests create many tokens and fail many logins on purpose:
                # keep the per-user cap and the login throttle out of the way of coverage
                policy={"max_tokens_per_user": 10000},
                http={"listen": f"127.0.0.1:{free_port()}", "login_max_failures": 1000},
                verify={"argon2": {"memory_kib": 1024}})
            svc = HttpService(cfg)
        svc.start()
        try:
            yield svc
        finally:
            svc.stop()
    finally:
        slapd.stop()


@pytest.fixture(scope="module")
def api_schema(live_service: HttpService) -> Any:
    return schemathesis.openapi.from_url(f"{live_service.url}/api/openapi.json", timeout=10)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _lazy_schema_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy loader reads the private ``request.node._nodeid``, which
    pytest 9.2 no longer has; hand it the public node id."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _headers(who: str) -> dict[str, str] | None:
    creds = CREDENTIALS[who]
    if creds is None:
        return None
    raw = f"{creds[0]}:{creds[1]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


def _call(case: Any, svc: HttpService, who: str, checks: list[Any]) -> None:
    case.call_and_validate(base_url=svc.url, headers=_headers(who), checks=checks, timeout=10)


# One test per caller: schemathesis' lazy schemas accept no parametrized fixtures. Each runs
# schemathesis' coverage phase (boundary and invalid values) and its fuzzing phase, per
# operation (reported as subtests).

@schema.parametrize()
@FUZZ
def test_anonymous_calls_never_fail_and_match_the_schema(
        case: Any, live_service: HttpService) -> None:
    _call(case, live_service, "anonymous", SAFE_AND_SCHEMA + DOCUMENTED)


@schema.parametrize()
@FUZZ
def test_token_user_calls_never_fail_and_match_the_schema(
        case: Any, live_service: HttpService) -> None:
    _call(case, live_service, "alice", SAFE_AND_SCHEMA + DOCUMENTED)


@schema.parametrize()
@FUZZ
def test_admin_calls_never_fail_and_match_the_schema(
        case: Any, live_service: HttpService) -> None:
    _call(case, live_service, "carol", SAFE_AND_SCHEMA + DOCUMENTED)


# Regression tests for two bugs schemathesis found: an undecodable JSON body got FastAPI's
# undocumented 400, and problem answers were not documented as application/problem+json.

def _operation_doc(svc: HttpService, method: str, path: str) -> dict[str, Any]:
    doc = httpx.get(f"{svc.url}/api/openapi.json", timeout=10).json()
    return dict(doc["paths"][path][method])


@pytest.mark.parametrize(("path", "who"), [("/api/v1/tokens", "alice"),
                                           ("/api/v1/session", "anonymous")])
def test_an_undecodable_body_gets_a_documented_problem(path: str, who: str,
                                                       live_service: HttpService) -> None:
    r = httpx.post(f"{live_service.url}{path}", content=b'{"name": "\xff\xfe"}',
                   headers={"Content-Type": "application/json", **(_headers(who) or {})})
    assert r.status_code < 500
    assert str(r.status_code) in _operation_doc(live_service, "post", path)["responses"]
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "https://groupgate.invalid/problems/validation-error"


def test_problem_answers_are_documented_as_problem_json(live_service: HttpService) -> None:
    r = httpx.delete(f"{live_service.url}/api/v1/tokens/gg_000000000000",
                     headers=_headers("alice"))
    assert (r.status_code, r.headers["content-type"]) == (404, "application/problem+json")
    doc = httpx.get(f"{live_service.url}/api/openapi.json", timeout=10).json()
    undocumented = []
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for code, response in op["responses"].items():
                content = response.get("content")
                if int(code) >= 400 and content is not None and not content.get(
                        "application/problem+json", {}).get("schema"):
                    undocumented.append(f"{method.upper()} {path} {code}")
    assert not undocumented, "no application/problem+json schema: " + ", ".join(undocumented)
