"""``relay schema``: a draft 2020-12 JSON Schema of the config that accepts the shipped configs, flags the
mistakes ``relay check`` flags key by key, offers no inline password, and describes every key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from relay.commands import demo
from relay.commands.cli import main
from relay.config.load import parse_config
from relay.config.schema import config_schema
from relay.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    """The schema as ``relay schema`` prints it (JSON and back), itself a valid draft 2020-12 schema."""
    schema = json.loads(json.dumps(config_schema()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_command_prints_the_schema_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert 0 == main(["schema"])
    printed = json.loads(capsys.readouterr().out)

    assert "https://json-schema.org/draft/2020-12/schema" == printed["$schema"]
    assert {"listeners", "upstreams", "company", "users", "limits"} <= set(printed["properties"])


def errors(validator: jsonschema.Draft202012Validator, data: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def test_config_example_yaml_is_valid_against_it(validator: jsonschema.Draft202012Validator) -> None:
    assert [] == errors(validator, yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))


def test_the_demo_s_built_in_config_is_valid_against_it(validator: jsonschema.Draft202012Validator) -> None:
    text = demo.DEMO_CONFIG.format(data="/tmp/d", user=demo.DEMO_USER, upstream_port=4650, relay_port=2525,
                                   password_env=demo.PASSWORD_ENV)  # fmt: skip
    assert [] == errors(validator, yaml.safe_load(text))


BASE = """\
upstreams:
  o365: {host: smtp.office365.com, port: 587, username: a@yritys.fi, password_file: /etc/relay/secrets/o365}
company: {from_address: a@yritys.fi, upstream: o365}
"""


@pytest.mark.parametrize(
    ("mistake", "where"),
    [
        ("listners: []", ""),  # a misspelt top-level key
        ("limits: {max_recipents: 10}", "limits"),  # a misspelt nested key
        ("delivery: {workers: four}", "delivery.workers"),  # a wrong type
        ("limits: {max_message_size: 35 megs}", "limits.max_message_size"),  # a size that is not one
        ("listeners: [{port: 70000}]", "listeners.0.port"),  # out of range
        ("listeners: [{address: localhost}]", "listeners.0.address"),  # a name, not an IP address
        ("metrics: {address: localhost}", "metrics"),  # (metrics may be null: the anyOf reports it)
        ("identify: {unknown: bounce}", "identify.unknown"),  # not one of the choices
        ("users: {matti: {upstream: {host: smtp.gmail.com, security: tls}}}", "users.matti.upstream"),
        ("sms: {password: hunter2}", "sms"),  # passwords are never written in the file
    ],
)
def test_a_typical_mistake_is_flagged_where_relay_check_flags_it(
    validator: jsonschema.Draft202012Validator, mistake: str, where: str
) -> None:
    text = BASE + mistake + "\n"
    found = errors(validator, yaml.safe_load(text))

    assert found and all(e.startswith(f"{where}:") if where else e.startswith(":") for e in found), found
    with pytest.raises(ConfigError):
        parse_config(text)


def test_the_base_of_those_mistakes_is_itself_valid(validator: jsonschema.Draft202012Validator) -> None:
    assert [] == errors(validator, yaml.safe_load(BASE))
    parse_config(BASE)


def test_an_inline_password_is_not_offered(validator: jsonschema.Draft202012Validator) -> None:
    definitions = validator.schema["$defs"]
    offered = {name for d in definitions.values() for name in d.get("properties", {})}

    assert {"password_file", "password_env", "password_credential"} <= offered
    assert "password" not in offered and "source" not in validator.schema["properties"]


def _properties(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return []
    found = [(f"{path}.{k}", v) for k, v in node.get("properties", {}).items()]
    for key, value in node.items():
        if isinstance(value, dict):
            found += _properties(value, f"{path}/{key}")
    return found


def test_every_key_has_a_description_an_editor_can_show(validator: jsonschema.Draft202012Validator) -> None:
    """A new config key needs a docstring under its field in config.py (and a line in config.example.yaml)."""
    undescribed = [path for path, prop in _properties(validator.schema) if not prop.get("description")]

    assert [] == undescribed
