"""Single sign-on with OpenID Connect, against a real provider on loopback.

The provider is oidc-provider-mock (Flask + authlib), made to enforce PKCE
(which it does not by itself): the browser's part is played by httpx,
following each redirect by hand so every hop can be checked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import httpx
import oidc_provider_mock  # type: ignore[import-untyped]
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from werkzeug.serving import make_server

from lightbox.archive import Archive
from lightbox.errors import Unauthenticated
from lightbox.services import audit, auth, oidc
from lightbox.services.audit import AuditQuery
from lightbox.web.context import SESSION_COOKIE
from tests.conftest import RunningServer

CLIENT_ID = "lightbox-test"
ORGANISATION = "Northside Radiology"


class PkceCheck:
    """The provider, made to enforce PKCE (RFC 7636), which the mock does not.

    It remembers the ``code_challenge`` of each authorization request, and the
    code issued for it; a token request for that code must then carry the
    ``code_verifier`` whose S256 is the challenge, or gets ``invalid_grant``.
    Every exchange is kept in ``exchanges`` as (code, verified)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.challenges: dict[str, tuple[str, str]] = {}  # code -> challenge, method
        self.exchanges: list[tuple[str, bool]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/oauth2/token" and environ.get("REQUEST_METHOD") == "POST":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            code = form.get("code", "")
            if code in self.challenges:
                challenge, method = self.challenges.pop(code)
                verifier = form.get("code_verifier", "")
                digest = hashlib.sha256(verifier.encode()).digest()
                ok = method == "S256" and base64.urlsafe_b64encode(digest).rstrip(b"=").decode() \
                    == challenge
                self.exchanges.append((code, ok))
                if not ok:
                    start_response("400 Bad Request", [("Content-Type", "application/json")])
                    return [json.dumps({"error": "invalid_grant",
                                        "error_description": "PKCE verification failed"}).encode()]
        if path != "/oauth2/authorize":
            return self.app(environ, start_response)
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}

        def remember(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            location = dict(headers).get("Location", "")
            code = parse_qs(urlsplit(location).query).get("code", [""])[0]
            if code and "code_challenge" in query:
                self.challenges[code] = (query["code_challenge"],
                                         query.get("code_challenge_method", "plain"))
            return start_response(status, headers, *rest)

        return self.app(environ, remember)


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[str, PkceCheck]]:
    check = PkceCheck(oidc_provider_mock.app())
    server = make_server("localhost", 0, check, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_port}", check
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def issuer(provider: tuple[str, PkceCheck]) -> str:
    return provider[0]


def use_sso(archive: Archive, issuer: str, **extra: Any) -> None:
    archive.settings = replace(
        archive.settings, oidc_issuer=issuer, oidc_client_id=CLIENT_ID,
        oidc_client_secret="s3cret-of-the-client", **extra,
    )


def provider_user(issuer: str, sub: str, **claims: Any) -> None:
    answer = httpx.put(f"{issuer}/users/{quote(sub, safe='')}", json=claims)
    assert answer.status_code == 204


def to_provider(browser: httpx.Client, issuer: str, next_url: str = "/browse") -> str:
    """Start at /login/oidc; the provider's authorization URL it sends the browser to."""
    start = browser.get("/login/oidc", params={"next": next_url})
    assert start.status_code == 303
    location = start.headers["location"]
    assert location.startswith(issuer + "/")
    cookie = start.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/login/oidc" in cookie
    assert "secure" not in cookie  # plain HTTP on loopback
    return location


def authorize(location: str, sub: str) -> str:
    """The provider's sign-in form, answered for ``sub``: the callback URL."""
    answer = httpx.post(location, data={"sub": sub})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def tamper_attempt(browser: httpx.Client, item: int, value: str) -> None:
    """Replace one item of the sign-in attempt's cookie (state, nonce,
    verifier, next URL), as a browser's owner could."""
    pending = json.loads(base64.urlsafe_b64decode(browser.cookies["lightbox_oidc"]))
    pending[item] = value
    browser.cookies.set("lightbox_oidc", base64.urlsafe_b64encode(
        json.dumps(pending).encode()).decode(), path="/login/oidc")


