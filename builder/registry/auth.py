"""Who pybuild is to a registry: credentials from docker's config.json and its helpers, and the tokens they buy.

config.json is the file ``docker login`` writes (``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``): ``auths`` holds base64 ``user:password`` per registry, ``credHelpers``
names a ``docker-credential-NAME`` program per registry and ``credsStore`` one for all. ``pybuild
login`` writes the same file the same way, so docker, podman (which reads it) and pybuild share logins.

A registry answers an anonymous request with a challenge (``WWW-Authenticate``): ``Basic`` wants the
credentials on every request, ``Bearer`` sends pybuild to a token service with them, for one
repository's scope; a token is kept and reused for that scope until it expires.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder.registry.reference import DOCKER_HUB, DOCKER_HUB_AUTH_KEY, docker_config_dir, registry_of
from parser.dataclass import dataclass
from parser.errors import PybuildError

HELPER_TIMEOUT_SECONDS = 60
# A token's life when the service does not say (the token spec's default).
DEFAULT_TOKEN_SECONDS = 60


class Unauthorized(PybuildError):
    """The registry wants credentials we do not have, or refused the ones we gave."""


@dataclass
class Credentials:
    username: str
    secret: str  # a password, or an identity token when username is "<token>"

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()

    def __repr__(self) -> str:  # never shown by accident
        return f"Credentials(username={self.username!r}, secret=<hidden>)"


def config_path() -> Path:
    return docker_config_dir() / "config.json"


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise PybuildError(f"cannot read {path}: {exc.strerror}") from None
    try:
        value = json.loads(data or b"{}")
    except ValueError as exc:
        raise PybuildError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PybuildError(f"{path} must hold a JSON object")
    return value


def write_config(value: dict[str, Any], path: Path | None = None) -> None:
    """Replace config.json whole, readable by its owner only (it may hold passwords)."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(value, file, indent="\t")
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _auth_key(registry: str) -> str:
    return DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry


def _helper_for(config: dict[str, Any], registry: str) -> str | None:
    helpers = config.get("credHelpers") or {}
    for key in (registry, _auth_key(registry)):
        if isinstance(helpers, dict) and isinstance(helpers.get(key), str):
            return helpers[key]
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def _run_helper(helper: str, action: str, data: str) -> str:
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run([program, action], input=data.encode(), capture_output=True,
                                timeout=HELPER_TIMEOUT_SECONDS, check=False)
    except FileNotFoundError:
        raise PybuildError(f"credential helper {program} is not installed",
                           hint=f"config.json ({config_path()}) names it; install it or remove it from there") from None
    except subprocess.TimeoutExpired:
        raise PybuildError(f"credential helper {program} did not answer within {HELPER_TIMEOUT_SECONDS} s") from None
    output = result.stdout.decode("utf-8", "replace").strip()
    if result.returncode != 0:
        if action == "get" and "credentials not found" in output.lower():
            return ""
        reason = output or result.stderr.decode("utf-8", "replace").strip() or f"exit code {result.returncode}"
        raise PybuildError(f"credential helper {program} {action} failed: {reason.splitlines()[0]}")
    return output


