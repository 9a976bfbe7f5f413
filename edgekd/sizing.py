"""Size the student to the target: the most accurate student of a family that meets a measured latency budget.

The latency of an untrained network is the latency of the trained one, so the search never trains: each
candidate (the family's widths times a multiplier, rounded to multiples of `divisor`) is exported untrained,
built into the engines the target ships (INT8 with the target's scheme, calibrated on real training samples)
and profiled on the target. A candidate fits when latency * (1 + margin) <= budget, the margin standing for
measurement noise. Widths grow with the multiplier, so the distinct architectures between min_multiplier and
max_multiplier form an ordered ladder (every point where one width rounds to the next multiple is on it), and a
bisection over it finds the largest that fits with about log2(ladder size) + 2 measurements; the smaller end
fits and the larger end does not, with latency assumed to grow with width. Then the chosen student (and its
neighbours on the ladder) is distilled, quantized as the recipe says, built and profiled, and the report shows
the budget, every candidate measured, the choice and its margin.

Remote targets: the search runs in rounds. A round writes the candidate bundles it needs (with the next levels of
the bisection, so one or two rounds settle it) and one shell command that profiles them on the device with
`python -m edgekd.runtime profile`; `--measurements` reads the results back and the search continues from them.
Nothing in the search assumes the host is the target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import fileio
from edgekd.errors import EdgekdError
from edgekd.recipe import Recipe, SizeConfig, validate_size
from edgekd.targets import PRECISIONS, Target, load_target

MAX_MEASUREMENT_BYTES = 16 * 2**20
MAX_MEASUREMENT_FILES = 1000
ROUND_BUNDLES = 8          # candidates per remote round (the next bisection levels are prefetched)
EVAL_SAMPLES = 256         # real inputs stored in candidate bundles (the profiler feeds them)
FACTORY_STEP = 1.1         # multiplier ratio between neighbouring candidates of a factory family


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


def search(n: int, measured: dict[int, float], limit: float) -> dict[str, Any]:
    """One step of the bisection over a ladder of `n` candidates, given the latencies `measured` so far.

    Returns {"need": [indices], "lo", "hi"} while it needs measurements, else {"chosen": index or None (none
    fits), "larger": the next larger candidate (None when all fit)}; a candidate fits when latency <= limit."""
    need = [i for i in dict.fromkeys((0, n - 1)) if i not in measured]
    if need:
        return {"need": need, "lo": 0, "hi": n - 1}
    if measured[n - 1] <= limit:
        return {"chosen": n - 1, "larger": None}
    if measured[0] > limit:
        return {"chosen": None, "larger": 0}
    lo, hi = 0, n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid not in measured:
            return {"need": [mid], "lo": lo, "hi": hi}
        lo, hi = (mid, hi) if measured[mid] <= limit else (lo, mid)
    return {"chosen": lo, "larger": hi}


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


def read_measurements(path: str | Path, target: str, batch: int, metric: str = "p50"
                      ) -> dict[tuple[str, str], dict[str, Any]]:
    """Profile results from the device (`python -m edgekd.runtime profile ... --json`): a folder of .json files,
    or one .json file holding one result or a list. Data, not code: size-bounded and checked; returns
    {(model spec, precision): {"p50", "p90", "p99", "mean", "runs", "accuracy", "source"}} at `batch`, from the
    session with the lowest `metric` where one engine was profiled several times (see _profile_best)."""
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
        if file.stat().st_size > MAX_MEASUREMENT_BYTES:
            raise EdgekdError(f"measurements {file}: larger than {MAX_MEASUREMENT_BYTES // 2**20} MiB")
        try:
            data = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise EdgekdError(f"measurements {file}: not valid JSON ({e})") from None
        for i, entry in enumerate(data if isinstance(data, list) else [data]):
            key, row = _measurement(entry, f"measurements {file}" + (f" [{i}]" if isinstance(data, list) else ""),
                                    target, batch)
            if key not in out or row[metric] < out[key][metric]:
                out[key] = row
    if not out:
        raise EdgekdError(f"--measurements {path}: holds no profile results")
    return out


def _measurement(entry: Any, where: str, target: str, batch: int) -> tuple[tuple[str, str], dict[str, Any]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not isinstance(entry.get("rows"),
                                                                                                  list):
        raise EdgekdError(f"{where}: expected a profile result with 'model' and 'rows' (from `python -m "
                          "edgekd.runtime profile BUNDLE --json`)")
    if entry.get("precision") not in PRECISIONS:
        raise EdgekdError(f"{where}: precision {entry.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
    if entry.get("target") != target:
        raise EdgekdError(f"{where}: measured a bundle built for target {entry.get('target')!r}, expected "
                          f"{target!r}")
    rows = [r for r in entry["rows"] if isinstance(r, dict) and r.get("batch") == batch]
    if not rows:
        raise EdgekdError(f"{where}: no row for batch {batch} (profile with --batch {batch})")
    row = rows[0]
    for key in ("p50", "p90", "p99", "mean"):
        if not _finite(row.get(key)):
            raise EdgekdError(f"{where}: batch {batch} {key} must be a positive number of ms, got {row.get(key)!r}")
    accuracy = entry.get("accuracy")
    return (entry["model"], entry["precision"]), {
        **{k: float(row[k]) for k in ("p50", "p90", "p99", "mean")}, "runs": row.get("runs"),
        "accuracy": accuracy if isinstance(accuracy, float) else None, "source": where.split(" ", 1)[1]}


# ------------------------------------------------------------------------------------------ candidate bundles


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


class CandidateBuilder:
    """Exports untrained candidates and builds the target's engines for them, as the deployed student would be
    built: float engines from the float ONNX, INT8 from a PTQ Q/DQ ONNX calibrated on real training samples."""

    def __init__(self, recipe: Recipe, data: Any, target: Target, folder: Path) -> None:
        import torch

        from edgekd.compress import calibration_inputs
        from edgekd.pipeline import RunContext

        self.recipe, self.data, self.target, self.folder = recipe, data, target, folder
        self.precisions = [p for p in target.precisions if p != "int8" or target.quant_scheme != "none"]
        self.example = torch.from_numpy(data.x_train[:2])
        x_cal, self.calibration = calibration_inputs(RunContext(folder, recipe, data), recipe.quantize)
        self.batches = [torch.from_numpy(x_cal[i:i + 64]) for i in range(0, len(x_cal), 64)]
        n = min(EVAL_SAMPLES, len(data.x_test))
        self.evals = (data.x_test[:n], data.y_test[:n], None)

    def bundle_dir(self, c: Candidate, precision: str) -> Path:
        return self.folder / f"{_slug(c.spec)}-{precision}"

    def build(self, c: Candidate) -> dict[str, Path]:
        """precision -> bundle folder; a verified bundle already there is reused (a rerun resumes)."""
        from edgekd.bundle import verify

        out = {}
        for precision in self.precisions:
            path = self.bundle_dir(c, precision)
            if (path / "manifest.json").is_file():
                try:
                    if verify(path).get("model") == c.spec:
                        out[precision] = path
                        continue
                except EdgekdError:
                    pass
                import shutil

                shutil.rmtree(path)
            out[precision] = self._build_one(c, precision, path)
        return out

    def _net(self, c: Candidate) -> Any:
        import torch

        from edgekd.models import build_model

        torch.manual_seed(0)
        return build_model(c.spec, self.data.input_shape, self.data.num_classes).eval()

    def _build_one(self, c: Candidate, precision: str, path: Path) -> Path:
        from edgekd.engines import EngineSource
        from edgekd.engines import build as build_engine
        from edgekd.export import export_onnx
        from edgekd.models import save_weights

        net = self._net(c)
        meta = {"model": c.spec, "model_spec": c.spec, "class_names": json.dumps(list(self.data.class_names)),
                "normalization": json.dumps(self.data.normalization), "size_candidate": "untrained"}
        quantization, onnx_path, weights = "none", None, None
        work = self.folder / ".work"
        if precision == "int8":
            from edgekd.pipeline import _import_torchao_quietly

            _import_torchao_quietly()
            from edgekd import quantize

            q = self.recipe.quantize
            qcfg = quantize.QuantConfig(scheme=self.target.quant_scheme, observer=q.observer, percentile=q.percentile)
            net = quantize.ptq(net, self.example, self.batches, qcfg)
            quantization = "ptq"
            meta.update(quantization="ptq", quant_scheme=self.target.quant_scheme)
        if self.target.runtime == "torch":
            weights = work / f"{_slug(c.spec)}.safetensors"
            save_weights(net, weights)
        else:
            onnx_path = export_onnx(net, self.example, work / f"{_slug(c.spec)}-{quantization}.onnx", metadata=meta)
        source = EngineSource(model_name=c.spec, onnx_path=onnx_path, weights_path=weights, model_spec=c.spec,
                              input_shape=self.data.input_shape, num_classes=self.data.num_classes,
                              class_names=self.data.class_names, normalization=self.data.normalization,
                              quantization=quantization)
        try:
            return build_engine(source, self.target, precision, path, eval_data=self.evals)
        except EdgekdError as e:
            raise EdgekdError(f"target {self.target.name}: cannot build the {precision} engine of candidate "
                              f"{c.spec} on this machine ({e}); run `edgekd size` on a machine that can build "
                              "this target's engines (for TensorRT: the device itself)") from e


# ------------------------------------------------------------------------------------------ the stage


def decision_precision(recipe: Recipe, target: Target, cfg: SizeConfig) -> str:
    """The engine whose latency decides: the one the recipe ships (INT8 when it quantizes and the target builds
    INT8), unless [size] precision names one."""
    if cfg.precision != "auto":
        if cfg.precision not in target.precisions:
            raise EdgekdError(f"[size] precision {cfg.precision!r}: target {target.name} builds only "
                              f"{', '.join(target.precisions)}")
        return cfg.precision
    if recipe.quantize.mode != "none" and "int8" in target.precisions and target.quant_scheme != "none":
        return "int8"
    return next(p for p in target.precisions if p != "int8")


def _log(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def size(recipe: Recipe, out: str | Path, cfg: SizeConfig, *, measurements: str | Path | None = None,
         remote: bool = False, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Find the largest student of the family that meets cfg.budget_ms on cfg.target, then distill it (and its
    neighbours), build and profile the final engines; writes OUT/size-report.{json,md,png} and returns it.

    With `remote` (or `measurements`, or a target this machine cannot run) a round that needs measurements writes
    the bundles and the device command and returns {"status": "needs measurements", ...}."""
    from edgekd.data import load_data
    from edgekd.engines import check_target

    out = Path(out)
    target = load_target(cfg.target)
    data = load_data(recipe.data, recipe.base_dir)
    family = cfg.model or recipe.student.model
    cands = ladder(family, data.input_shape, data.num_classes, cfg)
    precision = decision_precision(recipe, target, cfg)
    limit = cfg.budget_ms / (1 + cfg.margin)
    here = check_target(target)
    remote = remote or measurements is not None or here != "ok"
    builder = CandidateBuilder(recipe, data, target, out / "candidates")
    _log(progress, f"size: {len(cands)} candidates of {family} (x{cfg.min_multiplier:g}..x{cfg.max_multiplier:g}, "
                   f"widths in multiples of {cfg.divisor}); {precision} {cfg.metric} at batch {cfg.batch} must be "
                   f"<= {cfg.budget_ms:g} ms / (1 + {cfg.margin:g}) = {limit:.4f} ms on {target.name}")
    found = read_measurements(measurements, target.name, cfg.batch, cfg.metric) if measurements is not None else {}
    step, latencies, order = _run_search(cands, builder, cfg, precision, limit, found if remote else None, progress)
    if "need" in step:
        return _request(out, cfg, target, builder, [cands[i] for i in step["need"]], here, progress)
    rep = _search_report(cands, latencies, order, step, cfg, target, precision, limit, family, builder)
    if step["chosen"] is None:
        _write(out, rep)
        fastest = min(rep["candidates"], key=lambda r: r["decision_ms"])
        raise EdgekdError(
            f"no student of {family} meets the budget on {target.name}: the fastest candidate, {fastest['spec']} "
            f"(x{fastest['multiplier']:g}, {fastest['params']:,} params), measured {precision} {cfg.metric} "
            f"{fastest['decision_ms']:.4f} ms at batch {cfg.batch}, over {cfg.budget_ms:g} ms less the "
            f"{cfg.margin:.0%} margin ({limit:.4f} ms); raise --budget-ms or lower [size] min_multiplier "
            f"(report: {out / 'size-report.md'})")
    rep["trained"] = _train(recipe, out, cfg, target, data, rep, device, progress, here=not remote) if cfg.train \
        else []
    if remote and cfg.train:
        rep["note"] = _remote_note(rep["trained"], cfg)
    elif cfg.train:
        rep["energy"] = _energy(rep["trained"], precision, cfg.batch, data, progress)
    _write(out, rep)
    return rep


