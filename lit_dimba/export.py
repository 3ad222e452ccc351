"""Export a trained backbone from a checkpoint: ``python -m lit_dimba.export RUN.ckpt OUT_DIR [--trained]
[--diffusers DIR [--sample_size N]]``.

Writes ``OUT_DIR/model.safetensors`` + ``OUT_DIR/backbone.yaml`` (plain weights and the architecture) and
``OUT_DIR/student.ckpt`` (for ``main.py test|predict --ckpt_path`` with a config whose model has that backbone).
Works for checkpoints of every module; for ``DistillModule`` it exports the student (the teacher is not saved).
``--diffusers DIR`` also writes an all-attention (DiT) backbone as a diffusers ``PixArtTransformer2DModel`` folder,
null caption included, for ``PixArtAlphaPipeline``.
"""

import argparse
import sys

from lit_dimba.checkpoints import export_backbone
from lit_dimba.errors import ConfigError


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_dimba.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by `main.py fit`")
    parser.add_argument("out_dir", help="folder to write model.safetensors, backbone.yaml and student.ckpt into")
    parser.add_argument("--trained", action="store_true",
                        help="export the trained weights (model.safetensors, --diffusers) instead of the EMA average")
    parser.add_argument("--diffusers", metavar="DIR", default=None,
                        help="also write the backbone (an all-attention DiT teacher) as a diffusers "
                             "PixArtTransformer2DModel folder with PixArt's null caption "
                             "(caption_projection.y_embedding), loadable by PixArtTransformer2DModel.from_pretrained "
                             "for PixArtAlphaPipeline; the same weights as model.safetensors")
    parser.add_argument("--sample_size", type=int, default=None, metavar="N",
                        help="with --diffusers, for a backbone with base_size null (trained here): the latent side "
                             "it was trained at (64 for 512^2 on SD-VAE latents), where diffusers' positional "
                             "embedding equals ours")
    options = parser.parse_args(args)
    try:
        written = export_backbone(options.checkpoint, options.out_dir, ema=not options.trained,
                                  diffusers_dir=options.diffusers, sample_size=options.sample_size)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
