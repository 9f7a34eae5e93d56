import dataclasses
import gc
import importlib
import json

import pytest
import torch
from conftest import TINY_CONFIG, build_tiny, owned_weights, tiny_inputs, tiny_pipeline
from torch import nn

from bitflux import BitfluxError, TernaryConfig, TernaryLinear, load_transformer, save_transformer
from bitflux.kernels import use_backend
from bitflux.calibrate import (CalibrationConfig, FolderSource, ModelSource, TeacherData, calibrate,
                               calibrate_transformer, read_prompts)
from bitflux.calibrate.blockwise import reconstruct
from bitflux.calibrate.latent import LatentTernaryLinear, rounding_step
from bitflux.calibrate.scales import solve_scales
from bitflux.flux import block_names
from bitflux.ternary import dequantize, ternarize

GRANULARITIES = ["tensor", "channel", "group:16", "group:24"]  # 24 does not divide the widths: padded groups


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: thread start-up costs more than the work, badly so on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ternary_config(granularity="channel", method="absmean"):
    return TernaryConfig(method=method, **TernaryConfig.parse_granularity(granularity))


def _random_teacher(model, records=24, seed=1) -> TeacherData:
    """Teacher records from random transformer inputs (the pipeline path is tested separately)."""
    inputs = tiny_inputs(batch=records, seed=seed)
    inputs["timestep"] = torch.rand(records, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        velocity = model(**inputs)[0]
    return TeacherData({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}, velocity)


def _calib(stages, **kw):
    return CalibrationConfig(stages=stages, **{"steps": 12, "distill_steps": 12, "batch_size": 8,
                                               "eval_records": 24, **kw})


# ---- prompts ---------------------------------------------------------------------------------------

def test_prompts_one_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a red circle \n\n\tblue square left of a circle\n   \n", encoding="utf-8")
    assert read_prompts(path) == ["a red circle", "blue square left of a circle"]


@pytest.mark.parametrize("case, words", [("missing", "no such"), ("empty", "no prompts"), ("blank", "no prompts"),
                                         ("latin1", "not UTF-8"), ("folder", "folder")])
def test_bad_prompt_files_give_one_line_errors(tmp_path, case, words):
    path = tmp_path / "prompts.txt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "blank":
        path.write_text("\n  \n\t\n")
    elif case == "latin1":
        path.write_bytes("un cercle caf\u00e9\n".encode("latin-1"))
    elif case == "folder":
        path.mkdir()
    with pytest.raises(BitfluxError) as info:
        read_prompts(path)
    message = str(info.value)
    assert "\n" not in message and words in message and str(path) in message


# ---- latent layers and closed-form scales -----------------------------------------------------------

@pytest.mark.parametrize("method", ["absmean", "twn", "lsq"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", [(8, 64), (5, 37), (33, 16)])
def test_rounding_step_reproduces_every_method(method, granularity, shape):
    config = _ternary_config(granularity, method)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    weight[0, :3] = 0  # exact zeros and a mostly-zero row
    codes, scales = ternarize(weight, method, config.granularity, config.group_size_or_none)
    step = rounding_step(weight, codes, config.granularity, config.group_size_or_none)
    assert step.shape == scales.shape
    from bitflux.ternary import expand_scales
    rounded = torch.clamp(torch.round(weight / expand_scales(step, shape[1], config.group_size_or_none)), -1, 1)
    assert torch.equal(rounded.to(torch.int8), codes)


@pytest.mark.parametrize("activations", ["a16", "a8", "fp8"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_latent_layer_starts_at_plain_rounding(granularity, activations):
    if activations == "fp8" and granularity.startswith("group"):
        pytest.skip("fp8 activations take per-tensor or per-channel scales")
    config = TernaryConfig(activations=activations, **TernaryConfig.parse_granularity(granularity))
    linear = nn.Linear(40, 12)
    plain = TernaryLinear.from_linear(linear, config)
    latent = LatentTernaryLinear.from_linear(linear, config)
    x = torch.randn(3, 5, 40)
    with use_backend("reference"):  # the exact semantics of each mode (the cpu kernel is always a8)
        expected = plain(x)
    torch.testing.assert_close(latent(x), expected, rtol=1e-5, atol=1e-5)
    frozen = latent.freeze()
    assert torch.equal(frozen.weight_packed, plain.weight_packed)
    assert torch.equal(frozen.weight_scale, plain.weight_scale)
    again = LatentTernaryLinear.from_ternary(frozen, config).freeze()
    assert torch.equal(again.weight_packed, plain.weight_packed) and torch.equal(again.weight_scale, plain.weight_scale)


def test_a_calibrated_ternary_layer_keeps_its_packing():
    layer = TernaryLinear.from_linear(nn.Linear(33, 8), TernaryConfig(format="tq1"))
    frozen = LatentTernaryLinear.from_ternary(layer, TernaryConfig(format="tq2")).freeze()
    assert frozen.packing == "tq1" and torch.equal(frozen.weight_packed, layer.weight_packed)


def test_latent_gradients_are_straight_through():
    linear = nn.Linear(16, 4)
    latent = LatentTernaryLinear.from_linear(linear, _ternary_config("channel"))
    x = torch.randn(10, 16)
    latent(x).sum().backward()
    # d/du of s * u (identity through the rounding) summed over outputs: s_r * sum_tokens x.
    expected = latent.scales().detach() * x.sum(0)
    torch.testing.assert_close(latent.latent.grad, expected.expand_as(latent.latent.grad))
    assert latent.log_gain.grad is not None and latent.log_gain.grad.abs().sum() > 0


@pytest.mark.parametrize("granularity", [*GRANULARITIES, "group:100000"])  # the last: wider than the rows
def test_solve_scales_matches_least_squares_on_the_data(granularity):
    """The Gram-matrix solution equals ordinary least squares on the activations themselves."""
    config = _ternary_config(granularity)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 40, generator=g, dtype=torch.float64)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)
    codes, scales = ternarize(weight, "absmean", config.granularity, config.group_size_or_none)
    solved = solve_scales(weight, codes, x.T @ x / len(x), config.granularity, config.group_size_or_none)
    # Reference: y = x W^T is linear in the scales; one column of the design matrix per scale.
    basis = []
    for index in range(scales.numel()):
        unit = torch.zeros(scales.numel(), dtype=torch.float64)
        unit[index] = 1
        basis.append((x @ dequantize(codes, unit.reshape(scales.shape), config.group_size_or_none,
                                     torch.float64).T).reshape(-1))
    reference = torch.linalg.lstsq(torch.stack(basis, 1), (x @ weight.T).reshape(-1, 1)).solution
    torch.testing.assert_close(solved.double(), reference.reshape(scales.shape), rtol=1e-6, atol=1e-9)


# ---- each stage reduces its own objective -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher():
    model = build_tiny()
    return model, _random_teacher(model)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:16"])
def test_scales_stage_reduces_every_layer_output_error(tiny_teacher, granularity):
    model, teacher = tiny_teacher
    _, report = calibrate_transformer(ModelSource(model), teacher, _ternary_config(granularity), _calib(("scales",)),
                                      progress=False)
    errors = [e for block in report.blocks for e in block.scale_errors.values()]
    assert len(errors) == sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if "blocks." in n)
    assert all(after <= before * (1 + 1e-6) for before, after in errors)
    assert sum(a for _, a in errors) < 0.9 * sum(b for b, _ in errors)


def test_blockwise_stage_reduces_every_block_error(tiny_teacher):
    model, teacher = tiny_teacher
    _, report = calibrate_transformer(ModelSource(model), teacher, _ternary_config(), _calib(("blockwise",), steps=60),
                                      progress=False)
    assert [b.name for b in report.blocks] == block_names(TINY_CONFIG)
    for block in report.blocks:
        assert block.loss_after < 0.8 * block.loss_before, block


def test_distill_stage_reduces_velocity_error(tiny_teacher):
    model, teacher = tiny_teacher
    student, report = calibrate_transformer(ModelSource(model), teacher, _ternary_config(), _calib(("distill",),
                                            distill_steps=30), progress=False)
    before, after = report.distill_error
    assert after < 0.8 * before
    assert not any(isinstance(m, LatentTernaryLinear) for m in student.modules())


def test_stages_together_beat_plain_rounding(tiny_teacher):
    import copy

    from bitflux import quantize_
    from bitflux.calibrate.distill import evaluate

    model, teacher = tiny_teacher
    config = _ternary_config()
    plain = copy.deepcopy(model)
    quantize_(plain, config)
    calibrated, _ = calibrate_transformer(ModelSource(model), teacher, config, _calib(("scales", "blockwise"), steps=30),
                                          progress=False)
    everything = torch.arange(len(teacher))
    assert evaluate(calibrated, teacher, everything, 8, "cpu") < 0.5 * evaluate(plain, teacher, everything, 8, "cpu")


# ---- bounded memory and resume ------------------------------------------------------------------------

def _weights_alive(shapes: set, excluded: dict[int, nn.Parameter]) -> int:
    """Elements of full-precision parameters shaped like a block's linear weights (module weights and
    latent weights alike) alive anywhere in the process, except `excluded`'s (held by it, so that no new
    parameter can take one of their ids)."""
    gc.collect()
    return sum(o.numel() for o in gc.get_objects()
               if isinstance(o, nn.Parameter) and tuple(o.shape) in shapes and excluded.get(id(o)) is not o)


def test_blockwise_holds_one_full_precision_block(tmp_path):
    model = build_tiny()
    teacher = _random_teacher(model)
    model.save_pretrained(tmp_path / "fp")
    names = block_names(TINY_CONFIG)
    shapes = {tuple(m.weight.shape) for n in names for m in model.get_submodule(n).modules() if isinstance(m, nn.Linear)}
    block_sizes = [sum(m.weight.numel() for m in model.get_submodule(n).modules() if isinstance(m, nn.Linear))
                   for n in names]
    del model
    source = FolderSource(tmp_path / "fp")
    gc.collect()
    # Not counted: whatever other tests left alive in this process (held here, so it cannot be freed during
    # the run), and the embedders and output layers, full precision by design, not blocks.
    excluded = {id(o): o for o in gc.get_objects() if isinstance(o, nn.Parameter)}
    load = source.load

    def tracked_load(name, device):
        module = load(name, device)
        if "blocks." not in name:
            excluded.update((id(p), p) for p in module.parameters())
        return module

    source.load = tracked_load
    alive = []
    reconstruct(source, teacher, _ternary_config(), _calib(("scales", "blockwise")), progress=False,
                on_event=lambda event, name: alive.append((event, _weights_alive(shapes, excluded))))
    assert [e for e, _ in alive] == ["loaded", "trained", "saved"] * len(names)
    assert [n for e, n in alive if e == "loaded"] == block_sizes  # the block just loaded, nothing else
    assert [n for e, n in alive if e == "trained"] == block_sizes  # its latent weights replaced it
    assert [n for e, n in alive if e == "saved"] == [0] * len(names)  # frozen to ternary: none left


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, tiny_teacher):
    model, teacher = tiny_teacher
    config, calib = _ternary_config("group:16"), _calib(("scales", "blockwise"))
    uninterrupted, _ = reconstruct(ModelSource(model), teacher, config, calib, progress=False)

    def interrupt(event, name):
        if event == "saved" and name == "transformer_blocks.1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reconstruct(ModelSource(model), teacher, config, calib, workdir=tmp_path, progress=False, on_event=interrupt)
    resumed, records = reconstruct(ModelSource(model), teacher, config, calib, workdir=tmp_path, progress=False)
    assert [r.resumed for r in records] == [True, True, False, False]
    expected = uninterrupted.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for key, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_distillation_resumes_from_its_checkpoint(tmp_path, tiny_teacher, monkeypatch):
    """Stopped after 6 of 10 steps (checkpoints after every step here), the repeated run goes on from step 6
    and ends exactly where an uninterrupted run does, with the same before/after errors."""
    distill_module = importlib.import_module("bitflux.calibrate.distill")  # the package exports the function
    model, teacher = tiny_teacher
    config, calib = _ternary_config(), _calib(("distill",), distill_steps=10)
    uninterrupted, report = calibrate_transformer(ModelSource(model), teacher, config, calib, progress=False)
    real_fit = distill_module.fit

    def fit_stopped_after_6_steps(root, loss_of, *args, **kwargs):
        steps = []

        def loss(index):
            if len(steps) == 6:
                raise KeyboardInterrupt
            steps.append(index)
            return loss_of(index)

        real_fit(root, loss, *args, checkpoint_seconds=0, **kwargs)

    monkeypatch.setattr(distill_module, "fit", fit_stopped_after_6_steps)
    with pytest.raises(KeyboardInterrupt):
        calibrate_transformer(ModelSource(model), teacher, config, calib, workdir=tmp_path, progress=False)
    assert torch.load(tmp_path / "distill.pt", weights_only=True)["step"] == 6
    monkeypatch.setattr(distill_module, "fit", real_fit)
    resumed, resumed_report = calibrate_transformer(ModelSource(model), teacher, config, calib, workdir=tmp_path,
                                                    progress=False)
    assert resumed_report.distill_error == report.distill_error
    expected = uninterrupted.state_dict()
    for key, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


# ---- the whole path from a pipeline --------------------------------------------------------------------

def test_calibrate_a_pipeline_end_to_end(tmp_path):
    pipe = tiny_pipeline()
    calib = _calib(("scales", "blockwise", "distill"), samples=3,
                   pipeline_kwargs={"num_inference_steps": 4, "height": 16, "width": 16, "max_sequence_length": 8})
    config = _ternary_config("channel")
    fp_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    model, report = calibrate(pipe, ["a red circle", "a blue square left of a red circle"], config, calib,
                              workdir=tmp_path / "work", progress=False)
    assert report.records == 3 * 4  # every denoising step of every trajectory
    assert report.seconds["total"] > 0 and report.peak_host_bytes > 0
    assert all(torch.equal(v, fp_before[k]) for k, v in pipe.transformer.state_dict().items())  # teacher untouched
    assert sum(isinstance(m, TernaryLinear) for m in model.modules()) == sum(
        isinstance(m, nn.Linear) for n, m in pipe.transformer.named_modules() if "blocks." in n)
    save_transformer(model, tmp_path / "out", config)
    loaded = load_transformer(tmp_path / "out")
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], model(**inputs)[0])
    # The same workdir with other settings is refused rather than silently mixed.
    with pytest.raises(BitfluxError, match="holds a calibration run of other prompts"):
        calibrate(pipe, ["a red circle"], config, calib, workdir=tmp_path / "work", progress=False)


