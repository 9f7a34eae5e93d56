"""`bitflux bench`: full precision vs ternary with the same prompts and seeds. Each variant runs in a child
process of its own, so the peak memory it reports (RSS on CPU, max_memory_allocated on CUDA) is its own. As
`bitflux generate` does, the prompts are encoded first by the text encoders alone, which are gone before the
pipeline loads: the peak is the generation's (transformer, activations, VAE), not the text encoders'."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from .errors import BitfluxError

VARIANTS = ("fp", "ternary")
# (label, result key, unit factor): what the table prints and the chart draws, and the ratios' keys.
MEASURES = (("transformer step (ms)", "transformer_step_s", 1e3), ("image (s)", "image_s", 1),
            ("peak memory (MB)", "peak_memory_bytes", 1 / 2**20),
            ("transformer weights (MB)", "transformer_weight_bytes", 1 / 2**20))
REPEATS = 2  # timed generations a variant (its best counts), after one warm-up
_PROGRESS_MARK = "bitflux-bench: batch generated"  # a child's stderr line per batch, for the parent's bar
UNSTEADY = 1.25  # a variant's median step over its best above which the table says timings varied
PROMPTS = ("a red circle", "two blue squares", "a green triangle to the left of a yellow circle")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def weight_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def warm_up_steps(pipe, height: int, width: int) -> int:
    """One step, or two where the scheduler's schedule of one step is NaN (a shift_terminal stretches [1.0] by
    1 / 0), which generate refuses: the warm-up's images are thrown away, its shapes are what counts."""
    from .pipeline import finite_schedule, image_tokens

    return 1 if finite_schedule(pipe.scheduler, image_tokens(pipe, height, width), 1) else 2


def measure_variant(model: str | None, variant: str, device: str = "cpu", steps: int = 20, backend: str = "auto",
                    size: tuple[int, int] | None = None, cuda_graph: bool = False, compile: bool = False,
                    activations: str | None = None, packing: str | None = None, dtype: str | None = None,
                    offload: bool = False, repeats: int = REPEATS, on_generation=None) -> dict:
    """Time and memory of one variant in this process (call it in a fresh process for honest peaks).
    on_generation() after each batch generated (the warm-up and each repeat): a child's progress."""
    from .calibrate.memory import peak_resident_bytes, reset_peak_resident
    from .kernels import use_backend
    from .linear import TernaryLinear
    from .pipeline import (
        accelerate_transformer,
        default_image_size,
        encode_prompts,
        generate,
        load_variants,
        resolve_pipeline_path,
        resolved_dtype,
        trim_heap,
    )
    from .surgery import set_activations, set_packing

    prompts = list(PROMPTS)
    seeds = list(range(len(prompts)))
    start = time.perf_counter()
    embeddings = encode_prompts(resolve_pipeline_path(model), prompts, device, dtype)
    encode_seconds = time.perf_counter() - start
    fp, ternary = load_variants(model, device, want_fp=variant == "fp", want_ternary=variant == "ternary",
                                progress=False, dtype=dtype, offload=offload, text_encoders=False)
    pipe = fp if variant == "fp" else ternary
    if activations and variant == "ternary":
        set_activations(pipe.transformer, activations)
    if packing and variant == "ternary":
        set_packing(pipe.transformer, packing)
    accelerate_transformer(pipe, cuda_graph=cuda_graph, compile=compile)
    width, height = size or default_image_size(pipe)
    step_seconds: list[float] = []
    started = {}

    def before(*_):
        _sync(device)
        started["t"] = time.perf_counter()

    def after(*_):
        _sync(device)
        step_seconds.append(time.perf_counter() - started["t"])

    handles = [pipe.transformer.register_forward_pre_hook(before), pipe.transformer.register_forward_hook(after)]
    text = {"embeddings": embeddings, "height": height, "width": width, "progress": False}
    with use_backend(backend):
        # Warm-up at the timed batch size: kernels that tune per shape (Triton) do so here, and CUDA graphs
        # are captured, outside the timings and before the peak-memory reset.
        generate(pipe, prompts, seeds, steps=warm_up_steps(pipe, height, width), **text)
        if on_generation:
            on_generation()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        gc.collect()
        trim_heap()  # glibc's heap freed while loading, handed back before the peak starts afresh
        since_warmup = reset_peak_resident()  # the encoders' and the loading's peak is not the generation's
        step_seconds.clear()
        image_seconds = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            generate(pipe, prompts, seeds, steps=steps, **text)
            _sync(device)
            image_seconds.append((time.perf_counter() - start) / len(prompts))
            if on_generation:
                on_generation()
    for handle in handles:
        handle.remove()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_resident_bytes()
    torch_dtype = resolved_dtype(dtype, device)
    return {"variant": variant, "device": device, "dtype": str(torch_dtype).removeprefix("torch."),
            "offload": offload, "size": [width, height], "steps": steps, "batch": len(prompts),
            "prompt_encoding_s": encode_seconds, "transformer_step_s": min(step_seconds), "image_s": min(image_seconds),
            "transformer_step_median_s": statistics.median(step_seconds),
            "peak_memory_bytes": peak, "peak_memory_kind": "cuda_max_allocated" if device.startswith("cuda")
            else "process_peak_rss_since_warmup" if since_warmup else "process_peak_rss",
            "transformer_weight_bytes": weight_bytes(pipe.transformer),
            "packing": sorted({m.packing for m in pipe.transformer.modules() if isinstance(m, TernaryLinear)})}


