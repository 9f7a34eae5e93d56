import json

import pytest
import torch
from conftest import build_tiny, tiny_inputs

from bitflux import (TernaryConfig, TernaryLinear, formats, load_transformer, quantize_, quantize_checkpoint,
                     save_transformer)
from bitflux.checkpoint import INDEX_NAME, read_safetensors_header
from bitflux.errors import BitfluxError
from bitflux.kernels import use_backend


def _forward(model):
    with use_backend("reference"), torch.no_grad():
        return model(**tiny_inputs())[0]


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:16"])
def test_save_load_bit_identical(tmp_path, monkeypatch, fmt, granularity):
    """The layers hold the config's packing, and load keeps the stored bytes as they are (no conversion)."""
    config = TernaryConfig(format=fmt, **TernaryConfig.parse_granularity(granularity))
    model = build_tiny()
    quantize_(model, config)
    save_transformer(model, tmp_path / "q", config)
    with monkeypatch.context() as patch:
        patch.setattr(formats, "unpack", None)  # any repacking would fail
        loaded = load_transformer(tmp_path / "q")
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            other = loaded.get_submodule(name)
            assert module.packing == other.packing == fmt
            assert other.weight_packed.shape == formats.packed_shape(other.out_features, other.in_features, fmt)
            assert torch.equal(module.weight_packed, other.weight_packed)
            assert torch.equal(module.weight_scale, other.weight_scale)
    assert torch.equal(_forward(model), _forward(loaded))
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert stored["format"] == fmt and stored["quant_method"] == "bitflux"


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
def test_save_repacks_each_layer_into_the_folder_format(tmp_path, fmt):
    memory = {"tq2": "tq1", "tq1": "tq2"}[fmt]
    model = build_tiny()
    quantize_(model, TernaryConfig(format=memory))
    save_transformer(model, tmp_path / "q", TernaryConfig(format=fmt))
    loaded = load_transformer(tmp_path / "q")
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear):
            other = loaded.get_submodule(name)
            assert other.packing == fmt and torch.equal(other.codes(), module.codes())
    assert torch.equal(_forward(model), _forward(loaded))


def test_sharded_save_and_streaming_quantize_agree(tmp_path, tiny_folder):
    config = TernaryConfig(granularity="channel")
    quantize_checkpoint(tiny_folder, tmp_path / "sharded", config, progress=False, max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / INDEX_NAME).exists()
    in_memory = build_tiny()
    quantize_(in_memory, config)
    assert torch.equal(_forward(load_transformer(tmp_path / "sharded")), _forward(in_memory))


def test_tq1_files_are_smaller(tmp_path, tiny_folder):
    sizes = {}
    for fmt in ("tq2", "tq1"):
        quantize_checkpoint(tiny_folder, tmp_path / fmt, TernaryConfig(format=fmt), progress=False)
        header = read_safetensors_header(tmp_path / fmt / "diffusion_pytorch_model.safetensors")
        sizes[fmt] = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                         if k.endswith("weight_packed"))
    assert sizes["tq1"] < 0.82 * sizes["tq2"]


def test_load_never_builds_dense_quantized_weights(tmp_path, tiny_folder, monkeypatch):
    quantize_checkpoint(tiny_folder, tmp_path / "q", progress=False)
    calls = []
    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: calls.append(self.weight.device.type)
                        or original(self))
    load_transformer(tmp_path / "q")
    assert all(device == "meta" for device in calls)


def test_load_refuses_full_precision_folder(tiny_folder):
    with pytest.raises(BitfluxError, match="not a bitflux model"):
        load_transformer(tiny_folder)


