"""A NaN loss is skipped (not applied to the weights or the EMA) and counted; too many stop the run with one line."""

import json
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_dimba.checkpoints import ema_state
from lit_dimba.errors import TrainingStopped
from main import main
from tests.conftest import DEMO, TINY, launch

POISON = '''
import torch
from lightning.pytorch.callbacks import Callback


class PoisonBatch(Callback):
    """Makes the images of the batches at the given steps NaN, so their loss is NaN."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["image"].fill_(float("nan"))
'''


def fit(tmp, poison_steps, *extra):
    (tmp / "poison.py").write_text(POISON)
    sys.path.insert(0, str(tmp))
    callbacks = [{"class_path": "poison.PoisonBatch", "init_args": {"steps": poison_steps}},
                 {"class_path": "callbacks.EMA", "init_args": {"decay": 0.5, "warmup": False}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpt", "save_last": True, "save_top_k": -1, "every_n_train_steps": 1}}]
    try:
        main(["fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", "4", "--trainer.limit_val_batches",
              "0", "--trainer.callbacks", json.dumps(callbacks), *extra])
    finally:
        sys.path.remove(str(tmp))


def test_a_nan_loss_is_skipped_and_counted(in_tmp):
    skipped = r"step 3: the loss is nan on this rank \(batch of 4: '.*\): its update is skipped \(1 of at most 10\)"
    with pytest.warns(UserWarning, match=skipped):
        fit(in_tmp, [2])
    before, after, last = (torch.load(f"ckpt/{name}.ckpt", weights_only=True)
                           for name in ("epoch=0-step=2", "epoch=0-step=3", "last"))
    for name, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][name], value), f"the NaN step changed {name}"
    adam = [s["step"] for s in after["optimizer_states"][0]["state"].values()]
    assert adam and all(step == 2 for step in adam), "the NaN step reached the optimizer state"
    assert last["global_step"] == 4 and not torch.equal(last["state_dict"]["model.final_layer.linear.weight"],
                                                        after["state_dict"]["model.final_layer.linear.weight"])
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in ema_state(last)["shadow"].values())
    events = EventAccumulator("logs/tiny/version_0").Reload()
    assert {e.value for e in events.Scalars("train/nonfinite_steps")} == {1.0}  # a running count


def test_too_many_nan_losses_stop_the_run_in_one_line(in_tmp):
    with pytest.raises((TrainingStopped, SystemExit)) as info:
        fit(in_tmp, [2], "--model.init_args.skip_nonfinite", "0")
    message = str(info.value.code if isinstance(info.value, SystemExit) else info.value)
    assert "\n" not in message.strip()
    assert "step 3: the loss is nan" in message and "more than model.skip_nonfinite=0" in message
    assert "the last checkpoint is" in message and "ckpt/last.ckpt" in message and "--ckpt_path" in message


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """Under DDP the ranks agree to drop the step (no rank waits in the gradient all-reduce for another)."""
    (tmp_path / "poison.py").write_text(POISON.replace("trainer.global_step in self.steps",
                                                       "trainer.global_step in self.steps and trainer.global_rank == 0"))
    callbacks = [{"class_path": "poison.PoisonBatch", "init_args": {"steps": [1]}},
                 {"class_path": "launch.RecordLosses"},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpt", "save_top_k": -1, "every_n_train_steps": 1}}]
    result = launch(tmp_path, "fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", "3",
                    "--trainer.limit_val_batches", "0", "--trainer.callbacks", json.dumps(callbacks),
                    "--trainer.strategy", "ddp")
    assert "step 2: the loss is nan" in result.stderr
    for rank in (0, 1):  # rank 1's loss was finite, but it dropped the step too: its weights stay finite
        steps = dict(line.split() for line in (tmp_path / f"losses-{rank}.txt").read_text().splitlines())
        assert all(float.fromhex(v) == float.fromhex(v) for k, v in steps.items() if k != "2"), rank
    before, after = (torch.load(tmp_path / "ckpt" / f"epoch=0-step={s}.ckpt", weights_only=True) for s in (1, 2))
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
