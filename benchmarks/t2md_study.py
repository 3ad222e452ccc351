"""T2MD's claim at small scale: a strong DiT teacher, distilled into the hybrid at a fifth of its steps.

Trains the study teacher (``configs/study/teacher.yaml``: a DiT on the compositional world, until its
prompt-following score stops rising), then every ablation row of ``configs/distill/ablations/`` on the study student
(``configs/study/distill.yaml``) for 3 seeds each, plus two rows that test a fix (stage 2 training every weight), at
a budget of a fifth of the teacher's steps, and prints the table (mean and spread per GenEval task and overall), the
cost of reaching 95% of the teacher's score, and a plot of score against steps. README, "T2MD's claim at small
scale", has the results.

    python benchmarks/t2md_study.py --gpus 0 1 --per_gpu 3 --time_limit 420 --min_unit_seconds 300  # one GPU call
    python benchmarks/t2md_study.py --report            # table and plot of what is done
    python benchmarks/t2md_study.py --tiny --rows scratch full --seeds 0  # toy sizes on the CPU (its test)

The study is resumable across calls: each unit (the teacher, the solo timing of a row's training step, one row at
one seed) writes ``result.json`` into its folder under ``--out`` when it finishes and keeps only its logs and, for
the teacher, its exported EMA weights (36 MB), so the folder can be carried to the next call. A unit still running
at ``--time_limit`` is stopped and deleted; it runs again next time.

Rows and budget: a row at seed s is ``main.py fit`` of its configs with ``seed_everything`` s; rows with teacher
forcing run stage 1 for a sixth of the budget, then stage 2 for the rest, starting from stage 1's student. The
learning rate is constant after its warm-up and the EMA does not depend on the run's length, so the state after k
steps does not depend on ``max_steps``: ``scratch``, which needs no teacher, starts beside the teacher with the
largest possible budget, and every score is read at step ``budget`` of its run's validation curve.
"""

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from lit_dimba.checkpoints import export_backbone
from shared import ABLATION_ROWS, ablation_files  # benchmarks/shared.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TEACHER_CONFIGS = ["demo.yaml", "world/compositional.yaml", "study/teacher.yaml"]
STUDENT_CONFIGS = ["distill/demo.yaml", "study/distill.yaml"]
FORCING_CONFIG = "distill/demo_forcing.yaml"
TIMING_CONFIG = "study/timing.yaml"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SCORES = (*TASKS, "overall")
TAG = "val/prompt_following/"

# The paper's rows, then three that are not: they test fixes for its ordering (stage 2 training every weight, not
# only the mixers; lighter distillation weights).
ROWS = {
    **ABLATION_ROWS,
    "weight_copy_all": ("+ weight copy, every weight trained", ("weight_copy", "train_all"), False),
    "full_all": ("full recipe, stage 2 trains every weight", ("train_all",), True),
    "full_all_light": ("full recipe, every weight, a fifth of the KD weights", ("train_all", "light_kd"), True),
}
COST_ROWS = ("scratch", "full", "weight_copy_all")  # the rows of the cost table and the plot
REACH = 0.95  # the cost table counts steps until a student first scores this share of the teacher's overall score

# --tiny: the whole study at toy size on the CPU, for its smoke test
TINY_SIZE = {"hidden_size": 32, "depth": 2, "num_heads": 2}
TINY = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.limit_val_batches", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
        "--data.init_args.source.init_args.num_val", "8", "--data.init_args.source.init_args.num_test_prompts", "6",
        "--model.init_args.sampling.steps", "2"]


def config_args(files: list[str]) -> list[str]:
    return [arg for name in files for arg in ("--config", os.path.join(CONFIGS, name))]


def size_args(options, backbones: list[str]) -> list[str]:
    """Command-line settings that shrink ``backbones`` (``backbone``, ``teacher``, ``student``) in --tiny runs."""
    if not options.tiny:
        return []
    return [arg for name in backbones for key, value in TINY_SIZE.items()
            for arg in (f"--model.init_args.{name}.init_args.{key}", str(value))]


def read_curve(log_dir: str, offset: int = 0) -> list[dict]:
    """The prompt-following scores that a run logged to TensorBoard under ``log_dir``: one entry per validation,
    ``{"step": steps trained + offset, <score>: value, ...}``, by step. (Lightning logs a validation's metrics at
    the index of the last training batch, one less than the steps trained.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    points: dict[int, dict] = {}
    for key in SCORES:
        if TAG + key in events.Tags()["scalars"]:
            for event in events.Scalars(TAG + key):
                step = event.step + 1 + offset
                points.setdefault(step, {"step": step})[key] = event.value
    return [points[step] for step in sorted(points)]


def at_step(curve: list[dict], step: int) -> dict | None:
    """The curve's scores at ``step`` (the last validation at or before it), or None when it has none."""
    done = [point for point in curve if point["step"] <= step and "overall" in point]
    return done[-1] if done else None


