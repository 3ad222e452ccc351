"""T2MD distillation on tiny models: weight copy, teacher forcing, the KD loss, a frozen teacher, export."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lit_dimba.checkpoints import export_backbone, load_backbone_state
from lit_dimba.conditioning import PixelSpace, TinyT5TextEncoder
from lit_dimba.diffusion import GaussianDiffusion
from lit_dimba.errors import ConfigError
from lit_dimba.models import Backbone
from lit_dimba.models.backbone import MambaConfig
from lit_dimba.modules import DiffusionModule, DistillModule
from tests.test_module import fixed_batch

SIZE = dict(depth=3, hidden_size=32, num_heads=2, patch_size=4, in_channels=3, learn_sigma=False, caption_channels=32, token_num=24,
            base_size=4, mamba=MambaConfig(d_state=8, headdim=16, chunk_size=8))
STUDENT_LAYOUT = ["attn", "mamba_h", "mamba_w"]


def make_teacher(seed=0, **overrides) -> Backbone:
    """A tiny DiT with every weight random (PixArt's zero-initialised output layers would hide mistakes)."""
    torch.manual_seed(seed)
    teacher = Backbone(**{**SIZE, "layout": "dit", **overrides})
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.1)
    return teacher


@pytest.fixture
def teacher_file(tmp_path):
    path = str(tmp_path / "teacher.safetensors")
    save_file(make_teacher().state_dict(), path)
    return path


def make_distill(teacher_file, layout=STUDENT_LAYOUT, lr=3e-3, **kwargs) -> DistillModule:
    torch.manual_seed(1)
    kwargs.setdefault("caption_dropout", 0.0)
    return DistillModule(Backbone(**{**SIZE, "layout": layout}), Backbone(**{**SIZE, "layout": "dit"}), teacher_file,
                         TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace(), GaussianDiffusion(),
                         optimizer=lambda params: torch.optim.AdamW(params, lr=lr), **kwargs)


def test_mixer_io_is_what_each_block_mixes():
    model = make_teacher().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    y, mask = torch.randn(2, 24, 32), torch.ones(2, 24, dtype=torch.bool)
    out, io = model(x, t, y, mask, return_mixer_io=True)
    assert torch.equal(out, model(x, t, y, mask)) and len(io) == 3
    for block, (mixer_in, mixer_out) in zip(model.blocks, io):
        assert mixer_in.shape == mixer_out.shape == (2, 16, 32)
        torch.testing.assert_close(block.mixer(mixer_in, (4, 4)), mixer_out)


def test_weight_copy_makes_every_non_mixer_tensor_the_teachers(teacher_file):
    module = make_distill(teacher_file)
    teacher = load_backbone_state(teacher_file)
    student = module.model.state_dict()
    not_copied = sorted(k for k, v in student.items() if not (k in teacher and torch.equal(v, teacher[k])))
    mamba_mixers = sorted(k for k in student if k.startswith(("blocks.1.mixer.", "blocks.2.mixer.")))
    assert not_copied == mamba_mixers, "exactly the Mamba mixers keep their own initialisation"
    assert "blocks.1.mixer.mamba.A_log" in not_copied and "blocks.2.mixer.fuse.weight" in not_copied
    assert torch.equal(student["blocks.0.mixer.qkv.weight"], teacher["blocks.0.mixer.qkv.weight"])
    scratch = make_distill(teacher_file, copy_weights=False).model.state_dict()
    assert not torch.equal(scratch["blocks.1.cross_attn.q_linear.weight"], teacher["blocks.1.cross_attn.q_linear.weight"])


def test_teacher_of_another_architecture_is_refused(tmp_path):
    wide = str(tmp_path / "wide.safetensors")
    save_file(make_teacher(hidden_size=48).state_dict(), wide)
    with pytest.raises(ConfigError, match=r"teacher_checkpoint .* does not fit.*x_embedder.proj.weight"):
        make_distill(wide)
    with pytest.raises(ConfigError, match="does not exist"):
        make_distill(str(tmp_path / "nope.ckpt"))


