"""``relay demo``: relay plus a built-in local upstream, so a newcomer sees mail flow with no account.

The upstream is a real SMTP server on 127.0.0.1:4650 that behaves like a provider: implicit TLS with
a certificate from a throwaway CA (made by trustme, trusted by relay through ``ca_file``), AUTH
required, and a sender check like Office 365's (only the logged-in mailbox may be the envelope
sender). It stores what it accepts in a Maildir (``demo-data/maildir/new``), one file per message.
Relay listens on 127.0.0.1:2525 as legacy programs expect and runs on the config below, written to
``demo-data/relay.yaml`` so that ``relay queue -c demo-data/relay.yaml`` shows the demo's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import mailbox
import os
import secrets
import shutil
import socket
import ssl
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.config.load import parse_config
from relay.config.models import Config
from relay.daemon import run

log = structlog.get_logger("relay.demo")
DEMO_USER = "invoices@demo.example"
UPSTREAM_PORT = 4650
RELAY_PORT = 2525
PASSWORD_ENV = "RELAY_DEMO_UPSTREAM_PASSWORD"

DEMO_CONFIG = """\
# The demo's built-in configuration (see config.example.yaml for every key).
listeners:
  - address: 127.0.0.1
    port: {relay_port}
spool_dir: {data}/spool
upstreams:
  demo-provider:
    host: 127.0.0.1
    port: {upstream_port}
    security: ssl
    username: {user}
    password_env: {password_env}
    ca_file: {data}/ca.pem
company:
  from_address: {user}
  from_name: Demo Company Oy
  upstream: demo-provider
  signature: |
    --
    Demo Company Oy
    Laskutus / Invoicing
users:
  matti:
    addresses: [matti@erp.local]    # the ERP's own name for him: it identifies him, nobody can answer it
    from_name: Matti Meikäläinen
    reply_to: matti@demo.example    # so customers' replies reach his own mailbox
    signature: |
      --
      Matti Meikäläinen
      Demo Company Oy
delivery:
  retry_interval: 5
"""


class MaildirUpstream:
    """aiosmtpd handler of the demo provider: checks the sender, stores into a Maildir."""

    def __init__(self, maildir: Path, username: str) -> None:
        self.maildir = mailbox.Maildir(maildir, create=True)
        self.username = username

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        if address.lower() != self.username.lower():
            return "554 5.2.0 SendAsDenied: the sender must be the logged-in mailbox " + self.username
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        key = await asyncio.to_thread(self.maildir.add, content)
        log.info("demo_upstream_stored", file=f"new/{key}", recipients=envelope.rcpt_tos, size=len(content))
        return "250 2.0.0 Stored in the demo mailbox"


def _authenticator(username: str, password: str) -> Any:
    def check(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == username
            and secrets.compare_digest(data.password, password.encode())
        )
        return AuthResult(success=ok, handled=False, message=None if ok else "535 5.7.8 Authentication failed")

    return check


def _tls(data: Path) -> ssl.SSLContext:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(data / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def start_upstream(data: Path, password: str, sock: socket.socket) -> asyncio.Server:
    """The built-in provider on ``sock``, bound by ``claimed`` before its certificate is written."""
    handler = MaildirUpstream(data / "maildir", DEMO_USER)
    context = _tls(data)
    # implicit TLS: aiosmtpd cannot see it and warns that AUTH is allowed without TLS; it is not.
    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)
    return await asyncio.get_running_loop().create_server(
        lambda: SMTP(
            handler, hostname="demo-provider.local", auth_required=True, auth_require_tls=False,
            authenticator=_authenticator(DEMO_USER, password),
        ),
        sock=sock, ssl=context,
    )  # fmt: skip


class DemoBusy(Exception):
    """Another demo (or program) has the ports or the data directory; nothing was written."""


@contextlib.contextmanager
def claimed(data: Path, relay_port: int, upstream_port: int) -> Iterator[socket.socket]:
    """Both ports and ``data`` taken before the demo writes a file: a second demo once failed only at
    relay's bind, after it had rewritten ``ca.pem`` under the running demo, whose deliveries then no
    longer trusted their provider. Yields the provider's bound socket; ``data`` stays locked until exit."""
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(_bound(upstream_port, "--upstream-port"))
        _check_free(relay_port, "--port")
        stack.callback(os.close, _lock(data))
        yield upstream


