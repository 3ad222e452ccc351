"""Resolution curriculum: the schedule, stage switches at exact steps through the CLI, resume inside a stage."""

import json
import math
import os

import numpy as np
import pytest
import yaml
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.curriculum import CurriculumBatchSampler, ResolutionSchedule, Stage
from lit_dimba.errors import ConfigError
from main import main
from tests.conftest import DEMO, ROOT, TINY
from tests.test_pe import UsedPE, reference_pe

STAGES = [Stage(2, {16: 1.0}, 4), Stage(5, {16: 0.5, 32: 0.5}, 2), Stage(7, {32: 1.0}, 2)]


def test_schedule_stages_and_mixed_draws():
    schedule = ResolutionSchedule(STAGES, default_batch_size=8, seed=0)
    assert [schedule.at(s)[0] for s in range(9)] == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert schedule.at(0)[1:] == (16, 4) and schedule.at(6)[1:] == (32, 2)
    mixed = ResolutionSchedule([Stage(10_000, {512: 0.2, 1024: 0.8})], 8, seed=3)
    draws = [mixed.at(s)[1] for s in range(2000)]
    assert 0.75 < draws.count(1024) / len(draws) < 0.85
    assert draws == [mixed.at(s)[1] for s in range(2000)], "a step's draw is a function of (seed, step)"
    assert draws != [ResolutionSchedule(mixed.stages, 8, seed=4).at(s)[1] for s in range(2000)]
    with pytest.raises(ConfigError, match="increasing until_step"):
        ResolutionSchedule([Stage(5, {16: 1.0}), Stage(3, {32: 1.0})], 8)
    with pytest.raises(ConfigError, match="weights > 0"):
        ResolutionSchedule([Stage(5, {})], 8)


def test_sampler_splits_ranks_and_resumes():
    schedule = ResolutionSchedule(STAGES, 8)
    ranks = [list(CurriculumBatchSampler(10, schedule, 7, rank=r, num_replicas=2)) for r in range(2)]
    assert [len(batch) for batch in ranks[0]] == [4, 4, 2, 2, 2, 2, 2] == [len(batch) for batch in ranks[1]]
    assert [b[0][1] for b in ranks[0]] == [b[0][1] for b in ranks[1]], "ranks agree on each step's size"
    first_pass = [i for batch in ranks[0][:1] + ranks[1][:1] for i, _ in batch]
    assert len(set(first_pass)) == 8, "ranks take disjoint items"
    sampler = CurriculumBatchSampler(10, schedule, 7)
    full = list(sampler)
    resumed = CurriculumBatchSampler(10, schedule, 7)
    it = iter(resumed)
    head = [next(it) for _ in range(3)]
    state = resumed.state_dict()
    again = CurriculumBatchSampler(10, schedule, 7)
    again.load_state_dict(state)
    assert head + list(again) == full


class RecordShapes(Callback):
    """Writes, per training step, the batch's shape and captions and whether the PE the training forward added is
    the sin-cos of the batch's grid interpolated to ``base_grid`` (``tests.test_pe.reference_pe``); the validation
    forwards' shapes and PE checks go to ``val-<path>``."""

    def __init__(self, path: str, base_grid: int):
        self.path = path
        self.base_grid = base_grid

    def on_fit_start(self, trainer, pl_module):
        self.used = UsedPE(pl_module.model)

    def interpolated(self, pl_module) -> bool:
        h, w = self.used.grid
        expected = reference_pe(pl_module.model.hidden_size, h, w, self.base_grid / math.sqrt(h * w))
        return bool(np.abs(self.used.pe - expected).max() < 1e-5)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "shape": list(batch["image"].shape),
                                "captions": batch["caption"], "pe_interpolated": self.interpolated(pl_module)}) + "\n")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with open(f"val-{self.path}", "a") as f:
            f.write(json.dumps({"shape": list(batch["image"].shape),
                                "pe_interpolated": self.interpolated(pl_module)}) + "\n")


