"""The style-LoRA training script on the embedded demo model: a few steps lower the held-out loss, and the
file it writes loads with load_lora and `bitflux generate --lora`."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bitflux.cli import main as cli
from bitflux.demo import scenes as S
from bitflux.interop.lora import load_lora
from bitflux.interop.train_lora import is_styled, main, styled_scenes


def test_styled_scenes_are_inked_and_detected_as_such():
    scenes = styled_scenes(8, "ink", torch.Generator().manual_seed(0))
    assert all(spec.category in ("single_object", "two_object", "counting") for spec in scenes.specs())
    assert all(is_styled(image) for image in S.to_uint8(S.render(scenes)))
    plain = S.scenes_for_captions(["a red circle", "a blue square and a black triangle"])
    assert not any(is_styled(image) for image in S.to_uint8(S.render(plain)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "style.safetensors"
    assert main(["--out", str(out), "--steps", "8", "--batch", "8", "--scenes", "16", "--rank", "2",
                 "--lr", "1e-2"]) == 0
    return out


def test_training_lowers_the_loss_and_writes_peft_keys(trained):
    with safe_open(str(trained), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert float(meta["held_out_loss_after"]) < float(meta["held_out_loss_before"])
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha"))
               for k in keys)
    assert not list(trained.parent.glob(".*.tmp"))


def test_the_file_loads_and_changes_the_output(trained, tmp_path, capsys):
    from bitflux import demo_model_path, load_pipeline

    transformer = load_pipeline(demo_model_path()).transformer
    adapter = load_lora(transformer, trained)
    assert len(adapter.names) == 52 and all(b.down.shape[0] == 2 for b in adapter.branches)
    images = {}
    for name, extra in {"plain": [], "lora": ["--lora", str(trained)]}.items():
        out = tmp_path / f"{name}.png"
        assert cli(["generate", "a red circle", "--steps", "2", *extra, "-o", str(out)]) == 0, capsys.readouterr().err
        images[name] = np.asarray(Image.open(out))
    assert not np.array_equal(images["plain"], images["lora"])


def test_bad_output_name_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "style.bin"), "--steps", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_missing_output_folder_is_refused_before_training(tmp_path, capsys):
    import time

    start = time.monotonic()
    assert main(["--out", str(tmp_path / "nodir" / "style.safetensors"), "--steps", "300"]) == 2
    assert "nodir: no such folder" in capsys.readouterr().err and time.monotonic() - start < 5


@pytest.mark.parametrize("option,value", [("--lr", "nan"), ("--lr", "-5"), ("--lr", "0"), ("--lr", "1e39"),
                                          ("--guidance", "inf"), ("--guidance", "1e300")])
def test_bad_settings_are_refused_before_training(tmp_path, capsys, option, value):
    assert main(["--out", str(tmp_path / "style.safetensors"), "--steps", "300", option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr must be a positive number" in err


def test_a_diverged_run_is_not_written(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "style.safetensors"), "--steps", "2", "--batch", "2", "--scenes", "4",
                 "--lr", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "the training diverged" in err and not list(tmp_path.iterdir())


def test_training_on_the_ternary_model_lowers_the_loss(tmp_path):
    """--ternary: the pairs learn on the shipped calibrated ternary transformer (its layers pass the input's
    gradient through), and the file loads onto it."""
    from bitflux import load_pipeline
    from bitflux.pipeline import demo_ternary_path

    out = tmp_path / "ternary-style.safetensors"
    assert main(["--out", str(out), "--ternary", "--steps", "6", "--batch", "8", "--scenes", "16", "--rank", "2",
                 "--lr", "1e-2"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ternary"] == "True"
    assert float(meta["held_out_loss_after"]) < float(meta["held_out_loss_before"])
    assert len(load_lora(load_pipeline(demo_ternary_path()).transformer, out).names) == 52
