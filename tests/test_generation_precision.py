"""generation training on a GPU: the precision each device gets (bf16 / fp16 with loss scaling / fp32), the
GradScaler skipping a step with inf gradients, gradient checkpointing and TF32 switched on and back off, and
artefact keys unchanged at the default options."""

from __future__ import annotations

import pytest
import torch

from tests.test_generation_training import _red_images


@pytest.mark.parametrize("bf16,requested,expected", [
    (True, "auto", "bf16"),  # Ampere and newer
    (False, "auto", "fp16"),  # Volta / Turing: fp16 + loss scaling
    (True, "fp16", "fp16"),
    (False, "fp32", "fp32"),
])
def test_precision_on_cuda_follows_the_gpu(bf16, requested, expected, monkeypatch):
    from retrogen.generation.training.common import choose_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    p = choose_precision(torch.device("cuda"), requested)
    assert p.name == expected
    assert (p.dtype, p.device_type) == ({"bf16": torch.bfloat16, "fp16": torch.float16}.get(expected), "cuda")


def test_cpu_trains_in_fp32_and_only_fp16_scales_the_loss():
    from retrogen.generation.training.common import choose_precision

    cpu = torch.device("cpu")
    assert choose_precision(cpu).name == "fp32" and choose_precision(cpu).scaler() is None
    assert choose_precision(cpu, "bf16").scaler() is None
    assert isinstance(choose_precision(cpu, "fp16").scaler(), torch.amp.GradScaler)
    with pytest.raises(ValueError, match="precision"):
        choose_precision(cpu, "fp8")


def test_grad_scaler_skips_a_step_with_inf_gradients():
    from retrogen.generation.training.common import optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert optimizer_step((w * 2).sum(), opt, [w], scaler, max_grad_norm=1.0)
    stepped = w.detach().clone()
    assert not torch.equal(stepped, torch.ones(3)) and scaler.get_scale() == 2.0**10
    assert not optimizer_step((w * float("inf")).sum(), opt, [w], scaler, max_grad_norm=1.0)
    assert torch.equal(w.detach(), stepped), "the overflowing step left the weights alone"
    assert scaler.get_scale() == 2.0**9, "and the scale was lowered"
    assert optimizer_step((w * 2).sum(), opt, [w], None)  # no scaler: a plain step


@pytest.mark.parametrize("trainer", ["dreambooth", "textual-inversion"])
def test_fp16_training_goes_through_the_grad_scaler(trainer, pipe, tmp_path, monkeypatch):
    """fp16 (forced on the CPU, whose autocast and GradScaler support it): every step is scaled."""
    from retrogen.generation.training import common

    scaled, autocasts = [], []
    real_scale, real_autocast = torch.amp.GradScaler.scale, common.Precision.autocast

    def scale(self, loss):
        scaled.append(loss.detach().clone())
        return real_scale(self, loss)

    def autocast(self):
        autocasts.append(self.dtype)
        return real_autocast(self)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    monkeypatch.setattr(common.Precision, "autocast", autocast)
    meta = _train(trainer, pipe, tmp_path, precision="fp16", num_train_steps=2)
    assert meta["precision"] == "fp16" and len(scaled) == 2, "each step's loss went through the scaler"
    assert autocasts == [torch.float16] * 2 and isinstance(meta["skipped_steps"], list)
    scaled.clear()
    (tmp_path / "fp32").mkdir()
    assert _train(trainer, pipe, tmp_path / "fp32", num_train_steps=1)["precision"] == "fp32" and not scaled


def _train(trainer, pipe, out, **kw):
    if trainer == "dreambooth":
        from retrogen.generation.training.dreambooth import DreamBoothConfig, train_dreambooth

        cfg = DreamBoothConfig(instance_prompt="a photo of sks thing", class_prompt="a photo of thing",
                               resolution=64, **kw)
        return train_dreambooth(pipe, _red_images(), cfg, out)
    from retrogen.generation.training.textual_inversion import TextualInversionConfig, train_textual_inversion

    cfg = TextualInversionConfig(placeholder_token=f"<t{len(list(out.iterdir()))}>", initializer="red",
                                 resolution=64, **kw)
    return train_textual_inversion(pipe, _red_images(), cfg, out)


def test_checkpointing_and_tf32_are_switched_back_and_change_no_weight(pipe, tmp_path):
    from safetensors.torch import load_file

    tf32 = torch.backends.cuda.matmul.allow_tf32
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _train("dreambooth", pipe, tmp_path / "a", num_train_steps=2)
    _train("dreambooth", pipe, tmp_path / "b", num_train_steps=2, gradient_checkpointing=True, tf32=True)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
    assert not pipe.unet.is_gradient_checkpointing
    (tmp_path / "c").mkdir()
    _train("textual-inversion", pipe, tmp_path / "c", num_train_steps=1, gradient_checkpointing=True)
    assert not pipe.unet.is_gradient_checkpointing, "the shared UNet is put back as loaded"


def test_artifact_keys_do_not_change_at_the_default_options():
    from retrogen.generation.training.dreambooth import DreamBoothConfig
    from retrogen.generation.training.textual_inversion import TextualInversionConfig

    db = DreamBoothConfig(instance_prompt="i", class_prompt="c")
    assert not {"precision", "tf32", "gradient_checkpointing"} & set(db.hyperparameters())
    assert db.hyperparameters() == DreamBoothConfig(instance_prompt="i", class_prompt="c",
                                                    gradient_checkpointing=True).hyperparameters()
    assert DreamBoothConfig(instance_prompt="i", class_prompt="c", precision="fp16").hyperparameters()["precision"] == "fp16"
    ti = TextualInversionConfig(placeholder_token="<a>", initializer="cat", tf32=True).hyperparameters()
    assert ti["tf32"] is True and "precision" not in ti


def test_generation_config_reaches_the_trainer(tmp_path, tiny_sd_dir):
    from retrogen.generation import GenerationConfig
    from retrogen.generation.methods import create_method

    cfg = GenerationConfig(train_precision="bf16", enable_gradient_checkpointing=True, enable_tf32=True)
    method = create_method("dreambooth", cfg)

    class _Rt:
        size = 64

    settings = method.training_settings(_Rt())
    assert (settings["precision"], settings["gradient_checkpointing"], settings["tf32"]) == ("bf16", True, True)
