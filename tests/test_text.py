import random

import pytest
from transformers import AutoTokenizer

from relsum_core.data import Product, load_catalog
from relsum_core.text import (
    PrefixSampler,
    attribute_phrases,
    attributes_text,
    cut_to_tokens,
    encode_texts,
    normalise,
    product_text,
    summary_text,
    title_text,
    words,
)
from relsum_core.trainers.ranker import default_base


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_base())


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


LONG = Product(
    product_id="x",
    title="  Stainless   steel\tkitchen towel rack ",
    bullets=("Holds six towels\t\tsecurely", "", "Rust-proof   finish"),
    description="Mounts on any wall.\n\n Screws included.",
)


def test_attributes_bullets_then_description_normalised():
    assert attributes_text(LONG) == (
        "Holds six towels securely\nRust-proof finish\nMounts on any wall.\nScrews included."
    )
    assert normalise(" a \n\t b ") == "a b"


def test_zero_budget_is_title_only(tok):
    assert product_text(LONG, tok, 0) == "Stainless steel kitchen towel rack"
    assert product_text(Product("y", "Lamp"), tok, 64) == "Lamp"  # no attributes: no separator


def test_budget_cuts_on_token_boundaries(tok):
    attrs = attributes_text(LONG)
    full = n_tokens(tok, attrs)
    for budget in (1, 3, 5, 8, full - 1):
        text = product_text(LONG, tok, budget)
        title, _, cut = text.partition(" | ")
        assert title == "Stainless steel kitchen towel rack"
        assert attrs.startswith(cut)
        assert n_tokens(tok, cut) == budget
        # the cut keeps exactly the first `budget` tokens of the attributes
        assert tok(cut, add_special_tokens=False)["input_ids"] == tok(attrs, add_special_tokens=False)[
            "input_ids"
        ][:budget]
    assert product_text(LONG, tok, full + 50).endswith("Screws included.")


