"""JSON as deep as orjson reads it goes out again, and compares, instead of failing at every attempt."""

from __future__ import annotations

import sys

import orjson
import pytest

from app.configmaps.data import parse_document
from app.jsonbytes import dumps, equal, loads
from app.replication.objects import content_digest, converter


def nested(depth: int) -> str:
    return '{"b":' * depth + '[1,"é",{"z":1,"a":2}]' + "}" * depth


@pytest.mark.parametrize("depth", [1, 253, 254, 600, 1020])
def test_dumps_writes_what_orjson_reads_and_leaves_the_recursion_limit_as_it_was(depth: int) -> None:
    limit = sys.getrecursionlimit()
    text = nested(depth)
    value = orjson.loads(text)
    assert dumps(value) == text.encode()
    assert dumps(value, sort_keys=True) == text.replace('{"z":1,"a":2}', '{"a":2,"z":1}').encode()
    assert equal(value, orjson.loads(text))
    assert not equal(value, orjson.loads(text.replace('"z":1', '"z":2')))
    assert sys.getrecursionlimit() == limit


def test_a_deep_data_document_and_null_are_taken_as_kube_mgmt_takes_them() -> None:
    assert parse_document("deep.json", nested(300)) == (nested(300).encode(), None)
    assert parse_document("n.json", "null") == (b"null", None)
    assert parse_document("a.json", "[1]")[1] == {
        "code": "invalid_data",
        "message": "key a.json: must be a JSON object, got an array",
    }


def test_a_deep_replicated_object_is_converted_and_digested() -> None:
    obj = {
        "metadata": {"name": "w", "namespace": "ns", "resourceVersion": "7"},
        "spec": orjson.loads(nested(300)),
    }
    replica = converter("Widget", "example.com/v1", keep_managed_fields=False)(obj)
    assert orjson.loads(replica.body)["kind"] == "Widget"
    assert replica.digest == content_digest({**obj, "metadata": {"name": "w", "namespace": "ns"}})


def test_lone_surrogate_escapes_read_as_go_reads_them() -> None:
    """Go's decoder (kube-mgmt's, OPA's) reads a lone surrogate escape as U+FFFD; orjson refused the key."""
    text = '{"k\\ud800":["\\udc00x", "\\ud83d\\ude00", {"n": 1.5}], "deep": ' + nested(300) + "}"
    document, error = parse_document("s.json", text)
    assert error is None and document is not None
    value = orjson.loads(document)
    assert value["k\ufffd"] == ["\ufffdx", "\U0001f600", {"n": 1.5}]
    assert value["deep"] == orjson.loads(nested(300))
    assert loads(b'"\\ud800"') == "\ufffd"


@pytest.mark.parametrize("text", ['{"a": "\\ud800", "b": NaN}', '{"a": "\\ud800"', '{"a": "\\ud8"}'])
def test_text_that_is_not_json_for_another_reason_too_is_still_refused(text: str) -> None:
    _, error = parse_document("s.json", text)
    assert error is not None and error["message"].startswith("key s.json: not valid JSON: ")
