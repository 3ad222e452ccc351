"""The LightningCLI end to end on a seconds-long tiny run: fit, resume, test, predict, configs, bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_dimba.checkpoints import ema_state
from lit_dimba.export import main as export_main
from main import BASE_CONFIG, main
from tests.conftest import DEMO, MODEL_CONFIGS, ROOT, TINY, importable, printed_config

BASE = ["--config", DEMO, "--config", TINY]


def test_fit_test_predict(in_tmp):
    main(["fit", *BASE])
    ckpt = torch.load("ckpt/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    weights = ckpt["state_dict"]
    assert weights and all(k.startswith("model.") for k in weights), "frozen encoders must not be checkpointed"
    ema = ema_state(ckpt)
    buffers = {"model.y_embedder.y_embedding"}  # the fixed null caption is a buffer, not averaged
    assert ema["num_updates"] == 4 and set(ema["shadow"]) == {k[len("model."):] for k in set(weights) - buffers}
    assert any(not torch.equal(ema["shadow"][k[6:]], v) for k, v in weights.items()), "EMA must differ from raw"

    run_dir = "logs/tiny/version_0"
    assert os.path.isfile(f"{run_dir}/config.yaml")
    events = EventAccumulator(run_dir).Reload()
    assert {"train/loss", "val/loss", "lr-AdamW"} <= set(events.Tags()["scalars"])
    assert "samples" in events.Tags()["images"]

    main(["validate", *BASE, "--ckpt_path", "ckpt/last.ckpt"])
    assert "val/loss" in EventAccumulator("logs/tiny/version_1").Reload().Tags()["scalars"]
    main(["test", *BASE, "--ckpt_path", "ckpt/last.ckpt"])
    scores = json.load(open("logs/tiny/version_2/test_scores.json"))
    assert scores["num_images"] == 4 and set(scores["scores"]) == {"colour", "shape", "position", "size", "all"}
    assert Image.open("logs/tiny/version_2/test_grid.png").size[0] > 16

    with open("prompts.txt", "w") as f:
        f.write("a red circle in the top left corner\n\na big green square on the right\nblue triangle\n")
    predict = ["predict", *BASE, "--ckpt_path", "ckpt/last.ckpt", "--data.init_args.predict_prompts", "prompts.txt"]
    main(predict)
    files = sorted(glob.glob("predictions/*.png"))
    assert [os.path.basename(f) for f in files] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(files[0]).size == (16, 16)
    lines = [json.loads(line) for line in open("predictions/prompts.jsonl")]
    assert [line["caption"] for line in lines] == ["a red circle in the top left corner", "a big green square on the right",
                                                  "blue triangle"]
    first = [Image.open(f).tobytes() for f in files]
    main(predict)
    assert [Image.open(f).tobytes() for f in files] == first, "same seed must give the same images"
    assert len(open("predictions/prompts.jsonl").readlines()) == 3
    main(predict + ["--model.init_args.sampling.seed", "7", "--model.init_args.sampling.sampler", "ddim"])
    assert [Image.open(f).tobytes() for f in files] != first


def test_hybrid_demo_config_trains_and_tests(in_tmp):
    hybrid = ["--config", os.path.join(ROOT, "configs", "demo_hybrid.yaml"), "--config", TINY,
              "--model.init_args.backbone.init_args.depth", "2",
              "--model.init_args.backbone.init_args.layout", "[mamba_h, mamba_w]"]
    main(["fit", *hybrid])
    state = torch.load("ckpt/last.ckpt", weights_only=False)["state_dict"]
    assert "model.blocks.1.mixer.mamba.A_log" in state and "model.blocks.0.mixer.fuse.weight" in state
    main(["test", *hybrid, "--ckpt_path", "ckpt/last.ckpt"])
    assert json.load(open("logs/tiny/version_1/test_scores.json"))["num_images"] == 4


def test_compositional_world_scores_every_task(in_tmp, caplog):
    """The overlay on the tiny run: TensorBoard gets a score per task after validation, test prints and writes one."""
    world = ["--config", DEMO, "--config", TINY, "--config", os.path.join(ROOT, "configs", "world", "compositional.yaml"),
             "--data.init_args.source.init_args.num_test_prompts", "12"]
    keys = {"single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"}
    main(["fit", *world])
    events = EventAccumulator("logs/compositional/version_0").Reload()
    assert {f"val/prompt_following/{key}" for key in keys} <= set(events.Tags()["scalars"])
    with caplog.at_level("INFO"):
        main(["test", *world, "--ckpt_path", "runs/compositional/checkpoints/last.ckpt"])
    scores = json.load(open("logs/compositional/version_1/test_scores.json"))
    assert scores["num_images"] == 12 and set(scores["scores"]) == keys
    table = caplog.text[caplog.text.index("prompt-following (12 prompts):"):]
    assert all(f"\n  {key}" in table for key in keys)


def test_resume_continues_step_and_ema(in_tmp):
    main(["fit", *BASE])
    main(["fit", *BASE, "--trainer.max_steps", "6", "--ckpt_path", "ckpt/last.ckpt"])
    ckpt = torch.load("ckpt/last.ckpt", weights_only=False)
    ema = ema_state(ckpt)
    assert ckpt["global_step"] == 6 and ema["num_updates"] == 6
    assert ckpt["optimizer_states"][0]["state"][0]["step"].item() == 6


def test_callbacks_can_be_removed(in_tmp):
    """An ablation drops the run's own callbacks from the YAML list, turns checkpointing off and drops the base
    file's EMA; training and test still work, and no checkpoint or EMA state is written."""
    main(["fit", *BASE, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    assert not os.path.exists("ckpt")
    main(["fit", *BASE, "--trainer.callbacks", "[]", "--base_callbacks", "[checkpoint]", "--trainer.max_steps", "2"])
    assert ema_state(torch.load("ckpt/last.ckpt", weights_only=True)) is None
    main(["test", *BASE, "--trainer.callbacks", "[]"])
    assert os.path.isfile("logs/tiny/version_2/test_scores.json")


def test_base_callbacks_join_unless_the_run_has_its_own():
    """The base file's callbacks join a run's list, except one whose class the run lists itself, the checkpoint
    without checkpointing and the learning-rate monitor without a logger."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from callbacks import EMA, ImageWriter
    from main import base_callbacks

    base = {"ema": EMA(), "checkpoint": ModelCheckpoint(), "lr_monitor": LearningRateMonitor(),
            "image_writer": ImageWriter()}
    assert base_callbacks(base, [], {}) == list(base.values())
    assert base_callbacks(base, [EMA(decay=0.5)], {}) == [base["checkpoint"], base["lr_monitor"], base["image_writer"]]
    assert base_callbacks(base, [], {"enable_checkpointing": False, "logger": False}) == [base["ema"],
                                                                                       base["image_writer"]]
    assert base_callbacks(base, [], {}, wanted=["checkpoint"]) == [base["checkpoint"]]


def test_checkpoint_of_another_architecture(in_tmp):
    main(["fit", *BASE, "--trainer.max_steps", "2"])
    with pytest.raises(SystemExit, match="checkpoint does not fit this model"):
        main(["test", *BASE, "--ckpt_path", "ckpt/last.ckpt", "--model.init_args.backbone.init_args.depth", "2"])


DISTILL = os.path.join(ROOT, "configs", "distill", "demo.yaml")
FORCING = os.path.join(ROOT, "configs", "distill", "demo_forcing.yaml")
TINY_DISTILL = os.path.join(ROOT, "tests", "configs", "tiny_distill.yaml")
T2MD = os.path.join(ROOT, "configs", "distill", "t2md_512.yaml")
# (override, the config it applies to, or the configs in order)
OVERRIDES = [(FORCING, DISTILL), (os.path.join(ROOT, "configs", "distill", "t2md_512_forcing.yaml"), T2MD)] + [
    (row, DISTILL) for row in sorted(glob.glob(os.path.join(ROOT, "configs", "distill", "ablations", "*.yaml")))] + [
    (data, os.path.join(ROOT, "configs", "teacher_dit_xl2_512.yaml"))
    for data in sorted(glob.glob(os.path.join(ROOT, "configs", "data", "*.yaml")))] + [
    (os.path.join(ROOT, "configs", "curriculum", name), os.path.join(ROOT, "configs", base))
    for name, base in (("demo.yaml", "demo.yaml"), ("demo_extrapolate.yaml", "demo.yaml"),
                       ("dimba.yaml", "teacher_dit_xl2_512.yaml"),
                       ("t2md_hires.yaml", os.path.join("distill", "t2md_512.yaml")))] + [
    (os.path.join(ROOT, "configs", "quality", "demo.yaml"), os.path.join(ROOT, "configs", "demo.yaml")),
    (os.path.join(ROOT, "configs", "world", "compositional.yaml"), os.path.join(ROOT, "configs", "demo.yaml")),
    (os.path.join(ROOT, "configs", "distill", "t2md_pixart512_kd.yaml"), os.path.join(ROOT, "configs", "t2md_pixart512.yaml")),
    (os.path.join(ROOT, "configs", "study", "teacher.yaml"),
     (os.path.join(ROOT, "configs", "demo.yaml"), os.path.join(ROOT, "configs", "world", "compositional.yaml"))),
    (os.path.join(ROOT, "configs", "study", "distill.yaml"), DISTILL),
    (os.path.join(ROOT, "configs", "study", "timing.yaml"), (DISTILL, os.path.join(ROOT, "configs", "study", "distill.yaml")))] + [
    (strategy, os.path.join(ROOT, "configs", base)) for strategy in sorted(glob.glob(os.path.join(ROOT, "configs", "strategies", "*.yaml")))
    for base in ("teacher_dit_xl2_512.yaml", "t2md_pixart512.yaml")]


def test_every_config_file_is_tested():
    every = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    backbones = glob.glob(os.path.join(ROOT, "configs", "backbones", "*.yaml"))  # tests/test_layout.py builds them
    tested = MODEL_CONFIGS + [override for override, _ in OVERRIDES] + backbones + [BASE_CONFIG]
    assert sorted(every) == sorted(set(tested))


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_print_config(config, capsys):
    assert "class_path" in printed_config(capsys, config)["model"]


@pytest.mark.parametrize("override,base_config", OVERRIDES)
def test_distill_overrides_apply(override, base_config, capsys):
    """Each ablation row / stage / data file changes what it says it changes on top of its config."""
    bases = base_config if isinstance(base_config, tuple) else (base_config,)
    base = printed_config(capsys, *bases)
    merged = printed_config(capsys, *bases, override)
    wanted = yaml.safe_load(open(override))

    def check(want, got, where):
        """Every value the override sets is in the merged config (which also holds defaults; keys may be strings; a
        backbone given as a file path is what that file holds)."""
        if isinstance(want, str) and want.endswith(".yaml") and isinstance(got, dict):
            want = yaml.safe_load(open(os.path.join(os.path.dirname(override), want)))
        if isinstance(want, dict):
            for key, value in want.items():
                if str(key).endswith("+"):  # appended to the base config's list: its last items
                    check(value, got[key[:-1]][-len(value):], f"{where}.{key}")
                    continue
                check(value, got[key] if key in got else got[str(key)], f"{where}.{key}")
        elif isinstance(want, list) and want and isinstance(want[0], dict):
            assert len(got) == len(want), where
            for i, (w, g) in enumerate(zip(want, got)):
                check(w, g, f"{where}[{i}]")
        else:
            assert got == want, where

    def changes(want, had) -> bool:
        """Whether some value the override sets differs from the base config's (a missing key differs)."""
        if isinstance(want, dict):
            return any(not isinstance(had, dict) or str(key).rstrip("+") not in had
                       or changes(value, had[str(key).rstrip("+")]) for key, value in want.items())
        return want != had

    check(wanted, merged, "config")
    assert changes(wanted, base), f"{override} sets nothing that {base_config} does not already have"
    if "study" not in override:  # the study's configs bring their own teacher
        assert merged["model"]["init_args"].get("teacher") == base["model"]["init_args"].get("teacher")


@pytest.mark.slow
def test_distill_stages_export_and_student_test(in_tmp):
    """Teacher fit -> stage 1 (forcing) -> stage 2 (KD from stage 1) -> resume -> test -> export -> the exported
    student tested through the hybrid demo's config."""
    main(["fit", *BASE, "--model.init_args.backbone.init_args.depth", "2"])
    main(["fit", "--config", DISTILL, "--config", FORCING, "--config", TINY_DISTILL])
    forcing = torch.load("logs/tiny_distill/forcing/checkpoints/last.ckpt", weights_only=True)
    assert forcing["teacher"]["checkpoint"] == "ckpt/last.ckpt"
    assert all(k.startswith("model.") for k in forcing["state_dict"]), "the teacher is not saved"
    shadow = forcing["callbacks"]["EMA"]["shadow"]
    assert set(shadow) == {k[len("model."):] for k in forcing["state_dict"] if k.startswith("model.blocks.1.mixer.")}, \
        "the EMA averages the student's trained parameters only (forcing: the Mamba mixer of block 1)"
    scalars = EventAccumulator("logs/tiny_distill/forcing").Reload().Tags()["scalars"]
    assert {"train/forcing/block01", "train/loss", "val/forcing/block01"} <= set(scalars)

    distill = ["--config", DISTILL, "--config", TINY_DISTILL,
               "--model.init_args.init_student", "logs/tiny_distill/forcing/checkpoints/last.ckpt"]
    main(["fit", *distill])
    kd_path = "logs/tiny_distill/kd/checkpoints/last.ckpt"
    kd = torch.load(kd_path, weights_only=True)
    scalars = EventAccumulator("logs/tiny_distill/kd").Reload().Tags()["scalars"]
    assert {"train/diffusion", "train/teacher_eps", "train/mixer_features", "train/loss"} <= set(scalars)
    main(["fit", *distill, "--trainer.max_steps", "6", "--ckpt_path", kd_path])
    assert torch.load(kd_path, weights_only=True)["global_step"] == 6

    main(["test", *distill, "--ckpt_path", kd_path])
    assert json.load(open("logs/tiny_distill/kd/test_scores.json"))["num_images"] == 4

    export_main([kd_path, "export"])
    assert sorted(os.listdir("export")) == ["backbone.yaml", "model.safetensors", "student.ckpt"]
    hybrid = ["--config", os.path.join(ROOT, "configs", "demo_hybrid.yaml"), "--config", TINY,
              "--model.init_args.backbone", "export/backbone.yaml", "--trainer.logger.init_args.name", "exported"]
    main(["test", *hybrid, "--ckpt_path", "export/student.ckpt"])
    assert json.load(open("logs/exported/version_0/test_scores.json"))["num_images"] == 4
    assert kd["global_step"] == 4


def run_cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def run_main(folder, monkeypatch, capsys, *args):
    """``main(args)`` in this process, in ``folder``, as ``run_cli`` would run it (without a process start): returns
    its exit code and stderr, where ``sys.exit(message)`` would have printed the message. Any other exception (a
    traceback in a process) fails the test."""
    monkeypatch.chdir(folder)
    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code
    stderr = capsys.readouterr().err
    if isinstance(code, str):
        stderr, code = stderr + code + "\n", 1
    return subprocess.CompletedProcess(args, code, "", stderr)


def assert_one_line_error(result, *expected):
    """The run failed without a traceback, and the last line of stderr is ``error: ...`` holding each ``expected``."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(text in last for text in expected), result.stderr[-2000:]


@pytest.mark.parametrize("args,expected", [
    (["fit", *BASE, "--data.init_args.resolution", "18"], "data.resolution=18 is not divisible by 4"),
    (["test", *BASE, "--ckpt_path", "missing.ckpt"], "--ckpt_path 'missing.ckpt' does not exist"),
    (["predict", *BASE, "--data.init_args.predict_prompts", "nope.txt"], "prompt file 'nope.txt' does not exist"),
    (["fit", *BASE, "--model.init_args.backbone.init_args.nope", "3"], "nope"),
    (["fit", "--config", DISTILL, "--config", TINY_DISTILL, "--model.init_args.teacher_checkpoint", "gone.ckpt"],
     "model.init_args.teacher_checkpoint: 'gone.ckpt' (the teacher's weights"),
    (["fit", "--config", DISTILL, "--config", FORCING, "--config", TINY_DISTILL, "--model.init_args.student.init_args.layout",
      "[attn, attn]"], "its layout has none"),
    (["fit", *BASE, "--model.init_args.backbone.init_args.layout", "[attn, attn]"],
     "backbone.layout lists 2 blocks but backbone.depth is 1; list 1 mixers or set depth: 2"),
    (["fit", *BASE, "--trainer.max_steps", "-5"], "trainer.max_steps: `max_steps` must be a non-negative integer"),
])
def test_bad_input_gives_one_line_error(tmp_path, monkeypatch, capsys, args, expected):
    os.makedirs(tmp_path / "ckpt")
    open(tmp_path / "ckpt" / "last.ckpt", "w").close()  # the distillation configs' teacher path exists
    assert_one_line_error(run_main(tmp_path, monkeypatch, capsys, *args), expected)


@pytest.mark.slow
def test_bad_input_in_a_process_gives_one_line_error(tmp_path):
    """The same check through a real process once: what a user sees, no traceback, the exit code."""
    assert_one_line_error(run_cli(tmp_path, "fit", *BASE, "--data.init_args.resolution", "18"),
                          "data.resolution=18 is not divisible by 4")


def test_yaml_syntax_error_names_the_config_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.yaml").write_text("model:\n  init_args:\n    caption_dropout: [0.1\n")
    result = run_main(tmp_path, monkeypatch, capsys, "fit", *BASE, "--config", "broken.yaml")
    assert_one_line_error(result, "config file 'broken.yaml' is not valid YAML: line 4, column 1: did not find "
                          "expected ',' or ']' (while parsing a flow sequence from line 3, column 22)")


def test_yaml_syntax_error_in_a_backbone_file_names_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "backbone.yaml").write_text("class_path: lit_dimba.models.Backbone\ninit_args:\n  depth: 1: 2\n")
    result = run_main(tmp_path, monkeypatch, capsys, "fit", *BASE, "--model.init_args.backbone", "backbone.yaml")
    assert_one_line_error(result, "model.backbone: sub-config file backbone.yaml is not valid YAML: mapping values are "
                          "not allowed in this context at line 3, column 11")


OTHER_MODULE = '''
from lit_dimba.modules import DiffusionModule


class Other(DiffusionModule):
    """Another model class."""
'''


def test_checkpoint_of_another_model_class(in_tmp, monkeypatch, capsys):
    """LightningCLI builds the class a checkpoint was written by (from its saved hyperparameters) with the config's
    arguments: a checkpoint of another class tested with the DiffusionModule config is refused, naming both classes.
    Checkpoints written as lit_dimba.modules.TeacherDiT / HybridStudent (before issue 15) load as DiffusionModule."""
    (in_tmp / "other.py").write_text(OTHER_MODULE)
    hybrid = ["--model.init_args.backbone.init_args.layout", "[mamba_w]"]
    main(["fit", *BASE, *hybrid, "--trainer.max_steps", "2", "--trainer.callbacks",
          "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: ckpt, save_last: true}}]"])
    checkpoint = torch.load("ckpt/last.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "other.Other"
    torch.save(checkpoint, "other.ckpt")
    checkpoint["hyper_parameters"]["_class_path"] = "lit_dimba.modules.HybridStudent"
    torch.save(checkpoint, "hybrid.ckpt")
    with importable(in_tmp):
        assert_one_line_error(run_main(in_tmp, monkeypatch, capsys, "test", *BASE, *hybrid, "--ckpt_path", "other.ckpt"),
                              "--ckpt_path 'other.ckpt' was written by other.Other but the config "
                              "builds lit_dimba.modules.DiffusionModule", "use the config the checkpoint was trained with")
    assert_one_line_error(run_main(in_tmp, monkeypatch, capsys, "test", *BASE, *hybrid, "--ckpt_path", "ckpt/last.ckpt",
                                   "--model.init_args.backbone.init_args.layout", "[mamba_w, mamba_w]",
                                   "--model.init_args.backbone.init_args.depth", "2"),
                          "the checkpoint does not fit this model")
    main(["test", *BASE, *hybrid, "--ckpt_path", "hybrid.ckpt", "--trainer.callbacks", "[]"])  # an old class name
    main(["test", *BASE, *hybrid, "--ckpt_path", "ckpt/last.ckpt", "--model.class_path",
          "lit_dimba.modules.diffusion.DiffusionModule", "--trainer.callbacks", "[]"])  # the same class by another path
    assert len(glob.glob("logs/tiny/version_*/test_scores.json")) == 2


STOPPER = '''
from lightning.pytorch.callbacks import Callback

from lit_dimba.errors import TrainingStopped


class Stop(Callback):
    """Stops the run at its first training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise TrainingStopped(f"step {trainer.global_step}: stopped on purpose; resume with --ckpt_path")
'''


def test_training_stopped_gives_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "stopper.py").write_text(STOPPER)
    with importable(tmp_path):
        result = run_main(tmp_path, monkeypatch, capsys, "fit", *BASE, "--trainer.callbacks", "stopper.Stop")
    assert_one_line_error(result, "error: step 0: stopped on purpose; resume with --ckpt_path")


def test_predict_at_another_size_and_aspect(in_tmp):
    """Sampling takes any height x width the patch divides (the PE is computed for the grid)."""
    main(["fit", *BASE, "--trainer.max_steps", "2"])
    with open("prompts.txt", "w") as f:
        f.write("a red circle in the top left corner\n")
    main(["predict", *BASE, "--ckpt_path", "ckpt/last.ckpt", "--data.init_args.predict_prompts", "prompts.txt",
          "--model.init_args.sampling.height", "16", "--model.init_args.sampling.width", "32"])
    assert Image.open("predictions/00000.png").size == (32, 16)
