"""Stage 6, second transport: one delivery attempt through Microsoft Graph ``sendMail`` (httpx).

Input: an ``Account`` with ``transport == "graph"``, the envelope and the body. Output: the same
``Outcome`` as the SMTP transport, so the scheduler does not learn what an HTTP status is.

The message goes as MIME: ``POST /v1.0/users/{mailbox}/sendMail``, base64, ``Content-Type:
text/plain``, with an OAuth2 bearer token (app permission ``Mail.Send``). Graph takes the recipients
from the headers, not from an envelope, so the message it is given names exactly the recipients this
attempt is for: envelope-only ones (bcc copies, ``copy_to``) are added as ``Bcc``, and a To/Cc
address that is not among them (already delivered, or ``redirect_all``) is left out of To/Cc.

- ``2xx``: delivered (Graph answers ``202``).
- a refusal of the message itself: bounced with the reason. Graph's error code decides first
  (``ErrorInvalidRecipients``, ``ErrorSendAsDenied`` (sent with ``403``), ``ErrorMessageSizeExceeded``),
  then the status (``400``, ``413``, ``415``, ``422``).
- ``429``: deferred; this mailbox waits for ``Retry-After`` (other accounts do not).
- ``401``/``403``/``404`` (token, permission, mailbox): deferred with advice; the admin fixes the app.
- everything else (``5xx``, ``408``, ``409``, ``423``, cannot connect, timeout, no token): deferred;
  a temporary problem must never bounce, and a status relay does not know is treated as temporary.

At most ``GRAPH_CONCURRENCY`` requests run at once per mailbox (Graph's limit); a request over 4 MB
is refused by Graph, so ``pipeline.py`` refuses such a message at submission (552, before the 250).
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formataddr, getaddresses
from pathlib import Path
from urllib.parse import quote

import httpx

from relay.envelope import Account
from relay.errors import TokenError
from relay.transports.smtp import Outcome, Reply, advice
from relay.transports.tokens import TokenCache, http_failure, json_body, retry_after_seconds

GRAPH_CONCURRENCY = 4
GRAPH_MAX_REQUEST = 4 * 1024 * 1024  # bytes of the request body (the base64 MIME)
DEFAULT_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 3600.0  # a longer pause would run into max_queue_lifetime and turn throttling into a bounce
_SPARE = 8 * 1024  # room for To/Cc rewritten by for_graph, beside the Bcc header's addresses


def request_size(message_size: int, recipients: Sequence[str] = ()) -> int:
    """At most how big the sendMail request for a message of ``message_size`` bytes will be (base64).

    ``for_graph`` may name every recipient in a Bcc header: a list of a thousand addresses is tens of
    KB, so a fixed margin would let such a message past the 552 at submission and bounce it later.
    """
    bcc = len("Bcc: \r\n") + sum(len(r.encode()) + 2 for r in recipients)
    return 4 * math.ceil((message_size + _SPARE + bcc) / 3)


def fits(message_size: int, recipients: Sequence[str] = ()) -> bool:
    return request_size(message_size, recipients) <= GRAPH_MAX_REQUEST


# region #### the message Graph is given ####


def _split_fields(head: bytes) -> list[bytes]:
    """Header fields, each with its folded continuation lines."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def for_graph(content: bytes, recipients: list[str]) -> bytes:
    """The message with To/Cc/Bcc naming exactly ``recipients`` (Graph sends to the headers)."""
    head, _, body = content.partition(b"\r\n\r\n")
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    pending = {r.lower() for r in recipients}
    listed: dict[str, list[tuple[str, str]]] = {
        name: getaddresses([str(v) for v in parsed.get_all(name, [])]) for name in ("To", "Cc")
    }
    shown = {addr.lower() for pairs in listed.values() for _, addr in pairs}
    fields = [f for f in _split_fields(head) if _name(f) != b"bcc"]
    if not shown <= pending:  # someone in To/Cc must not get it this time: name only who must
        fields = [f for f in fields if _name(f) not in (b"to", b"cc")]
        for name, pairs in listed.items():
            kept = [formataddr(p) for p in pairs if p[1].lower() in pending]
            if kept:
                fields.append(f"{name}: {', '.join(kept)}".encode())
    hidden = [r for r in recipients if r.lower() not in shown]
    if hidden:
        fields.append(f"Bcc: {', '.join(hidden)}".encode())
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


