"""``keygate demo``: embedded Redis, the sample upstream and the gateway in front of it,
with two keys and copy-paste commands that work as printed."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import uuid
from pathlib import Path
from typing import Any

from gateway import runtime
from gateway.config.load import build
from gateway.config.model import DIALECTS, Settings
from gateway.store.keystore import KeyStore
from gateway.store.record import MICRO, RateLimitSpec

DEMO_TAG = {"keygate_demo": "true"}


def demo_settings(args: argparse.Namespace, upstream_port: int) -> Settings:
    raw: dict[str, Any] = {
        "listen": f"127.0.0.1:{args.port}",
        "admin_listen": f"127.0.0.1:{args.admin_port}",
        "auth_listen": f"127.0.0.1:{args.auth_port}"
        if getattr(args, "with_proxy", None) == "nginx"
        else None,
        "redis": {"url": "embedded", "data_dir": str(args.data_dir)},
        "upstreams": {"demo": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "routes": [
            {
                "name": "chat",
                "path": "/v1/chat/completions",
                "upstream": "demo",
                "methods": ["POST"],
                "scopes": ["chat:invoke"],
                "resource": {"json": "model"},
                # Priced per model from each answer's usage block (genai-prices), each
                # request reserving its own worst case.
                "cost": {"llm": "openai", "provider": "openai"},
                "reserve": "auto",
                "max_output_tokens": 256,
                "error_format": "openai",
            },
            {
                "name": "messages",
                "path": "/v1/messages",
                "upstream": "demo",
                "methods": ["POST"],
                "scopes": ["chat:invoke"],
                "resource": {"json": "model"},
                "cost": {"llm": "anthropic", "provider": "anthropic"},
                "reserve": "auto",
            },
            {
                "name": "models",
                "path": "/v1/models",
                "upstream": "demo",
                "methods": ["GET"],
                "scopes": ["chat:invoke"],
                "error_format": "openai",
            },
            {"name": "echo", "prefix": "/echo", "upstream": "demo", "scopes": ["echo:read"]},
        ],
        # The demo shows the listing dialects too (a real config opts in to each).
        "dialects": {name: {"enabled": True} for name in DIALECTS},
        "log": {"format": "text", "level": "warning"},
    }
    return build(raw, Path.cwd())


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# The sample traffic the demo sends through itself at start, so its first screen shows a
# bill by model: (path, body) pairs, streamed and not, over three differently priced models.
_SAMPLE_TRAFFIC: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "summarise the quarterly report in one line"}],
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "stream a haiku about rate limits"}],
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "draft a careful reply to an angry customer"}],
        },
    ),
    (
        "/v1/messages",
        {
            "model": "claude-3-5-haiku-latest",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": "classify this ticket as billing or support"}],
        },
    ),
    (
        "/v1/messages",
        {
            "model": "claude-3-5-haiku-latest",
            "max_tokens": 200,
            "stream": True,
            "messages": [{"role": "user", "content": "stream three tags for this ticket"}],
        },
    ),
)


async def sample_bill(proxy: str, secret: str) -> str:
    """Send the sample traffic through the proxy with ``secret``, then the key's bill for
    today by model, as ``GET /v1/key`` reports it (what the demo prints)."""
    import aiohttp  # loaded only by the demo

    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for path, body in _SAMPLE_TRAFFIC:
            async with http.post(proxy + path, json=body, headers=headers) as response:
                await response.read()
        # Settlements are written moments after each answer: read once they are in.
        for _ in range(50):
            async with http.get(proxy + "/v1/key", headers=headers) as response:
                data = (await response.json())["data"]
            models = data["usage_by_model"]["daily"]
            if sum(m["requests"] for m in models.values()) >= len(_SAMPLE_TRAFFIC):
                break
            await asyncio.sleep(0.1)
    rows = [("model", "requests", "input tokens", "output tokens", "cost (USD)")]
    for model, used in models.items():
        rows.append(
            (
                model,
                str(used["requests"]),
                str(used["input_tokens"]),
                str(used["output_tokens"]),
                f"{used['cost']:.6f}",
            )
        )
    total = sum(m["cost"] for m in models.values())
    rows.append(("total", "", "", "", f"{total:.6f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  "
        + row[0].ljust(widths[0])
        + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    ]
    return "\n".join(lines)


async def _replace_demo_keys(store: KeyStore) -> tuple[str, str]:
    """Revoke the keys of an earlier demo run, then issue an admin and a user key."""
    cursor: str | None = None
    while True:
        page = await store.list(
            workspace_id="demo", include_disabled=True, limit=1000, cursor=cursor
        )
        for record in page.records:
            if record.metadata.get("keygate_demo") == "true":
                await store.revoke(record.id)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    user = str(uuid.uuid4())
    admin = await store.create(
        {
            "name": "demo admin",
            "workspace_id": "demo",
            "user_id": user,
            "scopes": ("*",),
            "metadata": DEMO_TAG,
        }
    )
    restricted = await store.create(
        {
            "name": "demo user",
            "workspace_id": "demo",
            "user_id": user,
            "scopes": ("chat:invoke", "echo:read"),
            "resources": ("gpt-4o-mini", "claude-3-5-haiku-latest"),
            "limit_micro": MICRO // 100,  # 0.01 a day: a few hundred demo replies
            "limit_reset": "daily",
            "rate_limit": RateLimitSpec(60, 60),
            "metadata": DEMO_TAG,
        }
    )
    assert admin.secret and restricted.secret
    return admin.secret, restricted.secret


def _instructions(proxy: str, admin_url: str, admin: str, user: str) -> str:
    chat = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})
    stream = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "stream me a reply"}],
        }
    )
    wrong = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    return f"""
