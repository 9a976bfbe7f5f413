import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.models import build_model, count_params, load_weights, save_weights


def tiny_factory(input_shape, num_classes):
    """Used as tests.test_models:tiny_factory by the factory tests."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def broken_factory(input_shape, num_classes):
    raise ValueError("no such size")


@pytest.mark.parametrize("spec", ["mlp:hidden=32,16", "cnn:widths=4,8", "cnn:widths=4,8,dropout=0.1", "cnn",
                                  "tests.test_models:tiny_factory"])
def test_specs_build_and_run(spec):
    model = build_model(spec, (1, 8, 8), 10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("spec,fragment", [
    ("resnet:depth=18", "unknown family 'resnet'"),
    ("cnn:depth=3", "unknown knob 'depth'"),
    ("cnn:widths=a,b", "widths must be integers"),
    ("tests.test_models:nope", "has no callable 'nope'"),
    ("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
    ("tests.test_models:broken_factory", "raised ValueError: no such size"),
])
def test_bad_specs_name_the_problem(spec, fragment):
    with pytest.raises(EdgekdError, match=fragment.replace("(", r"\(")):
        build_model(spec, (1, 8, 8), 10)


def test_safetensors_round_trip_and_refusals(tmp_path):
    a = build_model("cnn:widths=4,8", (1, 8, 8), 10)
    save_weights(a, tmp_path / "a.safetensors", {"model": "cnn:widths=4,8"})
    b = build_model("cnn:widths=4,8", (1, 8, 8), 10)
    assert load_weights(b, tmp_path / "a.safetensors") == {"model": "cnn:widths=4,8"}
    x = torch.randn(2, 1, 8, 8)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    other = build_model("cnn:widths=4,16", (1, 8, 8), 10)
    with pytest.raises(EdgekdError, match="another architecture"):
        load_weights(other, tmp_path / "a.safetensors")
    torch.save(a.state_dict(), tmp_path / "pickled.pt")
    with pytest.raises(EdgekdError, match="only loads safetensors"):
        load_weights(b, tmp_path / "pickled.pt")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekdError, match="not a valid safetensors"):
        load_weights(b, tmp_path / "cut.safetensors")
    assert count_params(a) == sum(p.numel() for p in a.parameters())


def test_a_safetensors_file_whose_header_length_starts_with_0x80_loads(tmp_path):
    """The header length is a little-endian u64: 1 file in 256 begins with the byte a pickle begins with."""
    from edgekd.models import build_model, load_weights, save_weights

    model = build_model("mlp:hidden=4", (3,), 2)
    path = tmp_path / "w.safetensors"
    for pad in range(300):
        save_weights(model, path, {"model": "mlp:hidden=4", "pad": "." * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert load_weights(build_model("mlp:hidden=4", (3,), 2), path)["pad"] == "." * pad


def scalable_mlp(input_shape, num_classes, width=1.0):
    """A user factory that `edgekd size` can scale: it takes a width multiplier."""
    from edgekd.models import MLP

    return MLP(input_shape, num_classes, hidden=(max(1, round(16 * width)),))


def test_scaled_spec_rounds_widths_and_passes_width_to_factories():
    from edgekd.models import scaled_spec

    assert scaled_spec("cnn:widths=8,16,32,dropout=0.1", 1.5, 8) == "cnn:widths=16,24,48,dropout=0.1"
    assert scaled_spec("cnn:widths=8,16", 0.1, 4) == "cnn:widths=4,4"   # never below the divisor
    assert scaled_spec("mlp", 0.5, 8) == "mlp:hidden=64"                # the family's default widths
    spec = scaled_spec("tests.test_models:scalable_mlp", 2.0)
    assert spec == "tests.test_models:scalable_mlp,width=2"
    assert scaled_spec(spec, 0.5) == "tests.test_models:scalable_mlp,width=0.5"   # rescaled, not appended
    assert build_model(spec, (1, 8, 8), 10).features[1].out_features == 32
    with pytest.raises(EdgekdError, match="width must be a number"):
        build_model("tests.test_models:scalable_mlp,width=wide", (1, 8, 8), 10)


def test_factories_import_from_the_recipe_folder_and_say_where_they_looked(tmp_path, monkeypatch):
    from edgekd import models

    (tmp_path / "beside.py").write_text("from torch import nn\n\ndef f(shape, n):\n    return nn.Linear(64, n)\n")
    monkeypatch.setattr(models, "_RECIPE_DIRS", [])
    with pytest.raises(EdgekdError, match="cannot import module 'beside'.*looked in"):
        models.check_spec("beside:f")
    models.add_import_dir(tmp_path)
    models.check_spec("beside:f")   # imported, not built: no input shape needed
    assert str(tmp_path) not in __import__("sys").path   # the search path is extended only while importing
    with pytest.raises(EdgekdError, match="unknown knob 'depth'"):
        models.check_spec("cnn:depth=3")
