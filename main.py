"""lit-dimba command line (LightningCLI): ``python main.py {fit,validate,test,predict} --config configs/....yaml``.

Models and data are chosen by ``class_path`` in YAML (subclass mode). ``configs/base.yaml`` is read before any
``--config``: the logger and the callbacks every run has, each under a key of its own (``ema``, ``checkpoint``,
``lr_monitor``, ``image_writer``: LightningCLI's always-present callbacks), so a config sets ``ema.decay`` without
repeating a list; ``trainer.callbacks`` lists only a run's own callbacks. ``fit`` saves the full resolved config
next to the logs, and ``--ckpt_path`` resumes or evaluates.
"""

import os
import pydoc
import re
import sys
from typing import Literal

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import EMA, ImageWriter
from datamodules import CaptionImageDataModule
from lit_dimba.conditioning.frozen import looks_local
from lit_dimba.errors import ConfigError, TrainingStopped

SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.yaml")
# The callbacks every run has (their settings: configs/base.yaml, then each config), by config key
BASE_CALLBACKS = {"ema": EMA, "checkpoint": ModelCheckpoint, "lr_monitor": LearningRateMonitor,
                  "image_writer": ImageWriter}
# Options that name files or folders, and what belongs there. ``pretrained`` may also be a hub id.
PATH_OPTIONS = {
    "pretrained": "a Hugging Face model folder (config.json + weights; a hub id works when it is cached)",
    "init_weights": "backbone weights: a .ckpt of ours, an export folder, PixArt-alpha weights (.pth or diffusers "
                    "folder) or Dimba's (.pt)",
    "teacher_checkpoint": "the teacher's weights: a .ckpt of ours, an export folder, or PixArt-alpha weights",
    "init_student": "a .ckpt of the previous distillation stage or an export folder",
    "root": "the image folder",
    "data_dir": "the data folder",
}


def one_line(message: str) -> str:
    """Condense jsonargparse's nested validation report to ``key.path: innermost problem``; a sub-config file's
    YAML error (a backbone file, say) becomes ``key.path: sub-config file F is not valid YAML: problem at line L,
    column C``."""
    keys = [k for k in re.findall(r'Parser key "([^"]+)"', message)]
    broken = re.search(r"Invalid content in (sub-config file \S+): (.+)\n\s*"
                       r"in \"<unicode string>\", (line \d+, column \d+)", message)
    if broken:
        file, problem, place = broken.groups()
        return f"{'.'.join(keys)}: {file} is not valid YAML: {problem} at {place}"
    noise = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>",
             "Problem with given class_path", "Parser key")
    lines = [line for line in message.splitlines() if line.strip() and not line.strip().startswith(noise)]
    if not lines:
        return message.strip().replace("\n", " ")
    innermost = max(lines, key=lambda line: len(line) - len(line.lstrip())).strip().lstrip("- ")
    return f"{'.'.join(keys)}: {innermost}" if keys else innermost


def yaml_syntax_error(error: Exception | None) -> str | None:
    """``line L, column C: problem (context)`` of the YAML syntax error behind ``error`` (jsonargparse re-raises it
    as the cause of a TypeError), or None."""
    cause = getattr(error, "__cause__", None)
    if not isinstance(cause, yaml.MarkedYAMLError):
        return None

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    place = f"{at(cause.problem_mark)}: " if cause.problem_mark else ""
    context = f" ({cause.context} from {at(cause.context_mark)})" if cause.context and cause.context_mark else ""
    return f"{place}{cause.problem}{context}"


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad option or config key as one line naming the key (and the config file it is in), instead of
    usage plus a nested report."""

    config_file: str | None = None  # the config file being parsed, named in its errors

    def parse_path(self, path, *args, **kwargs) -> Namespace:
        """Parse a config file, naming it in the errors found in it (the YAML parser only sees its text)."""
        outer, self.config_file = self.config_file, os.fspath(path)
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            self.config_file = outer

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        source = f"config file {self.config_file!r}" if self.config_file else ""
        syntax = yaml_syntax_error(ex)
        if syntax:
            sys.exit(f"error: {source or 'the --config text'} is not valid YAML: {syntax}")
        where = f"{source}: " if source else ""
        prog = self.prog.replace(" [options]", "")
        sys.exit(f"error: {where}{one_line(message)} (run `{prog} --help` for the accepted options)")


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


def check_checkpoint_class(config: Namespace) -> None:
    """Refuse a ``--ckpt_path`` written by another model class than the config's. LightningCLI takes the class from
    the checkpoint's saved hyperparameters (``_class_path``) over the config's and builds it with the config's
    arguments, which fails later with a misleading message, or builds a model the config does not describe."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    written_by = checkpoint.get("hyper_parameters", {}).get("_class_path")
    configured = config.get("model.class_path")
    if written_by and pydoc.locate(written_by) is not pydoc.locate(configured):
        raise ConfigError(f"--ckpt_path {ckpt_path!r} was written by {written_by} but the config builds {configured}; "
                          "use the config the checkpoint was trained with (fit saved it as config.yaml next to its "
                          f"logs), or set model.class_path to {written_by} with the backbone it was trained with")


