"""Transports: one attempt at one provider, and the one door the scheduler delivers through: SMTP
(``smtp.py``: password or XOAUTH2) or Microsoft Graph (``graph.py``). Imports ``config`` and the shared
modules only: it knows nothing of the spool.

Input: a resolved ``Account``, its password (``None`` for OAuth2 accounts), the envelope and the
body. Output: an ``Outcome``. The scheduler calls ``Transports.deliver`` and never learns what a
token or an HTTP status is; both transports share one ``TokenCache``, so an account's token is
fetched once for all its deliveries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from relay.config.credentials import Secret
from relay.envelope import Account
from relay.transports.graph import DraftStore, GraphTransport
from relay.transports.graph_large import Planner
from relay.transports.smtp import ConnectionPool, Outcome, deliver
from relay.transports.tokens import TokenCache


class Transports:
    """The daemon's delivery state: SMTP connections (``pool``), tokens, Graph's per-mailbox limits."""

    def __init__(
        self, pool: ConnectionPool, *, on_token_failure: Callable[[str], None] | None = None,
        graph_planner: Planner | None = None,
    ) -> None:  # fmt: skip
        """``graph_planner``: how Graph's draft route splits a big message (``relay.prepare.graph_split.plan``,
        given by the caller: a transport does not parse MIME); without it, Graph takes what sendMail takes."""
        self.pool = pool
        self.tokens = TokenCache(on_failure=on_token_failure)
        self.graph = GraphTransport(self.tokens, graph_planner)

    async def deliver(
        self, account: Account, secret: Secret | None, mail_from: str, recipients: list[str], body: bytes | Path,
        *, deadline: float | None = None, eightbit: bool | None = None, drafts: DraftStore | None = None,
        logged_in: Callable[[], None] | None = None,
    ) -> Outcome:  # fmt: skip
        """One attempt through the account's transport; never raises for a delivery problem. ``drafts``: where
        Graph's draft route records its steps for this entry (see ``graph.py``); ``logged_in``: called once
        an SMTP session is logged in (the scheduler's sign that a login works, before the message is sent)."""
        if account.transport == "graph":
            return await self.graph.send(account, mail_from, recipients, body, deadline=deadline, drafts=drafts)
        return await deliver(
            account, secret, mail_from, recipients, body,
            pool=self.pool, deadline=deadline, eightbit=eightbit, tokens=self.tokens, logged_in=logged_in,
        )  # fmt: skip

    async def aclose(self) -> None:
        """Close the kept connections: SMTP's pool and the HTTPS clients of tokens and Graph."""
        await self.pool.close_all()
        await self.tokens.http.aclose()
