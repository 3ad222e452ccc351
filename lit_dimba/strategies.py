"""Lightning's FSDP strategy set up for our modules: the trained backbone sharded block by block, the frozen
teacher and encoders left whole.

In YAML (``configs/strategies/fsdp.yaml``)::

    trainer:
      strategy:
        class_path: lit_dimba.strategies.DiffusionFSDP
        init_args: {sharding_strategy: FULL_SHARD}
"""

from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lit_dimba.errors import ConfigError
from lit_dimba.models.backbone import Backbone, BiMambaBlock, Block, MambaLayer

BLOCKS = (Block, MambaLayer, BiMambaBlock)
# Sharding strategies that do not re-shard after forward (ZeRO-2 style).
KEEP_GATHERED = ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2")


class DiffusionFSDP(FSDPStrategy):
    """``FSDPStrategy`` for ``DiffusionModule`` and its subclasses.

    - **Wrapping.** One FSDP unit per backbone block and one for the rest of the backbone (embedders, final layer),
      so the root unit owns no parameters: every unit is re-sharded after each forward, which keeps the EMA's
      swap of shard values for validation out of training. Override with ``auto_wrap_policy``.
    - **Frozen submodules** (the module's ``frozen_prefixes``: text encoder, VAE, distillation teacher) are FSDP
      ``ignored_modules``: not sharded, not wrapped, not in the optimizer or the checkpoint, usable anywhere under
      ``no_grad`` (sampling, teacher forward). They are replicated on every rank, in their own dtype.
    - **Activation checkpointing** per block (``checkpoint_blocks: true``) through FSDP's checkpoint
      wrapper; the backbones' own ``gradient_checkpointing`` is then switched off so blocks are not recomputed twice.
    - Mixed precision comes from ``trainer.precision`` (``bf16-mixed``: bf16 compute and gradient reduction, fp32
      master weights and optimizer state), as with Lightning's strategy.
    - Also runs with ``accelerator: cpu`` (gloo), which Lightning's own class refuses; that is for the tests.

    Gradient clipping by norm goes through the root's ``clip_grad_norm_`` (``DiffusionModule`` does it). Sharding
    strategies that keep weights gathered between forward passes (``SHARD_GRAD_OP``) are refused: the EMA swaps
    shard values in for validation and sampling, and gathered copies would carry them into training.

    On CPU (gloo) torch's gather of the optimizer state into a full checkpoint is wrong (``exp_avg`` comes out equal
    to ``exp_avg_sq``: the gathered buffer is reused while the CPU "offload" is no copy), so CPU runs under FSDP are
    for tests only; on GPUs the state is copied out of the buffer and is right.
    """

    def __init__(self, checkpoint_blocks: bool = True, auto_wrap_policy=None, activation_checkpointing_policy=None,
                 **kwargs):
        if activation_checkpointing_policy is None and checkpoint_blocks:
            activation_checkpointing_policy = set(BLOCKS)
        super().__init__(auto_wrap_policy=auto_wrap_policy or {Backbone, *BLOCKS},
                         activation_checkpointing_policy=activation_checkpointing_policy, **kwargs)
        if self.sharding_strategy.name in KEEP_GATHERED:
            raise ConfigError(f"sharding_strategy {self.sharding_strategy.name} keeps gathered weights from one forward "
                              "to the next, so the EMA weights swapped in for validation and sampling would leak into "
                              "training; use FULL_SHARD, HYBRID_SHARD or NO_SHARD")

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Lightning's loading, with a checkpoint of another architecture reported as a ConfigError (FSDP loads the
        weights itself, before ``DiffusionModule.on_load_checkpoint`` could compare them)."""
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        except RuntimeError as error:
            if "loading state_dict" not in str(error):
                raise
            details = " ".join(line.strip() for line in str(error).splitlines()[1:])
            raise ConfigError(f"the checkpoint {str(checkpoint_path)!r} does not fit this model ({details[:300]}); "
                              "build the model with the config the checkpoint was trained with") from error

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # FSDP moves only what it wraps; the ignored frozen modules and the root's buffers (the noise schedule)
        # must be on the device too
        model.to(self.root_device)
        frozen = [getattr(model, prefix.rstrip("."), None) for prefix in getattr(model, "frozen_prefixes", ())]
        self.kwargs["ignored_modules"] = [m for m in frozen if isinstance(m, nn.Module)]
        if self._activation_checkpointing_kwargs:
            for backbone in model.modules():
                if isinstance(backbone, Backbone) and backbone.gradient_checkpointing:
                    backbone.gradient_checkpointing = False
                    rank_zero_info("DiffusionFSDP checkpoints each block; the backbone's gradient_checkpointing is off")
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # torch's FSDP needs device_id=cpu spelled out on CPU, where Lightning passes None
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, device_id=self.root_device,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def unwrapped_name(name: str) -> str:
    """A parameter or state-dict name without the prefixes FSDP and its activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
