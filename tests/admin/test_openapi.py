"""The admin listener's OpenAPI document: complete, valid, and true.

``test_document_*`` fetch /openapi.json from a running admin app: a valid OpenAPI 3.1
document whose paths and methods are exactly the app's routes (an undocumented route fails).

``test_api_conforms`` runs schemathesis against a really listening ``keygate serve``
subprocess (schemathesis calls synchronously, so the server cannot share the test's event
loop) with an admin key (scopes ["*"]): every operation, valid and invalid inputs, bounded
and derandomized; every response must be no 5xx, a documented status and content type, and
a body matching the documented schema. Path ids are drawn about half the time from seeded
keys, so GET/PATCH/DELETE/rotate reach their 2xx paths (checked at the end), not only 404.
``test_hostile_input_is_a_documented_400`` pins inputs that once caused 500s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jsonschema_rs
import pytest
import requests
import schemathesis
import yaml
from aiohttp.test_utils import TestClient
from schemathesis import checks
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.definitions import OPENAPI_31

from gateway.admin.openapi import document
from tests.procs import delete_prefixed

SEED = 20260101
MAX_EXAMPLES = 30  # per operation, fuzzing phase; coverage-phase cases come on top
START_TIMEOUT = 20.0
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
LISTENING = re.compile(r"admin listener on (\S+)")
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
# Keys that GET, PATCH and rotate may name; DELETE draws from its own pool, so revoking
# these never turns the other operations' draws into misses.
STABLE_KEYS = 3
DISPOSABLE_KEYS = 8


_SEEDED: dict[str, tuple[str, ...]] = {}  # pool name -> key ids, set by the server fixture
_STATUSES: dict[str, set[int]] = {}  # operation label -> statuses schemathesis received


@dataclass(frozen=True)
class Server:
    base_url: str
    secret: str
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def _seed_body(i: int) -> dict[str, Any]:
    """Records with every optional field set, so responses are checked on full shapes too."""
    body: dict[str, Any] = {"name": f"seed-{i}", "workspace_id": f"ws-{i % 2}"}
    if i % 2:
        body |= {
            "team_name": "team",
            "type": "WORKSPACE_INVOKE",
            "scopes": ["apikeys:view", "models:*"],
            "resources": ["model-a"],
            "expires_at": "2099-01-01T00:00:00Z",
            "limit": 12.5,
            "limit_reset": "monthly",
            "include_byok_in_limit": True,
            "spend_caps": [{"amount": 3, "period": "daily"}, {"amount": 100, "period": "total"}],
            "rate_limit": {"requests": 10, "period_seconds": 1.5},
            "metadata": {"seed": str(i)},
        }
    if i % 3 == 2:
        body["disabled"] = True
    return body


def _child_env() -> dict[str, str]:
    # KEYGATE_* variables overlay the config file; the test's file alone must decide.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_listening(process: subprocess.Popen[bytes], log: Path) -> str:
    """The listener's base URL, once it answers; the port is the one the kernel chose."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"keygate serve exited with {process.returncode}:\n{log.read_text()}")
        match = LISTENING.search(log.read_text())
        if match:
            base_url = f"http://{match.group(1)}"
            try:
                if requests.get(f"{base_url}/openapi.json", timeout=2).ok:
                    return base_url
            except requests.ConnectionError:
                pass
        time.sleep(0.05)
    pytest.fail(f"keygate serve was not ready in {START_TIMEOUT}s:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _purge(redis_url: str, prefix: str) -> None:
    delete_prefixed(redis_url, prefix)


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``keygate serve`` in a subprocess on a kernel-chosen loopback port, with an admin
    key (scopes ["*"]) made by ``keygate keys create`` and seeded keys for the id pools."""
    prefix = f"kgt{uuid.uuid4().hex[:10]}:"
    workdir = tmp_path_factory.mktemp("openapi-server")
    config = workdir / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "admin_listen": "127.0.0.1:0",
                "redis": {"url": redis_url, "key_prefix": prefix},
                "log": {"format": "text", "level": "info"},
            }
        )
    )
    log = workdir / "serve.log"
    keygate = [sys.executable, "-m", "gateway"]
    try:
        created = subprocess.run(
            [*keygate, "keys", "create", "--json", "--scope", "*", "--config", str(config)],
            capture_output=True,
            check=True,
            cwd=workdir,
            env=_child_env(),
            timeout=30,
        )
        secret = json.loads(created.stdout)["key"]
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [*keygate, "serve", "--config", str(config)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=_child_env(),
            )
        try:
            running = Server(_wait_listening(process, log), secret, log)
            ids = []
            for i in range(STABLE_KEYS + DISPOSABLE_KEYS):
                reply = requests.post(
                    f"{running.base_url}/v1/keys",
                    json=_seed_body(i),
                    headers=running.headers,
                    timeout=5,
                )
                assert reply.status_code == 201, reply.text
                ids.append(reply.json()["id"])
            _SEEDED.update(stable=tuple(ids[:STABLE_KEYS]), disposable=tuple(ids[STABLE_KEYS:]))
            yield running
        finally:
            _SEEDED.clear()
            _stop(process)
    finally:
        _purge(redis_url, prefix)


async def _served_document(admin_client: TestClient[Any, Any]) -> dict[str, Any]:
    reply = await admin_client.get("/openapi.json")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    served: dict[str, Any] = await reply.json()
    return served


async def test_document_is_valid_openapi_31(admin_client: TestClient[Any, Any]) -> None:
    doc = await _served_document(admin_client)
    assert doc["openapi"].startswith("3.1.")
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(doc)
    # Every schema object is a valid JSON Schema 2020-12 (the OAS 3.1 dialect's base).
    for name, schema_object in _schema_objects(doc):
        assert jsonschema_rs.meta.is_valid(schema_object), name
    _check_refs(doc, doc)
    ids = [op["operationId"] for _, _, op in _each_operation(doc)]
    assert len(ids) == len(set(ids)), "operationId must be unique"
    for path, item, op in _each_operation(doc):
        parameters = (*item.get("parameters", ()), *op.get("parameters", ()))
        declared = {p["name"] for p in parameters if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path


async def test_document_covers_every_route(admin_client: TestClient[Any, Any]) -> None:
    """The app's route table and the document's paths and methods are the same set."""
    routes = {
        (route.method, resource.canonical)
        for resource in admin_client.app.router.resources()
        for route in resource
    }
    assert routes == {(m.upper(), p) for p, m in _methods(await _served_document(admin_client))}


def _methods(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def _each_operation(
    doc: dict[str, Any],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield path, item, op


def _schema_objects(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    yield from doc["components"]["schemas"].items()
    for path, _, op in _each_operation(doc):
        for parameter in op.get("parameters", ()):
            yield f"{path} {parameter['name']}", parameter["schema"]


def _check_refs(node: Any, doc: dict[str, Any]) -> None:
    """Every $ref is local and names something that exists."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/"), ref
            target: Any = doc
            for part in ref[2:].split("/"):
                assert part in target, f"unresolved {ref}"
                target = target[part]
        for value in node.values():
            _check_refs(value, doc)
    elif isinstance(node, list):
        for value in node:
            _check_refs(value, doc)


