"""Typed application keys: what the admin handlers are given at startup."""

from __future__ import annotations

from aiohttp import web

from gateway.config.model import Settings
from gateway.store.keystore import KeyStore

STORE = web.AppKey("store", KeyStore)
SETTINGS = web.AppKey("settings", Settings)
