"""A random-weight checkpoint with the exact SD 1.5 architecture trains offline from one file.

Builds the models from the shipped config (no download), writes them as one original-layout
fp16 ``.safetensors`` (about 2.1 GB; the VAE is left out because training never loads it), and
runs one LECO step at 64 px with ``HF_HUB_OFFLINE=1`` and a tokenizer read from
``--tokenizer_cache_dir``. Needs about 8 GB of RAM and 2-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import train_leco
from networks.lora import read_lora_metadata
from tests.helpers import base_argv, lora_tensors, tokenizer_cache, write_prompts
from tools.make_random_checkpoint import build_random_models

pytestmark = pytest.mark.slow


def test_real_sd15_architecture_single_file_trains_offline(tiny_sd_dir, tmp_path, monkeypatch):
    from library.ldm_convert import save_single_file
    from library.models import CONFIG_ROOT

    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.skip("needs ~6 GB of free disk for the 2.1 GB checkpoint")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = build_random_models(CONFIG_ROOT / "sd15", "sd1", seed=0, dtype=torch.float16, with_vae=False)
    assert sum(p.numel() for p in models["unet"].parameters()) == 859_520_964
    checkpoint = save_single_file(tmp_path / "sd15_random.safetensors", kind="sd1", **models)
    del models
    cache = tokenizer_cache(tiny_sd_dir, tmp_path / "tokenizers")
    argv = base_argv(checkpoint, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1) + [
        "--tokenizer_cache_dir", str(cache), "--max_denoising_steps", "2", "--gradient_checkpointing",
    ]
    try:
        assert train_leco.main(argv) == 0
    finally:
        checkpoint.unlink(missing_ok=True)
    final = tmp_path / "out" / "leco.safetensors"
    tensors = lora_tensors(final)
    assert len({key.split(".")[0] for key in tensors}) == 192  # 16 transformer blocks x 12 layers (SD 1.5 LoRA)
    metadata = read_lora_metadata(final)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_sd_model_name"] == "sd15_random.safetensors"
