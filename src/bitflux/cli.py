"""The `bitflux` command: parse arguments, call the API, turn BitfluxError into one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .config import ACTIVATIONS, DTYPES, FLOAT32_MAX, FORMATS, METHODS
from .errors import BitfluxError

MAX_STEPS = 1000  # denoising steps: more is a typo (and would allocate a schedule of that length)


def _cmd_quantize(args) -> None:
    from .checkpoint import is_gguf
    from .config import TernaryConfig
    from .convert import quantize_checkpoint
    from .inspect import format_report, inspect_path

    # Only the settings given: a GGUF file that is already ternary keeps its own for the rest.
    given = {key: value for key, value in (("method", args.method), ("format", args.format),
                                           ("activations", args.activations)) if value is not None}
    if args.granularity is not None:
        given.update(TernaryConfig.parse_granularity(args.granularity))
    config = TernaryConfig(**given)
    calibration = {name: getattr(args, name) for name in ("calibration", *_CALIBRATION_COUNTS, "workdir")
                   if getattr(args, name) is not None}  # the calibration settings given
    if calibration and not args.calibrate:
        named = ", ".join("--" + name.replace("_", "-") for name in calibration)
        raise BitfluxError(f"{named}: calibration settings, which need --calibrate PROMPTS.txt")
    if args.calibrate:
        from .calibrate.config import CalibrationConfig
        from .calibrate.prompts import read_prompts
        from .calibrate.quantize import quantize_calibrated

        prompts = read_prompts(args.calibrate)
        _quiet_libraries()  # the teacher loads pipeline parts with diffusers and transformers
        counts = {name: value for name, value in calibration.items() if name in _CALIBRATION_COUNTS}
        settings = CalibrationConfig.for_level(args.calibration or "blockwise", **counts)
        report = quantize_calibrated(args.source, args.output, prompts, config, settings, force=args.force,
                                     workdir=args.workdir, progress=not args.quiet)
        if not args.quiet:
            print(report.summary())
    elif is_gguf(args.source):
        from .interop.gguf import gguf_to_folder

        gguf_to_folder(args.source, args.output, force=args.force, overrides=given, progress=not args.quiet)
    else:
        quantize_checkpoint(args.source, args.output, config, force=args.force, progress=not args.quiet)
    if not args.quiet:
        print(format_report(inspect_path(args.output)).split("\n\n")[0])
        print(f"wrote {args.output}")


# the CalibrationConfig fields the command sets, each by its flag of the same name
_CALIBRATION_COUNTS = ("steps", "distill_steps", "onpolicy_steps", "onpolicy_rounds", "samples")


def _cmd_export_gguf(args) -> None:
    from .interop.gguf import export_gguf

    summary = export_gguf(args.model, args.output, type=args.type, names=args.names, force=args.force)
    print(f"wrote {summary.path}: {summary.ternary_tensors} ternary and {summary.dense_tensors} dense tensors, "
          f"{summary.bytes / 1e6:.1f} MB")


def _cmd_inspect(args) -> None:
    from .inspect import format_report, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else format_report(info))


MAX_SIDE = 4096  # pixels: FLUX.1 is trained up to ~2 MP; past this the latents alone take gigabytes


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BitfluxError(f"bad --size {text!r}; expected WIDTHxHEIGHT, e.g. 64x64") from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise BitfluxError(f"--size {text}: width and height must be positive multiples of 16")
    if max(width, height) > MAX_SIDE:
        raise BitfluxError(f"--size {text}: at most {MAX_SIDE} pixels a side")
    return width, height


def _parse_lora(text: str) -> tuple[Path, float]:
    """LORA[:STRENGTH] -> (its file, strength); LORA: a file, a folder or a hub id (interop.lora.lora_file)."""
    # the last colon: a path may hold colons of its own (C:\\loras\\x.safetensors:0.8, style:v2.safetensors:0.5)
    path, _, strength = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
    try:
        if "_" in strength:  # float() takes 1_0 for 10
            raise ValueError
        value = float(strength) if strength else 1.0
    except ValueError:
        if Path(path).exists():
            raise BitfluxError(f"bad --lora {text!r}: its strength {strength!r} is not a number") from None
        path, value = text, 1.0  # no strength: a colon of the name's own (lora_file says if it names nothing)
    if not abs(value) <= FLOAT32_MAX:
        raise BitfluxError(f"bad --lora {text!r}: the strength must be a finite number within float32's range")
    from .interop.lora import lora_file

    return lora_file(path), value


def _check_common(args) -> None:
    """Validate what generate/bench/eval share before any model is loaded, then quiet the libraries."""
    import torch

    from .kernels import AUTO_ORDER, unavailable_reason

    if not 1 <= getattr(args, "steps", 1) <= MAX_STEPS:
        raise BitfluxError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if not 0 <= getattr(args, "seed", 0) < 2**63:
        raise BitfluxError(f"--seed must be between 0 and 2^63 - 1, got {args.seed}")
    seeds = getattr(args, "seeds", [])
    for seed in seeds:  # ShapeEval draws prompt i's noise from seed * 1000003 + i, a 64-bit number too
        if not 0 <= seed < 2**32:
            raise BitfluxError(f"--seeds must be between 0 and 2^32 - 1, got {seed}")
    if len(set(seeds)) < len(seeds):
        raise BitfluxError(f"--seeds {' '.join(map(str, seeds))}: a seed given twice would count its images twice")
    if not abs(getattr(args, "guidance", 0.0)) <= FLOAT32_MAX:  # the pipeline makes a float32 tensor of it
        raise BitfluxError(f"--guidance must be a finite number within float32's range, got {args.guidance}")
    if getattr(args, "size", None):
        _parse_size(args.size)
    device = args.device.split(":")[0]
    if device not in ("cpu", "cuda"):
        raise BitfluxError(f"unknown --device {args.device!r}; choose cpu or cuda")
    if getattr(args, "cuda_graph", False) and not args.device.startswith("cuda"):
        raise BitfluxError("--cuda-graph needs --device cuda")
    if getattr(args, "cuda_graph", False) and getattr(args, "compile", False):
        raise BitfluxError("--cuda-graph and --compile: choose one")
    if hasattr(args, "cuda_graph") and args.cuda_graph is None:
        # Not asked either way: graphs wherever they can run. Eager, a ternary forward is bound by the host's
        # kernel launches (FLUX.1-dev on an H200: fp8 0.98x of bf16 eager, 1.14x replayed; BENCHMARKS.md).
        args.cuda_graph = device == "cuda" and not args.offload and not args.compile
    if getattr(args, "offload", False):
        if not args.device.startswith("cuda"):
            raise BitfluxError("--offload needs --device cuda")
        if getattr(args, "cuda_graph", False) or getattr(args, "compile", False):
            raise BitfluxError("--offload moves the transformer between steps: not with --cuda-graph or --compile")
        if getattr(args, "compare", False):
            raise BitfluxError("--offload runs one pipeline at a time; it cannot be combined with --compare")
    if device == "cuda" and not torch.cuda.is_available():  # before any notice about backends on it
        raise BitfluxError("--device cuda: no CUDA GPU is available to this torch (a CPU build, or no driver)")
    from_environment = args.backend is None  # as the library takes it: a backend that cannot run here is passed over
    if from_environment:
        args.backend = os.environ.get("BITFLUX_BACKEND") or "auto"
    reason = unavailable_reason(args.backend, device)
    if reason and not from_environment:
        raise BitfluxError(reason)
    if reason:
        print(f"bitflux: BITFLUX_BACKEND: {reason}; running on the reference backend", file=sys.stderr)
    if args.backend == "auto":  # said before the run, not as a warning in the middle of its progress bar
        for name in AUTO_ORDER.get(device, []):
            if why := unavailable_reason(name, device):
                print(f"bitflux: {why}; running on the reference backend", file=sys.stderr)
    _quiet_libraries()


def _quiet_libraries() -> None:
    """diffusers' and transformers' loading chatter off, so that bitflux's own progress bars and lines are
    what the user reads."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside the libraries we call


