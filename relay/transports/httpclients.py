"""Pooled HTTPS clients for the token endpoint and Microsoft Graph.

A client per request would cost a TCP and TLS handshake for every token request and every Graph
``sendMail``: a month-end run of invoices through Graph would open hundreds of connections to the
same host. One ``httpx.AsyncClient`` per TLS setting keeps its connections alive between requests,
the way aiosmtplib connections are kept in ``delivery.ConnectionPool``.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx

from relay.envelope import Account
from relay.transports.smtp import tls_context

_Key = tuple[asyncio.AbstractEventLoop, str, bool, float]


class HttpClients:
    """One client per (event loop, ``ca_file``, ``verify``, ``timeout``); closed by ``aclose``."""

    def __init__(self) -> None:
        self._clients: dict[_Key, tuple[ssl.SSLContext, httpx.AsyncClient]] = {}
        self._retired: list[httpx.AsyncClient] = []

    def get(self, account: Account) -> httpx.AsyncClient:
        """The client for this account's TLS setting; a replaced ``ca_file`` gets a new one.

        Raises:
            OSError: the ``ca_file`` cannot be read.
        """
        context = tls_context(account)
        key = (asyncio.get_running_loop(), str(account.ca_file or ""), account.verify, account.timeout)
        held = self._clients.get(key)
        if held is not None and held[0] is context:
            return held[1]
        if held is not None:  # requests in flight may still use it: closed with the others at the end
            self._retired.append(held[1])
        client = httpx.AsyncClient(verify=context, timeout=account.timeout)
        self._clients[key] = (context, client)
        return client

    async def aclose(self) -> None:
        """Close the clients of the running loop (the daemon's stop, the end of ``relay check``)."""
        loop = asyncio.get_running_loop()
        mine = [key for key in self._clients if key[0] is loop]
        clients = [self._clients.pop(key)[1] for key in mine] + self._retired
        self._retired = []
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