def lookup_credentials(registry: str) -> Credentials | None:
    """The credentials config.json gives for ``registry`` (a helper's, else ``auths``), or None: anonymous."""
    config = read_config()
    helper = _helper_for(config, registry)
    if helper is not None:
        output = _run_helper(helper, "get", _auth_key(registry))
        if not output:
            return None
        try:
            value = json.loads(output)
            return Credentials(str(value["Username"]), str(value["Secret"]))
        except (ValueError, KeyError, TypeError):
            raise PybuildError(f"credential helper docker-credential-{helper} gave no Username and Secret") from None
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if registry_of(key) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
            return Credentials("<token>", entry["identitytoken"])
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise PybuildError(f"{config_path()}: the auth entry of {key} is not base64 of user:password") from None
            return Credentials(username, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


def store_credentials(registry: str, credentials: Credentials) -> Path:
    """Remember a login as docker does: through the configured helper, else in ``auths``."""
    config = read_config()
    helper = _helper_for(config, registry)
    if helper is not None:
        _run_helper(helper, "store", json.dumps({"ServerURL": _auth_key(registry), "Username": credentials.username,
                                                 "Secret": credentials.secret}))
        return config_path()
    auths = config.setdefault("auths", {})
    for key in [key for key in auths if registry_of(key) == registry]:
        del auths[key]
    token = base64.b64encode(f"{credentials.username}:{credentials.secret}".encode()).decode()
    auths[_auth_key(registry)] = {"auth": token}
    write_config(config)
    return config_path()


def erase_credentials(registry: str) -> bool:
    """Forget a login; False when there was none."""
    config = read_config()
    helper = _helper_for(config, registry)
    if helper is not None:
        _run_helper(helper, "erase", _auth_key(registry))
        return True
    auths = config.get("auths") or {}
    keys = [key for key in auths if registry_of(key) == registry]
    for key in keys:
        del auths[key]
    if keys:
        write_config(config)
    return bool(keys)


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass
class Challenge:
    """A ``WWW-Authenticate`` header: its scheme (``basic``, ``bearer``) and parameters (realm, service, scope)."""

    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {name.lower(): quoted.replace('\\"', '"') if quoted or not bare else bare
              for name, quoted, bare in _PARAM.findall(rest)}
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    value: str
    expires: float


class Authenticator:
    """The Authorization header for a registry's requests, per scope; learns the scheme from the first challenge.

    ``fetch_token`` is the client's GET of a token service URL: (url, headers) -> (status, body bytes).
    """

    def __init__(self, registry: str, fetch_token: Callable[[str, dict[str, str]], tuple[int, bytes]],
                 credentials: Credentials | None | bool = False) -> None:
        """``credentials``: given (login), None (anonymous), or False: looked up in config.json when first needed."""
        self.registry = registry
        self.fetch_token = fetch_token
        self._credentials = credentials
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()
        self._fetching = threading.Lock()  # one token fetch at a time: threads of one push share its token
        self.tokens_fetched = 0

    @property
    def credentials(self) -> Credentials | None:
        if self._credentials is False:
            self._credentials = lookup_credentials(self.registry)
        return self._credentials or None

    def header(self, scope: str) -> str | None:
        """The header for a request in ``scope``, from what the registry asked before; None before any challenge."""
        with self._lock:
            challenge = self._challenge
            token = self._tokens.get(scope)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            credentials = self.credentials
            return credentials.basic() if credentials else None
        if token is not None and token.expires > time.time():
            return f"Bearer {token.value}"
        return f"Bearer {self._fetch(challenge, scope)}"  # the scheme is known: no need of another 401 first

    def answer(self, header: str | None, scope: str) -> str:
        """A 401's challenge answered: the header to retry with. Raises when there is nothing to answer with."""
        challenge = parse_challenge(header or "")
        if challenge is None or challenge.scheme not in ("basic", "bearer"):
            raise PybuildError(f"{self.registry} asks for authentication pybuild does not speak "
                               f"({(header or 'no WWW-Authenticate header')[:80]})")
        with self._lock:
            self._challenge = challenge
        if challenge.scheme == "basic":
            credentials = self.credentials
            if credentials is None:
                raise self.unauthorized("it asks for a user name and password")
            return credentials.basic()
        token = self._fetch(challenge, scope)
        return f"Bearer {token}"

    def _fetch(self, challenge: Challenge, scope: str) -> str:
        """A token for ``scope``: one another thread fetched meanwhile, else a new one."""
        with self._fetching:
            with self._lock:
                token = self._tokens.get(scope)
            if token is not None and token.expires > time.time():
                return token.value
            return self._fetch_new(challenge, scope)

    def _fetch_new(self, challenge: Challenge, scope: str) -> str:
        from urllib.parse import urlencode

        realm = challenge.params.get("realm")
        if not realm:
            raise PybuildError(f"{self.registry} asks for a token but names no token service (realm)")
        query = [("service", challenge.params["service"])] if challenge.params.get("service") else []
        query += [("scope", part) for part in scope.split(" ") if part]
        credentials = self.credentials
        headers = {"Authorization": credentials.basic()} if credentials else {}
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        status, body = self.fetch_token(url, headers)
        if status in (401, 403):
            raise self.unauthorized("its token service refused the credentials" if credentials
                                    else "its token service wants a login")
        if status != 200:
            raise PybuildError(f"{self.registry}: its token service answered HTTP {status}")
        try:
            value = json.loads(body)
            token = value.get("token") or value.get("access_token")
            lifetime = float(value.get("expires_in") or DEFAULT_TOKEN_SECONDS)
        except (ValueError, AttributeError, TypeError):
            raise PybuildError(f"{self.registry}: its token service answered something that is not a token") from None
        if not isinstance(token, str) or not token:
            raise PybuildError(f"{self.registry}: its token service answered no token")
        with self._lock:
            # Ten seconds early: a token that expires on its way is refused.
            self._tokens[scope] = _Token(token, time.time() + max(lifetime - 10, 1))
            self.tokens_fetched += 1
        return token

    def forget(self, scope: str, used: str | None) -> None:
        """A request sent with ``used`` was refused: that token is spent (not one another thread got since)."""
        with self._lock:
            token = self._tokens.get(scope)
            if token is not None and used == f"Bearer {token.value}":
                del self._tokens[scope]

    def unauthorized(self, why: str) -> Unauthorized:
        who = self.credentials
        if who is None:
            return Unauthorized(f"{self.registry}: unauthorized: {why}",
                                hint=f"log in with `pybuild login {self.registry}`")
        return Unauthorized(f"{self.registry}: unauthorized: {why} (user {who.username!r}: incorrect user name or "
                            "password, or no access)",
                            hint=f"log in again with `pybuild login {self.registry}`")
