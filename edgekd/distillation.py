"""Stages: train (or fine-tune) the teacher; distill the student and train the same student from scratch.

Each stage takes a Recipe and an output folder and returns the metrics it measured. Files written into
the folder: teacher.safetensors, student.safetensors, scratch.safetensors, recipe.toml, metrics.json.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgekd import distributed, fileio, runfolder, streaming
from edgekd.augment import BatchAugment
from edgekd.data import Dataset, load_data, normalize_like, pool_source
from edgekd.errors import EdgekdError
from edgekd.models import build_model, count_params, load_weights, save_weights
from edgekd.objective import Objective, ObjectiveConfig, OfflineTargets, config_from_recipe
from edgekd.recipe import Recipe, resolved, to_toml
from edgekd.tasks import per_class_accuracy
from edgekd.train import (
    EVAL_BATCH_BYTES,
    accuracy,
    check_model_fits,
    fit,
    predict_logits,
    resolve_device,
    seed_everything,
)

ROLES = ("teacher", "student", "scratch")


def read_metrics(out: Path) -> dict[str, Any]:
    path = out / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekdError(f"{path}: not valid JSON ({e}); delete it to start over") from None


def _save_run_files(out: Path, recipe: Recipe, metrics: dict[str, Any]) -> None:
    if not distributed.is_main():
        return
    from edgekd.pipeline import record_recipe_dir

    fileio.write_text(out / "recipe.toml", to_toml(resolved(recipe)))
    record_recipe_dir(out, recipe)   # relative paths in recipe.toml resolve against the recipe's folder
    fileio.write_json(out / "metrics.json", metrics)


def build_role_model(recipe: Recipe, role: str, data: Dataset) -> nn.Module:
    """The teacher, or the student architecture (student and scratch share it), seeded for reproducibility."""
    cfg = recipe.teacher if role == "teacher" else recipe.student
    seed_everything(cfg.seed if role == "teacher" else recipe.distill.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    check_model_fits(model, data.input_shape, data.num_classes, role)
    return model


def teacher_inputs(recipe: Recipe) -> dict[str, str]:
    """What teacher.safetensors is made from (edgekd.runfolder): [data], [teacher] and the checkpoint it
    fine-tunes."""
    made = runfolder.sections(recipe, "data", "teacher")
    if recipe.teacher.checkpoint and recipe.path(recipe.teacher.checkpoint).is_file():
        made["teacher checkpoint"] = fileio.sha256_file(recipe.path(recipe.teacher.checkpoint))
    return made


def student_inputs(recipe: Recipe, out: Path | None = None, teacher: Path | None = None) -> dict[str, str]:
    """What the student and the scratch baseline are made from: [data], [student], [distill], [augment], [loss]
    when the recipe has one, and for the student what taught it (teacher.safetensors, a checkpoint, a labels or
    cache manifest)."""
    made = runfolder.sections(recipe, "data", "student", "distill", "augment", *(("loss",) if recipe.loss.weights
                                                                                   else ()))
    if out is not None and teacher is not None:
        made.update([runfolder.file_key(out, teacher)])
    return made


def _say(progress: bool, text: str) -> None:
    """One line on stderr for the user (main process only)."""
    if progress and distributed.is_main():
        print(text, file=sys.stderr, flush=True)


def load_teacher(recipe: Recipe, out: Path, data: Dataset, *, reuse: bool = False,
                 progress: bool = False) -> tuple[nn.Module, Path] | None:
    """The teacher already trained in `out`, or named by [teacher].checkpoint; None when there is none.

    A reused teacher is announced. A teacher.safetensors that `out` records as made from another [data]/[teacher]
    is refused, unless `reuse` (--reuse-teacher) says to use it as it is.
    """
    path = out / "teacher.safetensors"
    differ = runfolder.stale(out, path.name, teacher_inputs(recipe)) if path.is_file() else None
    if differ and not reuse:
        raise EdgekdError(f"{path}: was trained with a different recipe ({'; '.join(differ)}); delete it to "
                          "train the teacher again, use another --out, or pass --reuse-teacher to use it as it is")
    if not path.is_file() and recipe.teacher.checkpoint:
        path = recipe.path(recipe.teacher.checkpoint)
        if not path.is_file():
            raise EdgekdError(f"[teacher].checkpoint {path}: file not found")
        _say(progress, f"teacher: using [teacher].checkpoint {path} as it is (not trained here)")
    elif path.is_file():
        why = (f"--reuse-teacher, although it was trained with: {'; '.join(differ)}" if differ else
               "trained earlier in this run folder from the same [data] and [teacher]" if differ == [] else
               "this run folder has no record of the recipe it was trained with")
        _say(progress, f"teacher: reusing {path} ({why}; delete it to train the teacher again)")
    if not path.is_file():
        return None
    model = build_role_model(recipe, "teacher", data)
    load_weights(model, path)
    return model, path


def _train_role(recipe: Recipe, out: Path, role: str, data: Dataset, dev: Any, *, progress: bool, resume: bool,
                model: nn.Module, objective: Objective | None = None,
                schedule: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                x: np.ndarray | None = None, y: np.ndarray | None = None,
                made_from: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one role on `objective` (default: cross-entropy on the labels) with checkpoints in
    out/checkpoints/<role>.ckpt; write <role>.safetensors (rank 0).

    With `resume`, a role whose safetensors and metrics already exist is not retrained, and a role with a
    checkpoint continues from it. `made_from` goes into the run folder's provenance (edgekd.runfolder).
    """
    final = out / f"{role}.safetensors"
    if resume and final.is_file() and metrics and role in metrics:
        load_weights(model, final)
        _say(progress, f"{role}: kept {final} (--resume; trained earlier from the same recipe)")
        return metrics[role]
    cfg = recipe.teacher if role == "teacher" else recipe.student
    ckpt = out / "checkpoints" / f"{role}.ckpt"
    desc = {"teacher": "teacher", "student": "student (KD)", "scratch": "scratch"}[role]
    start = time.perf_counter()
    history = fit(model, data.x_train if x is None else x, data.y_train if y is None else y, cfg, device=dev,
                  desc=desc, objective=objective, x_val=data.x_val, y_val=data.y_val, progress=progress,
                  checkpoint=ckpt, resume=resume,
                  augment=role_augment(recipe, role) if objective is None or objective.offline is None else None,
                  **(schedule or {}))
    if distributed.is_main():
        meta = {"model": cfg.model, "role": role, "input_shape": json.dumps(list(data.input_shape)),
                "num_classes": str(data.num_classes), "class_names": json.dumps(list(data.class_names)),
                "normalization": json.dumps(data.normalization)}
        save_weights(model, final, meta)
        runfolder.record(out, final.name, made_from or {})
        ckpt.unlink(missing_ok=True)
    distributed.barrier()
    entry = _entry(model, data, dev, history, start)
    if role == "teacher" and final.is_file():
        entry.update(_score_key(final, data))
    if distributed.is_distributed():
        entry.update(world_size=distributed.world_size(),
                     max_param_divergence=history[-1].get("max_param_divergence", 0.0) if history else 0.0)
    return entry


