"""Routes through trained edits: the search over caption rewrites, and the translator's one pass per step."""

from pathlib import Path

import pytest
import torch

from ddstrans.routes import plan_route, rewrite_moves
from ddstrans.shapes.defaults import shapes_tasks
from ddstrans.tasks import Task

ROOT = Path(__file__).resolve().parents[1]
ZERO_SHOT = ROOT / "configs" / "tasks" / "shapes_zero_shot.yaml"
RED = "a red circle on a striped background"


@pytest.fixture(scope="module")
def zero_shot_tasks():
    return shapes_tasks(ZERO_SHOT)


def test_a_held_out_color_pair_goes_through_a_trained_pivot(zero_shot_tasks):
    route = plan_route(RED, "a yellow circle on a striped background", zero_shot_tasks)
    assert [s.task for s in route] == ["to_blue_from_red_yellow", "to_yellow_from_green_blue"]
    assert [s.target for s in route] == ["a blue circle on a striped background", "a yellow circle on a striped background"]
    assert route[1].source == route[0].target  # each pass starts where the last one ended


def test_a_composition_is_one_trained_edit_per_attribute(zero_shot_tasks):
    route = plan_route(RED, "a blue square on a checkered background", zero_shot_tasks)
    assert [s.task for s in route] == ["to_blue_from_red_yellow", "to_square", "to_checkered"]
    assert plan_route(RED, "a blue square on a checkered background", zero_shot_tasks, max_passes=2) is None


def test_trained_pairs_take_one_pass_and_equal_prompts_none(zero_shot_tasks):
    assert [s.task for s in plan_route(RED, "a green circle on a striped background", zero_shot_tasks)] == [
        "to_green_from_red_yellow"]
    assert plan_route(RED, RED, zero_shot_tasks) == []


def test_unreachable_targets_and_fixed_prompt_tasks(zero_shot_tasks):
    assert plan_route(RED, "a purple circle on a striped background", zero_shot_tasks) is None
    fixed = Task("cat2dog", "a cat", "a dog")
    per_caption_no_rewrite = Task("same", "{caption}", "{caption}")
    assert rewrite_moves([fixed, per_caption_no_rewrite]) == []
    assert plan_route("a cat", "a dog", [fixed]) is None  # a fixed pair is no move from an arbitrary prompt
    with pytest.raises(ValueError, match="max_passes"):
        plan_route(RED, RED, zero_shot_tasks, max_passes=0)


@pytest.fixture(scope="module")
def text_translator(tmp_path_factory):
    from omegaconf import OmegaConf

    from ddstrans.export import export_checkpoint
    from ddstrans.testing import make_shapes_checkpoint
    from ddstrans.translator import Translator

    tmp = tmp_path_factory.mktemp("route")
    tasks = OmegaConf.to_container(OmegaConf.load(ZERO_SHOT).tasks)
    ckpt = make_shapes_checkpoint(tmp / "c.ckpt", conditioning="text", tasks=tasks,
                                  teacher_root=ROOT / "checkpoints" / "shapes-teacher")
    return Translator.from_pretrained(export_checkpoint(ckpt, tmp / "text", examples=[]))


def test_translator_makes_one_pass_per_step(text_translator):
    tr = text_translator
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    blue, yellow = RED.replace("red", "blue"), RED.replace("red", "yellow")
    routed = tr.translate_latents(x, source=RED, target=yellow, route=True)
    by_hand = tr.translate_latents(tr.translate_latents(x, source=RED, target=blue), source=blue, target=yellow)
    torch.testing.assert_close(routed, by_hand)
    assert not torch.allclose(routed, tr.translate_latents(x, source=RED, target=yellow), atol=1e-3)
    # no route: the pair itself, one pass
    purple = RED.replace("red", "purple")
    torch.testing.assert_close(tr.translate_latents(x, source=RED, target=purple, route=True),
                               tr.translate_latents(x, source=RED, target=purple))
    torch.testing.assert_close(tr.translate_latents(x, source=RED, target=RED, route=True), x)
    assert [s.task for s in tr.route(RED, purple)] == [""]