def trainer_error(error: MisconfigurationException, options: Namespace) -> ConfigError:
    """A ConfigError ``trainer.<option>: <reason>`` for a setting the Trainer refused, naming the option when the
    reason does (Lightning quotes it in backticks)."""
    reason = " ".join(str(error).split())
    named = [name for name in re.findall(r"`(\w+)`", reason) if name in options]
    return ConfigError(f"trainer{'.' + named[0] if named else ''}: {reason}")


def add_base_callback_arguments(parser: LightningArgumentParser) -> None:
    """The base callbacks' keys (``ema``, ``checkpoint``, ...), and ``base_callbacks``: which of them a run has."""
    for key, callback in BASE_CALLBACKS.items():
        parser.add_lightning_class_args(callback, key)
    parser.add_argument("--base_callbacks", type=list[Literal[tuple(BASE_CALLBACKS)]], default=list(BASE_CALLBACKS),
                        help="the base callbacks this run has (drop one to run without it, e.g. the EMA)")


def base_callbacks(base: dict[str, Callback], listed: list[Callback], trainer: dict,
                   wanted: list[str] = tuple(BASE_CALLBACKS)) -> list[Callback]:
    """The base callbacks (config key -> callback) that join a run's ``listed`` ones: the ``wanted`` ones
    (``base_callbacks``), except those whose class the run lists itself (a config written before the base file
    existed, or a test's own EMA), the checkpoint when ``trainer.enable_checkpointing`` is false, and the
    learning-rate monitor when there is no logger."""
    keep = []
    for key, callback in base.items():
        if key not in wanted or any(isinstance(other, type(callback)) for other in listed):
            continue
        if key == "checkpoint" and trainer.get("enable_checkpointing") is False:
            continue
        if key == "lr_monitor" and trainer.get("logger") is False:
            continue
        keep.append(callback)
    return keep


class DimbaCLI(LightningCLI):
    """LightningCLI with the base callbacks of ``configs/base.yaml``, one-line errors for bad options, a checkpoint
    of another model class and settings the Trainer refuses, and path checks before anything heavy is built."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_base_callback_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            check_checkpoint_class(self.config[self.config.subcommand])

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        base = {key: self._get(self.config_init, key) for key in BASE_CALLBACKS}
        wanted = self._get(self.config_init, "base_callbacks")
        try:
            # the base callbacks first, as the configs listed EMA first (its swap-in precedes the others' hooks)
            callbacks = base_callbacks(base, listed, config, wanted) + listed
            return self._instantiate_trainer({**config, "callbacks": callbacks}, [])
        except MisconfigurationException as error:
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise trainer_error(error, config.trainer) from error

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
        # Any LightningModule by class_path (DiffusionModule, DistillModule): with the base class of subclass mode as the
        # class_path itself, LightningCLI's merge of a --ckpt_path's hyperparameters drops the config's init_args.
        DimbaCLI(LightningModule, CaptionImageDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 save_config_kwargs={"overwrite": True}, parser_class=OneLineErrorParser, args=args,
                 parser_kwargs={command: {"default_config_files": [BASE_CONFIG]} for command in DimbaCLI.subcommands()})
    except TrainingStopped as error:
        sys.exit(f"error: {error}")
    except ValueError as error:
        cause = config_error_in(error)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")


if __name__ == "__main__":
    main()
