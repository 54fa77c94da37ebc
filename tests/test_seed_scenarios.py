"""The seeds' scenarios, end to end: legacy client -> relay -> provider-like TLS+AUTH upstreams.

Each test is one situation from the ERP help pages in ``shared/seeds``: the Finnish company whose ISP
relay was retired, its users with their own settings, signatures and default recipients, the cloud
edition where the user code is the address, 8-bit mail from an old program, and SMS via a gateway.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import UpstreamFactory, smtp_send
from tests.servers import RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]

EIGHT_LINE_SIGNATURE = """Ystävällisin terveisin / Best regards
Pekka Päällikkö
Toimitusjohtaja
Rakennus Oy
Työmaatie 1
00100 Helsinki
puh. +358 40 123 4567
www.rakennus.fi"""


@pytest.fixture
def office365(upstream: UpstreamFactory) -> Upstream:
    """A provider that checks the sender like Office 365 does (SendAsDenied)."""
    up = upstream("o365", security="starttls", accounts={
        "toimisto@rakennus.fi": "company-pw", "pekka@rakennus.fi": "pekka-pw", "tekstiviesti@rakennus.fi": "sms-pw",
    })  # fmt: skip
    up.faults.require_sender_is_login = True
    return up


@pytest.fixture
def relay(office365: Upstream, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path) -> RelayRunner:
    pekka_secret = str(upstream.secret("pekka", "pekka-pw"))
    sms_secret = upstream.secret("sms-service", "palvelu-salasana")
    return relay_with(
        upstreams={
            "o365": upstream.account(office365, "toimisto@rakennus.fi"),
            "sms-account": upstream.account(office365, "tekstiviesti@rakennus.fi"),
        },
        company={"from_address": "toimisto@rakennus.fi", "from_name": "Rakennus Oy", "upstream": "o365",
                 "signature": "--\nRakennus Oy"},
        users={
            # Käyttäjäkohtaiset asetukset: own mailbox and login on the company's server,
            # eight signature lines, and a default recipient (Vakio vastaanottaja)
            "pekka": {"addresses": ["pekka@erp.local"], "from_address": "pekka@rakennus.fi",
                      "from_name": "Pekka Päällikkö", "signature": EIGHT_LINE_SIGNATURE,
                      "copy_to": "arkisto@rakennus.fi; pekka.kopio@rakennus.fi",
                      "upstream": {"username": "pekka@rakennus.fi", "password_file": pekka_secret}},
            # maestro*CLOUD: the user code is the address
            "anna.virtanen@rakennus.fi": {"addresses": ["anna.virtanen@rakennus.fi"]},
        },
        sms={"domain": "sms", "gateway": "{number}@smsmail.labyrintti.com", "number_in": "address",
             "password_in": "subject", "password_file": str(sms_secret), "upstream": "sms-account",
             "from_address": "tekstiviesti@rakennus.fi"},
    )  # fmt: skip


class TestFinnishCompany:
    def test_user_with_own_login_eight_line_signature_and_default_recipients(
        self, relay: RelayRunner, office365: Upstream
    ) -> None:
        """Pekka's mail goes out through his own login, signed with all 8 lines, copied to both defaults."""
        smtp_send(relay.port, "pekka@erp.local", ["asiakas@example.com"],
                  b"From: pekka@erp.local\r\nTo: asiakas@example.com\r\nSubject: Tarjous\r\n\r\nLiitteena tarjous.\r\n")  # fmt: skip
        [got] = office365.wait_for(1)

        assert got.login == "pekka@rakennus.fi"
        assert got.mail_from == "pekka@rakennus.fi"
        assert got.rcpt_tos == ["asiakas@example.com", "arkisto@rakennus.fi", "pekka.kopio@rakennus.fi"]
        assert str(got.message["From"]) == "Pekka Päällikkö <pekka@rakennus.fi>"
        assert str(got.message["To"]) == "asiakas@example.com"
        assert got.message["Cc"] is None and got.message["Bcc"] is None
        text = got.message.get_content().replace("\r\n", "\n")
        assert text.startswith("Liitteena tarjous.")
        assert text.count("Toimitusjohtaja") == 1
        assert all(line in text for line in EIGHT_LINE_SIGNATURE.splitlines())

    def test_unknown_sender_falls_back_to_company_settings(self, relay: RelayRunner, office365: Upstream) -> None:
        """Anyone else sends as the company mailbox with the company signature (Yrityksen email)."""
        smtp_send(relay.port, "ajo@erp.local", ["asiakas@example.com"], b"Subject: Lasku\r\n\r\nLasku 77\r\n")
        [got] = office365.wait_for(1)

        assert (got.login, got.mail_from) == ("toimisto@rakennus.fi", "toimisto@rakennus.fi")
        assert str(got.message["From"]) == "Rakennus Oy <toimisto@rakennus.fi>"
        assert got.message.get_content().replace("\r\n", "\n").rstrip().endswith("--\nRakennus Oy")


