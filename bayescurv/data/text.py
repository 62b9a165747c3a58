"""Offline text: sentences from the documentation that ships with every CPython, a word-level
tokenizer built from them, and three small classification tasks.

Two sources, both present wherever Python runs and read without importing or downloading
anything:

- ``pydoc_data.topics``: the language reference's topic pages that ``help("if")`` prints
  (about 465,000 characters in CPython 3.11: the data model, statements, expressions,
  built-in types, string formatting);
- the docstrings of the standard library, parsed with :mod:`ast` from the ``.py`` sources
  under ``sysconfig.get_paths()["stdlib"]`` (about 1.7 million characters in 3.11; test
  packages and ``site-packages`` are skipped).

The tasks (each a list of ``(sentence, label)`` pairs, split deterministically by
``split_seed``):

- ``topic``: which part of the language reference a sentence comes from (data model,
  statements, built-in types, expressions);
- ``module``: which family of standard-library packages a docstring sentence belongs to
  (GUI, networking and mail, concurrency, testing and debugging);
- ``kind``: whether the first sentence of a docstring documents a class or a function
  (balanced by subsampling the functions).

Each comes with an out-of-distribution set (sentences from the other source) and a
corruption (a fraction of the words replaced by random vocabulary words). Labels are written
as words of the vocabulary (``answers``) so that a causal language model can answer over
answer tokens. The exact text depends on the Python version (the docs change between
releases); within one version everything is deterministic.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bayescurv.errors import InvalidArgumentError

TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
"""Word-level tokens: lowercase words, digit runs and single punctuation characters."""

SPECIALS = ("<pad>", "<bos>", "<unk>", "<sep>")
PAD, BOS, UNK, SEP = range(4)

TOPIC_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("specialnames", "customization", "attribute-access", "sequence-types",
              "numeric-types", "context-managers", "callable-types", "specialattrs",
              "objects"),
    "statement": ("compound", "try", "with", "assignment", "import", "raise", "for", "while",
                  "if", "else", "return", "del", "global", "nonlocal", "assert", "pass",
                  "break", "continue", "yield", "function", "class", "augassign", "async",
                  "execmodel", "naming", "exceptions"),
    "type": ("types", "typesseq", "typesseq-mutable", "typesmapping", "typesmethods",
             "typesmodules", "typesfunctions", "dict", "lists", "integers", "floating",
             "imaginary", "numbers", "truth", "string-methods", "bltin-code-objects",
             "bltin-type-objects", "bltin-null-object", "bltin-ellipsis-object"),
    "expression": ("comparisons", "operator-summary", "calls", "binary", "subscriptions",
                   "slicings", "booleans", "power", "unary", "bitwise", "shifting",
                   "lambda", "in", "atom-identifiers", "atom-literals", "exprlists",
                   "attribute-references", "await", "conversions"),
}
"""The ``topic`` task's classes: groups of ``pydoc_data.topics`` pages."""

MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "window": ("tkinter", "turtle", "turtledemo"),
    "network": ("email", "smtplib", "imaplib", "nntplib", "poplib", "mailbox", "http",
                "urllib", "xmlrpc", "ftplib", "socketserver", "wsgiref", "socket", "ssl",
                "cgi"),
    "thread": ("asyncio", "threading", "multiprocessing", "concurrent", "subprocess", "queue",
               "sched", "selectors"),
    "test": ("unittest", "doctest", "pdb", "bdb", "traceback", "trace", "cProfile",
             "profile", "timeit"),
}
"""The ``module`` task's classes: families of standard-library packages."""

KINDS = ("class", "function")
"""The ``kind`` task's classes: what a docstring documents (module docstrings are too few
to balance a third class)."""

_SKIP_DIRS = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")


# ----------------------------------------------------------------------------------------
# raw text
# ----------------------------------------------------------------------------------------
def pydoc_topics() -> dict[str, str]:
    """The language reference's topic pages: ``{topic: text}`` (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return dict(topics)


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(root: str | None = None) -> tuple[tuple[str, str, str], ...]:
    """Every docstring of the standard library's ``.py`` sources under ``root`` (default
    ``sysconfig.get_paths()["stdlib"]``), parsed with :mod:`ast` (nothing is imported):
    ``(package, kind, docstring)`` with ``package`` the top-level module or package name and
    ``kind`` ``"module"``, ``"class"`` or ``"function"``. Test packages, ``idlelib``,
    ``lib2to3`` and ``site-packages`` are skipped. Cached per ``root``."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise InvalidArgumentError(f"no standard-library sources under {root!r}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if any(p in _SKIP_DIRS for p in parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            package = parts[0] if parts else name[:-3]
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module):
                    kind = "module"
                elif isinstance(node, ast.ClassDef):
                    kind = "class"
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    kind = "function"
                else:
                    continue
                doc = ast.get_docstring(node)
                if doc:
                    out.append((package, kind, doc))
    return tuple(out)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])|\n\s*\n")


