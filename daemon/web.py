"""The HTTP service (groupgate[http]): forward auth, the self-service API and the web page.

FastAPI because its OpenAPI document is part of the product (clients and schemathesis are
generated from it); Jinja2 pages with a little plain JavaScript because a token page needs
no front-end build. Every answer carries security headers; secrets never appear in a URL
or a log line.

No ``from __future__ import annotations`` here: FastAPI reads the annotations of the route
functions at runtime, and those refer to names local to :func:`create_app`.
"""

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio
import structlog
from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import __version__
from daemon.config import Config
from daemon.errors import (
    BadInput,
    ConfigError,
    DirectoryUnavailable,
    GroupgateError,
    NotPermitted,
    StoreUnavailable,
)
from daemon.model import DirectoryReader, Status, TokenRecord, canonical_username
from daemon.service import FinalToken, TokenService
from daemon.tokens import SecretHasher, normalize_token_id, parse
from daemon.verify import Verifier

log = structlog.get_logger("groupgate.http")

HERE = Path(__file__).parent
SESSION_COOKIE = "gg_session"
PRELOGIN_COOKIE = "gg_prelogin"
PROBLEM = "application/problem+json"
PROBLEM_BASE = "https://groupgate.invalid/problems/"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
REASON_WORDS = {
    "not_in_group": "you are no longer in {groups}",
    "disabled": "your account is disabled in the directory",
    "not_found": "your account was not found in the directory",
}


# --- problem details (RFC 9457) ---------------------------------------------------------------

class Problem(Exception):
    """An error answered as application/problem+json with a stable `type`."""

    def __init__(self, status: int, kind: str, title: str, detail: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.headers = headers or {}
        self.extra = extra


class ProblemOut(BaseModel):
    type: str
    title: str
    status: int
    detail: str | None = None
    errors: list[dict[str, str]] | None = None


def _problem_response(p: Problem) -> JSONResponse:
    body: dict[str, Any] = {"type": PROBLEM_BASE + p.kind, "title": p.title, "status": p.status}
    if p.detail:
        body["detail"] = p.detail
    body.update(p.extra)
    return JSONResponse(body, status_code=p.status, media_type=PROBLEM, headers=p.headers)


_ERROR_MAP: list[tuple[type[GroupgateError], int, str, str]] = [
    (BadInput, 422, "invalid-request", "The request cannot be carried out"),
    (NotPermitted, 403, "forbidden", "Not permitted"),
    (StoreUnavailable, 503, "store-unavailable", "The token store is unavailable"),
    (DirectoryUnavailable, 503, "directory-unavailable", "The directory is unavailable"),
]


def _problem_for(exc: GroupgateError) -> Problem:
    for cls, status, kind, title in _ERROR_MAP:
        if isinstance(exc, cls):
            detail = str(exc) if status < 500 else None  # no internals in 5xx answers
            return Problem(status, kind, title, detail)
    return Problem(500, "internal", "Internal error")


# --- API models --------------------------------------------------------------------------------

class TokenOut(BaseModel):
    id: str = Field(description="Public token id, gg_ and 12 characters")
    owner: str
    name: str
    status: Status
    status_reason: str | None
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    created_by: str


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, description="What the token is for")
    lifetime_days: int | None = Field(default=None, ge=1, le=36500,
                                      description="Lifetime in days (default: the policy's)")
    expires_at: datetime | None = Field(default=None, description="Or an exact expiry time")


class TokenCreated(TokenOut):
    token: str = Field(description="The secret token. Shown once: store it now")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    token_id: str | None
    owner: str | None
    reason: str | None


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


class SessionOut(BaseModel):
    username: str
    admin: bool
    allowed: bool
    csrf_token: str
    max_lifetime_days: int


def _token_out(t: TokenRecord) -> TokenOut:
    return TokenOut(id=t.display_id, owner=t.owner, name=t.name, status=t.status,
                    status_reason=t.status_reason, created_at=t.created_at,
                    expires_at=t.expires_at, last_used_at=t.last_used_at,
                    created_by=t.created_by)


