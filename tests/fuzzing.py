"""Hostile SMTP input for fuzzing relay: generators, a raw-socket client that plays them, and the checks.

Shared by ``tests/test_fuzz.py`` (a few hundred examples in the normal suite, against an in-process
daemon) and ``bench/fuzz.py`` (minutes of them against ``relay serve`` as its own process).

* ``messages()``: message bytes as legacy and hostile programs write them: MIME trees (some broken),
  charsets right, wrong and missing, encoded words good and bad, Latin-1 bytes in headers, NULs, long
  and huge lines, bare CR and LF, lines of dots.
* ``dialogues()``: SMTP sessions: HELO/EHLO/MAIL/RCPT/DATA/RSET/NOOP/AUTH/STARTTLS/VRFY/QUIT and garbage,
  in odd casing, with 8-bit, NULs, over-long lines, bare LF line ends, several commands in one write,
  and DATA bodies cut into several writes anywhere (the end marker too).
* ``play()``: speaks one dialogue over a socket, one reply per command line as aiosmtpd answers, and
  returns the transcript; ``violations()`` lists what in it breaks a rule every reply must keep.

A body is framed so that its end is where the client means it: ``CRLF.CRLF``, or ``LF.LF`` for a
client that never sent a CRLF (``data_end``, the rule written from the listener's docstring, not
from its code). The client reads a reply per line and never guesses with a timer; a reply that does
not come within ``READ_TIMEOUT`` is itself a finding (the daemon stopped answering).
"""

from __future__ import annotations

import base64
import re
import socket
import time
from dataclasses import dataclass, field

from hypothesis import strategies as st

READ_TIMEOUT = 30.0  # a reply later than this: the daemon is stuck (a loaded 2-core CI machine answers in ms)
REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([\x20-\x7e]*)\r\n")
QUEUED = re.compile(r"queued as ((?:\S+ ?)+)$")
FORBIDDEN_TEXT = ("Temporary internal error", "Error: (")  # R451_INTERNAL and aiosmtpd's default 500

# region #### messages ####

_WORDS = ["Lasku", "invoice", "äöå", "Ä€", "漢字", "=?", "?=", "..", ".", "<a@b>", ";", ",", "\t", " ", '"', "\\", "(", ")"]
_CHARSETS = ["us-ascii", "utf-8", "iso-8859-1", "windows-1252", "iso-8859-15", "utf-7", "x-unknown", "", "utf-8'fi'"]
_CTES = ["7bit", "8bit", "binary", "quoted-printable", "base64", "x-uuencode", "BASE64 ", ""]
_HEADER_NAMES = [
    "From", "To", "Cc", "Bcc", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "Content-Disposition", "DKIM-Signature", "Sender", "Return-Path", "X-Mailer",
]  # fmt: skip


_PIECES = st.one_of(
    st.tuples(st.sampled_from(_WORDS), st.sampled_from(["utf-8", "latin-1", "cp1252"])).map(lambda w: w[0].encode(w[1], "replace")),
    st.binary(max_size=8),
    st.sampled_from([b"\x00", b"\r", b"\n", b"\r\n", b"\x1b", b"\xff\xfe", b"\xe4", b"=\r\n", b"=XX"]),
)


