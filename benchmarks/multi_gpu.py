"""Scale-out checks on one multi-GPU node, through the real CLI (``main.py fit``); prints short tables.

Parts (``--parts``, default all):
  speed   training throughput (``callbacks.Throughput``, images/s over all GPUs after a warm-up) of the dit-xl/2
          teacher and the t2md hybrid at 512^2 (bf16-mixed, gradient checkpointing, the same per-GPU batch) on 1 GPU
          and on ``--gpus`` GPUs with DDP and with FSDP (``lit_dimba.strategies.DiffusionFSDP``), and the speed-up.
          Text features come from a random T5-sized stand-in (4096 channels, 120 tokens) and latents from a tiny
          random f8 VAE, so only the backbone's cost is real.
  loss    the tiny demo teacher for ``--loss_steps`` steps: on ``--gpus`` GPUs with batch B each vs 1 GPU with batch
          gpus x B, and 1 GPU again with another seed (the noise to compare against); val/loss at the end.
  resume  the tiny demo teacher on ``--gpus`` GPUs, same seed, fp32: DDP vs FSDP (weights, EMA and Adam state of
          the saved checkpoints), then the FSDP run (bf16-mixed) resumed on 1 GPU without FSDP.

    python benchmarks/multi_gpu.py --gpus 2 --parts speed        # ~10 min on 2 H200s (Triton autotunes t2md once)
    python benchmarks/multi_gpu.py --gpus 2 --parts loss resume  # ~4 min
    python benchmarks/multi_gpu.py --device cpu --tiny --parts loss resume   # smoke test of the script (gloo)

Runs go to ``--out`` (default ``runs/multi_gpu``), one folder per run with its log. Set ``TRITON_CACHE_AUTOTUNING=1``
so that mamba-ssm's kernels are autotuned once, not in every run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_dimba.checkpoints import ema_state
from shared import TINY_F8_VAE, backbone_arguments, table  # benchmarks/shared.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "configs", "teacher_dit_xl2_512.yaml")
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
FSDP = {"class_path": "lit_dimba.strategies.DiffusionFSDP"}


def run(name: str, out: str, devices: int, configs: list[str], overrides: dict, extra: list[str] = (),
        timeout: int = 400) -> str:
    """``main.py fit`` with ``configs`` plus ``overrides`` (written as a YAML file) on ``devices`` devices, in its
    own folder; returns the folder. Raises with the log's tail on failure or after ``timeout`` seconds."""
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    override = os.path.join(folder, "override.yaml")
    with open(override, "w") as f:
        yaml.safe_dump(overrides, f)
    args = [sys.executable, os.path.join(ROOT, "main.py"), "fit", *[a for c in configs for a in ("--config", c)],
            "--config", override, "--trainer.devices", str(devices), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.time()
    with open(os.path.join(folder, "log.txt"), "w") as log:
        result = subprocess.run(args, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    print(f"  {name}: {time.time() - start:.0f} s", flush=True)
    if result.returncode:
        tail = open(os.path.join(folder, "log.txt")).read()[-3000:]
        raise RuntimeError(f"run {name} failed:\n{tail}")
    return folder


def scalar(folder: str, tag: str) -> float:
    """Last value of a TensorBoard scalar in a run folder."""
    for root, _, files in os.walk(folder):
        if any(f.startswith("events.out") for f in files):
            events = EventAccumulator(root).Reload()
            if tag in events.Tags()["scalars"]:
                return events.Scalars(tag)[-1].value
    raise KeyError(f"{tag} not logged in {folder}")


def workers(args, n: int) -> int:
    """Data-loader workers: none on CPU, where forking workers of a multi-threaded gloo process can deadlock."""
    return 0 if args.device == "cpu" else n


def trainer(args, **more) -> dict:
    base = {"accelerator": "cpu" if args.device == "cpu" else "gpu", "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "run"}},
        "enable_progress_bar": False}
    return {**base, **more}


# --------------------------------------------------------------------------------------------------------- speed
def speed(args) -> str:
    tiny = args.tiny
    backbone = {"depth": 2, "hidden_size": 64, "num_heads": 2, "caption_channels": 32, "token_num": 8,
                "base_size": 4} if tiny else {}
    tiny_layouts = {"dit-xl/2": {}, "t2md": {"layout": ["attn", "mamba_h"],
                                             "mamba": {"d_state": 16, "headdim": 16, "chunk_size": 16}}}
    resolution = 64 if tiny else 512
    text = {"class_path": "lit_dimba.conditioning.TinyT5TextEncoder",
            "init_args": {"d_model": 32 if tiny else 4096, "num_layers": 1, "num_heads": 2 if tiny else 32,
                          "d_ff": 64 if tiny else 256, "max_length": 8 if tiny else 120}}
    rows, results = [], {}
    for name in args.backbones:
        arguments = {**backbone_arguments(name), **backbone, **(tiny_layouts[name] if tiny else {})}
        multi = [(args.gpus, "ddp" if name == "ddp" else FSDP) for name in args.strategies]
        for devices, strategy in [(1, "auto"), *multi]:
            label = "fsdp" if strategy is FSDP else strategy
            overrides = {
                "trainer": trainer(args, max_steps=args.warmup + args.steps, limit_val_batches=0,
                                   num_sanity_val_steps=0, enable_checkpointing=False, strategy=strategy,
                                   precision="32-true" if args.device == "cpu" else "bf16-mixed",
                                   callbacks=[{"class_path": "callbacks.Throughput", "init_args": {
                                       "warmup_steps": args.warmup, "output": "speed.json"}}]),
                "model": {"class_path": "lit_dimba.modules.DiffusionModule", "init_args": {
                    "backbone": {"class_path": "lit_dimba.models.Backbone",
                                 "init_args": {**arguments, "gradient_checkpointing": True}},
                    "text_encoder": text,
                    "vae": {"class_path": "lit_dimba.conditioning.LatentVAE",
                            "init_args": {"pretrained": None, "config": TINY_F8_VAE}}}},
                "data": {"init_args": {"resolution": resolution, "batch_size": args.batch,
                                       "num_workers": workers(args, 6)}},
                "base_callbacks": [],  # no EMA or checkpoint: the backbone's training step is what is timed
            }
            folder = run(f"speed-{name.replace('/', '')}-{label}-{devices}", args.out, devices, [TEACHER], overrides)
            result = json.load(open(os.path.join(folder, "speed.json")))
            results[(name, label, devices)] = result
            single = results[(name, "auto", 1)]["images_per_sec"]
            rows.append([name, f"{resolution}^2", args.batch, label, devices, f"{result['images_per_sec']:.1f}",
                         f"{result['images_per_sec'] / single:.2f}x", f"{result['peak_memory_gib']:.1f}"])
    return table(["backbone", "size", "batch/GPU", "strategy", "GPUs", "images/s", "vs 1 GPU", "peak GiB/GPU"], rows)


# ---------------------------------------------------------------------------------------------------------- loss
def demo_overrides(args, batch: int, steps: int, **trainer_args) -> dict:
    return {"trainer": trainer(args, max_steps=steps, val_check_interval=steps, limit_val_batches=4,
                               check_val_every_n_epoch=None, log_every_n_steps=1, **trainer_args),
            "data": {"init_args": {"batch_size": batch, "val_batch_size": 32, "num_workers": workers(args, 2)}}}


def loss(args) -> str:
    steps, batch = args.loss_steps, args.loss_batch
    runs = [(f"{args.gpus} GPUs x batch {batch}", args.gpus, batch, 0, "ddp"),
            (f"1 GPU x batch {args.gpus * batch}", 1, args.gpus * batch, 0, "auto"),
            (f"1 GPU x batch {args.gpus * batch}, seed 1", 1, args.gpus * batch, 1, "auto")]
    rows = []
    for label, devices, b, seed, strategy in runs:
        overrides = demo_overrides(args, b, steps, strategy=strategy, callbacks=[], enable_checkpointing=False)
        overrides["seed_everything"] = seed
        overrides["base_callbacks"] = []  # val/loss of the trained weights, not of an EMA
        folder = run(f"loss-{devices}x{b}-seed{seed}", args.out, devices, [DEMO], overrides)
        rows.append([label, steps, f"{scalar(folder, 'val/loss'):.4f}", f"{scalar(folder, 'train/loss'):.4f}"])
    return table(["run", "steps", "val/loss", "last train/loss (rank 0)"], rows)


# -------------------------------------------------------------------------------------------------------- resume
def resume(args) -> str:
    steps = args.resume_steps
    callbacks = [{"class_path": "callbacks.EMA", "init_args": {"decay": 0.9, "warmup": False}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpt", "save_last": True, "every_n_train_steps": steps}}]
    common = dict(callbacks=callbacks, gradient_clip_val=1.0, precision="32-true")
    ddp = run("resume-ddp", args.out, args.gpus, [DEMO], demo_overrides(args, 16, steps, strategy="ddp", **common))
    fsdp = run("resume-fsdp", args.out, args.gpus, [DEMO], demo_overrides(args, 16, steps, strategy=FSDP, **common))
    a, b = (torch.load(os.path.join(f, "ckpt", "last.ckpt"), map_location="cpu", weights_only=True) for f in (ddp, fsdp))

    def ema(c):
        return ema_state(c)["shadow"]

    def diff(x, y):
        return max((x[k].float() - y[k].float()).abs().max().item() for k in x)

    adam_a, adam_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    order_a = [p for g in a["optimizer_states"][0]["param_groups"] for p in g["params"]]
    order_b = [p for g in b["optimizer_states"][0]["param_groups"] for p in g["params"]]
    exp_avg = max((adam_a[i]["exp_avg"] - adam_b[j]["exp_avg"]).abs().max().item() for i, j in zip(order_a, order_b))
    aliased = sum(torch.equal(s["exp_avg"], s["exp_avg_sq"]) for s in adam_b.values())
    rows = [["weights", f"{diff(a['state_dict'], b['state_dict']):.2e}"], ["EMA", f"{diff(ema(a), ema(b)):.2e}"],
            ["Adam exp_avg", f"{exp_avg:.2e}"], ["tensors with exp_avg == exp_avg_sq (FSDP)", f"{aliased} of {len(adam_b)}"],
            ["EMA tensors / model tensors in checkpoint", f"{len(ema(b))} / {len(b['state_dict'])}"]]

    bf16 = "32-true" if args.device == "cpu" else "bf16-mixed"
    saved = run("resume-fsdp-bf16", args.out, args.gpus, [DEMO],
                demo_overrides(args, 16, steps, strategy=FSDP, callbacks=callbacks, precision=bf16))
    resumed_overrides = demo_overrides(args, 16, 2 * steps, strategy="auto", callbacks=callbacks, precision=bf16)
    resumed = run("resume-fsdp-bf16", args.out, 1, [DEMO], resumed_overrides, ["--ckpt_path", "ckpt/last.ckpt"])
    final = torch.load(os.path.join(resumed, "ckpt", "last.ckpt"), map_location="cpu", weights_only=True)
    finite = all(torch.isfinite(v).all() for v in final["state_dict"].values())
    rows += [[f"FSDP ({bf16}) on {args.gpus} GPUs -> resumed on 1 GPU, step", f"{steps} -> {final['global_step']}"],
             ["resumed weights finite, val/loss", f"{finite}, {scalar(saved, 'val/loss'):.4f}"]]
    return table([f"DDP vs FSDP, {args.gpus} GPUs, fp32, {steps} steps", "max abs difference"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["speed", "loss", "resume"], choices=["speed", "loss", "resume"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--tiny", action="store_true", help="tiny backbones (smoke test)")
    parser.add_argument("--backbones", nargs="+", default=["dit-xl/2", "t2md"], choices=["dit-xl/2", "t2md"])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"],
                        help="multi-GPU strategies of the speed part")
    parser.add_argument("--batch", type=int, default=16, help="per-GPU batch of the speed part")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the speed part")
    parser.add_argument("--loss_steps", type=int, default=50)
    parser.add_argument("--loss_batch", type=int, default=16, help="per-GPU batch of the multi-GPU loss run")
    parser.add_argument("--resume_steps", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "multi_gpu"))
    args = parser.parse_args()
    parts = {"speed": speed, "loss": loss, "resume": resume}
    tables = []
    for part in args.parts:
        print(f"{part}:", flush=True)
        tables.append(parts[part](args))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
