"""Size the student to the target: the most accurate student of a family that meets a measured latency budget.

The latency of an untrained network is the latency of the trained one, so the search never trains: each
candidate (the family's widths times a multiplier, rounded to multiples of `divisor`) is exported untrained
(once for all float precisions), built into the engines the target ships (INT8 with the target's scheme,
calibrated on real training samples) and profiled on the target. The engine that decides is the one `edgekd run`
would ship: INT8, unless it is slower than FP32 at a profiled batch size (the pipeline's int8_fallback).

Widths grow with the multiplier, so the distinct architectures between min_multiplier and max_multiplier form an
ordered ladder, and bisections over it (latency assumed to grow with width) find the largest candidate that fits
(latency <= budget / (1 + margin)) and the smallest above it that is over the budget by the margin (latency >=
budget * (1 + margin)). Neighbouring candidates can differ by less than the measurement noise, so candidates
between those two are within the noise of the budget: neither chosen nor the comparison. Then a confirmation
round profiles the chosen and next-larger candidates again, interleaved in fresh processes; the two
measurements of each engine give the run-to-run noise, the margin grows to it, and the search moves the pair
until it brackets the budget under both measurements. The chosen student (and its neighbours) is then
distilled, quantized as the recipe says, built and profiled, and the report shows the budget, the noise and
margin, every candidate measured, the choice, and on the trained engines which precision ships and whether the
pair still brackets the budget.

Remote targets: the search runs in rounds. A round writes the candidate bundles it needs (with the next levels of
the bisection, so one or two rounds settle it) and one shell command that profiles them on the device with
`python -m edgekd.runtime profile`; `--measurements` reads the results back (confirmation rounds from its
confirm/ subfolder, the trained students' from students/) and the search continues from them. Nothing in the
search assumes the host is the target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tabulate import tabulate

from edgekd import energy, fileio, runtime
from edgekd.bundle import read_manifest
from edgekd.data import load_data
from edgekd.engines import QUANTIZATIONS, EngineSource, check_target, registry
from edgekd.engines import build as build_engine
from edgekd.engines.registry import PRECISIONS
from edgekd.errors import EdgekdError
from edgekd.recipe import Recipe, SizeConfig, validate_size
from edgekd.report import pyplot, save_png
from edgekd.targets import Target, load_target

MAX_MEASUREMENT_FILES = 1000
ROUND_BUNDLES = 8          # candidates per remote round (the next bisection levels are prefetched)
EVAL_SAMPLES = 256         # real inputs stored in candidate bundles (the profiler feeds them)
STUDENT_PATH_PARTS = 5    # students/<slug>/engines/<target>/<bundle>: how a trained student's result is matched
MAX_CONFIRM_ROUNDS = 6     # confirmation rounds before the search reports an unsettled pair
FACTORY_STEP = 1.1         # multiplier ratio between neighbouring candidates of a factory family
_PROFILE_JSON = "`python -m edgekd.runtime profile BUNDLE --json`"   # what writes a measurements file


@dataclass(frozen=True)
class Candidate:
    index: int
    multiplier: float       # the smallest multiplier that gives this architecture
    spec: str
    params: int


def size_config(recipe: Recipe, **overrides: Any) -> SizeConfig:
    """The recipe's [size] section with the CLI's options (None: not given) laid over it, checked."""
    cfg = dataclasses.replace(recipe.size or SizeConfig(), **{k: v for k, v in overrides.items() if v is not None})
    validate_size(cfg, "edgekd size")
    if cfg.budget_ms is None:
        raise EdgekdError("edgekd size: no latency budget; pass --budget-ms or set [size] budget_ms in the recipe")
    return cfg


def ladder(spec: str, input_shape: tuple[int, ...], num_classes: int, cfg: SizeConfig) -> list[Candidate]:
    """The distinct architectures of the family between min_multiplier and max_multiplier, smallest first.

    Width w becomes max(d, d * floor(w * m / d + 1/2)), which changes at m = (k + 1/2) * d / w; those points are
    the whole ladder. A factory family (width=m passed to it) steps by FACTORY_STEP."""
    from edgekd.models import build_model, count_params, family_widths, scaled_spec

    lo, hi, d = cfg.min_multiplier, cfg.max_multiplier, cfg.divisor
    widths = family_widths(spec)
    if widths is None:
        steps = int(math.floor(math.log(hi / lo) / math.log(FACTORY_STEP))) if hi > lo else 0
        points = [lo * FACTORY_STEP ** i for i in range(steps + 1)] + ([hi] if hi > lo else [])
    else:
        points = {lo} | {(k + 0.5) * d / w for w in widths for k in range(int(lo * w / d), int(hi * w / d) + 1)}
        points = sorted(m for m in points if lo <= m <= hi)
    out: list[Candidate] = []
    for m in points:
        s = scaled_spec(spec, m * (1 + 1e-9) if widths is not None else m, d)
        params = count_params(build_model(s, input_shape, num_classes))
        if out and (out[-1].spec == s or (widths is None and out[-1].params == params)):
            continue
        out.append(Candidate(len(out), round(m, 4), s, params))
    return out


def search(n: int, measured: dict[int, float], low: float, high: float) -> dict[str, Any]:
    """One step of the search over a ladder of `n` candidates, given the decision latencies `measured` so far.

    Two bisections: the chosen candidate is the largest that fits (latency <= low = budget / (1 + margin)); the
    next larger is the smallest above it that is over the budget by the margin (latency >= high = budget *
    (1 + margin)). Candidates between them measured within the noise of the budget: neither side can be told
    apart from it, so they are neither chosen nor the comparison (the ladder is coarsened there to twice the
    margin). Returns {"need": [indices], "lo", "hi"} while it needs measurements, else {"chosen": index or None
    (none fits), "larger": index or None (none is distinguishably over)}."""
    need = [i for i in dict.fromkeys((0, n - 1)) if i not in measured]
    if need:
        return {"need": need, "lo": 0, "hi": n - 1}
    if measured[n - 1] <= low:
        return {"chosen": n - 1, "larger": None}
    if measured[0] > low:
        return {"chosen": None, "larger": 0}
    chosen = _first(measured, 0, n - 1, lambda ms: ms > low)
    if isinstance(chosen, dict):
        return chosen
    chosen -= 1
    if measured[n - 1] < high:
        return {"chosen": chosen, "larger": None}
    larger = _first(measured, chosen, n - 1, lambda ms: ms >= high)
    return larger if isinstance(larger, dict) else {"chosen": chosen, "larger": larger}


def _first(measured: dict[int, float], lo: int, hi: int, over: Any) -> int | dict[str, Any]:
    """Bisection for the first index in (lo, hi] where `over` holds, given it fails at lo and holds at hi (latency
    assumed to grow with width); {"need": [mid], ...} when a midpoint is not measured yet."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid not in measured:
            return {"need": [mid], "lo": lo, "hi": hi}
        lo, hi = (lo, mid) if over(measured[mid]) else (mid, hi)
    return hi