def raw_bytes(size: int = 60) -> st.SearchStrategy[bytes]:
    """Bytes a legacy program might put anywhere: ASCII words, Latin-1 and UTF-8 text, NULs, odd controls."""
    return st.lists(_PIECES, max_size=size // 4).map(b"".join)


def _raw(draw: st.DrawFn, size: int = 60) -> bytes:
    return draw(raw_bytes(size))


@st.composite
def encoded_word(draw: st.DrawFn) -> bytes:
    charset = draw(st.sampled_from(_CHARSETS))
    encoding = draw(st.sampled_from(["q", "b", "Q", "B", "x"]))
    text = _raw(draw, 40)
    if encoding in "bB" and draw(st.booleans()):
        text = base64.b64encode(text)
    return b"=?" + charset.encode() + b"?" + encoding.encode() + b"?" + text.replace(b"?=", b"") + b"?="


@st.composite
def header_value(draw: st.DrawFn, name: str) -> bytes:
    if name in ("From", "To", "Cc", "Bcc", "Reply-To", "Sender") and draw(st.booleans()):
        members = draw(st.lists(address(), min_size=0, max_size=4))
        value = draw(st.sampled_from([b", ", b"; ", b","])).join(m.encode("utf-8", "surrogateescape") for m in members)
        if draw(st.booleans()):
            value = draw(encoded_word()) + b" <" + value + b">"
        return value
    parts = draw(st.lists(st.one_of(encoded_word(), raw_bytes()), max_size=4))
    value = b" ".join(parts)
    if draw(st.integers(0, 9)) == 0:
        value += b"x" * draw(st.sampled_from([990, 1200, 20_000]))  # one huge header line
    if draw(st.integers(0, 4)) == 0:
        value = value.replace(b" ", b"\r\n ", 2)  # folded
    return value


@st.composite
def headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    names = draw(st.lists(st.one_of(st.sampled_from(_HEADER_NAMES), st.from_regex(r"[A-Za-z\-\x00\x80:]{1,20}", fullmatch=True)), max_size=8))
    return [(n.encode("utf-8", "replace"), draw(header_value(n))) for n in names]


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/pdf", "message/rfc822", "text/plain; format=flowed", "image/png"]))
    charset = draw(st.sampled_from(_CHARSETS))
    cte = draw(st.sampled_from(_CTES))
    head = b"Content-Type: " + ctype.encode() + (b'; charset="' + charset.encode() + b'"' if charset and draw(st.booleans()) else b"")
    head += b"\r\nContent-Transfer-Encoding: " + cte.encode() if cte else b""
    if draw(st.booleans()):
        head += b'\r\nContent-Disposition: attachment; filename="' + _raw(draw, 20).replace(b'"', b"") + b'"'
    body = draw(text_body())
    if cte.strip().lower() == "base64" and draw(st.booleans()):
        body = base64.encodebytes(body).replace(b"\n", b"\r\n")
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))]  # broken padding
    return head + b"\r\n\r\n" + body


@st.composite
def mime_tree(draw: st.DrawFn, depth: int = 0) -> bytes:
    if depth > 2 or draw(st.integers(0, 2)) == 0:
        return draw(leaf())
    subtype = draw(st.sampled_from(["mixed", "alternative", "related", "signed", "report"]))
    boundary = draw(st.sampled_from([b"b1", b"=_x", b"", b"a" * 80, b"--", b"b\xe4"])) + str(depth).encode()
    declared = draw(st.sampled_from([boundary, boundary, b"other", None]))
    head = b"Content-Type: multipart/" + subtype.encode() + (b'; boundary="' + declared + b'"' if declared is not None else b"")
    children = draw(st.lists(mime_tree(depth + 1), max_size=3))
    body = draw(st.sampled_from([b"", b"preamble\r\n", b"x" * 1500 + b"\r\n"]))
    for child in children:
        body += b"--" + boundary + b"\r\n" + child + b"\r\n"
    if draw(st.booleans()):
        body += b"--" + boundary + b"--\r\n" + draw(st.sampled_from([b"", b"epilogue\r\n"]))
    return head + b"\r\n\r\n" + body


