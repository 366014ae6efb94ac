"""The web page in a real browser: Chromium driven by Playwright against a real service.

Each test starts groupgate's HTTP service over its own slapd and store (SQLite and
PostgreSQL), then clicks and types like a person and asserts what that person sees. One
Chromium per module, a fresh browser context (cookies, storage) per test.

Every page is watched for Content-Security-Policy violations and JavaScript errors; any is
a failure. Screenshots of each page land in the test's tmp_path; with
GROUPGATE_SCREENSHOTS=1 the tokens page with the new-token dialog is also written to
docs/screenshot-tokens.png (the README's picture), so a normal run never touches the repo.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; `playwright
install` is never needed because the system browser is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ldap3
import pytest

from daemon.directory import from_config
from daemon.sync import run_sync
from tests.conftest import require_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1100, "height": 760}
POLICY = {"admin_groups": ["token-admins"]}
TOKEN_USERS = "cn=token-users,ou=groups,dc=example,dc=org"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot-tokens.png"

# Reports CSP violations to the console from every document. Playwright injects init
# scripts through the DevTools protocol, so the page's own CSP does not block this one.
CSP_PROBE = """
document.addEventListener("securitypolicyviolation", (e) => {
  console.error("CSP violation: " + e.violatedDirective + " blocked " + (e.blockedURI || "inline"));
});
"""

pytestmark = pytest.mark.slapd


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module; closed (all its processes) at the end."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_server("Chromium via Playwright", "the playwright package is missing "
                       "(pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        require_server("Chromium via Playwright", f"{CHROMIUM} is missing "
                       "(apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except BaseException:
        pw.stop()
        raise
    try:
        yield b
    finally:
        b.close()
        pw.stop()


class UI:
    """A person at a browser in front of one groupgate service."""

    def __init__(self, svc: Any, context: Any, shots: Path) -> None:
        self.svc, self.context, self.shots = svc, context, shots
        self.url = svc.url
        self.problems: list[str] = []  # CSP violations and uncaught JS errors, any page
        context.add_init_script(CSP_PROBE)
        context.on("console", self._console)
        context.on("page", lambda page: page.on(
            "pageerror", lambda exc: self.problems.append(f"JavaScript error: {exc}")))
        self.page = context.new_page()

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and ("Content Security Policy" in msg.text
                                    or "CSP violation" in msg.text):
            self.problems.append(msg.text)

    def take_problems(self) -> list[str]:
        """The problems seen so far, forgetting them (the teardown check starts afresh)."""
        found = list(self.problems)
        self.problems.clear()
        return found

    def login(self, username: str, password: str | None = None) -> Any:
        page = self.page
        page.goto("/login")
        page.get_by_label("Username").press_sequentially(username)
        page.get_by_label("Password").press_sequentially(password or f"{username}-pw")
        page.get_by_role("button", name="Log in").click()
        return page

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def auth(self, username: str, token: str) -> int:
        return httpx.get(f"{self.url}/auth", auth=(username, token), timeout=10).status_code

    def mint(self, username: str, name: str, days: int = 30) -> str:
        r = httpx.post(f"{self.url}/api/v1/tokens", auth=(username, f"{username}-pw"),
                       json={"name": name, "lifetime_days": days}, timeout=10)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


@pytest.fixture
def ui(browser: Any, http_service: Any, tmp_path: Path) -> Iterator[UI]:
    svc = http_service(policy=POLICY)
    context = browser.new_context(base_url=svc.url, viewport=VIEWPORT,
                                  permissions=["clipboard-read", "clipboard-write"])
    person = UI(svc, context, tmp_path)
    try:
        yield person
    finally:
        context.close()
    assert person.problems == [], "the pages broke their Content-Security-Policy or threw"


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def _days_from_now(days: int, before: datetime) -> set[str]:
    """The expiry date as shown, allowing for midnight passing during the test."""
    return {(t + timedelta(days=days)).strftime("%Y-%m-%d")
            for t in (before, datetime.now(UTC))}


def test_create_copy_use_and_revoke_a_token(ui: UI, store: Any) -> None:
    page = ui.login("alice")
    expect(page).to_have_url(ui.url + "/")
    expect(page.get_by_role("heading", name="My API tokens")).to_be_visible()
    expect(page.locator("#tokens tbody")).to_have_text("No tokens yet.")
    expect(page.get_by_role("link", name="All tokens")).to_have_count(0)  # not an admin
    lifetime = page.get_by_label("Lifetime")
    assert lifetime.locator("option").all_inner_texts() == [
        "7 days", "30 days", "60 days", "90 days", "until a date…"]
    expect(lifetime).to_have_value("30")  # the policy's default
    expect(page.get_by_label("Expires on")).to_be_hidden()
    lifetime.select_option(label="until a date…")
    expect(page.get_by_label("Expires on")).to_be_visible()

    page.get_by_label("Name").press_sequentially("laptop")
    lifetime.select_option(label="7 days")
    expect(page.get_by_label("Expires on")).to_be_hidden()
    before = datetime.now(UTC)
    page.get_by_role("button", name="Create token").click()

    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("heading")).to_have_text("Your new token “laptop”")
    expect(dialog).to_contain_text("it is shown only this once")
    token = page.locator("#new-token-value").inner_text().strip()
    assert re.fullmatch(r"gg_\S{20,}", token), token
    expect(dialog.locator("pre").nth(0)).to_have_text(f"curl -u alice:$TOKEN {ui.url}/…")
    expect(dialog.locator("pre").nth(1)).to_contain_text('auth=("alice", token)')
    expect(dialog.locator("pre").nth(2)).to_contain_text('btoa("alice:" + token)')
    expires = page.locator("#tokens tr", has_text="laptop").locator("td").nth(2)
    assert expires.inner_text()[:10] in _days_from_now(7, before)
    ui.shot("tokens-new-token-dialog")
    if os.environ.get("GROUPGATE_SCREENSHOTS") == "1" and store.url.startswith("sqlite"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT))

    copy = page.locator("#copy-button")
    expect(copy).to_have_text("Copy")
    copy.click()
    expect(copy).to_have_text(re.compile(r"^(Copied|Selected: press Ctrl\+C)$"))
    if copy.inner_text() == "Copied":
        assert page.evaluate("navigator.clipboard.readText()") == token
    else:  # no clipboard access: the token is selected for Ctrl+C instead
        assert page.evaluate("window.getSelection().toString()").strip() == token

    assert ui.auth("alice", token) == 204
    assert ui.auth("bob", token) == 401

    dialog.get_by_role("button", name="I have copied it").click()
    expect(dialog).to_be_hidden()
    row = page.locator("#tokens tr", has_text="laptop")
    expect(row.locator("td.status")).to_have_text("active")
    page.reload()  # neither a second token nor the secret again
    expect(page.get_by_role("dialog")).to_have_count(0)
    expect(page.locator("#tokens tbody tr")).to_have_count(1)
    expect(page.get_by_role("alert")).to_have_count(0)

    asked: list[str] = []

    def answer(accept: bool) -> Callable[[Any], None]:
        def _answer(d: Any) -> None:
            asked.append(d.message)
            if accept:
                d.accept()
            else:
                d.dismiss()
        return _answer

    page.once("dialog", answer(False))  # second thoughts: nothing happens
    row.get_by_role("button", name="Revoke").click()
    expect(row.locator("td.status")).to_have_text("active")
    page.once("dialog", answer(True))
    row.get_by_role("button", name="Revoke").click()
    expect(row.locator("td.status")).to_have_text(re.compile(r"^revoked\b"))
    assert asked == ["Revoke “laptop”? Anything using it stops working at once."] * 2
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    expect(page.get_by_role("dialog")).to_have_count(0)  # the secret is not shown again
    assert token not in page.content()
    ui.shot("tokens-revoked")
    assert ui.auth("alice", token) == 401


def test_someone_outside_the_allowed_group_is_told_why(ui: UI) -> None:
    page = ui.login("dave")
    expect(page).to_have_url(ui.url + "/")
    why = page.get_by_role("alert")
    expect(why).to_be_visible()
    expect(why).to_contain_text("You cannot create tokens")
    expect(why).to_contain_text("token-users")
    expect(page.locator("#create-form")).to_have_count(0)
    expect(page.get_by_role("button", name="Create token")).to_have_count(0)
    expect(page.get_by_label("Name")).to_have_count(0)
    expect(page.get_by_role("link", name="All tokens")).to_have_count(0)
    ui.shot("tokens-not-allowed")
    response = page.goto("/admin")
    assert response is not None and response.status == 403


def test_admin_filters_revokes_and_reads_the_audit_log(ui: UI) -> None:
    bobs = ui.mint("bob", "build-server")
    ui.mint("alice", "laptop")
    page = ui.login("carol")
    page.get_by_role("link", name="All tokens").click()
    expect(page).to_have_url(ui.url + "/admin")
    expect(page.get_by_role("heading", name="All tokens")).to_be_visible()
    rows = page.locator("#all-tokens tbody tr")
    expect(rows).to_have_count(2)

    page.get_by_label("Owner").press_sequentially("bob")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"/admin\?owner=bob\b"))
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("bob")
    expect(rows.first).to_contain_text("build-server")
    expect(rows.first.locator("td.status")).to_have_text("active")
    ui.shot("admin-filtered")

    asked: list[str] = []

    def accept(d: Any) -> None:
        asked.append(d.message)
        d.accept()

    page.once("dialog", accept)
    rows.first.get_by_role("button", name="Revoke").click()
    bob_row = page.locator("#all-tokens tbody tr", has_text="build-server")
    expect(bob_row.locator("td.status")).to_have_text(re.compile(r"^revoked\b"))
    assert asked == ["Revoke bob’s token “build-server”?"]
    expect(bob_row.get_by_role("button", name="Revoke")).to_have_count(0)
    expect(page).to_have_url(re.compile(r"/admin\?owner=bob\b"))  # the filter stays
    expect(rows).to_have_count(1)
    assert ui.auth("bob", bobs) == 401

    audit = [row.locator("td").all_inner_texts() for row in page.locator("#audit tbody tr").all()]
    actions = [(cells[1], cells[2], cells[4]) for cells in audit]  # actor, action, owner
    assert ("bob", "created", "bob") in actions
    assert ("alice", "created", "alice") in actions
    assert ("admin:carol", "revoke", "bob") in actions
    ui.shot("admin-after-revoke")


def test_wrong_password_and_no_inline_script(ui: UI) -> None:
    page = ui.page
    response = page.goto("/login")
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    expect(page.locator("script:not([src])")).to_have_count(0)
    handlers = page.evaluate("""() => [...document.querySelectorAll("*")].flatMap(
        (el) => [...el.attributes].filter((a) => a.name.startsWith("on")).map((a) => a.name))""")
    assert handlers == []
    expect(page.get_by_role("alert")).to_have_count(0)

    ui.login("alice", "not-her-password")
    expect(page).to_have_url(ui.url + "/login")
    expect(page.get_by_role("alert")).to_have_text(re.compile(r"^Wrong username or password"))
    expect(page.get_by_label("Username")).to_have_value("alice")
    expect(page.get_by_label("Password")).to_have_value("")
    ui.shot("login-wrong-password")

    ui.login("alice")  # the form still works after a failure (its CSRF value is kept)
    expect(page.get_by_role("heading", name="My API tokens")).to_be_visible()
    assert ui.take_problems() == []

    # The watch itself works: an injected inline script is refused and reported.
    page.evaluate("""() => { const s = document.createElement("script");
        s.textContent = "window.inlineRan = true"; document.body.append(s); }""")
    page.wait_for_timeout(100)
    assert page.evaluate("window.inlineRan === undefined")
    assert any("script-src" in p for p in ui.take_problems())


def test_a_suspended_token_says_why(ui: UI, store: Any, fresh_slapd: Any) -> None:
    page = ui.login("alice")
    page.get_by_label("Name").press_sequentially("ci")
    page.get_by_label("Lifetime").select_option(label="until a date…")
    last_day = datetime.now(UTC).date() + timedelta(days=10)
    page.get_by_label("Expires on").fill(last_day.isoformat())
    page.get_by_role("button", name="Create token").click()
    token = page.locator("#new-token-value").inner_text().strip()
    expires = page.locator("#tokens tr", has_text="ci").locator("td").nth(2).inner_text()
    assert expires in (f"{last_day} 23:59", f"{last_day + timedelta(days=1)} 00:00"), expires
    assert ui.auth("alice", token) == 204

    conn = fresh_slapd.admin_connection()
    assert conn.modify(TOKEN_USERS, {"member": [(ldap3.MODIFY_DELETE,
                                                 ["uid=alice,ou=people,dc=example,dc=org"])]})
    conn.unbind()
    cfg = ui.svc.config
    report = run_sync(from_config(cfg.directory, cfg.policy), store, cfg.policy, cfg.sync,
                      now=datetime.now(UTC))
    assert [(c.kind, c.owner) for c in report.applied] == [("suspend", "alice")]

    page.get_by_role("link", name="My tokens").click()
    row = page.locator("#tokens tr", has_text="ci")
    expect(row.locator("td.status")).to_have_text(
        "suspended: you are no longer in token-users")
    expect(row.get_by_role("button", name="Revoke")).to_be_visible()  # still revocable
    ui.shot("tokens-suspended")
    assert ui.auth("alice", token) == 401

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(ui.url + "/login")
    ui.login("alice")
    expect(page.get_by_role("alert")).to_contain_text("token-users")
    expect(page.locator("#create-form")).to_have_count(0)
    expect(page.locator("#tokens tr", has_text="ci").locator("td.status")).to_have_text(
        "suspended: you are no longer in token-users")
