"""A byte-level BPE tokenizer trained on the corpus at run time (``tokenizers``), cached in the output directory.

Byte-level means every string encodes (no unknown token) and decoding gives the text back exactly. GPT and BERT
share the vocabulary, so their losses and accuracies are over the same tokens. The cache file's name carries a
digest of the corpus and the vocabulary size, so a different corpus never reuses a stale tokenizer.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fastformer.study.corpus import Corpus

# BERT's four, then GPT's document separator; PAD is 0 because BertConfig's pad_token_id is 0
SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>")
PAD, CLS, SEP, MASK, EOS = range(len(SPECIALS))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (the specials included) on ``texts``."""
    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer: words keep their leading space, so " the" and "the" are different tokens
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    for i, s in enumerate(SPECIALS):  # the ids the models rely on
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"tokenizer: special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def sentence_texts(corpus: Corpus) -> list[str]:
    """What is encoded: each sentence with a leading space, as it reads inside running text."""
    return [" " + s for d in corpus.documents for s in d.sentences]


def cache_name(corpus: Corpus, vocab_size: int) -> str:
    import tokenizers

    key = hashlib.sha256(f"{corpus.digest()} {vocab_size} {tokenizers.__version__}".encode()).hexdigest()[:12]
    return f"tokenizer-{vocab_size}-{key}.json"


def load_or_train(corpus: Corpus, vocab_size: int, cache_dir: Path, save_dir: Path) -> tuple[Tokenizer, bool]:
    """The tokenizer for ``corpus``: from ``cache_dir`` if it was trained before, else trained now.

    Either way a copy is written to ``save_dir`` (the run's staging directory, published with the report).
    Returns the tokenizer and whether it came from the cache.
    """
    name = cache_name(corpus, vocab_size)
    cached = cache_dir / name
    if cached.is_file():
        try:
            tok = Tokenizer.from_file(str(cached))
            shutil.copyfile(cached, save_dir / name)
            return tok, True
        except Exception:  # noqa: BLE001 - a damaged cache file is retrained, not fatal
            pass
    tok = train_bpe(sentence_texts(corpus), vocab_size)
    tok.save(str(save_dir / name))
    return tok, False
