"""The static sampling engine (relsum_core.decode) against the dynamic loop, on CPU.

The CUDA-graph branch cannot run here; its captured function, `StaticEngine.step`, is exactly what
the eager static path runs, so these comparisons cover it up to capture, and a forced capture on
CPU checks the warn-and-fall-back path."""

import pytest
import torch

from relsum_core import decode
from relsum_core.data import Product
from relsum_core.policy import build_prompt, load_policy, resolve_engine, sample, sample_ids


def _tiny_llama(impl="sdpa", vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval()


def _left_padded(lengths, P=11, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), P), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : P - n] = 0
        mask[i, : P - n] = 0
    return ids, mask


@pytest.fixture(autouse=True)
def _fresh_engines():
    yield
    decode._ENGINES.clear()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_static_greedy_matches_dynamic_with_left_padding_and_stops(impl, one_thread):
    model = _tiny_llama(impl)
    ids, mask = _left_padded([11, 3, 7, 1])
    kw = dict(pad_id=0, max_new_tokens=10, temperature=0.0)
    free = sample_ids(model, ids, mask, stop_ids=[], engine="dynamic", **kw)
    # Stops taken from the free run so rows end at different steps (one at step 0 where possible).
    stops = sorted({int(free.completion_ids[0, 2]), int(free.completion_ids[1, 0])})
    dyn = sample_ids(model, ids, mask, stop_ids=stops, engine="dynamic", **kw)
    sta = sample_ids(model, ids, mask, stop_ids=stops, engine="static", **kw)
    assert torch.equal(sta.completion_ids, dyn.completion_ids)
    assert torch.equal(sta.completion_mask, dyn.completion_mask)
    assert sta.completion_mask.dtype == dyn.completion_mask.dtype
    assert int(dyn.completion_mask[1].sum()) == 1 and bool((dyn.completion_mask.sum(1) < 10).any())
    assert torch.equal(sta.prompt_ids, ids) and torch.equal(sta.prompt_mask, mask)
    # No stop at all: both run the full budget.
    assert torch.equal(sample_ids(model, ids, mask, stop_ids=[], engine="static", **kw).completion_ids,
                       free.completion_ids)
    # The pad id as the stop id (load_policy pads with EOS): the stop token still counts as generated.
    kw["pad_id"] = stops[0]
    dyn = sample_ids(model, ids, mask, stop_ids=stops, engine="dynamic", **kw)
    sta = sample_ids(model, ids, mask, stop_ids=stops, engine="static", **kw)
    assert torch.equal(sta.completion_mask, dyn.completion_mask)
    n = sta.completion_mask.sum(1)
    early = (n < 10).nonzero().flatten().tolist()
    assert early and all(int(sta.completion_ids[r, n[r] - 1]) in stops for r in early)


def test_all_rows_stopping_early_trims_width_like_dynamic(one_thread):
    model = _tiny_llama()
    ids, mask = _left_padded([5, 5], P=5)
    kw = dict(pad_id=0, max_new_tokens=20, temperature=0.0)
    free = sample_ids(model, ids, mask, stop_ids=[], engine="dynamic", **kw)
    stops = [int(free.completion_ids[0, 1]), int(free.completion_ids[1, 2])]
    dyn = sample_ids(model, ids, mask, stop_ids=stops, engine="dynamic", **kw)
    sta = sample_ids(model, ids, mask, stop_ids=stops, engine="static", **kw)
    assert dyn.completion_ids.shape[1] < 20
    assert torch.equal(sta.completion_ids, dyn.completion_ids) and torch.equal(sta.completion_mask,
                                                                               dyn.completion_mask)


def test_static_sample_with_tokenizer_matches_dynamic_greedy(tiny_policy_dir, one_thread):
    model, tok = load_policy(tiny_policy_dir)
    prompts = [build_prompt(Product(product_id="a", title="dog food", description="", bullets=[]), tok),
               build_prompt(Product(product_id="b", title="steel water bottle kids", description="",
                                    bullets=["organic chicken", "pack"]), tok)]
    dyn = sample(model, tok, prompts, max_new_tokens=6, temperature=0.0, engine="dynamic")
    sta = sample(model, tok, prompts, max_new_tokens=6, temperature=0.0, engine="static")
    assert torch.equal(sta.completion_ids, dyn.completion_ids) and sta.texts == dyn.texts
    assert resolve_engine(model, "auto") == "dynamic"  # CPU: auto keeps today's loop


