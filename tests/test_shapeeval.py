"""ShapeEval: the prompt set, the detector's accuracy on rendered ground truth, and the scoring rules."""

import json

import numpy as np
import pytest

from bitflux.demo import scenes as S
from bitflux.eval import shapeeval as E


def test_prompt_set_is_fixed_and_covers_the_six_categories():
    items = E.prompt_set()
    assert items == E.prompt_set()
    assert len(items) == 6 * E.PER_CATEGORY
    assert [it.index for it in items] == list(range(len(items)))
    for cat in E.CATEGORIES:
        prompts = [it.prompt for it in items if it.category == cat]
        assert len(prompts) == E.PER_CATEGORY
        assert all(S.parse_caption(p).category == cat for p in prompts)
    assert E.prompt_set(per_category=2) == [it for it in E.prompt_set(per_category=2)]
    assert len(E.prompt_set(categories=("counting",), per_category=5)) == 5


def test_detector_accuracy_on_rendered_ground_truth_is_at_least_97_percent_per_category():
    result = E.evaluate(E.ground_truth_generate_fn(), seeds=(0, 1), batch_size=96, progress=False, grid=False)
    assert result["n_images"] == 2 * 6 * E.PER_CATEGORY
    for cat, acc in result["categories"].items():
        assert acc >= 0.97, (cat, acc)


def test_detect_reads_shape_colour_and_position():
    scenes = S.scenes_for_captions(["a yellow square to the left of a purple circle"], seed=2)
    objs = E.detect(S.to_uint8(S.render(scenes))[0])
    assert sorted((o["shape"], o["color"]) for o in objs) == [("circle", "purple"), ("square", "yellow")]
    square = next(o for o in objs if o["shape"] == "square")
    assert np.allclose(square["center"], scenes.center[0, 0].tolist(), atol=1.0)


def _render(caption, seed=0):
    return S.to_uint8(S.render(S.scenes_for_captions([caption], seed=seed)))[0]


@pytest.mark.parametrize(
    "prompt, shown",
    [
        ("a circle", "a square"),
        ("a red circle", "a blue circle"),
        ("a circle and a square", "a circle and a triangle"),
        ("three squares", "four squares"),
        ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
        ("a red circle and a blue square", "a blue circle and a red square"),
    ],
)
def test_a_wrong_image_fails_and_the_right_one_passes(prompt, shown):
    assert E.score(prompt, _render(prompt))[0]
    assert not E.score(prompt, _render(shown))[0]


def test_blank_and_noise_images_pass_nothing():
    blank = np.full((64, 64, 3), S.BACKGROUND, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for it in E.prompt_set(per_category=3):
        assert not E.score(it.prompt, blank)[0]
        assert not E.score(it.prompt, noise)[0]


def test_image_formats_and_sizes_are_normalised():
    img = _render("a green triangle")
    from PIL import Image

    big = Image.fromarray(img).resize((128, 128), Image.NEAREST)
    for form in (img, img.astype(np.float32) / 255, big, img.transpose(2, 0, 1).astype(np.float32) / 255):
        assert E.score("a green triangle", form)[0]


def test_evaluate_writes_json_and_a_marked_grid(tmp_path):
    items = E.prompt_set(per_category=2)
    res = E.evaluate(E.ground_truth_generate_fn(), items=items, seeds=(0,), out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "shapeeval.json").read_text())
    assert saved["version"] == E.VERSION and saved["overall"] == res["overall"] == 1.0
    assert len(saved["records"]) == len(items) and set(saved["categories"]) == set(E.CATEGORIES)
    from PIL import Image

    assert Image.open(tmp_path / "shapeeval_grid.png").size[0] > 64 * 8


def test_cli_ground_truth(tmp_path, capsys):
    assert E.main(["--ground-truth", "--out", str(tmp_path), "--per-category", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["overall"] == 1.0


def test_evaluate_takes_plain_prompts_and_reports_their_categories():
    prompts = ["two red circles", "a green square above a black circle"]
    res = E.evaluate(E.ground_truth_generate_fn(), prompts=prompts, progress=False, grid=False)
    assert res["categories"] == {"position": 1.0, "count_color": 1.0}
    assert [r["prompt"] for r in res["records"]] == prompts