def run(record: str, *extra):
    callbacks = [
        {"class_path": "callbacks.ResolutionCurriculum", "init_args": {"stages": [
            {"until_step": s.until_step, "resolutions": s.resolutions, "batch_size": s.batch_size} for s in STAGES]}},
        {"class_path": "callbacks.PEInterpolation", "init_args": {"base_resolution": 16}},
        {"class_path": "tests.test_curriculum.RecordShapes", "init_args": {"path": record, "base_grid": 4}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpt", "save_top_k": -1, "every_n_train_steps": 1}},
    ]
    main(["fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", "7", "--trainer.val_check_interval", "3",
          "--trainer.callbacks", json.dumps(callbacks), *extra])
    return [json.loads(line) for line in open(record)]


def test_stages_switch_at_their_step_and_resume_inside_a_stage(in_tmp):
    full = run("full.jsonl")
    schedule = ResolutionSchedule(STAGES, 4)
    assert [r["step"] for r in full] == list(range(7))
    for record in full:
        _, resolution, batch_size = schedule.at(record["step"])
        assert record["shape"] == [batch_size, 3, resolution, resolution], record
        assert record["pe_interpolated"], "the PE of each batch is interpolated from its own grid"
    assert {r["shape"][-1] for r in full[2:5]} == {16, 32}, "stage 2 mixes both resolutions"
    validation = [json.loads(line) for line in open("val-full.jsonl")]
    assert validation and all(r["shape"][-1] == 16 and r["pe_interpolated"] for r in validation), \
        "validation runs at data.resolution whatever the stage"
    scalars = EventAccumulator("logs/tiny/version_0").Reload()
    assert [e.value for e in scalars.Scalars("curriculum/stage")] == [0, 0, 1, 1, 1, 2, 2]
    assert [e.value for e in scalars.Scalars("curriculum/resolution")] == [r["shape"][-1] for r in full]
    assert [e.value for e in scalars.Scalars("pe/interpolation")] == [r["shape"][-1] / 16 for r in full]
    assert "val/loss" in scalars.Tags()["scalars"]

    resumed = run("resumed.jsonl", "--ckpt_path", "ckpt/epoch=0-step=3.ckpt")  # inside stage 2
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert resumed == full[3:], "same stages, same draws, same items"


@pytest.mark.parametrize("name", ["demo.yaml", "dimba.yaml", "t2md_hires.yaml"])
def test_curriculum_configs_run_at_tiny_scale(in_tmp, name):
    """Each curriculum config's stages, scaled to 2 steps each on the tiny model (resolutions 16, 24, 32 in the
    order of the config's, mixes kept), switch and shape batches as scheduled."""
    callbacks = yaml.safe_load(open(os.path.join(ROOT, "configs", "curriculum", name)))["trainer"]["callbacks+"]
    curriculum = next(c for c in callbacks if c["class_path"] == "callbacks.ResolutionCurriculum")["init_args"]
    base = next(c for c in callbacks if c["class_path"] == "callbacks.PEInterpolation")["init_args"]["base_resolution"]
    sizes = sorted({int(r) for stage in curriculum["stages"] for r in stage["resolutions"]} | {base})
    tiny = {r: 16 + 8 * i for i, r in enumerate(sizes)}
    stages = [Stage(2 * (i + 1), {tiny[int(r)]: w for r, w in stage["resolutions"].items()}, 2)
              for i, stage in enumerate(curriculum["stages"])]
    tiny_callbacks = [
        {"class_path": "callbacks.ResolutionCurriculum", "init_args": {"stages": [
            {"until_step": s.until_step, "resolutions": s.resolutions, "batch_size": 2} for s in stages]}},
        {"class_path": "callbacks.PEInterpolation", "init_args": {"base_resolution": tiny[base]}},
        {"class_path": "tests.test_curriculum.RecordShapes",
         "init_args": {"path": "shapes.jsonl", "base_grid": tiny[base] // 4}},
    ]
    main(["fit", "--config", DEMO, "--config", TINY, "--trainer.max_steps", str(2 * len(stages)),
          "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
          "--trainer.callbacks", json.dumps(tiny_callbacks)])
    records = [json.loads(line) for line in open("shapes.jsonl")]
    schedule = ResolutionSchedule(stages, 2)
    assert [r["shape"] for r in records] == [[2, 3, schedule.at(s)[1], schedule.at(s)[1]] for s in range(len(records))]
    assert all(r["pe_interpolated"] for r in records)


def test_curriculum_with_aspect_buckets(in_tmp):
    """Buckets under a curriculum: each batch is one bucket of the table at its step's resolution; resumable."""
    from datamodules.buckets import bucket_sizes
    from tests.test_sources import SHAPES, image_folder, source_yaml

    root = image_folder(in_tmp / "data", n=18, sizes=lambda i: SHAPES[i % 3])
    source = source_yaml(in_tmp, {"class_path": "datamodules.ImageFolderSource",
                                  "init_args": {"root": root, "caption_column": "caption", "num_val": 0}})
    bucketed = ["--data.init_args.source", source, "--data.init_args.buckets", "true",
                "--data.init_args.bucket_multiple", "4", "--trainer.limit_val_batches", "0"]
    full = run("full.jsonl", *bucketed)
    schedule = ResolutionSchedule(STAGES, 4)
    for record in full:
        _, resolution, batch_size = schedule.at(record["step"])
        assert record["shape"][0] == batch_size and tuple(record["shape"][2:]) in bucket_sizes(resolution, 4, 2.0)
        numbers = [int(c.split()[-1]) for c in record["captions"]]
        assert len({SHAPES[n % 3] for n in numbers}) == 1, "one aspect bucket per batch"
        assert record["pe_interpolated"], "a bucket's PE steps by base / sqrt(h * w) on both axes"
    assert len({tuple(r["shape"][2:]) for r in full}) > 2
    resumed = run("resumed.jsonl", *bucketed, "--ckpt_path", "ckpt/epoch=0-step=3.ckpt")
    assert resumed == full[3:]
