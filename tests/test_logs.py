"""The log set-up as the daemon runs it: JSON lines, secrets masked by key name (``logs.redact``)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from relay import logs


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """``logs.configure`` writing JSON into a buffer; the test run's own logging set-up comes back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    stream = io.StringIO()
    logs.configure(fmt="json", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:], root.level = handlers, level
        structlog.configure(**config)


def events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_keys_that_name_a_secret_are_masked_whatever_their_case(json_lines: io.StringIO) -> None:
    """Any key holding one of the secret words, in any case and twice in a row (the check is remembered
    per key name), is masked; the rest go out as given."""
    log = structlog.get_logger("relay.test")
    fields = {"password": "hunter2", "client_secret": "s3cr3t", "Refresh_Token": "r-tok", "AUTH_DATA": "a",
              "login_data": "l", "credential_file": "/etc/x", "user": "alice", "queue_id": "Q1", "size": 2}  # fmt: skip
    for _ in range(2):
        log.info("attempt", **fields)

    lines = events(json_lines)

    assert 2 == len(lines)
    for event in lines:
        for key in ("password", "client_secret", "Refresh_Token", "AUTH_DATA", "login_data", "credential_file"):
            assert "..." == event[key]
        assert ("alice", "Q1", 2) == (event["user"], event["queue_id"], event["size"])
    assert not any(value in json_lines.getvalue() for value in ("hunter2", "s3cr3t", "r-tok", "/etc/x"))



def test_a_hot_path_event_is_skipped_only_where_its_level_drops_it(json_lines: io.StringIO) -> None:
    """``logs.enabled`` (asked before building ``received`` and a delivered ``delivery_attempt``) says
    no at level warning, yes at info, and yes under structlog's ``capture_logs``, which keeps every event."""
    assert logs.enabled("relay.listener")  # configure's default level: info
    logging.getLogger().setLevel(logging.WARNING)
    assert not logs.enabled("relay.listener")
    assert logs.enabled("relay.listener", logging.WARNING)
    with structlog.testing.capture_logs():
        assert logs.enabled("relay.listener")
