"""generate / bench / eval on the embedded demo model, as a user runs them."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import cached_hub_snapshot
from PIL import Image

import bitflux
from bitflux import BitfluxError
from bitflux.cli import build_parser, main
from bitflux.kernels import backend_names, unavailable_reason

CPU_BACKENDS = [b for b in backend_names() if b != "triton" and unavailable_reason(b) is None]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_generate_writes_png_of_the_asked_size(tmp_path, capsys, backend):
    out = tmp_path / "a.png"
    code, _, err = _run(capsys, "generate", "a red circle", "--steps", "2", "--size", "64x48", "--backend",
                        backend, "-o", out)
    assert code == 0, err
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (64, 48)


def _images(capsys, tmp_path, option, values, *extra):
    """{value: the demo's image of "a red circle" generated with `option value`} as float arrays."""
    images = {}
    for value in values:
        out = tmp_path / f"{value}.png"
        code, _, err = _run(capsys, "generate", "a red circle", "--steps", "2", option, value, *extra, "-o", out)
        assert code == 0, err
        images[value] = np.asarray(Image.open(out)).astype(float)
    return images


def test_generate_with_other_activations(tmp_path, capsys):
    """The shipped a16 model run with fp8 activations (the reference's e4m3 numerics on a CPU): an image
    close to, not equal to, the a16 one."""
    images = _images(capsys, tmp_path, "--activations", ("a16", "fp8"), "--backend", "reference")
    assert 0 < np.abs(images["a16"] - images["fp8"]).mean() < 8


def test_generate_with_codes_repacked_to_tq1(tmp_path, capsys):
    """--packing tq1 holds the shipped tq2 codes in 1.6 bits: the same codes, the same image."""
    images = _images(capsys, tmp_path, "--packing", ("tq2", "tq1"))
    assert np.array_equal(images["tq2"], images["tq1"])


def test_generate_in_bf16(tmp_path, capsys):
    """--dtype: the unquantized parts in bf16 (the default on a GPU); on a CPU an image close to fp32's."""
    images = _images(capsys, tmp_path, "--dtype", ("fp32", "bf16"))
    assert np.abs(images["fp32"] - images["bf16"]).mean() < 8


def test_accelerate_transformer_compiles_it():
    """--compile: the pipeline's transformer is torch.compile'd (tests/test_surgery.py checks what the
    compiled ternary transformer computes)."""
    import torch

    from bitflux.pipeline import accelerate_transformer

    pipe = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    accelerate_transformer(pipe)
    assert isinstance(pipe.transformer, torch.nn.Linear)
    accelerate_transformer(pipe, compile=True)
    assert isinstance(pipe.transformer, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(BitfluxError, match="choose one"):
        accelerate_transformer(pipe, cuda_graph=True, compile=True)


def test_a_deep_transformer_is_compiled_a_block_class_at_a_time():
    """--compile on a transformer of many blocks (FLUX.1: 57) compiles each block class once and reuses the
    code for every block of it (regional compilation: seconds, not minutes, at FLUX.1-dev's size); the module
    stays in place and computes what it did eagerly."""
    from conftest import TINY_CONFIG, build_tiny, tiny_inputs

    from bitflux import TernaryConfig, fuse_projections, quantize_
    from bitflux.kernels import use_backend
    from bitflux.pipeline import REGIONAL_COMPILE_MIN_BLOCKS, accelerate_transformer

    config = {**TINY_CONFIG, "num_layers": REGIONAL_COMPILE_MIN_BLOCKS // 2,
              "num_single_layers": REGIONAL_COMPILE_MIN_BLOCKS // 2}
    model = build_tiny(config=config)
    quantize_(model, TernaryConfig())
    fuse_projections(model)
    inputs = tiny_inputs(config)
    with torch.no_grad(), use_backend("reference"):
        eager = model(**inputs)[0]
        pipe = SimpleNamespace(transformer=model)
        accelerate_transformer(pipe, compile=True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = pipe.transformer(**inputs)[0]
    assert pipe.transformer is model
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    # one graph per block class, and one more for the first single block (its input is a slice of a cat)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_default_dtype_is_bf16_on_gpus_fp32_on_cpus():
    import torch

    from bitflux import BitfluxError
    from bitflux.pipeline import default_dtype, resolved_dtype

    assert default_dtype("cuda") == default_dtype("cuda:1") == torch.bfloat16
    assert default_dtype("cpu") == torch.float32
    assert resolved_dtype("auto", "cuda") == resolved_dtype(None, "cuda") == torch.bfloat16
    assert resolved_dtype("fp16", "cpu") == resolved_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(BitfluxError, match="one of bf16, fp16, fp32, got 'half'"):
        resolved_dtype("half", "cpu")


def test_same_seed_same_image_and_compare(tmp_path, capsys):
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for path in paths:
        assert _run(capsys, "generate", "two blue squares", "--steps", "3", "--seed", "7", "-o", path)[0] == 0
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))
    other = tmp_path / "other.png"
    assert _run(capsys, "generate", "two blue squares", "--steps", "3", "--seed", "8", "-o", other)[0] == 0
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(other)))
    both = tmp_path / "both.png"
    assert _run(capsys, "generate", "a red circle", "--steps", "2", "--compare", "-o", both)[0] == 0
    assert Image.open(both).size[0] == 128