def test_scratch_row_needs_no_teacher(teacher_file):
    """teacher_checkpoint None: the from-scratch row trains like with a teacher file (whose weights it never uses);
    every setting that would use the teacher is refused, naming the field."""
    scratch = dict(copy_weights=False, lambda_eps=0.0, lambda_features=0.0, trainable="all")
    without, with_file = make_distill(None, **scratch), make_distill(teacher_file, **scratch)
    for name, value in with_file.model.state_dict().items():
        assert torch.equal(without.model.state_dict()[name], value)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    losses = [module.batch_losses(batch, 0.0, torch.Generator().manual_seed(0))["loss"]
              for module in (without, with_file)]
    torch.testing.assert_close(losses[0], losses[1])
    for setting in ({"copy_weights": True}, {"lambda_eps": 0.5}, {"lambda_features": 0.2}, {"stage": "forcing"}):
        with pytest.raises(ConfigError, match="teacher_checkpoint is null"):
            make_distill(None, **{**scratch, **setting})


def test_student_copy_refuses_mismatched_non_mixer_tensors(teacher_file):
    """A student wider than the teacher: the non-mixer tensors that cannot be copied are named."""
    with pytest.raises(ConfigError, match="outside the token mixers.*t_embedder"):
        DistillModule(Backbone(**{**SIZE, "layout": STUDENT_LAYOUT, "hidden_size": 48}),
                      Backbone(**{**SIZE, "layout": "dit"}), teacher_file,
                      TinyT5TextEncoder(d_model=32, max_length=24), PixelSpace())


def test_bad_pairs_are_refused(teacher_file):
    with pytest.raises(ConfigError, match="layout has none"):
        make_distill(teacher_file, layout="dit", stage="forcing")
    with pytest.raises(ConfigError, match="mamba_layer"):
        make_distill(teacher_file, layout=["attn", "mamba_layer", "attn"])
    with pytest.raises(ConfigError, match="trainable='mixer'"):
        make_distill(teacher_file, trainable="mixer")


@pytest.mark.parametrize("trainable,trained_blocks", [("mamba", {1, 2}), ("mixers", {0, 1, 2})])
def test_trainable_parameters(teacher_file, trainable, trained_blocks):
    module = make_distill(teacher_file, trainable=trainable)
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in module.model.named_parameters()
                       if n.startswith(tuple(f"blocks.{i}.mixer." for i in trained_blocks))}
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in module.teacher.parameters())
    everything = make_distill(teacher_file, trainable="all")
    assert all(p.requires_grad for p in everything.model.parameters())
    assert all(p.requires_grad == ("mixer.mamba" in n or "mixer.fuse" in n) for n, p in
               make_distill(teacher_file, stage="forcing", trainable="all").model.named_parameters())


def train(module, batch, steps):
    optimizer = module.configure_optimizers()
    module.train()
    history = []
    for step in range(steps):
        losses = module.batch_losses(batch, 0.0, torch.Generator().manual_seed(step % 2))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def test_teacher_forcing_lowers_every_layers_mixer_error(teacher_file):
    module = make_distill(teacher_file, stage="forcing", lr=1e-2)
    history = train(module, fixed_batch(8, 16), 60)
    layers = [k for k in history[0] if k.startswith("forcing/")]
    assert layers == ["forcing/block01", "forcing/block02"]
    for layer in layers:
        assert history[-1][layer] < 0.3 * history[0][layer], (layer, history[0][layer], history[-1][layer])
    assert history[0]["loss"] == pytest.approx(sum(history[0][k] for k in layers))


def test_teacher_is_bit_identical_after_training(teacher_file):
    for stage, trainable in (("forcing", "mamba"), ("kd", "all")):
        module = make_distill(teacher_file, stage=stage, trainable=trainable)
        before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
        student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
        train(module, fixed_batch(4, 16), 3)
        assert not module.teacher.training, "the teacher stays in eval mode"
        assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())
        assert all(p.grad is None for p in module.teacher.parameters())
        assert any(not torch.equal(v, student_before[k]) for k, v in module.model.state_dict().items())


