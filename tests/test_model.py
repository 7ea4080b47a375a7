"""model.py: shapes and parameter counts, initialisation, causality, the KV cache, GQA against an
independent attention, the attention kernel each call site gets, RoPE, overfitting, generation,
sampling filters, the optimizer groups, MFU and the checkpoint loader. CPU, small models; the
attention tests run at head dims 8 (the CPU kernels' own) and 16 / 32 (PyTorch's, as on every GPU),
with and without the CPU kernels attached (the agreement with Hugging Face's Llama is in test_export.py)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model
from llamatiny import cpu_kernels, lora
from llamatiny.checkpoint import from_checkpoint
from model import (
    ModelArgs,
    Transformer,
    apply_rope,
    precompute_rope,
    sample_next,
)

INF = float("inf")
REFERENCE_CONFIGS = {  # llama2.c's TinyStories models and their published parameter counts (tied embeddings)
    "260K": (dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                  max_seq_len=512), 260_032),
    "15M": (dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, multiple_of=32,
                 max_seq_len=256), 15_191_712),
    "42M": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, multiple_of=32,
                 max_seq_len=1024), 41_689_600),
    "110M": (dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000, multiple_of=32,
                  max_seq_len=1024), 109_529_856),
}


def tiny_args(**overrides) -> ModelArgs:
    kw = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=64, multiple_of=8, max_seq_len=32)
    return ModelArgs(**{**kw, **overrides})


def tiny_model(seed=0, std=0.3, **overrides) -> Transformer:
    """A small model in eval mode. std: re-draw every matrix with this std (and the norm gains around 1)
    so attention is sharp and logits are O(1): a cache or position bug then moves the logits visibly,
    where the 0.02 init would give near-uniform attention. None keeps the model's own init."""
    torch.manual_seed(seed)
    m = Transformer(tiny_args(**overrides)).eval()
    if std is not None:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
                else:
                    p.uniform_(0.5, 1.5)
    return m


def all_logits(m, tokens):
    # logits for every position: forward returns them only when given targets
    return m(tokens, targets=torch.zeros_like(tokens))[0]


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "plain"])
def kernels(request):
    # every test that takes it runs twice: its model with the CPU kernels attached (as train.py, sample.py
    # and eval.py run on a CPU), and the plain model
    return cpu_kernels.attach if request.param else lambda m: m


