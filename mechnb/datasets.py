"""Text that ships with Python itself: a corpus for collecting activations offline.

Two sources, both real English prose present on every machine with Python:

- `pydoc_data.topics`: the language reference sections behind `help()` (about 113k
  tokens with the SmolLM2 tokenizer);
- the docstrings of the standard library (modules, classes, functions; test
  packages left out), read with `ast` without importing anything (about 450k).

`python_docs()` yields documents in a fixed order; `split="train"` / `"eval"` keeps a
fixed 5 % of documents (every 20th) out for evaluation.

    >>> docs = list(python_docs(split="eval"))
    >>> len(docs) > 100
    True
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from typing import Iterator

SOURCES = ("topics", "docstrings")
_HELD_OUT_EVERY = 20


def python_docs(split: str = "train", sources=SOURCES, min_chars: int = 200) -> Iterator[str]:
    """Documents of Python's own documentation, for `split` "train", "eval" or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    index = 0
    for source in sources:
        for document in _documents(source, min_chars):
            held_out = index % _HELD_OUT_EVERY == 0
            index += 1
            if split == "all" or (split == "eval") == held_out:
                yield document


@functools.lru_cache(maxsize=None)
def _documents(source: str, min_chars: int) -> tuple[str, ...]:
    if source == "topics":
        from pydoc_data.topics import topics

        return tuple(text.strip() for _, text in sorted(topics.items()) if len(text.strip()) >= min_chars)
    if source == "docstrings":
        return tuple(_docstrings(min_chars))
    raise ValueError(f"unknown source {source!r}: use {', '.join(SOURCES)}")


def _docstrings(min_chars: int) -> Iterator[str]:
    """Docstrings of the standard library's source files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if text and len(text) >= min_chars:
                        yield text
