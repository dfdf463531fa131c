"""English text that ships on every machine with the benchmark (and test) environment, not written for lowbit.

The prose paragraphs of scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, shipped inside the
scikit-learn wheel, which both ``.venv`` and ``.venv-bench`` install): about 2,000 words of ordinary English in ~100
sentences. reStructuredText markup is stripped; tables, field lists, code and literal blocks are dropped.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_ROLE = re.compile(r":[\w:]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`name <target>` -> name
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_{1,2}")  # `text <url>`_ -> text
_CITE = re.compile(r"\s*\[\d+\]_")  # footnote references
_SENTENCE = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _prose(rst: str) -> list[str]:
    """The paragraphs of one .rst file that are running text, markup removed."""
    paragraphs: list[str] = []
    literal_above: int | None = None  # indent of the paragraph that opened a literal block ("::")
    for block in re.split(r"\n[ \t]*\n", rst):
        lines = [line.rstrip() for line in block.strip("\n").split("\n") if line.strip()]
        if not lines:
            continue
        indent = _indent(lines[0])
        if literal_above is not None and indent > literal_above:
            continue
        literal_above = None
        text = " ".join(line.strip() for line in lines)
        if text.endswith("::"):
            literal_above = indent
            if text.startswith(".."):  # a directive: its body is prose only for these
                literal_above = None if re.match(r"\.\. (dropdown|topic|note|rubric)::", text) else indent
            continue
        if (
            text.startswith(("..", ">>>", "*", "-", ":", "[", "|"))
            or re.search(r"={3,}|-{3,}|\|", text)
            or any(_indent(line) != indent for line in lines)
            or len(text.split()) < 8
        ):
            continue
        text = _CITE.sub("", _LINK.sub(r"\1", _ROLE.sub(r"\1", text)))
        text = re.sub(r"\s+", " ", text.replace("``", "").replace("**", "").replace("`", ""))
        paragraphs.append(text)
    return paragraphs


@cache
def english_text() -> str:
    """All the prose paragraphs, in file-name order, separated by blank lines."""
    files = sorted(
        (f for f in resources.files("sklearn.datasets.descr").iterdir() if f.name.endswith(".rst")),
        key=lambda f: f.name,
    )
    return "\n\n".join(p for f in files for p in _prose(f.read_text(encoding="utf-8")))


def english_sentences(n: int | None = None) -> list[str]:
    """The first ``n`` sentences of the text (all when ``n`` is None) that have 5-60 words and no URL."""
    sentences = [
        s.strip()
        for s in _SENTENCE.split(english_text().replace("\n\n", " "))
        if 5 <= len(s.split()) <= 60 and "://" not in s
    ]
    if n is not None and len(sentences) < n:
        raise ValueError(f"only {len(sentences)} sentences in the text, {n} asked")
    return sentences[:n]
