"""The GPT-vs-BERT study (``fastformer compare``): end to end at a tiny size, its parts, and its bad-input handling."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from fastformer import cli
from fastformer.study import corpus as corpus_mod
from fastformer.study import tokenizer as tokenizer_mod

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _compare(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``fastformer compare ARGS`` in-process: (exit code, stdout, stderr)."""
    try:
        cli.main(["compare", "--no-progress", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _labelled_corpus(root: Path, sentences_per_class: int = 150) -> Path:
    """A small valid corpus: two subdirectories (classes) of made-up but distinct sentences."""
    rng = random.Random(0)
    topics = {
        "cats": ["cat", "kitten", "whisker", "purr", "mouse", "fur", "paw"],
        "ships": ["ship", "harbour", "sail", "anchor", "captain", "tide", "deck"],
    }
    for label, words in topics.items():
        (root / label).mkdir(parents=True)
        lines = []
        for i in range(sentences_per_class):
            body = " ".join(rng.choice(words + ["the", "a", "of", "and", "near"]) for _ in range(18))
            lines.append(f"Sentence {i} tells that the {body}.")
        paragraphs = [" ".join(lines[j : j + 3]) for j in range(0, len(lines), 3)]
        (root / label / "notes.txt").write_text("\n\n".join(paragraphs))
    return root


def _finite_numbers(x: object) -> int:
    """Count the numbers in a parsed JSON tree, failing on any that is not finite."""
    if isinstance(x, bool):
        return 0
    if isinstance(x, (int, float)):
        assert math.isfinite(x), x
        return 1
    if isinstance(x, dict):
        return sum(_finite_numbers(v) for v in x.values())
    if isinstance(x, list):
        return sum(_finite_numbers(v) for v in x)
    return 0


def test_quick_study_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    code, stdout, err = _compare(["--quick", "--preset", "tiny", "--steps", "4", "--out", str(out)], capsys)
    assert code == 0, err
    # the demo explains itself before it runs, and ends with a table and a conclusion
    if not torch.cuda.is_available():
        assert "the torch backend (PyTorch ops, fp32), the CPU's fast path" in stdout
        assert "Triton's CPU interpreter" in stdout and "not speed figures" in stdout
    assert "fine-tuned accuracy" in stdout and "majority" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert {"report.md", "study.json", "loss_curves.png", "accuracy.png", "throughput.png"} <= set(names)
    assert any(n.startswith("tokenizer-") and n.endswith(".json") for n in names)
    assert not list(tmp_path.glob(".*staging*")), "the staging directory was left behind"

    result = json.loads((out / "study.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert _finite_numbers(result) > 100
    gpt, bert = result["models"]["gpt"], result["models"]["bert"]
    assert result["setup"]["steps"] == 4 and len(gpt["curve"]["loss"]) == 4 and len(bert["curve"]["loss"]) == 4
    assert gpt["pretrain"]["tokens_seen"] == bert["pretrain"]["tokens_seen"] > 0  # the same token budget
    assert gpt["val_final"]["perplexity"] == pytest.approx(math.exp(gpt["val_final"]["loss"]))
    for v in (gpt["finetune_accuracy"], bert["finetune_accuracy"], result["majority_baseline"]):
        assert 0.0 <= v <= 1.0
    assert 0.0 <= bert["val_final"]["nsp_accuracy"] <= 1.0 and 0.0 <= bert["val_final"]["masked_accuracy"] <= 1.0
    assert gpt["flops_per_token"]["train"] == 3 * gpt["flops_per_token"]["forward"] > 0
    speed = result["efficiency"]["torch"]
    assert speed["gpt"]["train_tokens_per_s"] > 0 and speed["gpt"]["generation_tokens_per_s"] > 0
    assert speed["bert"]["inference_ms_per_sequence"] > 0
    assert result["samples"]["generation"] and result["samples"]["fill_mask"]
    eq = result["equivalence"]
    if not torch.cuda.is_available():  # conftest runs Triton in its interpreter: the check must run and agree
        assert eq["ran"] and eq["equal"], eq
        assert len(eq["models"]["gpt"]["losses"]["triton"]) == eq["steps"]

    report = (out / "report.md").read_text()
    assert "## Conclusion" in report and result["conclusion"] in report
    for name in ("loss_curves.png", "accuracy.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, f"{name}: only {len(data)} bytes"
        assert f"]({name})" in report
        import matplotlib.image

        height, width = matplotlib.image.imread(out / name).shape[:2]
        assert height >= 300 and width >= 600, (name, height, width)


def test_stdlib_corpus_is_deterministic() -> None:
    a, b = corpus_mod.stdlib_corpus(quick=True), corpus_mod.stdlib_corpus(quick=True)
    assert a.digest() == b.digest()
    assert [(d.name, d.label, d.sentences) for d in a.documents] == [
        (d.name, d.label, d.sentences) for d in b.documents
    ]
    assert a.classes == sorted(corpus_mod.STDLIB_PACKAGES)
    assert a.n_chars > corpus_mod.MIN_CHARS and a.n_sentences > corpus_mod.MIN_SENTENCES
    assert [d.name for d in a.documents] == sorted(d.name for d in a.documents)  # sorted file order
    # prose, not code: no doctest prompts, and sentences are mostly letters
    sentences = [s for d in a.documents for s in d.sentences]
    assert not any(">>>" in s for s in sentences)
    assert sum(c.isalpha() or c.isspace() for s in sentences for c in s) > 0.85 * sum(map(len, sentences))


def test_user_corpus_labels_and_determinism(tmp_path: Path) -> None:
    root = _labelled_corpus(tmp_path / "text")
    a, b = corpus_mod.load_corpus(str(root), quick=True), corpus_mod.load_corpus(str(root), quick=True)
    assert a.digest() == b.digest()
    assert a.classes == ["cats", "ships"]
    single = tmp_path / "one.txt"
    single.write_text((root / "cats" / "notes.txt").read_text() + "\n\n" + (root / "ships" / "notes.txt").read_text())
    quarters = corpus_mod.load_corpus(str(single), quick=True)
    assert quarters.classes == sorted(corpus_mod.QUARTERS)  # one file: labelled by which quarter of the text


def test_sentence_split() -> None:
    text = "The first one ends here. The second, e.g. this one,\n  wraps a line! Does it? Yes, it does."
    # split before a capital only (not after "e.g."), whitespace collapsed, fragments under 12 characters dropped
    assert corpus_mod.split_sentences(text) == [
        "The first one ends here.",
        "The second, e.g. this one, wraps a line!",
        "Yes, it does.",
    ]


def test_tokenizer_round_trips_and_caches(tmp_path: Path) -> None:
    corpus = corpus_mod.stdlib_corpus(quick=True)
    tok = tokenizer_mod.train_bpe(tokenizer_mod.sentence_texts(corpus)[:2000], 400)
    assert tok.get_vocab_size() == 400
    assert [tok.token_to_id(s) for s in tokenizer_mod.SPECIALS] == list(range(len(tokenizer_mod.SPECIALS)))
    texts = [
        " Return the value of the header named by the key.",
        "naïve café — 東京 😀",
        "def f(x):\n\treturn x  **  2\r\n",
        "   leading and trailing spaces   ",
        "",
    ]
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert all(0 <= i < 400 for i in ids)
    # merges do their job: common words are single tokens, so text is much shorter than its bytes
    sample = " ".join(tokenizer_mod.sentence_texts(corpus)[:200])
    assert len(tok.encode(sample).ids) < 0.65 * len(sample.encode())

    cache, save1, save2 = tmp_path / "cache", tmp_path / "s1", tmp_path / "s2"
    for d in (cache, save1, save2):
        d.mkdir()
    small = corpus_mod.Corpus("test", corpus.documents[:10], corpus.classes)
    first, cached = tokenizer_mod.load_or_train(small, 300, cache, save1)
    assert not cached
    name = tokenizer_mod.cache_name(small, 300)
    (cache / name).write_bytes((save1 / name).read_bytes())
    second, cached = tokenizer_mod.load_or_train(small, 300, cache, save2)
    assert cached and (save2 / name).is_file()
    assert second.encode(texts[0]).ids == first.encode(texts[0]).ids


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("empty", "empty"),
        ("missing", "no such file or directory"),
        ("binary", "not a text file"),
        ("latin1", "not UTF-8 text"),
        ("small", "too small"),
        ("empty_dir", "holds no files"),
        ("one_class", "at least two labels"),
    ],
)
def test_bad_corpus(kind: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "corpus.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 100)
    elif kind == "latin1":
        path.write_bytes("Une phrase française, très française. ".encode("latin-1") * 1000)
    elif kind == "small":
        path.write_text("A short text. It has a few sentences. Nothing more.\n")
    elif kind == "empty_dir":
        path.mkdir()
    elif kind == "one_class":  # two subdirectories, but one holds no text: one class is left
        path = _labelled_corpus(tmp_path / "text", sentences_per_class=250)
        path.joinpath("ships", "notes.txt").write_text("\n")
    out = tmp_path / "out"
    code, _, err = _compare(["--corpus", str(path), "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastformer compare: error: "), err
    assert expected in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".*staging*"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--preset", "huge"], "--preset huge: unknown preset"),
        (["--device", "tpu"], "--device tpu: unknown device"),
        (["--backend", "fast"], "--backend fast: unknown backend"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
    ],
)
def test_bad_options(args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = _compare([*args, "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = _compare(["--device", "cuda", "--out", str(out)], capsys)
    assert code == 2
    assert err == "fastformer compare: error: --device cuda: no CUDA GPU is available to torch on this machine\n"
    assert not out.exists()


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "taken"
    out.write_text("mine")
    code, _, err = _compare(["--out", str(out)], capsys)
    assert code == 2 and "exists and is not a directory" in err
    assert out.read_text() == "mine"


def test_failure_midway_leaves_out_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after files were staged (tokenizer written) must not publish anything, nor leave the staging dir."""
    from fastformer.study import run

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("simulated crash in pretraining")

    monkeypatch.setattr(run, "pretrain", boom)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier file")
    corpus = _labelled_corpus(tmp_path / "text")
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(["compare", "--no-progress", "--corpus", str(corpus), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".*staging*"))
