"""GPU checks and timings of the hybrid backbone (issue "Fast hybrid on the GPU"); prints short tables.

Parts (``--parts``, default all but ``train_profile``; they run in the order given):
  check    correctness first (``--checks`` picks sections): the lean ``Scan2D`` on the CUDA kernels (our Triton
           conv and gated norm, forwards and backwards; mamba-ssm's scan) vs on PyTorch's, fp32 and bf16, outputs and
           gradients; the Mamba-2 kernel paths (our PyTorch SSD vs the custom op on mamba-ssm's Triton kernels,
           fp32 against a float64 reference and in bf16; our module vs ``mamba_ssm.Mamba2`` with each other's
           state dict); the MLP's GELU epilogue vs GEMM then GELU; compiled vs eager backbones in bf16; sampling
           with and without CUDA graphs.
  latency  per denoising step (batch 1, one forward, bf16 weights, no CFG doubling) of each ``--presets`` backbone
           at each ``--sizes`` (pixels, SD-VAE f8 latents, patch 2), inside ``Backbone.frozen()`` as sampling runs
           it: eager, and the best setting (blocks compiled, the forward replayed from a CUDA graph); median of
           ``--iters`` timed calls after warm-up, and the DiT's time over each other backbone's (t2md's against the
           issue's targets). dimba-l/2, the
           released Dimba, is the DiT's 28 blocks with a bidirectional Mamba-1 block after each (and 300 text
           tokens): its time over the DiT's is what its Mamba blocks cost, with mamba-ssm's selective-scan kernel
           where its CUDA extension is built, else the PyTorch scan (the script says which).
  sample   one CFG denoising step through ``DiffusionModule.generate`` (bf16 autocast, compiled blocks, both CFG
           branches in one batch, the scheduler step included), with and without ``sampling.cuda_graph``.
  profile  the GPU kernels of one compiled t2md forward at 2048^2, grouped, the top ones listed.
  train    training through the real LightningModules: ``Trainer.fit`` (bf16-mixed, fused AdamW, compiled blocks)
           on random latents and T5-sized text features; images/s by ``callbacks.Throughput`` and, with FLOPs per
           step from ``torch.utils.flop_counter``, the fraction of the H100/H200 dense bf16 peak (989 TFLOP/s).
           Settings ``PRESET:RESOLUTIONxBATCH[:MODE]`` (MODE: a torch.compile mode for that run); gradient
           checkpointing from 2048^2. On CUDA each setting trains in a fresh process (``--isolate``), so no run
           inherits another's memory and compiled state.
  train_profile
           where the GPU time of a training step goes (``--train_profile`` settings, each in a fresh process on
           CUDA): kernel families (GEMMs, attention, the SSD scan, the conv and norm along scan orders, Inductor's
           fused kernels, optimizer, copies) and the top kernels, per step, next to the step's wall time; how long
           the GPU idles between kernels, in how many gaps, and the longest gaps with the kernels around them (on a
           CPU: the CPU ops).
  distill  ``DistillModule`` (dit-xl/2 teacher with random weights -> t2md) stages ``forcing`` and ``kd`` the same
           way (each in a fresh process on CUDA), for each ``--distill`` setting.

Warm-up: every compiled graph, Triton autotuning and CUDA graph is built before anything is timed.

    python benchmarks/hybrid_gpu.py                          # everything, one H200 (about 15 min)
    python benchmarks/hybrid_gpu.py --parts check latency sample profile
    python benchmarks/hybrid_gpu.py --parts latency --presets dit-xl/2 t2md dimba-l/2 --sizes 512 1024 2048
    python benchmarks/hybrid_gpu.py --parts train distill
    python benchmarks/hybrid_gpu.py --device cpu --tiny      # smoke test of the script itself
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import lightning as L
import torch
import torch._dynamo
import yaml
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from callbacks import Throughput
from datamodules.cache import CachedEncoders
from lit_dimba.conditioning import LatentVAE, TinyT5TextEncoder
from lit_dimba.diffusion.cuda_graph import CUDAGraphStep
from lit_dimba.models.backbone import Backbone, MambaConfig
from lit_dimba.models.embeddings import Mlp
from lit_dimba.models.mamba import Mamba2, Scan2D
from lit_dimba.modules import DiffusionModule, DistillModule, Sampling
from lit_dimba.models.mamba_ops import selective_scan_kernel
from shared import TINY_F8_VAE, backbone_arguments, backbone_file, table  # benchmarks/shared.py, beside this script

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the yardstick
# target DiT time / t2md time per step (issue [1/7]); at 512^2 and 1024^2 a floor of the ratio too
TARGETS = {"2048x2048": 1.5, "3840x2160": 2.1, "4096x4096": 2.8, "512x512": 0.6, "1024x1024": 0.8}
CHECKS = {"scan2d": "Scan2D on the CUDA kernels vs PyTorch, fp32 and bf16, outputs and gradients",
          "mamba2": "Mamba2's kernel paths vs float64, and vs mamba_ssm.Mamba2",
          "mlp": "the MLP's GELU epilogue vs GEMM then GELU",
          "compiled": "compiled vs eager backbones, bf16",
          "sampling": "sampling with and without CUDA graphs"}
RESULTS: dict = {}
RESULTS_PATH: str | None = None


def record(part: str, row: dict) -> None:
    """Keep a result row; with ``--results``, rewrite that JSON file after every row (nothing is lost on a timeout)."""
    RESULTS.setdefault(part, []).append(row)
    if RESULTS_PATH:
        with open(RESULTS_PATH, "w") as f:
            json.dump(RESULTS, f, indent=1)


def guarded(part: str, label: str, fn, *args, **kwargs):
    """Run one measurement; a failure is printed and recorded, and the script goes on with the next."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and continues
        traceback.print_exc()
        print(f"FAILED {part} {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        record(part, {"label": label, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of ``iters`` calls after ``warmup`` untimed ones (CUDA events per call on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def build(preset: str, tiny: bool, **overrides) -> Backbone:
    """The backbone of ``configs/backbones/`` named ``preset`` (e.g. "dit-xl/2", "t2md", "dimba-l/2"); with ``tiny``,
    3 PixArt blocks of width 64 (attention, HM, WM for the hybrid mixer layouts; each with its Mamba blocks after it
    for the Dimba ones)."""
    if tiny:
        small = dict(depth=3, hidden_size=64, num_heads=2, caption_channels=32, token_num=16)
        if preset != "dit-xl/2":
            small["mamba"] = MambaConfig(d_state=16, headdim=16, chunk_size=32)
        if backbone_arguments(preset)["layout"] != "dit":
            small["layout"] = ["attn", "mamba_h", "mamba_w"]
        overrides = {**small, **overrides}
    return Backbone.from_file(backbone_file(preset), **overrides)


def size_of(text: str) -> tuple[int, int]:
    """'2048' or '3840x2160' (width x height) -> (height, width) in pixels."""
    width, _, height = text.partition("x")
    return int(height or width), int(width)


def latent_inputs(model: Backbone, batch: int, size: tuple[int, int], device: str, dtype=torch.float32):
    h, w = size[0] // 8, size[1] // 8
    x = torch.randn(batch, model.in_channels, h, w, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randn(batch, model.token_num, model.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(batch, model.token_num, dtype=torch.bool, device=device)
    mask[:, model.token_num // 2:] = torch.rand(batch, 1, device=device) < 0.5  # some captions padded
    return x, t, y, mask


def graphed(fn, inputs, device: str):
    """``fn(*inputs)`` replayed from a CUDA graph as sampling replays it (``CUDAGraphStep``: captured after warm-up on
    a side stream; each call copies the inputs in and the output out); plain ``fn`` on a CPU."""
    if device != "cuda":
        return lambda: fn(*inputs)
    step = CUDAGraphStep(warmup=3)
    return lambda: step(fn, inputs)


# --------------------------------------------------------------------------------------------------------- check
def run_mamba(module, x: torch.Tensor, weights: torch.Tensor):
    """Output and gradients (input, then parameters by name) of sum(out * weights)."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x, module.grid) if isinstance(module, Scan2D) else module(x)
    dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(dtype) * weights.to(dtype)).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


def compare(label: str, a, b, bound: float) -> list:
    (out_a, grads_a), (out_b, grads_b) = a, b
    errors = {k: rel_err(grads_a[k], grads_b[k]) for k in grads_b}
    worst = max(errors, key=errors.get)
    out = rel_err(out_a, out_b)
    ok = out <= bound and errors[worst] <= bound
    row = [label, f"{out:.2e}", f"{errors[worst]:.2e} ({worst})", f"{bound:g}", "ok" if ok else "FAIL"]
    record("check", dict(zip(["comparison", "output", "worst grad", "bound", "verdict"], row)))
    print(row, flush=True)
    return row


def check(args) -> str:
    device, tiny = args.device, args.tiny
    rows = []
    d_model, length = (64, 100) if tiny else (1152, 4096)
    cfg = dict(d_state=16, headdim=16, chunk_size=32) if tiny else dict(d_state=256, headdim=64, chunk_size=256)
    fused_kernel = "mamba_ssm" if device == "cuda" else "torch"
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 here (Triton's own dots still use TF32)
    # The lean 2-D scan first (our Triton conv and norm, forwards and backwards; mamba-ssm's scan) vs PyTorch, outputs
    # and gradients.
    if "scan2d" in args.checks:
        grid = (8, 10) if tiny else (64, 64)
        scans = []
        for kernel in ("torch", "auto"):
            torch.manual_seed(0)
            scan = Scan2D(d_model, "h", kernel=kernel, **cfg).to(device)
            scan.grid = grid
            scans.append(scan)
        xs = torch.randn(2, grid[0] * grid[1], d_model, device=device)
        w2 = torch.randn(xs.shape, device=device, dtype=torch.float64)
        rows.append(compare("Scan2D h bidirectional: CUDA kernels vs torch, fp32", run_mamba(scans[1], xs, w2),
                            run_mamba(scans[0], xs, w2), 2e-3))
        rows.append(compare("Scan2D h bidirectional: CUDA kernels vs torch, bf16",
                            run_mamba(scans[1].bfloat16(), xs.bfloat16(), w2),
                            run_mamba(scans[0].bfloat16(), xs.bfloat16(), w2), 1e-2))
    if "mamba2" in args.checks:
        rows += check_mamba2(args, d_model, length, cfg, fused_kernel)
    torch.set_float32_matmul_precision("high")
    if "mlp" in args.checks:
        rows.append(check_mlp(device, d_model, length))
    if "compiled" in args.checks:
        rows += check_compiled(args)
    if "sampling" in args.checks and device == "cuda":
        rows.append(check_sampling(tiny))
    return table(["comparison", "output rel. err", "worst grad rel. err", "bound", "verdict"], rows)


def check_mamba2(args, d_model: int, length: int, cfg: dict, fused_kernel: str) -> list:
    """Our Mamba2 on PyTorch (fp32) and on the CUDA kernels (fp32, bf16) against float64; ours vs mamba_ssm.Mamba2."""
    device, rows = args.device, []
    torch.manual_seed(0)
    ours = Mamba2(d_model, kernel="torch", **cfg).to(device)
    fused = Mamba2(d_model, kernel=fused_kernel, **cfg).to(device)
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(2, length, d_model, device=device)
    weights = torch.randn(2, length, d_model, device=device, dtype=torch.float64)
    reference = run_mamba(ours.double(), x.double(), weights)
    rows.append(compare("Mamba2 torch fp32 vs torch float64", run_mamba(ours.float(), x, weights), reference, 1e-4))
    rows.append(compare(f"Mamba2 {fused_kernel} fp32 vs torch float64", run_mamba(fused, x, weights), reference, 2e-3))
    rows.append(compare(f"Mamba2 {fused_kernel} bf16 vs torch bf16", run_mamba(fused.bfloat16(), x.bfloat16(), weights),
                        run_mamba(ours.bfloat16(), x.bfloat16(), weights), 1e-2))
    ours.float(), fused.float()
    if device == "cuda":
        import mamba_ssm.modules.mamba2 as theirs_module

        for mem_eff in (False, True):
            def compare_theirs():
                theirs = theirs_module.Mamba2(d_model, use_mem_eff_path=mem_eff, **cfg).to(device)
                theirs.load_state_dict(ours.state_dict())  # ours -> theirs
                ours.load_state_dict(theirs.state_dict())  # theirs -> ours
                conv = theirs_module.causal_conv1d_fn
                if not mem_eff:  # its unfused path refuses causal-conv1d's kernel for in_proj widths like 5156
                    theirs_module.causal_conv1d_fn = None
                try:
                    with torch.no_grad():
                        return rel_err(ours(x), theirs(x))
                finally:
                    theirs_module.causal_conv1d_fn = conv

            err = guarded("check", f"mamba_ssm.Mamba2 mem_eff={mem_eff}", compare_theirs)
            if err is not None:
                row = [f"ours (torch) vs mamba_ssm.Mamba2(use_mem_eff_path={mem_eff}) fp32, one state dict",
                       f"{err:.2e}", "-", "2e-3", "ok" if err <= 2e-3 else "FAIL"]
                record("check", {"comparison": row[0], "output": row[1]})
                rows.append(row)
    return rows


def check_mlp(device: str, d_model: int, length: int) -> list:
    """The MLP without gradients on CUDA (fc1 and GELU as one GEMM with cuBLASLt's GELU epilogue) vs the two steps."""
    mlp = Mlp(d_model, 4 * d_model).to(device, torch.bfloat16)
    xm = torch.randn(2, length, d_model, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        one_gemm = mlp(xm)
    with torch.enable_grad():
        two_steps = mlp(xm).detach()
    err = rel_err(one_gemm, two_steps)
    row = ["Mlp without gradients (GELU epilogue on CUDA) vs with, bf16", f"{err:.2e}", "-", "1e-2",
           "ok" if err <= 1e-2 else "FAIL"]
    record("check", {"comparison": row[0], "output": row[1]})
    return row


def check_compiled(args) -> list:
    """Compiled backbones as sampling runs them (``Backbone.frozen``) vs eager ones, bf16 weights, 512^2 and 1024x512
    (a non-square grid)."""
    device, tiny, rows = args.device, args.tiny, []
    for preset in args.presets:
        torch.manual_seed(0)
        model = build(preset, tiny).to(device, torch.bfloat16).eval()
        with torch.no_grad():
            for p in model.parameters():  # non-zero output layers, so the comparison means something
                p.add_(torch.randn_like(p) * 0.02)
        compiled_model = copy.deepcopy(model)
        compiled_model.compile_blocks(dynamic=True)
        for size in ((64, 64), (64, 32)) if tiny else ((512, 512), (512, 1024)):
            inputs = latent_inputs(model, 2, size, device, torch.bfloat16)
            with torch.no_grad():
                eager = model(*inputs).float()
            with compiled_model.frozen():  # as sampling runs it
                err = rel_err(compiled_model(*inputs).float(), eager)
            # bf16 rounding over 28 residual blocks: the DiT, with no Mamba op, differs as much (README)
            row = [f"{preset} compiled vs eager, bf16, {size[1]}x{size[0]}", f"{err:.2e}", "-", "3e-2",
                   "ok" if err <= 3e-2 else "FAIL"]
            record("check", {"comparison": row[0], "output": row[1]})
            rows.append(row)
        del model, compiled_model
    return rows


def check_sampling(tiny: bool) -> list:
    """Sampling with and without CUDA graphs: same weights, prompts and seeds."""
    module = diffusion_module("t2md", tiny).to("cuda")
    module.model.compile_blocks(dynamic=True)
    images = []
    for cuda_graph in (False, True):
        sampling = Sampling(steps=4, cfg_scale=4.5, cuda_graph=cuda_graph)
        with torch.autocast("cuda", torch.bfloat16):
            images.append(module.generate(["a red circle", "two blue squares"], 256, 256, sampling=sampling))
    err = (images[0] - images[1]).abs().max().item()
    row = ["t2md sampling, CUDA graph vs none (4 steps, CFG)", f"{err:.2e} (max abs)", "-", "1e-2",
           "ok" if err <= 1e-2 else "FAIL"]
    record("check", {"comparison": row[0], "output": row[1]})
    return row


# ------------------------------------------------------------------------------------------------------- latency
def latency(args) -> str:
    device, tiny = args.device, args.tiny
    sizes = [size_of(s) for s in args.sizes]
    results = {}
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = build(preset, tiny).to(device, torch.bfloat16).eval()
        for mode in args.modes:
            if mode == "best":
                model.compile_blocks(dynamic=True)
            for size in sizes:
                label = f"{size[1]}x{size[0]}"
                inputs = latent_inputs(model, 1, size, device, torch.bfloat16)

                def measure():
                    with model.frozen():  # as sampling runs it: derived weights once, not per step
                        step = graphed(model, inputs, device) if mode == "best" else (lambda: model(*inputs))
                        iters = args.iters if mode == "best" else max(3, args.iters // 2)
                        return median_ms(step, device, iters)

                ms = guarded("latency", f"{preset} {mode} {label}", measure)
                if ms is None:
                    continue
                results[(preset, mode, label)] = ms
                tokens = (size[0] // 16) * (size[1] // 16)
                record("latency", {"preset": preset, "mode": mode, "size": label, "tokens": tokens, "ms": ms})
                print(f"latency {preset} {mode} {label}: {ms:.2f} ms", flush=True)
                rows.append([preset, mode, label, tokens, f"{ms:.2f}"])
                if device == "cuda":
                    torch.cuda.empty_cache()
        model = None  # freed before the next backbone is built (the timed closures above are done with it)
    out = table(["backbone", "mode", "image", "tokens", "ms / step (median)"], rows)
    dit = args.presets[0]
    ratio_rows = []
    for hybrid in args.presets[1:]:
        for mode in args.modes:
            for size in sizes:
                label = f"{size[1]}x{size[0]}"
                if (dit, mode, label) in results and (hybrid, mode, label) in results:
                    dit_ms, hybrid_ms = results[(dit, mode, label)], results[(hybrid, mode, label)]
                    target = TARGETS.get(label) if hybrid == "t2md" else None
                    verdict = "-" if target is None or mode != "best" else (
                        "met" if dit_ms / hybrid_ms >= target else "missed")
                    ratio_rows.append([hybrid, mode, label, f"{dit_ms:.2f}", f"{hybrid_ms:.2f}",
                                       f"{dit_ms / hybrid_ms:.2f}x", f"{hybrid_ms - dit_ms:+.2f}",
                                       f"{target}x" if target else "-", verdict])
    if ratio_rows:
        out += "\n\n" + table(["backbone", "mode", "image", f"{dit} ms", "backbone ms", f"{dit} / backbone",
                                "ms over the DiT", "target", ""], ratio_rows)
    return out


# -------------------------------------------------------------------------------------------------------- sample
def stand_ins(backbone: Backbone, tiny: bool) -> tuple[TinyT5TextEncoder, LatentVAE]:
    """A random text encoder of the backbone's text width and length (T5-XXL's 4096 x 120 at full size) and a
    tiny random f8 VAE: inputs of the right shapes at almost no cost."""
    text = TinyT5TextEncoder(d_model=backbone.caption_channels, num_layers=1, num_heads=2 if tiny else 32,
                             d_ff=64 if tiny else 256, max_length=backbone.token_num)
    return text, LatentVAE(pretrained=None, config=TINY_F8_VAE)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, fused=torch.cuda.is_available())


def diffusion_module(preset: str, tiny: bool, compile="auto", **backbone_overrides):
    """A DiffusionModule with backbone ``preset``, the stand-in encoders and the ``compile`` setting (used by
    ``Trainer.fit``)."""
    backbone = build(preset, tiny, **backbone_overrides)
    return DiffusionModule(backbone, *stand_ins(backbone, tiny), optimizer=adamw, compile=compile)


def sample(args) -> str:
    device, tiny = args.device, args.tiny
    rows = []
    for preset in args.presets:
        module = diffusion_module(preset, tiny).to(device).eval()
        module.model.compile_blocks(dynamic=True)
        for text in args.sample_sizes:
            height, width = size_of(text)
            for cuda_graph in (False, True) if device == "cuda" else (False,):
                def per_step():
                    times = {}
                    for steps in (args.sample_steps, 2 * args.sample_steps):
                        sampling = Sampling(steps=steps, cfg_scale=4.5, cuda_graph=cuda_graph)
                        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                            module.generate(["a red circle"], height, width, sampling=sampling)  # warm-up
                            sync(device)
                            begin = time.perf_counter()
                            module.generate(["a red circle"], height, width, sampling=sampling)
                            sync(device)
                        times[steps] = (time.perf_counter() - begin) * 1000
                    # the difference of two step counts leaves out the prompt encoding and decoding
                    return (times[2 * args.sample_steps] - times[args.sample_steps]) / args.sample_steps

                ms = guarded("sample", f"{preset} {text} graph={cuda_graph}", per_step)
                if ms is None:
                    continue
                record("sample", {"preset": preset, "size": text, "cuda_graph": cuda_graph, "ms_per_step": ms})
                print(f"sample {preset} {text} cuda_graph={cuda_graph}: {ms:.2f} ms/step", flush=True)
                rows.append([preset, text, "yes" if cuda_graph else "no", f"{ms:.2f}"])
        module = None  # freed before the next backbone is built
        if device == "cuda":
            torch.cuda.empty_cache()
    return table(["backbone", "image", "CUDA graph", "ms per CFG step (batch 1 -> 2 forwards in one)"], rows)


# ------------------------------------------------------------------------------------------------------- profile
def profile(args) -> str:
    return "\n\n".join(profile_one(args, size_of(text)) for text in args.profile_sizes)


def profile_one(args, size: tuple[int, int]) -> str:
    device, tiny = args.device, args.tiny
    model = build("t2md", tiny).to(device, torch.bfloat16).eval()
    model.compile_blocks(dynamic=True)
    inputs = latent_inputs(model, 1, size, device, torch.bfloat16)
    with model.frozen():
        for _ in range(3):
            model(*inputs)
        sync(device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            model(*inputs)
            sync(device)
    kernels = kernel_times(prof, device)
    total = sum(ms for _, _, ms in kernels)
    rows = [[name[:90], calls, f"{ms:.2f}", f"{100 * ms / total:.1f}%"] for name, calls, ms in kernels[:20]]
    record("profile", {"size": f"{size[1]}x{size[0]}", "total_ms": total, "top": [r[:3] for r in rows]})
    return f"t2md forward at {size[1]}x{size[0]}, compiled, one call: {total:.1f} ms of kernels\n" + table(
        ["kernel", "calls", "ms", "share"], rows)


def kernel_times(prof, device: str, calls: int = 1) -> list[tuple[str, int, float]]:
    """(name, launches per call, ms per call) of each kernel of a torch.profiler run over ``calls`` calls, longest
    first: the GPU kernels on CUDA, the CPU ops elsewhere; never the user ranges around them (``record_function``:
    Lightning runs forward and backward inside ``Optimizer.step``, torch.compile marks its regions)."""
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0 and not e.is_user_annotation
              and (device != "cuda" or e.device_type.name == "CUDA")]
    return sorted(((e.key, e.count // calls, getattr(e, key) / 1000 / calls) for e in events), key=lambda k: -k[2])


def kernel_intervals(prof, device: str) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every kernel of a torch.profiler run (CPU ops elsewhere than CUDA),
    without the user ranges, which the profiler mirrors on the device's timeline and which would cover its gaps. A
    kernel's name ends with the host ops that launched it (``launched_by``), so that an idle gap names what the host
    was doing before the kernel after it."""
    kind = "CUDA" if device == "cuda" else "CPU"
    events = prof.events()
    launcher = {}
    if kind == "CUDA":  # kineto links a device event (its id) to the host op that launched it (that op's id)
        host = {e.id: e for e in events if e.device_type.name == "CPU"}
        launcher = {k.correlation_id(): host.get(k.linked_correlation_id())
                    for k in prof.profiler.kineto_results.events() if k.device_type().name == "CUDA"}
    return [(e.time_range.start, e.time_range.end, e.name + launched_by(launcher.get(e.id)))
            for e in events if e.device_type.name == kind and not e.is_user_annotation]


def launched_by(op, depth: int = 3) -> str:
    """" < " and the innermost ``depth`` host ops around a kernel's launch, innermost first (its aten op, then what
    called it: an autograd node, a compiled region, a user range), or "" for none."""
    names = []
    while op is not None and len(names) < depth:
        names.append(op.name[:48])
        op = op.cpu_parent
    return "".join(f" < {name}" for name in names)


def gpu_gaps(intervals: list[tuple[float, float, str]]) -> tuple[float, float, list[tuple[float, str, str]]]:
    """Where the device idles between the first kernel's start and the last one's end: (window ms, busy ms: the
    union of the kernels' intervals, the idle gaps as (ms, kernel before, kernel after), longest first)."""
    if not intervals:
        return 0.0, 0.0, []
    intervals = sorted(intervals)
    busy, gaps = 0.0, []
    start, end, last = intervals[0]
    for s, e, name in intervals[1:]:
        if s > end:  # a gap: the device ran nothing from ``end`` to ``s``
            busy += end - start
            gaps.append(((s - end) / 1000, last, name))
            start, end, last = s, e, name
        elif e > end:
            end, last = e, name
    busy += end - start
    return (end - intervals[0][0]) / 1000, busy / 1000, sorted(gaps, key=lambda gap: -gap[0])


# --------------------------------------------------------------------------------------------------------- train
class RandomFeatures(Dataset):
    """Batches as the feature cache gives them: latent mean and std, T5-sized text features and mask, captions.
    A few distinct batches, repeated (the data is not what is timed)."""

    def __init__(self, backbone: Backbone, resolution: int, batch: int, length: int, distinct: int = 4):
        side = resolution // 8
        gen = torch.Generator().manual_seed(0)
        self.batches = [{
            "latent_mean": torch.randn(batch, backbone.in_channels, side, side, generator=gen),
            "latent_std": torch.zeros(batch, backbone.in_channels, side, side),
            "text_features": torch.randn(batch, backbone.token_num, backbone.caption_channels, generator=gen),
            "text_mask": torch.arange(backbone.token_num).expand(batch, -1) < torch.randint(
                8, backbone.token_num + 1, (batch, 1), generator=gen),
            "caption": ["a caption"] * batch,
        } for _ in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


class RandomData(L.LightningDataModule):
    def __init__(self, dataset: RandomFeatures, resolution: int):
        super().__init__()
        self.dataset, self.resolution = dataset, resolution

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=None, shuffle=False, num_workers=2, pin_memory=True,
                          persistent_workers=True)


def flops_per_step(module, batch: dict, device: str) -> float:
    """FLOPs of one training step (forward and backward), counted by torch.utils.flop_counter on the eager module
    (matrix products, convolutions and attention; the Mamba scan's custom op is not counted)."""
    module.train()
    one = {k: v[:1].to(device) if torch.is_tensor(v) else v[:1] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter, torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        loss = module.batch_losses(one, module.caption_dropout)["loss"]
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() * len(batch["caption"])


def fit_speed(module, label: str, resolution: int, batch: int, args, folder: str, callbacks=()) -> dict:
    """Trainer.fit for warm-up + timed steps (the blocks compiled on a GPU: ``compile: auto``); images/s from the
    Throughput callback, FLOPs from the counter; ``callbacks`` join the Throughput one."""
    dataset = RandomFeatures(module.model, resolution, batch, args.warmup + args.steps)
    module.batch_encoders = CachedEncoders(module.vae)  # the batches are feature-cache batches
    flops = flops_per_step(module.to(args.device), dataset[0], args.device)
    output = os.path.join(folder, f"{label.replace('/', '')}.json")
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true",
                        max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Throughput(args.warmup, output), *callbacks])
    trainer.fit(module, datamodule=RandomData(dataset, resolution))
    result = json.load(open(output))
    result["tflops"] = flops * result["images_per_sec"] / batch / 1e12
    result["mfu"] = result["tflops"] / PEAK_TFLOPS
    result["compile"] = module.compile_setting
    return result


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def training_setting(setting: str, compile_setting) -> tuple[str, int, int, object]:
    """``PRESET:RESOLUTIONxBATCH[:MODE]`` (``--train``, ``--train_profile``) -> (preset, resolution, batch, the
    module's compile setting: ``{"mode": MODE}`` where the setting names a torch.compile mode, else
    ``compile_setting`` (``--compile``))."""
    preset, _, rest = setting.partition(":")
    shape, *mode = rest.split(":")
    try:
        resolution, batch = (int(v) for v in shape.split("x"))
    except ValueError:
        raise ValueError(f"training setting {setting!r}: expected PRESET:RESOLUTIONxBATCH[:MODE], e.g. "
                         "t2md:512x16 or t2md:512x16:reduce-overhead") from None
    if len(mode) > 1 or (mode and mode[0] not in COMPILE_MODES):
        raise ValueError(f"training setting {setting!r}: MODE is one of {', '.join(COMPILE_MODES)}")
    return preset, resolution, batch, {"mode": mode[0]} if mode else compile_setting


def isolated(args) -> bool:
    """Whether the train, train_profile and distill parts run each measurement in a process of its own
    (``--isolate``)."""
    return args.device == "cuda" if args.isolate is None else args.isolate


def in_own_process(part: str, selection: list[str], args) -> dict:
    """One measurement of ``part`` (``train``, ``train_profile`` or ``distill``) in a fresh process of this script,
    the setting picked by the arguments ``selection`` (e.g. ``["--train", "t2md:512x32"]``) and the rest of
    ``args``: its result row."""
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "results.json")
        command = [sys.executable, os.path.abspath(__file__), "--parts", part, *selection, "--no-isolate",
                   "--device", args.device, "--compile", json.dumps(args.compile), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--results", results, *(["--tiny"] if args.tiny else [])]
        subprocess.run(command, check=True)
        with open(results) as f:
            rows = json.load(f).get(part, [])
    if len(rows) != 1 or "error" in rows[0]:
        raise RuntimeError(f"the {part} process for {' '.join(selection)} measured nothing: {rows}")
    return rows[0]


def train(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for setting in args.train:
            preset, resolution, batch, compile_setting = training_setting(setting, args.compile)
            if args.tiny:
                resolution = 64

            def run():
                if isolated(args):
                    return in_own_process("train", ["--train", setting], args)
                module = diffusion_module(preset, args.tiny, compile_setting, gradient_checkpointing=resolution >= 2048)
                return fit_speed(module, f"{preset}-{resolution}", resolution, batch, args, folder)

            result = guarded("train", setting, run)
            if result is None:
                continue
            record("train", {"setting": setting, **result})
            rows.append([preset, f"{resolution}^2", batch, "yes" if resolution >= 2048 else "no",
                         json.dumps(compile_setting), f"{result['images_per_sec']:.2f}", f"{result['tflops']:.0f}",
                         f"{100 * result['mfu']:.1f}%", f"{result['peak_memory_gib']:.1f}"])
            print(rows[-1], flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return table(["backbone", "image", "batch", "grad. ckpt", "compile", "images/s", "TFLOP/s (counted)", "of 989",
                  "peak GiB"], rows)


# Kernel families of a training step's profile, by the first pattern that its kernel name matches.
KERNEL_FAMILIES = [
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("SSD scan (mamba-ssm)", ("_chunk", "_state_passing", "_bmm_chunk", "chunk_scan", "chunk_state")),
    ("compiled elementwise (Inductor)", ("triton_",)),
    ("conv / norm along scan orders", ("causal_conv1d", "_gather_causal", "_conv_silu_grad", "_conv_rows_grad",
                                       "_gated_rms_norm", "_layer_norm")),
    ("optimizer", ("multi_tensor",)),
    ("ATen reductions and cumsums", ("reduce_kernel", "scan_innermost_dim", "scan_outer_dim")),
    ("copies, casts, indexing", ("copy", "memcpy", "memset", "cast", "index", "gather", "scatter", "cat",
                                 "elementwise")),
]


def kernel_family(name: str) -> str:
    """The family of ``KERNEL_FAMILIES`` whose pattern a kernel's name matches first (case-insensitive), else
    "other"."""
    return next((family for family, patterns in KERNEL_FAMILIES if any(p in name.lower() for p in patterns)), "other")


class ProfileSteps(L.Callback):
    """torch.profiler over ``count`` training steps (forward, backward and optimizer) after ``start`` untimed ones;
    ``done`` once they ran."""

    def __init__(self, start: int, count: int):
        self.start, self.count = start, count
        self.profiler = None
        self.wall = 0.0
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.start:
            device = pl_module.device.type
            sync(device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.wall = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.start + self.count - 1:
            sync(pl_module.device.type)
            self.wall = time.perf_counter() - self.wall
            self.profiler.stop()
            self.done = True


def profile_training(setting: str, args) -> dict:
    """Profile three training steps (at most ``--steps``) of one ``--train_profile`` setting after ``--warmup`` ones
    (the ``train`` part's module and Trainer): its row, with the step's wall time, kernel families, top kernels and
    idle gaps per step (the GPU's kernels on CUDA, the CPU ops elsewhere)."""
    preset, resolution, batch, compile_setting = training_setting(setting, args.compile)
    if args.tiny:
        resolution = 64
    steps = min(3, args.steps)
    profiler = ProfileSteps(args.warmup, steps)
    module = diffusion_module(preset, args.tiny, compile_setting, gradient_checkpointing=resolution >= 2048)
    with tempfile.TemporaryDirectory() as folder:
        fit_speed(module, f"profile-{preset}-{resolution}", resolution, batch, args, folder, callbacks=[profiler])
    if not profiler.done:
        raise RuntimeError(f"{setting}: the profiled steps did not run (warm-up {args.warmup}, steps {steps})")
    kernels = kernel_times(profiler.profiler, args.device, steps)  # per step
    families: dict[str, float] = {}
    for name, _, ms in kernels:
        family = kernel_family(name)
        families[family] = families.get(family, 0.0) + ms
    window, busy, gaps = gpu_gaps(kernel_intervals(profiler.profiler, args.device))
    idle = {"window_ms": window / steps, "busy_ms": busy / steps, "gaps_per_step": len(gaps) / steps,
            "gaps_over_50us_ms": sum(ms for ms, *_ in gaps if ms > 0.05) / steps,
            "longest": [[round(ms, 3), before[:200], after[:200]] for ms, before, after in gaps[:8]]}
    return {"setting": setting, "wall_ms": 1000 * profiler.wall / steps, "kernel_ms": sum(ms for _, _, ms in kernels),
            "families": families, "idle": idle, "top": [[name[:120], calls, ms] for name, calls, ms in kernels[:25]]}


def profile_text(row: dict) -> str:
    """A ``profile_training`` row as text: a summary line, then tables of kernel families, top kernels and the
    longest idle gaps."""
    idle, total = row["idle"], row["kernel_ms"]
    families = [[family, f"{ms:.1f}", f"{100 * ms / total:.1f}%"]
                for family, ms in sorted(row["families"].items(), key=lambda item: -item[1])]
    top = [[name[:100], calls, f"{ms:.2f}"] for name, calls, ms in row["top"]]
    longest = [[f"{ms:.3f}", before[:160], after[:160]] for ms, before, after in idle["longest"]]
    return (f"{row['setting']}: {row['wall_ms']:.1f} ms per step (wall, profiled), {total:.1f} ms of kernels; the "
            f"device busy {idle['busy_ms']:.1f} of {idle['window_ms']:.1f} ms per step, idle in "
            f"{idle['gaps_per_step']:.0f} gaps ({idle['gaps_over_50us_ms']:.1f} ms in those over 50 us)\n"
            + table(["family", "ms per step", "share"], families) + "\n\n"
            + table(["kernel", "calls", "ms"], top) + "\n\n"
            + table(["longest idle gap, ms", "after kernel", "before kernel"], longest))


def train_profile(args) -> str:
    """Where a training step's time goes, for each ``--train_profile`` setting (each in a process of its own with
    ``--isolate``): ``profile_training``'s rows, as text."""
    out = []
    for setting in args.train_profile:
        def run():
            if isolated(args):
                return in_own_process("train_profile", ["--train_profile", setting], args)
            return profile_training(setting, args)

        row = guarded("train_profile", setting, run)
        if row is None:
            continue
        record("train_profile", row)
        out.append(profile_text(row))
        print(out[-1], flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return "\n\n".join(out)


def distill(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        teacher_path = os.path.join(folder, "teacher.safetensors")
        if not isolated(args):  # else each stage's process saves its own
            save_file(build("dit-xl/2", args.tiny).state_dict(), teacher_path)
        for setting in args.distill:
            resolution, batch = (int(v) for v in setting.split("x"))
            if args.tiny:
                resolution = 64
            for stage in args.stages:
                def run():
                    if isolated(args):
                        return in_own_process("distill", ["--distill", setting, "--stages", stage], args)
                    student = build("t2md", args.tiny, gradient_checkpointing=resolution >= 2048)
                    module = DistillModule(student, build("dit-xl/2", args.tiny), teacher_path,
                                           *stand_ins(student, args.tiny), stage=stage, optimizer=adamw,
                                           compile=args.compile)
                    result = fit_speed(module, f"{stage}-{resolution}", resolution, batch, args, folder)
                    result["trained_m"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad) / 1e6
                    return result

                result = guarded("distill", f"{stage} {setting}", run)
                if result is None:
                    continue
                record("distill", {"stage": stage, "setting": setting, **result})
                rows.append([stage, f"{resolution}^2", batch, f"{result['trained_m']:.1f}",
                             f"{result['images_per_sec']:.2f}", f"{result['peak_memory_gib']:.1f}"])
                print(rows[-1], flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return table(["stage", "image", "batch", "trained M params", "images/s", "peak GiB"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = {"check": check, "latency": latency, "sample": sample, "profile": profile, "train": train,
             "train_profile": train_profile, "distill": distill}
    parser.add_argument("--parts", nargs="+", default=[p for p in parts if p != "train_profile"],
                        choices=list(parts))
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS),
                        help="the check part's sections, in this order: "
                        + "; ".join(f"{name}: {what}" for name, what in CHECKS.items()))
    parser.add_argument("--presets", nargs="+", default=["dit-xl/2", "t2md"],
                        help="backbones (e.g. add dimba-l/2, the released Dimba); the first (the DiT) is compared "
                             "with each of the others")
    parser.add_argument("--sizes", nargs="+", default=["512", "1024", "2048", "3840x2160", "4096"],
                        help="latency image sizes, WIDTHxHEIGHT or one number for a square")
    parser.add_argument("--modes", nargs="+", default=["eager", "best"], choices=["eager", "best"])
    parser.add_argument("--sample_sizes", nargs="+", default=["512", "2048"])
    parser.add_argument("--profile_sizes", nargs="+", default=["512", "2048"])
    parser.add_argument("--sample_steps", type=int, default=10)
    parser.add_argument("--train", nargs="+", default=["dit-xl/2:512x32", "t2md:512x32:reduce-overhead",
                                                       "dit-xl/2:2048x2", "t2md:2048x2"],
                        help="PRESET:RESOLUTIONxBATCH[:MODE]; MODE, a torch.compile mode (e.g. reduce-overhead), "
                             "overrides --compile for that run. The default: each backbone at its best setting")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="the train, train_profile and distill parts run each setting (and stage) in a fresh "
                             "process of this script (default: with --device cuda). In one process a run after "
                             "another can be slower: on one H200, t2md at 512^2 trained at 56.75 images/s after "
                             "dit-xl/2 and at 58.97 before it")
    parser.add_argument("--train_profile", nargs="+", default=["dit-xl/2:512x32", "t2md:512x32:reduce-overhead"],
                        help="PRESET:RESOLUTIONxBATCH[:MODE], profiled (train_profile part)")
    parser.add_argument("--compile", type=yaml.safe_load, default="auto",
                        help="the LightningModules' compile setting in train, train_profile and distill: auto, true, "
                             "false or a dict of torch.compile options, e.g. '{mode: max-autotune-no-cudagraphs}'")
    parser.add_argument("--distill", nargs="+", default=["512x16"], help="RESOLUTIONxBATCH")
    parser.add_argument("--stages", nargs="+", choices=["forcing", "kd"], default=["forcing", "kd"],
                        help="the distill part's stages: forcing (stage 1, layer-level teacher forcing), kd (stage 2)")
    parser.add_argument("--iters", type=int, default=15, help="timed calls per latency measurement")
    parser.add_argument("--warmup", type=int, default=6, help="untimed training steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--results", help="JSON file for every result row, rewritten as they come")
    args = parser.parse_args()
    global RESULTS_PATH
    RESULTS_PATH = args.results
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch.set_float32_matmul_precision("high")
    scan = "mamba-ssm's CUDA kernel" if selective_scan_kernel() else "PyTorch (mamba-ssm's selective_scan_cuda " \
        "not built)"
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
          f"Mamba-1 selective scan (dimba-l/2): {scan}", flush=True)
    record("setup", {"torch": torch.__version__, "mamba1_scan": scan})
    tables = []
    for part in dict.fromkeys(args.parts):  # in the order given
        if part in parts:
            started = time.time()
            result = guarded(part, "part", parts[part], args)
            print(f"[{part}: {time.time() - started:.0f} s]", flush=True)
            if result:
                tables.append(f"## {part}\n{result}")
                print(tables[-1], flush=True)
    print("\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
