"""One training objective: named, weighted loss terms over the student's outputs, the teacher's outputs and
feature taps. Teacher training, distillation, the T/alpha search and QAT-KD all build their loss here.

    loss = sum over the active terms of weight(term) * share(term) * term(batch)

share: when a soft-target term (kd, topk_kd) and the hard-label term (ce) are both active, the soft term counts
alpha and ce 1 - alpha (Hinton et al. 2015; alpha >= 1 leaves ce out); otherwise, and for the other terms, 1.
A term is active when its weight is not 0 and the batch holds every input it reads (`Term.reads`): ce needs
labels, kd the teacher's logits, topk_kd stored top-k outputs, hint feature pairs, the embedding terms
embeddings.

Adding a term is one function `f(batch, config) -> tensor` and one `TERMS` entry; the recipe's [loss] table
then accepts its name as a weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.augment import Mix
from edgekd.errors import EdgekdError
from edgekd.losses import (
    FeatureProjection,
    mixed_cross_entropy,
    soft_target_loss,
    topk_soft_target_loss,
)

if TYPE_CHECKING:
    from edgekd.recipe import Recipe


@dataclass(frozen=True)
class ObjectiveConfig:
    """The terms' weights (by name; a term not named has its `Term.default`), T and alpha, and the hint pairs
    (student module path, teacher module path) whose outputs the hint term compares."""

    temperature: float = 4.0
    alpha: float = 0.9
    weights: tuple[tuple[str, float], ...] = ()
    features: tuple[tuple[str, str], ...] = ()

    def weight(self, name: str) -> float:
        return dict(self.weights).get(name, TERMS[name].default)

    @property
    def hinted(self) -> bool:
        """Hint pairs with a weight above 0: the teacher must run every step (its features are not stored)."""
        return bool(self.features and self.weight("hint"))


@dataclass
class Batch:
    """What the terms read: student logits (or embeddings), labels (-1: unlabelled), the mixup/cutmix pairing,
    the teacher's outputs (full logits, or stored top-k values and class indices) and hint feature pairs."""

    logits: torch.Tensor
    labels: torch.Tensor | None = None
    mix: Mix | None = None
    teacher_logits: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    values_are: str = "logits"
    features: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
    teacher_embeddings: torch.Tensor | None = None


# --- the terms ------------------------------------------------------------------------------------------------


