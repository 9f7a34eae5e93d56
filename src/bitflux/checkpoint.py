"""bitflux model folders: safetensors validation, streaming sharded writes, and loading onto meta.

A bitflux transformer folder is a diffusers transformer folder: config.json with a `quantization_config`
section, and safetensors holding `<layer>.weight_packed` (uint8, the stored format), `<layer>.weight_scale`
and `<layer>.bias` for quantized layers, the original tensors for everything else.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import formats
from .config import TernaryConfig
from .errors import BitfluxError
from .flux import build_transformer, check_flux_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 512 * 2**20  # bounds the memory a writer holds at once
# safetensors' dtype names -> the torch dtypes read; the byte sizes of those and of the ones only sized
TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
                "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
                "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_BYTES = {**{name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}, "U16": 2, "U32": 4, "U64": 8}


# ---- reading ---------------------------------------------------------------------------------------

def read_safetensors_header(path: str | Path) -> dict:
    """The header of a safetensors file, checked against the file's size, or a one-line BitfluxError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BitfluxError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise BitfluxError(f"{path}: not a safetensors file or truncated (header of {length} bytes past the end)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested past Python's stack
        raise BitfluxError(f"{path}: not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise BitfluxError(f"{path}: corrupted safetensors header")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if isinstance(dtype, str) and dtype not in _DTYPE_BYTES:  # F8_E8M0, F4, ...: not corrupted
            raise BitfluxError(f"{path}: tensor {name!r} is {dtype}, which bitflux does not read (a quantized "
                               "format?); quantize the bf16 or fp8 checkpoint instead")
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            numbers = (begin, end, *shape)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
                raise ValueError("offsets and dimensions must be non-negative integers")
            nbytes = math.prod(shape) * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise BitfluxError(f"{path}: corrupted safetensors entry for {name!r}") from None
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise BitfluxError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupted)")
    # The tensors tile the data one after another (the format's rule): two in one place would read the same bytes
    spans = sorted((info["data_offsets"], name) for name, info in header.items() if name != "__metadata__")
    for ((_, end), before), ((begin, _), name) in itertools.pairwise(spans):
        if begin < end:
            raise BitfluxError(f"{path}: tensors {before!r} and {name!r} overlap in the file (corrupted)")
    return header


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape over all shards, from the validated headers only (no tensor data read)."""
    shapes = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


# diffusers' and transformers' weights of a model folder, in the order each reads them: diffusers a sharded
# model's index first, transformers its one file first (a folder may hold both, from two saves)
_READ_ORDERS = ((INDEX_NAME, WEIGHTS_NAME), ("model.safetensors", "model.safetensors.index.json"))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers or transformers model folder, as that library reads them: its index's
    shards or its one weights file (variants beside them, such as diffusion_pytorch_model.fp16.safetensors, left
    out), else every safetensors file in it, which must not hold a tensor twice."""
    for path in (folder / name for names in _READ_ORDERS for name in names):
        if not path.name.endswith(".index.json"):
            if path.is_file():
                return [path]
        elif path.exists():
            weight_map = parse_json_object(path.read_bytes(), str(path)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(name, str) and name and Path(name).name == name for name in weight_map.values()):
                raise BitfluxError(f"{path}: malformed safetensors index (its weight_map must name files in "
                                   "the folder)")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise BitfluxError(f"{path}: names missing shard {missing[0]}")
            return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")) or any(folder.glob("*.pt")):
            raise BitfluxError(f"{folder}: only pickle weights found; bitflux reads safetensors only")
        raise BitfluxError(f"{folder}: no safetensors weights found")
    file_of = {}
    for file in files:
        for name in read_safetensors_header(file):
            if name != "__metadata__" and file_of.setdefault(name, file) != file:
                raise BitfluxError(f"{folder}: tensor {name!r} is in {file_of[name].name} and in {file.name}; "
                                   "keep one copy of the model's weights in the folder (one variant)")
    return files


