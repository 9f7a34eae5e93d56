"""Models larger than memory, run a block at a time: each block's weights stay in the checkpoint's safetensors
and are read (plain file reads) and converted right before the block runs, and dropped after it; the small
rest of the model is loaded once. T5-XXL (text_encoders.stream_t5) then takes one of its 24 blocks' memory,
and the full-precision FLUX.1-dev transformer the calibration teacher samples with (stream_transformer) one of
its 57 blocks' instead of 23.8 GB in bf16 (47.6 in fp32).

Between calls the blocks hold no tensors at all (their parameters are None), so a streamed model moves and
converts as any other (`.to()`, diffusers' model CPU offload; not accelerate's sequential offload): its blocks
load onto the device and in the dtype of its resident tensors. Outputs equal those of the model loaded whole in
that dtype (for T5 in fp16 transformers keeps `wo` in fp32, which this does not: bf16 or fp32 only). Each call
reads the blocks' bytes again (from the page cache, if it holds them): worth it where the model would not fit
otherwise (the teacher's transformer, run at every denoising step) or where the reading costs about what the
compute does (T5 on a CPU). One call at a time: the blocks share the memory they are read into. Inference
only. A deep copy or a pickle streams from the same folder. `save_pretrained` copies the folder it streams
from; its state_dict, and its blocks' containers', are refused (they would lack the block weights), and its
parameter counts are the resident tensors'.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    copy_folder,
    iter_tensors,
    read_config,
    read_safetensors_header,
    tensor_shapes,
    weight_files,
)
from .errors import BitfluxError


def check_stored(model: nn.Module, stored: dict[str, tuple], where: Path, aliases: dict[str, str] | None = None) -> None:
    """Every tensor of the (meta) model is in the checkpoint with its shape (`aliases`: a name stored under
    another), else a one-line BitfluxError."""
    aliases = aliases or {}
    for name, tensor in model.state_dict().items():
        found = stored.get(aliases.get(name, name))
        if found != tuple(tensor.shape):
            raise BitfluxError(f"{where}: not a checkpoint of its config's model ({name}: "
                               f"{'missing' if found is None else f'shape {list(found)}, expected {list(tensor.shape)}'})")


def stream_blocks(model: nn.Module, blocks: list[str], folder: Path) -> nn.Module:
    """Empty the model's submodules named in `blocks` (their tensors stored in the folder's safetensors under
    their own names) and hook them so that each is loaded right before it runs, on the device and in the dtype
    of the model's first parameter outside them, and emptied after it (also when it raises); the memory they
    share is let go when the model's call ends."""
    headers = {file: read_safetensors_header(file) for file in weight_files(Path(folder))}
    names = {prefix: {f"{prefix}.{key}" for key in model.get_submodule(prefix).state_dict()} for prefix in blocks}
    wanted = set().union(*names.values())
    largest = max((end - begin for header in headers.values() for name, info in header.items()
                   if name in wanted for begin, end in [info["data_offsets"]]), default=0)
    memory = _BlockMemory(largest)
    # each block reads only the shards holding its tensors (a sharded checkpoint: one or two of several), whose
    # headers it parses again at each load
    streamed = [_StreamedBlock(model, prefix, [file for file, header in headers.items()
                                               if not names[prefix].isdisjoint(header)], memory)
                for prefix in blocks]
    hooks = _ModelHooks(streamed, memory, Path(folder))
    model.register_forward_pre_hook(hooks.start)
    model.register_forward_hook(hooks.end, always_call=True)
    # the model's and its blocks' containers' (T5's `encoder`, FLUX's block lists): each would lack the blocks
    containers = {prefix.rsplit(".", depth)[0] for prefix in blocks for depth in range(1, prefix.count(".") + 1)}
    for module in [model, *(model.get_submodule(name) for name in sorted(containers))]:
        module.register_state_dict_pre_hook(_refuse_state_dict)
    # an instance attribute, found before the class's method (what diffusers' pipeline saving calls)
    model.save_pretrained = hooks.save_pretrained
    return model.eval().requires_grad_(False)


class _ModelHooks:
    """The streamed model's own hooks, methods of one object (not closures) so that a deep copy or a pickle of the
    model takes its blocks, their shared memory and these along together. Calls from several threads (a
    service's requests) run one at a time: each would empty the blocks the other is running."""

    def __init__(self, streamed: list[_StreamedBlock], memory: _BlockMemory, folder: Path):
        self.streamed, self.memory, self.folder = streamed, memory, folder
        self.calling, self.caller = threading.Lock(), None  # the call running, and its thread

    def __getstate__(self) -> dict:  # a copy starts with no call running (a lock is neither copied nor pickled)
        return {**self.__dict__, "calling": None, "caller": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, calling=threading.Lock())

    def start(self, *_) -> None:
        # A call interrupted by a KeyboardInterrupt (which always_call hooks miss) holds it still, and left a block
        # loaded: its thread's next call goes on (other threads wait for that call's end).
        if self.caller != threading.get_ident():
            self.calling.acquire()
            self.caller = threading.get_ident()
        for block in self.streamed:
            block.empty()
        self.memory.clear()

    def end(self, *_) -> None:
        if self.caller != threading.get_ident():  # a call that failed before start (an earlier pre-hook raised)
            return
        self.memory.clear()
        self.caller = None
        self.calling.release()

    def save_pretrained(self, directory, *_args, **_kwargs) -> None:
        copy_folder(self.folder, Path(directory))