keygate demo is running (Ctrl-C stops everything it started)

  proxy   {proxy}      -> sample upstream (echo, OpenAI and Anthropic formats)
  admin   {admin_url}      key management, /openapi.json

  admin key  (scopes *):                                 {admin}
  user key   (chat:invoke echo:read, models gpt-4o-mini and
              claude-3-5-haiku-latest, 0.01 a day,
              60 requests a minute):                      {user}

Try it:

  curl -s {proxy}/echo/hello -H 'Authorization: Bearer {user}'
  curl -s {proxy}/v1/chat/completions -H 'Authorization: Bearer {user}' \\
       -H 'Content-Type: application/json' -d '{chat}'
  curl -sN {proxy}/v1/chat/completions -H 'Authorization: Bearer {user}' \\
       -H 'Content-Type: application/json' -d '{stream}'
  # 403, this key may not use that model:
  curl -s {proxy}/v1/chat/completions -H 'Authorization: Bearer {user}' \\
       -H 'Content-Type: application/json' -d '{wrong}'
  # what the user key has spent today, this week and month (and by model), what is left:
  curl -s {proxy}/v1/key -H 'Authorization: Bearer {user}'
  # 401, no key:
  curl -s {proxy}/echo/hello
  curl -s {admin_url}/v1/keys -H 'Authorization: Bearer {admin}'

With the openai SDK (pip install openai):

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{proxy}/v1", api_key="{user}")
print(client.chat.completions.create(model="gpt-4o-mini",
      messages=[{{"role": "user", "content": "hello"}}]).choices[0].message.content)
for chunk in client.chat.completions.create(model="gpt-4o-mini", stream=True,
        messages=[{{"role": "user", "content": "stream this"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY
"""


def run_demo(args: argparse.Namespace) -> int:
    ports = [args.port, args.admin_port, args.upstream_port]
    if args.with_proxy == "nginx":
        ports += [args.nginx_port, args.auth_port]
    for port in ports:
        if not _port_free(port):
            print(
                f"keygate demo: port {port} on 127.0.0.1 is in use; choose others with "
                "--port, --admin-port, --upstream-port (--nginx-port, --auth-port)"
            )
            return 1
    if args.with_proxy == "nginx":
        from gateway.demo.with_nginx import NginxUnavailable, nginx_binary

        try:
            nginx_binary()
        except NginxUnavailable as exc:
            print(f"keygate demo --with nginx: {exc}")
            return 1
    settings = demo_settings(args, args.upstream_port)

    # aiohttp and the servers load only when the demo runs, not for every CLI command.
    from gateway import server
    from gateway.demo.upstream import start_upstream

    nginx: list[Any] = []  # the demo's nginx, once started

    async def task(url: str) -> None:
        upstream, _ = await start_upstream("127.0.0.1", args.upstream_port)

        async def ready(store: KeyStore) -> None:
            admin, user = await _replace_demo_keys(store)
            proxy = f"http://127.0.0.1:{args.port}"
            bill = await sample_bill(proxy, admin)
            print(
                "\nSample traffic sent through keygate with the admin key (OpenAI and "
                "Anthropic formats, streamed and not); its bill for today, by model, at "
                f"genai-prices' prices:\n\n{bill}",
                flush=True,
            )
            if args.with_proxy == "nginx":
                from gateway.demo.with_nginx import start_nginx

                nginx.append(
                    await asyncio.to_thread(
                        start_nginx,
                        args.data_dir.resolve() / "nginx",
                        args.nginx_port,
                        args.auth_port,
                        args.upstream_port,
                    )
                )
                print(_nginx_instructions(args.nginx_port, user), flush=True)
            print(
                _instructions(proxy, f"http://127.0.0.1:{args.admin_port}", admin, user),
                flush=True,
            )

        try:
            await server.serve(settings, url, on_ready=ready)
        finally:
            for started in nginx:
                started.stop()
            await upstream.cleanup()
        print("keygate demo stopped", flush=True)

    runtime.with_redis(settings, task, attach=False)
    return 0


def _nginx_instructions(port: int, user: str) -> str:
    nginx = f"http://127.0.0.1:{port}"
    return f"""
nginx in front of the sample upstream, asking keygate's auth listener about every request
(deploy/forward-auth/nginx.conf; docs/forward-auth.md):

  nginx   {nginx}      -> sample upstream; keygate decides, nginx moves the bytes

  # 200: the upstream echoes the X-Keygate-Key-Id, -Workspace-Id and -Scopes nginx added:
  curl -s {nginx}/echo/hello -H 'Authorization: Bearer {user}'
  # 401, no key:
  curl -s -o /dev/null -w '%{{http_code}}\\n' {nginx}/echo/hello
"""


def add_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run a local demo: embedded Redis, sample upstream, gateway"
    )
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--admin-port", type=int, default=8081, help="admin port (default 8081)")
    demo.add_argument("--upstream-port", type=int, default=9000, help="sample upstream port")
    demo.add_argument(
        "--with",
        dest="with_proxy",
        choices=("nginx",),
        help="also start nginx in front of the upstream, asking keygate (forward auth)",
    )
    demo.add_argument("--nginx-port", type=int, default=8088, help="nginx's port (--with nginx)")
    demo.add_argument(
        "--auth-port", type=int, default=8082, help="keygate's auth listener (--with nginx)"
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".keygate-demo"),
        help="embedded Redis data (default ./.keygate-demo)",
    )
    demo.set_defaults(run=run_demo)
