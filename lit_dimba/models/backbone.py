"""The one diffusion backbone: PixArt-alpha's text-to-image DiT, built from a layout of token mixers.

The network is ``depth`` PixArt blocks (``Block``: ``token mixer -> cross-attention to text -> MLP`` with
adaLN-single modulation: one shared time MLP (``t_block``) produces six modulation vectors per sample, and each
block adds its own learned ``scale_shift_table``). Its layout is two pieces of data:

- ``layout``: the token mixer of each PixArt block, a name of ``MIXERS`` (``attn``: self-attention, DiT /
  PixArt-alpha; ``mamba_h`` / ``mamba_w``: a 2-D Mamba-2 scan, height- or width-first, T2MD), given as a list or
  as a named pattern (``expand_layout``);
- ``after_each_block``: the blocks that follow a PixArt block, names of ``EXTRA_BLOCKS``: ``bimamba``, the
  released Dimba's Mamba block (``BiMambaBlock``: a bidirectional Mamba-1 with its own residual stream), or
  ``mamba_layer``, our Dimba-style ``x + scan(norm(x))`` with a Mamba-2 scan; neither has time or text
  conditioning. They follow every PixArt block, or with ``mamba_ratio`` below 1 every ``gap``-th one
  (``mamba_positions``, the release's rule). Empty for DiT and T2MD.

All blocks are one list, ``blocks.<i>``, in execution order. DiT and the hybrid layouts share every module name
outside the mixers, so copying weights between them is by name; names and tensor layouts follow PixArt-alpha so
that its checkpoints load by (renamed) key.
"""

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch._dynamo
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_dimba.errors import ConfigError
from lit_dimba.models.attention import CrossAttention, SelfAttention
from lit_dimba.models.embeddings import CaptionEmbedder, Mlp, PatchEmbed, TimestepEmbedder, sincos_2d
from lit_dimba.models.mamba import Mamba2, Scan2D
from lit_dimba.models.mamba1 import BiMamba
from lit_dimba.models.mamba_ops import at_least_fp32

RECOMPILE_LIMIT = 64  # compiled graphs per code object (see ``Backbone.compile_blocks``)


@dataclass
class MambaConfig:
    """Settings of every Mamba-2 mixer of a backbone (see ``lit_dimba.models.mamba.Mamba2``).

    bidirectional: scan each sequence forwards and backwards with shared weights (False: the T2MD ablation).
    kernel: "auto" (mamba-ssm on CUDA when installed, else PyTorch), "torch" or "mamba_ssm".
    """

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 256
    bidirectional: bool = True
    kernel: str = "auto"

    def scan(self, hidden_size: int, order: str) -> Scan2D:
        kwargs = asdict(self)
        bidirectional = kwargs.pop("bidirectional")
        return Scan2D(hidden_size, order, bidirectional, **kwargs)


@dataclass
class Mamba1Config:
    """Settings of every Mamba-1 mixer of a backbone (``BiMamba``, the released Dimba's; see
    ``lit_dimba.models.mamba1``). The defaults are the release's: d_state 16, d_conv 4, expand 2, dt_rank "auto"
    (ceil(width / 16)).

    chunk_size: T of the PyTorch scan (no effect on the result, only on its speed and memory).
    kernel: "auto" (mamba-ssm's selective_scan_fn on CUDA when its extension is built, else PyTorch), "torch" or
        "mamba_ssm".
    """

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    chunk_size: int = 16
    kernel: str = "auto"

    def mixer(self, hidden_size: int) -> BiMamba:
        return BiMamba(hidden_size, **asdict(self))


def expand_layout(layout: str | list[str], depth: int) -> list[str]:
    """A layout name or an explicit list -> the mixer of each of the ``depth`` PixArt blocks.

    "dit": all self-attention. "t2md": self-attention at every 7th block (0, 7, 14, 21 for 28) and alternating
    height-first / width-first Mamba-2 in between (``SA-(HM-WM)x3`` repeated). "mamba": alternating HM/WM. An
    explicit list names ``depth`` mixers of ``MIXERS``.
    """
    if isinstance(layout, str):
        if layout == "dit":
            return ["attn"] * depth
        if layout == "t2md":
            return ["attn" if i % 7 == 0 else ("mamba_h" if i % 7 % 2 else "mamba_w") for i in range(depth)]
        if layout == "mamba":
            return ["mamba_h" if i % 2 == 0 else "mamba_w" for i in range(depth)]
        raise ValueError(f"unknown layout {layout!r}; choose 'dit', 't2md', 'mamba' or give a list of {list(MIXERS)}")
    mixers = list(layout)
    if len(mixers) != depth:
        raise ConfigError(f"backbone.layout lists {len(mixers)} blocks but backbone.depth is {depth}; list {depth} "
                          f"mixers or set depth: {len(mixers)}")
    unknown = sorted(set(mixers) - set(MIXERS))
    if unknown:
        blocks = [kind for kind in unknown if kind in EXTRA_BLOCKS]
        hint = f"; {blocks} are blocks, not mixers: list them in after_each_block" if blocks else ""
        raise ConfigError(f"unknown mixer kinds {unknown} in layout; allowed: {list(MIXERS)}{hint}")
    return mixers


