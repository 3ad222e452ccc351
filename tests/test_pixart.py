"""PixArt-alpha import: both formats convert to a Backbone whose output equals diffusers' PixArtTransformer2DModel;
and back: an exported teacher equals itself in diffusers and imports back identical."""

import argparse
import glob
import os

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file

from lit_dimba.checkpoints import load_backbone_state
from lit_dimba.conditioning import LatentVAE, TextEncoder, TinyT5TextEncoder
from lit_dimba.convert.__main__ import main as convert_main
from lit_dimba.convert.pixart import convert_pixart
from lit_dimba.errors import ConfigError
from lit_dimba.export import main as export_main
from lit_dimba.models.backbone import Backbone, MambaConfig
from lit_dimba.modules import DiffusionModule
from main import main
from tests.conftest import ROOT
from tests.test_conditioning import TINY_VAE_CONFIG
from tests.test_sources import image_folder

TOKENS, CAPTION = 6, 32
# name -> (diffusers config, latent height, width)
CONFIGS = {
    "512-style square, learned sigma": (dict(sample_size=8, out_channels=8), 8, 8),
    "non-square, fixed sigma, PE scale 2": (dict(sample_size=16, out_channels=4, interpolation_scale=2), 8, 12),
    "1024-MS micro-conditioning, non-square": (
        dict(sample_size=16, out_channels=8, attention_head_dim=24, use_additional_conditions=True), 16, 8),
}


