"""Black-box teachers: anything that maps a batch of inputs to logits, probabilities, top-k outputs or labels.

A teacher is a callable `teacher(x) -> TeacherOutput` with `x` a float32 array (N, *input_shape), plus an
`identity()` string that changes whenever its outputs could (sha256 of the weights file, of the ONNX file, or
of a command line and the files it names). Labels and teacher caches record that identity so a resumed or
reused artifact is never silently mixed with another teacher's outputs.

Kinds of output (`TeacherOutput.kind`):

    logits  values (N, C) float                       a full set of unnormalized scores
    probs   values (N, C) float, rows sum to 1        a full probability vector
    topk    values (N, k) float + indices (N, k) int  the k best classes only (an API that returns top-5);
            `values_are` says whether the values are logits or probabilities
    labels  values (N,) int                           hard labels only (the most black of black boxes)

Teachers provided: `TorchTeacher` (an nn.Module), `OnnxTeacher` (onnxruntime), `CommandTeacher` (an external
program, one call per batch, see its docstring for the file protocol) and `FunctionTeacher` (a Python
callable you name). `load_teacher(spec)` picks one from a string.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.fileio import exit_on_sigterm, sha256_file

KINDS = ("logits", "probs", "topk", "labels")
PROBS_TOLERANCE = 1e-4   # rows within this of summing to 1 (and non-negative) are probabilities


@dataclass(frozen=True, eq=False)   # holds arrays: compare fields yourself
class TeacherOutput:
    """What a teacher returned for one batch (see the module docstring for the kinds)."""

    kind: str
    values: np.ndarray
    indices: np.ndarray | None = None
    values_are: str = "logits"    # topk only: "logits" | "probs"


class Teacher(Protocol):
    def __call__(self, x: np.ndarray) -> TeacherOutput: ...

    def identity(self) -> str: ...


def array_sha256(a: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-order bytes of an array (so a reshaped or re-typed copy differs)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{tuple(a.shape)}".encode())
    if a.size:   # an empty array (e.g. no validation split) has no bytes; memoryview cannot cast it
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def looks_like_probs(values: np.ndarray) -> bool:
    """True when every row is non-negative and sums to 1 within PROBS_TOLERANCE."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.ndim == 2 and v.size and (v >= 0).all() and np.all(np.abs(v.sum(axis=1) - 1.0) <= PROBS_TOLERANCE))


def teacher_name(teacher: Any) -> str:
    return getattr(teacher, "name", None) or type(teacher).__name__


def teacher_identity(teacher: Any) -> str:
    """The teacher's identity string; a callable without `identity()` is refused (wrap it in FunctionTeacher)."""
    ident = getattr(teacher, "identity", None)
    if not callable(ident):
        raise EdgekdError(f"teacher {teacher_name(teacher)}: has no identity(); wrap a plain function in "
                          "edgekd.teachers.FunctionTeacher(fn, identity='...') so labels and caches can tell "
                          "teachers apart")
    value = ident()
    if not isinstance(value, str) or not value:
        raise EdgekdError(f"teacher {teacher_name(teacher)}: identity() returned {value!r}; expected a non-empty str")
    return value