def test_teacher_keeps_each_trajectory_text_once(tmp_path):
    """Records point at their trajectory's text conditioning, stored once (not once per step), and give the
    transformer exactly what it was called with; saved and loaded, the same."""
    from bitflux.calibrate.teacher import collect

    pipe = tiny_pipeline()
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: seen.append({k: kwargs[k].clone() for k in ("encoder_hidden_states",
                                                                                       "pooled_projections")}),
        with_kwargs=True)
    teacher = collect(pipe, ["a red circle", "a blue square"], samples=3, batch_size=2, progress=False,
                      num_inference_steps=4, height=16, width=16, max_sequence_length=8)
    hook.remove()
    assert len(teacher) == 3 * 4 and len(teacher.prompts["encoder_hidden_states"]) == 3
    teacher.save(tmp_path / "teacher.safetensors")
    for data in (teacher, TeacherData.load(tmp_path / "teacher.safetensors")):
        batch = data.batch(torch.arange(len(data)), "cpu")
        for key in ("encoder_hidden_states", "pooled_projections"):
            assert torch.equal(batch[key], torch.cat([call[key] for call in seen]))


def test_onpolicy_records_are_fresh_teacher_and_the_students_own_trajectories():
    """First the teacher's trajectories of the given seeds, exactly as collect records them; then as many of the
    student's own (the next seeds; its inputs at each step), each labelled with the teacher's velocity there."""
    import copy

    from bitflux import quantize_
    from bitflux.calibrate.teacher import collect, onpolicy_records

    pipe = tiny_pipeline()
    student = copy.deepcopy(pipe.transformer)
    quantize_(student, _ternary_config())
    prompts = ["a red circle", "a blue square left of a red circle"]
    settings = {"samples": 3, "seed": 7, "batch_size": 2, "progress": False, "num_inference_steps": 3, "height": 16,
                "width": 16, "max_sequence_length": 8}
    records = onpolicy_records(pipe, student, prompts, **settings)
    teacher = collect(pipe, prompts, **settings)
    own = collect(type(pipe)(**{**pipe.components, "transformer": student}), prompts, **{**settings, "seed": 7 + 3})
    assert len(records) == 2 * 3 * 3 and len(records.prompts["encoder_hidden_states"]) == 2 * 3
    first, second = torch.arange(len(teacher)), torch.arange(len(teacher), len(records))
    for part, expected in ((first, teacher), (second, own)):
        batch, wanted = records.batch(part, "cpu"), expected.batch(torch.arange(len(expected)), "cpu")
        for key, value in wanted.items():
            assert value is None or key == "return_dict" or torch.equal(batch[key], value), key
    assert torch.equal(records.velocity[first], teacher.velocity)
    assert not torch.equal(own.inputs["hidden_states"], teacher.inputs["hidden_states"])  # the student drifts
    with torch.no_grad():
        relabelled = pipe.transformer(**records.batch(second, "cpu"))[0]
    torch.testing.assert_close(records.velocity[second], relabelled, rtol=1e-4, atol=1e-5)  # other batches: rounding
    assert (records.velocity[second] - own.velocity).abs().max() > 1e-3  # the teacher's, not the student's
    with pytest.raises(BitfluxError, match="image sizes"):
        teacher.joined(collect(pipe, prompts, **{**settings, "height": 32}))
    with pytest.raises(BitfluxError, match="the student is on meta, the pipeline runs on cpu"):
        onpolicy_records(pipe, student.to("meta"), prompts, **settings)