def tiny_pixart(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    """A 2-layer diffusers PixArt transformer with every weight random (none left at a zero init)."""
    config = {**dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, patch_size=2,
                     caption_channels=CAPTION, use_additional_conditions=False), **overrides}
    config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    model = PixArtTransformer2DModel(**config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def save_released(model: PixArtTransformer2DModel, folder: str, seed: int = 1) -> torch.Tensor:
    """Save like the hub's PixArt folders: ``save_pretrained`` plus the null caption diffusers' model does not
    hold (``caption_projection.y_embedding``). Returns that null caption."""
    model.save_pretrained(folder)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    null = torch.randn(TOKENS, CAPTION, generator=torch.Generator().manual_seed(seed))
    save_file({**state, "caption_projection.y_embedding": null}, path)
    return null


def inputs(height: int, width: int, batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    t = torch.tensor([3, 877])[:batch]
    y = torch.randn(batch, TOKENS, CAPTION, generator=g)
    mask = torch.ones(batch, TOKENS, dtype=torch.bool)
    mask[0, 3:] = False  # padded caption
    return x, t, y, mask


def diffusers_output(model: PixArtTransformer2DModel, x, t, y, mask) -> torch.Tensor:
    added = None
    if model.config.use_additional_conditions:
        B, _, H, W = x.shape
        added = {"resolution": torch.tensor([[H * 8.0, W * 8.0]] * B), "aspect_ratio": torch.tensor([[H / W]] * B)}
    with torch.no_grad():
        return model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask.long(),
                     added_cond_kwargs=added).sample


def ours(path: str, **kwargs) -> Backbone:
    state, config = convert_pixart(path, **kwargs)
    backbone = Backbone(**config).eval()
    backbone.load_state_dict(state)
    return backbone


def original_checkpoint(backbone: Backbone, path: str) -> None:
    """Write ``backbone``'s tensors as the PixArt-alpha repository saves them (its names, a stored pos_embed)."""
    state = {k.replace(".mixer.", ".attn."): v for k, v in backbone.state_dict().items()}
    state["pos_embed"] = torch.full((1, 16, backbone.hidden_size), 7.0)  # garbage: must be recomputed, not loaded
    torch.save({"state_dict": state}, path)


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_folder_equals_diffusers(name, tmp_path):
    config, height, width = CONFIGS[name]
    reference = tiny_pixart(**config)
    null = save_released(reference, str(tmp_path))
    backbone = ours(str(tmp_path))
    assert backbone.micro_conditioning == reference.config.use_additional_conditions
    assert backbone.out_channels == reference.config.out_channels
    assert torch.equal(backbone.y_embedder.y_embedding, null)
    x, t, y, mask = inputs(height, width)
    expected = diffusers_output(reference, x, t, y, mask)
    with torch.no_grad():
        got = backbone(x, t, y, mask)
    assert got.shape == expected.shape == (2, reference.config.out_channels, height, width)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_original_checkpoint_equals_diffusers(name, tmp_path):
    config, height, width = CONFIGS[name]
    reference = tiny_pixart(**config)
    save_released(reference, str(tmp_path / "diffusers"))
    # the original format records neither heads nor the PE grid: give them as a user would
    pe = dict(base_size=config["sample_size"] // 2, pe_interpolation=config.get("interpolation_scale", 1))
    original_checkpoint(ours(str(tmp_path / "diffusers")), str(tmp_path / "PixArt.pth"))
    backbone = ours(str(tmp_path / "PixArt.pth"), num_heads=2, **pe)
    x, t, y, mask = inputs(height, width)
    with torch.no_grad():
        got = backbone(x, t, y, mask)
    assert (got - diffusers_output(reference, x, t, y, mask)).abs().max() <= 1e-5


def test_missing_and_unknown_tensors_are_named(tmp_path):
    save_released(tiny_pixart(sample_size=8), str(tmp_path))
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["transformer_blocks.1.attn2.to_k.weight"]
    state["transformer_blocks.0.attn1.norm_q.weight"] = torch.ones(8)
    save_file(state, path)
    with pytest.raises(ConfigError, match=r"missing: transformer_blocks\.1\.attn2\.to_k\.weight.*"
                                          r"not PixArt-alpha's: transformer_blocks\.0\.attn1\.norm_q\.weight"):
        convert_pixart(str(tmp_path))


def test_save_pretrained_without_null_caption_is_explained(tmp_path):
    tiny_pixart(sample_size=8).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="caption_projection.y_embedding.*save_pretrained drops it"):
        convert_pixart(str(tmp_path))


def test_original_file_is_read_without_running_code(tmp_path):
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="weights_only=True"):
        convert_pixart(str(tmp_path / "bad.pth"))
    torch.save({"state_dict": {"x_embedder.proj.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a PixArt-alpha checkpoint"):
        convert_pixart(str(tmp_path / "other.pth"))


def test_ema_weights_of_a_training_checkpoint(tmp_path):
    save_released(tiny_pixart(sample_size=8), str(tmp_path / "diffusers"))
    backbone = ours(str(tmp_path / "diffusers"))
    state = {k.replace(".mixer.", ".attn."): v for k, v in backbone.state_dict().items()}
    ema = {k: v + 1 for k, v in state.items()}
    torch.save({"state_dict": state, "state_dict_ema": ema}, tmp_path / "train.pth")
    for use_ema, expected in ((True, ema), (False, state)):
        converted, _ = convert_pixart(str(tmp_path / "train.pth"), ema=use_ema, num_heads=2)
        assert torch.equal(converted["final_layer.linear.weight"], expected["final_layer.linear.weight"])


def test_command_writes_an_export_that_loads(tmp_path, capsys):
    config, height, width = CONFIGS["1024-MS micro-conditioning, non-square"]
    reference = tiny_pixart(**config)
    save_released(reference, str(tmp_path / "pipeline" / "transformer"))  # a pipeline folder
    original_checkpoint(ours(str(tmp_path / "pipeline")), str(tmp_path / "PixArt-MS.pth"))
    convert_main([str(tmp_path / "PixArt-MS.pth"), str(tmp_path / "export"), "--num_heads", "2", "--base_size",
                  "8", "--pe_interpolation", "1"])
    assert "model.safetensors" in capsys.readouterr().out
    spec = yaml.safe_load(open(tmp_path / "export" / "backbone.yaml"))
    assert spec["class_path"] == "lit_dimba.models.Backbone" and spec["init_args"]["micro_conditioning"]
    backbone = Backbone.from_config(spec["init_args"]).eval()
    backbone.load_state_dict(load_backbone_state(str(tmp_path / "export")))
    x, t, y, mask = inputs(height, width)
    with torch.no_grad():
        assert (backbone(x, t, y, mask) - diffusers_output(reference, x, t, y, mask)).abs().max() <= 1e-5
    # the PixArt files are read directly too, converted on load
    for source in ("pipeline", "PixArt-MS.pth"):
        direct = load_backbone_state(str(tmp_path / source))
        assert all(torch.equal(direct[k], v) for k, v in backbone.state_dict().items())

    state = torch.load(tmp_path / "PixArt-MS.pth")
    state["state_dict"]["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(SystemExit, match=r"blocks\.0\.mixer\.extra\.weight"):
        convert_main([str(tmp_path / "extra.pth"), str(tmp_path / "export2"), "--num_heads", "2"])


# ------------------------------------------------------------------------------------------- configs, end to end
PIXART = os.path.join(ROOT, "configs", "pixart_alpha_512.yaml")
T2MD_PIXART = os.path.join(ROOT, "configs", "t2md_pixart512.yaml")


def write_stand_ins() -> PixArtTransformer2DModel:
    """Tiny files at the paths the PixArt configs name (in the current folder): a PixArt-alpha original .pth, a T5
    folder, an AutoencoderKL folder and an image folder. Returns the diffusers model the .pth was made from."""
    reference = tiny_pixart(sample_size=8, out_channels=8)
    save_released(reference, "diffusers_pixart")
    os.makedirs("pretrained")
    original_checkpoint(ours("diffusers_pixart"), "pretrained/PixArt-XL-2-512x512.pth")
    TinyT5TextEncoder(d_model=CAPTION, max_length=TOKENS).save_pretrained("pretrained/t5-v1_1-xxl")
    AutoencoderKL.from_config(TINY_VAE_CONFIG).save_pretrained("pretrained/sd-vae-ft-ema")
    image_folder("data/images", n=6, column="text")
    return reference


@pytest.mark.parametrize("config", [PIXART, T2MD_PIXART])
def test_missing_pretrained_files_are_all_named(config, in_tmp):
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", config])
    message = str(error.value)
    expected = ["./pretrained/PixArt-XL-2-512x512.pth", "./pretrained/t5-v1_1-xxl", "./pretrained/sd-vae-ft-ema"]
    expected += ["./data/images"] if config == T2MD_PIXART else []
    assert message.startswith(f"error: {len(expected)} path(s) of the config do not exist") and "\n" not in message
    for path in expected:
        assert path in message
    assert ("model.init_args.teacher_checkpoint" if config == T2MD_PIXART else "model.init_args.init_weights") in message


def test_predict_with_pixart_t5_and_vae_files(in_tmp):
    reference = write_stand_ins()
    main(["predict", "--config", PIXART, "--config", os.path.join(ROOT, "tests", "configs", "tiny_pixart.yaml")])
    files = sorted(glob.glob("runs/pixart_alpha_512/predictions/*.png"))
    assert len(files) == 4
    images = [np.asarray(Image.open(f)) for f in files]
    assert images[0].shape == (16, 16, 3) and all(image.std() > 0 for image in images)

    # the module the config builds holds PixArt's network: same output as diffusers'
    module = DiffusionModule(Backbone(**convert_pixart("pretrained/PixArt-XL-2-512x512.pth", num_heads=2, base_size=4)[1]),
                        TextEncoder("./pretrained/t5-v1_1-xxl", max_length=TOKENS),
                        LatentVAE("./pretrained/sd-vae-ft-ema"), init_weights="./pretrained/PixArt-XL-2-512x512.pth")
    x, t, y, mask = inputs(8, 8)
    with torch.no_grad():
        got = module.model.eval()(x, t, y, mask)
    assert (got - diffusers_output(reference, x, t, y, mask)).abs().max() <= 1e-5


def test_t2md_stages_from_pixart_files(in_tmp):
    write_stand_ins()
    tiny = os.path.join(ROOT, "tests", "configs", "tiny_pixart_distill.yaml")
    main(["fit", "--config", T2MD_PIXART, "--config", tiny])
    ckpt = torch.load("runs/t2md_pixart512/forcing/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["teacher"]["checkpoint"] == "./pretrained/PixArt-XL-2-512x512.pth"
    pixart, _ = convert_pixart("pretrained/PixArt-XL-2-512x512.pth")
    student = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()}
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    copied = [k for k in student if ".mixer." not in k]
    assert len(copied) > 20 and all(torch.equal(student[k], pixart[k]) for k in copied)
    assert torch.equal(student["blocks.0.mixer.qkv.weight"], pixart["blocks.0.mixer.qkv.weight"])  # kept attention
    assert "blocks.1.mixer.mamba.in_proj.weight" in student  # the Mamba block that forcing trains

    main(["fit", "--config", T2MD_PIXART, "--config", os.path.join(ROOT, "configs", "distill", "t2md_pixart512_kd.yaml"), "--config", tiny])
    kd = torch.load("runs/t2md_pixart512/kd/checkpoints/last.ckpt", weights_only=True)
    assert kd["global_step"] == 2
    assert not torch.equal(kd["state_dict"]["model.blocks.0.mixer.qkv.weight"], pixart["blocks.0.mixer.qkv.weight"])


def test_sharded_diffusers_weights(tmp_path):
    reference = tiny_pixart(sample_size=8, out_channels=8)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    first = load_file(shards[0])
    save_file({**first, "caption_projection.y_embedding": torch.randn(TOKENS, CAPTION)}, shards[0])
    backbone = ours(str(tmp_path))
    x, t, y, mask = inputs(8, 8)
    with torch.no_grad():
        assert (backbone(x, t, y, mask) - diffusers_output(reference, x, t, y, mask)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------- export to diffusers
# name -> (Backbone arguments, export options, latent height, width); sizes where diffusers' PE must equal ours
EXPORTS = {
    "PixArt's PE grid, learned sigma, non-square": (dict(base_size=4), [], 8, 12),
    "base_size null (trained here), PE scale 2, fixed sigma": (
        dict(pe_interpolation=2.0, learn_sigma=False), ["--sample_size", "8"], 8, 8),
    "1024-MS micro-conditioning, non-square": (
        dict(hidden_size=48, base_size=8, pe_interpolation=2.0, micro_conditioning=True), [], 16, 8),
}


def tiny_teacher(**overrides) -> Backbone:
    """A 2-block DiT teacher with every parameter and the null caption random (none left at a zero init).

    Scaled so that attention logits stay far below 10^4: diffusers masks padded caption tokens with a -10000 bias,
    ours excludes them, and the two part once logits reach that size."""
    backbone = Backbone(**{**dict(layout="dit", depth=2, hidden_size=16, num_heads=2, in_channels=4,
                                  caption_channels=CAPTION, token_num=TOKENS), **overrides})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in (*backbone.parameters(), *backbone.buffers()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return backbone.eval()


def teacher_checkpoint(backbone: Backbone, path: str) -> None:
    """Save like a training run: the backbone's parameters as the EMA average, other (trained) ones in the state
    dict, so that an export of the wrong set shows."""
    params = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    trained = {f"model.{k}": v + 1 if k in params else v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": trained, "backbone_config": backbone.config,
                "callbacks": {"EMA": {"num_updates": 10, "shadow": params}}}, path)


def export_diffusers(backbone: Backbone, tmp_path, *options: str) -> str:
    teacher_checkpoint(backbone, str(tmp_path / "last.ckpt"))
    folder = str(tmp_path / "diffusers")
    export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "export"), "--diffusers", folder, *options])
    return folder


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_teacher_equals_in_diffusers(name, tmp_path):
    overrides, options, height, width = EXPORTS[name]
    backbone = tiny_teacher(**overrides)
    folder = export_diffusers(backbone, tmp_path, *options)
    exported = PixArtTransformer2DModel.from_pretrained(folder).eval()
    assert exported.config.use_additional_conditions == backbone.micro_conditioning
    x, t, y, mask = inputs(height, width)
    with torch.no_grad():
        expected = backbone(x, t, y, mask)
    got = diffusers_output(exported, x, t, y, mask)
    assert got.shape == expected.shape == (2, backbone.out_channels, height, width)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_teacher_imports_back_identical(name, tmp_path):
    overrides, options, _, _ = EXPORTS[name]
    backbone = tiny_teacher(**overrides)
    folder = export_diffusers(backbone, tmp_path, *options)
    expected = backbone.state_dict()
    for state in (convert_pixart(folder)[0], load_backbone_state(folder)):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], v) for k, v in expected.items())  # the null caption included
    config = convert_pixart(folder)[1]
    assert config["base_size"] * 2 == PixArtTransformer2DModel.load_config(folder)["sample_size"]
    assert all(config[k] == backbone.config[k] for k in ("depth", "hidden_size", "num_heads", "learn_sigma",
                                                         "pe_interpolation", "micro_conditioning", "token_num"))
    # the usual export is written beside it, from the same (EMA) weights
    assert all(torch.equal(load_backbone_state(str(tmp_path / "export"))[k], v) for k, v in expected.items())


