"""The LightningCLI end to end on a seconds-long tiny run: fit, resume, test, predict, configs, bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from main import main
from tests.conftest import DEMO, ROOT, TINY

BASE = ["--config", DEMO, "--config", TINY]


def test_fit_test_predict(in_tmp):
    main(["fit", *BASE])
    ckpt = torch.load("ckpt/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    weights = ckpt["state_dict"]
    assert weights and all(k.startswith("model.") for k in weights), "frozen encoders must not be checkpointed"
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
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


def test_resume_continues_step_and_ema(in_tmp):
    main(["fit", *BASE])
    main(["fit", *BASE, "--trainer.max_steps", "6", "--ckpt_path", "ckpt/last.ckpt"])
    ckpt = torch.load("ckpt/last.ckpt", weights_only=False)
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    assert ckpt["global_step"] == 6 and ema["num_updates"] == 6
    assert ckpt["optimizer_states"][0]["state"][0]["step"].item() == 6


def test_callbacks_can_be_removed(in_tmp):
    """An ablation drops callbacks from the YAML list; training, test and checkpointing still work."""
    main(["fit", *BASE, "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    main(["test", *BASE, "--trainer.callbacks", "[]"])
    assert os.path.isfile("logs/tiny/version_1/test_scores.json")


def test_checkpoint_of_another_architecture(in_tmp):
    main(["fit", *BASE, "--trainer.max_steps", "2"])
    with pytest.raises(SystemExit, match="checkpoint does not fit this model"):
        main(["test", *BASE, "--ckpt_path", "ckpt/last.ckpt", "--model.init_args.backbone.init_args.depth", "2"])


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def run_cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,expected", [
    (["fit", *BASE, "--data.init_args.resolution", "18"], "data.resolution=18 is not divisible by 4"),
    (["test", *BASE, "--ckpt_path", "missing.ckpt"], "--ckpt_path 'missing.ckpt' does not exist"),
    (["predict", *BASE, "--data.init_args.predict_prompts", "nope.txt"], "prompt file 'nope.txt' does not exist"),
    (["fit", *BASE, "--model.init_args.backbone.init_args.nope", "3"], "nope"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, expected):
    result = run_cli(tmp_path, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert expected in result.stderr and last.startswith("error:"), result.stderr[-2000:]