def lookahead(lo: int, hi: int, count: int) -> list[int]:
    """The first `count` midpoints of the bisection tree below (lo, hi), breadth first: what a remote round
    measures so that the device is visited once or twice rather than once per step."""
    out, queue = [], [(lo, hi)]
    while queue and len(out) < count:
        a, b = queue.pop(0)
        if b - a > 1:
            mid = (a + b) // 2
            out.append(mid)
            queue += [(a, mid), (mid, b)]
    return out


# ------------------------------------------------------------------------------------------ measurements


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_measurements(path: str | Path, target: str, batch: int, metric: str = "p50", key: str = "model"
                      ) -> dict[tuple[str, str], dict[str, Any]]:
    """Profile results from the device (`python -m edgekd.runtime profile ... --json`): a folder of .json files,
    or one .json file holding one result or a list. Data, not code: size-bounded and checked; returns
    {(model spec, precision): {"p50", "p90", "p99", "mean", "runs", "per_batch", "accuracy", "source"}} at
    `batch`, combining the sessions of one engine as Meter.profile does. With key="bundle" the first item
    is the bundle's path as the device named it, last STUDENT_PATH_PARTS parts (the trained students' bundles
    all hold model "student"); it is only compared with the paths edgekd wrote, never opened."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if len(files) > MAX_MEASUREMENT_FILES:
            raise EdgekdError(f"--measurements {path}: {len(files)} .json files, at most {MAX_MEASUREMENT_FILES}")
    elif path.is_file():
        files = [path]
    else:
        raise EdgekdError(f"--measurements {path}: not found (a results .json file or a folder of them)")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for file in files:
        data = fileio.read_json(file.parent, file.name, what=f"measurements {file}", remedy=_PROFILE_JSON)
        for i, entry in enumerate(data if isinstance(data, list) else [data]):
            where = f"measurements {file}" + (f" [{i}]" if isinstance(data, list) else "")
            name, row = _measurement(entry, where, target, batch)
            if key == "bundle":
                if not isinstance(entry.get("bundle"), str) or len(entry["bundle"]) > 4096:
                    raise EdgekdError(f"{where}: expected the profiled bundle's path in 'bundle'")
                name = ("/".join(PurePosixPath(entry["bundle"]).parts[-STUDENT_PATH_PARTS:]), name[1])
            out[name] = _better(out.get(name), row, metric)
    if not out:
        raise EdgekdError(f"--measurements {path}: holds no profile results")
    return out


def _measurement(entry: Any, where: str, target: str, batch: int) -> tuple[tuple[str, str], dict[str, Any]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not isinstance(entry.get("rows"),
                                                                                                  list):
        raise EdgekdError(f"{where}: expected a profile result with 'model' and 'rows' (from {_PROFILE_JSON})")
    if entry.get("precision") not in PRECISIONS:
        raise EdgekdError(f"{where}: precision {entry.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
    if entry.get("target") != target:
        raise EdgekdError(f"{where}: measured a bundle built for target {entry.get('target')!r}, expected "
                          f"{target!r}")
    rows = {r["batch"]: r for r in entry["rows"] if isinstance(r, dict) and type(r.get("batch")) is int}
    if batch not in rows:
        raise EdgekdError(f"{where}: no row for batch {batch} (profile with --batch {batch})")
    for b, r in rows.items():
        for key in ("p50", "p90", "p99", "mean"):
            if not _finite(r.get(key)):
                raise EdgekdError(f"{where}: batch {b} {key} must be a positive number of ms, got {r.get(key)!r}")
    row = rows[batch]
    accuracy = entry.get("accuracy")
    return (entry["model"], entry["precision"]), {
        **{k: float(row[k]) for k in ("p50", "p90", "p99", "mean")}, "runs": row.get("runs"),
        "quantization": entry["quantization"] if entry.get("quantization") in QUANTIZATIONS else None,
        "per_batch": {b: float(r["p50"]) for b, r in sorted(rows.items())},
        "accuracy": accuracy if isinstance(accuracy, float) else None, "source": where.split(" ", 1)[1]}


# ------------------------------------------------------------------------------------------ candidate bundles


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


class Meter:
    """The candidates folder. It builds the untrained candidates' engines there as the deployed student would be
    built (float engines from the float ONNX, INT8 from a PTQ Q/DQ ONNX calibrated on real training samples) and
    measures them: search(indices, lo, hi) and confirm(indices) return {index: {precision: row}}, or {"need":
    [indices]} when a remote device must measure them first. Here it profiles each engine in fresh processes (as
    on the device). Remote, it reads the device's measurements (untrusted data, checked): the search's from the
    results folder, the confirmation round's from its confirm/ subfolder, the trained students' from students/;
    what is missing becomes the next round's request."""

    def __init__(self, recipe: Recipe, data: Any, target: Target, folder: Path, cfg: SizeConfig,
                 cands: list[Candidate], batches: list[int], progress: bool, remote: bool,
                 measurements: str | Path | None) -> None:
        from edgekd.pipeline import RunContext

        self.recipe, self.data, self.target, self.folder = recipe, data, target, folder
        self.cfg, self.cands, self.batches, self.progress, self.remote = cfg, cands, batches, progress, remote
        self.precisions = [p for p in target.precisions if p != "int8" or target.quant_scheme != "none"]
        ctx = RunContext(folder, recipe, data)   # the run's PTQ example and calibration batches, as the pipeline's
        self.example = ctx.quant_example()[0]
        self.calibration_batches, self.calibration = ctx.calibration_batches(recipe.quantize)
        n = min(EVAL_SAMPLES, len(data.x_test))
        self.evals = (data.x_test[:n], data.y_test[:n], None)
        self._sources: dict[tuple[str, str], Any] = {}   # (spec, quantization) -> EngineSource
        self.exports = 0   # ONNX exports and weight files written (one per candidate and quantization)
        self.found, self.confirmed, self.students = {}, {}, {}
        if measurements is not None:
            path = Path(measurements)
            self.found = read_measurements(path, target.name, cfg.batch, cfg.metric)
            for sub, attr in (("confirm", "confirmed"), ("students", "students")):
                if path.is_dir() and any((path / sub).glob("*.json")):
                    setattr(self, attr, read_measurements(path / sub, target.name, cfg.batch, cfg.metric,
                                                          key="bundle" if sub == "students" else "model"))

    def bundle_dir(self, c: Candidate, precision: str) -> Path:
        return self.folder / f"{_slug(c.spec)}-{precision}"

    def build(self, c: Candidate) -> dict[str, Path]:
        """precision -> bundle folder; a verified bundle already there is reused (a rerun resumes), any other is
        rebuilt in its place (engines.build swaps the whole folder)."""
        out = {}
        for precision in self.precisions:
            path = self.bundle_dir(c, precision)
            with contextlib.suppress(EdgekdError):
                if (path / "manifest.json").is_file() and read_manifest(path).get("model") == c.spec:
                    out[precision] = path
                    continue
            out[precision] = self._build_one(c, precision, path)
        return out

    def _build_one(self, c: Candidate, precision: str, path: Path) -> Path:
        quantization = "ptq" if precision == "int8" else "none"
        if (c.spec, quantization) not in self._sources:   # one export serves every float precision
            self._sources[c.spec, quantization] = self._export(c, quantization)
        try:
            return build_engine(self._sources[c.spec, quantization], self.target, precision, path,
                                eval_data=self.evals)
        except EdgekdError as e:
            raise EdgekdError(f"target {self.target.name}: cannot build the {precision} engine of candidate "
                              f"{c.spec} on this machine ({e}); run `edgekd size` on a machine that can build "
                              "this target's engines (for TensorRT: the device itself)") from e

    def _export(self, c: Candidate, quantization: str) -> Any:
        """The untrained candidate ("ptq": quantized) as ONNX, or as weights for a runtime that builds from them
        (torch); seeded, so every precision and rerun gets the same weights."""
        import torch

        from edgekd.export import export_onnx
        from edgekd.models import build_model, save_weights

        torch.manual_seed(0)
        net = build_model(c.spec, self.data.input_shape, self.data.num_classes).eval()
        meta = {"model": c.spec, "model_spec": c.spec, "class_names": json.dumps(list(self.data.class_names)),
                "normalization": json.dumps(self.data.normalization), "size_candidate": "untrained"}
        if quantization == "ptq":
            from edgekd.pipeline import _import_torchao_quietly

            _import_torchao_quietly()
            from edgekd import quantize

            q = self.recipe.quantize
            qcfg = quantize.QuantConfig(scheme=self.target.quant_scheme, observer=q.observer, percentile=q.percentile)
            net = quantize.ptq(net, self.example, self.calibration_batches, qcfg)
            meta.update(quantization="ptq", quant_scheme=self.target.quant_scheme)
        stem, onnx_path, weights = f"{_slug(c.spec)}-{quantization}", None, None
        if registry.backend(self.target.runtime).source == "onnx":
            onnx_path = export_onnx(net, self.example, self.folder / ".work" / f"{stem}.onnx", metadata=meta)
        else:
            weights = self.folder / ".work" / f"{stem}.safetensors"
            save_weights(net, weights)
        self.exports += 1
        return EngineSource(model_name=c.spec, onnx_path=onnx_path, weights_path=weights, model_spec=c.spec,
                            input_shape=self.data.input_shape, num_classes=self.data.num_classes,
                            class_names=self.data.class_names, normalization=self.data.normalization,
                            quantization=quantization)

    def search(self, need: list[int], lo: int, hi: int) -> dict[Any, Any]:
        if not self.remote:
            return {i: self._measure([i], "search ")[i] for i in need}   # one candidate at a time
        if all(self._known(self.found, i) for i in need):
            return {i: self._get(self.found, i) for i in need}
        wanted = list(dict.fromkeys(need + lookahead(lo, hi, ROUND_BUNDLES)))
        return {"need": [i for i in wanted if not self._known(self.found, i)][:max(ROUND_BUNDLES, len(need))]}

    def confirm(self, pair: list[int]) -> dict[Any, Any]:
        if not self.remote:
            return self._measure(pair, "confirm")   # the pair's engines interleaved
        if all(self._known(self.confirmed, i) for i in pair):
            return {i: self._get(self.confirmed, i) for i in pair}
        return {"need": pair}

    def _known(self, found: dict, i: int) -> bool:
        return all((self.cands[i].spec, p) in found for p in self.precisions)

    def _get(self, found: dict, i: int) -> dict[str, Any]:
        return {p: found[(self.cands[i].spec, p)] for p in self.precisions}

    def profile(self, engines: list[tuple[Any, Path]]) -> dict[Any, dict[str, Any]]:
        """Profile each (key, bundle) in cfg.repeats fresh processes, interleaved (session 1 of every engine, then
        session 2, ...) so that a slow spell on a shared machine hits all of them alike; per engine the session
        with the lowest cfg.metric at cfg.batch counts, and per batch its lowest p50: other processes only ever
        add latency, so the least disturbed session is the closest to what the engine takes (timeit's reasoning)."""
        from edgekd.pipeline import profile_in_subprocess

        cfg, best = self.cfg, {}
        args = ["--batch", ",".join(map(str, self.batches)), "--min-seconds", str(cfg.profile_seconds)]
        for _ in range(cfg.repeats):
            for key, bundle in engines:
                where = f"profile {bundle}"
                _, row = _measurement(profile_in_subprocess(bundle, args), where, self.target.name, cfg.batch)
                best[key] = _better(best.get(key), row, cfg.metric)
        return best

    def request(self, out: Path, wanted: list[Candidate], phase: str, here: str) -> dict[str, Any]:
        """Write the bundles a remote round needs and the one command that profiles them on the device (sessions
        interleaved across bundles; a confirmation round writes into results/confirm/)."""
        cfg, folder = self.cfg, self.folder
        names = [bundle.name for c in wanted for bundle in self.build(c).values()]
        command = self.device_loop(folder.name, names, "results" + ("/confirm" if phase == "confirm" else ""))
        rerun = (f"edgekd size RECIPE --target {cfg.target} --budget-ms {cfg.budget_ms:g} --batch {cfg.batch} "
                 f"--metric {cfg.metric} --out {out} --measurements {folder / 'results'}")
        req = {"status": "needs measurements", "phase": phase, "target": self.target.name, "bundles": names,
               "folder": str(folder), "command": command, "then": rerun,
               "why_remote": here if here != "ok" else "remote target",
               "candidates": [dataclasses.asdict(c) for c in wanted]}
        fileio.write_json(out / "size-request.json", req)
        fileio.write_text(folder / "MEASURE.txt", f"# on the device, from the folder that holds {folder.name}/:\n"
                          f"{command}\n# then copy {folder.name}/results/ back and run:\n{rerun}\n")
        _log(self.progress, f"size: {phase}: wrote {len(names)} bundles to {folder}; on the device run:\n  "
                            f"{command}\nthen:\n  {rerun}")
        return req

    def device_loop(self, folder: str, bundles: list[str], results: str) -> str:
        """One shell command for the device: cfg.repeats interleaved sessions of every bundle, one .json each."""
        cfg = self.cfg
        sessions = " ".join(str(i + 1) for i in range(cfg.repeats))
        return (f"(cd {folder} && mkdir -p {results} && for r in {sessions}; do for b in {' '.join(bundles)}; do "
                f"python -m edgekd.runtime profile \"$b\" --batch {','.join(map(str, self.batches))} --min-seconds "
                f"{cfg.profile_seconds:g} --json \"{results}/$(echo \"$b\" | tr / _).$r.json\" || exit 1; done; done)")

    def _measure(self, indices: list[int], what: str) -> dict[int, dict[str, Any]]:
        engines = [((i, p), b) for i in indices for p, b in self.build(self.cands[i]).items()]
        out: dict[int, dict[str, Any]] = {}
        for (i, p), row in self.profile(engines).items():
            out.setdefault(i, {})[p] = row
        for i in indices:
            c, lat = self.cands[i], out[i]
            _log(self.progress, f"size: {what} #{i:<3} x{c.multiplier:<7g} {c.spec:28s} {c.params:>9,} params  " +
                 "  ".join(f"{p} {self.cfg.metric} {r[self.cfg.metric]:.4f} ms" for p, r in lat.items()))
        return out


