"""A run killed with SIGKILL and resumed from its last checkpoint continues exactly as if it had not stopped: the same
losses step by step (bitwise on a CPU) and the same EMA, on one process and under DDP on two."""

import json

import pytest
import torch

from lit_dimba.checkpoints import ema_state
from tests.conftest import DEMO, TINY, launch

STEPS, KILL, EVERY = 8, 5, 2  # checkpoints at steps 2, 4, 6, 8; killed after step 5, resumed from step 4


def losses(folder, rank: int) -> dict[int, str]:
    """Step -> loss (float.hex) of a rank; a step logged twice (before the kill and after the resume) keeps the last."""
    lines = (folder / f"losses-{rank}.txt").read_text().split()
    return dict(zip(map(int, lines[::2]), lines[1::2]))


def run(folder, devices: int, *extra, kill: bool = False):
    callbacks = [{"class_path": "launch.RecordLosses"},
                 {"class_path": "callbacks.EMA", "init_args": {"decay": 0.9, "warmup": False}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpt", "save_top_k": -1, "every_n_train_steps": EVERY, "save_last": True}}]
    if kill:
        callbacks.append({"class_path": "launch.KillAt", "init_args": {"step": KILL}})
    args = ["fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", str(STEPS),
            "--trainer.limit_val_batches", "0", "--trainer.callbacks", json.dumps(callbacks),
            "--trainer.strategy", "ddp" if devices > 1 else "auto", *extra]
    return launch(folder, *args, devices=devices, check=not kill)


@pytest.mark.parametrize("devices", [1, 2])
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path, devices):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run(straight, devices)
    result = run(killed, devices, kill=True)
    assert result.returncode != 0 and not (killed / "ckpt" / "epoch=0-step=6.ckpt").exists(), "the run was not killed"
    assert max(losses(killed, 0)) == KILL
    run(killed, devices, "--ckpt_path", f"ckpt/epoch=0-step={KILL - 1}.ckpt")
    for rank in range(devices):
        expected, got = losses(straight, rank), losses(killed, rank)
        assert [got[s] for s in range(KILL, STEPS + 1)] == [expected[s] for s in range(KILL, STEPS + 1)], rank
        assert len(set(expected.values())) == STEPS, "every step draws new noise"
    final = [torch.load(f / "ckpt" / "last.ckpt", weights_only=True) for f in (straight, killed)]
    assert final[0]["global_step"] == final[1]["global_step"] == STEPS
    for name, value in ema_state(final[0])["shadow"].items():
        assert torch.equal(value, ema_state(final[1])["shadow"][name]), name
    assert final[0]["training_generators"].shape[0] == devices
    if devices == 2:  # each rank has its own random stream (seeded by the run's seed and the rank)
        assert losses(straight, 0) != losses(straight, 1)
        assert not torch.equal(*final[0]["training_generators"])
