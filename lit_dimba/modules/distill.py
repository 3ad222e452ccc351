"""T2MD distillation (arXiv 2506.18999): a frozen DiT teacher trains a Transformer-Mamba student.

The student has the teacher's depth and block order; some of its blocks replace self-attention by a 2-D Mamba-2
scan (``mamba_h``/``mamba_w``). Everything else is copied from the teacher by name. Two stages, one run each:

- ``forcing`` (layer-level teacher forcing): one teacher forward gives every block's mixer input and output;
  each student Mamba mixer gets the teacher's input at its block and regresses the teacher attention's output.
  All mixers train in parallel on ``sum_i MSE_i``, each ``MSE_i`` logged as ``train/forcing/block<i>``.
- ``kd`` (feature distillation): the student runs on its own activations and minimises
  ``L = L_diffusion + lambda_eps * MSE(pred_student, pred_teacher) + lambda_features * mean_n MSE(mixer_out_student[n],
  mixer_out_teacher[n])``, n over the student's Mamba blocks. ``L_diffusion`` is the usual denoising loss (the
  paper's ``L_mse``; plus the VLB term for a learned variance), the prediction is the first ``in_channels``
  output channels (epsilon or v, as the diffusion is set up).

Stage 1 -> stage 2 is a new run with ``init_student`` pointing at the stage-1 checkpoint (the student only, a
fresh optimizer); ``--ckpt_path`` resumes a run of either stage.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from lit_dimba.checkpoints import copy_matching, load_backbone_state, load_exact
from lit_dimba.conditioning.text import TextEncoder
from lit_dimba.conditioning.vae import LatentVAE, PixelSpace
from lit_dimba.diffusion.gaussian import GaussianDiffusion, Noised
from lit_dimba.errors import ConfigError
from lit_dimba.models.backbone import Backbone, Block
from lit_dimba.models.mamba import Scan2D
from lit_dimba.modules.diffusion import DiffusionModule, Sampling


class DistillModule(DiffusionModule):
    """Distils ``teacher`` (frozen, all self-attention) into ``student`` (``self.model``).

    Args:
        student: the hybrid backbone trained here; same depth, width, patch and text size as the teacher, with
            ``mamba_h``/``mamba_w`` blocks where the teacher has attention (no ``after_each_block``).
        teacher: the teacher's architecture (layout ``dit``).
        teacher_checkpoint: the teacher's weights: a ``.ckpt`` of ``DiffusionModule``, or an export folder /
            ``.safetensors`` file (``python -m lit_dimba.export``). Only this path is saved with the student. None
            only where nothing uses the teacher (stage ``kd``, ``copy_weights`` False, both lambdas 0: the
            from-scratch ablation).
        teacher_ema: take the teacher's EMA weights from a ``.ckpt`` (when it has them).
        stage: ``forcing`` or ``kd`` (see the module docstring).
        copy_weights: start the student from the teacher's tensors wherever names and shapes match (all but the
            Mamba mixers); False trains the student from its random init (the "from scratch" ablation).
        init_student: a checkpoint (``.ckpt`` of this module or of ``DiffusionModule``, or an export) whose trained
            student weights replace the initial ones, e.g. stage 1's result for stage 2.
        lambda_eps, lambda_features: weights of the teacher-prediction and mixer-feature terms of ``kd``; with
            both 0 the teacher is not run in ``kd``.
        trainable: what ``kd`` trains: ``mixers`` (every block's token mixer: the Mamba mixers and the kept
            self-attention), ``mamba`` (the Mamba mixers) or ``all``. ``forcing`` always trains the Mamba mixers.
        Other arguments: as ``DiffusionModule`` (text encoder, VAE, diffusion, caption dropout, optimizer, LR
            scheduler, sampling for test/predict of the student, compile: the student's and the teacher's blocks,
            skip_nonfinite).
    """

    not_hyperparameters = DiffusionModule.not_hyperparameters + (
        "student", "teacher", "stage", "init_student", "lambda_eps", "lambda_features", "trainable")
    frozen_prefixes = DiffusionModule.frozen_prefixes + ("teacher.",)

    def __init__(
        self,
        student: Backbone,
        teacher: Backbone,
        teacher_checkpoint: str | None,
        text_encoder: TextEncoder | None,
        vae: LatentVAE | PixelSpace,
        diffusion: GaussianDiffusion | None = None,
        stage: Literal["forcing", "kd"] = "kd",
        teacher_ema: bool = True,
        copy_weights: bool = True,
        init_student: str | None = None,
        lambda_eps: float = 0.5,
        lambda_features: float = 0.2,
        trainable: Literal["mixers", "mamba", "all"] = "mixers",
        caption_dropout: float = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        sampling: Sampling = Sampling(),
        compile: bool | Literal["auto"] | dict = "auto",
        skip_nonfinite: int = 10,
    ):
        super().__init__(student, text_encoder, vae, diffusion, caption_dropout, optimizer, lr_scheduler, sampling,
                         compile=compile, skip_nonfinite=skip_nonfinite)
        check_pair(teacher, student)
        self.scan_blocks = [i for i, block in enumerate(student.blocks) if has_scan_mixer(block)]
        if stage == "forcing" and not self.scan_blocks:
            raise ConfigError("stage 'forcing' trains the student's Mamba mixers, but its layout has none; add "
                              "'mamba_h'/'mamba_w' blocks to student.layout or use stage 'kd'")
        self.stage = stage
        self.lambda_eps = lambda_eps
        self.lambda_features = lambda_features
        self.teacher_checkpoint = teacher_checkpoint

        if teacher_checkpoint is not None:
            load_exact(teacher, load_backbone_state(teacher_checkpoint, teacher_ema),
                       f"teacher_checkpoint {teacher_checkpoint!r}")
        elif stage == "forcing" or copy_weights or lambda_eps or lambda_features:
            raise ConfigError("model.init_args.teacher_checkpoint is null, but the teacher is used (by stage "
                              "'forcing', copy_weights, lambda_eps or lambda_features); set it to the teacher's .ckpt "
                              "or export folder, or train from scratch (stage kd, copy_weights false, both lambdas 0)")
        self.teacher = teacher.requires_grad_(False).eval()
        if copy_weights:
            kept = copy_matching(self.model, self.teacher.state_dict())
            blocks = sorted({int(name.split(".")[1]) for name in kept})
            rank_zero_info(f"student: copied {len(self.model.state_dict()) - len(kept)} tensors from the teacher; "
                           f"the {len(kept)} tensors of the Mamba mixers of blocks {blocks} keep their initialisation")
        if init_student:
            load_exact(self.model, load_backbone_state(init_student, ema=False), f"init_student {init_student!r}")
        self.set_trainable("mamba" if stage == "forcing" else trainable)

    def set_trainable(self, which: Literal["mixers", "mamba", "all"]) -> None:
        """Freeze the student's parameters except ``which`` (see the class docstring): the token mixers of its
        blocks (``mixers``), only those that are Mamba scans (``mamba``), or everything (``all``)."""
        if which not in ("mixers", "mamba", "all"):
            raise ConfigError(f"trainable={which!r}; choose 'mixers', 'mamba' or 'all'")
        self.model.requires_grad_(which == "all")
        for block in self.model.blocks:
            if which == "mixers" and isinstance(block, Block) or which == "mamba" and has_scan_mixer(block):
                block.mixer.requires_grad_(True)

    def backbones(self) -> list[Backbone]:
        return [self.model, self.teacher]

    def train(self, mode: bool = True) -> "DistillModule":
        """Lightning switches the whole module to train mode each epoch; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher"] = {"checkpoint": self.teacher_checkpoint, "config": self.teacher.config}

    # ------------------------------------------------------------------------------------------------ losses
    def loss(self, noised: Noised, y: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """The current stage's scalar losses (``forcing_losses`` or ``kd_losses``); arguments as
        ``DiffusionModule.loss``."""
        if self.stage == "forcing":
            return self.forcing_losses(noised.x_t, noised.t, y, mask, drop)
        return self.kd_losses(noised, y, mask, drop)

    def forcing_losses(self, x_t, t, y, mask, drop) -> dict[str, torch.Tensor]:
        """Stage 1: each student Mamba mixer on the teacher's mixer input vs the teacher attention's output.

        Returns scalar losses ``forcing/block<i>`` per Mamba block and their sum ``loss``.
        """
        with torch.no_grad():
            _, teacher_io = self.teacher(x_t, t, y, mask, drop, return_mixer_io=True)
        grid = self.model.grid_size(x_t.shape[-2], x_t.shape[-1])
        losses = {}
        for i in self.scan_blocks:
            mixer_in, mixer_out = teacher_io[i]
            prediction = self.model.blocks[i](mixer_in, None, None, None, grid, mixer_only=True)
            losses[f"forcing/block{i:02d}"] = F.mse_loss(prediction.float(), mixer_out.float())
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def kd_losses(self, noised: Noised, y, mask, drop) -> dict[str, torch.Tensor]:
        """Stage 2: the diffusion loss plus the weighted teacher-prediction and mixer-feature terms.

        Returns scalars ``diffusion`` (with its parts ``mse`` and, for a learned variance, ``vb``),
        ``teacher_eps``, ``mixer_features`` (when their weight is not 0) and the total ``loss``.
        """
        x_t, t = noised.x_t, noised.t
        output, student_io = self.model(x_t, t, y, mask, drop, return_mixer_io=True)
        losses = {k: v.mean() for k, v in self.diffusion.training_losses(output, noised).items()}
        losses["diffusion"] = losses.pop("loss")
        total = losses["diffusion"]
        if self.lambda_eps or self.lambda_features:
            with torch.no_grad():
                teacher_output, teacher_io = self.teacher(x_t, t, y, mask, drop, return_mixer_io=True)
            C = self.model.in_channels
            losses["teacher_eps"] = F.mse_loss(output[:, :C].float(), teacher_output[:, :C].float())
            total = total + self.lambda_eps * losses["teacher_eps"]
            if self.scan_blocks:
                losses["mixer_features"] = torch.stack([
                    F.mse_loss(student_io[i][1].float(), teacher_io[i][1].float()) for i in self.scan_blocks
                ]).mean()
                total = total + self.lambda_features * losses["mixer_features"]
        losses["loss"] = total
        return losses


def has_scan_mixer(block: nn.Module) -> bool:
    """True for a PixArt block whose token mixer is a Mamba scan (``mamba_h``/``mamba_w``)."""
    return isinstance(block, Block) and isinstance(block.mixer, Scan2D)


def check_pair(teacher: Backbone, student: Backbone) -> None:
    """Refuse a teacher/student pair that layer-level distillation cannot match block by block."""
    if any(mixer != "attn" for mixer in teacher.mixers) or teacher.after_each_block:
        raise ConfigError(f"the teacher must be all self-attention (layout 'dit', no after_each_block); got layout "
                          f"{teacher.layout!r} and after_each_block {teacher.after_each_block}")
    if student.after_each_block:
        raise ConfigError(f"the student has after_each_block {student.after_each_block} (Dimba layout), which no "
                          "teacher block matches; use a layout of 'attn'/'mamba_h'/'mamba_w' blocks (e.g. 't2md')")
    if student.depth != teacher.depth:
        raise ConfigError(f"the student has {student.depth} blocks but the teacher {teacher.depth}; "
                          "distillation replaces the teacher's blocks one for one, so give the student its depth")
