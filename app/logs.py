"""Log output on stderr: readable text lines by default, or one JSON object per line for log pipelines.

Levels follow kube-mgmt's --log-level names. Nothing secret is ever passed to a logger; the JSON format
carries only the message, the logger, the level, the time and, for errors, the exception.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level, logging.INFO))
    # Libraries speak only when something is wrong.
    for noisy in ("aiohttp", "kubernetes", "asyncio"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
