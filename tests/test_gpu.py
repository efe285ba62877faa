"""Checks that need a CUDA GPU: fp16 with loss scaling, bf16, full_fp16, xformers. Skipped without one.

Run them on a GPU machine with ``bash scripts/test.sh -m gpu``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import train_leco
from networks.lora import read_lora_metadata
from tests.helpers import all_finite, base_argv, lora_changed, scalars, write_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision, extra", [
    ("fp16", []),
    ("fp16", ["--full_fp16"]),
    ("bf16", []),
    ("bf16", ["--full_bf16", "--gradient_checkpointing"]),
])
def test_mixed_precision_on_cuda(precision, extra, tiny_sd_dir, tmp_path):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    logs = tmp_path / "logs"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=4) + [
        "--mixed_precision", precision, "--logging_dir", str(logs), "--learning_rate", "1e-2", *extra]
    assert train_leco.main(argv) == 0
    final = tmp_path / "out" / "leco.safetensors"
    assert lora_changed(final) and all_finite(scalars(logs, "loss"))
    assert read_lora_metadata(final)["ss_mixed_precision"] == precision


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_attention_on_cuda(tiny_sd_dir, tmp_path):
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "slider"), tmp_path / "out", steps=2) + ["--xformers"]
    assert train_leco.main(argv) == 0
    assert lora_changed(tmp_path / "out" / "leco.safetensors")
