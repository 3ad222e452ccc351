"""A run killed with SIGKILL and resumed from its last checkpoint continues exactly as if it had not stopped: the same
losses step by step (bitwise on a CPU) and the same EMA, on one process and under DDP on two. The run is conftest's
shared one (``run_args``: every callback, validation and sampling through the EMA); under DDP its uninterrupted
version is the ``ddp_run`` that tests/test_distributed.py tests, predicts from and compares FSDP with."""

import pytest
import torch

from lit_dimba.checkpoints import ema_state
from tests.conftest import STEPS, launch, run_args, run_here

pytestmark = pytest.mark.slow

KILL = 5  # checkpoints every EVERY=2 of the STEPS=8 steps; killed after step 5, resumed from step 4


def losses(folder, rank: int) -> dict[int, str]:
    """Step -> loss (float.hex) of a rank; a step logged twice (before the kill and after the resume) keeps the last."""
    lines = (folder / f"losses-{rank}.txt").read_text().split()
    return dict(zip(map(int, lines[::2]), lines[1::2]))


def check_resumed_equals_straight(straight, killed, devices: int):
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


def kill_and_resume(killed, devices: int, strategy: str, resume=launch):
    """The run killed after step KILL (a process of its own), then resumed from its checkpoint of step KILL - 1 with
    ``resume`` (``launch``, or ``run_here`` on one process)."""
    killed.mkdir()
    kill = {"class_path": "launch.KillAt", "init_args": {"step": KILL}}
    result = launch(killed, *run_args(strategy, kill), devices=devices, check=False)
    assert result.returncode != 0 and not (killed / "ckpt" / "epoch=0-step=6.ckpt").exists(), "the run was not killed"
    assert max(losses(killed, 0)) == KILL
    extra = {"devices": devices} if resume is launch else {}
    resume(killed, *run_args(strategy), "--ckpt_path", f"ckpt/epoch=0-step={KILL - 1}.ckpt", **extra)


def test_sigkill_and_resume_reproduce_the_uninterrupted_run_on_one_process(tmp_path):
    """The uninterrupted run and the resume run in this process (run_here computes as a launched process does)."""
    straight = tmp_path / "straight"
    straight.mkdir()
    run_here(straight, *run_args("auto"))
    kill_and_resume(tmp_path / "killed", 1, "auto", resume=run_here)
    check_resumed_equals_straight(straight, tmp_path / "killed", 1)


def test_sigkill_and_resume_reproduce_the_uninterrupted_run_under_ddp(tmp_path, ddp_run):
    kill_and_resume(tmp_path / "killed", 2, "ddp")
    check_resumed_equals_straight(ddp_run, tmp_path / "killed", 2)