def _run_search(cands: list[Candidate], builder: CandidateBuilder, cfg: SizeConfig, precision: str, limit: float,
                found: dict[tuple[str, str], dict[str, Any]] | None, progress: bool) -> tuple[dict, dict, list[int]]:
    """Bisect, measuring here (`found` None) or reading the device's measurements; returns the last search step
    (with "need": the candidates a remote round must measure, prefetching the next bisection levels), the
    latencies per candidate and precision, and the order they were measured in."""
    latencies: dict[int, dict[str, dict[str, Any]]] = {}
    order: list[int] = []
    while True:
        step = search(len(cands), {i: latencies[i][precision][cfg.metric] for i in latencies}, limit)
        if "need" not in step:
            return step, latencies, order
        if found is not None:
            def known(i: int) -> bool:
                return all((cands[i].spec, p) in found for p in builder.precisions)

            if not all(known(i) for i in step["need"]):
                wanted = list(dict.fromkeys(step["need"] + lookahead(step["lo"], step["hi"], ROUND_BUNDLES)))
                step["need"] = [i for i in wanted if not known(i)][:max(ROUND_BUNDLES, len(step["need"]))]
                return step, latencies, order
        for i in step["need"]:
            latencies[i] = ({p: found[(cands[i].spec, p)] for p in builder.precisions} if found is not None
                            else _measure_here(builder, cands[i], cfg, progress))
            order.append(i)


