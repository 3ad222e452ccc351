"""CUDA-graph replay of a denoising step, so that sampling at small sizes is not bound by kernel launches."""

from typing import Callable

import torch


class CUDAGraphStep:
    """Runs ``fn(*tensors) -> tensor`` by replaying a CUDA graph captured for the tensors' shapes and dtypes.

    The first call for a new signature (``key``, shapes, dtypes, device, autocast state) runs ``fn`` ``warmup`` times
    on a side stream (compilation, autotuning and library handles happen there), then captures one call; every call
    copies its tensors into the captured inputs, replays and returns a copy of the output. ``fn`` must do the same
    work for the same signature (``key`` holds what else it depends on, e.g. the guidance scale) and must not sync
    with the host. Weights are read in place, so weights swapped in by copy (EMA) are used by later replays. One graph
    is kept: a new signature replaces it and frees its memory.

    Autocast's cache of cast weights is off while capturing, so the casts are part of the graph rather than
    tensors that autocast frees when its context ends.
    """

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._signature = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._output: torch.Tensor | None = None

    def __call__(self, fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], key=None) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        signature = (key, autocast, tuple((t.shape, t.dtype, t.device) for t in tensors))
        if signature != self._signature:
            self._capture(fn, tensors, autocast)
            self._signature = signature
        for static, t in zip(self._inputs, tensors):
            static.copy_(t)
        self._graph.replay()
        return self._output.clone()

    def _capture(self, fn, tensors, autocast) -> None:
        self._graph = self._output = None  # free the previous graph's pool first
        self._inputs = tuple(t.clone() for t in tensors)
        enabled, dtype = autocast
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", dtype, enabled=enabled, cache_enabled=False):
            for _ in range(self.warmup):
                fn(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype, enabled=enabled, cache_enabled=False):
            self._output = fn(*self._inputs)
        self._graph = graph
