import os
import subprocess
import sys

import pytest
import torch

# Under pytest-xdist (make test: one worker per core) each worker gets its share of the cores for torch's threads,
# and so do the processes it starts (OMP_NUM_THREADS): with every worker on every core, the tiny models' ops wait on
# each other's threads and an in-process fit runs several times slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder, so relative run/checkpoint paths of the configs land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# A script that runs main.py, so that Lightning's DDP/FSDP launcher can start it once per rank; it also holds
# callbacks the tests list by class path (launch.RecordCaptions, launch.RecordLosses, launch.KillAt).
LAUNCHER = '''
import os, signal, sys
from lightning.pytorch.callbacks import Callback


class RecordCaptions(Callback):
    """Writes the captions of every training batch of this rank to captions-<rank>.txt."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(f"captions-{trainer.global_rank}.txt", "a") as f:
            f.writelines(caption + "\\n" for caption in batch["caption"])


class RecordLosses(Callback):
    """Appends "<step> <loss as float.hex>" of every training step of this rank to losses-<rank>.txt."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(f"losses-{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {loss.item().hex()}\\n")


class KillAt(Callback):
    """SIGKILLs this process at the end of training step ``step`` (before that step's checkpoint is written:
    Lightning runs checkpoint callbacks last)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    from main import main
    main(sys.argv[1:])
    open(f"finished-{os.environ.get('LOCAL_RANK', '0')}", "w").close()
'''


def launch(folder, *args, devices: int = 2, timeout: int = 300, check: bool = True):
    """``main.py`` with ``args`` in ``folder`` on ``devices`` CPU processes (gloo); with ``check``, fails the test
    unless every rank finished without error. Returns the completed process."""
    (folder / "launch.py").write_text(LAUNCHER)
    for marker in folder.glob("finished-*"):
        marker.unlink()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "launch.py", *args, "--trainer.devices", str(devices)]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
        assert len(list(folder.glob("finished-*"))) == devices, "a rank did not finish"
    return result


BACKBONES = os.path.join(ROOT, "configs", "backbones")
# Test size for the backbones of configs/backbones/ (what they were at 2 blocks of width 64 before): 4-channel
# latents, a 32-channel text encoder with 16 tokens, small Mamba-2 mixers, the default PE, no recomputation.
TINY_BACKBONE = dict(depth=2, hidden_size=64, num_heads=2, caption_channels=32, token_num=16, base_size=None,
                     gradient_checkpointing=False, mamba=dict(d_state=16, headdim=16, chunk_size=16))


def tiny_backbone(name: str, **overrides):
    """The layout of ``configs/backbones/<name>.yaml`` at test size (``TINY_BACKBONE``), with keyword overrides."""
    from lit_dimba.models.backbone import Backbone

    return Backbone.from_file(os.path.join(BACKBONES, f"{name}.yaml"), **{**TINY_BACKBONE, **overrides})