def test_prompts_encoded_first_give_the_same_images(tmp_path, capsys):
    """encode_prompts, then a pipeline without text encoders (what `bitflux generate` does, so that the text
    encoders are freed before the transformer is loaded), and the transformer released before decoding: the
    images of the whole pipeline, pixel for pixel."""
    from bitflux import demo_model_path, encode_prompts, generate
    from bitflux.pipeline import load_variants

    prompts, seeds = ["a red cube", "two blue balls"], [0, 1]
    whole = load_variants(None, want_fp=False, progress=False)[1]
    expected = generate(whole, prompts, seeds, steps=3, progress=False)
    embeddings = encode_prompts(demo_model_path(), prompts)
    without = load_variants(None, want_fp=False, progress=False, text_encoders=False)[1]
    assert without.text_encoder is None and without.text_encoder_2 is None and without.tokenizer_2 is None
    images = generate(without, prompts, seeds, steps=3, progress=False, embeddings=embeddings)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    # the transformer released before the VAE decodes (what the CLI does too): the same images
    released = load_variants(None, want_fp=False, progress=False, text_encoders=False)[1]
    images = generate(released, prompts, seeds, steps=3, progress=False, embeddings=embeddings,
                      release_transformer=True)
    assert released.transformer is None
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    with pytest.raises(ValueError, match="one embedding per prompt"):
        generate(without, prompts[:1], seeds[:1], steps=1, embeddings=embeddings)
    with pytest.raises(ValueError, match="one embedding per prompt"):  # the pooled ones count too
        generate(without, prompts, seeds, steps=1, embeddings={**embeddings, "pooled_prompt_embeds":
                                                                 embeddings["pooled_prompt_embeds"][:1]})
    # embeddings made in another dtype are taken in the transformer's (diffusers would fail on them)
    narrow = {key: value.bfloat16() for key, value in embeddings.items()}
    assert generate(without, prompts[:1], seeds[:1], steps=1, embeddings={k: v[:1] for k, v in narrow.items()})
    with pytest.raises(BitfluxError, match="a list of prompts"):
        encode_prompts(demo_model_path(), "a red cube")
    out = tmp_path / "cli.png"  # the CLI's image is the whole pipeline's too (one prompt: a batch of one)
    assert _run(capsys, "generate", prompts[0], "--steps", "3", "--seed", "0", "-o", out)[0] == 0
    alone = generate(whole, prompts[:1], seeds[:1], steps=3, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(alone))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "generate", "a", "--device", "cuda", "--steps", "1", "-o", "x.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err, err


@pytest.mark.parametrize("argv,graphs", [
    (["generate", "a", "--device", "cuda"], True),  # eager forwards are bound by launches: graphs by default
    (["bench", "--device", "cuda"], True),
    (["generate", "a", "--device", "cuda", "--no-cuda-graph"], False),
    (["generate", "a", "--device", "cuda", "--offload"], False),  # what cannot be captured runs eager, no error
    (["bench", "--device", "cuda", "--compile"], False),
    (["generate", "a", "--device", "cuda", "--cuda-graph"], True),
    (["generate", "a"], False),
    (["bench", "--no-cuda-graph"], False),
])
def test_cuda_graphs_are_the_default_where_they_can_run(monkeypatch, argv, graphs):
    from bitflux.cli import _check_common, build_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = build_parser().parse_args(argv + ["-o", "x.png"] * (argv[0] == "generate"))
    _check_common(args)
    assert args.cuda_graph is graphs


def test_the_backend_variable_is_the_backend_option_default(monkeypatch, capsys):
    """BITFLUX_BACKEND chooses the commands' backend as it does the library's (the option's default "auto" forced
    auto over it), and as there one that cannot run here is passed over (a notice); --backend chooses over it,
    and one named there that cannot run is refused."""
    from bitflux.cli import _check_common

    monkeypatch.setenv("BITFLUX_BACKEND", "reference")
    args = build_parser().parse_args(["generate", "a", "-o", "x.png"])
    _check_common(args)
    assert args.backend == "reference"
    args = build_parser().parse_args(["bench", "--backend", "auto"])
    _check_common(args)
    assert args.backend == "auto"
    monkeypatch.setenv("BITFLUX_BACKEND", "triton")  # set for a GPU, running on the CPU
    args = build_parser().parse_args(["generate", "a", "-o", "x.png"])
    _check_common(args)
    assert "BITFLUX_BACKEND: backend 'triton' runs on cuda tensors" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate", "a", "--size", "-16x32"], ["generate", "a", "--dtype", "fp64"],
                                  ["generat", "a"], []])
