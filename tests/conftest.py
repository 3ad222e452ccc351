import contextlib
import fcntl
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import time

import pytest
import yaml

# Under pytest-xdist (make test: one worker per core) each worker gets its share of the cores for torch's threads,
# and so do the processes it starts (OMP_NUM_THREADS): with every worker on every core, the tiny models' ops wait on
# each other's threads and an in-process fit runs several times slower. (torch is imported here and in the helpers
# that use it, not by the pytest-xdist controller, which loads this file too before it starts the workers.)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    import torch

    THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(items):
    """Tests marked slow (they start processes or train several runs) first, so that under pytest-xdist the short
    ones fill the workers' time at the end instead of one long test running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state (torch's and Python's), whatever ran before it in its worker:
    pytest-xdist hands the tests to its workers in no fixed order, so without this a test's random inputs changed
    from run to run, and one that met a tolerance with little to spare could fail now and then. (What a test runs in
    a process of its own seeds itself.)"""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")
# The configs that set up a whole run (a model each); the others are overlays, backbone files and configs/base.yaml.
MODEL_CONFIGS = sorted(set(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
                       - {os.path.join(ROOT, "configs", "base.yaml")}) + [
    os.path.join(ROOT, "configs", "distill", name) for name in ("demo.yaml", "t2md_512.yaml")]
PRINTED: dict[tuple[str, ...], str] = {}  # configs -> what --print_config printed (in this process)


def printed_config(capsys, *configs) -> dict:
    """The full config of ``fit`` with ``configs``, as ``--print_config`` prints it; each set of configs is parsed once
    per process (tests share a few base configs)."""
    from main import main

    if configs not in PRINTED:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *(arg for config in configs for arg in ("--config", config)), "--print_config"])
        assert exit_info.value.code in (0, None)
        PRINTED[configs] = capsys.readouterr().out
    return yaml.safe_load(PRINTED[configs])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder, so relative run/checkpoint paths of the configs land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# The module of callbacks that the tests list by class path (launch.RecordCaptions, launch.RecordLosses,