def test_served_document_is_the_one_fuzzed(server: Server) -> None:
    """schemathesis parametrizes at collection, before any server runs, so it is given the
    document built in-process; the listening server must serve exactly that document."""
    reply = requests.get(f"{server.base_url}/openapi.json", timeout=5)
    assert reply.status_code == 200
    assert reply.json() == json.loads(json.dumps(document()))


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            "generation": {
                "mode": "all",  # valid and invalid inputs: 4xx answers must be documented too
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                "with-security-parameters": False,  # the admin key is sent by the test
            },
        }
    )


schema = schemathesis.openapi.from_dict(document(), config=_config())


@schema.hook
def flatmap_path_parameters(context: Any, parameters: dict[str, Any] | None) -> Any:
    """About half the time, name a seeded key, so calls on one key reach their 2xx paths.

    DELETE draws from its own pool: revoking those keys never turns the other operations'
    draws into misses. The admin key is in neither pool, so it is never revoked or rotated.
    """
    if not parameters or "key_id" not in parameters:
        return st.just(parameters)
    pool = "disposable" if context.operation.method.lower() == "delete" else "stable"
    size = DISPOSABLE_KEYS if pool == "disposable" else STABLE_KEYS
    # Drawn as an index: the ids exist only once the server fixture has run.
    seeded = st.integers(0, size - 1).map(lambda i: {**parameters, "key_id": _SEEDED[pool][i]})
    return st.one_of(st.just(parameters), seeded)


@schema.parametrize()
def test_api_conforms(case: schemathesis.Case, server: Server) -> None:
    try:
        response = case.call_and_validate(
            base_url=server.base_url, headers=server.headers, checks=CHECKS, timeout=10
        )
    except Exception:
        # A 5xx is logged with its traceback by the server: show it with the failure.
        print(f"--- keygate serve log ---\n{server.log.read_text()[-20_000:]}")
        raise
    _STATUSES.setdefault(case.operation.label, set()).add(response.status_code)


