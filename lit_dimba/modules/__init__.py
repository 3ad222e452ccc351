"""LightningModules: the shared diffusion base and the teacher DiT."""

from lit_dimba.modules.diffusion import DiffusionModule, Sampling
from lit_dimba.modules.teacher import TeacherDiT

__all__ = ["DiffusionModule", "Sampling", "TeacherDiT"]
