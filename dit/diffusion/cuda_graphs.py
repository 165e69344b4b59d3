"""CUDA graphs for sampling: the denoiser's forward is captured once per input shape and replayed at every sampler
step, so its hundreds of kernel launches cost one (what pays when a step's kernels are short: small models, small
clips, batch 1). Inputs are copied into the graph's static buffers; the output is a copy of its static output.
Inference only (no autograd); a model whose forward synchronises with the host cannot be captured."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class CudaGraphed:
    """``CudaGraphed(model)(x, t, **kwargs)`` == ``model(x, t, **kwargs)``, replayed from a CUDA graph captured on
    the first call with each set of shapes (tensor arguments) and other arguments."""

    def __init__(self, model: Callable[..., Tensor], warmup: int = 2) -> None:
        self.model, self.warmup = model, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}
        self.pool: Any = None  # one memory pool shared by all captures of this wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        names = list(kwargs)
        values = [*args, *kwargs.values()]
        tensors = [v for v in values if isinstance(v, Tensor)]
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            raise ValueError("CUDA graphs need the model's inputs on a CUDA device; sample without them on "
                             f"{tensors[0].device.type if tensors else 'no tensors'}")
        key = (len(args), tuple(names), tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor)
                                              else ("value", v) for v in values),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in self.graphs:
            self.graphs[key] = self._capture(values, len(args), names)
        graph, static_in, static_out = self.graphs[key]
        for buf, v in zip(static_in, tensors, strict=True):
            buf.copy_(v)
        graph.replay()
        return static_out.clone()

    @torch.no_grad()
    def _capture(self, values: list[Any], n_args: int, names: list[str]) -> tuple:
        static_in = [v.clone() for v in values if isinstance(v, Tensor)]
        it = iter(static_in)
        filled = [next(it) if isinstance(v, Tensor) else v for v in values]
        args, kwargs = filled[:n_args], dict(zip(names, filled[n_args:], strict=True))
        # autocast's weight-cast cache must stay off while capturing: cached casts would outlive the graph's pool
        amp = dict(device_type="cuda", enabled=torch.is_autocast_enabled("cuda"),
                   dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast(**amp):  # warm-up: lazy init, cuBLAS handles, kernel choice
            for _ in range(self.warmup):
                self.model(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.autocast(**amp):
            static_out = self.model(*args, **kwargs)
        self.pool = graph.pool()
        return graph, static_in, static_out