# --- sessions, throttling --------------------------------------------------------------------

@dataclass(frozen=True)
class User:
    """Who is calling, as proven by a directory bind (now or at login)."""

    username: str
    admin: bool
    allowed: bool
    groups: frozenset[str]
    csrf: str | None  # set for cookie sessions: unsafe requests must echo it


class Throttle:
    """Login attempts per key (username, client address) in a sliding window.

    An attempt is reserved before the directory bind and given back when it succeeds, so
    parallel requests cannot all slip past the check while the first binds are running.
    """

    MAX_KEYS = 100_000

    def __init__(self, max_failures: int, window: float) -> None:
        self.max = max_failures
        self.window = window
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, key: str, now: float) -> deque[float] | None:
        q = self._fails.get(key)
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def reserve(self, *keys: str) -> int:
        """0 and the attempt counted, or the seconds to wait before trying again."""
        now = time.monotonic()
        with self._lock:
            worst = 0.0
            for k in keys:
                q = self._prune(k, now)
                if q and len(q) >= self.max:
                    worst = max(worst, self.window - (now - q[0]))
            if worst:
                return int(worst) + 1
            if len(self._fails) >= self.MAX_KEYS:
                self._evict(now)
            for k in keys:
                self._fails.setdefault(k, deque()).append(now)
            return 0

    def _evict(self, now: float) -> None:
        """Bounded memory under a flood of made-up names, without freeing blocked keys."""
        for k in list(self._fails):
            q = self._prune(k, now)
            if not q or len(q) < self.max:
                del self._fails[k]

    def release(self, *keys: str) -> None:
        """A successful login: its reserved attempt does not count against anyone."""
        with self._lock:
            for k in keys:
                q = self._fails.get(k)
                if q:
                    q.pop()
                    if not q:
                        del self._fails[k]