def test_onpolicy_stage_lowers_its_error_and_resumes_from_its_workdir(tmp_path):
    pipe = tiny_pipeline()
    calib = _calib(("distill", "onpolicy"), samples=2, onpolicy_steps=60,
                   pipeline_kwargs={"num_inference_steps": 3, "height": 16, "width": 16, "max_sequence_length": 8})
    config, prompts = _ternary_config(), ["a red circle", "a blue square"]
    model, report = calibrate(pipe, prompts, config, calib, workdir=tmp_path, progress=False)
    assert report.records == 2 * 3 and report.onpolicy_records == 2 * 2 * 3
    [(before, after)] = report.onpolicy_error
    assert after < 0.9 * before
    assert "onpolicy (12 fresh and own records): velocity error" in report.summary()
    assert (tmp_path / "onpolicy.safetensors").exists() and (tmp_path / "onpolicy.pt").exists()
    assert not any(isinstance(m, LatentTernaryLinear) for m in model.modules())
    again, again_report = calibrate(pipe, prompts, config, calib, workdir=tmp_path, progress=False)
    assert again_report.onpolicy_error == report.onpolicy_error
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in again.state_dict().items())
    with pytest.raises(BitfluxError, match="goes on from a calibrated student"):
        _calib(("onpolicy",))
    with pytest.raises(BitfluxError, match="onpolicy stage samples"):
        calibrate_transformer(ModelSource(pipe.transformer), _random_teacher(pipe.transformer), config, calib,
                              progress=False)


