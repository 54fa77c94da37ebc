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
  A sendMail whose answer is lost (a read timeout or a dropped connection after the whole request)
  is deferred too, and its log says the next attempt may send a second copy.

At most ``GRAPH_CONCURRENCY`` requests run at once per mailbox (Graph's limit). A request over 4 MB
is refused by Graph, so a bigger message takes Graph's draft route (``graph_large.py`` splits it):
``POST .../messages`` with the MIME less its big attachments, each attachment by ``POST .../attachments``
(under 3 MB) or an upload session (``PUT`` byte ranges, resumed from ``nextExpectedRanges`` after a
``429``/``503``), then ``POST .../messages/{id}/send``. That route needs ``Mail.ReadWrite``; without it
``pipeline.py`` refuses such a message at submission (552, before the 250), which is why the transport
remembers, per mailbox, what the last token said (``may_upload``).

Crash safety: each step is announced in the spool (``DraftStore``, fsynced) before it is taken. An
attempt that finds a record from an attempt relay did not survive settles it first: drafts still being
created are found by their Message-ID and deleted; a draft being filled is deleted; a draft whose send
was asked for is sent again, which Graph refuses (404) if it went, and then Sent Items says whether it
did. So a kill at any step ends with the message sent once and no draft left behind.

``ErrorInvalidRecipients`` naming some of the recipients bounces those (a failure notice names them)
and retries the others at once, without them: one bad address never stops the rest.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import mmap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formataddr, getaddresses, make_msgid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import structlog

from relay.config.credentials import Secret
from relay.envelope import Account
from relay.errors import TokenError
from relay.idn import with_a_label
from relay.transports.graph_large import (
    SMALL_ATTACHMENT,
    CannotSplitError,
    DraftRecord,
    Part,
    Planner,
    fragments,
    named_recipients,
)
from relay.transports.smtp import Outcome, Reply, advice, token_advice
from relay.transports.tokens import TokenCache, http_failure, json_body, permissions, retry_after_seconds

log = structlog.get_logger("relay.delivery")

GRAPH_CONCURRENCY = 4
GRAPH_MAX_REQUEST = 4 * 1024 * 1024  # bytes of the request body (the base64 MIME)
DEFAULT_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 3600.0  # a longer pause would run into max_queue_lifetime and turn throttling into a bounce
_SPARE = 8 * 1024  # room for To/Cc rewritten by for_graph, beside the Bcc header's addresses
UPLOAD_PERMISSION = "Mail.ReadWrite"  # the draft route's permission (application), beside Mail.Send
MAX_RESUMES = 8  # 429/503 answers to one upload session before the attempt gives up (and retries later)
MAX_RESUME_WAIT = 60.0  # the longest Retry-After waited for inside an attempt
SENT_ITEMS_LOOKUPS = 3  # attempts that find a sent draft gone and not yet in Sent Items before it is redone


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


def _same(address: str) -> str:
    """The form two spellings of one address share: the header holds ``info@xn--yhti-8qa.fi`` where the
    envelope holds ``info@yhtiö.fi`` (the rewrite writes an IDN as its A-label)."""
    return with_a_label(address).lower()


def for_graph(content: bytes, recipients: list[str]) -> bytes:
    """The message with To/Cc/Bcc naming exactly ``recipients`` (Graph sends to the headers); a Bcc
    relay adds is 7-bit, an IDN as its A-label, as the rest of the header."""
    head, _, body = content.partition(b"\r\n\r\n")
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    pending = {_same(r) for r in recipients}
    listed: dict[str, list[tuple[str, str]]] = {
        name: getaddresses([str(v) for v in parsed.get_all(name, [])]) for name in ("To", "Cc")
    }
    shown = {_same(addr) for pairs in listed.values() for _, addr in pairs}
    fields = [f for f in _split_fields(head) if _name(f) != b"bcc"]
    if not shown <= pending:  # someone in To/Cc must not get it this time: name only who must
        fields = [f for f in fields if _name(f) not in (b"to", b"cc")]
        for name, pairs in listed.items():
            kept = [formataddr(p) for p in pairs if _same(p[1]) in pending]
            if kept:
                fields.append(f"{name}: {', '.join(kept)}".encode())
    hidden = [with_a_label(r) for r in recipients if _same(r) not in shown]
    if hidden:
        fields.append(f"Bcc: {', '.join(hidden)}".encode())
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


# endregion


def _defer_all(outcome: Outcome, recipients: list[str], reply: Reply, error: str) -> Outcome:
    """Nothing was decided for anyone (throttled, unreachable, no token): everyone waits for a retry."""
    outcome.deferred.update({r: reply for r in recipients})
    outcome.error, outcome.reply, outcome.session_failed = error, reply, True
    return outcome


# failures that come while waiting for the answer, once the request went out whole (httpx reads the response
# only after writing the request): Graph may have sent the message (RFC 1047's problem, over HTTP)
_UNANSWERED = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)


