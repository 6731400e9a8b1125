"""Which config file a command reads, and the line that says so and names the key store.

Every command that reads a config says which file it used (or that it found none, and
where it looked) and which key store that means, so that a gateway and a ``keygate keys``
command on different stores, or a gateway running on defaults, is seen at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings, load
from gateway.config.model import RedisSettings
from gateway.config.reader import redact_url

# Looked for in the working directory, in this order, when neither --config nor
# $KEYGATE_CONFIG names a file.
DISCOVERED = (Path("gateway.yaml"), Path("config", "gateway.yaml"))


@dataclass(frozen=True, slots=True)
class Source:
    path: Path | None  # None: no file was found; every option is at its default
    how: str  # "from --config", "from $KEYGATE_CONFIG" or "found in the working directory"


def find(given: str | None) -> Source:
    """``--config``, else ``$KEYGATE_CONFIG``, else ./gateway.yaml, else
    ./config/gateway.yaml, else none. A named file that does not exist is not skipped:
    loading it reports it."""
    if given:
        return Source(Path(given), "from --config")
    if named := os.environ.get("KEYGATE_CONFIG"):
        return Source(Path(named), "from $KEYGATE_CONFIG")
    for candidate in DISCOVERED:
        if candidate.is_file():
            return Source(candidate, "found in the working directory")
    return Source(None, "")


@dataclass(frozen=True, slots=True)
class Loaded:
    source: Source
    settings: Settings

    def summary(self, *, upstreams: bool = False) -> str:
        """``config /etc/keygate/gateway.yaml (from --config): 3 routes; key store: ...``,
        or that no file was found, where keygate looked, and that it runs on defaults."""
        counts = f"{len(self.settings.routes)} routes"
        if upstreams:
            counts += f", {len(self.settings.upstreams)} upstreams"
        store = f"key store: {store_target(self.settings.redis)}"
        if self.source.path is None:
            return f"{not_found()}; running on defaults: {counts}; {store}"
        path = os.path.abspath(self.source.path)
        return f"config {path} ({self.source.how}): {counts}; {store}"


def not_found() -> str:
    names = " and ".join(str(name) for name in DISCOVERED)
    return f"no config file found (looked for {names} in {Path.cwd()})"


def load_config(given: str | None) -> Loaded:
    """Find the config file and load it with the KEYGATE_* overrides (ConfigError on any
    problem)."""
    source = find(given)
    return Loaded(source, load(source.path))


def store_target(redis: RedisSettings) -> str:
    """Where the keys are, without any secret: the embedded server's directory, or the
    Redis URL with its password (and any ``*password*`` query value) replaced by ``***``;
    then the key prefix, which separates deployments sharing one server."""
    where = (
        f"embedded Redis in {os.path.abspath(redis.data_dir)}"
        if redis.embedded
        else redact_url(redis.url)
    )
    return f"{where}, key prefix {redis.key_prefix}"
