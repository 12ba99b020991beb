"""Source addresses against CIDR lists (tenants' ``source_cidrs``, ``[sip] trusted_cidrs``)."""

from __future__ import annotations

import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: tuple[str, ...] | list[str]) -> tuple[IPNetwork, ...]:
    """``"192.0.2.0/24"``, ``"2001:db8::/32"`` or a bare address (host bits allowed).

    Raises:
        ValueError: naming the entry that is not a CIDR.
    """
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            raise ValueError(f"{cidr!r} is not a CIDR") from e
    return tuple(networks)


def source_in(source_ip: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether ``source_ip`` lies in one of ``networks``; an IPv4-mapped IPv6 address
    (``::ffff:192.0.2.1``, a dual-stack socket) also counts as its IPv4 address.
    Not an address (or None): False."""
    if source_ip is None:
        return False
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    # A network never contains an address of the other IP version.
    return any(candidate in network for network in networks for candidate in candidates)
