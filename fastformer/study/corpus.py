"""The text both models learn from: documents, each a list of sentences, some with a class label.

The default corpus needs no download and ships nothing: it is the prose of the installed Python standard library
(docstrings of modules, classes and functions, and comment paragraphs), gathered in sorted file order. Files of a
fixed set of packages are labelled with their package, which gives the downstream classification task: from which
standard-library package does a passage come? The text depends on the Python version installed, so the digest of the
corpus goes into the report.

A user's corpus (``--corpus FILE|DIR``) is any UTF-8 text. In a directory with subdirectories, each file is a
document labelled with its top-level subdirectory; otherwise the text is cut into documents of a few paragraphs, and
the label is which quarter of the text a document comes from.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from fastformer.study.config import StudyError

# the classes of the downstream task: packages with the most prose of their own (60-130 kB each in CPython 3.11)
STDLIB_PACKAGES = ("asyncio", "email", "http", "logging", "unittest", "xml")
# never read: tests (code more than prose), the IDE and demos, and third-party packages
STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
MIN_CHARS = 20_000  # below this, a BPE vocabulary and held-out splits are not meaningful
MIN_SENTENCES = 100
DOC_CHARS = 2_000  # a single-file corpus is cut into documents of about this many characters
QUARTERS = ("first quarter", "second quarter", "third quarter", "fourth quarter")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_COMMENT = re.compile(r"^[ \t]*#(?!!)[ \t]?(.*)$")


@dataclass
class Document:
    name: str  # where it came from (a path relative to the corpus root)
    label: str | None  # its class in the downstream task, or None (pretraining text only)
    sentences: list[str]


@dataclass
class Corpus:
    source: str  # "python stdlib <version>" or the user's path
    documents: list[Document]
    classes: list[str] = field(default_factory=list)  # labels in the order used as class ids
    task: str = ""  # the downstream task in words

    @property
    def n_chars(self) -> int:
        return sum(len(s) for d in self.documents for s in d.sentences)

    @property
    def n_sentences(self) -> int:
        return sum(len(d.sentences) for d in self.documents)

    def digest(self) -> str:
        """sha256 of the documents' names, labels and sentences: equal digests, equal corpora."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(f"{d.name}\0{d.label}\0".encode())
            for s in d.sentences:
                h.update(s.encode() + b"\n")
        return h.hexdigest()


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (whitespace collapsed); a split at '. ' before a capital, digit or quote."""
    text = " ".join(paragraph.split())
    return [s for s in _SENTENCE_END.split(text) if len(s) >= 12]


def _is_prose(text: str) -> bool:
    """Mostly words, at least four of them: keeps sentences, drops code, tables, licence headers and ASCII art."""
    words = text.split()
    if len(words) < 4 or ">>>" in text or text.startswith(("Copyright", "Author:", "Contact:")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.8 * len(text)


def _docstring_paragraphs(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, paragraph) for every module, class and function docstring; code lines inside them dropped."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                line = getattr(node, "lineno", 0)
                for para in re.split(r"\n\s*\n", doc):
                    # indented lines are examples, signatures and argument tables, not prose
                    kept = [ln for ln in para.splitlines() if ln and not ln[0].isspace()]
                    found.append((line, " ".join(kept)))
    return found


def _comment_paragraphs(source: str) -> list[tuple[int, str]]:
    """(line, paragraph) for each run of consecutive comment lines."""
    found, run, start = [], [], 0
    for i, line in enumerate(source.splitlines() + [""], start=1):
        m = _COMMENT.match(line)
        if m and m.group(1).strip():
            if not run:
                start = i
            run.append(m.group(1).strip())
        elif run:
            found.append((start, " ".join(run)))
            run = []
    return found


def python_prose(path: Path) -> list[str]:
    """The prose sentences of one Python source file, in source order (empty if it does not parse)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []  # a handful of stdlib files are templates or other encodings; skipping is deterministic
    # sorted by line so that a module reads top to bottom; ties keep docstrings before comments
    paragraphs = sorted(_docstring_paragraphs(tree) + _comment_paragraphs(source), key=lambda p: p[0])
    return [s for _, para in paragraphs for s in split_sentences(para) if _is_prose(s)]


