"""``retrogen index build | import | captions | info``: the batch CLI of the index builder (registered by retrogen/cli.py).

The settings' options are derived from :class:`IndexBuildConfig`; the work (torch, faiss) loads on demand,
so ``retrogen --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retrogen.config_cli import config_options

from .config import IndexBuildConfig

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Build, import and inspect corpus indexes (embeddings + metadata + FAISS).")


@app.command("build")
@config_options(IndexBuildConfig)
def build(
    *,
    source: list[str] = typer.Option(..., "--source", help="Image folder, .tar shard(s), or .parquet/.csv listing; "
                                     "repeatable; globs and {00000..00009} braces expand."),
    out: str = typer.Option(..., "--out", help="Index directory to write (an interrupted build resumes here), or an "
                            "fsspec URL such as s3://bucket/prefix (staged in --work-dir, uploaded shard by shard, "
                            "manifest last)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="With a URL --out: the local staging folder "
                                         "(default: ~/.cache/retrogen/index-builds/<hash of the URL>)."),
    embedder: str = typer.Option(..., "--embedder", help="e.g. open_clip:ViT-B-32:laion2b_s34b_b79k, efficientnet-lite0."),
    device: str = typer.Option("cpu", "--device", help="Embedder device (cpu, cuda)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a build made with other arguments."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    engine: str = typer.Option("local", "--engine", help="local: this machine. ray: embed on a Ray cluster with "
                               "Ray Data (an on-disk index's parts too); same output (docs/index-ray.md)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="With --engine ray: auto, host:port or "
                                           "ray://host:10001 to join a cluster; default: start one here."),
    ray_actors: int = typer.Option(1, "--ray-actors", min=1, help="With --engine ray: embedding actors at most "
                                   "(one model each)."),
    ray_gpus_per_actor: float | None = typer.Option(None, "--ray-gpus-per-actor", min=0.0, help="With --engine "
                                                    "ray: GPUs per actor (default: 1 if this machine has CUDA)."),
    config: IndexBuildConfig,
) -> None:
    """Embed a corpus and build its index (resumable)."""
    from retrogen.console import TqdmProgress
    from retrogen.retrieval.embedders import create_embedder

    from .build import build_index

    _quiet_faiss_logs()
    _check_work_dir(out, work_dir)
    runner = _engine(engine, ray_address, ray_actors, ray_gpus_per_actor)
    emb = create_embedder(embedder, device=device)
    with TqdmProgress(disable=True if quiet else None) as bars:
        manifest = build_index(source, out, embedder=emb, config=config, overwrite=overwrite, progress=bars,
                               engine=runner, work_dir=work_dir)
    typer.echo(_summary_line(out, manifest))


def _check_work_dir(out: str, work_dir: Path | None) -> None:
    """``--work-dir`` stages a build to a URL; with a folder ``--out`` the build is written in place."""
    from retrogen.retrieval.index_store import is_remote

    from .errors import IndexBuildError

    if work_dir is not None and not is_remote(out):
        raise IndexBuildError("--work-dir needs a URL --out (s3://bucket/prefix); a folder --out is built in place")


def _engine(name: str, address: str | None, actors: int, gpus: float | None):
    """``--engine``'s runner (None: local), refused before any work when unknown or when Ray is missing."""
    from .errors import IndexBuildError

    if name == "local":
        if address is not None:
            raise IndexBuildError("--ray-address needs --engine ray")
        return None
    if name != "ray":
        raise IndexBuildError(f"--engine must be local or ray, got {name!r}")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise IndexBuildError("--engine ray needs Ray Data: pip install 'retrogen[distributed]'") from None
    from .ray_build import RayEngine

    return RayEngine(address=address, max_actors=actors, gpus_per_actor=gpus)


