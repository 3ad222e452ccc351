"""Backbone weights outside a training run: read them from a checkpoint, copy them between layouts by name, and
export a trained backbone.

Weights are read from
- a Lightning checkpoint written by any of our modules (``.ckpt``): the ``model.*`` tensors, with the EMA
  callback's average swapped in when asked and present;
- an export folder or ``.safetensors`` file written by ``export_backbone`` or the PixArt converter;
- PixArt-alpha's released weights (original ``.pth`` or a diffusers folder) and the released Dimba's (original
  ``.pt``), converted on load (``lit_dimba.convert``).

An export folder holds ``model.safetensors`` (the backbone's tensors), ``backbone.yaml`` (its
``class_path``/``init_args``, ready to paste under ``model.init_args.backbone`` of a config) and ``student.ckpt``
(a Lightning checkpoint that ``main.py test|predict --ckpt_path`` loads into a ``DiffusionModule`` built from
that backbone). An all-attention backbone can also be written as a diffusers ``PixArtTransformer2DModel`` folder
(``lit_dimba.convert.pixart.write_diffusers``).
"""

import os

import lightning
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch import nn

from lit_dimba.convert import convert_released, is_released
from lit_dimba.convert.pixart import diffusers_config, write_diffusers
from lit_dimba.errors import ConfigError, describe_names

MODEL_PREFIX = "model."


def read_checkpoint(path: str) -> dict:
    """A Lightning checkpoint as a dict of plain tensors and values (``weights_only``), with a clear error if the
    file is missing or is not one."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} does not exist; pass a .ckpt written by `main.py fit` "
                          "(see the run's checkpoints/ folder) or an export folder")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path!r} is not a Lightning checkpoint (it has no 'state_dict'); for plain weights "
                          "pass a .safetensors file or an export folder")
    return checkpoint


def ema_state(checkpoint: dict) -> dict | None:
    """The ``callbacks.EMA`` state (``{"num_updates", "shadow"}``) saved in a checkpoint, or None."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and "shadow" in state:
            return state
    return None