def _refuse_state_dict(*_) -> None:
    raise BitfluxError("a streamed model holds no block weights: save_pretrained copies the folder it streams "
                       "from; a state_dict needs the model loaded whole (T5: load_pipeline(..., text_encoders='whole'))")


def load_outside(model: nn.Module, files: list[Path], names: set[str], dtype: torch.dtype,
                 device: str | torch.device) -> None:
    """Load the model's tensors named `names` from `files` once, floating ones in `dtype`, on `device`."""
    state = {name: tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
             for name, tensor in iter_tensors(files, names)}
    model.load_state_dict(state, strict=False, assign=True)


def stream_transformer(folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """The full-precision FluxTransformer2DModel of a diffusers transformer folder, on `device` in `dtype`, its
    19 + 38 blocks (FLUX.1) streamed from the folder's safetensors: it holds its embedders and output layers and
    one block at a time."""
    from .flux import block_names, build_transformer, check_flux_config

    folder = Path(folder)
    config = read_config(folder)
    check_flux_config(config, str(folder))
    files = weight_files(folder)
    model = build_transformer(config, "meta")
    check_stored(model, tensor_shapes(files), folder)
    blocks = block_names(config)
    rest = {name for name in model.state_dict() if not any(name.startswith(f"{b}.") for b in blocks)}
    load_outside(model, files, rest, dtype, device)
    return stream_blocks(model, blocks, folder)


class _BlockMemory:
    """Memory the streamed blocks reuse from one to the next, as its first touch would cost page faults each
    time: one buffer the stored bytes are read into (`largest` bytes, a block tensor's most), and the previous
    block's tensors, which the next block's are converted into. Emptied after each call of the model."""

    def __init__(self, largest: int):
        self.largest = largest
        self.clear()

    def clear(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.spare: dict[str, torch.Tensor] = {}

    def read_buffer(self) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.largest, dtype=torch.uint8)
        return self.buffer


class _StreamedBlock:
    """One block's hooks. Its slots: for each of its stored tensors (parameters and persistent buffers), the
    table (a module's _parameters or _buffers) and name it goes in, filled before the block runs, emptied after."""

    def __init__(self, model: nn.Module, prefix: str, files: list[Path], memory: _BlockMemory):
        self.model, self.prefix, self.files, self.memory = model, prefix, files, memory
        block = model.get_submodule(prefix)
        self.slots = {}
        for key, tensor in block.state_dict().items():
            owner_name, _, name = key.rpartition(".")
            owner = block.get_submodule(owner_name)
            table = owner._parameters if name in owner._parameters else owner._buffers
            self.slots[f"{prefix}.{key}"] = (key, table is owner._parameters, table, name, tensor.shape)
        block.register_forward_pre_hook(self.load)
        block.register_forward_hook(self.drop, always_call=True)
        self.empty()

    def empty(self) -> None:
        for _key, _is_parameter, table, name, _shape in self.slots.values():
            table[name] = None

    def load(self, _block, _args) -> None:
        resident = next(self.model.parameters())  # where and in what the model computes now
        spare, self.memory.spare = self.memory.spare, {}  # what this block does not reuse is let go with it
        for stored_name, tensor in iter_tensors(self.files, self.slots, self.memory.read_buffer()):
            key, is_parameter, table, name, shape = self.slots[stored_name]
            if tensor.shape != shape:  # checked when the model was made: the files changed since
                self.empty()
                raise BitfluxError(f"{stored_name} now has shape {tuple(tensor.shape)} in {self.files[0].parent}, "
                                   f"not {tuple(shape)}: its checkpoint changed since the model was loaded")
            dtype = resident.dtype if tensor.is_floating_point() else tensor.dtype
            wide = spare.pop(key, None)
            if wide is None or (wide.shape, wide.dtype, wide.device) != (tensor.shape, dtype, resident.device):
                wide = torch.empty(tensor.shape, dtype=dtype, device=resident.device)
            # Copies from the reused (pageable) buffer are synchronous: it may be overwritten next. To a GPU, bytes
            # of another dtype go first and are converted there (a CPU-side conversion would allocate a copy each);
            # bytes already in `dtype` are copied straight in.
            direct = resident.device.type == "cpu" or tensor.dtype == dtype
            wide.copy_(tensor if direct else tensor.to(resident.device))
            table[name] = nn.Parameter(wide, requires_grad=False) if is_parameter else wide
        missing = [stored for stored, (_key, _is_parameter, table, name, _shape) in self.slots.items()
                   if table[name] is None]
        if missing:
            self.empty()
            raise BitfluxError(f"{missing[0]} is no longer in {self.files[0].parent}: its checkpoint changed since "
                               "the model was loaded")

    def drop(self, _block, _args, _output) -> None:
        # the block's tensors kept for the next block's; the block itself holds none
        self.memory.spare = {key: table[name].detach() for key, _is_parameter, table, name, _shape
                             in self.slots.values() if table[name] is not None}
        self.empty()