def test_static_sampling_is_deterministic_and_rows_are_batch_independent(one_thread):
    model = _tiny_llama()
    ids, mask = _left_padded([9, 4, 6, 2])
    kw = dict(stop_ids=[5], pad_id=0, max_new_tokens=12, temperature=1.0, top_p=0.9, engine="static")
    a = sample_ids(model, ids, mask, seed=7, **kw)
    b = sample_ids(model, ids, mask, seed=7, **kw)
    c = sample_ids(model, ids, mask, seed=8, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    full = sample_ids(model, ids, mask, seed=[11, 12, 13, 14], **kw)
    tail = sample_ids(model, ids[2:], mask[2:], seed=[13, 14], **kw)
    for i in (2, 3):
        n = int(full.completion_mask[i].sum())
        assert torch.equal(full.completion_ids[i, :n], tail.completion_ids[i - 2, :n])
    # under the global RNG without a seed: reproducible by torch.manual_seed
    torch.manual_seed(3)
    x = sample_ids(model, ids, mask, **kw)
    torch.manual_seed(3)
    assert torch.equal(x.completion_ids, sample_ids(model, ids, mask, **kw).completion_ids)


def test_an_int_seed_gives_every_row_its_own_key():
    keys = decode.row_keys(123, 4)
    assert len({tuple(k) for k in keys.tolist()}) == 4
    assert torch.equal(keys, decode.row_keys(123, 4)) and not torch.equal(keys, decode.row_keys(124, 4))


def test_hashed_sampler_follows_the_distribution_and_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4)
    keys = decode.row_keys(list(range(n)), n)
    step = torch.zeros(1, dtype=torch.long)
    freq = torch.bincount(decode.sample_from_logits(logits, 1.0, 1.0, keys, step), minlength=4) / n
    assert torch.allclose(freq, probs, atol=0.015)
    draws = decode.sample_from_logits(logits, 1.0, 0.7, keys, step)
    freq = torch.bincount(draws, minlength=4) / n
    assert set(draws.tolist()) == {0, 1} and abs(float(freq[0]) - 0.625) < 0.015  # 0.5/(0.5+0.3)
    # successive steps are fresh draws, and a row's uniform depends only on its key and the step
    u1, u2 = decode.row_uniforms(keys, step), decode.row_uniforms(keys, step + 1)
    assert abs(float((u1 * u2).mean()) - 0.25) < 0.01
    assert torch.equal(decode.row_uniforms(keys[5:9], step), u1[5:9])
    assert float(u1.min()) >= 0.0 and float(u1.max()) < 1.0
    # a peaked distribution never yields a zero-probability token
    one_hot = torch.full((n, 4), -float("inf"))
    one_hot[:, 2] = 0.0
    assert bool((decode.sample_from_logits(one_hot, 1.0, 1.0, keys, step) == 2).all())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_hashed_sampler_follows_the_tempered_distribution(temperature):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    keys = decode.row_keys(list(range(n)), n)
    draws = decode.sample_from_logits(probs.log().expand(n, 4), temperature, 1.0, keys,
                                      torch.zeros(1, dtype=torch.long))
    want = torch.softmax(probs.log() / temperature, dim=0)  # T 0.5 sharpens, T 2 flattens
    assert torch.allclose(torch.bincount(draws, minlength=4) / n, want, atol=0.015)


def test_resident_engine_is_reused_across_calls_and_nearby_prompt_lengths(one_thread):
    model = _tiny_llama()
    ids, mask = _left_padded([9, 4], P=9)
    kw = dict(stop_ids=[], pad_id=0, max_new_tokens=5, temperature=0.0, engine="static")
    first = sample_ids(model, ids, mask, **kw)
    engine = decode._ENGINES[model]
    again = sample_ids(model, ids[:, 2:], mask[:, 2:], **kw)  # P 7 -> same 16-column bucket
    assert decode._ENGINES[model] is engine
    assert torch.equal(first.completion_ids, again.completion_ids)
    sample_ids(model, ids, mask, **{**kw, "max_new_tokens": 6})
    assert decode._ENGINES[model] is not engine  # a new shape gets a new engine
    decode.release(model)
    assert model not in decode._ENGINES


@pytest.mark.parametrize("compile_step", [False, True])
def test_resident_engine_does_not_keep_its_model_alive(compile_step):
    # _ENGINES is keyed weakly by the model; an engine holding the model strongly (as a compiled
    # module of it did) keeps the key, its KV cache and its graph alive forever.  The compiled step
    # itself (same tokens as eager, checked by hand on CPU: 41 s to compile) is not run here.
    import gc
    import weakref

    model = _tiny_llama()
    decode._ENGINES[model] = decode.StaticEngine(model, batch=2, prompt_len=16, max_new_tokens=4,
                                                 temperature=0.0, top_p=1.0, stop_ids=[1], pad_id=0,
                                                 use_graph=False, compile_step=compile_step)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and len(decode._ENGINES) == 0


