"""Evaluation jobs through the service: queued as jobs in the retrieval lane, run on stored datasets and
augmentation results, isolated per key; the report and chart are served; errors are clear.

Augmentation jobs come from the fake retrieval runner (tests/service_fakes.py); the classifier uses
``pixels:8`` features (no model) with one seed and few steps, so each evaluation takes about a second.
"""

from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrogen.service.domain import evaluations
from tests.conftest import colour_image, png_bytes
from tests.service_fakes import COLOURS, dataset_files, fake_registry, make_settings, zip_bytes

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
FAST = {"embedder": "pixels:8", "num_seeds": 1, "num_steps": 20}


def registry():
    reg = fake_registry()
    reg.register(evaluations.SPEC)
    return reg


def app_for(data_dir):
    from retrogen.service.api.main import create_app

    return create_app(make_settings(data_dir, api_keys=[KEY_A, KEY_B]), methods=registry(), start_worker=False)


@pytest.fixture()
def setup(tmp_path):
    """App, two clients (keys A and B), A's train and test datasets and a succeeded augmentation job of A's."""
    app = app_for(tmp_path / "data")
    a = TestClient(app, headers={"X-API-Key": KEY_A})
    b = TestClient(app, headers={"X-API-Key": KEY_B})
    train = upload(a, dataset_files(per_class=3))
    test = upload(a, held_out_files())
    r = a.post("/v1/jobs", json={"dataset": train, "method": "fake-retrieval", "per_class": 4})
    assert r.status_code == 202, r.text
    assert app.state.worker.run_once("retrieval") == r.json()["id"]
    return {"app": app, "a": a, "b": b, "train": train, "test": test, "aug": r.json()["id"], "tmp": tmp_path}


def upload(client, files) -> str:
    r = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(files), "application/zip")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def held_out_files(extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {f"{c}/t{i}.png": png_bytes(colour_image(COLOURS[c], size=(20, 20), noise_seed=100 + i))
             for c in ("cat", "dog") for i in range(3)}
    return files | (extra or {})


def submit(client, s, augmentations=None, test=None, **config):
    return client.post("/v1/evaluations", json={
        "train_dataset": s["train"], "test_dataset": test or s["test"],
        "augmentations": augmentations or {"fake": s["aug"]}, "config": FAST | config})


def test_evaluation_job_end_to_end_survives_a_restart_and_is_isolated(setup):
    s = setup
    a, b = s["a"], s["b"]
    r = submit(a, s)
    assert r.status_code == 202, r.text
    ev = r.json()
    assert r.headers["location"] == f"/v1/evaluations/{ev['id']}"
    assert (ev["state"], ev["kind"], ev["method"], ev["dataset"]) == ("queued", "retrieval", "evaluation", s["train"])
    assert ev["gallery_urls"] == {"fake": f"/gallery/{s['aug']}"} and ev["chart_url"] is None
    assert a.get(f"/v1/evaluations/{ev['id']}/report.png").status_code == 409
    # another key sees nothing of it, and cannot use A's datasets or jobs
    assert b.get(f"/v1/evaluations/{ev['id']}").status_code == 404
    assert b.get(f"/v1/jobs/{ev['id']}").status_code == 404
    assert b.get(f"/v1/evaluations/{ev['id']}/report.png").status_code == 404
    assert submit(b, s).status_code == 404
    b_train, b_test = upload(b, dataset_files(per_class=3)), upload(b, held_out_files())
    r = submit(b, {"train": b_train, "test": b_test, "aug": s["aug"]})
    assert r.status_code == 404 and s["aug"] in r.json()["detail"]

    # a fresh app on the same data folder (a restarted server) runs the queued job, in the retrieval lane
    app2 = app_for(s["tmp"] / "data")
    assert app2.state.worker.run_once("generation") is None
    assert app2.state.worker.run_once("retrieval") == ev["id"]
    job = a.get(f"/v1/jobs/{ev['id']}").json()
    assert job["state"] == "succeeded", job
    assert job["progress"]["stage"] == "done" and job["summary"]["method"] == "evaluation"
    assert set(job["summary"]["arms"]) == {"real-only", "fake"} and job["num_images"] == 0

    got = a.get(f"/v1/evaluations/{ev['id']}").json()
    report = got["report"]
    assert [arm["name"] for arm in report["arms"]] == ["real-only", "fake"]
    assert report["classes"] == ["cat", "dog"] and report["counts"]["test"] == {"cat": 3, "dog": 3}
    fake = report["arms"][1]
    assert fake["num_images"] == 8 and fake["counts"] == {"cat": 4, "dog": 4} and fake["gain"] is not None
    assert 0.0 <= fake["accuracy"]["mean"] <= 1.0 and report["config"]["embedder"] == "pixels:8"
    # arms are named by job id; no server folder leaks into what the caller reads
    assert fake["set_dirs"] == [s["aug"]] and str(s["tmp"]) not in json.dumps(got)
    chart = a.get(got["chart_url"])
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(chart.content)).size[0] > 100
    # the augmentation job knows its evaluations (the gallery reads this); B's view of it is a 404
    used = a.get(f"/v1/jobs/{s['aug']}/evaluations").json()
    assert [e["id"] for e in used] == [ev["id"]] and used[0]["chart_url"] == got["chart_url"]
    assert b.get(f"/v1/jobs/{s['aug']}/evaluations").status_code == 404
    assert a.get(f"/v1/evaluations/{s['aug']}").status_code == 404  # not an evaluation


