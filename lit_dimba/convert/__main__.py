"""Convert PixArt-alpha or Dimba weights into a lit-dimba export folder: ``python -m lit_dimba.convert SOURCE OUT``.

SOURCE is an original ``PixArt-XL-2-*.pth``, a diffusers ``PixArtTransformer2DModel`` (or pipeline) folder, or
the released Dimba's ``dimba-l-512.pt``. OUT gets ``model.safetensors`` and ``backbone.yaml`` (paste it under
``model.init_args.backbone`` or ``model.init_args.teacher``); the folder then serves as ``init_weights`` or
``teacher_checkpoint``.
"""

import argparse
import os
import sys

import torch

from lit_dimba.checkpoints import mismatched_tensors, write_export
from lit_dimba.convert import convert_released
from lit_dimba.errors import ConfigError, describe_names
from lit_dimba.models.backbone import Backbone


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_dimba.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="PixArt-XL-2-*.pth, a diffusers PixArtTransformer2DModel / pipeline folder, "
                                           "or Dimba's dimba-l-512.pt")
    parser.add_argument("out", help="output folder for model.safetensors and backbone.yaml")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads (original format only; default: PixArt width / 72, Dimba 16)")
    parser.add_argument("--base_size", type=int, default=None,
                        help="positional-embedding grid (original format only; default PixArt 32, or 64 for -MS "
                             "weights; Dimba: the side of its stored pos_embed)")
    parser.add_argument("--pe_interpolation", type=float, default=None,
                        help="positional-embedding scale (original format only; default PixArt 1, or 2 for -MS "
                             "weights; Dimba base_size / 32)")
    options = parser.parse_args(args)
    try:
        state, config, source_format = convert_released(
            options.source, num_heads=options.num_heads, base_size=options.base_size,
            pe_interpolation=options.pe_interpolation)
        with torch.device("meta"):  # check every tensor finds its place, without allocating the network
            backbone = Backbone.from_config(config)
        differ = mismatched_tensors(backbone, state)
        if differ:
            raise ConfigError(f"{options.source!r} converts to tensors that do not fit a {source_format} backbone "
                              f"({len(differ)} differ: {describe_names(differ)})")
        written = write_export(state, config, options.out,
                               {"source": os.path.abspath(options.source), "format": source_format})
    except ConfigError as error:
        sys.exit(f"error: {error}")
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