def role_augment(recipe: Recipe, role: str) -> BatchAugment | None:
    """[augment] for a role: resized crop/crop/flip for all; mixup/cutmix for the student (and scratch with
    mix_scratch)."""
    a = recipe.augment
    aug = BatchAugment(crop=a.crop, flip=a.flip, mixup=a.mixup, cutmix=a.cutmix,
                       resized_crop=tuple(a.resized_crop) if a.resized_crop else None)
    if role == "teacher" or (role == "scratch" and not a.mix_scratch):
        aug = aug.without_mixing()
    return aug if (aug.crop or aug.flip or aug.mixes or aug.resized_crop) else None


def transfer_set(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """What the distilled student learns from: the labelled training split plus the unlabelled pool (label -1)."""
    if data.x_unlabeled is None or not len(data.x_unlabeled):
        return data.x_train, data.y_train
    return (streaming.concat([data.x_train, data.x_unlabeled]),   # lazy splits stay lazy (nothing read)
            np.concatenate([data.y_train, np.full(len(data.x_unlabeled), -1, np.int64)]))


def train_teacher(recipe: Recipe, out: str | Path, *, device: str = "auto", progress: bool = True,
                  data: Dataset | None = None, resume: bool = False) -> dict[str, Any]:
    """Train the teacher on the task, or fine-tune it from [teacher].checkpoint; writes teacher.safetensors."""
    distributed.init_from_env()
    out = Path(out)
    with runfolder.locked(out):
        if resume:
            runfolder.check_resume(out, recipe)
        data = data or load_data(recipe.data, recipe.base_dir)
        dev = distributed.local_device(resolve_device(device))
        model = build_role_model(recipe, "teacher", data)
        if recipe.teacher.checkpoint:
            load_weights(model, recipe.path(recipe.teacher.checkpoint))
        metrics = read_metrics(out)
        metrics["teacher"] = _train_role(recipe, out, "teacher", data, dev, progress=progress, resume=resume,
                                         model=model, metrics=metrics, made_from=teacher_inputs(recipe))
        _save_run_files(out, recipe, metrics)
        return metrics



def _score_key(weights: Path, data: Dataset) -> dict[str, str]:
    """What a teacher's test/validation scores depend on: its weights file and the evaluation splits."""
    from edgekd.teachers import array_sha256

    # a streamed split is named by its files and transform, never read whole
    parts = [streaming.fingerprint(a) if streaming.is_lazy(a) else array_sha256(a)
             for a in (data.x_test, data.y_test, data.x_val, data.y_val)]
    return {"weights_sha256": fileio.sha256_file(weights), "eval_data_sha256": array_sha256(np.array(parts))}


def _recorded_teacher(weights: Path, key: dict[str, str]) -> dict[str, Any] | None:
    """The teacher's metrics recorded in the run folder of a [teacher].checkpoint, when they were measured on
    these weights and these evaluation splits (the same `key`, _score_key): distill then does not score the teacher
    again."""
    try:
        recorded = read_metrics(weights.parent).get("teacher")
    except EdgekdError:
        return None
    if (not isinstance(recorded, dict) or not isinstance(recorded.get("accuracy"), (int, float))
            or any(recorded.get(k) != v for k, v in key.items())):   # measured on other weights or splits
        return None
    # this run did not train it: no training time (the recorded run's epochs and time stay in its own folder)
    kept = {k: v for k, v in recorded.items() if k not in ("train_seconds", "history")}
    return {**kept, "epochs": 0, "metrics_from": str(weights.parent / "metrics.json")}


def _entry(model: nn.Module, data: Dataset, dev: Any, history: list[dict], start: float) -> dict[str, Any]:
    """Test accuracy with per-class counts from one pass over the test split (the report's per-class retention)."""
    y = np.asarray(data.y_test)
    predicted = predict_logits(model, data.x_test, dev).argmax(1) if len(y) else np.zeros(0, np.int64)
    return {"accuracy": float((predicted == y).mean()) if len(y) else float("nan"), "test_samples": len(y),
            "per_class": {"classes": list(data.class_names), **per_class_accuracy(y, predicted, data.num_classes)},
            "params": count_params(model),
            "val_accuracy": accuracy(model, data.x_val, data.y_val, dev) if len(data.y_val) else None,
            "epochs": len(history),   # a model loaded as is (no epochs) has no training time
            **({"train_seconds": round(time.perf_counter() - start, 2)} if history else {})}


def _offline_source(recipe: Recipe, data: Dataset, labels: Path | None, cache: Path | None
                    ) -> tuple[np.ndarray, np.ndarray, Objective, dict[str, Any]]:
    """Training inputs, hard targets and the objective over the top-k soft targets from `edgekd label` output
    (at the temperature the labels were made at) or the teacher cache."""
    from edgekd import cache as teacher_cache
    from edgekd import labels as teacher_labels

    if labels is not None:
        pool = data.x_unlabeled if data.x_unlabeled is not None else _labelled_pool(labels, data, recipe)
        lab = teacher_labels.read_labels(labels, pool=pool)   # verifies the pool's sha256 against the manifest
        x = pool.take(lab.indices, axis=0)   # a lazy pool stays lazy
        info = {"source": "labels", "path": str(labels), "samples": int(len(x)), "teacher": lab.manifest["teacher"],
                "soft": lab.topk_probs is not None}
        if lab.topk_probs is None:   # the teacher gave only class indices: plain cross-entropy on them
            return x, lab.labels.astype(np.int64), Objective(config_from_recipe(recipe, features=False)), info
        return x, lab.labels.astype(np.int64), Objective(
            config_from_recipe(recipe, temperature=lab.temperature, features=False), offline=OfflineTargets(
                lambda epoch, idx, _batch: (None, lab.topk_probs[idx].astype(np.float32),
                                           lab.topk_indices[idx].astype(np.int64)), values_are="probs")), info
    manifest = teacher_cache.read_manifest(cache)
    augment = teacher_cache.make_augment(manifest["augment"])
    x, y = transfer_set(data)
    c = teacher_cache.load_cache(cache, x=x, augment_key=manifest["augment"], seed=manifest["seed"],
                                 top_k=manifest["top_k"],
                                 epochs=resolved(recipe).distill.epochs if augment is not None else None)

    def fetch(epoch: int, idx: np.ndarray, batch: Any) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        views = (teacher_cache.augment_views(x, idx, epoch=epoch, seed=manifest["seed"], augment=augment,
                                             batch=batch.cpu().numpy()) if augment is not None else None)
        v, i = c.lookup(epoch if augment is not None else 0, idx)
        return views, v, i
    info = {"source": "cache", "path": str(cache), "top_k": manifest["top_k"], "augment": manifest["augment"]}
    return x, y, Objective(config_from_recipe(recipe, features=False), offline=OfflineTargets(fetch, "logits")), info


POOL_SOURCE = "pool-source.json"   # in a labels folder: {"pool": the --pool file `edgekd label` labelled}


def _labelled_pool(labels: Path, data: Dataset, recipe: Recipe) -> np.ndarray:
    """The pool `edgekd label --pool` labelled, as recorded beside its labels (normalized like the training data;
    a folder or large array file stays on disk); read_labels then checks it against the manifest's key."""
    record = labels / POOL_SOURCE
    if not record.is_file():
        raise EdgekdError(f"--labels {labels}: no {POOL_SOURCE} naming the labelled pool and the recipe has no "
                          "[data] unlabeled; set it to the pool that `edgekd label` labelled")
    try:
        path = json.loads(record.read_text())["pool"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise EdgekdError(f"{record}: expected {{\"pool\": a file path}}; relabel or set [data] unlabeled") from None
    return normalize_like(data, pool_source(str(path), recipe.data, data.preprocess))


def distill(recipe: Recipe, out: str | Path, *, device: str = "auto", progress: bool = True,
            data: Dataset | None = None, resume: bool = False, labels: str | Path | None = None,
            cache: str | Path | None = None, reuse_teacher: bool = False) -> dict[str, Any]:
    """Distill the student from the teacher (training the teacher first if `out` has none), and train the
    same student from scratch with the same data, seed and schedule as the baseline.

    With `labels` (from `edgekd label`) the student learns from what a black-box teacher said about the
    unlabelled pool; with `cache` (from `edgekd cache-teacher`) it learns offline from stored top-k teacher
    logits on exactly the augmented views the teacher saw. Neither needs the teacher at training time.
    """
    from edgekd import cache as teacher_cache
    from edgekd import labels as teacher_labels

    distributed.init_from_env()
    out = Path(out)
    with runfolder.locked(out):
        if resume:
            runfolder.check_resume(out, recipe)
        data = data or load_data(recipe.data, recipe.base_dir)
        dev = distributed.local_device(resolve_device(device))
        d = resolved(recipe).distill
        schedule = {"epochs": d.epochs, "lr": d.lr, "batch_size": d.batch_size, "seed": d.seed}
        offline = labels is not None or cache is not None
        if offline:
            labels, cache = (Path(p) if p else None for p in (labels, cache))
            x, y, objective, info = _offline_source(recipe, data, labels, cache)
            metrics, about = read_metrics(out), {"offline": info}
            source = labels / teacher_labels.MANIFEST if labels is not None else cache / teacher_cache.MANIFEST
        else:
            x, y, objective, metrics, source, about = _teacher_source(recipe, out, data, device, dev, progress,
                                                                       resume, reuse_teacher)
        student = build_role_model(recipe, "student", data)
        metrics["student"] = _train_role(recipe, out, "student", data, dev, progress=progress, resume=resume,
                                         model=student, objective=objective, schedule=schedule, metrics=metrics,
                                         x=x, y=y, made_from=student_inputs(recipe, out, source))
        metrics["student"].update(about)
        if data.report and not offline:
            metrics["data"] = data.report   # streamed source: layout, images, skipped files, where mean/std came from
        _save_run_files(out, recipe, metrics)   # a run killed during the baseline keeps the finished student
        if d.baseline:   # step-matched to the student's samples, except after --labels (its own schedule)
            samples = len(x) if not offline or cache is not None else 0
            metrics["scratch"] = _baseline(recipe, out, data, dev, progress, resume, schedule, metrics, samples)
        _save_run_files(out, recipe, metrics)
        return metrics


def _baseline(recipe: Recipe, out: Path, data: Dataset, dev: Any, progress: bool, resume: bool,
              schedule: dict[str, Any], metrics: dict[str, Any], student_samples: int) -> dict[str, Any]:
    """The same student from scratch on the true labels only (same seed and schedule). When the student also
    learned from an unlabelled pool (`student_samples` > the labelled count), the baseline gets as many optimizer
    steps as the student did (more epochs over its fewer samples): what a user with only the labels would run."""
    n = len(data.x_train)
    if student_samples > n:
        batch = schedule["batch_size"]
        schedule = {**schedule, "epochs": math.ceil(schedule["epochs"] * math.ceil(student_samples / batch)
                                                     / math.ceil(n / batch))}
    scratch = build_role_model(recipe, "scratch", data)
    entry = _train_role(recipe, out, "scratch", data, dev, progress=progress, resume=resume, model=scratch,
                        schedule=schedule, metrics=metrics, made_from=student_inputs(recipe))
    return {**entry, "samples": n}


def _teacher_source(recipe: Recipe, out: Path, data: Dataset, device: str, dev: Any, progress: bool, resume: bool,
                    reuse_teacher: bool) -> tuple[Any, np.ndarray, Objective, dict[str, Any], Path, dict[str, Any]]:
    """The transfer set, its labels, the objective over the run's teacher (trained first when `out` has none;
    T and alpha searched when the recipe asks), the run's metrics so far, the teacher's weights and what the
    student entry records about its teacher."""
    build_role_model(recipe, "student", data)   # a student that cannot take the data fails before any training
    found = load_teacher(recipe, out, data, reuse=reuse_teacher, progress=progress)
    if found is None:
        metrics = train_teacher(recipe, out, device=device, progress=progress, data=data, resume=resume)
        teacher = build_role_model(recipe, "teacher", data)
        teacher_path = out / "teacher.safetensors"
        load_weights(teacher, teacher_path)
    else:
        teacher, teacher_path = found
        metrics = read_metrics(out)
        if "teacher" not in metrics:
            key = _score_key(teacher_path, data)   # hashes the weights and names the evaluation splits: once
            metrics["teacher"] = _recorded_teacher(teacher_path, key) or {
                **_entry(teacher.to(dev), data, dev, [], time.perf_counter()), **key}
    d = resolved(recipe).distill
    x, y = transfer_set(data)
    temperature, alpha = d.temperature, d.alpha
    # without augmentation the teacher's view never changes: one pass serves the search and the student
    needed = d.search_temperatures or not d.features
    logits = predict_logits(teacher, x, dev) if needed and fixed_teacher_views(recipe) else None
    if d.search_temperatures:
        if resume and "search" in metrics:
            search = metrics["search"]
        else:
            search = search_temperature_alpha(recipe, data, teacher, dev, x, y, progress=progress, logits=logits)
        metrics["search"] = search
        _save_run_files(out, recipe, metrics)   # a resumed run does not search again
        temperature, alpha = search["chosen"]["temperature"], search["chosen"]["alpha"]
    objective = teacher_objective(recipe, config_from_recipe(recipe, temperature=temperature, alpha=alpha),
                                   teacher, logits)
    once = objective.offline is not None
    return x, y, objective, metrics, teacher_path, {
        "temperature": temperature, "alpha": alpha, "samples": int(len(x)), "labelled": int((y >= 0).sum()),
        "function_matching": d.function_matching,
        "teacher_outputs": "computed once" if once else "every step, on the student's view",
        "objective": objective.describe()}


def fixed_teacher_views(recipe: Recipe) -> bool:
    """No augmentation and one process: the teacher sees the same inputs every epoch, so one pass over the
    transfer set can stand for all of them."""
    return role_augment(recipe, "student") is None and not distributed.is_distributed()


def teacher_objective(recipe: Recipe, cfg: ObjectiveConfig, teacher: nn.Module, logits: np.ndarray | None,
                      *, shard: bool = True) -> Objective:
    """The objective over `teacher`: from its stored logits on the transfer set when there are some and no hint
    features (all classes, so topk_kd is exactly kd, at the cost of plain training), else the teacher run
    every step on the student's view (augmentation, a sharded teacher, hints). `shard`: [distill].teacher_fsdp
    applies."""
    d = recipe.distill
    if logits is None or cfg.hinted:
        return Objective(cfg, teacher=teacher, teacher_bf16=d.teacher_bf16, teacher_fsdp=d.teacher_fsdp and shard)
    classes = np.broadcast_to(np.arange(logits.shape[1]), logits.shape)
    return Objective(cfg, offline=OfflineTargets(
        lambda _epoch, idx, _batch: (None, logits[idx], classes[idx].astype(np.int64)), "logits"))


def search_temperature_alpha(recipe: Recipe, data: Dataset, teacher: nn.Module, dev: Any, x: np.ndarray,
                             y: np.ndarray, *, progress: bool = True,
                             logits: np.ndarray | None = None) -> dict[str, Any]:
    """Grid search of (T, alpha) on the validation split: a short run (search_epochs) per pair, best val wins.

    The test split is never looked at. Ties go to the pair listed first. `logits`: the teacher on `x`,
    when already computed (no augmentation).
    """
    d = resolved(recipe).distill
    if not len(data.y_val):
        raise EdgekdError("[distill].search_temperatures: the search needs a validation split; set "
                          "[data] val_fraction > 0")
    if logits is None and fixed_teacher_views(recipe):
        logits = predict_logits(teacher, x, dev)
    rows = []
    for t in d.search_temperatures:
        for a in d.search_alphas:
            student = build_role_model(recipe, "student", data)
            start = time.perf_counter()
            objective = teacher_objective(
                recipe, config_from_recipe(recipe, temperature=t, alpha=a, features=False), teacher, logits,
                shard=False)
            fit(student, x, y, recipe.student, device=dev, desc=f"search T={t:g} alpha={a:g}",
                objective=objective, epochs=d.search_epochs, lr=d.lr, batch_size=d.batch_size, seed=d.seed,
                progress=progress, augment=role_augment(recipe, "student") if objective.offline is None else None)
            rows.append({"temperature": t, "alpha": a, "val_accuracy": accuracy(student, data.x_val, data.y_val, dev),
                         "seconds": round(time.perf_counter() - start, 2)})
    best = max(rows, key=lambda r: r["val_accuracy"])   # max keeps the first of equal values
    return {"epochs": d.search_epochs, "table": rows,
            "chosen": {"temperature": best["temperature"], "alpha": best["alpha"]}}


def label(recipe: Recipe, teacher: str, out: str | Path, *, pool: str | Path | None = None, top_k: int = 5,
          temperature: float = 1.0, shard_size: int = 1024, min_confidence: float = 0.0,
          balance: bool = False, timeout_s: float = 600.0, progress: bool = True) -> dict[str, Any]:
    """Have a black-box teacher (.onnx, .safetensors, or `cmd:...`) label the unlabelled pool into `out`.

    The pool is `pool` (raw inputs, normalized here like the training data) or the recipe's [data] unlabeled.
    Confidence filtering / class balancing are reported; the labels on disk are the teacher's, unfiltered.
    """
    from edgekd import labels as teacher_labels
    from edgekd.teachers import load_teacher as load_black_box

    with runfolder.locked(out):
        data = load_data(recipe.data, recipe.base_dir)
        x = (normalize_like(data, pool_source(pool, recipe.data, data.preprocess)) if pool is not None
             else data.x_unlabeled)
        if x is None:
            raise EdgekdError("label: no pool to label; pass --pool or set [data] unlabeled in the recipe")
        spec = recipe.teacher.model if str(teacher).endswith(".safetensors") else None
        t = load_black_box(teacher, model_spec=spec, input_shape=data.input_shape, num_classes=data.num_classes,
                           timeout_s=timeout_s)
        manifest = teacher_labels.label_pool(t, x, out, shard_size=shard_size, temperature=temperature, top_k=top_k,
                                             num_classes=data.num_classes, progress=progress,
                                             batch_size=_teacher_batch(data.input_shape))
        if pool is not None:   # `distill --labels` finds the pool here (its sha256 is in the manifest)
            fileio.write_json(Path(out) / POOL_SOURCE, {"pool": str(Path(pool).resolve())})
        kept, report = teacher_labels.filter_labels(teacher_labels.read_labels(out, pool=x),
                                                    min_confidence=min_confidence, balance=balance)
        return {"manifest": manifest, "filter": report,
                "table": teacher_labels.format_filter_report(report, data.class_names)}



def cache_teacher(recipe: Recipe, out: str | Path, *, top_k: int = 5, epochs: int = 1, augment: str = "none",
                  seed: int = 0, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Precompute the run's teacher on the transfer set (the training split and the unlabelled pool; top-k
    logits, float16) into out/teacher-cache."""
    from edgekd import cache as teacher_cache
    from edgekd.teachers import TorchTeacher

    out = Path(out)
    with runfolder.locked(out):
        data = load_data(recipe.data, recipe.base_dir)
        found = load_teacher(recipe, out, data)
        if found is None:
            raise EdgekdError(f"{out}: no teacher.safetensors (and no [teacher].checkpoint); run `edgekd teacher` "
                              "first")
        model, path = found
        t = TorchTeacher(model, device=str(resolve_device(device)), identity=f"torch:{fileio.sha256_file(path)}")
        aug = teacher_cache.make_augment(augment)
        return teacher_cache.build_cache(t, transfer_set(data)[0], out / "teacher-cache", top_k=top_k,
                                         epochs=epochs if aug is not None else 1, augment=aug, seed=seed,
                                         augment_key=teacher_cache.augment_key_of(aug), progress=progress,
                                         batch_size=_teacher_batch(data.input_shape))



def _teacher_batch(input_shape: tuple[int, ...]) -> int:
    """Batch of a teacher pass (label, cache-teacher): at most 256 inputs and EVAL_BATCH_BYTES of them (111
    RGB images of 224x224), so a batch in flight from the workers stays bounded; outputs do not depend on it."""
    return max(1, min(256, EVAL_BATCH_BYTES // (4 * math.prod(input_shape))))


def metrics_table(metrics: dict[str, Any]) -> str:
    """A readable table of the models in metrics.json, plus what distillation gained over scratch."""
    from tabulate import tabulate

    rows = [[role, f"{m['accuracy']:.4f}", f"{m['params']:,}", m.get("train_seconds", "")]
            for role in ROLES if (m := metrics.get(role))]
    text = tabulate(rows, headers=["model", "test accuracy", "params", "train s"], tablefmt="github")
    if "student" in metrics and "scratch" in metrics:
        gain = metrics["student"]["accuracy"] - metrics["scratch"]["accuracy"]
        text += f"\n\ndistillation gain over scratch: {gain * 100:+.2f} points"
    return text