def test_submission_errors_are_clear_and_queue_nothing(setup):
    s = setup
    a = s["a"]
    r = a.post("/v1/evaluations", json={"train_dataset": "ds_nope", "test_dataset": s["test"],
                                        "augmentations": {"fake": s["aug"]}})
    assert r.status_code == 404 and "ds_nope" in r.json()["detail"]
    r = submit(a, s, augmentations={"fake": "job_nope"})
    assert r.status_code == 404 and "job_nope" in r.json()["detail"]
    r = submit(a, s, test=s["train"])
    assert r.status_code == 422 and "train dataset" in r.json()["detail"]
    r = submit(a, s, embedder="open_clip:ViT-B-32:/etc/passwd")
    assert r.status_code == 422 and "server operator" in r.json()["detail"]
    r = submit(a, s, colour="red")
    assert r.status_code == 422 and "colour" in r.json()["detail"]
    r = submit(a, s, num_seeds=0)
    assert r.status_code == 422 and "num_seeds" in r.json()["detail"]
    r = submit(a, s, augmentations={"real-only": s["aug"]})
    assert r.status_code == 422 and "real-only" in r.json()["detail"]
    # an unfinished augmentation job: 409 naming its state
    pending = a.post("/v1/jobs", json={"dataset": s["train"], "method": "fake-retrieval", "per_class": 1}).json()["id"]
    r = submit(a, s, augmentations={"fake": s["aug"], "later": pending})
    assert r.status_code == 409 and pending in r.json()["detail"] and "queued" in r.json()["detail"]
    # the generic job route cannot queue an evaluation (its params would name stored trees directly)
    r = a.post("/v1/jobs", json={"dataset": s["train"], "method": "evaluation", "per_class": 1,
                                 "params": {"augmentations": {}}})
    assert r.status_code == 422 and "/v1/evaluations" in r.json()["detail"]
    jobs = a.get("/v1/jobs").json()["data"]
    assert [j["method"] for j in jobs] == ["fake-retrieval", "fake-retrieval"]


def test_leaking_set_fails_the_job_with_the_reason(setup):
    s = setup
    a = s["a"]
    # the fake runner's first cat image, byte for byte, in the test set
    copy = png_bytes(colour_image(COLOURS["cat"], size=(16, 16), noise_seed=0))
    test = upload(a, held_out_files({"cat/copy.png": copy}))
    r = submit(a, s, test=test)
    assert r.status_code == 202, r.text
    assert s["app"].state.worker.run_once("retrieval") == r.json()["id"]
    job = a.get(f"/v1/evaluations/{r.json()['id']}").json()
    assert job["state"] == "failed" and job["report"] is None
    assert "copy test images" in job["error"] and "test:cat/copy.png (bytes)" in job["error"], job["error"]
    chart = a.get(f"/v1/evaluations/{job['id']}/report.png")
    assert chart.status_code == 409 and "copy test images" in chart.json()["detail"]
    assert a.get(f"/v1/jobs/{s['aug']}/evaluations").json() == []


def test_cancel_an_evaluation_like_any_job(setup):
    s = setup
    a = s["a"]
    ev = submit(a, s).json()["id"]
    r = a.post(f"/v1/jobs/{ev}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert s["app"].state.worker.run_once("retrieval") is None
    assert a.get(f"/v1/evaluations/{ev}").json()["state"] == "cancelled"


def test_failures_name_ids_not_server_folders(setup):
    s = setup
    a = s["a"]
    r = submit(a, s, cap_per_class=0)  # valid config, but leaves the set empty: found only when it runs
    assert r.status_code == 202, r.text
    assert s["app"].state.worker.run_once("retrieval") == r.json()["id"]
    job = a.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["state"] == "failed" and "has no images" in job["error"], job["error"]
    assert f"augmentation job {s['aug']}" in job["error"] and str(s["tmp"]) not in job["error"]


def test_a_server_without_the_evaluation_method_refuses_before_queueing(tmp_path):
    from retrogen.service.api.main import create_app

    client = TestClient(create_app(make_settings(tmp_path / "data"), methods=fake_registry(), start_worker=False))
    train, test = upload(client, dataset_files(per_class=3)), upload(client, held_out_files())
    r = client.post("/v1/evaluations", json={"train_dataset": train, "test_dataset": test,
                                             "augmentations": {"x": "job_x"}})
    assert r.status_code == 422 and "evaluation" in r.json()["detail"]
    assert client.get("/v1/jobs").json()["count"] == 0