class Web:
    """Everything the HTTP layer needs, built once per process."""

    def __init__(self, config: Config, *, store: Any, directory: DirectoryReader | None,
                 verifier: Verifier, session_secret: bytes,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.config = config
        self.store = store
        self.directory = directory
        self.verifier = verifier
        a = config.verify.argon2
        self.service = TokenService(store, SecretHasher(a.time_cost, a.memory_kib,
                                                        a.parallelism), config.policy)
        self.signer = URLSafeTimedSerializer(session_secret, salt="groupgate-session")
        self.throttle = Throttle(config.http.login_max_failures,
                                 config.http.login_window_seconds)
        self.clock = clock
        self.inline_verify = getattr(store, "backend", "sqlite") == "sqlite"
        self.secure_cookies = config.http.secure_cookies

    # -- authentication --

    def client(self, request: Request) -> str:
        host = request.client.host if request.client else "?"
        if host in self.config.http.trusted_proxies:
            fwd = request.headers.get("x-forwarded-for", "")
            if fwd:
                return fwd.split(",")[-1].strip()
        return host

    def _throttle_keys(self, request: Request, name: str) -> list[str]:
        """Per username always; per client address only when the address means something.

        Behind a proxy that is not in http.trusted_proxies every client looks like the
        proxy (usually loopback): counting by that address would let five wrong passwords
        from anyone lock everybody out.
        """
        keys = [f"user:{name}"]
        addr = self.client(request)
        if not (addr.startswith("127.") or addr == "::1"):
            keys.append(f"addr:{addr}")
        return keys

    def login(self, request: Request, username: str, password: str) -> User:
        name = canonical_username(username)
        keys = self._throttle_keys(request, name)
        wait = self.throttle.reserve(*keys)
        if wait:
            log.warning("http.login_throttled", user=name, client=self.client(request))
            raise Problem(429, "too-many-attempts", "Too many failed logins",
                          f"try again in {wait} seconds", {"Retry-After": str(wait)})
        if parse(password) is not None:
            raise Problem(401, "token-not-accepted", "Tokens cannot be used to log in",
                          "log in with your directory password, not a token")
        if self.directory is None:
            self.throttle.release(*keys)
            raise Problem(503, "directory-unavailable", "No directory is configured")
        try:
            du = self.directory.authenticate(username, password)
        except NotPermitted:
            log.info("http.login_failed", user=name, client=self.client(request))
            raise Problem(401, "not-authenticated", "Wrong username or password") from None
        except DirectoryUnavailable:
            self.throttle.release(*keys)
            raise
        self.throttle.release(*keys)
        return User(du.username, du.admin and not du.disabled, du.allowed and not du.disabled,
                    du.groups, secrets.token_urlsafe(24))

    def refreshed(self, user: User, *, strict: bool = False) -> User:
        """The session's user with membership as the directory says now (the page must not
        offer a create form to someone who left the group after logging in).

        `strict` (admin rights): fail closed with 503 when the directory cannot answer,
        instead of trusting what the cookie said at login.
        """
        if self.directory is None:
            if strict:
                raise Problem(503, "directory-unavailable", "No directory is configured")
            return user
        try:
            du = self.directory.lookup_user(user.username)
        except DirectoryUnavailable:
            if strict:
                raise Problem(503, "directory-unavailable",
                              "The directory is unavailable") from None
            return user
        if du is None:
            return User(user.username, False, False, frozenset(), user.csrf)
        return User(du.username, du.admin and not du.disabled, du.allowed and not du.disabled,
                    du.groups, user.csrf)

    def session_cookie(self, user: User) -> str:
        return self.signer.dumps({"u": user.username, "a": user.admin, "l": user.allowed,
                                  "g": sorted(user.groups), "c": user.csrf})

    def from_cookie(self, request: Request) -> User | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self.signer.loads(raw, max_age=self.config.http.session_minutes * 60)
        except BadSignature:
            return None
        return User(data["u"], bool(data["a"]), bool(data["l"]), frozenset(data["g"]),
                    data["c"])

    def set_session(self, response: Response, user: User) -> None:
        response.set_cookie(SESSION_COOKIE, self.session_cookie(user),
                            max_age=self.config.http.session_minutes * 60, httponly=True,
                            secure=self.secure_cookies, samesite="strict", path="/")

    def reconfigure(self, config: Config, directory: DirectoryReader | None) -> None:
        """A reloaded config (SIGHUP): new policy and directory for every later request."""
        a = config.verify.argon2
        self.service = TokenService(self.store, SecretHasher(a.time_cost, a.memory_kib,
                                                             a.parallelism), config.policy)
        self.directory = directory
        self.config = config

    # -- forward auth --

    def auth_answer(self, header: str) -> tuple[int, list[tuple[str, str]]]:
        """Status and headers for /auth: 204 naming the user, 401 with a challenge, or 503."""
        try:
            result = self.verifier.verify_basic(header)
        except StoreUnavailable:
            return 503, [("Retry-After", "5")]
        if result.ok:
            assert result.owner is not None and result.expires_at is not None
            return 204, [("X-Auth-User", result.owner),
                         ("X-Auth-Token-Id", f"gg_{result.token_id}"),
                         ("X-Token-Expires", result.expires_at.isoformat())]
        return 401, [("WWW-Authenticate",
                      f'Basic realm="{self.config.http.realm}", charset="UTF-8"')]

    # -- actions --

    def create_token(self, user: User, name: str, lifetime: timedelta | None, *,
                     expires_at: datetime | None = None) -> Any:
        """Create a token for the caller's own account after a fresh directory check.

        Give a `lifetime` or an exact `expires_at`; the latter is kept to the microsecond
        (measured from the same instant the token is created at).
        """
        if self.directory is None:
            raise Problem(503, "directory-unavailable", "No directory is configured")
        du = self.directory.lookup_user(user.username)
        if du is None or du.disabled:
            raise Problem(403, "not-allowed", "You cannot create tokens",
                          "your account is disabled or no longer in the directory")
        if not du.allowed:
            groups = ", ".join(self.config.policy.allowed_groups)
            raise Problem(403, "not-in-allowed-group", "You cannot create tokens",
                          f"only members of {groups} may hold tokens, and you are not one")
        cap = self.config.policy.lifetime_cap_days(du.groups)
        now = self.clock()
        if expires_at is not None:
            lifetime = expires_at - now
        elif lifetime is None:
            lifetime = timedelta(days=min(self.config.policy.default_lifetime_days, cap))
        return self.service.create(du.username, name, lifetime, now,
                                   created_by=du.username, max_lifetime_days=cap)

    def revoke(self, user: User, token_id: str, *, as_admin: bool) -> TokenRecord:
        if as_admin:  # never on the cookie's word: admin rights as the directory says now
            user = self.refreshed(user, strict=True)
            if not user.admin:
                raise Problem(403, "not-admin", "Administrators only")
        tid = normalize_token_id(token_id)
        tok = self.store.get_token(tid) if tid else None
        if tok is None or (not as_admin and tok.owner != user.username):
            raise Problem(404, "token-not-found", "No such token")
        actor = f"{'admin' if as_admin else 'user'}:{user.username}"
        try:
            return self.service.revoke(tok.id, actor=actor, now=self.clock(),
                                       reason="revoked by admin" if as_admin and
                                       tok.owner != user.username else "revoked by owner")
        except FinalToken as exc:
            raise Problem(409, "token-final", "The token is already final", str(exc)) from None

    def status_words(self, t: TokenRecord) -> str:
        if t.status is Status.SUSPENDED:
            groups = " or ".join(self.config.policy.allowed_groups)
            why = REASON_WORDS.get(t.status_reason or "", t.status_reason or "suspended")
            return "suspended: " + why.format(groups=groups)
        if t.status is Status.REVOKED:
            by = {"revoked by owner": "revoked by you",
                  "revoked by admin": "revoked by an administrator"}
            return by.get(t.status_reason or "", "revoked")
        if t.status is Status.ACTIVE and t.expires_at <= self.clock():
            return "expired"
        return t.status.value


def load_session_secret(config: Config) -> bytes:
    """From http.session_secret_file (share it between instances), else random per process."""
    path = config.http.session_secret_file
    if not path:
        return secrets.token_bytes(32)
    p = Path(path)
    try:
        if p.stat().st_mode & 0o004:
            raise ConfigError(f"{config.source}: http.session_secret_file: {p} is readable by "
                              f"everyone; chmod 600 {p}")
        data = p.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"{config.source}: http.session_secret_file: {p} does not exist") \
            from None
    except OSError as exc:
        raise ConfigError(f"{config.source}: http.session_secret_file: cannot read {p}: "
                          f"{exc.strerror}") from None
    if len(data) < 32:
        raise ConfigError(f"{config.source}: http.session_secret_file: needs at least 32 bytes")
    return data


