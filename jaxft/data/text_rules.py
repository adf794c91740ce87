"""Text repairs of the cleaning step (`data.clean.*`), each a pure function `str -> str`.

Real scraped text carries debris that is not language: AG News has HTML entities whose `&` was turned
into a space (`It #39;s`, ` quot;`, `AT amp;T`), proper entities (`&lt;A HREF=...&gt;`), HTML tags,
CSV-doubled quotes (`""`) and backslashes standing for dollar signs (`\\$5`) or line breaks
(`Images\\\\Yahoo`). A model trained on it learns the debris; at test time it sees the same debris only if
the test split is repaired the same way, so repairs apply to every split alike.

`match_key` is the form texts are compared in (normalised duplicates, conflicting labels, leakage):
repaired, NFKC, case-folded, whitespace collapsed.
"""

from __future__ import annotations

import html
import re
import unicodedata

# An entity whose `&` was replaced by whitespace (or lost at the start): the whitespace goes with it.
_BARE_NUMERIC = re.compile(r"(?:^|\s)#(\d{2,5}|x[0-9A-Fa-f]{2,4});")
_BARE_NAMED = re.compile(r"(?:^|\s)(quot|amp|lt|gt|apos|nbsp);")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_BACKSLASH_DOLLAR = re.compile(r"\\+(?=\$)")
_BACKSLASHES = re.compile(r"\\+")
_DOUBLED_QUOTE = re.compile(r'""')


def repair_escapes(text: str) -> str:
    """HTML entities (proper and `&`-less), tags, doubled quotes and backslash escapes → plain text."""
    text = _BARE_NUMERIC.sub(lambda m: html.unescape(f"&#{m.group(1)};"), text)
    text = _BARE_NAMED.sub(lambda m: html.unescape(f"&{m.group(1)};"), text)
    for _ in range(3):  # &amp; &lt; &#39; ... (&#151; → — as browsers read it: cp1252); &amp;amp; twice
        text, before = html.unescape(text), text
        if text == before:
            break
    text = _TAG.sub(" ", text)
    if len(text) > 1 and text[0] == text[-1] == '"' and '"' not in text[1:-1].replace('""', ""):
        text = text[1:-1]  # a whole CSV-quoted field ("say ""hi"""), read without quote processing
    text = _DOUBLED_QUOTE.sub('"', text)
    text = _BACKSLASH_DOLLAR.sub("", text)
    return _BACKSLASHES.sub(" ", text)  # a lone backslash stood for a line break: a word boundary


def normalize_unicode(text: str) -> str:
    """NFKC: compatibility forms (full-width letters, ligatures, non-breaking spaces) → their plain form."""
    return unicodedata.normalize("NFKC", text)


def collapse_whitespace(text: str) -> str:
    """Runs of whitespace (tabs, newlines, doubled spaces) → one space; no leading or trailing space."""
    return " ".join(text.split())


# The modifying rules in the order they run: (data.clean key, function).
REPAIRS = (("repair_escapes", repair_escapes), ("normalize_unicode", normalize_unicode),
           ("collapse_whitespace", collapse_whitespace))


def match_key(text) -> str:
    """How two texts are compared for duplicates, conflicting labels and leakage: repaired, NFKC,
    case-folded, whitespace collapsed — whichever repairs are switched on for the data itself."""
    if not isinstance(text, str):
        return "" if text is None else str(text)
    return collapse_whitespace(normalize_unicode(repair_escapes(text)).casefold())
