"""bitflux.graphs: which calls are captured, and (on a GPU) that replays compute what eager calls do."""

import numpy as np
import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from bitflux import TernaryLinear
from bitflux.errors import BitfluxError
from bitflux.graphs import GraphedForward, _map_tensors, cuda_graphed, signature

CUDA = torch.cuda.is_available()


@pytest.fixture
def gpu_tensor(monkeypatch):
    """Tensors for signature(): without a GPU, CPU tensors made to report a CUDA device (signature() reads
    nothing else of a tensor but its shape and dtype)."""
    if not CUDA:
        monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    return lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="cuda" if CUDA else "cpu")


def test_signature_follows_shapes_dtypes_and_values(gpu_tensor):
    def call(shape=(2, 3), dtype=torch.float32, return_dict=False):
        return signature((gpu_tensor(*shape, dtype=dtype),),
                         {"timestep": gpu_tensor(1), "return_dict": return_dict, "joint_attention_kwargs": {}})

    assert call() == call()
    assert call() != call(shape=(2, 4))
    assert call() != call(dtype=torch.float16)
    assert call() != call(return_dict=True)
    nested = signature((), {"kwargs": {"scale": 1.0, "ids": [gpu_tensor(4)]}})
    assert nested is not None and nested != signature((), {"kwargs": {"scale": 0.5, "ids": [gpu_tensor(4)]}})


@pytest.mark.parametrize("argument", [torch.zeros(2), object(), {"module": torch.nn.Linear(1, 1)}])
def test_signature_refuses_what_a_graph_cannot_take(argument):
    assert signature((argument,), {}) is None


def test_uncapturable_calls_run_eager():
    linear = torch.nn.Linear(4, 3)
    graphed = GraphedForward(linear.forward)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(graphed(x), linear(x))  # CPU tensors
    assert not graphed.graphs


def test_outputs_are_copied_structure_and_all():
    sample = torch.randn(2, 3)
    for outputs in [(sample,), [sample, None], {"sample": sample}, Transformer2DModelOutput(sample=sample)]:
        copied = _map_tensors(torch.clone, outputs)
        assert type(copied) is type(outputs)
        tensor = copied["sample"] if isinstance(copied, dict) else copied[0]
        assert torch.equal(tensor, sample) and tensor.data_ptr() != sample.data_ptr()


def test_cuda_graphed_needs_a_cuda_module():
    with pytest.raises(BitfluxError, match="CUDA graphs need the module on a CUDA device"):
        cuda_graphed(torch.nn.Linear(2, 2))


def test_wrapping_twice_wraps_once():
    linear = torch.nn.Linear(2, 2)
    linear.forward = wrapper = GraphedForward(linear.forward)  # as cuda_graphed leaves a CUDA module
    assert cuda_graphed(linear) is linear and linear.forward is wrapper
    del linear.forward
    assert not isinstance(linear.forward, GraphedForward)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("activations", ["a16", "a8"])
def test_replays_match_eager_calls_with_new_inputs(activations):
    """Ternary layers (Triton kernels, tuned on the first call) captured once, replayed with other inputs of
    the same shapes: the outputs an eager call gives, and copies that later replays leave alone."""
    torch.manual_seed(0)
    layer = TernaryLinear.from_linear(torch.nn.Linear(256, 192)).cuda()
    layer.activations = activations
    model = torch.nn.Sequential(layer, torch.nn.GELU()).to(torch.bfloat16)
    inputs = [torch.randn(40, 256, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    with torch.inference_mode():
        eager = [model(x) for x in inputs]
        cuda_graphed(model)
        replayed = [model(x) for x in inputs]
        assert len(model.forward.graphs) == 1
        for got, want in zip(replayed, eager):
            assert torch.equal(got, want)
        del model.forward


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_generate_on_cuda_replays_graphs_and_gives_the_eager_image(tmp_path):
    """`bitflux generate --device cuda` captures the demo transformer as CUDA graphs by default: the image
    --no-cuda-graph gives (the same kernels, their strategies already chosen by the first run)."""
    from PIL import Image

    from bitflux.cli import main

    images = {}
    for name, flags in (("eager", ["--no-cuda-graph"]), ("graphs", [])):
        path = tmp_path / f"{name}.png"
        assert main(["generate", "a red cube", "--device", "cuda", "--steps", "3", "-o", str(path), *flags]) == 0
        images[name] = np.asarray(Image.open(path)).astype(np.int16)
    assert np.abs(images["graphs"] - images["eager"]).max() <= 1
