import numpy as np
import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one torch thread (and the 2-core runners are shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_recipe_text():
    """A recipe small enough to train teacher, student and scratch on digits in a few seconds."""
    return """
[data]
source = "digits"
test_fraction = 0.25
val_fraction = 0.1

[teacher]
model = "cnn:widths=8,16"
epochs = 2
batch_size = 128

[student]
model = "mlp:hidden=16"
epochs = 2
batch_size = 128

[distill]
temperature = 4.0
alpha = 0.7
seed = 3
"""


@pytest.fixture
def tiny_recipe(tmp_path, tiny_recipe_text):
    path = tmp_path / "recipe.toml"
    path.write_text(tiny_recipe_text)
    return path


@pytest.fixture
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=rng.random((60, 1, 8, 8), dtype=np.float32), y_train=np.arange(60) % 3,
             x_test=rng.random((15, 1, 8, 8), dtype=np.float32), y_test=np.arange(15) % 3)
    return path


@pytest.fixture
def embedding_recipe(tmp_path):
    """A sentence-embedding recipe on a seeded 480-sentence corpus with the tiny teacher of tests/tinytext.py:
    every stage runs in seconds, offline."""
    from tests import tinytext

    tinytext.corpus(tmp_path / "corpus.txt")
    path = tmp_path / "embedding.toml"
    path.write_text("""
[embedding]
teacher = "tests.tinytext:teacher"
corpus = "corpus.txt"
sentences = 200
heldout = 24
max_length = 16
layers = 1
hidden = 16
heads = 2
intermediate = 32
epochs = 1
batch_size = 16

[quantize]
mode = "ptq"
calibration_size = 32
""")
    return path


# --- Engine/bundle fixtures (tests of export, engines, bundle, runtime, profile) -----------------------------
# One tiny CNN, exported once and built into one onnxruntime bundle per session: the first ONNX export costs
# several seconds on a 2-core CPU. Tests that modify a bundle copy it first.

EDGE_INPUT_SHAPE = (1, 8, 8)
EDGE_CLASSES = tuple(f"class{i}" for i in range(10))
EDGE_NORMALIZATION = {"mean": [0.5], "std": [0.25]}


@pytest.fixture(scope="session")
def edge_model():
    import torch

    from edgekd.models import build_model

    torch.manual_seed(0)
    return build_model("cnn:widths=4,8", EDGE_INPUT_SHAPE, len(EDGE_CLASSES)).eval()


@pytest.fixture(scope="session")
def edge_eval(edge_model):
    """(x, y, reference logits); a quarter of the labels disagree with the model so accuracy is not 1.0."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, *EDGE_INPUT_SHAPE)).astype(np.float32)
    with torch.no_grad():
        ref = edge_model(torch.from_numpy(x)).numpy()
    y = ref.argmax(axis=1)
    flip = rng.random(len(y)) < 0.25
    y[flip] = (y[flip] + 1) % len(EDGE_CLASSES)
    return x, y.astype(np.int64), ref


@pytest.fixture(scope="session")
def edge_onnx(edge_model, tmp_path_factory):
    """Exported from a batch-1 example: export_onnx must repeat it to 2 to keep the batch dynamic."""
    import json

    import torch

    from edgekd.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    return export_onnx(edge_model, torch.zeros(1, *EDGE_INPUT_SHAPE), path,
                       metadata={"class_names": json.dumps(EDGE_CLASSES), "normalization": EDGE_NORMALIZATION,
                                 "model_spec": "cnn:widths=4,8"})


@pytest.fixture(scope="session")
def edge_source(edge_onnx):
    from edgekd.engines import EngineSource

    return EngineSource(model_name="student", onnx_path=edge_onnx, weights_path=None, model_spec=None,
                        input_shape=EDGE_INPUT_SHAPE, num_classes=len(EDGE_CLASSES), class_names=EDGE_CLASSES,
                        normalization=EDGE_NORMALIZATION)


@pytest.fixture(scope="session")
def edge_ort_bundle(edge_source, edge_eval, tmp_path_factory):
    """An fp32 bundle for the catalog's x86-cpu-ort target (level "all": optimized + portable model)."""
    from edgekd.engines import build
    from edgekd.targets import load_target

    out = tmp_path_factory.mktemp("bundles") / "student-x86-cpu-ort-fp32"
    return build(edge_source, load_target("x86-cpu-ort"), "fp32", out, eval_data=edge_eval)


@pytest.fixture(scope="session")
def edge_qdq(edge_model, edge_eval, tmp_path_factory):
    """A torchao PT2E-quantized GraphModule (refuses .eval()) and its Q/DQ ONNX export."""
    pytest.importorskip("torchao")
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from edgekd.export import export_onnx

    x = torch.from_numpy(edge_eval[0])
    gm = torch.export.export(edge_model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    gm = prepare_pt2e(gm, quantizer)
    gm(x)  # calibrate
    gm = move_exported_model_to_eval(convert_pt2e(gm))
    path = tmp_path_factory.mktemp("qdq") / "student.int8.onnx"
    export_onnx(gm, x[:1], path, metadata={"quant_scheme": "ort-cpu-avx2"})
    return gm, path
