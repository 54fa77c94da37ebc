"""Who owns a local client's socket (``relay.osuser``): /proc/net/tcp[6] read on real loopback sockets."""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay import osuser
from relay.envelope import OsUser

pytestmark = pytest.mark.skipif(not osuser.available(), reason="needs Linux's /proc/net/tcp")

Pair = tuple[socket.socket, socket.socket, socket.socket]
Connect = Callable[..., Pair]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open a real connection: ``connect(family, host)`` -> (client, server's end, listener)."""
    opened: list[socket.socket] = []

    def make(family: socket.AddressFamily, host: str, *, client_family: socket.AddressFamily | None = None) -> Pair:
        listener = socket.socket(family)
        listener.bind((host, 0))
        listener.listen()
        client = socket.socket(client_family or family)
        target = listener.getsockname()[1]
        client.connect((f"::ffff:{host}" if client_family == socket.AF_INET6 else host, target))
        accepted, _ = listener.accept()
        opened.extend((listener, client, accepted))
        return client, accepted, listener

    yield make
    for sock in opened:
        sock.close()


def _ends(accepted: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    """(the client's end, our end) as the listener sees them."""
    peer, ours = accepted.getpeername(), accepted.getsockname()
    return (peer[0], peer[1]), (ours[0], ours[1])


def _me() -> OsUser:
    return OsUser(os.getuid(), pwd.getpwuid(os.getuid()).pw_name)


class TestParser:
    @pytest.mark.parametrize(
        ("family", "host", "table"), [(socket.AF_INET, "127.0.0.1", "tcp"), (socket.AF_INET6, "::1", "tcp6")]
    )
    def test_a_real_socket_is_decoded(self, connect: Connect, family: socket.AddressFamily, host: str,
                                      table: str) -> None:  # fmt: skip
        """The client's socket is in the table with both ends decoded (byte order, IPv6 words) and our uid."""
        client, _accepted, _ = connect(family, host)
        local, remote = client.getsockname()[:2], client.getpeername()[:2]

        # both ports: with the suite on every core, another test's socket can share the local port number
        [entry] = [e for e in osuser.entries(Path("/proc/net") / table)
                   if (e.local[1], e.remote[1]) == (local[1], remote[1])]  # fmt: skip

        assert (ipaddress.ip_address(host), local[1]) == entry.local
        assert (ipaddress.ip_address(host), remote[1]) == entry.remote
        assert (osuser.ESTABLISHED, os.getuid()) == (entry.state, entry.uid)

    def test_an_ipv6_client_of_an_ipv4_listener_is_found_in_tcp6_as_mapped(self, connect: Connect) -> None:
        """A client with an IPv6 socket reaching 127.0.0.1 is listed in tcp6 as ::ffff:127.0.0.1 (decoded as IPv4)."""
        _, accepted, _ = connect(socket.AF_INET, "127.0.0.1", client_family=socket.AF_INET6)
        client, ours = _ends(accepted)

        mapped = [e for e in osuser.entries(Path("/proc/net/tcp6")) if e.local[1] == client[1]]

        assert [ipaddress.ip_address("127.0.0.1")] == [e.local[0] for e in mapped]
        assert os.getuid() == osuser.socket_owner(client, ours)

    @pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::1", "fd00::1:2", "2001:db8::ff00:42:8329"])
    def test_encode_is_the_inverse_of_decode(self, address: str) -> None:
        """What the lookup searches for is exactly what the kernel writes (round trip, IPv4-mapped too)."""
        ip = ipaddress.ip_address(address)

        assert (ip, 2525) == osuser.decode_address(osuser.encode_address(ip, 2525))
        assert (ip, 80) == osuser.decode_address(osuser.encode_address(ip, 80, mapped=True))

    def test_heading_and_garbage_lines_are_not_entries(self) -> None:
        """The heading line and anything malformed are skipped, not misread."""
        heading = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"

        assert None is osuser.parse_line(heading)
        assert None is osuser.parse_line("   0: ZZZZ:0000 0100007F:0001 01 0 0 0 1000 0 1")


class TestLookup:
    @pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
    def test_the_owner_of_the_client_end_is_found(self, connect: Connect, family: socket.AddressFamily,
                                                  host: str) -> None:  # fmt: skip
        """The listener's view of a connection (peer, own address) leads to the client process's user."""
        _, accepted, _ = connect(family, host)

        assert _me() == osuser.os_user(*_ends(accepted))

    def test_the_servers_own_end_is_not_mistaken_for_the_client(self, connect: Connect) -> None:
        """Swapping the ends (our own socket) finds the accepted socket only if it is asked for as the client."""
        _, accepted, _listener = connect(socket.AF_INET, "127.0.0.1")
        client, ours = _ends(accepted)

        assert None is osuser.socket_owner(client, ("127.0.0.1", ours[1] + 1 if ours[1] < 65535 else 1))
        assert None is osuser.socket_owner(("127.0.0.2", client[1]), ours)

    def test_a_closed_connection_has_no_owner(self, connect: Connect) -> None:
        """Once the client is gone (its socket closed, the server's too) nobody is named, never uid 0 of a
        TIME_WAIT leftover."""
        client, accepted, _ = connect(socket.AF_INET, "127.0.0.1")
        ends = _ends(accepted)
        client.close()
        accepted.close()

        assert None is osuser.socket_owner(*ends)

    def test_no_table_means_no_owner(self, connect: Connect, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Without /proc (not Linux, hidden from the service) the lookup answers nothing, and says so."""
        _, accepted, _ = connect(socket.AF_INET, "127.0.0.1")
        monkeypatch.setattr(osuser, "TABLES", (tmp_path / "tcp", tmp_path / "tcp6"))

        assert None is osuser.socket_owner(*_ends(accepted))
        assert not osuser.available()
