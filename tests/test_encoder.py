"""Packed BERT encoder against Hugging Face's padded forward, one sequence at a time."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from relsum_core.encoder import PackedBertEncoder
from relsum_kernels.varlen_attention import CONFIG_CANDIDATES

from conftest import impl_device, triton_device


def tiny_model(**overrides) -> BertForSequenceClassification:
    cfg = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=96, max_position_embeddings=512, num_labels=1)
    cfg.update(overrides)
    model = BertForSequenceClassification(BertConfig(**cfg)).eval()
    model.set_attn_implementation("eager")
    # Random LayerNorm/bias values, so a mis-wired parameter cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def spread_model() -> BertForSequenceClassification:
    """tiny_model with weights and biases large enough that its scores spread ~0.2 and dropping any
    one bias moves them by >= 0.06, well past bf16's rounding (~4e-3): bf16 tolerances can then
    catch a mis-wired parameter (at the default init they could not)."""
    model = tiny_model(initializer_range=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def packed_inputs(lens, vocab=120, split=None):
    seqs = [torch.randint(1, vocab, (n,)) for n in lens]
    types = []
    for n in lens:
        k = max(1, n // 3) if split is None else split
        k = min(k, n)
        types.append(torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(n - k, dtype=torch.long)]))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    pos = torch.cat([torch.arange(n) for n in lens])
    return seqs, types, torch.cat(seqs), torch.cat(types), pos, cu


def hf_scores(model, seqs, types):
    with torch.no_grad():
        out = [model(input_ids=s[None], token_type_ids=t[None]).logits[:, 0] for s, t in zip(seqs, types)]
    return torch.cat(out)


@pytest.mark.parametrize("lens", [[1], [7], [1, 2, 17, 64, 3, 128, 5], [512, 31, 200]])
def test_packed_matches_hf_per_sequence(lens):
    _check_against_hf(lens, "auto")


# "torch" / "triton" run the CUDA wiring (bias fused into the epilogue kernels): on CPU, Triton through
# its interpreter; with CUDA, on the GPU for real.  "auto" on CPU is the addmm-fused torch formulation.
@pytest.mark.parametrize("fused", [(False, False, False), (True, False, False), (False, True, False),
                                   (True, True, False), (False, False, True), (False, True, True)],
                         ids=["cublas", "ffn_linear_gelu", "dense_ln", "both_gemms", "fused_ffn",
                              "fused_ffn_dense_ln"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_kernel_wiring_matches_hf(impl, fused):
    _check_against_hf([1, 33, 70, 2], impl, device=impl_device(impl),
                      fused_ffn_up=fused[0], fused_dense_ln=fused[1], fused_ffn=fused[2])


def test_fused_ffn_runs_where_it_fits(monkeypatch):
    """The one-kernel FFN replaces the two GEMMs when asked, on the kernel path, for GELU and
    H <= 512; otherwise the encoder keeps the two-GEMM path (and still matches HF)."""
    import relsum_core.encoder as encoder_module

    calls = []
    real = encoder_module.K.fused_ffn
    monkeypatch.setattr(encoder_module.K, "fused_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    _check_against_hf([3, 9], "triton", device=triton_device(), fused_ffn=True)
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(encoder_module, "FUSED_FFN_MAX_HIDDEN", 32)  # the tiny model's H is 64
    _check_against_hf([3, 9], "triton", device=triton_device(), fused_ffn=True)
    assert len(calls) == 2


def test_attention_config_reaches_the_kernel():
    """The one-key-tile attention (a sweep candidate), chosen through the encoder, matches HF."""
    _check_against_hf([1, 33, 70, 2], "triton", device=triton_device(),
                      attention_config=CONFIG_CANDIDATES["short_m64_h4_w4"])


def test_attention_config_takes_a_candidate_name_and_refuses_a_bad_one_when_set():
    enc = PackedBertEncoder.from_hf(tiny_model())
    enc.attention_config = "short_m64_h4_w4"
    assert enc.attention_config == CONFIG_CANDIDATES["short_m64_h4_w4"]
    assert enc.kernel_choices()[-1] == tuple(sorted(CONFIG_CANDIDATES["short_m64_h4_w4"].items()))
    with pytest.raises(ValueError, match="unknown attention config 'short'"):
        enc.attention_config = "short"
    assert enc.attention_config == CONFIG_CANDIDATES["short_m64_h4_w4"]  # a refused value changes nothing
    enc.attention_config = None
    assert enc.attention_config is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [(False, False, False), (True, True, False), (False, True, True)],
                         ids=["cublas", "fused_gemms", "fused_ffn"])
def test_cuda_auto_path_matches_hf(fused):
    _check_against_hf([1, 2, 17, 64, 3, 128, 5, 512], "auto", device="cuda", fused_ffn_up=fused[0],
                      fused_dense_ln=fused[1], fused_ffn=fused[2])


def _check_against_hf(lens, impl, device="cpu", fused_ffn_up=False, fused_dense_ln=False, fused_ffn=False,
                      attention_config=None):
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    enc = PackedBertEncoder.from_hf(model.to(device))
    enc.impl = impl
    enc.fused_ffn_up = fused_ffn_up
    enc.fused_dense_ln = fused_dense_ln
    enc.fused_ffn = fused_ffn
    enc.attention_config = attention_config
    seqs, types, ids, tt, pos, cu = packed_inputs(lens)
    with torch.inference_mode():
        got = enc(ids.to(device), tt.to(device), pos.to(device), cu.to(device), max(lens)).cpu()
    ref = hf_scores(ref_model, seqs, types)
    assert got.dtype == torch.float32 and got.shape == (len(lens),)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn_linear", "addmm"])
def test_bf16_cpu_inference_follows_fp32(monkeypatch, onednn):
    """bf16 on CPU: oneDNN's fused linear (bias + GELU / residual in the GEMM) or addmm, both near
    the fp32 HF scores and near each other; with gradients on, always addmm."""
    import relsum_core.encoder as encoder_module

    if onednn and not encoder_module._probe_onednn_linear():
        pytest.skip("this torch has no working oneDNN fused linear")
    monkeypatch.setattr(encoder_module, "_ONEDNN_LINEAR", onednn)
    fits, taken = encoder_module._onednn_fits, []
    monkeypatch.setattr(encoder_module, "_onednn_fits", lambda *a: taken.append(fits(*a)) or taken[-1])
    model = spread_model()
    lens = [1, 2, 17, 64, 3, 128, 5]
    seqs, types, ids, tt, pos, cu = packed_inputs(lens)
    ref = hf_scores(copy.deepcopy(model), seqs, types)
    enc = PackedBertEncoder.from_hf(model.to(torch.bfloat16))
    with torch.inference_mode():
        got = enc(ids, tt, pos, cu, max(lens))
    assert got.dtype == torch.float32
    # bf16 rounding moves the scores (spread ~0.2) by ~4e-3; a dropped bias by >= 0.06
    torch.testing.assert_close(got, ref, rtol=0, atol=1.5e-2)
    assert len(taken) == 4 * 2 and all(t == onednn for t in taken)  # QKV, output, FFN up and down
    taken.clear()
    # the same batch with gradients, after the inference forward (which must not leak its tensors)
    enc(ids, tt, pos, cu, max(lens)).sum().backward()
    assert taken and not any(taken)


def test_onednn_probe_turns_a_changed_private_op_down(monkeypatch):
    import relsum_core.encoder as encoder_module

    def changed(*args):  # a torch whose private op no longer takes these arguments
        raise RuntimeError("mkldnn::_linear_pointwise() expected 7 arguments")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", changed, raising=False)
    assert encoder_module._probe_onednn_linear() is False
    monkeypatch.setattr(encoder_module, "_ONEDNN_LINEAR", None)
    model = spread_model()
    seqs, types, ids, tt, pos, cu = packed_inputs([6, 20])
    ref = hf_scores(copy.deepcopy(model), seqs, types)
    with torch.inference_mode():  # bf16 scoring still works, through addmm
        got = PackedBertEncoder.from_hf(model.to(torch.bfloat16))(ids, tt, pos, cu, 20)
    torch.testing.assert_close(got, ref, rtol=0, atol=1.5e-2)
    assert encoder_module._ONEDNN_LINEAR is False


def test_scores_do_not_depend_on_batch_neighbours():
    model = tiny_model()
    enc = PackedBertEncoder.from_hf(model)
    lens = [40, 9, 77]
    _, _, ids, tt, pos, cu = packed_inputs(lens)
    with torch.inference_mode():
        together = enc(ids, tt, pos, cu, 77)
        alone = enc(ids[40:49], tt[40:49], pos[40:49], torch.tensor([0, 9], dtype=torch.int32), 9)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)


def test_fused_qkv_cache_follows_weight_updates():
    model = tiny_model()
    enc = PackedBertEncoder.from_hf(model)
    seqs, types, ids, tt, pos, cu = packed_inputs([12, 30])
    with torch.inference_mode():
        before = enc(ids, tt, pos, cu, 30)
    with torch.no_grad():
        v = model.bert.encoder.layer[1].attention.self.value.weight
        v.add_(torch.randn_like(v))
    with torch.inference_mode():
        after = enc(ids, tt, pos, cu, 30)
    assert (after - before).abs().max() > 1e-4  # the edit must be seen...
    torch.testing.assert_close(after, hf_scores(model, seqs, types), rtol=0, atol=1e-5)  # ...exactly


def test_parameters_are_shared_and_trainable():
    model = tiny_model()
    enc = PackedBertEncoder.from_hf(model)
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert enc.layers[0].attention.self.query.weight is q
    _, _, ids, tt, pos, cu = packed_inputs([5, 11])
    enc(ids, tt, pos, cu, 11).sum().backward()
    for p in (model.bert.encoder.layer[0].attention.self.query.weight, model.classifier.weight,
              model.bert.embeddings.word_embeddings.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_every_parameter_gets_hfs_gradient():
    """Training through the packed encoder: each weight's gradient is HF's (key and value included,
    which a read of the joined QKV rows through q's view once dropped)."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    seqs, types, ids, tt, pos, cu = packed_inputs([5, 11, 1, 7])
    PackedBertEncoder.from_hf(model)(ids, tt, pos, cu, 11).sum().backward()
    sum(ref(input_ids=x[None], token_type_ids=t[None]).logits.sum() for x, t in zip(seqs, types)).backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:  # unused by HF either (none in this model)
            continue
        got = grads[name].grad
        assert got is not None, name
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_non_gelu_activation_uses_torch_fallback():
    model = tiny_model(hidden_act="gelu_new")
    seqs, types, ids, tt, pos, cu = packed_inputs([6, 20])
    with torch.inference_mode():
        got = PackedBertEncoder.from_hf(model)(ids, tt, pos, cu, 20)
    torch.testing.assert_close(got, hf_scores(model, seqs, types), rtol=0, atol=1e-5)


def test_bad_token_tensors_are_named():
    enc = PackedBertEncoder.from_hf(tiny_model())
    _, _, ids, tt, pos, cu = packed_inputs([5, 11])
    cases = [((ids[None], tt, pos), r"input_ids must be a packed 1-D int64/int32 tensor \[total tokens\], "
              r"got \(1, 16\)"),
             ((ids, tt.float(), pos), "token_type_ids must be a packed 1-D int64/int32 tensor"),
             ((ids, tt, pos.tolist()), "position_ids must be .* got list"),
             ((ids, tt[:-1], pos), "must have one length, got 16, 15 and 16"),
             ((ids, tt, pos[:-1]), "must have one length, got 16, 16 and 15")]
    for (a, b, c), message in cases:
        with pytest.raises(ValueError, match=message):
            enc(a, b, c, cu, 11)


def test_rejects_unsupported_models():
    with pytest.raises(ValueError, match="absolute position"):
        PackedBertEncoder.from_hf(tiny_model(position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="one output"):
        PackedBertEncoder.from_hf(tiny_model(num_labels=3))
    with pytest.raises(TypeError, match="BertForSequenceClassification"):
        PackedBertEncoder.from_hf(copy.deepcopy(tiny_model()).bert)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_fp32_scores_follow_hf_to_float_rounding_on_a_model_with_spread(grad):
    # Scores spread ~0.2 here, so a near miss in the formulation shows: tanh-GELU moved them 2.3e-5,
    # a LayerNorm eps of 1e-5 instead of 1e-12 2.8e-6, against 3.3e-7 of float rounding.  The
    # training forward (what the ranker trainer differentiates) takes its own, out-of-place path.
    model = spread_model()
    lens = [1, 2, 17, 64, 3, 128, 5]
    seqs, types, ids, tt, pos, cu = packed_inputs(lens)
    ref = hf_scores(copy.deepcopy(model), seqs, types)
    enc = PackedBertEncoder.from_hf(model)
    with torch.inference_mode(not grad):
        got = enc(ids, tt, pos, cu, max(lens))
    assert got.requires_grad == grad
    torch.testing.assert_close(got.detach(), ref, rtol=0, atol=1.5e-6)
