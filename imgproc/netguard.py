"""The SSRF guard: which addresses outgoing requests may reach, checked at connect time.

Host names are resolved by the guarded connection itself and every resolved address is
checked before the socket connects, so a redirect hop or a DNS answer that changes between
a check and the connect (rebinding) cannot reach a private address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(NewConnectionError):
    """The destination resolves to an address outgoing requests may not reach."""

    def __init__(self, conn: HTTPConnection, reason: str) -> None:
        super().__init__(conn, reason)
        self.reason = reason


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return is_public(mapped)
    return address.is_global and not (address.is_multicast or address.is_reserved)


def literal_address(host: str) -> IPAddress | None:
    """The address a host literal names (any IPv4 spelling inet_aton takes), else None."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # decimal, octal, hex and short IPv4 forms ("2130706433", "0x7f.1", "127.1")
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def host_refusal(host: str) -> str | None:
    """Why a host can be refused without a DNS look-up, or None when it cannot be judged yet."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "blocked address (loopback)"
    address = literal_address(name)
    if address is not None and not is_public(address):
        return f"blocked address ({address})"
    return None


def _guarded_connect(conn: HTTPConnection) -> socket.socket:
    host, port = conn._dns_host, conn.port
    timeout = conn.timeout if isinstance(conn.timeout, int | float) else None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NewConnectionError(conn, f"cannot resolve host {host!r}: {exc}") from exc
    last_error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if not is_public(address):
            raise BlockedAddress(conn, f"blocked address ({address})")
        sock = socket.socket(family, socktype, proto)
        try:
            for option in conn.socket_options or []:
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise NewConnectionError(conn, f"cannot connect to {host}: {last_error}")


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _guarded_connect(self)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _guarded_connect(self)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections refuse non-public addresses at connect time."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def make_session(*, allow_private: bool, pool_size: int) -> requests.Session:
    """A pooled session; guarded unless private addresses are allowed (tests, development)."""
    session = requests.Session()
    session.trust_env = False  # no proxies from the environment: they would bypass the guard
    adapter: HTTPAdapter
    if allow_private:
        adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    else:
        adapter = GuardedAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "imgproc/1.0"
    return session
