import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgekd.data import load_data
from edgekd.distillation import distill, train_teacher
from edgekd.errors import EdgekdError
from edgekd.models import build_model
from edgekd.objective import Objective, ObjectiveConfig
from edgekd.recipe import DistillConfig, ModelConfig, load_recipe
from edgekd.train import fit


def test_distill_writes_everything_and_reuses_the_teacher(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    out = tmp_path / "run"
    metrics = distill(recipe, out, device="cpu", progress=False)
    for name in ("teacher.safetensors", "student.safetensors", "scratch.safetensors", "recipe.toml", "metrics.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk) == {"teacher", "student", "scratch"}
    for role in on_disk:
        assert 0.0 <= on_disk[role]["accuracy"] <= 1.0 and on_disk[role]["params"] > 0
    assert on_disk["student"]["params"] == on_disk["scratch"]["params"] < on_disk["teacher"]["params"]
    assert metrics == on_disk
    # A second distill finds teacher.safetensors and does not retrain it.
    before = (out / "teacher.safetensors").stat().st_mtime_ns
    distill(recipe, out, device="cpu", progress=False)
    assert (out / "teacher.safetensors").stat().st_mtime_ns == before


def test_same_recipe_and_seed_give_the_same_student(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    a = distill(recipe, tmp_path / "a", device="cpu", progress=False)
    b = distill(recipe, tmp_path / "b", device="cpu", progress=False)
    assert a["student"]["accuracy"] == b["student"]["accuracy"]
    assert a["scratch"]["accuracy"] == b["scratch"]["accuracy"]
    wa, wb = load_file(tmp_path / "a" / "student.safetensors"), load_file(tmp_path / "b" / "student.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_teacher_checkpoint_is_used_as_is(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    train_teacher(recipe, tmp_path / "t", device="cpu", progress=False)
    r2 = dataclasses.replace(recipe, teacher=dataclasses.replace(
        recipe.teacher, checkpoint=str(tmp_path / "t" / "teacher.safetensors")),
        distill=dataclasses.replace(recipe.distill, baseline=False))
    metrics = distill(r2, tmp_path / "s", device="cpu", progress=False)
    assert not (tmp_path / "s" / "teacher.safetensors").exists()
    assert "scratch" not in metrics and "student" in metrics
    # The checkpoint's run folder recorded its scores on the same weights and data: reused, not re-scored.
    recorded = json.loads((tmp_path / "t" / "metrics.json").read_text())["teacher"]
    # ... and shown without a training time: this run did not train it (issue 17)
    trained_here = {k: v for k, v in recorded.items() if k not in ("train_seconds", "history")}
    assert metrics["teacher"] == {**trained_here, "epochs": 0, "metrics_from": str(tmp_path / "t" / "metrics.json")}
    # Other weights under the same name: the hashes differ, so the teacher is scored again.
    torch.manual_seed(5)
    other = build_model(recipe.teacher.model, (1, 8, 8), 10)
    from edgekd.models import save_weights

    save_weights(other, tmp_path / "t" / "teacher.safetensors", {})
    again = distill(r2, tmp_path / "s2", device="cpu", progress=False)["teacher"]
    assert "metrics_from" not in again and again["weights_sha256"] != recorded["weights_sha256"]
    missing = dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, checkpoint="nope.safetensors"))
    with pytest.raises(EdgekdError, match="nope.safetensors: file not found"):
        distill(missing, tmp_path / "m", device="cpu", progress=False)


def test_teacher_without_a_validation_split_is_scored_once_and_reused(tmp_path, tiny_recipe):
    # val_fraction = 0 leaves empty validation arrays; their hash is part of the teacher's score key
    recipe = load_recipe(tiny_recipe)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, val_fraction=0.0))
    train_teacher(recipe, tmp_path / "t", device="cpu", progress=False)
    recorded = json.loads((tmp_path / "t" / "metrics.json").read_text())["teacher"]
    assert recorded["val_accuracy"] is None and recorded["eval_data_sha256"]
    r2 = dataclasses.replace(recipe, teacher=dataclasses.replace(
        recipe.teacher, checkpoint=str(tmp_path / "t" / "teacher.safetensors")),
        distill=dataclasses.replace(recipe.distill, baseline=False))
    metrics = distill(r2, tmp_path / "s", device="cpu", progress=False)
    assert metrics["teacher"]["metrics_from"] == str(tmp_path / "t" / "metrics.json")


def test_feature_distillation_through_hooks_trains_a_projection():
    data = load_data(load_recipe("digits").data)
    torch.manual_seed(0)
    teacher = build_model("cnn:widths=8,16", data.input_shape, 10)
    student = build_model("cnn:widths=4,8", data.input_shape, 10)
    cfg = ModelConfig(epochs=1, batch_size=256)
    # student conv2 (8 ch) -> teacher bn2 (16 ch)
    kd = ObjectiveConfig(4.0, 0.5, features=(("features.3", "features.4"),))
    fit(teacher, data.x_train, data.y_train, cfg, device=torch.device("cpu"), desc="t", progress=False)
    w_before = student.features[0].weight.detach().clone()
    history = fit(student, data.x_train, data.y_train, cfg, device=torch.device("cpu"), desc="s",
                  objective=Objective(kd, teacher=teacher), progress=False)
    assert np.isfinite(history[0]["loss"])
    assert not torch.equal(w_before, student.features[0].weight)
    # the hooks are removed afterwards
    assert not student.features[3]._forward_hooks and not teacher.features[4]._forward_hooks
    with pytest.raises(EdgekdError, match="student has no module 'features.99'"):
        fit(student, data.x_train, data.y_train, cfg, device=torch.device("cpu"), desc="s",
            objective=Objective(ObjectiveConfig(features=(("features.99", "features.4"),)), teacher=teacher),
            progress=False)
    with pytest.raises(EdgekdError, match="differ in spatial shape"):
        fit(student, data.x_train, data.y_train, cfg, device=torch.device("cpu"), desc="s",
            objective=Objective(ObjectiveConfig(features=(("features.0", "features.4"),)), teacher=teacher),
            progress=False)


def test_feature_distillation_from_a_recipe(tmp_path, tiny_recipe_text):
    text = tiny_recipe_text.replace('model = "mlp:hidden=16"', 'model = "cnn:widths=4,8"')
    text += 'features = [["features.2", "features.2"]]\nbaseline = false\n'
    (tmp_path / "r.toml").write_text(text)
    metrics = distill(load_recipe(tmp_path / "r.toml"), tmp_path / "out", device="cpu", progress=False)
    assert 0 <= metrics["student"]["accuracy"] <= 1


def test_nan_loss_stops_with_a_clear_message():
    x = np.full((8, 4), 3e38, np.float32)  # logits overflow to inf
    model = torch.nn.Linear(4, 2)
    with pytest.raises(EdgekdError, match="loss became"):
        fit(model, x, np.zeros(8, np.int64), ModelConfig(epochs=1, batch_size=4), device=torch.device("cpu"),
            desc="t", progress=False)


def test_student_that_cannot_take_the_input_is_refused(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    student = dataclasses.replace(recipe.student, model="tests.test_distillation:wrong_head")
    bad = dataclasses.replace(recipe, student=student, distill=DistillConfig())
    with pytest.raises(EdgekdError, match=r"outputs shape \(3,\) per sample; the data has 10 classes"):
        distill(bad, tmp_path / "o", device="cpu", progress=False)


def wrong_head(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
