"""llamatiny/cpu_kernels.py: each CPU kernel against the plain path of model.py it replaces (forward and
gradients, in float64 where the kernel allows, grouped-query shapes, CPU bf16 autocast), every ModelArgs
field through both paths, which path runs when, and the allocator setting."""
import copy
import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_model import all_logits, filter_logits, greedy_without_cache, tiny_model

from llamatiny import cpu_kernels
from model import ModelArgs, Transformer


def with_kernels(m):
    # the same model with the CPU kernels attached, as train.py, sample.py and eval.py run it on a CPU
    return cpu_kernels.attach(copy.deepcopy(m))


def qkv(B, n_heads, n_kv_heads, T, head_dim, dtype=torch.float64, seed=23):
    # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim); leaves that record gradients
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, n_heads, T, head_dim)] + [(B, n_kv_heads, T, head_dim)] * 2
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def sdpa_causal(q, k, v):  # the plain path
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def forward_and_grads(fn, q, k, v, dy):
    y = fn(q, k, v)
    return (y, *torch.autograd.grad(y, (q, k, v), dy))


# ----------------------------------------------------------------- the small-head kernel

@pytest.mark.parametrize("n_heads, n_kv_heads, T, head_dim",
                         [(4, 4, 37, 8), (4, 2, 64, 8), (4, 1, 300, 4), (8, 4, 512, 8)],
                         ids=["MHA", "GQA", "MQA-T300", "260K-T512"])  # 300, 512: several query blocks