def _unanswered(exc: httpx.HTTPError) -> str:
    """The log's words for a sendMail without an answer. It is deferred and sent again, as an SMTP message
    whose reply was lost is (``transports/smtp.py``), so an admin who hears of a second copy finds why here."""
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else f"the connection failed: {http_failure(exc)}"
    return (f"Microsoft Graph did not answer sendMail ({what}) after the whole request was sent: "
            "if it took the message, the next attempt sends it twice")  # fmt: skip


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


UPLOAD_ADVICE = (
    "messages over about 3 MB go to Graph as a draft with attachments, which needs the Microsoft Graph "
    "application permission Mail.ReadWrite beside Mail.Send: add it to the app registration and grant admin "
    "consent (relay check --connect shows whether the token carries it)"
)

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


class DraftStore(Protocol):
    """Where an attempt keeps its ``DraftRecord`` (the scheduler's: the spool, fsynced)."""

    async def load(self) -> DraftRecord | None: ...
    async def save(self, record: DraftRecord) -> None: ...
    async def clear(self) -> None: ...


class MemoryDrafts:
    """A ``DraftStore`` for a caller without a spool (``relay send-test``): no crash to survive."""

    def __init__(self) -> None:
        self.record: DraftRecord | None = None

    async def load(self) -> DraftRecord | None:
        return self.record

    async def save(self, record: DraftRecord) -> None:
        self.record = DraftRecord.loads(record.dumps())

    async def clear(self) -> None:
        self.record = None


class StepFailedError(Exception):
    """Graph answered a step of the draft route with something other than success."""

    def __init__(self, response: httpx.Response, step: str) -> None:
        super().__init__(step)
        self.response, self.step = response, step


def _ok(response: httpx.Response) -> bool:
    return 200 <= response.status_code < 300


