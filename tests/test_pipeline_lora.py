"""diffusers' pipeline LoRA methods on ternary pipelines (interop.pipeline_lora): the same model as bitflux's
load_lora with the same strengths, diffusers' adapter bookkeeping, and one-line refusals."""

import copy
import gc
import pickle

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, tiny_inputs, tiny_pipeline
from safetensors.torch import save_file

from bitflux import BitfluxError, TernaryLinear
from bitflux.interop.lora import load_lora
from bitflux.interop.pipeline_lora import add_lora_methods
from bitflux.pipeline import quantize_pipeline

WIDTH = TINY_CONFIG["num_attention_heads"] * TINY_CONFIG["attention_head_dim"]


def _lora(seed: int, layers=("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp")) -> dict:
    """A diffusers-named LoRA of rank 4 on two layers (one of a fused q/k/v), alpha 8."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in layers:
        out_features = 4 * WIDTH if name.endswith("proj_mlp") else WIDTH
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, WIDTH, generator=generator) * 0.2
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator) * 0.2
        state[f"transformer.{name}.alpha"] = torch.tensor(8.0)
    return state


@pytest.fixture(scope="module")
def pipes():
    """Two ternary pipelines of one tiny FLUX: one for diffusers' methods, one for load_lora by hand."""
    fp = tiny_pipeline()
    return quantize_pipeline(fp)[0], quantize_pipeline(fp)[0]


def _out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(**tiny_inputs())[0]


def _codes(pipe) -> dict:
    return {name: (m.weight_packed.clone(), m.weight_scale.clone()) for name, m in pipe.transformer.named_modules()
            if isinstance(m, TernaryLinear)}


def _same_codes(pipe, codes) -> bool:
    now = _codes(pipe)
    return all(torch.equal(now[name][0], packed) and torch.equal(now[name][1], scale)
               for name, (packed, scale) in codes.items())


def test_diffusers_lora_methods_run_bitflux_branches(pipes, tmp_path):
    """load_lora_weights (a state dict; a folder with weight_name) gives load_lora's model; the adapter loaded
    last is the active one; set_adapters weighs several; disable/enable; delete falls back to the first left."""
    pipe, by_hand = pipes
    base = _out(pipe)
    save_file(_lora(2), str(tmp_path / "two.safetensors"))
    save_file(_lora(3), str(tmp_path / "three.safetensors"))  # two files: weight_name picks one

    pipe.load_lora_weights(_lora(1))
    first = load_lora(by_hand.transformer, _lora(1), dtype=by_hand.transformer.dtype)
    assert pipe.get_active_adapters() == ["default_0"]
    assert torch.equal(_out(pipe), _out(by_hand)) and not torch.equal(_out(pipe), base)

    pipe.load_lora_weights(tmp_path, weight_name="two.safetensors", adapter_name="style")
    second = load_lora(by_hand.transformer, tmp_path / "two.safetensors", dtype=by_hand.transformer.dtype)
    first.strength = 0.0
    assert pipe.get_active_adapters() == ["style"]
    assert pipe.get_list_adapters() == {"transformer": ["default_0", "style"]}
    assert torch.equal(_out(pipe), _out(by_hand))

    pipe.set_adapters(["default_0", "style"], adapter_weights=[0.5, -1.25])
    first.strength, second.strength = 0.5, -1.25
    assert torch.equal(_out(pipe), _out(by_hand))

    pipe.disable_lora()
    assert torch.equal(_out(pipe), base) and pipe.get_active_adapters() == ["default_0", "style"]
    pipe.enable_lora()
    assert torch.equal(_out(pipe), _out(by_hand))

    pipe.set_adapters("style")  # weight 1, the other inactive
    first.strength, second.strength = 0.0, 1.0
    assert torch.equal(_out(pipe), _out(by_hand))

    pipe.delete_adapters("style")
    second.remove()
    assert pipe.get_active_adapters() == ["default_0"]  # no active one left: the first remaining, as PEFT
    first.strength = 0.5  # at the weight it was last given
    assert torch.equal(_out(pipe), _out(by_hand))

    pipe.load_lora_weights(_lora(4), adapter_name="default_0", hotswap=True)  # replaced: active, at its weight
    first.remove()
    swapped = load_lora(by_hand.transformer, _lora(4), strength=0.5, dtype=by_hand.transformer.dtype)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    assert torch.equal(_out(pipe), _out(by_hand))

    pipe.unload_lora_weights()
    swapped.remove()
    assert torch.equal(_out(pipe), base) and pipe.get_list_adapters() == {}
    assert not any(m._forward_hooks for m in pipe.transformer.modules())


