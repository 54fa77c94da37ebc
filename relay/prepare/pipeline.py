"""Stages 1 to 3 composed: identify the user, resolve their settings, rewrite the message. Pure.

``prepare`` is what happens between "the client finished DATA" and "the spool commits": it either
returns the messages to queue, or raises ``RefusedError`` with the reply the client must get.
Keeping it free of I/O makes every rule testable without a socket, and lets ``relay send-test``
run a test message through exactly the same steps as real mail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from relay import replies
from relay.config.accounts import account_for
from relay.config.models import Config
from relay.envelope import Account, Outgoing, Settings, Submission
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


# Whether a Graph account's token carries Mail.ReadWrite (``GraphTransport.may_upload``); ``None``: not known.
MayUpload = Callable[[Account], "bool | None"]


def _refuse_too_big_for_graph(config: Config, messages: list[Outgoing], may_upload: MayUpload | None) -> None:
    """Graph's sendMail takes at most 4 MB per request; a bigger message takes the draft route, which needs
    Mail.ReadWrite. Without it the message is refused now (552, before the 250), while the client can still
    tell its user, instead of being queued and then bounced. Not known yet (no token seen since the start):
    taken, and delivery tells the admin what is missing while the message waits."""
    for message in messages:
        try:
            account = account_for(config, message.account)
        except ConfigError:
            continue
        if account.transport != "graph" or fits(len(message.content), message.recipients):
            continue
        allowed = may_upload(account) if may_upload is not None else False
        if allowed is False:
            kb = GRAPH_MAX_REQUEST * 3 // 4 // 1024
            raise RefusedError(replies.R552_GRAPH_NEEDS_READWRITE.format(kb) if may_upload is not None
                               else replies.R552_TOO_BIG_FOR_GRAPH.format(kb))  # fmt: skip


def prepare(
    config: Config, sub: Submission, *, read_secret: SecretReader | None = None, may_upload: MayUpload | None = None
) -> Prepared:
    """``may_upload``: the daemon's knowledge of its Graph accounts' permissions (without it, a message over
    Graph's sendMail limit is refused, as for ``relay send-test``)."""
    settings = settings_for(config, sub)
    _refuse_early(config, settings, sub, may_upload)
    messages = rewrite(sub, settings, config, read_secret=read_secret)
    _refuse_too_big_for_graph(config, messages, may_upload)
    return Prepared(settings=settings, messages=messages)


def _refuse_early(config: Config, settings: Settings, sub: Submission, may_upload: MayUpload | None) -> None:
    """The same refusal before the rewrite, when the message as received is already over the limit: a
    message that will be refused is not parsed and copied first (30 MB cost 300 MB that way)."""
    account = settings.account
    if account is not None and account.transport == "graph" and not fits(len(sub.content)):
        _refuse_too_big_for_graph(config, [Outgoing(account.name, "", (), sub.content)], may_upload)


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
    _refuse_too_big_for_graph(config, messages, None)
    return Prepared(settings=settings, messages=messages)