# ------------------------------------------------------------------------------------------ the stage


SHIPPED = "shipped"   # decision rule: the engine the pipeline would ship (INT8 unless slower than FP32)


def decision_precision(recipe: Recipe, target: Target, cfg: SizeConfig) -> str:
    """The engine whose latency decides: the one `edgekd run` would ship, unless [size] precision names one.

    When the recipe quantizes and the target builds INT8, that is "shipped": per candidate INT8, unless its
    INT8 engine is slower than its FP32 engine at one of the profiled batch sizes, where the pipeline's
    int8_fallback ships FP32 (or INT8 with float layers, which the search does not build; ship_slower_int8 keeps
    INT8 regardless). Otherwise the target's first float precision."""
    if cfg.precision != "auto":
        if cfg.precision not in target.precisions:
            raise EdgekdError(f"[size] precision {cfg.precision!r}: target {target.name} builds only "
                              f"{', '.join(target.precisions)}")
        return cfg.precision
    if recipe.quantize.mode != "none" and "int8" in target.precisions and target.quant_scheme != "none":
        return "int8" if recipe.quantize.ship_slower_int8 or "fp32" not in target.precisions else SHIPPED
    return next(p for p in target.precisions if p != "int8")


def ships(lat: dict[str, dict[str, Any]], rule: str) -> str:
    """The precision that decides for one candidate's measurements: `rule`, or for "shipped" INT8 unless its
    p50 is above FP32's at a batch both were profiled at (report.int8_vs_fp32's test, on the search's figures)."""
    if rule != SHIPPED:
        return rule
    fp32, int8 = lat["fp32"]["per_batch"], lat["int8"]["per_batch"]
    return "fp32" if any(int8[b] > fp32[b] for b in int8 if b in fp32) else "int8"


