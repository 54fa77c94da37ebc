"""The Microsoft Graph transport against a real HTTPS sendMail server and token endpoint (trustme TLS)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.envelope import Account
from relay.transports.graph import GRAPH_MAX_REQUEST, GraphTransport, for_graph, request_size
from relay.transports.tokens import TokenCache
from tests.oauth_servers import GraphServer, TokenServer, graph_error, run_closing
from tests.transports.test_tokens import account, oauth2_block

MAILBOX = "yritys@yritys.fi"
MESSAGE = (b"From: Yritys <yritys@yritys.fi>\r\nTo: Asiakas <asiakas@example.com>\r\nCc: muu@example.com\r\n"
           b"Subject: lasku\r\n\r\nLasku liitteena.\r\n")  # fmt: skip


@pytest.fixture
def tokens(token_server: Callable[..., TokenServer]) -> TokenServer:
    server = token_server(lifetime=3600, roles=("Mail.Send",))
    server.clients["app-1"] = "s3cr3t-value"
    return server


@pytest.fixture
def graph(graph_server: Callable[..., GraphServer], tokens: TokenServer) -> GraphServer:
    return graph_server(tokens.valid)


def graph_account(graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path,
                  mailbox: str = MAILBOX) -> Account:  # fmt: skip
    return account(ca_file, oauth2_block(tokens, secret), type="graph", port=graph.port, username=mailbox)


def send(transport: GraphTransport, acct: Account, recipients: list[str], body: bytes = MESSAGE) -> Any:
    return run_closing(transport.tokens, transport.send(acct, MAILBOX, recipients, body, deadline=20))


class TestMessageForGraph:
    def test_envelope_only_recipients_become_bcc(self) -> None:
        """Graph sends to the headers: a bcc copy (copy_to, the ERP's Bcc) must be in a Bcc header."""
        out = for_graph(MESSAGE, ["asiakas@example.com", "muu@example.com", "arkisto@yritys.fi"])

        assert b"Bcc: arkisto@yritys.fi\r\n" in out
        assert out.startswith(b"From: Yritys <yritys@yritys.fi>\r\nTo: Asiakas <asiakas@example.com>\r\n")
        assert out.endswith(b"\r\n\r\nLasku liitteena.\r\n")

    def test_header_recipients_not_in_this_attempt_are_left_out(self) -> None:
        """A To/Cc address not among the recipients (delivered before, redirect_all) must not get it again."""
        out = for_graph(MESSAGE, ["muu@example.com"])

        assert b"asiakas@example.com" not in out
        assert b"Cc: muu@example.com" in out and b"Bcc" not in out

    def test_an_idn_recipient_is_matched_to_its_a_label_in_the_header(self) -> None:
        """The rewrite writes ``info@yhtiö.fi`` in To as its A-label and the envelope keeps the U-label: they
        are one recipient (was: taken out of To and added again as a raw UTF-8 Bcc); an envelope-only one
        goes in the Bcc as its A-label, 7-bit like the rest of the header."""
        message = b"From: yritys@yritys.fi\r\nTo: Yhtio <info@xn--yhti-8qa.fi>, a@example.com\r\n\r\nx\r\n"

        out = for_graph(message, ["info@yhti\u00f6.fi", "a@example.com", "arkisto@m\u00fcller.de"])

        assert b"To: Yhtio <info@xn--yhti-8qa.fi>, a@example.com\r\n" in out
        assert b"Bcc: arkisto@xn--mller-kva.de\r\n" in out and out.isascii()
        assert b"To: a@example.com\r\n" in for_graph(message, ["a@example.com"])  # left out: this time not for them

    def test_request_size_is_the_base64_of_the_message(self) -> None:
        assert request_size(3 * 1024 * 1024) > 4 * 1024 * 1024 > request_size(3 * 1024 * 1024 - 16 * 1024)


    def test_request_size_has_room_for_a_bcc_of_every_recipient(self) -> None:
        """A thousand envelope-only recipients become a 50 KB Bcc header: the estimate at submission must cover
        it, or the message passes the 552 there and bounces at delivery."""
        recipients = [f"vastaanottaja.{n:04}@asiakasyritys.example.com" for n in range(1000)]
        content = MESSAGE + b"x" * (3 * 1024 * 1024 - 16 * 1024) + b"\r\n"

        sent = len(base64.b64encode(for_graph(content, recipients)))

        assert sent <= request_size(len(content), recipients)
        assert request_size(len(content)) <= GRAPH_MAX_REQUEST < sent

class TestGraphTransport:
    def test_202_is_delivered_with_the_mime_message(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """POST /v1.0/users/{mailbox}/sendMail, base64 MIME, text/plain: 202 means delivered to everyone."""
        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file),
                       ["asiakas@example.com", "muu@example.com"])  # fmt: skip

        [mail] = graph.received
        assert ("delivered", 250) == (outcome.result, outcome.reply[0])
        assert MAILBOX == mail.mailbox
        assert "lasku" == mail.message["Subject"]

    @pytest.mark.parametrize("fault", ["too slow", "dropped"])
    def test_a_send_left_unanswered_is_deferred_with_a_warning_of_a_second_copy(
        self, graph_server: Callable[..., GraphServer], tokens: TokenServer, secret: Callable[[str, str], Path],
        ca_file: Path, fault: str,
    ) -> None:  # fmt: skip
        """Graph sent the message but its answer never came (later than the account's timeout, or the connection
        closed after the request): relay cannot tell, so the mail waits and goes again, and the log says why
        the recipient may get two copies, as Postfix's "message may be sent more than once" does."""
        graph = graph_server(tokens.valid, delay=3.5 if fault == "too slow" else 0.0)
        graph.unanswered = fault == "dropped"
        acct = account(ca_file, oauth2_block(tokens, secret), type="graph", port=graph.port, username=MAILBOX, timeout=2)

        first = send(GraphTransport(TokenCache()), acct, ["asiakas@example.com"])
        graph.delay = 0.0
        second = send(GraphTransport(TokenCache()), acct, ["asiakas@example.com"])

        assert ("deferred", "delivered") == (first.result, second.result)
        assert ("timed out" if fault == "too slow" else "the connection failed") in first.error
        assert first.error.endswith("after the whole request was sent: if it took the message, the next attempt sends it twice")
        deadline = time.monotonic() + 5  # the slow answer's server thread records the mail after its delay
        while len(graph.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 2 == len(graph.received)

    def test_invalid_recipients_bounce_with_graphs_reason(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """400 ErrorInvalidRecipients is permanent: bounced with Graph's words, not retried."""
        graph.faults.add(MAILBOX, 400, graph_error("ErrorInvalidRecipients", "At least one recipient is not valid."))

        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file), ["x@example.com"])

        assert "bounced" == outcome.result
        code, text = outcome.bounced["x@example.com"]
        assert 550 == code and "ErrorInvalidRecipients" in text and "not valid" in text

    @pytest.mark.parametrize(("status", "result"), [
        (200, "delivered"), (201, "delivered"), (408, "deferred"), (409, "deferred"), (423, "deferred"),
        (499, "deferred"), (415, "bounced"), (422, "bounced"),
    ])  # fmt: skip
    def test_only_a_known_refusal_bounces(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path,
        status: int, result: str,
    ) -> None:  # fmt: skip
        """A timeout, a conflict, a locked mailbox, an unknown status: the mail waits; any 2xx is delivered."""
        graph.faults.add(MAILBOX, status, graph_error("SomeCode", "words"))

        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file), ["x@example.com"])

        assert result == outcome.result
        assert str(status) in outcome.reply[1]

    def test_send_as_denied_bounces_though_it_comes_with_403(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """Graph's code decides before the status: a sender the mailbox may not use is the message's fault."""
        graph.faults.add(MAILBOX, 403, graph_error("ErrorSendAsDenied", "The user account which was used to submit "
                         "this request does not have the right to send mail on behalf of the specified sending account."))

        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file), ["x@example.com"])

        assert ("bounced", 554) == (outcome.result, outcome.reply[0])
        assert outcome.reply[1].startswith("5.7.1 Microsoft Graph 403 ErrorSendAsDenied")
        assert outcome.advice is not None and "from_address" in outcome.advice

    def test_503_defers(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """A Graph outage keeps the mail queued."""
        graph.faults.add(MAILBOX, 503, graph_error("ServiceUnavailable", "Service is unavailable."))

        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file), ["x@example.com"])

        assert ("deferred", True) == (outcome.result, outcome.session_failed)
        assert [] == graph.received

    def test_access_denied_defers_with_advice(
        self, graph_server: Callable[..., GraphServer], token_server: Callable[..., TokenServer],
        secret: Callable[[str, str], Path], ca_file: Path,
    ) -> None:  # fmt: skip
        """A token without Mail.Send: 403 is the app's setup, not the message's; the mail waits for the admin."""
        tokens = token_server(roles=("SMTP.SendAsApp",))
        tokens.clients["app-1"] = "s3cr3t-value"
        graph = graph_server(tokens.valid)

        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file), ["x@example.com"])

        assert "deferred" == outcome.result
        assert "ErrorAccessDenied" in outcome.reply[1]
        assert outcome.advice is not None and "Mail.Send" in outcome.advice

    def test_a_refused_cached_token_is_replaced_once(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """401 with a cached token (revoked early): one more try with a fresh token, which is delivered."""
        cache = TokenCache()
        acct = graph_account(graph, tokens, secret, ca_file)
        transport = GraphTransport(cache)
        send(transport, acct, ["a@example.com"])
        tokens.issued.clear()  # every token issued so far is revoked

        outcome = send(transport, acct, ["b@example.com"])

        assert "delivered" == outcome.result
        assert ["client_credentials", "client_credentials"] == tokens.grants
        assert [401] == [status for _, _, status in graph.requests if status != 202]

    def test_a_permission_granted_since_the_token_was_issued_is_used_at_the_next_try(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """403 ErrorAccessDenied (no Mail.Send yet) defers; the admin grants it; the next try, still holding the
        old token (valid for an hour), fetches a fresh one that carries the permission, and is delivered."""
        tokens.roles = ()
        transport = GraphTransport(TokenCache())
        acct = graph_account(graph, tokens, secret, ca_file)
        before = send(transport, acct, ["a@example.com"])
        tokens.roles = ("Mail.Send",)  # granted, with admin consent

        after = send(transport, acct, ["a@example.com"])

        assert ("deferred", 451, "delivered") == (before.result, before.reply[0], after.result)
        assert [403, 403, 202] == [status for _, _, status in graph.requests]
        assert ["client_credentials"] * 2 == tokens.grants

    def test_requests_waiting_for_a_slot_do_not_go_after_a_429(
        self, graph_server: Callable[..., GraphServer], tokens: TokenServer, secret: Callable[[str, str], Path],
        ca_file: Path,
    ) -> None:  # fmt: skip
        """Ten at once, four slots: one of the first four gets 429; the six still waiting for a slot wait for
        the Retry-After instead of asking a mailbox that has just said to stop."""
        graph = graph_server(tokens.valid, delay=0.2)
        graph.faults.add(MAILBOX, 429, graph_error("ApplicationThrottled", "Too many requests"), **{"Retry-After": "5"})
        transport = GraphTransport(TokenCache())
        acct = graph_account(graph, tokens, secret, ca_file)

        async def many() -> list[Any]:
            return await asyncio.gather(
                *(transport.send(acct, MAILBOX, [f"r{n}@example.com"], MESSAGE, deadline=20) for n in range(10))
            )

        outcomes = run_closing(transport.tokens, many())

        assert 4 == len(graph.requests)
        assert (3, 7) == (sum(o.result == "delivered" for o in outcomes), sum(o.result == "deferred" for o in outcomes))
        waited = [o for o in outcomes if o.result == "deferred"]
        assert all(o.retry_after is not None and 4 <= o.retry_after <= 5 for o in waited)
        assert not any(o.session_failed for o in waited)  # throttled is not down: no upstream_down alarm

    def test_429_pauses_that_mailbox_only_for_retry_after(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """After 429 + Retry-After: 1, the throttled mailbox is not asked again for a second; another is."""
        graph.faults.add(MAILBOX, 429, graph_error("ApplicationThrottled", "Too many requests"), **{"Retry-After": "1"})
        transport = GraphTransport(TokenCache())
        throttled = graph_account(graph, tokens, secret, ca_file)
        other = graph_account(graph, tokens, secret, ca_file, mailbox="toinen@yritys.fi")

        first = send(transport, throttled, ["x@example.com"])
        paused = send(transport, throttled, ["x@example.com"])
        meanwhile = send(transport, other, ["x@example.com"])
        time.sleep(1.0)
        after = send(transport, throttled, ["x@example.com"])

        assert ("deferred", "deferred", "delivered", "delivered") == tuple(
            o.result for o in (first, paused, meanwhile, after)
        )
        assert "retry after 1 s" in (first.error or "")
        assert [429, 202, 202] == [status for _, _, status in graph.requests]  # the paused try asked nothing

    @pytest.mark.parametrize(("header", "pause"), [("inf", 30), ("nan", 30), ("1e9", 3600)])
    def test_an_odd_retry_after_is_bounded_not_a_crash(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path,
        header: str, pause: int,
    ) -> None:  # fmt: skip
        """``inf`` once crashed the next attempt (mail held); ``1e9`` outlived the queue (a bounce): both bounded."""
        graph.faults.add(MAILBOX, 429, graph_error("ApplicationThrottled", "slow down"), **{"Retry-After": header})
        transport = GraphTransport(TokenCache())
        acct = graph_account(graph, tokens, secret, ca_file)

        first = send(transport, acct, ["x@example.com"])
        second = send(transport, acct, ["x@example.com"])

        assert f"retry after {pause} s" in (first.error or "")
        assert ("deferred", 451) == (second.result, second.reply[0])
        assert f"next try in {pause} s" in second.reply[1]

    def test_one_connection_serves_a_stream_of_messages(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """Twenty messages one after another: one TLS connection to Graph and one to the token endpoint
        (kept alive), not a handshake per message."""
        transport = GraphTransport(TokenCache())
        acct = graph_account(graph, tokens, secret, ca_file)

        async def stream() -> list[Any]:
            return [await transport.send(acct, MAILBOX, [f"r{n}@example.com"], MESSAGE, deadline=20) for n in range(20)]

        outcomes = run_closing(transport.tokens, stream())

        assert ["delivered"] * 20 == [o.result for o in outcomes]
        assert (1, 1) == (graph.connections, tokens.connections)

    def test_at_most_four_requests_at_once_per_mailbox(
        self, graph_server: Callable[..., GraphServer], tokens: TokenServer, secret: Callable[[str, str], Path],
        ca_file: Path,
    ) -> None:  # fmt: skip
        """Ten deliveries at once for one mailbox: Graph never sees more than 4 (it would answer 429)."""
        graph = graph_server(tokens.valid, delay=0.1)
        transport = GraphTransport(TokenCache())
        acct = graph_account(graph, tokens, secret, ca_file)

        async def many() -> list[Any]:
            return await asyncio.gather(
                *(transport.send(acct, MAILBOX, [f"r{n}@example.com"], MESSAGE, deadline=20) for n in range(10))
            )

        outcomes = run_closing(transport.tokens, many())

        assert ["delivered"] * 10 == [o.result for o in outcomes]
        assert 4 == graph.max_active[MAILBOX]

    def test_too_big_for_sendmail_without_mail_readwrite_waits_with_advice(
        self, graph: GraphServer, tokens: TokenServer, secret: Callable[[str, str], Path], ca_file: Path
    ) -> None:
        """Queued before the account became Graph, a 5 MB message needs the draft route, whose permission the
        token lacks: it waits for the admin (advice names Mail.ReadWrite), Graph is not asked, nothing bounces."""
        body = MESSAGE + b"x" * (5 * 1024 * 1024) + b"\r\n"

        outcome = send(GraphTransport(TokenCache()), graph_account(graph, tokens, secret, ca_file), ["x@example.com"], body)

        assert ("deferred", 451) == (outcome.result, outcome.reply[0])
        assert outcome.advice is not None and "Mail.ReadWrite" in outcome.advice
        assert [] == graph.requests