def test_argument_errors_are_one_line(capsys, argv):
    """argparse's own errors too: one line (no usage block before it), exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and "(see bitflux" in err, err


def test_a_backend_variable_for_another_device_is_said_once():
    """The CLI says that BITFLUX_BACKEND's backend runs on another device (unavailable_reason); the library then
    passes it over without warning it again. In a process of its own, where nothing was said yet."""
    script = """
import warnings, torch, bitflux
from bitflux.kernels import unavailable_reason
print(unavailable_reason("triton", "cpu"))
layer = bitflux.TernaryLinear.from_linear(torch.nn.Linear(64, 8))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layer(torch.randn(2, 64))
print(len(caught))
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # no CUDA, no Triton here
    result = subprocess.run([sys.executable, "-c", script], env={**env, "BITFLUX_BACKEND": "triton"},
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.stdout.splitlines() == ["backend 'triton' runs on cuda tensors, not cpu", "0"], result.stderr


def test_an_empty_backend_variable_is_unset(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("BITFLUX_BACKEND", "")
    code, _, err = _run(capsys, "generate", "a", "--steps", "1", "-o", tmp_path / "x.png")
    assert code == 0 and "backend" not in err, err


def test_no_prompts_is_one_line(tmp_path):
    pipe = bitflux.load_pipeline(bitflux.demo_model_path())
    with pytest.raises(BitfluxError, match="generate: no prompts"):
        bitflux.generate(pipe, [], [])
    with pytest.raises(BitfluxError, match="encode_prompts: no prompts"):
        bitflux.encode_prompts(bitflux.demo_model_path(), [])


def test_an_unknown_backend_variable_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("BITFLUX_BACKEND", "magic")
    code, _, err = _run(capsys, "generate", "a", "-o", tmp_path / "x.png")
    assert code == 2 and "unknown backend 'magic'" in err and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv,words", [
    (["generate", "", "-o", "x.png"], "prompt is empty"),
    (["generate", "a", "--size", "60x64", "-o", "x.png"], "multiples of 16"),
    (["generate", "a", "--size", "big", "-o", "x.png"], "--size"),
    (["generate", "a", "--steps", "0", "-o", "x.png"], "--steps"),
    (["generate", "a", "--backend", "triton", "-o", "x.png"], "runs on cuda tensors"),
    (["generate", "a", "--backend", "magic", "-o", "x.png"], "unknown backend"),
    (["generate", "a", "--model", "nobody/nothing-here", "-o", "x.png"], "not in the local Hugging Face cache"),
    (["generate", "a", "--model", "/no/such/folder", "-o", "x.png"], "no such model folder"),
    (["generate", "a", "-o", "x.jpg"], ".png"),
    (["generate", "a", "--cuda-graph", "-o", "x.png"], "--cuda-graph needs --device cuda"),
    (["bench", "--cuda-graph"], "--cuda-graph needs --device cuda"),
    (["generate", "a", "--offload", "-o", "x.png"], "--offload needs --device cuda"),
    (["bench", "--offload"], "--offload needs --device cuda"),
    (["generate", "a", "--offload", "--device", "cuda", "--compare", "-o", "x.png"], "one pipeline at a time"),
    (["generate", "a", "--offload", "--device", "cuda", "--cuda-graph", "-o", "x.png"], "not with --cuda-graph"),
    (["generate", "a", "--offload", "--device", "cuda", "--compile", "-o", "x.png"], "not with --cuda-graph or --compile"),
    (["bench", "--device", "cuda", "--cuda-graph", "--compile"], "choose one"),
    (["generate", "a", "--device", "tpu", "-o", "x.png"], "unknown --device 'tpu'"),
    (["generate", "a", "-o", "no/such/x.png"], "no such folder for x.png"),
    (["bench", "--plot", "no/such/p.png"], "no such folder for p.png"),
    (["generate", "a", "--seed", "99999999999999999999", "-o", "x.png"], "--seed must be between"),
    (["generate", "a", "--seed", "-1", "-o", "x.png"], "--seed must be between"),
    (["generate", "a", "--steps", "1000000000000000000000", "-o", "x.png"], "--steps must be between 1 and"),
    (["generate", "a", "--guidance", "nan", "-o", "x.png"], "--guidance must be a finite number"),
    (["generate", "a", "--guidance", "1e39", "-o", "x.png"], "within float32's range"),
    (["eval", "--seeds", "0", "-5"], "--seeds must be between"),
    (["eval", "--variants", "fp,absmean,fp"], "a variant given twice"),
    (["eval", "--seeds", "9223372036854775000"], "--seeds must be between 0 and 2^32 - 1"),
    (["eval", "--seeds", "3", "3"], "a seed given twice"),
    (["eval", "--variants", ""], "--variants is empty"),
    (["eval", "--variants", "fp,some/folder"], "some/folder: not a pipeline folder (no model_index.json)"),
    (["eval", "--variants", "absmean-huge"], "unknown variant option"),
    (["eval", "--variants", "fp,calibrated-int4"], "unknown variant 'calibrated-int4'"),
    (["generate", "a", "--size", "8192x64", "-o", "x.png"], "at most 4096 pixels a side"),
    (["generate", "a", "--size", "2912x2912", "-o", "x.png"], "timestep schedule of 1 step is NaN for 33124"),
    (["generate", "a", "-o", ".png"], "output must be a .png file"),
    (["bench", "--plot", "p.jpg"], "output must be a .png file"),
    (["eval", "--per-category", "0"], "1 to 48 prompts a category"),
    (["eval", "--per-category", "49"], "1 to 48 prompts a category"),
    (["eval", "--grid", "g.jpg"], "output must be a .png file"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if argv[0] == "generate" and "--steps" not in argv:
        argv += ["--steps", "1"]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jpg"))


@pytest.mark.parametrize("shift_terminal,largest", [(None, 2880), (0.1, 1360)])
def test_the_largest_size_allowed_keeps_the_sigmas_finite(shift_terminal, largest):
    """check_timestep_shift lets through the sizes whose schedule (the demo scheduler's, as FluxPipeline makes
    it) is finite, up to the largest it names, and refuses the next: e^mu past float32 (about 2900 px), or with a
    shift_terminal every sigma rounded to 1, which its stretch divides by zero (from mu ~ 20)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from bitflux.pipeline import check_timestep_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(bitflux.demo_model_path() / "scheduler",
                                                                shift_terminal=shift_terminal)
    pipe = SimpleNamespace(scheduler=scheduler, vae_scale_factor=8)
    config = scheduler.config

    def sigmas(side: int) -> torch.Tensor:
        mu = calculate_shift((side // 16) ** 2, config.base_image_seq_len, config.max_image_seq_len,
                             config.base_shift, config.max_shift)
        with np.errstate(all="ignore"):
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=mu)
        return scheduler.sigmas

    check_timestep_shift(pipe, largest, largest, 20)
    assert torch.isfinite(sigmas(largest)).all()
    with pytest.raises(BitfluxError, match=f"at most about {largest}x{largest}"):
        check_timestep_shift(pipe, largest + 16, largest + 16, 20)
    assert not torch.isfinite(sigmas(largest + 16)).all()


def test_bench_warms_up_on_a_schedule_that_is_not_nan():
    """bench's warm-up takes one step, two where a shift_terminal makes a schedule of one step NaN ([1.0]
    stretched by 1 / 0: refused by generate at every size, with more steps named as the way out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bitflux.bench import warm_up_steps
    from bitflux.pipeline import check_timestep_shift

    for shift_terminal, steps in ((None, 1), (0.1, 2)):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(bitflux.demo_model_path() / "scheduler",
                                                                    shift_terminal=shift_terminal)
        assert warm_up_steps(SimpleNamespace(scheduler=scheduler, vae_scale_factor=8), 64, 64) == steps
    with pytest.raises(BitfluxError, match="at no size with this many steps: take more"):
        check_timestep_shift(SimpleNamespace(scheduler=scheduler, vae_scale_factor=8), 64, 64, 1)


def test_eval_compares_only_what_is_comparable_before_generating(tmp_path, capsys, monkeypatch):
    """With --model the shipped calibrated model (the demo's) is no default variant and is refused by name; a
    ternary --model, which eval would score as full precision, is refused; so is a variant folder that is a
    transformer alone. All before any image."""
    import bitflux.eval.runner as runner
    from bitflux.pipeline import demo_ternary_path

    monkeypatch.setattr(runner, "evaluate_variants", lambda *a, **k: pytest.fail("generated"))
    ternary = demo_ternary_path(progress=False)
    for argv, words in [(["--model", str(ternary)], "already ternary"),
                        (["--model", str(bitflux.demo_model_path()), "--variants", "fp,calibrated"],
                         "compared only with the demo"),
                        (["--variants", f"fp,{ternary / 'transformer'}"], "not a pipeline folder")]:
        code, _, err = _run(capsys, "eval", *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_eval_json_is_strict_json():
    """One seed's standard error and identical images' PSNR are undefined: null, not NaN or Infinity."""
    import json

    from bitflux.eval.runner import results_json

    text = results_json({"fp": {"overall_stderr": float("nan"), "vs_fp": {"psnr": float("inf")}, "grid": None}},
                        {"steps": 4})
    assert json.loads(text) == {"fp": {"overall_stderr": None, "vs_fp": {"psnr": None}, "settings": {"steps": 4}}}


def test_an_unwritable_output_folder_is_refused_before_the_run(tmp_path, monkeypatch):
    from bitflux.pipeline import check_png_path

    monkeypatch.setattr("os.access", lambda path, mode: False)  # a read-only file system (root writes elsewhere)
    with pytest.raises(BitfluxError, match="its folder is not writable"):
        check_png_path(tmp_path / "x.png")


def test_bench_refuses_a_ternary_folder_before_its_child_processes(capsys, monkeypatch):
    import subprocess

    from bitflux.pipeline import demo_ternary_path

    model = demo_ternary_path(progress=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a child started"))
    code, _, err = _run(capsys, "bench", "--model", model)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "already ternary" in err, err


def test_a_failed_bench_child_is_reported_by_its_error_not_its_progress_bar():
    from subprocess import CompletedProcess

    from bitflux.bench import _child_error

    bar = "Loading pipeline components...: 100%|##########| 7/7 [00:01<00:00]"
    raised = f"{bar}\nTraceback (most recent call last):\n  File ...\nbitflux.errors.BitfluxError: q1 is ternary\n"
    assert _child_error(CompletedProcess([], 1, "", raised)) == "q1 is ternary"
    assert _child_error(CompletedProcess([], -9, "", bar)) == "killed by signal 9 (out of memory?)"
    crashed = f"{bar}\nTraceback (most recent call last):\n  File ...\nRuntimeError: CUDA error\n"
    assert _child_error(CompletedProcess([], 1, "", crashed)) == "RuntimeError: CUDA error"


def test_compare_on_a_ternary_folder_is_refused_before_encoding(tmp_path, capsys, monkeypatch):
    import bitflux.pipeline
    from bitflux.pipeline import demo_ternary_path

    monkeypatch.setattr(bitflux.pipeline, "encode_prompts", lambda *a, **k: pytest.fail("encoded first"))
    code, _, err = _run(capsys, "generate", "a", "--compare", "--model", demo_ternary_path(progress=False),
                        "-o", tmp_path / "x.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "already ternary" in err, err


def test_bench_json(capsys, monkeypatch):
    import bitflux.bench
    from tqdm import tqdm

    moves = []

    class CountingBar(tqdm):  # the bar moves with each batch the children generate, not only between them
        def update(self, n=1):
            moves.append(n)
            return super().update(n)

    monkeypatch.setattr(bitflux.bench, "tqdm", CountingBar)
    code, out, err = _run(capsys, "bench", "--steps", "2", "--packing", "tq1", "--json")
    assert code == 0, err
    assert sum(moves) == len(bitflux.bench.VARIANTS) * (1 + bitflux.bench.REPEATS)
    result = json.loads(out)
    for variant in ("fp", "ternary"):
        entry = result["variants"][variant]
        assert entry["transformer_step_s"] > 0 and entry["image_s"] > 0 and entry["peak_memory_bytes"] > 0
        assert entry["prompt_encoding_s"] > 0
        if Path("/proc/self/clear_refs").exists():  # Linux: the peak starts afresh after the warm-up
            assert entry["peak_memory_kind"] == "process_peak_rss_since_warmup"
    ratios = result["ratios_fp_over_ternary"]
    assert set(ratios) == {"transformer_step_s", "image_s", "peak_memory_bytes", "transformer_weight_bytes"}
    assert ratios["transformer_weight_bytes"] > 5  # fp32 weights vs 1.6-bit codes plus 32-bit rest
    assert result["variants"]["ternary"]["packing"] == ["tq1"] and result["variants"]["fp"]["packing"] == []
    assert result["variants"]["fp"]["dtype"] == "float32"  # the default on a CPU
    assert all(v["transformer_step_median_s"] >= v["transformer_step_s"] for v in result["variants"].values())
    from bitflux.bench import format_bench

    for entry in result["variants"].values():  # steady timings, then a busy machine's in one variant
        entry["transformer_step_median_s"] = entry["transformer_step_s"]
    assert "note: a step's median time" not in format_bench(result)
    result["variants"]["fp"]["transformer_step_median_s"] = 2 * result["variants"]["fp"]["transformer_step_s"]
    assert "2.0x its best in one variant" in format_bench(result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_ranks(world: int) -> dict:
    argv = [sys.executable, "-m", "bitflux.cli", "eval", "--variants", "fp,absmean", "--per-category", "1",
            "--steps", "2", "--json"]
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen(argv, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    assert all(not o[0].strip() for o in outputs[1:])  # only rank 0 reports
    return json.loads(outputs[0][0])


def test_eval_two_gloo_ranks_equal_one():
    one, two = _eval_ranks(1), _eval_ranks(2)
    assert one["absmean"]["settings"]["steps"] == 2 and one["absmean"]["settings"]["seeds"] == [0]
    for variant in one:
        assert one[variant]["categories"] == two[variant]["categories"]
        assert one[variant]["overall"] == two[variant]["overall"]
    # Ranks batch different prompts together; batched float sums may move a pixel by one level (on an AMD EPYC:
    # 0.0016 dB of 12.6).
    assert one["absmean"]["psnr"] == pytest.approx(two["absmean"]["psnr"], rel=1e-3)
    assert one["absmean"]["ssim"] == pytest.approx(two["absmean"]["ssim"], rel=1e-3)
    assert one["fp"]["n_images"] == 6 and "psnr" in one["absmean"]


def test_generate_with_a_lora(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    lora = {}
    for block in range(2):
        for layer, (n, k) in {"attn.to_q": (256, 256), "ff.net.2": (256, 1024)}.items():
            prefix = f"transformer.transformer_blocks.{block}.{layer}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(4, k, generator=g) * 0.3
            lora[f"{prefix}.lora_B.weight"] = torch.randn(n, 4, generator=g) * 0.3
    clip = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 128, generator=g),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(256, 4, generator=g)}
    lora.update(clip)  # CLIP's pair adapts the prompt's encoding; T5's is left out, as diffusers leaves it
    lora["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 8)
    lora["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(8, 4)
    path = tmp_path / "style:v2.safetensors"  # a colon of its own: FILE[:STRENGTH] splits at the last one
    save_file(lora, str(path))
    images = {}
    for name, extra in {"plain": [], "zero": ["--lora", f"{path}:0"], "full": ["--lora", str(path)]}.items():
        out = tmp_path / f"{name}.png"
        code, _, err = _run(capsys, "generate", "a red circle", "--steps", "2", *extra, "-o", out)
        assert code == 0, err
        assert ("1 text-encoder LoRA pairs left out (T5's" in err) == bool(extra)
        images[name] = np.asarray(Image.open(out))
    assert np.array_equal(images["plain"], images["zero"])
    assert not np.array_equal(images["plain"], images["full"])
    for key in clip:  # without CLIP's pair, another image
        lora[key] = torch.zeros_like(lora[key])
    save_file(lora, str(path))
    out = tmp_path / "no_clip.png"
    assert _run(capsys, "generate", "a red circle", "--steps", "2", "--lora", str(path), "-o", out)[0] == 0
    assert not np.array_equal(np.asarray(Image.open(out)), images["full"])
    (tmp_path / "clip").mkdir()
    save_file(clip, str(tmp_path / "clip" / "clip.safetensors"))  # CLIP's pairs alone: the prompt's encoding
    out = tmp_path / "clip.png"
    assert _run(capsys, "generate", "a red circle", "--steps", "2", "--lora", str(tmp_path / "clip"), "-o", out)[0] == 0
    assert not np.array_equal(np.asarray(Image.open(out)), images["plain"])
    t5 = {key: value for key, value in lora.items() if key.startswith("lora_te2_")}
    save_file(t5, str(tmp_path / "clip" / "clip.safetensors"))  # T5's alone: nothing would apply it
    code, _, err = _run(capsys, "generate", "a", "--lora", str(tmp_path / "clip"), "-o", tmp_path / "t5.png")
    assert code == 2 and "clip.safetensors: the LoRA has no pair" in err and "its 1 pairs are T5's" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t5.png").exists()  # before any encoding
    code, _, err = _run(capsys, "generate", "a", "--lora", str(tmp_path / "missing.safetensors"), "-o",
                        tmp_path / "x.png")
    assert code == 2 and "no such LoRA file" in err
    for strength in ("nan", "1e39"):  # 1e39: float32's inf, a black image
        code, _, err = _run(capsys, "generate", "a", "--lora", f"{path}:{strength}", "-o", tmp_path / "x.png")
        assert code == 2 and "finite" in err and not (tmp_path / "x.png").exists()
    for strength in ("strong", "1_0"):  # float() would take 1_0 for 10
        code, _, err = _run(capsys, "generate", "a", "--lora", f"{path}:{strength}", "-o", tmp_path / "x.png")
        assert code == 2 and f"its strength '{strength}' is not a number" in err
    code, _, err = _run(capsys, "generate", "a", "--lora", str(tmp_path / "style:v3.safetensors"), "-o",
                        tmp_path / "x.png")
    assert code == 2 and "style:v3.safetensors: no such LoRA file" in err
    save_file(lora, str(tmp_path / "other.safetensors"))
    code, _, err = _run(capsys, "generate", "a", "--lora", str(tmp_path), "-o", tmp_path / "x.png")
    assert code == 2 and f"holds 2 .safetensors files: name one ({tmp_path}/other.safetensors, " in err


def test_offload_needs_cuda():
    import bitflux

    with pytest.raises(bitflux.BitfluxError, match="CUDA"):
        bitflux.load_pipeline(bitflux.demo_model_path(), offload=True)


def test_loading_a_pipeline_passes_diffusers_the_keyword_it_wants():
    """diffusers from 0.40 warns (FutureWarning) of `torch_dtype`."""
    import warnings

    from bitflux.pipeline import demo_ternary_path, load_pipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype", category=FutureWarning)
        load_pipeline(demo_ternary_path(progress=False))


def test_loaded_transformers_compute_in_the_dtype_a_pipeline_for_the_device_does():
    """bitflux.load_transformer's default dtype is load_pipeline's (fp32 on a CPU), so that it drops into a
    FluxPipeline loaded for the same device; a ternary pipeline is not quantized twice; a released transformer
    is named as such."""
    import torch

    from bitflux import BitfluxError, load_transformer
    from bitflux.pipeline import (
        demo_ternary_path,
        generate,
        load_pipeline,
        quantize_pipeline,
    )

    path = demo_ternary_path(progress=False)
    assert load_transformer(path).dtype == torch.float32
    assert load_transformer(path, dtype="bf16").dtype == torch.bfloat16
    pipe = load_pipeline(path)
    with pytest.raises(BitfluxError, match="ternary already"):
        quantize_pipeline(pipe)
    generate(pipe, ["a red circle"], [0], steps=1, progress=False, release_transformer=True)
    with pytest.raises(BitfluxError, match="no transformer"):
        generate(pipe, ["a red circle"], [0], steps=1, progress=False)


def test_a_kernel_that_cannot_run_here_is_said_before_the_run(tmp_path, capsys, monkeypatch):
    """Without the compiled C kernel (no compiler at install): `--backend cpu` is an error naming why; the
    default says it in one line before the run (not as a warning inside the progress bar) and goes on with the
    reference backend."""
    import warnings

    from bitflux import kernels

    monkeypatch.setitem(kernels._loaded, "cpu", None)
    monkeypatch.setitem(kernels._unavailable, "cpu", "compiled library not found")
    code, _, err = _run(capsys, "generate", "a red circle", "--backend", "cpu", "-o", tmp_path / "a.png")
    assert code == 2 and err.strip() == ("bitflux: error: backend 'cpu' is not available here "
                                         "(compiled library not found)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _, err = _run(capsys, "generate", "a red circle", "--steps", "1", "-o", tmp_path / "a.png")
    assert code == 0 and err.startswith("bitflux: backend 'cpu' is not available here (compiled library not found); "
                                        "running on the reference backend\n")


def test_a_pipeline_whose_weights_do_not_fit_its_config_is_one_line(tmp_path):
    """diffusers leaves what a component's files lack on the meta device, which failed later as a traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    from bitflux import BitfluxError, demo_model_path
    from bitflux.pipeline import load_pipeline

    shutil.copytree(demo_model_path(), tmp_path / "pipe")
    for file in (tmp_path / "pipe" / "transformer").glob("*.safetensors"):
        weights = load_file(file)
        if weights.pop("single_transformer_blocks.1.proj_out.weight", None) is not None:
            save_file(weights, file)
    with pytest.raises(BitfluxError, match="transformer: its weights do not fit its config .*proj_out.weight"):
        load_pipeline(tmp_path / "pipe")


def test_a_transformer_alone_as_model_says_what_generation_needs(tmp_path, capsys):
    from bitflux import demo_model_path

    code, _, err = _run(capsys, "generate", "a red circle", "--model", demo_model_path() / "transformer",
                        "-o", tmp_path / "a.png")
    assert code == 2 and "a transformer alone has no text encoders nor VAE" in err


def _demo_copy(tmp_path, name, class_name, **transformer_config):
    """The demo pipeline folder as another FLUX.1 pipeline class names it (its files linked, not copied)."""
    import shutil

    from bitflux import demo_model_path

    folder = tmp_path / name
    shutil.copytree(demo_model_path(), folder, copy_function=os.link)
    for path, changes in ((folder / "model_index.json", {"_class_name": class_name}),
                          (folder / "transformer" / "config.json", transformer_config)):
        path.unlink()  # a link: written anew, the demo's own file untouched
        path.write_text(json.dumps({**json.loads((demo_model_path() / path.relative_to(folder)).read_text()),
                                    **changes}))
    return folder


@pytest.mark.parametrize("class_name,loaded", [("FluxKontextPipeline", "FluxKontextPipeline"),
                                               ("FluxFillPipeline", "FluxFillPipeline"),
                                               ("FluxControlNetPipeline", "FluxPipeline"),  # needs a controlnet
                                               ("Flux2Pipeline", "FluxPipeline"), ("FluxNoSuchPipeline", "FluxPipeline")])
def test_a_folder_loads_as_the_flux1_pipeline_class_it_names(tmp_path, class_name, loaded):
    pipe = bitflux.load_pipeline(str(_demo_copy(tmp_path, "pipe", class_name)), text_encoders=False)
    assert type(pipe).__name__ == loaded


def test_generate_and_the_teacher_make_images_from_text_with_any_flux1_class(tmp_path):
    """bitflux.generate and calibration's teacher run a Kontext or Img2Img pipeline as FluxPipeline: at the asked
    size (Kontext's own call makes 1024 x 1024), without the image Img2Img's own call wants."""
    from bitflux.calibrate.teacher import collect

    images, records = [], []
    for name in ("FluxKontextPipeline", "FluxImg2ImgPipeline", "FluxPipeline"):
        folder = _demo_copy(tmp_path, name, name)
        pipe = bitflux.load_pipeline(folder)
        assert type(pipe).__name__ == name
        for release in (False, True):
            image = bitflux.generate(pipe, ["a red circle"], [0], steps=1, height=32, width=48, progress=False,
                                     release_transformer=release)[0]
            images.append(np.asarray(image))
        assert pipe.transformer is None  # released
        pipe = bitflux.load_pipeline(folder)
        data = collect(pipe, ["a red circle"], samples=1, num_inference_steps=1, height=64, width=64,
                       max_sequence_length=16, progress=False)
        records.append(data.inputs["hidden_states"])
    assert images[0].shape == (32, 48, 3) and all(np.array_equal(images[0], other) for other in images[1:])
    assert records[0].shape[1] == 16 and all(torch.equal(records[0], other) for other in records[1:])


def test_text_to_image_commands_refuse_fill_and_control_pipelines_before_loading(tmp_path, capsys):
    """FLUX.1 Fill / Depth / Canny transformers take an image beside the noise: generate, eval, bench and calibration
    say so in one line at once. Folders of other FLUX.1 classes (Kontext, Img2Img) generate from text as
    FluxPipeline does."""
    fill = _demo_copy(tmp_path, "fill", "FluxFillPipeline", in_channels=384, out_channels=64)
    control = _demo_copy(tmp_path, "control", "FluxPipeline", in_channels=128, out_channels=64)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    for folder, words in ((fill, "takes 384 input channels for 64 out.* run it with diffusers' FluxFillPipeline"),
                          (control, "takes 128 input channels for 64 out.*FluxFillPipeline or FluxControlPipeline")):
        for argv in (("generate", "a red circle", "--model", folder, "-o", tmp_path / "a.png"),
                     ("eval", "--model", folder, "--per-category", "1", "--steps", "1"),
                     ("eval", "--variants", f"fp,{folder}", "--per-category", "1", "--steps", "1"),
                     ("bench", "--model", folder, "--steps", "1"),
                     ("quantize", folder, "-o", tmp_path / "out", "--calibrate", tmp_path / "prompts.txt")):
            code, _, err = _run(capsys, *argv)
            assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(words, err), (argv, err)
        assert not (tmp_path / "a.png").exists() and not (tmp_path / "out").exists()
    images = []
    for name in ("FluxKontextPipeline", "FluxImg2ImgPipeline", "FluxPipeline"):
        code, _, err = _run(capsys, "generate", "a red circle", "--model", _demo_copy(tmp_path, name, name),
                            "--steps", "1", "--size", "32x48", "-o", tmp_path / "k.png")
        assert code == 0, err
        images.append(np.asarray(Image.open(tmp_path / "k.png")))
    assert images[0].shape == (48, 32, 3) and np.array_equal(images[0], images[2]) and np.array_equal(*images[1:])


def test_a_hub_id_in_the_cache_that_is_no_pipeline_is_one_line(tmp_path, capsys, monkeypatch):
    cached_hub_snapshot(monkeypatch, tmp_path / "hub", "someone/ink-lora")
    code, _, err = _run(capsys, "generate", "a red circle", "--model", "someone/ink-lora", "-o", tmp_path / "a.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no model_index.json" in err, err
