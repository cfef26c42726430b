"""The test stack's YAML for kubectl and helm: Go reads `64367e80` as a number, PyYAML writes it bare."""

from __future__ import annotations

import pytest
import yaml

from devstack import goyaml


@pytest.mark.parametrize(
    "text", ["64367e80", "1e5", "1234", "-12", "1.5", ".5", "1_000", "0x1f", "0o17", ".inf"]
)
def test_a_string_go_would_read_as_a_number_is_quoted(text: str) -> None:
    dumped = goyaml.dump({"value": text})
    assert dumped.strip() in (f"value: '{text}'", f'value: "{text}"')
    assert yaml.safe_load(dumped) == {"value": text}


@pytest.mark.parametrize("text", ["abc", "e5", "a1e5", "v1", "kopa-system", "1.2.3"])
def test_other_strings_stay_plain(text: str) -> None:
    assert goyaml.dump({"value": text}).strip() == f"value: {text}"


def test_numbers_stay_numbers_and_documents_keep_their_order() -> None:
    docs = [{"b": 1, "a": 1.5}, {"kind": "Namespace"}]
    dumped = goyaml.dump_all(docs, sort_keys=False)
    assert list(yaml.safe_load_all(dumped)) == docs
    assert dumped.index("b:") < dumped.index("a:")