@pytest.mark.parametrize("threads", [1, 2])  # the groups of heads grow with the threads (2: uneven)
def test_small_head_attention_equals_sdpa_forward_and_backward(n_heads, n_kv_heads, T, head_dim, threads):
    # it computes its own gradients: float64, so that any difference is a wrong formula, not rounding
    q, k, v = qkv(3, n_heads, n_kv_heads, T, head_dim)
    dy = torch.randn(3, n_heads, T, head_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = forward_and_grads(cpu_kernels.small_head_causal_attention, q, k, v, dy)
    finally:
        torch.set_num_threads(before)
    ref = forward_and_grads(sdpa_causal, q, k, v, dy)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-12


def test_small_head_attention_under_cpu_bfloat16_autocast():
    # train.py --device=cpu --dtype=bfloat16: bf16 q, k, v from the projections; the kernel computes in
    # float32 on them, as PyTorch's does, and hands bf16 gradients back
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv(2, 8, 4, 128, 8))
    dy = torch.randn(2, 8, 128, 8, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = forward_and_grads(cpu_kernels.small_head_causal_attention, q, k, v, dy)
    assert ours[0].dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in ours[1:])
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))  # the same values, in float32
    ref = forward_and_grads(sdpa_causal, q32, k32, v32, dy)
    assert (ours[0] - ref[0]).abs().max() < 1e-5  # the same float32 math on the same inputs
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert (a.float() - b).abs().max() <= 1e-2 * b.abs().max()  # bf16 rounding of the gradients

    # and a whole model: the loss under autocast stays close to float32's, every gradient finite
    m = tiny_model(std=None, n_heads=4, n_kv_heads=2).train()  # head dim 8
    tokens = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(6))
    _, loss32 = m(tokens, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = m(tokens, tokens)
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ----------------------------------------------------------------- attention with dropout, in blocks

@pytest.mark.parametrize("T, block", [(40, 16), (64, 64), (10, 64)])
def test_blocked_attention_equals_causal_attention(T, block):
    # without dropout: the same outputs and gradients as causal attention, in float64 (GQA: 4 heads, 2 kv)
    q, k, v = qkv(2, 4, 2, T, 8, seed=19)
    dy = torch.randn(2, 4, T, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    blocked = lambda *t: cpu_kernels.causal_attention_in_blocks(*t, 0.0, block=block)  # noqa: E731
    ours = forward_and_grads(blocked, q, k, v, dy)
    ref = forward_and_grads(sdpa_causal, q, k, v, dy)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() < 1e-12
    q, k, v, ref = (t.detach().float() for t in (q, k, v, ref[0]))
    # with dropout, each output is on average the dropout-free one (inverted dropout keeps the mean):
    # 3000 draws, as 10 batches of 300 copies of the inputs (each copy draws its own dropout)
    torch.manual_seed(0)
    copies = [t.repeat(300, 1, 1, 1) for t in (q, k, v)]  # (300 * 2, heads, T, 8)
    draws = [cpu_kernels.causal_attention_in_blocks(*copies, 0.3, block=block).view(300, *ref.shape)
             for _ in range(10)]
    mean = torch.cat(draws).mean(0)
    assert (mean - ref).abs().max() < 0.1 and (mean - ref).abs().mean() < 0.02
    # and with the same dropout draws, a later key or value never reaches an earlier query
    k2, v2 = k.clone(), v.clone()
    k2[:, :, T - 3:] += 1.0
    v2[:, :, T - 3:] += 1.0
    torch.manual_seed(1)
    a = cpu_kernels.causal_attention_in_blocks(q, k, v, 0.3, block=block)
    torch.manual_seed(1)
    b = cpu_kernels.causal_attention_in_blocks(q, k2, v2, 0.3, block=block)
    assert torch.equal(a[:, :, :T - 3], b[:, :, :T - 3]) and not torch.equal(a, b)


def test_blocked_attention_under_cpu_bfloat16_autocast():
    q, k, v = (t.detach().bfloat16() for t in qkv(2, 4, 2, 100, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cpu_kernels.causal_attention_in_blocks(q, k, v, 0.0)
        ref = sdpa_causal(q, k, v)
    assert ours.dtype == ref.dtype and (ours.float() - ref.float()).abs().max() <= 2e-2 * ref.abs().max()


def test_training_losses_equal_the_plain_paths():
    # a few optimizer steps of a 260K-like model (8-wide heads, grouped keys, several query blocks) as
    # train.py takes them: clipped gradients, fused AdamW; each path from the same weights
    batch = torch.randint(0, 64, (2, 301), generator=torch.Generator().manual_seed(8))
    losses = {}
    for enabled in (True, False):
        m = tiny_model(n_heads=4, n_kv_heads=2, max_seq_len=300, std=None).train()
        if enabled:
            cpu_kernels.attach(m)
        opt = m.configure_optimizers(0.1, 3e-2, (0.9, 0.95), "cpu")
        losses[enabled] = []
        for _ in range(4):  # the same batch: the loss must fall
            _, loss = m(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[enabled].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0] - 0.01  # the steps did train


# ----------------------------------------------------------------- decoding

def plain_step(m, tokens, start_pos):  # model.generate_stream's step without the kernels
    return m.output(m.hidden_states(tokens, start_pos)[:, -1, :])


@pytest.mark.parametrize("n_heads, n_kv_heads, B", [(4, 4, 1), (4, 2, 3), (2, 1, 2)],
                         ids=["MHA", "GQA", "MQA"])
def test_decoder_logits_equal_the_plain_forward(n_heads, n_kv_heads, B):
    m = tiny_model(n_heads=n_heads, n_kv_heads=n_kv_heads, max_seq_len=32)
    tokens = torch.randint(0, 64, (B, 20), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        decoder = cpu_kernels.Decoder(m)
        assert decoder.layers is not None  # the packed one-token path, not the fallback
        ours = [decoder(tokens[:, :5], 0)] + [decoder(tokens[:, i:i + 1], i) for i in range(5, 20)]
        plain = ([plain_step(m, tokens[:, :5], 0)]
                 + [plain_step(m, tokens[:, i:i + 1], i) for i in range(5, 20)])
    for i, (a, b) in enumerate(zip(ours, plain, strict=True)):
        assert a.shape == (B, 64) and (a - b).abs().max() <= 1e-5 * b.abs().max(), i


@pytest.mark.parametrize("case", ["bfloat16", "dropout in training", "LoRA"])
def test_models_the_decoder_cannot_pack_run_their_own_forward(case):
    from llamatiny import lora

    m = tiny_model(n_heads=4, max_seq_len=32, dropout=0.1 if case == "dropout in training" else 0.0)
    if case == "bfloat16":
        m = m.bfloat16()
    elif case == "dropout in training":
        m.train()
    else:
        lora.attach(m, rank=2, alpha=4.0)
    assert not cpu_kernels.Decoder.packable(m)
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        decoder = cpu_kernels.Decoder(m)
        ours = [decoder(tokens[:, :4], 0)] + [decoder(tokens[:, i:i + 1], i) for i in range(4, 8)]
        if case != "dropout in training":  # (dropout draws differ between two forwards)
            plain = ([plain_step(m, tokens[:, :4], 0)]
                     + [plain_step(m, tokens[:, i:i + 1], i) for i in range(4, 8)])
            for a, b in zip(ours, plain, strict=True):
                assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()


def test_nucleus_sampling_without_sorting_draws_from_the_filtered_distribution():
    logits = torch.tensor([[1.5, 0.2, 1.0, -0.5, 0.6, 0.0], [3.0, 0.1, 0.2, 0.3, 0.4, 0.5]]).log_softmax(-1)
    n = 20_000
    for temperature, top_p in [(1.0, 0.8), (0.7, 0.5), (1.3, 0.95), (1.0, 0.05)]:
        torch.manual_seed(3)
        draws = cpu_kernels.sample_next(logits.repeat(n, 1), temperature, top_p=top_p).view(n, 2)
        for row in range(2):
            freq = torch.bincount(draws[:, row], minlength=6).double() / n
            expected = (filter_logits(logits[row:row + 1] / temperature, top_p=top_p)
                        .softmax(-1)[0].double())
            assert torch.all(freq[expected == 0] == 0), (temperature, top_p, row)  # out of the nucleus: never
            # 4.5 standard deviations of a binomial frequency
            assert torch.all((freq - expected).abs()
                             <= 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-9), (
                temperature, top_p, row, freq, expected)


def test_fast_greedy_pick_is_the_first_maximum():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0], [-3.0, -2.0, -1.0, -1.0]])
    assert (cpu_kernels.sample_next(logits, temperature=0.0).tolist() == logits.argmax(-1).tolist()
            == [1, 0, 2])


def test_packed_weights_are_per_generation_and_follow_training():
    # the fused AdamW step changes the weights in place without bumping their _version: a packed copy kept
    # across generations would go stale unnoticed
    m = tiny_model(max_seq_len=32)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(18))
    opt = m.configure_optimizers(0.0, 0.1, (0.9, 0.95), "cpu")
    outputs = []
    for _ in range(3):
        outputs.append(m.generate(prompt, 10, temperature=0.0))
        assert torch.equal(outputs[-1], greedy_without_cache(m, prompt, 10))
        m.train()
        _, loss = m(prompt[:, :-1], prompt[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.eval()
    assert len({tuple(o[0].tolist()) for o in outputs}) == 3  # training did change what it generates


# ----------------------------------------------------------------- every model option through both paths

# A value for every field of ModelArgs other than tiny_model's: the Decoder computes the model a second
# way (weights packed and norms folded in), so each option the model has must give the same logits on both
# paths. A field added to ModelArgs fails here until it has a value below and both paths support it.
OTHER_VALUES = {"dim": 48, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 97, "hidden_dim": 72,
                "multiple_of": 24, "norm_eps": 0.5, "max_seq_len": 20, "dropout": 0.2, "rope_theta": 50.0}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ModelArgs)])
