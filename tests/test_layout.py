"""Layouts are data: tensor names of every layout as before issue 15, the saved config rebuilds the network, the
distillation freezes by module, and every backbone config file builds (issue 15, points 3 and 4)."""

import glob
import inspect
import json
import os
import pydoc

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lit_dimba.conditioning import PixelSpace, TinyT5TextEncoder
from lit_dimba.models.backbone import Backbone, BiMambaBlock, Block, MambaLayer
from lit_dimba.models.mamba import Scan2D
from lit_dimba.modules import DiffusionModule, DistillModule
from main import BASE_CALLBACKS, BASE_CONFIG
from tests.conftest import BACKBONES, DEMO, MODEL_CONFIGS, ROOT, printed_config, tiny_backbone

# Tensor names and shapes of six layouts as the code before issue 15 built them (the Dimba ones from layout
# "dimba" with dimba_ratio 1 and 2), with the arguments that build them now.
RECORDED = json.load(open(os.path.join(ROOT, "tests", "data", "backbone_tensors.json")))


@pytest.mark.parametrize("case", RECORDED, ids=lambda case: str(case["config"]["layout"]) + str(
    case["config"].get("after_each_block", "")))
def test_tensor_names_are_unchanged(case):
    """Weight copy by name, PixArt import and existing checkpoints depend on these names."""
    with torch.device("meta"):
        model = Backbone.from_config(case["config"])
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(case["tensors"].items())


@pytest.mark.parametrize("ratio", [1, 2])
def test_configs_saved_before_after_each_block_still_build(ratio):
    """A saved config with layout "dimba" and dimba_ratio K gives the network it gave then."""
    case = RECORDED[ratio]  # the two Dimba cases
    old = {k: v for k, v in case["config"].items() if k != "after_each_block"}
    with torch.device("meta"):
        model = Backbone.from_config({**old, "layout": "dimba", "dimba_ratio": ratio})
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == case["tensors"]
    assert model.after_each_block == ["mamba_layer"] * ratio and model.config["layout"] == "dit"


def test_config_is_every_constructor_argument():
    """``config`` is built from the dataclass fields, so it holds every constructor argument."""
    model = tiny_backbone("t2md", depth=7)
    assert list(model.config) == list(inspect.signature(Backbone).parameters)
    assert model.config["mamba"]["d_state"] == 16 and model.config["layout"] == "t2md"


@pytest.mark.parametrize("name", ["dit_xl2", "dimba_l2", "dimba_mamba2_l2", "t2md"])
def test_checkpoint_config_rebuilds_the_identical_backbone(name):
    """What a checkpoint saves as ``backbone_config`` (through YAML, as exported) rebuilds a backbone that, with
    the saved weights, computes the same output."""
    torch.manual_seed(0)
    backbone = tiny_backbone(name, patch_size=4, in_channels=3, learn_sigma=False, token_num=24, pe_mode="centred")
    for p in backbone.parameters():  # zero-initialised output layers would hide differences
        torch.nn.init.normal_(p, std=0.05)
    module = DiffusionModule(backbone, TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace())
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    again = Backbone.from_config(yaml.safe_load(yaml.safe_dump(checkpoint["backbone_config"])))
    again.load_state_dict(backbone.state_dict())
    x, t = torch.randn(2, 3, 16, 8), torch.tensor([5, 600])
    y, mask = torch.randn(2, 24, 32), torch.ones(2, 24, dtype=torch.bool)
    torch.testing.assert_close(again(x, t, y, mask), backbone(x, t, y, mask), rtol=0, atol=0)
    assert again.config == backbone.config


def test_mamba_parameters_skip_weight_decay():
    """dt_bias, A_log and D of the Mamba mixers are in the optimizer group without weight decay (mamba-ssm)."""
    module = DiffusionModule(tiny_backbone("t2md", depth=7, in_channels=3), TinyT5TextEncoder(d_model=32, max_length=16),
                             PixelSpace())
    groups = module.configure_optimizers().param_groups
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and id(module.model.blocks[1].mixer.mamba.A_log) in no_decay


