"""Load what LECO needs from a base model: U-Net, text encoder(s), tokenizer(s), noise schedule.

Sources: a diffusers folder, a hub id, or a single original-layout ``.safetensors``/``.ckpt``
(how most users keep models). Single files load offline: the configs ship with the project
(``library/model_configs``) and tokenizers come from ``--tokenizer_cache_dir`` (written there
on the first online run, as sd-scripts does). The VAE is never loaded for training; sampling
asks for it through :meth:`LoadedModel.load_vae`.

Memory is decided by the loading order, so :func:`load_base_model` loads no weights: it reads
configs and tokenizers and returns loaders. The trainer then loads each text encoder on its own,
straight into the run's dtype, encodes the prompts and drops it, and only then loads the U-Net,
again straight into its dtype (weights are read from a memory map and converted one tensor at a
time: a bf16 run never holds a float32 U-Net, and nothing holds two copies).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
CLIP_L = "openai/clip-vit-large-patch14"
SD2_REPO = "stabilityai/stable-diffusion-2"
CLIP_BIG_G = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MIN_VOCAB = 512  # a byte-level BPE has at least its 512 byte symbols


ComponentLoader = Callable[[torch.dtype], torch.nn.Module]


@dataclass
class LoadedModel:
    """A base model LECO trains against: its configs and tokenizers, and loaders for its weights.

    Attributes:
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (what the U-Net outputs).
        scheduler_config: the model's noise-schedule config.
        source: human-readable description for the run summary.
        unet_loader: ``dtype -> U-Net`` on the CPU, frozen, in eval mode.
        text_encoder_loaders: one ``dtype -> text encoder`` per tokenizer (two for SDXL).
    """

    kind: str
    tokenizers: list
    scheduler_config: dict
    prediction_type: str
    source: str
    unet_loader: ComponentLoader = field(repr=False)
    text_encoder_loaders: list[ComponentLoader] = field(repr=False)
    vae_loader: Callable[[], Any] | None = field(default=None, repr=False)

    def load_unet(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The U-Net on the CPU, its weights converted straight into ``dtype`` (frozen, eval mode)."""
        return _frozen(self.unet_loader(dtype))

    def load_text_encoder(self, index: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Text encoder ``index`` (0, or 1 for SDXL's second) on the CPU in ``dtype`` (frozen, eval mode)."""
        return _frozen(self.text_encoder_loaders[index](dtype))

    def load_vae(self):
        """The VAE, loaded on demand (for sample images only); None if the model has none."""
        return self.vae_loader() if self.vae_loader else None


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# Tokenizers


def _checked_tokenizer(tokenizer, hub_id: str, where: str):
    if len(tokenizer) < MIN_VOCAB:
        raise UserError(f"tokenizer {hub_id} in {where} is incomplete ({len(tokenizer)} tokens); delete it and run once online")
    return tokenizer


def load_tokenizer(hub_id: str, subfolder: str | None = None, cache_dir: str | None = None,
                   pad_token: str | None = None):
    """A CLIP tokenizer from ``cache_dir/<hub id with / -> _>`` or the hub (then saved there).

    Raises:
        UserError: when it is neither cached nor downloadable (offline), with what to do.
    """
    from transformers import CLIPTokenizer

    local = Path(cache_dir).expanduser() / hub_id.replace("/", "_") if cache_dir else None
    hint = " (pass --tokenizer_cache_dir DIR once while online; later runs read it offline)"
    if local is not None:
        hint = f" and {local} does not exist (run once online with this --tokenizer_cache_dir)"
    if local is not None and local.is_dir():
        tokenizer = _checked_tokenizer(CLIPTokenizer.from_pretrained(str(local), model_max_length=77), hub_id, str(local))
        logger.info("tokenizer %s from %s", hub_id, local)
    else:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(hub_id, subfolder=subfolder, model_max_length=77)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load tokenizer {hub_id}: {type(exc).__name__}{hint}") from None
        if len(tokenizer) < MIN_VOCAB:  # transformers 5 builds an empty tokenizer instead of failing offline
            raise UserError(f"cannot load tokenizer {hub_id}: not downloadable here{hint}")
        if local is not None:
            tokenizer.save_pretrained(str(local))
            logger.info("tokenizer %s saved to %s for offline use", hub_id, local)
    if pad_token is not None and tokenizer.pad_token != pad_token:
        tokenizer.pad_token = pad_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Diffusers folders and hub ids


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _scheduler_config_from(path: str, subfolder: str = "scheduler") -> dict:
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(path, subfolder=subfolder))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the scheduler config ({type(exc).__name__}); is it a diffusers model?") from None


def _detect_diffusers_kind(path: str) -> str:
    """Read model_index.json (folder or hub) to tell SDXL from SD."""
    local = Path(path).expanduser()
    if local.is_dir():
        index_file = local / "model_index.json"
        if not index_file.is_file():
            raise UserError(f"{path} is a folder without model_index.json: not a diffusers model folder")
        index = _read_json(index_file)
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = _read_json(Path(hf_hub_download(path, "model_index.json")))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise UserError(f"cannot fetch {path} from the hub ({type(exc).__name__}); give a local path when offline") from None
    return "sdxl" if "text_encoder_2" in index else "sd"


def _load_diffusers(path: str, family: str) -> LoadedModel:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", model_max_length=77)]
    encoder_classes = [(CLIPTextModel, "text_encoder")]
    if family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", model_max_length=77))
        encoder_classes.append((CLIPTextModelWithProjection, "text_encoder_2"))
        kind = "sdxl"
    else:
        # SD 2.x uses OpenCLIP (gelu, 1024 wide); SD 1.x OpenAI CLIP (quick_gelu, 768 wide)
        config = CLIPTextConfig.from_pretrained(path, subfolder="text_encoder")
        kind = "sd2" if config.hidden_act == "gelu" or config.hidden_size >= 1024 else "sd1"
    scheduler_config = _scheduler_config_from(path)

    def unet_loader(dtype: torch.dtype):
        # weights are memory-mapped and cast parameter by parameter into the meta-initialised model
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)

    def text_encoder_loader(cls, subfolder: str) -> ComponentLoader:
        return lambda dtype: cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)

    def vae_loader():
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(path, subfolder="vae")
        except (OSError, ValueError):
            return None

    return LoadedModel(kind, tokenizers, scheduler_config, scheduler_config.get("prediction_type", "epsilon"),
                       f"diffusers model {path}", unet_loader,
                       [text_encoder_loader(cls, subfolder) for cls, subfolder in encoder_classes], vae_loader)