# (dim, n_heads): head dim 8 takes the CPU kernels' small-head attention; 16 and 32 take PyTorch's
HEAD_DIMS = {"hd8": (32, 4), "hd16": (64, 4), "hd32": (64, 2)}
KV_HEADS = {"MHA": lambda h: h, "GQA": lambda h: h // 2, "MQA": lambda h: 1}


def shaped_model(head_dim, kv, **overrides):
    dim, n_heads = HEAD_DIMS[head_dim]
    return tiny_model(dim=dim, n_heads=n_heads, n_kv_heads=KV_HEADS[kv](n_heads), **overrides)


# ------------------------------------------------------------------ shapes, counts, init

@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_reference_configs_have_the_reference_parameter_counts(name):
    kw, expected = REFERENCE_CONFIGS[name]
    with torch.device("meta"):  # no memory, no init cost: the 110M model builds instantly
        m = Transformer(ModelArgs(**kw))
        tokens = torch.zeros(2, 16, dtype=torch.long)
        logits, loss = m(tokens, tokens)
        last, no_loss = m(tokens)
    assert m.num_params() == expected == ModelArgs(**kw).num_params()
    assert m.num_params(non_embedding=True) == expected - kw["vocab_size"] * kw["dim"]
    assert logits.shape == (2, 16, kw["vocab_size"]) and loss.shape == ()
    assert last.shape == (2, 1, kw["vocab_size"]) and no_loss is None
    a = m.args
    assert a.n_kv_heads == kw["n_kv_heads"]
    assert m.layers[0].attention.wk.weight.shape == (a.n_kv_heads * a.dim // a.n_heads, a.dim)
    assert m.layers[0].feed_forward.w1.weight.shape == (a.hidden_dim, a.dim)
    assert a.hidden_dim % kw["multiple_of"] == 0


def test_hidden_dim_rule_and_explicit_hidden_dim():
    assert ModelArgs(dim=288, multiple_of=32).hidden_dim == 768  # int(2 * 4 * 288 / 3) = 768
    assert ModelArgs(dim=512, n_heads=8, multiple_of=32).hidden_dim == 1376  # 1365 rounded up
    assert ModelArgs(dim=64, n_heads=8, multiple_of=4).hidden_dim == 172  # 170 rounded up
    assert ModelArgs(dim=64, n_heads=8, hidden_dim=100).hidden_dim == 100
    assert ModelArgs(n_kv_heads=None).n_kv_heads == ModelArgs().n_heads


def test_model_args_from_dict_picks_its_fields():
    args = tiny_args(n_kv_heads=2)
    d = {**dataclasses.asdict(args), "learning_rate": 1e-3, "batch_size": 8}  # a training config
    assert ModelArgs.from_dict(d) == args


@pytest.mark.parametrize("kw, numbers", [
    (dict(dim=100, n_heads=6), ["100", "6"]),
    (dict(dim=96, n_heads=6, n_kv_heads=4), ["6", "4"]),
    (dict(dim=18, n_heads=6), ["18", "6", "3"]),  # head dim 3 is odd: RoPE rotates pairs
])
def test_invalid_shapes_fail_at_construction_naming_the_numbers(kw, numbers):
    with pytest.raises(ValueError) as e:
        ModelArgs(**kw)
    for n in numbers:
        assert n in str(e.value), (n, str(e.value))


def test_sequence_longer_than_context_is_a_clear_error():
    m = tiny_model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        m(torch.zeros(1, 4, dtype=torch.long), start_pos=5)


@pytest.mark.parametrize("vocab_size, dim, tol", [(512, 64, 0.05), (32000, 288, 0.15)])
def test_fresh_model_loss_is_close_to_ln_vocab(vocab_size, dim, tol):
    torch.manual_seed(0)
    m = Transformer(tiny_args(vocab_size=vocab_size, dim=dim, n_heads=4, max_seq_len=64)).eval()
    tokens = torch.randint(0, vocab_size, (4, 64))
    targets = torch.randint(0, vocab_size, (4, 64))
    with torch.no_grad():
        _, loss = m(tokens, targets)
    assert abs(loss.item() - math.log(vocab_size)) < tol, (loss.item(), math.log(vocab_size))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scheme", list(model.INIT_SCHEMES))
def test_each_init_scheme_draws_its_std(scheme, tie):
    # gpt2: GPT-2's 1/sqrt(2 * n_layers) on the projections that write into the residual stream (llama2.c
    # #579 scaled w3, an input projection, instead of w2); hf: 0.02 everywhere; kaiming:
    # sqrt(2 / in_features), which hidden_dim 384 against dim 128 tells apart from sqrt(2 / out_features)
    n_layers = 4
    torch.manual_seed(0)
    m = Transformer(tiny_args(dim=128, n_heads=4, n_layers=n_layers, vocab_size=256, hidden_dim=384,
                              tie_embeddings=tie), init=scheme)
    residual = ("attention.wo.weight", "feed_forward.w2.weight")
    matrices = 0
    for name, p in m.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == 1.0), name  # norm gains start at one
            continue
        matrices += 1
        expected = {"gpt2": 0.02 / math.sqrt(2 * n_layers) if name.endswith(residual) else 0.02,
                    "hf": 0.02, "kaiming": math.sqrt(2 / p.size(1))}[scheme]
        assert p.std().item() == pytest.approx(expected, rel=0.05), name
        assert abs(p.mean().item()) < expected / 10, name
    assert matrices == 7 * n_layers + (1 if tie else 2)  # the untied classifier drawn too
    with pytest.raises(ValueError, match="xavier.*gpt2, hf, kaiming"):
        Transformer(tiny_args(), init="xavier")


def test_embeddings_are_tied_to_the_output_layer():
    m = tiny_model(std=None)
    assert m.output.weight is m.tok_embeddings.weight
    sd = m.state_dict()
    assert "output.weight" in sd and "tok_embeddings.weight" in sd  # Meta's names, both present
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()
    assert not any(k.startswith("freqs_") for k in sd)  # RoPE tables are derived, not saved
    assert m.num_params() == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    # one training step keeps them one matrix, trained by both uses
    m.train()
    opt = m.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, 64, (2, 8))
    _, loss = m(tokens, tokens)
    loss.backward()
    assert m.output.weight.grad is m.tok_embeddings.weight.grad
    opt.step()
    assert m.output.weight is m.tok_embeddings.weight