def test_every_model_option_gives_the_plain_paths_results(field):
    assert field in OTHER_VALUES, f"ModelArgs.{field} is new: give it a value in OTHER_VALUES, and make " \
                                  "llamatiny/cpu_kernels.py compute what model.py computes with it"
    m = tiny_model(**{field: OTHER_VALUES[field]})
    assert getattr(m.args, field) != getattr(tiny_model().args, field)
    fast, V, T = with_kernels(m), m.args.vocab_size, m.args.max_seq_len
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(30))

    # training's forward and backward (dropout's draws differ between the two kernels: without them there)
    grads = []
    for model in (m, fast):
        model.train(m.args.dropout == 0)
        logits, loss = model(tokens, tokens)
        loss.backward()
        grads.append((logits, *(p.grad for p in model.parameters())))
        model.eval()
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()

    # generation's steps, teacher-forced: a prefill, then one token at a time to the end of the context
    with torch.inference_mode():
        decoder = cpu_kernels.Decoder(fast)
        assert decoder.layers is not None  # the packed one-token path, not the fallback
        ours, plain = [decoder(tokens[:, :5], 0)], [plain_step(m, tokens[:, :5], 0)]
        for i in range(5, T):
            ours.append(decoder(tokens[:, i:i + 1], i))
            plain.append(plain_step(m, tokens[:, i:i + 1], i))
    for i, (a, b) in enumerate(zip(ours, plain, strict=True)):  # float32 rounding, over up to 20 steps
        assert a.shape == (2, V) and (a - b).abs().max() <= 1e-4 * b.abs().max(), i
    # and whole greedy generations, past the context (which slides)
    assert torch.equal(fast.generate(tokens[:, :5], T + 5, temperature=0.0),
                       m.generate(tokens[:, :5], T + 5, temperature=0.0))


# ----------------------------------------------------------------- which path runs when

