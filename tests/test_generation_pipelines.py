"""generation: loaded pipelines kept across calls (an LRU within a memory budget), and no adapter of one call
leaking into the next."""

from __future__ import annotations

import pytest

from tests.test_generation import FAST, make_dataset


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Two more tiny models (other weights, so other cache keys)."""
    from tests.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("more_models")
    return [build_tiny_sd(root / f"m{seed}", seed=seed) for seed in (1, 2)]


def _gen(data, out, model, method="prompt", cache=None, per_class=2, **cfg):
    from retrogen.generation import GenerationConfig, augment_by_generation

    res = augment_by_generation(data, out, model=str(model), method=method, per_class=per_class,
                                config=GenerationConfig(**(FAST | cfg)), pipelines=cache)
    return [r["sha256"] for r in res.records]


def _count_loads(monkeypatch):
    import retrogen.generation.pipelines as pipelines_mod

    loads = []
    real = pipelines_mod.load_pipeline

    def counting(ref, config):
        loads.append(ref.path.name)
        return real(ref, config)

    monkeypatch.setattr(pipelines_mod, "load_pipeline", counting)
    return loads


def test_same_model_loads_once_and_the_lru_one_is_evicted(tmp_path, tiny_sd_dir, other_models, monkeypatch):
    from retrogen.generation.config import GenerationConfig
    from retrogen.generation.models import resolve_model
    from retrogen.generation.pipelines import PipelineCache
    from retrogen.generation.runtime import load_pipeline

    loads = _count_loads(monkeypatch)
    one = load_pipeline(resolve_model(str(tiny_sd_dir)), GenerationConfig()).nbytes
    cache = PipelineCache(max_bytes=int(2.5 * one), max_entries=None)  # room for two
    data = make_dataset(tmp_path / "data")
    a, b, c = tiny_sd_dir, *other_models
    first = _gen(data, tmp_path / "1", a, cache=cache)
    assert _gen(data, tmp_path / "2", a, cache=cache, scheduler="euler") != first  # per-call scheduler
    assert _gen(data, tmp_path / "3", a, cache=cache) == first  # ...and back
    assert loads == ["model"] and cache.hits == 2
    _gen(data, tmp_path / "4", b, cache=cache)
    _gen(data, tmp_path / "5", a, cache=cache)  # a is now the most recently used
    _gen(data, tmp_path / "6", c, cache=cache)  # over budget: b goes
    assert loads == ["model", "m1", "m2"] and cache.evictions == 1
    assert [k[0] for k in cache.keys] == [str(a.resolve()), str(c.resolve())]
    assert cache.nbytes <= cache.max_bytes
    cache.clear()
    assert cache.keys == []


def test_without_a_budget_only_the_last_model_is_kept(tmp_path, tiny_sd_dir, other_models, monkeypatch):
    from retrogen.generation.pipelines import PipelineCache

    monkeypatch.delenv("RETROGEN_PIPELINE_CACHE_GB", raising=False)
    loads = _count_loads(monkeypatch)
    cache = PipelineCache.from_env()
    data = make_dataset(tmp_path / "data")
    for i, model in enumerate([tiny_sd_dir, tiny_sd_dir, other_models[0], tiny_sd_dir]):
        _gen(data, tmp_path / str(i), model, cache=cache, per_class=1)
    assert loads == ["model", "m1", "model"] and len(cache.keys) == 1
    monkeypatch.setenv("RETROGEN_PIPELINE_CACHE_GB", "0.5")
    assert PipelineCache.from_env().max_bytes == 1 << 29


def test_adapters_never_leak_into_the_next_call(tmp_path, tiny_sd_dir, monkeypatch):
    """After textual inversion, DreamBooth-LoRA and an IP-Adapter on a cached pipeline, a plain call gives the
    bytes a fresh pipeline gives."""
    from retrogen.generation.pipelines import PipelineCache

    loads = _count_loads(monkeypatch)
    data = make_dataset(tmp_path / "data")
    fresh = _gen(data, tmp_path / "fresh", tiny_sd_dir)
    cache = PipelineCache()
    _gen(data, tmp_path / "p0", tiny_sd_dir, cache=cache)
    for method in ("textual-inversion", "dreambooth", "variation"):
        _gen(data, tmp_path / method, tiny_sd_dir, method=method, cache=cache, per_class=1)
        assert _gen(data, tmp_path / f"after-{method}", tiny_sd_dir, cache=cache) == fresh, method
    assert loads == ["model"]
    pipe = cache._entries[cache.keys[0]].loaded.pipe  # noqa: SLF001 - looking inside, for the test
    assert not getattr(pipe.unet, "peft_config", None) and pipe.unet.encoder_hid_proj is None


@pytest.mark.parametrize("method", ["textual-inversion", "dreambooth"])
def test_a_failed_call_is_reset_too(method, tmp_path, tiny_sd_dir, monkeypatch):
    """An adapter left on by a call that failed half-way (nothing released it) is taken off before the next
    call: a plain call gives fresh bytes, and the same method runs again (a leaked token would clash)."""
    from retrogen.generation.methods import personalised
    from retrogen.generation.pipelines import PipelineCache

    data = make_dataset(tmp_path / "data")
    fresh = _gen(data, tmp_path / "fresh", tiny_sd_dir)
    cache = PipelineCache()
    cls = personalised.TextualInversionMethod if method == "textual-inversion" else personalised.DreamBoothMethod
    real_prepare = cls.prepare_class

    def prepare_then_fail(self, runtime, ctx):
        real_prepare(self, runtime, ctx)  # the adapter is loaded, and nothing will release it
        raise RuntimeError("boom after the adapter loaded")

    arts = tmp_path / "arts"
    with monkeypatch.context() as m:
        m.setattr(cls, "prepare_class", prepare_then_fail)
        m.setattr(cls, "teardown", lambda self, runtime: None)
        with pytest.raises(RuntimeError, match="boom"):
            _gen_arts(data, tmp_path / "failed", tiny_sd_dir, method, cache, arts)
    assert _gen(data, tmp_path / "after", tiny_sd_dir, cache=cache) == fresh
    _gen_arts(data, tmp_path / "again", tiny_sd_dir, method, cache, arts)
    assert cache.loads == 1


def _gen_arts(data, out, model, method, cache, arts):
    from retrogen.generation import GenerationConfig, augment_by_generation

    augment_by_generation(data, out, model=str(model), method=method, per_class=1, config=GenerationConfig(**FAST),
                          pipelines=cache, artifacts_dir=arts)


def test_the_service_runner_keeps_the_pipeline_across_jobs(tmp_path, tiny_sd_dir, monkeypatch):
    """Two generation jobs through the service's runner (as the worker calls it) load the model once."""
    from types import SimpleNamespace

    import retrogen.generation.pipelines as pipelines_mod
    from retrogen.service.domain.runners import generation_runner

    monkeypatch.setattr(pipelines_mod, "_PROCESS_CACHE", None)
    monkeypatch.delenv("RETROGEN_PIPELINE_CACHE_GB", raising=False)
    loads = _count_loads(monkeypatch)
    data = make_dataset(tmp_path / "data")
    from retrogen.service.core.config import Settings

    settings = Settings(models={"tiny": str(tiny_sd_dir)}, data_dir=tmp_path / "service")
    outs = []
    for job in ("j1", "j2"):
        ctx = SimpleNamespace(settings=settings, model_name="tiny", dataset_dir=data, out_dir=tmp_path / job,
                              per_class=1, params=dict(num_inference_steps=2, size=64, seed=3), artifacts_dir=None,
                              progress=lambda ev: None, should_cancel=lambda: False)
        outs.append([r["sha256"] for r in generation_runner("prompt")(ctx).records])
    assert loads == ["model"] and outs[0] == outs[1]
    assert pipelines_mod.cached_pipelines().hits == 1
    pipelines_mod.cached_pipelines().clear()
    settings = Settings(models={"tiny": str(tiny_sd_dir)}, data_dir=tmp_path / "service", pipeline_cache_gb=0.25)
    ctx.settings = settings  # the operator's budget
    monkeypatch.setattr(pipelines_mod, "_PROCESS_CACHE", None)
    generation_runner("prompt")(SimpleNamespace(**(vars(ctx) | {"out_dir": tmp_path / "j3"})))
    assert pipelines_mod.cached_pipelines().max_bytes == 1 << 28
    pipelines_mod.cached_pipelines().clear()
