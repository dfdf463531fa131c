"""English text that is on every machine of this project, not written for lowbit: the GNU GPL version 3.

``/usr/share/common-licenses/GPL-3`` belongs to Debian's ``base-files`` (an essential package: every Debian system,
so every developer machine and CI run here, has it, whatever the virtual environment holds) and its text never
changes. It is ordinary English prose: 5,644 words, ~7,600 SmolLM2 tokens, 157 sentences of 6-60 words. The file's
line breaks (72 columns) are undone so each paragraph is one line; the centred title lines are kept as they are.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

GPL3 = Path("/usr/share/common-licenses/GPL-3")
# Other texts of the same package, none of them a version of the GPL: calibration text disjoint from GPL-3's
# (~13,000 SmolLM2 tokens)
OTHER_LICENSES = [Path("/usr/share/common-licenses", n) for n in ("GFDL-1.3", "MPL-1.1", "Apache-2.0", "Artistic")]
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"][.!?])\s+(?=[A-Z\"(])")


def _paragraphs(path: Path) -> str:
    """``path``'s text, one paragraph per line, paragraphs separated by a blank line."""
    paragraphs = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


@cache
def english_text() -> str:
    """The whole GPL-3, one paragraph per line, paragraphs separated by a blank line."""
    return _paragraphs(GPL3)


@cache
def calibration_text() -> str:
    """Other English license texts (GFDL-1.3, MPL-1.1, Apache-2.0, Artistic), in the same form: calibration data
    that shares no passage with :func:`english_text`."""
    return "\n\n".join(_paragraphs(path) for path in OTHER_LICENSES)


def _title_like(sentence: str) -> bool:
    words = [w for w in sentence.split() if w[0].isalpha()]
    return sum(w[0].isupper() for w in words) > 0.6 * len(words)


def english_sentences(n: int | None = None) -> list[str]:
    """The first ``n`` sentences (all when ``n`` is None) of 6 to 60 words, in reading order.

    Titles, numbered section headings, the all-capital warranty clauses and the line with a URL are left out, so
    each one is a normal English sentence.
    """
    sentences = [
        s
        for paragraph in english_text().split("\n\n")
        if not re.match(r"\d+\. ", paragraph) or len(paragraph.split()) > 12  # "17. Interpretation of ..."
        for s in _SENTENCE_END.split(paragraph)
        if 6 <= len(s.split()) <= 60 and "://" not in s and not _title_like(s)
    ]
    if n is not None and len(sentences) < n:
        raise ValueError(f"only {len(sentences)} sentences in {GPL3}, {n} asked")
    return sentences[:n]
