"""ShapeEval: the prompt set, the detector's accuracy on rendered ground truth, and the scoring rules."""

import json
import math

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


def _records(passes: dict[str, list[bool]], seed: int = 0) -> list[dict]:
    return [{"seed": seed, "index": 100 * c + i, "category": cat, "passed": p}
            for c, (cat, ps) in enumerate(passes.items()) for i, p in enumerate(ps)]


def test_overall_standard_error_is_the_categories_binomial_errors_averaged():
    cats = list(E.CATEGORIES)[:2]
    res = E.summarize(_records({cats[0]: [True, False, True, True], cats[1]: [False, False, True, False]}), (0,))
    assert res["overall"] == pytest.approx((0.75 + 0.25) / 2)
    # each category: sample variance 0.25 (ddof 1) over 4 images; the overall averages 2 categories
    assert res["overall_stderr"] == pytest.approx(math.sqrt(0.25 / 4 + 0.25 / 4) / 2)
    assert E.summarize(_records({cats[0]: [True] * 5}), (0,))["overall_stderr"] == 0.0
    # one image in a category: its variance, and so the overall's error, is unknown (it printed as ±0.0)
    assert math.isnan(E.summarize(_records({cats[0]: [True], cats[1]: [True, False]}), (0,))["overall_stderr"])


def test_paired_difference_counts_only_the_images_that_changed():
    cats = list(E.CATEGORIES)[:2]
    reference = _records({cats[0]: [True, False, True, True], cats[1]: [False, False, True, False]})
    assert E.paired_difference(reference, reference) == (0.0, 0.0)
    variant = [dict(r, passed=not r["passed"]) if r["index"] == 1 else r for r in reference]  # one image now passes
    difference, stderr = E.paired_difference(variant, reference)
    assert difference == pytest.approx((1 / 4) / 2)
    assert stderr == pytest.approx(math.sqrt(np.var([0, 1, 0, 0], ddof=1) / 4) / 2)
    # about a third of the unpaired error of either score when all but 2 of 80 images agree
    many = _records({cats[0]: [i % 2 == 0 for i in range(40)], cats[1]: [i % 3 == 0 for i in range(40)]})
    flipped = [dict(r, passed=True) if r["index"] in (1, 3) else r for r in many]
    assert E.paired_difference(flipped, many)[1] < 0.4 * E.summarize(flipped, (0,))["overall_stderr"]
    with pytest.raises(ValueError, match="no reference image for seed 1, prompt 0"):
        E.paired_difference(_records({cats[0]: [True]}, seed=1), reference)


def test_the_eval_table_shows_errors_and_the_difference_from_full_precision():
    from bitflux.eval.runner import variant_table

    cats = list(E.CATEGORIES)[:2]
    fp = E.summarize(_records({cats[0]: [True, False, True, True], cats[1]: [False, False, True, False]}), (0,))
    ternary = E.summarize(_records({cats[0]: [True, False, False, True], cats[1]: [False, False, True, False]}), (0,))
    ternary.update(vs_fp={"difference": -0.125, "stderr": 0.0625}, psnr=20.0, ssim=0.8)
    lines = variant_table({"fp": fp, "ternary": ternary}).splitlines()
    assert "50.0 ±17.7" in lines[1] and lines[1].split()[3] == "-"
    assert "37.5 ±" in lines[2] and "-12.5 ±6.2" in lines[2] and "20.00" in lines[2]
