"""Two processes on the CPU (gloo DDP) through ``accelerate launch``: one file, ranks in agreement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from networks.lora import read_lora_metadata
from tests.helpers import base_argv, lora_changed, write_prompts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("trajectory", ["fresh", "persistent"])
def test_two_process_ddp_run_writes_once_and_ranks_agree(tiny_sd_dir, tmp_path, trajectory):
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "slider"), out, steps=3) + ["--save_every_n_steps", "2",
                                                                                      "--leco_trajectory", trajectory]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "train_leco.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stderr  # the run summary saw both ranks
    assert "LoRA identical on all 2 processes" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco.safetensors"]
    assert lora_changed(out / "leco.safetensors")
    assert read_lora_metadata(out / "leco.safetensors")["ss_steps"] == "3"
    assert read_lora_metadata(out / "leco.safetensors")["ss_leco_trajectory"] == trajectory
