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
    samples = tmp_path / "samples.txt"
    samples.write_text("girl --s 2\ngirl, long hair --s 2\n", encoding="utf-8")
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "slider"), out, steps=3) + [
        "--save_every_n_steps", "2", "--network_args", "module_dropout=0.3",  # ranks drop different modules
        "--sample_every_n_steps", "2", "--sample_prompts", str(samples),  # 6 grid cells shared out over 2 ranks
        "--leco_trajectory", trajectory]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "train_leco.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stderr  # the run summary saw both ranks
    assert "LoRA identical on all 2 processes" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco.safetensors", "sample"]
    from PIL import Image

    # rank 0 writes a grid only when every cell arrived (3 of the 6 were drawn by rank 1): 2 rows x 3 columns
    assert [path.name for path in (out / "sample").iterdir()] == ["leco_000002.png"]
    width, height = Image.open(out / "sample" / "leco_000002.png").size
    tile = (height - 18) / 2 - 2  # make_grid: 18 px of column labels, 160 px of row labels, 2 px padding
    assert tile >= 8 and width == 160 + 3 * (tile + 2)
    assert lora_changed(out / "leco.safetensors")
    assert read_lora_metadata(out / "leco.safetensors")["ss_steps"] == "3"
    assert read_lora_metadata(out / "leco.safetensors")["ss_leco_trajectory"] == trajectory


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gradients_of_modules_dropped_on_one_rank_reduce_to_the_same_values_everywhere(tmp_path):
    """module_dropout: ranks hold gradients for different parameters; the exchange must still line up."""
    import torch
    import torch.multiprocessing as mp

    from tests import dist_workers

    mp.start_processes(dist_workers.reduce_grads_with_dropped_modules, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    # by hand: rank r's gradient for parameter i is 10 (r + 1) + i where it has one, 0 elsewhere; mean over 2 ranks
    expected = [5.0, 10.5, (12 + 22) / 2, 6.5]
    for rank_grads in results:
        for grad, value in zip(rank_grads, expected):
            assert grad is not None and torch.all(grad == value)


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")


# Runs train_leco.main in a rank process, recording in HASH_LOG which rank hashed the base model file.
RANK_RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
import library.saving as saving
original = saving.file_sha256
def counted(path):
    with open({log!r}, "a") as handle:
        handle.write(os.environ["RANK"] + "\\n")
    return original(path)
saving.file_sha256 = counted
import train_leco
sys.exit(train_leco.main(sys.argv[1:]))
"""


def test_sigterm_to_one_rank_stops_both_after_the_same_step_with_one_file(tiny_sd_single_file, tmp_path):
    """A signal that reaches one process only (as a scheduler or a user's kill can) must not hang the other:
    both ranks agree, stop after the same step, rank 0 saves once, both exit 130. Module dropout is on, so
    the ranks also exchange gradients of different modules every step; only rank 0 hashes the base model."""
    import re
    import signal
    import time

    checkpoint, configs, tokenizers = tiny_sd_single_file
    out = tmp_path / "out"
    argv = base_argv(checkpoint, write_prompts(tmp_path, "erase"), out, steps=400) + [
        "--network_args", "module_dropout=0.5", "--model_config_dir", str(configs), "--tokenizer_cache_dir", str(tokenizers)]
    runner, hash_log = tmp_path / "rank_runner.py", tmp_path / "hashed_by.txt"
    runner.write_text(RANK_RUNNER.format(root=str(ROOT), log=str(hash_log)), encoding="utf-8")
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(runner), *argv], cwd=ROOT, env=_rank_env(rank, port),
                              stdout=subprocess.DEVNULL, stderr=open(logs[rank], "w")) for rank in (0, 1)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(proc.poll() is None for proc in procs):
            done = re.findall(r"(\d+)/400", logs[0].read_text(errors="replace"))
            if done and int(done[-1]) >= 3:
                break
            time.sleep(0.2)
        assert all(proc.poll() is None for proc in procs), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
        procs[1].send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [130, 130], texts[0][-2000:] + texts[1][-2000:]
    stopped = [re.search(r"interrupted: stopped at step (\d+)", text) for text in texts]
    assert all(stopped), texts
    step = int(stopped[0][1])
    assert int(stopped[1][1]) == step and 3 <= step < 400
    assert [path.name for path in out.iterdir()] == [f"leco-step{step:08d}.safetensors"]
    assert read_lora_metadata(out / f"leco-step{step:08d}.safetensors")["ss_steps"] == str(step)
    assert lora_changed(out / f"leco-step{step:08d}.safetensors")
    assert hash_log.read_text().split() == ["0"]  # the base model file is hashed once, by the rank that writes
