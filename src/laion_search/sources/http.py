"""The HTTP pieces the downloader (:mod:`.download`) and remote reads (:mod:`.remote`) share: one
retry policy, which statuses are worth retrying, ``Retry-After``, connection set-up with timeouts
(and ``$HTTP(S)_PROXY``), and redirects.

Redirects are followed up to 5 times with the same request headers — so a ``Range`` survives the
hop from a hub to its CDN — except credentials: ``Authorization`` (and ``Cookie``) go only to the
origin (scheme, host, port) they were meant for, never to the host a redirect names.
"""

from __future__ import annotations

import email.utils
import http.client
import random
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from laion_search.errors import DownloadError

USER_AGENT = "laion-search (+https://github.com/laion-ai)"
#: answers worth another attempt (with backoff, or after the server's Retry-After); other 4xx are final
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
#: request headers that carry credentials: never sent to another origin after a redirect
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")
MAX_REDIRECTS = 5


@dataclass
class RetryPolicy:
    tries: int = 20                #: consecutive failed attempts (without progress) before giving up
    base_delay: float = 1.0        #: first backoff, doubled each failure, with full jitter
    max_delay: float = 60.0        #: backoff cap
    max_retry_after: float = 600.0  #: cap on a server's Retry-After
    connect_timeout: float = 15.0
    read_timeout: float = 60.0     #: longest silence between two packets of a response

    def backoff(self, failures: int, rng: random.Random) -> float:
        cap = min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))
        return rng.uniform(cap / 2, cap)

    def delay(self, failures: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before the next attempt: the server's Retry-After (capped) when it
        sent one, else the jittered exponential backoff."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return self.backoff(failures, rng)


class Retryable(Exception):
    """One attempt failed in a way another attempt may fix (5xx, 408/429, a cut, a stall)."""

    def __init__(self, reason: str, retry_after: float | None = None, progressed: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.progressed = progressed


def origin(url: str) -> tuple[str, str, int]:
    u = urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)


def safe_url(url: str) -> str:
    """``url`` without user:password (URLs are printed in events and errors)."""
    u = urlsplit(url)
    if u.username is None and u.password is None:
        return url
    host = u.hostname or ""
    netloc = host + (f":{u.port}" if u.port else "")
    return u._replace(netloc=netloc).geturl()


def connect(url: str, policy: RetryPolicy) -> tuple[http.client.HTTPConnection, str]:
    """A connected HTTP(S) connection for ``url`` (through $HTTP(S)_PROXY when set) and the
    request target. Connect uses ``connect_timeout``; every later socket read ``read_timeout``."""
    u = urlsplit(url)
    https = u.scheme == "https"
    port = u.port or (443 if https else 80)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and urllib.request.proxy_bypass(u.hostname or ""):
        proxy = None
    host = u.hostname or ""
    if proxy:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(p.hostname or "", p.port or 80,
                                                                            timeout=policy.connect_timeout)
            conn.set_tunnel(host, port)
        else:
            conn = http.client.HTTPConnection(p.hostname or "", p.port or 80, timeout=policy.connect_timeout)
            target = url
    elif https:
        conn = http.client.HTTPSConnection(host, port, timeout=policy.connect_timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=policy.connect_timeout)
    conn.connect()
    conn.sock.settimeout(policy.read_timeout)
    return conn, target


def request(method: str, url: str, headers: dict[str, str], policy: RetryPolicy
            ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """Send a request, following up to 5 redirects with the same headers (``Range`` included),
    minus credentials once the redirect leaves the first URL's origin. Returns the connection,
    the response and the final URL."""
    first = origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        u = urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise DownloadError(f"unsupported URL scheme in {safe_url(url)}")
        send = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        if origin(url) != first:
            send = {k: v for k, v in send.items() if k.lower() not in CREDENTIAL_HEADERS}
        conn, target = connect(url, policy)
        try:
            conn.request(method, target, headers=send)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            location = resp.getheader("Location")
            resp.close()
            conn.close()
            url = urljoin(url, location)
            continue
        return conn, resp, url
    raise DownloadError(f"too many redirects for {safe_url(url)}")


def retry_after(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def validators(resp: http.client.HTTPResponse) -> dict[str, str | None]:
    return {"etag": resp.getheader("ETag"), "last_modified": resp.getheader("Last-Modified")}


def content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """``bytes START-END/TOTAL`` → (START, TOTAL or None); ``bytes */TOTAL`` (a 416's) → (None, TOTAL)."""
    if not value or not value.startswith("bytes "):
        return None
    spec = value[6:].strip()
    rng, _, total = spec.partition("/")
    start, _, _end = rng.partition("-")
    try:
        return (None if rng.strip() == "*" else int(start)), (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


def header_int(value: str | None) -> int | None:
    """A numeric header (Content-Length) as an int; None when absent or malformed, so a bad
    header is treated like a missing one instead of failing the transfer."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def if_range(state: dict[str, Any]) -> str | None:
    """The ``If-Range`` value for a resume or a later range, from the validators first seen
    (:func:`validators`): the ETag when strong — RFC 9110 forbids weak ones there — else
    Last-Modified; None when the server gave neither."""
    etag = state.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return state.get("last_modified")


def describe(exc: BaseException) -> str:
    """A short reason for a network error, for events and messages."""
    if isinstance(exc, TimeoutError):
        return "timed out (no data within the read timeout)" if "connect" not in str(exc).lower() else "connect timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "server closed the connection without a response"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


__all__ = ["CREDENTIAL_HEADERS", "RETRY_STATUSES", "USER_AGENT", "RetryPolicy", "Retryable", "connect",
           "content_range", "describe", "header_int", "if_range", "origin", "request", "retry_after", "safe_url",
           "validators"]
