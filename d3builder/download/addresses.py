"""Which URLs `fetch-real` may download: refuse hosts that are, or resolve to, a non-public address.

The host is parsed exactly as urllib (img2dataset's downloader) parses it, then resolved with
getaddrinfo as the socket layer will resolve it, so every spelling that reaches a private address
(decimal, octal or hex IPv4, short forms, IPv4-mapped IPv6, names such as `localhost`) is caught.
Unchecked: redirect targets and a DNS answer that changes between this check and the download.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REFUSED = "refused non-public address"
UNRESOLVED = "unresolved host"
"""The first words of a refusal message: the reason it is counted under."""

NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

_CATEGORIES = (
    ("unspecified", lambda ip: ip.is_unspecified),
    ("loopback", lambda ip: ip.is_loopback),
    ("link-local", lambda ip: ip.is_link_local),
    ("multicast", lambda ip: ip.is_multicast),
    ("private", lambda ip: ip.is_private),
    ("reserved", lambda ip: ip.is_reserved),
    ("not globally routable", lambda ip: not ip.is_global),
)
"""Checked in order; the first that matches names the refusal."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_category(ip: IPAddress) -> str | None:
    """Why an address is not public (loopback, private, link-local, ...), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_loopback or ip.is_unspecified:
            return "loopback" if ip.is_loopback else "unspecified"
        inner = _embedded_ipv4(ip)
        if inner is not None:
            category = address_category(inner)
            return None if category is None else f"{category}, IPv4 {inner} inside IPv6"
    for name, test in _CATEGORIES:
        if test(ip):
            return name
    return None


def connect_target(url: str) -> tuple[str, int]:
    """The (host, port) urllib will connect to for `url`, parsed by urllib and http.client themselves."""
    request = urllib.request.Request(url)
    scheme = request.type
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r} is not http(s)")
    if not request.host:
        raise ValueError("no host")
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    connection = connection_class(request.host)
    return connection.host, connection.port


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address getaddrinfo gives for `host` (what the socket layer would connect to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}, key=str)


def host_refusal(host: str, port: int) -> str | None:
    """None when every address of `host` is public, else a one-line reason naming host, address and kind."""
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        return f"{UNRESOLVED}: {host!r} does not resolve ({type(exc).__name__}: {exc})"
    for ip in addresses:
        category = address_category(ip)
        if category is not None:
            shown = "" if host == str(ip) else f" resolves to {ip}"
            return (
                f"{REFUSED}: host {host!r}{shown} ({category}); "
                "set fetch.allow_private_addresses: true to allow it"
            )
    return None


def url_refusals(urls: Iterable[str], threads: int = 16) -> dict[str, str | None]:
    """Each distinct URL -> None when it may be downloaded, else why not (each host resolved once, in parallel)."""
    targets: dict[str, tuple[str, int] | str] = {}
    for url in set(urls):
        try:
            targets[url] = connect_target(url)
        except (ValueError, http.client.InvalidURL) as exc:
            targets[url] = f"{REFUSED}: the URL's host cannot be parsed ({exc})"
    hosts = sorted({target for target in targets.values() if isinstance(target, tuple)})
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(hosts) or 1))) as pool:
        verdicts = dict(zip(hosts, pool.map(lambda target: host_refusal(*target), hosts), strict=True))
    return {url: target if isinstance(target, str) else verdicts[target] for url, target in targets.items()}