def sentences(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Split ``text`` into sentences (at ``.``/``!``/``?`` before a capital, and at blank
    lines), whitespace collapsed; keep those of ``min_words`` to ``max_words`` words that
    look like prose (no interpreter prompts, mostly letters)."""
    out = []
    for s in _SENTENCE_END.split(text):
        s = " ".join(s.split())
        words = s.split(" ")
        if not (min_words <= len(words) <= max_words) or ">>>" in s or "..." in s[:4]:
            continue
        letters = sum(c.isalpha() for c in s)
        if letters < 0.75 * (len(s) - s.count(" ")):
            continue
        out.append(s)
    return out


def tokenize(text: str) -> list[str]:
    """Lowercased word-level tokens (:data:`TOKEN`)."""
    return TOKEN.findall(text.lower())


# ----------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------
class WordTokenizer:
    """A word-level vocabulary built from text: the ``vocab_size - 4`` most frequent tokens
    (ties broken alphabetically) after the specials ``<pad>`` (0), ``<bos>`` (1), ``<unk>`` (2)
    and ``<sep>`` (3). :meth:`batch` encodes ``<bos> tokens… <sep>`` left-padded, so the last
    position of every row is the ``<sep>`` at which a causal LM answers."""

    def __init__(self, texts: Iterable[str], vocab_size: int = 2000,
                 always: Sequence[str] = ()) -> None:
        if vocab_size <= len(SPECIALS) + len(always):
            raise InvalidArgumentError(f"vocab_size must exceed {len(SPECIALS) + len(always)}")
        counts = Counter(t for text in texts for t in tokenize(text))
        keep = [w for w in always if w not in SPECIALS]
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        for w, _ in ranked:
            if len(keep) >= vocab_size - len(SPECIALS):
                break
            if w not in keep:
                keep.append(w)
        self.words: list[str] = [*SPECIALS, *keep]
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, words: Sequence[str]) -> list[int]:
        """Ids of single words (:class:`InvalidArgumentError` for one not in the vocabulary:
        answer words must be tokens)."""
        missing = [w for w in words if w not in self.index]
        if missing:
            raise InvalidArgumentError(f"words {missing} are not in the vocabulary")
        return [self.index[w] for w in words]

    def encode(self, text: str, max_len: int = 40) -> list[int]:
        """``[<bos>, tokens…, <sep>]``, the tokens truncated to ``max_len - 2``."""
        toks = [self.index.get(t, UNK) for t in tokenize(text)][: max_len - 2]
        return [BOS, *toks, SEP]

    def batch(self, texts: Sequence[str], max_len: int = 40) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` ``(B, T)`` long, left-padded with ``<pad>``."""
        rows = [self.encode(t, max_len) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------
@dataclass
class TextTask:
    """A sentence classification task.

    Attributes:
        name: ``"topic"``, ``"module"`` or ``"kind"``.
        answers: one vocabulary word per class (the answer tokens).
        train, val, test: ``(sentence, label)`` pairs.
        ood: sentences from another source (out of distribution for this task).
    """

    name: str
    answers: tuple[str, ...]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    ood: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.answers)

    def held_out(self) -> set[str]:
        """Sentences of the validation, test and OOD sets (to keep out of pretraining)."""
        return {s for s, _ in self.val + self.test} | set(self.ood)


def _dedup(items: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """One copy of each sentence; sentences found with two different labels are dropped (no
    sentence is in two splits, and none has two labels)."""
    labels: dict[str, set[int]] = {}
    for s, y in items:
        labels.setdefault(s, set()).add(y)
    return [(s, next(iter(ys))) for s, ys in labels.items() if len(ys) == 1]


def _split(items: list[tuple[str, int]], n_train: int, n_val: int, n_test: int, seed: int
           ) -> tuple[list, list, list]:
    """Random train / val / test splits (the classes in their natural proportions)."""
    need = n_train + n_val + n_test
    if len(items) < need:
        raise InvalidArgumentError(f"only {len(items)} sentences for {need} requested")
    items = sorted(items)
    random.Random(seed).shuffle(items)
    return (items[n_val + n_test:need], items[:n_val], items[n_val:n_val + n_test])


def _docstring_sentences(groups: dict[str, tuple[str, ...]]) -> list[tuple[str, int]]:
    items = []
    owner = {p: c for c, ps in enumerate(groups.values()) for p in ps}
    for package, _kind, doc in stdlib_docstrings():
        if package in owner:
            items += [(s, owner[package]) for s in sentences(doc)]
    return _dedup(items)


def _pydoc_sentences(groups: dict[str, tuple[str, ...]]) -> list[tuple[str, int]]:
    topics = pydoc_topics()
    items = []
    for c, names in enumerate(groups.values()):
        for name in names:
            items += [(s, c) for s in sentences(topics.get(name, ""))]
    return _dedup(items)


def _ood(source: str, n: int, seed: int, exclude: set[str]) -> list[str]:
    rng = random.Random(seed + 1)
    if source == "pydoc":
        pool = sorted({s for text in pydoc_topics().values() for s in sentences(text)})
    else:  # docstrings of packages in none of the module task's families
        used = {p for ps in MODULE_GROUPS.values() for p in ps}
        pool = sorted({s for p, _, d in stdlib_docstrings() if p not in used
                       for s in sentences(d)})
    pool = [s for s in pool if s not in exclude]
    rng.shuffle(pool)
    return pool[:n]


def text_task(name: str, n_train: int = 600, n_val: int = 200, n_test: int = 600,
              n_ood: int = 600, split_seed: int = 0) -> TextTask:
    """One of the three tasks (see the module docstring), split deterministically."""
    if name == "topic":
        items, answers, ood = _pydoc_sentences(TOPIC_GROUPS), tuple(TOPIC_GROUPS), "stdlib"
    elif name == "module":
        items, answers, ood = _docstring_sentences(MODULE_GROUPS), tuple(MODULE_GROUPS), "pydoc"
    elif name == "kind":
        first: list[tuple[str, int]] = []
        for _package, kind, doc in stdlib_docstrings():
            s = sentences(doc.split("\n\n")[0], min_words=4)
            if s and kind in KINDS:
                first.append((s[0], KINDS.index(kind)))
        items = sorted(_dedup(first))
        # balanced: as many functions as classes (a seeded subsample of the functions)
        by_class = [[it for it in items if it[1] == c] for c in range(len(KINDS))]
        random.Random(split_seed + 2).shuffle(by_class[1])
        items = by_class[0] + by_class[1][:len(by_class[0])]
        answers, ood = KINDS, "pydoc"
    else:
        raise InvalidArgumentError(f"unknown task {name!r}; use 'topic', 'module' or 'kind'")
    train, val, test = _split(items, n_train, n_val, n_test, split_seed)
    used = {s for s, _ in train + val + test}
    return TextTask(name, answers, train, val, test, _ood(ood, n_ood, split_seed, used))


def corpus(exclude: Iterable[str] = ()) -> list[str]:
    """Every sentence of both sources (sorted, unique), except those in ``exclude``: the
    pretraining text."""
    skip = set(exclude)
    pool = {s for text in pydoc_topics().values() for s in sentences(text)}
    pool |= {s for _, _, d in stdlib_docstrings() for s in sentences(d, min_words=4)}
    return sorted(pool - skip)


def corrupt(texts: Sequence[str], rate: float, words: Sequence[str], seed: int = 0
            ) -> list[str]:
    """Replace each token of each text with probability ``rate`` by a word drawn uniformly
    from ``words`` (a covariate shift that keeps the label defined)."""
    if not 0.0 <= rate <= 1.0:
        raise InvalidArgumentError(f"rate must lie in [0, 1], got {rate}")
    rng = random.Random(seed)
    out = []
    for t in texts:
        toks = [rng.choice(words) if rng.random() < rate else w for w in tokenize(t)]
        out.append(" ".join(toks))
    return out


__all__ = ["pydoc_topics", "stdlib_docstrings", "sentences", "tokenize", "WordTokenizer",
           "TextTask", "text_task", "corpus", "corrupt", "TOPIC_GROUPS", "MODULE_GROUPS",
           "KINDS", "PAD", "BOS", "UNK", "SEP"]
