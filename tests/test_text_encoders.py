import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bitflux import BitfluxError, demo_model_path, encode_prompts, generate, load_pipeline
from bitflux.text_encoders import (
    NarrowLinear,
    checkpoint_dtype,
    narrow,
    narrow_text_encoders,
    stream_t5,
    streamed_text_encoders,
)


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_widened_on_use_computes_what_the_wide_model_does_from_narrow_weights(storage):
    """Weights whose values the narrow dtype holds (what a bf16 or fp16 checkpoint loads): the same outputs,
    bit for bit, as the model converted to fp32, with the linear weights stored narrow."""
    wide = tiny_encoder()
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(p.to(storage).float())  # representable in storage, as a checkpoint's values are
    model = tiny_encoder().to(storage)
    model.load_state_dict({k: v.to(storage) for k, v in wide.state_dict().items()})
    narrow(model, storage, torch.float32)
    tokens = torch.tensor([[1, 5, 10, 0]])
    assert torch.equal(model(tokens), wide(tokens))
    assert NarrowLinear.latest[0] is None  # no widened copy kept after the call
    for layer in (model[2], model[4]):
        assert isinstance(layer, NarrowLinear)
        assert layer.state_dict()["weight"].dtype == storage
        assert layer.weight.dtype == layer.bias.dtype == torch.float32
    assert model[0].weight.dtype == model[1].weight.dtype == torch.float32  # embeddings, norms: widened once
    # saved as stored, under the usual names: a plain model loads it
    plain = tiny_encoder(seed=1)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(tokens), wide(tokens))
    # .to(dtype) sets what it computes in
    assert torch.equal(model.to(torch.float64)(tokens), wide.double()(tokens))


def test_a_weight_is_widened_once_for_reads_in_a_row_and_none_is_kept_between_calls():
    """T5 reads its `wo` weight's dtype before calling it: reads in a row share one widening, which goes when
    another layer's weight is read, and when the encoder's call starts or ends, even by an exception."""
    model = narrow(tiny_encoder().to(torch.bfloat16), torch.bfloat16, torch.float32)
    first, second = model[2], model[4]
    assert first.weight is first.weight
    widened = first.weight
    assert second.weight is not widened and first.weight is not widened
    with pytest.raises(IndexError):
        model(torch.tensor([[11]]))  # past the embedding
    assert NarrowLinear.latest[0] is None
    with torch.no_grad():
        first._parameters["weight"].data.fill_(0)  # a write no version counter sees
    model(torch.tensor([[1]]))  # a call starts afresh: reads the new weights
    assert torch.equal(first.weight, torch.zeros_like(first.weight))


def test_a_narrowed_encoder_copies_and_pickles():
    import copy
    import io

    model = narrow(tiny_encoder().to(torch.bfloat16), torch.bfloat16, torch.float32)
    tokens = torch.tensor([[1, 2, 3]])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert isinstance(other[2], NarrowLinear) and other[2].state_dict()["weight"].dtype == torch.bfloat16
        assert torch.equal(other(tokens), model(tokens))


def test_a_wider_stored_linear_is_narrowed():
    """transformers keeps some layers of a bf16 checkpoint in fp32 (T5's `wo`): stored narrow all the same."""
    model = tiny_encoder().to(torch.bfloat16)
    model[4].float()
    narrow(model, torch.bfloat16, torch.float32)
    assert model[4].state_dict()["weight"].dtype == torch.bfloat16


def test_checkpoint_dtype(tmp_path):
    for name, tensors, want in [
        ("bf16", {"a": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.zeros(2, dtype=torch.int64)}, torch.bfloat16),
        ("fp32", {"a": torch.zeros(2)}, torch.float32),
        ("mixed", {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16)}, None),
    ]:
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        assert checkpoint_dtype(tmp_path / name) == want
    (tmp_path / "none").mkdir()
    with pytest.raises(BitfluxError, match="no safetensors"):
        checkpoint_dtype(tmp_path / "none")


def prompt_embeddings(pipe):
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(["a red cube", "two blue spheres"], None,
                                               max_sequence_length=pipe.tokenizer_2.model_max_length)
    return embeds, pooled


def test_a_pipeline_on_the_cpu_holds_its_bf16_text_encoders_narrow():
    """The demo ships bf16 text encoders: load_pipeline in fp32 keeps their linear weights in bf16 (half the
    bytes) and encodes prompts exactly as the encoders loaded in fp32 do."""
    from diffusers import FluxPipeline

    root = demo_model_path()
    assert checkpoint_dtype(root / "text_encoder_2") == torch.bfloat16
    pipe = load_pipeline(root, dtype=torch.float32, text_encoders="whole")
    plain = FluxPipeline.from_pretrained(root, torch_dtype=torch.float32, local_files_only=True)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name)
        linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        assert linears and all(isinstance(m, NarrowLinear) and m.state_dict()["weight"].dtype == torch.bfloat16
                               for m in linears)
        stored = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
        wide = sum(t.numel() * t.element_size() for t in getattr(plain, name).state_dict().values())
        assert stored < 0.75 * wide
        assert encoder.dtype == torch.float32  # what FluxPipeline casts the encoder's outputs to
    for ours, theirs in zip(prompt_embeddings(pipe), prompt_embeddings(plain)):
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs)


