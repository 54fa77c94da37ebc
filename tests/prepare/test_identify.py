"""Who is sending (``relay.identify``): envelope sender, From header, client address, listener, in the configured order."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
from collections.abc import Callable

import pytest

from relay import osuser
from relay.config.load import parse_config
from relay.config.models import Config
from relay.envelope import OsUser, Submission
from relay.errors import RefusedError
from relay.prepare.identify import COMPANY, header_from_addresses, identify
from tests.conftest import UpstreamFactory, smtp_send
from tests.servers import RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]

BASE = """\
listeners:
  - port: 2525
  - port: 2526
    user: varasto
upstreams:
  o365:
    host: smtp.office365.com
    username: toimisto@rakennus.fi
    password_env: O365_PW
company:
  from_address: toimisto@rakennus.fi
  upstream: o365
users:
  matti:
    addresses: [matti@erp.local, "MATTI.M@erp.local"]
    from_address: matti@rakennus.fi
  anna:
    addresses: anna@erp.local
    clients: [192.0.2.23, "198.51.0.0/16", "fd00::/64"]
  varasto:
    from_address: varasto@rakennus.fi
"""


def config(extra: str = "") -> Config:
    return parse_config(BASE + extra)


def submission(
    mail_from: str = "erp@legacy.local", content: bytes = b"Subject: x\r\n\r\nbody\r\n", *,
    client: str = "127.0.0.1", listener: int = 0,
) -> Submission:  # fmt: skip
    return Submission(mail_from, ("customer@example.com",), content, client, listener=listener)


class TestRules:
    @pytest.mark.parametrize(
        ("mail_from", "expected"),
        [
            ("matti@erp.local", "matti"),
            ("MATTI@ERP.LOCAL", "matti"),
            ("matti.m@erp.local", "matti"),
            ("matti@rakennus.fi", "matti"),  # the user's own from_address identifies them too
            ("Anna@Erp.Local", "anna"),
        ],
    )
    def test_envelope_sender_case_insensitive(self, mail_from: str, expected: str) -> None:
        """MAIL FROM matches a user's addresses (or from_address) whatever the case."""
        assert (expected, "envelope_sender") == identify(config(), submission(mail_from))

    @pytest.mark.parametrize(("configured", "sent"), [
        ("laskutus@yhtiö.fi", "laskutus@xn--yhti-8qa.fi"),
        ("laskutus@xn--yhti-8qa.fi", "laskutus@yhtiö.fi"),
        ("laskutus@yhtiö.fi", "Laskutus@YHTIÖ.fi"),
    ])  # fmt: skip
    def test_an_internationalised_domain_in_either_form(self, configured: str, sent: str) -> None:
        """The ERP writes the A-label where the admin wrote the U-label (or the reverse): the same user (the
        mail went as the company's, through its account, without the user's archive copy)."""
        found = identify(config(f'  laskutus:\n    addresses: ["{configured}"]\n'), submission(sent))
        assert ("laskutus", "envelope_sender") == found

    @pytest.mark.parametrize(
        "from_header",
        [
            b"From: anna@erp.local",
            b"From: Anna <ANNA@erp.local>",
            b"From: =?iso-8859-1?q?Anna_K=E4rkk=E4inen?= <anna@erp.local>",
            b"From: \"K\xe4rkk\xe4inen, Anna\" <anna@erp.local>",  # legacy 8-bit display name
        ],
    )
    def test_header_from(self, from_header: bytes) -> None:
        """The From header identifies the user when the envelope sender does not (RFC 2047 or 8-bit name)."""
        content = from_header + b"\r\nSubject: Lasku\r\n\r\nbody\r\n"

        assert ("anna", "header_from") == identify(config(), submission("erp@legacy.local", content))

    @pytest.mark.parametrize(
        "content",
        [
            b"From: \xff\xfe\x00garbage\r\nSubject: \x81\x82\r\n\r\n\xff",
            b"From: <<<@@@>>>\r\n\r\n",
            b"\x00\x01\x02 not a header at all",
            b"",
            b"From: " + b"x" * 100_000 + b"\r\n\r\n",
        ],
    )
    def test_garbage_headers_identify_nobody(self, content: bytes) -> None:
        """Broken legacy headers do not crash identification; they simply match no user."""
        assert (None, COMPANY) == identify(config(), submission("erp@legacy.local", content))

    def test_header_from_addresses_reads_several(self) -> None:
        """Every address of every From header is considered."""
        content = b"From: a@x.fi, B <b@y.fi>\r\nFrom: c@z.fi\r\n\r\n"

        assert ["a@x.fi", "b@y.fi", "c@z.fi"] == header_from_addresses(content)

    @pytest.mark.parametrize("client", ["192.0.2.23", "198.51.5.6", "fd00::17", "fd00::17%eth0"])
    def test_client_address(self, client: str) -> None:
        """The workstation's address (single IP, network, IPv6 with a zone) identifies its user."""
        assert ("anna", "client_address") == identify(config(), submission(client=client))

    @pytest.mark.parametrize("client", ["192.0.2.24", "198.52.0.1", "fd01::1", "not-an-ip", ""])
    def test_other_clients_identify_nobody(self, client: str) -> None:
        """Addresses outside the configured ones (or unparsable) match no user."""
        assert (None, COMPANY) == identify(config(), submission(client=client))

    def test_listener(self) -> None:
        """A listener bound to a user identifies every message that arrives on it."""
        assert ("varasto", "listener") == identify(config(), submission(listener=1))
        assert (None, COMPANY) == identify(config(), submission(listener=0))

    def test_no_match_is_the_company(self) -> None:
        """Nobody recognised: the company defaults apply."""
        assert (None, COMPANY) == identify(config(), submission())