# Inputs that once ended in a 500 (or were stored though the document refuses them); each
# must now be a documented 400. Bodies are raw bytes: JSON escapes and shapes a client can
# send, that schemathesis rarely generates within MAX_EXAMPLES.
HOSTILE = [
    ("lone-surrogate", "POST", "/v1/keys", {}, b'{"name": "\\ud800"}'),
    ("lone-surrogate-key", "POST", "/v1/keys", {}, b'{"metadata": {"\\udc00": "x"}}'),
    ("deep-nesting", "POST", "/v1/keys", {}, b'{"metadata": ' + b"[" * 100_000 + b"}"),
    ("year-10000", "POST", "/v1/keys", {}, b'{"expires_at": "9999-12-31T23:59:59-05:00"}'),
    (
        "year-10000-update",
        "PATCH",
        "/v1/keys/{key_id}",
        {},
        b'{"expires_at": "9999-12-31T23:59:59-01:00"}',
    ),
    ("newline-scope", "POST", "/v1/keys", {}, b'{"scopes": ["apikeys:view\\n"]}'),
    ("newline-workspace", "POST", "/v1/keys", {}, b'{"workspace_id": "ws\\n"}'),
    ("newline-secret", "POST", "/v1/keys/import", {}, b'{"key": "imported-secret\\n"}'),
    ("superscript-limit", "GET", "/v1/keys", {"limit": "\u00b2"}, None),
    ("arabic-digits-limit", "GET", "/v1/keys", {"limit": "\u0661\u0662"}, None),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "body"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE],
)
def test_hostile_input_is_a_documented_400(
    server: Server, method: str, path: str, query: dict[str, str], body: bytes | None
) -> None:
    parameters = {"key_id": _SEEDED["stable"][0]} if "{key_id}" in path else {}
    headers = {**server.headers, "Content-Type": "application/json"}
    response = requests.request(
        method,
        server.base_url + path.format(**parameters),
        params=query,
        data=body,
        headers=headers if body is not None else server.headers,
        timeout=10,
    )
    assert response.status_code == 400, response.text
    case = schema[path][method].Case(path_parameters=parameters, query=query)
    case.validate_response(response, checks=CHECKS)


def _conforming(server: Server, path: str, method: str, **parts: Any) -> Any:
    """Call one hand-written case through schemathesis' checks; its documented 2xx or fail."""
    case = schema[path][method].Case(**parts)
    response = case.call_and_validate(
        base_url=server.base_url, headers=server.headers, checks=CHECKS, timeout=10
    )
    operation = document()["paths"][path][method.lower()]
    success = [int(s) for s in operation["responses"] if s.startswith("2")]
    assert response.status_code in success, (method, path, response.status_code, response.text)
    return response.json() if response.content else None


def test_every_success_path_conforms(server: Server) -> None:
    """Each operation's 2xx, on real records, checked like the fuzzed cases. Fuzzing gets
    there only by luck for bodies (a schema-valid PATCH is often refused for a past
    expires_at), and which cases it draws depends on every module Hypothesis has loaded."""
    created = _conforming(
        server, "/v1/keys", "POST", body=_seed_body(1) | {"name": "success-paths"}
    )
    key_path = {"key_id": created["id"]}
    imported = _conforming(
        server, "/v1/keys/import", "POST", body={"key": f"imported-{uuid.uuid4().hex}"}
    )
    for key_id in (created["id"], imported["id"], *_SEEDED["stable"]):
        _conforming(server, "/v1/keys/{key_id}", "GET", path_parameters={"key_id": key_id})
    _conforming(
        server,
        "/v1/keys/{key_id}",
        "PATCH",
        path_parameters=key_path,
        body={"name": None, "disabled": True, "expires_at": None, "rate_limit": None},
    )
    _conforming(
        server,
        "/v1/keys/{key_id}/rotate",
        "POST",
        path_parameters=key_path,
        body={"grace_seconds": 30},
    )
    # Every record the run left (fuzzed ones included) renders as the document says.
    listed = _conforming(
        server, "/v1/keys", "GET", query={"limit": "1000", "include_disabled": "true"}
    )
    assert {created["id"], imported["id"], *_SEEDED["stable"]} <= {k["id"] for k in listed["data"]}
    _conforming(server, "/v1/keys/{key_id}", "DELETE", path_parameters=key_path)
    _conforming(server, "/openapi.json", "GET")


def test_fuzzing_named_seeded_keys(server: Server) -> None:
    """The path-parameter hook worked: fuzzed GET and DELETE of one key (no body to get
    wrong) found seeded keys, and the admin key survived the run."""
    if not _STATUSES:
        pytest.skip("test_api_conforms did not run")
    assert 200 in _STATUSES.get("GET /v1/keys/{key_id}", {200})
    assert 204 in _STATUSES.get("DELETE /v1/keys/{key_id}", {204})
    reply = requests.get(f"{server.base_url}/v1/keys?limit=1", headers=server.headers, timeout=5)
    assert reply.status_code == 200, "the admin key was revoked or rotated during the run"
