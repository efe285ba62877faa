"""Shared fixtures: tiny random SD1/SD2/SDXL diffusers folders built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from library.quiet import quiet_import_warnings  # noqa: E402

quiet_import_warnings()  # before diffusers is imported: bitsandbytes warns about optional CPU kernels

import torch  # noqa: E402

from tests import tiny_models  # noqa: E402

# Tiny models are dominated by per-op overhead; one thread is as fast and does not fight other
# processes for the two cores (FACTS: two threads under load run ~5x slower).
torch.set_num_threads(1)


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a case got past validation (it would load a model and train)."""
    import library.training

    def boom(config):
        raise AssertionError("validation passed and training started: the input under test was not rejected")

    monkeypatch.setattr(library.training, "train", boom)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny SD1-shaped diffusers folder (U-Net, text encoder, tokenizer, scheduler, VAE)."""
    return tiny_models.save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    """A tiny SD2-shaped diffusers folder (linear projections, gelu text encoder)."""
    return tiny_models.save_tiny_sd(tmp_path_factory.mktemp("tiny_sd2") / "model", v2=True)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped diffusers folder (two text encoders, text_time embeddings, VAE)."""
    return tiny_models.save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd_single_file(tiny_sd_dir, tmp_path_factory):
    """The tiny SD model as one original-layout file, its configs and a tokenizer cache (offline use)."""
    from tests.helpers import config_only_copy, export_single_file, tokenizer_cache

    folder = tmp_path_factory.mktemp("single_file")
    checkpoint = export_single_file(tiny_sd_dir, folder / "tiny_sd.safetensors", "sd1")
    return checkpoint, config_only_copy(tiny_sd_dir, folder / "configs"), tokenizer_cache(tiny_sd_dir, folder / "tokenizers")