class TestOrder:
    def test_default_order_puts_envelope_sender_first(self) -> None:
        """By default the envelope sender wins over the workstation's address."""
        sub = submission("matti@erp.local", client="192.0.2.23", listener=1)

        assert ("matti", "envelope_sender") == identify(config(), sub)

    def test_configured_order_is_respected(self) -> None:
        """With client_address first, the workstation rule wins although the envelope sender matches too."""
        cfg = config("identify:\n  order: [client_address, envelope_sender]\n")
        sub = submission("matti@erp.local", client="192.0.2.23")

        assert ("anna", "client_address") == identify(cfg, sub)

    def test_rules_left_out_are_not_used(self) -> None:
        """A rule not in the order is never tried."""
        cfg = config("identify:\n  order: [header_from]\n")

        assert (None, COMPANY) == identify(cfg, submission("matti@erp.local", listener=1))

    def test_unknown_rejected(self) -> None:
        """With ``unknown: reject`` an unrecognised sender is refused with a permanent 550."""
        cfg = config("identify:\n  unknown: reject\n")

        with pytest.raises(RefusedError) as refused:
            identify(cfg, submission())

        assert 550 == refused.value.code
        assert refused.value.reply.startswith("550 5.7.1 ")
        assert ("matti", "envelope_sender") == identify(cfg, submission("matti@erp.local"))


class TestThroughRelay:
    def test_second_listener_sends_as_its_user(self, upstream: UpstreamFactory, relay_with: RelayFactory) -> None:
        """A program pointed at the user's own port sends as that user; the first port stays the company's."""
        up = upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "pw"})
        relay = relay_with(
            listeners=[{"address": "127.0.0.1", "port": 0}, {"address": "127.0.0.1", "port": 0, "user": "varasto"}],
            upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
            company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
            users={"varasto": {"from_address": "varasto@rakennus.fi", "from_name": "Varasto"}},
        )
        addresses = relay.run(lambda daemon: list(daemon.addresses))
        [company_port, varasto_port] = [port for _host, port in addresses]
        content = b"From: erp@legacy.local\r\nSubject: Tilaus\r\n\r\nOrder.\r\n"

        smtp_send(varasto_port, "erp@legacy.local", ["supplier@example.com"], content)
        [got] = up.wait_for(1)
        smtp_send(company_port, "erp@legacy.local", ["customer@example.com"], content)
        _, company = up.wait_for(2)

        assert 2 == len(addresses) and company_port != varasto_port
        assert "varasto@rakennus.fi" == got.mail_from
        assert "Varasto <varasto@rakennus.fi>" == str(got.message["From"])
        assert ["supplier@example.com"] == got.rcpt_tos
        assert "toimisto@rakennus.fi" == company.mail_from


OS_USERS = """\
  opettaja:
    from_address: opettaja@rakennus.fi
    os_users: [opettaja, 1001]
  vieras:
    from_address: vieras@rakennus.fi
    os_users: ["65534"]
identify:
  order: [os_user, envelope_sender]
"""