@st.composite
def text_body(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.one_of(
        raw_bytes(),
        st.sampled_from([b".", b"..", b".\r", b". ", b"", b"-- ", b"From x", b"=", b"=\r", b"\x00"]),
        st.integers(990, 3000).map(lambda n: b"L" * n),
        st.integers(0, 30).map(lambda n: b"B" * 70_000 if n == 0 else b"B"),  # now and then over 64K: 552
    ), max_size=10))  # fmt: skip
    ends = draw(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\r"]), min_size=len(lines), max_size=len(lines)))
    return b"".join(line + end for line, end in zip(lines, ends))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """One message: headers then a plain or MIME body, CRLF or bare-LF (or mixed) line ends."""
    head = draw(headers())
    if draw(st.booleans()):
        head.append((b"MIME-Version", b"1.0"))
        tree = draw(mime_tree())
        top_head, _, body = tree.partition(b"\r\n\r\n")
        head.extend((n, v) for n, _, v in (line.partition(b": ") for line in top_head.split(b"\r\n")))
    else:
        body = draw(text_body())
    text = b"".join(name + b": " + value + b"\r\n" for name, value in head) + b"\r\n" + body
    ending = draw(st.sampled_from(["crlf", "crlf", "lf", "mixed"]))
    if ending == "lf":
        text = text.replace(b"\r\n", b"\n")
    elif ending == "mixed":
        text = text.replace(b"\r\n", b"\n", draw(st.integers(1, 5)))
    return text


# endregion

# region #### dialogues ####


@st.composite
def address(draw: st.DrawFn) -> str:
    return draw(st.one_of(
        st.sampled_from([
            "erp@legacy.local", "a@x.fi", "laskutus@rakennus.fi", "", "<>", "@", "a@", "@b", "a@@b", "a@b@c",
            '"a b"@x.fi', '";,"@x.fi', "a@[127.0.0.1]", "@route,@r2:a@x.fi", "040 123 4567@sms", "+358401234567@sms",
            "(040) 123-4567@sms", "+358 (0)40 123 4567@sms", "12@sms", "abc@sms", "a@x.fi; b@y.fi", "a@x.fi, 040 1234567@sms",
            "a@x.fi;", ";", ",,", "a@x.fi <b@y.fi>", "Name <a@x.fi>", "a@xn--bcher-kva.fi", "ä@ö.fi", "a\x00@x.fi",
        ]),
        st.text(alphabet="ab.@<>;, \"()+0123456789\\:[]ä\x00", max_size=30),
        st.integers(300, 1200).map(lambda n: "a" * n + "@x.fi"),
    ))  # fmt: skip


def _casing(draw: st.DrawFn, verb: str) -> str:
    style = draw(st.sampled_from(["upper", "upper", "lower", "mixed"]))
    if style == "lower":
        return verb.lower()
    if style == "mixed":
        return "".join(c.lower() if i % 2 else c for i, c in enumerate(verb))
    return verb


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def command(draw: st.DrawFn) -> bytes:
    """One command line (no line end): a verb in some casing and an argument, sane or not."""
    kind = draw(st.sampled_from(["HELO", "EHLO", "MAIL", "MAIL", "RCPT", "RCPT", "RSET", "NOOP", "AUTH", "STARTTLS",
                                 "VRFY", "EXPN", "HELP", "garbage", "auth-response", "long"]))  # fmt: skip
    verb = _casing(draw, kind)
    if kind in ("HELO", "EHLO"):
        arg = draw(st.sampled_from(["erp-server", "", "[127.0.0.1]", "ä.local", "x" * 600]))
    elif kind in ("MAIL", "RCPT"):
        params = draw(st.sampled_from(["", " SIZE=100", " BODY=8BITMIME", " SMTPUTF8", " SIZE=x", " NOTIFY=NEVER", " =", " SIZE=99999999999"]))
        bracket = draw(st.sampled_from(["<{}>", "{}", "<{}", " <{}> "]))
        prefix = draw(st.sampled_from(["FROM:", "TO:", "from: ", "TO :", ""])) if kind == "MAIL" or draw(st.booleans()) else ""
        prefix = prefix or ("FROM:" if kind == "MAIL" else "TO:")
        arg = prefix + bracket.format(draw(address())) + params
    elif kind == "AUTH":
        arg = draw(st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "", "PLAIN =", "PLAIN !!!", "LOGIN " + _b64(b"user")]))
        if arg == "PLAIN" and draw(st.booleans()):
            arg += " " + _b64(draw(st.sampled_from([b"\x00a@x.fi\x00pw", b"\x00laskutus@rakennus.fi\x00x", b"a\x00b", b"\x00\x00", b""])))
    elif kind == "auth-response":
        return draw(st.sampled_from([b"*", b"=", b"!!", _b64(b"user").encode(), _b64(b"\x00a\x00b").encode(), b""]))
    elif kind == "garbage":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    elif kind == "long":
        return draw(st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"X"])) + b"a" * draw(st.sampled_from([510, 1000, 1002, 5000, 70_000]))
    else:
        arg = draw(st.sampled_from(["", " ", "x", "a@x.fi"]))
    line = (verb + (" " + arg if arg else "")).encode("utf-8", "surrogateescape")
    if draw(st.integers(0, 7)) == 0:
        line += draw(st.sampled_from([b"\x00", b"\xe4", b"\r", b"\xff\xfe"]))
    return line


