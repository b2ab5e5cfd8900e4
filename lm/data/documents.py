"""Corpora as documents, each a list of sentences (the input of BERT next-sentence prediction).

Sentence splitting is deliberately simple (no abbreviation lists, no model):

* ``spaced=True`` (WikiText): the text is already tokenized with spaces around punctuation,
  so a sentence ends at a standalone ``.``, ``?`` or ``!`` token (``"word . Next"``).
  ``"Media.Vision"``, ``"1 @.@ 5"`` and ``"St."`` do not end sentences; an abbreviation
  written with a spaced dot (``"lit . Valkyria"``) does.
* ``spaced=False`` (ordinary text): a whitespace-separated token that ends in ``.``, ``?``
  or ``!`` (optionally followed by closing quotes/brackets) ends a sentence, so
  ``"Mr. Smith"`` splits after ``"Mr."``.

A sentence never spans lines: every non-empty line is one or more sentences.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_SPACED_ENDS = frozenset({".", "?", "!"})
_PLAIN_END = re.compile(r"[.?!][\"'”’)\]]*$")
# WikiText article title: exactly one '=' each side; section headings have two or more.
_WIKI_TITLE = re.compile(r"^ = ([^=].*) = $")
_WIKI_HEADING = re.compile(r"^ (?:= ){2,}(.*?)(?: =){2,} $")


def split_sentences(text: str, *, spaced: bool = False) -> list[str]:
    """Splits one line of text into sentences (see the module docstring for the rules)."""
    sentences: list[str] = []
    current: list[str] = []
    for token in text.split():
        current.append(token)
        ends = token in _SPACED_ENDS if spaced else _PLAIN_END.search(token) is not None
        if ends:
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{what} file is empty: {p}")
    return text.split("\n")


def read_wikitext_articles(
    path: str | os.PathLike, *, keep_headings: bool = False
) -> list[tuple[str, list[str]]]:
    """WikiText (``wiki.*.tokens`` / ``*.txt``) -> [(title, sentences)], one per article.

    An article starts at a line ``" = Title = "`` with a blank line (or the file's edge) on
    both sides; the blank-line rule skips table fragments like ``" = Played , W = "``, which
    are kept as ordinary text. Section headings (``" = = Section = = "``) are dropped, or kept
    as a sentence of their own with `keep_headings=True`. Paragraphs (one per line) are split
    with ``split_sentences(..., spaced=True)``. Articles with no sentences are kept (empty).
    """
    lines = [line.rstrip("\r") for line in _read_lines(path, "WikiText")]
    articles: list[tuple[str, list[str]]] = []
    n = len(lines)
    for i, line in enumerate(lines):
        title = _WIKI_TITLE.match(line)
        if (
            title is not None
            and (i == 0 or not lines[i - 1].strip())
            and (i + 1 == n or not lines[i + 1].strip())
        ):
            articles.append((title.group(1).strip(), []))
            continue
        if not line.strip():
            continue
        if not articles:
            raise ValueError(
                f"{path}: text before the first ' = Title = ' line (line {i + 1}); "
                "is this a WikiText file?"
            )
        heading = _WIKI_HEADING.match(line)
        if heading is not None:
            if keep_headings:
                articles[-1][1].append(heading.group(1).strip())
            continue
        articles[-1][1].extend(split_sentences(line, spaced=True))
    if not articles:
        raise ValueError(f"{path}: no ' = Title = ' article lines found; is this a WikiText file?")
    return articles


def read_wikitext(path: str | os.PathLike, *, keep_headings: bool = False) -> list[list[str]]:
    """WikiText file -> documents (one per article) of sentences; titles and, by default,
    section headings are dropped. See `read_wikitext_articles`."""
    return [sentences for _, sentences in read_wikitext_articles(path, keep_headings=keep_headings)]


def read_blank_line_documents(
    path: str | os.PathLike, *, spaced: bool = False, line_per_sentence: bool = False
) -> list[list[str]]:
    """Plain text -> documents: blank lines separate documents; each non-empty line is one
    sentence (`line_per_sentence=True`) or is split with `split_sentences(line, spaced=...)`."""
    documents: list[list[str]] = []
    current: list[str] = []
    for line in _read_lines(path, "text"):
        line = line.strip()
        if not line:
            if current:
                documents.append(current)
                current = []
            continue
        current.extend([line] if line_per_sentence else split_sentences(line, spaced=spaced))
    if current:
        documents.append(current)
    return documents


def looks_like_wikitext(path: str | os.PathLike) -> bool:
    """True when the first non-blank line of the file is a WikiText article title."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return _WIKI_TITLE.match(line.rstrip("\r\n")) is not None
    return False
