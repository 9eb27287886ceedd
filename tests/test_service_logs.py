"""No API key reaches a log line: uvicorn's access log of real requests, and the service's own records."""

from __future__ import annotations

import logging

import pytest

from tests.service_fakes import fake_registry, make_settings

KEY = "log-key-0123456789"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_access_log_of_real_requests_carries_no_key(tmp_path):
    """ClipClient can only send its key as ``?api_key=``; that URL used to be written to the access log."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from retrogen.service.api.main import create_app

    app = create_app(make_settings(tmp_path / "data", api_keys=[KEY]), methods=fake_registry(), start_worker=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=True, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    lines = _Lines()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        for logger in ("uvicorn.access", "uvicorn.error", ""):
            logging.getLogger(logger).addHandler(lines)
        # accepted on image URLs (the job is unknown: 404, not 401), logged on any URL
        assert httpx.get(f"{url}/v1/jobs/job_x/images/cat/0.png?api_key={KEY}").status_code == 404
        assert httpx.get(f"{url}/v1/jobs?limit=5&api_key={KEY}&offset=0").status_code == 401  # header routes
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.post(f"{url}/knn-service?API_KEY={KEY}", content=b"{}").status_code == 401  # lower-case only
        logging.getLogger("retrogen.service.test").warning("request headers: %s",
                                                           {"x-api-key": KEY, "authorization": f"Bearer {KEY}"})
    finally:
        for logger in ("uvicorn.access", "uvicorn.error", ""):
            logging.getLogger(logger).removeHandler(lines)
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    text = "\n".join(lines.lines)
    assert KEY not in text, text
    assert "GET /v1/jobs/job_x/images/cat/0.png?api_key=[redacted] HTTP/1.1" in text
    assert "GET /v1/jobs?limit=5&api_key=[redacted]&offset=0 HTTP/1.1" in text
    assert "POST /knn-service?API_KEY=[redacted]" in text
    assert "'x-api-key': '[redacted]'" in text and "'authorization': 'Bearer [redacted]'" in text


@pytest.mark.parametrize("line, expected", [
    ("GET /knn-service?api_key=s3cr3t HTTP/1.1", "GET /knn-service?api_key=[redacted] HTTP/1.1"),
    ("/x?a=1&apikey=s3cr3t&b=2", "/x?a=1&apikey=[redacted]&b=2"),
    ("/x?access_token=s3cr3t", "/x?access_token=[redacted]"),
    ("/x?api%5Fkey=s3cr3t", "/x?api%5Fkey=[redacted]"),
    ("Authorization: Bearer s3cr3t", "Authorization: Bearer [redacted]"),
    ("X-API-Key: s3cr3t", "X-API-Key: [redacted]"),
    ("[(b'x-api-key', b's3cr3t'), (b'host', b'h')]", "[(b'x-api-key', b'[redacted]'), (b'host', b'h')]"),
    ("nothing secret here: 200 OK", "nothing secret here: 200 OK"),
])
def test_redact(line, expected):
    from retrogen.service.core.logs import redact

    assert redact(line) == expected
