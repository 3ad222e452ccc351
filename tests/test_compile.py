"""``compile``: compiled blocks compute what eager blocks compute; the option reaches fit, validate, test and predict
through the CLI; where torch.compile cannot run, one warning and eager mode."""

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from lit_dimba.models.backbone import Backbone
from lit_dimba.modules.diffusion import compile_options, compile_problem
from main import main
from tests.conftest import DEMO, TINY, tiny_backbone


def randomised(backbone: Backbone) -> Backbone:
    """Every parameter random (the zero-initialised output layers would hide differences)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return backbone


def assert_compiled_equals_eager(eager: Backbone, compiled: Backbone) -> None:
    """One forward and backward of both on the same batch: outputs and every gradient agree (fp32 rounding differs,
    fused kernels sum in another order: relative to the norms)."""
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([3, 700])
    y, mask = torch.randn(2, 16, 32), torch.arange(16).expand(2, 16) < torch.tensor([[9], [16]])
    outputs = []
    for model in (eager, compiled):
        out = model(x, t, y, mask)
        out.square().mean().backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_e, grads_e), (out_c, grads_c) = outputs
    assert out_e.abs().mean() > 0.1
    assert (out_c - out_e).norm() <= 1e-5 * out_e.norm()
    for name, grad in grads_e.items():
        assert (grads_c[name] - grad).norm() <= 1e-3 * grad.norm(), name


def test_compiled_hybrid_equals_eager():
    """Inductor on a CPU, PyTorch Mamba-2 kernel: outputs and gradients of an attention and a Mamba block."""
    torch.manual_seed(0)
    eager = randomised(tiny_backbone("t2md", layout=["attn", "mamba_h"]))
    compiled = randomised(tiny_backbone("t2md", layout=["attn", "mamba_h"]))
    compiled.compile_blocks()
    assert_compiled_equals_eager(eager, compiled)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    # Sampling's frozen weights (``Backbone.frozen``) in the compiled blocks: the eager output, also after the
    # weights change between two sampling calls (refreshed in place, not baked into the compiled graph).
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([5, 600])
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool)
    for _ in range(2):
        with torch.no_grad():
            expected = eager(x, t, y, mask)
        with compiled.frozen():
            got = compiled(x, t, y, mask)
        assert (got - expected).norm() <= 1e-5 * expected.norm()
        with torch.no_grad():
            for a, b in zip(eager.parameters(), compiled.parameters()):
                change = 0.1 * torch.randn_like(a)
                a.add_(change), b.add_(change)


def test_compiled_released_dimba_equals_eager():
    """PyTorch selective scan, traced by Dynamo and AOTAutograd: the release's layout (a PixArt block, then its
    bidirectional Mamba-1 block with the separate residual stream), outputs and gradients, with no graph break.
    (The aot_eager backend traces as inductor does without generating code; with inductor it takes 20 s here.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = randomised(tiny_backbone("dimba_l2", depth=1))
    compiled = randomised(tiny_backbone("dimba_l2", depth=1))
    compiled.compile_blocks(backend="aot_eager")
    assert_compiled_equals_eager(eager, compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_blocks_write_mixer_io_only_for_distillation():
    """Training without distillation does not ask for the blocks' mixer inputs and outputs, so their compiled graphs
    do not compute them as outputs (a float32 copy of each mixer input, an extra write per block); with
    ``return_mixer_io`` the same blocks give them, equal to the eager ones. Graph outputs counted by a backend
    that records each graph Dynamo hands it."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    eager = randomised(tiny_backbone("t2md", layout=["attn", "mamba_h"], gradient_checkpointing=False))
    compiled = randomised(tiny_backbone("t2md", layout=["attn", "mamba_h"], gradient_checkpointing=False))
    compiled.compile_blocks(backend=recording)
    x, t = torch.randn(2, 4, 8, 12), torch.tensor([3, 700])
    y, mask = torch.randn(2, 16, 32), torch.ones(2, 16, dtype=torch.bool)

    def outputs_per_block(**kwargs) -> list[int]:
        graphs.clear()
        compiled(x, t, y, mask, **kwargs)
        blocks = [gm for gm in graphs if any("mixer" in n.name for n in gm.graph.nodes if n.op == "placeholder")]
        return [len(next(n for n in gm.graph.nodes if n.op == "output").args[0]) for gm in blocks]

    assert outputs_per_block() == [1, 1]  # x only, per block kind
    assert outputs_per_block(return_mixer_io=True) == [3, 3]  # x, mixer input, mixer output
    _, io_compiled = compiled(x, t, y, mask, return_mixer_io=True)
    _, io_eager = eager(x, t, y, mask, return_mixer_io=True)
    for got, expected in zip(io_compiled, io_eager):
        for a, b in zip(got, expected):
            assert (a - b).norm() <= 1e-5 * b.norm()


@pytest.mark.slow
def test_compile_option_through_fit_test_predict(in_tmp):
    """The blocks are compiled (here with the aot_eager backend, which traces as inductor does but generates no
    code, so the test stays quick) and every stage runs through them."""
    hybrid = ["--config", DEMO, "--config", TINY, "--model.class_path", "lit_dimba.modules.DiffusionModule",
              "--model.init_args.backbone.init_args.layout", "[mamba_w]",
              "--model.init_args.compile", "{backend: aot_eager}", "--trainer.max_steps", "2"]
    torch._dynamo.reset()
    main(["fit", *hybrid])
    with open("prompts.txt", "w") as f:
        f.write("a red circle\n")
    main(["predict", *hybrid, "--ckpt_path", "ckpt/last.ckpt", "--data.init_args.predict_prompts", "prompts.txt"])
    main(["test", *hybrid, "--ckpt_path", "ckpt/last.ckpt"])
    # Dynamo compiled the block's forward for training (with and without grad: validation, sampling).
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 2
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_falls_back_with_one_warning(in_tmp, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    problem = compile_problem(torch.device("cpu"), {})
    assert problem and "\n" not in problem
    with pytest.warns(UserWarning, match="torch.compile cannot run on cpu here .* runs in eager mode") as record:
        main(["fit", "--config", DEMO, "--config", TINY, "--model.init_args.compile", "true",
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    assert sum("torch.compile cannot run" in str(w.message) for w in record) == 1
    torch._dynamo.reset()


def test_compile_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_options("auto", cpu) is None and compile_options("auto", cuda) == {}
    assert compile_options(True, cpu) == {} and compile_options(False, cuda) is None
    assert compile_options({"dynamic": False}, cpu) == {"dynamic": False}
