"""The procedural scene generator and its caption grammar."""

import pytest
import torch

from bitflux.demo import scenes as S


def test_same_seed_same_scenes_and_other_seed_differs():
    a, b, c = S.sample_scenes(64, 3), S.sample_scenes(64, 3), S.sample_scenes(64, 4)
    assert a.captions() == b.captions()
    assert torch.equal(S.render(a), S.render(b))
    assert a.captions() != c.captions()


def test_every_caption_round_trips_through_the_parser():
    caps = S.all_captions()
    assert len(caps) > 1000
    for cap in caps:
        assert S.caption_of(S.parse_caption(cap)) == cap
    assert {S.parse_caption(c).category for c in caps} == set(S.TEMPLATES)


@pytest.mark.parametrize("bad", ["a dog", "five circles", "a red", "a circle and a red square", "a circle above a square"])
def test_text_outside_the_grammar_is_rejected(bad):
    with pytest.raises(ValueError):
        S.parse_caption(bad)


def test_scenes_match_their_captions():
    scenes = S.sample_scenes(512, 0)
    specs = scenes.specs()
    for i, spec in enumerate(specs):
        objs = scenes.objects(i)
        assert len(objs) == spec.count
        for o, want in zip(objs, spec.objects):
            assert o["shape"] == want.shape
            assert want.color is None or o["color"] == want.color
        for a in range(len(objs)):  # bounding boxes never touch
            for b in range(a + 1, len(objs)):
                gap = max(abs(objs[a]["center"][k] - objs[b]["center"][k]) for k in range(2))
                assert gap >= (objs[a]["size"] + objs[b]["size"]) / 2 + 2.9
        for o in objs:
            assert all(o["size"] / 2 <= c <= S.IMAGE_SIZE - o["size"] / 2 for c in o["center"])
    pos = scenes.template == S.TEMPLATES.index("position")
    assert pos.any()
    ok = S.relation_holds(scenes.center[:, 0], scenes.size[:, 0], scenes.center[:, 1], scenes.size[:, 1], scenes.relation)
    assert ok[pos].all()


def test_render_paints_each_object_in_its_colour():
    scenes = S.scenes_for_captions(["a red square", "a blue circle", "a green triangle"], seed=1)
    img = S.to_uint8(S.render(scenes))
    assert img.shape == (3, S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
    for i, name in enumerate(["red", "blue", "green"]):
        x, y = (int(v) for v in scenes.center[i, 0])
        dy = int(scenes.size[i, 0]) // 4 if name == "green" else 0  # a triangle's middle is below its box centre
        assert tuple(img[i, y + dy, x]) == S.COLORS[name]
        assert tuple(img[i, 0, 0]) == S.BACKGROUND or scenes.center[i, 0].min() < scenes.size[i, 0]


def test_calibration_prompts_are_seeded_grammatical_and_disjoint_from_shapeeval():
    from bitflux.eval.shapeeval import prompt_set

    cal = S.calibration_prompts(200, seed=5)
    assert cal == S.calibration_prompts(200, seed=5) and cal != S.calibration_prompts(200, seed=6)
    assert len(cal) == 200 and not set(cal) & {it.prompt for it in prompt_set()}
    cats = {S.parse_caption(c).category for c in cal}
    assert cats == {"position", "color_attr", "count_color"}