def first_reaching(curve: list[dict], target: float, budget: int) -> int | None:
    """The first step (within ``budget``) at which the overall score reaches ``target``, or None."""
    return next((p["step"] for p in curve if p["step"] <= budget and p.get("overall", -1) >= target), None)


class Unit:
    """One piece of the study that runs as ``main.py`` processes in its own folder (its working directory) and
    ends by writing ``result.json`` there. ``gpus`` is how many GPU slots it takes (a whole GPU: the teacher, the
    timing runs) and ``needs_teacher`` whether it waits for the teacher's export."""

    def __init__(self, name: str, folder: str, needs_teacher: bool, whole_gpu: bool):
        self.name, self.folder, self.needs_teacher, self.whole_gpu = name, folder, needs_teacher, whole_gpu

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.folder, "result.json"))


class Study:
    def __init__(self, options):
        self.options = options
        self.out = os.path.abspath(options.out)
        self.teacher_dir = os.path.join(self.out, "teacher")
        self.export = os.path.join(self.teacher_dir, "export")
        self.common = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        self.common += TINY if options.tiny else []
        self.val_interval = options.val_interval

    # ------------------------------------------------------------------------------------------------ budget
    @property
    def teacher_result(self) -> dict | None:
        path = os.path.join(self.teacher_dir, "result.json")
        return json.load(open(path)) if os.path.exists(path) else None

    def budget(self) -> int:
        """Student steps: a fifth of the teacher's steps (its ``max_steps`` before the teacher has run), rounded
        down to whole validation intervals."""
        teacher = self.teacher_result
        steps = teacher["steps"] if teacher else self.options.teacher_steps
        return max(2 * self.val_interval, steps // 5 // self.val_interval * self.val_interval)

    def forcing_steps(self, budget: int) -> int:
        """Stage 1's share of a budget: about a sixth, in whole validation intervals (its run ends with a validation,
        which writes the checkpoint stage 2 starts from)."""
        return max(self.val_interval, budget // 6 // self.val_interval * self.val_interval)

    # ------------------------------------------------------------------------------------------------ units
    def units(self) -> list[Unit]:
        units = [Unit("teacher", self.teacher_dir, needs_teacher=False, whole_gpu=True)]
        for seed in self.options.seeds:
            for row in self.options.rows:
                units.append(Unit(f"{row}/seed{seed}", os.path.join(self.out, "rows", row, f"seed{seed}"),
                                  needs_teacher=row != "scratch", whole_gpu=False))
        for kind in ("scratch", "forcing", "kd") if self.options.gpus else ():  # GPU seconds need a GPU
            units.append(Unit(f"timing/{kind}", os.path.join(self.out, "timing", kind), needs_teacher=True,
                              whole_gpu=True))
        return units

    def commands(self, unit: Unit, seconds_left: float) -> list[list[str]]:
        """The ``main.py`` argument lists of ``unit``, run one after the other in its folder."""
        if unit.name == "teacher":
            args = ["fit", *config_args(TEACHER_CONFIGS), *self.common, *size_args(self.options, ["backbone"]),
                    "--trainer.max_steps", str(self.options.teacher_steps),
                    "--trainer.val_check_interval", str(self.options.teacher_val_interval),
                    *self.logger("teacher", "fit")]
            if math.isfinite(seconds_left):
                max_time = max(60, int(seconds_left - 60))  # leave time for the export before the deadline
                args += ["--trainer.max_time", f"00:00:{max_time // 60:02d}:{max_time % 60:02d}"]
            return [args]
        if unit.name.startswith("timing/"):
            kind = unit.name.split("/")[1]
            row = "scratch" if kind == "scratch" else "full"
            return [self.student_fit(row, 0, kind, self.options.timing_steps, [TIMING_CONFIG])]
        row, seed = unit.name.split("/")
        seed = int(seed.removeprefix("seed"))
        budget = self.budget()
        if not ROWS[row][2]:
            return [self.student_fit(row, seed, "kd", budget)]
        forcing = self.forcing_steps(budget)
        stage1 = os.path.join(unit.folder, "logs", row, "forcing", "checkpoints", "last.ckpt")
        return [self.student_fit(row, seed, "forcing", forcing),
                self.student_fit(row, seed, "kd", budget - forcing, init_student=stage1)]

    def student_fit(self, row: str, seed: int, stage: str, steps: int, overlays: list[str] = (),
                    init_student: str = "null") -> list[str]:
        """``main.py fit`` of one stage of ``row``: the student configs, the row's file, then ``overlays``;
        stage 2 starts from ``init_student`` (stage 1's checkpoint, or null: the student's initialisation)."""
        files = STUDENT_CONFIGS + ([FORCING_CONFIG] if stage == "forcing" else [])
        files += ablation_files(ROWS[row][1])  # absolute: config_args keeps them as they are
        args = ["fit", *config_args(files + list(overlays)), *self.common,
                *size_args(self.options, ["teacher", "student"]),
                "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
                "--trainer.val_check_interval", str(min(self.val_interval, steps)), *self.logger(row, stage)]
        if stage == "kd":
            args += ["--model.init_args.init_student", init_student]
        if row != "scratch":
            args += ["--model.init_args.teacher_checkpoint", self.export]
        return args

    def logger(self, name: str, version: str) -> list[str]:
        return ["--trainer.logger.init_args.save_dir", "logs", "--trainer.logger.init_args.name", name,
                "--trainer.logger.init_args.version", version]

    def finish(self, unit: Unit, seconds: float) -> None:
        """After a unit's processes succeeded: read its results, write ``result.json``, delete its checkpoints."""
        logs = os.path.join(unit.folder, "logs")
        if unit.name == "teacher":
            folder = os.path.join(logs, "teacher", "fit", "checkpoints")
            curve = read_curve(os.path.join(logs, "teacher", "fit"))
            steps = curve[-1]["step"]  # training ends at a validation, unless the time limit cut it short
            best = max(curve, key=lambda point: point["overall"])  # the first of equal scores, as best.ckpt
            written = export_backbone(os.path.join(folder, "best.ckpt"), self.export)  # the EMA weights
            os.remove(written["checkpoint"])  # the students read model.safetensors
            stopped = ("max_steps" if steps >= self.options.teacher_steps else
                       "no gain in 5 validations" if best["step"] + 5 * self.options.teacher_val_interval <= steps
                       else "time limit")
            result = {"steps": steps, "best": best, "curve": curve, "seconds": seconds, "stopped": stopped}
        elif unit.name.startswith("timing/"):
            kind = unit.name.split("/")[1]
            row = "scratch" if kind == "scratch" else "full"
            timed = json.load(open(os.path.join(unit.folder, "throughput.json")))
            batch = 8 if self.options.tiny else 256
            result = {"seconds_per_step": batch / timed["images_per_sec"], **timed, "row": row, "stage": kind}
        else:
            row = unit.name.split("/")[0]
            offset = self.forcing_steps(self.budget()) if ROWS[row][2] else 0
            curve = read_curve(os.path.join(logs, row, "kd"), offset)
            if ROWS[row][2]:
                curve = read_curve(os.path.join(logs, row, "forcing")) + curve
            result = {"curve": curve, "seconds": seconds, "budget": self.budget()}
        for folder, _, _ in list(os.walk(logs)):
            if os.path.basename(folder) == "checkpoints":
                shutil.rmtree(folder)
        json.dump(result, open(os.path.join(unit.folder, "result.json"), "w"), indent=1)

    # ------------------------------------------------------------------------------------------------ running
    def run(self) -> None:
        """Run every unit not done yet on the GPU slots (``--gpus`` x ``--per_gpu``; on the CPU, ``--per_gpu``
        slots), until all are done or ``--time_limit``."""
        options = self.options
        start = time.time()
        deadline = start + options.time_limit
        gpus = options.gpus if options.gpus else ["cpu"]
        free = {gpu: options.per_gpu for gpu in gpus}
        running: dict[str, tuple] = {}  # name -> (unit, gpu, slots, process, remaining commands, started)
        pending = [unit for unit in self.units() if not unit.done]
        teacher = next(unit for unit in self.units() if unit.name == "teacher")
        print(f"t2md study: {len(pending)} units to run in {self.out}", flush=True)
        while pending or running:
            for name, (unit, gpu, slots, process, commands, started) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                log = os.path.join(unit.folder, "log.txt")
                if code:
                    del running[name]
                    free[gpu] += slots
                    print(f"  {name}: failed (exit {code}); see {log}", flush=True)
                    continue
                if commands:
                    running[name] = (unit, gpu, slots, self.launch(unit, commands[0], gpu), commands[1:], started)
                    continue
                del running[name]
                free[gpu] += slots
                self.finish(unit, time.time() - started)
                print(f"  {name}: done in {time.time() - started:.0f} s", flush=True)
            if time.time() > deadline:
                for name, (unit, gpu, slots, process, commands, started) in running.items():
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait()
                    shutil.rmtree(unit.folder)
                    print(f"  {name}: stopped at the time limit; it runs again next time", flush=True)
                return
            for unit in list(pending):
                if unit.needs_teacher and not teacher.done:
                    continue
                if deadline - time.time() < (options.min_unit_seconds if unit.name != "teacher" else 0):
                    pending.remove(unit)  # not enough time left to finish it: next call
                    continue
                need = options.per_gpu if unit.whole_gpu else 1
                gpu = next((g for g in gpus if free[g] >= need), None)
                if gpu is None:  # no slot free
                    continue
                if os.path.exists(unit.folder):
                    shutil.rmtree(unit.folder)  # a run cut off earlier
                os.makedirs(unit.folder)
                commands = self.commands(unit, deadline - time.time())
                free[gpu] -= need
                pending.remove(unit)
                running[unit.name] = (unit, gpu, need, self.launch(unit, commands[0], gpu), commands[1:], time.time())
                print(f"  {unit.name}: started" + (f" on GPU {gpu}" if gpu != "cpu" else ""), flush=True)
            if not running and pending and not teacher.done:
                print("  the teacher is not done; the units that need it wait for the next call", flush=True)
                return
            time.sleep(1)

    def launch(self, unit: Unit, args: list[str], gpu) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        if gpu != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        log = open(os.path.join(unit.folder, "log.txt"), "a")
        log.write(f"$ main.py {' '.join(args)}\n")
        log.flush()
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=unit.folder, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    # ------------------------------------------------------------------------------------------------ report
    def report(self) -> str:
        """The study's tables from every finished unit, as markdown; also writes ``table.md`` and ``curve.svg``."""
        teacher = self.teacher_result
        if teacher is None:
            return "the teacher has not finished yet"
        budget = self.budget()
        target = REACH * teacher["best"]["overall"]
        lines = [f"Teacher: {teacher['steps']} steps in {teacher['seconds']:.0f} s (stopped: {teacher['stopped']}), "
                 f"best at step {teacher['best']['step']}. Students: {budget} steps (a fifth), "
                 f"{len(self.options.seeds)} seeds; mean +- spread (sample standard deviation over seeds).", "",
                 "| row | " + " | ".join(SCORES) + " | seeds |", "|---|" + "---:|" * (len(SCORES) + 1),
                 "| teacher (DiT) | " + " | ".join(f"{teacher['best'][key]:.3f}" for key in SCORES) + " | 1 |"]
        curves = {}
        for row, (title, _, _) in ROWS.items():
            results = [self.row_result(row, seed) for seed in self.options.seeds]
            results = [result for result in results if result]
            if not results:
                continue
            curves[row] = [result["curve"] for result in results]
            finals = [at_step(result["curve"], budget) for result in results]
            finals = [final for final in finals if final]
            cells = []
            for key in SCORES:
                values = [final[key] for final in finals]
                spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""  # one seed: no spread
                cells.append(f"{statistics.mean(values):.3f}{spread}" if values else "-")
            lines.append(f"| {title} | " + " | ".join(cells) + f" | {len(finals)} |")
        lines += ["", f"Cost of reaching {REACH:.0%} of the teacher's overall score ({target:.3f}) within "
                      f"{budget} steps (GPU seconds: steps times the row's solo seconds per step):", "",
                  "| row | seed | steps | GPU s |", "|---|---:|---:|---:|"]
        for row in COST_ROWS:
            for seed, curve in zip(self.options.seeds, curves.get(row, [])):
                step = first_reaching(curve, target, budget)
                seconds = self.gpu_seconds(row, step) if step is not None else None
                lines.append(f"| {ROWS[row][0]} | {seed} | {step if step is not None else f'> {budget}'} | "
                             f"{f'{seconds:.0f}' if seconds is not None else '-'} |")
        text = "\n".join(lines)
        open(os.path.join(self.out, "table.md"), "w").write(text + "\n")
        write_plot(os.path.join(self.out, "curve.svg"),
                   {ROWS[row][0]: curves[row] for row in COST_ROWS if row in curves},
                   teacher["best"]["overall"], target, budget)
        return text

    def row_result(self, row: str, seed: int) -> dict | None:
        path = os.path.join(self.out, "rows", row, f"seed{seed}", "result.json")
        return json.load(open(path)) if os.path.exists(path) else None

    def gpu_seconds(self, row: str, step: int) -> float | None:
        """Seconds of one GPU to train ``row`` for ``step`` steps, from the solo timing units."""
        def per_step(kind: str) -> float | None:
            path = os.path.join(self.out, "timing", kind, "result.json")
            return json.load(open(path))["seconds_per_step"] if os.path.exists(path) else None

        if row in ("scratch", "weight_copy_all"):  # the same step: every student weight trained, no teacher run
            scratch = per_step("scratch")
            return step * scratch if scratch else None
        forcing, kd = per_step("forcing"), per_step("kd")
        if forcing is None or kd is None:
            return None
        stage1 = self.forcing_steps(self.budget())
        return min(step, stage1) * forcing + max(0, step - stage1) * kd


def write_plot(path: str, curves: dict[str, list[list[dict]]], teacher: float, target: float, budget: int) -> None:
    """An SVG of the overall score against training steps: each seed's curve per row (one colour per row), the
    teacher's score and the ``REACH`` target as dashed lines."""
    width, height, left, bottom, top, right = 640, 360, 60, 40, 20, 180
    top_score = max([teacher] + [p.get("overall", 0) for runs in curves.values() for run in runs for p in run]) * 1.1
    top_score = top_score or 1.0
    last = max([budget] + [p["step"] for runs in curves.values() for run in runs for p in run])

    def x(step: float) -> float:
        return left + (width - left - right) * step / last

    def y(score: float) -> float:
        return height - bottom - (height - bottom - top) * score / top_score

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{left}" y1="{y(0)}" x2="{x(last)}" y2="{y(0)}" stroke="black"/>',
             f'<line x1="{left}" y1="{y(0)}" x2="{left}" y2="{top}" stroke="black"/>',
             f'<text x="{(left + x(last)) / 2}" y="{height - 8}" text-anchor="middle">training steps</text>',
             f'<text x="14" y="{(top + y(0)) / 2}" transform="rotate(-90 14 {(top + y(0)) / 2})" '
             f'text-anchor="middle">overall score</text>']
    for i in range(5):
        step, score = last * i / 4, top_score * i / 4
        parts.append(f'<text x="{x(step)}" y="{y(0) + 14}" text-anchor="middle">{step:.0f}</text>')
        parts.append(f'<text x="{left - 4}" y="{y(score) + 4}" text-anchor="end">{score:.2f}</text>')
    legend = [("teacher", "black", teacher, "6,3"), (f"{REACH:.0%} of teacher", "grey", target, "2,2")]
    for label, colour, value, dash in legend:
        parts.append(f'<line x1="{left}" y1="{y(value)}" x2="{x(last)}" y2="{y(value)}" stroke="{colour}" '
                     f'stroke-dasharray="{dash}"/>')
    parts.append(f'<line x1="{x(budget)}" y1="{y(0)}" x2="{x(budget)}" y2="{top}" stroke="grey"/>')
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for (label, runs), colour in zip(curves.items(), colours):
        for run in runs:
            points = " ".join(f"{x(p['step']):.1f},{y(p['overall']):.1f}" for p in run if "overall" in p)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        legend.append((label, colour, None, ""))
    for i, (label, colour, _, dash) in enumerate(legend):
        ly = top + 14 + 16 * i
        parts.append(f'<line x1="{width - right + 10}" y1="{ly - 4}" x2="{width - right + 30}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="1.5"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        parts.append(f'<text x="{width - right + 34}" y="{ly}">{label}</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts) + "\n")


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "t2md_study"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--gpus", nargs="*", type=int, default=[], help="GPU indices (none: the CPU)")
    parser.add_argument("--per_gpu", type=int, default=1, help="runs at once per GPU (the teacher takes a whole one)")
    parser.add_argument("--time_limit", type=float, default=math.inf, help="seconds; then stop, resume next call")
    parser.add_argument("--min_unit_seconds", type=float, default=0,
                        help="start no student unit with fewer seconds than this left")
    parser.add_argument("--teacher_steps", type=int, default=40000, help="the teacher's max_steps")
    parser.add_argument("--teacher_val_interval", type=int, default=1000)
    parser.add_argument("--val_interval", type=int, default=500, help="steps between the students' scores")
    parser.add_argument("--timing_steps", type=int, default=300, help="steps of each solo timing run")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes and step counts on the CPU (the smoke test); overrides the step options")
    parser.add_argument("--report", action="store_true", help="only print the table of what is done")
    options = parser.parse_args(args)
    if options.tiny:  # steps for toy sizes: a teacher of 10 steps, students of 2 (1 + 1 with teacher forcing)
        options.teacher_steps, options.teacher_val_interval, options.val_interval = 10, 5, 1
    study = Study(options)
    if not options.report:
        study.run()
    print(study.report())


if __name__ == "__main__":
    main()
