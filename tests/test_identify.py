"""Who is sending (``relay.identify``): envelope sender, From header, client address, listener, in the configured order."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay.config import Config, parse_config
from relay.envelope import Submission
from relay.errors import RefusedError
from relay.identify import COMPANY, header_from_addresses, identify
from tests.conftest import UpstreamFactory, smtp_send
from tests.servers import RelayRunner

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