def test_a_pair_is_planned_once(text_translator, monkeypatch):
    """Showing a route and then translating with it (the CLI, the demo page, evaluation image by image) search once."""
    import ddstrans.routes

    calls = []
    monkeypatch.setattr(ddstrans.routes, "plan_route", lambda *a, **k: calls.append(a) or plan_route(*a, **k))
    blue_square = "a blue square on a striped background"
    shown = text_translator.route(RED, blue_square)
    shown.clear()  # the caller's list: the translator's plan is not changed through it
    x = torch.zeros(2, 3, 32, 32)
    text_translator.translate_latents(x, source=RED, target=blue_square, route=True)
    text_translator.translate_latents(x[:1], source=RED, target=blue_square, route=True)
    assert len(calls) == 1 and [s.task for s in text_translator.route(RED, blue_square)] == [
        s.task for s in plan_route(RED, blue_square, text_translator.task_table.tasks)]


def test_route_needs_prompts_and_text_conditioning(text_translator, shapes_translator_dir):
    from ddstrans.translator import Translator

    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="route=True needs source= and target="):
        text_translator.translate_latents(x, "to_square", route=True)
    with pytest.raises(ValueError, match="text-conditioned"):
        Translator.from_pretrained(shapes_translator_dir).translate_latents(x, source=RED, target=RED, route=True)


def test_translate_cli_route(text_translator, shapes_translator_dir, tmp_path, capsys):
    """``ddstrans translate --route`` says which passes it makes and writes the routed translation."""
    import numpy as np
    from PIL import Image

    from ddstrans.cli.main import main

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "in.png")
    yellow = RED.replace("red", "yellow")
    args = ["translate", str(text_translator.path), str(tmp_path / "in.png"), "--source", RED, "--target", yellow,
            "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "routed"), "--route"]) == 0
    assert "route: 2 pass(es): to_blue_from_red_yellow" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "direct")]) == 0
    routed, direct = (np.asarray(Image.open(tmp_path / d / "in.png")) for d in ("routed", "direct"))
    expected = text_translator(Image.open(tmp_path / "in.png"), source=RED, target=yellow, route=True)
    assert np.array_equal(routed, np.asarray(expected)) and not np.array_equal(routed, direct)
    assert main(["translate", str(shapes_translator_dir), str(tmp_path / "in.png"), "-o", str(tmp_path / "t"),
                 "--source", RED, "--target", yellow, "--route"]) == 1
    assert "--route needs a text-conditioned translator" in capsys.readouterr().err


def test_shapes_evaluation_scores_the_routed_translation(text_translator, shapes_translator_dir):
    from ddstrans.shapes.defaults import shapes_task
    from ddstrans.shapes.evaluation import build_eval_set, evaluate, run_method
    from ddstrans.translator import Translator

    task = shapes_task("red_to_yellow")
    es = build_eval_set(task, 3)
    out, _ = run_method("routed", es, translator=text_translator)
    by_hand = torch.cat([text_translator.translate_tensor(es.inputs[i : i + 1], source=s, target=t, route=True)
                         for i, (s, t) in enumerate(zip(es.src_captions, es.tgt_captions))])
    torch.testing.assert_close(out, by_hand)
    rows = evaluate([task], 3, ["network", "routed"], translator=text_translator)
    assert [r["method"] for r in rows] == ["network", "routed"] and rows[0]["keep_psnr"] != rows[1]["keep_psnr"]
    with pytest.raises(ValueError, match="text-conditioned"):
        run_method("routed", es, translator=Translator.from_pretrained(shapes_translator_dir))


def test_demo_page_routes_a_pair_and_names_its_passes(text_translator):
    """The page's route switch runs the same passes as ``route=True`` and its status line names them."""
    import numpy as np
    from PIL import Image

    from ddstrans.demo import CUSTOM, translate_one

    im = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    yellow = RED.replace("red", "yellow")
    routed = translate_one(text_translator, im, CUSTOM, RED, yellow, route=True)
    direct = translate_one(text_translator, im, CUSTOM, RED, yellow)
    assert np.array_equal(np.asarray(routed.images[0]),
                          np.asarray(text_translator(im, source=RED, target=yellow, route=True)))
    assert not np.array_equal(np.asarray(routed.images[0]), np.asarray(direct.images[0]))
    status = routed.status("cpu (PyTorch)")
    assert "routed, 2 passes: to_blue_from_red_yellow → " in status and "routed" not in direct.status("cpu")
    # a task is one trained pass: the switch leaves it alone
    task = text_translator.tasks[0]
    assert np.array_equal(np.asarray(translate_one(text_translator, im, task, route=True).images[0]),
                          np.asarray(text_translator(im, task=task)))
