"""Merging a LoRA into a real-size SD 1.5 checkpoint streams: peak memory far below one U-Net copy.

A random-noise checkpoint with the exact SD 1.5 layout (fp16, VAE included, 2.0 GiB; written tensor by
tensor by ``tools/make_random_checkpoint.py --streaming``) gets a rank-4 LoRA on the 192 layers LECO
trains. The merge runs as its own process (``networks/merge_lora.py``), which reports its peak RSS.
Measured time and memory: docs/performance.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.merge_names import checkpoint_targets
from library.safetensors_stream import SafetensorsReader
from networks.lora_files import save_lora_file
from networks.lora_weights import read_lora
from tools.make_random_checkpoint import write_streaming_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

UNET_FP16_BYTES = 859_520_964 * 2
RUN_MERGE = """
import json, resource, sys, time
from networks import merge_lora
start = time.perf_counter()
code = merge_lora.main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _leco_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Kohya names and shapes of the transformer layers LECO's default network trains (diffusers naming)."""
    targets = checkpoint_targets(shapes, "sd1")
    picked = {}
    for name, target in targets.items():
        if name.startswith("lora_unet_") and "_attentions_" in name and not name.startswith("lora_unet_input") \
                and not name.startswith(("lora_unet_output", "lora_unet_middle")) and "_norm" not in name:
            picked[name] = target.shape
    return picked


def test_real_size_sd15_merge_streams(tmp_path):
    from library.models import CONFIG_ROOT

    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.skip("needs ~6 GB of free disk for two 2 GB checkpoints")
    base = write_streaming_checkpoint(tmp_path / "sd15.safetensors", CONFIG_ROOT / "sd15", "sd1", torch.float16)
    with safe_open(str(base), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    layers = _leco_layers(shapes)
    assert len(layers) == 192  # 16 transformer blocks x 12 layers, as a LECO LoRA for SD 1.5
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in layers.items():
        state[f"{name}.lora_down.weight"] = torch.randn(4, *shape[1:], generator=generator) * 0.01
        state[f"{name}.lora_up.weight"] = torch.randn(shape[0], 4, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.01
        state[f"{name}.alpha"] = torch.tensor(2.0)
    lora = tmp_path / "lora.safetensors"
    save_lora_file(state, lora, {})
    merged = tmp_path / "merged.safetensors"
    result = subprocess.run(
        [sys.executable, "-c", RUN_MERGE, "--sd_model", str(base), "--save_to", str(merged), "--models", str(lora),
         "--ratios", "0.8"], cwd=ROOT, capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"real-size merge: {report['seconds']:.1f} s, peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB")
    assert report["code"] == 0
    assert report["peak_rss_bytes"] < UNET_FP16_BYTES / 2  # streamed: far from even one extra U-Net copy

    modules = read_lora(lora).modules
    targets = checkpoint_targets(shapes, "sd1")
    changed = {targets[name].key: modules[name] for name in modules}
    before, after = SafetensorsReader(base), SafetensorsReader(merged)  # one tensor at a time, no memory map
    assert before.keys() == after.keys()
    for key in before.keys():
        original, result_tensor = before.get_tensor(key), after.get_tensor(key)
        assert result_tensor.dtype == original.dtype, key
        if key in changed:
            expected = torch.add(original.float(), changed[key].delta().reshape(original.shape), alpha=0.8).half()
            assert torch.equal(result_tensor, expected), key
        else:
            assert torch.equal(result_tensor, original), key
    base.unlink()

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_single_file(str(merged), config=str(CONFIG_ROOT / "sd15"), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float16)
    assert sum(parameter.numel() for parameter in unet.parameters()) == 859_520_964
    key, name = "model.diffusion_model.input_blocks.1.1.proj_in.weight", "down_blocks.0.attentions.0.proj_in.weight"
    assert key in changed
    with safe_open(str(merged), framework="pt") as handle:
        assert torch.equal(dict(unet.named_parameters())[name].reshape(-1), handle.get_tensor(key).reshape(-1))
