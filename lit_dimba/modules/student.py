"""The hybrid student: a Transformer-Mamba backbone (Dimba or T2MD layout) trained as a text-to-image model."""

from lit_dimba.errors import ConfigError
from lit_dimba.modules.diffusion import DiffusionModule


class HybridStudent(DiffusionModule):
    """``DiffusionModule`` whose backbone has at least one Mamba mixer (trained from scratch here; the
    distillation wrapper trains it from a teacher). Takes the same arguments as ``DiffusionModule``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if all(kind == "attn" for kind in self.model.layout):
            raise ConfigError("HybridStudent needs a backbone with Mamba mixers (layout 'dimba', 't2md', 'mamba' "
                              "or a list with 'mamba_h'/'mamba_w'/'mamba_layer'); use TeacherDiT for layout 'dit'")