def sign_in(server: RunningServer, issuer: str, sub: str, next_url: str = "/browse", *,
            tamper: tuple[int, str] | None = None) -> tuple[httpx.Client, httpx.Response]:
    """A sign-in through the provider; ``tamper`` replaces an item of the
    attempt's cookie (see ``tamper_attempt``) before the callback."""
    browser = httpx.Client(base_url=server.url)
    callback = authorize(to_provider(browser, issuer, next_url), sub)
    assert callback.startswith(server.url + "/login/oidc/callback?")
    if tamper is not None:
        tamper_attempt(browser, *tamper)
    return browser, browser.get(callback)


def logins(server: RunningServer, actor: str) -> list[dict[str, Any]]:
    admin = auth.Authenticator(server.archive).authenticate(server.token)
    return audit.search(server.archive.db, admin, AuditQuery(action="login", actor=actor)).rows


def test_first_sign_in_makes_a_member_of_the_configured_organisation(
    server: RunningServer, issuer: str
) -> None:
    auth.add_organisation(server.archive, ORGANISATION)
    use_sso(server.archive, issuer, oidc_organisation=ORGANISATION)
    provider_user(issuer, "u-1001", email="alice@northside.example",
                  preferred_username="alice")
    browser, answer = sign_in(server, issuer, "u-1001", next_url="/browse?q=1")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/browse?q=1"
    assert browser.cookies.get(SESSION_COOKIE, path="/")
    # The attempt's cookie is gone once it is used.
    assert "lightbox_oidc=" in answer.headers.get("set-cookie", "")
    studies = browser.get("/dicom-web/studies")
    assert studies.status_code in (200, 204)
    users = {u.name: u for u in auth.list_users(server.archive)}
    alice = users["alice"]
    assert not alice.is_admin and alice.password_hash is None
    assert alice.email == "alice@northside.example"
    assert "alice" in auth.list_organisations(server.archive)[ORGANISATION]
    [event] = logins(server, "alice")
    assert event["outcome"] == "success" and event["detail"] == {"method": "oidc"}

    # The second sign-in is the same user, and a password never works for it.
    _, again = sign_in(server, issuer, "u-1001")
    assert again.status_code == 303
    assert [u.name for u in auth.list_users(server.archive)].count("alice") == 1
    with pytest.raises(Unauthenticated):
        auth.login(server.archive, "alice", "")


def test_the_login_page_offers_single_sign_on_only_when_configured(
    server: RunningServer, issuer: str
) -> None:
    page = httpx.get(f"{server.url}/login", params={"next": "/browse"})
    assert page.status_code == 200 and "/login/oidc" not in page.text
    assert httpx.get(f"{server.url}/login/oidc").status_code == 404
    assert httpx.get(f"{server.url}/login/oidc/callback?code=x&state=y").status_code == 404
    use_sso(server.archive, issuer, oidc_button="Sign in with Northside")
    page = httpx.get(f"{server.url}/login", params={"next": "/browse"})
    assert 'href="/login/oidc?next=/browse"' in page.text
    assert "Sign in with Northside" in page.text


def test_a_disabled_user_is_refused(server: RunningServer, issuer: str) -> None:
    use_sso(server.archive, issuer)
    provider_user(issuer, "u-2002", preferred_username="bob", email="bob@example.org")
    assert sign_in(server, issuer, "u-2002")[1].status_code == 303
    auth.disable_user(server.archive, "bob")
    browser, answer = sign_in(server, issuer, "u-2002")
    assert answer.status_code == 401
    assert "disabled" in answer.text
    assert browser.cookies.get(SESSION_COOKIE) is None
    assert logins(server, "bob")[0]["outcome"] == "failure"


def test_an_administrator_name_is_not_taken_over(server: RunningServer, issuer: str) -> None:
    use_sso(server.archive, issuer)
    auth.add_user(server.archive, "chief", "a long admin password", is_admin=True)
    provider_user(issuer, "u-2003", preferred_username="chief", email="chief@example.org")
    browser, answer = sign_in(server, issuer, "u-2003")
    assert answer.status_code == 401 and "administrators sign in" in answer.text
    assert browser.cookies.get(SESSION_COOKIE) is None