def test_onpolicy_rounds_record_new_trajectories_and_distil_on_all_so_far(tmp_path):
    pipe = tiny_pipeline()
    calib = _calib(("distill", "onpolicy"), samples=2, onpolicy_steps=60, onpolicy_rounds=2,
                   pipeline_kwargs={"num_inference_steps": 3, "height": 16, "width": 16, "max_sequence_length": 8})
    config, prompts = _ternary_config(), ["a red circle", "a blue square"]
    model, report = calibrate(pipe, prompts, config, calib, workdir=tmp_path / "whole", progress=False)
    assert report.onpolicy_records == 2 * (2 * 2 * 3)
    assert len(report.onpolicy_error) == 2 and all(after < before for before, after in report.onpolicy_error)
    assert "onpolicy (24 fresh and own records, 2 rounds): velocity error" in report.summary()
    first, second = (TeacherData.load(tmp_path / "whole" / name)
                     for name in ("onpolicy.safetensors", "onpolicy-2.safetensors"))
    # the second round's trajectories start from other noise: no initial state in common with the first's
    starts = [data.inputs["hidden_states"][::3] for data in (first, second)]
    assert not any(torch.equal(a, b) for a in starts[0] for b in starts[1])
    # one round first, then a second in the same workdir: the same model as two rounds at once
    _, one_report = calibrate(pipe, prompts, config, dataclasses.replace(calib, onpolicy_rounds=1),
                              workdir=tmp_path / "grown", progress=False)
    assert one_report.onpolicy_error == report.onpolicy_error[:1]
    grown, grown_report = calibrate(pipe, prompts, config, calib, workdir=tmp_path / "grown", progress=False)
    assert grown_report.onpolicy_error == report.onpolicy_error
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in grown.state_dict().items())