def _remote_note(trained: list[dict[str, Any]], cfg: SizeConfig) -> str:
    bundles = [str(Path(t["run_dir"]) / b) for t in trained for b in t["bundles"]]
    if not bundles:
        return ("The search used measurements from the device; the students' engines cannot be built on this "
                "machine (see each run folder's report.md): build and profile them on the device.")
    return ("The search used measurements from the device. The distilled students' bundles were built here; "
            "profile them on the device (accuracy on the engine, latency, and their budget) with: "
            f"`for b in {' '.join(bundles)}; do python -m edgekd.runtime profile \"$b\" --batch {cfg.batch}; done`")


def _measure_here(builder: CandidateBuilder, c: Candidate, cfg: SizeConfig, progress: bool) -> dict[str, Any]:
    """Build the candidate's engines and profile each in a fresh process (as on the device) at cfg.batch."""
    result = {precision: _profile_best(bundle, cfg, builder.target.name)
              for precision, bundle in builder.build(c).items()}
    _log(progress, f"size: x{c.multiplier:<7g} {c.spec:32s} {c.params:>9,} params  " + "  ".join(
        f"{p} {cfg.metric} {r[cfg.metric]:.4f} ms" for p, r in result.items()))
    return result


def _profile_best(bundle: Path, cfg: SizeConfig, target: str) -> dict[str, Any]:
    """Profile `bundle` in cfg.repeats fresh processes and keep the session with the lowest cfg.metric: other
    processes on a shared machine only ever add latency, so the least disturbed session is the closest to what
    the engine takes (timeit's reasoning for taking the minimum)."""
    from edgekd.pipeline import profile_in_subprocess

    best: dict[str, Any] | None = None
    for _ in range(cfg.repeats):
        prof = profile_in_subprocess(bundle, ["--batch", str(cfg.batch), "--min-seconds", str(cfg.profile_seconds)])
        _, row = _measurement(prof, f"profile {bundle}", target, cfg.batch)
        if best is None or row[cfg.metric] < best[cfg.metric]:
            best = {**row, "sessions": cfg.repeats}
    assert best is not None
    return best


