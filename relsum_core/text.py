"""Product text and token budgets: the one rule every ranker, baseline and summary uses.

The rule::

    text = title                                   if the attribute budget is 0 or there are none
    text = title + " | " + attributes[:budget]     otherwise

* ``attributes`` are the bullets, then the description, each line whitespace-normalised (runs of
  spaces, tabs and line breaks inside a line become one space, empty lines dropped) and joined
  with ``"\\n"``.  HTML markup is dropped from titles and attributes alike (entities unescaped,
  tags removed; a description's list items and breaks become lines).
* Budgets count tokens of a given tokenizer (no special tokens).  Cuts fall on token boundaries:
  the text kept ends where the last kept token ends in the original string, so re-tokenising the
  cut text gives no more tokens than the budget.
* The title is kept whole up to its own cap (``title_tokens``, default 64) and does not use the
  attribute budget; the separator does not count either.

A summarizer's output replaces ``attributes`` under the same rule, so a ranker trained on
``title | attribute prefix`` sees the shape it will later score.
"""

from __future__ import annotations

import copy
import functools
import html
import random
import re
import threading
import unicodedata
import weakref
from collections.abc import Sequence

from relsum_core.data import Product

SEPARATOR = " | "
TITLE_TOKENS = 64

_SPACE = re.compile(r"\s+")


# Catalog exports carry HTML: "<ul><li>Pre-seasoned</li>...", "500&deg;F", even escaped twice
# ("&lt;li&gt;").  Only known HTML tags, within one line, count: "Model <X1>", "Input <AC 100-240V,
# output >DC 12V" and "size < 5 in" stay text; and only entities closed by ";": "Pen&notepad" stays.
_HTML_TAGS = ("a|abbr|b|big|blockquote|body|br|center|code|dd|div|dl|dt|em|font|h[1-6]|head|hr|html|i|img|"
              "li|ol|p|pre|s|small|span|strike|strong|sub|sup|table|tbody|td|th|thead|tr|tt|u|ul")
_TAG = re.compile(rf"<!--.*?-->|</?(?:{_HTML_TAGS})(?:\s[^<>\n]*)?/?>", re.I | re.S)
_BLOCK_TAG = re.compile(r"<(?:br|hr|/?(?:p|div|li|ul|ol|tr|table|h[1-6]))(?:\s[^<>\n]*)?/?>", re.I)
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def plain_text(text: str, line_breaks: bool = False) -> str:
    """``text`` without HTML markup: entities unescaped and tags dropped, twice for markup escaped
    twice; ``line_breaks``: block tags (<br>, <p>, <li>, ...) become line breaks, so list items stay
    lines of the attributes.  Plain text comes back as it was."""
    for _ in range(2):
        if "<" not in text and "&" not in text:
            break
        text = _ENTITY.sub(lambda m: html.unescape(m[0]), text)
        if line_breaks:
            text = _BLOCK_TAG.sub("\n", text)
        text = _TAG.sub(" ", text)
    return text


def normalise(text: str) -> str:
    """``text`` as every rule here reads it: HTML markup dropped (:func:`plain_text`), each run of
    whitespace one space."""
    return _SPACE.sub(" ", plain_text(text)).strip()


# Scripts written without spaces between words (Chinese, Japanese kana and kanji): a run of them is
# cut into overlapping character bigrams, as search engines' CJK analyzers do, so that a word matches
# inside the run that holds it.
_UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"  # Thai, Lao, Myanmar, Khmer
             "\u3040-\u30fa\u30fc-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
             "\U00020000-\U0003ffff")  # kana (not the middle dot ・), CJK ideographs of every plane
_UNSPACED_RUN = re.compile(f"[{_UNSPACED}]+")
# Full-width ASCII (U+FF01-FF5E, common in Japanese and Chinese listings: "１７０ｍｍ") as ASCII.  Not
# NFKC: it also turns "SGT™" into the word "sgttm" and "Waist…" into "waist...".
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}


@functools.lru_cache(maxsize=1)
def _combining_marks() -> str:
    """A character class body of the combining marks (Mn, Mc, Me) below U+30000: ``re`` has no
    ``\\p{M}``, and without them Devanagari, vowelled Arabic and a case-folded "İ" fell apart."""
    out, start, prev = [], None, None
    for cp in range(0x30000):
        if unicodedata.category(chr(cp))[0] != "M":
            continue
        if start is not None and cp != prev + 1:
            out.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = None
        start = cp if start is None else start
        prev = cp
    out.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
    return "".join(out)


@functools.lru_cache(maxsize=8)
def _word_pattern(joiners: str) -> re.Pattern:
    letter = f"[^\\W_{_UNSPACED}]"  # a letter or digit of a spaced script
    more = f"(?:{letter}|[{_combining_marks()}{re.escape(joiners)}])*"
    return re.compile(f"[{_UNSPACED}]+|{letter}{more}")


def is_unspaced(word: str) -> bool:
    """Whether ``word`` is of an unspaced script (one of :func:`words`' bigrams, or a lone character)."""
    return bool(_UNSPACED_RUN.fullmatch(word))


