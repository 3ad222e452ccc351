"""The shared LightningModule: text-to-image diffusion training, CFG sampling, prompt-following test, predict.

The trained network is always ``self.model`` (a ``Backbone``); the text encoder and the VAE are frozen
submodules that never enter the optimizer, the EMA or the checkpoint (their weights come from their own
pretrained paths or seeds). Batches are ``{"image": (B, 3, H, W) in [-1, 1], "caption": list[str]}`` for
training/validation and ``{"caption", "index", "height", "width"}`` (plus scene attributes for the
prompt-following score) for test/predict.
"""

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel
from torchvision.utils import make_grid, save_image

from lit_dimba.checkpoints import load_backbone_state, load_exact, mismatched_tensors
from lit_dimba.conditioning.encoders import BatchEncoders, FrozenEncoders
from lit_dimba.conditioning.text import TextEncoder
from lit_dimba.conditioning.vae import LatentVAE, PixelSpace
from lit_dimba.diffusion.cuda_graph import CUDAGraphStep
from lit_dimba.diffusion.gaussian import GaussianDiffusion, Noised, Sampler
from lit_dimba.errors import ConfigError, TrainingStopped, describe_names
from lit_dimba.eval.prompt_following import PromptFollowingScore, batch_scenes, scored
from lit_dimba.models.backbone import Backbone
from lit_dimba.strategies import unwrapped_name


@dataclass
class Sampling:
    """How images are generated for test, predict and the sample logger.

    height/width are pixels; None takes the size each batch carries (the data resolution).
    cuda_graph: on a CUDA device, run each denoising step (both CFG branches and their combination) by replaying a
    CUDA graph, captured once per batch shape; with ``compile`` this removes the launch overhead that bounds small
    images. Ignored on other devices.
    """

    sampler: Sampler = "dpm++"
    steps: int = 20
    cfg_scale: float = 4.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    cuda_graph: bool = False


