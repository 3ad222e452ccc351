"""LightningModules: the shared diffusion base, the teacher DiT, the hybrid student and the distillation wrapper."""

from lit_dimba.modules.diffusion import DiffusionModule, Sampling
from lit_dimba.modules.distill import DistillModule
from lit_dimba.modules.student import HybridStudent
from lit_dimba.modules.teacher import TeacherDiT

__all__ = ["DiffusionModule", "DistillModule", "HybridStudent", "Sampling", "TeacherDiT"]