def iter_tensors(files: list[Path], names: Collection[str] | None = None, buffer: torch.Tensor | None = None):
    """(name, tensor) one at a time (only those in `names`, if given), read with plain file reads rather than a
    memory map: mapped pages of a 24 GB file would count towards resident memory, and this keeps one source
    tensor in memory at most. `buffer` (uint8): tensors that fit are read into it, each valid until the next is
    read (no fresh memory, whose first touch costs page faults, for each)."""
    for file in files:
        header = read_safetensors_header(file)
        with open(file, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, info in header.items():
                if name == "__metadata__" or (names is not None and name not in names):
                    continue
                if info["dtype"] not in TORCH_DTYPES:
                    raise BitfluxError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                fits = buffer is not None and buffer.numel() >= end - begin
                data = buffer[:end - begin] if fits else torch.empty(end - begin, dtype=torch.uint8)
                f.seek(data_start + begin)
                if f.readinto(data.numpy()) != end - begin:
                    raise BitfluxError(f"{file}: truncated while reading {name!r}")
                yield name, data.view(TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])


def widened_fp8(tensor: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor (a checkpoint's, a LoRA's) as bf16, which holds every fp8 value exactly; others as they are."""
    return tensor.to(torch.bfloat16) if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """A float tensor holding NaN or infinities (a corrupted file) refused in one line naming `what`: a model
    holding it would compute NaN (black images)."""
    tensor = widened_fp8(tensor)  # torch has no isfinite for fp8
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise BitfluxError(f"{what} holds NaN or infinite values (corrupted?)")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise BitfluxError(f"{folder}: no config.json")
    return parse_json_object(path.read_bytes(), str(path))


def parse_json_object(text: str | bytes, where: str) -> dict:
    """A JSON object (config.json, model_index.json, a GGUF file's metadata), else a one-line BitfluxError."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past Python's stack
        raise BitfluxError(f"{where}: not valid JSON") from None
    if not isinstance(value, dict):
        raise BitfluxError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


# ---- writing ---------------------------------------------------------------------------------------

class ShardWriter:
    """Writes tensors into safetensors shards of bounded size as they come, then the index."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # a view (fused projections' codes are row views of one tensor) is copied: safetensors refuses tensors
        # that share memory
        self.pending[name] = (tensor.contiguous() if tensor._base is None
                              else tensor.clone(memory_format=torch.contiguous_format))
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / WEIGHTS_NAME)
            return
        weight_map = {}
        count = len(self.shards)
        for i, (tmp, names) in enumerate(self.shards, 1):
            final = f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def stored_tensors(name: str, module, fmt: str, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors a TernaryLinear is saved as, its codes repacked from its own packing to `fmt` and its
    scales in `scale_dtype` (the folder config's), so that the config describes them."""
    scale = module.weight_scale if scale_dtype is None else module.weight_scale.to(scale_dtype)
    tensors = {f"{name}.weight_packed": formats.convert(module.weight_packed, module.in_features, module.packing, fmt),
               f"{name}.weight_scale": scale}
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias
    return tensors


def architecture_config(model_config: dict) -> dict:
    """A transformer config's architecture: no quantization_config, no private keys but _class_name."""
    config = {k: v for k, v in dict(model_config).items()
              if k != "quantization_config" and (not k.startswith("_") or k == "_class_name")}
    return {**config, "_class_name": model_config.get("_class_name", "FluxTransformer2DModel")}


def write_config(folder: Path, model_config: dict, quant: TernaryConfig) -> None:
    config = {**architecture_config(model_config), "quantization_config": quant.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))


LINKED_SUFFIXES = (".safetensors", ".sft", ".bin", ".gguf", ".ckpt", ".pt", ".pth")  # weights: never edited
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # .sft: FLUX.1's first release (flux1-dev.sft, ae.sft)


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def link_or_copy(src: Path, dst: Path) -> None:
    """A weight file hard-linked where the file system allows (no extra disk: FLUX.1's T5 is 9.5 GB), any other
    file (configs, tokenizers) copied, so that editing it in one folder leaves the other's alone."""
    if src.suffix in LINKED_SUFFIXES:
        try:
            # the file itself: the Hugging Face cache's snapshots are relative symlinks into its blobs, and a
            # hard link to such a symlink dangles from any other folder
            os.link(os.path.realpath(src), dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def copy_folder(src: Path, dst: Path) -> None:
    """src's files into dst (made if missing), folders within folders, by link_or_copy, replacing dst's files of
    the same names."""
    # not shutil.copytree: it gathers its files' errors into one shutil.Error of strings, in which a full disk
    # (the output's trouble) could no longer be told from an unreadable source file
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.is_dir():
            copy_folder(entry, dst / entry.name)
        elif not ((dst / entry.name).exists() and os.path.samefile(entry, dst / entry.name)):  # src into itself
            (dst / entry.name).unlink(missing_ok=True)
            link_or_copy(entry, dst / entry.name)


def write_atomic(path: str | Path, write) -> Path:
    """`write(tmp)` into a temporary name beside `path` (this process's own), then renamed onto it: a reader, or a
    run stopped while writing, never sees half a file. A failed write (a full disk, a read-only file system) is a
    one-line BitfluxError and leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only file system there is nothing to remove
            tmp.unlink(missing_ok=True)
        number = os_error_number(exc)
        if isinstance(exc, OSError) or number is not None:
            raise BitfluxError(f"cannot write {path}: {os.strerror(number) if number else exc}") from None
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def os_error_number(exc: BaseException) -> int | None:
    """The OS error number behind a failed read or write: an OSError's, or the one that safetensors, which raises
    its own error type, puts in its text."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc)) if type(exc).__module__.startswith("safetensors") else None
    return int(found.group(1)) if found else None


def check_output_apart(source: str | Path, out: str | Path) -> None:
    """Refuse an output that is the source, holds it or lies inside it: writing it (with --force, replacing
    it) would destroy the source."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise BitfluxError(f"{out}: the output must be apart from the source {source} (not it, not holding it, "
                           "not inside it)")


# What a write can fail with that is no bug: a full disk or quota, a file too large, a file system gone read-only
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class AtomicFolder:
    """A temporary folder beside `target` that becomes `target` only when the block succeeds."""

    _open = 0  # how many are open: a failed write is reported once, by the outermost, under its own target

    def __init__(self, target: Path, force: bool):
        self.target, self.force = Path(target), force

    def check(self) -> None:
        """Whether the target may be written (also before long work that will write it)."""
        where = Path(os.path.abspath(self.target))  # "." or "x/.." named
        if where == Path.cwd() or where in Path.cwd().parents:
            raise BitfluxError(f"{self.target}: the output cannot be the current folder or hold it")
        if self.target.exists() and not self.force:
            raise BitfluxError(f"{self.target} exists; pass --force (in Python: force=True) to replace it")
        if self.target.exists() and not any((self.target / name).is_file() for name in ("config.json",
                                                                                      "model_index.json")):
            raise BitfluxError(f"{self.target} exists and is no model folder (no config.json or model_index.json): "
                               "--force replaces only those")

    def __enter__(self) -> Path:
        self.check()
        parent = self.target.parent
        # the folders made for it, removed again if the block fails
        self.made = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if not os.access(parent, os.W_OK):
                raise PermissionError(13, "permission denied")
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=parent))
            self.umask = os.umask(0)
            os.umask(self.umask)
        except OSError as exc:
            raise BitfluxError(f"cannot write to {parent}: {exc.strerror}") from None
        AtomicFolder._open += 1
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        AtomicFolder._open -= 1
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for folder in self.made:  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
            number = os_error_number(exc)
            if number in WRITE_ERRNOS and AtomicFolder._open == 0:
                raise BitfluxError(f"cannot write {self.target}: {os.strerror(number)}") from None
            return False
        # mkdtemp's private 0700 (and safetensors' 0600 files) must not outlive the rename; hard links to the
        # source's own files are left as they are.
        for path in [self.tmp, *self.tmp.rglob("*")]:
            if path.is_dir() or (path.is_file() and path.stat().st_nlink == 1):
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~self.umask)
        if self.target.exists() and not self.force:  # written since check(), by another run: theirs stays
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise BitfluxError(f"{self.target} appeared while this ran (another run?); pass --force to replace it")
        try:
            if self.target.exists():
                # A name of its own: a `.old` left by an interrupted run must not block this one.
                old = self.target.with_name(f".{self.target.name}.old.{uuid.uuid4().hex[:12]}")
                os.replace(self.target, old)
                try:
                    os.replace(self.tmp, self.target)
                except OSError:
                    os.replace(old, self.target)  # the previous output stays
                    raise
                # a link to a folder: the link goes, the folder it names stays
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
            else:
                os.replace(self.tmp, self.target)
        except OSError as error:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise BitfluxError(f"cannot replace {self.target}: {error.strerror or error}") from None
        return False


def save_transformer(model, folder: str | Path, config: TernaryConfig | None = None, force: bool = False,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Save a quantized FluxTransformer2DModel as a bitflux folder (atomically). `config`: the one quantize_
    recorded in the model's config if not given; its format and scale dtype are the stored ones, and it must
    describe the model's ternary layers (surgery.check_config), or the folder would not load."""
    from .linear import TernaryLinear
    from .surgery import check_config, ternary_config_of

    config = config or ternary_config_of(model)
    check_config(model, config)
    folder = Path(folder)
    with AtomicFolder(folder, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        ternary = {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
        skip = {f"{n}.{s}" for n in ternary for s in ("weight_packed", "weight_scale", "bias")}
        for name, module in ternary.items():
            for key, tensor in stored_tensors(name, module, config.format, config.scale_torch_dtype).items():
                writer.add(key, tensor)
        for key, tensor in model.state_dict().items():
            if key not in skip:
                writer.add(key, tensor)
        writer.finish()
        write_config(tmp, model.config, config)
    return folder


# ---- loading ---------------------------------------------------------------------------------------

_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(where: str | Path, key: str, tensor: torch.Tensor, want: torch.dtype, fmt: str) -> None:
    """Codes are uint8 holding only valid codes, every other tensor a float dtype the model runs in: anything
    else would load and compute wrong weights (a truncated int64 bias, a code 3 read as a weight of 2)."""
    exact = want == torch.uint8
    if (tensor.dtype != want) if exact else (tensor.dtype not in _DENSE_DTYPES):
        expected = str(want).removeprefix("torch.") if exact else "float32, float16 or bfloat16"
        raise BitfluxError(f"{where}: tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                           f"expected {expected}")
    if key.endswith(".weight_packed") and (bad := formats.invalid_bytes(tensor, fmt)):
        raise BitfluxError(f"{where}: tensor {key!r} holds {bad} bytes that are no {fmt} codes (corrupted)")


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a bitflux transformer folder: built on meta, quantized layers filled straight from the packed
    tensors (no full-precision copy of them is ever made), which stay in the stored packing: the layers are
    built with the stored config, so their buffers already have its shape."""
    from .surgery import quantize_

    folder = Path(path)
    if not folder.is_dir():
        raise BitfluxError(f"{folder}: no such bitflux model folder")
    if (folder / "model_index.json").exists():
        folder = folder / "transformer"
    model_config = read_config(folder)
    check_flux_config(model_config, str(folder))
    if "quantization_config" not in model_config:
        raise BitfluxError(f"{folder}: not a bitflux model (no quantization_config); run `bitflux quantize` first")
    quant = TernaryConfig.from_dict(model_config["quantization_config"])
    model = build_transformer({k: v for k, v in model_config.items() if k != "quantization_config"}, "meta")
    quantize_(model, quant)
    expected = model.state_dict()
    state = {}
    for key, tensor in iter_tensors(weight_files(folder)):
        if key not in expected:
            raise BitfluxError(f"{folder}: unexpected tensor {key!r}")
        check_dtype(folder, key, tensor, expected[key].dtype, quant.format)
        stored_dtype = tensor.dtype
        if key.endswith(".weight_scale"):
            tensor = tensor.to(expected[key].dtype)  # the config's scale dtype (older folders could differ)
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # after the conversion, which can overflow (1e5 in float16)
        converted = "" if tensor.dtype == stored_dtype else f" in {str(tensor.dtype).removeprefix('torch.')}"
        check_finite(tensor, f"{folder}: tensor {key!r}{converted}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BitfluxError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                               f"the config expects {tuple(expected[key].shape)}")
        state[key] = tensor.to(device)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BitfluxError(f"{folder}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
