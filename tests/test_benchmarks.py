"""The GPU benchmark scripts run end to end at tiny size on the CPU, and what they measure comes out of the runs."""

import json
import os
import runpy
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_script(monkeypatch, name: str, *args: str) -> None:
    """``python benchmarks/<name> args`` from the repository root, run in this process (no interpreter start): the
    script as ``__main__`` with its folder first on sys.path (for benchmarks/shared.py). Fails as the process
    would, with the script's exception."""
    path = os.path.join(ROOT, "benchmarks", name)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.syspath_prepend(os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.modules.pop("shared", None)


def script_module(monkeypatch, name: str) -> dict:
    """benchmarks/<name> as a module, its globals (its folder on sys.path for benchmarks/shared.py)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    try:
        return runpy.run_path(os.path.join(ROOT, "benchmarks", name), run_name=name.removesuffix(".py"))
    finally:
        sys.modules.pop("shared", None)


def hybrid_gpu(monkeypatch):
    """benchmarks/hybrid_gpu.py as a module."""
    return script_module(monkeypatch, "hybrid_gpu.py")


def test_training_settings_name_a_compile_mode(monkeypatch):
    """``--train``/``--train_profile`` settings: a torch.compile mode after the shape overrides ``--compile`` for that
    run only; a malformed setting or an unknown mode stops with the expected form."""
    setting = hybrid_gpu(monkeypatch)["training_setting"]
    assert setting("t2md:512x16", "auto") == ("t2md", 512, 16, "auto")
    assert setting("dit-xl/2:2048x2", False) == ("dit-xl/2", 2048, 2, False)
    assert setting("t2md:512x32:reduce-overhead", "auto") == ("t2md", 512, 32, {"mode": "reduce-overhead"})
    for wrong in ("t2md:512", "t2md"):
        with pytest.raises(ValueError, match="PRESET:RESOLUTIONxBATCH"):
            setting(wrong, "auto")
    with pytest.raises(ValueError, match="MODE is one of"):
        setting("t2md:512x16:fast", "auto")


@pytest.mark.parametrize("order", [1, -1])  # the kernels in launch order, and listed backwards
def test_train_profile_finds_the_gpu_idle_gaps(monkeypatch, order):
    """``gpu_gaps``: the busy time is the union of overlapping kernels; each gap is named by the kernel that ended
    last before it and the one after it; and the profiler's events give it intervals (here the CPU ops)."""
    script = hybrid_gpu(monkeypatch)
    kernels = [(0, 100, "a"), (50, 300, "b"), (60, 80, "c"), (400, 450, "d"), (1450, 1500, "e"), (1480, 1490, "f")]
    window, busy, gaps = script["gpu_gaps"](kernels[::order])
    assert (window, busy) == (1.5, 0.4)
    assert gaps == [(1.0, "d", "e"), (0.1, "b", "d")]
    assert script["gpu_gaps"]([]) == (0.0, 0.0, [])
    # a user range (Lightning's Optimizer.step around forward and backward) covers the idle time inside it: only
    # the ops count, so the 20 ms without any op is a gap
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autograd.profiler.record_function("Optimizer.step#AdamW.step"):
            torch.randn(64, 64) @ torch.randn(64, 64)
            time.sleep(0.02)
            torch.randn(64, 64) @ torch.randn(64, 64)
    intervals = script["kernel_intervals"](prof, "cpu")
    assert any(name == "aten::matmul" for *_, name in intervals) and all(end >= start for start, end, _ in intervals)
    assert not any(name.startswith("Optimizer.") for *_, name in intervals)
    window, busy, gaps = script["gpu_gaps"](intervals)
    assert busy > 0 and gaps[0][0] >= 20 and window >= busy + gaps[0][0]
    assert not any(name.startswith("Optimizer.") for name, *_ in script["kernel_times"](prof, "cpu"))


def test_train_profile_names_the_host_ops_that_launched_a_kernel(monkeypatch):
    """On CUDA a kernel's interval is named with the host ops around its launch (linked by the profiler's correlation
    id), innermost first, three at most; the user ranges the profiler mirrors on the device stay out."""
    script = hybrid_gpu(monkeypatch)

    raw = []  # kineto's own events, which link each device event to its launching host op by correlation ids

    def event(id, name, device="CPU", parent=None, linked=0, user=False, start=0.0, end=1.0):
        kind = SimpleNamespace(name=device)
        raw.append(SimpleNamespace(correlation_id=lambda: id, linked_correlation_id=lambda: linked,
                                   device_type=lambda: kind))
        return SimpleNamespace(id=id, name=name, device_type=kind, cpu_parent=parent, is_user_annotation=user,
                               time_range=SimpleNamespace(start=start, end=end))

    step = event(1, "ProfilerStep#3", user=True)
    optimizer = event(2, "Optimizer.step#AdamW.step", parent=step, user=True)
    backward = event(3, "autograd::engine::evaluate_function: CompiledFunctionBackward", parent=optimizer)
    mm = event(4, "aten::mm", parent=backward)
    events = [step, optimizer, backward, mm,
              event(5, "nvjet_gemm", "CUDA", linked=4, start=10, end=20),
              event(6, "memcpy", "CUDA", linked=99, start=30, end=31),  # its host op is not in the trace
              event(7, "Optimizer.step#AdamW.step", "CUDA", user=True, start=0, end=40)]
    prof = SimpleNamespace(events=lambda: events,
                           profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: raw)))
    intervals = script["kernel_intervals"](prof, "cuda")
    assert intervals == [(10, 20, f"nvjet_gemm < aten::mm < {backward.name[:48]} < Optimizer.step#AdamW.step"),
                         (30, 31, "memcpy")]
    assert script["launched_by"](mm, depth=1) == " < aten::mm" and script["launched_by"](None) == ""