# ----------------------------------------------------------------------------------------------
# Single files


def _single_file_config_dir(kind: str, v_parameterization: bool) -> Path:
    if kind == "sdxl":
        return CONFIG_ROOT / "sdxl_base"
    if kind == "sd2":
        return CONFIG_ROOT / ("sd2_768_v" if v_parameterization else "sd2_512")
    return CONFIG_ROOT / "sd15"


def _single_file_tokenizers(kind: str, cache_dir: str | None, config_dir: Path) -> dict:
    """Tokenizers for a single file: from the config folder when it has them, else by hub id
    (through ``--tokenizer_cache_dir``)."""
    from transformers import CLIPTokenizer

    hub_ids = {"sd1": [("tokenizer", CLIP_L, None)], "sd2": [("tokenizer", SD2_REPO, "tokenizer")],
               "sdxl": [("tokenizer", CLIP_L, None), ("tokenizer_2", CLIP_BIG_G, None)]}[kind]
    tokenizers = {}
    for name, hub_id, subfolder in hub_ids:
        if (config_dir / name).is_dir():
            tokenizers[name] = CLIPTokenizer.from_pretrained(str(config_dir / name), model_max_length=77)
        else:
            pad = "!" if name == "tokenizer_2" else None
            tokenizers[name] = load_tokenizer(hub_id, subfolder=subfolder,
                                              cache_dir=cache_dir, pad_token=pad)
    return tokenizers


