"""Bad input, end to end: each gets a precise error on its ConfigMap's status annotation and a LoadFailed
Event, does nothing to the other policies and data, and never crashes kopa (the run_kopa fixture fails a
test whose kopa exits or logs a traceback).

Every test runs kopa against the production-shape OPA (TLS + token) next to two bystanders, a policy and a
data ConfigMap that must stay loaded and ok. What kopa reported for each input goes to docs/reliability.md.
Related tests elsewhere: a dependency that resolves when its library arrives, and parse errors that wait
for their own change (test_configmaps.py); a ConfigMap near 1 MiB arriving by the initial list and as one
watch line (test_watch_resilience.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from devstack.opa import OpaServer
from devstack.processes import ManagedProcess, wait_until
from tests.faults.report import REPORT
from tests.integration.conftest import KopaFactory
from tests.integration.helpers import (
    DATA,
    OK,
    POLICY,
    STATUS,
    annotations_of,
    data,
    error_of,
    policy_ids,
    put_configmap,
    secure_args,
    status_of,
    wait_data,
    wait_policies,
    wait_status,
)

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
MAX_STATUS = 16 * 1024  # kopa's budget for its annotation
MAX_NOTE = 1024  # events.k8s.io/v1 limit on an Event's note
CONFIGMAP_LIMIT = 1024 * 1024  # the API server's limit on a ConfigMap's data


# --- helpers -----------------------------------------------------------------------------------------------


def tag_of(namespace: str) -> str:
    """A Rego identifier unique to the test, for package names."""
    return "b" + namespace.replace("-", "")


def start_kopa(
    run_kopa: KopaFactory, opa: OpaServer, core: client.CoreV1Api, namespace: str
) -> ManagedProcess:
    """kopa in the production shape, with the two bystanders loaded."""
    kopa = run_kopa(*secure_args(opa, namespace))
    tag = tag_of(namespace)
    put_configmap(
        core, namespace, "bystander", {"b.rego": f"package {tag}.bystander\n\nok := true\n"}, POLICY
    )
    put_configmap(core, namespace, "bystander-data", {"b.json": '{"ok": true}'}, DATA)
    assert wait_status(core, namespace, "bystander") == OK
    assert wait_status(core, namespace, "bystander-data") == OK
    return kopa


def assert_unharmed(kopa: ManagedProcess, opa: OpaServer, core: client.CoreV1Api, namespace: str) -> None:
    """The bystanders are still loaded and ok, and kopa is still running."""
    tag = tag_of(namespace)
    assert data(opa, f"{tag}/bystander/ok") is True
    assert data(opa, f"{namespace}/bystander-data/b.json") == {"ok": True}
    assert status_of(core, namespace, "bystander") == OK
    assert status_of(core, namespace, "bystander-data") == OK
    assert kopa.running, kopa.tail_log()


def failed(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    """Waits for the ConfigMap's status to be an error; returns the error (an object or a list)."""
    return error_of(wait_status(core, namespace, name, lambda v: v != OK))


def load_failed_event(core: client.CoreV1Api, namespace: str, name: str, action: str) -> Any:
    """Waits for kopa's LoadFailed Event about the ConfigMap and checks its fixed fields; returns it."""

    def find() -> list[Any]:
        events = client.EventsV1Api(core.api_client).list_namespaced_event(namespace).items
        return [e for e in events if e.regarding and e.regarding.name == name and e.reason == "LoadFailed"]

    event = wait_until(find, timeout=TIMEOUT, what=f"a LoadFailed event about {namespace}/{name}")[0]
    assert (event.type, event.action, event.reporting_controller) == (
        "Warning",
        action,
        "openpolicyagent.org/kopa",
    )
    assert event.regarding.kind == "ConfigMap" and event.regarding.namespace == namespace
    assert event.note and len(event.note) <= MAX_NOTE
    return event


def first_error(error: Any) -> tuple[str, str]:
    """(code, message) of the most specific error: OPA's first detailed error, or kopa's own."""
    top = error[0] if isinstance(error, list) else error
    details = top.get("errors") or []
    chosen = details[0] if details else top
    return str(chosen["code"]), str(chosen["message"])