def backbone_state(checkpoint: dict, ema: bool, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The backbone's tensors (names without ``model.``) from a Lightning checkpoint dict; the EMA average
    replaces the trained parameters when ``ema`` and the checkpoint has one (buffers always come from the model)."""
    state = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if not state:
        raise ConfigError(f"{source} holds no 'model.*' tensors: it was not written by a lit-dimba module")
    if ema:
        averaged = ema_state(checkpoint)
        if averaged is None:
            rank_zero_warn(f"{source} has no EMA weights; using the trained weights")
        else:
            state.update(averaged["shadow"])
    return state


def load_backbone_state(path: str, ema: bool = True) -> dict[str, torch.Tensor]:
    """Backbone tensors from a ``.ckpt`` (EMA weights when ``ema`` and present), a ``.safetensors`` file, an
    export folder, or released weights (PixArt-alpha's ``.pth`` or diffusers folder, Dimba's ``.pt``)."""
    if is_released(path):
        return convert_released(path, ema)[0]
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise ConfigError(f"weights file {path!r} does not exist; export one with `python -m lit_dimba.export`")
        return load_file(path)
    return backbone_state(read_checkpoint(path), ema, repr(path))


def mismatched_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Names that are missing from ``state``, extra in it, or of another shape than in ``model``."""
    own = model.state_dict()
    differ = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
    return differ + [k for k in state if k not in own]


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, or raise a ConfigError naming the tensors that do not fit."""
    differ = mismatched_tensors(model, state)
    if differ:
        raise ConfigError(f"{source} does not fit this backbone ({len(differ)} tensors differ: "
                          f"{describe_names(differ)}); build the backbone with the config the weights were trained with")
    model.load_state_dict(state)


def is_mixer_tensor(name: str) -> bool:
    """True for the token mixers' tensors (``blocks.<i>.mixer.*``): the ones a student may replace."""
    return ".mixer." in name


@torch.no_grad()
def copy_matching(student: nn.Module, teacher_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy every teacher tensor whose name and shape exist in ``student``; return the student tensors left as
    they were (the replaced token mixers).

    Every tensor outside the token mixers must be copied: a teacher of another architecture (width, depth, patch,
    text size...) is refused with the names of the tensors that do not fit.
    """
    own = student.state_dict()
    copied = {k: v for k, v in teacher_state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in copied and not is_mixer_tensor(k)]
    if missing:
        raise ConfigError(f"the teacher does not fit the student outside the token mixers ({len(missing)} tensors "
                          f"missing or of another shape: {describe_names(missing)}); the student must have the "
                          "teacher's depth, width, patch size and text size, with the same block order")
    student.load_state_dict(copied, strict=False)
    return [k for k in own if k not in copied]


def export_backbone(checkpoint_path: str, out_dir: str, ema: bool = True, diffusers_dir: str | None = None,
                    sample_size: int | None = None) -> dict[str, str]:
    """Write a trained backbone from a checkpoint of any of our modules as ``model.safetensors`` +
    ``backbone.yaml`` and as ``student.ckpt`` (see the module docstring). Returns the written paths.

    ``model.safetensors`` holds the EMA weights when ``ema`` (and the checkpoint has them); ``student.ckpt`` keeps
    the raw weights in its state dict and the EMA average in its ``EMA`` callback state, like a training
    checkpoint, so test/predict with an ``EMA`` callback sample from the average. Frozen teachers and encoders
    are not exported.

    With ``diffusers_dir``, the same weights also go there as a ``PixArtTransformer2DModel`` folder
    (``sample_size``: see ``diffusers_config``); a backbone diffusers cannot hold is refused before anything is
    written.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    if "backbone_config" not in checkpoint:
        raise ConfigError(f"{checkpoint_path!r} has no 'backbone_config'; it was written before lit-dimba recorded "
                          "the architecture in checkpoints, so it cannot be exported")
    if diffusers_dir is not None:
        pixart_config = diffusers_config(checkpoint["backbone_config"], sample_size)
    weights = backbone_state(checkpoint, ema, repr(checkpoint_path))
    written = write_export(weights, checkpoint["backbone_config"], out_dir,
                           {"source": os.path.abspath(checkpoint_path), "weights": "ema" if ema else "trained",
                            "global_step": str(checkpoint.get("global_step", 0))})
    raw = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    student = {
        "state_dict": raw,
        "backbone_config": checkpoint["backbone_config"],
        "epoch": checkpoint.get("epoch", 0),
        "global_step": checkpoint.get("global_step", 0),
        "pytorch-lightning_version": lightning.__version__,
        "exported_from": os.path.abspath(checkpoint_path),
    }
    averaged = ema_state(checkpoint)
    if averaged is not None:
        student["callbacks"] = {"EMA": averaged}
    student_path = os.path.join(out_dir, "student.ckpt")
    torch.save(student, student_path)
    written["checkpoint"] = student_path
    if diffusers_dir is not None:
        written["diffusers"] = write_diffusers(weights, pixart_config, diffusers_dir)
    return written


def write_export(weights: dict[str, torch.Tensor], config: dict, out_dir: str, metadata: dict[str, str]
                 ) -> dict[str, str]:
    """Write backbone tensors as ``out_dir/model.safetensors`` (with ``metadata``) and the ``Backbone``
    arguments as ``out_dir/backbone.yaml``; return both paths."""
    os.makedirs(out_dir, exist_ok=True)
    weights_path = os.path.join(out_dir, "model.safetensors")
    save_file({k: v.contiguous() for k, v in weights.items()}, weights_path, metadata=metadata)
    config_path = os.path.join(out_dir, "backbone.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump({"class_path": "lit_dimba.models.Backbone", "init_args": config}, f, sort_keys=False)
    return {"weights": weights_path, "config": config_path}