def test_failed_graph_capture_warns_and_decodes_eagerly(one_thread):
    # On CPU there is no CUDA stream, so a forced capture fails: one warning, same tokens.
    model = _tiny_llama()
    ids, mask = _left_padded([6, 3])
    kw = dict(stop_ids=[], pad_id=0, max_new_tokens=6, temperature=0.0, seed=None)
    ref = sample_ids(model, ids, mask, engine="dynamic", **{k: v for k, v in kw.items() if k != "seed"})
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        tokens, live = decode.static_sample_ids(model, ids, mask, top_p=1.0, use_graph=True, **kw)
    assert torch.equal(tokens, ref.completion_ids) and torch.equal(live, ref.completion_mask)


def test_bad_input(one_thread):
    model = _tiny_llama()
    ids, mask = _left_padded([3, 2])
    kw = dict(stop_ids=[1], pad_id=0)
    for engine in ("dynamic", "static"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            sample_ids(model, ids, mask, max_new_tokens=0, engine=engine, **kw)
        with pytest.raises(ValueError, match="no prompts"):
            sample_ids(model, ids[:0], mask[:0], engine=engine, **kw)
        with pytest.raises(ValueError, match="no tokens"):
            sample_ids(model, ids, torch.zeros_like(mask), engine=engine, **kw)
        with pytest.raises(ValueError, match="seeds for"):
            sample_ids(model, ids, mask, seed=[1, 2, 3], engine=engine, **kw)
        with pytest.raises(ValueError, match="top_p"):
            sample_ids(model, ids, mask, top_p=0.0, engine=engine, **kw)
    with pytest.raises(ValueError, match="engine must be"):
        sample_ids(model, ids, mask, engine="fast", **kw)
    with pytest.raises(ValueError, match="does not match"):
        sample_ids(model, ids, mask[:, 1:], **kw)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="not available"):
        sample_ids(model, ids, mask, engine="static", **kw)
    assert resolve_engine(model, "auto") == "dynamic"


def test_alibi_models_are_left_to_the_dynamic_engine():
    """Bloom and ALiBi Falcon build their slopes from a 2-D padding mask: the static engine's 4-D
    mask fails inside them, so auto must not pick it and an explicit static is refused clearly."""
    import transformers as T

    for cfg in (T.BloomConfig(vocab_size=60, hidden_size=32, n_layer=2, n_head=4),
                T.FalconConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               alibi=True)):
        model = T.AutoModelForCausalLM.from_config(cfg).eval()
        assert "ALiBi" in decode.static_unsupported_reason(model)
        with pytest.raises(ValueError, match="engine='static' is not available for this model"):
            resolve_engine(model, "static")
        ids = torch.randint(3, 60, (2, 5))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        r = sample_ids(model, ids, mask, stop_ids=[], pad_id=0, max_new_tokens=3, temperature=0.0)
        assert r.completion_ids.shape == (2, 3)
    rotary = T.FalconConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    falcon = T.AutoModelForCausalLM.from_config(rotary)
    assert decode.static_unsupported_reason(falcon) is None  # rotary Falcon keeps the static engine


def test_hashed_sampler_takes_the_nucleus_of_the_tempered_distribution_of_unsorted_logits():
    # Unsorted logits: the nucleus must be mapped back through the sort.  T=2 flattens
    # [.05, .3, .15, .5] to ~[.12, .29, .21, .38]: top_p 0.7 then keeps tokens 3, 1 and 2
    # (nucleus taken before tempering would keep only 3 and 1).
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])
    n = 20000
    keys = decode.row_keys(list(range(n)), n)
    step = torch.zeros(1, dtype=torch.long)
    draws = decode.sample_from_logits(probs.log().expand(n, 4), 2.0, 0.7, keys, step)
    want = torch.softmax(probs.log() / 2.0, dim=0)
    want[0] = 0.0
    want /= want.sum()
    assert set(draws.tolist()) == {1, 2, 3}
    assert torch.allclose(torch.bincount(draws, minlength=4) / n, want, atol=0.015)


def test_greedy_ties_go_to_the_first_token_in_both_engines():
    from relsum_core.policy import _next_token

    logits = torch.zeros(2, 5)
    logits[1, [1, 3]] = 1.0
    keys, step = decode.row_keys([1, 2], 2), torch.zeros(1, dtype=torch.long)
    assert decode.sample_from_logits(logits, 0.0, 1.0, keys, step).tolist() == [0, 1]
    assert _next_token(logits, 0.0, 1.0, None).tolist() == [0, 1]


