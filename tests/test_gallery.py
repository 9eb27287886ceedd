"""The job gallery page in a real headless Chromium (Debian ``chromium`` driven by Playwright, no browser download).

The page is served by the gallery router on a real uvicorn; the jobs API it reads is a stand-in route with the
same path and manifest shape ({url, label, provenance}), serving real PNG bytes.
"""

from __future__ import annotations

import io
import os

import pytest
from fastapi import APIRouter, HTTPException, Response
from fastapi.testclient import TestClient

from retrogen.service.api.routes.gallery import router as gallery_router
from tests.conftest import ThreadedUvicorn, colour_image, make_router_app

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
XSS_LABEL = '<img src=x onerror="window.__pwned=1">'


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    colour_image(rgb, size=(24, 24)).save(buf, format="PNG")
    return buf.getvalue()


def _manifest():
    """Built with the jobs API's own response model, so the page is tested against the real shape."""
    from retrogen.service.api.schemas import ResultItem, ResultsPublic

    items = []
    for label, method, n in (("cat", "retrieval:image", 3), ("cat", "generation:text", 2),
                             ("dog", "retrieval:image", 2), (XSS_LABEL, "generation:text", 1)):
        for i in range(n):
            name = f"{len(items)}.png"
            prov = {"label": label, "method": method, "sha256": f"{len(items):064x}", "file": f"{label}/{name}"}
            prov |= {"sample_id": 100 + i, "similarity": 0.9 - i / 10} if method.startswith("retrieval") else \
                {"seed": 1000 + i, "prompt": f"a photo of a {label}"}
            items.append(ResultItem(url=f"/v1/jobs/job-1/images/{name}", label=label, file=prov["file"],
                                    provenance=prov))
    return ResultsPublic(job_id="job-1", count=len(items), summary={"method": "mixed"}, items=items).model_dump()


def _jobs_standin() -> APIRouter:
    router = APIRouter()
    manifest = _manifest()

    @router.get("/v1/jobs/{job_id}/results")
    def results(job_id: str):
        if job_id != "job-1":
            raise HTTPException(404, f"no job {job_id!r}")
        return manifest

    @router.get("/v1/jobs/{job_id}/images/{name}")
    def image(job_id: str, name: str):
        return Response(_png((200, 30 * int(name.split(".")[0]) % 255, 40)), media_type="image/png")

    return router


def _gallery_app(tmp_path, *routers):
    """The gallery router (and ``routers``) with a database holding job ``job-1`` (API keys off: the page answers
    404 for a job that does not exist)."""
    from retrogen.service.core.db import Database
    from retrogen.service.core.tables import Job

    app = make_router_app(gallery_router, *routers)
    app.state.db = Database(f"sqlite:///{tmp_path / 'gallery.db'}")
    with app.state.db.session() as s:
        s.add(Job(id="job-1", owner="anonymous", dataset_id="ds_1", dataset_key="datasets/x", kind="retrieval",
                  method="retrieval", per_class=1, params={}, created=0.0))
    return app


@pytest.fixture(scope="module")
def live_gallery(tmp_path_factory):
    with ThreadedUvicorn(_gallery_app(tmp_path_factory.mktemp("gallery"), _jobs_standin())) as server:
        yield server


@pytest.fixture(scope="module")
def page(live_gallery):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run the "
                    "gallery browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            pg = browser.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.errors = errors
            yield pg
        finally:
            browser.close()


def _open(page, url):
    page.goto(url)
    # function form (not a bare expression): the page's CSP forbids eval, and must keep forbidding it
    page.wait_for_function("() => document.querySelectorAll('figure.item').length > 0 || "
                           "document.getElementById('status').classList.contains('error')", timeout=15_000)


def test_gallery_groups_by_class_filters_and_shows_provenance(page, live_gallery):
    _open(page, f"{live_gallery.url}/gallery/job-1")
    assert page.errors == []
    groups = page.eval_on_selector_all("section.class-group", "els => els.map(e => [e.dataset.label, "
                                       "e.querySelectorAll('figure.item').length])")
    assert sorted(groups) == sorted([["cat", 5], ["dog", 2], [XSS_LABEL, 1]])
    # images really loaded (decoded by the browser), not just <img> tags
    page.wait_for_function("() => [...document.images].filter(i => i.closest('figure')).every(i => i.complete && "
                           "i.naturalWidth === 24)", timeout=15_000)
    assert page.text_content("#count") == "8 of 8 images"

    page.select_option("#method-filter", "generation:text")
    methods = page.eval_on_selector_all("figure.item", "els => els.map(e => e.dataset.method)")
    assert methods == ["generation:text"] * 3
    page.select_option("#class-filter", "cat")
    assert page.eval_on_selector_all("section.class-group", "els => els.map(e => e.dataset.label)") == ["cat"]
    assert page.text_content("#count") == "2 of 8 images"

    page.select_option("#method-filter", "")
    page.click("section.class-group[data-label='cat'] figure.item >> nth=0")
    assert page.is_visible("#details")
    shown = page.text_content("#details-json")
    assert '"sample_id": 100' in shown and '"method": "retrieval:image"' in shown
    assert "similarity" in page.text_content("#details-summary")
    page.click("#close-details")
    assert not page.is_visible("#details")


def test_labels_are_rendered_as_text_never_as_html(page, live_gallery):
    _open(page, f"{live_gallery.url}/gallery/job-1")
    assert page.evaluate("() => window.__pwned") is None
    headings = page.eval_on_selector_all("section.class-group h2", "els => els.map(e => e.textContent)")
    assert f"{XSS_LABEL} (1)" in headings
    assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"]').length") == 0