def test_a_workdir_goes_on_with_the_stages_after_its_last_and_serves_a_run_of_fewer(tmp_path):
    """--calibration distill, then onpolicy in the same workdir: the blocks and the distillation are taken up,
    and the model is the one an onpolicy run makes at once. A run of fewer stages than the workdir holds reuses
    it too, and the workdir keeps the settings of the stages it holds."""
    pipe = tiny_pipeline()
    calib = _calib(("scales", "blockwise", "distill", "onpolicy"), samples=2, steps=5, distill_steps=20,
                   onpolicy_steps=20, pipeline_kwargs={"num_inference_steps": 2, "height": 16, "width": 16,
                                                       "max_sequence_length": 8})
    config, prompts = _ternary_config(), ["a red circle", "a blue square"]
    direct, _ = calibrate(pipe, prompts, config, calib, workdir=tmp_path / "direct", progress=False)
    fewer = dataclasses.replace(calib, stages=calib.stages[:3], onpolicy_steps=99)  # what it does not run: any
    calibrate(pipe, prompts, config, fewer, workdir=tmp_path / "grown", progress=False)
    grown, report = calibrate(pipe, prompts, config, calib, workdir=tmp_path / "grown", progress=False)
    assert "4 of 4 blocks taken from the workdir" in report.summary()
    assert all(torch.equal(tensor, direct.state_dict()[key]) for key, tensor in grown.state_dict().items())
    calibrate(pipe, prompts, config, fewer, workdir=tmp_path / "grown", progress=False)  # all taken up
    held = json.loads((tmp_path / "grown" / "manifest.json").read_text())["calibration"]
    assert held["stages"] == list(calib.stages) and held["onpolicy_steps"] == calib.onpolicy_steps
    with pytest.raises(BitfluxError, match=r"calibration onpolicy_steps \(20, now 7\)"):
        calibrate(pipe, prompts, config, dataclasses.replace(calib, onpolicy_steps=7), workdir=tmp_path / "grown",
                  progress=False)
    # the scales stage alone writes blocks that the blockwise stage would take for its own: refused
    with pytest.raises(BitfluxError, match="calibration stages"):
        calibrate(pipe, prompts, config, dataclasses.replace(calib, stages=("scales",)), workdir=tmp_path / "grown",
                  progress=False)


