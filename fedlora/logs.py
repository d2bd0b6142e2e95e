"""Log levels of fedlora's own loggers, set once per process (driver, Ray actor or SuperNode app).

``fedlora simulate -v`` sets :data:`LOG_LEVEL_ENV` in the driver; Ray actors inherit the
environment, and the ClientApp calls :func:`configure_from_env` when it is imported, so the
clients log at the same level as the driver.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVEL_ENV = "FEDLORA_LOG_LEVEL"

# Top-level packages of this project (loggers are named by module, ``logging.getLogger(__name__)``).
PACKAGES = ("fedlora", "clients", "server", "strategies", "simulations")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write to whatever ``sys.stderr`` is now (a live progress display may have redirected it)."""

    @property
    def stream(self) -> object:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def configure(level: int, *, exclusive: bool = True) -> None:
    """Send this project's log records at ``level`` and above to stderr (idempotent).

    ``exclusive`` stops the records from also reaching the root logger's handlers (some
    libraries install one on import, which printed every line twice). Library callers that
    collect records through the root logger (pytest's ``caplog``) pass ``exclusive=False``.
    """
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if exclusive and _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.propagate = not exclusive


def configure_from_env() -> None:
    """Apply :data:`LOG_LEVEL_ENV` (e.g. ``DEBUG``) when it is set; otherwise leave logging alone."""
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    level = logging.getLevelName(name) if name else None
    if isinstance(level, int):
        configure(level)
