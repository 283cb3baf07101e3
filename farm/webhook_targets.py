"""Where a webhook may go, and how farm connects there (the SSRF guard).

Targets must be http(s) and every address their host resolves to must be public,
unless FARM_WEBHOOK_ALLOWLIST names it: loopback, private, link-local, multicast,
reserved, unspecified and cloud-metadata addresses are refused. The connection is
made to the address that was checked, never re-resolved, so a name cannot be
rebound to an internal address between the check and the request.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from farm.config import mask_url
from farm.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_CHARS = 2000
MAX_RESPONSE_BYTES = 64 * 1024  # the body is not used; read a little so the socket closes

# Instance metadata services hand out cloud credentials: the classic SSRF prize.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
LIMITED_BROADCAST = ipaddress.ip_address("255.255.255.255")  # Python calls it "private"


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # no brackets around IPv6 literals
    port: int
    path: str  # path and query, as sent in the request line


def parse_target(url: str) -> Target:
    """Syntax only: an http(s) URL with a host and no credentials, no whitespace or
    control characters (urlsplit would drop some silently: 'exa\\nmple.com')."""
    shown = mask_url(url)[:200]
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"webhook URL {shown!r}... is longer than {MAX_URL_CHARS} characters")
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise InvalidInput(f"webhook URL {shown!r} contains whitespace or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"webhook URL {shown!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"webhook URL {shown!r}: only http and https are allowed")
    if not parts.hostname:
        raise InvalidInput(f"webhook URL {shown!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(f"webhook URL {shown!r}: credentials in the URL are not supported")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    default = 443 if parts.scheme == "https" else 80
    return Target(url, parts.scheme, parts.hostname, port or default, path)


@dataclass(frozen=True)
class Allowlist:
    """FARM_WEBHOOK_ALLOWLIST: host names, IP addresses and CIDRs trusted as targets."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Allowlist:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for item in (v.strip() for v in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        # A named host is trusted whatever it resolves to: the operator chose it.
        if host.lower().rstrip(".") in self.hosts:
            return True
        forms = [address] + ([address.ipv4_mapped] if _mapped(address) else [])
        return any(a in n for a in forms for n in self.networks if a.version == n.version)


def _mapped(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped or 6to4 IPv6 address."""
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address.sixtofour
    return None


def refusal(address: IPAddress) -> str | None:
    """Why `address` may not be a webhook target, or None if it is a public address."""
    inner = _mapped(address)
    if inner is not None:
        reason = refusal(inner)
        return f"{reason} (inside IPv6)" if reason else None
    checks: tuple[tuple[bool, str], ...] = (
        (address in METADATA_ADDRESSES, "cloud metadata"),
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address == LIMITED_BROADCAST, "broadcast"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "non-public"),
    )
    return next((why for hit, why in checks if hit), None)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def check_address(host: str, address: IPAddress, allowlist: Allowlist) -> None:
    reason = refusal(address)
    if reason and not allowlist.allows(host, address):
        raise InvalidInput(
            f"webhook host {host} is {address}, {_article(reason)} {reason} address; "
            "refused unless FARM_WEBHOOK_ALLOWLIST names it"
        )


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the name has (a literal is its own). Raises socket.gaierror."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def checked_addresses(target: Target, allowlist: Allowlist) -> list[IPAddress]:
    """Resolve the host and check every address: one bad address refuses the target,
    because the connection must only ever go to an address that was checked."""
    addresses = resolve(target.host, target.port)
    for address in addresses:
        check_address(target.host, address, allowlist)
    return addresses


# --- HTTP with the checked address pinned -------------------------------------


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, not to whatever DNS says now
    (DNS rebinding); the Host header still names the original host."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self.pinned, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with SNI and certificate checks against the original host name."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.pinned = str(address)

    def connect(self) -> None:
        sock = socket.create_connection((self.pinned, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


@dataclass(frozen=True)
class Response:
    status: int | None = None
    retry_after: str | None = None
    error: str | None = None
    permanent: bool = False  # retrying cannot help (refused target, no secret)


def post(
    target: Target, addresses: list[IPAddress], headers: dict[str, str], body: bytes, timeout: float
) -> Response:
    """POST to the first checked address that accepts a connection. Redirects are not
    followed: a 3xx is a failed attempt (a redirect could point past the SSRF guard)."""
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    errors: list[str] = []
    for address in addresses:
        conn = kind(target.host, target.port, address, timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:  # refused, unreachable: the next address may answer
                errors.append(f"{address}: {_describe(exc, timeout)}")
                continue
            conn.request("POST", target.path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read(MAX_RESPONSE_BYTES)
            return Response(status=resp.status, retry_after=resp.getheader("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:
            return Response(error=_describe(exc, timeout))
        finally:
            conn.close()
    return Response(error="; ".join(errors) or "no address to connect to")


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}"[:500]