def test_untied_output_layer_is_a_weight_of_its_own():
    tied, m = tiny_model(std=None), tiny_model(std=None, tie_embeddings=False)
    assert m.output.weight is not m.tok_embeddings.weight
    V, d = m.args.vocab_size, m.args.dim
    assert m.num_params() == tied.num_params() + V * d == m.args.num_params()
    # without the token embedding (transformers' exclude_embeddings): an untied classifier stays in
    assert m.num_params(non_embedding=True) == tied.num_params(non_embedding=True) + V * d
    sd = m.state_dict()
    assert sd["output.weight"].data_ptr() != sd["tok_embeddings.weight"].data_ptr()
    # each learns from its own gradient: the embedding only in the rows of the tokens looked up
    m.train()
    opt = m.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()
    tokens = torch.randint(0, V // 2, (2, 8))
    _, loss = m(tokens, tokens)
    loss.backward()
    assert (m.tok_embeddings.weight.grad[V // 2:] == 0).all() and (m.output.weight.grad[V // 2:] != 0).all()
    embedding = m.tok_embeddings.weight.detach().clone()
    opt.step()
    assert torch.equal(m.tok_embeddings.weight[V // 2:], embedding[V // 2:])
    assert not torch.equal(m.output.weight, m.tok_embeddings.weight)


def test_rms_norm_formula():
    norm = model.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(15)) * 10
    by_hand = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert torch.allclose(norm(x).double(), by_hand, atol=1e-5)
    y = norm.bfloat16()(x.bfloat16())  # a bf16 model: bf16 out, the mean of squares taken in float32
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), by_hand, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ attention, cache, RoPE

@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_causality_later_tokens_never_change_earlier_logits(head_dim, kernels):
    m = kernels(shaped_model(head_dim, "GQA"))
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    with torch.no_grad():
        a, b = all_logits(m, tokens), all_logits(m, changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(-1).min() > 1e-3  # and every later position does change


@pytest.mark.parametrize("kv", KV_HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_kv_cache_decoding_equals_full_forward(head_dim, kv, kernels):
    m = kernels(shaped_model(head_dim, kv))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (2, 20), generator=g)
    with torch.no_grad():
        full = all_logits(m, tokens)  # (2, 20, 64), no cache
        diffs = []
        last, _ = m(tokens[:, :7], start_pos=0)  # prefill: logits of the last prompt position only
        assert last.shape == (2, 1, 64)
        diffs.append((last[:, 0] - full[:, 6]).abs().max())
        # a chunked prefill continuing at start_pos > 0, all positions of the chunk
        chunk = all_logits_at(m, tokens[:, 7:12], start_pos=7)
        diffs.append((chunk - full[:, 7:12]).abs().max())
        for pos in range(12, 20):  # then one token at a time
            step, _ = m(tokens[:, pos:pos + 1], start_pos=pos)
            diffs.append((step[:, 0] - full[:, pos]).abs().max())
        # a new prefill at position 0 starts a fresh sequence (the old cache is not read)
        other = torch.randint(0, 64, (2, 10), generator=g)
        restart, _ = m(other, start_pos=0)
        diffs.append((restart[:, 0] - all_logits(m, other)[:, -1]).abs().max())
    assert full.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert max(diffs) < 1e-5 * full.abs().max(), diffs  # float32 rounding, relative to the logits' size


def all_logits_at(m, tokens, start_pos):
    return m(tokens, targets=torch.zeros_like(tokens), start_pos=start_pos)[0]


def rope_complex(x, theta=10000.0):
    # independent RoPE, Meta's original formulation: interleaved pairs as complex numbers, in float64
    T, D = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)  # (T, D/2)
    rot = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # (B, T, H, D/2)
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)


def reference_attention(attn, x):
    # straightforward causal attention from the module's weights, in float64: explicit scores, a
    # -inf mask, softmax; query head h reads key/value head h // (n_heads / n_kv_heads)
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = x.double()
    q = rope_complex((x @ attn.wq.weight.double().T).view(B, T, H, D))
    k = rope_complex((x @ attn.wk.weight.double().T).view(B, T, KV, D))
    v = (x @ attn.wv.weight.double().T).view(B, T, KV, D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        kv = h // (H // KV)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, kv])  # (B, T, D)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.double().T  # (B, T, dim)


@pytest.mark.parametrize("kv", KV_HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_matches_an_independent_implementation(head_dim, kv, kernels):
    m = kernels(shaped_model(head_dim, kv))
    attn = m.layers[0].attention
    x = torch.randn(2, 24, m.args.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = attn(x, *precompute_rope(attn.head_dim, 24, m.args.rope_theta))
        ref = reference_attention(attn, x)
    assert ref.abs().max() > 0.5
    assert (ours.double() - ref).abs().max() < 1e-5 * ref.abs().max()  # float32 rounding


def test_gqa_with_n_kv_heads_equal_to_n_heads_is_multi_head_attention():
    mha = tiny_model(seed=5, n_heads=4, n_kv_heads=None)
    gqa = tiny_model(seed=5, n_heads=4, n_kv_heads=4)
    assert gqa.args == mha.args
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(all_logits(gqa, tokens), all_logits(mha, tokens))
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
        attn = gqa.layers[1].attention
        ours = attn(x, *precompute_rope(attn.head_dim, 16, gqa.args.rope_theta))
    assert (ours.double() - reference_attention(attn, x)).abs().max() < 1e-5


def test_rope_is_a_rotation_with_the_relative_position_property():
    D, T = 16, 40
    cos, sin = precompute_rope(D, T, 10000.0)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, T, 3, D, generator=g)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # norms preserved
    pairs_x, pairs_y = x.reshape(2, T, 3, D // 2, 2), y.reshape(2, T, 3, D // 2, 2)
    # each pair rotates
    assert torch.allclose(pairs_y.norm(dim=-1), pairs_x.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(y[:, 0], x[:, 0])  # position 0 is the identity
    assert torch.allclose(y.double(), rope_complex(x), atol=1e-5)  # Meta's interleaved convention

    # <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    rq = apply_rope(q.expand(1, T, 1, D), cos, sin)[0, :, 0]  # (T, D): q placed at every position
    rk = apply_rope(k.expand(1, T, 1, D), cos, sin)[0, :, 0]
    for offset in (0, 3, 11):
        dots = torch.stack([rq[m] @ rk[m - offset] for m in range(offset, T)])
        assert torch.allclose(dots, dots[0].expand_as(dots), atol=1e-4), offset
    assert not torch.isclose(rq[5] @ rk[2], rq[5] @ rk[4], atol=1e-3)  # but it does depend on m - n


def test_rope_tables_stay_float32_in_a_half_precision_model(monkeypatch):
    # training rotated by float32 cos/sin; a model cast to bfloat16 for sampling must rotate by the same
    # angles (bfloat16 tables are off by up to ~2e-3)
    tables = []

    def recording_apply_rope(x, cos, sin):
        tables.append((cos, sin))
        return apply_rope(x, cos, sin)

    monkeypatch.setattr(model, "apply_rope", recording_apply_rope)
    m = tiny_model(max_seq_len=256).to(torch.bfloat16)
    tokens = torch.randint(0, 64, (1, 201), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        m(tokens[:, :200], start_pos=0)
        m(tokens[:, 200:], start_pos=200)
    cos, sin = precompute_rope(m.args.dim // m.args.n_heads, 201, m.args.rope_theta)
    assert cos.dtype == torch.float32 and len(tables) == 2 * 2 * m.args.n_layers  # q and k, two calls
    assert all(c.dtype == s.dtype == torch.float32 for c, s in tables)
    assert torch.equal(tables[0][0], cos[:200]) and torch.equal(tables[0][1], sin[:200])
    assert torch.equal(tables[-1][0], cos[200:]) and torch.equal(tables[-1][1], sin[200:])


def test_kv_cache_refuses_a_new_batch_size_mid_sequence():
    m = tiny_model()
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        m(tokens[:2, :6], start_pos=0)  # two sequences in the cache
        with pytest.raises(ValueError, match="batch of 2, not a batch of 3.*prefill at start_pos=0"):
            m(tokens[:, 6:7], start_pos=6)  # three cannot continue them
        m(tokens[:, :6], start_pos=0)  # a new prefill may change the batch size
        step, _ = m(tokens[:, 6:7], start_pos=6)
        with pytest.raises(ValueError, match="no sequence"):
            tiny_model()(tokens[:, :1], start_pos=3)  # decoding before any prefill
    assert (step[:, 0] - all_logits(m, tokens[:, :7])[:, 6]).abs().max() < 1e-5


def record_sdpa(monkeypatch) -> list[dict]:
    # every F.scaled_dot_product_attention call's arguments, as torch._fused_sdp_choice takes them
    calls, original = [], F.scaled_dot_product_attention

    def recording(query, key, value, **kw):
        calls.append(dict(query=query, key=key, value=value, **kw))
        return original(query, key, value, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv", ["GQA", "MHA"])
@pytest.mark.parametrize("head_dim", ["hd8", "hd16"])
def test_every_attention_call_site_gets_a_fused_kernel(head_dim, kv, dtype, monkeypatch):
    # The plain path, the one every GPU takes: training and each prefill (also the one after the context
    # slides) are causal attention with is_causal and no mask, decoding one token needs no mask. A mask
    # would cost the fused kernels on a GPU (flash refuses any; with grouped key/value heads the memory-
    # efficient one cannot take the call either). On CPU torch says which kernel it picks: flash, each time.
    calls = record_sdpa(monkeypatch)
    m = shaped_model(head_dim, kv, max_seq_len=16)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(23))
    m.train()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):  # as train.py runs bf16
        m(tokens, tokens)[1].backward()
    training, calls[:] = calls[:], []
    m.eval().to(dtype)  # as sample.py runs bf16
    m.generate(tokens[:, :5], 20, temperature=0.0)  # fills the 16-token context once, so it slides
    prefill = [c for c in calls if c["query"].size(2) > 1]
    decode = [c for c in calls if c["query"].size(2) == 1]
    n = m.args.n_layers
    assert len(training) == n and len(prefill) == 2 * n and len(decode) == 19 * n
    for c in training + prefill:
        assert c["is_causal"] and c["attn_mask"] is None and c["query"].size(2) == c["key"].size(2)
    for c in decode:
        assert not c["is_causal"] and c["attn_mask"] is None
    for c in training + prefill + decode:
        assert c["query"].dtype == dtype
        assert torch._fused_sdp_choice(**c) == SDPBackend.FLASH_ATTENTION.value


# ------------------------------------------------------------------ training

def test_dropout_is_stochastic_in_training_causal_and_off_in_eval(kernels):
    m = kernels(tiny_model(seed=3, dropout=0.2, n_kv_heads=2))
    plain = kernels(tiny_model(seed=3, dropout=0.0, n_kv_heads=2))  # the same weights
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(20))
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 64
    m.train()
    torch.manual_seed(1)
    a = all_logits(m, tokens)
    b = all_logits(m, tokens)
    assert (a - b).abs().max() > 1e-2  # a new dropout mask each call
    torch.manual_seed(1)
    c = all_logits(m, changed)  # the same masks: a later token still never reaches an earlier position
    assert torch.allclose(a[:, :15], c[:, :15], atol=1e-5, rtol=0)
    _, loss = m(tokens, tokens)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    m.eval()
    with torch.no_grad():
        assert torch.equal(all_logits(m, tokens), all_logits(plain, tokens))


@pytest.mark.parametrize("n_kv_heads", [2])
def test_overfits_one_batch(n_kv_heads):
    torch.manual_seed(0)
    m = Transformer(tiny_args(dim=64, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=64, max_seq_len=32))
    opt = m.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    tokens = torch.randint(0, 64, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    first = None
    for _ in range(300):
        _, loss = m(x, y)
        first = first if first is not None else loss.item()
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, (first, loss.item())


def test_ignore_index_masks_positions():
    m = tiny_model(std=0.3)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 64, (2, 12), generator=g)
    targets = torch.randint(0, 64, (2, 12), generator=g)
    keep = torch.rand(2, 12, generator=g) > 0.4
    keep[0, 0] = True
    masked = torch.where(keep, targets, -1)
    logits, loss = m(tokens, masked)
    logits.retain_grad()
    # by hand: mean negative log-likelihood over the kept positions only
    logp = logits.detach().log_softmax(-1)
    by_hand = -logp.gather(-1, targets[..., None])[..., 0][keep].mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~keep] == 0)  # masked positions teach nothing
    assert torch.all(logits.grad[keep].abs().sum(-1) > 0)


def test_targets_may_be_a_non_contiguous_slice():
    m = tiny_model(std=None)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(16))
    x, y = tokens[:, :-1], tokens[:, 1:]  # y is not contiguous
    assert not y.is_contiguous()
    assert m(x, y)[1].item() == pytest.approx(m(x, y.contiguous())[1].item())


def test_configure_optimizers_groups():
    m = tiny_model(std=None, n_kv_heads=2)
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen))  # the tied matrix once
    assert set(seen) == {id(p) for p in m.parameters()}  # and every parameter
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert opt.defaults["fused"]  # one kernel on CPU too: torch's CPU default is a per-parameter loop


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_flops_per_token_is_what_a_training_step_computes(lora_rank):
    # MFU's count against torch's FLOP counter on a real forward and backward pass (attention through the
    # math kernel, whose matmuls it sees); a frozen base (LoRA) computes no weight gradients. The count
    # leaves out the norms and that the first layer's frozen matrices need no input gradient: a few %
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                              max_seq_len=64))
    if lora_rank:
        lora.attach(m, rank=lora_rank, alpha=8.0)
    tokens = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = m(tokens, tokens)
        loss.backward()
    measured = counter.get_total_flops() / tokens.numel()
    assert m.flops_per_token() == pytest.approx(measured, rel=0.04)
    assert m.estimate_mfu(tokens.numel(), 0.5, peak_flops=1e12) == pytest.approx(
        measured * tokens.numel() / 0.5 / 1e12, rel=0.04)
    with pytest.raises(TypeError):  # no default peak: an A100's would overstate an H100's MFU 3x
        m.estimate_mfu(tokens.numel(), 0.5)