@pytest.mark.parametrize("stream", [True, False])
def test_the_teacher_without_text_encoders_records_what_the_whole_pipeline_does(tmp_path, stream):
    """quantize_calibrated's teacher: each batch's prompts encoded by the text encoders alone (T5 streamed), the
    transformer streamed a block at a time or held whole; its records are the whole pipeline's, bit for bit
    (a text length under the tokenizer's: the encoding pads to it as the pipeline does)."""
    from diffusers import FluxPipeline

    from bitflux.calibrate.quantize import teacher_pipeline
    from bitflux.calibrate.teacher import collect
    from bitflux.pipeline import encode_prompts

    tiny_pipeline().save_pretrained(tmp_path / "fp")
    prompts = ["a red circle", "a blue square", "a red square left of a blue circle"]
    settings = dict(samples=4, batch_size=3, progress=False, num_inference_steps=3, height=16, width=16,
                    max_sequence_length=5)  # trajectory 3 takes prompt 0 again, in another batch
    reference = FluxPipeline.from_pretrained(tmp_path / "fp", torch_dtype=torch.float32)
    owned_weights(reference.transformer)
    whole = collect(reference, prompts, **settings)
    pipe = teacher_pipeline(tmp_path / "fp", FolderSource(tmp_path / "fp" / "transformer", torch.float32),
                            torch.device("cpu"), stream=stream)
    assert (not list(pipe.transformer.transformer_blocks.parameters())) == stream
    separate = collect(pipe, prompts, encode=lambda batch, length: encode_prompts(tmp_path / "fp", batch,
                                                                                 max_sequence_length=length),
                       **settings)
    assert len(separate) == 4 * 3 and separate.inputs.keys() == whole.inputs.keys()
    assert separate.prompts["encoder_hidden_states"].shape[1] == 5
    for key in whole.inputs:
        assert torch.equal(separate.inputs[key], whole.inputs[key]), key
    for key in whole.prompts:
        assert torch.equal(separate.prompts[key], whole.prompts[key]), key
    assert torch.equal(separate.velocity, whole.velocity)


@pytest.mark.parametrize("stream", [True, False])
def test_quantize_calibrated_writes_a_loadable_pipeline(tmp_path, stream):
    from bitflux import load_pipeline
    from bitflux.calibrate.quantize import quantize_calibrated

    tiny_pipeline().save_pretrained(tmp_path / "fp")
    calib = _calib(("scales", "blockwise", "onpolicy"), samples=2, onpolicy_steps=4,
                   pipeline_kwargs={"num_inference_steps": 3, "height": 16, "width": 16})
    report = quantize_calibrated(tmp_path / "fp", tmp_path / "out", ["a red circle"], _ternary_config(), calib,
                                 device="cpu", progress=False, stream_teacher=stream)
    assert report.records == 2 * 3 and len(report.blocks) == len(block_names(TINY_CONFIG))
    assert report.onpolicy_records == 2 * 2 * 3 and report.teacher_streamed == stream
    pipe = load_pipeline(tmp_path / "out")
    assert any(isinstance(m, TernaryLinear) for m in pipe.transformer.modules())
    image = pipe(["a red circle"], height=16, width=16, num_inference_steps=2, max_sequence_length=8).images[0]
    assert image.size == (16, 16)
    with pytest.raises(BitfluxError, match="exists"):
        quantize_calibrated(tmp_path / "fp", tmp_path / "out", ["a red circle"], calibration=calib, device="cpu")
    with pytest.raises(BitfluxError, match="whole FLUX pipeline"):
        quantize_calibrated(tmp_path / "fp" / "transformer", tmp_path / "out2", ["a"], calibration=calib, device="cpu")
    calib.pipeline_kwargs.update(negative_prompt="blurry", prompt_2="a circle", true_cfg_scale=4.0)
    with pytest.raises(BitfluxError, match="^negative_prompt, prompt_2: not taken here"):
        quantize_calibrated(tmp_path / "fp", tmp_path / "out2", ["a"], calibration=calib, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_run.sh runs it)")
