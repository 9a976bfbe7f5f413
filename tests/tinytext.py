"""A tiny sentence-embedding teacher, a word-level tokenizer and a seeded corpus for tests: no downloads and no
transformers. Recipes name the teacher as [embedding].teacher = "tests.tinytext:teacher"."""
import numpy as np
import torch

from edgekd.embedding import TinyEncoder

WORDS = ("the king queen sword castle river night day light dark storm sea ship crown love war peace fool "
         "friend brother sister father mother heart blood fire water earth wind speak walk run fight sleep "
         "dream sing weep laugh cold warm old young good bad true false gold silver green red black white").split()
SPECIAL = 4   # 0 pad, 1 [CLS], 2 [SEP], 3 unknown


class Tokenizer:
    """Called as transformers tokenizers are: [CLS] word ids [SEP], truncated to max_length."""

    pad_token_id = 0

    def __call__(self, sentences, truncation=True, max_length=64, add_special_tokens=True):
        index = {w: i + SPECIAL for i, w in enumerate(WORDS)}
        rows = []
        for s in sentences:
            ids = [index.get(w.strip(".,!?").lower(), 3) for w in s.split()]
            rows.append(([1] + ids)[:max_length - 1] + [2])
        return {"input_ids": rows}


def teacher():
    """(a random 1-layer x 32 encoder, its tokenizer): a stand-in for all-MiniLM-L6-v2 with the same interface."""
    torch.manual_seed(0)
    return TinyEncoder(len(WORDS) + SPECIAL, 32, hidden=32, layers=1, heads=2, intermediate=64, max_length=64), \
        Tokenizer()


def corpus(path, paragraphs=240, seed=0):
    """A text file of `paragraphs` paragraphs of two 5-11 word sentences (edgekd cuts it into 20 documents)."""
    rng = np.random.default_rng(seed)
    text = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(WORDS, rng.integers(5, 12))).capitalize() + "." for _ in range(2)]
        text.append(" ".join(sentences))
    path.write_text("\n\n".join(text) + "\n")
