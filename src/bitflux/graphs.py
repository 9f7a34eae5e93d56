"""A module's forward replayed as CUDA graphs.

A diffusion pipeline calls its transformer at every denoising step with inputs of the same shapes. Eager,
each call pays Python's time and every kernel launch's CPU time, and a ternary layer launches more kernels
than a bf16 one (quantize, expand, GEMM): on an H200 the eager FLUX.1-dev forward at 1024x1024 was bound by
that CPU time on one machine (0.84x bf16 for W1.58A8, against 1.05-1.07x replayed as a graph; BENCHMARKS.md).
Capturing one graph per input signature and replaying it leaves the GPU's own time.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import BitfluxError

MAX_GRAPHS = 8  # signatures captured per module; past that (shapes that keep changing) calls run eager
_SCALARS = (type(None), bool, int, float, str)


def cuda_graphed(module: nn.Module) -> nn.Module:
    """Replace `module.forward` (in place) by a GraphedForward, once; `del module.forward` restores it."""
    if isinstance(module.forward, GraphedForward):
        return module
    devices = {t.device.type for t in [*module.parameters(), *module.buffers()]}
    if devices != {"cuda"}:
        where = ", ".join(sorted(devices)) or "no device: it holds no tensors"
        raise BitfluxError(f"CUDA graphs need the module on a CUDA device (it is on {where})")
    module.forward = GraphedForward(module.forward)
    return module


class GraphedForward:
    """forward(*args, **kwargs) through CUDA graphs: the first call of each signature (tensor shapes, dtypes
    and devices, and the values of the other arguments) runs eager once (tuning and compiling the kernels
    outside any capture), then captures; every call copies its tensors into the captured inputs, replays,
    and returns a copy of the outputs (the next replay overwrites the graph's own). Calls that a graph
    cannot take (with autograd on, CPU tensors, arguments other than tensors, scalars and tuples, lists
    and dicts of them, too many signatures) run eager. What the forward reads from Python rather than from
    its tensor arguments (a LoRA's strength, a layer's attributes) is frozen at capture: change it before
    wrapping, or unwrap (`del module.forward`) and wrap again."""

    def __init__(self, forward):
        self.eager = forward
        self.graphs: dict[tuple, _Capture] = {}

    def __call__(self, *args, **kwargs):
        key = signature(args, kwargs)
        if key is None or torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        capture = self.graphs.get(key)
        if capture is None:
            if len(self.graphs) == MAX_GRAPHS:
                warnings.warn(f"bitflux: {MAX_GRAPHS} input signatures captured already; this one runs eager",
                              stacklevel=2)
                return self.eager(*args, **kwargs)
            # on the inputs' GPU, which need not be the current one (`--device cuda:1`): streams and graphs are
            # made on the current device
            with torch.cuda.device(next((t.device for t in _tensors((args, kwargs))), None)):
                capture = self.graphs[key] = _Capture(self.eager, args, kwargs)
        with torch.cuda.device(capture.device):
            return capture.replay(args, kwargs)


class _Uncapturable(Exception):
    pass


def signature(args: tuple, kwargs: dict) -> tuple | None:
    """What a captured graph is specific to, or None when an argument cannot be captured."""
    try:
        return _key((args, kwargs))
    except _Uncapturable:
        return None


def _key(value):
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            raise _Uncapturable
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_key(v) for v in value))
    if isinstance(value, dict):  # in insertion order: the same key means the same order of tensors
        return ("dict", *((name, _key(v)) for name, v in value.items()))
    raise _Uncapturable


class _Capture:
    def __init__(self, forward, args: tuple, kwargs: dict):
        self.device = torch.cuda.current_device()
        self.args, self.kwargs = _map_tensors(lambda t: t.clone(), (args, kwargs))
        side = torch.cuda.Stream()  # warm-up on a side stream before capturing, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(*self.args, **self.kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = forward(*self.args, **self.kwargs)

    def replay(self, args: tuple, kwargs: dict):
        for static, value in zip(_tensors((self.args, self.kwargs)), _tensors((args, kwargs))):
            static.copy_(value)
        self.graph.replay()
        return _map_tensors(lambda t: t.clone(), self.outputs)


def _tensors(value):
    """The tensors in a structure, in the order _key walks it."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _map_tensors(fn, value):
    """The structure with fn applied to each tensor: tuples, lists, dicts and diffusers' output dataclasses
    (dicts whose fields are keyword arguments)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return type(value)(**{name: _map_tensors(fn, v) for name, v in value.items()})
    return value