@pytest.fixture
def paths(monkeypatch):
    # counts the calls of each CPU variant, each still doing its work
    runs = {"small_head": 0, "blocks": 0, "decode": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            runs[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    cls = cpu_kernels.SmallHeadCausalAttention
    monkeypatch.setattr(cls, "apply", counting("small_head", cls.apply))
    monkeypatch.setattr(cpu_kernels, "causal_attention_in_blocks",
                        counting("blocks", cpu_kernels.causal_attention_in_blocks))
    monkeypatch.setattr(cpu_kernels.Decoder, "decode", counting("decode", cpu_kernels.Decoder.decode))

    def taken(fn):
        for name in runs:
            runs[name] = 0
        fn()
        return {name for name, n in runs.items() if n}
    return taken


@pytest.mark.parametrize("attached", [True, False])
def test_each_kernel_runs_where_it_applies_and_only_when_attached(paths, attached):
    on = lambda *names: set(names) if attached else set()  # noqa: E731
    model = lambda **kw: (cpu_kernels.attach if attached else lambda m: m)(tiny_model(**kw).train())  # noqa: E731
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    hd8, hd16 = model(n_heads=4), model(n_heads=2)  # head dims 32/4 and 32/2
    assert paths(lambda: hd8(tokens, tokens)) == on("small_head")
    assert paths(lambda: hd16(tokens, tokens)) == set()  # PyTorch's kernel is faster from head dim 16
    long, long_tokens = model(n_heads=4, max_seq_len=520), tokens.repeat(1, 33)[:, :513]
    assert paths(lambda: long(long_tokens, long_tokens)) == set()  # T > 512
    dropout = model(n_heads=2, dropout=0.1)
    assert paths(lambda: dropout(tokens, tokens)) == on("blocks")  # training with dropout, any head size
    with torch.no_grad():
        assert paths(lambda: dropout.eval()(tokens, tokens)) == set()  # no dropout in eval
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert paths(lambda: hd8(tokens, tokens)) == on("small_head")  # it computes in float32
        assert paths(lambda: hd8.bfloat16()(tokens, tokens)) == set()  # a bf16 model: PyTorch's kernel
    # generation: the small-head kernel for the prefill, the packed decode for the steps after it
    assert paths(lambda: hd8.float().eval().generate(tokens[:, :4], 5)) == on("small_head", "decode")
    assert paths(lambda: hd16.eval().generate(tokens[:, :4], 5)) == on("decode")
    # and under torch.compile, PyTorch's attention: the compiler would unroll the small-head kernel's loop
    compiled = torch.compile(hd8.float().train(), backend="eager")
    assert paths(lambda: compiled(tokens, tokens)) == set()


def test_kernels_change_no_generated_token():
    m = tiny_model(n_heads=4, n_kv_heads=2, max_seq_len=32)  # head dim 8: every kernel that generation uses
    prompt = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(5))
    tokens, logits = {}, {}
    for enabled, model in ((True, with_kernels(m)), (False, m)):
        tokens[enabled] = model.generate(prompt, 40, temperature=0.0)  # slides past the context once
        logits[enabled] = all_logits(model.train(), prompt)  # training's path
        model.eval()
    assert torch.equal(tokens[True], tokens[False])
    assert (logits[True] - logits[False]).abs().max() < 1e-5 * logits[False].abs().max()


@pytest.mark.parametrize("norm_gain", [7.5, 1.0], ids=["peaked", "near-uniform"])
def test_greedy_decoding_of_a_15m_wide_model_is_the_plain_paths(norm_gain):
    # the 15M model's layer shapes with its own initialisation (a smaller vocabulary and fewer layers, for
    # time): the final norm's gain 7.5 gives a trained model's peaked distribution, 1.0 a fresh model's
    # near-uniform one, where the next token often wins by a small margin
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=288, n_layers=2, n_heads=6, vocab_size=2048, max_seq_len=96)).eval()
    with torch.no_grad():
        m.norm.weight.fill_(norm_gain)
    prompt = torch.tensor([[1, 403, 1200, 7]])
    fast = with_kernels(m).generate(prompt, 120, temperature=0.0)  # each slides past the context once
    assert torch.equal(fast, m.generate(prompt, 120, temperature=0.0))


# ----------------------------------------------------------------- memory
# page faults while a 256 MB block (a training step's logits: every page written) is allocated and freed,
# once the heap has settled: within a dozen rounds small allocations land in the freed blocks, and the
# holes they leave take a few rounds to merge into one as large as the block
REALLOCATION_FAULTS = """
def allocate_and_free():
    x = torch.ones(64 * 2**20)
    del x
for _ in range(16):
    allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    allocate_and_free()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
FAULTS_ON_REALLOCATION = """
import resource, sys, torch
from llamatiny import cpu_kernels
import model, tinystories  # the heap train.py's process has when main() applies the setting
applied = cpu_kernels.keep_freed_memory() if sys.argv[1] == "on" else None  # "off": glibc's defaults
""" + REALLOCATION_FAULTS + "print(applied, faults)"


def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    # glibc maps a block this large fresh from the kernel each time: 65,536 zeroed pages to fault in
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", FAULTS_ON_REALLOCATION, mode], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
        if out[0] == "False":
            pytest.skip("not glibc: keep_freed_memory() has nothing to tune here")
        faults[mode] = int(out[1])
    assert faults["off"] > 4 * 60_000  # 4 x 256 MB / 4 KB pages
    assert faults["on"] < 1_000  # the freed block is served again, already in memory