def stdlib_corpus(quick: bool) -> Corpus:
    """The prose of the installed standard library: the labelled packages only when ``quick``, else every module."""
    import platform

    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[Path, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP and not d.startswith("config-"))
        rel = Path(dirpath).relative_to(root)
        package = rel.parts[0] if rel.parts else None
        if quick and package not in STDLIB_PACKAGES:
            continue
        label = package if package in STDLIB_PACKAGES else None
        files += [(Path(dirpath) / f, label) for f in sorted(filenames) if f.endswith(".py")]
    documents = []
    for path, label in sorted(files, key=lambda f: f[0].relative_to(root).as_posix()):  # one order on every system
        sentences = python_prose(path)
        if sentences:
            documents.append(Document(str(path.relative_to(root)), label, sentences))
    corpus = Corpus(f"python {platform.python_version()} standard library ({root})", documents)
    corpus.classes = sorted({d.label for d in documents if d.label is not None})
    corpus.task = f"which standard-library package ({', '.join(corpus.classes)}) a passage comes from"
    return corpus


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StudyError(f"--corpus {path}: cannot read it ({e.strerror or e})") from None
    if b"\0" in data:
        raise StudyError(f"--corpus {path}: not a text file (it contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StudyError(f"--corpus {path}: not UTF-8 text (byte {e.start})") from None


def _paragraph_sentences(text: str) -> list[str]:
    return [s for para in re.split(r"\n\s*\n", text) for s in split_sentences(para)]


def _chunk_documents(name: str, text: str) -> list[Document]:
    """A long text as documents of about DOC_CHARS characters, cut at a paragraph end (or, inside a paragraph
    longer than that, at a sentence end)."""
    documents: list[Document] = []
    sentences: list[str] = []
    size = 0

    def close() -> None:
        nonlocal sentences, size
        if sentences:
            documents.append(Document(f"{name}#{len(documents)}", None, sentences))
        sentences, size = [], 0

    for para in re.split(r"\n\s*\n", text):
        for sentence in split_sentences(para):
            sentences.append(sentence)
            size += len(sentence)
            if size >= 2 * DOC_CHARS:
                close()
        if size >= DOC_CHARS:
            close()
    close()
    return documents


def user_corpus(path_str: str) -> Corpus:
    """Read ``--corpus``: one UTF-8 file, or every non-hidden file under a directory (sorted)."""
    path = Path(path_str)
    if not path.exists():
        raise StudyError(f"--corpus {path}: no such file or directory")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
        if not files:
            raise StudyError(f"--corpus {path}: the directory holds no files")
        texts = [(p.relative_to(path), _read_text(p)) for p in files]
    elif path.is_file():
        texts = [(Path(path.name), _read_text(path))]
    else:
        raise StudyError(f"--corpus {path}: not a regular file or directory")
    if not any(t.strip() for _, t in texts):
        raise StudyError(f"--corpus {path}: empty (no text)")
    subdirs = {rel.parts[0] for rel, _ in texts if len(rel.parts) > 1}
    if len(subdirs) >= 2:  # labelled by subdirectory; files at the top level are pretraining text
        task = f"which subdirectory of {path} a passage comes from"
        documents = [
            Document(str(rel), rel.parts[0] if len(rel.parts) > 1 else None, _paragraph_sentences(text))
            for rel, text in texts
        ]
    else:  # no labels given: documents labelled by their position in the text, in four equal parts
        task = "which quarter of the text a passage comes from"
        documents = [d for rel, text in texts for d in _chunk_documents(str(rel), text)]
        total, seen = sum(len(" ".join(d.sentences)) for d in documents), 0
        for d in documents:
            d.label = QUARTERS[min(3, 4 * seen // max(1, total))]
            seen += len(" ".join(d.sentences))
    documents = [d for d in documents if d.sentences]
    corpus = Corpus(str(path), documents, task=task)
    corpus.classes = sorted({d.label for d in documents if d.label is not None})
    return corpus


def check_size(corpus: Corpus, what: str) -> None:
    """StudyError unless the corpus has enough text and at least two classes for the downstream task."""
    if corpus.n_chars == 0:
        raise StudyError(f"{what}: empty (no sentences found)")
    if corpus.n_chars < MIN_CHARS or corpus.n_sentences < MIN_SENTENCES:
        raise StudyError(
            f"{what}: too small ({corpus.n_chars:,} characters in {corpus.n_sentences} sentences; "
            f"need at least {MIN_CHARS:,} characters and {MIN_SENTENCES} sentences)"
        )
    if len(corpus.classes) < 2:
        raise StudyError(f"{what}: the classification task needs at least two labels, found {len(corpus.classes)}")


def load_corpus(path: str | None, quick: bool) -> Corpus:
    """The user's corpus if ``path`` is given, else the standard library's; checked for size."""
    corpus = user_corpus(path) if path is not None else stdlib_corpus(quick)
    check_size(corpus, f"--corpus {path}" if path is not None else "the standard-library corpus")
    return corpus
