"""Training speed: images per second over all ranks and peak GPU memory, measured after a warm-up."""

import json
import os
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class Throughput(Callback):
    """Times the optimizer steps after the first ``warmup_steps`` (compilation, autotuning, allocator warm-up) to
    the end of ``fit``, counting the images of every rank. At the end rank 0 prints the result, logs
    ``perf/images_per_sec`` and ``perf/peak_memory_gib`` and, with ``output``, writes them as JSON together with the
    world size and the number of timed steps. The device is synchronised twice (start and end of the window),
    never inside it.
    """

    def __init__(self, warmup_steps: int = 10, output: str | None = None):
        self.warmup_steps = warmup_steps
        self.output = output
        self._start: float | None = None
        self._images = 0
        self._steps = 0

    @staticmethod
    def _synchronize(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None:
            self._images += len(batch["caption"])
            self._steps += 1
        elif trainer.global_step >= self.warmup_steps:
            self._synchronize(pl_module)
            self._start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._synchronize(pl_module)
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        images = trainer.strategy.reduce(torch.tensor(float(self._images), device=pl_module.device), reduce_op="sum")
        peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if pl_module.device.type == "cuda" else 0.0
        peak = trainer.strategy.reduce(torch.tensor(peak, device=pl_module.device), reduce_op="max")
        if not trainer.is_global_zero:
            return
        if not self._steps or elapsed <= 0:
            rank_zero_info(f"Throughput: fewer than {self.warmup_steps + 1} steps, nothing timed")
            return
        result = {"images_per_sec": images.item() / elapsed, "steps": self._steps, "seconds": elapsed,
                  "world_size": trainer.world_size, "peak_memory_gib": peak.item()}
        rank_zero_info(f"Throughput: {result['images_per_sec']:.2f} images/s over {self._steps} steps on "
                       f"{trainer.world_size} rank(s), peak memory {result['peak_memory_gib']:.1f} GiB")
        if trainer.logger is not None:
            trainer.logger.log_metrics({"perf/images_per_sec": result["images_per_sec"],
                                        "perf/peak_memory_gib": result["peak_memory_gib"]}, trainer.global_step)
        if self.output:
            os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
            with open(self.output, "w") as f:
                json.dump(result, f, indent=1)
