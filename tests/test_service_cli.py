"""``retrogen serve`` as a real process on loopback: it starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def test_retrogen_serve_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"RETROGEN_DATA_DIR": str(tmp_path / "data"), "RETROGEN_MAX_PER_CLASS": "5",
                        "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", "from retrogen.cli import main; main()", "serve", "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.2)
        assert r.status_code == 200
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert models["methods"]["retrieval"] == "retrieval" and models["methods"]["prompt"] == "generation"
        ds = httpx.post(f"http://127.0.0.1:{port}/v1/datasets", files={"file": ("x.zip", b"nope")})
        assert ds.status_code == 422
        job = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json={"dataset": "ds_x", "method": "prompt",
                                                                  "per_class": 6})
        assert job.status_code == 404  # no such dataset (checked before the per_class limit)
        assert (tmp_path / "data" / "retrogen.db").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is 0 or -SIGTERM
    assert proc.returncode in (0, -signal.SIGTERM), out[-2000:]
    assert "Application shutdown complete" in out
    assert "worker: in-process" in out


def test_app_import_and_factory_load_no_torch_or_faiss(tmp_path):
    code = ("import sys; from retrogen.service.api.main import create_app; from retrogen.service.core.config import Settings; "
            f"create_app(Settings(data_dir={str(tmp_path)!r}), start_worker=False); "
            "print(sorted(m for m in ('torch', 'faiss', 'diffusers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=os.environ | {"OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_retrogen_serve_logs_no_api_key(tmp_path):
    """``retrogen serve`` (the Docker image's command too) writes uvicorn's access log: ``?api_key=`` (ClipClient's
    only way to send a key) used to appear there in plain text."""
    key = "serve-key-0123456789"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"RETROGEN_DATA_DIR": str(tmp_path / "data"), "RETROGEN_API_KEYS": f'["{key}"]',
                        "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", "from retrogen.cli import main; main()", "serve", "--port",
                             str(port), "--no-worker"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.2)
        assert httpx.get(f"{base}/v1/jobs/job_x/images/cat/0.png?api_key={key}").status_code == 404
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={"X-API-Key": "not-the-key-0"}).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert '"GET /v1/jobs/job_x/images/cat/0.png?api_key=[redacted] HTTP/1.1" 404' in out, out[-2000:]
    assert key not in out
