"""Run the T2MD ablation rows of the distillation demo and print their prompt-following scores as a table.

Each row is ``configs/distill/demo.yaml`` plus its file in ``configs/distill/ablations/`` (rows with a teacher
forcing stage run ``demo_forcing.yaml`` first and start stage 2 from it); the teacher row tests the demo teacher
itself. Every row gets the same step budget (3,000 steps). Needs the demo teacher checkpoint
(``runs/demo/checkpoints/last.ckpt``, from ``make demo``).

    python benchmarks/distill_ablation.py --accelerator gpu --parallel 8     # all rows at once on one GPU
    python benchmarks/distill_ablation.py --rows full scratch                 # some rows, on this machine

Runs are written under ``--out`` (default ``runs/ablation``), one folder per row, with ``scores.json`` beside.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from shared import ABLATION_ROWS, ablation_files  # benchmarks/shared.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "distill", "demo.yaml")
FORCING = os.path.join(ROOT, "configs", "distill", "demo_forcing.yaml")
TEACHER_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")


def ablation(files: tuple[str, ...]) -> list[str]:
    """``--config`` options of a row's files under configs/distill/ablations/."""
    return [arg for path in ablation_files(files) for arg in ("--config", path)]


def run(args: list[str], log_path: str) -> float:
    """Run ``main.py`` with ``args``, output to ``log_path``; return seconds; raise on failure."""
    start = time.time()
    with open(log_path, "a") as log:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"`main.py {' '.join(args)}` failed; see {log_path}")
    return time.time() - start


def run_row(name: str, out: str, common: list[str], student: list[str]) -> dict:
    """Train (both stages where the row has them) and test one row; returns its scores and timings."""
    row_dir = os.path.join(out, name)
    os.makedirs(row_dir, exist_ok=True)
    log = os.path.join(row_dir, "log.txt")
    logger = ["--trainer.logger.init_args.save_dir", out, "--trainer.logger.init_args.name", name]
    seconds = {}
    if name == "teacher":
        ckpt = os.path.join(ROOT, "runs", "demo", "checkpoints", "last.ckpt")
        configs = ["--config", TEACHER_CONFIG]
        logger += ["--trainer.logger.init_args.version", "test"]
        test_dir = os.path.join(row_dir, "test")
    else:
        _, files, forcing = ABLATION_ROWS[name]
        common = common + student
        configs = ["--config", BASE, *ablation(files)]
        stage2 = []
        if forcing:
            stage1 = ["--config", BASE, "--config", FORCING, *ablation(files)]
            seconds["forcing"] = run(["fit", *stage1, *common, *logger], log)
            stage2 = ["--model.init_args.init_student", os.path.join(row_dir, "forcing", "checkpoints", "last.ckpt")]
        else:
            stage2 = ["--model.init_args.init_student", "null"]
        seconds["kd"] = run(["fit", *configs, *common, *logger, *stage2], log)
        ckpt = os.path.join(row_dir, "kd", "checkpoints", "last.ckpt")
        configs += stage2
        test_dir = os.path.join(row_dir, "kd")
    seconds["test"] = run(["test", *configs, *common, *logger, "--ckpt_path", ckpt], log)
    scores = json.load(open(os.path.join(test_dir, "test_scores.json")))["scores"]
    result = {"row": name, "scores": scores, "seconds": seconds}
    json.dump(result, open(os.path.join(row_dir, "scores.json"), "w"), indent=1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["teacher", *ABLATION_ROWS],
                        choices=["teacher", *ABLATION_ROWS])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="rows trained at once")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers per run")
    parser.add_argument("--mamba_kernel", choices=["auto", "torch", "mamba_ssm"],
                        help="override the student's Mamba-2 kernel (torch avoids Triton autotuning in every run)")
    options = parser.parse_args()
    common = ["--trainer.accelerator", options.accelerator, "--trainer.enable_progress_bar", "false",
              "--data.init_args.num_workers", str(options.num_workers)]
    student = ["--model.init_args.student.init_args.mamba.kernel", options.mamba_kernel] if options.mamba_kernel else []
    with ThreadPoolExecutor(options.parallel) as pool:
        futures = {name: pool.submit(run_row, name, options.out, common, student) for name in options.rows}
    print("| row | colour | shape | position | size | all correct | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, future in futures.items():
        if future.exception():
            print(f"| {name} | failed: {future.exception()} |")
            continue
        result = future.result()
        s = result["scores"]
        train = sum(v for k, v in result["seconds"].items() if k != "test")
        title = "teacher (DiT)" if name == "teacher" else ABLATION_ROWS[name][0]
        print(f"| {title} | {s['colour']:.3f} | {s['shape']:.3f} | {s['position']:.3f} | {s['size']:.3f} | "
              f"{s['all']:.3f} | {train:.0f} |")


if __name__ == "__main__":
    main()
