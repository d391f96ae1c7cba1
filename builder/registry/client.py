"""The Distribution API v2 over the standard library's HTTP client: one registry, its scheme, auth and retries.

Every request goes through ``Registry.request``: it answers the registry's auth challenge (see
``builder.registry.auth``), follows redirects (blob downloads are often sent to storage elsewhere, which
must not see the registry's credentials), and retries what a busy or flaky server deserves another try
for (429 and 5xx, honouring ``Retry-After``; dropped connections) with growing pauses. HTTPS is the
only scheme except for hosts where plain HTTP is allowed (see ``builder.registry.reference``); for those
HTTPS is tried first, and HTTP only when the host does not speak TLS.
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

from builder.registry.auth import Authenticator, Credentials
from builder.registry.reference import api_host, plain_http_allowed
from parser.dataclass import dataclass
from parser.errors import PybuildError

ATTEMPTS = 5
TIMEOUT_SECONDS = 60
MAX_PAUSE_SECONDS = 30
MAX_REDIRECTS = 5
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
SEND_BLOCK = 1 << 20
USER_AGENT = "pybuild"
# What a connection that fails on its way can raise; worth another try.
TRANSIENT_ERRORS = (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError)


class RegistryError(PybuildError):
    """A registry's refusal, with its HTTP status and the error codes it gave."""

    def __init__(self, message: str, status: int = 0, codes: tuple[str, ...] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.codes = codes


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _error_text(body: bytes) -> tuple[str, tuple[str, ...]]:
    """The registry's own words from its error JSON (``{"errors": [{"code", "message"}]}``)."""
    try:
        errors = json.loads(body).get("errors") or []
        codes = tuple(str(error.get("code", "")) for error in errors)
        text = "; ".join(f"{error.get('code', '')}: {error.get('message', '')}".strip(": ") for error in errors)
        return text[:300], codes
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode("utf-8", "replace").strip(), ()


class Registry:
    """One registry host, shared by the threads of one command (each thread keeps its own connections)."""

    def __init__(self, registry: str, insecure: frozenset[str] = frozenset(),
                 credentials: Credentials | None | bool = False, pause: Callable[[float], None] = time.sleep) -> None:
        self.registry = registry
        self.host = api_host(registry)
        self.plain_allowed = plain_http_allowed(registry, insecure)
        self.auth = Authenticator(registry, self._get_token, credentials)
        self.pause = pause
        self._scheme: str | None = None
        self._scheme_lock = threading.Lock()
        self._gone: PybuildError | None = None
        self._local = threading.local()
        self._tls = ssl.create_default_context()  # trusts the system's CAs and SSL_CERT_FILE / SSL_CERT_DIR

    # Connections

    def _connection(self, scheme: str, host: str, fresh: bool = False) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        connection = pool.get((scheme, host))
        if connection is None or fresh:
            if connection is not None:
                connection.close()
            if scheme == "https":
                connection = http.client.HTTPSConnection(host, timeout=TIMEOUT_SECONDS, context=self._tls,
                                                         blocksize=SEND_BLOCK)
            else:
                connection = http.client.HTTPConnection(host, timeout=TIMEOUT_SECONDS, blocksize=SEND_BLOCK)
            pool[(scheme, host)] = connection
        return connection

    def _drop(self, scheme: str, host: str) -> None:
        pool = self._local.__dict__.get("pool", {})
        connection = pool.pop((scheme, host), None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for connection in self._local.__dict__.get("pool", {}).values():
            connection.close()
        self._local.__dict__["pool"] = {}

    @property
    def scheme(self) -> str:
        """https, or http for a host that may speak it and does not speak TLS (decided once, by GET /v2/)."""
        with self._scheme_lock:
            if self._scheme is None:
                self._scheme = self._probe_scheme()
            return self._scheme

    def _probe_scheme(self) -> str:
        if not self.plain_allowed:
            return "https"
        try:
            self._raw("https", self.host, "GET", "/v2/", {}, None)
            return "https"
        except (ssl.SSLError, *TRANSIENT_ERRORS, OSError) as tls_error:
            self._drop("https", self.host)
            try:
                status, _, _ = self._raw("http", self.host, "GET", "/v2/", {}, None)
            except (*TRANSIENT_ERRORS, OSError):
                self._drop("http", self.host)
                raise self._unreachable(tls_error) from None
            if status in (200, 401):
                return "http"
            raise self._unreachable(tls_error) from None

    def _unreachable(self, error: BaseException) -> PybuildError:
        if isinstance(error, ssl.SSLCertVerificationError):
            return PybuildError(f"{self.registry}: its TLS certificate is not trusted: {error.verify_message}",
                                hint="add its CA to the system's trust store, or point SSL_CERT_FILE at it")
        if isinstance(error, ssl.SSLError):
            plain = error.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST")
            return PybuildError(f"{self.registry}: TLS failed: {error.reason or error}"
                                + (" (it seems to speak plain HTTP)" if plain else ""),
                                hint=f"if {self.registry} is meant to be reached over plain HTTP, give "
                                     f"--insecure-registry {self.registry}" if plain else None)
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if isinstance(error, socket.gaierror):
            reason = f"cannot resolve its name ({error.strerror})"
        return PybuildError(f"cannot reach registry {self.registry}: {reason}")

    def _raw(self, scheme: str, host: str, method: str, target: str, headers: Mapping[str, str],
             body: bytes | BinaryIO | None, stream: bool = False) -> tuple[int, http.client.HTTPMessage, object]:
        """One request on this thread's connection; a connection the server closed while idle is opened again."""
        for attempt in (0, 1):
            connection = self._connection(scheme, host)
            try:
                connection.request(method, target, body=body, headers={"User-Agent": USER_AGENT, **headers})
                response = connection.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop(scheme, host)
                if attempt or (body is not None and not isinstance(body, bytes)):
                    raise
                continue
            except BaseException:
                self._drop(scheme, host)
                raise
            if stream:
                return response.status, response.headers, response
            try:
                data = response.read()
            except BaseException:
                self._drop(scheme, host)
                raise
            if response.will_close:
                self._drop(scheme, host)
            return response.status, response.headers, data
        raise AssertionError("unreachable")

    def _get_token(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or (parts.scheme == "http" and not self.plain_allowed):
            raise PybuildError(f"{self.registry} names a token service at {url[:100]}, which is not HTTPS")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        response = self._retrying(lambda: self._raw(parts.scheme, parts.netloc, "GET", target or "/", headers, None))
        status, _, data = response
        return status, data  # type: ignore[return-value]

    # Requests

    def _retrying(self, send: Callable[[], tuple[int, http.client.HTTPMessage, object]],
                  rewind: Callable[[], None] | None = None) -> tuple[int, http.client.HTTPMessage, object]:
        """``send`` again after a dropped connection or a 429/5xx, pausing longer each time.

        A registry that stayed unreachable through every try is not tried again by this command's other
        requests (the other blobs of a push, say): they fail at once with the same error.
        """
        if self._gone is not None:
            raise self._gone
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            try:
                status, headers, data = send()
            except ssl.SSLError as exc:  # not the network's fault: another try would fail the same way
                raise self._unreachable(exc) from None
            except (*TRANSIENT_ERRORS, OSError) as exc:
                if last or isinstance(exc, (socket.gaierror, ConnectionRefusedError)) and attempt >= 1:
                    self._gone = self._unreachable(exc)
                    raise self._gone from None
                self.pause(min(0.5 * 2 ** attempt, MAX_PAUSE_SECONDS))
            else:
                if status not in RETRY_STATUSES or last:
                    return status, headers, data
                if hasattr(data, "read"):
                    data.read()  # type: ignore[union-attr]
                self.pause(_retry_after(headers.get("Retry-After"), attempt))
            if rewind is not None:
                rewind()
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, *, scope: str, headers: Mapping[str, str] | None = None,
                body: bytes | BinaryIO | None = None, stream: bool = False) -> tuple[int, Mapping[str, str], object]:
        """``method path`` (a path on the registry, or a URL it gave) with auth, redirects and retries.

        Returns (status, headers, body bytes) or, with ``stream``, the response to read from instead of bytes.
        A file ``body`` is sent from where it stands now, and rewound there for a retry.
        """
        scheme, host, target = self.scheme, self.host, path
        headers = dict(headers or {})
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0

        def rewind() -> None:
            if body is not None and not isinstance(body, bytes):
                body.seek(start)

        own_host = True
        answered = False
        for _ in range(MAX_REDIRECTS + 1):
            if target.startswith(("http://", "https://")):
                parts = urlsplit(target)
                scheme, host = parts.scheme, parts.netloc
                target = parts.path + (f"?{parts.query}" if parts.query else "")
                own_host = host == self.host
            send_headers = dict(headers)
            if own_host:
                authorization = self.auth.header(scope)
                if authorization:
                    send_headers["Authorization"] = authorization
            status, response_headers, data = self._retrying(
                functools.partial(self._raw, scheme, host, method, target, send_headers, body, stream), rewind)
            if status == 401 and own_host and not answered:
                if hasattr(data, "read"):
                    data.read()  # type: ignore[union-attr]
                self.auth.forget(scope, send_headers.get("Authorization"))
                self.auth.answer(response_headers.get("WWW-Authenticate"), scope)
                answered = True
                rewind()
                continue
            if status in (301, 302, 303, 307, 308) and response_headers.get("Location"):
                if hasattr(data, "read"):
                    data.read()  # type: ignore[union-attr]
                target = urljoin(f"{scheme}://{host}{target}", response_headers["Location"])
                if status == 303:
                    method, body = "GET", None
                rewind()
                continue
            if status == 401:
                raise self.auth.unauthorized("it refused the credentials")
            if status == 403:
                text, codes = _error_text(data if isinstance(data, bytes) else b"")
                raise RegistryError(f"{self.registry}: access denied{': ' + text if text else ''}", status, codes,
                                    hint=f"check that your login for {self.registry} may do this")
            return status, response_headers, data
        raise PybuildError(f"{self.registry}: more than {MAX_REDIRECTS} redirects for {path[:100]}")

    def verify_login(self) -> None:
        """Check the credentials with an authenticated ``GET /v2/`` (``pybuild login``)."""
        status, _, body = self.request("GET", "/v2/", scope="")
        if status == 200 and self.auth.header("") is None:
            return  # a registry that asks nobody for credentials: there is nothing to check them against
        if status != 200:
            raise self.failure(f"{self.registry}: login", status, body)

    def failure(self, what: str, status: int, body: object) -> RegistryError:
        text, codes = _error_text(body if isinstance(body, bytes) else b"")
        return RegistryError(f"{what}: HTTP {status}{': ' + text if text else ''}", status, codes)


def _retry_after(value: str | None, attempt: int) -> float:
    """The pause a 429 or 503 asks for (seconds; an HTTP date is not worth parsing here), else a growing one."""
    if value:
        try:
            return min(max(float(value.strip()), 0.0), MAX_PAUSE_SECONDS)
        except ValueError:
            pass
    return min(0.5 * 2 ** attempt, MAX_PAUSE_SECONDS)