def _cmd_generate(args) -> None:
    from .kernels import use_backend
    from .pipeline import (
        accelerate_transformer,
        check_comparable,
        check_png_path,
        default_image_size,
        encode_prompts,
        generate,
        load_variants,
        resolve_pipeline_path,
        save_png,
        side_by_side,
    )

    if not args.prompt.strip():
        raise BitfluxError("the prompt is empty")
    check_png_path(args.output)
    _check_common(args)
    from .interop.lora import NoPairsError, load_lora, open_lora, refuse_t5_only

    loras = [(open_lora(path), strength) for path, strength in map(_parse_lora, args.lora)]  # read once
    for lora, _ in loras:  # before minutes of encoding and loading
        refuse_t5_only(lora)
    # The prompt first, then the transformer: the text encoders (T5-XXL alone is 9.5 GB in bf16) are freed before
    # it is loaded, so the peak is the larger of the two, not their sum.
    path = resolve_pipeline_path(args.model)
    check_comparable(path, args.compare)  # before minutes of encoding
    embeddings = encode_prompts(path, [args.prompt], args.device, args.dtype, loras=loras)  # CLIP's pairs
    fp, ternary = load_variants(args.model, args.device, want_fp=args.compare, progress=True,
                                dtype=args.dtype, offload=args.offload, text_encoders=False)
    pipes = [p for p in (fp, ternary) if p is not None]
    if args.activations:
        from .surgery import set_activations

        set_activations(ternary.transformer, args.activations)
    if args.packing:
        from .surgery import set_packing

        set_packing(ternary.transformer, args.packing)
    for lora, strength in loras:
        for pipe in pipes:
            try:
                load_lora(pipe.transformer, lora, strength, dtype=pipe.transformer.dtype)
            except NoPairsError as exc:  # CLIP's pairs alone: the prompt's encoding took them
                if not exc.clip_pairs:
                    raise
    for pipe in pipes:
        accelerate_transformer(pipe, cuda_graph=args.cuda_graph, compile=args.compile)
    width, height = _parse_size(args.size) if args.size else default_image_size(ternary)
    settings = dict(steps=args.steps, guidance=args.guidance, height=height, width=width)
    with use_backend(args.backend):
        image = generate(ternary, [args.prompt], [args.seed], embeddings=embeddings, release_transformer=True,
                         **settings)[0]
    if args.compare:
        reference = generate(fp, [args.prompt], [args.seed], embeddings=embeddings, release_transformer=True,
                             **settings)[0]
        image = side_by_side([reference, image], ["full precision", "ternary"])
    save_png(image, args.output)
    print(f"wrote {args.output}")


