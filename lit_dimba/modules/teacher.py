"""The teacher: a pure-Transformer DiT (PixArt-alpha architecture) trained as a text-to-image diffusion model."""

from lit_dimba.errors import ConfigError
from lit_dimba.modules.diffusion import DiffusionModule


class TeacherDiT(DiffusionModule):
    """``DiffusionModule`` whose backbone is all self-attention (the distillation teacher).

    Takes the same arguments as ``DiffusionModule``; a backbone layout with any other mixer is refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        others = sorted({kind for kind in self.model.layout if kind != "attn"})
        if others:
            raise ConfigError(f"TeacherDiT needs an all-attention backbone (layout 'dit'); got mixers {others}")
