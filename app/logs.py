"""Log output: readable text lines on stderr. Levels follow kube-mgmt's --log-level names."""

from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    # Libraries speak only when something is wrong.
    for noisy in ("aiohttp", "kubernetes", "asyncio"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
