"""Replicas on one Postgres and one S3 bucket: 2 web servers (no in-process worker) and 2 workers, separate
processes with their own data dirs sharing the database and the object store (moto's S3 server on loopback). Jobs go in through both servers; one server and one worker are
killed with SIGKILL mid-job. Every job must succeed exactly once, no job may run twice at the same time, and
no two generation jobs may ever run at once on the device (the runners log each run's start and end).

This module is also the processes' entry point (``python -m tests.test_service_replicas serve|worker ...``):
the fake runners of ``tests.service_fakes``, wrapped to log their runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select

from retrogen.service.core.tables import Job
from tests.service_fakes import dataset_files, fake_registry, zip_bytes
from tests.test_service_crash import ROOT, free_port, kill9, poll, stopper  # noqa: F401 - stopper is a fixture

pytest_plugins = ("tests.pg_server", "tests.s3_server")


def recording_registry(log_path: str):
    """The fake methods, each run appending ``{"ev": start|end, "job", "kind", "pid", "t"}`` lines to a file."""
    reg = fake_registry()

    def record(ev: str, job_id: str, kind: str) -> None:
        line = json.dumps({"ev": ev, "job": job_id, "kind": kind, "pid": os.getpid(), "t": time.time()})
        with open(log_path, "a") as f:  # one short O_APPEND write per line: lines of processes never interleave
            f.write(line + "\n")

    def wrap(spec):
        def run(ctx):
            record("start", ctx.job_id, spec.kind)
            spec.runner(ctx)
            record("end", ctx.job_id, spec.kind)

        return dataclasses.replace(spec, runner=run)

    for name, spec in list(reg.methods.items()):
        reg.methods[name] = wrap(spec)
    return reg


def spawn(what: str, settings: dict, log_path: Path, port: int = 0):
    import subprocess

    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.test_service_replicas", what, json.dumps(settings),
                             str(log_path), str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def up(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def runs(log_path: Path, killed_pid: int, killed_at: float) -> dict[str, list[tuple[float, float, int]]]:
    """job -> its runs as (start, end, pid); a run of the killed worker that never ended ends at the kill."""
    open_runs: dict[tuple[str, int], float] = {}
    out: dict[str, list[tuple[float, float, int]]] = {}
    kinds = {}
    for rec in map(json.loads, log_path.read_text().splitlines()):
        kinds[rec["job"]] = rec["kind"]
        key = (rec["job"], rec["pid"])
        if rec["ev"] == "start":
            assert key not in open_runs, f"{key} started twice in one process"
            open_runs[key] = rec["t"]
        else:
            out.setdefault(rec["job"], []).append((open_runs.pop(key), rec["t"], rec["pid"]))
    for (job, pid), start in open_runs.items():
        assert pid == killed_pid, f"run of {job} in live process {pid} never ended"
        out.setdefault(job, []).append((start, killed_at, pid))
    return {job: sorted(r) for job, r in out.items()} | {"_kinds": kinds}  # type: ignore[dict-item]


def overlapping(intervals: list[tuple[float, float, int]]) -> list:
    s = sorted(intervals)
    return [(a, b) for a, b in pairwise(s) if b[0] < a[1]]  # sorted by start: any overlap shows in a neighbour


def test_two_servers_two_workers_on_postgres_survive_kill9(tmp_path, pg_database, s3_endpoint, stopper):  # noqa: F811
    log_path = tmp_path / "runs.jsonl"
    # the processes inherit the endpoint and credentials from the environment (AWS_*), as on a real host
    base = {"database_url": pg_database, "storage_url": s3_endpoint.new_bucket() + "/store", "job_lease_s": 1.5,
            "poll_interval_s": 0.05, "enable_worker": False, "num_generation_threads": 2}
    ports = [free_port(), free_port()]
    servers = [spawn("serve", base | {"data_dir": str(tmp_path / f"s{i}")}, log_path, p) for i, p in enumerate(ports)]
    workers = [spawn("worker", base | {"data_dir": str(tmp_path / f"w{i}")}, log_path) for i in range(2)]
    stopper.extend(servers + workers)
    https = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=10) for p in ports]
    for h in https:
        poll(lambda h=h: up(h), timeout_s=60, what="server start")

    ds = https[0].post("/v1/datasets", files={"file": ("d.zip", zip_bytes(dataset_files()), "application/zip")})
    ds_id = ds.json()["id"]
    ids = []
    for i in range(10):  # 6 generation + 4 retrieval, alternately through each server
        method = "fake-generation" if i % 5 < 3 else "fake-retrieval"
        r = https[i % 2].post("/v1/jobs", json={"dataset": ds_id, "method": method, "per_class": 4,
                                                "params": {"delay_s": 0.1}})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    http = https[1]

    # kill a worker while it runs a generation job, and the server the first jobs came through
    pids = {w.pid: w for w in workers}
    engine = create_engine(pg_database)  # the API does not say which worker holds a job; the row does

    def victim():
        with engine.connect() as c:
            rows = c.execute(select(Job.id, Job.worker, Job.progress).where(
                Job.kind == "generation", Job.state == "running")).all()
        for jid, holder, progress in rows:  # holder: host:pid:suffix
            if holder and int(holder.split(":")[1]) in pids and (progress or {}).get("done", 0) >= 2:
                return jid, int(holder.split(":")[1])
        return None

    try:
        victim_job, victim_pid = poll(victim, timeout_s=30, what="a generation job running on a worker")
    finally:
        engine.dispose()
    kill9(pids[victim_pid])
    killed_at = time.time()
    kill9(servers[0])

    def all_done():
        states = [http.get(f"/v1/jobs/{jid}").json() for jid in ids]
        return states if all(s["state"] in ("succeeded", "failed", "cancelled") for s in states) else None

    final = poll(all_done, timeout_s=60, what="every job to finish")
    assert [j["state"] for j in final] == ["succeeded"] * 10, [(j["id"], j["state"], j["error"]) for j in final]
    assert all(j["num_images"] == 8 for j in final)
    assert next(j for j in final if j["id"] == victim_job)["attempts"] == 2  # re-claimed after its lease expired
    for jid in ids:
        events = [e["message"] for e in http.get(f"/v1/jobs/{jid}/events").json() if e["kind"] == "state"]
        assert Counter(events)["succeeded"] == 1, (jid, events)
    assert len(http.get(f"/v1/jobs/{ids[0]}/results").json()["items"]) == 8  # stored by a worker, served by B
    import s3fs

    stored = s3fs.S3FileSystem(skip_instance_cache=True).ls(base["storage_url"].removeprefix("s3://"))
    assert {p.rsplit("/", 1)[-1] for p in stored} >= {"datasets", "results"}, "datasets and results are in the bucket"
    assert not any((tmp_path / d / "store").exists() for d in ("s0", "s1", "w0", "w1")), "no local store"

    by_job = runs(log_path, victim_pid, killed_at)
    kinds = by_job.pop("_kinds")
    for jid in ids:
        assert sum(pid != victim_pid for *_, pid in by_job[jid]) == 1, (jid, by_job[jid])  # one completed run
        assert overlapping(by_job[jid]) == [], f"{jid} ran twice at once"
    generation = [r for jid, rs in by_job.items() if kinds[jid] == "generation" for r in rs]
    assert len(generation) >= 7 and overlapping(generation) == [], "two generation jobs ran at once on the device"


def _main() -> None:
    """``python -m tests.test_service_replicas serve|worker SETTINGS_JSON RUN_LOG PORT``."""
    from retrogen.service.core.config import Settings

    what, settings, log_path, port = sys.argv[1], Settings(**json.loads(sys.argv[2])), sys.argv[3], int(sys.argv[4])
    registry = recording_registry(log_path)
    if what == "worker":
        from retrogen.service.wiring import Services

        Services.from_settings(settings, methods=registry).worker.run_forever()
    else:  # like `retrogen serve --no-worker`
        import uvicorn

        from retrogen.service.api.main import create_app

        app = create_app(settings, methods=registry, start_worker=False)
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    _main()