def mamba_positions(depth: int, ratio: float) -> list[int]:
    """The PixArt blocks (indices in 0..depth-1) that the ``after_each_block`` blocks follow, by the released Dimba's
    rule (feizc/Dimba ``diffusion/model/nets/dimba.py``, ``Dimba.__init__`` and ``Dimba.forward``): it builds
    ``count = int(ratio * depth)`` Mamba blocks, ``gap = depth // count``, and runs one after every block when gap
    is 1, else after block i when ``i % gap == 1`` (the k-th Mamba block after block 1 + k * gap).

    A ratio for which that rule has more places than blocks (the release then fails with an index error), or no
    block, is a ConfigError naming the ratios that work.
    """

    def placed(count: int) -> list[int]:
        gap = depth // count
        return [i for i in range(depth) if gap == 1 or i % gap == 1]

    count = int(ratio * depth) if 0 < ratio <= 1 else 0
    if count and len(placed(count)) == count:
        return placed(count)
    working = [k for k in range(1, depth + 1) if len(placed(k)) == k]
    raise ConfigError(
        f"backbone.mamba_ratio {ratio} with depth {depth}: the released Dimba's rule builds int(ratio * depth) = "
        f"{count} Mamba blocks and has {len(placed(count)) if count else 0} places for them (after block i when "
        f"i % (depth // count) == 1, after every block when that gap is 1); set mamba_ratio to k / {depth} for k in "
        f"{working} (1.0: after every block)")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, C), shift/scale (B, 1, C)."""
    return x * (1 + scale) + shift


# The token mixers of a PixArt block, by layout name: (hidden_size, num_heads, Mamba settings) -> a module mapping
# (B, N, C), grid (h, w) -> (B, N, C). A new mixer kind is one more entry.
MIXERS = {
    "attn": lambda hidden_size, num_heads, mamba: SelfAttention(hidden_size, num_heads),
    "mamba_h": lambda hidden_size, num_heads, mamba: mamba.scan(hidden_size, "h"),
    "mamba_w": lambda hidden_size, num_heads, mamba: mamba.scan(hidden_size, "w"),
}


class Block(nn.Module):
    """PixArt-alpha block with a pluggable token mixer (``mixer``: a name of ``MIXERS``).

    x (B, N, C), t6 (B, 6C) from the shared time MLP, y (B, L, C) projected text, mask (B, L) bool,
    grid (h, w) with h * w = N, residual: the separate residual stream of ``BiMambaBlock`` (passed on unchanged)
    -> (x (B, N, C), residual, mixer_io): with ``return_mixer_io`` mixer_io is (mixer input (B, N, C), mixer output
    (B, N, C)), the input after norm and modulation, the output before the gate: the pair distillation matches;
    otherwise None, so that a compiled block does not write them (the input would be a float32 copy of what the
    mixer reads in bf16).

    ``mixer_only``: x is a mixer input (B, N, C) and only the token mixer runs (-> (B, N, C); t6, y and mask are
    unused). Teacher forcing calls the block this way rather than ``block.mixer``, so that wrappers around the
    block (FSDP gathering its shards, activation checkpointing) take part.
    """

    def __init__(self, mixer: str, hidden_size: int, num_heads: int, mlp_ratio: float, mamba: MambaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = MIXERS[mixer](hidden_size, num_heads, mamba)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x, t6, y, mask, grid, residual=None, return_mixer_io: bool = False, mixer_only: bool = False):
        if mixer_only:
            return self.mixer(x, grid)
        B, _, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.reshape(B, 6, C)
        ).chunk(6, dim=1)
        mixer_in = modulate(self.norm1(x), shift_msa, scale_msa)
        mixer_out = self.mixer(mixer_in, grid)
        x = x + gate_msa * mixer_out
        x = x + self.cross_attn(x, y, mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, residual, (mixer_in, mixer_out) if return_mixer_io else None


class MambaLayer(nn.Module):
    """Our Dimba-style Mamba layer after a PixArt block: ``x + scan(norm(x))``, bidirectional width-first Mamba-2
    scan, no time or text conditioning (the ``dimba-mamba2-l/2`` backbone). Same call signature as ``Block`` (the
    conditioning inputs are unused, the residual stream is passed on).

    x (B, N, C), grid (h, w) -> (x, residual, mixer_io), x (B, N, C), mixer_io as ``Block``'s.
    """

    def __init__(self, hidden_size: int, mamba: MambaConfig):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mixer = mamba.scan(hidden_size, "w")

    def forward(self, x, t6, y, mask, grid, residual=None, return_mixer_io: bool = False):
        mixer_in = self.norm(x)
        mixer_out = self.mixer(mixer_in, grid)
        return x + mixer_out, residual, (mixer_in, mixer_out) if return_mixer_io else None


class BiMambaBlock(nn.Module):
    """The released Dimba's Mamba block: RMSNorm and a bidirectional Mamba-1 (``BiMamba``), with the residual
    carried beside the blocks' output rather than added to it. No time or text conditioning; ``Block``'s call
    signature (the conditioning inputs are unused).

    As read in feizc/Dimba ``diffusion/model/nets/dimba.py``: ``create_block`` builds ``Block(mixer=Mamba(
    bimamba_type="v2"), norm=RMSNorm(eps=1e-5), fused_add_norm=True, residual_in_fp32=True)``, ``Block.forward``
    (fused path, ``rms_norm_fn(..., prenorm=True)``) returns ``(mixer(norm(r)), r)`` with ``r = residual + x``
    (``r = x`` for the first Mamba block, residual None), kept in float32, and ``Dimba.forward`` runs
    ``x = blocks[i](x); x, residual = mamba_blocks[j](x, residual)``, so the next PixArt block (and, after the
    last, the final layer) gets the mixer output itself, and the stream ``residual`` sums the outputs of the
    PixArt blocks that a Mamba block follows. The norm computes in float32 and returns x's dtype (as the fused
    kernel, ``mamba_ssm/ops/triton/layernorm.py``). Tensor names: ``mixer.*`` (``BiMamba``), ``norm.weight``.

    x (B, N, C), residual (B, N, C) float32 or None (the first Mamba block) -> (mixer output (B, N, C): the new x,
    residual (B, N, C) float32, mixer_io as ``Block``'s).
    """

    def __init__(self, hidden_size: int, mamba1: Mamba1Config):
        super().__init__()
        self.mixer = mamba1.mixer(hidden_size)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)

    def forward(self, x, t6, y, mask, grid, residual=None, return_mixer_io: bool = False):
        residual = at_least_fp32(x) if residual is None else residual + x
        norm = self.norm
        mixer_in = F.rms_norm(residual, norm.normalized_shape, at_least_fp32(norm.weight), norm.eps).to(x.dtype)
        mixer_out = self.mixer(mixer_in)
        return mixer_out, residual, (mixer_in, mixer_out) if return_mixer_io else None


# The blocks that may follow a PixArt block (``Backbone.after_each_block``), by layout name: (hidden_size, Mamba-2
# settings, Mamba-1 settings) -> a module with ``Block``'s call signature. A new block kind is one more entry.
EXTRA_BLOCKS = {
    "mamba_layer": lambda hidden_size, mamba, mamba1: MambaLayer(hidden_size, mamba),
    "bimamba": lambda hidden_size, mamba, mamba1: BiMambaBlock(hidden_size, mamba1),
}


class FinalLayer(nn.Module):
    """PixArt's T2I final layer: adaLN-single modulated norm then a linear to patch pixels.

    x (B, N, C), t (B, C) -> (B, N, p * p * out_channels).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(eq=False, repr=False)
class Backbone(nn.Module):
    """Text-conditioned diffusion backbone over any latent grid divisible by the patch size.

    The constructor's arguments are this dataclass's fields, the one list of them: ``config`` returns them all,
    and checkpoints and exports save it.

    Args:
        layout: the token mixer of each PixArt block: "dit" (all self-attention), "t2md", "mamba" or a list of
            ``depth`` names of ``MIXERS`` (see ``expand_layout``).
        depth: the number of PixArt blocks (``Block``, each with time and text conditioning).
        after_each_block: blocks inserted after a PixArt block (every one, unless ``mamba_ratio`` < 1), in order,
            names of ``EXTRA_BLOCKS``: the released Dimba is ``[bimamba]``; our Mamba-2 variant ``[mamba_layer]``
            (1:1), ``[mamba_layer, mamba_layer]`` is 1:2. The backbone has
            ``depth + len(mamba_positions) * len(after_each_block)`` blocks.
        mamba_ratio: the released Dimba's ``mamba_ratio``: in (0, 1], 1 puts the ``after_each_block`` blocks after
            every PixArt block; below 1, after ``int(mamba_ratio * depth)`` of them by the release's gap rule
            (``mamba_positions``: 0.5 -> after blocks 1, 3, 5, ...). Unused without ``after_each_block``.
        hidden_size, num_heads, mlp_ratio: transformer size.
        mamba: settings of the Mamba-2 mixers (``mamba_h``, ``mamba_w``, ``mamba_layer``).
        mamba1: settings of the Mamba-1 mixers (``bimamba``).
        patch_size: p; inputs need H and W divisible by p.
        in_channels: latent channels; the output has 2x as many when ``learn_sigma`` (PixArt checkpoints).
        caption_channels: text-encoder feature size; token_num: text length (the null caption's length).
        base_size: None (default): positions step by ``1 / pe_interpolation`` per token on both axes, whatever the
            grid: training at a new resolution extrapolates the positions, unless ``pe_base_grid`` raises
            ``pe_interpolation`` with it. An int: PixArt-alpha's formula, each axis stretched to
            ``base_size / pe_interpolation`` positions (PixArt checkpoints were trained so; their converter sets it).
            See ``sincos_2d``.
        pe_interpolation: PixArt's PE scale (512^2 -> 1, 1024^2 -> 2) at every resolution, unless ``pe_base_grid``.
        pe_base_grid: None (default), or the token grid side at which the PE scale is 1: every forward then takes
            its scale from its input's h x w token grid, ``pe_interpolation = sqrt(h * w) / pe_base_grid``, with
            ``base_size`` None (so ``base_size`` is not used): positions step by ``pe_base_grid / sqrt(h * w)`` per
            token on both axes and every resolution spans the positions of the base one (PE interpolation, as
            PixArt-alpha's 1024 and 2048 models; ``callbacks.PEInterpolation`` sets it from a pixel resolution).
        pe_mode: "pixart" (each axis stretched to the same range) or "centred" (centred, one step on both axes,
            normalised by the long edge); see ``sincos_2d``.
        gradient_checkpointing: recompute each block in backward (training only).
        micro_conditioning: PixArt-alpha 1024-MS's size conditioning: the image size (height, width) and aspect
            ratio height / width, in pixels of ``pixels_per_latent`` per latent pixel, are embedded like timesteps
            (``csize_embedder``, ``ar_embedder``, hidden_size / 3 channels each per value) and added to the time
            embedding. The size is the generated (or trained) image's, taken from the input's shape.

    ``block_kinds`` names the kind of every block of ``blocks``: its mixer for a PixArt block, its
    ``EXTRA_BLOCKS`` name for the others.

    forward: x (B, in_channels, H, W), t (B,) timesteps, y (B, token_num, caption_channels), mask (B, token_num)
    bool, drop_caption (B,) bool or None (True -> null caption) -> (B, out_channels, H, W); with
    ``return_mixer_io`` also a list with one ``(mixer input, mixer output)`` pair, each (B, h * w, hidden), per
    block of ``blocks`` (what distillation matches between teacher and student).
    """

    layout: str | list[str] = "dit"
    depth: int = 28
    after_each_block: list[str] = field(default_factory=list)
    mamba_ratio: float = 1.0
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba1: Mamba1Config = field(default_factory=Mamba1Config)
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True
    caption_channels: int = 4096
    token_num: int = 120
    base_size: int | None = None
    pe_interpolation: float = 1.0
    pe_mode: str = "pixart"
    pe_base_grid: int | None = None
    gradient_checkpointing: bool = False
    micro_conditioning: bool = False
    pixels_per_latent: int = 8

    def __post_init__(self):
        super().__init__()
        if not isinstance(self.layout, str):
            self.layout = list(self.layout)
        self.after_each_block = list(self.after_each_block)
        self.mixers = expand_layout(self.layout, self.depth)
        unknown = sorted(set(self.after_each_block) - set(EXTRA_BLOCKS))
        if unknown:
            raise ConfigError(f"unknown block kinds {unknown} in after_each_block; allowed: {list(EXTRA_BLOCKS)}")
        if self.pe_mode not in ("pixart", "centred"):
            raise ValueError(f"pe_mode={self.pe_mode!r}; choose 'pixart' or 'centred'")
        hidden_size = self.hidden_size
        self.out_channels = 2 * self.in_channels if self.learn_sigma else self.in_channels

        self.x_embedder = PatchEmbed(self.patch_size, self.in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(self.caption_channels, hidden_size, self.token_num)
        if self.micro_conditioning:
            if hidden_size % 3:
                raise ValueError(f"micro_conditioning embeds height, width and aspect ratio in hidden_size / 3 "
                                 f"channels each; hidden_size {hidden_size} is not divisible by 3")
            self.csize_embedder = TimestepEmbedder(hidden_size // 3)
            self.ar_embedder = TimestepEmbedder(hidden_size // 3)
        follow = mamba_positions(self.depth, self.mamba_ratio) if self.after_each_block else []
        blocks, self.block_kinds = [], []
        for i, mixer in enumerate(self.mixers):
            blocks.append(Block(mixer, hidden_size, self.num_heads, self.mlp_ratio, self.mamba))
            self.block_kinds.append(mixer)
            if i in follow:
                blocks += [EXTRA_BLOCKS[kind](hidden_size, self.mamba, self.mamba1) for kind in self.after_each_block]
                self.block_kinds += self.after_each_block
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """PixArt-alpha's initialisation: xavier linears, small normal embedders, zero output projections.

        Mamba mixers end with mamba-ssm's own initialisation: ``Mamba2.reset_parameters`` and
        ``BiMamba.reset_parameters`` undo the xavier init of their projections and set the dt/A/D parameters.
        """

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        linears = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.y_embedder.y_proj.fc1,
                   self.y_embedder.y_proj.fc2]
        if self.micro_conditioning:
            linears += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2], self.ar_embedder.mlp[0],
                        self.ar_embedder.mlp[2]]
        for linear in linears:
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            if isinstance(block, Block):
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        for module in self.modules():
            if isinstance(module, (Mamba2, BiMamba)):
                module.reset_parameters()
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of an input of the given spatial size; a clear error if not divisible."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"input of {height}x{width} latent pixels is not divisible by the patch size {p}; "
                f"choose an image resolution whose latent size is a multiple of {p}"
            )
        return height // p, width // p

    def pe_scale(self, grid: tuple[int, int]) -> float:
        """PixArt's ``pe_interpolation`` of the PE of an (h, w) token grid: ``sqrt(h * w) / pe_base_grid``, or the
        configured ``pe_interpolation`` when ``pe_base_grid`` is None."""
        if self.pe_base_grid is None:
            return self.pe_interpolation
        return math.sqrt(grid[0] * grid[1]) / self.pe_base_grid

    def pos_embed(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(1, h * w, hidden) sin-cos PE of the (h, w) token grid: scale ``pe_scale(grid)``, ``pe_mode``, and
        ``base_size`` unless ``pe_base_grid`` is set."""
        base_size = None if self.pe_base_grid is not None else self.base_size
        return sincos_2d(self.hidden_size, *grid, base_size, self.pe_scale(grid), device, self.pe_mode)[None]

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h * w, p * p * c) -> (B, c, h * p, w * p), PixArt's channel order (p, q, c)."""
        h, w = grid
        p = self.patch_size
        x = x.reshape(x.shape[0], h, w, p, p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_channels, h * p, w * p)

    def size_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Micro-conditioning of latents x (B, C, H, W): (B, hidden) embedding of the image height and width in
        pixels and of the aspect ratio H / W (PixArt-alpha 1024-MS)."""
        B, _, H, W = x.shape
        s = self.pixels_per_latent
        # (B * 2,): h0, w0, h1, w1, ...; filled on the device (no host copy, so it can run in a CUDA graph)
        size = torch.stack([x.new_full((B,), H * s, dtype=torch.float32),
                            x.new_full((B,), W * s, dtype=torch.float32)], dim=1).flatten()
        ratio = x.new_full((B,), H / W, dtype=torch.float32)
        return torch.cat([self.csize_embedder(size).reshape(B, -1), self.ar_embedder(ratio)], dim=1)

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block and the final layer in place, with ``options`` (``torch.compile``'s keyword
        arguments). Parameter names stay as they are; blocks of one kind share their compiled code; a block is the
        unit that FSDP shards and gradient checkpointing recomputes, so both keep working. The Mamba-2 scan is the
        custom op ``lit_dimba::ssd_scan``, which stays inside the compiled graph.

        Every compiled module shares one cache of graphs (they are all ``nn.Module.__call__``), one graph per module
        kind, grad mode (training; validation and sampling) and shape family: more than Dynamo's default limit of
        8, beyond which it would silently run eagerly. The limit is raised to ``RECOMPILE_LIMIT`` for the process.
        """
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for module in (*self.blocks, self.final_layer):
            module.compile(**options)

    @contextlib.contextmanager
    def frozen(self):
        """Sampling's context: no gradients, and every ``Scan2D`` derives its weights from its parameters once, on
        entry, rather than on every call (``Scan2D.freeze``: in_proj's padded weight, out_proj folded into fuse), in
        the dtype its GEMMs will run in (autocast's if on, else the parameters'). The parameters must not change
        inside. Not for a backbone sharded by FSDP, whose parameters are gathered only in forward."""
        device = self.x_embedder.proj.weight.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else self.x_embedder.proj.weight.dtype)
        scans = [module for module in self.modules() if isinstance(module, Scan2D)]
        with torch.no_grad():
            for scan in scans:
                scan.freeze(dtype)
            try:
                yield self
            finally:
                for scan in scans:
                    scan.frozen = False

    @property
    def config(self) -> dict:
        """Every constructor argument as plain Python values (the current ``base_size``, ``pe_interpolation``,
        ``pe_mode`` and ``pe_base_grid``, which ``callbacks.PEInterpolation`` may set before a run): enough to
        rebuild the same network (``from_config``)."""
        return {f.name: asdict(getattr(self, f.name)) if f.name in ("mamba", "mamba1") else getattr(self, f.name)
                for f in fields(self)}

    @classmethod
    def from_config(cls, config: dict) -> "Backbone":
        """Rebuild a backbone from its ``config`` (e.g. read back from an exported ``backbone.yaml``). Configs saved
        before ``after_each_block`` existed (layout "dimba" with ``dimba_ratio`` K) give the same network."""
        config = dict(config)
        ratio = config.pop("dimba_ratio", 1)
        if config.get("layout") == "dimba":
            config.update(layout="dit", after_each_block=["mamba_layer"] * ratio)
        return cls(**{**config, "mamba": MambaConfig(**config.get("mamba", {})),
                      "mamba1": Mamba1Config(**config.get("mamba1", {}))})

    @classmethod
    def from_file(cls, path: str, **overrides) -> "Backbone":
        """Build the backbone of a config file (``class_path`` + ``init_args``, as under ``configs/backbones/`` and
        in exports' ``backbone.yaml``), with keyword overrides (``mamba`` / ``mamba1`` as a dict or a
        ``MambaConfig`` / ``Mamba1Config``, merged into the file's)."""
        with open(path) as f:
            config = yaml.safe_load(f)["init_args"]
        for key in ("mamba", "mamba1"):
            settings = overrides.pop(key, {})
            overrides[key] = {**config.get(key, {}), **(settings if isinstance(settings, dict) else asdict(settings))}
        return cls.from_config({**config, **overrides})

    def forward(self, x, t, y, mask, drop_caption=None, return_mixer_io: bool = False):
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        t_emb = self.t_embedder(t)
        if self.micro_conditioning:
            t_emb = t_emb + self.size_embedding(x)
        x = self.x_embedder(x)
        x = x + self.pos_embed(grid, x.device).to(x.dtype)
        t6 = self.t_block(t_emb)
        y, mask = self.y_embedder(y, mask, drop_caption)
        mixer_io = []
        residual = None  # the released Dimba's separate residual stream (``BiMambaBlock``); the others pass it on
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, residual, io = checkpoint(block, x, t6, y, mask, grid, residual, return_mixer_io,
                                             use_reentrant=False)
            else:
                x, residual, io = block(x, t6, y, mask, grid, residual, return_mixer_io)
            if return_mixer_io:
                mixer_io.append(io)
        out = self.unpatchify(self.final_layer(x, t_emb), grid)
        return (out, mixer_io) if return_mixer_io else out