# --- the app -----------------------------------------------------------------------------------

class ForwardAuthFastPath:
    """GET /auth answered before routing: the one endpoint proxies call on every request.

    FastAPI's routing and dependency machinery cost about twice the token check itself
    (bench/http_auth.sh); this answers exactly as the documented /auth route does.
    """

    def __init__(self, app: ASGIApp, *, web: "Web") -> None:
        self.app = app
        self.web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != "/auth"
                or scope["method"] not in ("GET", "HEAD")):
            await self.app(scope, receive, send)
            return
        header = ""
        for key, value in scope["headers"]:
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        if self.web.inline_verify:  # SQLite answers in microseconds: a thread hop costs more
            status, headers = self.web.auth_answer(header)
        else:
            status, headers = await anyio.to_thread.run_sync(self.web.auth_answer, header)
        await send({"type": "http.response.start", "status": status,
                    # UTF-8: a directory name like "łukasz" does not fit latin-1, and proxies
                    # copy the bytes through as they are
                    "headers": [(k.lower().encode("ascii"), v.encode("utf-8"))
                                for k, v in headers]})
        await send({"type": "http.response.body", "body": b""})


class SecurityHeaders:
    """Security headers on every answer, as a plain ASGI middleware.

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every request through
    a task group and memory streams, about 150 us of CPU per request here, ten times the whole
    token check behind /auth (bench/http_auth.sh).
    """

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                h = MutableHeaders(scope=message)
                h.setdefault("Content-Security-Policy", CSP)
                h["X-Frame-Options"] = "DENY"
                h["Referrer-Policy"] = "no-referrer"
                h["X-Content-Type-Options"] = "nosniff"
                if not static:
                    h.setdefault("Cache-Control", "no-store")
                if self.hsts:
                    h["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(web: Web) -> FastAPI:
    app = FastAPI(title="groupgate", version=__version__,
                  description="Forward auth and self-service for personal API tokens governed "
                  "by directory group membership.",
                  # no Swagger UI: it needs inline script and CDN assets, which the CSP forbids
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    realm = web.config.http.realm
    www_auth = {"WWW-Authenticate": f'Basic realm="{realm}", charset="UTF-8"'}

    # The last added is the outermost: security headers wrap the fast path's answers too.
    app.add_middleware(ForwardAuthFastPath, web=web)
    app.add_middleware(SecurityHeaders, hsts=bool(web.config.http.tls_cert_file))

    def wants_html(request: Request) -> bool:
        path = request.url.path
        return (not path.startswith(("/api/", "/auth", "/healthz", "/static/"))
                and "text/html" in request.headers.get("accept", ""))

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> Response:
        if wants_html(request):  # a person in a browser gets a page, not JSON
            return render(request, "error.html", exc.status, problem=exc,
                          user=web.from_cookie(request))
        return _problem_response(exc)

    @app.exception_handler(GroupgateError)
    async def on_error(_request: Request, exc: GroupgateError) -> JSONResponse:
        return _problem_response(_problem_for(exc))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
            errors.append({"field": ".".join(loc) or "body", "message": str(e.get("msg"))})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return _problem_response(Problem(422, "validation-error", "Invalid request", detail,
                                         errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body it cannot decode (JSON that is not UTF-8, say): the
            # same documented 422 as a body that is not JSON at all
            return _problem_response(Problem(
                422, "validation-error", "Invalid request", "body: cannot be parsed",
                errors=[{"field": "body", "message": "cannot be parsed"}]))
        kinds = {404: "not-found", 405: "method-not-allowed"}
        return _problem_response(Problem(exc.status_code, kinds.get(exc.status_code, "http"),
                                         str(exc.detail)))

    # -- forward auth --

    def _auth_response(header: str) -> Response:
        status, headers = web.auth_answer(header)
        response = Response(status_code=status)
        response.raw_headers.extend((k.lower().encode("ascii"), v.encode("utf-8"))
                                    for k, v in headers)
        return response

    @app.get("/auth", status_code=204, tags=["forward auth"],
             responses={204: {"description": "Valid token; X-Auth-User names the user"},
                        401: {"description": "Missing or invalid credentials"},
                        503: {"description": "Token store unavailable"}})
    async def forward_auth(request: Request) -> Response:
        """For nginx auth_request, Traefik forwardAuth and Caddy forward_auth."""
        # Normally answered by ForwardAuthFastPath before routing; this route documents it.
        header = request.headers.get("authorization", "")
        if web.inline_verify:
            return _auth_response(header)
        return await anyio.to_thread.run_sync(_auth_response, header)

    @app.get("/healthz", status_code=204, tags=["ops"])
    async def healthz() -> Response:
        """Liveness: answers without touching the store or the directory."""
        return Response(status_code=204)

    # -- API authentication --

    def api_user(request: Request) -> User:
        user = web.from_cookie(request)
        if user is not None:
            if request.method not in ("GET", "HEAD", "OPTIONS") and not secrets.compare_digest(
                    request.headers.get("x-csrf-token", ""), user.csrf or "-"):
                raise Problem(403, "csrf", "Missing or wrong X-CSRF-Token header")
            return user
        header = request.headers.get("authorization", "")
        scheme, _, param = header.partition(" ")
        if scheme.lower() == "basic" and param:
            import base64
            import binascii

            try:
                text = base64.b64decode(param.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise Problem(401, "not-authenticated", "Malformed Basic credentials",
                              headers=www_auth) from None
            username, sep, password = text.partition(":")
            if not sep or not username or not password:
                raise Problem(401, "not-authenticated", "Malformed Basic credentials",
                              headers=www_auth)
            try:
                return web.login(request, username, password)
            except Problem as p:
                if p.status == 401:  # RFC 9110: a 401 names the scheme to retry with
                    p.headers = {**www_auth, **p.headers}
                raise
        raise Problem(401, "not-authenticated", "Log in with your directory username and "
                      "password", headers=www_auth)

    def admin_user(user: Annotated[User, Depends(api_user)]) -> User:
        # a session's admin flag is from login time: ask the directory again for admin rights
        user = web.refreshed(user, strict=True)
        if not user.admin:
            raise Problem(403, "not-admin", "Administrators only")
        return user

    ApiUser = Annotated[User, Depends(api_user)]
    AdminUser = Annotated[User, Depends(admin_user)]
    # Every error is application/problem+json (never application/json): document it so,
    # with its schema, so that clients and schemathesis can check problem bodies.
    problem_schema = ProblemOut.model_json_schema()

    def problem_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {c: {"description": "Problem details (RFC 9457)",
                    "content": {PROBLEM: {"schema": problem_schema}}} for c in codes}

    problems = problem_docs(401, 403, 422, 429, 503)

    # -- API: session --

    @app.post("/api/v1/session", response_model=SessionOut, tags=["session"],
              responses=problems)
    def api_login(body: LoginIn, request: Request, response: Response) -> SessionOut:
        """Log in with directory credentials; sets the session cookie."""
        user = web.login(request, body.username, body.password)
        web.set_session(response, user)
        return SessionOut(username=user.username, admin=user.admin, allowed=user.allowed,
                          csrf_token=user.csrf or "",
                          max_lifetime_days=web.config.policy.lifetime_cap_days(user.groups))

    @app.delete("/api/v1/session", status_code=204, tags=["session"])
    def api_logout() -> Response:
        r = Response(status_code=204)
        r.delete_cookie(SESSION_COOKIE, path="/")
        return r

    # -- API: own tokens --

    @app.get("/api/v1/tokens", response_model=list[TokenOut], tags=["tokens"],
             responses=problems)
    def list_tokens(user: ApiUser) -> list[TokenOut]:
        """Your own tokens."""
        return [_token_out(t) for t in web.store.list_tokens(owner=user.username)]

    @app.post("/api/v1/tokens", response_model=TokenCreated, status_code=201, tags=["tokens"],
              responses=problems)
    def create_token(body: TokenCreate, user: ApiUser) -> TokenCreated:
        """Create a token for your own account; the secret is in this answer only."""
        if body.lifetime_days is not None and body.expires_at is not None:
            raise Problem(422, "validation-error", "Invalid request",
                          "lifetime_days: give lifetime_days or expires_at, not both",
                          errors=[{"field": "lifetime_days",
                                   "message": "give lifetime_days or expires_at, not both"}])
        lifetime = None if body.lifetime_days is None else timedelta(days=body.lifetime_days)
        at = body.expires_at
        if at is not None and at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        created = web.create_token(user, body.name, lifetime, expires_at=at)
        return TokenCreated(**_token_out(created.record).model_dump(), token=created.token)

    @app.delete("/api/v1/tokens/{token_id}", status_code=204, tags=["tokens"],
                responses={**problems, **problem_docs(404, 409)})
    def revoke_own(token_id: str, user: ApiUser) -> Response:
        """Revoke one of your own tokens (final)."""
        web.revoke(user, token_id, as_admin=False)
        return Response(status_code=204)

    # -- API: admin --

    @app.get("/api/v1/admin/tokens", response_model=list[TokenOut], tags=["admin"],
             responses=problems)
    def admin_tokens(user: AdminUser, owner: Annotated[str | None, Query(max_length=256)] = None,
                     status: Status | None = None) -> list[TokenOut]:
        """Everyone's tokens, filterable by owner and status."""
        own = canonical_username(owner) if owner else None
        return [_token_out(t) for t in web.store.list_tokens(owner=own, status=status)]

    @app.delete("/api/v1/admin/tokens/{token_id}", status_code=204, tags=["admin"],
                responses={**problems, **problem_docs(404, 409)})
    def admin_revoke(token_id: str, user: ApiUser) -> Response:
        """Revoke anyone's token (final)."""
        # Web.revoke checks admin rights with the directory itself (one lookup, not two).
        web.revoke(user, token_id, as_admin=True)
        return Response(status_code=204)

    @app.get("/api/v1/admin/audit", response_model=list[AuditOut], tags=["admin"],
             responses=problems)
    def admin_audit(user: AdminUser, owner: Annotated[str | None, Query(max_length=256)] = None,
                    token: Annotated[str | None, Query(max_length=64)] = None,
                    limit: Annotated[int, Query(ge=1, le=10000)] = 200) -> list[AuditOut]:
        """The audit log, newest last."""
        tid = normalize_token_id(token) if token else None
        if token and tid is None:
            return []
        events = web.store.audit_events(owner=canonical_username(owner) if owner else None,
                                        token_id=tid, limit=limit)
        return [AuditOut(id=e.id, at=e.at, actor=e.actor, action=e.action,
                         token_id=f"gg_{e.token_id}" if e.token_id else None, owner=e.owner,
                         reason=e.reason) for e in events]

    # -- the web page --

    def render(request: Request, name: str, code: int = 200, **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"realm": realm, **ctx},
                                          status_code=code)

    def page_user(request: Request) -> User | None:
        return web.from_cookie(request)

    def check_form_csrf(user: User | None, token: str, request: Request) -> None:
        expected = user.csrf if user else request.cookies.get(PRELOGIN_COOKIE)
        if not expected or not secrets.compare_digest(token, expected):
            raise Problem(403, "csrf", "The form expired; reload the page and try again")

    def tokens_page(request: Request, user: User, *, created: Any = None, error: str = "",
                    status: int = 200) -> HTMLResponse:
        user = web.refreshed(user)
        toks = web.store.list_tokens(owner=user.username)
        cap = web.config.policy.lifetime_cap_days(user.groups)
        presets = [d for d in (7, 30, 60, 90) if d <= cap] or [cap]
        if cap not in presets and cap < 90:
            presets.append(cap)
        return render(request, "tokens.html", status, user=user, tokens=toks,
                      words=web.status_words, created=created, error=error, presets=presets,
                      cap=cap, default_days=min(web.config.policy.default_lifetime_days, cap),
                      allowed_groups=", ".join(web.config.policy.allowed_groups),
                      base_url=str(request.base_url).rstrip("/"),
                      today=web.clock().date().isoformat(),
                      max_date=(web.clock() + timedelta(days=cap)).date().isoformat())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return tokens_page(request, user)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> Response:
        csrf = secrets.token_urlsafe(24)
        r = render(request, "login.html", csrf=csrf, error="")
        r.set_cookie(PRELOGIN_COOKIE, csrf, max_age=3600, httponly=True,
                     secure=web.secure_cookies, samesite="strict", path="/")
        return r

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_submit(request: Request, username: Annotated[str, Form(max_length=256)] = "",
                     password: Annotated[str, Form(max_length=1024)] = "",
                     csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
        check_form_csrf(None, csrf, request)
        try:
            user = web.login(request, username, password)
        except Problem as p:
            message = p.detail or p.title
            if p.kind == "not-authenticated":
                message = "Wrong username or password."
            return render(request, "login.html", p.status if p.status != 401 else 401,
                          csrf=csrf, error=message, username=username)
        r = RedirectResponse("/", status_code=303)
        web.set_session(r, user)
        r.delete_cookie(PRELOGIN_COOKIE, path="/")
        return r

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
        user = page_user(request)
        if user is not None:
            check_form_csrf(user, csrf, request)
        r = RedirectResponse("/login", status_code=303)
        r.delete_cookie(SESSION_COOKIE, path="/")
        return r

    @app.post("/tokens", response_class=HTMLResponse, include_in_schema=False)
    def page_create(request: Request, name: Annotated[str, Form(max_length=200)] = "",
                    lifetime: Annotated[str, Form(max_length=40)] = "",
                    expires_on: Annotated[str, Form(max_length=40)] = "",
                    csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        check_form_csrf(user, csrf, request)
        try:
            span: timedelta | None = None
            until: datetime | None = None
            if lifetime == "date":
                day = datetime.strptime(expires_on, "%Y-%m-%d").replace(tzinfo=UTC)
                # to the end of the chosen day (UTC), shown as that day 23:59
                until = day + timedelta(days=1, seconds=-1)
            elif lifetime:
                span = timedelta(days=int(lifetime))
            created = web.create_token(user, name, span, expires_at=until)
        except (ValueError, OverflowError):
            return tokens_page(request, user, error="Choose a lifetime or a valid date.",
                               status=422)
        except Problem as p:
            message = f"{p.title}: {p.detail}" if p.detail else p.title
            return tokens_page(request, user, error=message, status=p.status)
        except GroupgateError as exc:
            prob = _problem_for(exc)
            return tokens_page(request, user, error=prob.detail or prob.title,
                               status=prob.status)
        return tokens_page(request, user, created=created, status=201)

    @app.post("/tokens/{token_id}/revoke", include_in_schema=False)
    def page_revoke(request: Request, token_id: str,
                    csrf: Annotated[str, Form(max_length=128)] = "",
                    admin: Annotated[str, Form(max_length=5)] = "",
                    owner: Annotated[str, Form(max_length=256)] = "",
                    status: Annotated[str, Form(max_length=20)] = "") -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        check_form_csrf(user, csrf, request)
        as_admin = admin == "1"
        try:
            web.revoke(user, token_id, as_admin=as_admin)
        except Problem as p:
            if p.kind != "token-final":
                raise
        if not as_admin:
            return RedirectResponse("/", status_code=303)
        back = urlencode({k: v for k, v in (("owner", owner), ("status", status)) if v})
        return RedirectResponse("/admin" + ("?" + back if back else ""), status_code=303)

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin_page(request: Request, owner: str = "", status: str = "") -> Response:
        user = page_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        user = web.refreshed(user, strict=True)
        if not user.admin:
            raise Problem(403, "not-admin", "Administrators only")
        st = Status(status) if status in {s.value for s in Status} else None
        toks = web.store.list_tokens(owner=canonical_username(owner) if owner else None,
                                     status=st)
        audit = web.store.audit_events(limit=100)
        return render(request, "admin.html", user=user, tokens=toks, audit=audit,
                      words=web.status_words, owner=owner, status=status,
                      statuses=[s.value for s in Status])

    return app


def build(config: Config) -> tuple[Web, FastAPI]:
    """The composition root: store, directory and verifier from config."""
    from daemon.store import TokenStore

    store = TokenStore(config.store.url)
    directory = None
    if config.directory.configured:
        from daemon.directory import from_config

        directory = from_config(config.directory, config.policy, config.source)
    v = config.verify
    verifier = Verifier(TokenStore(config.store.url),
                        hasher=SecretHasher(v.argon2.time_cost, v.argon2.memory_kib,
                                            v.argon2.parallelism),
                        cache_size=v.cache_size,
                        last_used_resolution=timedelta(seconds=v.last_used_resolution_seconds),
                        max_failures=v.max_failures,
                        failure_window=timedelta(seconds=v.failure_window_seconds))
    web = Web(config, store=store, directory=directory, verifier=verifier,
              session_secret=load_session_secret(config))
    return web, create_app(web)


def server(config: Config, app: FastAPI) -> Any:
    """A uvicorn server for http.listen (TLS when configured); no access log of URLs."""
    import uvicorn

    host, _, port = config.http.listen.rpartition(":")
    kwargs: dict[str, Any] = {}
    if config.http.tls_cert_file:
        kwargs.update(ssl_certfile=config.http.tls_cert_file,
                      ssl_keyfile=config.http.tls_key_file)
    ucfg = uvicorn.Config(app, host=host.strip("[]"), port=int(port), access_log=False,
                          log_config=None, server_header=False, proxy_headers=False,
                          lifespan="off", **kwargs)
    return uvicorn.Server(ucfg)
