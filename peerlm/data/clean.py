"""Text cleaners, one per corpus format: pure functions from raw member content to plain UTF-8 prose.

Each is small and separately tested on synthetic samples. The goal is text a language model should
predict, not a perfect renderer: markup is removed, the words and their order are kept.

- `strip_html`: HTML to text with `html.parser`; block elements become line breaks, `<head>`,
  `<script>`, `<style>` and the FAQ's book-navigation footer are dropped.
- `mediawiki_pages` + `clean_wikitext`: a MediaWiki XML dump to article text (namespace 0, redirects
  dropped; templates, references, tables, files, categories, comments and quote markup removed,
  `[[target|text]]` -> `text`, headings kept as plain lines, trailing reference-style sections cut).
- `brown_to_text`: the POS-tagged Brown corpus (`word/tag`) back to running text.
- `drop_exact_duplicates`: BBC News ships 98 byte-identical articles twice.
- `NgramIndex`: drop held-out sentences that share a word 8-gram with training text (web vs sotu).
"""

from __future__ import annotations

import html
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser

import numpy as np


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------- HTML

_BLOCK = {"p", "div", "br", "li", "ul", "ol", "blockquote", "tr", "table", "hr", "center", "dd", "dt",
          "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article", "title", "body"}
_SKIP = {"head", "script", "style", "noscript"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skip = 0  # depth inside elements whose text is not prose
        self._in_title = False
        self._div_stack: list[bool] = []  # per open <div>: does it start a skipped navigation block?

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in _SKIP:
            self._skip += 1
        if tag == "div":
            nav = any(k in ("class", "id") and v and "navigation" in v for k, v in attrs)
            self._div_stack.append(nav)
            self._skip += nav
        if tag in _BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        if tag == "div" and self._div_stack:
            self._skip -= self._div_stack.pop()
        if tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skip:
            self.parts.append(data)


def strip_html(markup: str, keep_title: bool = True) -> str:
    """Plain text of an HTML page; the `<title>` (before any ' | site' suffix) becomes the first line."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    body = "".join(parser.parts)
    # Whitespace inside a block is layout, not content: collapse it, keep the block breaks.
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    lines = [p for p in paragraphs if p]
    title = " ".join("".join(parser.title).split()).split(" | ")[0]
    if keep_title and title and (not lines or lines[0] != title):
        lines.insert(0, title)
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------- MediaWiki

def mediawiki_pages(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each article: namespace 0 and not a redirect."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        ns = fields.get("ns")
        text = None
        rev = fields.get("revision")
        if rev is not None:
            for child in rev:
                if child.tag.rsplit("}", 1)[-1] == "text":
                    text = child.text or ""
        is_article = ns is not None and (ns.text or "").strip() == "0"
        is_redirect = "redirect" in fields or (text or "").lstrip().lower().startswith("#redirect")
        if is_article and not is_redirect and text:
            yield (fields["title"].text or "").strip(), text
        elem.clear()


def _remove_balanced(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) `open_ ... close` span; an unclosed opener drops the rest."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_NS = re.compile(r"^\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references"}


_LANG = re.compile(r"\{\{\s*(?:lang\|[^|{}]*|lang-[a-zA-Z-]+|transl\|[^|{}]*)\|([^|{}]*)(?:\|[^{}]*)?\}\}",
                   re.I)
_CONVERT = re.compile(r"\{\{\s*convert\|([-\d.,]+)\|([^|{}]+)(?:\|[^{}]*)?\}\}", re.I)
_FILE_LINK = re.compile(r"\[\[\s*(?:file|image|media)\s*:", re.I)


def _drop_file_links(text: str) -> str:
    """Remove `[[File:...]]` spans whole; captions may hold links and stray brackets, so count depth."""
    out: list[str] = []
    pos = 0
    while (m := _FILE_LINK.search(text, pos)) is not None:
        out.append(text[pos : m.start()])
        depth, single, i = 1, 0, m.end()
        while depth and i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text[i] == "[":
                single, i = single + 1, i + 1
            elif text[i] == "]" and single:  # "[x]]]" closes the single bracket first
                single, i = single - 1, i + 1
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
            else:
                i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    if _DROP_NS.match(inner):
        return ""
    target, _, label = inner.partition("|")
    return (label or target).lstrip(":").strip()


def clean_wikitext(markup: str) -> str:
    """Plain prose from MediaWiki markup (see the module docstring for what goes)."""
    t = re.sub(r"<!--.*?(-->|$)", "", markup, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t, flags=re.I)
    t = re.sub(r"<ref[^>]*>.*?</ref\s*>", "", t, flags=re.I | re.S)
    for tag in ("math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap"):
        t = re.sub(rf"<{tag}[^>]*>.*?</{tag}\s*>", "", t, flags=re.I | re.S)
    t = _drop_file_links(t)
    while True:  # innermost first: links nest (in templates, in captions)
        t2 = _LINK.sub(_link_text, t)
        if t2 == t:
            break
        t = t2
    t = _LANG.sub(lambda m: m.group(1), t)  # the few templates whose argument is running text
    t = _CONVERT.sub(lambda m: f"{m.group(1)} {m.group(2)}", t)
    t = _remove_balanced(t, "{{", "}}")
    t = _remove_balanced(t, "{|", "|}")
    t = _EXT_LINK.sub(lambda m: m.group(1), t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"</?[a-zA-Z][^>]*>", "", t)
    t = html.unescape(t).replace("\xa0", " ")
    lines: list[str] = []
    for raw in t.split("\n"):
        line = raw.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in _DROP_SECTIONS:
                break  # reference-style sections close an article; nothing after them is prose
            line = heading.group(2)
        elif re.match(r"__[A-Z]+__$", line) or line[:1] in ("|", "!"):
            continue
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)
        lines.append(" ".join(line.split()))
    return normalize("\n".join(lines))


# -------------------------------------------------------------------------------------- Brown

_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "%", "'", "''", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "``"}


def brown_tokens(line: str) -> list[tuple[str, str]]:
    """(word, tag) pairs of one tagged Brown line (`word/tag`; the tag is after the last '/')."""
    pairs = []
    for tok in line.split():
        word, _, tag = tok.rpartition("/")
        pairs.append((word, tag) if word else (tok, ""))
    return pairs


def detokenize(tokens: Iterable[str]) -> str:
    """Join Penn/Brown-style tokens into running text: ``x'' -> "x", no space before punctuation."""
    out = ""
    glue = True  # no space before the next token
    for tok in tokens:
        word = '"' if tok in ("``", "''") else tok
        if not (glue or tok in _NO_SPACE_BEFORE):
            out += " "
        out += word
        glue = tok in _NO_SPACE_AFTER
    return out


def brown_to_text(tagged: str) -> str:
    """Running text of one tagged Brown file: a sentence per line in, a paragraph per blank line out."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        sentences: list[str] = []
        for line in block.split("\n"):
            pairs = brown_tokens(line)
            if not pairs:
                continue
            text = detokenize(w for w, _ in pairs)
            if all(tag.endswith("-hl") for _, tag in pairs):  # a heading line stands alone
                paragraphs.extend([" ".join(sentences), text] if sentences else [text])
                sentences = []
            else:
                sentences.append(text)
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def brown_categories(cats_txt: str) -> dict[str, str]:
    """`cats.txt` (`ca01 news` per line) as {file id: genre}."""
    cats = {}
    for line in cats_txt.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            cats[parts[0]] = parts[1]
    return cats


# -------------------------------------------------------------------------- duplicates, overlap

def drop_exact_duplicates(docs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first of each group of (name, text) documents with identical text."""
    seen: set[str] = set()
    kept = []
    for name, text in docs:
        if text not in seen:
            seen.add(text)
            kept.append((name, text))
    return kept


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words; punctuation and quote style (' vs ’) do not matter for overlap."""
    return re.findall(r"[a-z0-9]+", text.lower())


class NgramIndex:
    """Set of word n-grams of reference texts, stored as sorted 64-bit hashes (compact for ~2 M n-grams).

    Python's `hash` of a tuple is salted per process, which is fine: the index is built and queried
    within one process, and a 64-bit collision among a few million n-grams is vanishingly unlikely.
    """

    def __init__(self, texts: Iterable[str], n: int = 8) -> None:
        self.n = n
        hashes: list[int] = []
        for text in texts:
            w = words(text)
            hashes.extend(hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1))
        self._hashes = np.unique(np.array(hashes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._hashes)

    def overlaps(self, text: str) -> bool:
        """True if `text` shares at least one n-gram with the reference texts."""
        w = words(text)
        if len(w) < self.n or not len(self._hashes):
            return False
        q = np.array([hash(tuple(w[i : i + self.n])) for i in range(len(w) - self.n + 1)], dtype=np.int64)
        idx = np.searchsorted(self._hashes, q).clip(max=len(self._hashes) - 1)
        return bool((self._hashes[idx] == q).any())
