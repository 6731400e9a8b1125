"""The sample upstream, over real HTTP: echo, status/slow/stream, and the OpenAI-style chat API."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.demo.upstream import COST_PER_TOKEN, MODELS, build_upstream_app, start_upstream

Client = TestClient[Any, Any]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


@pytest.fixture
async def client(aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(build_upstream_app())


@pytest.fixture
async def upstream_port() -> AsyncIterator[int]:
    runner, port = await start_upstream()
    yield port
    await runner.cleanup()


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    return {"model": "demo-small", "messages": messages, **extra}


async def _timed_lines(response: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """Every line of a response body with the monotonic time it arrived at."""
    lines = []
    while line := await response.content.readline():
        lines.append((time.monotonic(), line.decode()))
    return lines


def _sse_data(lines: list[tuple[float, str]]) -> list[tuple[float, str]]:
    return [(at, line[len("data: ") :].strip()) for at, line in lines if line.startswith("data: ")]


# ---------------------------------------------------------------------------- echo


async def test_echo_returns_method_raw_path_query_headers_and_body_as_sent(client: Client) -> None:
    response = await client.put(
        "/echo/a/b%2Fc?x=1&y=2&y=3",
        data=b"hello, upstream",
        headers={"X-Custom": "Some Value", "x-lower": "v", "Content-Type": "text/plain"},
    )
    assert response.status == 200
    echoed = await response.json()
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/echo/a/b%2Fc"
    assert echoed["query"] == {"x": "1", "y": ["2", "3"]}
    assert echoed["headers"]["X-Custom"] == "Some Value"
    assert echoed["headers"]["x-lower"] == "v"
    assert echoed["headers"]["Content-Type"] == "text/plain"
    assert echoed["headers"]["Content-Length"] == "15"
    assert "Host" in echoed["headers"]
    assert echoed["body"] == "hello, upstream" and echoed["body_bytes"] == 15
    assert echoed["sha256"] == hashlib.sha256(b"hello, upstream").hexdigest()
    assert echoed["body_truncated"] is False


async def test_echo_without_a_body_reports_null_and_any_method_works(client: Client) -> None:
    for method in ("GET", "DELETE", "PATCH", "OPTIONS"):
        response = await client.request(method, "/echo")
        echoed = await response.json()
        assert response.status == 200
        assert echoed["method"] == method and echoed["path"] == "/echo"
        assert echoed["body"] is None and echoed["body_bytes"] == 0 and echoed["query"] == {}


async def test_echo_keeps_repeated_headers_in_order(client: Client) -> None:
    headers = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")]
    response = await client.get("/echo/x", headers=headers)
    echoed = await response.json()
    assert echoed["headers"]["X-Forwarded-For"] == "10.0.0.1, 10.0.0.2"
    assert [v for k, v in echoed["header_list"] if k == "X-Forwarded-For"] == [
        "10.0.0.1",
        "10.0.0.2",
    ]


async def test_discard_hashes_a_multi_megabyte_streamed_upload(client: Client) -> None:
    digest = hashlib.sha256()
    block = bytes(range(256)) * 256  # 64 KiB

    async def upload() -> AsyncIterator[bytes]:
        for i in range(384):  # 24 MiB, sent chunked
            chunk = i.to_bytes(4, "big") + block
            digest.update(chunk)
            yield chunk

    response = await client.post("/echo/upload?discard=1", data=upload())
    assert response.status == 200
    assert await response.json() == {
        "body_bytes": 384 * (4 + len(block)),
        "sha256": digest.hexdigest(),
    }


async def test_echo_keeps_only_the_first_mebibyte_but_counts_and_hashes_all(client: Client) -> None:
    body = b"a" * (3 << 20)
    echoed = await (await client.post("/echo", data=io.BytesIO(body))).json()
    assert echoed["body_bytes"] == len(body) and echoed["body_truncated"] is True
    assert echoed["body"] == "a" * (1 << 20)
    assert echoed["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("code", [201, 400, 404, 429, 500, 502, 503])
async def test_status_endpoint_answers_with_that_status_and_json(client: Client, code: int) -> None:
    response = await client.post(f"/echo/status/{code}?k=v", data=b"x")
    assert response.status == code
    echoed = await response.json()
    assert echoed["status"] == code and echoed["query"] == {"k": "v"} and echoed["body"] == "x"


async def test_status_endpoint_204_has_no_body_and_out_of_range_is_400(client: Client) -> None:
    response = await client.get("/echo/status/204")
    assert response.status == 204 and await response.read() == b""
    assert (await client.get("/echo/status/999")).status == 400


async def test_slow_endpoint_waits_before_answering(client: Client) -> None:
    started = time.monotonic()
    response = await client.get("/echo/slow?seconds=0.3")
    assert response.status == 200
    assert time.monotonic() - started >= 0.3
    assert (await response.json())["slept"] == 0.3
    for bad in ("31", "-1", "nan", "soon"):
        assert (await client.get(f"/echo/slow?seconds={bad}")).status == 400


async def test_stream_endpoint_sends_chunked_lines_interval_apart(client: Client) -> None:
    started = time.monotonic()
    response = await client.get("/echo/stream?chunks=3&interval=0.3")
    assert response.status == 200 and response.headers["Transfer-Encoding"] == "chunked"
    lines = await _timed_lines(response)
    assert [line for _, line in lines] == ["chunk 0\n", "chunk 1\n", "chunk 2\n"]
    first, last = lines[0][0], lines[-1][0]
    assert first - started < 0.25
    assert last - first >= 0.55


# ---------------------------------------------------------------------------- chat


async def test_chat_completion_shape_usage_and_cost_header(client: Client) -> None:
    response = await client.post("/v1/chat/completions", json=_chat("hello there world"))
    assert response.status == 200
    result = await response.json()
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    assert result["model"] == "demo-small" and isinstance(result["created"], int)
    [choice] = result["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Echo: hello there world"}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    # prompt: "be brief" + "hello there world"; reply: four words
    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert response.headers["X-Usage-Cost"] == "0.000018" == str(9 * COST_PER_TOKEN)


async def test_chat_max_tokens_truncates_with_finish_reason_length(client: Client) -> None:
    response = await client.post("/v1/chat/completions", json=_chat("a b c d", max_tokens=2))
    result = await response.json()
    assert result["choices"][0]["message"]["content"] == "Echo: a"
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 2


async def test_chat_accepts_any_model_and_content_parts(client: Client) -> None:
    parts = [
        {"type": "text", "text": "one"},
        {"type": "image_url"},
        {"type": "text", "text": "two"},
    ]
    body = {"model": "not-a-real-model", "messages": [{"role": "user", "content": parts}]}
    result = await (await client.post("/v1/chat/completions", json=body)).json()
    assert result["model"] == "not-a-real-model"
    assert result["choices"][0]["message"]["content"] == "Echo: one two"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "demo-small"}, "messages"),
        ({"model": "demo-small", "messages": []}, "messages"),
        ({"model": "demo-small", "messages": "hi"}, "messages"),
        ({"model": "demo-small", "messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
    ],
)
async def test_chat_invalid_request_is_400_in_openai_shape(
    client: Client, body: dict[str, Any], param: str
) -> None:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"] and error["code"]


async def test_chat_unparsable_json_is_400_in_openai_shape(client: Client) -> None:
    response = await client.post("/v1/chat/completions", data=b"{not json")
    assert response.status == 400
    assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_chat_stream_sends_one_event_per_word_then_usage_then_done(client: Client) -> None:
    delay = 0.15
    body = _chat("one two three four", stream=True, stream_options={"include_usage": True})
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"X-Demo-Delay": str(delay)}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Usage-Cost"] == str(11 * COST_PER_TOKEN)
    events = _sse_data(await _timed_lines(response))
    assert events[-1][1] == "[DONE]"
    chunks = [(at, json.loads(data)) for at, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for _, c in chunks)
    assert len({c["id"] for _, c in chunks}) == 1
    assert chunks[0][1]["choices"][0]["delta"] == {"role": "assistant", "content": ""}

    words = [
        (at, c) for at, c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert (
        "".join(c["choices"][0]["delta"]["content"] for _, c in words) == "Echo: one two three four"
    )
    assert len(words) == 5
    # events arrive one by one, delay apart: the first long before the last
    assert words[-1][0] - words[0][0] >= 4 * delay * 0.9

    finish, usage = chunks[-2][1], chunks[-1][1]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    assert all(c["usage"] is None for _, c in chunks[:-1])


async def test_chat_stream_without_include_usage_has_no_usage_event(client: Client) -> None:
    body = _chat("hi", stream=True)
    response = await client.post("/v1/chat/completions", json=body, headers={"X-Demo-Delay": "0"})
    events = [data for _, data in _sse_data(await _timed_lines(response))]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_bad_demo_delay_is_400(client: Client) -> None:
    body = _chat("hi", stream=True)
    response = await client.post("/v1/chat/completions", json=body, headers={"X-Demo-Delay": "x"})
    assert response.status == 400


async def test_client_leaving_mid_stream_leaves_the_upstream_serving(upstream_port: int) -> None:
    url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        body = _chat("a b c d e f g h", stream=True)
        response = await session.post(url, json=body, headers={"X-Demo-Delay": "0.2"})
        assert (await response.content.readline()).startswith(b"data: ")
        response.close()
        await asyncio.sleep(0.5)
        again = await session.post(url, json=_chat("still there"))
        assert (await again.json())["choices"][0]["message"]["content"] == "Echo: still there"


async def test_models_lists_the_demo_models_in_openai_shape(client: Client) -> None:
    listing = await (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == list(MODELS)
    assert all(m["object"] == "model" and m["owned_by"] for m in listing["data"])


# ---------------------------------------------------------------------------- openai SDK


async def test_openai_sdk_chat_completion(upstream_port: int) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="sk-dummy", max_retries=0
    )
    async with sdk:
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "ping pong"}]
        )
        models = await sdk.models.list()
    assert completion.choices[0].message.content == "Echo: ping pong"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 5
    assert [m.id async for m in models] == list(MODELS)


async def test_openai_sdk_streaming_with_usage(upstream_port: int) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="sk-dummy", max_retries=0
    )
    async with sdk:
        stream = await sdk.chat.completions.create(
            model="demo-large",
            messages=[{"role": "user", "content": "stream me please"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Demo-Delay": "0.01"},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me please"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 4


async def test_openai_sdk_sees_a_missing_model_as_bad_request(upstream_port: int) -> None:
    sdk = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{upstream_port}/v1", api_key="sk-dummy", max_retries=0
    )
    async with sdk:
        with pytest.raises(openai.BadRequestError) as raised:
            await sdk.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 400 and raised.value.type == "invalid_request_error"


# ---------------------------------------------------------------------------- standalone


async def test_module_runs_standalone_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.demo.upstream",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert banner.startswith("keygate demo upstream listening on http://127.0.0.1:")
        url = banner.split()[-1]
        async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as got:
            assert got.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