@pytest.mark.parametrize("fmt", ["tq2", "tq1"])
@pytest.mark.parametrize("damage,message", [
    (lambda t, key: t[key].to(torch.int8) if key.endswith("weight_packed") else t[key], "is int8, expected uint8"),
    (lambda t, key: t[key].double() if key.endswith("weight_scale") else t[key], "is float64, expected float32, "),
    (lambda t, key: t[key].long() if key.endswith("bias") else t[key], "is int64, expected float32, float16 or"),
    (lambda t, key: torch.full_like(t[key], 255) if key.endswith("weight_packed") else t[key], "no tq. codes"),
    (lambda t, key: torch.full_like(t[key], float("nan")) if key.endswith("weight_scale") else t[key],
     "weight_scale' holds NaN or infinite values"),
])
def test_load_refuses_tensors_of_the_wrong_kind(tmp_path, tiny_folder, fmt, damage, message):
    """A folder whose tensors contradict its config (dtype, invalid code bytes) or hold NaN fails to load with one
    line instead of computing other weights (an int64 bias truncated, a code 3 read as a weight of 2, black
    images)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "q"
    quantize_checkpoint(tiny_folder, out, TernaryConfig(format=fmt, scale_dtype="float16"))
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({key: damage(tensors, key).contiguous() for key in tensors}, file)
    with pytest.raises(BitfluxError, match=message) as info:
        load_transformer(out)
    assert "\n" not in str(info.value)


def test_scales_are_stored_and_loaded_in_the_config_dtype(tmp_path, tiny_folder):
    """save_transformer writes the scales in its config's dtype; a folder whose scales are another float
    dtype (written by an older bitflux) loads them converted to the config's."""
    from safetensors.torch import load_file, save_file

    quantize_checkpoint(tiny_folder, tmp_path / "a", TernaryConfig())
    model = load_transformer(tmp_path / "a")
    save_transformer(model, tmp_path / "b", TernaryConfig(scale_dtype="bfloat16"))
    stored = {k: v for f in (tmp_path / "b").glob("*.safetensors") for k, v in load_file(f).items()}
    assert {v.dtype for k, v in stored.items() if k.endswith("weight_scale")} == {torch.bfloat16}
    for file in (tmp_path / "a").glob("*.safetensors"):  # float16 scales under a float32 config
        tensors = load_file(file)
        save_file({k: v.half() if k.endswith("weight_scale") else v for k, v in tensors.items()}, file)
    assert {m.weight_scale.dtype for m in load_transformer(tmp_path / "a").modules()
            if isinstance(m, TernaryLinear)} == {torch.float32}
    # float32 scales past float16's range under a float16 config: checked as converted, not as stored
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["quantization_config"]["scale_dtype"] = "float16"
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    for file in (tmp_path / "a").glob("*.safetensors"):
        tensors = load_file(file)
        save_file({k: v.float() * 1e7 if k.endswith("weight_scale") else v for k, v in tensors.items()}, file)
    with pytest.raises(BitfluxError, match=r"weight_scale' in float16 holds NaN or infinite values"):
        load_transformer(tmp_path / "a")


def test_codes_outside_the_ternary_set_are_not_packed():
    with pytest.raises(ValueError, match="codes must be -1, 0 or"):
        formats.pack(torch.tensor([[2, -1, 0, 1, 0]], dtype=torch.int8), "tq1")
    with pytest.raises(ValueError, match="fewer than 9 tq2 codes"):
        formats.unpack(torch.zeros(1, 2, dtype=torch.uint8), 9)
    assert formats.invalid_bytes(torch.tensor([0x55, 0xFF, 0x03], dtype=torch.uint8), "tq2") == 2
    assert formats.invalid_bytes(torch.tensor([242, 243, 0], dtype=torch.uint8), "tq1") == 1


def test_original_single_file_quantizes_like_the_diffusers_folder(tmp_path, tiny_folder):
    from safetensors.torch import save_file

    from bitflux.flux import diffusers_to_original

    original = diffusers_to_original(build_tiny().state_dict())
    single = tmp_path / "flux-tiny.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in original.items()}, str(single))
    quantize_checkpoint(single, tmp_path / "from_single", progress=False)
    quantize_checkpoint(tiny_folder, tmp_path / "from_folder", progress=False)
    assert torch.equal(_forward(load_transformer(tmp_path / "from_single")),
                       _forward(load_transformer(tmp_path / "from_folder")))


def test_an_fp8_checkpoint_quantizes_as_its_values_in_bf16(tmp_path):
    """fp8 single files (block weights in e4m3, the rest bf16, as shared for FLUX.1-dev) quantize like the same
    values in bf16: every fp8 value is a bf16 one."""
    from safetensors.torch import save_file

    from bitflux.flux import diffusers_to_original

    original = diffusers_to_original(build_tiny().state_dict())
    fp8 = {k: v.to(torch.float8_e4m3fn if v.dim() == 2 and "blocks" in k else torch.bfloat16).contiguous()
           for k, v in original.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in fp8.items()}, str(tmp_path / "bf16.safetensors"))
    for name in ("fp8", "bf16"):
        quantize_checkpoint(tmp_path / f"{name}.safetensors", tmp_path / f"q-{name}", progress=False)
    quantized = [load_transformer(tmp_path / f"q-{name}").state_dict() for name in ("fp8", "bf16")]
    assert quantized[0].keys() == quantized[1].keys()
    assert all(torch.equal(quantized[0][k], quantized[1][k]) for k in quantized[0])