def test_fuse_unfuse_and_unload_keeping_the_fused_weights(pipes):
    """fuse_lora folds the active adapters at weight x lora_scale (as LoraAdapter.fuse at that strength);
    unfuse_lora gives the very codes back; fuse then unload keeps the fused model without branches."""
    pipe, by_hand = pipes
    codes = _codes(pipe)
    pipe.load_lora_weights(_lora(5), adapter_name="a")
    pipe.load_lora_weights(_lora(6, layers=("transformer_blocks.0.attn.to_q",)), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 2.0])
    branches = _out(pipe)
    pipe.fuse_lora(lora_scale=0.5)
    a = load_lora(by_hand.transformer, _lora(5), strength=0.25, dtype=by_hand.transformer.dtype)
    b = load_lora(by_hand.transformer, _lora(6, layers=("transformer_blocks.0.attn.to_q",)), strength=1.0,
                  dtype=by_hand.transformer.dtype)
    a.fuse()
    b.fuse()
    fused = _out(pipe)
    assert torch.equal(fused, _out(by_hand)) and not torch.equal(fused, branches)

    pipe.unfuse_lora()
    assert _same_codes(pipe, codes) and torch.equal(_out(pipe), branches)

    pipe.fuse_lora(adapter_names=["b"])  # b alone, at its weight 2
    pipe.unload_lora_weights()
    b.unfuse()
    a.remove()
    b.strength = 2.0
    b.fuse()
    assert torch.equal(_out(pipe), _out(by_hand))
    assert not any(m._forward_hooks for m in pipe.transformer.modules()) and not _same_codes(pipe, codes)
    b.remove(keep_fused=True)


@pytest.mark.parametrize("call,message", [
    (lambda p: p.load_lora_weights(_lora(1), adapter_name="x") or p.load_lora_weights(_lora(1), adapter_name="x"),
     "in use already"),
    (lambda p: p.load_lora_weights(_lora(1), hotswap=True, adapter_name="nope"), "hotswap replaces"),
    (lambda p: p.load_lora_weights(_lora(1), revision="main"), "takes no 'revision'"),
    (lambda p: p.load_lora_weights(_lora(1), use_safetensors=False), ".safetensors files only"),
    (lambda p: p.load_lora_weights(_lora(1), weight_name="a.safetensors"), "a state dict is given"),
    (lambda p: p.load_lora_weights(_lora(1), adapter_name=3), "must be a string"),
    (lambda p: p.set_adapters(["nope"]), "no LoRA adapter 'nope'"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.set_adapters("default_0", float("nan")), "must be a finite number"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.set_adapters("default_0", [1.0, 2.0]), "2 adapter weights"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.fuse_lora(lora_scale=float("inf")), "lora_scale must be"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.fuse_lora() or p.load_lora_weights(
        _lora(2), adapter_name="default_0", hotswap=True), r"unfuse_lora\(\) before"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.disable_lora() or p.fuse_lora(), "disabled"),
    (lambda p: p.load_lora_weights(_lora(1), torch_dtype=torch.bfloat16), "take their model's dtype"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.load_lora_weights(
        _lora(2, layers=("transformer_blocks.0.attn.to_q",)), adapter_name="default_0", hotswap=True), "same layers"),
    (lambda p: p.load_lora_weights(_lora(1)) or p.set_lora_device(["default_0"], "nonsense"), "cannot move"),
])
def test_bad_lora_calls_are_refused_in_one_line(pipes, call, message):
    pipe = pipes[0]
    codes = _codes(pipe)
    try:
        with pytest.raises(BitfluxError, match=message) as caught:
            call(pipe)
        assert "\n" not in str(caught.value)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    assert _same_codes(pipe, codes)


