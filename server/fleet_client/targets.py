"""Where to send calls: host:port items (or a gRPC target) -> one round_robin gRPC target."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


class TargetError(RuntimeError):
    """A target cannot be used (bad address, or it does not answer)."""


@dataclass(frozen=True)
class Targets:
    """What to dial: a gRPC target string, and the backend addresses when they are known."""

    grpc_target: str
    addresses: tuple[str, ...]


def _split_host_port(item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise TargetError(f"target {item!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> str:
    if _is_ip(host):
        return host
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TargetError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    ipv4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
    return str(ipv4[0] if ipv4 else infos[0][4][0])


def parse_targets(items: Sequence[str]) -> Targets:
    """host:port items (also comma-separated) -> one round_robin target over their addresses.

    One item whose host is a name (a headless Service) is dialled as dns:///name:port, so that
    gRPC resolves every address behind it and balances across them; a list of items is
    resolved here, one address each.
    """
    flat = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not flat:
        raise TargetError("no targets given")
    if len(flat) == 1 and (flat[0].startswith(_SCHEMES) or "://" in flat[0]):
        return Targets(flat[0], ())  # already a gRPC target (dns:///name:port, ipv4:a,b, ...)
    pairs = [_split_host_port(item) for item in flat]
    if len(pairs) == 1 and not _is_ip(pairs[0][0]):
        host, port = pairs[0]
        return Targets(f"dns:///{host}:{port}", ())
    addresses = []
    for host, port in pairs:
        ip = _resolve(host, port)
        addresses.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    families = {"ipv6" if address.startswith("[") else "ipv4" for address in addresses}
    if len(families) > 1:
        raise TargetError("targets mix IPv4 and IPv6 addresses; use one family")
    return Targets(f"{families.pop()}:{','.join(addresses)}", tuple(addresses))
