"""The config file's JSON Schema (draft 2020-12), for editors: ``relay schema > relay.schema.json``.

Generated from the pydantic models in ``models.py`` (``Config.model_json_schema``), so it cannot drift
from what ``relay check`` accepts key by key: the models' docstrings and their fields' docstrings are
the descriptions an editor shows while typing, unknown keys are errors (``additionalProperties:
false``), and ``password`` (which relay refuses) is not offered. What the schema cannot say, the
cross-key rules (one password source, an upstream name that exists, ...), ``relay check`` still
reports; the schema is an aid while editing, ``relay check`` is the judge.

VS Code (Red Hat's YAML extension) and other yaml-language-server editors pick it up from a first
line ``# yaml-language-server: $schema=/etc/relay/relay.schema.json`` in the YAML file.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from relay import __version__
from relay.config.models import Config

DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Generator(GenerateJsonSchema):
    """pydantic's draft 2020-12 output without a title per field ("Max Recipients" says nothing the key
    does not; editors show the description instead)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def config_schema() -> dict[str, Any]:
    """The schema of relay's YAML config file, as a JSON-ready dict."""
    schema = Config.model_json_schema(mode="validation", schema_generator=_Generator)
    for definition in schema.get("$defs", {}).values():
        if "description" in definition:
            definition["description"] = _summary(definition["description"])
    return {
        "$schema": DIALECT,
        **schema,
        "title": "relay configuration",
        "description": f"relay {__version__} config file (relay.yaml); config.example.yaml shows every key with "
        "its default. `relay check FILE` also checks what a schema cannot (names that must exist, one "
        "password source per account).",
    }


def _summary(docstring: str) -> str:
    """A model docstring's first paragraph, on one line: the rest is written for relay's developers."""
    return " ".join(docstring.split("\n\n")[0].split()).replace("``", "`")