def test_quantize_calibrated_with_the_onpolicy_stage_on_a_gpu(tmp_path):
    """In bf16 on a GPU: the student samples with its ternary kernels while the teacher labels its states."""
    import math

    from bitflux.calibrate.quantize import quantize_calibrated

    tiny_pipeline().save_pretrained(tmp_path / "fp")
    calib = _calib(("scales", "blockwise", "distill", "onpolicy"), samples=2, distill_steps=4, onpolicy_steps=4,
                   pipeline_kwargs={"num_inference_steps": 3, "height": 16, "width": 16})
    report = quantize_calibrated(tmp_path / "fp", tmp_path / "out", ["a red circle"], _ternary_config(), calib,
                                 device="cuda", progress=False)
    assert report.onpolicy_records == 2 * 2 * 3
    assert all(math.isfinite(e) for before_after in report.onpolicy_error for e in before_after)
    assert report.peak_device_bytes > 0


def _source(weights="these weights"):
    """What check_workdir reads of a calibration source: its config and its weights' fingerprint."""
    from types import SimpleNamespace

    return SimpleNamespace(config=TINY_CONFIG, fingerprint=lambda: weights)


def test_a_workdir_of_an_earlier_layout_is_refused(tmp_path):
    """Workdirs before layout 2 saved blocks with tq2 codes whatever the format: not resumed into tq1 layers."""
    from bitflux.calibrate import check_workdir

    config, calib = TernaryConfig(format="tq1"), CalibrationConfig()
    workdir = check_workdir(tmp_path, config, calib, _source(), ["a red circle"])
    manifest = workdir / "manifest.json"
    earlier = json.loads(manifest.read_text())
    del earlier["workdir"]
    manifest.write_text(json.dumps(earlier))
    with pytest.raises(BitfluxError, match="holds a calibration run of other workdir layout"):
        check_workdir(tmp_path, config, calib, _source(), ["a red circle"])


def test_a_workdir_from_before_a_setting_existed_resumes_with_its_default(tmp_path):
    from bitflux.calibrate import check_workdir

    stages = ("scales", "blockwise", "onpolicy")
    config, calib = TernaryConfig(), CalibrationConfig(stages=stages)
    manifest = check_workdir(tmp_path, config, calib, _source(), ["a red circle"]) / "manifest.json"
    earlier = json.loads(manifest.read_text())
    del earlier["calibration"]["onpolicy_steps"], earlier["calibration"]["onpolicy_rounds"]
    manifest.write_text(json.dumps(earlier))
    check_workdir(tmp_path, config, calib, _source(), ["a red circle"])
    with pytest.raises(BitfluxError, match=r"of other calibration onpolicy_steps \(\d+, now 7\)"):
        check_workdir(tmp_path, config, CalibrationConfig(stages=stages, onpolicy_steps=7), _source(),
                      ["a red circle"])


def test_a_workdir_of_other_weights_of_the_same_architecture_is_refused(tmp_path, tiny_folder):
    """Same config and prompts, other weights (a fine-tune): the workdir's blocks are not the source's. The same
    weights are the same whether a folder or a model in memory holds them."""
    from bitflux.calibrate import check_workdir
    from bitflux.calibrate.sources import FolderSource, ModelSource

    config, calib, prompts = TernaryConfig(), CalibrationConfig(), ["a red circle"]
    check_workdir(tmp_path / "wd", config, calib, FolderSource(tiny_folder), prompts)
    check_workdir(tmp_path / "wd", config, calib, ModelSource(build_tiny()), prompts)  # the same: resumed
    with pytest.raises(BitfluxError, match="of other source weights"):
        check_workdir(tmp_path / "wd", config, calib, ModelSource(build_tiny(seed=1)), prompts)


def test_a_workdir_tells_prompts_with_a_newline_from_two_prompts(tmp_path):
    from bitflux.calibrate import check_workdir

    args = (TernaryConfig(), CalibrationConfig(), _source())
    check_workdir(tmp_path, *args, ["a red circle\na blue square"])
    with pytest.raises(BitfluxError, match="other prompts|other calibration prompts|prompts"):
        check_workdir(tmp_path, *args, ["a red circle", "a blue square"])