class DiffusionModule(L.LightningModule):
    """Trains ``backbone`` to denoise VAE latents conditioned on text-encoder features.

    Args:
        backbone: the trained network.
        text_encoder: frozen caption encoder; its ``max_length``/``hidden_size`` must match the backbone's
            ``token_num``/``caption_channels``. None (``text_encoder: null``) when training from a feature cache
            (``datamodules.cache``): the T5 is then never loaded, and nothing that encodes prompts (test, predict,
            sample logging) can run.
        vae: frozen latent autoencoder (``LatentVAE``) or ``PixelSpace``; its channels must match the backbone.
        diffusion: schedule, targets and loss.
        caption_dropout: probability of replacing a caption by the null caption in training (for CFG).
        optimizer, lr_scheduler: built on ``self.model``'s parameters only; the scheduler steps every batch.
        sampling: sampler, steps, guidance scale, seed and size for generation.
        init_weights: start ``backbone`` from these weights (a ``.ckpt``, with its EMA average when it has one, or
            an export): a fine-tune with a fresh optimizer and step count, e.g. Dimba's quality tuning. Unlike
            ``--ckpt_path`` nothing else is restored.
        compile: ``torch.compile`` the backbone's blocks (``Backbone.compile_blocks``) for training, validation,
            test and predict. ``auto`` (default): on CUDA devices, not on CPUs (where compiling the tiny CPU models
            costs more than it saves); ``true``: on any device; ``false``: never; or a dict of ``torch.compile``
            options (e.g. ``{dynamic: false}``), on any device. Checked once when the trainer sets the model up:
            where torch.compile cannot run (no C++ compiler on a CPU, no Triton on a GPU, an unsupported torch or
            Python) one warning says why and the model runs eagerly.
        skip_nonfinite: training steps whose loss is NaN or infinite (on any rank) change nothing: their gradients
            are dropped before the optimizer step, so the weights and the optimizer state stay as they were and the
            EMA averages in the unchanged weights (the step still counts in ``global_step``); each is warned about
            and counted (``train/nonfinite_steps``). One more than this many stops the run with one line naming the
            step, the batch's captions and the last checkpoint to resume from. 0 stops at the first.

    Checkpoints hold ``self.model``'s tensors and its constructor arguments (``backbone_config``), never the
    frozen submodules named in ``frozen_prefixes``.
    """

    # Built from the config, not saved as hyperparameters: LightningCLI re-applies a checkpoint's saved
    # hyperparameters over the command line when --ckpt_path is given, so these stay overridable (e.g. sampling
    # for test/predict from a checkpoint).
    not_hyperparameters = ("backbone", "text_encoder", "vae", "diffusion", "sampling", "compile", "skip_nonfinite")
    frozen_prefixes = ("text_encoder.", "vae.")

    def __init__(
        self,
        backbone: Backbone,
        text_encoder: TextEncoder | None,
        vae: LatentVAE | PixelSpace,
        diffusion: GaussianDiffusion | None = None,
        caption_dropout: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        sampling: Sampling = Sampling(),
        init_weights: str | None = None,
        compile: bool | Literal["auto"] | dict = "auto",
        skip_nonfinite: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=list(self.not_hyperparameters))
        if backbone.in_channels != vae.latent_channels:
            raise ConfigError(f"backbone.in_channels={backbone.in_channels} but the VAE gives "
                              f"{vae.latent_channels} latent channels; set backbone.in_channels={vae.latent_channels}")
        if text_encoder is not None and backbone.caption_channels != text_encoder.hidden_size:
            raise ConfigError(f"backbone.caption_channels={backbone.caption_channels} but the text encoder gives "
                              f"{text_encoder.hidden_size}; set backbone.caption_channels={text_encoder.hidden_size}")
        if text_encoder is not None and backbone.token_num != text_encoder.max_length:
            raise ConfigError(f"backbone.token_num={backbone.token_num} but text_encoder.max_length="
                              f"{text_encoder.max_length}; make them equal")
        self.model = backbone
        if init_weights:
            load_exact(self.model, load_backbone_state(init_weights, ema=True), f"init_weights {init_weights!r}")
        self.text_encoder = text_encoder
        self.vae = vae
        self.diffusion = diffusion or GaussianDiffusion()
        self.batch_encoders: BatchEncoders = FrozenEncoders(text_encoder, vae)  # the data source's, from setup
        self.caption_dropout = caption_dropout
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.sampling = sampling
        self.compile_setting = compile  # not self.compile: that is nn.Module.compile
        self._compile_checked = False
        self._sampling_graph = CUDAGraphStep()
        self.skip_nonfinite = skip_nonfinite
        self.nonfinite_steps = 0
        self._skip_update = False  # the coming optimizer step is of a non-finite loss
        self.training_generator: torch.Generator | None = None  # created in on_fit_start
        self._resumed_generator_state: torch.Tensor | None = None
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_weights)
        self._test_images: list[torch.Tensor] = []
        self._test_captions: list[str] = []
        self.test_score = PromptFollowingScore()

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        resolution = getattr(datamodule, "resolution", None)
        if resolution is not None:
            self.check_resolution(resolution, "data.resolution")
        if getattr(datamodule, "buckets", None):
            self.check_resolution(datamodule.bucket_multiple, "data.bucket_multiple")
        if stage in ("test", "predict"):
            self.require_text_encoder(f"{stage} generates images from prompts")
        source = getattr(datamodule, "source", None)
        if source is not None:  # the source knows its batches: images and captions, or cached features
            self.batch_encoders = source.encoders(self)

    def configure_model(self) -> None:
        """Compile the trained backbone's blocks (and the teacher's, for distillation) once, if ``compile`` asks and
        torch.compile works on this trainer's device."""
        if self._compile_checked:
            return
        self._compile_checked = True
        device = self.trainer.strategy.root_device
        options = compile_options(self.compile_setting, device)
        if options is None:
            return
        problem = compile_problem(device, options)
        if problem:
            rank_zero_warn(f"model.compile is {self.compile_setting!r}, but torch.compile cannot run on {device} "
                           f"here ({problem}); the model runs in eager mode")
            return
        for backbone in self.backbones():
            backbone.compile_blocks(**options)

    def backbones(self) -> list[Backbone]:
        """Every backbone this module runs: ``model`` (the trained one), then any frozen one (a distillation's
        teacher). ``compile`` compiles them all and ``callbacks.PEInterpolation`` gives them all its PE base."""
        return [self.model]

    def require_text_encoder(self, why: str) -> None:
        """Raise a ConfigError explaining ``why`` a text encoder is needed when the model has none."""
        if self.text_encoder is None:
            raise ConfigError(f"model.text_encoder is null but {why}; set model.init_args.text_encoder (e.g. the T5 "
                              "the feature cache was built with)")

    @property
    def token_stride(self) -> int:
        """Pixels per token side: the VAE's downsampling factor times the patch size."""
        return self.vae.downsample_factor * self.model.patch_size

    def check_resolution(self, resolution: int | tuple[int, int], field: str) -> None:
        """Raise a ConfigError unless the pixel resolution maps to whole latent patches."""
        step = self.token_stride
        sizes = resolution if isinstance(resolution, (tuple, list)) else (resolution, resolution)
        if any(int(s) % step for s in sizes):
            raise ConfigError(f"{field}={resolution} is not divisible by {step} (VAE factor "
                              f"{self.vae.downsample_factor} x patch {self.model.patch_size}); use a multiple of {step}")

    def parameter_groups(self) -> list[dict]:
        """``self.model``'s trainable parameters; those marked ``_no_weight_decay`` (Mamba's dt_bias, A_log, D,
        as in mamba-ssm) in a group with weight_decay 0."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameter_groups())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP clip by the norm over all shards (the root's ``clip_grad_norm_``); otherwise Lightning's."""
        root = self.trainer.strategy.model
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel) and gradient_clip_algorithm != "value":
            root.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------------------- random streams
    def on_fit_start(self) -> None:
        """Create ``training_generator``: the source of every random draw of a training step (timesteps, noise,
        caption dropout, posterior samples), one per rank, seeded by the run's seed and the rank, or continued from
        the checkpoint a run resumes (so the steps after a resume draw what the uninterrupted run drew)."""
        seed = torch.initial_seed() + 1_000_003 * self.global_rank  # seed_everything's seed; ranks draw apart
        self.training_generator = torch.Generator(self.device).manual_seed(seed % 2**63)
        if self._resumed_generator_state is not None:
            self.training_generator.set_state(self._resumed_generator_state)
            self._resumed_generator_state = None

    def _gathered_generator_states(self) -> torch.Tensor:
        """(world_size, n) uint8: every rank's ``training_generator`` state (a collective)."""
        state = self.training_generator.get_state()
        gathered = self.all_gather(state.to(self.device)) if self.trainer.world_size > 1 else state[None]
        return gathered.reshape(self.trainer.world_size, -1).cpu()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["backbone_config"] = self.model.config
        if self.training_generator is not None:
            checkpoint["training_generators"] = self._gathered_generator_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Take this rank's training generator state to continue from (``on_fit_start``), and refuse a checkpoint of
        another architecture with the list of tensors that differ. (Under FSDP the strategy has already loaded the
        weights, strictly, and removed them from ``checkpoint``.)"""
        states = checkpoint.get("training_generators")
        if states is not None:
            if len(states) == self.trainer.world_size:
                self._resumed_generator_state = states[self.global_rank].clone()
            else:
                rank_zero_warn(f"the checkpoint's training random streams are of {len(states)} rank(s), this run has "
                               f"{self.trainer.world_size}: the draws of the following steps start from fresh seeds")
        if "state_dict" not in checkpoint:
            return
        differ = mismatched_tensors(self, checkpoint["state_dict"])
        if differ:
            theirs = checkpoint.get("backbone_config")
            hint = (f"the checkpoint's backbone has layout {theirs['layout']!r}, depth {theirs['depth']}, "
                    f"hidden_size {theirs['hidden_size']}; " if theirs else "")
            raise ConfigError(f"the checkpoint does not fit this model ({len(differ)} tensors differ: "
                              f"{describe_names(differ)}); {hint}build the model with the config the checkpoint "
                              "was trained with")

    # -------------------------------------------------------------------------------------------- training
    def batch_losses(self, batch: dict, drop_prob: float, generator: torch.Generator | None = None
                     ) -> dict[str, torch.Tensor]:
        """The scalar losses of a training or validation batch, the one path from batch to loss: ``batch_encoders``
        gives latents x0 (B, C, h, w) and text features, ``diffusion.noise`` noises x0 at random timesteps, a
        ``drop_prob`` share of the captions (and every empty one) is replaced by the null caption, and ``loss``
        computes the objective. Every random draw (posterior sample, timesteps, noise, caption drops, in that order)
        comes from ``generator``."""
        x0, y, mask = self.batch_encoders(batch, generator)
        noised = self.diffusion.noise(x0, generator)
        drop = torch.rand(x0.shape[0], device=x0.device, generator=generator) < drop_prob
        empty = torch.tensor([not caption for caption in batch["caption"]], device=x0.device)
        return self.loss(noised, y, mask, drop | empty)

    def loss(self, noised: Noised, y: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """The objective, the hook a subclass overrides (distillation): scalar losses whose ``loss`` is optimised and
        all of which are logged. Here the diffusion loss of ``self.model`` (``mse``, and ``vb`` with a learned sigma)
        averaged over the batch.

        noised: x0, noise, t and x_t (``GaussianDiffusion.noise``); y (B, L, D) text features, mask (B, L) bool;
        drop (B,) bool: samples trained with the null caption.
        """
        output = self.model(noised.x_t, noised.t, y, mask, drop)
        return {name: value.mean() for name, value in self.diffusion.training_losses(output, noised).items()}

    def log_skipped(self, batch: dict) -> None:
        """Count the bad records the data source passed over (TensorBoard ``data/skipped_step`` per step and
        ``data/skipped_epoch`` summed per epoch)."""
        if "skipped" in batch:
            skipped = batch["skipped"].sum().float()
            self.log("data/skipped", skipped, on_step=True, on_epoch=True, reduce_fx="sum",
                     batch_size=len(batch["caption"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.batch_losses(batch, self.caption_dropout, self.training_generator)
        self.log_skipped(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(batch["caption"]), prog_bar=name == "loss")
        return self.finite_or_skip(losses["loss"], batch)

    def finite_or_skip(self, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Check ``loss`` for NaN and infinity on every rank (one flag reduced over the ranks, so all ranks agree; the
        one host sync per step this adds). A non-finite step still runs its backward (under DDP every rank must take
        part in the gradient all-reduce), but ``on_before_optimizer_step`` then drops the gradients, so the optimizer
        changes neither the weights nor its state, and nothing non-finite reaches the EMA. Counted and warned about;
        one more than ``skip_nonfinite`` such steps stops the run (``TrainingStopped``)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if not bad.item():
            return loss
        self._skip_update = True
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False,
                 batch_size=len(batch["caption"]))
        captions = describe_names([repr(c) for c in batch["caption"]], limit=3)
        what = (f"step {self.global_step + 1}: the loss is {loss.item()} on this rank (batch of "
                f"{len(batch['caption'])}: {captions})")
        if self.nonfinite_steps > self.skip_nonfinite:
            saved = [getattr(cb, "_last_checkpoint_saved", "") or cb.last_model_path
                     for cb in self.trainer.checkpoint_callbacks]
            resume = (f"the last checkpoint is {saved[-1]!r} (resume with --ckpt_path {saved[-1]} after lowering the "
                      "learning rate or fixing the data)" if any(saved) else "no checkpoint was saved yet")
            raise TrainingStopped(f"{what}; {self.nonfinite_steps} non-finite losses, more than "
                                  f"model.skip_nonfinite={self.skip_nonfinite}: training stopped; {resume}")
        rank_zero_warn(f"{what}: its update is skipped ({self.nonfinite_steps} of at most {self.skip_nonfinite})")
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Drop the gradients of a step whose loss was not finite (``finite_or_skip``): the optimizer skips
        parameters without a gradient, so neither they nor its state change."""
        if self._skip_update:
            optimizer.zero_grad(set_to_none=True)
            self._skip_update = False

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        losses = self.batch_losses(batch, 0.0, generator)
        for name, value in losses.items():
            self.log(f"val/{name}", value, batch_size=len(batch["caption"]), sync_dist=True)

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, captions: list[str], height: int, width: int, seeds: list[int] | None = None,
                 sampling: Sampling | None = None) -> torch.Tensor:
        """Sample images for ``captions`` with classifier-free guidance.

        Each image's initial noise comes from its own seed (default ``sampling.seed + i``), so an image does
        not depend on the batch it is generated in. Returns (B, 3, height, width) in [-1, 1].
        """
        sampling = sampling or self.sampling
        self.require_text_encoder("sampling encodes the prompts")
        self.check_resolution((height, width), "height/width")
        f = self.vae.downsample_factor
        shape = (self.model.in_channels, height // f, width // f)
        seeds = seeds if seeds is not None else [sampling.seed + i for i in range(len(captions))]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        y, mask = self.text_encoder(list(captions))
        C = self.model.in_channels
        guided = sampling.cfg_scale != 1.0

        def guided_step(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.model(x_t, t, y, mask)[:, :C]
            B = x_t.shape[0]
            drop = torch.arange(2 * B, device=x_t.device) >= B
            out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y]), torch.cat([mask, mask]), drop)
            cond, uncond = out[:, :C].chunk(2)
            return uncond + sampling.cfg_scale * (cond - uncond)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if sampling.cuda_graph and x_t.is_cuda:
                return self._sampling_graph(guided_step, (x_t, t, y, mask), key=sampling.cfg_scale)
            return guided_step(x_t, t, y, mask)

        # the backbone's derived weights computed once for all steps (``Backbone.frozen``), unless FSDP shards it
        sharded = any(isinstance(module, FullyShardedDataParallel) for module in self.model.modules())
        with contextlib.nullcontext() if sharded else self.model.frozen():
            latents = self.diffusion.sample(denoise, noise.to(self.device), sampling.sampler, sampling.steps)
        return self.vae.decode(latents).clamp(-1, 1)

    def generate_batch(self, batch: dict) -> torch.Tensor:
        """Images for a test/predict batch, at ``sampling.height/width`` or the size the batch carries."""
        height = self.sampling.height or int(batch["height"][0])
        width = self.sampling.width or int(batch["width"][0])
        seeds = [self.sampling.seed + int(i) for i in batch["index"]]
        return self.generate(batch["caption"], height, width, seeds)

    # ------------------------------------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self.test_score.reset()
        self._test_images, self._test_captions = [], []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        keep = scored(batch)  # this rank's share of the prompts, without the padding (``PromptShare``)
        images = self.generate_batch(batch)[torch.tensor(keep)]
        self._test_images.append(images.cpu())
        self._test_captions.extend(caption for caption, kept in zip(batch["caption"], keep) if kept)
        scenes = batch_scenes(batch)
        if scenes is not None:
            self.test_score.update(images, [scene for scene, kept in zip(scenes, keep) if kept])

    def on_test_epoch_end(self) -> None:
        # compute() sums the counts of every rank (a collective); every rank has prompts of the same kind, so
        # either all ranks judged some or none did
        scored = self.test_score.compute() if self.test_score.update_called else {}
        scores = {key: value.item() for key, value in scored.items()}
        for key, value in scores.items():
            self.log(f"test/{key}", value, rank_zero_only=True)
        out_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: on every rank
        if self.trainer.is_global_zero:
            self._write_test_outputs(scores, out_dir)

    def _write_test_outputs(self, scores: dict[str, float], out_dir: str) -> None:
        """Save this rank's test grid (PNG + TensorBoard) and the scores (JSON) in ``out_dir``."""
        os.makedirs(out_dir, exist_ok=True)
        images = torch.cat(self._test_images) if self._test_images else torch.zeros(0, 3, 8, 8)
        grid = make_grid((images + 1) / 2, nrow=8, padding=2, pad_value=1.0)
        grid_path = os.path.join(out_dir, "test_grid.png")
        save_image(grid, grid_path)
        with open(os.path.join(out_dir, "test_scores.json"), "w") as f:
            json.dump({"scores": scores, "num_images": len(images), "captions": self._test_captions}, f, indent=1)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("test/grid", grid, self.global_step)
        width = max(map(len, scores), default=0)
        table = "".join(f"\n  {key:<{width}}  {value:.3f}" for key, value in scores.items())
        rank_zero_info(f"prompt-following ({len(images)} prompts):{table or ' no scene attributes or tasks'}\n"
                       f"wrote {grid_path} and test_scores.json")

    # --------------------------------------------------------------------------------------------- predict
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Images of this rank's share of the prompts, without the padding (``PromptShare``): ``{"images": (B, 3, H,
        W), "caption": [B], "index": (B,)}``."""
        keep = scored(batch)
        mask = torch.tensor(keep)
        return {"images": self.generate_batch(batch)[mask],
                "caption": [caption for caption, kept in zip(batch["caption"], keep) if kept],
                "index": batch["index"][mask]}


def compile_options(setting: bool | str | dict, device: torch.device) -> dict | None:
    """``torch.compile`` options for the ``compile`` setting on ``device``, or None for eager mode."""
    if setting == "auto":
        return {} if device.type == "cuda" else None
    if setting is True:
        return {}
    return dict(setting) if setting else None


def compile_problem(device: torch.device, options: dict) -> str | None:
    """Why ``torch.compile(**options)`` cannot run on ``device``, in one line, or None when it can: compiles and runs
    a tiny function there (the compiler's failures, from a missing C++ compiler to an old Triton, show only then)."""
    try:
        torch.compile(lambda v: torch.sin(v) * 2 + 1, **options)(torch.ones(8, device=device))
    except Exception as error:  # noqa: BLE001 - any failure means eager mode; the message says which
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
    return None


def _drop_frozen_weights(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: frozen submodules are rebuilt from their own config, never checkpointed."""
    for key in [k for k in state_dict if k[len(prefix):].startswith(module.frozen_prefixes)]:
        del state_dict[key]


def _allow_missing_frozen_weights(module, incompatible_keys):
    """load_state_dict post-hook: a checkpoint without frozen submodules' weights still loads strictly (also inside
    FSDP's wrappers)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not unwrapped_name(k).startswith(module.frozen_prefixes)]