class TestOsUser:
    @pytest.mark.parametrize(
        ("os_user", "expected"),
        [
            (OsUser(2000, "opettaja"), "opettaja"),  # by name
            (OsUser(1001, "someone"), "opettaja"),  # by uid
            (OsUser(65534, None), "vieras"),  # a uid without a passwd entry
            (OsUser(3000, "muu"), None),
        ],
    )
    def test_the_socket_owner_identifies_its_user(self, os_user: OsUser, expected: str | None) -> None:
        """The OS user the listener found matches a user's os_users by name or by uid."""
        sub = Submission("erp@legacy.local", ("c@example.com",), b"\r\n", "127.0.0.1", os_user=os_user)

        assert (expected, "os_user" if expected else COMPANY) == identify(config(OS_USERS), sub)

    def test_os_user_first_outranks_a_forged_sender(self) -> None:
        """With os_user first, a program cannot send as another user by writing that user's address."""
        sub = Submission("matti@erp.local", ("c@example.com",), b"\r\n", "127.0.0.1", os_user=OsUser(1001, "x"))

        assert ("opettaja", "os_user") == identify(config(OS_USERS), sub)

    def test_no_os_user_found_matches_nobody(self) -> None:
        """A remote client (or no /proc) has no OS user: the next rule decides."""
        assert ("matti", "envelope_sender") == identify(config(OS_USERS), submission("matti@erp.local"))


def _me() -> tuple[int, str]:
    return os.getuid(), pwd.getpwuid(os.getuid()).pw_name


def _os_user_relay(upstream: UpstreamFactory, relay_with: RelayFactory, order: list[str]) -> tuple[Upstream, RelayRunner]:
    up = upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "pw"})
    relay = relay_with(
        upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
        company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
        users={
            "minä": {"from_address": "mina@rakennus.fi", "os_users": [_me()[0]]},
            "vieras": {"from_address": "vieras@rakennus.fi", "os_users": ["nobody"]},
        },
        identify={"order": order},
    )
    return up, relay


CHILD = """\
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as client:
    client.sendmail("erp@legacy.local", ["c@example.com"], b"From: toimisto@rakennus.fi\\r\\nSubject: x\\r\\n\\r\\nx\\r\\n")
"""


@pytest.mark.skipif(not osuser.available(), reason="the os_user rule needs Linux's /proc/net/tcp")
class TestOsUserThroughRelay:
    def test_the_sending_process_user_gets_their_settings(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """The test process connects as itself: relay finds its uid and sends as the user mapped to it,
        although the message's From names the company."""
        up, relay = _os_user_relay(upstream, relay_with, ["os_user", "header_from"])
        content = b"From: toimisto@rakennus.fi\r\nSubject: Raportti\r\n\r\nx\r\n"

        smtp_send(relay.port, "toimisto@rakennus.fi", ["c@example.com"], content)
        [got] = up.wait_for(1)

        assert "mina@rakennus.fi" == got.mail_from

    def test_another_local_user_gets_theirs(self, upstream: UpstreamFactory, relay_with: RelayFactory) -> None:
        """A process running as OS user nobody sends as the user mapped to nobody (needs root to start it)."""
        if os.getuid() != 0:
            pytest.skip("starting a process as another OS user (nobody) needs root")
        python = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
        if python is None or subprocess.run([python, "-c", ""], user="nobody", cwd="/", check=False).returncode:
            pytest.skip("no python3 that OS user nobody may run (outside root's home)")
        up, relay = _os_user_relay(upstream, relay_with, ["os_user", "header_from"])

        subprocess.run([python, "-c", CHILD, str(relay.port)], user="nobody", cwd="/", check=True, timeout=60)
        [got] = up.wait_for(1)

        assert "vieras@rakennus.fi" == got.mail_from

    @pytest.mark.parametrize(("order", "lookups"), [(["os_user"], 1), (["envelope_sender", "listener"], 0)])
    def test_looked_up_once_per_session_and_only_when_configured(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, monkeypatch: pytest.MonkeyPatch,
        order: list[str], lookups: int,
    ) -> None:  # fmt: skip
        """Two messages on one connection read the socket table once; without the rule, never."""
        calls: list[tuple[str, int]] = []
        real = osuser.os_user

        def counted(client: tuple[str, int], server: tuple[str, int]) -> OsUser | None:
            calls.append(client)
            return real(client, server)

        monkeypatch.setattr(osuser, "os_user", counted)
        up, relay = _os_user_relay(upstream, relay_with, order)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            for n in range(2):
                client.sendmail("erp@legacy.local", ["c@example.com"], b"Subject: %d\r\n\r\nx\r\n" % n)
        got = up.wait_for(2)

        assert lookups == len(calls)
        assert {"mina@rakennus.fi" if lookups else "toimisto@rakennus.fi"} == {g.mail_from for g in got}
