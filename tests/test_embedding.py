"""Sentence-embedding distillation on tiny models: training, corpus splitting, retrieval metrics, the
student's ONNX export with dynamic batch and sequence length through the shared exporter, engine build, runtime
and profiler, PT2E quantization with a dynamic sequence (PTQ and QAT stages), the whole run, and its report."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from edgekd import embedding as E
from edgekd.errors import EdgekdError
from edgekd.export import dynamic_dims, export_onnx
from edgekd.objective import Batch, ObjectiveConfig, compute
from edgekd.recipe import EmbeddingConfig, recipe_from_dict, to_toml
from edgekd.tasks import EMBEDDING, embed, embedding_metrics, pad_batch


def _tiny(out_dim: int = 12, **kw) -> E.TinyEncoder:
    torch.manual_seed(0)
    return E.TinyEncoder(vocab_size=40, out_dim=out_dim, hidden=8, layers=1, heads=2, intermediate=16,
                         max_length=16, **kw)


def _mse(s: np.ndarray, t: np.ndarray) -> float:
    """The embedding loss with its default weights (edgekd.objective's embedding_mse)."""
    return compute(Batch(torch.from_numpy(s), teacher_embeddings=torch.from_numpy(t)), ObjectiveConfig()).item()


def test_tiny_student_learns_a_teacher_and_pads_do_not_matter() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 40, rng.integers(3, 10)) for _ in range(64)]
    target = rng.standard_normal((64, 12)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    model = _tiny()
    assert isinstance(model.proj, torch.nn.Linear)                  # 8 -> 12: the projection to the teacher's width
    model.eval()
    before = _mse(E.encode(model, rows, 0), target)
    cfg = EmbeddingConfig(batch_size=16, lr=5e-3, heldout=6)
    history = E.train_student(model, rows, target, cfg, pad_id=0, epochs=8, lr=5e-3, progress=False)
    after = _mse(E.encode(model, rows, 0), target)
    assert after < 0.7 * before and history[-1]["loss"] < history[0]["loss"]
    # a sentence's embedding does not depend on how much padding its batch adds
    one = model(torch.from_numpy(pad_batch([rows[0]], 0)))
    padded = model(torch.from_numpy(pad_batch([rows[0], np.ones(15, np.int64)], 0)))[:1]
    assert torch.allclose(one, padded, atol=1e-5)
    assert torch.allclose(one.norm(dim=1), torch.ones(1))


def test_pca_init_keeps_the_teacher_geometry() -> None:
    torch.manual_seed(0)
    word = torch.randn(40, 4) @ torch.randn(4, 24)                  # rank 4: 8 components keep all of it
    student = _tiny(out_dim=24)
    info = E.init_from_teacher(student, word, torch.randn(32, 24))
    assert info["variance_kept"] == pytest.approx(1.0, abs=1e-5)
    centered = word - word.mean(0)
    back = student.proj(student.word.weight)                        # projection starts as the PCA basis
    assert torch.allclose(back, centered, atol=1e-4)
    with pytest.raises(EdgekdError, match="same vocabulary"):
        E.init_from_teacher(student, torch.randn(39, 24), None)


PLAY = """THE TRAGEDY OF NOBODY

Persons Represented.

Alb., a Duke.

ACT I.

SCENE I. A hall.

[Enter ALBANY and KENT.]

Alb.
I thought the king had more affected the Duke of Albany than Cornwall.
Is it not so, my lord?

KENT.
It did always seem so to us: [Aside] but now, in the division of the
kingdom, it appears not which of the dukes he values most. Yes!
"""


def test_sentences_skip_speakers_directions_and_cast() -> None:
    got = E.split_sentences(PLAY, min_words=3, max_words=40)
    assert got == ["I thought the king had more affected the Duke of Albany than Cornwall.",
                   "Is it not so, my lord?",
                   "It did always seem so to us: but now, in the division of the kingdom, it appears not which of "
                   "the dukes he values most."]
    assert E.split_sentences(PLAY, min_words=3, max_words=6) == ["Is it not so, my lord?"]


def test_corpus_split_holds_out_whole_documents(tmp_path) -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    paragraphs = [" ".join(f"{words[(i + j) % 10]}{i}" for j in range(6)) + "." for i in range(400)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs))
    cfg = EmbeddingConfig(corpus="corpus.txt", sentences=100, heldout=20, seed=1)
    train, held, info = E.corpus_split(cfg, tmp_path)
    assert (len(train), len(held)) == (100, 20) and not set(train) & set(held)
    def block(sentence: str) -> int:   # paragraph i starts with a word + i; 400 paragraphs -> 20 blocks of 20
        return int(re.sub(r"^[a-z]+", "", sentence.split()[0])) // 20

    held_blocks, train_blocks = {block(s) for s in held}, {block(s) for s in train}
    assert not held_blocks & train_blocks and set(info["heldout_documents"])
    assert E.corpus_split(cfg, tmp_path)[:2] == (train, held)      # seeded
    with pytest.raises(EdgekdError, match="not enough"):
        E.corpus_split(EmbeddingConfig(corpus="corpus.txt", heldout=5000), tmp_path)
    with pytest.raises(EdgekdError, match="not found"):
        E.corpus_split(EmbeddingConfig(corpus="missing.txt"), tmp_path)


