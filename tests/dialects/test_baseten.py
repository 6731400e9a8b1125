"""Baseten's ``GET /v1/api_keys`` (seeds/baseten-get-all-api-keys.txt): the caller's
workspace with ``Authorization: Api-Key`` or ``Bearer``, checked against the seed's own JSON
schema and driven with the ``baseten`` SDK's management client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml
from baseten.client import AsyncManagementClient, ManagementClient
from baseten.client.managementapi import GetApiKeysParams
from baseten.client.managementapi._client import ResponseError

from gateway.store.record import KEY_TYPES
from tests.conftest import MakeKey
from tests.proxy.conftest import Gateway, StartGateway

PATH = "/v1/api_keys"
VIEW = ["apikeys:view"]

# The seed's ``components.schemas``, verbatim (seeds live outside the repository).
SEED_SCHEMAS = yaml.safe_load("""
APIKeysV1:
  description: A list of API keys.
  properties:
    keys:
      description: A list of API key information
      items:
        $ref: '#/components/schemas/APIKeyInfoV1'
      title: Keys
      type: array
  required:
    - keys
  title: APIKeysV1
  type: object
APIKeyInfoV1:
  description: Represents the metadata of an API key.
  properties:
    prefix:
      description: The prefix of the API key
      title: Prefix
      type: string
    name:
      anyOf:
        - type: string
        - type: 'null'
      default: null
      description: Optional name for the API key
      examples:
        - my-api-key
      title: Name
    type:
      $ref: '#/components/schemas/APIKeyCategory'
      description: Type of the API key.
      examples:
        - PERSONAL
        - WORKSPACE_EXPORT_METRICS
        - WORKSPACE_INVOKE
        - WORKSPACE_MANAGE_ALL
    model_ids:
      anyOf:
        - items:
            type: string
          type: array
        - type: 'null'
      default: null
      description: >-
        List of model IDs to scope the API key to, only present if type is
        'WORKSPACE_EXPORT_METRICS' or 'WORKSPACE_INVOKE'
      examples:
        - - aaaaaaaa
      title: Model Ids
    team_name:
      anyOf:
        - type: string
        - type: 'null'
      default: null
      description: The name of the team associated with the API key
      title: Team Name
  required:
    - prefix
    - type
  title: APIKeyInfoV1
  type: object
APIKeyCategory:
  description: Enum representing the category of an API key.
  enum:
    - PERSONAL
    - WORKSPACE_MANAGE_ALL
    - WORKSPACE_EXPORT_METRICS
    - WORKSPACE_INVOKE
  title: APIKeyCategory
  type: string
