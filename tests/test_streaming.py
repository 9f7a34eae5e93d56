import re

import pytest
import torch
from conftest import build_tiny, owned_weights, tiny_inputs
from safetensors.torch import load_file, save_file

from bitflux import BitfluxError
from bitflux.streaming import stream_transformer

BLOCK_GROUPS = ("transformer_blocks", "single_transformer_blocks")


def _block_parameters(model):
    return [p for group in BLOCK_GROUPS for p in getattr(model, group).parameters()]


@pytest.mark.parametrize("stored, dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)])
def test_a_streamed_transformer_computes_what_the_loaded_one_does(tmp_path, stored, dtype):
    """Each block's weights read (converted from the stored dtype) right before it runs and dropped after it,
    also when the call raises: the outputs of the transformer loaded whole in `dtype`, bit for bit, with one
    block's weights held at a time and none between calls."""
    from diffusers import FluxTransformer2DModel

    build_tiny().to(stored).save_pretrained(tmp_path / "transformer")
    whole = owned_weights(FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=dtype).eval())
    streamed = stream_transformer(tmp_path / "transformer", dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in tiny_inputs().items()}
    held = []
    for group in BLOCK_GROUPS:
        for block in getattr(streamed, group):
            block.register_forward_hook(lambda *_: held.append(len(_block_parameters(streamed))),
                                        prepend=True)  # before the block is dropped
    with torch.no_grad():
        expected = whole(**inputs)[0]
        for _ in range(2):  # the second call reuses the first's memory
            assert torch.equal(streamed(**inputs)[0], expected)
        assert not _block_parameters(streamed)
        one_block = [len(list(block.parameters())) for group in BLOCK_GROUPS for block in getattr(whole, group)]
        assert held == one_block * 2
        failing = streamed.single_transformer_blocks[0].register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(RuntimeError("in the middle")))
        with pytest.raises(RuntimeError, match="in the middle"):
            streamed(**inputs)
        assert not _block_parameters(streamed)
        failing.remove()
        assert torch.equal(streamed(**inputs)[0], expected)
        # A KeyboardInterrupt skips the hooks that empty blocks after an Exception: the next call starts clean.
        interrupted = streamed.single_transformer_blocks[0].register_forward_hook(
            lambda *_: (_ for _ in ()).throw(KeyboardInterrupt), prepend=True)
        with pytest.raises(KeyboardInterrupt):
            streamed(**inputs)
        interrupted.remove()
        assert torch.equal(streamed(**inputs)[0], expected) and not _block_parameters(streamed)
    assert streamed.dtype == dtype and not any(p.requires_grad for p in streamed.parameters())
    for module in (streamed, streamed.transformer_blocks, streamed.single_transformer_blocks):
        with pytest.raises(BitfluxError, match="holds no block weights"):
            module.state_dict()


def test_a_sharded_checkpoint_streams_alike(tmp_path):
    """Each block reads only the shards holding its tensors: the same outputs as the model loaded whole."""
    from diffusers import FluxTransformer2DModel

    build_tiny().save_pretrained(tmp_path / "transformer", max_shard_size="100KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    whole = owned_weights(FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval())
    with torch.no_grad():
        assert torch.equal(stream_transformer(tmp_path / "transformer", torch.float32)(**tiny_inputs())[0],
                           whole(**tiny_inputs())[0])


def test_calls_from_two_threads_run_one_at_a_time(tmp_path):
    """A service's requests on one streamed model (T5 on a CPU, by default): each call empties the blocks at its
    start, so two at once would run on each other's emptied blocks. They take turns, with the serial outputs."""
    import threading

    build_tiny().save_pretrained(tmp_path / "transformer")
    streamed = stream_transformer(tmp_path / "transformer", torch.float32)
    with torch.no_grad():
        expected = streamed(**tiny_inputs())[0]
    outputs, errors = [], []

    def run():
        try:
            with torch.no_grad():
                outputs.extend(streamed(**tiny_inputs())[0] for _ in range(3))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(outputs) == 9 and all(torch.equal(y, expected) for y in outputs)
    # a call failing before its turn began (an earlier pre-hook raised) ends nobody's turn, and raises its own error
    failing = streamed.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(ValueError("before")),
                                                 prepend=True)
    with pytest.raises(ValueError, match="before"), torch.no_grad():
        streamed(**tiny_inputs())
    failing.remove()
    with torch.no_grad():
        assert torch.equal(streamed(**tiny_inputs())[0], expected)