def test_extra_corpora_train_only_and_fortunes(tmp_path) -> None:
    """extra_corpora add training sentences and are never held out; heldout_documents fixes how many whole
    documents of `corpus` are held out; a Debian fortune file's entries are split on "%" lines, attributions
    dropped."""
    main, extra = tmp_path / "main.txt", tmp_path / "extra.txt"
    main.write_text("\n\n".join(f"the main sentence number {i} is here." for i in range(200)))
    extra.write_text("\n\n".join(f"an extra sentence number {i} is here." for i in range(50)))
    cfg = EmbeddingConfig(corpus="main.txt", extra_corpora=["extra.txt"], heldout_documents=3, heldout=20,
                          sentences=10**6, seed=0)
    train, held, info = E.corpus_split(cfg, tmp_path)
    assert len(info["heldout_documents"]) == 3 and all(d.startswith("main-") for d in info["heldout_documents"])
    assert sum(s.startswith("an extra") for s in train) == 50 and not any(s.startswith("an extra") for s in held)
    assert len(train) == 50 + 200 - 3 * 10 and info["train_documents"] == 17 + 20
    with pytest.raises(EdgekdError, match=r"\[embedding\].extra_corpora\[0\] 'gone.txt'.*not found"):
        E.corpus_split(dataclasses.replace(cfg, extra_corpora=["gone.txt"]), tmp_path)
    fortune = "A banker is a fellow who lends you his umbrella.\n\t\t-- Mark Twain\n%\nA is for Apple.\n%\n"
    assert E.split_sentences(E._fortune_text(fortune), 3, 40, play=False) == [
        "A banker is a fellow who lends you his umbrella.", "A is for Apple."]


def test_teacher_layer_init_copies_the_chosen_layers() -> None:
    """init "teacher": a student with all the teacher's layers computes the teacher; with fewer it holds the
    evenly spaced ones (DistilBERT); other widths are refused with the widths named."""
    torch.manual_seed(1)
    teacher = E.TinyEncoder(40, 8, hidden=8, layers=4, heads=2, intermediate=16, max_length=16).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(1, 40, (3, 9)))
    full = E.TinyEncoder(40, 8, hidden=8, layers=4, heads=2, intermediate=16, max_length=16).eval()
    assert E.init_from_teacher_layers(full, teacher, [])["teacher_layers"] == [0, 1, 2, 3]
    assert torch.allclose(full(ids), teacher(ids), atol=1e-6)
    half = E.TinyEncoder(40, 8, hidden=8, layers=2, heads=2, intermediate=16, max_length=16)
    assert E.init_from_teacher_layers(half, teacher, [])["teacher_layers"] == [0, 2]
    assert torch.equal(half.layers[1].ff1.weight, teacher.layers[2].ff1.weight)
    E.init_from_teacher_layers(half, teacher, [3, 1])
    assert torch.equal(half.layers[0].q.bias, teacher.layers[3].q.bias)
    with pytest.raises(EdgekdError, match="expected 2 indices of the teacher's 4 layers"):
        E.init_from_teacher_layers(half, teacher, [0, 4])
    with pytest.raises(EdgekdError, match=r"teacher's hidden, heads and intermediate.*ff1.weight \(16, 8\)"):
        E.init_from_teacher_layers(E.TinyEncoder(40, 8, hidden=8, layers=2, heads=2, intermediate=32,
                                                 max_length=16), teacher, [])
    with pytest.raises(EdgekdError, match="heads 2 vs the student's 4"):
        E.init_from_teacher_layers(E.TinyEncoder(40, 8, hidden=8, layers=2, heads=4, intermediate=16,
                                                 max_length=16), teacher, [])


