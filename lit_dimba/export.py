"""Export a trained backbone from a checkpoint: ``python -m lit_dimba.export RUN.ckpt OUT_DIR [--trained]``.

Writes ``OUT_DIR/model.safetensors`` + ``OUT_DIR/backbone.yaml`` (plain weights and the architecture) and
``OUT_DIR/student.ckpt`` (for ``main.py test|predict --ckpt_path`` with a config whose model has that backbone).
Works for checkpoints of every module; for ``DistillModule`` it exports the student (the teacher is not saved).
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
                        help="export the trained weights to model.safetensors instead of the EMA average")
    options = parser.parse_args(args)
    try:
        written = export_backbone(options.checkpoint, options.out_dir, ema=not options.trained)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
