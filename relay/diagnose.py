"""``relay check --connect``: can each configured account reach its provider and log in?

For every named upstream and every user's own account: resolve the password, connect, do TLS as
configured, log in, and quit, without sending anything. Each result names the step that failed
(password source, connect, TLS, AUTH) and, for the provider replies admins meet when a provider
changes its rules (Office 365 turning Basic AUTH off, Gmail wanting an App Password), what to do.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiosmtplib

from relay.config import Config, UpstreamOverride
from relay.credentials import read_secret
from relay.delivery import _close, _connect, _describe, advice
from relay.envelope import Account
from relay.errors import SecretError
from relay.settings import USER_ACCOUNT_PREFIX, account_for


@dataclass(frozen=True)
class Probe:
    """The result for one account."""

    account: Account
    ok: bool
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        who = f" as {self.account.username}" if self.account.username else ""
        line = f"{'ok    ' if self.ok else 'FAILED'} {self.account.label}{who}: {self.message}"
        return line + (f"\n         -> {self.hint}" if self.hint else "")


def accounts(config: Config) -> list[Account]:
    """Every account relay may deliver through: named upstreams and users' own accounts."""
    names = list(config.upstreams)
    names += [USER_ACCOUNT_PREFIX + u for u, user in config.users.items() if isinstance(user.upstream, UpstreamOverride)]
    return [account_for(config, name) for name in names]


async def probe(account: Account, *, timeout: float = 30) -> Probe:
    try:
        secret = await asyncio.to_thread(read_secret, account)
    except SecretError as exc:
        return Probe(account, False, f"password: {exc}")
    try:
        async with asyncio.timeout(timeout):
            smtp = await _connect(account, secret)
    except aiosmtplib.SMTPAuthenticationError as exc:
        return Probe(account, False, f"login refused: {exc.code} {exc.message}", advice(exc.code, exc.message))
    except aiosmtplib.SMTPResponseException as exc:
        return Probe(account, False, f"refused: {exc.code} {exc.message}", advice(exc.code, exc.message))
    except TimeoutError:
        return Probe(account, False, f"no answer within {timeout:.0f} s (firewall, wrong port or wrong security?)")
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Probe(account, False, _describe(exc))
    await _close(smtp)
    done = "login accepted" if account.username else "connected (no login configured)"
    return Probe(account, True, f"{done} over {account.security}")


async def probe_all(config: Config) -> list[Probe]:
    results = list(await asyncio.gather(*(probe(a) for a in accounts(config))))
    await asyncio.sleep(0.1)  # TLS transports close asynchronously (close_notify): let them finish
    return results
