"""Dimba as released: a random stand-in with the release's tensor names and shapes converts with every tensor in its
place (``python -m lit_dimba.convert``, ``init_weights``), bad ones are named, and configs/dimba_l_512.yaml
fine-tunes from the stand-in files at its paths."""

import math
import os

import pytest
import torch
import yaml
from diffusers import AutoencoderKL

from lit_dimba.checkpoints import load_backbone_state
from lit_dimba.conditioning import PixelSpace, TinyT5TextEncoder
from lit_dimba.convert import convert_released
from lit_dimba.convert.__main__ import main as convert_main
from lit_dimba.errors import ConfigError
from lit_dimba.models.backbone import Backbone
from lit_dimba.modules import DiffusionModule
from main import main
from tests.conftest import ROOT
from tests.test_conditioning import TINY_VAE_CONFIG
from tests.test_sources import image_folder

WIDTH, CAPTION, TOKENS, D_STATE, DT_RANK = 16, 32, 6, 4, 3


def release_shapes(depth: int, mamba_blocks: int, channels: int = 4, base: int = 4) -> dict[str, tuple]:
    """Names and shapes of the state dict of feizc/Dimba's ``Dimba`` (``diffusion/model/nets/dimba.py``, with
    ``blocks.py`` and Vision Mamba's ``Mamba(bimamba_type="v2")``) at a small size: patch 2, learned sigma, MLP 4x,
    expand 2, conv width 4, ``pos_embed`` for a base x base grid."""
    C, E = WIDTH, 2 * WIDTH
    shapes = {"pos_embed": (1, base * base, C), "x_embedder.proj.weight": (C, channels, 2, 2),
              "x_embedder.proj.bias": (C,), "t_embedder.mlp.0.weight": (C, 256), "t_embedder.mlp.0.bias": (C,),
              "t_embedder.mlp.2.weight": (C, C), "t_embedder.mlp.2.bias": (C,), "t_block.1.weight": (6 * C, C),
              "t_block.1.bias": (6 * C,), "y_embedder.y_embedding": (TOKENS, CAPTION),
              "y_embedder.y_proj.fc1.weight": (C, CAPTION), "y_embedder.y_proj.fc1.bias": (C,),
              "y_embedder.y_proj.fc2.weight": (C, C), "y_embedder.y_proj.fc2.bias": (C,)}
    for i in range(depth):
        for name, shape in {"scale_shift_table": (6, C), "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
                            "attn.proj.weight": (C, C), "attn.proj.bias": (C,), "cross_attn.q_linear.weight": (C, C),
                            "cross_attn.q_linear.bias": (C,), "cross_attn.kv_linear.weight": (2 * C, C),
                            "cross_attn.kv_linear.bias": (2 * C,), "cross_attn.proj.weight": (C, C),
                            "cross_attn.proj.bias": (C,), "mlp.fc1.weight": (4 * C, C), "mlp.fc1.bias": (4 * C,),
                            "mlp.fc2.weight": (C, 4 * C), "mlp.fc2.bias": (C,)}.items():
            shapes[f"blocks.{i}.{name}"] = shape
    for j in range(mamba_blocks):
        mixer = {"A_log": (E, D_STATE), "D": (E,), "A_b_log": (E, D_STATE), "D_b": (E,), "in_proj.weight": (2 * E, C),
                 "out_proj.weight": (C, E)}
        for suffix in ("", "_b"):
            mixer.update({f"conv1d{suffix}.weight": (E, 1, 4), f"conv1d{suffix}.bias": (E,),
                          f"x_proj{suffix}.weight": (DT_RANK + 2 * D_STATE, E),
                          f"dt_proj{suffix}.weight": (E, DT_RANK), f"dt_proj{suffix}.bias": (E,)})
        shapes.update({f"mamba_blocks.{j}.mixer.{name}": shape for name, shape in mixer.items()})
        shapes[f"mamba_blocks.{j}.norm.weight"] = (C,)
    shapes.update({"final_layer.scale_shift_table": (2, C), "final_layer.linear.weight": (2 * 2 * 2 * channels, C),
                   "final_layer.linear.bias": (2 * 2 * 2 * channels,)})
    return shapes