def _cmd_bench(args) -> None:
    from .bench import format_bench, plot_bench, run_bench
    from .pipeline import check_png_path

    _check_common(args)
    if args.plot:
        check_png_path(args.plot)
    size = _parse_size(args.size) if args.size else None
    result = run_bench(args.model, args.device, args.steps, args.backend, size, cuda_graph=args.cuda_graph,
                       compile=args.compile, activations=args.activations, packing=args.packing, dtype=args.dtype,
                       offload=args.offload)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    if args.plot:
        plot_bench(result, args.plot)


def _cmd_eval(args) -> None:
    from .eval.runner import (
        check_variants,
        evaluate_variants,
        results_json,
        variant_grid,
        variant_table,
    )
    from .kernels import use_backend
    from .pipeline import (
        check_comparable,
        check_png_path,
        check_variant,
        load_pipeline,
        resolve_pipeline_path,
        save_png,
        text_to_image_class,
        variant_pipeline,
    )

    _check_common(args)
    if not 1 <= args.per_category <= 48:
        raise BitfluxError(f"--per-category {args.per_category}: ShapeEval has 1 to 48 prompts a category")
    if args.grid:
        check_png_path(args.grid)
    path = resolve_pipeline_path(args.model)
    # the shipped calibrated model is the demo's: with another --model it would be compared with what it is not
    demo = args.model is None
    default = "fp,absmean,calibrated" if demo else "fp,absmean"
    variants = check_variants(default if args.variants is None else args.variants)
    for name in variants:  # fail on a bad name before minutes of generation
        check_variant(name, demo)
    check_comparable(path, want_fp=True)  # every variant is scored against this one as full precision
    dtype = args.dtype
    fp = load_pipeline(path, args.device, dtype, pipeline_class=text_to_image_class())
    with use_backend(args.backend):
        results = evaluate_variants(lambda name: variant_pipeline(fp, name, args.device, dtype), variants,
                                    seeds=tuple(args.seeds), per_category=args.per_category, steps=args.steps,
                                    guidance=args.guidance)
    if not results:  # not rank 0
        return
    settings = {"model": str(path), "steps": args.steps, "guidance": args.guidance, "seeds": args.seeds,
                "per_category": args.per_category, "device": args.device, "dtype": args.dtype,
                "backend": args.backend}
    print(results_json(results, settings) if args.json else variant_table(results))
    if args.grid:
        save_png(variant_grid(results), args.grid)


ACTIVATIONS_HELP = ("run the ternary layers with these activations (default: as quantized; fp8 is the fastest on "
                    "Hopper GPUs)")
