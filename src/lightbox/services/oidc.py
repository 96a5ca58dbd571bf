"""Single sign-on with OpenID Connect: the authorization code flow with PKCE.

``authorize`` builds the provider's sign-in URL with fresh ``state``, ``nonce``
and PKCE verifier (the caller keeps them until the browser comes back);
``identify`` exchanges the code and validates the ID token (signature against
the provider's JWKS, ``iss``, ``aud``, ``azp``, ``exp``, ``iat``, ``nonce``);
``sign_in`` maps the identity to a local user, made on first use when allowed,
and issues the same session token a password login does.

The provider's discovery document and keys are cached in memory for a while.
Codes, tokens and verifiers are never logged nor put in error messages.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from authlib.common.security import is_secure_transport
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from lightbox.archive import Archive
from lightbox.errors import BadRequest, Conflict, NotFound, Unauthenticated, Unavailable
from lightbox.index import accounts
from lightbox.index import folders as folder_index
from lightbox.services import auth
from lightbox.settings import Settings

if TYPE_CHECKING:
    from joserfc import jwt
    from joserfc.jwk import KeySet

DISCOVERY_SECONDS = 3600.0  # how long the discovery document and keys are kept
KEYS_REFRESH_SECONDS = 60.0  # an unknown key id refetches the keys at most this often
HTTP_TIMEOUT = httpx.Timeout(10.0)
MAX_DOCUMENT_BYTES = 1024 * 1024
CLOCK_SKEW_SECONDS = 120
# Asymmetric signatures only: an HMAC with the client secret would let anyone
# who knows the secret mint ID tokens, and "none" is no signature at all.
SIGNING_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "Ed25519",
)


@dataclass(frozen=True)
class Provider:
    """What the provider's discovery document says about it."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    token_auth_methods: tuple[str, ...]
    algorithms: tuple[str, ...]


@dataclass(frozen=True)
class Authorization:
    """A sign-in in progress: where to send the browser and what to keep."""

    url: str
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class Identity:
    """Who the provider vouched for, and the local user name it maps to."""

    subject: str
    name: str
    email: str | None
    name_is_address: bool  # the name came from an e-mail address


@dataclass(frozen=True)
class SignIn:
    user: str
    token: str


def enabled(settings: Settings) -> bool:
    return bool(settings.oidc_issuer.strip())


class _Cache:
    """Discovery documents and key sets by URL, each with when it was fetched."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._providers: dict[str, tuple[float, Provider]] = {}
        self._keys: dict[str, tuple[float, KeySet]] = {}

    def provider(self, issuer: str) -> Provider | None:
        with self._lock:
            at, found = self._providers.get(issuer, (0.0, None))
        return found if time.monotonic() - at <= DISCOVERY_SECONDS else None

    def keys(self, uri: str, max_age: float) -> KeySet | None:
        with self._lock:
            at, found = self._keys.get(uri, (0.0, None))
        return found if time.monotonic() - at <= max_age else None

    def keep(self, url: str, value: Provider | KeySet) -> None:
        with self._lock:
            if isinstance(value, Provider):
                self._providers[url] = (time.monotonic(), value)
            else:
                self._keys[url] = (time.monotonic(), value)

    def clear(self) -> None:
        with self._lock:
            self._providers.clear()
            self._keys.clear()


_cache = _Cache()  # per process; a few small documents


def forget_providers() -> None:
    """Drop cached discovery documents and keys (a provider moved, tests)."""
    _cache.clear()


def _get_json(url: str, what: str) -> dict[str, Any]:
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False) as client:
            response = client.get(url, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise Unavailable(f"the identity provider is not reachable ({what}): "
                          f"{type(exc).__name__}") from exc
    if response.status_code != 200:
        raise Unavailable(f"the identity provider answered {response.status_code} for {what}")
    if len(response.content) > MAX_DOCUMENT_BYTES:
        raise Unavailable(f"the identity provider's {what} is too large")
    try:
        document = response.json()
    except ValueError as exc:
        raise Unavailable(f"the identity provider's {what} is not JSON") from exc
    if not isinstance(document, dict):
        raise Unavailable(f"the identity provider's {what} is not a JSON object")
    return document


def _endpoint(document: Mapping[str, Any], key: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not is_secure_transport(value):
        raise Unavailable(f"the identity provider's discovery document has no usable {key} "
                          "(an https URL is needed)")
    return value


def discover(settings: Settings) -> Provider:
    """The configured provider, from ``{issuer}/.well-known/openid-configuration``."""
    if not enabled(settings):
        raise NotFound("single sign-on is not configured")
    configured = settings.oidc_issuer.strip()
    cached = _cache.provider(configured)
    if cached is not None:
        return cached
    if not is_secure_transport(configured):
        raise Unavailable("oidc_issuer must be an https URL (http only on loopback)")
    document = _get_json(configured.rstrip("/") + "/.well-known/openid-configuration",
                         "discovery document")
    issuer = document.get("issuer")
    # OpenID Connect Discovery 1.0, 4.3: the document's issuer is the configured one.
    if not isinstance(issuer, str) or issuer.rstrip("/") != configured.rstrip("/"):
        raise Unavailable(f"the identity provider calls itself {str(issuer)[:200]!r}, "
                          f"not {configured!r} (check oidc_issuer)")
    methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    offered = document.get("id_token_signing_alg_values_supported") or ["RS256"]
    algorithms = tuple(a for a in SIGNING_ALGORITHMS if a in offered)
    if not algorithms:
        raise Unavailable("the identity provider signs ID tokens with no algorithm "
                          f"this server accepts ({', '.join(SIGNING_ALGORITHMS)})")
    provider = Provider(
        issuer=issuer,
        authorization_endpoint=_endpoint(document, "authorization_endpoint"),
        token_endpoint=_endpoint(document, "token_endpoint"),
        jwks_uri=_endpoint(document, "jwks_uri"),
        token_auth_methods=tuple(str(m) for m in methods),
        algorithms=algorithms,
    )
    _cache.keep(configured, provider)
    return provider


def authorize(settings: Settings, redirect_uri: str) -> Authorization:
    """The provider's sign-in URL for a new attempt, and the secrets to keep for it."""
    provider = discover(settings)
    if not settings.oidc_client_id:
        raise Unavailable("oidc_client_id is not set")
    scopes = settings.oidc_scopes.split()
    if "openid" not in scopes:
        scopes.insert(0, "openid")
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    code_verifier = secrets.token_urlsafe(48)  # 64 characters of the unreserved set
    url = prepare_grant_uri(
        provider.authorization_endpoint,
        client_id=settings.oidc_client_id,
        response_type="code",
        redirect_uri=redirect_uri,
        scope=" ".join(scopes),
        state=state,
        nonce=nonce,
        code_challenge=create_s256_code_challenge(code_verifier),
        code_challenge_method="S256",
    )
    return Authorization(str(url), state, nonce, code_verifier)


