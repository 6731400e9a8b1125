"""The store's Lua scripts: read from package files, registered once per client."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.commands.core import AsyncScript

from gateway.store.connection import StoreClient


def _file(name: str) -> str:
    return resources.files("gateway.store").joinpath("lua", f"{name}.lua").read_text("utf-8")


def frame_source(name: str) -> str:
    """A script template's text alone (the authorize script's frame, which
    gateway/policies/layout.py completes); see ``script_source`` for the library."""
    return _file(name)


def library_source() -> str:
    """The shared library every script starts with."""
    return _file("lib")


def script_source(name: str) -> str:
    """A script's source with the shared library (periods, buckets, caps) in front."""
    return _file("lib") + "\n" + _file(name)


@dataclass(frozen=True, slots=True)
class Scripts:
    create: AsyncScript
    authenticate: AsyncScript
    update: AsyncScript
    revoke: AsyncScript
    rotate: AsyncScript
    report: AsyncScript

    @classmethod
    def register(cls, client: StoreClient) -> Scripts:
        """Bind every script to ``client``; calls use EVALSHA, loading on NOSCRIPT."""
        return cls(**{name: client.register_script(script_source(name)) for name in cls.__slots__})

    async def load(self) -> None:
        """Load every script now, so the first request does not pay for it."""
        for name in self.__slots__:
            script: AsyncScript = getattr(self, name)
            await script.registered_client.script_load(script.script)
