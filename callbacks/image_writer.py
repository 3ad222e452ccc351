"""Writes ``predict`` outputs as PNG files plus a JSON-lines index of prompts."""

import json
import os

from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image


class ImageWriter(BasePredictionWriter):
    """Saves each predicted image as ``output_dir/{index:05d}.png`` and appends
    ``{"index", "file", "caption"}`` to ``output_dir/prompts.jsonl`` (one file per rank when distributed)."""

    def __init__(self, output_dir: str = "outputs"):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def _index_path(self, trainer) -> str:
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return os.path.join(self.output_dir, f"prompts{suffix}.jsonl")

    def on_predict_start(self, trainer, pl_module) -> None:
        """Start a fresh prompt index; images of the same index are overwritten."""
        os.makedirs(self.output_dir, exist_ok=True)
        open(self._index_path(trainer), "w").close()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        with open(self._index_path(trainer), "a", encoding="utf-8") as index_file:
            for image, caption, index in zip(prediction["images"], prediction["caption"], prediction["index"]):
                name = f"{int(index):05d}.png"
                save_image((image.float().cpu() + 1) / 2, os.path.join(self.output_dir, name))
                index_file.write(json.dumps({"index": int(index), "file": name, "caption": caption}) + "\n")
