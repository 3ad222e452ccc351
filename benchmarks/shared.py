"""What the benchmark scripts share: the stand-in VAE and the markdown tables they print."""

# An f8 AutoencoderKL with a handful of channels: latents of the right shape at almost no cost.
TINY_F8_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
               "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
               "block_out_channels": [8, 8, 16, 16], "sample_size": 64, "scaling_factor": 0.18215}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
