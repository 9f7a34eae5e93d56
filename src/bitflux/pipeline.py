"""diffusers FluxPipeline with a bitflux transformer: loading, in-memory quantization, generation."""

from __future__ import annotations

import copy
import gc
import os
import warnings
from pathlib import Path

import torch

from . import checkpoint
from .cache import cache_dir
from .checkpoint import read_config
from .config import ACTIVATIONS, DTYPES, TernaryConfig
from .errors import BitfluxError
from .fusion import fuse_projections, gather_fused
from .interop.lora import T5_LEFT_OUT, load_lora, warn_left_out
from .interop.pipeline_lora import add_lora_methods
from .linear import TernaryLinear
from .surgery import QuantizationReport, quantize_, set_activations
from .text_encoders import (
    STREAMED_DTYPES,
    TEXT_ENCODERS,
    narrow_text_encoders,
    streamed_text_encoders,
)


def text_to_image_class():
    """diffusers' FluxPipeline: what generate, eval, bench and calibration run, over any FLUX.1 folder's components
    whose transformer makes images from text alone (check_text_to_image): FLUX.1-dev's, schnell's, Kontext's."""
    from diffusers import FluxPipeline

    return FluxPipeline


def as_text_to_image(pipe):
    """The pipeline itself if a FluxPipeline, else a FluxPipeline over its components (shared, not copied): a
    Kontext or Img2Img pipeline's transformer makes images from text as FLUX.1-dev's does, where their own calls
    size the image otherwise (Kontext: 1024 x 1024 unless told) or want one."""
    flux = text_to_image_class()
    if isinstance(pipe, flux):
        return pipe
    keys = flux._get_signature_keys(flux)[0]
    return flux(**{name: component for name, component in pipe.components.items() if name in keys})


def named_pipeline_class(root: Path):
    """The diffusers class the folder's model_index.json names where it is a FLUX.1 pipeline of FluxPipeline's
    components or fewer (FluxFillPipeline, FluxControlPipeline, FluxKontextPipeline, ...), else FluxPipeline."""
    import diffusers

    root = Path(root)
    name = checkpoint.parse_json_object((root / "model_index.json").read_bytes(),
                                        str(root / "model_index.json")).get("_class_name")
    named = getattr(diffusers, name, None) if isinstance(name, str) and name.startswith("Flux") else None
    if not (isinstance(named, type) and issubclass(named, diffusers.DiffusionPipeline)):
        return text_to_image_class()
    components, flux = (set(cls._get_signature_keys(cls)[0]) for cls in (named, text_to_image_class()))
    # FLUX.1's own (T5 as text_encoder_2; FLUX.2 has one text encoder), nothing more (a ControlNet's)
    return named if {"transformer", "text_encoder_2"} <= components <= flux else text_to_image_class()


def check_text_to_image(root: Path) -> Path:
    """The pipeline folder, if its transformer makes images from text alone, as generate, eval, bench and
    calibration run it; else a one-line BitfluxError (before minutes of loading and encoding, not after). FLUX.1
    Fill, Depth and Canny transformers take more input channels than they give out: an image's beside the noise."""
    root = _pipeline_folder(root)
    config = read_config(root / "transformer") if (root / "transformer" / "config.json").is_file() else {}
    inputs = config.get("in_channels", 64)
    outputs = config.get("out_channels") or inputs
    if inputs != outputs:
        named = named_pipeline_class(root).__name__
        runner = named if named != "FluxPipeline" else "FluxFillPipeline or FluxControlPipeline"
        raise BitfluxError(f"{root}: its transformer takes {inputs} input channels for {outputs} out (FLUX.1 Fill, "
                           "Depth or Canny: an image beside the noise), and generate, eval, bench and calibration "
                           f"make images from text alone: `bitflux quantize` it and run it with diffusers' {runner}")
    return root