DTYPE_HELP = "the unquantized parts' dtype (default auto: bf16 on cuda, fp32 on cpu)"
COMPILE_HELP = ("torch.compile the transformer (each ternary layer or fused q/k/v one operator; FLUX.1 a block class at a "
                "time; the first step compiles)")
OFFLOAD_HELP = ("keep each component on the CPU until it runs (diffusers' model CPU offload): for GPUs too small "
                "for FLUX.1's text encoders beside the transformer")
CUDA_GRAPH_HELP = ("replay the transformer as CUDA graphs, captured at the first step (no per-kernel launch cost); "
                   "the default on cuda unless --offload or --compile: --no-cuda-graph runs it eager")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, a value it cannot parse) in one line, as bitflux's are, without
    the usage block before them; exit status 2 as argparse's. Its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .calibrate.config import LEVELS, CalibrationConfig  # torch, with the calibrate package

    parser = _OneLineErrors(prog="bitflux", description="1.58-bit (ternary) FLUX transformers")
    parser.add_argument("-V", "--version", action="version", version=f"bitflux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a FLUX checkpoint to a bitflux folder")
    q.add_argument("source", help="diffusers pipeline/transformer folder, original .safetensors, or cached hub id")
    q.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    # Defaults None: TernaryConfig's (tq2, absmean, tensor, a16), or a ternary GGUF source's own settings.
    q.add_argument("--format", default=None, choices=FORMATS,
                   help="packing on disk and in memory: tq2 (2 bits a weight, the default) or tq1 (1.6 bits, "
                        "20%% fewer bytes)")
    q.add_argument("--method", default=None, choices=METHODS, help="default: absmean")
    q.add_argument("--granularity", default=None, help="tensor (the default) | channel | group:N")
    q.add_argument("--activations", default=None, choices=ACTIVATIONS,
                   help="activations the kernels use: 16-bit (the default), int8 or fp8 per token")
    q.add_argument("--calibrate", default=None, metavar="PROMPTS.txt",
                   help="calibrate with the full-precision model as teacher on these prompts (one per line)")
    # The calibration settings default to None: given without --calibrate they are an error, not ignored.
    q.add_argument("--calibration", default=None, choices=list(LEVELS),
                   help="the last calibration stage to run (each runs the cheaper ones before it; default: "
                        "blockwise)")
    q.add_argument("--steps", type=int, default=None, help="optimisation steps per block (block-wise stage; "
                                                          f"default {CalibrationConfig.steps})")
    q.add_argument("--distill-steps", type=int, default=None,
                   help=f"end-to-end distillation steps (distill stage; default {CalibrationConfig.distill_steps})")
    q.add_argument("--onpolicy-steps", type=int, default=None,
                   help="distillation steps on fresh teacher and the student's own trajectories, in each round "
                        f"(onpolicy stage; default {CalibrationConfig.onpolicy_steps})")
    q.add_argument("--onpolicy-rounds", type=int, default=None,
                   help="onpolicy rounds: each records the student's trajectories again and distils on all so far "
                        f"(default {CalibrationConfig.onpolicy_rounds})")
    q.add_argument("--samples", type=int, default=None,
                   help=f"teacher trajectories (images) to record (default {CalibrationConfig.samples})")
    q.add_argument("--workdir", default=None, help="keep teacher records and finished blocks here to resume "
                                                   "(an interrupted calibration goes on from them when run again, "
                                                   "as does a run of a later --calibration)")
    q.add_argument("--force", action="store_true", help="replace an existing output")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(run=_cmd_quantize)

    i = sub.add_parser("inspect", help="parameters, coverage and bytes of a model, source or config.json")
    i.add_argument("path", help="bitflux folder, source checkpoint, config.json, or flux.1-dev / flux.1-schnell")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=_cmd_inspect)

    e = sub.add_parser("export-gguf", help="write a bitflux model as GGUF with ggml's TQ2_0 / TQ1_0 blocks")
    e.add_argument("model", help="bitflux transformer or pipeline folder")
    e.add_argument("-o", "--output", required=True, help=".gguf file (written atomically)")
    e.add_argument("--force", action="store_true", help="replace an existing output file")
    e.add_argument("--type", default="tq2_0", choices=["tq2_0", "tq1_0"])
    e.add_argument("--names", default="original", choices=["original", "diffusers"],
                   help="tensor names: original single-file FLUX names (ComfyUI-GGUF) or diffusers names")
    e.set_defaults(run=_cmd_export_gguf)

    g = sub.add_parser("generate", help="an image from a prompt with a ternary model (default: the embedded demo)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="pipeline folder (full precision or bitflux) or cached hub id")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=3.5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 16 (default: the model's)")
    _add_run_options(g)
    g.add_argument("--compare", action="store_true", help="full precision and ternary side by side, same noise")
    g.add_argument("--lora", action="append", default=[], metavar="LORA[:STRENGTH]",
                   help="apply a FLUX LoRA (diffusers/PEFT or kohya safetensors: the file, a folder holding it, or a "
                        "hub id in the local cache) as a 16-bit side branch; repeatable")
    g.add_argument("-o", "--output", required=True, help="PNG file")
    g.set_defaults(run=_cmd_generate)

    b = sub.add_parser("bench", help="full precision vs ternary: step and image time, peak memory, weight bytes")
    b.add_argument("--model", default=None, help="pipeline folder (full precision) or cached hub id")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    _add_run_options(b)
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot", default=None, help="bar chart PNG")
    b.set_defaults(run=_cmd_bench)

    v = sub.add_parser("eval", help="ShapeEval and same-seed fidelity of variants (distributed with torchrun)")
    v.add_argument("--model", default=None, help="full-precision pipeline folder (default: the embedded demo)")
    v.add_argument("--variants", default=None,
                   help="comma-separated (default fp,absmean,calibrated; with --model fp,absmean): fp; "
                        "calibrated[-a16|-a8|-fp8] (the demo's shipped calibrated model, as shipped or with those "
                        "activations; the demo only); a bitflux pipeline folder (e.g. quantize --calibrate's); "
                        "METHOD[-tensor|-channel|-groupN][-a16|-a8|-fp8] with METHOD absmean, twn, lsq")
    v.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="evaluation seeds, distinct, 0 to 2^32 - 1 (more seeds: tighter standard errors)")
    v.add_argument("--per-category", type=int, default=48, help="prompts per ShapeEval category (at most 48)")
    v.add_argument("--steps", type=int, default=20)
    v.add_argument("--guidance", type=float, default=3.5)
    _add_device_options(v)
    v.add_argument("--json", action="store_true")
    v.add_argument("--grid", default=None, help="PNG grid: one row per variant, same prompts and seeds")
    v.set_defaults(run=_cmd_eval)
    return parser