# endregion


def _defer_all(outcome: Outcome, recipients: list[str], reply: Reply, error: str) -> Outcome:
    """Nothing was decided for anyone (throttled, unreachable, no token): everyone waits for a retry."""
    outcome.deferred.update({r: reply for r in recipients})
    outcome.error, outcome.reply, outcome.session_failed = error, reply, True
    return outcome


def _graph_error(response: httpx.Response) -> tuple[str, str]:
    """Graph's ``{"error": {"code": ..., "message": ...}}``: the code and the message's first line."""
    error = json_body(response).get("error")
    if not isinstance(error, dict):
        return "", ""
    lines = str(error.get("message") or "").splitlines()
    return str(error.get("code") or ""), lines[0] if lines else ""


def _retry_after(response: httpx.Response) -> float:
    """Graph's pause in seconds, within reason: ``inf``/``nan`` or a date would stall the mailbox for good."""
    seconds = retry_after_seconds(response.headers.get("Retry-After"))
    return DEFAULT_RETRY_AFTER if seconds is None else min(seconds, MAX_RETRY_AFTER)


_ADVICE = {
    401: "Graph refused the token: check that the app registration has the Mail.Send application permission "
         "with admin consent and that oauth2.scope (if set) is https://graph.microsoft.com/.default",
    403: "Graph denies the app this mailbox: grant Mail.Send (Application) with admin consent, and check any "
         "application access policy (New-ApplicationAccessPolicy) that limits the app to some mailboxes",
    404: "Graph does not know this mailbox: set username to the mailbox's address (user principal name)",
}  # fmt: skip


# Refusals that are about the message itself, so a retry would get the same answer: only these bounce.
# Graph's error code decides before the HTTP status: ErrorSendAsDenied comes with 403, like a missing
# permission, but the admin fixes the sender (from_address), not the app, and the mail cannot wait.
_REFUSED_CODES = frozenset({"ErrorInvalidRecipients", "ErrorSendAsDenied", "ErrorMessageSizeExceeded"})
_REFUSED_STATUSES = frozenset({400, 413, 415, 422})  # bad request, too big, wrong type, unprocessable