def test_retrieval_metrics_by_hand() -> None:
    rng = np.random.default_rng(0)
    t = rng.standard_normal((8, 5))
    m = embedding_metrics(t * 3.0, t)                               # same directions: perfect agreement
    assert m["cosine"] == pytest.approx(1.0) and m["retrieval_top1"] == m["retrieval_top5"] == 1.0
    # unit vectors at these angles: nearest neighbours (teacher) 1,0,1,4,3,4 and (student) 1,0,1,4,5,4
    def circle(degrees: list[float]) -> np.ndarray:
        a = np.radians(degrees)
        return np.stack([np.cos(a), np.sin(a)], 1)

    m = embedding_metrics(circle([0, 10, 30, 90, 120, 130]), circle([0, 10, 30, 90, 100, 130]))
    assert m["retrieval_top1"] == pytest.approx(5 / 6)
    assert m["cosine"] == pytest.approx((5 + math.cos(math.radians(20))) / 6)
    assert m["retrieval_top5"] == m["teacher_top1_in_student_top5"] == 1.0   # 6 points: top 5 is all the others
    # Spearman of the pairwise similarities, against scipy's implementation on a perturbed copy
    stats = pytest.importorskip("scipy.stats")
    s = t + 0.7 * rng.standard_normal(t.shape)
    sim = [x @ x.T / np.outer(*(2 * [np.linalg.norm(x, axis=1)])) for x in (s, t)]
    upper = np.triu_indices(8, 1)
    expected = stats.spearmanr(sim[0][upper], sim[1][upper]).statistic
    assert embedding_metrics(s, t)["similarity_spearman"] == pytest.approx(expected) and 0.2 < expected < 0.95
    assert embedding_metrics(t * 3.0, t)["similarity_spearman"] == pytest.approx(1.0)
    with pytest.raises(EdgekdError, match="at least 6"):
        embedding_metrics(t[:5], t[:5])


def test_tiny_student_exports_with_dynamic_batch_and_sequence(tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    model = _tiny().eval()
    path = export_onnx(model, torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]), tmp_path / "s.onnx",
                       metadata={"pad_id": "0"}, task=EMBEDDING, max_length=16)
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "input_ids" and dims == ["batch", "seq"]
    assert graph.output[0].name == "sentence_embedding"
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 3), (5, 9), (32, 16)):
        ids = np.random.default_rng(batch).integers(1, 40, (batch, seq))
        ours = session.run(None, {"input_ids": ids})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).numpy()
        assert ours.shape == (batch, 12) and np.abs(ours - ref).max() < 1e-5
    rows = [np.arange(1, n) for n in (4, 9, 2, 13)]
    assert np.allclose(embed(lambda x: session.run(None, {"input_ids": x})[0], rows, 0, batch_size=2),
                       E.encode(model, rows, 0), atol=1e-5)

    # the same ONNX as an onnxruntime bundle (edgekd.engines.build), loaded by edgekd.runtime, profiled per batch
    from edgekd import runtime
    from edgekd.engines import EngineSource, build
    from edgekd.profile import profile_bundle
    from edgekd.targets import load_target

    rng = np.random.default_rng(1)
    held = [rng.integers(1, 40, int(n)) for n in rng.integers(2, 16, 12)]
    reference = E.encode(model, held, 0)
    reference[0] = -reference[0]                                    # one sentence the "teacher" disagrees on
    source = EngineSource("student", path, None, None, ("seq",), 12, (), {}, task="embedding",
                          input_options={"pad_id": 0, "max_length": 16})
    evals = {"ids": pad_batch(held, 0), "lengths": np.array([len(r) for r in held]), "reference": reference,
             "pad_id": 0}
    bundle = build(source, load_target("x86-cpu-ort"), "fp32", tmp_path / "bundle", eval_data=evals)
    engine = runtime.load(bundle)
    assert engine.manifest["input"] == {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64",
                                        "pad_id": 0, "max_length": 16}
    assert engine.manifest["metrics"]["test"]["cosine"] == pytest.approx(10 / 12, abs=1e-5)   # 11 x 1, 1 x -1
    assert np.abs(engine(pad_batch(held[:3], 0)) - E.encode(model, held[:3], 0)).max() < 1e-5
    for bad, message in ((np.zeros((2, 17), np.int64), "17 tokens per row; this engine takes 1..16"),
                         (np.zeros((2, 4), np.float32), "dtype float32, expected int64"),
                         (np.zeros((2, 4, 1), np.int64), r"does not match the engine's \(N, seq\)")):
        with pytest.raises(EdgekdError, match=message):
            engine(bad)
    with pytest.raises(EdgekdError, match=r"engine.preprocess\(\) is for classifiers; this bundle's task is embedding"):
        engine.classify(["a.jpg"])
    result = profile_bundle(bundle, batch_sizes=(1, 4), warmup=1, min_runs=2, min_seconds=0.0)
    assert result["task"] == "embedding" and [r["batch"] for r in result["rows"]] == [1, 4]
    assert result["metrics"]["cosine"] == pytest.approx(10 / 12, abs=1e-5) and result["eval_samples"] == 12
    (bundle / "eval.npz").write_bytes(b"tampered")
    with pytest.raises(EdgekdError, match="sha256"):
        profile_bundle(bundle)