def test_kd_loss_is_the_sum_of_its_terms(teacher_file):
    """The KD loss recomputed by hand, with the mixer outputs taken by forward hooks instead of return_mixer_io."""
    module = make_distill(teacher_file, lambda_eps=0.5, lambda_features=0.2).eval()
    batch = fixed_batch(4, 16)
    losses = module.batch_losses(batch, 0.0, torch.Generator().manual_seed(3))

    x0 = batch["image"]  # pixel space: the latents are the images
    y, mask = module.text_encoder(batch["caption"])
    generator = torch.Generator().manual_seed(3)  # the module's draws: timesteps, then noise
    t = torch.randint(0, 1000, (4,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = module.diffusion.add_noise(x0, noise, t)
    drop = torch.zeros(4, dtype=torch.bool)
    captured = {"student": {}, "teacher": {}}
    hooks = [block.mixer.register_forward_hook(lambda m, args, out, i=i, who=who: captured[who].update({i: out}))
             for who, net in (("student", module.model), ("teacher", module.teacher))
             for i, block in enumerate(net.blocks)]
    student_out = module.model(x_t, t, y, mask, drop)
    teacher_out = module.teacher(x_t, t, y, mask, drop)
    for hook in hooks:
        hook.remove()
    diffusion = F.mse_loss(student_out, module.diffusion.target(x0, noise, t))
    teacher_eps = F.mse_loss(student_out, teacher_out)
    features = (F.mse_loss(captured["student"][1], captured["teacher"][1])
                + F.mse_loss(captured["student"][2], captured["teacher"][2])) / 2
    torch.testing.assert_close(losses["diffusion"], diffusion)
    torch.testing.assert_close(losses["teacher_eps"], teacher_eps)
    torch.testing.assert_close(losses["mixer_features"], features)
    torch.testing.assert_close(losses["loss"], diffusion + 0.5 * teacher_eps + 0.2 * features)
    assert teacher_eps > 0 and features > 0


def test_kd_without_teacher_terms_does_not_run_the_teacher(teacher_file):
    module = make_distill(teacher_file, lambda_eps=0.0, lambda_features=0.0)
    module.teacher.forward = None  # any call fails
    losses = module.batch_losses(fixed_batch(2, 16), 0.0)
    assert set(losses) == {"mse", "diffusion", "loss"}


def test_checkpoint_holds_the_student_only_and_exports(teacher_file, tmp_path):
    module = make_distill(teacher_file)
    train(module, fixed_batch(4, 16), 2)
    state = module.state_dict()
    assert state and all(k.startswith("model.") for k in state), "no teacher or encoder tensors in the checkpoint"
    checkpoint = {"state_dict": state, "global_step": 2}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["teacher"]["checkpoint"] == teacher_file
    shadow = {k: v + 1 for k, v in module.model.named_parameters()}
    checkpoint["callbacks"] = {"EMA": {"num_updates": 2, "shadow": shadow}}
    path = str(tmp_path / "distill.ckpt")
    torch.save(checkpoint, path)

    again = make_distill(teacher_file, init_student=path)  # stage 1 -> 2: the trained (not EMA) student
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in again.model.state_dict().items())

    written = export_backbone(path, str(tmp_path / "export"))
    exported = Backbone.from_config(__import__("yaml").safe_load(open(written["config"]))["init_args"])
    exported.load_state_dict(load_backbone_state(str(tmp_path / "export")))
    assert exported.layout == STUDENT_LAYOUT
    assert all(torch.equal(exported.state_dict()[k], shadow[k].detach()) for k in shadow), "EMA weights exported"

    student = DiffusionModule(Backbone(**{**SIZE, "layout": STUDENT_LAYOUT}), TinyT5TextEncoder(d_model=32, max_length=24),
                            PixelSpace())
    exported_ckpt = torch.load(written["checkpoint"], weights_only=True)
    student.on_load_checkpoint(exported_ckpt)
    student.load_state_dict(exported_ckpt["state_dict"])
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    assert "hyper_parameters" not in exported_ckpt, "the test/predict config decides the module class"


def test_teacher_weights_from_a_checkpoint_prefer_the_ema_average(tmp_path):
    teacher = make_teacher()
    raw = {f"model.{k}": v for k, v in teacher.state_dict().items()}
    shadow = {k: v + 1 for k, v in teacher.named_parameters()}
    path = str(tmp_path / "teacher.ckpt")
    torch.save({"state_dict": raw, "callbacks": {"EMA": {"num_updates": 3, "shadow": shadow}}}, path)
    averaged = load_backbone_state(path, ema=True)
    assert torch.equal(averaged["blocks.0.mixer.qkv.weight"], shadow["blocks.0.mixer.qkv.weight"])
    assert torch.equal(averaged["y_embedder.y_embedding"], raw["model.y_embedder.y_embedding"]), "buffers stay"
    assert torch.equal(load_backbone_state(path, ema=False)["blocks.0.mixer.qkv.weight"],
                       raw["model.blocks.0.mixer.qkv.weight"])
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="no 'model.\\*' tensors"):
        load_backbone_state(path)