class GraphTransport:
    """Graph delivery with per-mailbox state: at most 4 requests at once, a Retry-After pause."""

    def __init__(self, tokens: TokenCache) -> None:
        self.tokens = tokens
        self._slots: dict[tuple[str, int, str], asyncio.Semaphore] = {}
        self._paused: dict[tuple[str, int, str], float] = {}  # mailbox -> time.monotonic() to wait for

    async def send(
        self, account: Account, mail_from: str, recipients: list[str], body: bytes | Path, *, deadline: float | None
    ) -> Outcome:  # fmt: skip
        """One attempt; never raises for a delivery problem (they are in the ``Outcome``)."""
        outcome = Outcome()
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline or account.timeout * 4):
                await self._attempt(account, recipients, body, outcome)
        except TimeoutError:
            _defer_all(outcome, recipients, (None, ""), "delivery attempt exceeded its deadline")
        except TokenError as exc:
            _defer_all(outcome, recipients, (None, exc.reply_text), f"OAuth2 token: {exc}")
        except httpx.HTTPError as exc:
            _defer_all(outcome, recipients, (None, ""), f"Microsoft Graph unreachable: {http_failure(exc)}")
        except OSError as exc:  # the ca_file
            _defer_all(outcome, recipients, (None, ""), f"cannot read {exc.filename}: {exc.strerror} (check ca_file)")
        outcome.duration = time.monotonic() - started
        return outcome

    def _key(self, account: Account) -> tuple[str, int, str]:
        return account.host.lower(), account.port, (account.username or "").lower()

    def _still_paused(self, key: tuple[str, int, str], recipients: list[str], outcome: Outcome) -> bool:
        """Within a 429's Retry-After: the mailbox is not asked, the mail waits until the pause ends."""
        wait = self._paused.get(key, 0.0) - time.monotonic()
        if wait <= 0:
            return False
        reply = (451, f"4.7.0 Microsoft Graph throttles this mailbox: next try in {math.ceil(wait)} s")
        _defer_all(outcome, recipients, reply, "throttled by Microsoft Graph (429)")
        outcome.retry_after, outcome.session_failed = wait, False  # slowed down, not down
        return True

    async def _attempt(self, account: Account, recipients: list[str], body: bytes | Path, outcome: Outcome) -> None:
        key = self._key(account)
        if self._still_paused(key, recipients, outcome):
            return
        content = body if isinstance(body, bytes) else await asyncio.to_thread(body.read_bytes)
        payload = base64.b64encode(for_graph(content, recipients))
        if len(payload) > GRAPH_MAX_REQUEST:
            reply = (552, f"5.3.4 Message too big for Microsoft Graph ({len(payload)} bytes encoded, at most 4 MB)")
            outcome.bounced.update({r: reply for r in recipients})
            outcome.error, outcome.reply = "message too big for Microsoft Graph", reply
            return
        async with self._slots.setdefault(key, asyncio.Semaphore(GRAPH_CONCURRENCY)):
            if self._still_paused(key, recipients, outcome):  # a 429 came while this one waited for a slot
                return
            response = await self._post_with_retry(account, payload)
            self._classify(account, key, response, recipients, outcome)  # a 429 pauses before the slot is free

    async def _post_with_retry(self, account: Account, payload: bytes) -> httpx.Response:
        """POST with the cached token; refused with a cached token, once more with a fresh one: 401 (revoked
        early) or 403 other than SendAs (a permission granted since the token was issued; a token carries
        the permissions of its issue time, for up to an hour)."""
        token, fresh = await self.tokens.token(account)
        response = await self._post(account, payload, token.reveal())
        refused = response.status_code == 401 or (
            response.status_code == 403 and _graph_error(response)[0] not in _REFUSED_CODES
        )
        if refused and not fresh:
            self.tokens.drop(account, token)
            token, _ = await self.tokens.token(account)
            response = await self._post(account, payload, token.reveal())
        return response

    async def _post(self, account: Account, payload: bytes, token: str) -> httpx.Response:
        url = f"https://{account.host}:{account.port}/v1.0/users/{quote(account.username or '', safe='@')}/sendMail"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}
        return await self.tokens.http.get(account).post(url, content=payload, headers=headers)

    def _classify(
        self, account: Account, key: tuple[str, int, str], response: httpx.Response, recipients: list[str],
        outcome: Outcome,
    ) -> None:  # fmt: skip
        status = response.status_code
        code, message = _graph_error(response)
        words = f"Microsoft Graph {status}{' ' + code if code else ''}{': ' + message if message else ''}"
        if 200 <= status < 300:
            outcome.delivered.extend(recipients)
            outcome.reply = (250, f"2.0.0 Accepted by Microsoft Graph ({status})")
        elif code in _REFUSED_CODES or status in _REFUSED_STATUSES:
            reply: Reply = (550 if code == "ErrorInvalidRecipients" else 554, f"5.{_enhanced(status, code)} {words}")
            outcome.bounced.update({r: reply for r in recipients})
            outcome.error, outcome.reply = "message refused by Microsoft Graph", reply
            outcome.advice = advice(reply[0], words)
        elif status == 429:
            pause = _retry_after(response)
            self._paused[key] = time.monotonic() + pause
            error = f"throttled by Microsoft Graph: retry after {pause:g} s"
            _defer_all(outcome, recipients, (451, f"4.7.0 {words}"), error)
            outcome.retry_after, outcome.session_failed = pause, False  # slowed down, not down
        else:  # outage, timeout, conflict, locked, the app's setup, a code relay does not know: the mail waits
            _defer_all(outcome, recipients, (451, f"4.3.0 {words}"), "Microsoft Graph did not take the message")
            outcome.advice = _ADVICE.get(status)


def _enhanced(status: int, code: str) -> str:
    """The rest of an enhanced status code (RFC 3463) for a Graph refusal, for logs and ``relay queue``."""
    if code == "ErrorInvalidRecipients":
        return "1.1"
    if "SendAs" in code:
        return "7.1"
    if status == 413 or "SizeExceeded" in code:
        return "3.4"
    return "6.0"