def run_bench(model: str | None, device: str = "cpu", steps: int = 20, backend: str = "auto",
              size: tuple[int, int] | None = None, **options) -> dict:
    """Both variants, each in a child process; ratios are full precision / ternary (above 1: ternary wins).
    options: measure_variant's (cuda_graph, compile, activations, packing, dtype, offload)."""
    from .pipeline import check_comparable, demo_ternary_path, resolve_pipeline_path

    if model is None:
        demo_ternary_path()  # quantize and cache once here, not inside a timed child
    else:
        check_comparable(resolve_pipeline_path(model), want_fp=True)  # a bad --model fails here, not in a child
    results = {}
    # the children's own output is captured (their last line is the result): one bar for both, which moves
    # at each batch a child generates (its warm-up and its timed repeats)
    with tqdm(total=len(VARIANTS) * (1 + REPEATS), desc="bench", unit="batch", leave=False) as bar:
        for variant in VARIANTS:
            bar.set_description(f"bench: {variant} (a process of its own)")
            spec = {"model": model, "variant": variant, "device": device, "steps": steps, "backend": backend,
                    "size": size, **options}
            child = _run_child(spec, bar)
            if child.returncode != 0:
                raise BitfluxError(f"benchmark of the {variant} variant failed: {_child_error(child)}")
            results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    fp, ternary = results["fp"], results["ternary"]
    ratios = {key: fp[key] / ternary[key] for _, key, _ in MEASURES}
    return {"model": model or "embedded demo", "backend": backend, **options, "variants": results,
            "ratios_fp_over_ternary": ratios}


def _run_child(spec: dict, bar) -> subprocess.CompletedProcess:
    """`python -m bitflux.bench SPEC`: its stdout into a file (read once it ends), its stderr read as it comes,
    the progress marks moving `bar` and the rest kept for _child_error."""
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([sys.executable, "-m", "bitflux.bench", json.dumps(spec)], stdout=out,
                                 stderr=subprocess.PIPE, text=True)
        try:
            stderr = []
            for line in child.stderr:
                if line.strip() == _PROGRESS_MARK:
                    bar.update(1)
                else:
                    stderr.append(line)
            child.wait()
        finally:
            if child.poll() is None:  # interrupted here: the child goes too
                child.kill()
                child.wait()
        out.seek(0)
        return subprocess.CompletedProcess(child.args, child.returncode, out.read(), "".join(stderr))


def _child_error(child: subprocess.CompletedProcess) -> str:
    """What a failed child said: its BitfluxError's message, else the last line of its traceback; killed by a
    signal (the kernel's out-of-memory killer, most often), that."""
    if child.returncode < 0:
        return f"killed by signal {-child.returncode} (out of memory?)"
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("bitflux.errors.BitfluxError: ", "Traceback"))]
    if errors and errors[-1].startswith("bitflux.errors.BitfluxError: "):
        return errors[-1].removeprefix("bitflux.errors.BitfluxError: ")
    return lines[-1].split("\r")[-1] if lines else "no output"


def format_bench(result: dict) -> str:
    fp, ternary = result["variants"]["fp"], result["variants"]["ternary"]
    lines = [f"model: {result['model']}, device {fp['device']} ({fp['dtype']}"
             f"{', offloaded' if fp.get('offload') else ''}), backend {result['backend']}"
             f"{', ternary activations ' + result['activations'] if result.get('activations') else ''}"
             f"{', codes packed ' + '+'.join(ternary['packing']) if ternary.get('packing') else ''}"
             f"{', CUDA graphs' if result.get('cuda_graph') else ''}"
             f"{', torch.compile' if result.get('compile') else ''}, "
             f"{fp['size'][0]}x{fp['size'][1]}, {fp['steps']} steps, batch {fp['batch']}; the prompts encoded first "
             f"(text encoders loaded, run and freed: {fp['prompt_encoding_s']:.1f} s, not in the image time)",
             f"{'':26s} {'full precision':>15s} {'ternary':>10s} {'fp / ternary':>13s}"]
    for label, key, unit in MEASURES:
        lines.append(f"{label:26s} {fp[key] * unit:15.2f} {ternary[key] * unit:10.2f} "
                     f"{result['ratios_fp_over_ternary'][key]:12.2f}x")
    # The times are each variant's best; the variants run one after the other, so other work on the machine in
    # one's window and not the other's moves the ratios (two runs here on a busy machine: 14.6x and 1.09x).
    spread = max(v["transformer_step_median_s"] / v["transformer_step_s"] for v in (fp, ternary))
    if spread > UNSTEADY:
        lines.append(f"note: a step's median time was {spread:.1f}x its best in one variant: other work on this "
                     "machine varied the timings, so compare the times with care (memory and weights hold)")
    return "\n".join(lines)


def plot_bench(result: dict, path) -> None:
    """A bar chart PNG: one panel per measure, full precision beside ternary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pipeline import save_png

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.2 * len(MEASURES), 3.2))
    for ax, (label, key, unit) in zip(axes, MEASURES):
        values = [result["variants"][v][key] * unit for v in VARIANTS]
        ax.bar(["full precision", "ternary"], values, color=["#888888", "#2a7ab9"])
        ax.set_title(f"{label}\n{result['ratios_fp_over_ternary'][key]:.2f}x", fontsize=9)
    fig.tight_layout()
    canvas = fig.canvas
    canvas.draw()
    from PIL import Image

    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    save_png(image, path)


if __name__ == "__main__":  # the child process of run_bench
    spec = json.loads(sys.argv[1])
    spec["size"] = tuple(spec["size"]) if spec["size"] else None
    print(json.dumps(measure_variant(**spec, on_generation=lambda: print(_PROGRESS_MARK, file=sys.stderr,
                                                                           flush=True))))