def test_mid_word_cut_keeps_word_pieces(tok):
    # "unaffordable" is several word pieces; a cut after the first keeps just that piece
    ids = tok("unaffordable", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    cut = cut_to_tokens("unaffordable", tok, 1)
    assert tok(cut, add_special_tokens=False)["input_ids"] == ids[:1]
    with pytest.raises(ValueError):
        cut_to_tokens("x", tok, -1)


def test_title_cap_is_separate_from_attribute_budget(tok):
    p = Product("z", " ".join(["word"] * 100), bullets=("alpha beta gamma",))
    text = product_text(p, tok, 2, title_tokens=10)
    title, _, cut = text.partition(" | ")
    assert n_tokens(tok, title) == 10 and cut == "alpha beta"


def test_sampler_matches_rule_and_covers_range(tok):
    catalog = load_catalog()
    products = list(catalog.values())[:40]
    sampler = PrefixSampler(tok, max_attr_tokens=32, seed=0)
    for p in products:
        for budget in (0, 1, 7, 32):
            assert sampler.text(p, budget) == product_text(p, tok, budget)
    lengths = []
    for _ in range(400):
        text = sampler.sample(LONG)
        _, _, cut = text.partition(" | ")
        lengths.append(n_tokens(tok, cut) if cut else 0)
    full = n_tokens(tok, attributes_text(LONG))
    assert min(lengths) == 0 and max(lengths) == full  # LONG has fewer than 32 tokens
    assert len(set(lengths)) == full + 1
    assert PrefixSampler(tok, 32, seed=3).sample(LONG) == PrefixSampler(tok, 32, seed=3).sample(LONG)


def test_attribute_phrases_split_at_punctuation_not_decimals():
    p = Product("p", "Shoe", bullets=("1.5 inches heel; soft lining", "Soft lining"),
                description="Made in Italy. Leather (full grain) upper - waterproof")
    assert attribute_phrases(p) == ["1.5 inches heel", "soft lining", "Made in Italy", "Leather",
                                    "full grain", "upper", "waterproof"]
    assert attribute_phrases(Product("q", "Only a title")) == []
    long = Product("r", "T", bullets=("one two three four five six seven",))
    assert attribute_phrases(long) == [] and attribute_phrases(long, max_words=7) == [long.bullets[0]]


def test_keyword_samples_are_phrase_lists_within_budget(tok):
    sampler = PrefixSampler(tok, max_attr_tokens=12, seed=0, keyword_prob=1.0)
    phrases = set(attribute_phrases(LONG))
    title = normalise(LONG.title)
    seen_orders = set()
    for _ in range(200):
        text = sampler.sample(LONG)
        head, _, attrs = text.partition(" | ")
        assert head == title and attrs
        assert 1 <= n_tokens(tok, attrs) <= 12
        items = attrs.split(", ")
        assert all(x in phrases for x in items[:-1])  # the last may be cut by the budget
        seen_orders.add(tuple(items))
    assert len(seen_orders) > 10
    # a product without attribute phrases keeps its title
    assert sampler.sample(Product("t", "Just a title")) == "Just a title"
    with pytest.raises(ValueError, match="keyword_prob"):
        PrefixSampler(tok, 12, keyword_prob=1.5)


def test_keyword_prob_zero_keeps_the_random_stream(tok):
    """Default runs draw exactly the prefixes they drew before keyword lists existed."""
    a, b = PrefixSampler(tok, 32, seed=5), PrefixSampler(tok, 32, seed=5, keyword_prob=0.0)
    ref = random.Random(5)
    for _ in range(50):
        n = ref.randint(0, 32)
        assert a.sample(LONG) == b.sample(LONG) == a.text(LONG, n)
    mixed = PrefixSampler(tok, 32, seed=5, keyword_prob=0.5)
    kinds = {", " in mixed.sample(LONG) for _ in range(100)}
    assert kinds == {True, False}


def test_encodings_ignore_truncation_left_on_the_shared_tokenizer(tok):
    # HF's tokenizer(..., truncation=True) leaves truncation set on the backend every caller shares;
    # another thread's call would then come back cut.  relsum encodes with a private backend copy.
    from relsum_core.text import encode_texts

    text = "stainless steel kitchen towel rack with six hooks and screws included"
    want = tok(text, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(3)
    try:
        assert encode_texts(tok, [text])[0].ids == want
        assert n_tokens(tok, cut_to_tokens(text, tok, 8)) == 8
    finally:
        tok.backend_tokenizer.no_truncation()


def _byte_level_bpe():
    """A small byte-level BPE tokenizer (GPT-2 style): unlike the ranker's WordPiece it has tokens
    for single bytes and for whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["red shoe blue towel steel rack"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def test_byte_level_bpe_cut_inside_a_character_stays_within_budget():
    # Byte-level BPE splits an unseen multi-byte character into byte tokens that all report the
    # whole character's span; cutting after one of them must not keep the others.
    fast = _byte_level_bpe()
    text = "a\u2764b shoe"
    assert len(fast(text, add_special_tokens=False)["input_ids"]) > 4  # the heart is 3 byte tokens
    for k in range(1, 8):
        cut = cut_to_tokens(text, fast, k)
        assert text.startswith(cut)
        assert len(fast(cut, add_special_tokens=False)["input_ids"]) <= k, (k, cut)
    assert cut_to_tokens(text, fast, 1) == "a" and cut_to_tokens(text, fast, 2) == "a"


def test_encodings_follow_split_special_tokens_and_added_tokens():
    from tokenizers import AddedToken

    from relsum_core.text import encode_texts

    split = AutoTokenizer.from_pretrained(default_base(), split_special_tokens=True)
    text = "usb [SEP] cable"
    assert encode_texts(split, [text])[0].ids == split(text, add_special_tokens=False)["input_ids"]
    tok = AutoTokenizer.from_pretrained(default_base())
    hf = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert encode_texts(tok, ["zzqx cable"])[0].ids == hf("zzqx cable")
    tok.add_tokens([AddedToken("zzqx", normalized=False)])  # after a first encoding: the copy is remade
    assert encode_texts(tok, ["zzqx cable"])[0].ids == hf("zzqx cable")
    assert encode_texts(tok, ["zzqx cable"])[0].ids[0] == len(tok) - 1


def test_summary_text_is_the_cut_title_and_the_normalised_whole_summary(tok):
    from relsum_core.text import TITLE_TOKENS

    title = "  Red\trunning " + " ".join(f"shoe{i}" for i in range(80))
    cut = title_text(title, tok)
    assert n_tokens(tok, cut) == TITLE_TOKENS and cut.startswith("Red running shoe0")
    assert title_text(title, None) == " ".join(title.split())  # no tokenizer: whole
    summary = "breathable   mesh,\n" + " ".join(["size 10"] * 80)  # longer than any budget: kept whole
    assert summary_text(title, summary, tok) == f"{cut} | {' '.join(summary.split())}"
    assert summary_text(title, " \n ", tok) == cut  # an empty (skipped) summary: the title alone
    title_only = "Stainless steel kitchen towel rack"
    assert product_text(LONG, tok, 0) == summary_text(LONG.title, "", tok) == title_only


def test_words_of_any_script():
    from relsum_core.text import words

    assert words("The 2 Stainless-steel bottles, for kids!") == ["the", "2", "stainless", "steel", "bottles",
                                                                  "for", "kids"]
    assert words("12.5 oz. 3/4 in O'Neil", "'./-") == ["12.5", "oz.", "3/4", "in", "o'neil"]
    assert words("Électrique rétro Weiß") == ["électrique", "rétro", "weiss"]
    assert words("ＳＧＴ™ Waist… １７０ｍｍ") == ["sgt", "waist", "170mm"]  # full-width as ASCII, ™ dropped
    bigrams = "高品 品質 質ス ステ テン ンレ レス".split()
    assert words("包丁 高品質ステンレス 鍋") == ["包丁", *bigrams, "鍋"]
    assert words("snake_case") == ["snake", "case"] and words("") == []
    # combining marks stay inside their word (Devanagari vowel signs, Arabic vowels, a folded "İ")
    assert words("स्टील की कड़ाही") == ["स्टील", "की", "कड़ाही"] and words("مِقْلاة حديد") == ["مِقْلاة", "حديد"]
    assert words("İzmir") == ["i\u0307zmir"]
    assert words("กระทะ 28") == ["กร", "ระ", "ะท", "ทะ", "28"]  # Thai is written without spaces too
    assert words("キッチン・タオル") == ["キッ", "ッチ", "チン", "タオ", "オル"]  # the middle dot splits


def test_word_count_counts_characters_of_unspaced_scripts():
    from relsum_core.text import word_count

    assert word_count("Taurine, non-GMO, chicken bone broth") == 5
    assert word_count("2 x 12.5 oz. cans & lids") == 6  # "&" is no word
    assert word_count("鶏ガラスープ、無添加") == 9  # one per character: whitespace saw one word
    assert word_count("ｆｕｌｌ ＡＢＣ réglable") == 3 and word_count(" \n") == 0
    # marks count nothing: Thai tone and vowel marks, half-width voicing marks; the middle dot splits
    assert word_count("ไม่มี") == 3 and word_count("ｶﾞﾗｽ") == 3 and word_count("キッチン・タオル") == 7
    assert word_count("\U00020000\U00020001") == 2  # ideographs beyond the first plane


def test_html_markup_is_dropped_from_titles_and_attributes(tok):
    from relsum_core.text import plain_text

    assert normalise("Tom &amp; Jerry <b>bold</b> 107&rdquo; size < 5 in <3 AT&T") == (
        "Tom & Jerry bold 107\u201d size < 5 in <3 AT&T")
    p = Product("x", "Skillet &amp; lid", bullets=("<b>Cast</b> iron",),
                description="<div><ul><li>Pre-seasoned</li><li>Oven safe to 500&deg;F</li></ul></div>"
                            "<p>&lt;ul&gt;&lt;li&gt;escaped twice&lt;/li&gt;&lt;/ul&gt;</p>")
    assert attributes_text(p) == "Cast iron\nPre-seasoned\nOven safe to 500\u00b0F\nescaped twice"
    assert product_text(p, tok, 0) == "Skillet & lid"
    assert product_text(p, tok, 2) == "Skillet & lid | Cast iron"
    plain = "Plain text, 2 < 3 & nothing else"
    assert plain_text(plain) == plain == normalise(plain)
    # text that only looks like markup stays: unknown tags, a tag across lines, entities without ";"
    for text in ("Fits Model <X1> and <X2>", "Input <AC 100-240V, output >DC 12V", "USB-C&micro cable",
                 "Pen&notepad set", "Safe for kids <age 3\nand pets >10 lb", "<b bold"):
        assert plain_text(text, line_breaks=True) == text
    assert plain_text("a<br/>b<BR>c<p class='x'>d<!-- note -->e", line_breaks=True) == "a\nb\nc\nd e"
    assert plain_text("&#176;&#xB0;&deg;") == "\u00b0" * 3


def test_markup_escaped_twice_is_dropped():
    # one unescape only gets to "&lt;b&gt;Cast&lt;/b&gt; iron": the tags need a second pass
    assert normalise("&amp;lt;b&amp;gt;Cast&amp;lt;/b&amp;gt; iron") == "Cast iron"


def test_words_read_decomposed_accents_as_composed():
    # "é" typed as e + U+0301 is the same word as the precomposed "é"
    assert words("Re\u0301glable") == words("Réglable") == ["réglable"]


def test_combining_marks_outside_the_bmp_stay_in_their_word():
    # a Brahmi vowel sign (U+11038, a mark above U+FFFF) between two Brahmi letters
    assert words("\U00011013\U00011038\U00011013") == ["\U00011013\U00011038\U00011013"]


def test_a_cut_after_a_whitespace_token_drops_the_whitespace():
    # byte-level BPE makes "\n" a token of its own, so the first two tokens of "red\nshoe" end in a
    # line break that a "title | attributes" text must not carry
    assert cut_to_tokens("red\nshoe", _byte_level_bpe(), 2) == "red"


def test_sampler_rejects_a_negative_budget_or_keyword_share(tok):
    with pytest.raises(ValueError, match="max_attr_tokens"):
        PrefixSampler(tok, -1)
    with pytest.raises(ValueError, match="keyword_prob"):
        PrefixSampler(tok, 8, keyword_prob=-0.1)


def test_truncation_and_padding_set_before_the_first_encoding_are_not_copied(tok):
    # the private backend copy is made at the first encoding; truncation or padding already on the
    # shared tokenizer then must not come along into the copy
    fresh = AutoTokenizer.from_pretrained(default_base())
    text = "stainless steel kitchen towel rack with six hooks and screws included"
    want = tok(text, add_special_tokens=False)["input_ids"]
    fresh.backend_tokenizer.enable_truncation(3)
    fresh.backend_tokenizer.enable_padding(length=40)
    assert encode_texts(fresh, [text])[0].ids == want
    assert n_tokens(tok, cut_to_tokens(text, fresh, 8)) == 8


def test_private_backend_follows_split_special_tokens_set_after_first_use():
    fresh = AutoTokenizer.from_pretrained(default_base())
    text = "usb [SEP] cable"
    assert encode_texts(fresh, [text])[0].ids == fresh(text, add_special_tokens=False)["input_ids"]
    fresh.split_special_tokens = True  # after a first encoding: the copy must be remade
    assert encode_texts(fresh, [text])[0].ids == fresh(text, add_special_tokens=False)["input_ids"]
