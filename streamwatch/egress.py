"""Outbound HTTP to URLs that come from outside (a callback's clip URL): which may be reached.

A URL from a callback must not make the daemon fetch from its own network (loopback, private
ranges, link-local and the cloud metadata address, shared CGNAT space, multicast, …) nor
forward credentials. `Egress` enforces that in three places, so that no path skips it:

- `check_url()` on every URL before it is requested, the first and every redirect hop: http(s)
  only, user info dropped (never sent as Basic auth), IP literals judged at once and
  non-canonical spellings (``2130706433``, ``0177.0.0.1``) refused;
- the connector's resolver, which drops internal addresses from what a name resolves to (a
  name resolving only to internal addresses is refused with a clear reason);
- the connector's socket factory, which refuses to open a socket to an internal address
  whatever path led there: this is the address actually connected to, after DNS, so
  redirects and DNS rebinding are covered too.

`allow_hosts` entries (host names, IP addresses or CIDR networks) are the operator's escape
hatch; `trusted_prefixes` are exact URL prefixes the daemon itself serves (the built-in
emulator's clips).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = ["Egress", "Refused", "address_problem", "parse_allow_entry", "shown"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges `is_global` lets through on Python 3.11 that no clip host lives in.
_EXTRA_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("100.64.0.0/10"), "shared (CGNAT) address"),
    (ipaddress.IPv4Network("192.0.0.0/24"), "IETF protocol address"),
    (ipaddress.IPv4Network("192.88.99.0/24"), "6to4 relay address"),
)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)


class Refused(ValueError):
    """A URL or address this daemon will not fetch from. The message names no secret."""


def shown(url: URL | str) -> str:
    """A URL as it may appear in errors and logs: no user info, query or fragment (tokens)."""
    try:
        u = url if isinstance(url, URL) else URL(url)
        if not u.absolute or not u.host:
            return "(not an absolute URL)"
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return "(unparsable URL)"


def address_problem(ip: IPAddress) -> str | None:
    """Why `ip` is internal (e.g. "loopback address"), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return address_problem(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour)
            return f"6to4 form of {_a(inner)}" if inner else None
        if any(ip in net for net in _NAT64):
            inner = address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"NAT64 form of {_a(inner)}" if inner else None
        if ip.is_site_local:
            return "site-local address"
    if ip in _METADATA:
        return "cloud metadata address"
    checks = (
        (ip.is_unspecified, "unspecified address"),
        (ip.is_loopback, "loopback address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_multicast, "multicast address"),
        (ip.is_private, "private address"),
        (ip.is_reserved, "reserved address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    if isinstance(ip, ipaddress.IPv4Address):
        for net, reason in _EXTRA_V4:
            if ip in net:
                return reason
    if not ip.is_global:
        return "address that is not globally routable"
    return None


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _ip(text: str) -> IPAddress | None:
    """`text` as an IP address (an IPv6 zone is ignored), or None if it is not one."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def parse_allow_entry(entry: str) -> str | IPNetwork:
    """An `allow_hosts` entry: a CIDR network or IP address, else a host name (lower case).
    Raises ValueError with a hint for anything else."""
    text = entry.strip()
    if "://" in text or text.startswith("["):
        raise ValueError(f"{entry!r} is not a host name (write only the host: no scheme, port)")
    if "/" in text or _ip(text) is not None:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{entry!r} is not a valid address or CIDR network (e.g. 10.0.0.0/8)"
            ) from None
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if not name or any(not lbl or len(lbl) > 63 for lbl in labels) or len(name) > 253:
        raise ValueError(f"{entry!r} is not a host name (write only the host: no scheme, port)")
    if any(not (c.isalnum() or c in "-_") for c in name.replace(".", "")):
        raise ValueError(f"{entry!r} is not a host name (write only the host: no scheme, port)")
    return name


def _canonical_host(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass
class Egress:
    """The policy and the connector that enforces it at connection time."""

    allow_hosts: Iterable[str] = ()
    trusted_prefixes: Iterable[str] = ()
    _names: frozenset[str] = field(init=False)
    _networks: tuple[IPNetwork, ...] = field(init=False)
    _prefixes: tuple[URL, ...] = field(init=False)
    # (ip, port) the resolver returned for an allowed name or trusted prefix: the socket
    # factory lets these through although they are internal.
    _vouched: set[tuple[str, int]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        entries = [parse_allow_entry(e) for e in self.allow_hosts]
        self._names = frozenset(e for e in entries if isinstance(e, str))
        self._networks = tuple(e for e in entries if not isinstance(e, str))
        self._prefixes = tuple(URL(p) for p in self.trusted_prefixes)
        for prefix in self._prefixes:
            ip = _ip(prefix.host or "")
            if ip is not None and prefix.port is not None:
                self._vouched.add((str(ip), prefix.port))

    # -- the rules ------------------------------------------------------------------------------

    def _network_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._networks)

    def _trusted(self, url: URL) -> bool:
        return any(
            url.scheme == p.scheme
            and url.host == p.host
            and url.port == p.port
            and url.path.startswith(p.path)
            for p in self._prefixes
        )

    def address_allowed(self, ip: IPAddress) -> str | None:
        """None if connecting to `ip` is allowed, else why not."""
        if self._network_allowed(ip):
            return None
        return address_problem(ip)

    def check_url(self, raw: str | URL) -> URL:
        """The URL to request for `raw` (user info and fragment dropped), or `Refused`."""
        try:
            url = raw if isinstance(raw, URL) else URL(raw)
        except ValueError:
            raise Refused("refused an unparsable URL") from None
        if url.scheme not in ("http", "https") or not url.absolute or not url.host:
            what = f"a {url.scheme}: URL" if url.scheme else "a relative URL"
            raise Refused(f"refused {what}: only http(s) URLs are fetched")
        url = url.with_user(None).with_fragment(None)
        if self._trusted(url):
            return url
        host = _canonical_host(url.host or "")
        if host in self._names:
            return url
        ip = _ip(host)
        if ip is None and _looks_numeric(host):
            raise Refused(f"refused {shown(url)}: {host} is not a canonical IP address")
        if ip is not None:
            problem = self.address_allowed(ip)
            if problem:
                raise Refused(f"refused {shown(url)}: {ip} is {_a(problem)}")
        return url

    # -- enforcement at connection time --------------------------------------------------------

    def connector(self, *, limit: int, limit_per_host: int) -> aiohttp.TCPConnector:
        """A connector whose resolver and sockets follow this policy."""
        return aiohttp.TCPConnector(
            limit=limit,
            limit_per_host=limit_per_host,
            resolver=_Resolver(self),
            socket_factory=self._socket,
        )

    def session(self, *, limit: int, limit_per_host: int) -> aiohttp.ClientSession:
        """A session that sends no cookies, reads no proxy settings and follows the policy."""
        return aiohttp.ClientSession(
            connector=self.connector(limit=limit, limit_per_host=limit_per_host),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    def _socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        ip = _ip(host)
        if ip is None:
            raise Refused(f"refused to connect to {host}: not an IP address")
        if (str(ip), port) not in self._vouched:
            problem = self.address_allowed(ip)
            if problem:
                raise Refused(f"refused to connect to {ip}: {_a(problem)}")
        return socket.socket(family=family, type=type_, proto=proto)

    def _filter(self, host: str, port: int, found: list[ResolveResult]) -> list[ResolveResult]:
        name = _canonical_host(host)
        trusted = name in self._names or any(
            _canonical_host(p.host or "") == name and p.port == port for p in self._prefixes
        )
        kept: list[ResolveResult] = []
        problems: list[str] = []
        for result in found:
            ip = _ip(result["host"])
            if ip is None:
                continue
            if trusted:
                self._vouched.add((str(ip), port))
                kept.append(result)
                continue
            problem = self.address_allowed(ip)
            if problem:
                problems.append(f"{ip} ({problem})")
            else:
                kept.append(result)
        if not kept:
            raise Refused(f"refused {host}: it resolves only to {', '.join(problems) or 'nothing'}")
        return kept


def _looks_numeric(host: str) -> bool:
    """Spellings the C resolver reads as IPv4 (decimal, octal, hex, short forms)."""
    if not host or any(c not in "0123456789abcdefx." for c in host):
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


class _Resolver(AbstractResolver):
    """aiohttp's resolver, with internal addresses removed from every answer."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        return self._egress._filter(host, port, found)

    async def close(self) -> None:
        await self._inner.close()