def test_an_untied_model_multiplies_as_much_as_the_tied_one():
    # vocab_size x dim more weights, the same multiplies: the untied embedding is a lookup, and the untied
    # classifier does the tied matrix's work
    kw, n_params = REFERENCE_CONFIGS["15M"]
    with torch.device("meta"):
        tied, untied = Transformer(ModelArgs(**kw)), Transformer(ModelArgs(**kw, tie_embeddings=False))
    assert untied.num_params() == n_params + 32000 * 288
    assert untied.flops_per_token() == tied.flops_per_token()
    assert untied.estimate_mfu(128 * 256, 0.25, 989e12) == tied.estimate_mfu(128 * 256, 0.25, 989e12)
    # frozen (LoRA's base): a frozen classifier saves its weight gradient's 2 FLOPs a weight, a lookup nothing
    full = untied.flops_per_token()
    untied.tok_embeddings.weight.requires_grad_(False)
    assert untied.flops_per_token() == full
    untied.output.weight.requires_grad_(False)
    assert untied.flops_per_token() == full - 2 * 32000 * 288


# ------------------------------------------------------------------ generation and sampling

def filter_logits(logits, top_k=None, top_p=None):
    # the candidates sample_next draws from, as logits: (B, vocab_size) with the excluded tokens at -inf
    values, index = model._candidates(logits, top_k, top_p)
    if index is None:
        return logits.clone()
    return torch.full_like(logits, -float("inf")).scatter_(-1, index, values)


