"""The address policy of `fetch-real`: every spelling of a non-public host is refused, public ones pass."""

from __future__ import annotations

import ipaddress

import pytest

from d3builder.download.addresses import (
    REFUSED,
    UNRESOLVED,
    address_category,
    connect_target,
    url_refusals,
)

NON_PUBLIC = {  # URL -> the kind its refusal names
    "http://127.0.0.1/a.jpg": "loopback",
    "http://localhost:8080/a.jpg": "loopback",
    "http://2130706433/a.jpg": "loopback",  # decimal
    "http://0x7f000001/a.jpg": "loopback",  # hex
    "http://0177.0.0.1/a.jpg": "loopback",  # octal
    "http://127.1/a.jpg": "loopback",  # short form
    "http://0x7f.1/a.jpg": "loopback",
    "http://[::1]/a.jpg": "loopback",
    "http://[::ffff:127.0.0.1]/a.jpg": "loopback, IPv4 127.0.0.1 inside IPv6",
    "http://[::ffff:7f00:1]/a.jpg": "loopback, IPv4 127.0.0.1 inside IPv6",
    "http://[2002:7f00:1::]/a.jpg": "loopback, IPv4 127.0.0.1 inside IPv6",  # 6to4
    "http://[64:ff9b::a9fe:a9fe]/a.jpg": "link-local, IPv4 169.254.169.254 inside IPv6",  # NAT64
    "http://169.254.169.254/latest/meta-data/": "link-local",  # cloud instance metadata
    "http://[fe80::1]/a.jpg": "link-local",
    "http://10.0.0.1/a.jpg": "private",
    "http://172.16.5.4/a.jpg": "private",
    "http://192.168.1.1:8443/a.jpg": "private",
    "http://[fd00::1]/a.jpg": "private",
    "http://100.64.0.1/a.jpg": "not globally routable",  # carrier-grade NAT
    "http://224.0.0.1/a.jpg": "multicast",
    "http://[ff02::1]/a.jpg": "multicast",
    "http://0.0.0.0/a.jpg": "unspecified",
    "http://0/a.jpg": "unspecified",
    "http://[::]/a.jpg": "unspecified",
}
PUBLIC = ["http://93.184.215.14/a.jpg", "https://1.1.1.1:443/a.jpg", "http://[2606:4700:4700::1111]/a.jpg",
          "http://[64:ff9b::101:101]/a.jpg", "http://[::ffff:8.8.8.8]/a.jpg"]  # fmt: skip


def test_every_spelling_of_a_non_public_host_is_refused_with_its_kind() -> None:
    verdicts = url_refusals([*NON_PUBLIC, *PUBLIC], threads=4)
    for url, kind in NON_PUBLIC.items():
        assert verdicts[url] is not None and verdicts[url].startswith(f"{REFUSED}: host "), url
        assert f"({kind})" in verdicts[url], (url, verdicts[url])
    assert {url: verdicts[url] for url in PUBLIC} == dict.fromkeys(PUBLIC)


def test_the_host_is_parsed_as_urllib_connects_to_it() -> None:
    assert connect_target("http://user@127.0.0.1:81/x") == ("user@127.0.0.1", 81)  # urllib would look that name up
    assert connect_target("https://[::1]/x") == ("::1", 443)
    verdicts = url_refusals(["http://127.0.0.1:80@1.1.1.1/x", "ftp://1.1.1.1/x", "http://nowhere.invalid/x"])
    assert verdicts["http://127.0.0.1:80@1.1.1.1/x"].startswith(f"{REFUSED}: the URL's host cannot be parsed")
    assert "is not http(s)" in verdicts["ftp://1.1.1.1/x"]
    assert verdicts["http://nowhere.invalid/x"].startswith(f"{UNRESOLVED}: 'nowhere.invalid' does not resolve")


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888"])
def test_public_addresses_have_no_category(address: str) -> None:
    assert address_category(ipaddress.ip_address(address)) is None