# launch.KillAt): ``launch`` and ``run_here`` write it as launch.py into the run's folder.
LAUNCH_MODULE = '''
import os, signal
from lightning.pytorch.callbacks import Callback


class RecordCaptions(Callback):
    """Writes the captions of every training batch of this rank to captions-<rank>.txt."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(f"captions-{trainer.global_rank}.txt", "a") as f:
            f.writelines(caption + "\\n" for caption in batch["caption"])


class RecordLosses(Callback):
    """Appends "<step> <loss as float.hex>" of every training step of this rank to losses-<rank>.txt."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(f"losses-{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {loss.item().hex()}\\n")


class KillAt(Callback):
    """SIGKILLs this process at the end of training step ``step`` (before that step's checkpoint is written:
    Lightning runs checkpoint callbacks last)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''

# ``launch`` starts every rank itself, as torchrun does (LOCAL_RANK, WORLD_SIZE and the rendezvous in its
# environment, so Lightning starts no process of its own), forked from a server process that imported main.py
# (torch, Lightning, the project) once per pytest-xdist worker: a rank starts in a moment, where a new interpreter
# spends about 6 s on imports (and Lightning's launcher starts the second rank only once the first has imported).
# tests/test_benchmarks.py's multi_gpu.py test starts main.py on 2 processes as users do, through that launcher.
# The server starts with the interpreter's own path (Python 3.11 does not give it the tests' sys.path), so
# PYTHONPATH puts this checkout first there, as for any process the tests start.
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
RANKS = multiprocessing.get_context("forkserver")
RANKS.set_forkserver_preload(["main", "tests.conftest"])


def run_rank(folder: str, args: list[str], rank: int, devices: int, port: int) -> None:
    """Rank ``rank`` of ``devices`` of ``main(args)`` in ``folder``, in a process of its own (``launch``): its
    output in stdout-<rank>.txt and stderr-<rank>.txt there, one thread, the folder's modules importable."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(devices), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.chdir(folder)
    sys.path.insert(0, folder)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        log = os.open(f"{name}-{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, fd)
        os.close(log)
    import torch

    from main import main

    torch.set_num_threads(1)
    main([*args, "--trainer.devices", str(devices)])
    open(f"finished-{rank}", "w").close()


def launch(folder, *args, devices: int = 2, timeout: int = 300, check: bool = True):
    """``main.py`` with ``args`` in ``folder`` on ``devices`` CPU processes (gloo); with ``check``, fails the test
    unless every rank finished without error. When a rank fails, the others are stopped (they would wait for it).
    Returns the exit code (the first rank's that is not 0, else 0) and the ranks' stderr, one after the other, as a
    completed process."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    (folder / "launch.py").write_text(LAUNCH_MODULE)
    for marker in folder.glob("finished-*"):
        marker.unlink()
    port = find_free_network_port()
    ranks = [RANKS.Process(target=run_rank, args=(str(folder), list(args), rank, devices, port))
             for rank in range(devices)]
    for process in ranks:
        process.start()
    deadline, running, failed = time.monotonic() + timeout, ranks, False
    while running and not failed and time.monotonic() < deadline:
        multiprocessing.connection.wait([process.sentinel for process in running], deadline - time.monotonic())
        running = [process for process in ranks if process.exitcode is None]
        failed = any(process.exitcode for process in ranks)
    for process in running:  # a rank failed (the others would wait for it in a collective), or the time is up
        process.kill()
        process.join()
    assert failed or not running, f"the ranks did not finish within {timeout} s"
    code = next((process.exitcode for process in ranks if process.exitcode), 0)
    logs = [folder / f"stderr-{rank}.txt" for rank in range(devices)]
    stderr = "".join(log.read_text() for log in logs if log.exists())
    if check:
        assert code == 0, stderr[-4000:]
        assert len(list(folder.glob("finished-*"))) == devices, "a rank did not finish"
    return subprocess.CompletedProcess(args, code, "", stderr)


@contextlib.contextmanager
def importable(folder):
    """The modules in ``folder`` importable by class path (as PYTHONPATH=folder does for a process), then forgotten."""
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            if getattr(sys.modules[name], "__file__", None) and sys.modules[name].__file__.startswith(str(folder)):
                del sys.modules[name]


def run_here(folder, *args) -> None:
    """``main(args)`` in this process, as ``launch(folder, *args, devices=1)`` runs it without starting a process:
    in ``folder``, with the callbacks of its launch.py importable, on one thread (as there, so the two give the
    same floating point)."""
    import torch

    from main import main

    (folder / "launch.py").write_text(LAUNCH_MODULE)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(folder)
    torch.set_num_threads(1)
    try:
        with importable(folder):
            main([*args, "--trainer.devices", "1"])
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)


# The run that tests/test_distributed.py runs under DDP (with every callback) and repeats under FSDP, and that
# tests/test_resume.py kills and resumes: the tiny run at depth 2 with gradient clipping (which FSDP does its own
# way) and TINY's validation, STEPS steps with a checkpoint every EVERY steps kept, each step's loss and captions
# written down (launch.RecordLosses, launch.RecordCaptions).
STEPS, EVERY = 8, 2


def run_args(strategy: str, *callbacks: dict, subcommand: str = "fit") -> list[str]:
    """Arguments of that run under ``strategy``, with more ``callbacks``."""
    listed = [{"class_path": "launch.RecordCaptions"},
              {"class_path": "launch.RecordLosses"},
              {"class_path": "callbacks.SampleLogger", "init_args": {"every_n_steps": 2, "prompts": ["a red circle"]}},
              {"class_path": "callbacks.PromptFollowing", "init_args": {"num_prompts": 5, "batch_size": 2}},  # 3 + 2
              {"class_path": "callbacks.Throughput", "init_args": {"warmup_steps": 1, "output": "speed.json"}},
              *callbacks]
    # TINY's base callbacks (EMA, checkpoint, learning-rate monitor, image writer) stay; every checkpoint kept
    return [subcommand, "--config", DEMO, "--config", TINY, "--model.init_args.backbone.init_args.depth", "2",
            "--trainer.gradient_clip_val", "0.05", "--trainer.max_steps", str(STEPS),
            "--trainer.callbacks", json.dumps(listed), "--trainer.strategy", strategy,
            "--checkpoint.every_n_train_steps", str(EVERY), "--checkpoint.save_top_k", "-1"]


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """The folder of that run under DDP on 2 processes: run once per test session, by the first pytest-xdist worker
    that needs it (the others wait for it under a file lock and read the same folder)."""
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the session's temporary folder, which holds one folder per worker
    folder = shared / "ddp_run"
    with open(shared / "ddp_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            launch(folder, *run_args("ddp"))
            (folder / "done").touch()
    return folder


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> str:
    """A checkpoint of the tiny run at depth 2 (2 steps, in this process): the teacher of tests/configs/tiny_distill.yaml."""
    folder = tmp_path_factory.mktemp("teacher")
    run_here(folder, "fit", "--config", DEMO, "--config", TINY, "--model.init_args.backbone.init_args.depth", "2",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    return str(folder / "ckpt" / "last.ckpt")


BACKBONES = os.path.join(ROOT, "configs", "backbones")
# Test size for the backbones of configs/backbones/ (what they were at 2 blocks of width 64 before): 4-channel
# latents, a 32-channel text encoder with 16 tokens, small Mamba-2 mixers, the default PE, no recomputation.
TINY_BACKBONE = dict(depth=2, hidden_size=64, num_heads=2, caption_channels=32, token_num=16, base_size=None,
                     gradient_checkpointing=False, mamba=dict(d_state=16, headdim=16, chunk_size=16))


def tiny_backbone(name: str, **overrides):
    """The layout of ``configs/backbones/<name>.yaml`` at test size (``TINY_BACKBONE``), with keyword overrides."""
    from lit_dimba.models.backbone import Backbone

    return Backbone.from_file(os.path.join(BACKBONES, f"{name}.yaml"), **{**TINY_BACKBONE, **overrides})