def test_a_pipeline_on_the_cpu_streams_t5():
    """load_pipeline's default on a CPU: T5 streamed (no block weights held between encodings), CLIP narrowed;
    the same embeddings and images as with T5 loaded whole; the pipeline still moves as a whole."""
    root = demo_model_path()
    pipe = load_pipeline(root)
    whole = load_pipeline(root, text_encoders="whole")
    assert not list(pipe.text_encoder_2.encoder.block.parameters())
    assert list(whole.text_encoder_2.encoder.block.parameters())
    assert any(isinstance(m, NarrowLinear) for m in pipe.text_encoder.modules())
    for ours, theirs in zip(prompt_embeddings(pipe), prompt_embeddings(whole)):
        assert torch.equal(ours, theirs)
    pipe.to("cpu", torch.float32)
    image = generate(pipe, ["a red cube"], [0], steps=2)[0]
    assert np.array_equal(np.asarray(image), np.asarray(generate(whole, ["a red cube"], [0], steps=2)[0]))
    with pytest.raises(BitfluxError, match="text_encoders must be"):
        load_pipeline(root, text_encoders="partly")


def test_a_pipeline_with_t5_streamed_saves_whole(tmp_path):
    """diffusers' pipeline saving calls each component's save_pretrained: a streamed T5 writes the checkpoint
    it streams from (hard links); its state_dict, which would lack the blocks, is refused."""
    pipe = load_pipeline(demo_model_path())
    pipe.save_pretrained(tmp_path / "saved")
    saved = load_pipeline(tmp_path / "saved", text_encoders="whole")
    for ours, theirs in zip(prompt_embeddings(saved), prompt_embeddings(pipe)):
        assert torch.equal(ours, theirs)
    for module in (pipe.text_encoder_2, pipe.text_encoder_2.encoder, pipe.text_encoder_2.encoder.block):
        with pytest.raises(BitfluxError, match="holds no block weights"):
            module.state_dict()


def test_encoders_no_narrower_than_the_pipeline_are_left_to_diffusers(tmp_path):
    root = tmp_path / "pipe"
    shutil.copytree(demo_model_path(), root)
    assert narrow_text_encoders(root, torch.bfloat16) == {}  # already the pipeline's dtype
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    (root / "text_encoder" / "config.json").write_text(json.dumps({**config, "quantization_config": {}}))
    assert set(narrow_text_encoders(root, torch.float32)) == {"text_encoder_2"}  # quantized: not ours to widen
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    assert narrow_text_encoders(root, torch.float32) == {}