def _request(out: Path, cfg: SizeConfig, target: Target, builder: CandidateBuilder,
             wanted: list[Candidate], here: str, progress: bool) -> dict[str, Any]:
    """Write the bundles a remote round needs and the one command that profiles them on the device."""
    names = []
    for c in wanted:
        for bundle in builder.build(c).values():
            names.append(bundle.name)
    folder = builder.folder
    loop = " ".join(names)
    sessions = " ".join(str(i + 1) for i in range(cfg.repeats))
    command = (f"(cd {folder.name} && mkdir -p results && for b in {loop}; do for r in {sessions}; do python -m "
               f"edgekd.runtime profile \"$b\" --batch {cfg.batch} --min-seconds {cfg.profile_seconds:g} --json "
               "\"results/$b.$r.json\" || exit 1; done; done)")
    rerun = (f"edgekd size RECIPE --target {cfg.target} --budget-ms {cfg.budget_ms:g} --batch {cfg.batch} "
             f"--metric {cfg.metric} --out {out} --measurements {folder / 'results'}")
    req = {"status": "needs measurements", "target": target.name, "bundles": names, "folder": str(folder),
           "command": command, "then": rerun, "why_remote": here if here != "ok" else "remote target",
           "candidates": [dataclasses.asdict(c) for c in wanted]}
    fileio.write_json(out / "size-request.json", req)
    fileio.write_text(folder / "MEASURE.txt", f"# on the device, from the folder that holds {folder.name}/:\n"
                      f"{command}\n# then copy {folder.name}/results/ back and run:\n{rerun}\n")
    _log(progress, f"size: wrote {len(names)} bundles to {folder}; on the device run:\n  {command}\nthen:\n  {rerun}")
    return req