@pytest.mark.parametrize("overrides, options, message", [
    (dict(layout=["attn", "mamba_h", "mamba_w"], depth=3, mamba=MambaConfig(d_state=8, headdim=8, chunk_size=8)),
     [], r"2 of its 3 blocks are Mamba \(mamba_h, mamba_w; .*layout 'dit'\)"),
    (dict(after_each_block=["mamba_layer"], mamba=MambaConfig(d_state=8, headdim=8, chunk_size=8)),
     ["--sample_size", "8"],
     r"2 of its 4 blocks are Mamba \(mamba_layer;"),
    (dict(mlp_ratio=2.0, pe_mode="centred"), [], r"mlp_ratio 2.0 .*; pe_mode 'centred' .*; base_size null .*: pass "
                                                 r"--sample_size"),
    (dict(base_size=4), ["--sample_size", "16"], r"sample_size 16: the backbone's base_size 4 fixes it at 8"),
])
def test_export_names_what_diffusers_cannot_hold(overrides, options, message, tmp_path):
    with pytest.raises(SystemExit, match="^error: this backbone is not exportable as a diffusers "
                                         f"PixArtTransformer2DModel: {message}") as error:
        export_diffusers(tiny_teacher(**overrides), tmp_path, *options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "export").exists() and not (tmp_path / "diffusers").exists()


def test_pixart_pipeline_samples_the_exported_teacher(tmp_path):
    transformer = PixArtTransformer2DModel.from_pretrained(export_diffusers(tiny_teacher(base_size=4), tmp_path))
    text = TinyT5TextEncoder(d_model=CAPTION)
    pipeline = PixArtAlphaPipeline(tokenizer=text.tokenizer, text_encoder=text.encoder,
                                   vae=AutoencoderKL.from_config(TINY_VAE_CONFIG), transformer=transformer,
                                   scheduler=DPMSolverMultistepScheduler())
    images = pipeline(["a red circle", "a small blue square at the top"], num_inference_steps=2, height=16,
                      width=16, use_resolution_binning=False, clean_caption=False, output_type="np",
                      generator=[torch.Generator().manual_seed(0) for _ in range(2)]).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 1e-3  # same noise, other prompt: the text reaches the teacher