def test_t5_streamed_from_its_checkpoint_computes_what_the_loaded_one_does():
    """Each block's weights read (and widened) right before it runs and dropped after it, also when the call
    raises: the outputs of the encoder loaded whole in fp32, bit for bit, and no block weights held between
    calls."""
    from transformers import T5EncoderModel

    folder = demo_model_path() / "text_encoder_2"
    plain = T5EncoderModel.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    streamed = stream_t5(folder, torch.float32)
    tokens = torch.tensor([[5, 17, 2, 40, 1], [3, 3, 9, 1, 0]]) % plain.config.vocab_size
    with torch.no_grad():
        expected = plain(tokens)[0]
        assert torch.equal(streamed(tokens)[0], expected)
        assert not list(streamed.encoder.block.parameters())
        assert streamed.dtype == torch.float32
        assert streamed.encoder.embed_tokens.weight is streamed.shared.weight or torch.equal(
            streamed.encoder.embed_tokens.weight, streamed.shared.weight)
        failing = streamed.encoder.block[1].layer[1].register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(RuntimeError("in the middle")))
        with pytest.raises(RuntimeError, match="in the middle"):
            streamed(tokens)
        assert not list(streamed.encoder.block.parameters())
        failing.remove()
        assert torch.equal(streamed(tokens)[0], expected)
    assert not streamed.training and not any(p.requires_grad for p in streamed.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_prompts_streams_t5_with_the_whole_pipelines_embeddings(dtype):
    root = demo_model_path()
    assert set(streamed_text_encoders(root, dtype, "cpu")) == {"text_encoder_2"}
    assert streamed_text_encoders(root, torch.float16, "cpu") == {}  # transformers keeps fp16 T5's `wo` in fp32
    embeddings = encode_prompts(root, ["a red cube", "two blue spheres"], dtype=dtype)
    whole = prompt_embeddings(load_pipeline(root, dtype=dtype, text_encoders="whole"))
    assert embeddings["prompt_embeds"].dtype == dtype
    assert torch.equal(embeddings["prompt_embeds"], whole[0])
    assert torch.equal(embeddings["pooled_prompt_embeds"], whole[1])


def _edited_t5(tmp_path, edit):
    from safetensors.torch import load_file

    folder = tmp_path / "text_encoder_2"
    shutil.copytree(demo_model_path() / "text_encoder_2", folder)
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return folder


def test_t5_streamed_in_bf16_computes_what_the_loaded_one_does():
    """In bf16 (a GPU pipeline's dtype), the same outputs as transformers' T5 loaded in bf16, bit for bit."""
    from transformers import T5EncoderModel

    folder = demo_model_path() / "text_encoder_2"
    plain = T5EncoderModel.from_pretrained(folder, torch_dtype=torch.bfloat16, local_files_only=True)
    streamed = stream_t5(folder, torch.bfloat16)
    tokens = torch.tensor([[5, 17, 2, 40, 1]]) % plain.config.vocab_size
    with torch.no_grad():
        assert torch.equal(streamed(tokens)[0], plain(tokens)[0])
    assert streamed.dtype == torch.bfloat16


def test_t5_checkpoints_saved_otherwise_stream_alike(tmp_path):
    """The tied embedding saved under the encoder's name instead, and a decoder's tensors beside the encoder's
    (not read): the same outputs; the embedding held once."""
    def otherwise(tensors):
        tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
        tensors["decoder.final_layer_norm.weight"] = torch.ones(8)

    tokens = torch.tensor([[5, 17, 2, 1]])
    with torch.no_grad():
        expected = stream_t5(demo_model_path() / "text_encoder_2", torch.float32)(tokens)[0]
        model = stream_t5(_edited_t5(tmp_path, otherwise), torch.float32)
        assert torch.equal(model(tokens)[0], expected)
    assert model.encoder.embed_tokens.weight is model.shared.weight


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
     "encoder.block.1.layer.1.DenseReluDense.wo.weight: missing"),
    (lambda t: t.update({"encoder.final_layer_norm.weight": torch.ones(3)}), "shape [3], expected"),
])
def test_a_t5_checkpoint_not_matching_its_config_is_one_line(tmp_path, edit, words):
    with pytest.raises(BitfluxError, match=re.escape(words)):
        stream_t5(_edited_t5(tmp_path, edit), torch.float32)


def test_a_streamed_t5_saved_into_its_own_folder_keeps_it(tmp_path):
    """save_pretrained into the folder it streams from: nothing to copy (it unlinked the checkpoint first)."""
    folder = _edited_t5(tmp_path, lambda tensors: None)
    tokens = torch.tensor([[5, 17, 2, 1]])
    streamed = stream_t5(folder, torch.float32)
    with torch.no_grad():
        expected = streamed(tokens)[0]
        streamed.save_pretrained(folder)
        assert torch.equal(streamed(tokens)[0], expected)


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"), "is no longer in"),
    (lambda t: t.update({"encoder.block.1.layer.0.layer_norm.weight": torch.ones(1)}), "now has shape (1,)"),
])
def test_a_checkpoint_changed_after_loading_is_one_line(tmp_path, edit, words):
    """Blocks are read at every call: a checkpoint rewritten since (a missing tensor, one of another shape, which
    would broadcast into wrong embeddings) is said to have changed."""
    from safetensors.torch import load_file

    folder = _edited_t5(tmp_path, lambda tensors: None)
    streamed = stream_t5(folder, torch.float32)
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    with torch.no_grad(), pytest.raises(BitfluxError, match=re.escape(words)):
        streamed(torch.tensor([[5, 17, 2, 1]]))


def test_a_transformers_folder_is_read_as_transformers_reads_it(tmp_path):
    """A folder holding model.safetensors and an index of shards from another save: transformers reads the one
    file (diffusers, for its own names, the index first), and so does the streamed T5."""
    from transformers import T5EncoderModel

    folder = _edited_t5(tmp_path, lambda tensors: None)
    (file,) = folder.glob("*.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"shared.weight": "old.safetensors"}}))
    save_file({"shared.weight": torch.zeros(1)}, folder / "old.safetensors")
    assert file.name == "model.safetensors"
    tokens = torch.tensor([[5, 17, 2, 1]])
    with torch.no_grad():
        plain = T5EncoderModel.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        assert torch.equal(stream_t5(folder, torch.float32)(tokens)[0], plain(tokens)[0])