@contextmanager
def _mapped(body: bytes | Path) -> Iterator[tuple[memoryview, Callable[[], None]]]:
    """The message as one view, and a function that lets go of what was read of it so far.

    The spool file is mapped: its pages are the page cache's, read as needed and never copied into the
    heap; but every page read counts in relay's resident memory until it is let go of (``MADV_DONTNEED``:
    the next read of it faults it in again from the page cache). So the plan's scan and each uploaded
    range hold no more of the message than they look at.
    """
    if isinstance(body, bytes):
        yield memoryview(body), lambda: None
        return
    with open(body, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def release() -> None:
        if not mapped.closed:
            mapped.madvise(mmap.MADV_DONTNEED)

    try:
        yield memoryview(mapped), release
    finally:
        try:
            mapped.close()
        except BufferError:  # slices of it (the plan's parts) are still referenced: unmapped with the last one
            pass


class GraphTransport:
    """Graph delivery with per-mailbox state: at most 4 requests at once, a Retry-After pause, and whether
    the mailbox's token carries ``Mail.ReadWrite`` (the draft route)."""

    def __init__(self, tokens: TokenCache, planner: Planner | None = None) -> None:
        self.tokens = tokens
        self.planner = planner  # ``relay.prepare.graph_split.plan`` (the scheduler's): None, no draft route
        self._slots: dict[tuple[str, int, str], asyncio.Semaphore] = {}
        self._paused: dict[tuple[str, int, str], float] = {}  # mailbox -> time.monotonic() to wait for
        self._may_upload: dict[tuple[str, int, str], bool] = {}

    def may_upload(self, account: Account) -> bool | None:
        """Whether the last token seen for this mailbox carried ``Mail.ReadWrite`` (``None``: none seen yet, or
        its permissions cannot be read). Read at submission, where nothing may wait for the network."""
        return self._may_upload.get(self._key(account))

    async def check_permissions(self, account: Account) -> bool | None:
        """Fetch (or reuse) the account's token and note what it may do; ``None`` if no token can be had."""
        try:
            token, _ = await self.tokens.token(account)
        except (TokenError, httpx.HTTPError, OSError):
            return None
        self._note(account, token)
        return self.may_upload(account)

    def _note(self, account: Account, token: Secret) -> None:
        granted = permissions(token)
        if granted:
            self._may_upload[self._key(account)] = UPLOAD_PERMISSION in granted

    async def send(
        self, account: Account, mail_from: str, recipients: list[str], body: bytes | Path, *, deadline: float | None,
        drafts: DraftStore | None = None,
    ) -> Outcome:  # fmt: skip
        """One attempt; never raises for a delivery problem (they are in the ``Outcome``). ``drafts``: where
        the draft route records its steps (the entry's spool record), so a crash is settled next time."""
        outcome = Outcome()
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline or account.timeout * 4):
                await self._attempt(account, recipients, body, outcome, drafts or MemoryDrafts())
        except TimeoutError:
            _defer_all(outcome, recipients, (None, ""), "delivery attempt exceeded its deadline")
        except TokenError as exc:
            _defer_all(outcome, recipients, (None, exc.reply_text), f"OAuth2 token: {exc}")
            outcome.advice = token_advice(account, exc)
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

    async def _attempt(
        self, account: Account, recipients: list[str], body: bytes | Path, outcome: Outcome, drafts: DraftStore
    ) -> None:
        key = self._key(account)
        if self._still_paused(key, recipients, outcome):
            return
        size = len(body) if isinstance(body, bytes) else (await asyncio.to_thread(body.stat)).st_size
        async with self._slots.setdefault(key, asyncio.Semaphore(GRAPH_CONCURRENCY)):
            if self._still_paused(key, recipients, outcome):  # a 429 came while this one waited for a slot
                return
            record = await drafts.load()
            if record is not None and await self._settle(account, record, drafts, recipients, outcome):
                return  # the draft of an attempt relay did not survive was sent: nothing more to do
            if fits(size, recipients):
                content = body if isinstance(body, bytes) else await asyncio.to_thread(body.read_bytes)
                payload = base64.b64encode(for_graph(content, recipients))
                try:
                    response = await self._call(account, "POST", self._url(account, "sendMail"), content=payload,
                                                headers={"Content-Type": "text/plain"})  # fmt: skip
                except _UNANSWERED as exc:
                    _defer_all(outcome, recipients, (None, ""), _unanswered(exc))
                    return
                self._classify(account, key, response, recipients, outcome)  # a 429 pauses before the slot is free
                return
            try:
                await self._send_large(account, recipients, body, outcome, drafts)
            except StepFailedError as exc:
                self._classify(account, key, exc.response, recipients, outcome)
                if exc.response.status_code == 403 and exc.step != "send" and not outcome.bounced:
                    outcome.advice = UPLOAD_ADVICE

    def _url(self, account: Account, path: str) -> str:
        mailbox = quote(account.username or "", safe="@")
        return f"https://{account.host}:{account.port}/v1.0/users/{mailbox}/{path}"

    async def _call(self, account: Account, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request with the cached token; refused with a cached token, once more with a fresh one: 401
        (revoked early) or 403 other than SendAs (a permission granted since the token was issued; a token
        carries the permissions of its issue time, for up to an hour)."""
        token, fresh = await self.tokens.token(account)
        self._note(account, token)
        response = await self._request(account, method, url, token, **kwargs)
        refused = response.status_code == 401 or (
            response.status_code == 403 and _graph_error(response)[0] not in _REFUSED_CODES
        )
        if refused and not fresh:
            self.tokens.drop(account, token)
            token, _ = await self.tokens.token(account)
            self._note(account, token)
            response = await self._request(account, method, url, token, **kwargs)
        return response

    async def _request(self, account: Account, method: str, url: str, token: Secret, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token.reveal()}", **kwargs.pop("headers", {})}
        return await self.tokens.http.get(account).request(method, url, headers=headers, **kwargs)

    # region #### the draft route ####

    async def _send_large(
        self, account: Account, recipients: list[str], body: bytes | Path, outcome: Outcome, drafts: DraftStore
    ) -> None:
        """Draft, attachments, send; each step recorded in ``drafts`` before it is taken."""
        token, fresh = await self.tokens.token(account)
        self._note(account, token)
        if self.may_upload(account) is False and not fresh:  # granted since this token was issued?
            self.tokens.drop(account, token)
            self._note(account, (await self.tokens.token(account))[0])
        if self.may_upload(account) is False:
            reply = (451, "4.7.0 Microsoft Graph: this message needs the Mail.ReadWrite permission, which the token lacks")
            _defer_all(outcome, recipients, reply, "the draft route needs Mail.ReadWrite")
            outcome.session_failed, outcome.advice = False, UPLOAD_ADVICE
            return
        with _mapped(body) as (view, release):
            try:
                if self.planner is None:
                    raise CannotSplitError("this command does not send messages over about 3 MB through Graph")
                split = await asyncio.to_thread(self.planner, view, lambda size: fits(size, recipients))
                release()
            except CannotSplitError as exc:
                reply = (554, f"5.3.4 Message cannot be sent through Microsoft Graph: {exc}")
                outcome.bounced.update({r: reply for r in recipients})
                outcome.error, outcome.reply = "message too big for Microsoft Graph", reply
                return
            mime, message_id = _with_message_id(for_graph(split.mime, recipients))
            record = DraftRecord("creating", message_id, time.time())
            await drafts.save(record)
            try:
                await self._fill_and_send(account, record, drafts, mime, split.parts, release)
            except StepFailedError:
                await self._discard(account, record, drafts)
                raise
        outcome.delivered.extend(recipients)
        outcome.reply = (250, f"2.0.0 Accepted by Microsoft Graph (draft with {len(split.parts)} attachments sent)")

    async def _fill_and_send(
        self, account: Account, record: DraftRecord, drafts: DraftStore, mime: bytes, parts: list[Part],
        release: Callable[[], None],
    ) -> None:
        payload = base64.b64encode(mime)
        del mime
        response = await self._call(account, "POST", self._url(account, "messages"), content=payload,
                                    headers={"Content-Type": "text/plain"})  # fmt: skip
        del payload
        if not _ok(response) or not str(json_body(response).get("id") or ""):
            raise StepFailedError(response, "create")
        record.step, record.draft = "created", str(json_body(response)["id"])
        await drafts.save(record)
        log.info("graph_draft_created", draft_steps=len(parts) + 2, attachments=[p.name for p in parts])
        for part in parts:
            await self._attach(account, record.draft, part, release)
        record.step = "sending"
        await drafts.save(record)
        response = await self._call(account, "POST", self._url(account, f"messages/{quote(record.draft)}/send"))
        if not _ok(response):
            raise StepFailedError(response, "send")
        await drafts.clear()

    async def _attach(self, account: Account, draft: str, part: Part, release: Callable[[], None]) -> None:
        """One attachment: a ``fileAttachment`` POST under 3 MB, else an upload session."""
        base = f"messages/{quote(draft)}/attachments"
        if part.size < SMALL_ATTACHMENT:
            data = b"".join(fragments(part, 0, max(part.size, 1)))
            item = {k: v for k, v in part.item().items() if k not in ("attachmentType", "size")}
            body = json.dumps({"@odata.type": "#microsoft.graph.fileAttachment", **item,
                               "contentBytes": base64.b64encode(data).decode()})  # fmt: skip
            response = await self._call(account, "POST", self._url(account, base), content=body.encode(),
                                        headers={"Content-Type": "application/json"})  # fmt: skip
            if not _ok(response):
                raise StepFailedError(response, "attach")
            return
        response = await self._call(account, "POST", self._url(account, f"{base}/createUploadSession"),
                                    json={"AttachmentItem": part.item()})  # fmt: skip
        url = str(json_body(response).get("uploadUrl") or "")
        if not _ok(response) or not url.startswith("https://"):
            raise StepFailedError(response, "upload session")
        await self._upload(account, url, part, release)

    async def _upload(self, account: Account, url: str, part: Part, release: Callable[[], None]) -> None:
        """``PUT`` the part's bytes in ranges, in order, without the ``Authorization`` header (the URL is
        pre-authenticated; Graph refuses the header there). A ``429``/``503`` (or another 5xx) waits for
        Retry-After, asks the URL which byte it expects next, and goes on from there."""
        client = self.tokens.http.get(account)
        offset, resumes = 0, 0
        while offset < part.size:
            for chunk in fragments(part, offset):
                end = offset + len(chunk) - 1
                headers = {"Content-Range": f"bytes {offset}-{end}/{part.size}", "Content-Type": "application/octet-stream"}
                response = await client.put(url, content=chunk, headers=headers)
                release()  # what was read for this range
                if _ok(response):
                    offset = end + 1
                    continue
                if response.status_code not in (429, 503) and response.status_code < 500:
                    raise StepFailedError(response, "upload")
                resumes += 1
                if resumes > MAX_RESUMES:
                    raise StepFailedError(response, "upload")
                await asyncio.sleep(min(_retry_after(response), MAX_RESUME_WAIT))
                offset = await self._expected(client, url, offset)
                log.info("graph_upload_resumed", attachment=part.name, status=response.status_code, offset=offset)
                break

    async def _expected(self, client: httpx.AsyncClient, url: str, offset: int) -> int:
        """Where Graph wants the next range to start (``nextExpectedRanges``: ``"start"`` for Outlook,
        ``"start-end"`` elsewhere); where we were if the answer says nothing usable."""
        status = await client.get(url)
        ranges = json_body(status).get("nextExpectedRanges") if _ok(status) else None
        try:
            return int(str(ranges[0]).split("-")[0]) if isinstance(ranges, list) and ranges else offset
        except ValueError:
            return offset

    async def _discard(self, account: Account, record: DraftRecord, drafts: DraftStore) -> None:
        """A step failed with Graph's answer: delete the draft (nothing was sent), and with it the record; if
        Graph cannot be asked now, the record stays and the next attempt deletes it."""
        try:
            if record.step == "creating" or await self._deleted(account, record.draft):
                await drafts.clear()
        except (httpx.HTTPError, TokenError, OSError) as exc:
            log.warning("graph_draft_kept", draft_step=record.step, error=str(exc), result="deleted next attempt")

    async def _deleted(self, account: Account, draft: str) -> bool:
        response = await self._call(account, "DELETE", self._url(account, f"messages/{quote(draft)}"))
        return _ok(response) or response.status_code == 404

    async def _settle(
        self, account: Account, record: DraftRecord, drafts: DraftStore, recipients: list[str], outcome: Outcome
    ) -> bool:
        """A record left by an attempt relay did not survive. ``True``: the message was sent (delivered);
        ``False``: no draft is left and the message goes out afresh. Graph not answering raises (deferred)."""
        log.warning("graph_draft_found", draft_step=record.step, action="settling it before the next try")
        if record.step == "creating":  # the draft may exist without relay having learnt its id
            for found in await self._find(account, "drafts", record):
                await self._deleted(account, found)
            await drafts.clear()
            return False
        if record.step == "created":  # never sent: delete it
            if not await self._deleted(account, record.draft):
                raise httpx.HTTPError("Microsoft Graph did not delete the draft left by an earlier attempt")
            await drafts.clear()
            return False
        response = await self._call(account, "POST", self._url(account, f"messages/{quote(record.draft)}/send"))
        if _ok(response) or (response.status_code == 404 and await self._find(account, "sentitems", record)):
            await drafts.clear()
            outcome.delivered.extend(recipients)
            outcome.reply = (250, "2.0.0 Accepted by Microsoft Graph (the draft of an interrupted attempt)")
            return True
        if response.status_code != 404:
            await self._discard(account, record, drafts)
            self._classify(account, self._key(account), response, recipients, outcome)
            return True
        record.lookups += 1  # gone, and not in Sent Items (yet): Exchange may still be moving it
        if record.lookups < SENT_ITEMS_LOOKUPS:
            await drafts.save(record)
            reply = (451, "4.4.0 Microsoft Graph: the draft was sent or deleted; looking for it in Sent Items")
            _defer_all(outcome, recipients, reply, "draft gone, not in Sent Items yet")
            outcome.retry_after, outcome.session_failed = 60.0, False
            return True
        await drafts.clear()  # deleted by someone, never sent: the message goes again
        return False

    async def _find(self, account: Account, folder: str, record: DraftRecord) -> list[str]:
        """Ids of the messages in ``folder`` (``drafts``, ``sentitems``) with the record's Message-ID."""
        quoted = record.message_id.replace("'", "''")
        response = await self._call(account, "GET", self._url(account, f"mailFolders/{folder}/messages"),
                                    params={"$filter": f"internetMessageId eq '{quoted}'", "$select": "id"})  # fmt: skip
        if not _ok(response):
            raise httpx.HTTPError(f"Microsoft Graph answered {response.status_code} to a look into {folder}")
        found = json_body(response).get("value")
        return [str(item["id"]) for item in found if isinstance(item, dict) and "id" in item] if isinstance(found, list) else []

    # endregion

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
        elif code == "ErrorInvalidRecipients" and _without_the_named(response, recipients, outcome, words):
            return
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


