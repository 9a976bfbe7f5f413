"""The training loop shared by teacher training, distillation and the scratch baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgekd.errors import EdgekdError
from edgekd.losses import FeatureProjection, hint_loss, kd_loss
from edgekd.recipe import ModelConfig


@dataclass(frozen=True)
class KDConfig:
    temperature: float
    alpha: float
    features: tuple[tuple[str, str], ...] = ()    # (student module path, teacher module path)
    feature_weight: float = 1.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EdgekdError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise EdgekdError(f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def check_model_fits(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, name: str) -> None:
    """Run one sample through the model so a shape mismatch is reported before training starts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    except Exception as e:
        raise EdgekdError(f"{name} model cannot take inputs of shape {tuple(input_shape)} "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise EdgekdError(f"{name} model outputs shape {tuple(out.shape[1:])} per sample; the data has "
                          f"{num_classes} classes, so expected ({num_classes},)")


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu",
                   batch_size: int = 512, set_mode: Callable[[nn.Module, bool], None] | None = None) -> np.ndarray:
    if set_mode is None:
        model.eval()
    else:
        set_mode(model, False)
    outs = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i:i + batch_size]).to(device)
        outs.append(model(xb).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0,), np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu",
             set_mode: Callable[[nn.Module, bool], None] | None = None) -> float:
    logits = predict_logits(model, x, device, set_mode=set_mode)
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


def _optimizer(params: list[nn.Parameter], cfg: ModelConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class _FeatureTaps:
    """Forward hooks that keep the latest output of named modules (torchdistill-style, no model rewrite)."""

    def __init__(self, model: nn.Module, names: list[str], which: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                known = [n for n, _ in model.named_modules() if n][:12]
                raise EdgekdError(f"[distill].features: the {which} has no module {name!r} "
                                  f"(some of its modules: {', '.join(known)})") from None
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: ModelConfig, *, device: torch.device,
        desc: str, epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
        seed: int | None = None, teacher: nn.Module | None = None, kd: KDConfig | None = None,
        x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, progress: bool = True,
        set_mode: Callable[[nn.Module, bool], None] | None = None,
        on_epoch: Callable[[int], None] | None = None) -> list[dict]:
    """Train `model` in place with cross-entropy, or with the KD loss when a teacher is given.

    Labels of -1 mark unlabelled samples (soft term only). `set_mode(model, training)` replaces
    model.train()/eval() for torch.export'ed (QAT) models that refuse them; `on_epoch(epoch)` runs before
    each epoch (QAT uses it to freeze observers and BatchNorm for the last epochs). Returns one history
    row per epoch.
    """
    set_mode = set_mode or (lambda m, training: m.train(training))
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    batch_size = cfg.batch_size if batch_size is None else batch_size
    seed = cfg.seed if seed is None else seed
    model.to(device)
    params = list(model.parameters())
    taps_s = taps_t = None
    projections = nn.ModuleDict()
    if teacher is not None:
        teacher.to(device).eval()
        if kd and kd.features:
            taps_s = _FeatureTaps(model, [s for s, _ in kd.features], "student")
            taps_t = _FeatureTaps(teacher, [t for _, t in kd.features], "teacher")
            probe = torch.from_numpy(x[:2]).to(device)
            model.eval()
            with torch.no_grad():
                model(probe)
                teacher(probe)
            for s_name, t_name in kd.features:
                fs, ft = taps_s.outputs[s_name], taps_t.outputs[t_name]
                if fs.shape[2:] != ft.shape[2:] or fs.dim() != ft.dim():
                    raise EdgekdError(f"[distill].features: student {s_name!r} output {tuple(fs.shape[1:])} and "
                                      f"teacher {t_name!r} output {tuple(ft.shape[1:])} differ in spatial shape; "
                                      "pick layers with the same spatial size (widths may differ)")
                projections[s_name.replace(".", "_")] = FeatureProjection(fs.shape[1], ft.shape[1], fs.dim() == 4)
            projections.to(device)
            params += list(projections.parameters())

    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(params, cfg, lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = _scheduler(opt, cfg.schedule, lr, epochs * steps_per_epoch)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    history = []
    try:
        for epoch in range(epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            set_mode(model, True)
            start = time.perf_counter()
            order = torch.randperm(len(x), generator=gen)
            total_loss, correct, seen = 0.0, 0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=not progress, unit="step")
            for step in bar:
                idx = order[step * batch_size:(step + 1) * batch_size]
                xb, yb = x_t[idx].to(device), y_t[idx].to(device)
                logits = model(xb)
                if teacher is None:
                    loss = F.cross_entropy(logits, yb)
                else:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                    loss = kd_loss(logits, t_logits, yb, kd.temperature, kd.alpha)
                    for s_name, t_name in kd.features if kd else ():
                        proj = projections[s_name.replace(".", "_")]
                        loss = loss + kd.feature_weight * hint_loss(proj(taps_s.outputs[s_name]),
                                                                    taps_t.outputs[t_name].detach())
                if not torch.isfinite(loss):
                    raise EdgekdError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                                      "lower the learning rate or check the data for extreme values")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                labelled = yb >= 0
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1)[labelled] == yb[labelled]).sum())
                seen += int(labelled.sum())
                bar.set_postfix(loss=f"{total_loss / ((step * batch_size) + len(idx)):.4f}",
                                acc=f"{correct / max(seen, 1):.3f}")
            row = {"epoch": epoch + 1, "loss": total_loss / len(x), "train_accuracy": correct / max(seen, 1),
                   "seconds": time.perf_counter() - start}
            if x_val is not None and len(x_val):
                row["val_accuracy"] = accuracy(model, x_val, y_val, device, set_mode)
            history.append(row)
            if progress:
                extra = f" val_acc={row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
                tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: loss={row['loss']:.4f} "
                           f"train_acc={row['train_accuracy']:.4f}{extra} ({row['seconds']:.1f}s)")
    finally:
        for taps in (taps_s, taps_t):
            if taps:
                taps.remove()
    set_mode(model, False)
    return history
