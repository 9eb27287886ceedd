"""The typed client over real HTTP (uvicorn on loopback, in-process worker): upload a folder, submit, wait,
download, and train-loop access through ``as_torch_dataset``."""

from __future__ import annotations

import json

import pytest

from retrogen.fileio import sha256_bytes
from tests.conftest import ThreadedUvicorn
from tests.service_fakes import dataset_files, fake_registry, make_settings


def test_client_round_trip(tmp_path):
    from retrogen.client import JobFailedError, RetrogenAPIError, RetrogenClient
    from retrogen.service.api.main import create_app

    folder = tmp_path / "pets"
    for name, data in dataset_files(per_class=2, classes=("cat", "dog", "fox")).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    app = create_app(make_settings(tmp_path / "data", api_keys=["secret-key-1"]), methods=fake_registry(),
                     start_worker=True)
    with ThreadedUvicorn(app) as server:
        app.state.worker.start()  # ThreadedUvicorn runs without lifespan
        try:
            with RetrogenClient(server.url, api_key="secret-key-1") as rc:
                ds = rc.upload_folder(folder)
                assert ds["classes"] == {"cat": 2, "dog": 2, "fox": 2} and ds["name"] == "pets"
                job = rc.wait(rc.submit(ds["id"], "fake-retrieval", per_class=4)["id"], timeout_s=30, poll_s=0.1)
                assert job["num_images"] == 12
                out = rc.download(job["id"], tmp_path / "out")
                prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
                assert len(prov) == 12 and json.loads((out / "summary.json").read_text())["method"] == "fake-retrieval"
                assert all(sha256_bytes((out / r["file"]).read_bytes()) == r["sha256"] for r in prov)
                train = rc.as_torch_dataset(out)
                assert len(train) == 12 and train.classes == ["cat", "dog", "fox"]
                image, target = train[5]
                assert image.size == (16, 16) and train.classes[target] == prov[5]["label"]
                with pytest.raises(RetrogenAPIError) as err:
                    rc.submit(ds["id"], "nope", per_class=1)
                assert err.value.status == 422 and "fake-retrieval" in err.value.detail
                with pytest.raises(JobFailedError, match="crashed"):
                    rc.wait(rc.submit(ds["id"], "boom", per_class=1)["id"], timeout_s=30, poll_s=0.1, progress=False)
            with RetrogenClient(server.url) as anonymous, pytest.raises(RetrogenAPIError) as err:
                anonymous.datasets()
            assert err.value.status == 401
        finally:
            app.state.worker.stop()


def test_torch_dataset_indices_follow_the_class_list_not_the_labels_present(tmp_path):
    """A class that got no image keeps its index: 'fox' is 2 even when 'dog' returned nothing."""
    from retrogen.client import RetrogenClient
    from retrogen.errors import InvalidInputError, NotFoundError
    from retrogen.outputs import OutputFolder
    from tests.conftest import colour_image, png_bytes

    out = tmp_path / "result"
    with OutputFolder.create(out) as w:
        for label in ("cat", "fox"):
            w.add(label=label, filename="0.png", image_bytes=png_bytes(colour_image((9, 9, 9))), method="m", fields={})
        w.close({"method": "m", "per_class": {c: {"requested": 1, "returned": int(c != "dog"), "reason": None}
                                              for c in ("cat", "dog", "fox")}})
    train = RetrogenClient.as_torch_dataset(out)
    assert train.classes == ["cat", "dog", "fox"] and [train[i][1] for i in range(2)] == [0, 2]
    explicit = RetrogenClient.as_torch_dataset(out, classes=["fox", "dog", "cat", "emu"])
    assert [explicit[i][1] for i in range(2)] == [2, 0] and explicit.class_to_idx["emu"] == 3
    with pytest.raises(InvalidInputError, match=r"labelled \['fox'\], not in the class list"):
        RetrogenClient.as_torch_dataset(out, classes=["cat", "dog"])
    (out / "summary.json").unlink()
    with pytest.raises(NotFoundError, match="classes="):
        RetrogenClient.as_torch_dataset(out)