def _clip_lora(seed: int) -> dict:
    """CLIP pairs (rank 2) by kohya's and by diffusers' names, and a T5 pair, which nothing applies."""
    generator = torch.Generator().manual_seed(seed)
    hidden, clip = TINY_CONFIG["pooled_projection_dim"], "text_model_encoder_layers_0"
    return {f"lora_te1_{clip}_self_attn_q_proj.lora_down.weight": torch.randn(2, hidden, generator=generator),
            f"lora_te1_{clip}_self_attn_q_proj.lora_up.weight": torch.randn(hidden, 2, generator=generator),
            f"lora_te1_{clip}_self_attn_q_proj.alpha": torch.tensor(4.0),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.randn(2, hidden, generator=generator),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.randn(32, 2, generator=generator),
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 8),
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(8, 2)}


def _pooled(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.tensor([[3, 4, 6, 2]])).pooler_output


def _encoded(pipe, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(["a red circle"], device="cpu", max_sequence_length=8, **kwargs)[1]


def test_clip_pairs_adapt_the_text_encoder_and_t5s_are_left_out(pipes):
    """A LoRA's CLIP pairs (kohya's and diffusers' names) run on the text encoder as load_lora(component=
    "text_encoder") runs them, at their own weight (set_adapters' per-component dicts, encode_prompt's
    lora_scale); fuse_lora(components=["text_encoder"]) adds them to its weights and unfuse_lora takes them out
    exactly; T5's pairs are left out with a warning, as diffusers leaves them for FLUX."""
    pipe = pipes[0]
    twin = copy.deepcopy(pipe.text_encoder)
    base, weights = _pooled(pipe.text_encoder), {n: p.clone() for n, p in pipe.text_encoder.named_parameters()}
    state = {**_lora(1), **_clip_lora(2)}
    with pytest.warns(UserWarning, match=r"1 text-encoder LoRA pairs left out \(T5's"):
        pipe.load_lora_weights(state, adapter_name="both")
    by_hand = load_lora(twin, state, dtype=twin.dtype, component="text_encoder")
    try:
        assert pipe.get_list_adapters() == {"transformer": ["both"], "text_encoder": ["both"]}
        assert set(by_hand.names) == {"encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1"}
        adapted = _pooled(pipe.text_encoder)
        assert torch.equal(adapted, _pooled(twin)) and not torch.equal(adapted, base)
        pipe.set_adapters("both", {"transformer": 1.0, "text_encoder": 0.5})
        by_hand.strength = 0.5
        assert torch.equal(_pooled(pipe.text_encoder), _pooled(twin))
        halved = _encoded(pipe)
        pipe.set_adapters("both", {"transformer": 0.0})  # the text encoder's weight 1 where absent
        assert torch.equal(_encoded(pipe, lora_scale=0.5), halved)  # what FluxPipeline passes for a call's scale
        assert torch.equal(_pooled(pipe.text_encoder), _pooled(twin))  # (the scale of the last encode holds)
        pipe.fuse_lora(components=["text_encoder"])  # at its weight, 1
        by_hand.strength = 1.0
        assert pipe.fused_loras == {"both"}
        torch.testing.assert_close(_pooled(pipe.text_encoder), _pooled(twin), rtol=1e-5, atol=1e-6)
        pipe.unfuse_lora(components=["text_encoder"])
        assert all(torch.equal(p, weights[n]) for n, p in pipe.text_encoder.named_parameters())
    finally:
        pipe.unload_lora_weights()
    assert torch.equal(_pooled(pipe.text_encoder), base)
    assert not any(m._forward_hooks for m in pipe.text_encoder.modules())
    text_encoder, pipe.text_encoder = pipe.text_encoder, None  # as load_pipeline(text_encoders=False) gives it
    try:
        with pytest.warns(UserWarning, match="3 text-encoder LoRA pairs left out \\(the pipeline has no text encoder"):
            pipe.load_lora_weights(state)
        assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    finally:
        pipe.unload_lora_weights()
        pipe.text_encoder = text_encoder


def test_clip_parts_in_any_fusing_order_text_encoders_swapped_and_clip_alone(pipes):
    """Adapters fused in other orders in the two models unload together; a text encoder taken out of the pipeline
    (and put back, or gone with a fused part) has its branches taken off and leaves every call working; a LoRA
    of CLIP pairs alone loads (of T5's alone is refused); encode_prompt takes lora_scale by position too."""
    pipe = pipes[0]
    codes, text_encoder = _codes(pipe), pipe.text_encoder
    clip_weights = {n: p.clone() for n, p in text_encoder.named_parameters()}
    clip = {key: value for key, value in _clip_lora(4).items() if not key.startswith("text_encoder_2.")}
    t5 = {key: value for key, value in _clip_lora(4).items() if key.startswith("text_encoder_2.")}
    released = None
    try:
        pipe.load_lora_weights({**_lora(1), **clip}, adapter_name="a")
        pipe.load_lora_weights({**_lora(2), **clip}, adapter_name="b")
        pipe.fuse_lora(adapter_names=["a", "b"])
        pipe.fuse_lora(components=["text_encoder"], adapter_names=["b", "a"])
        pipe.unload_lora_weights()
        assert pipe.get_list_adapters() == {} and not any(m._forward_hooks for m in text_encoder.modules())
        _put_back(pipe, codes)
        for name, parameter in text_encoder.named_parameters():
            parameter.data = clip_weights[name].clone()

        pipe.load_lora_weights({**_lora(1), **clip}, adapter_name="a")
        pipe.text_encoder = None
        assert pipe.get_list_adapters() == {"transformer": ["a"]}
        assert not any(m._forward_hooks for m in text_encoder.modules())  # off the encoder taken out
        pipe.text_encoder = text_encoder
        pipe.unload_lora_weights()

        twin = copy.deepcopy(text_encoder)
        pipe.text_encoder = twin
        pipe.load_lora_weights({**_lora(1), **clip}, adapter_name="a")
        pipe.fuse_lora(components=["transformer", "text_encoder"])
        pipe.text_encoder = None
        del twin
        gc.collect()
        released, pipe.transformer = pipe.transformer, None  # as generate(release_transformer=True) leaves it
        assert pipe.get_list_adapters() == {}
        pipe.transformer, pipe.text_encoder = released, text_encoder
        pipe.unload_lora_weights()
        assert pipe.get_list_adapters() == {}
        _put_back(pipe, codes)

        pipe.load_lora_weights(clip, adapter_name="clip")
        assert pipe.get_list_adapters() == {"text_encoder": ["clip"]}
        with torch.no_grad():
            halved = pipe.encode_prompt(["a red circle"], None, "cpu", 1, None, None, 8, 0.5)[1]
        pipe.set_adapters("clip", 0.5)
        assert torch.equal(_encoded(pipe), halved)
        with pytest.raises(BitfluxError, match="pairs are T5's"):
            pipe.load_lora_weights(t5)
    finally:
        if released is not None:
            pipe.transformer = released
        pipe.text_encoder = text_encoder
        pipe.unload_lora_weights()
        _put_back(pipe, codes)
    assert all(torch.equal(p, clip_weights[n]) for n, p in text_encoder.named_parameters())


def test_a_text_encoder_gone_before_the_next_call_takes_its_parts_along(pipes):
    """A text encoder taken out and collected before any LoRA call: its parts are forgotten (a CLIP-only adapter
    with them, no other made active for it), fused ones too, and every call works, unload at once too; one under
    whose fused part lies a LoRA attached by hand keeps the parts, at strength 0, with a warning."""
    pipe = pipes[0]
    codes, text_encoder, base = _codes(pipe), pipe.text_encoder, _out(pipe)
    clip = {key: value for key, value in _clip_lora(5).items() if not key.startswith("text_encoder_2.")}
    try:
        pipe.text_encoder = copy.deepcopy(text_encoder)
        pipe.load_lora_weights({**_lora(1), **clip}, adapter_name="a")
        pipe.load_lora_weights(clip, adapter_name="c")
        pipe.fuse_lora(components=["transformer", "text_encoder"], adapter_names=["a"])
        pipe.text_encoder = None
        gc.collect()
        # c, the active one, went with it; a stays inactive (no fallback as after a delete)
        assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {"transformer": ["a"]}
        pipe.unfuse_lora()
        assert torch.equal(_out(pipe), base)
        pipe.disable_lora()
        pipe.unload_lora_weights()
        pipe.text_encoder = copy.deepcopy(text_encoder)
        pipe.load_lora_weights(_lora(1), adapter_name="a")
        pipe.load_lora_weights(clip, adapter_name="c")
        pipe.text_encoder = None
        pipe.unload_lora_weights()  # at once, the CLIP-only adapter among those it lists
        assert pipe.get_list_adapters() == {} and torch.equal(_out(pipe), base)
        pipe.text_encoder = copy.deepcopy(text_encoder)
        pipe.load_lora_weights(clip, adapter_name="c")
        pipe.disable_lora()
        pipe.text_encoder = None
        pipe.load_lora_weights(_lora(1), adapter_name="a")  # LoRAs enabled again once none was left
        assert not torch.equal(_out(pipe), base)
        pipe.unload_lora_weights()
        with pytest.raises(BitfluxError, match="pairs are CLIP's, and the pipeline has no text encoder"):
            pipe.load_lora_weights(clip)

        twin = copy.deepcopy(text_encoder)
        by_hand = load_lora(twin, clip, component="text_encoder")
        by_hand.fuse()
        pipe.text_encoder = twin
        pipe.load_lora_weights({**_lora(1), **clip}, adapter_name="a")
        pipe.fuse_lora(components=["text_encoder"])
        pipe.text_encoder = text_encoder
        with pytest.warns(UserWarning, match="left on the text encoder taken out of the pipeline"):
            assert pipe.get_list_adapters() == {"transformer": ["a"]}
        pipe.unload_lora_weights()
    finally:
        pipe.text_encoder = text_encoder
        pipe.unload_lora_weights()
        _put_back(pipe, codes)


def test_a_compiled_transformer_takes_a_calls_scale(pipes):
    pipe = pipes[0]
    pipe.load_lora_weights(_lora(1))
    eager = pipe.transformer
    try:
        expected = _scaled_out(pipe, 0.5)
        pipe.transformer = torch.compile(eager, backend="eager")
        assert torch.equal(_scaled_out(pipe, 0.5), expected)
    finally:
        pipe.transformer = eager
        pipe.unload_lora_weights()


def test_load_pipeline_gives_ternary_pipelines_the_methods_and_not_full_precision_ones():
    from bitflux import demo_model_path, load_pipeline
    from bitflux.interop.pipeline_lora import METHODS
    from bitflux.pipeline import demo_ternary_path

    ternary = load_pipeline(demo_ternary_path(progress=False), text_encoders=False)
    assert all(getattr(ternary, name).__self__.__class__.__name__ == "PipelineLoras" for name in METHODS)
    width = ternary.transformer.config.num_attention_heads * ternary.transformer.config.attention_head_dim
    name = "transformer.transformer_blocks.0.attn.to_q"
    ternary.load_lora_weights({f"{name}.lora_A.weight": torch.ones(2, width),
                               f"{name}.lora_B.weight": torch.ones(width, 2)}, adapter_name="ones")
    assert ternary.get_list_adapters() == {"transformer": ["ones"]}
    full_precision = load_pipeline(demo_model_path(), text_encoders=False)
    assert "load_lora_weights" not in vars(full_precision)  # diffusers' own (PEFT) method


def test_a_copied_pipeline_has_loras_of_its_own(pipes):
    pipe = pipes[0]
    pipe.load_lora_weights(_lora(1), adapter_name="one")
    try:
        with_lora = _out(pipe)
        for twin in (copy.deepcopy(pipe), pickle.loads(pickle.dumps(pipe))):
            assert torch.equal(_out(twin), with_lora)
            twin.set_adapters("one", 0.0)  # its own adapter, on its own transformer
            assert torch.equal(_out(pipe), with_lora) and not torch.equal(_out(twin), with_lora)
            twin.unload_lora_weights()
            assert pipe.get_list_adapters() == {"transformer": ["one"]}
    finally:
        pipe.unload_lora_weights()


def test_lora_calls_drop_captured_cuda_graphs(pipes):
    """A captured graph froze the strengths and reads the weights fuse_lora replaces: every call that changes
    them has the next forward capture anew (GraphedForward set up by hand: no GPU here)."""
    from bitflux.graphs import GraphedForward

    pipe = pipes[0]
    pipe.transformer.forward = GraphedForward(pipe.transformer.forward)
    try:
        for call in (lambda: pipe.load_lora_weights(_lora(1)), lambda: pipe.set_adapters("default_0", 0.5),
                     pipe.fuse_lora, pipe.unfuse_lora, pipe.disable_lora, pipe.unload_lora_weights):
            pipe.transformer.forward.graphs["signature"] = "a captured graph"
            call()
            assert pipe.transformer.forward.graphs == {}
        pipe.load_lora_weights(_lora(1))
        for scale, recaptured in ((0.5, True), (0.5, False), (1.0, True)):  # a call's scale, when it changes
            pipe.transformer.forward.graphs["signature"] = "a captured graph"
            _scaled_out(pipe, scale)
            assert (pipe.transformer.forward.graphs == {}) == recaptured
    finally:
        del pipe.transformer.forward
        pipe.unload_lora_weights()


def _scaled_out(pipe, scale) -> torch.Tensor:
    with torch.no_grad():
        return pipe.transformer(**tiny_inputs(), joint_attention_kwargs={"scale": scale})[0]


def test_a_calls_lora_scale_weighs_the_active_adapters(pipes, monkeypatch):
    """joint_attention_kwargs={"scale": s}, which FluxPipeline passes to every transformer call, runs the active
    adapters at weight x s for that call, as PEFT's layers do; a call without it at their weights; fused
    adapters are in the weights, which no scale changes. diffusers' warning that the scale is ineffective
    without PEFT is not given: it is not."""
    from diffusers.utils import peft_utils

    monkeypatch.setattr(peft_utils.logger, "warning", lambda *args, **kwargs: pytest.fail(f"warned: {args}"))
    pipe = pipes[0]
    base, codes = _out(pipe), _codes(pipe)
    pipe.load_lora_weights(_lora(1), adapter_name="one")
    pipe.load_lora_weights(_lora(2), adapter_name="two")
    try:
        pipe.set_adapters(["one", "two"], [0.4, -1.0])
        weighted = _out(pipe)
        pipe.set_adapters(["one", "two"], [0.4 * 0.5, -1.0 * 0.5])
        halved = _out(pipe)
        pipe.set_adapters(["one", "two"], [0.4, -1.0])
        assert torch.equal(_scaled_out(pipe, 0.5), halved)
        assert torch.equal(_out(pipe), weighted)  # the next call without a scale: the weights again
        assert torch.equal(_scaled_out(pipe, 0), base)
        with pytest.raises(BitfluxError, match="LoRA scale must be a finite number"):
            _scaled_out(pipe, float("inf"))
        pipe.set_adapters(["one", "two"], [0.4, np.array(-1.0)])  # (a 0-d array as PEFT takes it)
        memo = {}
        copy.deepcopy(pipe.transformer, memo)  # the scale's hook takes no pipeline along
        assert id(pipe.text_encoder_2) not in memo and id(pipe) not in memo
        for twin in (copy.deepcopy(pipe), add_lora_methods(type(pipe)(**pipe.components))):
            twin.get_list_adapters()  # a copy of its own; a second pipeline on the same transformer (no adapters)
            assert torch.equal(_scaled_out(twin, 0.5), halved) and torch.equal(_scaled_out(pipe, 0.5), halved)
            del twin
        pipe.fuse_lora(adapter_names=["one"])
        pipe.set_adapters(["two"], [0.0])
        fused = _out(pipe)
        assert torch.equal(_scaled_out(pipe, 3.0), fused)
    finally:
        pipe.unload_lora_weights()
        _put_back(pipe, codes)


def test_bookkeeping_after_deletes_failures_and_fusing_in_another_order(pipes):
    """A refused weight changes no weight; deleting the active adapters activates the first left by name; free
    default names are reused; diffusers' fused_loras counts bitflux's; a fused adapter under which another was
    fused first cannot be deleted alone, and unload deletes them in the order fused, keeping both."""
    pipe = pipes[0]
    codes = _codes(pipe)
    for name in ("zeta", "mid", "alpha"):
        pipe.load_lora_weights(_lora(len(name)), adapter_name=name)
    pipe.set_adapters(["zeta", "mid", "alpha"], [1, np.float32(0.5), torch.tensor(2.0)])
    with pytest.raises(BitfluxError, match="weight of adapter 'mid'"):
        pipe.set_adapters(["zeta", "mid"], [0.3, float("nan")])
    pipe.delete_adapters(["zeta", "alpha", "alpha"])  # the active ones, one twice
    assert pipe.get_active_adapters() == ["mid"] and pipe.get_list_adapters() == {"transformer": ["mid"]}
    pipe.load_lora_weights(_lora(7))
    pipe.load_lora_weights(_lora(8))
    assert pipe.get_list_adapters() == {"transformer": ["mid", "default_1", "default_2"]}
    pipe.set_adapters(["mid", "default_1"], [0.5, 1.0])
    expected = _out(pipe)
    pipe.fuse_lora(adapter_names=["default_1"])
    pipe.fuse_lora(adapter_names=["mid"])  # fused in the other order than loaded
    assert pipe.fused_loras == {"default_1", "mid"} and pipe.num_fused_loras == 2
    with pytest.raises(BitfluxError, match="fused before this one"):
        pipe.delete_adapters("mid")
    assert pipe.get_list_adapters() == {"transformer": ["mid", "default_1", "default_2"]}
    fused = _out(pipe)
    assert not torch.equal(fused, expected)  # re-ternarized
    pipe.unload_lora_weights()
    assert torch.equal(_out(pipe), fused) and pipe.num_fused_loras == 0 and not _same_codes(pipe, codes)
    _put_back(pipe, codes)


def test_the_pipelines_joint_attention_scale_reaches_the_adapters(pipes):
    """FluxPipeline(..., joint_attention_kwargs={"scale": 0}) generates as without the LoRA."""
    pipe = pipes[0]

    def generate(**kwargs):
        return pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    base = generate()
    pipe.load_lora_weights(_lora(1))
    try:
        assert not torch.equal(generate(), base)
        assert torch.equal(generate(joint_attention_kwargs={"scale": 0.0}), base)
    finally:
        pipe.unload_lora_weights()


def _put_back(pipe, codes) -> None:
    """The tiny model's codes as they were before a LoRA was fused and unloaded, for the other tests."""
    for name, (packed, scale) in codes.items():
        layer = pipe.transformer.get_submodule(name)
        layer.weight_packed, layer.weight_scale = packed, scale
        layer.__dict__.pop("_bitflux_fused", None)


def test_disable_unfuses_as_peft_does(pipes):
    pipe = pipes[0]
    base, codes = _out(pipe), _codes(pipe)
    pipe.load_lora_weights(_lora(1))
    pipe.fuse_lora()
    pipe.disable_lora()
    assert torch.equal(_out(pipe), base) and _same_codes(pipe, codes) and pipe.num_fused_loras == 0
    pipe.enable_lora()
    assert not torch.equal(_out(pipe), base)
    pipe.unload_lora_weights()


def test_loras_go_with_their_transformer(pipes):
    """A pipeline given another transformer (or none: released after generating) forgets the LoRAs of the old
    one; calls that need one refuse in one line."""
    pipe, other = pipes[0], pipes[1].transformer
    clip = {key: value for key, value in _clip_lora(3).items() if not key.startswith("text_encoder_2.")}
    pipe.load_lora_weights({**_lora(1), **clip}, adapter_name="old")
    old, base = pipe.transformer, _out(pipes[1])
    old_adapter = pipe.set_adapters.__self__.adapters["old"]["transformer"]
    pipe.transformer = None
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    assert not any(m._forward_hooks for m in pipe.text_encoder.modules())  # the pipeline's still: taken off
    pipe.unload_lora_weights()
    pipe.unfuse_lora()
    with pytest.raises(BitfluxError, match="has no transformer"):
        pipe.set_adapters([])
    pipe.transformer = other
    pipe.load_lora_weights(_lora(2), adapter_name="old")  # the name is free again
    assert not torch.equal(_out(pipe), base)
    pipe.unload_lora_weights()
    assert torch.equal(_out(pipe), base)
    pipe.transformer = old
    old_adapter.remove()  # (the first transformer's branch, which the pipeline forgot, still on it)


def test_a_released_transformer_takes_its_loras_along():
    pipe = quantize_pipeline(tiny_pipeline())[0]
    pipe.load_lora_weights(_lora(1))
    pipe.transformer = None  # as generate(..., release_transformer=True) does
    gc.collect()
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    pipe.unload_lora_weights()


def test_adding_the_methods_again_keeps_the_adapters(pipes):
    pipe = pipes[0]
    pipe.load_lora_weights(_lora(1), adapter_name="kept")
    assert add_lora_methods(pipe) is pipe and pipe.get_list_adapters() == {"transformer": ["kept"]}
    pipe.unload_lora_weights()
