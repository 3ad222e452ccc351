"""Exponential moving average of the trained network's weights, used for evaluation and sampling."""

from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel

from lit_dimba.strategies import unwrapped_name


class EMA(Callback):
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` for the trainable parameters of ``pl_module.model`` (the
    trained backbone only: frozen encoders and teachers are never copied, and frozen backbone parameters, such as
    the teacher weights a distillation student keeps, equal their own average and are not shadowed).

    The EMA weights are swapped into the model for validation, test and predict (``evaluate_with_ema``) and by
    ``ema.averaged(pl_module)`` for the sample logger. They are saved in the callback's checkpoint state, so a
    ``--ckpt_path`` resume continues the average and ``test``/``predict`` from a checkpoint sample from them;
    the checkpoint's ``state_dict`` keeps the raw trained weights.

    Under FSDP (``lit_dimba.strategies.DiffusionFSDP``) each rank averages and swaps its own shard of every
    parameter, with no communication; the checkpoint gets the full average, gathered on save and re-sharded on
    load, so it is the same tensor dict as under DDP or on one device (names without FSDP's wrapper prefixes).

    Args:
        decay: EMA decay per update.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates, so early averages are not dominated by
            the random initialisation.
        every_n_steps: update every N optimizer steps (a batch without an optimizer step, skipped or accumulating
            gradients, updates nothing).
        evaluate_with_ema: swap the EMA weights in for validation/test/predict.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, every_n_steps: int = 1,
                 evaluate_with_ema: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.evaluate_with_ema = evaluate_with_ema
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}  # fp32, on the parameters' device; this rank's shards under FSDP
        self._loaded: dict[str, torch.Tensor] | None = None  # a checkpoint's full average, not yet placed
        self._swapped = False
        self._last_step: int | None = None  # the global step of the last batch seen
        self._trainer: L.Trainer | None = None
        self._pl_module: L.LightningModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._pl_module = trainer, pl_module

    def _fsdp_root(self) -> FullyShardedDataParallel | None:
        model = getattr(getattr(self._trainer, "strategy", None), "model", None)
        return model if isinstance(model, FullyShardedDataParallel) else None

    @staticmethod
    def _params(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """``pl_module.model``'s parameters by their plain names (local shards under FSDP)."""
        return {unwrapped_name(name): p for name, p in pl_module.model.named_parameters()}

    @torch.no_grad()
    def _full_shadow(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The whole average on CPU; under FSDP gathered from every rank's shards (a collective)."""
        root = self._fsdp_root()
        if root is None:
            return {name: t.detach().to("cpu", copy=True) for name, t in self.shadow.items()}
        params = {name: p for name, p in self._params(pl_module).items() if name in self.shadow}
        with restored_after(params):
            for name, p in params.items():
                p.copy_(self.shadow[name])
            with FullyShardedDataParallel.summon_full_params(root, writeback=False):
                return {name: p.detach().float().cpu().clone() for name, p in self._params(pl_module).items()
                        if name in self.shadow}

    @torch.no_grad()
    def _place(self, pl_module: L.LightningModule, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole average as this rank's shadow: moved to the parameters' device, sharded like them under FSDP."""
        params = self._params(pl_module)
        if not full.keys() <= params.keys():
            raise ValueError("the EMA state in the checkpoint does not match this model's parameters; "
                             "resume with the config the checkpoint was trained with")
        params = {name: params[name] for name in full}
        root = self._fsdp_root()
        if root is None:
            return {name: full[name].to(p.device, torch.float32, copy=True) for name, p in params.items()}
        with restored_after(params):
            with FullyShardedDataParallel.summon_full_params(root, writeback=True):
                for name, p in self._params(pl_module).items():
                    if name in full:
                        p.copy_(full[name])
            return {name: p.detach().float().clone() for name, p in params.items()}

    def _ensure_shadow(self, pl_module: L.LightningModule) -> None:
        """Place a loaded average, and start the average of every trainable parameter it lacks from its current
        weights (FSDP restores checkpoints after ``on_fit_start``, so this also runs at the first batch, swap or
        save)."""
        if self._loaded is None and self.shadow:
            return
        if self._loaded is not None:
            self.shadow, self._loaded = self._place(pl_module, self._loaded), None
        for name, p in self._params(pl_module).items():
            if p.requires_grad and name not in self.shadow:
                self.shadow[name] = p.detach().float().clone()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_shadow(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._ensure_shadow(pl_module)
        stepped = trainer.global_step != self._last_step  # no optimizer step: a skipped or accumulating batch
        self._last_step = trainer.global_step
        if not stepped or trainer.global_step % self.every_n_steps:
            return
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = self._params(pl_module)
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        for name, ema in self.shadow.items():
            p = params[name]
            current = p.detach().clone()
            p.copy_(ema)
            ema.copy_(current)
        self._swapped = not self._swapped

    def _has_average(self) -> bool:
        return bool(self.shadow) or self._loaded is not None

    @contextmanager
    def averaged(self, pl_module: L.LightningModule):
        """Context in which ``pl_module.model`` holds the EMA weights (no-op if already swapped in or empty).
        Under FSDP every rank must enter it (as every rank must run the model)."""
        swap = self._has_average() and not self._swapped
        if swap:
            self._ensure_shadow(pl_module)
            self._swap(pl_module)
        try:
            yield
        finally:
            if swap:
                self._swap(pl_module)

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.evaluate_with_ema:
            return
        if not self._has_average():
            rank_zero_warn("EMA has no averaged weights yet (no training, no checkpoint); using the raw weights")
            return
        self._ensure_shadow(pl_module)
        self._swap(pl_module)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._swap_out(pl_module)

    def on_test_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_test_end(self, trainer, pl_module):
        self._swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module):
        self._swap_out(pl_module)

    def state_dict(self) -> dict:
        """``{"num_updates", "shadow"}`` with the whole average (Lightning calls this on every rank)."""
        if self._loaded is not None:
            shadow = self._loaded
        elif self.shadow and self._pl_module is not None:
            shadow = self._full_shadow(self._pl_module)
        else:
            shadow = {name: t.detach().to("cpu", copy=True) for name, t in self.shadow.items()}
        return {"num_updates": self.num_updates, "shadow": shadow}

    def load_state_dict(self, state_dict: dict) -> None:
        self.num_updates = state_dict["num_updates"]
        self.shadow, self._loaded = {}, dict(state_dict["shadow"])


@contextmanager
def restored_after(params: dict[str, torch.Tensor]):
    """Context at whose end ``params`` (this rank's values) hold again what they held at its start."""
    kept = {name: p.detach().clone() for name, p in params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])