def ce(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """Cross-entropy on the labelled samples, mixed for mixup/cutmix batches (losses.mixed_cross_entropy)."""
    return mixed_cross_entropy(b.logits.float(), b.labels, b.mix)


def kd(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) against the teacher's logits (losses.soft_target_loss)."""
    return soft_target_loss(b.logits.float(), b.teacher_logits, cfg.temperature)


def topk_kd(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """The soft term for a teacher known on k classes per sample (losses.topk_soft_target_loss)."""
    values, indices = b.topk
    return topk_soft_target_loss(b.logits.float(), values, indices, cfg.temperature, values_are=b.values_are)


def hint(b: Batch, cfg: ObjectiveConfig) -> list[torch.Tensor]:
    """FitNets: MSE(proj(student feature), teacher feature) per pair, each added in order."""
    return [F.mse_loss(s.float(), t.detach().float()) for s, t in b.features]


def _unit(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = b.logits, b.teacher_embeddings
    if s.shape != t.shape or s.dim() != 2:
        raise EdgekdError(f"embedding loss: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                          "embeddings must both be (batch, dim); project the student to the teacher's width")
    return F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)


def embedding_mse(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """mean_i ||s_i - t_i||^2 on L2-normalized embeddings (= 2 (1 - cos))."""
    s, t = _unit(b)
    return ((s - t) ** 2).sum(-1).mean()


def embedding_cosine(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """mean_i (1 - cos(s_i, t_i))."""
    s, t = _unit(b)
    return (1.0 - (s * t).sum(-1)).mean()


def embedding_similarity(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """mean_ij (S - T)_ij^2 with S = s s^T, T = t t^T the in-batch cosine-similarity matrices (relational)."""
    s, t = _unit(b)
    return ((s @ s.T - t @ t.T) ** 2).mean()


@dataclass(frozen=True)
class Term:
    fn: Callable[[Batch, ObjectiveConfig], torch.Tensor | list[torch.Tensor]]
    reads: tuple[str, ...]           # Batch fields that must be set (non-empty) for the term to count
    share: str = "one"               # "soft" / "hard": alpha / 1 - alpha when both kinds are active; "one"
    default: float = 1.0             # weight when the recipe's [loss] table does not name the term


# Computed and summed in this order: the soft term before ce, as the Hinton loss always was, so the backward
# pass accumulates gradients in the same order and a default run trains to the same bits.
TERMS: dict[str, Term] = {
    "kd": Term(kd, ("teacher_logits",), "soft"),
    "topk_kd": Term(topk_kd, ("topk",), "soft"),
    "ce": Term(ce, ("labels",), "hard"),
    "hint": Term(hint, ("features",)),
    "embedding_mse": Term(embedding_mse, ("teacher_embeddings",)),
    "embedding_cosine": Term(embedding_cosine, ("teacher_embeddings",), default=0.0),
    "embedding_similarity": Term(embedding_similarity, ("teacher_embeddings",), default=0.0),
}


def _has(b: Batch, name: str) -> bool:
    value = getattr(b, name)
    return value is not None and (not isinstance(value, (list, tuple)) or len(value) > 0)


def weighted_terms(b: Batch, cfg: ObjectiveConfig) -> list[tuple[str, float]]:
    """The active terms of `b` and the factor each counts with (weight times its alpha share), in TERMS order."""
    active = [n for n, t in TERMS.items() if cfg.weight(n) != 0 and all(_has(b, f) for f in t.reads)]
    split = {"soft", "hard"} <= {TERMS[n].share for n in active}
    out = []
    for name in active:
        share = {"soft": cfg.alpha, "hard": 1.0 - cfg.alpha}.get(TERMS[name].share, 1.0) if split else 1.0
        if share > 0:
            out.append((name, cfg.weight(name) * share))
    return out


def compute(b: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """The weighted sum of the active terms (a factor of exactly 1 is not multiplied in)."""
    loss = None
    for name, factor in weighted_terms(b, cfg):
        value = TERMS[name].fn(b, cfg)
        for part in value if isinstance(value, list) else [value]:
            part = part if factor == 1.0 else factor * part
            loss = part if loss is None else loss + part
    if loss is None:
        raise EdgekdError(f"objective: no term applies to this batch (weights {dict(cfg.weights)}); give a term "
                          "that the run's inputs provide a weight above 0 in [loss]")
    return loss


# --- teacher outputs and feature taps -------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineTargets:
    """Teacher outputs computed before training (labels from `edgekd label`, the teacher cache, or the teacher
    run once over a fixed transfer set). `fetch(epoch, sample_indices, batch)` (batch: those samples as the feed
    read them, a tensor on the training device, so nothing is read twice) returns (the inputs the teacher saw,
    or None for the stored ones, top-k values, top-k class indices); `values_are` says what the values are
    (losses.topk_soft_target_loss), or "embeddings": the teacher's sentence embeddings (no indices: None), for
    the embedding terms."""

    fetch: Callable[[int, np.ndarray, torch.Tensor], tuple[np.ndarray | None, np.ndarray, np.ndarray]]
    values_are: str = "logits"


class FeatureTaps:
    """Forward hooks that keep the latest output of named modules (torchdistill-style, no model rewrite)."""

    def __init__(self, model: nn.Module, names: list[str], which: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise _no_module(which, name, [n for n, _ in model.named_modules() if n]) from None
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _no_module(which: str, name: str, known: list[str]) -> EdgekdError:
    return EdgekdError(f"[distill].features: the {which} has no module {name!r} "
                       f"(some of its modules: {', '.join(known[:12])})")


class _Record(nn.Module):
    def __init__(self, taps: GraphTaps, name: str) -> None:
        super().__init__()
        self._taps, self._name = taps, name

    def forward(self, x: torch.Tensor) -> None:
        self._taps.outputs[self._name] = x


class GraphTaps:
    """FeatureTaps for a torch.export'ed graph (a QAT model), whose submodules are never called: a recording
    node goes after the last node traced from each named module (after its fake-quantize, if any, so the
    feature is what the quantized model computes); remove() takes the nodes out again."""

    def __init__(self, gm: torch.fx.GraphModule, names: list[str], which: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.gm, self.nodes = gm, []
        for i, name in enumerate(names):
            node = self._last_node(name, which)
            target = f"edgekd_tap_{i}"
            gm.add_submodule(target, _Record(self, name))
            with gm.graph.inserting_after(node):
                self.nodes.append(gm.graph.call_module(target, (node,)))
        gm.recompile()

    def _last_node(self, name: str, which: str) -> torch.fx.Node:
        found = [n for n in self.gm.graph.nodes
                 if any(path == name for path, _ in (n.meta.get("nn_module_stack") or {}).values())]
        if not found:
            raise _no_module(which, name, sorted({p for n in self.gm.graph.nodes
                                                  for p, _ in (n.meta.get("nn_module_stack") or {}).values() if p}))
        node = found[-1]
        while len(node.users) == 1 and str(next(iter(node.users)).target).startswith("activation_post_process"):
            node = next(iter(node.users))   # the fake-quantized value, as the next layer reads it
        return node

    def remove(self) -> None:
        for node in self.nodes:
            self.gm.graph.erase_node(node)
            self.gm.delete_submodule(node.target)
        self.nodes = []
        self.gm.recompile()


def tap(model: nn.Module, names: list[str], which: str) -> FeatureTaps | GraphTaps:
    """Taps on the outputs of the named modules: forward hooks, or recording nodes in an exported graph."""
    exported = isinstance(model, torch.fx.GraphModule) and any(
        n.meta.get("nn_module_stack") for n in model.graph.nodes)
    return GraphTaps(model, names, which) if exported else FeatureTaps(model, names, which)


def _key(name: str) -> str:
    return name.replace(".", "__")   # ModuleDict keys cannot contain dots


class Objective:
    """The loss of one training run: `config` (terms, weights, T, alpha, hint pairs) over the student's outputs
    and the teacher's, which come from `teacher` (run once per batch on the student's exact view, under
    no_grad), from `offline` (stored top-k outputs, and possibly the stored views), or from nowhere (labels
    only: ce). `received` counts what the objective was given (batches, samples, unlabelled samples)."""

    def __init__(self, config: ObjectiveConfig | None = None, *, teacher: nn.Module | None = None,
                 offline: OfflineTargets | None = None, teacher_bf16: bool = False,
                 teacher_fsdp: bool = False) -> None:
        if teacher is not None and offline is not None:
            raise ValueError("Objective: pass a teacher or offline targets, not both")
        self.config = config or ObjectiveConfig()
        self.teacher, self.offline = teacher, offline
        self.teacher_bf16, self.teacher_fsdp = teacher_bf16, teacher_fsdp
        self.received = {"batches": 0, "samples": 0, "unlabelled": 0}
        self._taps: tuple[FeatureTaps | GraphTaps, FeatureTaps] | None = None

    @property
    def hints(self) -> tuple[tuple[str, str], ...]:
        """The hint pairs this run computes: only with an online teacher and a hint weight above 0."""
        return self.config.features if self.teacher is not None and self.config.hinted else ()

    def attach(self, model: nn.Module, x: Any, device: torch.device,
               set_mode: Callable[[nn.Module, bool], None]) -> nn.ModuleDict:
        """Put the teacher on `device`, tap the hint layers and return the projections that map each student
        feature to its teacher feature's width (trained with the student). The first two inputs of `x` are run
        once to read the features' shapes."""
        from edgekd import distributed

        projections = nn.ModuleDict()
        if self.teacher is None:
            return projections
        self.teacher.to(device).eval()
        if self.teacher_bf16:
            self.teacher.to(torch.bfloat16)
        if self.teacher_fsdp and distributed.is_distributed():
            distributed.shard_teacher(self.teacher)
        if not self.hints:
            return projections
        taps_s = tap(model, [s for s, _ in self.hints], "student")
        try:
            taps_t = FeatureTaps(self.teacher, [t for _, t in self.hints], "teacher")
        except EdgekdError:
            taps_s.remove()
            raise
        self._taps = (taps_s, taps_t)
        probe = torch.from_numpy(x[:2]).to(device)
        set_mode(model, False)
        with torch.no_grad():
            model(probe)
            self._run_teacher(probe)
        for s_name, t_name in self.hints:
            fs, ft = taps_s.outputs[s_name], taps_t.outputs[t_name]
            if fs.shape[2:] != ft.shape[2:] or fs.dim() != ft.dim():
                raise EdgekdError(f"[distill].features: student {s_name!r} output {tuple(fs.shape[1:])} and "
                                  f"teacher {t_name!r} output {tuple(ft.shape[1:])} differ in spatial shape; "
                                  "pick layers with the same spatial size (widths may differ)")
            projections[_key(s_name)] = FeatureProjection(fs.shape[1], ft.shape[1], fs.dim() == 4)
        return projections.to(device)

    def detach(self) -> None:
        """Remove the feature hooks (the models are left as they were)."""
        for taps in self._taps or ():
            taps.remove()
        self._taps = None

    def student_features(self, projections: nn.ModuleDict) -> dict[str, torch.Tensor]:
        """The projected student features of the latest forward pass, by ModuleDict key."""
        if self._taps is None:
            return {}
        return {name: proj(self._taps[0].outputs[name.replace("__", ".")]) for name, proj in projections.items()}

    def fetch(self, epoch: int, idx: torch.Tensor, xb: torch.Tensor
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Stored teacher outputs for the samples `idx` (and the stored views, replacing `xb`, when the teacher
        saw augmented ones); (xb, None) when the teacher runs online or there is none."""
        if self.offline is None:
            return xb, None
        views, top_v, top_i = self.offline.fetch(epoch, idx.numpy(), xb)
        if views is not None:
            xb = torch.from_numpy(views).to(xb.device)
        return xb, tuple(None if v is None else torch.from_numpy(v).to(xb.device) for v in (top_v, top_i))

    def _run_teacher(self, xb: torch.Tensor) -> torch.Tensor:
        return self.teacher(xb.to(torch.bfloat16) if self.teacher_bf16 else xb)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor | None, xb: torch.Tensor, *,
                 mix: Mix | None = None, stored: tuple[torch.Tensor, torch.Tensor] | None = None,
                 features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The loss of one batch: the student's `logits` on inputs `xb`, `stored` from `fetch`, `features`
        from `student_features`. The online teacher runs here, once, on `xb`."""
        values_are = self.offline.values_are if self.offline else "logits"
        b = (Batch(logits, teacher_embeddings=stored[0]) if values_are == "embeddings"
             else Batch(logits, labels, mix, topk=stored, values_are=values_are))
        if self.teacher is not None:
            with torch.no_grad():
                b.teacher_logits = self._run_teacher(xb).float()
            if self._taps is not None:
                b.features = [(features[_key(s)], self._taps[1].outputs[t]) for s, t in self.hints]
        self.received["batches"] += 1
        self.received["samples"] += len(logits)
        self.received["unlabelled"] += int((labels < 0).sum()) if labels is not None else 0
        return compute(b, self.config)

    def describe(self) -> dict[str, Any]:
        """What the run trains with: T, alpha, the weights of the terms its inputs provide, the hint pairs."""
        given = {"logits", "labels", *(("teacher_logits",) if self.teacher is not None else ()),
                 *(("topk",) if self.offline is not None else ()), *(("features",) if self.hints else ())}
        return {"temperature": self.config.temperature, "alpha": self.config.alpha,
                "teacher": "online" if self.teacher is not None else "stored" if self.offline else "none",
                "weights": {n: self.config.weight(n) for n, t in TERMS.items()
                            if self.config.weight(n) and set(t.reads) <= given},
                "features": [list(p) for p in self.hints]}


# --- from the recipe ------------------------------------------------------------------------------------------


def check_weights(weights: dict[str, Any], where: str) -> None:
    """[loss]: every key a term name (TERMS), every weight a finite number >= 0."""
    import math

    for name, w in weights.items():
        if name not in TERMS:
            raise EdgekdError(f"{where}: unknown loss term {name!r} (expected one of {', '.join(TERMS)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise EdgekdError(f"{where}.{name}: expected a finite weight >= 0, got {w!r}")


def config_from_recipe(recipe: Recipe, *, temperature: float | None = None, alpha: float | None = None,
                       features: bool = True) -> ObjectiveConfig:
    """The distilled student's objective: [loss] weights ([distill].feature_weight is the hint default),
    [distill] T and alpha (resolved: function matching means alpha = 1) unless given (the search's choice),
    and the [distill].features hint pairs unless `features` is False."""
    from edgekd.recipe import resolved

    d = resolved(recipe).distill
    weights = {"hint": d.feature_weight, **recipe.loss.weights}
    return ObjectiveConfig(temperature=d.temperature if temperature is None else temperature,
                           alpha=d.alpha if alpha is None else alpha,
                           weights=tuple((k, float(v)) for k, v in weights.items()),
                           features=tuple((s, t) for s, t in d.features) if features else ())


__all__ = ["TERMS", "Batch", "FeatureTaps", "Objective", "ObjectiveConfig", "OfflineTargets", "Term", "compute",
           "config_from_recipe", "weighted_terms"]