@pytest.mark.parametrize("which", ["mixers", "mamba", "all"])
def test_set_trainable_freezes_exactly_the_intended_modules(tmp_path, which):
    size = dict(patch_size=4, in_channels=3, learn_sigma=False, token_num=24)
    teacher = tiny_backbone("dit_xl2", depth=3, **size)
    path = str(tmp_path / "teacher.safetensors")
    save_file(teacher.state_dict(), path)
    student = tiny_backbone("dit_xl2", depth=3, layout=["attn", "mamba_h", "mamba_w"], **size)
    module = DistillModule(student, tiny_backbone("dit_xl2", depth=3, **size), path,
                           TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace(), trainable=which)
    trained = {name for name, p in module.model.named_parameters() if p.requires_grad}
    mixers = {f"blocks.{i}.mixer.{name}" for i in range(3) for name, _ in student.blocks[i].mixer.named_parameters()}
    scans = {name for name in mixers if not name.startswith("blocks.0.")}
    everything = {name for name, _ in module.model.named_parameters()}
    assert trained == {"mixers": mixers, "mamba": scans, "all": everything}[which]
    assert isinstance(student.blocks[1].mixer, Scan2D) and scans and mixers != scans != everything
    assert module.scan_blocks == [1, 2]
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_every_backbone_file_builds():
    """Each file of configs/backbones/ builds its network (on the meta device: no memory)."""
    sizes = {}
    for path in sorted(glob.glob(os.path.join(BACKBONES, "*.yaml"))):
        with torch.device("meta"):
            model = Backbone.from_file(path)
        sizes[os.path.basename(path)] = (len(model.blocks), sum(p.numel() for p in model.parameters()))
    assert sizes["dit_xl2.yaml"] == (28, 610_856_096)
    assert sizes["dimba_l2.yaml"] == (56, 859_517_600) and sizes["dimba_mamba2_l2.yaml"][0] == 48
    assert sizes["t2md.yaml"][0] == sizes["mamba_xl2.yaml"][0] == 28
    assert sizes["study_dit.yaml"] == (8, 9_092_460) and sizes["study_hybrid.yaml"][0] == 8
    assert set(sizes) == {"demo_dit.yaml", "demo_hybrid.yaml", "dimba_l2.yaml", "dimba_mamba2_l2.yaml", "dit_xl2.yaml",
                          "mamba_xl2.yaml", "t2md.yaml", "study_dit.yaml", "study_hybrid.yaml"}
    for name, extra in (("dimba_l2.yaml", BiMambaBlock), ("dimba_mamba2_l2.yaml", MambaLayer)):
        dimba = Backbone.from_file(os.path.join(BACKBONES, name), depth=1, hidden_size=32, num_heads=2,
                                   caption_channels=8, token_num=4)
        assert [type(block) for block in dimba.blocks] == [Block, extra]


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=os.path.basename)
def test_model_configs_build_their_backbones(config, capsys):
    """Every model config references its backbones by path; the resolved ones build (meta device)."""
    init_args = printed_config(capsys, config)["model"]["init_args"]
    written = yaml.safe_load(open(config))["model"]["init_args"]
    for key in ("backbone", "teacher", "student"):
        if key in init_args:
            assert os.path.dirname(os.path.normpath(os.path.join(os.path.dirname(config), written[key]))) == BACKBONES
            assert init_args[key]["class_path"] == "lit_dimba.models.Backbone"
            with torch.device("meta"):
                Backbone.from_config(init_args[key]["init_args"])


def test_curriculum_keeps_the_model_configs_callbacks(capsys):
    """An overlay appends its own callbacks (``trainer.callbacks+``): the model config's sample logger stays, the
    curriculum comes before the PE interpolation that follows it, and the base callbacks keep the model config's
    settings except the folders, which the overlay moves to its own run."""
    demo = printed_config(capsys, DEMO)
    base = [cb["class_path"] for cb in demo["trainer"]["callbacks"]]
    assert base == ["callbacks.SampleLogger"]
    assert demo["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")  # from configs/base.yaml
    for name in ("demo.yaml", "demo_extrapolate.yaml"):
        overlay = os.path.join(ROOT, "configs", "curriculum", name)
        merged = printed_config(capsys, DEMO, overlay)
        assert [cb["class_path"] for cb in merged["trainer"]["callbacks"]] == base + [
            "callbacks.ResolutionCurriculum", "callbacks.PEInterpolation"]
        assert merged["ema"] == demo["ema"]
        run = merged["trainer"]["logger"]["init_args"]["name"]
        assert merged["checkpoint"]["dirpath"] == f"runs/{run}/checkpoints" != demo["checkpoint"]["dirpath"]
        assert merged["checkpoint"]["every_n_train_steps"] == demo["checkpoint"]["every_n_train_steps"]


CONFIG_FILES = sorted(set(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
                      - set(glob.glob(os.path.join(BACKBONES, "*.yaml"))) - {BASE_CONFIG})


@pytest.mark.parametrize("config", CONFIG_FILES, ids=lambda path: os.path.relpath(path, ROOT))
def test_configs_leave_the_base_callbacks_to_the_base_file(config):
    """No config lists a callback that configs/base.yaml holds (it would replace the base one: a copy), nor
    repeats the base file's logger class."""
    trainer = yaml.safe_load(open(config)).get("trainer") or {}
    listed = [cb["class_path"] for key in ("callbacks", "callbacks+") for cb in trainer.get(key) or []]
    assert not [path for path in listed if pydoc.locate(path) in BASE_CALLBACKS.values()]
    assert "class_path" not in trainer.get("logger", {})
