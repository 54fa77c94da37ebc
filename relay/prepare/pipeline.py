"""Stages 1 to 3 composed: identify the user, resolve their settings, rewrite the message. Pure.

``prepare`` is what happens between "the client finished DATA" and "the spool commits": it either
returns the messages to queue, or raises ``RefusedError`` with the reply the client must get.
Keeping it free of I/O makes every rule testable without a socket, and lets ``relay send-test``
run a test message through exactly the same steps as real mail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from relay import replies
from relay.config.accounts import account_for
from relay.config.models import Config
from relay.envelope import Outgoing, Settings, Submission
from relay.errors import ConfigError, RefusedError
from relay.prepare.identify import identify
from relay.prepare.rewrite import rewrite
from relay.prepare.settings import resolve
from relay.prepare.sms import SecretReader
from relay.transports.graph import GRAPH_MAX_REQUEST, fits


@dataclass(frozen=True)
class Prepared:
    """The outcome of the pure stages for one submission."""

    settings: Settings
    messages: list[Outgoing]


def settings_for(config: Config, sub: Submission) -> Settings:
    """Identify the submitting user and resolve their settings; refuse who may not send."""
    if not config.company.enabled:
        raise RefusedError(replies.R550_DISABLED)
    return _may_send(resolve(config, *identify(config, sub)))


def _may_send(settings: Settings) -> Settings:
    if not settings.enabled:
        raise RefusedError(replies.R550_USER_REJECTED)
    if settings.account is None:
        raise RefusedError(replies.R451_NO_UPSTREAM)
    return settings


def _refuse_too_big_for_graph(config: Config, messages: list[Outgoing]) -> None:
    """Graph takes at most 4 MB per request: a bigger message is refused now (552, before the 250),
    while the client can still tell its user, instead of being queued and then bounced."""
    for message in messages:
        try:
            account = account_for(config, message.account)
        except ConfigError:
            continue
        if account.transport == "graph" and not fits(len(message.content), message.recipients):
            raise RefusedError(replies.R552_TOO_BIG_FOR_GRAPH.format(GRAPH_MAX_REQUEST * 3 // 4 // 1024))


def prepare(config: Config, sub: Submission, *, read_secret: SecretReader | None = None) -> Prepared:
    settings = settings_for(config, sub)
    messages = rewrite(sub, settings, config, read_secret=read_secret)
    _refuse_too_big_for_graph(config, messages)
    return Prepared(settings=settings, messages=messages)


def prepare_as(
    config: Config, sub: Submission, user_id: str | None, *, rule: str = "send_test", copy_to: bool = True,
    read_secret: SecretReader | None = None,
) -> Prepared:
    """``prepare`` for a user chosen by the caller (``relay send-test USER``; ``None``: the company),
    not identified from the message: the same resolution, refusals and rewriting as real mail.
    ``copy_to=False`` leaves the default recipients out (a test must not reach a customer)."""
    if not config.company.enabled:
        raise RefusedError(replies.R550_DISABLED)
    settings = _may_send(resolve(config, user_id, rule))
    if not copy_to:
        settings = dataclasses.replace(settings, copy_to=())
    messages = rewrite(sub, settings, config, read_secret=read_secret)
    _refuse_too_big_for_graph(config, messages)
    return Prepared(settings=settings, messages=messages)