def greedy_without_cache(m, idx, n):
    # the slow, obviously right way: a full forward of the whole sequence for every new token
    for _ in range(n):
        logits, _ = m(idx)  # (B, 1, V), no cache
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def test_greedy_generation_matches_full_recomputation_and_is_deterministic(kernels):
    m = kernels(tiny_model(n_kv_heads=2, max_seq_len=32))
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(8))
    out = m.generate(prompt, 27, temperature=0.0)  # fills the context exactly
    assert out.shape == (2, 32)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_without_cache(m, prompt, 27))
    assert torch.equal(out, m.generate(prompt, 27, temperature=0.0))
    torch.manual_seed(0)
    a = m.generate(prompt, 10, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(0)
    assert torch.equal(a, m.generate(prompt, 10, temperature=1.0, top_k=10, top_p=0.9))


def test_generate_stream_yields_the_generate_tokens():
    m = tiny_model(max_seq_len=32)
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(9))
    streamed = [int(t) for t in m.generate_stream(prompt, 12, temperature=0.0)]
    assert streamed == m.generate(prompt, 12, temperature=0.0)[0, 4:].tolist()


def test_generation_stops_at_the_stop_token():
    m = tiny_model(max_seq_len=32)
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(10))
    free = m.generate(prompt, 20, temperature=0.0)[0, 4:].tolist()
    # the first generated token that has not appeared before it plays the stop token
    j = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    out = m.generate(prompt, 20, temperature=0.0, stop_token=free[j])
    assert out[0, 4:].tolist() == free[:j]  # stopped there, the stop token not included
    assert [int(t) for t in m.generate_stream(prompt, 20, temperature=0.0, stop_token=free[j])] == free[:j]