def noise(latencies: dict[int, dict], confirmed: dict[int, dict], cands: list[Candidate], rule: str,
          metric: str) -> list[dict[str, Any]]:
    """Run-to-run noise of the decision statistic (the least disturbed of `repeats` sessions): each confirmed
    candidate was measured twice, in the search and again in the confirmation round (fresh processes, minutes
    apart); noise = |a - b| / min(a, b) for the engine that decides (the one that ships, by either measurement;
    an engine that does not decide, such as an FP32 engine beside a faster INT8 one, does not count)."""
    out = []
    for i in sorted(confirmed):
        for p in dict.fromkeys((ships(latencies[i], rule), ships(confirmed[i], rule))):
            a, b = latencies[i][p][metric], confirmed[i][p][metric]
            out.append({"index": i, "spec": cands[i].spec, "precision": p, "search_ms": a, "confirm_ms": b,
                        "noise": abs(a - b) / min(a, b)})
    return out


def _value(i: int, latencies: dict, confirmed: dict, rule: str, metric: str, low: float, high: float) -> float:
    """The latency the search decides on. A confirmed candidate fits only when both measurements fit and is
    over only when both are over; when they disagree it sits in the band (within the noise of the budget)."""
    a = latencies[i][ships(latencies[i], rule)][metric]
    if i not in confirmed:
        return a
    b = confirmed[i][ships(confirmed[i], rule)][metric]
    lo, hi = min(a, b), max(a, b)
    if hi <= low or low >= high:   # both fit (or no band: a zero margin)
        return hi
    if lo >= high:                  # both over
        return lo
    return min(max((a + b) / 2, low * (1 + 1e-9)), high * (1 - 1e-9))


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def size(recipe: Recipe, out: str | Path, cfg: SizeConfig, *, measurements: str | Path | None = None,
         remote: bool = False, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Find the largest student of the family that meets cfg.budget_ms on cfg.target, then distill it (and its
    neighbours), build and profile the final engines; writes OUT/size-report.{json,md,png} and returns it.

    With `remote` (or `measurements`, or a target this machine cannot run) a round that needs measurements writes
    the bundles and the device command and returns {"status": "needs measurements", ...}."""
    out = Path(out)
    target = load_target(cfg.target)
    data = load_data(recipe.data, recipe.base_dir)
    family = cfg.model or recipe.student.model
    cands = ladder(family, data.input_shape, data.num_classes, cfg)
    rule = decision_precision(recipe, target, cfg)
    here = check_target(target)
    remote = remote or measurements is not None or here != "ok"
    batches = sorted({cfg.batch, *target.batch_sizes}) if rule == SHIPPED else [cfg.batch]
    _log(progress, f"size: {len(cands)} candidates of {family} (x{cfg.min_multiplier:g}..x{cfg.max_multiplier:g}, "
                   f"widths in multiples of {cfg.divisor}); the {rule} engine's {cfg.metric} at batch {cfg.batch} "
                   f"must be <= {cfg.budget_ms:g} ms / (1 + margin) on {target.name}, margin >= {cfg.margin:g}")
    meter = Meter(recipe, data, target, out / "candidates", cfg, cands, batches, progress, remote, measurements)
    state = _run_search(cands, meter, cfg, rule)
    if "need" in state:
        return meter.request(out, [cands[i] for i in state["need"]], state["phase"], here)
    rep = _search_report(cands, state, cfg, rule, family, meter)
    if rep["chosen"] is None:
        _write(out, rep)
        fastest = min(rep["candidates"], key=lambda r: r["decision_ms"])
        raise EdgekdError(
            f"no student of {family} meets the budget on {target.name}: the fastest candidate, {fastest['spec']} "
            f"(x{fastest['multiplier']:g}, {fastest['params']:,} params), measured {fastest['ships']} {cfg.metric} "
            f"{fastest['decision_ms']:.4f} ms at batch {cfg.batch}, over {cfg.budget_ms:g} ms less the "
            f"{rep['margin']:.0%} margin ({rep['low_ms']:.4f} ms); raise --budget-ms or lower [size] min_multiplier "
            f"(report: {out / 'size-report.md'})")
    rep["trained"] = []
    if cfg.train:
        rep["trained"] = _train(recipe, out, cfg, target, data, rep, device, progress, meter)
        rep["verdict"] = _verdict(rep)
        if remote:
            rep["note"] = _remote_note(rep["trained"], out, meter)
        else:
            rep["energy"] = _energy(rep["trained"], cfg.batch, data, progress)
    _write(out, rep)
    return rep


def _run_search(cands: list[Candidate], meter: Meter, cfg: SizeConfig, rule: str) -> dict[str, Any]:
    """Search, then confirm: once the search settles on (chosen, next larger), both are profiled again,
    interleaved in fresh processes; the two measurements of each engine give the noise, the margin grows to it,
    and the search resumes until the pair brackets the budget under both measurements (a candidate the two
    disagree about is within the noise of the budget) or MAX_CONFIRM_ROUNDS. Returns the state, with "need" and
    "phase" ("search" | "confirm") when a remote round must measure first."""
    latencies: dict[int, dict[str, dict[str, Any]]] = {}
    confirmed: dict[int, dict[str, dict[str, Any]]] = {}
    order: list[int] = []
    rounds = 0
    while True:
        measured_noise = noise(latencies, confirmed, cands, rule, cfg.metric)
        margin = max([cfg.margin, *(n["noise"] for n in measured_noise)])   # the configured one, or the noise
        # fits when latency <= low, distinguishably over the budget when >= high
        low, high = cfg.budget_ms / (1 + margin), cfg.budget_ms * (1 + margin)
        values = {i: _value(i, latencies, confirmed, rule, cfg.metric, low, high) for i in latencies}
        step = search(len(cands), values, low, high)
        state = {"step": step, "latencies": latencies, "confirmed": confirmed, "order": order, "margin": margin,
                 "low": low, "high": high, "noise": measured_noise, "values": values, "confirm_rounds": rounds}
        if "need" in step:
            got = meter.search(step["need"], step["lo"], step["hi"])
            if "need" in got:
                return {**state, "need": got["need"], "phase": "search"}
            latencies.update(got)
            order += list(got)
            continue
        pair = [i for i in (step["chosen"], step["larger"]) if i is not None and i not in confirmed]
        if step["chosen"] is None or not pair or rounds >= MAX_CONFIRM_ROUNDS:
            return {**state, "settled": not pair or step["chosen"] is None}
        got = meter.confirm(pair)
        if "need" in got:
            return {**state, "need": got["need"], "phase": "confirm"}
        confirmed.update(got)
        rounds += 1


def _better(best: dict[str, Any] | None, row: dict[str, Any], metric: str) -> dict[str, Any]:
    """Two sessions of one engine combined: the one with the lower `metric`, with each batch's lowest p50."""
    if best is None:
        return {**row, "sessions": 1}
    keep = row if row[metric] < best[metric] else best
    per_batch = {b: min(v, best["per_batch"].get(b, v)) for b, v in row["per_batch"].items()}
    return {**keep, "per_batch": per_batch, "sessions": best["sessions"] + 1}


def _remote_note(trained: list[dict[str, Any]], out: Path, meter: Meter) -> str:
    """The report's note on a remote target; while the trained students' bundles are not measured, it writes
    their device command to students/MEASURE.txt (run from the folder that holds students/; the results go to
    results/students/, read back from the measurements folder's students/)."""
    if all(t["engines"] for t in trained):
        return "The search and the distilled students' engines were measured on the device."
    bundles = [(Path(t["run_dir"]) / b).relative_to(out).as_posix() for t in trained for b in t["bundles"]]
    if not bundles:
        return ("The search used measurements from the device; the students' engines cannot be built on this "
                "machine (see each run folder's report.md): build and profile them on the device.")
    command = meter.device_loop(".", bundles, "results/students")
    fileio.write_text(out / "students" / "MEASURE.txt",
                      f"# on the device, from the folder that holds students/:\n{command}\n# then copy "
                      "results/students/ into the measurements folder (as its students/) and rerun the same "
                      "`edgekd size ... --measurements` command\n")
    return ("The search used measurements from the device. The distilled students' bundles were built here; "
            f"profile them on the device, from the folder that holds students/ (see {out / 'students' / 'MEASURE.txt'}"
            "), copy results/students/ into the measurements folder and rerun the same `edgekd size --measurements` "
            "command to read them back.")


def _row(c: Candidate, i: int, state: dict[str, Any], cfg: SizeConfig, rule: str) -> dict[str, Any]:
    lat, conf, low, high = state["latencies"][i], state["confirmed"].get(i), state["low"], state["high"]
    decision = state["values"][i]
    return {**dataclasses.asdict(c),
            "latency_ms": {p: {k: r[k] for k in ("p50", "p90", "p99", "mean", "runs", "per_batch")}
                           for p, r in lat.items()},
            "confirm_ms": {p: r[cfg.metric] for p, r in conf.items()} if conf else None,
            "ships": ships(lat, rule), "decision_ms": decision, "fits": decision <= low,
            "within_noise": low < decision < high, "margin_ms": cfg.budget_ms - decision}


def _search_report(cands: list[Candidate], state: dict, cfg: SizeConfig, rule: str, family: str, meter: Meter) -> dict:
    rows = {i: _row(cands[i], i, state, cfg, rule) for i in sorted(state["latencies"])}
    step = state["step"]
    chosen, larger = step["chosen"], step["larger"]
    smaller = chosen - 1 if chosen else None
    between = [rows[i]["spec"] for i in rows if chosen is not None and larger is not None and chosen < i < larger]
    return {
        "budget_ms": cfg.budget_ms, "metric": cfg.metric, "batch": cfg.batch, "margin": state["margin"],
        "configured_margin": cfg.margin, "low_ms": state["low"], "high_ms": state["high"],
        "noise": {"max": max((n["noise"] for n in state["noise"]), default=None), "engines": state["noise"]},
        "confirm_rounds": state["confirm_rounds"], "settled": state.get("settled", True),
        "target": meter.target.name, "decision_precision": rule,
        "precisions": meter.precisions, "family": family, "divisor": cfg.divisor,
        "multipliers": [cfg.min_multiplier, cfg.max_multiplier], "ladder_size": len(cands),
        "ladder": [dataclasses.asdict(c) for c in cands], "search_order": state["order"],
        "calibration": meter.calibration, "onnx_exports": meter.exports,
        "candidates": list(rows.values()),
        "chosen": rows.get(chosen) if chosen is not None else None,
        "next_larger": rows.get(larger) if larger is not None else None,
        "within_noise_between": between,
        "next_smaller": (rows.get(smaller) or dataclasses.asdict(cands[smaller])) if smaller is not None else None,
        "all_fit": chosen == len(cands) - 1,
    }


# ------------------------------------------------------------------------------------------ training + final


def _train(recipe: Recipe, out: Path, cfg: SizeConfig, target: Target, data: Any, rep: dict, device: str,
           progress: bool, meter: Meter) -> list[dict[str, Any]]:
    """Distill the chosen student (and its neighbours), then quantize, build and profile as `edgekd run` does
    (which decides what ships: its int8_fallback and headline), and re-profile every student engine at the
    search's batch and settings, interleaved, so the numbers compare. On a remote target the bundles are built
    here and their device measurements are read back from the measurements folder's students/ (a round later)."""
    from edgekd.distillation import distill, train_teacher
    from edgekd.pipeline import RunContext, engines

    teacher = recipe.path(recipe.teacher.checkpoint) if recipe.teacher.checkpoint else None
    if teacher is None:
        teacher = out / "teacher" / "teacher.safetensors"
        if not teacher.is_file():
            train_teacher(recipe, out / "teacher", device=device, progress=progress, data=data)
    roles = [("chosen", rep["chosen"])]
    if cfg.train_neighbours:
        roles = [("next smaller", rep["next_smaller"]), *roles, ("next larger", rep["next_larger"])]
    trained = []
    for role, cand in roles:
        if cand is None:
            continue
        _log(progress, f"size: distilling the {role} student {cand['spec']}")
        r = dataclasses.replace(recipe, student=dataclasses.replace(recipe.student, model=cand["spec"]),
                                teacher=dataclasses.replace(recipe.teacher, checkpoint=str(teacher.resolve())))
        run_dir = out / "students" / _slug(cand["spec"])
        metrics = distill(r, run_dir, device=device, progress=progress, data=data, resume=True)
        run_rep = engines(RunContext(run_dir, r, data), [target], device=device, progress=progress,
                          profile_here=not meter.remote, resume=True)
        fallback = (run_rep.get("int8_fallback") or {}).get(target.name)
        entry = {"role": role, "spec": cand["spec"], "multiplier": cand["multiplier"], "params": cand["params"],
                 "run_dir": str(run_dir), "pytorch_accuracy": metrics["student"]["accuracy"],
                 "teacher_accuracy": metrics["teacher"]["accuracy"], "engines": [],
                 "shipped_engine": (run_rep.get("headline") or {}).get("student_engine"),
                 "int8_fallback": {k: fallback[k] for k in ("chose", "why") if k in fallback} if fallback else None,
                 "bundles": [str(Path(b).relative_to(run_dir)) for b in run_rep.get("built_not_profiled", [])
                             if Path(b).name.startswith("student-")],
                 "_entries": [e for e in run_rep.get("engines", []) if e["model"] == "student"]}
        trained.append(entry)
    _final_profiles(trained, out, meter, rep)
    return trained


def _final_profiles(trained: list[dict[str, Any]], out: Path, meter: Meter, rep: dict[str, Any]) -> None:
    """Each trained student's engines with their latency at cfg.batch (best of cfg.repeats interleaved fresh
    sessions, here or read back from the device), accuracy on the engine and whether it is the one that ships
    (the pipeline's headline; where it has none, as on a remote target, INT8 unless slower than FP32)."""
    cfg = meter.cfg
    entries = [(t, e) for t in trained for e in t.pop("_entries")]   # the pipeline's rows of the student engines
    if meter.remote:
        for t in trained:
            found = [(b, k, v) for b in t["bundles"] for k, v in meter.students.items()
                     if k[0] == (Path(t["run_dir"]) / b).relative_to(out).as_posix()]
            if len(found) == len(t["bundles"]):
                t["engines"] = [_engine_row({**v, "precision": k[1], "path": b, "agreement": None}, v, cfg)
                                for b, k, v in found]
    else:
        bundles = [(("student", k), Path(t["run_dir"]) / e["path"]) for k, (t, e) in enumerate(entries)]
        # the untrained engines the search measured for the trained students: profiled again beside the trained
        # ones, they show how far the machine's speed drifted since the search (another load, another clock)
        index = {r["spec"]: r["index"] for r in rep["candidates"]}
        refs = [(("ref", index[t["spec"]], p), meter.bundle_dir(meter.cands[index[t["spec"]]], p))
                for t in trained if t["spec"] in index for p in meter.precisions]
        rows = meter.profile(bundles + refs) if bundles else {}
        rep["drift"] = _drift(rows, rep, cfg.metric)
        for k, (t, e) in enumerate(entries):
            t["engines"].append(_engine_row(e, rows[("student", k)], cfg, shipped=e["name"] == t["shipped_engine"]))
    for t in trained:
        if t["engines"] and not any(e["shipped"] for e in t["engines"]):
            lat = {e["precision"]: {"per_batch": e["per_batch_p50"]} for e in t["engines"]}
            precision = ships(lat, SHIPPED) if {"int8", "fp32"} <= set(lat) else next(iter(lat))
            next(e for e in t["engines"] if e["precision"] == precision)["shipped"] = True


def _drift(rows: dict[Any, dict[str, Any]], rep: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """now / search for each untrained reference engine's `metric`; the median says how much slower (> 1) or
    faster the machine ran when the trained students were profiled than during the search."""
    by_index = {r["index"]: r for r in rep["candidates"]}
    ratios = []
    for key, row in rows.items():
        if key[0] == "ref":
            _, i, p = key
            then = by_index[i]["latency_ms"][p][metric]
            ratios.append({"spec": by_index[i]["spec"], "precision": p, "search_ms": then, "now_ms": row[metric],
                           "ratio": row[metric] / then})
    if not ratios:
        return None
    return {"median": float(np.median([r["ratio"] for r in ratios])), "engines": ratios}


def _engine_row(e: dict[str, Any], row: dict[str, Any], cfg: SizeConfig, shipped: bool = False) -> dict[str, Any]:
    """A trained student's engine in the report: `e`'s precision, quantization, path, accuracy and agreement, and
    `row`'s latency at cfg.batch."""
    return {**{k: e[k] for k in ("precision", "quantization", "path", "accuracy", "agreement")},
            "latency_ms": {k: row[k] for k in ("p50", "p90", "p99", "mean", "runs")},
            "per_batch_p50": row["per_batch"], "meets_budget": row[cfg.metric] <= cfg.budget_ms, "shipped": shipped}


def _verdict(rep: dict[str, Any]) -> dict[str, Any] | None:
    """The check on the trained engines: the chosen student's shipped engine meets the budget and the next
    larger one's exceeds it, as measured; and at the search's machine speed (each trained engine scaled by its
    untrained candidate's search / now latency, profiled beside it), which is what the search's decision compares
    with when other processes' load changed in between."""
    shipped = {t["role"]: next(({**e, "spec": t["spec"]} for e in t["engines"] if e["shipped"]), None)
               for t in rep["trained"]}
    pair = {"chosen": shipped.get("chosen"), "larger": shipped.get("next larger")}
    if pair["chosen"] is None:
        return None
    m, budget = rep["metric"], rep["budget_ms"]
    out = {key: {k: e[k] for k in ("precision", "quantization")} | {"ms": e["latency_ms"][m]} if e else None
           for key, e in pair.items()}
    out["chosen_meets"] = out["chosen"]["ms"] <= budget
    out["larger_exceeds"] = out["larger"]["ms"] > budget if out["larger"] else None
    out["brackets"] = out["chosen_meets"] and bool(out["larger_exceeds"])
    refs = {(e["spec"], e["precision"]): e for e in (rep.get("drift") or {}).get("engines", [])}
    # the trained engine at the search's machine speed: x (search / now) of its untrained candidate
    scaled = {key: e["latency_ms"][m] * ref["search_ms"] / ref["now_ms"] for key, e in pair.items()
              if e and (ref := refs.get((e["spec"], e["precision"])))}
    if "chosen" in scaled:
        out["at_search_speed"] = {"chosen_ms": scaled["chosen"], "larger_ms": scaled.get("larger"),
                                  "brackets": scaled["chosen"] <= budget and scaled.get("larger", 0) > budget}
    return out


def _energy(trained: list[dict], batch: int, data: Any, progress: bool) -> dict[str, Any]:
    """Joules per inference of each trained student's shipped engine, where the platform's counters are readable."""
    results: dict[str, Any] = {}
    x = np.ascontiguousarray(data.x_test[:batch])
    for t in trained:
        for e in [e for e in t["engines"] if e["shipped"]]:
            engine = runtime.load(Path(t["run_dir"]) / e["path"])
            m = energy.measure(lambda engine=engine: engine(x), seconds=1.0)
            if not m["available"]:
                _log(progress, f"size: energy not measured: {m['reason']}")
                return m
            results[f"{t['spec']} {e['precision']}/{e['quantization']}"] = m
    return {"available": True, "engines": results}


# ------------------------------------------------------------------------------------------ report


def markdown(rep: dict[str, Any]) -> str:
    m, b = rep["metric"], rep["batch"]
    rule = rep["decision_precision"]
    engine = ("the engine that would ship (INT8, or FP32 where INT8 is slower at a profiled batch size, as "
              "`edgekd run`'s int8_fallback decides)" if rule == SHIPPED else f"the {rule} engine")
    lines = ["# edgekd size report", "",
             f"Budget: {m} <= {rep['budget_ms']:g} ms at batch {b} on {rep['target']}, on {engine}.", "",
             _noise_text(rep), "",
             f"Family {rep['family']}, multipliers x{rep['multipliers'][0]:g}..x{rep['multipliers'][1]:g}, widths in "
             f"multiples of {rep['divisor']}: {rep['ladder_size']} distinct candidates; the search measured "
             f"{len(rep['candidates'])} of them (untrained; INT8 calibrated on {rep['calibration']['samples']} "
             "training samples), in the order " + ", ".join(f"#{i}" for i in rep["search_order"]) + ".", ""]
    c = rep["chosen"]
    if c:
        lines += [f"**Chosen:** {c['spec']} (x{c['multiplier']:g}, {c['params']:,} params): {c['ships']} {m} "
                  f"{c['decision_ms']:.4f} ms, {c['margin_ms']:.4f} ms ({c['margin_ms'] / rep['budget_ms']:.1%}) "
                  "under the budget."]
        if rep["next_larger"]:
            n = rep["next_larger"]
            lines += [f"Next larger: {n['spec']} (x{n['multiplier']:g}, {n['params']:,} params): {n['ships']} {m} "
                      f"{n['decision_ms']:.4f} ms, {-n['margin_ms']:.4f} ms ({-n['margin_ms'] / rep['budget_ms']:.1%})"
                      " over the budget."]
            if rep["within_noise_between"]:
                lines += [f"Between them, {', '.join(rep['within_noise_between'])} measured within the noise of "
                          "the budget (or the two measurements disagreed about its side): neither chosen nor the "
                          "comparison."]
        elif rep["all_fit"]:
            lines += ["Every candidate meets the budget: the largest in the range was chosen (raise "
                      "[size] max_multiplier to look further)."]
        else:
            lines += [f"No larger candidate is over the budget by the margin (>= {rep['high_ms']:.4f} ms): the "
                      "larger ones are within the noise of the budget (raise [size] max_multiplier)."]
        lines.append("")
    precisions = rep["precisions"]
    rows = [[f"#{r['index']}", f"x{r['multiplier']:g}", r["spec"], f"{r['params']:,}",
             *[f"{r['latency_ms'][p][m]:.4f}" for p in precisions],
             " / ".join(f"{r['confirm_ms'][p]:.4f}" for p in precisions) if r["confirm_ms"] else "",
             r["ships"], "yes" if r["fits"] else "noise" if r["within_noise"] else "no",
             ("chosen" if c and r["index"] == c["index"] else
              "next larger" if rep["next_larger"] and r["index"] == rep["next_larger"]["index"] else "")]
            for r in rep["candidates"]]
    lines += ["## Candidates measured (untrained, on the engine)", "",
              tabulate(rows, ["#", "multiplier", "model", "params", *[f"{p} {m} ms" for p in precisions],
                              "confirmed " + " / ".join(precisions), "decides", "fits", ""], tablefmt="github"), ""]
    lines += _trained_lines(rep)
    if rep.get("note"):
        lines += [rep["note"], ""]
    en = rep.get("energy")
    if en:
        lines += ["## Energy", "", *([f"- {k}: {v['joules_per_inference'] * 1e3:.4f} mJ per inference ({v['watts']:.1f}"
                                      f" W, {v['source']}; {v['note']})" for k, v in en["engines"].items()]
                                     if en["available"] else [f"Not measured: {en['reason']}."]), ""]
    lines += ["![latency against width](size-report.png)", ""]
    return "\n".join(lines)


def _noise_text(rep: dict[str, Any]) -> str:
    m, budget = rep["metric"], rep["budget_ms"]
    noise = rep["noise"]
    measured = (f"The measured noise, the largest difference between the search's and the confirmation round's "
                f"{m} of one engine ({len(noise['engines'])} engines, {rep['confirm_rounds']} confirmation "
                f"round(s)), is {noise['max']:.1%}" if noise["max"] is not None else "No confirmation round ran")
    text = (f"{measured}; the margin is the larger of it and the configured {rep['configured_margin']:.0%}: "
            f"{rep['margin']:.1%}. A candidate fits when its {m} is <= {budget:g} / {1 + rep['margin']:.4g} = "
            f"{rep['low_ms']:.4f} ms, and is over the budget when >= {budget:g} x {1 + rep['margin']:.4g} = "
            f"{rep['high_ms']:.4f} ms; in between it cannot be told apart from the budget.")
    if not rep["settled"]:
        text += (f" The confirmation did not settle in {rep['confirm_rounds']} rounds: the chosen pair is the last "
                 "one measured.")
    return text


def _trained_lines(rep: dict[str, Any]) -> list[str]:
    if not any(t["engines"] for t in rep.get("trained") or []):
        return []
    m, b = rep["metric"], rep["batch"]
    rows = [[t["role"], t["spec"], f"{t['params']:,}", e["precision"], e["quantization"],
             "yes" if e["shipped"] else "",
             f"{e['accuracy']:.4f}" if e["accuracy"] is not None else "-", f"{e['latency_ms']['p50']:.4f}",
             f"{e['latency_ms']['p90']:.4f}", f"{e['latency_ms']['p99']:.4f}", "yes" if e["meets_budget"] else "no"]
            for t in rep["trained"] for e in t["engines"]]
    teacher = rep["trained"][0]["teacher_accuracy"]
    lines = [f"## Distilled students (accuracy on the engine, test split; teacher {teacher:.4f} in PyTorch)", "",
             tabulate(rows, ["role", "model", "params", "precision", "quant", "ships", "accuracy",
                             f"p50 ms (batch {b})", "p90 ms", "p99 ms", f"{m} meets budget"], tablefmt="github"), ""]
    for t in rep["trained"]:
        if t.get("int8_fallback"):
            lines += [f"- {t['spec']}: INT8 against FP32: {t['int8_fallback']['chose']} ships "
                      f"({t['int8_fallback']['why']})."]
    v = rep.get("verdict")
    if v:
        c, n = v["chosen"], v["larger"]
        text = (f"**On the trained engines:** the chosen student ships {c['precision']}/{c['quantization']} at "
                f"{m} {c['ms']:.4f} ms, {'within' if v['chosen_meets'] else 'OVER'} the {rep['budget_ms']:g} ms "
                "budget")
        if n:
            text += (f"; the next larger ships {n['precision']}/{n['quantization']} at {n['ms']:.4f} ms, "
                     f"{'over' if v['larger_exceeds'] else 'WITHIN'} it")
        text += (": the pair brackets the budget." if v["brackets"] else
                 ": the pair does not bracket the budget on the trained engines.")
        lines += ["", text]
    d = rep.get("drift")
    if d:
        lines += ["", f"Drift: the untrained candidates' engines, profiled again beside the trained ones, measured "
                      f"{d['median']:.3f}x their search latency (median of {len(d['engines'])} engines): the "
                      "machine ran " + (f"{d['median'] - 1:.1%} slower" if d["median"] >= 1 else
                                         f"{1 - d['median']:.1%} faster") + " than during the search."]
        s = (v or {}).get("at_search_speed")
        if s and abs(d["median"] - 1) > rep["margin"]:
            lines += [f"That is more than the {rep['margin']:.1%} margin (other processes' load changed), so the "
                      "trained engines' latencies above do not compare with the budget the search decided on. "
                      "Scaled to the search's machine speed (each by its own untrained candidate's search / now "
                      f"ratio), the chosen student's shipped engine takes {s['chosen_ms']:.4f} ms" +
                      (f" and the next larger's {s['larger_ms']:.4f} ms" if s["larger_ms"] is not None else "") +
                      (": the pair brackets the budget." if s["brackets"] else ": the pair does not bracket it.")]
    return lines + [""]


def plot(rep: dict[str, Any], path: Path) -> None:
    """Latency against width multiplier for each precision with the budget line; accuracy of the trained ones."""
    plt = pyplot()
    trained = [t for t in rep.get("trained") or [] if t["engines"]]
    fig, axes = plt.subplots(2 if trained else 1, 1, figsize=(7, 6.5 if trained else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    m = rep["metric"]
    for p in rep["precisions"]:
        pts = sorted((r["multiplier"], r["latency_ms"][p][m]) for r in rep["candidates"])
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} (untrained candidates)")
    ax.axhline(rep["budget_ms"], color="red", label=f"budget {rep['budget_ms']:g} ms")
    ax.axhspan(rep["low_ms"], rep["high_ms"], color="red", alpha=0.12,
               label=f"budget +- {rep['margin']:.1%} margin (measured noise)")
    if rep["decision_precision"] == SHIPPED:
        pts = sorted((r["multiplier"], r["latency_ms"][r["ships"]][m]) for r in rep["candidates"])
        ax.plot([x for x, _ in pts], [y for _, y in pts], color="black", linestyle=":", linewidth=1,
                label="the engine that would ship")
    for key, marker in (("chosen", "o"), ("next_larger", "s")):
        if rep[key]:
            c = rep[key]
            ax.scatter([c["multiplier"]], [c["decision_ms"]], s=160, marker=marker, facecolors="none",
                       edgecolors="black", zorder=4, label=f"{key.replace('_', ' ')}: {c['spec']}")
    ax.set_ylabel(f"{m} latency at batch {rep['batch']} (ms)")
    ax.set_title(f"edgekd size: {rep['family']} on {rep['target']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if trained:
        ax2 = axes[1][0]
        for p in rep["precisions"]:
            pts = sorted((t["multiplier"], e["accuracy"] * 100) for t in trained for e in t["engines"]
                         if e["precision"] == p and e["accuracy"] is not None)
            ax2.plot([x for x, _ in pts], [y for _, y in pts], marker="s", label=f"{p} distilled, on the engine")
        ax2.set_ylabel("accuracy (%)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=7)
    axes[-1][0].set_xlabel("width multiplier")
    axes[-1][0].set_xscale("log", base=2)
    save_png(plt, fig, path)


def _write(out: Path, rep: dict[str, Any]) -> None:
    fileio.write_json(out / "size-report.json", rep)
    fileio.write_text(out / "size-report.md", markdown(rep))
    plot(rep, out / "size-report.png")