def test_unknown_job_has_no_page(page, live_gallery):
    """Keys off: a job that does not exist has no gallery (it once answered 200 for any id)."""
    response = page.goto(f"{live_gallery.url}/gallery/no-such-job")
    assert response.status == 404 and "no job 'no-such-job'" in page.content()


def test_page_and_assets_are_served_with_a_strict_policy(tmp_path):
    client = TestClient(_gallery_app(tmp_path))
    assert client.get("/gallery/job-2").status_code == 404
    r = client.get("/gallery/job-1")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/gallery/assets/gallery.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/gallery/assets/gallery.css").status_code == 200
    assert client.get("/gallery/assets/..%2Fgallery.py").status_code == 404
    assert client.get("/gallery/assets/gallery.html").status_code == 404
    assert client.get("/gallery/bad%20id%3Cscript%3E").status_code == 422


def test_gallery_of_a_real_retrieval_job_with_api_keys(page, tmp_path, service_index_dir):
    """The whole service on uvicorn: a retrieval job run by the worker, browsed with a key in the fragment."""
    from retrogen.service.api.main import create_app
    from tests.conftest import SERVICE_FAMILIES, png_bytes
    from tests.service_fakes import make_settings, zip_bytes

    key = "gallery-key-0123"
    app = create_app(make_settings(tmp_path / "data", api_keys=[key],
                                   indexes={"tiny": {"path": str(service_index_dir)}}), start_worker=False)
    client = TestClient(app, headers={"X-API-Key": key})
    files = {f"{fam}/{i}.png": png_bytes(colour_image(SERVICE_FAMILIES[fam], noise_seed=70 + i))
             for fam in ("red", "blue") for i in range(2)}
    ds = client.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(files), "application/zip")}).json()["id"]
    job = client.post("/v1/jobs", json={"dataset": ds, "method": "retrieval", "per_class": 2,
                                        "params": {"mode": "image", "leakage_threshold": None,
                                                   "dedup_threshold": None}}).json()["id"]
    assert app.state.worker.run_once("retrieval") == job
    results = client.get(f"/v1/jobs/{job}/results").json()["items"]
    expected = sorted([label, sum(it["label"] == label for it in results)] for label in {it["label"] for it in results})
    assert expected == [["blue", 2], ["red", 2]]
    with ThreadedUvicorn(app) as server:
        page.goto(f"{server.url}/gallery/{job}")  # no key: the server's 401 message is shown
        page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
        assert "HTTP 401" in page.text_content("#status")
        page.goto("about:blank")
        # keys on, an unknown job: the page is served (a page load has no key), its keyed request says 404
        _open(page, f"{server.url}/gallery/job_nope#key={key}")
        assert "HTTP 404" in page.text_content("#status") and "no job 'job_nope'" in page.text_content("#status")
        page.goto("about:blank")
        _open(page, f"{server.url}/gallery/{job}#key={key}")
        assert "key=" not in page.url, "the key leaves the address bar"
        groups = page.eval_on_selector_all("section.class-group", "els => els.map(e => [e.dataset.label, "
                                           "e.querySelectorAll('figure.item').length])")
        assert sorted(groups) == expected
        # images need the key: they arrive as blob: URLs fetched with it, and decode
        page.wait_for_function("() => [...document.querySelectorAll('figure.item img')].every(i => "
                               "i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)", timeout=15_000)
        page.click("figure.item >> nth=0")
        details = page.text_content("#details-json")
        assert '"method": "retrieval:image"' in details and '"sample_id"' in details
    page.evaluate("() => sessionStorage.clear()")


def test_gallery_shows_the_evaluation_chart_next_to_the_images(page, tmp_path):
    """An augmentation job's page shows the chart of an evaluation that used it; the evaluation's own page
    shows the chart with a link to each augmentation's gallery (fake augmentation runner, pixel features)."""
    from retrogen.service.api.main import create_app
    from tests.service_fakes import dataset_files, make_settings
    from tests.test_service_evaluations import held_out_files, registry, upload

    app = create_app(make_settings(tmp_path / "data"), methods=registry(), start_worker=False)
    client = TestClient(app)
    train, test = upload(client, dataset_files(per_class=3)), upload(client, held_out_files())
    aug = client.post("/v1/jobs", json={"dataset": train, "method": "fake-retrieval", "per_class": 2}).json()["id"]
    assert app.state.worker.run_once("retrieval") == aug
    ev = client.post("/v1/evaluations", json={"train_dataset": train, "test_dataset": test, "augmentations": {
        "fake": aug}, "config": {"embedder": "pixels:8", "num_seeds": 1, "num_steps": 10}}).json()["id"]
    assert app.state.worker.run_once("retrieval") == ev
    chart_loaded = ("() => { const i = document.getElementById('evaluation-chart'); "
                    "return !document.getElementById('evaluation').hidden && i.complete && i.naturalWidth > 100; }")
    with ThreadedUvicorn(app) as server:
        _open(page, f"{server.url}/gallery/{aug}")
        page.wait_for_function(chart_loaded, timeout=15_000)
        assert page.eval_on_selector_all("figure.item", "els => els.length") == 4
        assert page.text_content("#evaluation-title") == f"Evaluation {ev}"
        arms = page.eval_on_selector_all("li.evaluation-arm", "els => els.map(e => e.textContent)")
        assert [a.split(":")[0] for a in arms] == ["real-only", "fake"] and "gain" in arms[1]
        page.goto(f"{server.url}/gallery/{ev}")
        page.wait_for_function(chart_loaded, timeout=15_000)
        assert page.eval_on_selector_all("li.evaluation-arm a", "els => els.map(e => e.getAttribute('href'))") == \
            [f"/gallery/{aug}"]
    assert page.errors == []