def test_generation_stops_per_row_and_pads_with_the_stop_token():
    m = tiny_model(max_seq_len=32)
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(11))
    free = m.generate(prompt, 16, temperature=0.0)[:, 4:]
    stop = int(free[0, 2])
    out = m.generate(prompt, 16, temperature=0.0, stop_token=stop)[:, 4:]
    for row, free_row in zip(out.tolist(), free.tolist(), strict=False):
        if stop in free_row:
            i = free_row.index(stop)
            assert row[:i] == free_row[:i]
            assert all(t == stop for t in row[i:])
        else:
            assert row == free_row[:len(row)]


def test_generation_past_the_context_slides_without_error():
    m = tiny_model(max_seq_len=16)
    long_prompt = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(12))  # > max_seq_len
    out = m.generate(long_prompt, 40, temperature=0.0)  # far past the context
    assert out.shape == (2, 60) and torch.equal(out[:, :20], long_prompt)
    assert out.min() >= 0 and out.max() < 64
    # the first new token sees the end of the prompt that fits, as the uncached model would
    first, _ = m(long_prompt[:, -15:])
    assert torch.equal(out[:, 20], first[:, -1].argmax(-1))
    sampled = m.generate(long_prompt, 40, temperature=0.8, top_k=5)
    assert sampled.shape == (2, 60)


