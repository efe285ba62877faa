"""The loading order that keeps SDXL inside a free Colab runtime and an 8-12 GB GPU (docs/performance.md).

Memory is decided by the order in which components are loaded, converted and released, so the order
itself is asserted here on tiny models (no memory or timing number is): in a bf16 run no float32 copy
of a U-Net weight is ever made, the text encoders are loaded one at a time and are gone before the
U-Net is read, and the U-Net reaches the device already in its training dtype.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdxl_train_leco
import train_leco
from library import models as models_module
from library import run_setup, training
from tests.helpers import base_argv, tokenizer_cache, write_prompts

pytestmark = pytest.mark.slow


def _storages(values) -> set[int]:
    found = set()
    for value in values:
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, (tuple, list)):
            found |= _storages(value)
    return found


class Float32Watch(TorchDispatchMode):
    """Adds up the bytes of the CPU float32 tensors ops allocate with the shape of a U-Net weight.

    Views (an output sharing an input's storage, e.g. of a memory-mapped file's tensor) allocate
    nothing and the meta device holds no memory: neither is counted. While ``paused`` (the text
    encoders are being built: tiny models' encoders share weight shapes with their U-Net) nothing is.
    """

    def __init__(self, shapes: set[tuple[int, ...]]):
        super().__init__()
        self.shapes = shapes
        self.bytes = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = _storages(list(args) + list((kwargs or {}).values()))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
                    and tuple(tensor.shape) in self.shapes and tensor.untyped_storage().data_ptr() not in inputs):
                self.bytes += tensor.numel() * 4
        return out


class LoadingEvents:
    """Spies on the trainer's component loading: what was loaded when, and what was still alive."""

    def __init__(self, monkeypatch, watch: Float32Watch):
        self.events: list[str] = []
        self.encoders: list[weakref.ref] = []
        self.unet_dtype_at_move = None
        load_encoder, load_unet = models_module.LoadedModel.load_text_encoder, models_module.LoadedModel.load_unet
        prepare = run_setup.prepare_unet

        def load_text_encoder(model, index, dtype=torch.float32):
            gc.collect()
            self.events.append(f"text encoder {index} (others alive: {self.alive()})")
            watch.paused = True
            try:
                encoder = load_encoder(model, index, dtype)
            finally:
                watch.paused = False
            self.encoders.append(weakref.ref(encoder))
            return encoder

        def load_unet_spy(model, dtype=torch.float32):
            gc.collect()
            self.events.append(f"unet (text encoders alive: {self.alive()})")
            return load_unet(model, dtype)

        def prepare_spy(unet, device, dtype, *args):
            self.unet_dtype_at_move = {param.dtype for param in unet.parameters()}
            return prepare(unet, device, dtype, *args)

        monkeypatch.setattr(models_module.LoadedModel, "load_text_encoder", load_text_encoder)
        monkeypatch.setattr(models_module.LoadedModel, "load_unet", load_unet_spy)
        monkeypatch.setattr(training, "prepare_unet", prepare_spy)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.encoders)


def _half_single_file(tiny_dir, path, kind):
    """The tiny model as one original-layout fp16 file (how SDXL checkpoints are shipped)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.ldm_convert import save_single_file

    parts = {"unet": UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet"),
             "text_encoder": CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder")}
    if kind == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(tiny_dir, subfolder="text_encoder_2")
    return save_single_file(path, kind=kind, **{name: model.half() for name, model in parts.items()})


def _unet_weights(tiny_dir) -> tuple[set[tuple[int, ...]], int]:
    """The shapes of the U-Net's weight matrices and kernels, and their float32 size in bytes."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    weights = [param for param in unet.parameters() if param.dim() >= 2 and param.numel() >= 256]
    return {tuple(param.shape) for param in weights}, sum(param.numel() * 4 for param in weights)


@pytest.mark.parametrize("kind, source", [("sd1", "folder"), ("sdxl", "single file")])
def test_bf16_run_loads_in_order_and_never_makes_a_float32_unet(kind, source, tiny_sd_dir, tiny_sdxl_dir, tmp_path, monkeypatch):
    tiny_dir = tiny_sdxl_dir if kind == "sdxl" else tiny_sd_dir
    model, extra = tiny_dir, []
    if source == "single file":
        model = _half_single_file(tiny_dir, tmp_path / "model.safetensors", kind)
        extra = ["--tokenizer_cache_dir", str(tokenizer_cache(tiny_dir, tmp_path / "tokenizers")),
                 "--model_config_dir", str(tiny_dir)]
    shapes, float32_bytes = _unet_weights(tiny_dir)
    watch = Float32Watch(shapes)
    events = LoadingEvents(monkeypatch, watch)
    argv = base_argv(model, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1) + [
        "--mixed_precision", "bf16", "--full_bf16", *extra]
    entry = sdxl_train_leco if kind == "sdxl" else train_leco
    with watch:
        assert entry.main(argv) == 0
    assert float32_bytes > 0 and watch.bytes == 0  # not one float32 U-Net weight, at load or in the step
    encoders = 2 if kind == "sdxl" else 1
    assert events.events == [f"text encoder {index} (others alive: 0)" for index in range(encoders)] + [
        "unet (text encoders alive: 0)"]
    assert events.unet_dtype_at_move == {torch.bfloat16}  # cast (here: loaded) before it is moved


def test_the_watch_sees_a_float32_unet(tiny_sd_dir, tmp_path):
    """The check above can fail: the old order (an fp16 file read into a float32 U-Net, cast afterwards) is seen."""
    from library.single_file import load_single_file_unet

    shapes, float32_bytes = _unet_weights(tiny_sd_dir)
    path = _half_single_file(tiny_sd_dir, tmp_path / "model.safetensors", "sd1")
    with Float32Watch(shapes) as watch:
        load_single_file_unet(path, tiny_sd_dir, torch.float32).to(torch.bfloat16)
    assert watch.bytes >= float32_bytes


def test_memory_profile_reports_loading_and_the_first_step_apart(tiny_sdxl_dir, capsys):
    """tools/memory_profile.py (the numbers in docs/performance.md) runs and reports both phases."""
    from tools import memory_profile

    report = memory_profile.main(["--model", str(tiny_sdxl_dir), "--family", "sdxl", "--mixed_precision", "bf16"])
    assert set(report["peaks_gib"]) == {"load", "first step"}
    for phase in report["peaks_gib"].values():
        assert {"RssAnon", "RssFile", "VmRSS"} <= set(phase) and phase["VmRSS"] >= phase["RssAnon"] > 0
    assert "first step: RssAnon" in capsys.readouterr().out