def test_a_workdir_of_prompts_hashed_joined_resumes(tmp_path):
    """Workdirs written before the prompts were hashed as a list (their lines joined) go on."""
    import hashlib

    from bitflux.calibrate import check_workdir

    args, prompts = (TernaryConfig(), CalibrationConfig(), _source()), ["a red circle", "a blue square"]
    manifest = check_workdir(tmp_path, *args, prompts) / "manifest.json"
    earlier = json.loads(manifest.read_text())
    earlier["prompts_sha256"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    manifest.write_text(json.dumps(earlier))
    check_workdir(tmp_path, *args, prompts)
    with pytest.raises(BitfluxError, match="prompts"):
        check_workdir(tmp_path, *args, ["a red circle"])


def test_a_workdir_compares_only_the_settings_its_stages_read(tmp_path):
    """Per-block steps for a scales-only run, distillation steps for a blockwise one: not read, not compared."""
    from bitflux.calibrate import check_workdir

    def check(workdir, **settings):
        check_workdir(tmp_path / workdir, TernaryConfig(), CalibrationConfig(**settings), _source(), ["a red circle"])

    check("scales", stages=("scales",), steps=40)
    check("scales", stages=("scales",))
    check("blockwise", stages=("scales", "blockwise"), steps=40, distill_steps=7)
    check("blockwise", stages=("scales", "blockwise"), steps=40)
    with pytest.raises(BitfluxError, match=r"other calibration steps \(40, now 200\)"):
        check("blockwise", stages=("scales", "blockwise"))


def test_a_workdir_that_cannot_be_used_is_a_one_line_error(tmp_path):
    from bitflux.calibrate import check_workdir

    args = (TernaryConfig(), CalibrationConfig(), _source(), ["a prompt"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(BitfluxError, match="cannot be a folder"):
        check_workdir(tmp_path / "file", *args)
    check_workdir(tmp_path / "wd", *args)
    (tmp_path / "wd" / "manifest.json").write_text("{not json")
    with pytest.raises(BitfluxError, match="manifest.json: unreadable"):
        check_workdir(tmp_path / "wd", *args)
    (tmp_path / "teacher.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BitfluxError, match="damaged workdir record"):
        TeacherData.load(tmp_path / "teacher.safetensors")


def test_damaged_distillation_records_are_one_line_errors(tmp_path):
    """A truncated optimiser checkpoint or a garbled start record: named, with what to do about it."""
    from bitflux.calibrate.latent import fit, to_latent

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    to_latent(model, TernaryConfig(include=(".",)))
    (tmp_path / "distill.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BitfluxError, match="distill.pt: a damaged workdir record"):
        fit(model, lambda index: model(torch.ones(1, 8)).sum(), 4, 2, 2, 1e-2, 1e-3, 0, False, "distill",
            checkpoint=tmp_path / "distill.pt")


def test_a_byte_order_mark_is_no_part_of_the_first_prompt(tmp_path):
    from bitflux.calibrate.prompts import read_prompts

    (tmp_path / "p.txt").write_bytes("\ufeffa red circle\ntwo blue squares\n".encode())
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "two blue squares"]


def test_calibrate_samples_as_generate_does_unless_told(monkeypatch):
    """The Python route took diffusers' defaults (1024 x 1024, 512 tokens: minutes a trajectory on a small
    model) where the command took `bitflux generate`'s."""
    import bitflux.calibrate as calibration
    from bitflux.calibrate.quantize import teacher_settings

    seen = {}

    def stop(pipeline, prompts, calib, *args):
        seen.update(calib.pipeline_kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(calibration, "teacher_data", stop)
    pipe = tiny_pipeline()
    with pytest.raises(RuntimeError, match="stop"):
        calibrate(pipe, ["a red circle"], None, CalibrationConfig(pipeline_kwargs={"num_inference_steps": 3}),
                  progress=False)
    assert seen == teacher_settings(pipe, num_inference_steps=3) and seen["guidance_scale"] == 3.5


def test_the_summary_says_which_blocks_a_resumed_run_took_from_its_workdir():
    from bitflux.calibrate import CalibrationReport
    from bitflux.calibrate.blockwise import BlockRecord

    report = CalibrationReport(("scales", "blockwise"), blocks=[
        BlockRecord("transformer_blocks.0", resumed=True), BlockRecord("transformer_blocks.1", loss_before=0.2,
                                                                       loss_after=0.1)])
    assert "1 of 2 blocks taken from the workdir, calibrated by an earlier run (transformer_blocks.0)" in \
        report.summary()


def test_a_source_folder_of_another_dtype_is_read_in_the_pipelines(tmp_path):
    """A bf16 transformer folder (FLUX.1's, the demo's) beside a pipeline computing in fp32: the blocks are read in
    fp32 (they were read in bf16 and the first block's matmul failed)."""
    pipe = tiny_pipeline()
    pipe.transformer.to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    pipe.transformer.to(torch.float32)
    calib = _calib(("scales", "blockwise"), samples=1,
                   pipeline_kwargs={"num_inference_steps": 2, "height": 16, "width": 16, "max_sequence_length": 8})
    model, _ = calibrate(pipe, ["a red circle"], _ternary_config("channel"), calib, source=tmp_path / "transformer",
                         progress=False)
    assert all(m.weight_scale.dtype == torch.float32 for m in model.modules() if isinstance(m, TernaryLinear))
