"""Build, train, save and cache the concept world's tiny text-to-image latent diffusion model.

The model is SD1-shaped: a CLIP text encoder whose last hidden state is the only conditioning of
a ``UNet2DConditionModel``, read through cross-attention transformer blocks, with SD's DDPM
schedule (1000 steps, scaled-linear betas, epsilon prediction). Choices that made it learn colour,
size and shape within about five minutes on two CPU cores (measured; see the report in
``concept_world.json``):

* Transformer blocks sit at the 8x8 level and in the middle block, not at 16x16: attention at
  the full latent resolution made each step 1.5x slower and, within the budget, the model never
  learned shape.
* The loss weights the implied x0 error by ``clamp(snr, snr_floor, min_snr_gamma)``: plain
  epsilon loss almost ignores high-noise timesteps, where the prompt decides what is drawn.
* The text encoder stays at its random initialisation by default: trained jointly it let a word
  (``circle``) collapse onto the empty prompt, so single-word prompts lost their meaning.
* Two single-thread data-parallel processes beat intra-op threads for a model this small.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.atomic import replace_folder
from library.concept_world import scenes
from library.concept_world.sampling import tokenize
from library.tiny_clip import write_clip_tokenizer

logger = logging.getLogger(__name__)

VERSION = "v1"
"""Cache key of :func:`ensure_concept_model`: bump it whenever scenes or defaults change."""
METADATA_FILE = "concept_world.json"

SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training settings of the concept-world model.

    Attributes:
        seed: seed of weights, data and noise.
        latent_size: canvas side in latent pixels.
        block_out_channels: U-Net widths per level.
        layers_per_block: resnets per down block.
        attention: per level, whether it has cross-attention transformer blocks (empty: SD1's
            pattern, all but the deepest level).
        attention_heads: heads of every transformer block (diffusers' ``attention_head_dim``).
        cross_attention_dim: text hidden size (= U-Net cross-attention width).
        text_layers: CLIP encoder layers.
        train_text_encoder: train the text encoder with the U-Net (else it stays at its random
            initialisation, which keeps every word's embedding distinct).
        train_steps: optimiser steps.
        batch_size: scenes per step.
        learning_rate: peak AdamW learning rate (warm-up, then cosine decay to 10 %).
        warmup_steps: linear warm-up steps.
        ema_decay: decay of the weight average that is saved (0 disables it).
        min_snr_gamma: cap of the implied x0-loss weight at low noise (min-SNR; 0 disables it).
        snr_floor: floor of the implied x0-loss weight at high noise (0 disables it).
        mention_probs: chances that a training prompt names 0, 1, 2 or 3 attributes (the first
            is the classifier-free guidance dropout rate).
        position_jitter: largest offset of a shape's centre from the canvas centre.
        threads: torch CPU threads per training process.
        processes: data-parallel training processes (1: train in this process).
    """

    seed: int = 0
    latent_size: int = scenes.LATENT_SIZE
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, True, False)
    attention_heads: int = 1
    cross_attention_dim: int = 64
    text_layers: int = 1
    train_text_encoder: bool = False
    train_steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.99
    min_snr_gamma: float = 5.0
    snr_floor: float = 0.3
    mention_probs: tuple[float, ...] = scenes.MENTION_PROBS
    position_jitter: float = scenes.POSITION_JITTER
    threads: int = 1
    processes: int = 2