@app.command("import")
@config_options(IndexBuildConfig, exclude=(*IndexBuildConfig.EMBEDDING_FIELDS, "dtype"))
def import_(
    *,
    from_dir: Path = typer.Option(..., "--from", help="clip-retrieval output: img_emb/*.npy + metadata/*.parquet."),
    out: str = typer.Option(..., "--out", help="Index directory to write, or an fsspec URL (s3://bucket/prefix)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="With a URL --out: the local staging folder."),
    embedder: str | None = typer.Option(None, "--embedder", help="Name of the model that made the embeddings "
                                        "(recorded; queries must match it), e.g. open_clip:ViT-B-32:openai."),
    dtype: str | None = typer.Option(None, "--dtype", help="Stored dtype: float16 or float32 (default: the input's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index in --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    config: IndexBuildConfig,
) -> None:
    """Build an index from precomputed clip-retrieval embeddings, without re-embedding."""
    from retrogen.console import TqdmProgress

    from .importer import import_clip_retrieval

    _quiet_faiss_logs()
    _check_work_dir(out, work_dir)
    with TqdmProgress(disable=True if quiet else None) as bars:
        manifest = import_clip_retrieval(from_dir, out, embedder=embedder, config=config, dtype=dtype,
                                         overwrite=overwrite, progress=bars, work_dir=work_dir)
    typer.echo(_summary_line(out, manifest))


@app.command("captions")
def captions(*, directory: Path = typer.Argument(..., help="Index directory.")) -> None:
    """Write an index's caption full-text index and metadata column counts (for indexes built before them)."""
    from .build import refresh_metadata

    m = refresh_metadata(directory)
    cols = ", ".join(f"{k} {v}" for k, v in m.metadata["non_null"].items() if v) or "none"
    typer.echo(f"index {directory}: {(m.captions or {}).get('rows', 0)} captions indexed; optional columns: {cols}")


@app.command("info")
def info(
    *,
    directory: str = typer.Argument(..., help="Index directory, or its URL (s3://bucket/prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Print what an index's manifest holds."""
    from retrogen.retrieval.index_directory import IndexDirectory
    from retrogen.retrieval.index_store import RemoteIndex, display, is_remote

    m = RemoteIndex(directory).read_manifest() if is_remote(directory) else IndexDirectory(directory).read_manifest()
    if as_json:
        typer.echo(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    recall = m.recall or {}
    build = m.build or {}
    reasons = ", ".join(f"{r} {n}" for r, n in (m.skipped.get("by_reason") or {}).items())
    lines = [
        f"index       {display(directory)} ({m.index_id}, format {m.format_version})",
        f"embedder    {m.embedder.get('name')} (dim {m.dim}, {', '.join(m.embedder.get('modalities', []))})",
        f"vectors     {m.count} in {len(m.shards)} shard(s), {m.dtype}",
        f"faiss       {m.faiss.get('factory')} ({m.faiss.get('kind')}), defaults {m.faiss.get('search_defaults') or {}}"
        + (f", re-rank x{m.faiss['rerank_k_factor']}" if (m.faiss.get("rerank_k_factor") or 1) > 1 else ""),
        "recall@10   " + (f"{recall['recall_at_10']:.3f} on {recall['num_queries']} queries" if recall
                          else "exact (flat index)"),
        "sources     " + "; ".join(f"{s.get('path')} ({s.get('kind')}, {s.get('records')})" for s in m.sources),
        f"skipped     {m.skipped.get('count', 0)}" + (f" ({reasons})" if reasons else ""),
        "captions    " + (f"{m.captions['rows']} in a full-text index" if m.captions else "no full-text index"),
        "columns     " + (", ".join(f"{k} ({v})" for k, v in m.metadata.get("non_null", {}).items() if v) or "-"),
        f"built       {build.get('created')} in {build.get('duration_s')} s"
        + (f", {build['images_per_s']} images/s" if build.get("images_per_s") else ""),
    ]
    typer.echo("\n".join(lines))


def _quiet_faiss_logs() -> None:
    """faiss logs its loader choice and every ground-truth block at INFO; the CLI user needs neither."""
    import logging

    for name in ("faiss.loader", "faiss.contrib.exhaustive_search"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _summary_line(out: str, m) -> str:
    from retrogen.retrieval.index_store import display

    recall = f", recall@10 {m.recall['recall_at_10']:.3f}" if m.recall else ", exact"
    rate = f", {m.build['images_per_s']} images/s" if m.build.get("images_per_s") else ""
    captions = f", {m.captions['rows']} captions full-text indexed" if m.captions else ""
    return (f"index {display(out)}: {m.count} vectors (dim {m.dim}), {m.faiss['factory']}{recall}, "
            f"{m.skipped.get('count', 0)} skipped{rate}{captions}")