""")
LIST_SCHEMA = {"$ref": "#/components/schemas/APIKeysV1", "components": {"schemas": SEED_SCHEMAS}}
SEED_FIELDS = {"prefix", "name", "type", "model_ids", "team_name"}
SDK_FIELDS = {"created_at", "last_used_at", "owner"}  # the SDK's APIKeyInfo needs created_at


def api_key(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Api-Key {secret}"}


def truss_headers(api_key: str) -> dict[str, str]:
    """What truss 0.18.36 sends to Baseten's REST API for a ~/.trussrc key, reproduced
    because truss cannot be pointed at keygate: ``resolve_rest_api_url`` maps any unknown
    remote_url to https://api.baseten.co. Source: truss/remote/baseten/auth.py,
    ``AuthService.fetch_auth_header`` (``use_bearer`` is False for trussrc remotes):
    ``scheme = "Bearer" if self._credential.use_bearer else "Api-Key"``."""
    return {"Authorization": f"Api-Key {api_key}"}


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], **params: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.get(f"{url}{PATH}", headers=headers, params=params) as response:
        return response.status, await response.json(), response


async def test_lists_the_callers_workspace_in_the_seed_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(name="lister", scopes=VIEW, workspace_id="ws-b", team_name="ml")
    invoke = await make_key(
        name="prod", workspace_id="ws-b", type="WORKSPACE_INVOKE", resources=("m1", "m2")
    )
    unnamed = await make_key(workspace_id="ws-b", type="WORKSPACE_MANAGE_ALL", disabled=True)
    await make_key(name="elsewhere", workspace_id="ws-other")
    status, body, response = await get(http, gateway.url, api_key(caller.secret))
    assert status == 200
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    jsonschema.Draft202012Validator(LIST_SCHEMA).validate(body)
    assert set(body) == {"keys"}
    keys = {k["prefix"]: k for k in body["keys"]}
    assert set(keys) == {caller.record.prefix, invoke.record.prefix, unnamed.record.prefix}
    for key in keys.values():
        assert set(key) == SEED_FIELDS | SDK_FIELDS
    assert keys[caller.record.prefix] == {
        "prefix": caller.record.prefix,
        "name": "lister",
        "type": "PERSONAL",
        "model_ids": None,
        "team_name": "ml",
        "created_at": keys[caller.record.prefix]["created_at"],
        "last_used_at": None,
        "owner": {"user_id": caller.record.user_id},
    }
    assert keys[caller.record.prefix]["created_at"].endswith("Z")
    assert keys[invoke.record.prefix]["model_ids"] == ["m1", "m2"]
    assert keys[invoke.record.prefix]["owner"] is None
    assert keys[unnamed.record.prefix]["name"] is None
    text = json.dumps(body)
    for issued in (caller, invoke, unnamed):
        assert issued.secret is not None and issued.secret not in text


@pytest.mark.parametrize("key_type", KEY_TYPES)
async def test_model_ids_only_for_the_model_scoped_types(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey, key_type: str
) -> None:
    caller = await make_key(scopes=VIEW, workspace_id="ws-m")
    scoped = await make_key(workspace_id="ws-m", type=key_type, resources=("llama", "qwen"))
    unscoped = await make_key(workspace_id="ws-m", type=key_type)
    _, body, _ = await get(http, gateway.url, api_key(caller.secret))
    jsonschema.Draft202012Validator(LIST_SCHEMA).validate(body)
    model_ids = {k["prefix"]: k["model_ids"] for k in body["keys"]}
    expected = (
        ["llama", "qwen"] if key_type in ("WORKSPACE_EXPORT_METRICS", "WORKSPACE_INVOKE") else None
    )
    assert model_ids[scoped.record.prefix] == expected
    assert model_ids[unscoped.record.prefix] is None  # no allow-list: not scoped to models
    assert {k["type"] for k in body["keys"]} >= {key_type}


async def test_api_key_bearer_and_truss_headers_are_accepted(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=VIEW, workspace_id="ws-h")
    secret = caller.secret or ""
    for headers in (
        api_key(secret),
        {"Authorization": f"Bearer {secret}"},
        {"Authorization": f"api-key {secret}"},  # schemes are case-insensitive
        truss_headers(secret),
    ):
        status, body, _ = await get(http, gateway.url, headers)
        assert status == 200
        assert [k["prefix"] for k in body["keys"]] == [caller.record.prefix]


async def test_sdk_round_trip(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(name="sdk", scopes=VIEW, workspace_id="ws-s")
    metrics = await make_key(
        name="grafana",
        workspace_id="ws-s",
        type="WORKSPACE_EXPORT_METRICS",
        resources=("abcd1234",),
        team_name="obs",
    )
    async with AsyncManagementClient(
        api_key=caller.secret or "", base_url_override=gateway.url
    ) as client:
        listed = await client.api.get_api_keys()
        only_metrics = await client.api.get_api_keys(
            params=GetApiKeysParams(type="WORKSPACE_EXPORT_METRICS")
        )
        mine = await client.api.get_api_keys(params=GetApiKeysParams(created_by_me=True))
    by_prefix = {k.prefix: k for k in listed.keys}
    assert set(by_prefix) == {caller.record.prefix, metrics.record.prefix}
    grafana = by_prefix[metrics.record.prefix]
    assert (grafana.name, grafana.type, grafana.model_ids, grafana.team_name) == (
        "grafana",
        "WORKSPACE_EXPORT_METRICS",
        ["abcd1234"],
        "obs",
    )
    assert int(grafana.created_at.timestamp() * 1000) == metrics.record.created_at
    own = by_prefix[caller.record.prefix]
    assert own.owner is not None and own.owner.user_id == caller.record.user_id
    assert [k.prefix for k in only_metrics.keys] == [metrics.record.prefix]
    assert [k.prefix for k in mine.keys] == [caller.record.prefix]

    # The synchronous client too (in a thread: the gateway runs in this event loop).
    def sync_list() -> set[str]:
        with ManagementClient(api_key=caller.secret or "", base_url_override=gateway.url) as sync:
            return {k.prefix for k in sync.api.get_api_keys().keys}

    assert await asyncio.to_thread(sync_list) == set(by_prefix)


async def test_sdk_sees_401_and_403_as_response_errors(gateway: Gateway, make_key: MakeKey) -> None:
    weak = await make_key(scopes=["read"])
    for secret, status in (("kg_not_a_key", 401), (weak.secret or "", 403)):
        async with AsyncManagementClient(api_key=secret, base_url_override=gateway.url) as client:
            with pytest.raises(ResponseError) as raised:
                await client.api.get_api_keys()
        assert raised.value.status_code == status
        assert set(json.loads(raised.value.body)) == {"error", "message"}


async def test_401_and_403_in_baseten_shape(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    weak = await make_key(scopes=["read"])
    viewer = await make_key(scopes=VIEW)
    for headers, status, code in (
        ({}, 401, "missing_key"),
        ({"x-api-key": viewer.secret or ""}, 401, "missing_key"),  # not a Baseten header
        ({"Authorization": f"Basic {viewer.secret}"}, 401, "missing_key"),
        (api_key("kg_not_a_key"), 401, "invalid_key"),
        ({"Authorization": "Api-Key"}, 401, "invalid_key"),
        (api_key(weak.secret), 403, "forbidden_scope"),
        ({"Authorization": f"Bearer {weak.secret}"}, 403, "forbidden_scope"),
    ):
        status_seen, body, response = await get(http, gateway.url, headers)
        assert (status_seen, body["error"]) == (status, code), headers
        assert response.content_type == "application/json"
        assert set(body) == {"error", "message"}
        assert isinstance(body["message"], str) and body["message"]


async def test_workspaces_are_isolated_and_created_by_me_is_the_callers_user(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    alice = await make_key(scopes=VIEW, workspace_id="ws-1")
    alice_too = await make_key(workspace_id="ws-1", user_id=alice.record.user_id)
    bob = await make_key(workspace_id="ws-1")  # same workspace, another user
    carol = await make_key(scopes=VIEW, workspace_id="ws-2")
    _, one, _ = await get(http, gateway.url, api_key(alice.secret))
    _, two, _ = await get(http, gateway.url, api_key(carol.secret))
    _, mine, _ = await get(http, gateway.url, api_key(alice.secret), created_by_me="true")
    assert {k["prefix"] for k in one["keys"]} == {
        alice.record.prefix,
        alice_too.record.prefix,
        bob.record.prefix,
    }
    assert [k["prefix"] for k in two["keys"]] == [carol.record.prefix]
    assert {k["prefix"] for k in mine["keys"]} == {alice.record.prefix, alice_too.record.prefix}


async def test_a_lone_caller_lists_only_itself(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=VIEW, workspace_id="ws-alone")
    status, body, _ = await get(http, gateway.url, api_key(caller.secret))
    assert status == 200
    assert [k["prefix"] for k in body["keys"]] == [caller.record.prefix]
    _, none, _ = await get(http, gateway.url, api_key(caller.secret), type="WORKSPACE_INVOKE")
    assert none == {"keys": []}
    jsonschema.Draft202012Validator(LIST_SCHEMA).validate(none)


async def test_query_filters_and_their_400s(
    gateway: Gateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=VIEW, workspace_id="ws-q")
    invoke = await make_key(workspace_id="ws-q", type="WORKSPACE_INVOKE")
    headers = api_key(caller.secret)
    _, personal, _ = await get(http, gateway.url, headers, type="PERSONAL")
    _, invoking, _ = await get(http, gateway.url, headers, type="WORKSPACE_INVOKE")
    _, routes, _ = await get(http, gateway.url, headers, type="ROUTES")  # SDK-known, unissued
    _, everyone, _ = await get(http, gateway.url, headers, created_by_me="false")
    assert [k["prefix"] for k in personal["keys"]] == [caller.record.prefix]
    assert [k["prefix"] for k in invoking["keys"]] == [invoke.record.prefix]
    assert routes == {"keys": []}
    assert len(everyone["keys"]) == 2
    for params in ({"type": "personal"}, {"created_by_me": "yes"}):
        status, body, _ = await get(http, gateway.url, headers, **params)
        assert status == 400
        assert body["error"] == "invalid_request" and set(body) == {"error", "message"}


async def test_the_path_can_be_moved(
    start_gateway: StartGateway, http: aiohttp.ClientSession, make_key: MakeKey
) -> None:
    caller = await make_key(scopes=VIEW)
    moved = await start_gateway(dialects={"baseten": {"path": "/baseten/v1/api_keys"}})
    async with http.get(
        f"{moved.url}/baseten/v1/api_keys", headers=api_key(caller.secret)
    ) as response:
        assert response.status == 200