def note(namespace: str, what: str, reported: str) -> None:
    """Adds a row to docs/reliability.md, with the test's namespace and package names made generic so
    that the document does not change from run to run."""
    generic = reported.replace(namespace, "<namespace>").replace(tag_of(namespace), "<package>")
    REPORT.bad_input(what, generic)


def record(namespace: str, what: str, status: str) -> None:
    """Adds the input and what kopa said about it (its status annotation) to docs/reliability.md."""
    error = error_of(status)
    code, message = first_error(error)
    if isinstance(error, list):
        truncated = [e for e in error if e.get("code") == "truncated"]
        shown = len(error) - len(truncated)
        suffix = f" ({truncated[0]['message']})" if truncated else ""
        note(namespace, what, f"{shown} errors, the first `{code}`: {message}{suffix}; {len(status)} bytes")
    else:
        note(namespace, what, f"`{code}`: {message}")


# --- Rego -----------------------------------------------------------------------------------------------


def test_invalid_rego_v0_syntax_and_an_undefined_function(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    tag = tag_of(namespace)
    cases = {
        # name: (what it is, Rego, OPA's error code, its message, the row it points at)
        "garbage": ("invalid Rego", "this is not rego {", "rego_parse_error", "unexpected eof token", 4),
        "v0": (
            "Rego v0 syntax on OPA 1.x (`allow { true }`)",
            "allow { true }",
            "rego_parse_error",
            "`if` keyword is required before rule body",
            3,
        ),
        "undefined": (
            "a module calling a function that no module defines",
            "allow if nope(input.x)",
            "rego_type_error",
            "undefined function nope",
            3,
        ),
    }
    for name, (_, body, _, _, _) in cases.items():
        put_configmap(core_v1, namespace, name, {"p.rego": f"package {tag}.{name}\n\n{body}\n"}, POLICY)
    for name, (what, _, code, message, row) in cases.items():
        error = failed(core_v1, namespace, name)
        assert error["code"] == "invalid_parameter", error
        detail = error["errors"][0]
        assert (detail["code"], detail["message"]) == (code, message), error
        assert (detail["location"]["file"], detail["location"]["row"]) == (f"{namespace}/{name}/p.rego", row)
        event = load_failed_event(core_v1, namespace, name, "LoadPolicy")
        assert message in event.note
        record(namespace, what, status_of(core_v1, namespace, name) or "")
    assert not {i for i in policy_ids(secure_opa) if i.startswith(f"{namespace}/") and "bystander" not in i}
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_conflicting_rules_in_one_package_fail_the_later_configmap_and_never_flip(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """Two ConfigMaps give package P a default for `allow` each: OPA refuses the second one loaded.

    After an OPA restart kopa loads modules in the order it first saw them, so the same one fails again;
    when the first goes, the second loads.
    """
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    package = f"{tag_of(namespace)}.conflict"
    first = f"package {package}\n\ndefault allow := false\n\nallow if input.x == 1\n"
    second = f"package {package}\n\ndefault allow := true\n"
    put_configmap(core_v1, namespace, "first", {"p.rego": first}, POLICY)
    assert wait_status(core_v1, namespace, "first") == OK
    put_configmap(core_v1, namespace, "second", {"p.rego": second}, POLICY)
    error = failed(core_v1, namespace, "second")
    code, message = first_error(error)
    assert code == "rego_type_error"
    assert f"multiple default rules data.{package}.allow found" in message, message
    load_failed_event(core_v1, namespace, "second", "LoadPolicy")
    record(
        namespace,
        "two ConfigMaps with conflicting rules in one package (`default allow`)",
        status_of(core_v1, namespace, "second") or "",
    )
    query = f"/v1/data/{package.replace('.', '/')}/allow"
    assert secure_opa.http().post(query, {"input": {"x": 1}})["result"] is True  # the first keeps working

    for _ in range(2):
        secure_opa.kill()
        secure_opa.start()
        wait_data(secure_opa, "system/kopa/ready", True)
        assert secure_opa.http().post(query, {"input": {"x": 1}})["result"] is True
        assert status_of(core_v1, namespace, "first") == OK
        assert error_of(status_of(core_v1, namespace, "second") or "") == error, "the failing module flipped"
        wait_policies(
            secure_opa,
            {f"{namespace}/first/p.rego", f"{namespace}/bystander/b.rego"},
            f"{namespace}/",
        )

    core_v1.delete_namespaced_config_map("first", namespace)
    assert wait_status(core_v1, namespace, "second") == OK
    assert secure_opa.http().post(query, {"input": {"x": 1}})["result"] is True  # now second's default
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_conflicting_constants_are_accepted_by_opa_and_fail_only_when_evaluated(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """`x := 1` and `x := 2` in one package, in two ConfigMaps: OPA 1.x compiles both (the conflict is an
    evaluation error), so neither ConfigMap can be told anything. Pinned here so that a change in OPA
    shows up; other packages are unaffected."""
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    package = f"{tag_of(namespace)}.consts"
    put_configmap(core_v1, namespace, "one", {"p.rego": f"package {package}\n\nx := 1\n"}, POLICY)
    put_configmap(core_v1, namespace, "two", {"p.rego": f"package {package}\n\nx := 2\n"}, POLICY)
    assert wait_status(core_v1, namespace, "one") == OK
    assert wait_status(core_v1, namespace, "two") == OK
    status, body = secure_opa.http().request("GET", f"/v1/data/{package.replace('.', '/')}/x")
    assert status == 500 and body["errors"][0]["code"] == "eval_conflict_error", body
    note(
        namespace,
        "`x := 1` and `x := 2` in one package, in two ConfigMaps",
        "both `ok`: OPA compiles them; evaluating the rule fails with `eval_conflict_error`",
    )
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


# --- data -----------------------------------------------------------------------------------------------


def test_data_that_is_not_a_json_object_keeps_the_last_good_value(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    bad = {"array.json": "[1, 2]", "number.json": "3", "text.json": "{not json"}
    put_configmap(core_v1, namespace, "mixed", {"good.json": '{"g": 1}', **bad}, DATA)
    errors = failed(core_v1, namespace, "mixed")
    assert [e["code"] for e in errors] == ["invalid_data"] * len(bad)
    for error, key in zip(errors, sorted(bad), strict=True):
        assert error["message"].startswith(f"key {key}: "), error
    assert "not valid JSON" in errors[sorted(bad).index("text.json")]["message"]
    assert "must be a JSON object, got an array" in errors[0]["message"]
    event = load_failed_event(core_v1, namespace, "mixed", "LoadData")
    assert "array.json" in event.note
    wait_data(secure_opa, f"{namespace}/mixed", {"good.json": {"g": 1}})
    for key, text in sorted(bad.items()):
        note(
            namespace, f"data key holding `{text}`", next(e["message"] for e in errors if key in e["message"])
        )

    # A key that stops parsing keeps its last good value in OPA, and says why.
    put_configmap(core_v1, namespace, "mixed", {"good.json": "{broken"}, DATA)
    error = error_of(wait_status(core_v1, namespace, "mixed", lambda v: "good.json" in v))
    assert error["code"] == "invalid_data" and error["message"].startswith("key good.json: not valid JSON")
    assert data(secure_opa, f"{namespace}/mixed") == {"good.json": {"g": 1}}
    note(
        namespace,
        "a data key that was valid and stops parsing",
        f"{error['message']}; OPA keeps the last good value",
    )
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_data_errors_name_json_types(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """A user writes JSON, so the error names JSON's types (number, string, boolean), not Python's. `null`
    is loaded as null, as kube-mgmt loads it (Go decodes it into an object as nothing)."""
    start_kopa(run_kopa, secure_opa, core_v1, namespace)
    scalars = {"b.json": "true", "n.json": "null", "i.json": "3", "s.json": '"text"'}
    put_configmap(core_v1, namespace, "scalars", scalars, DATA)
    messages = [e["message"] for e in failed(core_v1, namespace, "scalars")]
    assert messages == [
        "key b.json: must be a JSON object, got a boolean",
        "key i.json: must be a JSON object, got a number",
        "key s.json: must be a JSON object, got a string",
    ]
    wait_data(secure_opa, f"{namespace}/scalars", {"n.json": None})


def test_data_nested_deeper_than_orjson_writes_loads_and_spares_its_neighbours(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """300 levels: the API server and OPA take it, kube-mgmt loads it; kopa's JSON writer stops at 254."""
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    deep = '{"a":' * 300 + "1" + "}" * 300
    put_configmap(core_v1, namespace, "deep", {"deep.json": deep, "other.json": '{"o": 1}'}, DATA)
    assert wait_status(core_v1, namespace, "deep") == OK
    held = secure_opa.http().get_json(f"/v1/data/{namespace}/deep/other.json")
    assert held == {"result": {"o": 1}}
    assert data(secure_opa, f"{namespace}/deep/deep.json/" + "/".join(["a"] * 299)) == {"a": 1}
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


# --- size and number ------------------------------------------------------------------------------------


def test_configmaps_near_the_1mib_limit(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    package = f"{tag_of(namespace)}.big"
    comment = "".join(f"# {i:07d} {'x' * 89}\n" for i in range((CONFIGMAP_LIMIT - 16 * 1024) // 100))
    policy = f"package {package}\n\n{comment}\nbig := true\n"
    assert CONFIGMAP_LIMIT - 20 * 1024 < len(policy) < CONFIGMAP_LIMIT - len("p.rego")
    put_configmap(core_v1, namespace, "big-policy", {"p.rego": policy}, POLICY)
    assert wait_status(core_v1, namespace, "big-policy") == OK
    assert data(secure_opa, f"{package.replace('.', '/')}/big") is True
    assert (
        secure_opa.http().get_json(f"/v1/policies/{namespace}/big-policy/p.rego")["result"]["raw"] == policy
    )

    document = {"entries": {f"e{i:05d}": "y" * 88 for i in range((CONFIGMAP_LIMIT - 16 * 1024) // 100)}}
    text = json.dumps(document, separators=(",", ":"))
    assert CONFIGMAP_LIMIT - 20 * 1024 < len(text) < CONFIGMAP_LIMIT - len("d.json")
    put_configmap(core_v1, namespace, "big-data", {"d.json": text}, DATA)
    assert wait_status(core_v1, namespace, "big-data") == OK
    assert data(secure_opa, f"{namespace}/big-data/d.json") == document

    # The same size with a parse error at the very end: the error stays small.
    put_configmap(core_v1, namespace, "big-broken", {"p.rego": policy + "allow {\n"}, POLICY)
    failed(core_v1, namespace, "big-broken")
    status = status_of(core_v1, namespace, "big-broken") or ""
    assert len(status) < 2048, status[:300]
    load_failed_event(core_v1, namespace, "big-broken", "LoadPolicy")
    note(
        namespace,
        f"a policy of {len(policy)} bytes (a big comment) and a data key of {len(text)} bytes",
        "`ok`",
    )
    record(namespace, f"a policy of {len(policy) + 9} bytes with a parse error on its last line", status)
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_a_parse_error_on_a_very_long_line_keeps_its_code_and_location(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """OPA quotes the whole offending line in a parse error (`details.line`). For a line of 1000 KB, kopa
    drops every detailed error to fit its 4 KiB budget per error, and the ConfigMap is left with "error(s)
    occurred while compiling module(s)": no code, no message, no row. It should trim the quoted line."""
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    line = f'allow if "{"z" * (CONFIGMAP_LIMIT - 48 * 1024)}" == '
    rego = f"package {tag_of(namespace)}.line\n\n{line}\n"
    put_configmap(core_v1, namespace, "long-line", {"p.rego": rego}, POLICY)
    error = failed(core_v1, namespace, "long-line")
    status = status_of(core_v1, namespace, "long-line") or ""
    load_failed_event(core_v1, namespace, "long-line", "LoadPolicy")
    assert len(status) < 8 * 1024, status[:300]
    assert_unharmed(kopa, secure_opa, core_v1, namespace)
    detail = (error.get("errors") or [{}])[0]
    assert detail.get("code") == "rego_parse_error", f"the error lost its details: {status[:500]}"
    assert detail["location"]["file"] == f"{namespace}/long-line/p.rego"
    record(namespace, f"a parse error on a line of {len(line)} bytes", status)


def test_a_thousand_keys_many_failing_keep_the_annotation_small(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    tag = tag_of(namespace)
    docs = {f"k{i:04d}.json": ("{" if i % 5 < 3 else json.dumps({"i": i})) for i in range(1000)}
    # v0 syntax fails to parse; parse errors are cheap for OPA, compile errors would recompile 1000 modules.
    modules = {
        f"k{i:04d}.rego": f"package {tag}.k{i}\n\nallow {'{ true }' if i % 50 else ':= true'}\n"
        for i in range(1000)
    }
    put_configmap(core_v1, namespace, "many-data", docs, DATA)
    put_configmap(core_v1, namespace, "many-policies", modules, POLICY)
    for name, failing, action in (("many-data", 600, "LoadData"), ("many-policies", 980, "LoadPolicy")):
        errors = failed(core_v1, namespace, name)
        status = status_of(core_v1, namespace, name) or ""
        assert len(status.encode()) <= MAX_STATUS
        *shown, last = errors
        assert last["code"] == "truncated", last
        omitted = int(last["message"].split()[0])
        assert last["message"] == f"{omitted} more errors not shown"
        assert len(shown) + omitted == failing and len(shown) >= 10
        load_failed_event(core_v1, namespace, name, action)
        record(namespace, f"a ConfigMap with 1000 keys, {failing} of them failing ({action})", status)
    loaded = data(secure_opa, f"{namespace}/many-data")
    assert loaded == {k: json.loads(v) for k, v in docs.items() if v != "{"}
    wait_policies(
        secure_opa,
        {f"{namespace}/many-policies/k{i:04d}.rego" for i in range(0, 1000, 50)}
        | {f"{namespace}/bystander/b.rego"},
        f"{namespace}/",
    )
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_a_status_that_does_not_fit_beside_the_other_annotations_is_shortened(
    run_kopa: KopaFactory, opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """All annotations share 256 KiB, and a large ConfigMap applied with `kubectl apply` carries itself in
    one of them. The status was refused (422) at every retry, with no annotation and no Event."""
    run_kopa(f"--opa-url={opa.api_url}", f"--namespaces={namespace}")
    modules = {f"k{i:02d}.rego": "package x\n\nallow {\n" for i in range(20)}
    big = {"example.com/big": "x" * 255 * 1024}
    meta = client.V1ObjectMeta(name="crowded", labels=POLICY, annotations=big)
    core_v1.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta, data=modules))
    status = wait_status(core_v1, namespace, "crowded", lambda v: v != OK)
    error = json.loads(status)["error"]
    assert error["code"] == "invalid_parameter" and "shortened" in error["message"], error
    event = load_failed_event(core_v1, namespace, "crowded", "LoadPolicy")
    assert "k00.rego" in event.note or "unexpected" in event.note


# --- shape and names ------------------------------------------------------------------------------------


def test_binary_data_is_reported_and_data_beside_it_loads(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    blob = "eyJ4IjogMX0="  # base64 of {"x": 1}
    made: list[tuple[str, dict[str, str], dict[str, bytes | str], dict[str, str] | None]] = [
        ("binary-policy", POLICY, {"p.rego": blob}, None),
        ("binary-data", DATA, {"d.json": blob}, None),
        ("both", DATA, {"b.json": blob}, {"t.json": '{"t": 1}'}),
    ]
    for name, labels, binary, text in made:
        meta = client.V1ObjectMeta(name=name, labels=labels)
        body = client.V1ConfigMap(metadata=meta, binary_data=binary, data=text)
        core_v1.create_namespaced_config_map(namespace, body)
    for name, key, action in (
        ("binary-policy", "p.rego", "LoadPolicy"),
        ("binary-data", "d.json", "LoadData"),
        ("both", "b.json", "LoadData"),
    ):
        error = failed(core_v1, namespace, name)
        assert error == {
            "code": "invalid_parameter",
            "message": f"key {key}: binaryData is not read; put the content under data",
        }
        load_failed_event(core_v1, namespace, name, action)
    record(namespace, "`binaryData` only", status_of(core_v1, namespace, "binary-policy") or "")
    wait_data(secure_opa, f"{namespace}/both", {"t.json": {"t": 1}})
    assert data(secure_opa, f"{namespace}/binary-data") is None
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_names_that_need_escaping_in_opa_paths(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """ConfigMap names may hold dots; keys dots, dashes and underscores, up to 253 characters."""
    kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
    tag = tag_of(namespace)
    long_key = "k" * 248 + ".json"
    keys = ["a.b.json", "x_y.json", "weird-.-name.json", ".hidden.json", "-.json", "_", long_key]
    docs = {key: json.dumps({"key": key}) for key in keys}
    put_configmap(core_v1, namespace, "data.with.dots", docs, DATA)
    where = f'data[{json.dumps(namespace)}]["data.with.dots"]'
    # Each module reads the data key of its own name, through the dotted ConfigMap name.
    modules = {
        f"{key.removesuffix('.json')}.rego": f"package {tag}.m{i}\n\nv := {where}[{json.dumps(key)}].key\n"
        for i, key in enumerate(keys[:3])
    }
    put_configmap(core_v1, namespace, "dotted.name-x", modules, POLICY)
    assert wait_status(core_v1, namespace, "data.with.dots") == OK
    assert wait_status(core_v1, namespace, "dotted.name-x") == OK
    assert data(secure_opa, namespace)["data.with.dots"] == {key: {"key": key} for key in keys}
    wait_policies(
        secure_opa,
        {f"{namespace}/dotted.name-x/{key}" for key in modules} | {f"{namespace}/bystander/b.rego"},
        f"{namespace}/",
    )
    for i, key in enumerate(keys[:3]):
        assert data(secure_opa, f"{tag}/m{i}/v") == key

    # Removing keys and the ConfigMaps goes through the same escaping.
    put_configmap(core_v1, namespace, "dotted.name-x", {}, POLICY)
    put_configmap(core_v1, namespace, "data.with.dots", {"a.b.json": docs["a.b.json"]}, DATA)
    wait_policies(secure_opa, {f"{namespace}/bystander/b.rego"}, f"{namespace}/")
    wait_data(secure_opa, f"{namespace}/data.with.dots", {"a.b.json": {"key": "a.b.json"}})
    core_v1.delete_namespaced_config_map("data.with.dots", namespace)
    wait_data(secure_opa, f"{namespace}/data.with.dots", None)
    names = ", ".join(f"`{k}`" for k in keys[:6])
    note(
        namespace,
        f"names that need escaping in OPA paths: keys {names} and one of 253 characters, "
        "ConfigMaps `data.with.dots` and `dotted.name-x`",
        "`ok`; loaded and removed at the right paths",
    )
    assert_unharmed(kopa, secure_opa, core_v1, namespace)


def test_a_policy_configmap_in_an_unwatched_namespace_is_ignored(
    run_kopa: KopaFactory, secure_opa: OpaServer, core_v1: client.CoreV1Api, namespace: str
) -> None:
    """kopa watches only its namespaces (one watch each), so it never even receives this ConfigMap."""
    other = f"{namespace}-unwatched"
    core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        kopa = start_kopa(run_kopa, secure_opa, core_v1, namespace)
        package = f"{tag_of(namespace)}.unwatched"
        put_configmap(core_v1, other, "p", {"p.rego": f"package {package}\n\nx := 1\n"}, POLICY)
        put_configmap(core_v1, other, "bad", {"p.rego": "not rego"}, POLICY)
        # Something kopa does see, made afterwards: once it is loaded, the other two were not.
        put_configmap(core_v1, namespace, "after", {"a.rego": f"package {package}.after\n\nx := 1\n"}, POLICY)
        assert wait_status(core_v1, namespace, "after") == OK
        assert not {i for i in policy_ids(secure_opa) if i.startswith(f"{other}/")}
        assert data(secure_opa, f"{package.replace('.', '/')}/x") is None
        assert STATUS not in annotations_of(core_v1, other, "p")
        assert STATUS not in annotations_of(core_v1, other, "bad")
        assert other not in kopa.log_path.read_text(errors="replace")
        note(
            namespace,
            "a policy ConfigMap in a namespace kopa does not watch",
            "ignored: never loaded, no status",
        )
        assert_unharmed(kopa, secure_opa, core_v1, namespace)
    finally:
        core_v1.delete_collection_namespaced_config_map(other)
        core_v1.delete_namespace(other)