def test_train_profile_sorts_kernels_into_families(monkeypatch):
    """Kernel names as an H200 profile of t2md's training step gives them fall into the families of the table; the
    ATen reductions and cumsums of the scan's backward are a family of their own, not "other"."""
    family = hybrid_gpu(monkeypatch)["kernel_family"]
    names = {
        "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN": "GEMM",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention",
        "_chunk_scan_chunk_state_bwd_dx_kernel": "SSD scan (mamba-ssm)",
        "_state_passing_fwd_kernel": "SSD scan (mamba-ssm)",
        "triton_red_fused__to_copy_add_mul_native_layer_norm_backward_split_unsqueeze_view_8":
            "compiled elementwise (Inductor)",
        "_conv_rows_grad": "conv / norm along scan orders",
        "_gated_rms_norm_rows_backward": "conv / norm along scan orders",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>": "optimizer",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, ...>": "ATen reductions and cumsums",
        "void at::native::tensor_kernel_scan_innermost_dim<float, std::plus<float> >(float*, ...)":
            "ATen reductions and cumsums",
        "void at::native::index_elementwise_kernel<128, 4, at::native::flip_kernel_impl<...>":
            "copies, casts, indexing",
        "Memcpy DtoD (Device -> Device)": "copies, casts, indexing",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "other",
    }
    assert {name: family(name) for name in names} == names