@dataclass(frozen=True)
class Lines:
    """Command lines written at once (pipelined when more than one), each ending in ``\\n``."""

    lines: tuple[bytes, ...]


@dataclass(frozen=True)
class Data:
    """``MAIL``/``RCPT`` lines, then ``DATA`` in the same write; if it gets 354, the data in ``pieces`` writes."""

    before: tuple[bytes, ...]
    data: bytes  # the body with its end marker
    cuts: tuple[int, ...]  # where the data is split between writes
    hangup: bool = False  # the client closes the connection at the first cut instead (no end marker)


@dataclass(frozen=True)
class Quit:
    pass


Step = Lines | Data | Quit


def data_end(data: bytes) -> int | None:
    """Where DATA ends (the octet after the end marker), by relay's documented rule: at the first
    ``CRLF.CRLF`` (the start of the data counting as a line start), or at a bare ``LF.LF`` when no
    CRLF came before it."""
    probe = b"\r\n" + data
    crlf = probe.find(b"\r\n", 2)
    lf = probe.find(b"\n.\n", 1)
    if lf >= 0 and (crlf < 0 or crlf > lf):
        return lf + 3 - 2
    at = probe.find(b"\r\n.\r\n")
    return at + 5 - 2 if at >= 0 else None


def frame(body: bytes, lf_marker: bool) -> bytes:
    """``body`` plus an end marker such that the data ends exactly there (dot-stuffed if it would not)."""
    stuffed = re.sub(rb"(^|\n)\.", rb"\1..", body)
    for candidate in (body, stuffed):
        for marker in ([b"\n.\n"] if lf_marker else []) + [b"\r\n.\r\n"]:
            data = candidate + marker
            if data_end(data) == len(data):
                return data
    raise AssertionError(f"cannot frame {body!r}")  # pragma: no cover (stuffing removes every marker)


def _line_end(draw: st.DrawFn) -> bytes:
    return draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r\r\n"]))


@st.composite
def steps(draw: st.DrawFn) -> Step:
    kind = draw(st.sampled_from(["lines", "lines", "data", "data", "data", "quit"]))
    if kind == "quit":
        return Quit()
    lines = tuple(draw(command()) + _line_end(draw) for _ in range(draw(st.integers(0 if kind == "data" else 1, 4))))
    if kind == "lines":
        return Lines(lines)
    if draw(st.booleans()):  # a transaction that can get as far as DATA
        lines = (b"MAIL FROM:<erp@legacy.local>\r\n", b"RCPT TO:<" + draw(address()).encode("utf-8", "surrogateescape") + b">\r\n")
    data = frame(draw(messages()), lf_marker=draw(st.booleans()))
    cuts = tuple(sorted(draw(st.lists(st.integers(0, len(data)), max_size=3))))
    if draw(st.booleans()):  # cut inside the end marker
        cuts = (*cuts, len(data) - draw(st.integers(1, 4)))
    return Data(lines, data, tuple(sorted(cuts)), hangup=bool(cuts) and draw(st.integers(0, 9)) == 0)


@st.composite
def dialogues(draw: st.DrawFn) -> list[Step]:
    return draw(st.lists(steps(), min_size=1, max_size=6))


# endregion

# region #### playing a dialogue ####


@dataclass
class Exchange:
    """What was sent (one line, or a data block) and the reply it got (``b""`` if the connection closed)."""

    sent: bytes
    reply: list[bytes]
    kind: str  # greeting | command | data-command | data | quit

    @property
    def code(self) -> int:
        return int(self.reply[-1][:3]) if self.reply and self.reply[-1][:3].isdigit() else 0


