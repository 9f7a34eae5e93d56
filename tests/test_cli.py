import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bitflux.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitflux: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def _assert_nothing_written(out_dir):
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


def test_quantize_and_inspect(tmp_path, tiny_folder, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "quantize", tiny_folder, "-o", out, "--format", "tq1", "--method", "lsq",
                           "--granularity", "group:16", "-q")
    assert code == 0 and (out / "config.json").exists()
    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["kind"] == "bitflux model"
    assert info["quantization"]["method"] == "lsq" and info["quantization"]["format"] == "tq1"
    assert 0 < info["coverage"] < 1 and set(info["blocks"]) >= {"transformer_blocks.0", "single_transformer_blocks.1"}


def test_inspect_config_json_alone_gives_paper_figures(tmp_path, capsys):
    from bitflux.flux import FLUX_DEV_CONFIG

    path = tmp_path / "config.json"
    path.write_text(json.dumps(FLUX_DEV_CONFIG))
    code, stdout, _ = _run(capsys, "inspect", path, "--json")
    info = json.loads(stdout)
    assert code == 0
    assert info["params_total"] == pytest.approx(11.9e9, rel=0.01)
    assert info["coverage"] == pytest.approx(0.995, abs=0.001)
    assert info["ratio_vs_bf16"]["tq2"] == pytest.approx(7.7, abs=0.05)
    assert info["ratio_vs_bf16"]["tq1"] > 9


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"double_blocks.0.img_in.weight": torch.zeros(4, 4)}, str(good))
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["double_blocks.0.img_in.weight"]["data_offsets"] = [0, 10_000]
    bad_offsets = json.dumps(header).encode()

    def edited(name, key, value):  # the same header with one entry's field replaced, same data after it
        entry = json.loads(raw[8:8 + length])
        entry["double_blocks.0.img_in.weight"][key] = value
        text = json.dumps(entry).encode()
        return _write_bytes(tmp_path / name, struct.pack("<Q", len(text)) + text + raw[8 + length:])

    return {
        "offsets_as_strings": edited("f.safetensors", "data_offsets", ["0", "64"]),
        "negative_dimensions": edited("g.safetensors", "shape", [-4, -4]),
        "not_safetensors": _write_bytes(tmp_path / "a.safetensors", b"hello"),
        "header_past_end": _write_bytes(tmp_path / "b.safetensors", struct.pack("<Q", 10**9) + b"{}"),
        "bad_json": _write_bytes(tmp_path / "c.safetensors", struct.pack("<Q", 5) + b"{nope"),
        "offsets_out_of_range": _write_bytes(tmp_path / "d.safetensors",
                                             struct.pack("<Q", len(bad_offsets)) + bad_offsets + raw[8 + length:]),
        "truncated": _write_bytes(tmp_path / "e.safetensors", raw[:-20]),
    }


@pytest.mark.parametrize("case", ["not_safetensors", "header_past_end", "bad_json", "offsets_out_of_range",
                                  "truncated", "offsets_as_strings", "negative_dimensions"])
def test_corrupted_safetensors(tmp_path, capsys, case):
    path = _corrupt_files(tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = _run(capsys, "quantize", path, "-o", out)
    _assert_one_line_error(code, err, str(path))
    _assert_nothing_written(out)


def test_corrupted_shard_in_folder(tmp_path, tiny_folder, capsys):
    weights = tiny_folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "truncated")
    _assert_nothing_written(tmp_path / "out")


