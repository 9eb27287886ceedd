"""kill -9 of a worker, and of a server with its in-process worker, in the middle of a job: after a restart
the job completes (re-run from scratch under a new lease), and results finished before are intact; on SQLite
and on a real Postgres (``tests.pg_server``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from retrogen.fileio import sha256_bytes
from tests.service_fakes import dataset_files, fake_registry, make_settings, zip_bytes

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ("tests.pg_server",)


def spawn(what: str, settings: dict, *extra: str) -> subprocess.Popen:
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.service_fakes", what, json.dumps(settings), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def poll(fn, timeout_s=30, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def result_shas(client, job_id) -> dict[str, str]:
    items = client.get(f"/v1/jobs/{job_id}/results").json()["items"]
    return {it["file"]: sha256_bytes(client.get(it["url"]).content) for it in items
            if sha256_bytes(client.get(it["url"]).content) == it["provenance"]["sha256"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture()
def stopper():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_kill9_worker_mid_job_then_restart(tmp_path, stopper, database_url):
    from retrogen.service.api.main import create_app

    cfg = {"data_dir": str(tmp_path / "data"), "job_lease_s": 1.5, "poll_interval_s": 0.1, "enable_worker": False,
           "database_url": database_url}
    app = create_app(make_settings(**cfg), methods=fake_registry(), start_worker=False)
    client = TestClient(app)
    ds = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files()), "application/zip")}).json()
    body = {"dataset": ds["id"], "method": "fake-retrieval"}
    done_id = client.post("/v1/jobs", json=body | {"per_class": 2}).json()["id"]
    assert app.state.worker.run_once("retrieval") == done_id
    finished_before = result_shas(client, done_id)
    assert len(finished_before) == 4

    job_id = client.post("/v1/jobs", json=body | {"per_class": 15, "params": {"delay_s": 0.1}}).json()["id"]
    stopper.append(first := spawn("worker", cfg))
    poll(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"].get("done", 0) >= 3, what="progress")
    kill9(first)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "running" and job["attempts"] == 1  # the dead worker's lease still holds it

    stopper.append(spawn("worker", cfg))
    job = poll(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("succeeded", "failed") and j,
               timeout_s=60, what="job to finish after restart")
    assert job["state"] == "succeeded" and job["attempts"] == 2 and job["num_images"] == 30, job
    assert len(result_shas(client, job_id)) == 30  # complete, and every byte matches its provenance
    assert result_shas(client, done_id) == finished_before
    events = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json() if e["kind"] == "state"]
    assert any("previous worker stopped" in m for m in events), events
    assert not any((tmp_path / "data" / "store" / "staging").glob("*"))


def test_kill9_server_with_inprocess_worker_then_restart(tmp_path, stopper, database_url):
    cfg = {"data_dir": str(tmp_path / "data"), "job_lease_s": 1.5, "poll_interval_s": 0.1, "enable_worker": True,
           "database_url": database_url}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stopper.append(server := spawn("serve", cfg, str(port)))
    http = httpx.Client(base_url=url, timeout=10)
    poll(lambda: _up(http), what="server start")
    ds = http.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files()), "application/zip")}).json()
    job_id = http.post("/v1/jobs", json={"dataset": ds["id"], "method": "fake-generation", "per_class": 15,
                                         "params": {"delay_s": 0.1}}).json()["id"]
    poll(lambda: http.get(f"/v1/jobs/{job_id}").json()["progress"].get("done", 0) >= 3, what="progress")
    kill9(server)
    stopper.append(spawn("serve", cfg, str(port)))
    poll(lambda: _up(http), what="server restart")
    job = poll(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["state"] in ("succeeded", "failed") and j,
               timeout_s=60, what="job to finish after restart")
    assert job["state"] == "succeeded" and job["num_images"] == 30 and job["attempts"] == 2, job


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False