def _row(c: Candidate, lat: dict[str, dict[str, Any]], cfg: SizeConfig, precision: str,
         limit: float) -> dict[str, Any]:
    decision = lat[precision][cfg.metric]
    return {**dataclasses.asdict(c), "latency_ms": {p: {k: r[k] for k in ("p50", "p90", "p99", "mean", "runs")}
                                                    for p, r in lat.items()},
            "decision_ms": decision, "fits": decision <= limit, "margin_ms": cfg.budget_ms - decision}


def _search_report(cands: list[Candidate], latencies: dict, order: list[int], step: dict, cfg: SizeConfig,
                   target: Target, precision: str, limit: float, family: str, builder: CandidateBuilder) -> dict:
    rows = {i: _row(cands[i], latencies[i], cfg, precision, limit) for i in sorted(latencies)}
    chosen, larger = step["chosen"], step["larger"]
    smaller = chosen - 1 if chosen else None
    return {
        "budget_ms": cfg.budget_ms, "metric": cfg.metric, "batch": cfg.batch, "margin": cfg.margin,
        "limit_ms": limit, "target": target.name, "decision_precision": precision,
        "precisions": builder.precisions, "family": family, "divisor": cfg.divisor,
        "multipliers": [cfg.min_multiplier, cfg.max_multiplier], "ladder_size": len(cands),
        "ladder": [dataclasses.asdict(c) for c in cands], "search_order": order,
        "calibration": builder.calibration,
        "candidates": list(rows.values()),
        "chosen": rows.get(chosen) if chosen is not None else None,
        "next_larger": rows.get(larger) if larger is not None else None,
        "next_smaller": (rows.get(smaller) or dataclasses.asdict(cands[smaller])) if smaller is not None else None,
        "all_fit": chosen == len(cands) - 1,
    }


# ------------------------------------------------------------------------------------------ training + final