def _token_auth_method(settings: Settings, provider: Provider) -> str:
    if not settings.oidc_client_secret:
        return "none"
    if ("client_secret_basic" not in provider.token_auth_methods
            and "client_secret_post" in provider.token_auth_methods):
        return "client_secret_post"
    return "client_secret_basic"


def _exchange(settings: Settings, provider: Provider, *, code: str, redirect_uri: str,
              code_verifier: str) -> str:
    """The ID token for ``code`` from the token endpoint."""
    body = prepare_token_request("authorization_code", code=code, redirect_uri=redirect_uri,
                                 code_verifier=code_verifier)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    client = ClientAuth(settings.oidc_client_id, settings.oidc_client_secret,
                        _token_auth_method(settings, provider))
    url, headers, body = client.prepare("POST", provider.token_endpoint, headers, body)
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False) as http:
            response = http.post(str(url), content=str(body).encode(), headers=dict(headers))
    except httpx.HTTPError as exc:
        raise Unavailable("the identity provider is not reachable (token endpoint): "
                          f"{type(exc).__name__}") from exc
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        answer = {}
    if response.status_code != 200:
        error = str(answer.get("error") or response.status_code)[:100]
        raise Unauthenticated(f"the identity provider refused the sign-in ({error}); "
                              "please try again")
    id_token = answer.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise Unauthenticated("the identity provider sent no ID token (is the 'openid' "
                              "scope allowed for this client?)")
    return id_token


# joserfc (with cryptography, about 11 MB resident) is imported by the functions
# that verify a sign-in, not by every server process at start.


def _key_set(provider: Provider, *, refresh: bool = False) -> KeySet:
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    keys = _cache.keys(provider.jwks_uri, KEYS_REFRESH_SECONDS if refresh else DISCOVERY_SECONDS)
    if keys is not None:
        return keys
    document = _get_json(provider.jwks_uri, "signing keys")
    try:
        keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
    except (JoseError, KeyError, TypeError, ValueError) as exc:
        raise Unavailable("the identity provider's signing keys are not usable") from exc
    _cache.keep(provider.jwks_uri, keys)
    return keys


def _decode(provider: Provider, id_token: str) -> jwt.Token:
    """The ID token with a verified signature."""
    from joserfc import jwt
    from joserfc.errors import InvalidKeyIdError, JoseError

    try:
        try:
            return jwt.decode(id_token, _key_set(provider), algorithms=provider.algorithms)
        except InvalidKeyIdError:
            # The provider may have rotated its keys since they were fetched.
            keys = _key_set(provider, refresh=True)
            return jwt.decode(id_token, keys, algorithms=provider.algorithms)
    except (JoseError, ValueError) as exc:
        raise Unauthenticated("the identity provider's ID token failed verification "
                              f"({getattr(exc, 'error', '') or 'malformed'})") from exc