def write_release(path: str, depth: int, mamba_blocks: int, channels: int = 4, seed: int = 0) -> dict:
    """A release-format checkpoint (``{"state_dict": ...}``, as its ``save_checkpoint`` writes) of random tensors,
    no two alike; returns them."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=generator) * 0.3
             for name, shape in release_shapes(depth, mamba_blocks, channels).items()}
    for name in state:
        if "A_log" in name or "A_b_log" in name:
            state[name] = state[name].abs().log1p()  # A = -exp(A_log) <= -1, as trained models have
    torch.save({"state_dict": state}, path)
    return state


# depth, Mamba blocks -> where the release's blocks.<i> and mamba_blocks.<j> go in our one list, written out
PLACES = {
    (3, 3): ([0, 2, 4], [1, 3, 5]),  # mamba_ratio 1: after every block
    (4, 2): ([0, 1, 3, 4], [2, 5]),  # mamba_ratio 0.5: after blocks 1 and 3
    (8, 2): ([0, 1, 3, 4, 5, 6, 8, 9], [2, 7]),  # mamba_ratio 0.25: after blocks 1 and 5
}


@pytest.mark.parametrize("depth,mamba_blocks", list(PLACES))
def test_every_tensor_lands_in_its_place(tmp_path, depth, mamba_blocks):
    path = str(tmp_path / "dimba.pt")
    release = write_release(path, depth, mamba_blocks)
    state, config, source_format = convert_released(path)
    pixart, mamba = PLACES[depth, mamba_blocks]
    expected = {}
    for name in release:
        parts = name.split(".")
        if parts[0] == "blocks":
            name_ours = ".".join(["blocks", str(pixart[int(parts[1])]), "mixer" if parts[2] == "attn" else parts[2],
                                  *parts[3:]])
        elif parts[0] == "mamba_blocks":
            name_ours = ".".join(["blocks", str(mamba[int(parts[1])]), *parts[2:]])
        else:
            name_ours = name
        expected[name_ours] = name
    del expected["pos_embed"]  # recomputed by the backbone
    assert source_format == "dimba" and set(state) == set(expected)
    assert all(torch.equal(state[ours], release[theirs]) for ours, theirs in expected.items())
    assert config["after_each_block"] == ["bimamba"] and math.isclose(config["mamba_ratio"], mamba_blocks / depth)
    assert config["mamba1"] == dict(d_state=D_STATE, d_conv=4, expand=2, dt_rank=DT_RANK)
    sizes = (config["depth"], config["hidden_size"], config["num_heads"], config["token_num"])
    assert sizes == (depth, WIDTH, 16, TOKENS)
    assert config["base_size"] == 4 and config["pe_interpolation"] == 4 / 32 and config["learn_sigma"]
    backbone = Backbone.from_config({**config, "num_heads": 2})
    backbone.load_state_dict(state)  # strict: every tensor filled, none left over
    assert [kind == "bimamba" for kind in backbone.block_kinds] == [k in mamba for k in range(depth + mamba_blocks)]


def test_missing_unknown_and_misshapen_tensors_are_named(tmp_path):
    release = write_release(str(tmp_path / "dimba.pt"), 2, 2)
    del release["mamba_blocks.1.mixer.x_proj_b.weight"], release["blocks.0.attn.proj.bias"]
    release["mamba_blocks.0.mixer.in_proj.bias"] = torch.zeros(64)
    release["blocks.1.mlp.fc2.bias"] = torch.zeros(5)
    torch.save({"state_dict": release}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"bad\.pt'.*2 PixArt blocks and 2 Mamba blocks.*missing: "
                                          r"blocks\.0\.attn\.proj\.bias, mamba_blocks\.1\.mixer\.x_proj_b\.weight;"
                                          r".*not the released Dimba's: mamba_blocks\.0\.mixer\.in_proj\.bias;"
                                          r".*other shapes: blocks\.1\.mlp\.fc2\.bias \(5,\) \(expected \(16,\)\)"):
        convert_released(str(tmp_path / "bad.pt"))
    del release["mamba_blocks.0.mixer.A_log"]
    torch.save(release, tmp_path / "no_A.pt")
    with pytest.raises(ConfigError, match="no_A.pt': these Dimba weights lack mamba_blocks.0.mixer.A_log, which"):
        convert_released(str(tmp_path / "no_A.pt"))


def test_command_and_init_weights_read_the_release(tmp_path, capsys):
    """``python -m lit_dimba.convert`` writes an export folder that loads; ``init_weights`` reads the .pt itself."""
    release = write_release(str(tmp_path / "dimba-l-512.pt"), 2, 2, channels=3)
    convert_main([str(tmp_path / "dimba-l-512.pt"), str(tmp_path / "export"), "--num_heads", "2"])
    assert "model.safetensors" in capsys.readouterr().out
    spec = yaml.safe_load(open(tmp_path / "export" / "backbone.yaml"))["init_args"]
    assert spec["after_each_block"] == ["bimamba"] and spec["num_heads"] == 2
    exported = load_backbone_state(str(tmp_path / "export"))
    assert torch.equal(exported["blocks.3.mixer.dt_proj_b.bias"], release["mamba_blocks.1.mixer.dt_proj_b.bias"])
    module = DiffusionModule(Backbone.from_config(spec), TinyT5TextEncoder(d_model=CAPTION, max_length=TOKENS),
                             PixelSpace(), init_weights=str(tmp_path / "dimba-l-512.pt"))
    assert all(torch.equal(module.model.state_dict()[name], tensor) for name, tensor in exported.items())
    write_release(str(tmp_path / "three.pt"), 2, 3)  # 3 Mamba blocks for 2 PixArt blocks: no ratio places them
    with pytest.raises(SystemExit, match=r"three\.pt' holds 3 Mamba blocks for 2 PixArt blocks, .*mamba_ratio 1\.5"):
        convert_main([str(tmp_path / "three.pt"), str(tmp_path / "export3")])


DIMBA_512 = os.path.join(ROOT, "configs", "dimba_l_512.yaml")


def test_fine_tune_config_names_every_missing_file(in_tmp):
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", DIMBA_512])
    message = str(error.value)
    expected = ["./pretrained/dimba-l-512.pt", "./pretrained/t5-v1_1-xxl", "./pretrained/sdxl-vae", "./data/images"]
    assert message.startswith(f"error: {len(expected)} path(s) of the config do not exist") and "\n" not in message
    assert all(path in message for path in expected) and "model.init_args.init_weights" in message


def test_fine_tune_from_the_released_files(in_tmp):
    """configs/dimba_l_512.yaml with tiny stand-ins at its paths: two steps from the converted weights."""
    os.makedirs("pretrained")
    release = write_release("pretrained/dimba-l-512.pt", 2, 2)
    TinyT5TextEncoder(d_model=CAPTION, max_length=TOKENS).save_pretrained("pretrained/t5-v1_1-xxl")
    AutoencoderKL.from_config(TINY_VAE_CONFIG).save_pretrained("pretrained/sdxl-vae")
    image_folder("data/images", n=6, column="text")
    main(["fit", "--config", DIMBA_512, "--config", os.path.join(ROOT, "tests", "configs", "tiny_dimba.yaml")])
    checkpoint = torch.load("runs/dimba_l_512/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["backbone_config"]["after_each_block"] == ["bimamba"]
    trained = checkpoint["state_dict"]["model.blocks.1.mixer.in_proj.weight"]
    assert trained.shape == release["mamba_blocks.0.mixer.in_proj.weight"].shape
    assert 0 < (trained - release["mamba_blocks.0.mixer.in_proj.weight"]).abs().max() < 0.01  # fine-tuned from it
