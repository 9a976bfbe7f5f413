"""Target catalog: every shipped file loads; bad files fail naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekd.errors import EdgekdError
from edgekd.targets import ISA_FLAGS, Target, cpu_flags, cpu_quant_scheme, list_targets, load_target, targets_dir

CATALOG = sorted(targets_dir().glob("*.toml"))
REQUIRED = {"x86-cpu-ort", "arm64-cpu-ort", "jetson-orin-nano-trt", "jetson-agx-orin-dla", "cuda-torch"}


@pytest.mark.parametrize("path", CATALOG, ids=[p.stem for p in CATALOG])
def test_every_catalog_file_loads(path: Path) -> None:
    target = load_target(str(path))
    assert isinstance(target, Target)
    assert target.name == path.stem
    assert target.description
    assert target.path == str(path)
    assert load_target(path.stem) == target
    assert target.min_batch <= target.opt_batch <= target.max_batch
    assert all(target.min_batch <= b <= target.max_batch for b in target.batch_sizes)
    text = path.read_text()
    assert text.lstrip().startswith("#"), "catalog files start with a comment on the hardware"


def test_catalog_has_the_documented_targets() -> None:
    names = {t.name for t in list_targets()}
    assert REQUIRED <= names
    assert any(n.startswith("datacenter-") for n in names)
    assert sum(t.latency_budget_ms is not None for t in list_targets()) >= 2


def test_catalog_choices() -> None:
    x86 = load_target("x86-cpu-ort")
    assert (x86.runtime, x86.device, x86.threads, x86.batch_sizes) == ("onnxruntime", "cpu", 2, (1, 8))
    # quant_scheme = "auto": decided by this CPU (issue 17; was always ort-cpu-avx2)
    assert x86.precisions == ("fp32", "int8") and x86.quant_scheme == cpu_quant_scheme()[0] and x86.dynamic_batch
    assert x86.quant_scheme_reason == cpu_quant_scheme()[1]
    assert x86.providers == ("CPUExecutionProvider",)
    arm = load_target("arm64-cpu-ort")
    assert arm.threads == 4 and arm.quant_scheme == "ort-cpu"
    nano = load_target("jetson-orin-nano-trt")
    assert nano.runtime == "tensorrt" and nano.quant_scheme == "tensorrt" and nano.workspace_mb == 1024
    dla = load_target("jetson-agx-orin-dla")
    assert dla.device == "dla" and dla.dla_core == 0 and set(dla.precisions) == {"fp16", "int8"}
    torch_t = load_target("cuda-torch")
    assert torch_t.runtime == "torch" and torch_t.compile and torch_t.precisions == ("fp32", "fp16")


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(EdgekdError, match="unknown target 'nope'.*x86-cpu-ort"):
        load_target("nope")


def test_missing_path() -> None:
    with pytest.raises(EdgekdError, match="missing.toml: file not found"):
        load_target("/tmp/does/not/exist/missing.toml")


def _write(tmp_path: Path, body: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp32"]\n' + body)
    return path


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "thread = 2\n")
    with pytest.raises(EdgekdError) as e:
        load_target(str(path))
    assert str(path) in str(e.value) and "unknown key 'thread'" in str(e.value)


@pytest.mark.parametrize("body, key", [
    ('threads = "two"\n', "threads"),
    ("threads = true\n", "threads"),
    ('batch_sizes = [1, "8"]\n', "batch_sizes"),
    ("dynamic_batch = 1\n", "dynamic_batch"),
    ("latency_budget_ms = \"5\"\n", "latency_budget_ms"),
    ("provider_options = 3\n", "provider_options"),
])
def test_wrong_type_names_file_and_key(tmp_path: Path, body: str, key: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(EdgekdError) as e:
        load_target(str(path))
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


@pytest.mark.parametrize("text, match", [
    ('runtime = "onnxruntime"\ndevice = "cpu"\n', "missing required key 'precisions'"),
    ('runtime = "onnx"\ndevice = "cpu"\nprecisions = ["fp32"]\n', "'runtime' must be one of"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp16"]\n', "precision 'fp16' is not supported"),
    ('runtime = "onnxruntime"\ndevice = "dla"\nprecisions = ["fp32"]\n', "cannot run on device 'dla'"),
    ('runtime = "tensorrt"\ndevice = "dla"\nprecisions = ["fp16"]\n', "needs key 'dla_core'"),
    ('runtime = "tensorrt"\ndevice = "dla"\ndla_core = 0\nprecisions = ["fp32"]\n', "only fp16 and int8"),
    ('runtime = "torch"\ndevice = "cpu"\nprecisions = ["fp32"]\nquant_scheme = "none"\ncompile = 1\n', "'compile'"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp32"]\nbatch_sizes = [1, 8]\nmax_batch = 4\n',
     r"batch_sizes \[8\] fall outside"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp32"]\nbatch_sizes = [1, 8]\n'
     'dynamic_batch = false\n', "exactly one"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["int8"]\nquant_scheme = "none"\n',
     "needs an int8 quant_scheme"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp32"]\n[provider_options.CUDAExecutionProvider]\n'
     'device_id = 0\n', "not in providers"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp32"\n', "not valid TOML"),
    ('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["fp32"]\neval_samples = -1\n',
     "'eval_samples' must be >= 0"),
])
def test_invalid_combinations(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(EdgekdError, match=match) as e:
        load_target(str(path))
    assert str(path) in str(e.value)


def test_defaults_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, 'description = "mine"\n', name="mine.toml")
    monkeypatch.setenv("EDGEKD_TARGETS", str(tmp_path))
    assert targets_dir() == tmp_path
    [target] = list_targets()
    assert target.name == "mine" and target.description == "mine"
    assert target.batch_sizes == (1,) and target.dynamic_batch and target.quant_scheme == "ort-cpu"
    assert target.providers == ("CPUExecutionProvider",) and target.graph_optimization_level == "all"
    assert load_target("mine") == target
    with pytest.raises(EdgekdError, match="available in .*: mine"):
        load_target("x86-cpu-ort")


@pytest.mark.parametrize(("cpu", "scheme", "why"), [
    ({"arch": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni"]}, "ort-cpu", "avx512_vnni"),
    ({"arch": "x86_64", "flags": ["avx2", "avx_vnni"]}, "ort-cpu", "avx_vnni"),
    ({"arch": "x86_64", "flags": ["avx2", "avx512f"]}, "ort-cpu-avx2", "no VNNI"),
    ({"arch": "aarch64", "flags": ["asimd", "asimddp"]}, "ort-cpu", "aarch64"),
    ({"arch": "x86_64", "flags": None}, "ort-cpu-avx2", "unknown"),
])
def test_cpu_picks_the_int8_scheme(cpu, scheme, why) -> None:
    got, reason = cpu_quant_scheme(cpu)
    assert got == scheme and why in reason


def test_cpu_flags_reads_this_machine() -> None:
    cpu = cpu_flags()
    assert cpu["arch"] and (cpu["flags"] is None or set(cpu["flags"]) <= set(ISA_FLAGS.get(cpu["arch"], ())))


def test_auto_scheme_only_for_onnxruntime_cpu_and_pinning_is_recorded(tmp_path: Path) -> None:
    trt = tmp_path / "t.toml"
    trt.write_text('runtime = "tensorrt"\ndevice = "cuda"\nprecisions = ["int8"]\nquant_scheme = "auto"\n')
    with pytest.raises(EdgekdError, match="'auto' applies to runtime 'onnxruntime'"):
        load_target(str(trt))
    pinned = tmp_path / "pinned.toml"
    pinned.write_text('runtime = "onnxruntime"\ndevice = "cpu"\nprecisions = ["int8"]\nquant_scheme = "ort-cpu-avx2"\n')
    t = load_target(str(pinned))
    assert t.quant_scheme == "ort-cpu-avx2" and t.quant_scheme_reason == "pinned by pinned.toml"
    assert load_target(t) is t   # a resolved target passes through: resolved once, handed on
