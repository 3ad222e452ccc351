"""What the benchmark scripts share: the backbones by name, T2MD's ablation rows, the stand-in VAE and the markdown
tables they print."""

import os

import yaml

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
BACKBONES = os.path.join(CONFIGS, "backbones")


def backbone_file(name: str) -> str:
    """The config file of a backbone named as in the tables: "dit-xl/2" -> configs/backbones/dit_xl2.yaml, "t2md",
    "dimba-l/2", "mamba-xl/2"."""
    return os.path.join(BACKBONES, name.replace("/", "").replace("-", "_") + ".yaml")


def backbone_arguments(name: str) -> dict:
    """The ``Backbone`` arguments (``init_args``) of ``backbone_file(name)``."""
    with open(backbone_file(name)) as f:
        return yaml.safe_load(f)["init_args"]


# T2MD's ablation rows (its Table 4): name -> (title, its files under configs/distill/ablations/, whether it has a
# teacher-forcing stage first). The full recipe is configs/distill/demo.yaml as it is.
ABLATION_ROWS = {
    "scratch": ("hybrid from scratch", ("scratch",), False),
    "weight_copy": ("+ weight copy", ("weight_copy",), False),
    "teacher_eps": ("+ teacher prediction", ("teacher_eps",), False),
    "mixer_features": ("+ mixer features", ("mixer_features",), False),
    "full": ("+ teacher forcing (full recipe)", (), True),
    "unidirectional": ("full recipe, one-direction scan", ("unidirectional",), True),
    "no_attention": ("full recipe, no self-attention", ("no_attention",), True),
}


def ablation_files(names: tuple[str, ...]) -> list[str]:
    """The paths of a row's files (``ABLATION_ROWS``) under configs/distill/ablations/."""
    return [os.path.join(CONFIGS, "distill", "ablations", f"{name}.yaml") for name in names]


# An f8 AutoencoderKL with a handful of channels: latents of the right shape at almost no cost.
TINY_F8_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
               "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
               "block_out_channels": [8, 8, 16, 16], "sample_size": 64, "scaling_factor": 0.18215}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
