import pytest

from edgekd.errors import EdgekdError
from edgekd.recipe import load_recipe, recipe_from_dict, resolved, to_toml


def test_builtin_digits_recipe_loads_and_round_trips(tmp_path):
    r = load_recipe("digits")
    assert r.data.source == "digits"
    text = to_toml(resolved(r))
    (tmp_path / "r.toml").write_text(text)
    again = load_recipe(tmp_path / "r.toml")
    assert resolved(again).distill == resolved(r).distill
    assert again.student == r.student
    assert resolved(r).distill.epochs == r.student.epochs


@pytest.mark.parametrize("raw,fragment", [
    ({"nope": {}}, "unknown section [nope]"),
    ({"data": {"sorce": "digits"}}, "unknown key 'sorce'"),
    ({"student": {"epochs": "ten"}}, "[student].epochs: expected int"),
    ({"student": {"epochs": True}}, "[student].epochs: expected int"),
    ({"distill": {"alpha": 1.5}}, "alpha: must be in [0, 1]"),
    ({"distill": {"temperature": 0}}, "temperature: must be > 0"),
    ({"teacher": {"optimizer": "adam"}}, "not one of adamw, sgd"),
    ({"distill": {"features": [["a"]]}}, "features: each entry"),
    ({"data": "digits"}, "expected a table"),
])
def test_bad_recipes_name_the_key(raw, fragment):
    with pytest.raises(EdgekdError) as e:
        recipe_from_dict(raw)
    assert fragment in str(e.value)


def test_ints_accepted_for_floats_and_relative_paths_resolve(tmp_path):
    r = recipe_from_dict({"distill": {"temperature": 3}, "data": {"source": "d.npz"}}, base_dir=tmp_path)
    assert r.distill.temperature == 3.0 and isinstance(r.distill.temperature, float)
    assert r.path(r.data.source) == tmp_path / "d.npz"


def test_malformed_toml_is_reported(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[data\nsource = 1")
    with pytest.raises(EdgekdError, match="not valid TOML"):
        load_recipe(p)


def test_streaming_data_keys_are_checked():
    import re

    r = recipe_from_dict({"data": {"resize": 256, "crop": [224, 224], "mean": "imagenet", "std": [0.2, 0.2, 0.2],
                                   "num_workers": 0, "skip_bad_images": True}})
    assert r.data.resize == 256 and r.data.mean == "imagenet" and r.data.std == [0.2, 0.2, 0.2]
    for bad, fragment in (({"num_workers": -1}, "num_workers: must be >= 0"),
                          ({"stats_samples": 0}, "stats_samples: must be >= 1"),
                          ({"resize": "big"}, "[data].resize: expected int or list")):
        with pytest.raises(EdgekdError, match=re.escape(fragment)):
            recipe_from_dict({"data": bad})