@dataclass
class Transcript:
    exchanges: list[Exchange] = field(default_factory=list)
    closed: bool = False  # the server closed the connection
    stuck: str = ""  # no reply within READ_TIMEOUT: what was awaited

    @property
    def queued(self) -> list[str]:
        """Queue ids from every ``250 ... queued as ID [ID...]`` reply to a message."""
        ids: list[str] = []
        for ex in self.exchanges:
            if ex.kind == "data" and ex.code == 250:
                match = QUEUED.search(ex.reply[-1].decode("ascii", "replace").strip())
                ids.extend(match.group(1).split() if match else ["<no id>"])
        return ids


class _Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = self.sock.makefile("rb")

    def reply(self) -> list[bytes]:
        """One reply, all its lines; empty if the server closed the connection first."""
        lines: list[bytes] = []
        while True:
            line = self.stream.readline(4096)
            if not line:
                return lines
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def play(port: int, dialogue: list[Step]) -> Transcript:
    """Speak ``dialogue`` to the server at ``port``; stop at QUIT, when it closes, or when it is stuck."""
    out = Transcript()
    client = _Client(port)
    try:
        out.exchanges.append(Exchange(b"", client.reply(), "greeting"))
        if out.exchanges[0].code != 220:
            out.closed = True
            return out
        for step in dialogue:
            if not _play_step(client, step, out):
                break
    except TimeoutError:
        out.stuck = repr(out.exchanges[-1].sent[:200]) if out.exchanges else "greeting"
    except (ConnectionResetError, BrokenPipeError):
        out.closed = True
    finally:
        client.close()
    return out


def _exchange(client: _Client, out: Transcript, sent: bytes, kind: str) -> bool:
    reply = client.reply()
    out.exchanges.append(Exchange(sent, reply, kind))
    if not reply:
        out.closed = True
        return False
    return True


def _play_step(client: _Client, step: Step, out: Transcript) -> bool:
    if isinstance(step, Quit):
        client.sock.sendall(b"QUIT\r\n")
        _exchange(client, out, b"QUIT\r\n", "quit")
        return False
    if isinstance(step, Lines):
        client.sock.sendall(b"".join(step.lines))
        return all(_exchange(client, out, line, "command") for line in step.lines)
    client.sock.sendall(b"".join(step.before) + b"DATA\r\n")
    if not all(_exchange(client, out, line, "command") for line in step.before):
        return False
    if not _exchange(client, out, b"DATA\r\n", "data-command"):
        return False
    if out.exchanges[-1].code != 354:
        return True
    if step.hangup:  # nothing of this may be queued: the spool check sees it
        client.sock.sendall(step.data[: step.cuts[0]])
        return False
    start = 0
    for cut in (*step.cuts, len(step.data)):
        if cut > start:
            client.sock.sendall(step.data[start:cut])
            time.sleep(0.001)  # lets the server read the pieces apart (no timing is asserted)
            start = cut
    return _exchange(client, out, step.data, "data")


# endregion

# region #### the relay under test ####


def relay_sections(up_entry: dict[str, object]) -> dict[str, object]:
    """The config sections of a fuzzed relay: every rewrite feature on, small limits to reach the 552/452."""
    return {
        "upstreams": {"provider": up_entry},
        "company": {
            "from_address": "laskutus@rakennus.fi", "from_name": "Rakennus Oy", "upstream": "provider",
            "signature": "Ystävällisin terveisin\nRakennus Oy", "copy_to": "arkisto@rakennus.fi",
        },
        "users": {"matti": {"addresses": ["a@x.fi", "ä@ö.fi"], "from_name": "Matti <M>", "copy_to": []}},
        "rewrite": {"recipient_rules": [{"match": "@y.fi", "replace": "@z.fi"}]},
        "sms": {"gateway": "{number}@sms.example.com", "number_in": "subject"},
        "limits": {"max_message_size": "64K", "max_recipients": 3},
    }  # fmt: skip


# endregion

# region #### checks ####