def test_a_tampered_state_is_refused(server: RunningServer, issuer: str) -> None:
    use_sso(server.archive, issuer)
    provider_user(issuer, "u-3003", preferred_username="carol")
    browser = httpx.Client(base_url=server.url)
    callback = urlsplit(authorize(to_provider(browser, issuer), "u-3003"))
    params = {k: v[0] for k, v in parse_qs(callback.query).items()}
    params["state"] = params["state"][:-2] + "xx"
    answer = browser.get(urlunsplit(callback._replace(query=urlencode(params))))
    assert answer.status_code == 400
    assert "state" in answer.text
    assert browser.cookies.get(SESSION_COOKIE) is None
    assert "carol" not in [u.name for u in auth.list_users(server.archive)]


def test_a_callback_without_the_attempt_cookie_is_refused(
    server: RunningServer, issuer: str
) -> None:
    use_sso(server.archive, issuer)
    provider_user(issuer, "u-4004", preferred_username="dave")
    browser = httpx.Client(base_url=server.url)
    callback = authorize(to_provider(browser, issuer), "u-4004")
    # Another browser (an attacker's link, say) arrives with the code.
    stranger = httpx.Client(base_url=server.url)
    answer = stranger.get(callback)
    assert answer.status_code == 400
    assert "not started in this browser" in answer.text
    assert stranger.cookies.get(SESSION_COOKIE) is None


def test_a_nonce_that_does_not_match_the_id_token_is_refused(
    server: RunningServer, issuer: str
) -> None:
    use_sso(server.archive, issuer)
    provider_user(issuer, "u-5005", preferred_username="erin")
    _, answer = sign_in(server, issuer, "u-5005", tamper=(1, "another-nonce"))
    assert answer.status_code == 401
    assert "nonce" in answer.text


def test_the_code_is_exchanged_with_the_verifier_of_its_challenge(
    server: RunningServer, provider: tuple[str, PkceCheck]
) -> None:
    issuer, check = provider
    use_sso(server.archive, issuer)
    provider_user(issuer, "u-5105", preferred_username="fiona")
    _, answer = sign_in(server, issuer, "u-5105")
    assert answer.status_code == 303
    code, verified = check.exchanges[-1]
    assert code and verified


def test_a_code_exchanged_with_another_verifier_is_refused(
    server: RunningServer, provider: tuple[str, PkceCheck]
) -> None:
    # The attempt's verifier is replaced: the provider refuses the code, and
    # the sign-in fails with the provider's reason, leaving no session.
    issuer, check = provider
    use_sso(server.archive, issuer)
    provider_user(issuer, "u-5205", preferred_username="gwen")
    browser, answer = sign_in(server, issuer, "u-5205", tamper=(2, "another-verifier-" + "v" * 40))
    assert check.exchanges[-1][1] is False
    assert answer.status_code == 401
    assert "the identity provider refused the sign-in (invalid_grant)" in answer.text
    assert 'action="/login"' in answer.text
    assert browser.cookies.get(SESSION_COOKIE, path="/") is None
    assert "gwen" not in [u.name for u in auth.list_users(server.archive)]


def test_a_declined_sign_in_shows_the_login_page_with_the_reason(
    server: RunningServer, issuer: str
) -> None:
    use_sso(server.archive, issuer)
    browser = httpx.Client(base_url=server.url)
    denied = httpx.post(to_provider(browser, issuer), data={"action": "deny"})
    assert denied.status_code == 302
    assert "error=access_denied" in denied.headers["location"]
    answer = browser.get(denied.headers["location"])
    assert answer.status_code == 401
    assert "you declined the sign-in" in answer.text
    assert 'action="/login"' in answer.text


def test_without_user_creation_only_known_users_sign_in(
    server: RunningServer, issuer: str
) -> None:
    use_sso(server.archive, issuer, oidc_create_users=False)
    provider_user(issuer, "u-6006", preferred_username="frank")
    answer = sign_in(server, issuer, "u-6006")[1]
    assert answer.status_code == 401
    assert "there is no account for &#39;frank&#39; here" in answer.text
    assert "frank" not in [u.name for u in auth.list_users(server.archive)]
    # A known user is found by e-mail address when the names differ.
    auth.add_user(server.archive, "grace", None, is_admin=False,
                  email="Grace@Hospital.example")
    provider_user(issuer, "u-7007", preferred_username="g.hopper",
                  email="grace@hospital.example")
    browser, answer = sign_in(server, issuer, "u-7007")
    assert answer.status_code == 303
    whoami = auth.Authenticator(server.archive).authenticate(
        browser.cookies[SESSION_COOKIE])
    assert whoami.user == "grace"