def _load_single_file(path: Path, family: str, v2: bool, v_parameterization: bool,
                      tokenizer_cache_dir: str | None, config_dir: Path | None = None) -> LoadedModel:
    from library import single_file

    try:
        kind = single_file.detect_checkpoint_kind(single_file.read_checkpoint_keys(path))
    except ValueError as exc:
        raise UserError(f"{path.name}: {exc}") from None
    if family == "sdxl" and kind != "sdxl":
        raise UserError(f"{path.name} is an SD {'2.x' if kind == 'sd2' else '1.x'} checkpoint; train it with train_leco.py")
    if family == "sd" and kind == "sdxl":
        raise UserError(f"{path.name} is an SDXL checkpoint; train it with sdxl_train_leco.py")
    if v2 and kind == "sd1":
        raise UserError(f"--v2 was given but {path.name} is an SD 1.x checkpoint (its text encoder is CLIP ViT-L)")
    if kind == "sd2" and not v2:
        logger.info("%s is an SD 2.x checkpoint (detected from its weights)", path.name)
    config_dir = config_dir or _single_file_config_dir(kind, v_parameterization)
    tokenizers = _single_file_tokenizers(kind, tokenizer_cache_dir, config_dir)
    try:
        scheduler_config = single_file.check_config_dir(config_dir, kind)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"{path.name}: {exc}") from None
    ordered_tokenizers = [tokenizers["tokenizer"]] + ([tokenizers["tokenizer_2"]] if kind == "sdxl" else [])

    def checked(load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        try:
            return load()
        except ValueError as exc:
            raise UserError(f"{path.name}: {exc}") from None

    def unet_loader(dtype: torch.dtype):
        return checked(lambda: single_file.load_single_file_unet(path, config_dir, dtype))

    def text_encoder_loader(index: int) -> ComponentLoader:
        return lambda dtype: checked(lambda: single_file.load_single_file_text_encoder(path, kind, config_dir, index, dtype))

    def vae_loader():
        return single_file.load_single_file_vae(path, config_dir)

    return LoadedModel(kind, ordered_tokenizers, scheduler_config, scheduler_config.get("prediction_type", "epsilon"),
                       f"single file {path.name} ({kind})", unet_loader,
                       [text_encoder_loader(index) for index in range(len(ordered_tokenizers))], vae_loader)


# ----------------------------------------------------------------------------------------------


def load_base_model(path: str, family: str, v2: bool = False, v_parameterization: bool = False,
                    tokenizer_cache_dir: str | None = None, model_config_dir: str | None = None) -> LoadedModel:
    """Prepare a base model for LECO: configs, tokenizers and weight loaders (no weights are read yet).

    Args:
        path: diffusers folder, hub id, or single checkpoint file.
        family: ``"sd"`` (train_leco.py) or ``"sdxl"`` (sdxl_train_leco.py).
        v2: the user says it is SD 2.x (single files are detected anyway).
        v_parameterization: the model predicts v; overrides the model's config.
        tokenizer_cache_dir: where single-file runs find (or save) tokenizers.
        model_config_dir: config folder for single files of other architectures (default: shipped configs).

    Raises:
        UserError: wrong family, unreadable file, missing configs or tokenizers.
    """
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"--pretrained_model_name_or_path: {local.name} is not a .safetensors/.ckpt checkpoint")
        loaded = _load_single_file(local, family, v2, v_parameterization, tokenizer_cache_dir,
                                   Path(model_config_dir) if model_config_dir else None)
    else:
        kind = _detect_diffusers_kind(path)
        if family == "sdxl" and kind != "sdxl":
            raise UserError(f"{path} is not an SDXL model; train it with train_leco.py")
        if family == "sd" and kind == "sdxl":
            raise UserError(f"{path} is an SDXL model; train it with sdxl_train_leco.py")
        loaded = _load_diffusers(path, family)
    if v_parameterization and loaded.prediction_type != "v_prediction":
        if local.is_dir() or not local.exists():
            logger.warning("--v_parameterization: the model's config says %s; using v_prediction as asked",
                           loaded.prediction_type)
        loaded.prediction_type = "v_prediction"
    elif loaded.prediction_type == "v_prediction" and not v_parameterization:
        logger.info("the model predicts v (from its scheduler config); sampling and targets use v")
    if v2 and loaded.kind == "sd1":
        logger.warning("--v2 was given but the text encoder is SD 1.x-sized; continuing with the model as it is")
    return loaded


def load_vae(path: str, kind: str):
    """A VAE from ``--vae``: a diffusers folder (with or without a ``vae`` subfolder), a hub id, or a file."""
    from diffusers import AutoencoderKL

    local = Path(path).expanduser()
    try:
        if local.is_file():
            config_dir = _single_file_config_dir(kind, False)
            return AutoencoderKL.from_single_file(str(local), config=str(config_dir), subfolder="vae", local_files_only=True)
        if local.is_dir() and (local / "vae").is_dir():
            return AutoencoderKL.from_pretrained(str(local), subfolder="vae")
        return AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"--vae: cannot load {path} ({type(exc).__name__}: {exc})") from None


def model_version(kind: str, prediction_type: str) -> str:
    """sd-scripts' ``ss_base_model_version``: sd_v1, sd_v2, sd_v2_v (v-pred), sdxl_base_v1-0."""
    if kind == "sdxl":
        return "sdxl_base_v1-0"
    version = "sd_v2" if kind == "sd2" else "sd_v1"
    return version + ("_v" if prediction_type == "v_prediction" else "")