_ALLOWED: dict[str, set[int]] = {
    "greeting": {220, 421},
    "quit": {221},
    "data-command": {354} | set(range(400, 600)),
    "data": {250} | set(range(400, 600)),
}


def violations(out: Transcript, *, after_auth_challenge: bool = False) -> list[str]:
    """Every rule the transcript breaks: malformed replies, codes that make no sense for what was
    sent, an internal-error reply, a server that stopped answering or hung up without saying why."""
    found: list[str] = []
    if out.stuck:
        found.append(f"no reply within {READ_TIMEOUT}s after {out.stuck}")
    challenge = after_auth_challenge
    for i, ex in enumerate(out.exchanges):
        where = f"reply {i} to {ex.sent[:120]!r}"
        if not ex.reply:
            if i == 0 or not _closing(out.exchanges[i - 1]):
                found.append(f"{where}: connection closed without a reply")
            continue
        found.extend(f"{where}: {problem}" for problem in _malformed(ex.reply))
        text = b"".join(ex.reply).decode("ascii", "replace")
        found.extend(f"{where}: internal error reply {text!r}" for t in FORBIDDEN_TEXT if t in text)
        code = ex.code
        allowed = _ALLOWED.get(ex.kind)
        if ex.kind == "command" or (challenge and ex.kind in ("data-command", "quit")):  # a line after a
            verb = ex.sent.split(b" ", 1)[0].strip().upper()  # 334 is the AUTH response, whatever it says
            allowed = _command_codes(verb, challenge)
        if allowed is not None and code not in allowed:
            found.append(f"{where}: code {code} makes no sense here ({text.strip()!r})")
        challenge = code == 334
    if out.queued.count("<no id>"):
        found.append("a 250 to a message names no queue id")
    return found


def _closing(ex: Exchange) -> bool:
    """A reply after which the server may hang up: 221 to QUIT, 421, or aiosmtpd's 502 'goodbye'."""
    return ex.code in (221, 421) or (ex.code == 502 and b"goodbye" in b"".join(ex.reply))


def _command_codes(verb: bytes, challenge: bool) -> set[int]:
    if challenge:  # the line answered an AUTH challenge
        return {235, 334} | set(range(400, 600))
    common = set(range(400, 600))
    if verb == b"AUTH":
        return {235, 334} | common
    if verb in (b"HELO", b"EHLO", b"MAIL", b"RCPT", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP"):
        return {250, 252, 214} | common
    return common


def _malformed(reply: list[bytes]) -> list[str]:
    problems = []
    codes = set()
    for n, line in enumerate(reply):
        match = REPLY_LINE.fullmatch(line)
        if not match:
            problems.append(f"malformed reply line {line[:200]!r}")
            continue
        codes.add(match.group(1))
        if (match.group(2) == b" ") != (n == len(reply) - 1):
            problems.append(f"continuation marks wrong in {reply!r}")
        if len(line) > 512:
            problems.append(f"reply line of {len(line)} octets (RFC 5321: at most 512)")
    if len(codes) > 1:
        problems.append(f"one reply with several codes {sorted(codes)}")
    return problems


def message_problems(content: bytes, *, long_lines_kept: bool = False) -> list[str]:
    """What an upstream would refuse in a message relay produced: bare CR or LF, lines over 998
    octets (unless relay kept them on purpose: a signed part must stay as signed, and says so in a
    note), or text the stdlib parser cannot read at all."""
    from email import message_from_bytes, policy

    found = []
    if not content.count(b"\n") == content.count(b"\r\n") == content.count(b"\r"):
        found.append("bare CR or LF")
    longest = max((len(line) for line in content.split(b"\r\n")), default=0)
    if longest > 998 and not long_lines_kept:
        found.append(f"a line of {longest} octets")
    try:
        parsed = message_from_bytes(content, policy=policy.default)
        for part in parsed.walk():  # header values are passed through as sent: not judged here
            part.get_payload(decode=True)
    except Exception as exc:
        found.append(f"the stdlib parser fails: {type(exc).__name__}: {exc}")
    return found


# endregion
