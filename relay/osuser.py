"""Which OS user owns the client end of a local TCP connection? (Linux ``/proc/net/tcp``, as identd does)

On a terminal server many users share one address, so neither the client address nor the port tells
them apart; the kernel does: the client's socket is in this machine's socket table, with the uid of the
process that opened it. ``socket_owner(client, server)`` finds the socket whose local end is the
client's ``(ip, port)`` and whose remote end is relay's, and returns its uid. Unlike anything the client
says (MAIL FROM, a login, an XCLIENT-like hint), the uid cannot be forged by the client. A remote client's
socket is not in the table, so the lookup only ever answers for processes on this machine (in relay's
network namespace).

The table is read as text and searched for the one line, so the cost does not grow with parsing every
socket of a busy server. Where ``/proc/net/tcp`` does not exist (not Linux, or hidden), the answer is
``None``: the ``os_user`` rule then matches nobody.

Format (``net/ipv4/tcp_ipv4.c`` ``get_tcp4_sock``, ``net/ipv6/tcp_ipv6.c`` ``get_tcp6_sock``)::

    sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode
     0: 0100007F:09C5 0100007F:D8A2 01 00000000:00000000 00:00000000 00000000  1000        0 123

An address is the raw ``in_addr`` (IPv4) or four ``s6_addr32`` words (IPv6), each 32-bit word printed
with ``%08X`` as the host reads it, i.e. in the host's byte order; the port is printed after ``ntohs``.
A client with an IPv6 socket talking to an IPv4 address shows up in ``tcp6`` as ``::ffff:a.b.c.d``.
"""

from __future__ import annotations

import ipaddress
import pwd
import struct
from dataclasses import dataclass
from pathlib import Path

from relay.envelope import OsUser

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ESTABLISHED = "01"  # st: a TIME_WAIT (06) leftover of an earlier connection has uid 0, never ours


@dataclass(frozen=True)
class SocketEntry:
    """One line of ``/proc/net/tcp[6]``, decoded."""

    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    state: str
    uid: int


def available() -> bool:
    """Can sockets be looked up on this machine (Linux with ``/proc/net/tcp``)?"""
    return TABLES[0].exists()


def decode_address(field: str) -> tuple[IPAddress, int]:
    """``0100007F:09C5`` -> ``(127.0.0.1, 2501)``; IPv4-mapped IPv6 addresses come back as IPv4."""
    hex_ip, _, hex_port = field.partition(":")
    words = [int(hex_ip[i : i + 8], 16) for i in range(0, len(hex_ip), 8)]
    raw = b"".join(struct.pack("=I", word) for word in words)  # each word back in the host's byte order
    address = ipaddress.ip_address(raw)
    return _unmapped(address), int(hex_port, 16)


def encode_address(address: IPAddress, port: int, *, mapped: bool = False) -> str:
    """The inverse of ``decode_address``; ``mapped`` writes an IPv4 address as ``::ffff:a.b.c.d`` (tcp6)."""
    if mapped and isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    raw = address.packed
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def parse_line(line: str) -> SocketEntry | None:
    """One table line -> its entry; ``None`` for the heading or a line that is not one."""
    fields = line.split()
    if len(fields) < 8 or not fields[0].endswith(":") or not fields[0][:-1].isdigit():
        return None
    try:
        return SocketEntry(decode_address(fields[1]), decode_address(fields[2]), fields[3], int(fields[7]))
    except ValueError:
        return None


def entries(table: Path) -> list[SocketEntry]:
    """Every socket in one table (tests and diagnosis; the lookup reads only the line it needs)."""
    lines = table.read_text(encoding="ascii").splitlines()
    return [entry for entry in map(parse_line, lines) if entry is not None]


def socket_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid of the process owning the established socket ``client`` -> ``server``; ``None`` if there
    is none in this machine's tables (a remote client, a closed connection, no ``/proc``)."""
    try:
        client_ip, server_ip = _ip(client[0]), _ip(server[0])
    except ValueError:
        return None
    for table, mapped in ((TABLES[0], False), (TABLES[1], True)):
        if mapped is False and isinstance(client_ip, ipaddress.IPv6Address):
            continue  # an IPv6 client is only in tcp6
        needle = (
            f" {encode_address(client_ip, client[1], mapped=mapped)}"
            f" {encode_address(server_ip, server[1], mapped=mapped)} {ESTABLISHED} "
        )
        uid = _find_uid(table, needle)
        if uid is not None:
            return uid
    return None


def os_user(client: tuple[str, int], server: tuple[str, int]) -> OsUser | None:
    """``socket_owner`` with the uid's name (from the password database, when it has one)."""
    uid = socket_owner(client, server)
    return None if uid is None else named(uid)


def named(uid: int) -> OsUser:
    """``uid`` with its name from the password database, when it has one (a socket's owner, a drop file's)."""
    try:
        name: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (a container's, a deleted user's)
        name = None
    return OsUser(uid, name)


def _find_uid(table: Path, needle: str) -> int | None:
    try:
        text = table.read_text(encoding="ascii")
    except OSError:  # no /proc (not Linux), or hidden from relay's service
        return None
    at = text.find(needle)
    if at < 0:
        return None
    start = text.rfind("\n", 0, at) + 1
    end = text.find("\n", at)
    entry = parse_line(text[start : end if end >= 0 else len(text)])
    return entry.uid if entry is not None else None


def _ip(text: str) -> IPAddress:
    return _unmapped(ipaddress.ip_address(text.split("%")[0]))


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


__all__ = ["OsUser", "SocketEntry", "available", "decode_address", "encode_address", "entries", "os_user",
           "parse_line", "socket_owner"]  # fmt: skip