def test_a_copied_or_pickled_streamed_transformer_streams_alike_and_lets_its_memory_go(tmp_path):
    """Copies take the blocks' hooks and their shared memory along: each streams from the same folder, and ends a
    call holding no block tensors and no read buffer of its own or of the original's."""
    import copy
    import pickle

    build_tiny().save_pretrained(tmp_path / "transformer")
    streamed = stream_transformer(tmp_path / "transformer", torch.float32)
    with torch.no_grad():
        expected = streamed(**tiny_inputs())[0]
        for twin in (copy.deepcopy(streamed), pickle.loads(pickle.dumps(streamed))):
            assert torch.equal(twin(**tiny_inputs())[0], expected)
            assert not _block_parameters(twin)
            hooks = next(iter(twin._forward_hooks.values())).__self__
            assert hooks.memory.buffer is None and not hooks.memory.spare
            assert hooks.memory is not next(iter(streamed._forward_hooks.values())).__self__.memory
            twin.save_pretrained(tmp_path / "saved")
    assert {f.name for f in (tmp_path / "saved").iterdir()} == {f.name for f in (tmp_path / "transformer").iterdir()}


def test_saving_a_model_streamed_from_a_hub_cache_copies_its_files_not_its_links(tmp_path):
    """The Hugging Face cache's snapshot files are relative symlinks into its blobs: a saved copy holds the files
    (weights hard-linked, config copied), so it loads from anywhere and editing its config leaves the source's."""
    import os

    build_tiny().save_pretrained(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for blob in (tmp_path / "blobs").iterdir():
        (snapshot / blob.name).symlink_to(os.path.relpath(blob, snapshot))
    stream_transformer(snapshot, torch.float32).save_pretrained(tmp_path / "saved" / "deep")
    (tmp_path / "saved" / "deep").rename(tmp_path / "moved")  # relative links would dangle now
    saved = tmp_path / "moved"
    assert not any(f.is_symlink() for f in saved.iterdir())
    (saved / "config.json").write_text((saved / "config.json").read_text().replace("{", '{"edited": 1, ', 1))
    assert "edited" not in (tmp_path / "blobs" / "config.json").read_text()
    with torch.no_grad():
        assert torch.equal(stream_transformer(saved, torch.float32)(**tiny_inputs())[0],
                           stream_transformer(snapshot, torch.float32)(**tiny_inputs())[0])


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop("transformer_blocks.1.ff.net.2.weight"), "transformer_blocks.1.ff.net.2.weight: missing"),
    (lambda t: t.update({"proj_out.bias": torch.ones(3)}), "proj_out.bias: shape [3], expected"),
])
def test_a_transformer_checkpoint_not_matching_its_config_is_one_line(tmp_path, edit, words):
    build_tiny().save_pretrained(tmp_path / "transformer")
    (file,) = (tmp_path / "transformer").glob("*.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    with pytest.raises(BitfluxError, match=re.escape(words)):
        stream_transformer(tmp_path / "transformer", torch.float32)


def test_a_streamed_transformer_moves_and_converts_as_any_other(tmp_path):
    """Between calls its blocks hold nothing, so `.to()` (and diffusers' offloading) moves what it holds, and
    the blocks load where and in what it computes: the outputs of the whole model converted alike."""
    from diffusers import FluxTransformer2DModel

    build_tiny().save_pretrained(tmp_path / "transformer")
    whole = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval().to(torch.bfloat16)
    streamed = stream_transformer(tmp_path / "transformer", torch.float32).to("cpu", torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in tiny_inputs().items()}
    with torch.no_grad():
        assert torch.equal(streamed(**inputs)[0], whole(**inputs)[0])
    assert streamed.dtype == torch.bfloat16 and not _block_parameters(streamed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_run.sh runs it)")
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_streamed_models_on_a_gpu_compute_what_the_loaded_ones_do(tmp_path, stored):
    """On a GPU, bytes of another dtype are copied first and converted there, bytes already in the dtype copied
    straight in: the outputs of the models loaded whole on the GPU, bit for bit."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from bitflux import demo_model_path
    from bitflux.text_encoders import stream_t5

    build_tiny().to(stored).save_pretrained(tmp_path / "transformer")
    whole = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16).cuda().eval()
    streamed = stream_transformer(tmp_path / "transformer", torch.bfloat16, "cuda")
    inputs = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else
              v.cuda() if torch.is_tensor(v) else v for k, v in tiny_inputs().items()}
    folder = demo_model_path() / "text_encoder_2"
    t5 = T5EncoderModel.from_pretrained(folder, torch_dtype=torch.bfloat16, local_files_only=True).cuda()
    tokens = torch.tensor([[5, 17, 2, 40, 1]], device="cuda") % t5.config.vocab_size
    with torch.no_grad():
        assert torch.equal(streamed(**inputs)[0], whole(**inputs)[0])
        assert torch.equal(stream_t5(folder, torch.bfloat16, "cuda")(tokens)[0], t5(tokens)[0])
    assert not _block_parameters(streamed)