def _without_the_named(response: httpx.Response, recipients: list[str], outcome: Outcome, words: str) -> bool:
    """``ErrorInvalidRecipients`` naming some of this attempt's recipients: those bounce (the sender gets a
    failure notice naming them), the others are tried again at once without them. ``False`` when Graph
    names none of them, or all (then the whole message bounces, as before)."""
    named = {_same(n) for n in named_recipients(_graph_error(response)[1] + " " + response.text[:4096])}
    bad = [r for r in recipients if _same(r) in named]  # Graph names them as the message did
    if not bad or len(bad) == len(recipients):
        return False
    reply: Reply = (550, f"5.1.1 {words}")
    outcome.bounced.update({r: reply for r in bad})
    outcome.deferred.update({r: (451, "4.1.0 retried without the recipients Microsoft Graph refused") for r in recipients
                             if r not in bad})  # fmt: skip
    outcome.error, outcome.reply = f"Microsoft Graph refused {', '.join(bad)}; the others go again without them", reply
    outcome.retry_after = 0.0
    return True


def _with_message_id(mime: bytes) -> tuple[bytes, str]:
    """The draft's MIME and its Message-ID (Graph's ``internetMessageId``, which finds the draft again after
    a crash); one is added if the message has none (the rewrite stage adds one, a notice may not)."""
    head = mime[: mime.find(b"\r\n\r\n") + 4]
    found = str(BytesHeaderParser(policy=compat32).parsebytes(head).get("Message-ID", "")).strip()
    if found:
        return mime, found
    made = make_msgid(domain="relay.invalid")
    return f"Message-ID: {made}\r\n".encode() + mime, made


def _enhanced(status: int, code: str) -> str:
    """The rest of an enhanced status code (RFC 3463) for a Graph refusal, for logs and ``relay queue``."""
    if code == "ErrorInvalidRecipients":
        return "1.1"
    if "SendAs" in code:
        return "7.1"
    if status == 413 or "SizeExceeded" in code:
        return "3.4"
    return "6.0"
