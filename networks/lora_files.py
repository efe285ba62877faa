"""Reading and writing kohya-format LoRA files: atomic writes, metadata, sd-webui hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def addnet_model_hash(data: bytes) -> str:
    """sha256 of a safetensors file's tensor bytes (header excluded), as sd-webui-additional-networks."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def addnet_legacy_hash(data: bytes) -> str:
    """The old 8-character hash of 64 KiB at offset 1 MiB (empty input beyond the end)."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def lora_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash``, computed over the tensors and the ``ss_*`` metadata only.

    Only the immutable training metadata takes part, so editing user metadata later keeps the hash.
    """
    from safetensors.torch import save

    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = save(state, training_only)
    return addnet_model_hash(data), addnet_legacy_hash(data)


def save_lora_file(state: dict[str, torch.Tensor], file: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write kohya-format LoRA tensors atomically; ``.safetensors`` files get metadata and hashes."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = dict(metadata or {})
            model_hash, legacy_hash = lora_hashes(state, metadata)
            metadata["sshs_model_hash"] = model_hash
            metadata["sshs_legacy_hash"] = legacy_hash
            save_file(state, str(tmp), metadata)
        else:
            torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; use the usual permissions
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_lora_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read LoRA tensors from ``.safetensors`` (or a ``.ckpt``/``.pt`` with plain tensors)."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def lora_file_keys(file: str | os.PathLike) -> list[str]:
    """The tensor names in a LoRA file, read without loading the tensors where the format allows.

    Raises:
        ValueError: the file cannot be read as ``.safetensors`` or a plain-tensor ``.ckpt``/``.pt``,
            or holds no tensors.
    """
    file = Path(file)
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            keys = list(state) if isinstance(state, dict) else []
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip errors come in many types
        raise ValueError(f"{file.name} is not a readable LoRA file ({type(exc).__name__})") from None
    if not keys:
        raise ValueError(f"{file.name} holds no tensors")
    return keys


def read_lora_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The metadata dict of a ``.safetensors`` LoRA ({} for other formats)."""
    file = Path(file)
    if file.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return dict(handle.metadata() or {})