def test_ptq_through_quantize_keeps_the_sequence_dynamic() -> None:
    pytest.importorskip("torchao")
    from edgekd import quantize

    model = _tiny().eval()
    rng = np.random.default_rng(0)
    cal = [torch.from_numpy(rng.integers(1, 40, (4, n))) for n in (5, 11)]
    gm = quantize.ptq(model, cal[0], cal, quantize.QuantConfig(scheme="ort-cpu-avx2"),
                      dynamic_shapes=(dynamic_dims(EMBEDDING, 16),))
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in op for op in ops) and any("dequantize_per_channel" in op for op in ops)
    for ids in (torch.tensor([[3, 4, 5]]), torch.from_numpy(rng.integers(1, 40, (3, 14)))):
        with torch.no_grad():
            cos = (gm(ids) * model(ids)).sum(1)
        assert cos.min() > 0.95


def test_recipe_embedding_section(tmp_path) -> None:
    r = recipe_from_dict({"embedding": {"hidden": 128, "heads": 4, "batch_sizes": [1, 8]}, "quantize": {"mode": "ptq"}})
    assert r.embedding.hidden == 128 and r.embedding.batch_sizes == [1, 8] and r.embedding.teacher == "all-minilm-l6-v2"
    assert "[embedding]" in to_toml(r) and "[embedding]" not in to_toml(recipe_from_dict({}))
    assert recipe_from_dict({}).embedding is None
    for raw, fragment in (({"hidden": 130, "heads": 4}, "multiple of heads"), ({"heldout": 3}, "at least 6"),
                          ({"init": "zeros"}, "not one of pca, teacher, random"),
                          ({"layers": 2, "teacher_layers": [0]}, "expected 2 \\(layers\\) teacher layer indices"),
                          ({"mse_weight": 0.0}, "not all 0"),
                          ({"layer": 2}, "unknown key 'layer'")):
        with pytest.raises(EdgekdError, match=fragment):
            recipe_from_dict({"embedding": raw})
    with pytest.raises(EdgekdError, match=r"\[quantize\].calibration and keep_float are not used by \[embedding\]"):
        recipe_from_dict({"embedding": {}, "quantize": {"keep_float": 2}})


