"""LightningModules: the shared diffusion base, the teacher DiT and the hybrid student."""

from lit_dimba.modules.diffusion import DiffusionModule, Sampling
from lit_dimba.modules.student import HybridStudent
from lit_dimba.modules.teacher import TeacherDiT

__all__ = ["DiffusionModule", "HybridStudent", "Sampling", "TeacherDiT"]