class TestCloudEdition:
    def test_user_code_is_the_address(self, relay: RelayRunner, office365: Upstream) -> None:
        """maestro*CLOUD: the user is found by the address itself and sends as it; From keeps the name."""
        smtp_send(relay.port, "Anna.Virtanen@rakennus.fi", ["asiakas@example.com"],
                  b"From: Anna Virtanen <Anna.Virtanen@rakennus.fi>\r\nSubject: Hei\r\n\r\nHei!\r\n")  # fmt: skip
        [got] = office365.wait_for(1)

        # from_address not set for the user: the company's mailbox is the sender the provider accepts
        assert got.mail_from == "toimisto@rakennus.fi"
        assert str(got.message["From"]) == "Rakennus Oy <toimisto@rakennus.fi>"
        assert str(got.message["Reply-To"]) == "Anna Virtanen <Anna.Virtanen@rakennus.fi>"


class TestLegacyEightBit:
    def test_latin1_message_without_mime_headers_reads_correctly(self, relay: RelayRunner, office365: Upstream) -> None:
        """Raw Latin-1 bytes with no MIME headers arrive as a valid message the recipient reads as ä, ö."""
        raw = "Subject: Tilausvahvistus nro 5\r\n\r\nHyvää päivää, tilauksenne on vastaanotettu. Kiitos ja näkemiin!\r\n"
        smtp_send(relay.port, "ajo@erp.local", ["asiakas@example.com"], raw.encode("latin-1"))
        [got] = office365.wait_for(1)

        message = got.message
        assert message["MIME-Version"] == "1.0"
        assert "Hyvää päivää, tilauksenne on vastaanotettu. Kiitos ja näkemiin!" in message.get_content()
        assert message["Subject"] == "Tilausvahvistus nro 5"
        assert message.defects == []


class TestSms:
    def test_phone_number_recipient_goes_to_the_gateway_through_the_sms_account(
        self, relay: RelayRunner, office365: Upstream
    ) -> None:
        """Mail to a phone number becomes gateway mail via the SMS account, password in the Subject;
        the other recipient still gets the normal mail through the company account."""
        smtp_send(relay.port, "ajo@erp.local", ["040 765 4321@sms", "asiakas@example.com"],
                  b"Subject: Muistutus\r\n\r\nTyomaakokous huomenna klo 8.\r\n")  # fmt: skip
        office365.wait_for(2)

        by_login = {r.login: r for r in office365.received}
        sms = by_login["tekstiviesti@rakennus.fi"]
        mail = by_login["toimisto@rakennus.fi"]
        assert sms.rcpt_tos == ["+358407654321@smsmail.labyrintti.com"]
        assert sms.mail_from == "tekstiviesti@rakennus.fi"
        assert "palvelu-salasana" in str(sms.message["Subject"])
        assert sms.message.get_content_type() == "text/plain"
        assert "Tyomaakokous huomenna klo 8." in sms.message.get_content()
        assert mail.rcpt_tos == ["asiakas@example.com"]

    def test_invalid_phone_number_is_refused_with_550_at_rcpt(self, relay: RelayRunner, office365: Upstream) -> None:
        """A number that cannot be a phone number is refused at once; the rest of the message still goes."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("ajo@erp.local")
            bad_code, bad_text = client.rcpt("12@sms")
            good_code, _ = client.rcpt("asiakas@example.com")
            code, _ = client.data(b"Subject: x\r\n\r\ny\r\n")
        [got] = office365.wait_for(1)

        assert (550, 250, 250) == (bad_code, good_code, code)
        assert b"12" in bad_text
        assert ["asiakas@example.com"] == got.rcpt_tos

    @pytest.mark.parametrize(
        "listed",
        ["asiakas@example.com; +358407654321@sms", "asiakas@example.com;0407654321@sms",
         "+358407654321@sms; asiakas@example.com", "asiakas@example.com; 040 765 4321@sms",
         "asiakas@example.com; (040) 765-4321@sms", "asiakas@example.com, +358 (0)40 765 4321@sms"],
    )  # fmt: skip
    def test_phone_number_inside_a_semicolon_list_is_sent_as_sms(
        self, relay: RelayRunner, office365: Upstream, listed: str
    ) -> None:
        """The seeds' programs put the whole recipient field in one RCPT: a number inside the list is
        an SMS like a number on its own (issue 12), and the mail still goes to the address."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            client.mail("ajo@erp.local")
            code, text = client.docmd(f"RCPT TO:<{listed}>")  # as typed: smtplib.rcpt would cut the list
            assert 250 == code, text
            code, text = client.data(b"Subject: Muistutus\r\n\r\nTyomaakokous huomenna klo 8.\r\n")
            assert 250 == code, text
        office365.wait_for(2)

        by_login = {r.login: r for r in office365.received}
        assert ["+358407654321@smsmail.labyrintti.com"] == by_login["tekstiviesti@rakennus.fi"].rcpt_tos
        assert ["asiakas@example.com"] == by_login["toimisto@rakennus.fi"].rcpt_tos