@dataclass
class TrainedModel:
    """The trained components and how training went."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    config: ModelConfig
    train_seconds: float  # wall clock, including process start-up when data-parallel
    train_cpu_seconds: float  # CPU time of the training loops, summed over processes
    final_loss: float
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write the concept-world tokenizer (each grammar word one token) and load it."""
    write_clip_tokenizer(folder, scenes.vocabulary())
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def build_text_encoder(tokenizer: CLIPTokenizer, config: ModelConfig) -> CLIPTextModel:
    """A tiny randomly initialised CLIP text encoder sized for ``tokenizer``."""
    hidden = config.cross_attention_dim
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=max(1, hidden // 32),
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(config: ModelConfig) -> UNet2DConditionModel:
    """An SD1-shaped U-Net: cross-attention transformer blocks in the levels ``config.attention``
    marks (SD1: every level but the deepest) and in the middle block."""
    attention = config.attention or (True,) * (len(config.block_out_channels) - 1) + (False,)
    if len(attention) != len(config.block_out_channels):
        raise ValueError("attention needs one flag per level")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_heads,
        norm_num_groups=min(32, min(config.block_out_channels) // 2),
    )


def build_scheduler() -> DDPMScheduler:
    """SD's DDPM training schedule (scaled-linear betas 0.00085..0.012, epsilon prediction)."""
    return DDPMScheduler(**SCHEDULER_CONFIG)


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Training maths (pure functions)
# ---------------------------------------------------------------------------------------------


def learning_rate_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from 1 to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def snr_loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Weights of the epsilon loss that give the implied x0 loss the weight ``clamp(snr, floor, gamma)``.

    The epsilon loss equals ``snr`` times the x0 loss, so plain epsilon training (and min-SNR)
    puts almost no weight on getting x0 right at high noise, which is where the prompt decides
    colour, size and shape. ``gamma`` caps the weight of nearly clean timesteps (min-SNR-gamma);
    ``floor`` keeps high-noise timesteps from being ignored. ``gamma <= 0`` disables the cap and
    ``floor <= 0`` the floor.

    Returns:
        (B,) weights ``clamp(snr, floor, gamma) / snr``.
    """
    alpha_bar = alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    target = snr
    if gamma > 0:
        target = target.clamp(max=gamma)
    if floor > 0:
        target = target.clamp(min=floor)
    return (target / snr).float()


@torch.no_grad()
def update_ema(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * model``, parameter by parameter."""
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_concept_model(config: ModelConfig, tokenizer_dir: str | Path, log_every: int = 100) -> TrainedModel:
    """Train the U-Net and text encoder jointly on random concept-world scenes.

    Prompts are random partial descriptions of each scene (attributes left out are random in the
    scene), some of them empty so classifier-free guidance works. With ``config.processes`` > 1
    the batch is split over that many spawned single-thread processes that average their
    gradients (gloo), which uses several CPU cores far better than intra-op threads do for a
    model this small; the result depends on ``processes`` but is deterministic for a given value.

    Args:
        config: architecture and training settings.
        tokenizer_dir: folder the tokenizer is written to.
        log_every: steps between loss log lines (0: none).

    Returns:
        The trained (EMA-averaged, when enabled) components in eval mode.
    """
    tokenizer = build_tokenizer(tokenizer_dir)
    if config.processes <= 1:
        return _train_worker(config, tokenizer, rank=0, world=1, log_every=log_every)
    return _train_distributed(config, Path(tokenizer_dir), tokenizer, log_every)


def _train_worker(config: ModelConfig, tokenizer: CLIPTokenizer, rank: int, world: int, log_every: int) -> TrainedModel:
    """The training loop of one process (``world`` > 1: inside an initialised gloo group)."""
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {world} processes")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 7919 * rank)
    text_encoder = build_text_encoder(tokenizer, config)
    unet = build_unet(config)
    scheduler = build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    if config.train_text_encoder:
        models = torch.nn.ModuleList([unet, text_encoder])
    else:
        text_encoder.requires_grad_(False).eval()
        models = torch.nn.ModuleList([unet])
    average = copy.deepcopy(models) if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(models.parameters(), lr=config.learning_rate, weight_decay=0.01, foreach=True)
    token_cache: dict[str, torch.Tensor] = {}
    context_cache: dict[str, torch.Tensor] = {}
    losses: list[float] = []
    if rank == 0:
        logger.info(
            "training concept world: unet %d params, text encoder %d params, %d steps x %d scenes, %d process(es)",
            parameter_count(unet),
            parameter_count(text_encoder),
            config.train_steps,
            config.batch_size,
            world,
        )
    start = time.perf_counter()
    cpu_start = time.process_time()
    with torch_threads(config.threads):
        models.train()
        for step in range(config.train_steps):
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * learning_rate_factor(step, config.train_steps, config.warmup_steps)
            latents, prompts, _ = scenes.random_batch(
                config.batch_size // world,
                generator,
                config.latent_size,
                config.mention_probs,
                config.position_jitter,
            )
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            if config.train_text_encoder:
                ids = torch.stack([_cached_ids(token_cache, tokenizer, p) for p in prompts])
                unique_ids, inverse = torch.unique(ids, dim=0, return_inverse=True)
                context = text_encoder(unique_ids)[0][inverse]
            else:
                context = torch.stack([_cached_context(context_cache, text_encoder, tokenizer, p) for p in prompts])
            prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
            per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
            per_sample = per_sample * snr_loss_weights(alphas_cumprod, timesteps, config.min_snr_gamma, config.snr_floor)
            loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            loss_value = _average_gradients(models, loss.detach(), world)
            torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
            optimizer.step()
            if average is not None:
                update_ema(average, models, min(config.ema_decay, (step + 1) / (step + 10)))
            losses.append(loss_value)
            if rank == 0 and log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, config.train_steps, sum(recent) / len(recent), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    final = average if average is not None else models
    unet = final[0]
    if config.train_text_encoder:
        text_encoder = final[1]
    unet.eval()
    text_encoder.eval()
    tail = losses[-min(100, len(losses)) :] or [float("nan")]
    return TrainedModel(unet, text_encoder, tokenizer, scheduler, config, seconds, cpu_seconds, sum(tail) / len(tail), losses)


def _average_gradients(models: torch.nn.Module, loss: torch.Tensor, world: int) -> float:
    """Average gradients (and the loss) over the process group in one flat all-reduce.

    Returns:
        The loss averaged over processes.
    """
    if world <= 1:
        return float(loss)
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in models.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(models.parameters(), grads):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(grad)
        offset += count
    return float(flat[-1])


def _train_distributed(config: ModelConfig, tokenizer_dir: Path, tokenizer: CLIPTokenizer, log_every: int) -> TrainedModel:
    """Run :func:`_train_worker` in ``config.processes`` spawned processes and collect rank 0's result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="concept-world-ddp-") as work:
        result_path = Path(work) / "result.pt"
        start = time.perf_counter()
        from library.concept_world.spawn_entry import distributed_entry

        mp.start_processes(
            distributed_entry,
            args=(
                config.processes,
                asdict(config),
                str(tokenizer_dir),
                str(Path(work) / "rendezvous"),
                str(result_path),
                log_every,
                logger.getEffectiveLevel(),
            ),
            nprocs=config.processes,
            join=True,
            start_method="spawn",
        )
        seconds = time.perf_counter() - start
        result = torch.load(result_path, weights_only=True)
    text_encoder = build_text_encoder(tokenizer, config)
    unet = build_unet(config)
    text_encoder.load_state_dict(result["text_encoder"])
    unet.load_state_dict(result["unet"])
    losses = result["losses"].tolist()
    tail = losses[-min(100, len(losses)) :] or [float("nan")]
    logger.info("trained in %.1f s including process start (%.1f s in the training loop)", seconds, float(result["seconds"]))
    return TrainedModel(
        unet.eval(),
        text_encoder.eval(),
        tokenizer,
        build_scheduler(),
        config,
        seconds,
        float(result["cpu_seconds"]),
        sum(tail) / len(tail),
        losses,
    )


def _distributed_entry(
    rank: int,
    world: int,
    config: ModelConfig,
    tokenizer_dir: str,
    rendezvous: str,
    result_path: str,
    log_every: int,
    log_level: int,
) -> None:
    """Entry point of one spawned training process."""
    import torch.distributed as dist

    if rank == 0:
        logging.basicConfig(level=log_level, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, config.threads))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
        trained = _train_worker(config, tokenizer, rank, world, log_every)
        cpu = torch.tensor([trained.train_cpu_seconds], dtype=torch.float64)
        dist.all_reduce(cpu)
        if rank == 0:
            torch.save(
                {
                    "unet": trained.unet.state_dict(),
                    "text_encoder": trained.text_encoder.state_dict(),
                    "losses": torch.tensor(trained.losses),
                    "seconds": trained.train_seconds,
                    "cpu_seconds": float(cpu),
                },
                result_path,
            )
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def _cached_context(cache: dict[str, torch.Tensor], text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
    """Frozen text-encoder output of one prompt, memoised in ``cache``."""
    if prompt not in cache:
        cache[prompt] = text_encoder(tokenize(tokenizer, [prompt]))[0][0]
    return cache[prompt]


def _cached_ids(cache: dict[str, torch.Tensor], tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
    """Token ids of one prompt, memoised in ``cache`` (the grammar has few distinct prompts)."""
    if prompt not in cache:
        cache[prompt] = tokenize(tokenizer, [prompt])[0]
    return cache[prompt]


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def model_index() -> dict[str, object]:
    """``model_index.json`` of a VAE-less StableDiffusionPipeline folder."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "vae": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


def describe_world(config: ModelConfig) -> dict[str, object]:
    """The attribute/latent description stored in ``concept_world.json`` (without results)."""
    return {
        "version": VERSION,
        "latent_size": config.latent_size,
        "image_size": config.latent_size * 8,
        "latent_channels": 4,
        "attributes": {name: list(values) for name, values in scenes.ATTRIBUTES},
        "prompt_grammar": "[a] [size] [color] [shape]; omitted attributes are random",
        "color_vectors": {c: list(v) for c, v in zip(scenes.attribute_values("color"), scenes.COLOR_VECTORS)},
        "size_extent_px": dict(zip(scenes.attribute_values("size"), scenes.SIZE_EXTENT)),
        "config": asdict(config),
    }


def save_concept_model(trained: TrainedModel, folder: str | Path, metadata: dict[str, object]) -> Path:
    """Write a diffusers folder (unet, text_encoder, tokenizer, scheduler, model_index.json).

    ``metadata`` is written to ``concept_world.json`` last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trained.unet.save_pretrained(folder / "unet")
    trained.text_encoder.save_pretrained(folder / "text_encoder")
    trained.tokenizer.save_pretrained(folder / "tokenizer")
    trained.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2), encoding="utf-8")
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return folder


@dataclass
class ConceptModel:
    """Loaded concept-world components."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    metadata: dict[str, object]


def load_concept_model(folder: str | Path) -> ConceptModel:
    """Load a folder written by :func:`save_concept_model` (components in eval mode)."""
    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    meta_path = folder / METADATA_FILE
    metadata = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    return ConceptModel(unet, text_encoder, tokenizer, scheduler, metadata)


# ---------------------------------------------------------------------------------------------
# Build and cache
# ---------------------------------------------------------------------------------------------


def build_concept_model(out: str | Path, config: ModelConfig | None = None, evaluate: bool = True, eval_seeds: int = 8) -> Path:
    """Train, (optionally) measure and save the model into ``out`` atomically.

    The folder is built under a temporary name next to ``out`` and renamed at the end, so an
    interrupted build never leaves a partial folder named ``out``. An existing ``out`` is
    replaced.

    Args:
        out: destination folder.
        config: settings (default :class:`ModelConfig`).
        evaluate: sample every full prompt with CFG and store per-attribute accuracy, plus the
            attribute rates of partial prompts (``"red"``, ``"a large circle"`` ...).
        eval_seeds: seeds per full prompt (twice as many per partial prompt).

    Returns:
        ``out``.
    """
    import diffusers
    import transformers

    from library.concept_world.evaluate import evaluate_full_prompts, evaluate_prompt_rates

    config = config or ModelConfig()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    temp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary shared cache
    try:
        trained = train_concept_model(config, temp / "tokenizer")
        metadata = describe_world(config)
        metadata.update(
            train_seconds=round(trained.train_seconds, 1),
            train_cpu_seconds=round(trained.train_cpu_seconds, 1),
            final_loss=round(trained.final_loss, 5),
            unet_parameters=parameter_count(trained.unet),
            text_encoder_parameters=parameter_count(trained.text_encoder),
            built_with={"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        )
        if evaluate:
            with torch_threads(config.threads):
                model = ConceptModel(trained.unet, trained.text_encoder, trained.tokenizer, trained.scheduler, {})
                metadata["base_accuracy"] = evaluate_full_prompts(model, seeds_per_prompt=eval_seeds)
                metadata["prompt_rates"] = {
                    prompt: {"hit_rate": report["hit_rate"], "rates": report["rates"]}
                    for prompt, report in evaluate_prompt_rates(model, seeds_per_prompt=2 * eval_seeds).items()
                }
        save_concept_model(trained, temp, metadata)
        replace_folder(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    logger.info("concept world model written to %s", out)
    return out


def repo_root() -> Path:
    """The repository root (two levels above this package)."""
    return Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """``<repo>/.cache/concept_world`` (git-ignored)."""
    return repo_root() / ".cache" / "concept_world"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished concept-world build of this version."""
    meta = folder / METADATA_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("version") == VERSION
    except (OSError, ValueError):
        return False


def ensure_concept_model(cache_dir: Path | None = None, config: ModelConfig | None = None) -> Path:
    """Return the cached concept-world model folder, building it first if needed.

    The model lives in ``<cache_dir>/<VERSION>`` (``cache_dir`` defaults to
    ``<repo>/.cache/concept_world``). A file lock serialises concurrent builders; the build is
    atomic (see :func:`build_concept_model`).

    Args:
        cache_dir: parent folder of the versioned model folder.
        config: settings for a build (default :class:`ModelConfig`); ignored when cached.

    Returns:
        The model folder.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / VERSION
    if is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{VERSION}.lock"):
        if not is_complete(target):
            logger.info("building the concept world model into %s (a few minutes on a CPU)", target)
            build_concept_model(target, config)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
