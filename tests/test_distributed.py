"""Several processes through the real CLI on CPU (gloo): DDP fit/test/predict with every callback, and FSDP
(``lit_dimba.strategies.DiffusionFSDP``) against DDP for the teacher and the distillation wrapper."""

import json
import os
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_dimba.checkpoints import ema_state
from lit_dimba.eval.prompt_following import SCORES
from tests.conftest import ROOT, STEPS, launch, run_args, run_here

pytestmark = pytest.mark.slow

DISTILL = os.path.join(ROOT, "configs", "distill", "demo.yaml")
FORCING = os.path.join(ROOT, "configs", "distill", "demo_forcing.yaml")
TINY_DISTILL = os.path.join(ROOT, "tests", "configs", "tiny_distill.yaml")
FSDP = json.dumps({"class_path": "lit_dimba.strategies.DiffusionFSDP"})

def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def ema_shadow(checkpoint: dict) -> dict:
    return ema_state(checkpoint)["shadow"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_ddp_fit_test_predict_with_every_callback(in_tmp, ddp_run):
    """conftest's shared run (every callback) fitted under DDP (``ddp_run``), then tested and predicted from."""
    shards = [(ddp_run / f"captions-{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == STEPS * 4  # STEPS steps of batch 4 on each rank
    assert not set(shards[0]) & set(shards[1]), "the ranks saw the same samples"
    assert load(ddp_run / "ckpt" / "last.ckpt")["global_step"] == STEPS
    speed = json.loads((ddp_run / "speed.json").read_text())
    assert speed["world_size"] == 2 and speed["steps"] == STEPS - 1 and speed["images_per_sec"] > 0
    # the PromptFollowing callback scored on both ranks and logged its summed counts
    scalars = EventAccumulator(str(ddp_run / "logs" / "tiny" / "version_0")).Reload().Tags()["scalars"]
    assert {f"val/prompt_following/{key}" for key in SCORES} <= set(scalars)

    checkpoint = str(ddp_run / "ckpt" / "last.ckpt")
    launch(in_tmp, *run_args("ddp", subcommand="test"), "--ckpt_path", checkpoint)
    scores = json.load(open("logs/tiny/version_0/test_scores.json"))
    assert set(scores["scores"]) == {"colour", "shape", "position", "size", "all"}
    with open("prompts.txt", "w") as f:
        f.write("a red circle\na blue square\na green triangle\n")
    launch(in_tmp, *run_args("ddp", subcommand="predict"), "--ckpt_path", checkpoint,
           "--data.init_args.predict_prompts", "prompts.txt")
    assert sorted(os.listdir("predictions"))[:3] == ["00000.png", "00001.png", "00002.png"]


def test_fsdp_equals_ddp_and_resumes_on_one_process(in_tmp, ddp_run):
    """Same seed, same run (conftest's run_args: validation, sampling and prompt-following scores through the EMA):
    the weights and the EMA saved under FSDP equal DDP's (``ddp_run``); the FSDP checkpoint refuses a smaller model
    in one line, then resumes without FSDP on one process."""
    launch(in_tmp, *run_args(FSDP))
    ddp, fsdp = load(ddp_run / "ckpt" / "last.ckpt"), load("ckpt/last.ckpt")
    assert fsdp["global_step"] == STEPS and set(fsdp["state_dict"]) == set(ddp["state_dict"])
    assert all(k.startswith("model.") for k in fsdp["state_dict"]), "frozen encoders must not be gathered"
    assert max_difference(ddp["state_dict"], fsdp["state_dict"]) <= 1e-6
    assert max_difference(ema_shadow(ddp), ema_shadow(fsdp)) <= 1e-6
    assert max_difference(ema_shadow(fsdp), {k[6:]: v for k, v in fsdp["state_dict"].items()
                                             if k[6:] in ema_shadow(fsdp)}) > 0, "EMA must differ from the weights"

    # the FSDP checkpoint into a smaller model: one clear line naming the tensors (in this process, without FSDP)
    with pytest.raises(SystemExit, match=r"does not fit this model \(.*blocks\.1"):
        run_here(in_tmp, *run_args("auto"), "--model.init_args.backbone.init_args.depth", "1",
                 "--ckpt_path", "ckpt/last.ckpt")

    run_here(in_tmp, *run_args("auto"), "--trainer.max_steps", str(STEPS + 2), "--ckpt_path", "ckpt/last.ckpt")
    resumed = load("ckpt/last.ckpt")
    assert resumed["global_step"] == STEPS + 2
    assert ema_state(resumed)["num_updates"] == STEPS + 2


@pytest.mark.parametrize("stage", ["forcing", "kd"])
def test_distillation_under_fsdp_leaves_the_teacher_whole(stage, in_tmp, teacher_checkpoint):
    (in_tmp / "ckpt").mkdir()
    shutil.copy(teacher_checkpoint, in_tmp / "ckpt" / "last.ckpt")  # tiny_distill.yaml's teacher_checkpoint
    trained = load("ckpt/last.ckpt")
    teacher = {**trained["state_dict"], **{"model." + k: v for k, v in ema_shadow(trained).items()}}  # teacher_ema
    args = ["fit", "--config", DISTILL, "--config", TINY_DISTILL, "--trainer.strategy", FSDP,
            "--model.init_args.init_student", "null"]
    if stage == "forcing":
        args[3:3] = ["--config", FORCING]
    launch(in_tmp, *args)
    version = "forcing" if stage == "forcing" else "kd"
    student = load(f"logs/tiny_distill/{version}/checkpoints/last.ckpt")
    assert student["global_step"] == 4 and all(k.startswith("model.") for k in student["state_dict"])
    copied = [k for k in student["state_dict"] if ".mixer." not in k]
    assert copied and all(torch.equal(student["state_dict"][k], teacher[k]) for k in copied), "only mixers train"
    mamba = [k for k in student["state_dict"] if "blocks.1.mixer" in k]
    assert mamba and set(mamba) <= {"model." + k for k in ema_shadow(student)}
    if stage == "kd":  # the hybrid samples under FSDP too (its Scan2D weights are not frozen from shards)
        launch(in_tmp, "test", *args[1:], "--ckpt_path", f"logs/tiny_distill/{version}/checkpoints/last.ckpt")
        scores = json.load(open(f"logs/tiny_distill/{version}/test_scores.json"))
        assert set(scores["scores"]) == {"colour", "shape", "position", "size", "all"}