def test_generation_past_the_context_keeps_the_latest_half_and_matches_recomputation(kernels):
    # when the cache is full, generate keeps the latest max_seq_len // 2 tokens and prefills them again;
    # every token must then be what an uncached forward over exactly those tokens predicts
    m = kernels(tiny_model(max_seq_len=16))
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(14))
    out = m.generate(prompt, 40, temperature=0.0)
    ctx = prompt
    for i in range(40):
        logits, _ = m(ctx)
        assert torch.equal(out[:, 6 + i], logits[:, -1].argmax(-1)), i
        ctx = torch.cat((ctx, out[:, 6 + i: 7 + i]), dim=1)
        if ctx.size(1) > 16:
            ctx = ctx[:, -8:]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 3.5]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits untouched
    assert torch.equal(filter_logits(logits, top_k=4), logits)  # k >= vocab: nothing removed
    assert torch.equal(filter_logits(logits, top_k=100), logits)
    assert logits[0, 0] == 1.0  # the input is not modified


@pytest.mark.parametrize("top_p, kept", [
    (0.3, {1}),  # 0.5 alone reaches it
    (0.6, {1, 3}),  # 0.5 < 0.6 <= 0.5 + 0.25
    (0.75 + 1e-3, {1, 3, 2}),  # just past 0.75: the 0.15 token is needed too
    (0.95, {0, 1, 2, 3}),
    (1e-9, {1}),  # the most likely token is always kept
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([[0.10, 0.50, 0.15, 0.25]])  # deliberately unsorted
    out = filter_logits(probs.log(), top_p=top_p)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], probs.log()[finite])  # unchanged: renormalising is the softmax's job


def test_top_p_rows_are_independent_and_combine_with_top_k():
    logits = torch.tensor([[0.10, 0.50, 0.15, 0.25], [0.70, 0.10, 0.10, 0.10]]).log()
    out = filter_logits(logits, top_p=0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, False, False]]
    both = filter_logits(logits, top_k=3, top_p=0.6)  # top-p over the renormalised top 3
    assert torch.isfinite(both).tolist() == [[False, True, False, True], [True, False, False, False]]
    assert not (torch.isfinite(both) & ~torch.isfinite(filter_logits(logits, top_k=3))).any()


def test_sample_next_respects_temperature_zero_and_filters():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5]]).repeat(4, 1)
    assert sample_next(logits, temperature=0.0).tolist() == [1, 1, 1, 1]
    torch.manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=2) for _ in range(200)])
    assert set(draws.unique().tolist()) == {1, 2}  # only the top 2, and both of them
    assert set(torch.stack([sample_next(logits, 5.0, top_k=1) for _ in range(20)]).unique().tolist()) == {1}


def filter_by_full_sort(logits, top_k=None, top_p=None):
    # the plain definition: sort the whole vocabulary, keep the smallest prefix whose mass reaches top_p
    logits = logits.clone()
    if top_k is not None:
        logits[logits < torch.topk(logits, top_k).values[:, [-1]]] = -INF
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    logits[drop.scatter(-1, order, drop)] = -INF
    return logits


@pytest.mark.parametrize("scale", [4.0, 0.1], ids=["peaked", "flat"])
def test_top_p_over_a_large_vocabulary_equals_the_full_sort(scale):
    # filter_logits sorts only the 1024 most likely tokens and sorts them all when those do not reach
    # top_p (the flat rows: 1024 of 5000 near-equal tokens hold ~20% of the mass)
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(17)) * scale
    for top_k, top_p in [(None, 0.5), (None, 0.9), (None, 0.99), (2000, 0.9), (50, 0.9)]:
        ours = filter_logits(logits, top_k=top_k, top_p=top_p)
        assert torch.equal(ours, filter_by_full_sort(logits, top_k, top_p)), (top_k, top_p)
        kept = torch.isfinite(ours).sum(-1)
        assert kept.min() >= 1 and kept.max() < 5000