def _bound(port: int, option: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server: TIME_WAIT is no owner
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise DemoBusy(_taken(port, option, exc)) from None
    return sock


def _check_free(port: int, option: str) -> None:
    """Relay's own daemon binds this port later: a probe now, so a taken one stops the demo before any file."""
    with _bound(port, option):
        pass


def _taken(port: int, option: str, exc: OSError) -> str:
    return (f"127.0.0.1:{port} is taken ({exc.strerror or exc}): is a demo already running? Stop it with Ctrl-C "
            f"in its terminal, or give this one another {option}")  # fmt: skip


def _lock(data: Path) -> int:
    """An flock on ``data/demo.lock`` for the demo's life (the kernel drops it when the process ends)."""
    data.mkdir(parents=True, exist_ok=True)
    fd = os.open(data / "demo.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DemoBusy(f"a demo is already running in {data}/ (stop it with Ctrl-C in its terminal, or give "
                       "this one --data DIR)") from None  # fmt: skip
    return fd


def demo_config(data: Path, relay_port: int = RELAY_PORT, upstream_port: int = UPSTREAM_PORT) -> Config:
    """The demo's config, written to ``data/relay.yaml`` first: the file ``relay queue -c`` (and ``relay
    check``) reads, with absolute paths, so those commands work from any directory."""
    text = DEMO_CONFIG.format(
        data=data, user=DEMO_USER, upstream_port=upstream_port, relay_port=relay_port, password_env=PASSWORD_ENV
    )
    path = config_file(data)
    path.write_text(text, encoding="utf-8")
    return parse_config(text, file=str(path))


def config_file(data: Path) -> Path:
    return data / "relay.yaml"


def shown(path: Path) -> str:
    """``path`` as the user can type it here: relative when it is under the current directory."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def own_command() -> str:
    """How to run this same relay from this shell: ``relay`` if that is on PATH, else its path."""
    program = Path(sys.argv[0])
    if program.name == "__main__.py":  # python -m relay
        return f"{shown(Path(sys.executable))} -m relay"
    found = shutil.which("relay")
    if found is not None and Path(found).resolve() == program.resolve():
        return "relay"
    return shown(program.absolute())


def instructions(data: Path, relay_port: int = RELAY_PORT, upstream_port: int = UPSTREAM_PORT, *,
                 made: bool = True) -> str:  # fmt: skip
    relay = own_command()
    return textwrap.dedent(
        f"""
        relay demo is running.
          its files are in     {data}/  ({"made now" if made else "already there"}; --data DIR for another place)
          relay listens on     127.0.0.1:{relay_port}  (plain SMTP, no login: like a legacy ERP expects)
          it delivers to       127.0.0.1:{upstream_port}  (built-in provider: TLS + AUTH + sender check)
          its config is        {config_file(data)}
          delivered mail is in {data}/maildir/new/
          the queue is in      {data}/spool/
          see the queue with   {relay} queue -c {shown(config_file(data))}

        Send a legacy-style message from another terminal, e.g. with Python's smtplib:
          python3 -c "import smtplib; smtplib.SMTP('127.0.0.1', {relay_port}).sendmail('matti@erp.local', \\
            ['customer@example.com', 'boss@example.com'], \\
            b'To: customer@example.com; boss@example.com\\r\\nSubject: Lasku 1234\\r\\n\\r\\nHyv\\xe4\\xe4 p\\xe4iv\\xe4\\xe4!\\r\\n')"
        or with swaks:  swaks --server 127.0.0.1:{relay_port} --from matti@erp.local --to customer@example.com
        then look at:   ls {data}/maildir/new/ && cat {data}/maildir/new/*
        (relay rewrote the sender to {DEMO_USER}, set Reply-To to matti's reply_to, added the signature,
        and delivered over TLS with AUTH.)
        Stop with Ctrl-C.
        """
    )


async def run_demo(data: Path, relay_port: int = RELAY_PORT, upstream_port: int = UPSTREAM_PORT) -> None:
    made = not data.exists()
    with claimed(data, relay_port, upstream_port) as upstream_socket:
        password = secrets.token_urlsafe(16)
        os.environ[PASSWORD_ENV] = password  # the demo's secret source; never printed
        upstream = await start_upstream(data, password, upstream_socket)
        config = demo_config(data, relay_port, upstream_port)
        announce = functools.partial(print, instructions(data, relay_port, upstream_port, made=made), flush=True)
        try:  # the instructions only once relay listens: a port taken meanwhile is said instead
            await run(config, on_started=announce)
        finally:
            upstream.close()
            await upstream.wait_closed()