def verify_id_token(settings: Settings, provider: Provider, id_token: str,
                    nonce: str) -> dict[str, Any]:
    """The claims of ``id_token``, once signature and claims are checked."""
    from joserfc import jwt
    from joserfc.errors import ExpiredTokenError, JoseError, MissingClaimError

    claims = _decode(provider, id_token).claims
    registry = jwt.JWTClaimsRegistry(
        leeway=CLOCK_SKEW_SECONDS,
        iss={"essential": True, "value": provider.issuer},
        sub={"essential": True},
        aud={"essential": True, "value": settings.oidc_client_id},
        exp={"essential": True},
        iat={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(claims)
    except ExpiredTokenError as exc:
        raise Unauthenticated("the identity provider's ID token has expired; "
                              "please try again") from exc
    except MissingClaimError as exc:
        raise Unauthenticated(f"the ID token lacks {exc.description}") from exc
    except JoseError as exc:
        claim = getattr(exc, "claim", "") or exc.description
        raise Unauthenticated(f"the ID token's {claim} is not valid for this server") from exc
    audience = claims.get("aud")
    # Core 1.0, 3.1.3.7: with several audiences, azp names this client.
    if isinstance(audience, list) and len(audience) > 1 and \
            claims.get("azp") != settings.oidc_client_id:
        raise Unauthenticated("the ID token was issued to another client (azp)")
    return claims


def _address(claims: Mapping[str, Any]) -> str | None:
    email = claims.get("email")
    verified = claims.get("email_verified")
    if verified is False or str(verified).lower() == "false":
        return None  # the provider says it has not checked the address
    if isinstance(email, str) and auth.EMAIL.fullmatch(email.strip()):
        return email.strip()
    return None


def identity_of(settings: Settings, claims: Mapping[str, Any]) -> Identity:
    """The local user name and e-mail address the claims map to."""
    name = ""
    for claim in (settings.oidc_username_claim, "email", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            name = value.strip()
            break
    name_is_address = "@" in name
    if name_is_address:
        # User names never hold '@' (they are told apart from addresses by it).
        name = name.replace("@", ".")
    if not name or len(name) > 128 or not name.isprintable():
        raise Unauthenticated("the identity provider sent no usable user name "
                              f"(claim {settings.oidc_username_claim!r})")
    return Identity(str(claims["sub"]), name, _address(claims), name_is_address)


def identify(settings: Settings, *, redirect_uri: str, code: str, code_verifier: str,
             nonce: str) -> Identity:
    """Exchange ``code`` and validate the ID token: who signed in."""
    provider = discover(settings)
    id_token = _exchange(settings, provider, code=code, redirect_uri=redirect_uri,
                         code_verifier=code_verifier)
    claims = verify_id_token(settings, provider, id_token, nonce)
    return identity_of(settings, claims)


def _match(archive: Archive, identity: Identity) -> folder_index.Person | None:
    with archive.db.read() as conn:
        found = None
        if not identity.name_is_address:
            found = folder_index.person(conn, name=identity.name)
        if found is None and identity.email is not None:
            found = folder_index.person(conn, email=identity.email)
    return found


def _create(archive: Archive, identity: Identity) -> folder_index.Person:
    settings = archive.settings
    if not settings.oidc_create_users:
        raise Unauthenticated(f"there is no account for {identity.name!r} here; "
                              "ask an administrator to add one")
    organisation = settings.oidc_organisation.strip() or None
    try:
        auth.add_user(archive, identity.name, None, is_admin=False,
                      organisation=organisation, email=identity.email)
    except Conflict as exc:
        # Another sign-in of the same person may have just made the account.
        found = _match(archive, identity)
        if found is None:
            raise Unauthenticated(f"cannot make an account for {identity.name!r}: "
                                  f"{exc.message}") from exc
        return found
    except NotFound as exc:
        raise Unavailable(f"oidc_organisation {organisation!r} does not exist") from exc
    except BadRequest as exc:
        raise Unauthenticated(f"cannot make an account for {identity.name!r}: "
                              f"{exc.message}") from exc
    found = _match(archive, identity)
    assert found is not None
    return found


def sign_in(archive: Archive, identity: Identity) -> SignIn:
    """A browser session for the local user ``identity`` maps to (made if allowed)."""
    person = _match(archive, identity)
    if person is None:
        person = _create(archive, identity)
    if person.disabled:
        raise Unauthenticated("this account is disabled")
    with archive.db.read() as conn:
        is_admin = accounts.get_user(conn, person.name).is_admin
    if is_admin:
        # Whoever the provider vouches for under an administrator's name would
        # hold the whole archive: administrators sign in with their password.
        raise Unauthenticated("administrators sign in with their password, not single sign-on")
    token = auth.create_token(archive, user=person.name, expires=auth.SESSION_LIFETIME,
                              label=auth.SESSION_LABEL)
    return SignIn(person.name, token)
