"""GPU checks and timings of the hybrid backbone and its distillation; prints short tables.

Parts (``--parts``, default all):
  check    Mamba2 kernel paths: our PyTorch chunked SSD vs mamba-ssm's Triton kernels (same weights, same
           input; outputs and gradients; fp32 and bf16), and our module vs ``mamba_ssm.Mamba2(use_mem_eff_path=
           False)`` loaded with the same state dict.
  latency  per-denoising-step latency (batch 1, bf16, one forward, no CFG doubling) of the backbone presets
           at 512^2 .. 4096^2 (SD-VAE latents f8, patch 2).
  train    training-step throughput (images/s) and peak memory (bf16 autocast, AdamW) at 512^2 and 2048^2;
           gradient checkpointing from 2048^2 up (t2md does not fit 80 GB at 2048^2 without it).
  distill  T2MD distillation steps (``DistillModule``: a dit-xl/2 teacher with random weights into the t2md
           student), stage ``forcing`` and stage ``kd`` (mixers trainable), images/s and peak memory, for each
           ``--train`` setting.

Every shape is run once untimed first (Triton autotunes on first use), then timed with CUDA events.

    python benchmarks/hybrid_gpu.py --parts check latency train [--presets dit-xl/2 t2md dimba-l/2]
    python benchmarks/hybrid_gpu.py --device cpu --tiny     # smoke test of the script itself
"""

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from lit_dimba.models.backbone import Backbone, MambaConfig
from lit_dimba.models.mamba import Mamba2
from lit_dimba.modules import DistillModule


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def run_mamba(module: Mamba2, x: torch.Tensor):
    """Output and gradients (input, then parameters by name) of sum(out * fixed weights)."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    weights = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device,
                          dtype=torch.float64)
    dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(dtype) * weights.to(dtype)).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


def check(device: str, tiny: bool) -> list[tuple]:
    rows = []
    d_model, length = (64, 100) if tiny else (1152, 4096)
    cfg = dict(d_state=16, headdim=16, chunk_size=32) if tiny else dict(d_state=256, headdim=64, chunk_size=256)
    torch.manual_seed(0)
    ours = Mamba2(d_model, kernel="torch", **cfg).to(device)
    fused_kernel = "mamba_ssm" if device == "cuda" else "torch"
    fused = Mamba2(d_model, kernel=fused_kernel, **cfg).to(device)
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(2, length, d_model, device=device)
    # Which path carries the fp32 error: both against our PyTorch path in float64.
    out_64, grads_64 = run_mamba(ours.double(), x.double())
    for name, module in (("torch", ours), (fused_kernel, fused)):
        out, grads = run_mamba(module.float(), x)
        errors = {k: rel_err(grads[k], grads_64[k]) for k in grads}
        print(f"{name} fp32 vs float64 gradient rel. errors: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        rows.append((f"{name} fp32 vs torch float64", rel_err(out, out_64), max(errors.values()), 1e-3))
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        a, b = ours.to(dtype), fused.to(dtype)
        out_a, grads_a = run_mamba(a, x.to(dtype))
        out_b, grads_b = run_mamba(b, x.to(dtype))
        errors = {k: rel_err(grads_b[k], grads_a[k]) for k in grads_a}
        print(f"{str(dtype)[6:]} gradient rel. errors: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        rows.append((f"torch vs {fused_kernel} {str(dtype)[6:]}", rel_err(out_b, out_a), max(errors.values()), bound))
    ours.float()
    if device == "cuda":
        from mamba_ssm.modules.mamba2 import Mamba2 as Reference

        reference = Reference(d_model, use_mem_eff_path=False, **cfg).to(device)
        reference.load_state_dict(ours.state_dict())
        with torch.no_grad():
            rows.append(("ours(torch) vs mamba_ssm.Mamba2 fp32", rel_err(ours(x), reference(x)), float("nan"), 1e-3))
    return rows


def latent_inputs(model: Backbone, batch: int, resolution: int, device: str, dtype=torch.float32):
    side = resolution // 8
    x = torch.randn(batch, model.in_channels, side, side, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randn(batch, model.token_num, model.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(batch, model.token_num, dtype=torch.bool, device=device)
    return x, t, y, mask


def timed(fn, device: str, iters: int) -> float:
    """Mean milliseconds per call after one untimed warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) * 1000 / iters


def timed_training(loss_fn, optimizer, device: str, iters: int) -> tuple[float, float]:
    """(ms per training step, peak GiB) of ``loss_fn`` under bf16 autocast + backward + optimizer step."""

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = timed(step, device, iters)
    return ms, torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def build(preset: str, device: str, tiny: bool, **overrides) -> Backbone:
    if tiny:
        small = dict(depth=2, hidden_size=64, num_heads=2, caption_channels=32, token_num=16)
        if preset != "dit-xl/2":
            small["mamba"] = MambaConfig(d_state=16, headdim=16, chunk_size=32)
        overrides = {**small, **overrides}
    return Backbone.from_preset(preset, **overrides).to(device)


