"""LightningModules: the diffusion model (any backbone layout: the DiT teacher, a hybrid trained from scratch) and
the distillation wrapper."""

from lit_dimba.modules.diffusion import DiffusionModule, Sampling
from lit_dimba.modules.distill import DistillModule

# The class names that checkpoints written before issue 15 carry (``hyper_parameters["_class_path"]``, which
# LightningCLI imports when it loads them): both were a DiffusionModule that only checked its backbone's layout.
TeacherDiT = HybridStudent = DiffusionModule

__all__ = ["DiffusionModule", "DistillModule", "HybridStudent", "Sampling", "TeacherDiT"]
