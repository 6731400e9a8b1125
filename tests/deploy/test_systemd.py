"""deploy/systemd/keygate.service: systemd's own verifier accepts it (with ExecStart
pointed at this environment's keygate), and the command line it runs serves a config."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import KEYGATE

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "keygate.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_runs_keygate_serve_with_an_absolute_config_as_an_unprivileged_user() -> None:
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "keygate"
    assert argv[1] == "serve"
    config = argv[argv.index("--config") + 1]
    assert Path(config).is_absolute()
    assert service["User"] not in ("", "root")
    # The embedded server's data must live in the state directory systemd makes writable,
    # not beside the config under ProtectSystem=strict.
    assert "KEYGATE_REDIS_DATA_DIR=/var/lib/keygate" in service["Environment"]
    assert service["StateDirectory"] == "keygate"
    assert service["KillSignal"] == "SIGTERM"
    # systemctl reload: SIGHUP reloads the config (tests/proxy/test_reload.py).
    assert shlex.split(service["ExecReload"])[1:] == ["-HUP", "$MAINPID"]
    assert float(service["TimeoutStopSec"]) > 30  # more than the default shutdown_timeout


def test_no_secret_in_the_unit() -> None:
    text = UNIT.read_text()
    assert "PASSWORD=" not in text.upper().replace("KEYGATE_REDIS_PASSWORD)", "")
    assert "://" not in _unit()["Service"].get("Environment", "")


def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    verifier = shutil.which("systemd-analyze")
    if verifier is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (Debian package systemd)")
        pytest.skip("systemd-analyze is not installed")
    here = tmp_path / "keygate.service"
    here.write_text(UNIT.read_text().replace("/opt/keygate/bin/keygate", shlex.join(KEYGATE)))
    done = subprocess.run(
        [verifier, "verify", "--man=no", str(here)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Complaints about the machine itself (no systemd running as PID 1 in a sandbox) are not
    # about the unit; every line that names the unit file is.
    about_unit = [line for line in done.stderr.splitlines() if "keygate.service" in line]
    assert about_unit == [], done.stderr