def _train(recipe: Recipe, out: Path, cfg: SizeConfig, target: Target, data: Any, rep: dict, device: str,
           progress: bool, here: bool = True) -> list[dict[str, Any]]:
    """Distill the chosen student (and its neighbours), then quantize, build and profile as `edgekd run` does,
    and re-profile each student engine at the search's batch and settings so the numbers compare. For a remote
    target (`here` False) the bundles are built and left for the device to profile."""
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
                          profile_here=here)
        entry = {"role": role, "spec": cand["spec"], "multiplier": cand["multiplier"], "params": cand["params"],
                 "run_dir": str(run_dir), "pytorch_accuracy": metrics["student"]["accuracy"],
                 "teacher_accuracy": metrics["teacher"]["accuracy"], "engines": []}
        if not here:
            entry["bundles"] = [str(Path(b).relative_to(run_dir)) for b in run_rep.get("built_not_profiled", [])
                                if Path(b).name.startswith("student-")]
            trained.append(entry)
            continue
        final = entry["engines"]
        for e in run_rep["engines"]:
            if e["model"] != "student":
                continue
            row = _profile_best(run_dir / e["path"], cfg, target.name)
            final.append({"precision": e["precision"], "quantization": e["quantization"], "path": e["path"],
                          "accuracy": e["accuracy"], "agreement": e["agreement"],
                          "latency_ms": {k: row[k] for k in ("p50", "p90", "p99", "mean", "runs")},
                          "meets_budget": row[cfg.metric] <= cfg.budget_ms})
        trained.append(entry)
    return trained


def _energy(trained: list[dict], precision: str, batch: int, data: Any, progress: bool) -> dict[str, Any]:
    """Joules per inference of each trained student's shipped engine, where the platform's counters are readable."""
    from edgekd import energy, runtime

    results: dict[str, Any] = {}
    for t in trained:
        for e in t["engines"]:
            if e["precision"] != precision:
                continue
            engine = runtime.load(Path(t["run_dir"]) / e["path"])
            x = np.ascontiguousarray(data.x_test[:batch])
            m = energy.measure(lambda engine=engine, x=x: engine(x), seconds=1.0)
            if not m["available"]:
                _log(progress, f"size: energy not measured: {m['reason']}")
                return m
            results[f"{t['spec']} {e['precision']}/{e['quantization']}"] = m
    return {"available": True, "engines": results}


# ------------------------------------------------------------------------------------------ report


