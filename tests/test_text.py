import pytest
from transformers import AutoTokenizer

from relsum_core.data import Product, load_catalog
from relsum_core.text import PrefixSampler, attributes_text, cut_to_tokens, normalise, product_text
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
