"""Secrets never reach a log line: API keys in query strings (``?api_key=``, which clip-retrieval's ClipClient
can only send that way) and in ``Authorization`` / ``X-API-Key`` values are replaced by ``[redacted]``.

Redaction happens where records are made (a wrapped ``logging`` record factory), so it covers every logger and
handler of the process, uvicorn's access log included, however the server was started and whatever logging
configuration runs after it (``uvicorn.run`` configures its handlers after the app is built).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

REDACTED = "[redacted]"

# api_key=..., apikey=..., api-key=..., access_token=... in a query string or form body (also URL-encoded '_')
_QUERY_SECRET = re.compile(r"(?i)(\b(?:api(?:[_-]|%5f)?key|access(?:[_-]|%5f)?token)=)[^&#\s\"'<>]*")
# "Authorization: Bearer x", "x-api-key=x", ('authorization', 'Bearer x'), {b'x-api-key': b'x'} ...
_HEADER_SECRET = re.compile(
    r"(?i)(\b(?:authorization|x-api-key)\b['\"]?\s*[:=,]\s*(?:b?['\"])?)(?:(bearer|basic|token)\s+)?[^\s'\",;}&)]+")

# a mapping key whose value is a secret (a headers dict passed as the one logging argument)
_SECRET_NAME = re.compile(r"(?i)^(?:authorization|x-api-key|api[_-]?key|access[_-]?token)$")

_installed = False
_lock = threading.Lock()


def redact(text: str) -> str:
    """``text`` with every API key value it carries replaced by ``[redacted]``."""
    if "=" not in text and ":" not in text and "," not in text:
        return text
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    return _HEADER_SECRET.sub(lambda m: m.group(1) + (f"{m.group(2)} " if m.group(2) else "") + REDACTED, text)


def _redact_arg(value: Any) -> Any:
    """Strings are redacted; other objects only when their text holds a secret (numbers stay numbers, so
    ``%d`` placeholders keep working)."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (int, float, bool, bytes)):
        return value
    text = str(value)
    cleaned = redact(text)
    return value if cleaned == text else cleaned


def _secret_value(value: Any) -> str:
    """A secret's replacement, keeping an ``Authorization`` scheme (``Bearer [redacted]``)."""
    scheme, _, rest = str(value).partition(" ")
    return f"{scheme} {REDACTED}" if rest and scheme.lower() in ("bearer", "basic", "token") else REDACTED


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a record's message and arguments in place (uvicorn's access formatter reads ``args`` by position,
    so their shape is kept)."""
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if isinstance(record.args, tuple):
        record.args = tuple(_redact_arg(a) for a in record.args)
    elif isinstance(record.args, dict):  # logging unwraps a lone mapping argument: "%s" shows it whole
        record.args = {k: _secret_value(v) if _SECRET_NAME.match(str(k)) else _redact_arg(v)
                       for k, v in record.args.items()}
    return record


def install_log_redaction() -> None:
    """Redact every log record made in this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        make_record = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(make_record(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = True
