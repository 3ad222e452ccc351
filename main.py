"""lit-dimba command line (LightningCLI): ``python main.py {fit,validate,test,predict} --config configs/....yaml``.

Models and data are chosen by ``class_path`` in YAML (subclass mode); callbacks and the logger are listed under
``trainer``. ``fit`` saves the full resolved config next to the logs, and ``--ckpt_path`` resumes or evaluates.
"""

import os
import re
import sys

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import CaptionImageDataModule
from lit_dimba.conditioning.frozen import looks_local
from lit_dimba.errors import ConfigError
from lit_dimba.modules import DiffusionModule

SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
# Options that name files or folders, and what belongs there. ``pretrained`` may also be a hub id.
PATH_OPTIONS = {
    "pretrained": "a Hugging Face model folder (config.json + weights; a hub id works when it is cached)",
    "init_weights": "backbone weights: a .ckpt of ours, an export folder, or PixArt-alpha weights (.pth or diffusers folder)",
    "teacher_checkpoint": "the teacher's weights: a .ckpt of ours, an export folder, or PixArt-alpha weights",
    "init_student": "a .ckpt of the previous distillation stage or an export folder",
    "root": "the image folder",
    "data_dir": "the data folder",
}


def one_line(message: str) -> str:
    """Condense jsonargparse's nested validation report to ``key.path: innermost problem``."""
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', message)]
    noise = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>",
             "Problem with given class_path", "Parser key")
    lines = [line for line in message.splitlines() if line.strip() and not line.strip().startswith(noise)]
    if not lines:
        return message.strip().replace("\n", " ")
    innermost = max(lines, key=lambda line: len(line) - len(line.lstrip())).strip().lstrip("- ")
    return f"{'.'.join(keys)}: {innermost}" if keys else innermost


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config key as one line naming the key, instead of usage plus a nested report."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        sys.exit(f"error: {one_line(message)} (run `{prog} --help` for the accepted options)")


def missing_paths(config, key: str = "") -> list[str]:
    """``key: path`` for every ``PATH_OPTIONS`` entry of a (nested) config whose local path does not exist."""
    if isinstance(config, Namespace):
        config = vars(config)
    if isinstance(config, dict):
        found = []
        for name, value in config.items():
            path = f"{key}.{name}" if key else name
            if name in PATH_OPTIONS and isinstance(value, str):
                local = looks_local(value) if name == "pretrained" else True
                if local and not os.path.exists(os.path.expanduser(value)):
                    found.append(f"{path}: {value!r} ({PATH_OPTIONS[name]})")
            else:
                found += missing_paths(value, path)
        return found
    if isinstance(config, list):
        return [m for i, item in enumerate(config) for m in missing_paths(item, f"{key}[{i}]")]
    return []


class DimbaCLI(LightningCLI):
    """LightningCLI with one-line errors for bad options, and path checks before anything heavy is built."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and not os.path.isfile(ckpt_path):
            raise ConfigError(f"--ckpt_path {ckpt_path!r} does not exist; pass a .ckpt file written by fit "
                              "(see the checkpoints/ folder of the run)")
        missing = missing_paths({"model": config.get("model"), "data": config.get("data")})
        if missing:
            raise ConfigError(f"{len(missing)} path(s) of the config do not exist (put the files there or point the "
                              "options elsewhere): " + "; ".join(missing))


def config_error_in(error: BaseException | None) -> ConfigError | None:
    """Our ConfigError, raised directly or while jsonargparse instantiated a class (it re-raises it as the cause
    of a ValueError), or None."""
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__ or error.__context__
    return error


def main(args: list[str] | None = None) -> None:
    torch.set_float32_matmul_precision("high")
    try:
        DimbaCLI(DiffusionModule, CaptionImageDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 save_config_kwargs={"overwrite": True}, parser_class=OneLineErrorParser, args=args)
    except ValueError as error:
        cause = config_error_in(error)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")


if __name__ == "__main__":
    main()
