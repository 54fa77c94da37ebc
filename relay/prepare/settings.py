"""Stage 2: company defaults (+) a user's overrides -> ``Settings``. Pure: no I/O.

Each field a user sets replaces the company's, one field at a time: a user with only an own
``from_address`` still sends through the company's upstream; a user with an own upstream (a name, or
inline account fields laid over the company's account) uses it. This is the seeds'
"user-specific email configuration takes precedence over the company's".
"""

from __future__ import annotations

from relay.config.accounts import account_for
from relay.config.models import Config, UpstreamOverride
from relay.envelope import USER_ACCOUNT_PREFIX, Settings


def _account_name(config: Config, user_id: str | None) -> str | None:
    user = config.users.get(user_id) if user_id is not None else None
    if user is not None and isinstance(user.upstream, UpstreamOverride):
        return USER_ACCOUNT_PREFIX + user_id  # type: ignore[operator]
    if user is not None and isinstance(user.upstream, str):
        return user.upstream
    return config.company.upstream or (next(iter(config.upstreams)) if len(config.upstreams) == 1 else None)


def resolve(config: Config, user_id: str | None, identified_by: str) -> Settings:
    """Settings for ``user_id`` (``None``: the company defaults alone)."""
    company = config.company
    user = config.users.get(user_id) if user_id is not None else None

    def pick(field: str) -> object:
        own = getattr(user, field) if user is not None else None
        return own if own is not None else getattr(company, field)

    name = _account_name(config, user_id)
    from_address = pick("from_address") or (user.addresses[0] if user is not None and user.addresses else None)
    reply_to = pick("reply_to_original")
    return Settings(
        user=user_id,
        identified_by=identified_by,
        enabled=company.enabled and not (user is not None and user.reject),
        from_address=str(from_address or ""),
        from_name=pick("from_name"),  # type: ignore[arg-type]
        copy_to=tuple(pick("copy_to") or ()),  # type: ignore[arg-type]
        copy_to_mode=company.copy_to_mode,
        signature=pick("signature"),  # type: ignore[arg-type]
        reply_to=pick("reply_to"),  # type: ignore[arg-type]
        reply_to_original=True if reply_to is None else bool(reply_to),
        account=account_for(config, name) if name is not None else None,
    )
