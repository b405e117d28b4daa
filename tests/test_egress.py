"""The egress policy for URLs from callbacks: which addresses may be reached, and that the
connector enforces it on the address actually connected to."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest

from streamwatch.config import ConfigError, parse_config
from streamwatch.egress import Egress, Refused, address_problem, shown
from tests.fakes.clips import ClipHost
from tests.fakes.serve import serve


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback address"),
        ("127.8.9.1", "loopback address"),
        ("10.1.2.3", "private address"),
        ("172.16.0.1", "private address"),
        ("192.168.1.1", "private address"),
        ("169.254.169.254", "cloud metadata address"),
        ("169.254.1.1", "link-local address"),
        ("100.64.0.1", "shared (CGNAT) address"),
        ("100.100.100.200", "cloud metadata address"),
        ("192.0.0.192", "IETF protocol address"),
        ("0.0.0.0", "unspecified address"),  # noqa: S104 - an address judged, not bound
        ("224.0.0.1", "multicast address"),
        ("255.255.255.255", "private address"),
        ("::1", "loopback address"),
        ("::", "unspecified address"),
        ("::ffff:127.0.0.1", "loopback address"),
        ("::ffff:169.254.169.254", "cloud metadata address"),
        ("2002:7f00:1::", "6to4 form of a loopback address"),
        ("64:ff9b::a00:1", "NAT64 form of a private address"),
        ("fd00:ec2::254", "cloud metadata address"),
        ("fd12:3456::1", "private address"),
        ("fe80::1", "link-local address"),
        ("fec0::1", "site-local address"),
        ("ff02::1", "multicast address"),
        ("::127.0.0.1", "reserved address"),
        ("8.8.8.8", None),
        ("::ffff:8.8.8.8", None),
        ("2606:4700::1111", None),
        ("2002:808:808::", None),
    ],
)
def test_internal_addresses_are_named(address, problem):
    """Loopback, private, link-local, metadata, CGNAT, multicast and their IPv6 spellings are
    internal; public addresses are not."""
    assert address_problem(ipaddress.ip_address(address)) == problem


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/clip",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7:8080/x",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[::ffff:7f00:1]/x",
        "http://2130706433/x",
        "http://0177.0.0.1/x",
        "http://0x7f.0.0.1/x",
        "http://127.1/x",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "gopher://example.com/x",
        "/relative/only",
    ],
)
def test_check_url_refuses_internal_literals_and_other_schemes(url):
    """IP literals of internal addresses in any spelling, and anything but http(s), are
    refused before any connection."""
    with pytest.raises(Refused):
        Egress().check_url(url)


def test_check_url_drops_credentials_and_keeps_public_urls():
    """User info never survives into the request (no Basic auth); the fragment goes too."""
    url = Egress().check_url("https://user:pa55@clips.example.com/a/b.mp4?sig=1#t=3")
    assert str(url) == "https://clips.example.com/a/b.mp4?sig=1"
    assert url.user is None
    assert url.password is None


def test_allow_hosts_takes_names_addresses_and_networks():
    """allow_hosts lets operators reach internal clip hosts by name or network, nothing else."""
    egress = Egress(allow_hosts=["clips.internal", "10.20.0.0/16", "127.0.0.1"])
    assert egress.check_url("http://clips.internal/x").host == "clips.internal"
    assert egress.check_url("http://10.20.3.4/x").host == "10.20.3.4"
    assert egress.check_url("http://127.0.0.1:9/x").host == "127.0.0.1"
    with pytest.raises(Refused):
        egress.check_url("http://10.21.0.1/x")
    with pytest.raises(Refused):
        egress.check_url("http://[::1]/x")


def test_trusted_prefix_is_exact():
    """A trusted prefix (the built-in emulator's clips) allows that prefix only, not the rest
    of the same server."""
    egress = Egress(trusted_prefixes=["http://127.0.0.1:4000/_emulator/clips/"])
    egress.check_url("http://127.0.0.1:4000/_emulator/clips/t/segment_0.mp4")
    for url in (
        "http://127.0.0.1:4000/_emulator/state",
        "http://127.0.0.1:4001/_emulator/clips/t/x",
        "http://127.0.0.1:4000/_emulator/clips/../state",
    ):
        with pytest.raises(Refused):
            egress.check_url(url)


@pytest.mark.parametrize("entry", ["http://x.example", "x.example:80", "10.0.0.0/33", "a b"])
def test_allow_hosts_entries_are_validated(entry, tmp_path):
    """A malformed allow_hosts entry fails the config with the key path and a hint."""
    text = f'[storage]\npath = "{tmp_path}/s.db"\n[evidence]\nallow_hosts = ["{entry}"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert "evidence.allow_hosts" in str(info.value)


def test_shown_hides_user_info_and_query():
    """URLs in errors and logs carry neither credentials nor query tokens."""
    assert shown("https://u:p@h.example:8443/a?token=s#f") == "https://h.example:8443/a"


async def test_connector_refuses_internal_addresses_at_connection_time():
    """Even a request that skips check_url cannot reach an internal address: the socket is
    refused for IP literals and the resolver drops names that resolve to loopback."""
    host = ClipHost()
    async with serve(host.app()) as base, Egress().session(limit=2, limit_per_host=2) as session:
        port = base.rsplit(":", 1)[1]
        for url in (
            f"{base}/clip/10",
            f"http://localhost:{port}/clip/10",
            f"http://[::ffff:127.0.0.1]:{port}/clip/10",
            f"http://2130706433:{port}/clip/10",
        ):
            # aiohttp >= 3.14 refuses the non-canonical spelling itself; older ones reach our
            # socket factory, which refuses it.
            with pytest.raises((Refused, aiohttp.ClientError)):
                async with session.get(url):
                    pass
    assert host.requests == []


async def test_allowed_name_connects_and_sends_no_credentials_or_cookies():
    """Through an allowed name, the request carries no Authorization and no cookie, even after
    the host set one."""
    host = ClipHost()
    egress = Egress(allow_hosts=["localhost"])
    async with serve(host.app()) as base, egress.session(limit=2, limit_per_host=2) as session:
        port = base.rsplit(":", 1)[1]
        origin = f"http://localhost:{port}"
        url = egress.check_url(f"http://user:secret@localhost:{port}/redirect?to=/clip/3")
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status == 302
        async with session.get(f"{origin}/clip/3") as resp:
            assert await resp.read() == b"ccc"
    assert [r.path for r in host.requests] == ["/redirect?to=/clip/3", "/clip/3"]
    for seen in host.requests:
        assert "Authorization" not in seen.headers
        assert "Cookie" not in seen.headers


def test_bad_allow_entry_is_a_value_error():
    """Egress built directly rejects what the config would reject."""
    with pytest.raises(ValueError, match="host name"):
        Egress(allow_hosts=["https://x.example/"])