@pytest.mark.parametrize("scales", ["tensor", "row"])
def test_a_scaled_fp8_all_in_one_checkpoint_quantizes_as_its_weights_in_bf16(tmp_path, scales):
    """ComfyUI's checkpoints: the transformer under model.diffusion_model. beside the VAE and text encoders (left
    out), block weights in fp8 with a scale each (per tensor: `scale_weight`, its scaled_fp8 files; per row:
    `weight_scale`), input scales and format markers beside them. They quantize as the bf16 file of fp8 values
    times scales."""
    from safetensors.torch import save_file

    from bitflux.flux import diffusers_to_original

    original = {k: v.contiguous() for k, v in diffusers_to_original(build_tiny().state_dict()).items()}
    comfy, plain = {}, {}
    for key, value in original.items():
        if value.dim() == 2 and "blocks" in key:
            scale = value.abs().amax() / 448 if scales == "tensor" else value.abs().amax(dim=1) / 448
            fp8 = (value / scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
            layer = key.removesuffix(".weight")
            comfy[key] = fp8
            comfy[f"{layer}.{'scale_weight' if scales == 'tensor' else 'weight_scale'}"] = scale.float()
            comfy[f"{layer}.{'scale_input' if scales == 'tensor' else 'input_scale'}"] = torch.tensor(1.0)
            plain[key] = (fp8.float() * scale.reshape(-1, 1)).to(torch.bfloat16)
        else:
            comfy[key] = plain[key] = value.to(torch.bfloat16)
    all_in_one = {"model.diffusion_model." + k: v for k, v in comfy.items()}
    all_in_one["model.diffusion_model.scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    all_in_one |= {"vae.decoder.conv_in.weight": torch.ones(4, 4), "text_encoders.t5xxl.shared.weight": torch.ones(8)}
    save_file(all_in_one, str(tmp_path / "comfy.safetensors"))
    save_file(plain, str(tmp_path / "bf16.safetensors"))
    for name in ("comfy", "bf16"):
        quantize_checkpoint(tmp_path / f"{name}.safetensors", tmp_path / f"q-{name}", progress=False)
    quantized = [load_transformer(tmp_path / f"q-{name}").state_dict() for name in ("comfy", "bf16")]
    assert quantized[0].keys() == quantized[1].keys()
    assert all(torch.equal(quantized[0][k], quantized[1][k]) for k in quantized[0])


@pytest.mark.parametrize("failure", ["full disk", "safetensors", "bug"])
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, failure):
    """A failed write is one line naming the file and its OS error (safetensors holds the number in its own
    error type's text); any other error goes through as it is. Either way the previous file stays and no
    temporary is left."""
    import errno

    from safetensors import SafetensorError

    from bitflux.checkpoint import write_atomic

    errors = {"full disk": OSError(errno.ENOSPC, "No space left on device"),
              "safetensors": SafetensorError("Error while serializing: No space left on device (os error 28)"),
              "bug": ValueError("a bug")}

    def write(tmp):
        tmp.write_text("half")
        raise errors[failure]

    path = tmp_path / "file.json"
    path.write_text("previous")
    expected = (ValueError, "a bug") if failure == "bug" else (BitfluxError, f"cannot write {path}: No space left")
    with pytest.raises(expected[0], match=expected[1]):
        write_atomic(path, write)
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"] and path.read_text() == "previous"
    assert write_atomic(path, lambda tmp: tmp.write_text("new")) == path and path.read_text() == "new"


@pytest.mark.parametrize("packing", ["tq2", "tq1"])
def test_diffusers_save_pretrained_of_a_ternary_model_loads_back(tmp_path, packing):
    """quantize_ records its config in the model's config (as quantization_config), and set_packing and
    set_activations keep it true, so diffusers' save_pretrained writes a bitflux folder."""
    from bitflux import set_activations, set_packing

    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel"))
    set_packing(model, packing)
    set_activations(model, "a8")
    model.save_pretrained(tmp_path / "saved")
    loaded = load_transformer(tmp_path / "saved", dtype=torch.float32)
    assert loaded.transformer_blocks[0].attn.to_q.packing == packing
    assert loaded.transformer_blocks[0].attn.to_q.activations == "a8"
    assert torch.equal(_forward(loaded), _forward(model))


def test_save_pretrained_after_a_cast_writes_the_scales_the_config_states(tmp_path):
    """.to(torch.bfloat16) casts what the model computes in, not its fp32 scales: the folder's config says fp32."""
    from safetensors import safe_open

    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel"))
    scales = model.transformer_blocks[0].attn.to_q.weight_scale.clone()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"]["scale_dtype"] == "float32"
    with safe_open(next((tmp_path / "saved").glob("*.safetensors")), "pt") as file:
        names = [k for k in file.keys() if k.endswith(".weight_scale")]  # noqa: SIM118 (safe_open has no __iter__)
        stored = {file.get_tensor(k).dtype for k in names}
        assert stored == {torch.float32}
        assert torch.equal(file.get_tensor("transformer_blocks.0.attn.to_q.weight_scale"), scales)


def test_save_transformer_takes_the_models_config_and_refuses_one_that_does_not_fit(tmp_path):
    model = build_tiny()
    quantize_(model, TernaryConfig(granularity="channel", exclude=(r"\.ff\.",)))
    save_transformer(model, tmp_path / "recorded")  # the config quantize_ recorded
    assert torch.equal(_forward(load_transformer(tmp_path / "recorded", dtype=torch.float32)), _forward(model))
    for config, words in ((TernaryConfig(), "has channel scales, the config says tensor"),
                          (TernaryConfig(granularity="channel"), r"ff\.net\.0\.proj is not ternary"),
                          (TernaryConfig(granularity="channel", exclude=(r"\.ff", "attn")), "attn.to_q is ternary")):
        with pytest.raises(BitfluxError, match=words):
            save_transformer(model, tmp_path / "wrong", config)
        assert not (tmp_path / "wrong").exists()


def test_a_header_with_overlapping_tensors_is_refused(tmp_path):
    """Two tensors given one byte range read the same values: safetensors' own reader refuses it, and so does
    the header check the streaming readers rely on."""
    import struct

    from safetensors.torch import save_file

    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    (tmp_path / "bad.safetensors").write_bytes(data[:8] + text + data[8 + length:])
    assert set(read_safetensors_header(tmp_path / "ok.safetensors")) >= {"a", "b"}
    with pytest.raises(BitfluxError, match="tensors 'a' and 'b' overlap"):
        read_safetensors_header(tmp_path / "bad.safetensors")


def test_variants_beside_the_weights_file_are_left_out_and_a_tensor_twice_is_refused(tmp_path, tiny_folder):
    """A diffusers folder may hold variants of its weights (diffusion_pytorch_model.fp16.safetensors): quantizing
    it reads each tensor once. Without the plain file, two files of one tensor are refused, not read twice."""
    import shutil

    def stored(folder):
        return sorted(name for file in folder.glob("*.safetensors") for name in read_safetensors_header(file)
                      if name != "__metadata__")

    quantize_checkpoint(tiny_folder, tmp_path / "plain", TernaryConfig(), progress=False)
    weights = tiny_folder / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, tiny_folder / "diffusion_pytorch_model.fp16.safetensors")
    quantize_checkpoint(tiny_folder, tmp_path / "q", TernaryConfig(), progress=False, max_shard_bytes=20000)
    assert stored(tmp_path / "q") == stored(tmp_path / "plain")  # each once
    weights.rename(tiny_folder / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(BitfluxError, match=r"tensor '.+' is in diffusion_pytorch_model.bf16.safetensors and in "
                                           r"diffusion_pytorch_model.fp16.safetensors; keep one copy"):
        quantize_checkpoint(tiny_folder, tmp_path / "q2", TernaryConfig(), progress=False)


@pytest.mark.parametrize("index", ['{"weight_map": {"a": 3}}', '{"weight_map": ["x"]}', '{"weight_map": {"a": null}}',
                                   '{"weight_map": {"a": "../x.safetensors"}}', b'\xff\xfe{', "[]"])
def test_a_malformed_index_is_one_line(tmp_path, tiny_folder, index):
    from bitflux.checkpoint import weight_files

    (tiny_folder / INDEX_NAME).write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(BitfluxError, match=f"{INDEX_NAME}: (malformed safetensors index|not valid JSON|expected a JSON)"):
        weight_files(tiny_folder)


def test_an_output_another_run_wrote_meanwhile_is_left_to_it(tmp_path):
    """Two runs writing one output without force: the second to finish fails and leaves the first's folder."""
    from bitflux.checkpoint import AtomicFolder

    out = tmp_path / "out"
    with pytest.raises(BitfluxError, match="appeared while this ran"), AtomicFolder(out, force=False) as tmp:
        (tmp / "config.json").write_text("ours")
        out.mkdir()
        (out / "config.json").write_text("theirs")
    assert (out / "config.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["out"]
