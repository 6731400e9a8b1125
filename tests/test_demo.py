"""`keygate demo` works as printed for a new user, and Ctrl-C stops all it started."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _call(curl_line: str) -> tuple[int, str]:
    """Run one printed curl line with urllib: the same URL, headers and body."""
    words = shlex.split(curl_line.replace("\\\n", " "))
    url = next(w for w in words if w.startswith("http://"))
    headers = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    data = next((words[i + 1].encode() for i, w in enumerate(words) if w == "-d"), None)
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def demo() -> object:
    ports = [_free_port() for _ in range(3)]
    data_dir = Path(tempfile.mkdtemp(prefix="kgdemo", dir="/tmp"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--port",
            str(ports[0]),
            "--admin-port",
            str(ports[1]),
            "--upstream-port",
            str(ports[2]),
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "PY":
            break
    yield process, "".join(lines), ports
    if process.poll() is None:
        process.kill()
        process.wait()


def test_demo_prints_a_bill_by_model_for_its_sample_traffic(demo: object) -> None:
    _process, output, _ports = demo  # type: ignore[misc]
    table = output[output.index("by model, at genai-prices' prices:") :]
    table = table[: table.index("keygate demo is running")]
    rows = {
        cells[0]: cells[1:]
        for cells in (line.split() for line in table.splitlines()[1:])
        if cells and cells[0] != "model"
    }
    assert set(rows) == {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest", "total"}, table
    assert [rows[m][0] for m in ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku-latest")] == [
        "2",
        "1",
        "2",
    ]
    # One request of gpt-4o: its row is genai-prices' price of its tokens.
    inputs, outputs, cost = int(rows["gpt-4o"][1]), int(rows["gpt-4o"][2]), rows["gpt-4o"][3]
    price = calc_price(
        Usage(input_tokens=inputs, output_tokens=outputs), "gpt-4o", provider_id="openai"
    )
    assert (
        Decimal(cost)
        == (price.total_price * 1_000_000).to_integral_value(ROUND_HALF_UP) / 1_000_000
    )
    costs = [Decimal(cells[3]) for model, cells in rows.items() if model != "total"]
    assert sum(costs) == Decimal(rows["total"][0]) and all(c > 0 for c in costs)


def test_demo_prints_commands_that_work_as_printed(demo: object) -> None:
    process, output, ports = demo  # type: ignore[misc]
    assert "keygate demo is running" in output, output
    curls = re.findall(r"^  (curl .*?(?:\\\n.*?)?)$", output, flags=re.M)
    assert len(curls) == 7
    results = [_call(line) for line in curls]
    echo, chat, stream, wrong_model, own_key, no_key, admin_list = results
    assert echo[0] == 200 and json.loads(echo[1])["path"] == "/echo/hello"
    assert chat[0] == 200 and json.loads(chat[1])["choices"][0]["message"]["content"]
    assert stream[0] == 200 and stream[1].rstrip().endswith("data: [DONE]")
    assert (
        wrong_model[0] == 403
        and json.loads(wrong_model[1])["error"]["code"] == "forbidden_resource"
    )
    assert own_key[0] == 200
    spent = json.loads(own_key[1])["data"]
    assert spent["total_uses"] == 3 and 0 < spent["usage_daily"] == spent["usage"]
    assert spent["limit"] == 0.01
    assert spent["limit_remaining"] == round(0.01 - spent["usage"], 6)
    assert spent["rate_limit_state"]["requests"] == 60
    assert no_key[0] == 401
    assert admin_list[0] == 200 and len(json.loads(admin_list[1])["data"]) == 2

    snippet = output[output.index("python - <<'PY'") :].split("\n", 1)[1].rsplit("PY", 1)[0]
    sdk = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60
    )
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.splitlines() == ["Echo: hello", "Echo: stream this"]

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0
    for port in ports:
        with socket.socket() as probe:
            # SO_REUSEADDR passes TIME_WAIT leftovers but not a live listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # every listener it started is gone


def test_demo_with_nginx_puts_nginx_in_front_asking_keygate(tmp_path: Path) -> None:
    if shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs the Debian package nginx")
        pytest.skip("nginx is not installed")
    ports = [_free_port() for _ in range(5)]
    names = ("--port", "--admin-port", "--upstream-port", "--nginx-port", "--auth-port")
    argv = [sys.executable, "-m", "gateway", "demo", "--with", "nginx"]
    argv += [str(v) for pair in zip(names, ports, strict=True) for v in pair]
    process = subprocess.Popen(
        [*argv, "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line or line.startswith("keygate demo is running"):
                break
            lines.append(line)
        section = "".join(lines)
        assert "nginx in front of the sample upstream" in section, section
        nginx = f"http://127.0.0.1:{ports[3]}"
        allowed, refused = re.findall(rf"^  (curl .*{nginx}.*)$", section, flags=re.M)
        status, body = _call(allowed)
        assert status == 200
        echoed = json.loads(body)["headers"]
        assert echoed["X-Keygate-Workspace-Id"] == "demo"
        assert echoed["X-Keygate-Scopes"] == "chat:invoke echo:read"
        assert "Authorization" not in echoed
        assert _call(refused)[0] == 401
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    with pytest.raises(OSError):  # nginx stopped with the demo
        socket.create_connection(("127.0.0.1", ports[3]), timeout=1).close()
