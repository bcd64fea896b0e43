"""Per-image tasks: prompts filled from each image's caption and rewritten, encoded through the teacher."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from ddstrans.prompts import Rewrite, fill
from ddstrans.shapes.defaults import shapes_tasks
from ddstrans.tasks import Task, TaskTable, as_tasks

COLOR = r"\b(red|green|blue|yellow)\b"


def test_fill_and_rewrite():
    assert fill("{caption}, high quality", "a cat") == "a cat, high quality"
    assert fill("a photo of a cat", None) == "a photo of a cat"
    with pytest.raises(ValueError, match="caption"):
        fill("{caption}", None)
    assert Rewrite(COLOR, "blue")("a red circle on a striped background") == "a blue circle on a striped background"
    with pytest.raises(ValueError, match="invalid rewrite"):
        Rewrite("(unclosed", "x")


def test_task_prompts_per_caption():
    t = Task("to_blue", "{caption}", "{caption}", {"pattern": COLOR, "replacement": "blue"})
    assert t.per_image
    cap = "a green square on a checkered background"
    assert t.source_for(cap) == cap
    assert t.target_for(cap) == "a blue square on a checkered background"
    assert not Task("c2l", "a cat", "a lion").per_image
    with pytest.raises(ValueError, match="rewrite"):
        Task("bad", "{caption}", "{caption}", {"pattern": COLOR})


def test_shapes_tasks_change_one_attribute_each():
    tasks = {t.name: t for t in shapes_tasks()}
    cap = "a red circle on a striped background"
    assert tasks["to_blue"].target_for(cap) == "a blue circle on a striped background"
    assert tasks["to_square"].target_for(cap) == "a red square on a striped background"
    assert tasks["to_checkered"].target_for(cap) == "a red circle on a checkered background"


def test_embeddings_for_fills_captions_and_keeps_fixed_tasks(tiny_teacher):
    tasks = [
        Task("cat2lion", "a photo of a cat", "a photo of a lion"),
        Task("to_blue", "{caption}", "{caption}", {"pattern": COLOR, "replacement": "blue"}),
    ]
    table = TaskTable.build(tasks, tiny_teacher)
    ids = torch.tensor([0, 1, 1])
    caps = ["ignored", "a red circle on a striped background", "a green square on a checkered background"]
    src, tgt = table.embeddings_for(ids, caps, tiny_teacher)
    enc = tiny_teacher.encode_prompts
    torch.testing.assert_close(src[0], enc(["a photo of a cat"])[0].float())
    torch.testing.assert_close(tgt[0], enc(["a photo of a lion"])[0].float())
    torch.testing.assert_close(src[1], enc([caps[1]])[0].float())
    torch.testing.assert_close(tgt[1], enc(["a blue circle on a striped background"])[0].float())
    torch.testing.assert_close(tgt[2], enc(["a blue square on a checkered background"])[0].float())
    with pytest.raises(ValueError, match="caption"):
        table.embeddings_for(ids, None, tiny_teacher)
    # a batch of fixed tasks only needs no captions
    src0, _ = table.embeddings_for(torch.tensor([0, 0]), None, tiny_teacher)
    assert src0.shape[0] == 2


def test_per_image_tasks_roundtrip_through_the_table_json(tiny_teacher, tmp_path):
    tasks = [Task("to_blue", "{caption}", "{caption}", {"pattern": COLOR, "replacement": "blue"})]
    table = TaskTable.build(tasks, tiny_teacher)
    table.save(tmp_path / "t.safetensors", tmp_path / "t.json")
    back = TaskTable.load(tmp_path / "t.safetensors", tmp_path / "t.json")
    assert back.tasks[0].rewrite == tasks[0].rewrite and back.per_image


def test_a_list_of_rewrites_applies_in_order_and_survives_the_table_json():
    from ddstrans.model_card import _target_cell

    t = Task("two", "{caption}", "{caption}", rewrite=[{"pattern": r"\bred\b", "replacement": "blue"},
                                                      {"pattern": r"\bblue\b", "replacement": "green"}])
    assert t.target_for("a red circle") == "a green circle" and len(t.rewrites) == 2
    assert as_tasks([asdict(t)])[0].target_for("a red circle") == "a green circle"
    assert _target_cell(asdict(t)).count("rewritten") == 2
    with pytest.raises(ValueError, match="empty list"):
        Task("none", "{caption}", "{caption}", rewrite=[])
    with pytest.raises(ValueError, match="'pattern' and 'replacement'"):
        Task("bad", "{caption}", "{caption}", rewrite=[{"pattern": "x"}])