def words(text: str, joiners: str = "") -> list[str]:
    """The words of ``text`` in any script, case-folded (full-width letters and digits as ASCII):
    runs of letters and digits, each run of an unspaced script as its character bigrams (a lone
    character as itself).  ``joiners``: characters a word may continue with after its first letter
    or digit ("'./-" keeps "12.5", "3/4", "o'neil").

    Why not ``[a-z0-9]+``: it cut "réglable" to "r", "glable" and found no word at all in Japanese."""
    out = []
    for w in _word_pattern(joiners).findall(
            unicodedata.normalize("NFC", text).translate(_FULL_WIDTH).casefold()):
        if is_unspaced(w):
            out.extend(w[i: i + 2] for i in range(max(1, len(w) - 1)))
        else:
            out.append(w)
    return out


def word_count(text: str) -> int:
    """How many words ``text`` has, for reports: a word of a spaced script counts one ("non-GMO" and
    "12.5" too), each character of an unspaced script one, as word counts of Chinese and Japanese
    text usually go (whitespace splitting counts a whole Japanese sentence as one word).  Thai, Lao,
    Khmer and Myanmar count their letters too (their words need a dictionary); combining marks and
    voicing marks count nothing."""
    runs = _word_pattern("'./-").findall(unicodedata.normalize("NFC", text).translate(_FULL_WIDTH))
    return sum(sum(not unicodedata.category(c).startswith("M") and c not in "\uff9e\uff9f" for c in w)
               if is_unspaced(w) else 1 for w in runs)


def attributes_text(product: Product) -> str:
    """Bullets then description (its HTML list items and breaks as lines), one normalised line each,
    newline-joined."""
    lines = [normalise(b) for b in product.bullets]
    lines += [normalise(line) for line in plain_text(product.description, line_breaks=True).split("\n")]
    return "\n".join(line for line in lines if line)


class _Encoding:
    """ids and character offsets of one text (the slow-tokenizer stand-in for tokenizers.Encoding)."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]):
        self.ids, self.offsets = ids, offsets


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _private_backend(tokenizer):
    """A copy of a fast tokenizer's Rust backend with truncation and padding off, never changed.

    HF's ``tokenizer(...)`` stores its truncation and padding settings on the backend it shares with
    every other caller, so one thread cutting texts (``truncation=True``) would truncate another
    thread's encodings mid-call.  The copy is remade when the tokenizer changes (added tokens, a new
    backend, ``split_special_tokens``), which HF applies per call and a deepcopy does not keep."""
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    key = (len(tokenizer), id(tokenizer.backend_tokenizer), split)
    with _BACKENDS_LOCK:
        hit = _BACKENDS.get(tokenizer)
        if hit is None or hit[0] != key:
            backend = copy.deepcopy(tokenizer.backend_tokenizer)
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = split  # "[SEP]" in text stays text when asked
            hit = _BACKENDS[tokenizer] = (key, backend)
        return hit[1]


def encode_texts(tokenizer, texts: Sequence[str]) -> list:
    """Encodings (``.ids``, ``.offsets`` into the text) without special tokens or truncation, the
    same ids as ``tokenizer(texts, add_special_tokens=False)``; safe to call from several threads on
    one tokenizer."""
    if getattr(tokenizer, "is_fast", False):
        return _private_backend(tokenizer).encode_batch(list(texts), add_special_tokens=False)
    out = []
    for text in texts:  # slow tokenizers keep no per-call state, but give no offsets either
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        out.append(_Encoding(ids, []))
    return out


def cut_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """The longest prefix of ``text`` ending on a token boundary with at most ``max_tokens`` tokens
    when tokenised again (needs a fast tokenizer: it cuts at token offsets)."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if max_tokens == 0 or not text:
        return ""
    backend = _private_backend(tokenizer)
    offsets = backend.encode(text, add_special_tokens=False).offsets
    if len(offsets) <= max_tokens:
        return text
    # Byte-level BPE splits one character (an emoji) into several tokens that all report the whole
    # character's span, so a cut inside it keeps all of them: step back until the budget holds.
    for n in range(max_tokens, 0, -1):
        cut = text[: offsets[n - 1][1]].rstrip()
        if len(backend.encode(cut, add_special_tokens=False).ids) <= max_tokens:
            return cut
    return ""


def join_title(title: str, attributes: str) -> str:
    return f"{title}{SEPARATOR}{attributes}" if attributes else title


def title_text(title: str, tokenizer, title_tokens: int = TITLE_TOKENS) -> str:
    """A title as the ranker reads it: whitespace-normalised and cut to ``title_tokens`` of the
    ranker's tokenizer (``tokenizer=None``: whole)."""
    title = normalise(title)
    return title if tokenizer is None else cut_to_tokens(title, tokenizer, title_tokens)