def validate_output(out: Any, samples: int, who: str, *, num_classes: int | None = None) -> TeacherOutput:
    """Check a teacher's answer for a batch of `samples` inputs; returns it with canonical dtypes.

    logits/probs -> float32 (N, C) with C >= 2; topk -> float32 values and int64 indices (N, k), indices
    distinct per row; labels -> int64 (N,). Values must be finite, indices/labels in [0, num_classes).
    """
    if not isinstance(out, TeacherOutput):
        raise EdgekdError(f"{who}: returned {type(out).__name__}; expected edgekd.teachers.TeacherOutput")
    if out.kind not in KINDS:
        raise EdgekdError(f"{who}: output kind {out.kind!r}; expected one of {', '.join(KINDS)}")
    values = np.asarray(out.values)
    if out.kind == "labels":
        if values.dtype.kind not in "iu" or values.shape != (samples,):
            raise EdgekdError(f"{who}: labels have dtype {values.dtype} and shape {values.shape}; expected integers "
                              f"of shape ({samples},), one per input")
        values = values.astype(np.int64)
        _check_classes(values, who, "labels", num_classes)
        return TeacherOutput("labels", values)
    if values.dtype.kind != "f":
        raise EdgekdError(f"{who}: {out.kind} values have dtype {values.dtype}; expected floating point")
    if values.ndim != 2 or values.shape[0] != samples:
        raise EdgekdError(f"{who}: {out.kind} values have shape {values.shape}; expected ({samples}, classes) "
                          f"for a batch of {samples} inputs")
    if not np.isfinite(values).all():
        raise EdgekdError(f"{who}: {out.kind} values contain NaN or Inf")
    values = values.astype(np.float32)
    if out.kind in ("logits", "probs"):
        if values.shape[1] < 2:
            raise EdgekdError(f"{who}: {out.kind} have shape {values.shape}; expected at least 2 classes")
        if num_classes is not None and values.shape[1] != num_classes:
            raise EdgekdError(f"{who}: {out.kind} have {values.shape[1]} classes per sample; expected {num_classes}")
        if out.kind == "probs" and not looks_like_probs(values):
            raise EdgekdError(f"{who}: probs are not probabilities (rows must be >= 0 and sum to 1 within "
                              f"{PROBS_TOLERANCE})")
        return TeacherOutput(out.kind, values)
    indices = None if out.indices is None else np.asarray(out.indices)
    if indices is None or indices.dtype.kind not in "iu" or indices.shape != values.shape:
        got = "none" if indices is None else f"dtype {indices.dtype} shape {indices.shape}"
        raise EdgekdError(f"{who}: topk indices are {got}; expected integers of the values' shape {values.shape}")
    if values.shape[1] < 1:
        raise EdgekdError(f"{who}: topk values have shape {values.shape}; expected k >= 1")
    indices = indices.astype(np.int64)
    _check_classes(indices, who, "topk indices", num_classes)
    srt = np.sort(indices, axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise EdgekdError(f"{who}: topk indices repeat a class within a row; expected k distinct classes per sample")
    if out.values_are not in ("logits", "probs"):
        raise EdgekdError(f"{who}: topk values_are {out.values_are!r}; expected 'logits' or 'probs'")
    if out.values_are == "probs" and ((values < 0).any() or (values.sum(axis=1) > 1 + PROBS_TOLERANCE).any()):
        raise EdgekdError(f"{who}: topk probabilities must be >= 0 and sum to at most 1 per row")
    return TeacherOutput("topk", values, indices, out.values_are)


def _check_classes(a: np.ndarray, who: str, what: str, num_classes: int | None) -> None:
    if a.size and a.min() < 0:
        raise EdgekdError(f"{who}: {what} contain {a.min()}; expected class ids >= 0")
    if num_classes is not None and a.size and a.max() >= num_classes:
        raise EdgekdError(f"{who}: {what} contain class {a.max()}; expected 0..{num_classes - 1}")


# --- PyTorch -----------------------------------------------------------------------------------------------


class TorchTeacher:
    """An nn.Module run in eval mode under no_grad; answers logits.

    identity(): `identity` if given (load_teacher passes the checkpoint's sha256), else a sha256 over the
    model's class name and state dict.
    """

    def __init__(self, model: Any, *, device: str | None = None, batch_size: int = 512,
                 identity: str | None = None, name: str | None = None) -> None:
        import torch

        self.model = model
        params = list(model.parameters())
        self.device = torch.device(device) if device else (params[0].device if params else torch.device("cpu"))
        self.batch_size = batch_size
        self._identity = identity
        self.name = name or f"torch teacher {type(model).__name__}"

    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256(type(self.model).__qualname__.encode())
            for key, tensor in self.model.state_dict().items():
                h.update(key.encode())
                h.update(array_sha256(tensor.detach().cpu().contiguous().numpy()).encode())
            self._identity = "torch:" + h.hexdigest()
        return self._identity

    def __call__(self, x: np.ndarray) -> TeacherOutput:
        import torch

        if not isinstance(self.model, torch.fx.GraphModule):   # torch.export'ed modules refuse .eval()
            self.model.eval()
        outs = []
        try:
            with torch.no_grad():
                for i in range(0, len(x), self.batch_size):
                    xb = torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size], dtype=np.float32))
                    outs.append(self.model(xb.to(self.device)).float().cpu().numpy())
        except Exception as e:
            raise EdgekdError(f"{self.name}: cannot run on inputs of shape {tuple(x.shape)} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        return TeacherOutput("logits", np.concatenate(outs) if outs else np.zeros((0, 0), np.float32))


# --- ONNX --------------------------------------------------------------------------------------------------


class OnnxTeacher:
    """An ONNX model run by onnxruntime; answers logits or probs.

    The first output is used. Its kind is `output_kind` when given, else inferred per batch: probs when every
    row is non-negative and sums to 1 within 1e-4 (a model ending in softmax), logits otherwise. A model with
    a fixed batch size is fed in chunks of that size (the last one zero-padded).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), *,
                 output_kind: str | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = f"ONNX teacher {self.path}"
        if output_kind not in (None, "logits", "probs"):
            raise EdgekdError(f"{self.name}: output_kind {output_kind!r}; expected 'logits', 'probs' or None (infer)")
        if not self.path.is_file():
            raise EdgekdError(f"{self.name}: file not found")
        self.output_kind = output_kind
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as e:
            raise EdgekdError(f"{self.name}: onnxruntime cannot load it with providers {list(providers)} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dims = list(inp.shape)
        self.output_name = self.session.get_outputs()[0].name
        self._identity: str | None = None

    def identity(self) -> str:
        if self._identity is None:
            self._identity = "onnx:" + sha256_file(self.path)
        return self._identity

    def __call__(self, x: np.ndarray) -> TeacherOutput:
        x = np.ascontiguousarray(x, dtype=np.float32)
        fixed = self.input_dims[0] if self.input_dims and isinstance(self.input_dims[0], int) else None
        chunk = fixed or max(len(x), 1)
        outs = []
        try:
            for i in range(0, len(x), chunk):
                n = min(chunk, len(x) - i)   # the last chunk of a fixed batch size is zero-padded to it
                xb = np.pad(x[i:i + chunk], [(0, chunk - n)] + [(0, 0)] * (x.ndim - 1))
                outs.append(np.asarray(self.session.run([self.output_name], {self.input_name: xb})[0])[:n])
        except Exception as e:
            raise EdgekdError(f"{self.name}: onnxruntime cannot run it on inputs of shape {tuple(x.shape)} (the model "
                              f"expects {self.input_dims}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from e
        values = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        kind = self.output_kind or ("probs" if looks_like_probs(values) else "logits")
        return TeacherOutput(kind, values.astype(np.float32))


# --- External command --------------------------------------------------------------------------------------


class CommandTeacher:
    """An external program called once per batch (a remote API client, another framework, a binary).

    Protocol, per batch:
      1. edgekd writes `in.npz` holding `x` (float32, (N, *input_shape), normalized as the student sees it)
         into a fresh temporary directory;
      2. it runs `argv + [IN_PATH, OUT_PATH]` (no shell, stdin closed, the environment inherited, in its own
         process group) and waits at most `timeout_s` seconds. Only the last 64 KiB of its stdout and stderr are
         kept. When it exits, times out, fails, or edgekd gets SIGINT/SIGTERM, the whole process group is
         killed (nothing it started outlives the batch) and the temporary directory removed;
      3. the command exits 0 after writing `OUT_PATH` (an .npz, written with numpy.savez) holding exactly one of
           `logits` (N, C) float | `probs` (N, C) float, rows summing to 1 |
           `topk_values` (N, k) float + `topk_indices` (N, k) int, with optional `topk_kind` = "logits" or
           "probs" (default: probs when values are >= 0 and each row sums to at most 1, else logits) |
           `labels` (N,) int.
    Anything else (non-zero exit, timeout, no output file, unknown or extra keys, wrong dtype, shape or sample
    count) is an EdgekdError naming the command, what was wrong and the last line the command wrote to stderr.

    identity(): sha256 over the command line and over the contents of every argument that names an existing
    file (the executable when it is a path, a script, a model file), so editing the script changes it.
    """

    def __init__(self, argv: Sequence[str], timeout_s: float = 600.0) -> None:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise EdgekdError(f"teacher command {argv!r}: expected a non-empty list of strings")
        if timeout_s <= 0:
            raise EdgekdError(f"teacher command {shlex.join(argv)!r}: timeout_s must be > 0, got {timeout_s}")
        self.argv = list(argv)
        self.timeout_s = float(timeout_s)
        self.name = f"teacher command `{shlex.join(self.argv)}`"
        self._identity: str | None = None

    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256(json.dumps(self.argv).encode())
            for arg in self.argv:
                if os.path.isfile(arg):
                    h.update(f"\0{arg}\0{sha256_file(arg)}".encode())
            self._identity = "cmd:" + h.hexdigest()
        return self._identity

    def __call__(self, x: np.ndarray) -> TeacherOutput:
        n = len(x)
        with exit_on_sigterm(), tempfile.TemporaryDirectory(prefix="edgekd-teacher-") as tmp:
            in_path, out_path = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
            np.savez(in_path, x=np.ascontiguousarray(x, dtype=np.float32))
            stderr = self._run([*self.argv, str(in_path), str(out_path)], n)
            if not out_path.is_file():
                raise EdgekdError(f"{self.name}: exited 0 but wrote no output file {out_path.name} for a batch of {n}"
                                  f"{_last_line(stderr)}")
            try:
                with np.load(out_path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except Exception as e:
                raise EdgekdError(f"{self.name}: {out_path.name} is not a readable .npz without pickles "
                                  f"({type(e).__name__}: {e}){_last_line(stderr)}") from None
        return validate_output(self._parse(arrays, stderr), n, self.name)

    def _run(self, cmd: list[str], n: int) -> str:
        """Run one batch; returns the tail of its stderr. Its output is drained as it comes and only the last
        OUTPUT_TAIL bytes of each stream are kept; its whole process group is ended however this returns
        (exit, timeout, error, KeyboardInterrupt, SIGTERM), so nothing it started outlives the call."""
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as e:
            raise EdgekdError(f"{self.name}: cannot start it ({e.strerror or e})") from None
        tails = [_Tail(proc.stdout), _Tail(proc.stderr)]
        timed_out = False
        try:
            proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:   # SIGKILL its process group (its own session): the command and whatever it started, still
            # running after it exited, timed out or was interrupted
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if hasattr(os, "killpg"):
                    os.killpg(proc.pid, signal.SIGKILL)
                else:  # pragma: no cover
                    proc.kill()
            proc.wait()
            for tail in tails:
                tail.close()
        err = tails[1].text()
        if timed_out:
            raise EdgekdError(f"{self.name}: did not finish within {self.timeout_s:g} s on a batch of {n} inputs "
                              f"(killed; raise the timeout or lower the batch size){_last_line(err)}")
        if proc.returncode != 0:
            raise EdgekdError(f"{self.name}: exited with code {proc.returncode} on a batch of {n} inputs"
                              f"{_last_line(err)}")
        return err

    def _parse(self, arrays: dict[str, np.ndarray], stderr: str) -> TeacherOutput:
        keys = set(arrays)
        groups = {"logits": {"logits"}, "probs": {"probs"}, "labels": {"labels"},
                  "topk": {"topk_values", "topk_indices"}}
        found = [kind for kind, need in groups.items() if need & keys]
        allowed = set().union(*groups.values()) | {"topk_kind"}
        if len(found) != 1 or not groups[found[0]] <= keys or keys - allowed:
            raise EdgekdError(f"{self.name}: output holds {sorted(keys) or 'nothing'}; expected exactly one of "
                              "'logits', 'probs', 'labels' or 'topk_values'+'topk_indices' (optional 'topk_kind')"
                              f"{_last_line(stderr)}")
        kind = found[0]
        if kind != "topk":
            return TeacherOutput(kind, arrays[kind])
        values, indices = arrays["topk_values"], arrays["topk_indices"]
        if "topk_kind" in arrays:
            values_are = str(arrays["topk_kind"])
            if values_are not in ("logits", "probs"):
                raise EdgekdError(f"{self.name}: topk_kind is {values_are!r}; expected 'logits' or 'probs'")
        else:
            v = np.asarray(values, dtype=np.float64)
            probs = v.ndim == 2 and (v >= 0).all() and (v.sum(axis=1) <= 1 + PROBS_TOLERANCE).all()
            values_are = "probs" if probs else "logits"
        return TeacherOutput("topk", values, indices, values_are)


OUTPUT_TAIL = 64 * 1024   # bytes of a teacher command's stdout and stderr kept (for the error message)


class _Tail:
    """Drain a pipe in a thread as the command writes it, keeping only its last OUTPUT_TAIL bytes: a command
    that prints gigabytes costs 64 KiB, and never blocks on a full pipe."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        fd = self._stream.fileno()
        with contextlib.suppress(OSError, ValueError):   # closed by close() after a wait that gave up
            while chunk := os.read(fd, 1 << 16):
                self._buf += chunk
                if len(self._buf) > 2 * OUTPUT_TAIL:
                    del self._buf[:-OUTPUT_TAIL]

    def close(self) -> None:
        """Wait briefly for the rest (the writers are gone), then close the pipe."""
        self._thread.join(timeout=5)
        self._stream.close()

    def text(self) -> str:
        return bytes(self._buf[-OUTPUT_TAIL:]).decode(errors="replace")


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"; last stderr line: {lines[-1][:300]}" if lines else "; it wrote nothing to stderr"


# --- Python callable ---------------------------------------------------------------------------------------


class FunctionTeacher:
    """A Python callable `fn(x) -> TeacherOutput | np.ndarray` with an identity you choose.

    A bare array is taken as logits, or as probs when its rows look like probabilities (see looks_like_probs).
    """

    def __init__(self, fn: Callable[[np.ndarray], Any], identity: str, *, name: str | None = None) -> None:
        self.fn = fn
        self._identity = identity
        self.name = name or f"teacher function {getattr(fn, '__qualname__', type(fn).__name__)}"

    def identity(self) -> str:
        return self._identity

    def __call__(self, x: np.ndarray) -> TeacherOutput:
        out = self.fn(x)
        if isinstance(out, TeacherOutput):
            return out
        values = np.asarray(out)
        return TeacherOutput("probs" if looks_like_probs(values) else "logits", values)


# --- From a spec string ------------------------------------------------------------------------------------


def load_teacher(spec: str, *, model_spec: str | None = None, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, timeout_s: float = 600.0) -> Teacher:
    """A teacher from a string: `path.onnx` -> OnnxTeacher, `path.safetensors` -> TorchTeacher,
    `cmd:PROGRAM ARGS...` (shlex-split) -> CommandTeacher.

    A safetensors checkpoint needs the architecture: `model_spec`, `input_shape` and `num_classes` from the caller
    (the recipe or the command line), never from the file's metadata: a checkpoint is data and must not name code.
    """
    if spec.startswith("cmd:"):
        try:
            argv = shlex.split(spec[4:])
        except ValueError as e:
            raise EdgekdError(f"teacher {spec!r}: cannot split the command line ({e})") from None
        if not argv:
            raise EdgekdError(f"teacher {spec!r}: 'cmd:' needs a command, e.g. 'cmd:python my_teacher.py'")
        return CommandTeacher(argv, timeout_s)
    path = Path(spec).expanduser()
    if path.suffix == ".onnx":
        teacher = OnnxTeacher(path)
        dims = teacher.input_dims[1:]
        if input_shape is not None and all(isinstance(d, int) for d in dims) and tuple(dims) != tuple(input_shape):
            raise EdgekdError(f"teacher {path}: takes inputs of shape {tuple(dims)}, the data has "
                              f"{tuple(input_shape)}")
        return teacher
    if path.suffix != ".safetensors":
        raise EdgekdError(f"teacher {spec!r}: expected a .onnx file, a .safetensors checkpoint, or 'cmd:PROGRAM ARGS'")
    from edgekd.models import build_model, load_weights

    if not path.is_file():
        raise EdgekdError(f"teacher {path}: file not found")
    missing = [name for name, v in (("model_spec", model_spec), ("input_shape", input_shape),
                                    ("num_classes", num_classes)) if v is None]
    if missing:
        raise EdgekdError(f"teacher {path}: a safetensors checkpoint needs the architecture from the recipe or the "
                          f"command line; {', '.join(missing)} not given (pass the teacher's model spec, e.g. "
                          "'cnn:widths=32,64', with the data's input shape and class count; the file's own metadata "
                          "is never used to pick code)")
    model = build_model(model_spec, tuple(input_shape), int(num_classes))
    load_weights(model, path)
    return TorchTeacher(model, identity="torch:" + sha256_file(path), name=f"torch teacher {path}")
