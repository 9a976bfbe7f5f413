"""Energy counters: the real sysfs of this machine, and sysfs trees laid out as the kernel documents them
(Documentation/power/powercap/powercap.rst for RAPL; the ina3221 hwmon driver's inN_input / currN_input)."""

from pathlib import Path

import pytest

from edgekd import energy


def test_no_counters_is_said_plainly(tmp_path):
    result = energy.measure(lambda: None, seconds=0.01, root=tmp_path)
    assert result["available"] is False
    assert f"{tmp_path}/class/powercap is absent" in result["reason"]
    assert "no INA3221 power monitor" in result["reason"]


def test_this_machine_reports_what_it_has():
    """In these VMs /sys/class/powercap is absent; on a host with RAPL the reading must be positive."""
    result = energy.measure(lambda: sum(range(1000)), seconds=0.05)
    if Path("/sys/class/powercap").is_dir():
        assert result["available"] is False or result["joules_per_inference"] > 0
    else:
        assert result == {"available": False, "reason": result["reason"]}
        assert "/sys/class/powercap is absent" in result["reason"]


def _rapl_zone(root: Path, name: str, start: int, top: int) -> Path:
    zone = root / "class" / "powercap" / name
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{start}\n")
    (zone / "max_energy_range_uj").write_text(f"{top}\n")
    return zone


def test_rapl_counts_across_a_wrap(tmp_path):
    top = 1_000_000
    zone = _rapl_zone(tmp_path, "intel-rapl:0", top - 2500, top)
    sub = _rapl_zone(tmp_path, "intel-rapl:0:0", 0, top)   # a sub-zone (core): inside the package, not added

    def run():   # each inference costs 1 mJ on the package counter, which wraps at max_energy_range_uj
        value = int((zone / "energy_uj").read_text()) + 1000
        (zone / "energy_uj").write_text(str(value % top))
        (sub / "energy_uj").write_text("999")

    result = energy.measure(run, seconds=0.0, root=tmp_path)
    assert result["available"] and result["source"] == "RAPL package-0"
    assert result["inferences"] >= 10
    assert result["joules_per_inference"] == pytest.approx(1e-3)


def test_rapl_unreadable_counter_is_named(tmp_path):
    zone = _rapl_zone(tmp_path, "intel-rapl:0", 0, 10)
    (zone / "energy_uj").write_text("not a number\n")
    result = energy.measure(lambda: None, seconds=0.0, root=tmp_path)
    assert not result["available"] and "RAPL counters under" in result["reason"]


def test_jetson_ina3221_board_input_rail(tmp_path):
    hw = tmp_path / "class" / "hwmon" / "hwmon1"
    hw.mkdir(parents=True)
    (hw / "name").write_text("ina3221\n")
    for n, label, mv, ma in ((1, "VDD_IN", 5000, 1200), (2, "VDD_CPU_GPU_CV", 5000, 400)):
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    result = energy.measure(lambda: None, seconds=0.3, root=tmp_path)
    assert result["available"] and result["source"] == "INA3221 VDD_IN"
    # 5 V x 1.2 A on the board input, not the 8 W sum; the interval around the meter's can only lower it
    assert 4.0 < result["watts"] <= 6.0 + 1e-9