def test_hybrid_gpu_script_smoke(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    run_script(monkeypatch, "hybrid_gpu.py", "--device", "cpu", "--tiny", "--parts", "check", "latency", "train",
               "train_profile", "distill", "--checks", "scan2d", "mlp", "--presets", "dit-xl/2", "t2md", "dimba-l/2",
               "--sizes", "64", "128x64", "--modes", "eager", "--iters", "1", "--train", "t2md:64x2",
               "--train_profile", "dit-xl/2:64x2", "--distill", "64x2", "--warmup", "1", "--steps", "1", "--compile",
               "false", "--isolate", "--results", str(results))
    rows = json.loads(results.read_text())
    # --checks: the Scan2D rows (fp32, bf16) and the MLP's, nothing of the other sections
    checks = [r["comparison"] for r in rows["check"]]
    assert len(checks) == 3 and checks[0].startswith("Scan2D") and checks[1].startswith("Scan2D")
    assert checks[2].startswith("Mlp") and all(r.get("verdict", "ok") == "ok" for r in rows["check"])
    latency = {(r["preset"], r["size"]): r for r in rows["latency"]}
    assert set(latency) == {(p, s) for p in ("dit-xl/2", "t2md", "dimba-l/2") for s in ("64x64", "128x64")}
    assert all(r["ms"] > 0 for r in latency.values())
    assert latency["t2md", "128x64"]["tokens"] == 2 * latency["t2md", "64x64"]["tokens"] == 32
    # trained in a process of its own (--isolate), as each distillation stage, rows passed back
    (train,) = rows["train"]
    assert train["setting"] == "t2md:64x2" and train["steps"] == 1 and train["images_per_sec"] > 0
    assert train["tflops"] > 0  # FLOPs were counted
    assert train["compile"] is False  # --compile reached the module (YAML: false), through the child's command line
    (profile,) = rows["train_profile"]  # profiled in a process of its own too (on a CPU: the CPU ops)
    assert profile["setting"] == "dit-xl/2:64x2" and profile["wall_ms"] > 0 and profile["top"]
    assert profile["kernel_ms"] == pytest.approx(sum(profile["families"].values()))
    assert 0 < profile["idle"]["busy_ms"] <= profile["idle"]["window_ms"]
    stages = {r["stage"]: r for r in rows["distill"]}
    assert set(stages) == {"forcing", "kd"} and all(r["images_per_sec"] > 0 for r in stages.values())
    # forcing trains the Mamba mixers only; kd trains every token mixer (attention too)
    assert 0 < stages["forcing"]["trained_m"] < stages["kd"]["trained_m"]


def test_multi_gpu_script_smoke(tmp_path, monkeypatch):
    """Two CPU processes (gloo) stand in for two GPUs (the script starts main.py for each run)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_script(monkeypatch, "multi_gpu.py", "--device", "cpu", "--tiny", "--parts", "speed", "--backbones", "dit-xl/2",
               "--strategies", "fsdp", "--warmup", "1", "--steps", "2", "--batch", "2", "--out", str(tmp_path))
    speeds = {path.parent.name: json.loads(path.read_text()) for path in tmp_path.glob("speed-*/speed.json")}
    assert set(speeds) == {"speed-dit-xl2-auto-1", "speed-dit-xl2-fsdp-2"}
    assert speeds["speed-dit-xl2-auto-1"]["world_size"] == 1 and speeds["speed-dit-xl2-fsdp-2"]["world_size"] == 2
    assert all(s["images_per_sec"] > 0 and s["steps"] == 2 for s in speeds.values())


def test_t2md_study_script_smoke(tmp_path, monkeypatch, capsys):
    """The whole study at toy size: the teacher trains and is exported, a row with teacher forcing runs both stages
    from it, the table reads their validation curves; a second call finds every unit done and only reports."""
    args = ["--tiny", "--rows", "full", "--seeds", "0", "--out", str(tmp_path)]
    run_script(monkeypatch, "t2md_study.py", *args)
    first = capsys.readouterr().out
    teacher = json.loads((tmp_path / "teacher" / "result.json").read_text())
    assert teacher["steps"] == 10 and [p["step"] for p in teacher["curve"]] == [5, 10]
    assert sorted(os.listdir(tmp_path / "teacher" / "export")) == ["backbone.yaml", "model.safetensors"]
    full = json.loads((tmp_path / "rows" / "full" / "seed0" / "result.json").read_text())
    assert full["budget"] == 2 and [p["step"] for p in full["curve"]] == [1, 2]  # stage 1, then stage 2
    assert not [name for _, _, names in os.walk(tmp_path) for name in names if name.endswith(".ckpt")]
    assert "| + teacher forcing (full recipe) | " in first and (tmp_path / "curve.svg").exists()
    run_script(monkeypatch, "t2md_study.py", *args)
    again = capsys.readouterr().out
    assert "0 units to run" in again
    assert again[again.index("Teacher:"):] == first[first.index("Teacher:"):]


def test_distill_ablation_commands_parse_and_chain(tmp_path, monkeypatch, capsys):
    """benchmarks/distill_ablation.py with ``main.py`` replaced by a parse of each command it would run
    (``--print_config``): every command is a valid config; stage 2 starts from the checkpoint folder of the row's
    stage-1 run, each test from a checkpoint a run before it writes (the teacher's from the demo); the scores are read
    where the test run's logger puts them (here written there by the stand-in), and the table prints them."""
    from main import main as cli

    script = script_module(monkeypatch, "distill_ablation.py")
    checkpoints = {os.path.join(ROOT, "runs", "demo", "checkpoints")}  # what earlier runs write, as folders
    commands = []

    def parse(args: list[str], log_path: str) -> float:
        monkeypatch.setattr(sys, "argv", ["main.py"])  # the script's own options are parsed by now
        with pytest.raises(SystemExit) as exit_info:
            cli([*args, "--print_config"])
        assert exit_info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        logger = config["trainer"]["logger"]["init_args"]
        log_dir = os.path.join(logger["save_dir"], logger["name"], str(logger["version"]))
        assert config["trainer"]["accelerator"] == "cpu"
        if args[0] == "fit":
            init = config["model"]["init_args"].get("init_student")
            assert init is None or os.path.dirname(init) in checkpoints
            checkpoints.add(os.path.join(log_dir, "checkpoints"))
        else:
            assert os.path.dirname(config["ckpt_path"]) in checkpoints
            os.makedirs(log_dir, exist_ok=True)
            scores = {"colour": 0.5, "shape": 0.25, "position": 0.75, "size": 1.0, "all": 0.125}
            with open(os.path.join(log_dir, "test_scores.json"), "w") as f:
                json.dump({"scores": scores}, f)
        commands.append((args[0], logger["name"], str(logger["version"])))
        return 1.0

    script["run_row"].__globals__["run"] = parse
    monkeypatch.setattr(sys, "argv", ["distill_ablation.py", "--rows", "teacher", "scratch", "full", "--out",
                                      str(tmp_path), "--mamba_kernel", "torch"])
    capsys.readouterr()
    script["main"]()
    table = capsys.readouterr().out
    assert sorted(commands) == sorted([("test", "teacher", "test"), ("fit", "scratch", "kd"), ("test", "scratch", "kd"),
                                       ("fit", "full", "forcing"), ("fit", "full", "kd"), ("test", "full", "kd")])
    assert "failed" not in table
    assert table.count("| 0.500 | 0.250 | 0.750 | 1.000 | 0.125 |") == 3
