"""The HTTP service as users and applications meet it: real uvicorn, real HTTP, real slapd.

Every test that talks to the service runs on both store backends (SQLite and PostgreSQL)
through the `http_service` fixture: a groupgate service on a loopback port over this test's
own seeded slapd. Directory passwords are "<uid>-pw"; alice and bob are in token-users, carol
through nested token-admins (and an administrator), dave in no allowed group, ivan locked.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import ldap3
import pytest
from structlog.testing import capture_logs

from daemon.config import parse_config
from daemon.errors import ConfigError
from daemon.service import TokenService
from daemon.tokens import TOKEN_RE, ParsedToken, SecretHasher, generate, parse
from tests.integration.conftest import HttpService
from tests.servers.certs import TestCerts

PROBLEMS = "https://groupgate.invalid/problems/"
CSRF_FIELD = re.compile(r'<input type="hidden" name="csrf" value="([^"]*)">')
POST_FORM = re.compile(r'<form method="post".*?</form>', re.S)
Start = Callable[..., HttpService]


# --- helpers -----------------------------------------------------------------------------------

def pw(user: str) -> tuple[str, str]:
    """Directory credentials of a seeded user."""
    return (user, f"{user}-pw")


def basic(user: str, secret: str | bytes) -> str:
    raw = secret if isinstance(secret, bytes) else secret.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode("ascii")


@pytest.fixture
def clients() -> Iterator[Callable[..., httpx.Client]]:
    """httpx clients for a service, closed at the end of the test."""
    made: list[httpx.Client] = []

    def _client(svc: HttpService, **kw: Any) -> httpx.Client:
        c = httpx.Client(base_url=kw.pop("base_url", svc.url), timeout=10, **kw)
        made.append(c)
        return c

    yield _client
    for c in made:
        c.close()


def create(c: httpx.Client, user: str, name: str = "ci", **body: Any) -> dict[str, Any]:
    r = c.post("/api/v1/tokens", json={"name": name, **body}, auth=pw(user))
    assert r.status_code == 201, r.text
    return dict(r.json())


def forward(c: httpx.Client, user: str, token: str) -> httpx.Response:
    return c.get("/auth", headers={"Authorization": basic(user, token)})


def problem(r: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem answer with a stable type; return its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = dict(r.json())
    assert body["type"] == PROBLEMS + kind, body
    assert body["status"] == status and body["title"]
    return body


def refused(r: httpx.Response, realm: str = "groupgate") -> None:
    """The forward-auth refusal: 401, a Basic challenge, and nothing else to learn from."""
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith(f'Basic realm="{realm}"')
    assert r.content == b""
    assert "x-auth-user" not in r.headers and "x-auth-token-id" not in r.headers


def cookie_attrs(r: httpx.Response, name: str) -> dict[str, str]:
    """The attributes of one Set-Cookie header, lower-cased keys (value under the name)."""
    for header in r.headers.get_list("set-cookie"):
        first, *attrs = [p.strip() for p in header.split(";")]
        key, _, value = first.partition("=")
        if key == name:
            out = {name: value}
            for a in attrs:
                k, _, v = a.partition("=")
                out[k.lower()] = v
            return out
    raise AssertionError(f"no Set-Cookie for {name}: {r.headers.get_list('set-cookie')}")


def member_change(svc: Any, op: str, user: str, group: str = "token-users") -> None:
    conn = svc.admin_connection()
    kind = ldap3.MODIFY_DELETE if op == "remove" else ldap3.MODIFY_ADD
    assert conn.modify(f"cn={group},ou=groups,dc=example,dc=org",
                       {"member": [(kind, [f"uid={user},ou=people,dc=example,dc=org"])]}), \
        conn.result
    conn.unbind()


def sync_now(svc: HttpService, store: Any) -> None:
    from daemon.directory import from_config
    from daemon.sync import run_sync

    cfg = svc.config
    run_sync(from_config(cfg.directory, cfg.policy), store, cfg.policy, cfg.sync,
             now=datetime.now(UTC))


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --- forward auth --------------------------------------------------------------------------------

@pytest.mark.slapd
def test_forward_auth_names_the_user_of_a_valid_token(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    made = create(c, "alice", lifetime_days=7)
    for sent in ("alice", "ALICE", "Alice"):
        r = forward(c, sent, made["token"])
        assert r.status_code == 204, sent
        assert r.headers["x-auth-user"] == "alice"
        assert r.headers["x-auth-token-id"] == made["id"]
        assert when(r.headers["x-token-expires"]) == when(made["expires_at"])
        assert r.content == b""


@pytest.mark.slapd
def test_forward_auth_refuses_everything_else_with_a_bare_challenge(
        http_service: Start, clients: Any) -> None:
    c = clients(http_service(http={"realm": "intranet"}))
    token = create(c, "alice")["token"]
    tid = parse(token)
    assert tid is not None
    wrong_secret = str(ParsedToken(tid.token_id, generate().secret))
    non_utf8 = base64.b64encode(b"alice:\xff\xfe" + token.encode()).decode()
    headers: dict[str, Any] = {
        "wrong secret": basic("alice", wrong_secret),
        "wrong user": basic("bob", token),
        "unknown token": basic("alice", str(generate())),
        "password instead of token": basic("alice", "alice-pw"),
        "Bearer": f"Bearer {token}",
        "bad base64": "Basic !!not-base64!!",
        "no colon": "Basic " + base64.b64encode(token.encode()).decode(),
        "non-UTF-8 in base64": f"Basic {non_utf8}",
        "raw non-UTF-8 bytes": b"Basic \xe9\xff\xfe",
        "empty": "",
        "huge": "Basic " + "QUFB" * 2000,
    }
    for what, value in headers.items():
        r = c.get("/auth", headers={"Authorization": value})
        try:
            refused(r, realm="intranet")
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from exc
    refused(c.get("/auth"), realm="intranet")  # no header at all
    assert forward(c, "alice", token).status_code == 204  # and the real one still works


@pytest.mark.slapd
def test_a_suspended_token_is_refused_until_the_owner_is_back_in_the_group(
        http_service: Start, clients: Any, store: Any, fresh_slapd: Any) -> None:
    svc = http_service()
    c = clients(svc)
    token = create(c, "alice")["token"]
    assert forward(c, "alice", token).status_code == 204

    member_change(fresh_slapd, "remove", "alice")
    sync_now(svc, store)
    refused(forward(c, "alice", token))
    (listed,) = c.get("/api/v1/tokens", auth=pw("alice")).json()
    assert (listed["status"], listed["status_reason"]) == ("suspended", "not_in_group")
    body = problem(c.post("/api/v1/tokens", json={"name": "x"}, auth=pw("alice")), 403,
                   "not-in-allowed-group")
    assert "token-users" in body["detail"]

    member_change(fresh_slapd, "add", "alice")
    sync_now(svc, store)
    assert forward(c, "alice", token).status_code == 204


@pytest.mark.slapd
def test_an_expired_token_is_refused(http_service: Start, clients: Any, store: Any) -> None:
    svc = http_service()
    c = clients(svc)
    service = TokenService(store, SecretHasher(1, 1024, 1), svc.config.policy)
    old = service.create("alice", "old", timedelta(days=1),
                         datetime.now(UTC) - timedelta(days=2))
    refused(forward(c, "alice", old.token))
    (listed,) = c.get("/api/v1/tokens", auth=pw("alice")).json()
    assert when(listed["expires_at"]) < datetime.now(UTC)


@pytest.mark.slapd
def test_a_revocation_takes_effect_on_the_very_next_call(http_service: Start,
                                                         clients: Any) -> None:
    c = clients(http_service())
    made = create(c, "alice")
    assert forward(c, "alice", made["token"]).status_code == 204  # now known to the verifier
    assert c.delete(f"/api/v1/tokens/{made['id']}", auth=pw("alice")).status_code == 204
    refused(forward(c, "alice", made["token"]))
    (listed,) = c.get("/api/v1/tokens", auth=pw("alice")).json()
    assert (listed["status"], listed["status_reason"]) == ("revoked", "revoked by owner")


# --- self-service API ----------------------------------------------------------------------------

@pytest.mark.slapd
def test_create_a_token_by_lifetime_or_by_expiry_time(http_service: Start,
                                                      clients: Any) -> None:
    c = clients(http_service())
    before = datetime.now(UTC)
    by_days = create(c, "alice", "laptop", lifetime_days=7)
    default = create(c, "alice", "default")
    at = (before + timedelta(days=10)).replace(microsecond=0)
    by_time = create(c, "alice", "ci-job", expires_at=at.isoformat().replace("+00:00", "Z"))
    after = datetime.now(UTC)

    assert before + timedelta(days=7) <= when(by_days["expires_at"]) <= after + timedelta(days=7)
    assert before + timedelta(days=30) <= when(default["expires_at"]) <= after + timedelta(days=30)
    assert abs(when(by_time["expires_at"]) - at) < timedelta(seconds=2)
    for made in (by_days, default, by_time):
        assert TOKEN_RE.fullmatch(made["token"])
        assert made["token"].startswith(made["id"] + "_")
        assert (made["owner"], made["created_by"], made["status"]) == ("alice", "alice", "active")
        assert made["last_used_at"] is None and made["status_reason"] is None
    listed = c.get("/api/v1/tokens", auth=pw("alice")).json()
    assert {t["id"] for t in listed} == {by_days["id"], default["id"], by_time["id"]}
    assert all("token" not in t for t in listed)  # the secret is shown once, at creation


# Regression: the lifetime was computed against one clock reading and added to a later one.
@pytest.mark.slapd
def test_an_exact_expiry_time_is_kept_exactly(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    at = (datetime.now(UTC) + timedelta(days=10)).replace(microsecond=0)
    made = create(c, "alice", expires_at=at.isoformat())
    _form_login(c, "alice")
    (csrf, *_) = CSRF_FIELD.findall(c.get("/").text)
    day = at.date().isoformat()
    page = c.post("/tokens", data={"name": "by-date", "lifetime": "date", "expires_on": day,
                                   "csrf": csrf})
    assert page.status_code == 201, page.text
    by_name = {t["name"]: t for t in c.get("/api/v1/tokens").json()}
    assert when(made["expires_at"]) == at
    assert when(by_name["by-date"]["expires_at"]) == datetime.combine(
        at.date(), datetime.max.time().replace(microsecond=0), tzinfo=UTC)


@pytest.mark.slapd
def test_lifetimes_beyond_the_policy_are_refused(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    far = (datetime.now(UTC) + timedelta(days=91)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    for body in ({"lifetime_days": 91}, {"expires_at": far}):
        detail = problem(c.post("/api/v1/tokens", json={"name": "x", **body}, auth=pw("alice")),
                         422, "invalid-request")["detail"]
        assert "90 days" in detail, detail
    problem(c.post("/api/v1/tokens", json={"name": "x", "expires_at": past}, auth=pw("alice")),
            422, "invalid-request")
    both = problem(c.post("/api/v1/tokens", json={"name": "x", "lifetime_days": 5,
                                                  "expires_at": far}, auth=pw("alice")),
                   422, "validation-error")
    assert [e["field"] for e in both["errors"]] == ["lifetime_days"]
    assert c.get("/api/v1/tokens", auth=pw("alice")).json() == []
    assert create(c, "alice", lifetime_days=90)["status"] == "active"


@pytest.mark.slapd
def test_a_group_limit_raises_the_cap_for_its_members_only(http_service: Start,
                                                           clients: Any) -> None:
    c = clients(http_service(policy={"group_limits": [{"group": "long-lived",
                                                       "max_lifetime_days": 365}]}))
    assert create(c, "bob", lifetime_days=365)["owner"] == "bob"
    detail = problem(c.post("/api/v1/tokens", json={"name": "y", "lifetime_days": 366},
                            auth=pw("bob")), 422, "invalid-request")["detail"]
    assert "365 days" in detail
    detail = problem(c.post("/api/v1/tokens", json={"name": "y", "lifetime_days": 365},
                            auth=pw("alice")), 422, "invalid-request")["detail"]
    assert "90 days" in detail
    caps = {u: c.post("/api/v1/session", json=dict(zip(("username", "password"), pw(u),
                                                       strict=True))).json()
            for u in ("alice", "bob")}
    assert (caps["alice"]["max_lifetime_days"], caps["bob"]["max_lifetime_days"]) == (90, 365)


@pytest.mark.slapd
def test_token_names_are_validated(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    for body in ({"name": ""}, {"name": "x" * 65}, {}, {"name": None}):
        r = c.post("/api/v1/tokens", json=body, auth=pw("alice"))
        errors = problem(r, 422, "validation-error")["errors"]
        assert [e["field"] for e in errors] == ["name"], body
    for name in (" padded ", "tab\there"):
        problem(c.post("/api/v1/tokens", json={"name": name}, auth=pw("alice")), 422,
                "invalid-request")
    assert create(c, "alice", "x" * 64)["name"] == "x" * 64
    dup = problem(c.post("/api/v1/tokens", json={"name": "x" * 64}, auth=pw("alice")), 422,
                  "invalid-request")
    assert "already" in dup["detail"]


@pytest.mark.slapd
def test_people_see_and_revoke_only_their_own_tokens(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    a = create(c, "alice")
    b = create(c, "bob")
    assert [t["id"] for t in c.get("/api/v1/tokens", auth=pw("alice")).json()] == [a["id"]]
    assert [t["id"] for t in c.get("/api/v1/tokens", auth=pw("bob")).json()] == [b["id"]]

    for tid in (b["id"], b["id"].removeprefix("gg_"), "gg_000000000000", "nonsense"):
        problem(c.delete(f"/api/v1/tokens/{tid}", auth=pw("alice")), 404, "token-not-found")
    assert forward(c, "bob", b["token"]).status_code == 204  # untouched

    assert c.delete(f"/api/v1/tokens/{a['id']}", auth=pw("alice")).status_code == 204
    refused(forward(c, "alice", a["token"]))
    problem(c.delete(f"/api/v1/tokens/{a['id']}", auth=pw("alice")), 409, "token-final")


@pytest.mark.slapd
def test_nobody_can_create_a_token_for_another_account(http_service: Start,
                                                       clients: Any) -> None:
    c = clients(http_service())
    r = c.post("/api/v1/tokens?owner=bob", auth=pw("alice"),
               json={"name": "sneaky", "owner": "bob", "created_by": "bob", "username": "bob"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert (made["owner"], made["created_by"]) == ("alice", "alice")
    refused(forward(c, "bob", made["token"]))
    assert forward(c, "alice", made["token"]).headers["x-auth-user"] == "alice"
    assert c.get("/api/v1/tokens", auth=pw("bob")).json() == []


@pytest.mark.slapd
def test_a_token_never_stands_in_for_the_password(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    token = create(c, "alice")["token"]
    as_token = ("alice", token)
    problem(c.get("/api/v1/tokens", auth=as_token), 401, "token-not-accepted")
    problem(c.post("/api/v1/tokens", json={"name": "child"}, auth=as_token), 401,
            "token-not-accepted")
    problem(c.post("/api/v1/session", json={"username": "alice", "password": token}), 401,
            "token-not-accepted")
    assert [t["name"] for t in c.get("/api/v1/tokens", auth=pw("alice")).json()] == ["ci"]


@pytest.mark.slapd
def test_who_may_use_the_api(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    body = problem(c.post("/api/v1/tokens", json={"name": "x"}, auth=pw("dave")), 403,
                   "not-in-allowed-group")
    assert body["detail"] == "only members of token-users may hold tokens, and you are not one"
    assert c.get("/api/v1/tokens", auth=pw("dave")).json() == []

    wrong = problem(c.get("/api/v1/tokens", auth=("alice", "not-her-pw")), 401,
                    "not-authenticated")
    nobody = problem(c.get("/api/v1/tokens", auth=("nobody", "nobody-pw")), 401,
                     "not-authenticated")
    locked = problem(c.get("/api/v1/tokens", auth=pw("ivan")), 401, "not-authenticated")
    assert wrong == nobody == locked  # the answer does not tell who exists
    anonymous = c.get("/api/v1/tokens")
    assert "password" in problem(anonymous, 401, "not-authenticated")["title"]
    assert anonymous.headers["www-authenticate"].startswith('Basic realm="groupgate"')


# RFC 9110: every 401 names the scheme to retry with.
@pytest.mark.slapd
def test_every_basic_auth_refusal_on_the_api_names_the_scheme(http_service: Start,
                                                               clients: Any) -> None:
    c = clients(http_service())
    token = create(c, "alice")["token"]
    for auth in (("alice", "not-her-pw"), ("nobody", "x"), ("alice", token)):
        r = c.get("/api/v1/tokens", auth=auth)
        assert r.status_code == 401
        assert r.headers.get("www-authenticate", "").startswith('Basic realm="groupgate"'), auth


@pytest.mark.slapd
def test_administrators_see_revoke_and_audit_everyone(http_service: Start,
                                                      clients: Any) -> None:
    c = clients(http_service())
    a = create(c, "alice")
    b = create(c, "bob", "deploy")
    carol = pw("carol")

    everyone = c.get("/api/v1/admin/tokens", auth=carol).json()
    assert {(t["owner"], t["id"]) for t in everyone} == {("alice", a["id"]), ("bob", b["id"])}
    assert all("token" not in t for t in everyone)
    assert [t["id"] for t in c.get("/api/v1/admin/tokens", params={"owner": "BOB"},
                                   auth=carol).json()] == [b["id"]]

    assert c.delete(f"/api/v1/admin/tokens/{b['id']}", auth=carol).status_code == 204
    refused(forward(c, "bob", b["token"]))
    revoked = c.get("/api/v1/admin/tokens", params={"status": "revoked"}, auth=carol).json()
    assert [(t["id"], t["status_reason"]) for t in revoked] == [(b["id"], "revoked by admin")]
    active = c.get("/api/v1/admin/tokens", params={"status": "active"}, auth=carol).json()
    assert [t["id"] for t in active] == [a["id"]]
    problem(c.delete(f"/api/v1/admin/tokens/{b['id']}", auth=carol), 409, "token-final")

    audit = c.get("/api/v1/admin/audit", params={"owner": "bob"}, auth=carol).json()
    assert [(e["action"], e["actor"], e["token_id"]) for e in audit] == [
        ("created", "bob", b["id"]), ("revoke", "admin:carol", b["id"])]
    by_token = c.get("/api/v1/admin/audit", params={"token": a["id"]}, auth=carol).json()
    assert [e["action"] for e in by_token] == ["created"]

    for r in (c.get("/api/v1/admin/tokens", auth=pw("alice")),
              c.get("/api/v1/admin/audit", auth=pw("alice")),
              c.delete(f"/api/v1/admin/tokens/{a['id']}", auth=pw("alice"))):
        problem(r, 403, "not-admin")
    assert forward(c, "alice", a["token"]).status_code == 204


# --- cookie sessions -----------------------------------------------------------------------------

@pytest.mark.slapd
def test_a_cookie_session_needs_the_csrf_header_for_changes(http_service: Start,
                                                            clients: Any) -> None:
    c = clients(http_service())
    r = c.post("/api/v1/session", json={"username": "Alice", "password": "alice-pw"})
    assert r.status_code == 200, r.text
    session = r.json()
    assert (session["username"], session["admin"], session["allowed"],
            session["max_lifetime_days"]) == ("alice", False, True, 90)
    csrf = session["csrf_token"]
    attrs = cookie_attrs(r, "gg_session")
    assert attrs["gg_session"] and "httponly" in attrs and attrs["path"] == "/"
    assert attrs["samesite"].lower() == "strict"
    assert "secure" not in attrs  # plain HTTP on loopback: a Secure cookie would never return

    assert c.get("/api/v1/tokens").json() == []
    problem(c.post("/api/v1/tokens", json={"name": "x"}), 403, "csrf")
    problem(c.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "guess"}),
            403, "csrf")
    made = c.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201 and made.json()["owner"] == "alice"
    tid = made.json()["id"]
    problem(c.delete(f"/api/v1/tokens/{tid}"), 403, "csrf")
    assert forward(c, "alice", made.json()["token"]).status_code == 204
    assert c.delete(f"/api/v1/tokens/{tid}", headers={"X-CSRF-Token": csrf}).status_code == 204

    out = c.delete("/api/v1/session")
    assert out.status_code == 204
    cleared = cookie_attrs(out, "gg_session")
    assert cleared["gg_session"] in ("", '""') and cleared.get("max-age") == "0"
    assert "gg_session" not in c.cookies
    problem(c.get("/api/v1/tokens"), 401, "not-authenticated")


@pytest.mark.slapd
def test_repeated_wrong_passwords_throttle_logins_for_a_while(http_service: Start,
                                                              clients: Any) -> None:
    window = 2
    c = clients(http_service(http={"login_max_failures": 3, "login_window_seconds": window}))
    good = {"username": "alice", "password": "alice-pw"}
    for _ in range(3):
        problem(c.post("/api/v1/session", json={**good, "password": "nope"}), 401,
                "not-authenticated")
    throttled_at = time.monotonic()
    for r in (c.post("/api/v1/session", json=good), c.get("/api/v1/tokens", auth=pw("alice"))):
        body = problem(r, 429, "too-many-attempts")
        assert 1 <= int(r.headers["retry-after"]) <= window + 1
        assert r.headers["retry-after"] in body["detail"]

    deadline = time.monotonic() + window + 5
    while (r := c.post("/api/v1/session", json=good)).status_code == 429:
        assert time.monotonic() < deadline, "the throttle never lifted"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert time.monotonic() - throttled_at >= window - 1  # it did hold for about the window


# --- the web page --------------------------------------------------------------------------------

def _security_headers(r: httpx.Response) -> None:
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.slapd
def test_every_answer_carries_the_security_headers(http_service: Start, clients: Any) -> None:
    c = clients(http_service())
    token = create(c, "alice")["token"]
    answers = {
        "/ anonymous": c.get("/"),
        "/login": c.get("/login"),
        "/api/v1/tokens anonymous": c.get("/api/v1/tokens"),
        "/api/v1/tokens": c.get("/api/v1/tokens", auth=pw("alice")),
        "/auth refused": c.get("/auth"),
        "/auth": forward(c, "alice", token),
        "/healthz": c.get("/healthz"),
        "404": c.get("/no/such/page"),
    }
    session = c.post("/api/v1/session", json={"username": "alice", "password": "alice-pw"})
    answers["/ logged in"] = c.get("/")
    assert session.status_code == 200 and answers["/ logged in"].status_code == 200
    assert answers["/ anonymous"].status_code == 303
    for what, r in answers.items():
        try:
            _security_headers(r)
        except (AssertionError, KeyError) as exc:
            raise AssertionError(f"{what}: {exc!r}") from exc


def _form_login(c: httpx.Client, user: str) -> None:
    page = c.get("/login")
    (csrf,) = CSRF_FIELD.findall(page.text)
    r = c.post("/login", data={"username": user, "password": f"{user}-pw", "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/", r.text


@pytest.mark.slapd
def test_the_login_page_and_every_form_carry_a_csrf_token(http_service: Start,
                                                          clients: Any) -> None:
    svc = http_service()
    c = clients(svc)
    page = c.get("/login")
    assert page.status_code == 200
    (csrf,) = CSRF_FIELD.findall(page.text)
    pre = cookie_attrs(page, "gg_prelogin")
    assert pre["gg_prelogin"] == csrf and "httponly" in pre and pre["samesite"].lower() == "strict"

    form = {"username": "alice", "password": "alice-pw"}
    stranger = clients(svc)  # a cross-site form post carries no pre-login cookie
    problem(stranger.post("/login", data={**form, "csrf": csrf}), 403, "csrf")
    problem(c.post("/login", data={**form, "csrf": "forged"}), 403, "csrf")
    problem(c.post("/login", data=form), 403, "csrf")
    r = c.post("/login", data={**form, "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert cookie_attrs(r, "gg_session")["gg_session"]

    made = c.post("/tokens", data={"name": "from-page", "lifetime": "7", "csrf": "forged"})
    problem(made, 403, "csrf")
    home = c.get("/")
    (session_csrf, *_) = CSRF_FIELD.findall(home.text)
    made = c.post("/tokens", data={"name": "from-page", "lifetime": "7", "csrf": session_csrf})
    assert made.status_code == 201
    (shown,) = TOKEN_RE.findall(made.text)
    assert forward(c, "alice", shown).status_code == 204

    admin = clients(svc)
    _form_login(admin, "carol")
    pages = {"tokens page": c.get("/"), "admin page": admin.get("/admin")}
    for what, r in pages.items():
        assert r.status_code == 200, what
        forms = POST_FORM.findall(r.text)
        assert len(forms) >= 2, what  # log out, and revoke or create
        for f in forms:
            values = CSRF_FIELD.findall(f)
            assert len(values) == 1 and len(values[0]) >= 16, (what, f)
    problem(c.get("/admin"), 403, "not-admin")
    problem(c.post("/logout", data={"csrf": "forged"}), 403, "csrf")
    out = c.post("/logout", data={"csrf": session_csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert c.get("/").status_code == 303


# --- secrets and logs ----------------------------------------------------------------------------

@pytest.mark.slapd
def test_no_token_or_password_reaches_a_log(http_service: Start, clients: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    c = clients(http_service())
    wrong_pw = "Wr0ng-but-secret-Passphrase"
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        made = create(c, "alice")
        token = made["token"]
        forward(c, "alice", token)
        forward(c, "ALICE", token)
        wrong_secret = str(ParsedToken(made["id"].removeprefix("gg_"), generate().secret))
        forward(c, "alice", wrong_secret)
        forward(c, "bob", token)
        c.get("/api/v1/tokens", auth=("alice", token))
        c.get("/api/v1/tokens", auth=("alice", wrong_pw))
        c.post("/api/v1/session", json={"username": "alice", "password": wrong_pw})
        c.post("/api/v1/session", json={"username": "bob", "password": "bob-pw"})
        page = c.get("/login")
        (csrf,) = CSRF_FIELD.findall(page.text)
        c.post("/login", data={"username": "carol", "password": "carol-pw", "csrf": csrf})
        c.delete(f"/api/v1/tokens/{made['id']}", auth=pw("alice"))
    assert any(e["event"] == "token.created" for e in events)  # the capture did see the service
    assert any(e["event"] == "http.login_failed" for e in events)
    text = repr(events) + caplog.text
    secret = token[len(made["id"]) + 1:]
    for s in (token, secret, wrong_secret, "alice-pw", "bob-pw", "carol-pw", wrong_pw):
        assert s not in text, f"{s[:6]}… appears in a log event"


# --- exposure rules and TLS ----------------------------------------------------------------------

@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8443", "192.0.2.10:80",
                                    "example.org:8080"])
def test_plain_http_is_served_on_loopback_only(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"http\.listen"):
        parse_config({"http": {"listen": listen}})
    assert parse_config({"http": {"listen": listen, "allow_plain_http": True}}).http.listen
    tls = {"tls_cert_file": "/etc/ssl/gg.crt", "tls_key_file": "/etc/ssl/gg.key"}
    assert parse_config({"http": {"listen": listen, **tls}}).http.tls_cert_file


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"])
def test_plain_http_on_loopback_needs_no_flag(listen: str) -> None:
    assert parse_config({"http": {"listen": listen}}).http.listen == listen


@pytest.mark.slapd
def test_with_a_certificate_the_service_speaks_https_and_cookies_are_secure(
        http_service: Start, clients: Any, test_certs: TestCerts) -> None:
    svc = http_service(http={"tls_cert_file": str(test_certs.server_cert),
                             "tls_key_file": str(test_certs.server_key)})
    url = svc.url.replace("http://", "https://")
    c = clients(svc, base_url=url, verify=ssl.create_default_context(
        cafile=str(test_certs.ca_cert)))
    assert c.get("/healthz").status_code == 204
    r = c.post("/api/v1/session", json={"username": "alice", "password": "alice-pw"})
    assert r.status_code == 200
    assert "secure" in cookie_attrs(r, "gg_session")
    assert "secure" in cookie_attrs(c.get("/login"), "gg_prelogin")
    assert r.headers["strict-transport-security"].startswith("max-age=")
    token = c.post("/api/v1/tokens", json={"name": "tls"},
                   headers={"X-CSRF-Token": r.json()["csrf_token"]}).json()["token"]
    assert forward(c, "alice", token).status_code == 204

    untrusting = clients(svc, base_url=url, verify=ssl.create_default_context(
        cafile=str(test_certs.wrong_ca_cert)))
    with pytest.raises(httpx.ConnectError):
        untrusting.get("/healthz")
    with pytest.raises(httpx.HTTPError):
        clients(svc).get("/healthz")  # plain HTTP to the TLS port gets no answer



@pytest.mark.slapd
def test_a_demoted_admin_cannot_revoke_from_the_page(http_service: Start, clients: Any,
                                                     store: Any, fresh_slapd: Any) -> None:
    """Admin rights come from the directory at the time of the request, not from the cookie."""
    svc = http_service()
    c = clients(svc)
    bob = create(c, "bob")
    session = c.post("/api/v1/session", json={"username": "carol", "password": "carol-pw"})
    assert session.status_code == 200 and session.json()["admin"] is True
    csrf = session.json()["csrf_token"]
    member_change(fresh_slapd, "add", "dave", group="token-admins")  # a group keeps a member
    member_change(fresh_slapd, "remove", "carol", group="token-admins")
    r = c.post(f"/tokens/{bob['id']}/revoke", data={"csrf": csrf, "admin": "1"},
               follow_redirects=False)
    assert r.status_code == 403
    assert store.get_token(bob["id"][3:]).status.value == "active"


@pytest.mark.slapd
def test_forward_auth_names_a_user_whose_name_is_not_latin1(http_service: Start, clients: Any,
                                                           store: Any) -> None:
    """X-Auth-User carries UTF-8 (proxies pass the bytes through); never a 500."""
    svc = http_service()
    made = TokenService(store, SecretHasher(1, 1024, 1), svc.config.policy).create(
        "łukasz", "x", timedelta(days=1), datetime.now(UTC))
    r = clients(svc).get("/auth", headers={"Authorization": basic("łukasz", made.token)})
    assert r.status_code == 204
    assert dict(r.headers.raw)[b"x-auth-user"].decode("utf-8") == "łukasz"
