"""Whether the key store is known to be failing, so that each change is logged once.

A Redis that is down fails every request and every readiness probe; the log says so when
it starts failing (with the reason in words) and when it answers again, not each time.
The state belongs to one key store and is shared by whoever asks Redis on its behalf: the
startup's script loading, its retries, and the readiness probe.
"""

from __future__ import annotations

import logging
import weakref

from gateway.store.keystore import KeyStore

log = logging.getLogger("keygate")


class Availability:
    """``failing`` after a failure was logged, until a success is logged."""

    def __init__(self) -> None:
        self.failing = False

    def failed(self, message: str) -> None:
        """Log ``message`` (a warning) unless a failure is logged already."""
        if not self.failing:
            self.failing = True
            log.warning("%s", message)

    def answered(self, message: str) -> None:
        """Log ``message`` if a failure was logged: Redis answers again."""
        if self.failing:
            self.failing = False
            log.info("%s", message)


_OF: weakref.WeakKeyDictionary[KeyStore, Availability] = weakref.WeakKeyDictionary()


def availability_of(store: KeyStore) -> Availability:
    """The one Availability of ``store`` (made on first use)."""
    found = _OF.get(store)
    if found is None:
        found = _OF[store] = Availability()
    return found