def product_text(product: Product, tokenizer, attr_tokens: int, title_tokens: int = TITLE_TOKENS) -> str:
    """``title | attributes`` cut to budgets; ``attr_tokens=0`` gives the title alone."""
    title = title_text(product.title, tokenizer, title_tokens)
    return join_title(title, cut_to_tokens(attributes_text(product), tokenizer, attr_tokens))


def summary_text(title: str, summary: str, tokenizer) -> str:
    """What the ranker scores for a product with a summary: ``title | summary``, the title as
    `title_text` reads it (``tokenizer``: the ranker's), the summary whitespace-normalised and whole
    (its budget was the summarizer's).  The reward and ``relsum evaluate`` score exactly this text,
    so a service ranking with relsum's summaries sends it too; an empty summary gives the title."""
    return join_title(title_text(title, tokenizer), normalise(summary))


# A "." only ends a sentence, not 1.5; the ideographic marks end phrases of Chinese and Japanese text.
_PHRASE_BREAK = re.compile(r"[,;:()\[\]|/\n\u2022\u3001\u3002\uff0c\uff1b\uff1a\uff08\uff09\u3010\u3011]+"
                           r"|\.(?=\s|$)| - ")


def attribute_phrases(product: Product, max_words: int = 6) -> list[str]:
    """Short phrases of the bullets and description (split at punctuation), first occurrence of
    each, at most ``max_words`` words: the material a keyword-list summary is made of."""
    seen, out = set(), []
    for part in _PHRASE_BREAK.split(attributes_text(product)):
        phrase = normalise(part)
        n = len(phrase.split())
        if 1 <= n <= max_words and phrase.lower() not in seen:
            seen.add(phrase.lower())
            out.append(phrase)
    return out


class PrefixSampler:
    """Training text: title + a uniformly random prefix of 0..max_attr_tokens attribute tokens.

    Uniform lengths, 0 included, teach the ranker to score a bare title and every budget up to
    the maximum alike.  Each product's title and attributes are tokenised once and cached, so a
    sample costs a slice, not a tokenizer call.

    ``keyword_prob``: the share of samples whose attribute part is instead a keyword list, a random
    selection of the product's attribute phrases (from all of its text) in random order, joined
    with ", " and cut to 1..max_attr_tokens tokens: the shape a trained summary takes, which a
    prefix never shows the ranker.  (A keyword sample does call the tokenizer, to cut the list.)
    """

    def __init__(self, tokenizer, max_attr_tokens: int, title_tokens: int = TITLE_TOKENS, seed: int = 0,
                 keyword_prob: float = 0.0):
        if max_attr_tokens < 0:
            raise ValueError(f"max_attr_tokens must be >= 0, got {max_attr_tokens}")
        if not 0.0 <= keyword_prob <= 1.0:
            raise ValueError(f"keyword_prob must be in [0, 1], got {keyword_prob}")
        self.tokenizer = tokenizer
        self.max_attr_tokens = max_attr_tokens
        self.title_tokens = title_tokens
        self.keyword_prob = keyword_prob
        self.rng = random.Random(seed)
        self._cache: dict[str, tuple[str, str, list[int]]] = {}
        self._phrases: dict[str, list[str]] = {}

    def _parts(self, product: Product) -> tuple[str, str, list[int]]:
        parts = self._cache.get(product.product_id)
        if parts is None:
            title = cut_to_tokens(normalise(product.title), self.tokenizer, self.title_tokens)
            attrs = cut_to_tokens(attributes_text(product), self.tokenizer, self.max_attr_tokens)
            ends = []
            if attrs:
                ends = [end for _, end in encode_texts(self.tokenizer, [attrs])[0].offsets]
            parts = self._cache[product.product_id] = (title, attrs, ends)
        return parts

    def text(self, product: Product, attr_tokens: int) -> str:
        """Same result as ``product_text`` with this sampler's caps, from the cache (for the
        WordPiece tokenizers of BERT rankers; byte-level BPE may keep one more split character)."""
        title, attrs, ends = self._parts(product)
        n = min(attr_tokens, len(ends))
        return join_title(title, attrs[: ends[n - 1]].rstrip() if n > 0 else "")

    def keywords(self, product: Product, attr_tokens: int) -> str:
        """title | a shuffled selection of attribute phrases, cut to ``attr_tokens`` tokens."""
        title = self._parts(product)[0]
        phrases = self._phrases.get(product.product_id)
        if phrases is None:
            phrases = self._phrases[product.product_id] = attribute_phrases(product)
        if not phrases or attr_tokens <= 0:
            return title
        picked = self.rng.sample(phrases, k=self.rng.randint(1, len(phrases)))
        return join_title(title, cut_to_tokens(", ".join(picked), self.tokenizer, attr_tokens))

    def sample(self, product: Product) -> str:
        # The keyword draw only when enabled: default runs keep their random stream (and results).
        if self.keyword_prob and self.max_attr_tokens and self.rng.random() < self.keyword_prob:
            return self.keywords(product, self.rng.randint(1, self.max_attr_tokens))
        return self.text(product, self.rng.randint(0, self.max_attr_tokens))