def test_run_goes_through_the_shared_stages(tmp_path, embedding_recipe) -> None:
    """`pipeline.run` on an [embedding] recipe (the shared stages replaced the private run_embedding): teacher outputs,
    student, ONNX with parity, PTQ, onnxruntime bundles profiled in their own processes, report.json/.md; the
    engine's metrics agree with PyTorch's on the same held-out sentences."""
    pytest.importorskip("torchao")
    from edgekd.pipeline import run
    from edgekd.recipe import load_recipe

    out = tmp_path / "run"
    rep = run(load_recipe(embedding_recipe), out, progress=False, quick_profile=True)
    assert rep["task"] == "embedding" and rep["corpus"]["heldout_sentences"] == 24
    engines = {(e["model"], e["quantization"]): e for e in rep["engines"]}
    assert set(engines) == {("teacher", "none"), ("student", "none"), ("student", "ptq")}
    assert engines["teacher", "none"]["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    distilled = rep["pytorch"]["student (distilled)"]
    assert engines["student", "none"]["metrics"]["cosine"] == pytest.approx(distilled["cosine"], abs=1e-5)
    ptq = rep["pytorch"][next(k for k in rep["pytorch"] if "PTQ" in k)]
    assert engines["student", "ptq"]["metrics"]["cosine"] == pytest.approx(ptq["cosine"], abs=0.02)
    assert rep["export_parity"]["student"]["max_abs_diff"] < 1e-5
    (scheme,) = rep["quantization"]
    assert rep["export_parity"][f"student-ptq-{scheme}"]["min_cosine"] > 0.99
    assert {(r["engine"], r["batch"]) for r in rep["latency_ratios"]} == {
        (f"student {p} {q}", b) for p, q in (("fp32", "none"), ("int8", "ptq")) for b in (1, 32)}
    assert rep["headline"]["text"].startswith("the student ") and "report: sentence-embedding" in \
        (out / "report.md").read_text()


def test_qat_stage_trains_with_the_embedding_loss(tmp_path, embedding_recipe) -> None:
    """`edgekd quantize --mode qat` on an embedding run: PTQ and QAT Q/DQ ONNX files with dynamic sequence, QAT
    history per epoch, parity of each export with its PyTorch graph."""
    pytest.importorskip("torchao")
    import dataclasses

    from edgekd.pipeline import quantize
    from edgekd.recipe import load_recipe

    out = tmp_path / "run"
    recipe = load_recipe(embedding_recipe)
    recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, epochs=2))
    E.distill_stage(recipe, out, progress=False)
    info = quantize(out, "ort-cpu-avx2", mode="qat", progress=False)
    assert set(info["onnx"]) == {"ptq", "qat"} and [h["epoch"] for h in info["qat_history"]] == [1, 2]
    for kind in ("ptq", "qat"):
        assert info["parity"][kind]["min_cosine"] > 0.99
        assert (out / "onnx" / f"student.{kind}-ort-cpu-avx2.onnx").is_file()
    assert info["pytorch_metrics"]["qat"]["cosine"] > 0.5
    assert json.loads((out / "onnx" / "quantize-ort-cpu-avx2.json").read_text())["scheme"] == "ort-cpu-avx2"


def _profile(model: str, quant: str, ms: tuple[float, float], cosine: float) -> dict:
    return {"target": "t", "model": model, "precision": "fp32" if quant == "none" else "int8", "quantization": quant,
            "metrics": {"cosine": cosine, "retrieval_top1": 0.5, "retrieval_top5": 0.5},
            "rows": [{"batch": 1, "p50": ms[0]}, {"batch": 8, "p50": ms[1]}]}


def test_report_latency_ratios_and_headline_by_hand() -> None:
    """ms per sentence = p50 / batch; ratio = student / teacher per batch; the headline ships the fastest student
    engine at the smallest batch among those within 0.005 cosine of the best."""
    from edgekd.tasks import latency_ratios

    engines = [_profile("teacher", "none", (4.0, 16.0), 1.0), _profile("student", "none", (1.0, 8.0), 0.950),
               _profile("student", "ptq", (0.5, 4.0), 0.946), _profile("student", "qat", (0.25, 4.0), 0.900)]
    ratios = latency_ratios(engines)
    assert [(r["engine"], r["batch"], r["ratio"]) for r in ratios] == [
        ("student fp32 none", 1, 0.25), ("student fp32 none", 8, 0.5), ("student int8 ptq", 1, 0.125),
        ("student int8 ptq", 8, 0.25), ("student int8 qat", 1, 0.0625), ("student int8 qat", 8, 0.25)]
    head = EMBEDDING.headline(engines, ratios)
    assert head["engine"] == "student int8 ptq"     # qat is faster but 0.05 cosine worse
    assert "8.0x faster per sentence at batch 1, 4.0x faster per sentence at batch 8" in head["text"]


def test_a_bad_teacher_embeddings_file_is_one_clear_error(tmp_path) -> None:
    """teacher-embeddings.npz is data in the run folder: one missing array or a non-npz file is refused by name."""
    np.savez(tmp_path / E.TEACHER_OUTPUTS, embeddings=np.zeros((2, 3), np.float32))
    with pytest.raises(EdgekdError, match="not a teacher-embeddings file.*run `edgekd teacher"):
        E.read_split(tmp_path)
    (tmp_path / E.TEACHER_OUTPUTS).write_bytes(b"not an npz")
    with pytest.raises(EdgekdError, match="not a teacher-embeddings file"):
        E.read_split(tmp_path)
    (tmp_path / E.TEACHER_OUTPUTS).unlink()
    with pytest.raises(EdgekdError, match="not found; run `edgekd teacher"):
        E.read_split(tmp_path)
