"""Energy per inference from the platform's own counters, where it exposes them; a plain reason where not.

- x86 Linux: RAPL through powercap, /sys/class/powercap/intel-rapl:N/energy_uj (cumulative microjoules of each
  CPU package; the counter wraps at max_energy_range_uj). AMD's RAPL appears under the same name. Package
  energy includes idle power and every other process on the package, so it is an upper bound for the engine.
  Kernels since 5.10 make energy_uj readable by root only.
- Jetson: the INA3221 power monitors through hwmon (/sys/class/hwmon/hwmonN/name = "ina3221", inK_label,
  inK_input in mV, currK_input in mA): what tegrastats prints. Power is sampled every 10 ms during the run and
  integrated; the "VDD_IN" rail (board input) is used when present, else the sum of the rails.

Standard library only (numpy-free), like edgekd.runtime, so it runs on a device next to the engine.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSFS = Path("/sys")
SAMPLE_SECONDS = 0.01


class RaplMeter:
    """Sum of the package zones' energy counters, wrap-around handled."""

    def __init__(self, zones: list[Path]) -> None:
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.source = "RAPL " + ", ".join(_read(z / "name") or z.name for z in zones)
        self._start: list[int] = []

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float:
        """Joules since start(): each counter's delta, plus its range when it wrapped ((after - before) mod range)."""
        return sum((after - before) % top for before, after, top in zip(self._start, self._read(), self.ranges,
                                                                        strict=True)) / 1e6


class InaMeter:
    """Samples an INA3221's rails (mV x mA) in a thread and integrates power over time."""

    def __init__(self, channels: list[tuple[Path, Path]], label: str) -> None:
        self.channels = channels
        self.source = f"INA3221 {label}"
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def watts(self) -> float:
        return sum(int(v.read_text()) * int(c.read_text()) for v, c in self.channels) / 1e6

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self.watts())
            self._stop.wait(SAMPLE_SECONDS)

    def start(self) -> None:
        self._samples = [self.watts()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> float:
        elapsed = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return sum(self._samples) / len(self._samples) * elapsed


def _rapl(root: Path) -> RaplMeter | str:
    folder = root / "class" / "powercap"
    if not folder.is_dir():
        return f"{folder} is absent (no RAPL powercap interface: a virtual machine, or not an x86 Linux host)"
    zones = sorted(p for p in folder.iterdir() if re.fullmatch(r"(intel|amd)-rapl:\d+", p.name))
    if not zones:
        return f"{folder} has no RAPL package zones (intel-rapl:N)"
    try:
        meter = RaplMeter(zones)
        meter.start()
    except PermissionError:
        return f"{zones[0] / 'energy_uj'} is not readable by this user (root only since Linux 5.10)"
    except (OSError, ValueError) as e:
        return f"RAPL counters under {folder} cannot be read ({e})"
    return meter


def _ina(root: Path) -> InaMeter | str:
    folder = root / "class" / "hwmon"
    monitors = [p for p in sorted(folder.iterdir()) if _read(p / "name") == "ina3221"] if folder.is_dir() else []
    if not monitors:
        return f"no INA3221 power monitor under {folder} (not a Jetson)"
    rails: dict[str, tuple[Path, Path]] = {}
    for hw in monitors:
        for label in sorted(hw.glob("in*_label")):
            n = label.name[2:].split("_")[0]
            if (hw / f"in{n}_input").is_file() and (hw / f"curr{n}_input").is_file():
                rails[_read(label) or f"{hw.name}/in{n}"] = (hw / f"in{n}_input", hw / f"curr{n}_input")
    if not rails:
        return f"INA3221 under {folder} exposes no inN_input/currN_input pairs"
    chosen = {"VDD_IN": rails["VDD_IN"]} if "VDD_IN" in rails else rails
    meter = InaMeter(list(chosen.values()), "+".join(chosen))
    try:
        meter.watts()
    except (OSError, ValueError) as e:
        return f"INA3221 rails under {folder} cannot be read ({e})"
    return meter


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def measure(run: Callable[[], Any], *, seconds: float = 1.0, root: Path = SYSFS) -> dict[str, Any]:
    """Call `run()` (one inference) repeatedly for `seconds` and report joules per inference and mean watts.

    {"available": False, "reason": ...} when the platform's counters cannot be read (most virtual machines)."""
    rapl = _rapl(root)   # the platform's meter: RAPL, else the INA3221 rails
    meter = _ina(root) if isinstance(rapl, str) else rapl
    if isinstance(meter, str):
        return {"available": False, "reason": f"energy counters not readable: {rapl}; {meter}"}
    run()   # warm
    n = 0
    start = time.perf_counter()   # the interval spans the meter's, so watts are never overstated
    meter.start()
    while n < 10 or time.perf_counter() - start < seconds:
        run()
        n += 1
    joules = meter.stop()
    elapsed = time.perf_counter() - start
    return {"available": True, "source": meter.source, "inferences": n, "seconds": round(elapsed, 4),
            "joules": joules, "joules_per_inference": joules / n, "watts": joules / elapsed,
            "note": "package or board energy: includes idle power and other processes"}