def test_a_zero_uniform_never_picks_a_leading_zero_probability_token(monkeypatch):
    # u = 0 is a possible draw (1 in 2**24): CDF inversion must skip tokens with no mass.
    monkeypatch.setattr(decode, "row_uniforms", lambda keys, step: torch.zeros(keys.shape[0], 1))
    logits = torch.tensor([[-float("inf"), 0.0, 0.0], [0.0, -float("inf"), 1.0]])
    keys, step = decode.row_keys([1, 2], 2), torch.zeros(1, dtype=torch.long)
    assert decode.sample_from_logits(logits, 1.0, 1.0, keys, step).tolist() == [1, 0]
    assert decode.sample_from_logits(logits, 1.0, 0.9, keys, step).tolist() == [1, 2]


def test_a_resident_engine_gives_what_a_fresh_one_gives(one_thread):
    # Reused buffers (tokens, live, done, cache) must not leak from one call into the next: a call
    # that runs the whole budget, then one that stops after the first "all done" check (so later
    # columns are never rewritten), then rows that stop at different steps.
    model = _tiny_llama()
    ids, mask = _left_padded([11, 4], P=11)
    kw = dict(pad_id=0, max_new_tokens=20, temperature=0.0)
    free = sample_ids(model, ids, mask, stop_ids=[], engine="dynamic", **kw)
    stops = [int(free.completion_ids[0, 1])]
    assert stops[0] not in free.completion_ids[1].tolist()  # row 1 never stops, row 0 at step <= 1
    long, short = (ids[[1, 1]], mask[[1, 1]]), (ids[[0, 0]], mask[[0, 0]])
    engine = None
    for i, m in [long, short, (ids, mask), long, (ids.flip(0), mask.flip(0))]:
        want = sample_ids(model, i, m, stop_ids=stops, engine="dynamic", **kw)
        got = sample_ids(model, i, m, stop_ids=stops, engine="static", **kw)
        engine = engine or decode._ENGINES[model]
        assert decode._ENGINES[model] is engine  # the same resident engine every time
        assert torch.equal(got.completion_ids, want.completion_ids)
        assert torch.equal(got.completion_mask, want.completion_mask)


def _sharp_model(family):
    """A tiny model with large random weights: unlike the default 0.02 init (near-uniform attention,
    a model that repeats one token), its greedy tokens depend on every position id."""
    import transformers as T

    torch.manual_seed(0)
    if family == "gpt2":  # learned absolute positions: a constant shift of a row's positions shows too
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                           initializer_range=0.5, bos_token_id=1, eos_token_id=1)
        cfg._attn_implementation = "sdpa"
        return T.GPT2LMHeadModel(cfg).eval()
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        initializer_range=0.5)
    cfg._attn_implementation = "sdpa"
    return T.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_both_engines_match_each_prompt_decoded_alone_without_a_cache(family, one_thread):
    # The reference: every row alone, unpadded, its whole sequence recomputed each step (no cache, no
    # position ids).  Left padding, prefill positions and decode positions must all leave it unchanged.
    model = _sharp_model(family)
    ids, mask = _left_padded([11, 3, 7, 1])
    n = 8
    want = []
    with torch.no_grad():
        for row, m in zip(ids, mask):
            x = row[m.bool()][None]
            for _ in range(n):
                x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
            want.append(x[0, -n:])
    want = torch.stack(want)
    assert len(set(want.flatten().tolist())) > 8  # a model whose tokens depend on the context
    for engine in ("dynamic", "static"):
        got = sample_ids(model, ids, mask, stop_ids=[], pad_id=0, max_new_tokens=n, temperature=0.0,
                         engine=engine)
        assert torch.equal(got.completion_ids, want), engine


def test_top_p_keeps_the_smallest_prefix_reaching_it_in_both_engines():
    """[.5, .25, .25] with top_p .75: the first two tokens reach it exactly, so the third is out (as
    HF's TopPLogitsWarper); a nucleus rule of `mass before > top_p` kept it."""
    from relsum_core.policy import _next_token

    logits = torch.tensor([[0.5, 0.25, 0.25]]).log().expand(4000, 3)
    keys, step = decode.row_keys(list(range(4000)), 4000), torch.zeros(1, dtype=torch.long)
    assert set(decode.sample_from_logits(logits, 1.0, 0.75, keys, step).tolist()) == {0, 1}
    assert set(_next_token(logits, 1.0, 0.75, torch.Generator().manual_seed(0)).tolist()) == {0, 1}
    # just past the boundary the third token is in the nucleus again
    assert set(decode.sample_from_logits(logits, 1.0, 0.76, keys, step).tolist()) == {0, 1, 2}