def latency(presets, resolutions, device: str, tiny: bool, iters: int) -> list[tuple]:
    rows = []
    for preset in presets:
        model = build(preset, device, tiny).to(torch.bfloat16).eval()
        for resolution in resolutions:
            inputs = latent_inputs(model, 1, resolution, device, torch.bfloat16)
            with torch.no_grad():
                ms = timed(lambda: model(*inputs), device, iters)
            rows.append((preset, f"{resolution}^2", (resolution // 16) ** 2, ms))
            print(f"latency {preset} {resolution}: {ms:.1f} ms", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def train(presets, settings, device: str, tiny: bool, iters: int) -> list[tuple]:
    rows = []
    for preset in presets:
        for resolution, batch in settings:
            model = build(preset, device, tiny, gradient_checkpointing=resolution >= 2048).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            inputs = latent_inputs(model, batch, resolution, device)
            ms, peak = timed_training(lambda: model(*inputs).float().square().mean(), optimizer, device, iters)
            rows.append((preset, f"{resolution}^2", batch, model.gradient_checkpointing, batch * 1000 / ms, peak))
            print(f"train {preset} {resolution} x{batch}: {batch * 1000 / ms:.2f} img/s, {peak:.1f} GiB", flush=True)
            del model, optimizer
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def distill(settings, device: str, tiny: bool, iters: int) -> list[tuple]:
    """Time DistillModule's two stages on random latents and text features (no encoders are run)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        teacher_path = os.path.join(folder, "teacher.safetensors")
        save_file(build("dit-xl/2", "cpu", tiny).state_dict(), teacher_path)
        for resolution, batch in settings:
            for stage in ("forcing", "kd"):
                student = build("t2md", "cpu", tiny, gradient_checkpointing=resolution >= 2048)
                # Stand-ins with the sizes DiffusionModule checks: latents and text features are fed directly.
                text = SimpleNamespace(hidden_size=student.caption_channels, max_length=student.token_num)
                vae = SimpleNamespace(latent_channels=student.in_channels, downsample_factor=8)
                module = DistillModule(student, build("dit-xl/2", "cpu", tiny), teacher_path, text, vae,
                                       stage=stage, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5)).to(device)
                module.train()
                optimizer = module.configure_optimizers()
                x0, t, y, mask = latent_inputs(student, batch, resolution, device)
                noise = torch.randn_like(x0)
                x_t = module.diffusion.add_noise(x0, noise, t)
                drop = torch.zeros(batch, dtype=torch.bool, device=device)

                def loss_fn():
                    if stage == "forcing":
                        return module.forcing_losses(x_t, t, y, mask, drop)["loss"]
                    return module.kd_losses(x0, noise, x_t, t, y, mask, drop)["loss"]

                ms, peak = timed_training(loss_fn, optimizer, device, iters)
                trained = sum(p.numel() for p in module.model.parameters() if p.requires_grad) / 1e6
                rows.append((stage, f"{resolution}^2", batch, trained, batch * 1000 / ms, peak))
                print(f"distill {stage} {resolution} x{batch}: {batch * 1000 / ms:.2f} img/s, {peak:.1f} GiB", flush=True)
                del module, optimizer
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["check", "latency", "train", "distill"])
    parser.add_argument("--presets", nargs="+", default=["dit-xl/2", "t2md", "dimba-l/2"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--train", nargs="+", default=["512x8", "2048x1"], help="RESOLUTIONxBATCH")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    if "check" in args.parts:  # fp32 means fp32 here: no TF32 in either path
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        rows = check(args.device, args.tiny)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        print("\n| comparison | output rel. err | worst grad rel. err | bound |\n|---|---:|---:|---:|")
        for name, out, grad, bound in rows:
            verdict = "ok" if out <= bound and (grad != grad or grad <= bound) else "FAIL"
            print(f"| {name} | {out:.2e} | {grad:.2e} | {bound:g} {verdict} |")
    if "latency" in args.parts:
        rows = latency(args.presets, args.resolutions, args.device, args.tiny, args.iters)
        print("\n| backbone | image | tokens | ms / step |\n|---|---|---:|---:|")
        for preset, image, tokens, ms in rows:
            print(f"| {preset} | {image} | {tokens} | {ms:.1f} |")
    if "train" in args.parts:
        settings = [tuple(int(v) for v in s.split("x")) for s in args.train]
        rows = train(args.presets, settings, args.device, args.tiny, args.iters)
        print("\n| backbone | image | batch | grad. checkpointing | images/s | peak GiB |\n|---|---|---:|---|---:|---:|")
        for preset, image, batch, ckpt, ips, peak in rows:
            print(f"| {preset} | {image} | {batch} | {'yes' if ckpt else 'no'} | {ips:.2f} | {peak:.1f} |")
    if "distill" in args.parts:
        settings = [tuple(int(v) for v in s.split("x")) for s in args.train]
        rows = distill(settings, args.device, args.tiny, args.iters)
        print("\n| stage | image | batch | trained M params | images/s | peak GiB |\n|---|---|---:|---:|---:|---:|")
        for stage, image, batch, trained, ips, peak in rows:
            print(f"| {stage} | {image} | {batch} | {trained:.1f} | {ips:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
