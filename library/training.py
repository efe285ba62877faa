"""The LECO training run, shared by ``train_leco.py`` and ``sdxl_train_leco.py``.

Phases: accelerator -> base model -> prompt cache (text encoders released) -> U-Net and LoRA ->
optimizer and schedule -> (resume) -> loop of LECO steps -> final save. The loop reads top to
bottom; the maths lives in ``leco_step``, ``targets`` and ``diffusion``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from library.config import RunConfig, check_zero_terminal_snr
from library.errors import NonFiniteLoss, UserError
from library.family import ModelFamily, family_for
from library.leco_step import LecoStep
from library.models import LoadedModel, load_base_model, load_vae
from library.optimizer_step import accumulate_and_step, broadcast_parameters, ranks_agree
from library.optimizers import is_schedule_free, lr_logs
from library.run_setup import (
    allow_fp16_gradient_unscaling,
    create_lora_network,
    make_accelerator,
    optimizer_and_schedule,
    optimizer_name,
    prepare_unet,
    seeded_generator,
    tf32_matmuls,
    weight_dtype_for,
)
from library.sampling import SampleGridMaker, build_sample_scheduler, latent_preview, save_grid, vae_decoder
from library.saving import (
    SAVE_DTYPES,
    BaseModelHashes,
    build_metadata,
    final_file_name,
    minimum_metadata,
    prune_step_outputs,
    save_network_file,
    step_file_name,
    step_metadata,
)
from library.state import check_fingerprint, load_state, save_state, state_dir_name
from library.stop import StopRequest
from library.trajectories import build_leco_step, trajectory_summary
from networks.lora import kohya_aliases

logger = logging.getLogger(__name__)

NON_FINITE_ADVICE = "Try a lower --learning_rate, --max_grad_norm 1.0, or --mixed_precision bf16 instead of fp16"


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM: the LoRA (and state) were saved at the last completed step."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    final_file: Path | None
    steps: int
    files: list[Path] = field(default_factory=list)
    last_loss: float | None = None


# ----------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run. ``run()`` does everything; the pieces are methods for readability."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.family: ModelFamily = family_for(config.model.family, config.model.max_token_length, config.model.clip_skip)
        self.accelerator = make_accelerator(config, self.family.tracker_name)
        if self.accelerator.mixed_precision != config.train.mixed_precision:  # fp16 without CUDA runs in float32
            config = replace(config, train=replace(config.train, mixed_precision=self.accelerator.mixed_precision))
            self.config = config
        self.device = self.accelerator.device
        self.weight_dtype = weight_dtype_for(self.accelerator.mixed_precision)
        self.output_dir = Path(config.output.output_dir)
        self.extension = config.output.save_model_as
        self.files: list[Path] = []
        self.started_at = time.time()
        self.session_id = random.SystemRandom().randrange(2**31)
        self.generator = seeded_generator(config.train.seed, self.accelerator.process_index)
        if config.train.seed is not None:
            torch.manual_seed(config.train.seed + self.accelerator.process_index)

    # --- phases ---------------------------------------------------------------------------

    def load_model(self) -> LoadedModel:
        cfg = self.config.model
        logger.info("loading %s", cfg.path)
        model = load_base_model(cfg.path, cfg.family, cfg.v2, cfg.v_parameterization, cfg.tokenizer_cache_dir,
                                cfg.model_config_dir)
        check_zero_terminal_snr(cfg.zero_terminal_snr, model.prediction_type == "v_prediction")
        if cfg.clip_skip and model.kind == "sd2" and cfg.clip_skip > 1:
            logger.warning("--clip_skip with SD 2.x: its text encoder already ends at the penultimate layer")
        small = [s for s in self.config.prompts.settings if min(s.resolution) < 768]
        if self.family.name == "sdxl" and small:
            logger.warning("SDXL trains best at resolution 1024 (%d settings use %s); set resolution = 1024 in the prompt TOML",
                           len(small), "x".join(map(str, small[0].resolution)))
        if any(s.dynamic_crops for s in self.config.prompts.settings) and self.family.name != "sdxl":
            logger.warning("dynamic_crops only affects SDXL; ignored for this model")
        return model

    def cache_prompts(self, model: LoadedModel):
        """Encode every prompt once, each text encoder loaded in the run's dtype and released after use."""
        prompts = list(self.config.prompts.all_prompts)
        for sample in self.config.sample.prompts:
            prompts += [sample.prompt, sample.negative]
        cache = self.family.encode(model, prompts, self.device, self.weight_dtype)
        logger.info("cached %d prompt embeddings; text encoders released", len(cache))
        return cache.to(self.device, self.weight_dtype)

    def build_network(self, unet):
        network = create_lora_network(self.config, unet)
        network_dtype = self.weight_dtype if (self.config.train.full_bf16 or self.config.train.full_fp16) else torch.float32
        network.to(device=self.device, dtype=network_dtype)
        if hasattr(network, "prepare_grad_etc"):
            network.prepare_grad_etc(None, unet)
        else:
            network.requires_grad_(True)
        network.train()
        return network

    def resume(self, network, optimizer, lr_scheduler, fingerprint) -> int:
        if not self.config.output.resume:
            return 0
        state, network_file = load_state(self.config.output.resume)
        check_fingerprint(state.fingerprint, fingerprint)
        network.load_weights(str(network_file))
        optimizer.load_state_dict(state.optimizer)
        if lr_scheduler is not None and state.lr_scheduler:
            lr_scheduler.load_state_dict(state.lr_scheduler)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)  # the fp16 loss scale continues where it was
        if self.accelerator.process_index == 0:
            self.generator.set_state(state.generator)
            torch.set_rng_state(state.torch_rng)
            if state.cuda_rng is not None and torch.cuda.is_available() and len(state.cuda_rng) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state.cuda_rng)
        else:  # other ranks continue from a deterministic, rank-specific stream
            self.generator.manual_seed(int(torch.randint(2**31, (), generator=torch.Generator().manual_seed(state.step)))
                                       + self.accelerator.process_index)
        logger.info("resumed from %s at step %d", self.config.output.resume, state.step)
        if self.config.leco.trajectory == "persistent":
            logger.info("persistent trajectories: the chains are not part of the state; they are re-made from fresh noise")
        return state.step

    # --- saving ---------------------------------------------------------------------------

    def save(self, network, optimizer, lr_scheduler, step: int, final: bool) -> Path | None:
        """Write the LoRA (and the state with --save_state) on the main process.

        Every rank enters and leaves together: a rank that left before the file was written could
        end the run (or be killed by the launcher) while rank 0 is still writing.
        """
        self.accelerator.wait_for_everyone()
        self._refuse_non_finite_weights(network, step)  # the same weights on every rank: all decide alike
        path = self._write(network, optimizer, lr_scheduler, step, final) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        return path

    def _write(self, network, optimizer, lr_scheduler, step: int, final: bool) -> Path:
        out = self.config.output
        name = final_file_name(out.output_name, self.extension) if final else step_file_name(out.output_name, step, self.extension)
        metadata = minimum_metadata(self.static_metadata) if out.no_metadata else step_metadata(self.static_metadata, step,
                                                                                                  self.hashes, final)
        with self._averaged_weights(optimizer):
            path = save_network_file(network, self.output_dir / name, SAVE_DTYPES[out.save_precision], metadata,
                                     self.sgm_aliases)
            if out.save_state or (final and out.save_state_on_train_end):
                state_dir = self.output_dir / state_dir_name(out.output_name, None if final else step)
                save_state(state_dir, network, optimizer, lr_scheduler, step, self.generator, self.fingerprint,
                           getattr(self.accelerator, "scaler", None))
                logger.info("saved state %s", state_dir)
        self.files.append(path)
        logger.info("saved %s", path)
        if not final and out.save_last_n_steps:
            prune_step_outputs(self.output_dir, out.output_name, f".{self.extension}", step, out.save_last_n_steps)
        if not final and out.save_state and out.save_last_n_steps_state:
            prune_step_outputs(self.output_dir, out.output_name, "-state", step, out.save_last_n_steps_state)
        return path

    @contextlib.contextmanager
    def _averaged_weights(self, optimizer):
        """Schedule-free optimizers: the LoRA holds the averaged weights (what is saved and sampled)
        inside the block, and the training iterate again after it."""
        eval_mode = getattr(optimizer, "eval", None) if is_schedule_free(self.config.optimizer.optimizer_type) else None
        if eval_mode:
            eval_mode()
        try:
            yield
        finally:
            if eval_mode:
                optimizer.train()

    def _refuse_non_finite_weights(self, network, step: int) -> None:
        bad = [name for name, value in network.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteLoss(f"the LoRA holds NaN/inf values at step {step} ({len(bad)} tensors, e.g. {bad[0]}); "
                                f"nothing was written (last good file: {self._last_good_file()}). "
                                "Try a lower --learning_rate or another optimizer")

    def _last_good_file(self) -> str:
        """The newest file this run wrote, for the messages of a stop on NaN/inf."""
        return self.files[-1].name if self.files else "no checkpoint yet"

    def sample(self, grid_maker: SampleGridMaker | None, optimizer, step: int, stop) -> None:
        """Draw the sample grid, its cells shared out over the processes (sd-scripts spreads sample
        prompts over ranks too): no rank waits idle in a collective while rank 0 draws them all."""
        if grid_maker is None:
            return
        accelerator = self.accelerator
        with self._averaged_weights(optimizer):
            cells = grid_maker.cells(self.config.sample.prompts, self.config.sample.multipliers, self.config.sample.sampler,
                                     shard=(accelerator.process_index, accelerator.num_processes),
                                     should_stop=lambda: stop.requested)
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            cells = {key: image for part in gather_object([cells]) for key, image in part.items()}
        if not accelerator.is_main_process:
            return
        image = grid_maker.compose(cells, self.config.sample.prompts, self.config.sample.multipliers)
        if image is None:  # a stop was requested part-way
            return
        path = save_grid(image, self.output_dir / "sample", f"{self.config.output.output_name}_{step:06d}")
        logger.info("sample grid %s", path)
        for tracker in accelerator.trackers:
            if hasattr(tracker, "log_images"):
                import numpy as np

                tracker.log_images({"samples": np.asarray(image)[None]}, step=step, dataformats="NHWC")

    def make_grid_maker(self, model: LoadedModel, step_fn: LecoStep, network, cache) -> SampleGridMaker | None:
        sample = self.config.sample
        if not sample.prompts:
            return None
        if (Path(self.config.model.path) / "concept_world.json").is_file():
            from library.concept_world.sampling import latents_to_rgb

            decode = latents_to_rgb  # the concept world's latents are the picture
        else:
            try:
                vae = load_vae(self.config.model.vae, model.kind) if self.config.model.vae else model.load_vae()
            except (ValueError, OSError) as exc:
                raise UserError(f"--sample_prompts: cannot load a VAE to decode samples ({exc}); pass --vae PATH") from None
            decode = vae_decoder(vae, self.device) if vae is not None else latent_preview
            if vae is None:
                logger.info("sample images show latents directly (the model has no VAE)")
        size = self.config.prompts.settings[0].resolution
        cfg = self.config.model

        def scheduler_factory(name: str):
            return build_sample_scheduler(name, model.scheduler_config, step_fn.prediction_type, cfg.zero_terminal_snr)

        return SampleGridMaker(step_fn.predict, network, cache, self.family.time_ids, scheduler_factory, decode,
                               self.device, size, self.accelerator.autocast)

    # --- summary ----------------------------------------------------------------------------

    def log_summary(self, model: LoadedModel, network, optimizer, start_step: int) -> None:
        cfg = self.config
        trainable = sum(param.numel() for param in network.parameters() if param.requires_grad)
        actions = {}
        for setting in cfg.prompts.settings:
            actions[setting.action] = actions.get(setting.action, 0) + 1
        lines = [
            f"model: {model.source}, predicts {model.prediction_type}",
            f"prompt settings: {len(cfg.prompts.settings)} ({', '.join(f'{n} {a}' for a, n in actions.items())}) from {cfg.prompts.path.name}",
            f"steps: {cfg.train.max_train_steps} (starting at {start_step}), gradient accumulation {cfg.train.gradient_accumulation_steps}, "
            f"processes {self.accelerator.num_processes}",
            f"LoRA: {len(getattr(network, 'unet_loras', []))} modules, {trainable:,} trainable parameters, "
            f"dim {cfg.network.dim}, alpha {cfg.network.alpha} ({cfg.network.module})",
            f"optimizer: {optimizer_name(optimizer, cfg.optimizer.optimizer_args)}, lr {cfg.optimizer.unet_lr or cfg.optimizer.learning_rate}, "
            f"schedule {cfg.optimizer.lr_scheduler}",
            f"precision: {self.accelerator.mixed_precision} (U-Net {str(self.weight_dtype).replace('torch.', '')}), device {self.device}, "
            f"attention {cfg.train.attention}{', gradient checkpointing' if cfg.train.gradient_checkpointing else ''}",
            f"LECO: {trajectory_summary(cfg.leco, cfg.prompts.settings)}, "
            f"CFG {cfg.leco.denoise_guidance_scale}, trajectory from the {'frozen model' if cfg.leco.denoise_with_frozen else 'LoRA'}, "
            f"loss {cfg.leco.loss_type}{f', min-SNR {cfg.leco.min_snr_gamma}' if cfg.leco.min_snr_gamma else ''}",
            f"output: {self.output_dir / final_file_name(cfg.output.output_name, self.extension)}"
            + (f", every {cfg.output.save_every_n_steps} steps" if cfg.output.save_every_n_steps else ""),
        ]
        for line in lines:
            logger.info(line)

    # --- loop -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.config
        accelerator = self.accelerator
        model = self.load_model()
        cache = self.cache_prompts(model)
        # the U-Net is read only now, after the text encoders are gone, straight into the run's dtype
        unet = prepare_unet(model.load_unet(self.weight_dtype), self.device, self.weight_dtype, cfg.train.attention,
                            cfg.train.gradient_checkpointing)
        network = self.build_network(unet)
        foreign_sdxl = self.family.name == "sdxl" and cfg.network.module != "networks.lora"
        self.sgm_aliases = kohya_aliases(unet) if foreign_sdxl else None
        optimizer, lr_scheduler = optimizer_and_schedule(cfg, network)
        network_dim = getattr(network, "lora_dim", cfg.network.dim)
        network_alpha = float(getattr(network, "alpha", cfg.network.alpha))
        self.fingerprint = {"network_module": cfg.network.module, "network_dim": network_dim,
                            "network_alpha": network_alpha, "network_args": dict(sorted(cfg.network.args.items())),
                            "optimizer_type": cfg.optimizer.optimizer_type.lower()}
        start_step = self.resume(network, optimizer, lr_scheduler, self.fingerprint)
        broadcast_parameters(network, accelerator)
        optimizer = accelerator.prepare(optimizer)
        if cfg.train.full_fp16:
            allow_fp16_gradient_unscaling(accelerator)
        if is_schedule_free(cfg.optimizer.optimizer_type):
            optimizer.train()
        step_fn = build_leco_step(cfg.leco.trajectory, cfg.prompts.settings, unet, network, cache, model.scheduler_config,
                                  model.prediction_type, cfg.leco, self.family.time_ids, self.device, accelerator.autocast,
                                  cfg.model.zero_terminal_snr)
        self.hashes = BaseModelHashes(cfg.model.path if accelerator.is_main_process else "")  # only rank 0 writes metadata
        network_args = dict(cfg.network.args)
        self.static_metadata = build_metadata(cfg, model.kind, model.prediction_type, self.started_at, self.session_id,
                                              self.hashes, network_args, optimizer_name(optimizer, cfg.optimizer.optimizer_args),
                                              network_dim, network_alpha)
        grid_maker = self.make_grid_maker(model, step_fn, network, cache)
        self.log_summary(model, network, optimizer, start_step)
        params = [param for param in network.parameters() if param.requires_grad]
        try:
            with StopRequest() as stop, tf32_matmuls(cfg.train.allow_tf32):
                last_loss = self.loop(step_fn, network, optimizer, lr_scheduler, params, grid_maker, start_step, stop)
            if accelerator.num_processes > 1 and ranks_agree(params, accelerator, self.device):
                logger.info("LoRA identical on all %d processes", accelerator.num_processes)
            final = self.save(network, optimizer, lr_scheduler, cfg.train.max_train_steps, final=True)
        finally:
            accelerator.end_training()  # flushes trackers; in multi-process runs also ends the process group
        return TrainResult(final_file=final, steps=cfg.train.max_train_steps, files=list(self.files), last_loss=last_loss)

    def loop(self, step_fn: LecoStep, network, optimizer, lr_scheduler, params, grid_maker, start_step: int, stop) -> float | None:
        from tqdm.auto import tqdm

        cfg = self.config
        accelerator = self.accelerator
        settings = cfg.prompts.settings
        progress = tqdm(total=cfg.train.max_train_steps, initial=start_step, disable=not accelerator.is_main_process,
                        desc="steps", dynamic_ncols=True)
        if cfg.sample.at_first and start_step == 0:
            self.sample(grid_maker, optimizer, 0, stop)
        self._stop_if_requested(stop, None, network, optimizer, lr_scheduler, progress)
        step = start_step
        micro_losses: list[float] = []
        group_losses: dict[str, list[float]] = {}  # by setting.log_group: erase, enhance, slider+, slider-
        last_loss = None
        while step < cfg.train.max_train_steps:
            setting = settings[int(torch.randint(len(settings), (), generator=self.generator))]
            result = accumulate_and_step(accelerator, lambda: step_fn(setting, self.generator), optimizer, lr_scheduler,
                                         params, cfg.optimizer.max_grad_norm, lambda loss: self._check_finite(loss, step),
                                         lambda count: self._non_finite_gradients(count, step))
            value = float(result.loss.detach())
            micro_losses.append(value)
            group_losses.setdefault(setting.log_group, []).append(value)
            if not accelerator.sync_gradients:
                continue
            step += 1
            logs = self._step_logs(micro_losses, group_losses, optimizer, result)
            if cfg.network.scale_weight_norms:
                scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cfg.network.scale_weight_norms, self.device)
                logs.update({"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm})
            last_loss = logs["loss"]
            micro_losses, group_losses = [], {}
            progress.update(1)
            postfix = {"loss": f"{logs['loss']:.4g}", "lr": f"{logs['lr']:.3g}"}
            if cfg.network.scale_weight_norms:  # sd-scripts shows these in its bar too
                postfix.update(keys_scaled=int(logs["max_norm/keys_scaled"]), avg_norm=f"{logs['max_norm/average_key_norm']:.3g}")
            progress.set_postfix(postfix)
            accelerator.log(logs, step=step)
            self._stop_if_requested(stop, step, network, optimizer, lr_scheduler, progress)
            if cfg.output.save_every_n_steps and step % cfg.output.save_every_n_steps == 0 and step < cfg.train.max_train_steps:
                self.save(network, optimizer, lr_scheduler, step, final=False)
            if cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0:
                self.sample(grid_maker, optimizer, step, stop)
                self._stop_if_requested(stop, step, network, optimizer, lr_scheduler, progress)
        progress.close()
        return last_loss

    def _stop_if_requested(self, stop, step: int | None, network, optimizer, lr_scheduler, progress) -> None:
        """After a completed step (``step``) or before the first one (None): save and stop if asked to.

        A signal may reach one process only, or reach them at different steps; the ranks agree here
        (one tiny all-reduce per step) so that all of them stop after the same step and save once.
        """
        if not self._any_rank(stop.requested):
            return
        progress.close()
        if step is None:
            raise TrainingInterrupted("stopped before the first step; nothing new to save")
        self.save(network, optimizer, lr_scheduler, step, final=False)
        saved = f"; saved {self.files[-1]}" if self.files else ""
        raise TrainingInterrupted(f"stopped at step {step}{saved}")

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (the flag itself with one process)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _non_finite_gradients(self, count: int, step: int) -> None:
        raise NonFiniteLoss(
            f"{count} LoRA gradients became NaN/inf at step {step + 1}; stopping before the optimizer step, nothing "
            f"newer is written (last good file: {self._last_good_file()}). {NON_FINITE_ADVICE}"
        )

    def _step_logs(self, micro_losses, group_losses, optimizer, result) -> dict[str, float]:
        logs = {
            "loss": sum(micro_losses) / len(micro_losses),
            **lr_logs(optimizer.param_groups, self.config.optimizer.unet_learning_rate),
            "timestep": float(result.timestep),
            "denoise_steps": float(result.denoise_steps),
        }
        for group, values in group_losses.items():
            logs[f"loss/{group}"] = sum(values) / len(values)
        return logs

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        if self._any_rank(not bool(torch.isfinite(loss.detach()).all())):
            raise NonFiniteLoss(f"the loss became NaN/inf at step {step + 1}; stopping without saving "
                                f"(last good file: {self._last_good_file()}). {NON_FINITE_ADVICE}")


def train(config: RunConfig) -> TrainResult:
    """Run LECO training as configured; returns the files written."""
    return Trainer(config).run()

