"""The account each upstream name or user override stands for: the company's account with a user's
own fields laid over it, and the provider's default sending limits filled in.

Shared by the settings resolution, the scheduler and ``relay check``: pure, no I/O."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from relay.config.models import Config, OAuth2Config, SendingLimits, UpstreamConfig, UpstreamOverride
from relay.config.secretstore import password_path
from relay.config.types import SECRET_KEYS
from relay.envelope import USER_ACCOUNT_PREFIX, Account, OAuth2, SendLimits
from relay.errors import ConfigError, ConfigProblem
from relay.memo import ByIdentity


def laid_over(base: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """A user's own account keys over the company's account keys (same server).

    An own password source replaces the company's whole way of logging in (its password source, or its
    OAuth2), and an own ``oauth2:`` replaces its password source: a login is never half of each.
    """
    fields = dict(base)
    if any(own.get(key) for key in SECRET_KEYS):
        for key in (*SECRET_KEYS, "auth", "oauth2"):
            fields.pop(key, None)
    if own.get("oauth2") is not None or own.get("auth") == "oauth2":
        for key in SECRET_KEYS:
            fields.pop(key, None)
    return {**fields, **own}

# What each provider allows one mailbox, used for every key the admin leaves out (matched on the host).
PROVIDER_DEFAULTS: dict[str, dict[str, int]] = {
    "smtp.office365.com": {"messages": 30, "recipients_per_day": 10000},
    "smtp-mail.outlook.com": {"messages": 30, "recipients_per_day": 10000},
    "graph.microsoft.com": {"messages": 30, "recipients_per_day": 10000},  # the same mailbox limits
    "smtp.gmail.com": {"messages_per_day": 2000, "recipients_per_message": 100},
}


def effective(host: str, configured: SendingLimits) -> SendLimits:
    """The configured limits, each key left out taken from the provider's defaults."""
    defaults = PROVIDER_DEFAULTS.get(host.lower().rstrip("."), {})
    given = configured.model_dump(exclude_none=True)
    return SendLimits(**{**defaults, **given})

def _oauth2(up: UpstreamConfig) -> OAuth2 | None:
    """The token source of an OAuth2 account, with the provider's defaults filled in."""
    oauth: OAuth2Config | None = up.oauth2
    if oauth is None or (up.auth != "oauth2" and up.type != "graph"):
        return None
    return OAuth2(
        provider=oauth.provider,
        token_url=oauth.effective_token_url(),
        scope=oauth.effective_scope(up.type),
        client_id=oauth.client_id or "",
        client_secret_file=oauth.client_secret_file,
        client_secret_env=oauth.client_secret_env,
        client_secret_credential=oauth.client_secret_credential,
        refresh_token_file=oauth.refresh_token_file,
        refresh_token_env=oauth.refresh_token_env,
        refresh_token_credential=oauth.refresh_token_credential,
        client_secret_expires=oauth.client_secret_expires,
        client_certificate_file=oauth.client_certificate_file,
        client_key_file=oauth.client_key_file,
        client_key_password_file=oauth.client_key_password_file,
        client_key_password_env=oauth.client_key_password_env,
        client_key_password_credential=oauth.client_key_password_credential,
        service_account_file=oauth.service_account_file,
        subject=up.username if oauth.service_account_file is not None else None,
        authorize_url=oauth.authorize_url,
        device_url=oauth.device_url,
    )


def _account(name: str, up: UpstreamConfig) -> Account:
    return Account(
        name=name,
        host=up.host,
        port=up.effective_port,
        security=up.security,
        username=up.username,
        password_file=up.password_file,
        password_env=up.password_env,
        password_credential=up.password_credential,
        ca_file=up.ca_file,
        verify=up.verify,
        timeout=up.timeout,
        local_hostname=up.local_hostname,
        max_connections=up.max_connections,
        transport=up.type,
        oauth2=_oauth2(up),
        auth_mechanism=up.auth_mechanism,
        limits=effective(up.host, up.sending_limits),
    )


def _overlay(base: UpstreamConfig | None, own: UpstreamOverride) -> UpstreamConfig:
    """Lay a user's own account fields over the company's account, field by field.

    A user's own server (another host) is a separate account: nothing of the company's is inherited, so
    the company's login and password are never sent to it. A user's own security without an own port
    gets that security's default port, not the company's (no ssl on 587).
    """
    given = own.model_dump(exclude_none=True, exclude={"password"})
    if base is None or str(given.get("host", base.host)).lower() != base.host.lower():
        return UpstreamConfig.model_validate(given)
    fields = base.model_dump(exclude_none=True, exclude={"password"})
    if "port" not in given and given.get("security", base.security) != base.security:
        fields.pop("port", None)
    # a user's own password replaces the company's whole login (password or OAuth2), and vice versa
    return UpstreamConfig.model_validate(laid_over(fields, given))


def account_for(config: Config, name: str) -> Account:
    """The account a queue entry names, resolved against the *current* config.

    Asked several times per message (pipeline, scheduler, limits): worked out once per config and name.
    """
    return _account_for(ByIdentity(config), name)


@functools.lru_cache(maxsize=256)
def _account_for(key: ByIdentity[Config], name: str) -> Account:
    config = key.obj
    if name.startswith(USER_ACCOUNT_PREFIX):
        user = config.users.get(name.removeprefix(USER_ACCOUNT_PREFIX))
        if user is not None and isinstance(user.upstream, UpstreamOverride):
            base = config.upstreams.get(config.company.upstream or "")
            account = _account(name, _overlay(base, user.upstream))
            return _with_store(config, name.removeprefix(USER_ACCOUNT_PREFIX), user.upstream, account)
    elif name in config.upstreams:
        return _account(name, config.upstreams[name])
    raise ConfigError([ConfigProblem("upstreams", f"queued mail names upstream {name!r}, which is no longer configured")])


def _with_store(config: Config, user_id: str, own: UpstreamOverride, account: Account) -> Account:
    """A user's own password login that names no password source itself reads the user's file in the
    secret store (``relay passwd USER``); a source inherited from the company's account is then only
    the fallback while that file does not exist (credentials.read_password)."""
    if own.has_secret or account.oauth2 is not None or account.transport != "smtp" or account.username is None:
        return account
    path = password_path(config.secret_store, user_id)
    return dataclasses.replace(account, password_store=path) if path is not None else account


def every_account(config: Config) -> list[Account]:
    """Every account relay may deliver through: named upstreams and users' own accounts."""
    names = list(config.upstreams)
    names += [USER_ACCOUNT_PREFIX + u for u, user in config.users.items() if isinstance(user.upstream, UpstreamOverride)]
    return [account_for(config, name) for name in names]