def _add_device_options(parser) -> None:
    """Where and in what a pipeline runs (generate, bench, eval): kernels, device, dtype."""
    parser.add_argument("--backend", default=None,
                        help="auto | reference | cpu | triton (default: $BITFLUX_BACKEND, else auto)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help=DTYPE_HELP)


def _add_run_options(parser) -> None:
    """How generate and bench run the pipeline: kernels, device, activations, packing, graphs, dtype,
    offloading."""
    _add_device_options(parser)
    parser.add_argument("--activations", default=None, choices=ACTIVATIONS, help=ACTIVATIONS_HELP)
    parser.add_argument("--packing", default=None, choices=FORMATS,
                        help="repack the ternary codes in memory (default: as stored; "
                             "tq1: 20%% fewer weight bytes, tq2: faster on a CPU)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None, help=CUDA_GRAPH_HELP)
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument("--offload", action="store_true", help=OFFLOAD_HELP)


def main(argv: list[str] | None = None) -> int:
    # transformers warns about optional vision packages at import; users see only bitflux's own lines.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Huge pages for torch's large CPU tensors, on Linux: 2 MB pages instead of a page fault per 4 KB of every
    # fresh activation or weight buffer (torch 2.13 reads this when it first allocates a large block, not at
    # import: measured). Quantizing ran 1.6-1.8x faster, a FLUX.1-dev forward peaked 1.1-1.6 GB lower at the
    # same speed (BENCHMARKS.md). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so temporary outputs are removed on the way out.
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    showwarning, warnings.showwarning = warnings.showwarning, _warning_line
    try:
        args = build_parser().parse_args(argv)  # torch's import (seconds) inside: a Ctrl-C there is caught too
        args.run(args)
    except BitfluxError as exc:
        print(f"bitflux: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitflux: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`bitflux inspect ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail
        return 1
    except OSError as exc:  # a path the system will not read or write as asked (permissions, a folder for a file)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"bitflux: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = showwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a line of the command's own ("bitflux: ..."), not Python's file:line and source line."""
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
