"""Whether a hub can be reached at all, answered in at most a few seconds: a TCP connection to each
endpoint (or to the proxy that a download would use), DNS included, in parallel."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from urllib.parse import urlparse

#: Seconds the connectivity probe waits per host (DNS included) before calling a hub unreachable.
PROBE_TIMEOUT_S = 3.0


def probe_hub(endpoints: tuple[str, ...], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Return None if any endpoint accepts a TCP connection within ``timeout``, else why none did.

    DNS runs inside the timed thread, because ``getaddrinfo`` has no timeout of its own. When an HTTP(S)
    proxy is configured for a host, the proxy is probed instead, since that is what the download will use.
    """
    results: dict[str, str | None] = {}
    threads = []
    for url in endpoints:
        thread = threading.Thread(target=_probe_one, args=(url, timeout, results), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout + 0.5
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(url in results and results[url] is None for url in endpoints):
        return None
    return "; ".join(f"{url}: {results.get(url) or f'no answer within {timeout:g} s'}" for url in endpoints)


def normalize_url(value: str) -> str:
    value = value.strip()
    if not value.lower().startswith(("http://", "https://")):
        value = f"https://{value}"
    return value.rstrip("/")


def _probe_target(url: str) -> tuple[str, int]:
    """The (host, port) a download from ``url`` will connect to first: the URL's host or its proxy."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            default = 443 if proxy_url.scheme == "https" else 1080 if proxy_url.scheme.startswith("socks") else 80
            return proxy_url.hostname, proxy_url.port or default
    return host, port


def _probe_one(url: str, timeout: float, results: dict[str, str | None]) -> None:
    host, port = _probe_target(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            results[url] = None
    except OSError as exc:
        results[url] = f"cannot connect to {host}:{port} ({exc})"
