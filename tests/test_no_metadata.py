"""``--no_metadata`` keeps what clients need to classify the file, and nothing else (sd-scripts' rule)."""

from __future__ import annotations

import pytest

import sdxl_train_leco
import train_leco
from networks.lora import read_lora_metadata
from tests.helpers import base_argv, write_prompts

pytestmark = pytest.mark.slow


def a1111_family(metadata: dict[str, str]) -> str:
    """How AUTOMATIC1111 1.10's Lora extension classifies a network file (extensions-builtin/Lora/network.py)."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    if metadata:
        return "SD1"
    return "Unknown"


@pytest.mark.parametrize("family, expected_version, expected_class", [
    ("sd1", "sd_v1", "SD1"), ("sd2", "sd_v2", "SD2"), ("sdxl", "sdxl_base_v1-0", "SDXL")])
def test_no_metadata_keeps_the_family_and_the_network_shape(family, expected_version, expected_class, tiny_sd_dir,
                                                            tiny_sd2_dir, tiny_sdxl_dir, tmp_path):
    model = {"sd1": tiny_sd_dir, "sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}[family]
    entry = sdxl_train_leco if family == "sdxl" else train_leco
    argv = base_argv(model, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1) + [
        "--no_metadata", "--network_dim", "4", "--network_alpha", "2", "--training_comment", "secret"]
    assert entry.main(argv) == 0
    metadata = read_lora_metadata(tmp_path / "out" / "leco.safetensors")
    assert set(metadata) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                             "ss_network_args", "sshs_model_hash", "sshs_legacy_hash"}
    assert metadata["ss_base_model_version"].startswith(expected_version)
    assert metadata["ss_v2"] == str(family == "sd2")
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("networks.lora", "4", "2.0")
    assert a1111_family(metadata) == expected_class
    assert "secret" not in str(metadata) and "van gogh" not in str(metadata)  # no comment, no prompts
