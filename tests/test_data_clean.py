"""Each cleaner on a tiny synthetic sample of its format, plus the document segmenter."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from peerlm.data import clean
from peerlm.data.prepare import segment


def test_strip_html_drops_markup_head_and_navigation() -> None:
    page = """<!DOCTYPE html><html><head><title>B.2 Why? | Anarchist Writers</title>
    <script>var x = "<p>no</p>";</script></head><body><div class="content">
    <p>One <b>bold</b> and <i>italic</i>   word,
       hard-wrapped.</p><blockquote><p>"A quote" [<b>Book</b>, p. 1]</p></blockquote>
    <h2>B.2.1 Sub</h2><ul><li>item &eacute; &lt;x&gt;</li></ul>
    <div id="book-navigation-1" class="book-navigation"><div><a href="a.html">up</a></div></div>
    <p>After.</p></div></body></html>"""
    assert clean.strip_html(page) == (
        'B.2 Why?\n\nOne bold and italic word, hard-wrapped.\n\n"A quote" [Book, p. 1]'
        "\n\nB.2.1 Sub\n\nitem é <x>\n\nAfter."
    )
    assert clean.strip_html("<p>x</p>", keep_title=False) == "x"


def test_clean_wikitext_markup() -> None:
    markup = """{{Infobox thing|name=X|image={{nested|a}}}}
'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] societies.
<ref name="a">Cite</ref><ref name="b"/>From the Greek {{lang|grc|ἀναρχία}}, ''italic''.
[[File:Photo.jpg|thumb|A caption with [[a link]] and [brackets]]]
{| class="wikitable"
|-
| cell || cell
|}
== History ==
<!-- hidden comment -->
* A list item with [http://example.com an external link] and &nbsp;an entity.
=== Early {{tl|x}} ===
Text under.[[Category:Politics]] [[de:Anarchismus]]
== See also ==
* [[Something else]]
"""
    assert clean.clean_wikitext(markup) == (
        "Anarchism is a political philosophy that advocates self-governed societies.\n"
        "From the Greek ἀναρχία, italic.\n\nHistory\n\n"
        "A list item with an external link and an entity.\nEarly\nText under."
    )


def test_mediawiki_pages_keeps_articles_only() -> None:
    xml = b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
    <page><title>Alpha</title><ns>0</ns><revision><text>Alpha text</text></revision></page>
    <page><title>Old</title><ns>0</ns><redirect title="Alpha"/>
      <revision><text>#REDIRECT [[Alpha]]</text></revision></page>
    <page><title>Sneaky</title><ns>0</ns><revision><text>#redirect [[Alpha]]</text></revision></page>
    <page><title>Wikipedia:Policy</title><ns>4</ns><revision><text>Rules</text></revision></page>
    </mediawiki>"""
    assert list(clean.mediawiki_pages(xml)) == [("Alpha", "Alpha text")]


def test_brown_tags_dropped_and_detokenized() -> None:
    tagged = (
        "\n\n\tThirty-three/cd-hl \nThe/at man/nn said/vbd ,/, ``/`` It's/pps+bez mine/pp$$ ''/'' ./.\n"
        "He/pps paid/vbd $5/nns (/( cash/nn )/) ;/. didn't/dod* he/pps ?/.\n\n\n"
        "\tNew/jj paragraph/nn --/-- yes/rb !/.\n"
    )
    assert clean.brown_to_text(tagged) == (
        "Thirty-three\n\nThe man said, \"It's mine\". He paid $5 (cash); didn't he?\n\nNew paragraph -- yes!"
    )
    assert clean.brown_categories("ca01 news\ncn01 adventure\n\n") == {"ca01": "news", "cn01": "adventure"}


def test_drop_exact_duplicates_keeps_first() -> None:
    docs = [("a", "same"), ("b", "other"), ("c", "same"), ("d", "same ")]
    assert clean.drop_exact_duplicates(docs) == [("a", "same"), ("b", "other"), ("d", "same ")]


def test_ngram_index_flags_shared_eight_grams_only() -> None:
    speech = "Tonight I say to you that the state of our union is strong, and it will grow stronger."
    index = clean.NgramIndex([speech], n=8)
    assert len(index) == len(clean.words(speech)) - 7
    assert index.overlaps("Friends, THE STATE of our union is strong and it is late.")  # case, punctuation
    assert not index.overlaps("The state of our union is very strong, and it will grow.")  # 7-gram at most
    assert not index.overlaps("Too short to match.")
    assert not clean.NgramIndex([], n=8).overlaps(speech)


def test_normalize() -> None:
    assert clean.normalize("\ufeffa  \r\nb\r\n\r\n\r\n\r\nc\n\n") == "a\nb\n\nc"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab .!?\n\t\u00e9"), max_size=400), st.integers(1, 50))
def test_segment_is_lossless(text: str, target: int) -> None:
    pieces = segment(text, target)
    assert "".join(pieces) == text
    assert all(len(p) >= target for p in pieces[:-1])


def test_segment_prefers_paragraphs_then_sentences() -> None:
    rng = random.Random(0)
    paras = [" ".join(rng.choice(["alpha", "beta", "gamma."]) for _ in range(40)) for _ in range(6)]
    text = "\n\n".join(paras) + "\n\n"
    pieces = segment(text, 100)
    assert pieces == [p + "\n\n" for p in paras]  # each paragraph is longer than 100: cut at every break
    one_line = "Sentence number one is here. " * 40
    pieces = segment(one_line, 100)
    assert len(pieces) > 1 and all(p.endswith(". ") for p in pieces[:-1])
