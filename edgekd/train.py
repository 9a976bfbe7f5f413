"""The training loop shared by teacher training, distillation and the scratch baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edgekd import streaming
from edgekd.augment import BatchAugment, step_generator
from edgekd.errors import EdgekdError
from edgekd.fileio import atomic_path
from edgekd.objective import Objective
from edgekd.recipe import ModelConfig


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


EVAL_BATCH_BYTES = 64 * 2**20   # evaluation batches hold at most this much input (and at most 512 samples)


def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu",
                   set_mode: Callable[[nn.Module, bool], None] | None = None) -> np.ndarray:
    """Logits for every input of `x` (an array or a lazy source), in order. The batch size keeps a batch's
    input under EVAL_BATCH_BYTES: 512 digits, 111 RGB images of 224x224, so activations stay bounded."""
    return _predict(model, x, device, set_mode)[0]


@torch.no_grad()
def _predict(model: nn.Module, x: np.ndarray, device: torch.device | str,
             set_mode: Callable[[nn.Module, bool], None] | None, y: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, labels): with `y`, the labels of the batches as read (an iterable source gives its own)."""
    batch_size = max(1, min(512, EVAL_BATCH_BYTES // (4 * math.prod(x.shape[1:]) or 1)))
    if set_mode is None:
        model.eval()
    else:
        set_mode(model, False)
    outs, labels = [], []
    chunks = [slice(i, i + batch_size) for i in range(0, len(x), batch_size)]
    for batch in streaming.batches(x, chunks, y):
        xb, yb = batch if y is not None else (batch, None)
        outs.append(model(xb.to(device)).float().cpu())
        labels.append(yb)
    logits = torch.cat(outs).numpy() if outs else np.zeros((0,), np.float32)
    return logits, (torch.cat(labels).numpy() if y is not None and labels else y)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu",
             set_mode: Callable[[nn.Module, bool], None] | None = None) -> float:
    logits, y = _predict(model, x, device, set_mode, y)
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
    if schedule == "warmup_cosine":   # linear warm-up over 5% of the steps, then cosine decay (embedding student)
        steps = max(total_steps, 1)
        warmup = max(1, int(0.05 * steps))
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class _Trainee(nn.Module):
    """The student plus the hint projections, as one module so DDP syncs both and checkpoints hold both."""

    def __init__(self, model: nn.Module, projections: nn.ModuleDict, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.projections = projections
        self._objective = objective

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(x)
        return logits, self._objective.student_features(self.projections)


class _KeepWriteError:
    """A file wrapper that remembers what interrupted a write: torch.save turns it into "[enforce fail at
    inline_container.cc] unexpected pos", which names neither the file nor the cause, be it a full disk
    (OSError) or Ctrl-C / SIGTERM (KeyboardInterrupt / SystemExit, which must still stop the run)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically; a full disk or a read-only folder is one error naming the checkpoint (the previous
    checkpoint, if any, is left as it was)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            writer = _KeepWriteError(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise EdgekdError(f"checkpoint {path}: cannot be written ({reason}); free disk space or pick another "
                          "--out") from None


def _last_good(checkpoint: Path | None) -> str:
    """Name the checkpoint a failed run can resume from, only when one was written."""
    return f" (the last good checkpoint is {checkpoint})" if checkpoint is not None and checkpoint.is_file() else ""


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgekdError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e}); "
                          "delete it to start over") from e
    if state.get("fingerprint") != fingerprint:
        raise EdgekdError(f"checkpoint {path}: was written by a different run ({state.get('fingerprint')!r}, this run "
                          f"is {fingerprint!r}); delete it or use another --out")
    return state


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: ModelConfig, *, device: torch.device,
        desc: str, objective: Objective | None = None, epochs: int | None = None, lr: float | None = None,
        batch_size: int | None = None, seed: int | None = None,
        x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, progress: bool = True,
        set_mode: Callable[[nn.Module, bool], None] | None = None,
        on_epoch: Callable[[int], None] | None = None, checkpoint: Path | None = None,
        resume: bool = False, augment: BatchAugment | None = None,
        batches: Callable[[int], list[np.ndarray]] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> list[dict]:
    """Train `model` in place on `objective` (edgekd.objective; default: cross-entropy on the labels).

    Labels of -1 mark unlabelled samples (soft terms only). `set_mode(model, training)` replaces
    model.train()/eval() for torch.export'ed (QAT) models that refuse them; `on_epoch(epoch)` runs before
    each epoch (QAT uses it to freeze observers and BatchNorm for the last epochs).

    With `checkpoint`, the full training state (weights, optimizer, scheduler, RNG states, position in the
    epoch) is written atomically every `cfg.checkpoint_every` steps and at each epoch end; `resume`
    continues from it and, on CPU, ends with the same weights as an uninterrupted run. Under torchrun the
    model is wrapped in DDP, the data is sharded with a DistributedSampler and metrics are summed across
    ranks. `augment` transforms each batch with randomness seeded by (seed, epoch, step); the objective's
    teacher runs on the augmented (and mixed) batch, so it always sees the student's view. `batches(epoch)`
    gives an epoch's index chunks in place of a seeded permutation cut into `batch_size` (sentences of similar
    length); `evaluate(model)` adds metrics to each epoch's row. Returns one history row per epoch.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    from edgekd import distributed

    set_mode = set_mode or (lambda m, training: m.train(training))
    objective = objective or Objective()
    if objective.offline is not None and augment is not None:
        raise EdgekdError(f"{desc}: [augment] cannot be combined with offline teacher outputs (labels or the "
                          "cache); the cache has its own seeded views (edgekd cache-teacher --augment)")
    epochs = cfg.epochs if epochs is None else epochs
    lr = cfg.lr if lr is None else lr
    batch_size = cfg.batch_size if batch_size is None else batch_size
    seed = cfg.seed if seed is None else seed
    main = distributed.is_main()
    progress = progress and main
    model.to(device)
    trainee = _Trainee(model, objective.attach(model, x, device, set_mode), objective)
    net: nn.Module = DistributedDataParallel(trainee) if distributed.is_distributed() else trainee
    amp = device.type == "cuda" and cfg.amp == "bf16"

    gen = torch.Generator().manual_seed(seed)
    sampler = (DistributedSampler(range(len(x)), shuffle=True, seed=seed, drop_last=False)
               if distributed.is_distributed() else None)
    shard = len(sampler) if sampler is not None else len(x)
    opt = _optimizer(list(trainee.parameters()), cfg, lr)
    steps_per_epoch = math.ceil(shard / batch_size)
    sched = _scheduler(opt, cfg.schedule, lr, epochs * steps_per_epoch)
    feed = streaming.Feed(x, pin=device.type == "cuda", batch_size=batch_size)   # lazy: workers alive all run
    y_t = torch.from_numpy(y)
    fingerprint = (f"{desc}|n={len(x)}|epochs={epochs}|lr={lr}|batch={batch_size}|seed={seed}"
                   f"|world={distributed.world_size()}|augment={augment}")
    history: list[dict] = []
    first_epoch, first_step, totals = 0, 0, [0.0, 0, 0, 0]   # loss sum, correct, labelled seen, samples
    epoch_gen_state = gen.get_state()
    if checkpoint is not None and resume and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, fingerprint)
        trainee.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        first_epoch, first_step, history = state["epoch"], state["step"], state["history"]
        totals = list(state["totals"])
        epoch_gen_state = state["epoch_gen_state"]
        torch.set_rng_state(state["torch_rng"])
        if main:
            tqdm.write(f"{desc}: resuming from {checkpoint} at epoch {first_epoch + 1}, step {first_step}")

    def save(epoch: int, step: int) -> None:
        if checkpoint is not None and main:
            weights = trainee.state_dict()
            if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
                raise EdgekdError(f"{desc}: weights became NaN/Inf at epoch {epoch + 1}; lower the learning rate"
                                  f"{_last_good(checkpoint)}")
            _save_checkpoint(checkpoint, {
                "fingerprint": fingerprint, "model": weights, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "step": step, "history": history,
                "totals": totals, "epoch_gen_state": epoch_gen_state, "torch_rng": torch.get_rng_state()})

    try:
        for epoch in range(first_epoch, epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            set_mode(model, True)
            start = time.perf_counter()
            if batches is not None:
                order = [torch.from_numpy(c) for c in batches(epoch)]
            elif streaming.is_stream(x):   # an iterable source: its own order, this rank's blocks
                order = streaming.stream_order(x, batch_size, distributed.rank(), distributed.world_size())
            elif sampler is not None:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler))
            else:
                gen.set_state(epoch_gen_state)
                order = torch.randperm(len(x), generator=gen)
            begin = first_step if epoch == first_epoch else 0
            if begin == 0:
                totals = [0.0, 0, 0, 0]
            bar = tqdm(range(begin, steps_per_epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=not progress, unit="step")
            chunks = (order[begin:] if batches is not None else
                      [order[step * batch_size:(step + 1) * batch_size] for step in range(begin, steps_per_epoch)])
            for step, idx, (xb, yb) in zip(bar, chunks, feed(chunks, y_t), strict=True):
                xb, yb = xb.to(device, non_blocking=True), yb.to(device)
                mix = None
                if augment is not None:
                    xb, mix = augment(xb, step_generator(seed, epoch, step))
                xb, stored = objective.fetch(epoch, idx, xb)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits, feats = net(xb)
                    loss = objective(logits, yb, xb, mix=mix, stored=stored, features=feats)
                if not torch.isfinite(loss):
                    raise EdgekdError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                                      "lower the learning rate or check the data for extreme values"
                                      + _last_good(checkpoint))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                labelled = yb >= 0
                totals[0] += loss.item() * len(idx)
                totals[1] += int((logits.argmax(1)[labelled] == yb[labelled]).sum())
                totals[2] += int(labelled.sum())
                totals[3] += len(idx)
                bar.set_postfix(loss=f"{totals[0] / totals[3]:.4f}", acc=f"{totals[1] / max(totals[2], 1):.3f}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                    save(epoch, step + 1)
            loss_sum, correct, seen, samples = distributed.all_sum(totals, device)
            row = {"epoch": epoch + 1, "loss": loss_sum / max(samples, 1), "train_accuracy": correct / max(seen, 1),
                   "seconds": time.perf_counter() - start}
            # at most ~20 validation passes per run: a small labelled set trained for hundreds of epochs
            # would otherwise spend most of its time evaluating
            if x_val is not None and len(x_val) and ((epoch + 1) % max(1, epochs // 20) == 0 or epoch + 1 == epochs):
                row["val_accuracy"] = accuracy(model, x_val, y_val, device, set_mode)
            scores = {}
            if evaluate is not None:
                set_mode(model, False)
                scores = evaluate(model)
            row.update(scores)
            history.append(row)
            epoch_gen_state = gen.get_state()
            totals = [0.0, 0, 0, 0]
            save(epoch + 1, 0)
            if progress:
                extra = f" val_acc={row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
                extra += "".join(f" {k}={v:.4f}" for k, v in scores.items())
                tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: loss={row['loss']:.4f} "
                           f"train_acc={row['train_accuracy']:.4f}{extra} ({row['seconds']:.1f}s)")
    finally:
        objective.detach()
    if distributed.is_distributed():
        history[-1]["max_param_divergence"] = distributed.max_param_divergence(model) if history else 0.0
    set_mode(model, False)
    return history