def test_inspect_reads_a_bitflux_folder_s_shard_headers(tmp_path, tiny_folder, capsys):
    """inspect reads the config for its figures, and the shards' headers against their sizes: a truncated
    shard is reported, not described as a model."""
    assert _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "q", "-q")[0] == 0
    shard = next((tmp_path / "q").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = _run(capsys, "inspect", tmp_path / "q")
    _assert_one_line_error(code, err, "truncated")


@pytest.mark.parametrize("damage", ["model_index.json", "config.json"])
def test_malformed_json_in_a_folder(tmp_path, tiny_folder, capsys, damage):
    """Not JSON, or JSON that is not an object: one line naming the file, nothing written."""
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    for item in tiny_folder.iterdir():
        (pipeline / "transformer" / item.name).write_bytes(item.read_bytes())
    (pipeline / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    for text in ("{nope", "[1, 2]"):
        target = pipeline / "model_index.json" if damage == "model_index.json" else pipeline / "transformer" / damage
        target.write_text(text)
        code, _, err = _run(capsys, "quantize", pipeline, "-o", tmp_path / "out")
        _assert_one_line_error(code, err, damage)
        _assert_nothing_written(tmp_path / "out")


def test_pickle_and_unknown_files(tmp_path, capsys):
    pt = _write_bytes(tmp_path / "model.ckpt", b"\x80\x04fake pickle")
    code, _, err = _run(capsys, "quantize", pt, "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "never pickle")


def test_missing_path(tmp_path, capsys):
    code, _, err = _run(capsys, "quantize", tmp_path / "nope", "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "no such file")


@pytest.mark.parametrize("before, after", [(None, "1"), ("0", "0")])
def test_huge_pages_for_torch_unless_turned_off(tmp_path, capsys, monkeypatch, before, after):
    """The command turns on torch's huge pages for large CPU tensors; THP_MEM_ALLOC_ENABLE=0 keeps them off."""
    if before is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", before)
    _run(capsys, "quantize", tmp_path / "nope", "-o", tmp_path / "out")
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == after


@pytest.mark.parametrize("class_name", ["UNet2DConditionModel", "SD3Transformer2DModel"])
def test_other_architecture(tmp_path, tiny_folder, capsys, class_name):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["_class_name"] = class_name
    (tiny_folder / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out")
    _assert_one_line_error(code, err, class_name, "not a FLUX transformer")


def test_already_quantized(tmp_path, tiny_folder, capsys):
    assert _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "q", "-q")[0] == 0
    code, _, err = _run(capsys, "quantize", tmp_path / "q", "-o", tmp_path / "q2")
    _assert_one_line_error(code, err, "already quantized")
    _assert_nothing_written(tmp_path / "q2")


def test_a_folder_quantized_by_another_tool_is_named_so(tmp_path, tiny_folder, capsys):
    shutil.copytree(tiny_folder, tmp_path / "bnb")
    config = json.loads((tmp_path / "bnb" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "bnb" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "quantize", tmp_path / "bnb", "-o", tmp_path / "q")
    _assert_one_line_error(code, err, "already quantized by bitsandbytes")


def test_float64_and_sft_sources_quantize_into_loadable_folders(tmp_path, capsys):
    """An fp64 export (a folder; an original single file, once refused as "quantized to integers") is read as
    fp32, the widest dtype the loaders take: before, its fp64 tensors were written as they were, into a folder
    no loader accepted. FLUX.1's first release named its files .sft (flux1-dev.sft): read as .safetensors."""
    from conftest import build_tiny

    from bitflux import load_transformer
    from bitflux.flux import diffusers_to_original

    model = build_tiny()
    model.double().save_pretrained(tmp_path / "f64")
    original = {k: v.contiguous() for k, v in diffusers_to_original(model.float().state_dict()).items()}
    save_file({k: v.double() for k, v in original.items()}, str(tmp_path / "flux.safetensors"))
    save_file({k: v.bfloat16() for k, v in original.items()}, str(tmp_path / "flux1-dev.sft"))
    for source in ("f64", "flux.safetensors", "flux1-dev.sft"):
        out = tmp_path / f"q-{source}"
        assert _run(capsys, "quantize", tmp_path / source, "-o", out, "-q")[0] == 0, capsys.readouterr().err
        assert load_transformer(out) is not None


def test_a_tensor_type_bitflux_does_not_read_is_named(tmp_path, tiny_folder, capsys):
    """A newer safetensors type (MXFP8's F8_E8M0 scales) is named, not called a corrupted entry."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_folder / "diffusion_pytorch_model.safetensors"))
    state["proj_out.weight_scale"] = torch.ones(4, dtype=torch.float8_e8m0fnu)
    save_file(state, str(tmp_path / "mx.safetensors"))
    code, _, err = _run(capsys, "quantize", tmp_path / "mx.safetensors", "-o", tmp_path / "q")
    _assert_one_line_error(code, err, "'proj_out.weight_scale' is F8_E8M0, which bitflux does not read")


def test_shape_mismatch(tmp_path, tiny_folder, capsys):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["joint_attention_dim"] = 64
    (tiny_folder / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "context_embedder.weight", "has shape")
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_force(tmp_path, tiny_folder, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier output
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", out)
    _assert_one_line_error(code, err, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / ".out.old").mkdir()  # left by an interrupted run: in the way of nothing
    (tmp_path / ".out.old" / "stale").write_text("")
    assert _run(capsys, "quantize", tiny_folder, "-o", out, "--force", "-q")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name != ".out.old"]  # none left


def test_force_onto_a_link_to_an_output_replaces_the_link(tmp_path, tiny_folder, capsys):
    earlier = tmp_path / "earlier"
    assert _run(capsys, "quantize", tiny_folder, "-o", earlier, "-q")[0] == 0
    link = tmp_path / "latest"
    link.symlink_to(earlier)
    assert _run(capsys, "quantize", tiny_folder, "-o", link, "--force", "-q")[0] == 0
    assert not link.is_symlink() and (link / "config.json").exists() and (earlier / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest.")]  # the old link is gone too


def test_unreadable_inputs_are_one_line(tmp_path, tiny_folder, capsys):
    """A folder where a file belongs, or a file the user may not read: the system's words, exit 2."""
    bad = tmp_path / "bad"
    (bad / "config.json").mkdir(parents=True)
    code, _, err = _run(capsys, "inspect", bad)
    _assert_one_line_error(code, err, "config.json", "Is a directory")


def test_the_output_cannot_be_the_source(tmp_path, tiny_folder, capsys):
    """--force would replace the source: the output may not be it, hold it, or lie inside it."""
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    for item in tiny_folder.iterdir():
        (pipeline / "transformer" / item.name).write_bytes(item.read_bytes())
    (pipeline / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    before = sorted(str(p.relative_to(tmp_path)) for p in pipeline.rglob("*"))
    for source, out in ((pipeline, pipeline), (pipeline / "transformer", pipeline), (pipeline, pipeline / "q"),
                        (pipeline / "transformer", pipeline / "transformer")):
        code, _, err = _run(capsys, "quantize", source, "-o", out, "--force")
        _assert_one_line_error(code, err, "apart from the source")
    assert sorted(str(p.relative_to(tmp_path)) for p in pipeline.rglob("*")) == before


def test_a_pipeline_output_copies_the_small_files(tmp_path, tiny_folder, capsys):
    """Weights may be hard links to the source's (no extra disk), but configs are copies: editing one in the
    output leaves the source's alone."""
    pipeline = _pipeline(tmp_path, tiny_folder)
    assert _run(capsys, "quantize", pipeline, "-o", tmp_path / "out", "-q")[0] == 0
    with open(tmp_path / "out" / "scheduler" / "scheduler_config.json", "a") as f:
        f.write("edited")
    assert (pipeline / "scheduler" / "scheduler_config.json").read_text() == "{}"
    assert (tmp_path / "out" / "model_index.json").stat().st_nlink == 1
    assert (tmp_path / "out" / "vae" / "weights.safetensors").read_bytes() == b"vae"


def _pipeline(tmp_path, tiny_folder):
    """A pipeline folder around the tiny transformer, shaped like the FLUX.1-dev repository: components
    named by model_index.json, and an original-layout checkpoint and autoencoder at the top."""
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    for item in tiny_folder.iterdir():
        (pipeline / "transformer" / item.name).write_bytes(item.read_bytes())
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    for name, files in (("scheduler", {"scheduler_config.json": b"{}"}), ("vae", {"weights.safetensors": b"vae"}),
                        (".", {"flux1-dev.safetensors": b"full precision", "ae.safetensors": b"ae",
                               "README.md": b"readme"})):
        (pipeline / name).mkdir(exist_ok=True)
        for file, data in files.items():
            (pipeline / name / file).write_bytes(data)
    return pipeline


def test_a_pipeline_output_leaves_out_weights_that_are_no_component(tmp_path, tiny_folder, capsys):
    """The FLUX.1-dev repository keeps its full-precision original-layout checkpoint and autoencoder at its
    top (24 GB): the ternary pipeline holds its components and small files only."""
    assert _run(capsys, "quantize", _pipeline(tmp_path, tiny_folder), "-o", tmp_path / "out", "-q")[0] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "model_index.json", "scheduler", "transformer", "vae"]


def test_a_pipeline_from_the_hub_cache_gets_its_weights_not_links_to_links(tmp_path, tiny_folder, capsys):
    """The Hugging Face cache's snapshots are relative symlinks into its blobs: the output links the files
    themselves, which stay readable from the output's folder."""
    pipeline = _pipeline(tmp_path, tiny_folder)
    snapshot, blobs = tmp_path / "cache" / "snapshots" / "rev", tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    for i, file in enumerate(sorted(p for p in pipeline.rglob("*") if p.is_file())):
        (blobs / str(i)).write_bytes(file.read_bytes())
        link = snapshot / file.relative_to(pipeline)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / str(i), link.parent))
    assert _run(capsys, "quantize", snapshot, "-o", tmp_path / "out", "-q")[0] == 0
    weights = tmp_path / "out" / "vae" / "weights.safetensors"
    assert not weights.is_symlink() and weights.read_bytes() == b"vae"


def test_a_single_block_linear1_too_short_is_refused(tmp_path, capsys):
    from conftest import build_tiny

    from bitflux.flux import diffusers_to_original

    original = {k: v.contiguous() for k, v in diffusers_to_original(build_tiny().state_dict()).items()}
    original["single_blocks.0.linear1.weight"] = original["single_blocks.0.linear1.weight"][:5].contiguous()
    save_file(original, str(tmp_path / "flux.safetensors"))
    code, _, err = _run(capsys, "quantize", tmp_path / "flux.safetensors", "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "flux.safetensors: ", "linear1", "5 rows")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["missing", "shape", "extra"])
def test_an_original_checkpoint_is_checked_under_its_own_names(tmp_path, capsys, damage):
    """A missing or misshapen tensor of an original single file is named as the file names it (the fused
    q/k/v tensor, not the diffusers layer cut from it), with the diffusers name beside it."""
    from conftest import build_tiny

    from bitflux.flux import diffusers_to_original

    original = {k: v.contiguous() for k, v in diffusers_to_original(build_tiny().state_dict()).items()}
    if damage == "missing":
        del original["double_blocks.1.img_attn.qkv.weight"]
        expected = ("missing tensor 'double_blocks.1.img_attn.qkv.weight' (transformer_blocks.1.attn.to_",)
    elif damage == "shape":
        original["double_blocks.0.img_mod.lin.weight"] = original["double_blocks.0.img_mod.lin.weight"][:-6].clone()
        expected = ("tensor 'double_blocks.0.img_mod.lin.weight' (transformer_blocks.0.norm1.linear.weight in "
                    "diffusers' names) has shape")
    else:  # no original name to give back: named as converted
        original["double_blocks.0.img_attn.qkv.extra.weight"] = torch.zeros(3, 2)
        expected = ("flux.safetensors: unexpected tensor 'transformer_blocks.0.attn.to_q.extra.weight'",)
    save_file(original, str(tmp_path / "flux.safetensors"))
    code, _, err = _run(capsys, "quantize", tmp_path / "flux.safetensors", "-o", tmp_path / "out")
    _assert_one_line_error(code, err, *expected)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("quantized", ["int8", "block scales", "lone scale"])
def test_a_checkpoint_quantized_otherwise_is_refused_by_name(tmp_path, capsys, quantized):
    """What bitflux does not read of ComfyUI's quantized files, refused from the header by quantize and inspect:
    integer weights (int8, nvfp4), scales per block of a row, a scale without its weight."""
    from conftest import build_tiny

    from bitflux.flux import diffusers_to_original

    original = {k: v.contiguous() for k, v in diffusers_to_original(build_tiny().state_dict()).items()}
    qkv = "double_blocks.0.img_attn.qkv"
    rows, columns = original[f"{qkv}.weight"].shape
    if quantized == "int8":
        original[f"{qkv}.weight"] = original[f"{qkv}.weight"].to(torch.int8)
        original[f"{qkv}.weight_scale"] = torch.tensor(0.5)
        expected = ("qkv.weight' is I8", "quantized to integers")
    elif quantized == "block scales":
        original[f"{qkv}.weight_scale"] = torch.ones(rows, columns // 2)
        expected = ("qkv.weight_scale' has shape", "scales per block")
    else:
        original["double_blocks.0.img_attn.nothing.scale_weight"] = torch.tensor(0.5)
        expected = ("nothing.scale_weight' has no weight",)
    save_file(original, str(tmp_path / "flux.safetensors"))
    code, _, err = _run(capsys, "quantize", tmp_path / "flux.safetensors", "-o", tmp_path / "out")
    _assert_one_line_error(code, err, *expected)
    _assert_nothing_written(tmp_path / "out")
    code, _, err = _run(capsys, "inspect", tmp_path / "flux.safetensors")  # what quantize refuses: refused too
    _assert_one_line_error(code, err, *expected)


def test_a_source_with_an_integer_tensor_is_refused(tmp_path, tiny_folder, capsys):
    """It was written as it was, into a folder that load_transformer then refused."""
    from safetensors.torch import load_file

    weights = tiny_folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["x_embedder.bias"] = tensors["x_embedder.bias"].long()
    save_file(tensors, str(weights))
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out", "-q")
    _assert_one_line_error(code, err, "'x_embedder.bias' is int64, expected floating point")
    _assert_nothing_written(tmp_path / "out")


def test_an_original_file_with_nan_names_its_own_tensor(tmp_path, capsys):
    """Named as the user's file names it, not by the diffusers name it converts to."""
    from conftest import build_tiny

    from bitflux.flux import diffusers_to_original

    original = {k: v.contiguous() for k, v in diffusers_to_original(build_tiny().state_dict()).items()}
    original["double_blocks.0.img_mlp.0.weight"][0, 0] = float("nan")
    save_file(original, str(tmp_path / "flux.safetensors"))
    code, _, err = _run(capsys, "quantize", tmp_path / "flux.safetensors", "-o", tmp_path / "out", "-q")
    _assert_one_line_error(code, err, "'double_blocks.0.img_mlp.0.weight' holds NaN")
    _assert_nothing_written(tmp_path / "out")


def test_a_source_with_nan_is_refused(tmp_path, tiny_folder, capsys):
    weights = tiny_folder / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("norm1.linear.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights))
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out", "-q")
    _assert_one_line_error(code, err, "NaN or infinite", name)
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out")  # with the progress bar
    assert code == 2 and err.strip().splitlines()[-1].startswith("bitflux: error:"), err
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc, a file system nobody can write")
def test_unwritable_output(tmp_path, tiny_folder, capsys):
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", "/proc/bitflux-out")
    _assert_one_line_error(code, err, "cannot write")


def test_output_under_a_file(tmp_path, tiny_folder, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", blocker / "out")
    _assert_one_line_error(code, err, "cannot write")


def test_hub_id_not_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(capsys, "quantize", "black-forest-labs/FLUX.1-dev", "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "not in the local Hugging Face cache", "`hf download black-forest-labs/FLUX.1-dev`")


def test_bad_granularity(tmp_path, tiny_folder, capsys):
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out", "--granularity", "group:x")
    _assert_one_line_error(code, err, "granularity")


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bitflux.cli", "inspect", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_a_reader_that_goes_away_stops_the_output_quietly(tiny_folder):
    """`bitflux inspect ... | head`: the pipe closes before the output is written; no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "bitflux.cli", "inspect", str(tiny_folder), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 1 and stderr == "", stderr


def test_export_gguf_and_back(tmp_path, capsys):
    from conftest import TINY_CONFIG, build_tiny

    import bitflux

    # GGUF ternary blocks hold 256 weights: every quantized layer needs in_features % 256 == 0.
    config = dict(TINY_CONFIG, attention_head_dim=128, axes_dims_rope=[16, 56, 56], num_layers=1,
                  num_single_layers=1)
    folder = tmp_path / "fp"
    build_tiny(config=config).save_pretrained(folder)
    assert _run(capsys, "quantize", folder, "-o", tmp_path / "q", "-q", "--granularity", "channel",
                "--format", "tq1", "--activations", "a8")[0] == 0
    code, stdout, _ = _run(capsys, "export-gguf", tmp_path / "q", "-o", tmp_path / "m.gguf", "--type", "tq1_0")
    assert code == 0 and "ternary" in stdout
    # No settings given: the folder keeps the file's own (channel scales, tq1, a8), which describe its tensors.
    code, _, _ = _run(capsys, "quantize", tmp_path / "m.gguf", "-o", tmp_path / "back", "-q")
    assert code == 0
    a, b = bitflux.load_transformer(tmp_path / "q"), bitflux.load_transformer(tmp_path / "m.gguf")
    c = bitflux.load_transformer(tmp_path / "back")
    for name, module in a.named_modules():
        if isinstance(module, bitflux.TernaryLinear):
            assert torch.equal(module.weight_packed, b.get_submodule(name).weight_packed)
            assert torch.equal(module.weight_packed, c.get_submodule(name).weight_packed)
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    back = json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]
    assert back == stored and back["format"] == "tq1" and back["activations"] == "a8"
    code, stdout, _ = _run(capsys, "inspect", tmp_path / "m.gguf")
    assert code == 0 and "GGUF file" in stdout
    # A setting given overrides that one only.
    assert _run(capsys, "quantize", tmp_path / "m.gguf", "-o", tmp_path / "tq2", "-q", "--format", "tq2")[0] == 0
    tq2 = json.loads((tmp_path / "tq2" / "config.json").read_text())["quantization_config"]
    assert tq2 == {**stored, "format": "tq2"}


def test_export_gguf_refuses_an_existing_file_without_force(tmp_path, capsys):
    import bitflux

    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    model = bitflux.demo_model_path()
    code, _, err = _run(capsys, "export-gguf", tmp_path / "missing-model", "-o", tmp_path / "new.gguf")
    assert code == 2
    code, _, err = _run(capsys, "export-gguf", model, "-o", target)
    _assert_one_line_error(code, err, "exists", "--force")
    assert target.read_bytes() == b"keep me"
    code, _, err = _run(capsys, "export-gguf", model, "-o", tmp_path / "no" / "such" / "m.gguf")
    _assert_one_line_error(code, err, "no such folder")
    assert not (tmp_path / "no").exists()
    code, _, err = _run(capsys, "export-gguf", model, "-o", model / "transformer" / "m.gguf")
    _assert_one_line_error(code, err, "apart from the source")
    assert not (model / "transformer" / "m.gguf").exists()
    code, _, err = _run(capsys, "export-gguf", model, "-o", tmp_path / "m.txt")
    _assert_one_line_error(code, err, "ends in .gguf")


def test_writes_that_fail_midway_are_one_line_errors_and_leave_nothing(tmp_path, monkeypatch):
    """A full disk or a file system gone read-only while writing (where even removing the temporary file
    fails): one line, and no folder that the write made for its output."""
    from PIL import Image

    from bitflux import BitfluxError
    from bitflux.checkpoint import AtomicFolder
    from bitflux.pipeline import save_png

    with (pytest.raises(BitfluxError, match="cannot write .*No space left on device"),
          AtomicFolder(tmp_path / "new" / "parent" / "out", force=False) as tmp):
        (tmp / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    # nested (a calibrated pipeline's transformer saved inside it): reported under the outer output's name
    with (pytest.raises(BitfluxError, match=f"cannot write {tmp_path / 'outer'}: No space left"),
          AtomicFolder(tmp_path / "outer", force=False) as tmp, AtomicFolder(tmp / "transformer", force=False)):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Image.Image, "save", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(BitfluxError, match="cannot write .*Read-only file system"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png")


def test_a_pipeline_component_that_cannot_be_read_is_named(tmp_path, tiny_folder, capsys):
    """A source file gone (a dangling link into a cleaned Hugging Face cache) is the source's fault, not the
    output's: the error names it."""
    pipeline = _pipeline(tmp_path, tiny_folder)
    (pipeline / "vae" / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    code, _, err = _run(capsys, "quantize", pipeline, "-o", tmp_path / "out", "-q")
    _assert_one_line_error(code, err, "vae", "cannot copy this pipeline component")
    _assert_nothing_written(tmp_path / "out")


def test_a_full_disk_while_copying_a_component_is_the_outputs_error(tmp_path, tiny_folder, capsys, monkeypatch):
    """A full disk while a component's file is copied is reported as the output's failed write, not as a
    component that cannot be copied."""
    pipeline = _pipeline(tmp_path, tiny_folder)
    (pipeline / "vae" / "config.json").write_text("{}")

    def full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copy2", full_disk)
    code, _, err = _run(capsys, "quantize", pipeline, "-o", tmp_path / "out", "-q")
    _assert_one_line_error(code, err, f"cannot write {tmp_path / 'out'}: No space left on device")
    _assert_nothing_written(tmp_path / "out")


def test_malformed_gguf(tmp_path, capsys):
    bad = _write_bytes(tmp_path / "bad.gguf", b"NOPE" + bytes(64))
    code, _, err = _run(capsys, "quantize", bad, "-o", tmp_path / "out")
    _assert_one_line_error(code, err, "bad.gguf")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("content,words", [(None, "no such"), (b"\n  \n", "no prompts"), (b"\xff\xfe\x00bad", "UTF-8")])
def test_calibrate_bad_prompt_files(tmp_path, capsys, content, words):
    from bitflux.demo import demo_model_path

    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_bytes(content)
    code, _, err = _run(capsys, "quantize", demo_model_path(), "-o", tmp_path / "out", "--calibrate", prompts)
    _assert_one_line_error(code, err, words)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flag,words", [("--onpolicy-rounds", "must be a positive integer"),
                                        ("--onpolicy-steps", "must be a non-negative integer"),
                                        ("--samples", "must be a positive integer")])
def test_calibrate_bad_counts(tmp_path, capsys, flag, words):
    from bitflux.demo import demo_model_path

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code, _, err = _run(capsys, "quantize", demo_model_path(), "-o", tmp_path / "out", "--calibrate", prompts,
                        "--calibration", "onpolicy", flag, "-1")
    _assert_one_line_error(code, err, words)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("inside", [False, True])
def test_calibrate_refuses_a_workdir_that_the_output_would_replace(tmp_path, capsys, inside):
    from bitflux.demo import demo_model_path

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    workdir = tmp_path / "out" / "wd" if inside else tmp_path / "out"
    code, _, err = _run(capsys, "quantize", demo_model_path(), "-o", tmp_path / "out", "--calibrate", prompts,
                        "--workdir", workdir)
    _assert_one_line_error(code, err, "keep it apart from the output")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("where", [".", "transformer", "text_encoder_2/work"])
def test_calibrate_refuses_a_workdir_inside_the_source(tmp_path, capsys, where):
    """Its records would be written into the source pipeline or one of its components (and copied into the
    output)."""
    import shutil

    from bitflux.demo import demo_model_path

    source = tmp_path / "source"
    shutil.copytree(demo_model_path(), source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code, _, err = _run(capsys, "quantize", source, "-o", tmp_path / "out", "--calibrate", prompts,
                        "--workdir", source / where)
    _assert_one_line_error(code, err, "keep it apart from the source")
    assert not (source / where / "manifest.json").exists()


def test_version(capsys):
    from bitflux import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"bitflux {__version__}\n"


def test_force_replaces_only_model_folders_and_never_the_current_folder(tmp_path, tiny_folder, capsys,
                                                                         monkeypatch):
    """--force replaces an output bitflux could have written, not any path: a prompt file or a folder of other
    things given as -o by mistake stays, and `-o .` is refused before any work (it failed after it)."""
    prompts = _write_bytes(tmp_path / "prompts.txt", b"a red circle\n")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"jpg")
    for target in (prompts, other):
        code, _, err = _run(capsys, "quantize", tiny_folder, "-o", target, "--force")
        _assert_one_line_error(code, err, "is no model folder", "--force replaces only those")
    assert prompts.read_bytes() == b"a red circle\n" and (other / "a.jpg").exists()
    monkeypatch.chdir(other)
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", ".", "--force")
    _assert_one_line_error(code, err, "cannot be the current folder")
    assert sorted(p.name for p in other.iterdir()) == ["a.jpg"]
    assert _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out", "-q")[0] == 0
    assert _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out", "-q", "--force")[0] == 0


def test_calibration_settings_without_calibrate_are_an_error(tmp_path, tiny_folder, capsys):
    """They were ignored: the user asked for a calibrated model and got plain rounding."""
    code, _, err = _run(capsys, "quantize", tiny_folder, "-o", tmp_path / "out", "--calibration", "onpolicy",
                        "--samples", "8")
    _assert_one_line_error(code, err, "--calibration, --samples: calibration settings", "need --calibrate")
    _assert_nothing_written(tmp_path / "out")


def test_torch_and_bitflux_kernels_imported_by_two_threads_at_once():
    """A service that imported bitflux alone, whose first two requests import torch and bitflux.kernels at once:
    bitflux's operators register while torch imports, and must not deadlock with the other thread's import."""
    script = """
import threading, importlib, bitflux
barrier, errors = threading.Barrier(2), []
def load(name):
    barrier.wait()
    try:
        importlib.import_module(name)
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load, args=(name,)) for name in ("torch", "bitflux.kernels")]
[t.start() for t in threads]
[t.join() for t in threads]
import torch
print(errors, hasattr(torch.ops.bitflux, "ternary_linear"))
"""
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "[] True"


@pytest.mark.parametrize("first", ["wrapt", "bitflux"])
def test_after_import_runs_once_beside_wrapts_import_hooks(first):
    """APM agents (OpenTelemetry) hook imports with wrapt, whose loader passes attribute writes on to the loader it
    wraps: each hook runs once, whichever was registered first, and the module keeps its own loader."""
    pytest.importorskip("wrapt")
    hooks = {"wrapt": 'wrapt.register_post_import_hook(lambda m: calls.append("wrapt"), "colorsys")',
             "bitflux": 'after_import("colorsys", lambda: calls.append("then"))'}
    script = "\n".join(["import wrapt", "from bitflux.after_import import after_import", "calls = []",
                        hooks[first], hooks["bitflux" if first == "wrapt" else "wrapt"], "import colorsys",
                        "print(sorted(calls), type(colorsys.__loader__).__name__)"])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['then', 'wrapt'] SourceFileLoader"


def test_the_command_catches_ctrl_c_while_torch_imports(capsys, monkeypatch):
    """`import bitflux` imports nothing heavy (its names load on first use), and the command builds its parser,
    which imports torch (seconds), inside its Ctrl-C handler: an interrupt then is its one line, not a
    traceback. bitflux's torch operators still register whenever torch comes in (torch.export.load needs them)."""
    import bitflux.cli

    light = subprocess.run([sys.executable, "-c", "import sys, bitflux; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"
    for imports in ("import bitflux, torch", "import torch, bitflux",
                    "import bitflux, importlib.util; importlib.util.find_spec('torch'); import torch"):  # a lookup
        ops = subprocess.run([sys.executable, "-c", f"{imports}; print(hasattr(torch.ops.bitflux, 'ternary_linear'))"],
                             capture_output=True, text=True, check=True)
        assert ops.stdout.strip() == "True", imports

    def interrupted_import():
        raise KeyboardInterrupt

    monkeypatch.setattr(bitflux.cli, "build_parser", interrupted_import)
    assert bitflux.cli.main(["inspect", "flux-dev"]) == 130
    assert capsys.readouterr().err == "bitflux: interrupted\n"