def markdown(rep: dict[str, Any]) -> str:
    from tabulate import tabulate

    m, b = rep["metric"], rep["batch"]
    lines = ["# edgekd size report", "",
             f"Budget: {rep['decision_precision']} {m} <= {rep['budget_ms']:g} ms at batch {b} on {rep['target']}. "
             f"Margin for measurement noise: {rep['margin']:.0%}, so a candidate fits when its {m} is <= "
             f"{rep['budget_ms']:g} / {1 + rep['margin']:g} = {rep['limit_ms']:.4f} ms.", "",
             f"Family {rep['family']}, multipliers x{rep['multipliers'][0]:g}..x{rep['multipliers'][1]:g}, widths in "
             f"multiples of {rep['divisor']}: {rep['ladder_size']} distinct candidates; the bisection measured "
             f"{len(rep['candidates'])} of them (untrained; INT8 calibrated on {rep['calibration']['samples']} "
             "training samples), in the order " + ", ".join(f"#{i}" for i in rep["search_order"]) + ".", ""]
    c = rep["chosen"]
    if c:
        lines += [f"**Chosen:** {c['spec']} (x{c['multiplier']:g}, {c['params']:,} params): {m} "
                  f"{c['decision_ms']:.4f} ms, {c['margin_ms']:.4f} ms ({c['margin_ms'] / rep['budget_ms']:.0%}) "
                  "under the budget."]
        if rep["next_larger"]:
            n = rep["next_larger"]
            itself = "over the budget itself" if n["decision_ms"] > rep["budget_ms"] else "within the budget itself"
            lines += [f"Next larger: {n['spec']} ({n['params']:,} params): {m} {n['decision_ms']:.4f} ms, over "
                      f"the budget less the margin by {n['decision_ms'] - rep['limit_ms']:.4f} ms ({itself})."]
        elif rep["all_fit"]:
            lines += ["Every candidate meets the budget: the largest in the range was chosen (raise "
                      "[size] max_multiplier to look further)."]
        lines.append("")
    precisions = rep["precisions"]
    rows = [[f"#{r['index']}", f"x{r['multiplier']:g}", r["spec"], f"{r['params']:,}",
             *[f"{r['latency_ms'][p][m]:.4f}" for p in precisions], "yes" if r["fits"] else "no",
             ("chosen" if c and r["index"] == c["index"] else
              "next larger" if rep["next_larger"] and r["index"] == rep["next_larger"]["index"] else "")]
            for r in rep["candidates"]]
    lines += ["## Candidates measured (untrained, on the engine)", "",
              tabulate(rows, headers=["#", "multiplier", "model", "params", *[f"{p} {m} ms" for p in precisions],
                                      "fits", ""], tablefmt="github"), ""]
    if any(t["engines"] for t in rep.get("trained") or []):
        rows = [[t["role"], t["spec"], f"{t['params']:,}", e["precision"], e["quantization"], f"{e['accuracy']:.4f}",
                 f"{e['latency_ms']['p50']:.4f}", f"{e['latency_ms']['p90']:.4f}", f"{e['latency_ms']['p99']:.4f}",
                 "yes" if e["meets_budget"] else "no"]
                for t in rep["trained"] for e in t["engines"]]
        teacher = rep["trained"][0]["teacher_accuracy"]
        lines += [f"## Distilled students (accuracy on the engine, test split; teacher {teacher:.4f} in PyTorch)", "",
                  tabulate(rows, headers=["role", "model", "params", "precision", "quant", "accuracy",
                                          f"p50 ms (batch {b})", "p90 ms", "p99 ms", f"{m} meets budget"],
                           tablefmt="github"), ""]
    if rep.get("note"):
        lines += [rep["note"], ""]
    en = rep.get("energy")
    if en:
        if en["available"]:
            lines += ["## Energy", ""] + [f"- {k}: {v['joules_per_inference'] * 1e3:.4f} mJ per inference "
                                          f"({v['watts']:.1f} W, {v['source']}; {v['note']})"
                                          for k, v in en["engines"].items()] + [""]
        else:
            lines += ["## Energy", "", f"Not measured: {en['reason']}.", ""]
    lines += ["![latency against width](size-report.png)", ""]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> None:
    """Latency against width multiplier for each precision with the budget line; accuracy of the trained ones."""
    from edgekd.report import pyplot, save_png

    plt = pyplot()
    trained = [t for t in rep.get("trained") or [] if t["engines"]]
    fig, axes = plt.subplots(2 if trained else 1, 1, figsize=(7, 6.5 if trained else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    m = rep["metric"]
    for p in rep["precisions"]:
        pts = sorted((r["multiplier"], r["latency_ms"][p][m]) for r in rep["candidates"])
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} (untrained candidates)")
    ax.axhline(rep["budget_ms"], color="red", label=f"budget {rep['budget_ms']:g} ms")
    ax.axhline(rep["limit_ms"], color="red", linestyle="--", linewidth=1,
               label=f"budget less {rep['margin']:.0%} margin")
    if rep["chosen"]:
        c = rep["chosen"]
        ax.scatter([c["multiplier"]], [c["decision_ms"]], s=160, facecolors="none", edgecolors="black", zorder=4,
                   label=f"chosen: {c['spec']}")
    ax.set_ylabel(f"{m} latency at batch {rep['batch']} (ms)")
    ax.set_title(f"edgekd size: {rep['family']} on {rep['target']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if trained:
        ax2 = axes[1][0]
        for p in rep["precisions"]:
            pts = sorted((t["multiplier"], e["accuracy"] * 100) for t in trained for e in t["engines"]
                         if e["precision"] == p)
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