def test_an_unverified_address_does_not_match_an_account(
    server: RunningServer, issuer: str
) -> None:
    use_sso(server.archive, issuer, oidc_create_users=False)
    auth.add_user(server.archive, "heidi", None, is_admin=False, email="heidi@example.org")
    provider_user(issuer, "u-8008", preferred_username="mallory",
                  email="heidi@example.org", email_verified=False)
    assert sign_in(server, issuer, "u-8008")[1].status_code == 401


def test_an_address_as_user_name_becomes_a_name_without_at(
    server: RunningServer, issuer: str
) -> None:
    use_sso(server.archive, issuer, oidc_username_claim="email")
    provider_user(issuer, "u-9009", email="ivan@clinic.example")
    assert sign_in(server, issuer, "u-9009")[1].status_code == 303
    users = {u.name: u for u in auth.list_users(server.archive)}
    assert users["ivan.clinic.example"].email == "ivan@clinic.example"
    assert sign_in(server, issuer, "u-9009")[1].status_code == 303
    assert len([u for u in auth.list_users(server.archive) if u.name.startswith("ivan")]) == 1


def test_an_unreachable_provider_shows_the_login_page_with_the_reason(
    server: RunningServer
) -> None:
    from tests.conftest import free_port

    use_sso(server.archive, f"http://127.0.0.1:{free_port()}")
    answer = httpx.get(f"{server.url}/login/oidc", params={"next": "/browse"})
    assert answer.status_code == 503
    assert "not reachable" in answer.text and 'action="/login"' in answer.text
    use_sso(server.archive, "http://provider.example")  # plain HTTP off loopback
    answer = httpx.get(f"{server.url}/login/oidc")
    assert answer.status_code == 503 and "https" in answer.text


# ID token validation, against keys served by a small discovery server of our own.


class _Keys:
    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})
        self.other = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})
        self.issuer = ""


@pytest.fixture(scope="module")
def keys() -> Iterator[_Keys]:
    state = _Keys()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/.well-known/openid-configuration":
                body: dict[str, Any] = {
                    "issuer": state.issuer,
                    "authorization_endpoint": state.issuer + "/authorize",
                    "token_endpoint": state.issuer + "/token",
                    "jwks_uri": state.issuer + "/jwks",
                    "id_token_signing_alg_values_supported": ["RS256", "HS256"],
                }
            else:
                body = dict(KeySet([state.key]).as_dict())
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.issuer = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()


def _token(keys: _Keys, key: Any = None, alg: str = "RS256", **changes: Any) -> str:
    now = int(time.time())
    claims = {"iss": keys.issuer, "sub": "s1", "aud": CLIENT_ID, "iat": now,
              "exp": now + 300, "nonce": "n-1"}
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": "k1"}, claims, key or keys.key,
                      algorithms=[alg])


def test_id_token_checks(keys: _Keys) -> None:
    from lightbox.settings import Settings

    settings = Settings(oidc_issuer=keys.issuer, oidc_client_id=CLIENT_ID)
    provider = oidc.discover(settings)
    assert provider.algorithms == ("RS256",)  # never an HMAC with the client secret

    def check(token: str, nonce: str = "n-1") -> dict[str, Any]:
        return oidc.verify_id_token(settings, provider, token, nonce)

    assert check(_token(keys))["sub"] == "s1"
    assert check(_token(keys, aud=["other", CLIENT_ID], azp=CLIENT_ID))["sub"] == "s1"
    refused = {
        "signature": _token(keys, key=keys.other),
        "iss": _token(keys, iss="https://elsewhere.example"),
        "aud": _token(keys, aud="another-client"),
        "azp": _token(keys, aud=["other", CLIENT_ID], azp="other"),
        "expired": _token(keys, exp=int(time.time()) - 600),
        "iat": _token(keys, iat=int(time.time()) + 3600),
        "exp": _token(keys, exp=None),
        "nonce": _token(keys, nonce="n-2"),
    }
    for reason, token in refused.items():
        with pytest.raises(Unauthenticated) as caught:
            check(token)
        assert caught.value.message, reason
    # An HMAC "signed" with a key anyone could choose is never accepted.
    with pytest.raises(Unauthenticated):
        check(_token(keys, key=OctKey.import_key(b"x" * 32), alg="HS256"))
    with pytest.raises(Unauthenticated):
        check(_token(keys), nonce="n-2")
