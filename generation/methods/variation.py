"""``variation``: images conditioned on a class image's CLIP image embedding through an IP-Adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidConfigError
from ..models import file_sha256
from ..prompts import class_prompts
from . import register_method
from .base import ClassContext, ClassPlan, GenerationMethod

#: Published IP-Adapters per model family (repo, subfolder, file): used when neither the user nor the model
#: folder names one.
DEFAULT_IP_ADAPTERS = {
    "sd": ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"),
    "sdxl": ("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors"),
}


def resolve_ip_adapter(spec: str | None, model_path: Path, family: str) -> tuple[str, str, str]:
    """(repo or folder, subfolder, weight file) for ``load_ip_adapter``.

    ``spec`` is a local weight file, or ``org/repo/subfolder/file.safetensors`` on the hub; None picks the
    model folder's own ``ip_adapter/*.safetensors`` if it has one, else the family's published adapter.
    """
    if spec is None:
        own = sorted((model_path / "ip_adapter").glob("*.safetensors"))
        if own:
            return str(model_path), "ip_adapter", own[0].name
        return DEFAULT_IP_ADAPTERS[family]
    p = Path(spec).expanduser()
    if p.is_file():
        return str(p.parent), "", p.name
    parts = spec.split("/")
    if len(parts) < 3 or not parts[-1].endswith((".safetensors", ".bin")):
        raise InvalidConfigError(
            f"ip_adapter={spec!r}: expected a local .safetensors file or org/repo/[subfolder/]file.safetensors"
        )
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


def _weight_file(repo: str, subfolder: str, name: str) -> Path:
    local = Path(repo) / subfolder / name
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, name, subfolder=subfolder or None))


@register_method("variation")
class VariationMethod(GenerationMethod):
    """Text optional (``enable_variation_prompt``); ``ip_adapter_scale`` trades image vs prompt."""

    needs_images = True

    def setup(self, runtime: Any) -> None:
        repo, sub, name = resolve_ip_adapter(self.config.ip_adapter, runtime.ref.path, runtime.ref.family)
        pipe = runtime.text2img
        try:
            pipe.load_ip_adapter(repo, subfolder=sub, weight_name=name)
            weight = _weight_file(repo, sub, name)
        except Exception as e:  # missing file, hub unreachable, wrong architecture: the user's setting to fix
            where = "/".join(x for x in (repo, sub, name) if x)
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise InvalidConfigError(f"cannot load IP-Adapter {where} (ip_adapter): {type(e).__name__}: {first[:300]}; "
                                     "pass a local .safetensors file as --ip-adapter, or download it once with "
                                     "network access") from None
        pipe.set_ip_adapter_scale(self.config.ip_adapter_scale)
        self._fields = {
            "adapter": "ip-adapter:" + "/".join(x for x in (repo, sub, name) if x),
            "adapter_hash": file_sha256(weight),
            "ip_adapter_scale": self.config.ip_adapter_scale,
        }

    def prepare_class(self, runtime: Any, ctx: ClassContext) -> ClassPlan:
        prompts = class_prompts(ctx.label, self.config) if self.config.enable_variation_prompt else [""]
        return ClassPlan("text2img", prompts, ctx.images, "ip_adapter_image", {}, dict(self._fields))

    def teardown(self, runtime: Any) -> None:
        runtime.text2img.unload_ip_adapter()

    def parameters(self) -> dict[str, Any]:
        return {"ip_adapter": self.config.ip_adapter, "ip_adapter_scale": self.config.ip_adapter_scale,
                "enable_variation_prompt": self.config.enable_variation_prompt}