def load_transformer(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """A ternary FluxTransformer2DModel from a bitflux folder or a GGUF file with ternary blocks. dtype: the
    unquantized parts' (default: default_dtype(device), as load_pipeline's: what a FluxPipeline loaded for the
    same device computes in)."""
    dtype = resolved_dtype(dtype, device)
    if checkpoint.is_gguf(path):
        from .interop.gguf import load_gguf

        return load_gguf(path, device, dtype)
    return checkpoint.load_transformer(path, device=device, dtype=dtype)


def is_ternary_pipeline(path: str | Path) -> bool:
    return "quantization_config" in read_config(Path(path) / "transformer")


def resolved_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """A dtype argument: a torch dtype, --dtype's names (bf16, fp16, fp32), or None / "auto": default_dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_dtype(device)
    if dtype in DTYPES:
        return getattr(torch, DTYPES[dtype])
    raise BitfluxError(f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, got {dtype!r}")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs (FLUX's own dtype, what tensor cores take, half the text encoders' memory); fp32 on CPUs,
    whose bf16 matmuls are several times slower than fp32 (and the C kernel reads fp32 activations)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                  offload: bool = False, text_encoders: bool | str = True, pipeline_class=None):
    """A diffusers FLUX.1 pipeline from a pipeline folder, of `pipeline_class` (default: the class its
    model_index.json names, named_pipeline_class: FluxPipeline, FluxFillPipeline, FluxKontextPipeline, ...): a
    bitflux one gets its ternary transformer (never materialised in full precision), a full-precision one loads
    as diffusers would. dtype: the unquantized parts' (default: default_dtype(device)). `offload` keeps each
    component on the CPU until it runs (diffusers' model CPU offload): the text encoders, larger than a ternary
    FLUX.1-dev transformer, then never sit on the GPU together with it. A ternary transformer runs each
    attention's q/k/v as one layer call (bitflux.fusion; diffusers' `transformer.unfuse_qkv_projections()` undoes
    it).

    text_encoders: True loads them as suits the device: on a CPU, T5 streamed from its checkpoint a block at a
    time at each encoding (bitflux.streaming: T5-XXL in ~1 GB instead of 9.5, for the same time there), and in
    fp32 the others stored in bf16 or fp16 (FLUX.1's: bf16) keep their linear weights so and widen each for its
    use (bitflux.text_encoders); on a GPU, whole. "streamed" streams T5 anywhere (on a GPU each encoding reads
    its 9.5 GB again), "whole" loads it whole anywhere, False leaves the text encoders and tokenizers out, for
    prompts encoded beforehand (encode_prompts). The embeddings are the same whichever way."""
    if text_encoders not in (True, False, "streamed", "whole"):
        raise BitfluxError(f"text_encoders must be True, False, 'streamed' or 'whole', got {text_encoders!r}")
    root = _pipeline_folder(path)
    _check_offload(device, offload)
    dtype = resolved_dtype(dtype, device)
    if text_encoders == "streamed" and dtype not in STREAMED_DTYPES:
        raise BitfluxError(f"T5 is streamed in {' or '.join(str(d)[6:] for d in STREAMED_DTYPES)}, not {str(dtype)[6:]}")
    if text_encoders:
        stream = text_encoders == "streamed" or (text_encoders is True and torch.device(device).type == "cpu")
        extra = _text_encoders(root, dtype, "cpu" if offload else device, stream)
    else:
        extra = dict.fromkeys(TEXT_COMPONENTS)
    ternary = is_ternary_pipeline(root)
    if ternary:
        extra["transformer"] = checkpoint.load_transformer(root / "transformer", device="cpu" if offload else device,
                                                           dtype=dtype)
    pipe = pipeline_from_folder(root, dtype, extra, pipeline_class)
    if ternary:
        fuse_projections(pipe.transformer)
        add_lora_methods(pipe)
    return _place(pipe, device, offload)


def _text_encoders(root: Path, dtype: torch.dtype, device, stream: bool) -> dict:
    """The folder's text encoders that bitflux loads itself (diffusers loads the others): with `stream`, T5
    streamed on `device` (in fp32 or bf16); in fp32, the others stored in 16 bits narrowed."""
    streamed = streamed_text_encoders(root, dtype, device) if stream else {}
    return {**narrow_text_encoders(root, dtype, [name for name in TEXT_ENCODERS if name not in streamed]), **streamed}


@torch.no_grad()
def encode_prompts(path: str | Path, prompts: list[str], device: str | torch.device = "cpu",
                   dtype: torch.dtype | str | None = None, max_sequence_length: int | None = None,
                   loras=()) -> dict[str, torch.Tensor]:
    """FLUX's embeddings of the prompts (T5's per token, CLIP's pooled), as `generate(..., embeddings=)` takes
    them, made by the pipeline folder's text encoders alone, freed before this returns: with a pipeline loaded
    without them (load_pipeline(text_encoders=False)), the text encoders and the transformer are never in
    memory together (`bitflux generate` does so). In fp32 or bf16, T5 is streamed from its checkpoint a block
    at a time (text_encoders.stream_t5: T5-XXL in one block's memory, on a CPU or a GPU), the other encoders
    load as load_pipeline loads them. The embeddings are the same as the whole pipeline's. T5's text is padded
    to `max_sequence_length` tokens (default: as `generate` pads it, text_length). loras: (LoRA, strength) pairs,
    as interop.lora.load_lora takes them, whose CLIP pairs adapt CLIP for these prompts (T5's are left out, with
    a warning, as diffusers leaves them for FLUX)."""
    if isinstance(prompts, str):
        raise BitfluxError("encode_prompts takes a list of prompts, not one string")
    if not prompts:
        raise BitfluxError("encode_prompts: no prompts")
    root = _pipeline_folder(path)
    dtype = resolved_dtype(dtype, device)
    encoders = pipeline_from_folder(root, dtype, {**_text_encoders(root, dtype, device, stream=True),
                                              "transformer": None, "vae": None}, text_to_image_class())
    try:
        for name in TEXT_ENCODERS:
            if getattr(encoders, name, None) is not None:
                getattr(encoders, name).to(device)
        for source, strength in loras if encoders.text_encoder is not None else ():
            clip = load_lora(encoders.text_encoder, source, strength,
                             component="text_encoder")  # (it goes with the encoders)
            warn_left_out(clip.skipped_text_encoder_pairs, T5_LEFT_OUT, source)
        prompt_embeds, pooled_prompt_embeds, _ = encoders.encode_prompt(
            list(prompts), device=torch.device(device), max_sequence_length=max_sequence_length or text_length(encoders))
    finally:  # also on failure (a traceback would keep them): the encoders' memory back before the transformer's
        del encoders
        gc.collect()  # their modules hold reference cycles
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # to the GPU, not this process's cache: CUDA graphs allocate their own pool
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def _pipeline_folder(path: str | Path) -> Path:
    root = Path(path)
    if not (root / "model_index.json").exists():
        raise BitfluxError(f"{root}: not a pipeline folder (no model_index.json)")
    return root


def pipeline_from_folder(root: Path, dtype: torch.dtype, components: dict, pipeline_class=None):
    """diffusers' from_pretrained of `pipeline_class` (default: the folder's, named_pipeline_class) from local
    files, `components` given (None: left out); a folder it cannot load is a one-line BitfluxError."""
    from safetensors import SafetensorError

    root = Path(root)
    try:
        pipe = (pipeline_class or named_pipeline_class(root)).from_pretrained(str(root), dtype=dtype,
                                                                              local_files_only=True, **components)
    except (OSError, ValueError, SafetensorError) as exc:  # the last: a damaged component's weights
        raise BitfluxError(f"{root}: cannot load the pipeline ({str(exc).splitlines()[0]})") from None
    # diffusers leaves the parameters a component's files lack on the meta device (logged, not raised)
    for name, component in pipe.components.items():
        if name not in components and isinstance(component, torch.nn.Module):
            missing = next((key for key, p in component.named_parameters() if p.is_meta), None)
            if missing is not None:
                raise BitfluxError(f"{root / name}: its weights do not fit its config ({missing!r} is missing; "
                                   "another layout, such as an original single file, is not read there)")
    pipe.set_progress_bar_config(leave=False)
    return pipe


def _check_offload(device, offload: bool) -> None:
    if offload and torch.device(device).type != "cuda":
        raise BitfluxError("offloading needs a CUDA device")


def _place(pipe, device, offload: bool):
    if offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def quantize_pipeline(pipe, config: TernaryConfig | None = None, copy_transformer: bool = True):
    """Ternarize a loaded FluxPipeline's transformer in memory (q/k/v fused, as load_pipeline does): returns
    (pipeline, report). With copy_transformer the given pipeline is left as it was (side-by-side comparisons)."""
    if any(isinstance(m, TernaryLinear) for m in pipe.transformer.modules()):
        raise BitfluxError("the pipeline's transformer is ternary already")
    transformer = copy.deepcopy(pipe.transformer) if copy_transformer else pipe.transformer
    report: QuantizationReport = quantize_(transformer, config or TernaryConfig())
    fuse_projections(transformer)
    components = dict(pipe.components, transformer=transformer)
    ternary = add_lora_methods(type(pipe)(**components))
    ternary.set_progress_bar_config(leave=False)
    return ternary, report


def text_length(pipe) -> int:
    """FluxPipeline pads T5 text to max_sequence_length (512 by default); small models record less."""
    return min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512)))


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.5,
             height: int = 64, width: int = 64, progress: bool = True, embeddings: dict | None = None,
             release_transformer: bool = False):
    """PIL images, one per prompt, made from text (as_text_to_image: a Kontext pipeline's too); the noise of each
    depends only on its seed, so full-precision and ternary pipelines given the same seeds start from the same
    latents. `embeddings`: the prompts' as encode_prompts made them (the pipeline may then have no text
    encoders), the same images. `release_transformer`: the pipeline drops its transformer once the latents are
    made, before the VAE decodes them (the peak is then the larger of the two, not their sum: the decoder at
    1024x1024 takes ~4 GB on a CPU); the same images, and the pipeline cannot denoise again."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if not prompts:
        raise BitfluxError("generate: no prompts")
    caller, pipe = pipe, as_text_to_image(pipe)
    if pipe.transformer is None:
        raise BitfluxError("the pipeline has no transformer (released by an earlier release_transformer=True "
                           "call?): load it again")
    if embeddings is None:
        text = {"prompt": list(prompts)}
    else:
        if any(len(embeddings[key]) != len(prompts) for key in ("prompt_embeds", "pooled_prompt_embeds")):
            raise ValueError("one embedding per prompt")
        text = placed_embeddings(pipe, embeddings)
    check_timestep_shift(pipe, height, width, steps)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    # released: the latents, decoded once the transformer is gone; else the images themselves
    out = pipe(**text, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               generator=generators, max_sequence_length=text_length(pipe),
               output_type="latent" if release_transformer else "pil").images
    if not release_transformer:
        return out
    pipe.transformer = caller.transformer = None
    gc.collect()
    trim_heap()
    return decode(pipe, out, height, width)


def check_timestep_shift(pipe, height: int, width: int, steps: int) -> None:
    """Refuse a size at which FluxPipeline's timestep schedule comes out NaN (black images). It shifts the sigmas
    by e^mu, mu growing linearly in the image's tokens along the line the scheduler's config draws through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift): past float32's e^88 they are NaN, and
    with a shift_terminal once they all round to 1 (from mu ~ 20). FLUX.1's own line reaches mu = 11.6 at
    4096 x 4096; the demo's, drawn for 16-256 tokens, 88 at about 2900 x 2900."""
    tokens = image_tokens(pipe, height, width)
    if finite_schedule(pipe.scheduler, tokens, steps):
        return
    side = pipe.vae_scale_factor * 2
    low, high = 0, max(height, width) // side  # the largest square that works, in tokens a side
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if finite_schedule(pipe.scheduler, middle * middle, steps) else (low, middle - 1)
    largest = (f"; at most about {low * side}x{low * side} with this model" if low else
               "; at no size with this many steps: take more")
    raise BitfluxError(f"{width}x{height}: the scheduler's timestep schedule of {steps} step{'s' * (steps != 1)} "
                       f"is NaN for {tokens} image tokens (its config's shift is drawn for "
                       f"{pipe.scheduler.config.get('base_image_seq_len')}-"
                       f"{pipe.scheduler.config.get('max_image_seq_len')}){largest}")


def image_tokens(pipe, height: int, width: int) -> int:
    """The tokens of a height x width image in FluxPipeline's latents (packed 2 x 2 after the VAE's downscale)."""
    side = pipe.vae_scale_factor * 2
    return (height // side) * (width // side)


def finite_schedule(scheduler, tokens: int, steps: int) -> bool:
    """Whether FluxPipeline's sigmas for an image of `tokens` are finite, made as it makes them (on a copy)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    if not config.get("use_dynamic_shifting"):
        return True  # the size does not enter the schedule
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler = copy.deepcopy(scheduler)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config.get("use_flow_sigmas"):
            scheduler.set_timesteps(steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return bool(torch.isfinite(scheduler.sigmas).all())


def placed_embeddings(pipe, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """encode_prompts' embeddings where and in what the pipeline's transformer computes (diffusers takes given
    embeddings as they are), as the pipeline's keyword arguments."""
    return {key: embeddings[key].to(pipe._execution_device, pipe.transformer.dtype)
            for key in ("prompt_embeds", "pooled_prompt_embeds")}


def trim_heap() -> None:
    """Hand glibc's freed heap memory back to the system (the denoising's activations under its mmap threshold,
    which it keeps for reuse; the VAE's large tensors are mapped afresh and would not reuse it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, height: int, width: int):
    """PIL images of a FluxPipeline's packed latents (its output_type="latent"), as its own call decodes them."""
    from diffusers.utils.torch_utils import get_module_execution_device

    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]
    images = pipe.image_processor.postprocess(image, output_type="pil")
    pipe.maybe_free_model_hooks()  # offloading: the VAE back to the CPU
    return images


def accelerate_transformer(pipe, cuda_graph: bool = False, compile: bool = False) -> None:
    """cuda_graph: the transformer replayed as CUDA graphs (bitflux.cuda_graphed: no per-kernel launch cost on
    a GPU); compile: torch.compile'd (each ternary layer or fused q/k/v one operator, the float ops between them
    fused into fewer kernels: compile_transformer). Not both: a compiled module is not captured by
    bitflux.graphs."""
    if cuda_graph and compile:
        raise BitfluxError("CUDA graphs and torch.compile: choose one")
    gather_fused(pipe.transformer)  # what a traced or captured call could not do
    if cuda_graph:
        from .graphs import cuda_graphed

        cuda_graphed(pipe.transformer)
    if compile:
        pipe.transformer = compile_transformer(pipe.transformer)


def compile_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """The transformer torch.compile'd; it compiles at its first call.

    A deep transformer that names its repeated blocks (diffusers' `_repeated_blocks`: FLUX's two block classes)
    is compiled in place a block class at a time, every block of a class reusing the code: FLUX.1-dev's forward
    on a CPU as fast as with the whole model compiled, after ~5 s of compiling instead of 84 (BENCHMARKS.md). A
    shallow one is compiled whole, quickly, and the glue outside its blocks, a large part of a small model's
    step, is compiled too (the demo's step: 7.7 ms whole, 9.5 ms by blocks, 10.5 eager)."""
    if _repeated_blocks(transformer) >= REGIONAL_COMPILE_MIN_BLOCKS:
        transformer.compile_repeated_blocks()
        return transformer
    return torch.compile(transformer)


REGIONAL_COMPILE_MIN_BLOCKS = 16  # FLUX.1: 57; the demo: 6


def _repeated_blocks(transformer) -> int:
    """How many blocks of the classes a diffusers model names as repeated (0 if it names none)."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    return sum(type(module).__name__ in names for module in transformer.modules())


def default_image_size(pipe) -> tuple[int, int]:
    """The size a pipeline was trained for: the VAE's sample_size when small (the demo's 64), else 1024."""
    size = getattr(pipe.vae.config, "sample_size", 1024)
    size = size if isinstance(size, int) and size < 1024 else 1024
    return size, size


def demo_ternary_path(config: TernaryConfig | None = None, progress: bool = True) -> Path:
    """The embedded demo model in ternary form, as a pipeline folder in the cache: by default its shipped
    calibrated transformer; with a config, plain rounding with that config (made on first use, keyed by it)."""
    import hashlib
    import json
    import shutil

    from .checkpoint import AtomicFolder
    from .convert import copy_pipeline_components, quantize_checkpoint
    from .demo import calibrated_transformer_path, demo_model_path

    source = demo_model_path()
    calibrated = calibrated_transformer_path() if config is None else None
    transformer = calibrated or source / "transformer"
    stamp = [config.to_dict() if config else "calibrated" if calibrated else TernaryConfig().to_dict(),
             sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in transformer.iterdir())]
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"demo-ternary-{key}"
    if (target / "model_index.json").exists():
        return target
    if calibrated is None:
        quantize_checkpoint(source, target, config or TernaryConfig(), force=True, progress=progress)
        return target
    with AtomicFolder(target, force=True) as tmp:
        copy_pipeline_components(source, tmp)
        shutil.copytree(calibrated, tmp / "transformer")
    return target


def resolve_pipeline_path(model: str | None) -> Path:
    """A local pipeline folder for --model: a path, or a hub id already in the local Hugging Face cache, of a
    text-to-image FLUX.1 (check_text_to_image)."""
    from .convert import from_hub_cache, looks_like_hub_id

    if model is None:
        from .demo import demo_model_path

        return demo_model_path()
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").exists():
            # a transformer alone (quantize's output for a transformer folder or a single file) cannot generate
            hint = ("; a transformer alone has no text encoders nor VAE: quantize the whole pipeline folder, or put "
                    "a bitflux transformer folder as transformer/ in a copy of its pipeline"
                    if (path / "config.json").exists() or path.is_file() else "")
            raise BitfluxError(f"{path}: not a FLUX pipeline folder (no model_index.json){hint}")
        return check_text_to_image(path)
    if looks_like_hub_id(model):
        return check_text_to_image(from_hub_cache(model))
    raise BitfluxError(f"{model}: no such model folder")


def side_by_side(images, labels):
    """One PNG-ready image: the given images in a row with a label strip under each."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    strip = 14
    canvas = Image.new("RGB", (width * len(images), height + strip), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        canvas.paste(image, (i * width, 0))
        draw.text((i * width + 2, height + 1), label, fill="black")
    return canvas


def check_png_path(path: str | Path) -> Path:
    """A path save_png can write, else a one-line BitfluxError: a .png file name in a folder that exists. The
    CLI checks its image outputs so before a run of minutes, not after it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise BitfluxError(f"{path}: output must be a .png file")
    if path.is_dir():
        raise BitfluxError(f"{path}: is a folder, not an image file")
    if not path.parent.is_dir():
        raise BitfluxError(f"{path.parent}: no such folder for {path.name}")
    if not os.access(path.parent, os.W_OK):  # a read-only file system too
        raise BitfluxError(f"cannot write {path}: its folder is not writable")
    return path


def save_png(image, path: str | Path) -> Path:
    return checkpoint.write_atomic(check_png_path(path), lambda tmp: image.save(tmp, format="PNG"))


def load_variants(model: str | None, device: str = "cpu", want_fp: bool = True, want_ternary: bool = True,
                  progress: bool = True, dtype: torch.dtype | None = None, offload: bool = False,
                  text_encoders: bool | str = True):
    """(full-precision pipeline or None, ternary pipeline or None) for a --model argument: None is the embedded
    demo (its ternary form cached on disk), a full-precision folder is quantized in memory, a bitflux folder
    is ternary already (and has no full-precision twin). With `offload`, one pipeline at a time;
    `text_encoders=False`: none (load_pipeline's)."""
    if offload and want_fp and want_ternary:
        raise BitfluxError("offloading runs one pipeline at a time: not with a full-precision comparison")
    _check_offload(device, offload)
    path = resolve_pipeline_path(model)
    place = dict(device=device, dtype=dtype, offload=offload, text_encoders=text_encoders,
                 pipeline_class=text_to_image_class())
    if model is None:
        return (load_pipeline(path, **place) if want_fp else None,
                load_pipeline(demo_ternary_path(progress=progress), **place) if want_ternary else None)
    check_comparable(path, want_fp)
    if is_ternary_pipeline(path):
        return None, load_pipeline(path, **place)
    # Quantized in memory on the CPU when offloading: the full-precision transformer never goes to the GPU (nor
    # are the text encoders chosen as for a CPU pipeline: they will run on the GPU).
    fp = load_pipeline(path, "cpu" if offload else device, resolved_dtype(dtype, device),
                       text_encoders="whole" if offload and text_encoders is True else text_encoders,
                       pipeline_class=text_to_image_class())
    ternary = quantize_pipeline(fp, copy_transformer=want_fp)[0] if want_ternary else None
    fp = fp if want_fp else None
    if offload:
        _place(ternary if ternary is not None else fp, device, offload)
    return fp, ternary


def check_comparable(path: Path, want_fp: bool) -> None:
    """A full-precision comparison needs a full-precision folder (a bitflux one has no twin)."""
    if want_fp and is_ternary_pipeline(path):
        raise BitfluxError(f"{path} is already ternary; comparing needs the full-precision pipeline")


def variant_config(name: str) -> TernaryConfig:
    """A variant name -> its TernaryConfig: METHOD[-tensor|-channel|-groupN][-a16|-a8|-fp8], e.g. "lsq-channel-a8"."""
    method, *options = name.split("-")
    fields: dict = {"method": method}
    for option in options:
        if option in ("tensor", "channel"):
            fields["granularity"] = option
        elif option.startswith("group") and option[5:].isdigit():
            fields.update(granularity="group", group_size=int(option[5:]))
        elif option in ACTIVATIONS:
            fields["activations"] = option
        else:
            raise BitfluxError(f"unknown variant option {option!r} in {name!r}; expected tensor, channel, groupN, "
                               "a16, a8 or fp8")
    return TernaryConfig(**fields)


def check_variant(name: str, demo: bool = True) -> None:
    """Fail on a bad evaluation variant name before anything is loaded. `demo`: compared with the embedded
    demo, whose shipped calibrated model the "calibrated" variants are."""
    if name == "fp":
        return
    if Path(name).exists() or "/" in name or os.sep in name:  # a folder, by what it looks like
        if not (Path(name) / "model_index.json").is_file():
            raise BitfluxError(f"{name}: not a pipeline folder (no model_index.json); a variant folder is a whole "
                               "pipeline, as `bitflux quantize PIPELINE -o OUT` writes it")
        check_text_to_image(Path(name))
        return
    if name.startswith("calibrated"):
        _calibrated_activations(name)
        if not demo:
            raise BitfluxError(f"{name}: the embedded demo's shipped calibrated model, compared only with the demo "
                               "(no --model); for your model pass the folder `bitflux quantize --calibrate` wrote")
    else:
        variant_config(name)


def _calibrated_activations(name: str) -> str | None:
    """"calibrated" -> None (as shipped), "calibrated-a8" -> "a8", ..."""
    base, dash, activations = name.partition("-")
    if base != "calibrated" or (dash and activations not in ACTIVATIONS):
        raise BitfluxError(f"unknown variant {name!r}; the shipped model is 'calibrated' or "
                           f"'calibrated-' + one of {', '.join(ACTIVATIONS)}")
    return activations or None


def variant_pipeline(fp_pipe, name: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """The pipeline of an evaluation variant: "fp" itself; "calibrated", the demo's shipped calibrated
    ternary model ("calibrated-a8", "calibrated-fp8": the same run with 8-bit activations); a path, a
    bitflux pipeline folder (e.g. made by `quantize --calibrate`); else a name for variant_config,
    quantized in memory from the full-precision pipeline."""
    if name == "fp":
        return fp_pipe
    if Path(name).is_dir():
        return load_pipeline(name, device, dtype, pipeline_class=text_to_image_class())
    if name.startswith("calibrated"):
        activations = _calibrated_activations(name)
        pipe = load_pipeline(demo_ternary_path(), device, dtype)
        if activations:
            set_activations(pipe.transformer, activations)
        return pipe
    return quantize_pipeline(fp_pipe, variant_config(name))[0]