def test_sample_next_draws_from_the_filtered_distribution():
    logits = torch.tensor([[1.5, 0.2, 1.0, -0.5, 0.6, 0.0]]).log_softmax(-1)
    n = 40_000
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, None, 0.8), (1.3, 4, None), (1.0, 4, 0.7)]:
        torch.manual_seed(3)
        draws = sample_next(logits.expand(n, -1), temperature, top_k, top_p)
        freq = torch.bincount(draws, minlength=6).double() / n
        expected = filter_logits(logits / temperature, top_k, top_p).softmax(-1)[0].double()
        assert torch.all(freq[expected == 0] == 0), (temperature, top_k, top_p)  # filtered: never drawn
        # 4.5 standard deviations of a binomial frequency
        assert torch.all((freq - expected).abs() <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-9), (
            temperature, top_k, top_p, freq, expected)
        torch.manual_seed(3)
        assert torch.equal(draws, sample_next(logits.expand(n, -1), temperature, top_k, top_p))  # seeded


def test_forward_does_not_depend_on_a_running_generation(kernels):
    # generation keeps nothing that forward reads: in the middle of one, forward follows the weights
    m = kernels(tiny_model(max_seq_len=32))
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(18))
    stream = m.generate_stream(prompt, 10, temperature=0.0)
    next(stream)
    with torch.no_grad():
        m.output.weight.mul_(-1.0)  # the tied embedding too
        during, _ = m(prompt)
    stream.close()
    after = all_logits(m, prompt)[:, -1:]
    assert torch.allclose(during, after, atol=1e-5)
    assert not any("classifier" in k for k in m.state_dict())


@pytest.mark.slow
def test_compiled_generation_follows_the_weights(kernels):
    # sample.py --compile compiles hidden_states, which generate_stream runs for the prefill and every
    # decode step: the compiled graph must read the weights as they are, not bake in the first ones
    m = kernels(tiny_model(max_seq_len=16))
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(18))
    expected = []
    for scale in (1.0, -1.0):
        with torch.no_grad():
            m.output.weight.mul_(scale)
        expected.append(greedy_without_cache(m, prompt, 6))
    m.hidden_states = torch.compile(m.hidden_states, dynamic=True)
    for scale, want in zip((-1.0, -1.0), expected, strict=True):  # back to the original weights, then flipped
        with torch.no_grad():
            m.output.weight.mul_(scale)
        assert torch.equal(m.generate(prompt, 6, temperature=0.0), want)
    assert not torch.equal(*expected)


# ------------------------------------------------------------------ checkpoints

def write_checkpoint(path, m, **overrides):
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    ckpt = {"model": m.state_dict(), "model_args": dataclasses.asdict(m.args), "optimizer": opt.state_dict(),
            "scaler": None, "config": {"batch_size": 4}, "iter_num": 3, "tokens_seen": 384,
            "best_val_loss": 2.5, "loader_state": {"epoch": 0}, "rng_state": torch.get_rng_state(),
            "tokenizer": None, **overrides}
    torch.save(ckpt, path)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_from_checkpoint_round_trip(tmp_path, tie):
    m = tiny_model(n_kv_heads=2, std=0.3, tie_embeddings=tie)
    write_checkpoint(tmp_path / "ckpt.pt", m)
    loaded, ckpt = from_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.args == m.args and ckpt["iter_num"] == 3
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(13))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(all_logits(loaded, tokens), all_logits(m, tokens))


def test_a_checkpoint_from_before_tie_embeddings_loads_tied(tmp_path):
    m = tiny_model(n_kv_heads=2)
    args = dataclasses.asdict(m.args)
    del args["tie_embeddings"]  # model_args as written before the setting existed
    write_checkpoint(tmp_path / "old.pt", m, model_args=args)
    loaded, _ = from_checkpoint(tmp_path / "old.pt")
    assert loaded.args.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(loaded.output.weight, m.tok_embeddings.weight)


def test_from_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        from_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint", encoding="utf-8")
    with pytest.raises(ValueError, match="notes.pt"):
        from_checkpoint(tmp_path / "notes.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        from_checkpoint(tmp_path / "other.pt")

    m = tiny_model(std=None)
    sd = m.state_dict()
    del sd["layers.1.attention.wq.weight"]
    write_checkpoint(tmp_path / "missing.pt", m, model=sd)
    with pytest.raises(ValueError, match="layers.1.attention.wq.weight"):  # strict: no silent random weights
        from_checkpoint(tmp_path / "missing.pt")
    prefixed = {"_orig_mod." + k: v for k, v in m.state_dict().items()}  # a compiled model's keys
    write_checkpoint(tmp_path / "prefixed.pt", m, model=prefixed)
    with pytest.raises(ValueError, match="_orig_mod"):
        from_checkpoint(tmp_path / "prefixed.pt")
