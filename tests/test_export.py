"""llamatiny/checkpoint.py's formats and export.py's command line: llama2.c files (versions 0, 1, 2) and
tokenizer.bin read back byte by byte, a run.c-style forward pass on the exported file, Hugging Face
agreement (logits, greedy generation and where it stops, tokenizer), and the command line. The
helpers at the top (tiny tokenizer, tiny model, checkpoint) are shared with test_sample.py."""
import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import REFERENCE_CONFIGS

import export
import train
from configurator import parse_config
from llamatiny import checkpoint, lora
from llamatiny.checkpoint import CheckpointError, from_checkpoint
from llamatiny.corpus import make_stories
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
EXTRA_TEXT = ["Ünïcödé naïve café 😀 日本", "tabs\tand  double  spaces", "Tom said, \"Hi!\"\n\nThe end."]


def train_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    # llama2.c's trainer choices (BPE, byte fallback, ids unk=0 bos=1 eos=2), on the synthetic stories
    import sentencepiece as spm

    lines = [line for s in make_stories(300, seed=0) for line in s.split("\n") if line.strip()] + EXTRA_TEXT
    prefix = out_dir / f"tok{vocab_size}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        self_test_sample_size=0, input_format="text", character_coverage=1.0, num_threads=1,
        split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
        normalization_rule_name="identity", minloglevel=2)
    return prefix.with_suffix(".model")


def tiny_model(vocab_size=400, n_kv_heads=2, seed=0, std=0.3, **kw) -> Transformer:
    # weights far larger than the 0.02 init, so attention and RoPE matter: a wrong permutation or
    # layout changes the logits by whole units instead of hiding below the tolerance
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size, max_seq_len=64,
                multiple_of=16)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**args, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model.eval()


def save_checkpoint(path: Path, model: Transformer, tokenizer) -> Path:
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.args),
                "tokenizer": str(tokenizer) if tokenizer else None}, path)
    return path


def shape_of(args) -> dict:
    # multiple_of only derives hidden_dim; the files store hidden_dim itself
    return {k: v for k, v in dataclasses.asdict(args).items() if k != "multiple_of"}


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens, targets=tokens)[0]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return tiny_model(n_kv_heads=request.param)


TOKENS = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- llama2.c model files


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_float32_round_trip_is_exact(tmp_path, model, version):
    path = tmp_path / "model.bin"
    checkpoint.write_llama2c(path, model, version)
    loaded, ckpt = from_checkpoint(path)
    assert ckpt["tokenizer"] is None and ckpt["llama2c_version"] == version
    assert shape_of(loaded.args) == shape_of(model.args)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert torch.equal(logits_of(loaded, TOKENS), logits_of(model, TOKENS))


def test_llama2c_int8_round_trip_within_quantisation_error(tmp_path, model):
    path = tmp_path / "model.bin"
    info = checkpoint.write_llama2c(path, model, version=2, group_size=16)
    loaded, _ = from_checkpoint(path)
    state = loaded.state_dict()
    for name, t in model.state_dict().items():
        if t.dim() == 1:  # norms stay float32
            assert torch.equal(state[name], t), name
        else:  # each value within half a quantisation step of its group
            step = t.reshape(-1, 16).abs().amax(1, keepdim=True) / 127
            assert ((state[name] - t).reshape(-1, 16).abs() <= step / 2 + 1e-7).all(), name
    assert info["max_quant_error"] <= 0.3 * 4 / 127  # |w| < ~4 std
    ref, out = logits_of(model, TOKENS), logits_of(loaded, TOKENS)
    # end to end the error stays small (this deliberately chaotic model amplifies it more than a trained one)
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    n_norm = sum(t.numel() for t in model.parameters() if t.dim() == 1)
    n_matrix = sum(t.numel() for t in model.parameters() if t.dim() == 2)  # tied embedding counted once
    # int8 + a scale per group
    assert os.path.getsize(path) == 256 + 4 * n_norm + n_matrix + 4 * n_matrix // 16


def test_quantize_q80_handles_zero_groups_and_exact_values():
    w = torch.cat([torch.zeros(8), torch.linspace(-127, 127, 8)])
    q, scale = checkpoint.quantize_q80(w, 8)
    assert scale[0] == 0 and (q[:8] == 0).all()  # no NaN from 0 / 0
    assert torch.equal(checkpoint.dequantize_q80(q, scale, 8), w.round())


def test_headers_byte_by_byte(tmp_path, model):
    a = model.args
    params = (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len)
    checkpoint.write_llama2c(tmp_path / "v0.bin", model, 0)
    assert struct.unpack("<7i", (tmp_path / "v0.bin").read_bytes()[:28]) == params
    for version in (1, 2):
        checkpoint.write_llama2c(tmp_path / "v.bin", model, version, group_size=16)
        head = (tmp_path / "v.bin").read_bytes()[:256]
        assert struct.unpack_from("<I", head)[0] == 0x616B3432 and head[:4] == b"24ka"
        assert struct.unpack_from("<i7iB", head, 4) == (version, *params, 1)  # shared classifier
        end = 37
        if version == 2:
            assert struct.unpack_from("<i", head, 37)[0] == 16
            end = 41
        assert head[end:] == bytes(256 - end)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_untied_classifier_round_trips_in_every_version(tmp_path, version):
    # llama2.c's mark of a classifier of its own: a negative vocab_size in version 0 (run.c: shared_weights =
    # vocab_size > 0), the flag byte 0 in versions 1 and 2; the matrix comes after every other weight
    model = tiny_model(tie_embeddings=False)
    V, d, path = model.args.vocab_size, model.args.dim, tmp_path / "model.bin"
    classifier = model.output.weight.detach()
    checkpoint.write_llama2c(path, model, version, group_size=16 if version == 2 else None)
    raw = path.read_bytes()
    if version == 0:
        assert struct.unpack_from("<7i", raw)[5] == -V
    else:
        assert struct.unpack_from("<i7iB", raw, 4)[-1] == 0
    loaded, _ = from_checkpoint(path)
    assert not loaded.args.tie_embeddings and loaded.output.weight is not loaded.tok_embeddings.weight
    if version == 2:  # int8 values, then their scales, one per 16
        scales = V * d // 16 * 4
        assert np.array_equal(np.frombuffer(raw[-(V * d + scales):-scales], np.int8),
                              checkpoint.quantize_q80(classifier, 16)[0].numpy())
        agree = logits_of(loaded, TOKENS).argmax(-1) == logits_of(model, TOKENS).argmax(-1)
        assert agree.float().mean() > 0.8
        return
    assert np.array_equal(np.frombuffer(raw[-4 * V * d:], "<f4"), classifier.numpy().ravel())
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert torch.equal(logits_of(loaded, TOKENS), logits_of(model, TOKENS))


def read_v0_by_hand(path):
    # llama2.c's legacy layout, written out here independently of checkpoint.llama2c_layout
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = np.fromfile(path, dtype="<i4", count=7).tolist()
    data, pos = np.fromfile(path, dtype="<f4", offset=28), 0
    head, kv_dim = dim // n_heads, n_kv * dim // n_heads

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        pos += n
        return data[pos - n : pos].reshape(shape)

    w = {"tok": take(abs(vocab), dim), "rms_att": take(n_layers, dim), "wq": take(n_layers, dim, dim),
         "wk": take(n_layers, kv_dim, dim), "wv": take(n_layers, kv_dim, dim), "wo": take(n_layers, dim, dim),
         "rms_ffn": take(n_layers, dim), "w1": take(n_layers, hidden, dim), "w2": take(n_layers, dim, hidden),
         "w3": take(n_layers, hidden, dim), "rms_final": take(dim), "cos": take(seq_len, head // 2),
         "sin": take(seq_len, head // 2)}
    w["cls"] = w["tok"] if vocab > 0 else take(-vocab, dim)
    assert pos == data.size
    return (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len), w


def runc_generate(w, p, prompt, steps):
    # run.c's forward() and greedy loop, transcribed to numpy float32: one token at a time, KV cache,
    # RoPE on interleaved pairs with freq 10000^(-i/head_size), GQA head h reading kv head h // kv_mul
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = p
    hs, kv_mul = dim // n_heads, n_heads // n_kv
    kcache = np.zeros((n_layers, seq_len, n_kv * hs), np.float32)
    vcache = np.zeros_like(kcache)

    def rmsnorm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))

    def rope(vec, pos):
        i = np.arange(0, vec.size, 2)
        freq = 1.0 / 10000.0 ** ((i % hs) / hs)
        c, s = np.cos(pos * freq), np.sin(pos * freq)
        v0, v1 = vec[i].copy(), vec[i + 1].copy()
        vec[i], vec[i + 1] = v0 * c - v1 * s, v0 * s + v1 * c

    tokens, out = list(prompt), []
    for pos in range(len(prompt) + steps - 1):
        x = w["tok"][tokens[pos]].astype(np.float32)
        for layer in range(n_layers):
            xb = rmsnorm(x, w["rms_att"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            rope(q, pos)
            rope(k, pos)
            kcache[layer, pos], vcache[layer, pos] = k, v
            att_out = np.zeros(dim, np.float32)
            for h in range(n_heads):
                kv = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                scores = kcache[layer, : pos + 1, kv] @ q[h * hs : (h + 1) * hs] / np.sqrt(hs)
                att = np.exp(scores - scores.max())
                att_out[h * hs : (h + 1) * hs] = (att / att.sum()) @ vcache[layer, : pos + 1, kv]
            x = x + w["wo"][layer] @ att_out
            xb = rmsnorm(x, w["rms_ffn"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (h1 / (1 + np.exp(-h1)) * h3)
        logits = w["cls"] @ rmsnorm(x, w["rms_final"])
        if pos >= len(prompt) - 1:
            nxt = int(np.argmax(logits))
            out.append(nxt)
            tokens.append(nxt)
    return out


def test_version0_matches_runc_forward_greedy(tmp_path, model):
    # the "greedy run.c output equals sample.py's", with run.c's algorithm in numpy
    checkpoint.write_llama2c(tmp_path / "model.bin", model, 0)
    params, w = read_v0_by_hand(tmp_path / "model.bin")
    a = model.args
    assert params == (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.max_seq_len)
    sd = model.state_dict()
    assert np.array_equal(w["wk"][1], sd["layers.1.attention.wk.weight"].numpy())
    assert np.array_equal(w["w2"][0], sd["layers.0.feed_forward.w2.weight"].numpy())
    freq = 10000.0 ** (-np.arange(0, a.dim // a.n_heads, 2) / (a.dim // a.n_heads))
    assert np.allclose(w["cos"], np.cos(np.outer(np.arange(a.max_seq_len), freq)), atol=1e-5)
    prompt = [1, 17, 250, 3]
    ours = model.generate(torch.tensor([prompt]), 20, temperature=0.0)[0, len(prompt):].tolist()
    assert runc_generate(w, params, prompt, 20) == ours
    assert len(set(ours)) > 3  # a varied sequence, not one token repeated


def test_untied_version0_matches_runc_forward_greedy(tmp_path):
    model = tiny_model(tie_embeddings=False)
    checkpoint.write_llama2c(tmp_path / "model.bin", model, 0)
    params, w = read_v0_by_hand(tmp_path / "model.bin")
    assert np.array_equal(w["cls"], model.output.weight.detach().numpy())
    prompt = [1, 17, 250, 3]
    ours = model.generate(torch.tensor([prompt]), 20, temperature=0.0)[0, len(prompt):].tolist()
    assert runc_generate(w, params, prompt, 20) == ours
    # and the test can tell: with the embedding as the classifier, other tokens come out
    assert runc_generate({**w, "cls": w["tok"]}, params, prompt, 20) != ours


def test_group_size_must_divide_hidden_dim(tmp_path):
    # the 260K shape: dim 64 is a multiple of 64 but hidden_dim 172 is not (llama2.c exported it anyway)
    model = tiny_model(vocab_size=512, dim=64, n_heads=8, n_kv_heads=4, multiple_of=4, std=0.02)
    assert model.args.hidden_dim == 172
    with pytest.raises(CheckpointError, match=r"hidden_dim=172.*--group_size=4"):
        checkpoint.write_llama2c(tmp_path / "q.bin", model, version=2, group_size=64)
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary file
    checkpoint.write_llama2c(tmp_path / "q.bin", model, version=2, group_size=4)
    assert checkpoint.read_llama2c_header(tmp_path / "q.bin")["group_size"] == 4


def test_default_group_size_divides_both():
    # llama2.c's 64 halved until it fits: 15M (288, 768) -> 32; 260K (64, 172) -> 4; 110M (768, 2048) -> 64
    for dim, hidden, expected in ((288, 768, 32), (64, 172, 4), (768, 2048, 64)):
        args = ModelArgs(dim=dim, hidden_dim=hidden, n_heads=8 if dim == 64 else 6, vocab_size=512)
        assert checkpoint.default_group_size(args) == expected


def test_truncated_file_is_a_clear_error(tmp_path, model):
    path = tmp_path / "model.bin"
    checkpoint.write_llama2c(path, model, 1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        from_checkpoint(path)


def test_from_checkpoint_reads_bin(tmp_path, model):
    checkpoint.write_llama2c(tmp_path / "model.bin", model, 0)
    loaded, ckpt = from_checkpoint(tmp_path / "model.bin")
    assert ckpt["tokenizer"] is None and shape_of(ModelArgs(**ckpt["model_args"])) == shape_of(model.args)
    assert torch.equal(logits_of(loaded, TOKENS), logits_of(model, TOKENS))


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), checkpoint.atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(b"new, half written")
        raise RuntimeError("crash")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with checkpoint.atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_exported_files_and_folders_follow_the_umask(tmp_path, sp_model):
    # safetensors' save_file makes files only their owner may read (0600); ours are shared as any file is
    adapted = lora.attach(tiny_model(), rank=2, alpha=4.0)
    old = os.umask(0o027)
    try:
        checkpoint.write_hf(tmp_path / "hf", tiny_model(), sp_model)
        checkpoint.write_peft(tmp_path / "adapter", lora.record(adapted, {}), adapted.args)
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert "adapter/adapter_model.safetensors" in modes and "hf/model.safetensors" in modes
    assert modes == {name: 0o750 if (tmp_path / name).is_dir() else 0o640 for name in modes}


# ---------------------------------------------------------------- tokenizer.bin


def runc_decode(pieces, ids, bos_id):
    # run.c's decode(): strip the leading space after BOS, "<0xHH>" pieces are raw bytes
    out = b""
    for prev, tok in zip([bos_id] + ids, ids):
        piece = pieces[tok][0]
        if prev == bos_id and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out += piece
    return out.decode("utf-8", errors="replace")


def read_tokenizer_bin(path, vocab_size: int):
    # -> (max_token_length, [(piece bytes, score)]); the file does not store the vocab size
    data = Path(path).read_bytes()
    (max_len,), pos, pieces = struct.unpack_from("<I", data), 4, []
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, pos)
        pieces.append((data[pos + 8 : pos + 8 + n], score))
        pos += 8 + n
    assert pos == len(data), f"{len(data) - pos} bytes left after {vocab_size} tokens"
    return max_len, pieces


def check_tokenizer_bin(tmp_path, sp_path, texts):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    checkpoint.write_tokenizer_bin(tmp_path / "tokenizer.bin", sp_path)
    max_len, pieces = read_tokenizer_bin(tmp_path / "tokenizer.bin", sp.vocab_size())
    assert max_len == max(len(b) for b, _ in pieces)
    for i, (b, score) in enumerate(pieces):
        assert score == np.float32(sp.get_score(i))
        spaced = sp.id_to_piece(i).replace("\u2581", " ")
        expected = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, spaced)
        assert b == expected.encode("utf-8"), i
    for text in texts:
        ids = sp.encode(text)
        assert runc_decode(pieces, ids, sp.bos_id()) == sp.decode(ids)


def test_tokenizer_bin_pieces_scores_and_decoding(tmp_path, sp_model):
    check_tokenizer_bin(tmp_path, sp_model, make_stories(5, seed=3) + ["naïve 🐱 über\nnew line"])


def test_tokenizer_bin_llama2(tmp_path, llama2_tokenizer):
    check_tokenizer_bin(tmp_path, llama2_tokenizer, make_stories(5, seed=3) + ["naïve 🐱 über\nnew line"])


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def transformers():
    # requirements-dev.txt installs transformers, safetensors, protobuf: missing, these tests fail, not skip
    import transformers

    return transformers


def test_rope_permutation_inverts():
    w = torch.randn(6 * 8, 20)
    for heads in (6, 3, 1):
        assert torch.equal(checkpoint._rope_unpermute(checkpoint._rope_permute(w, heads), heads), w)
    assert not torch.equal(checkpoint._rope_permute(w, 6), w)


def hf_llama(args: ModelArgs):
    # a transformers.LlamaForCausalLM of args' shape, with transformers' own initial weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in checkpoint.hf_config(args).items()
              if k not in ("architectures", "model_type", "dtype", "torch_dtype", "rope_theta")}
    return LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager"))


def to_hf_model(model: Transformer):
    # an in-memory transformers.LlamaForCausalLM with model's weights, through the same name map
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    hf = hf_llama(model.args)
    hf.load_state_dict(checkpoint.to_hf_state_dict(state, model.args, tied=False),  # lm_head explicit
                       strict=True)
    return hf.eval()


@pytest.mark.slow
def test_hf_logits_and_greedy_generation_match(tmp_path, model, transformers, sp_model):
    checkpoint.write_hf(tmp_path, model, sp_model)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True,
                                                       attn_implementation="eager").eval()
    assert hf.config.num_key_value_heads == model.args.n_kv_heads
    ref = logits_of(model, TOKENS)
    with torch.no_grad():
        assert (hf(TOKENS).logits - ref).abs().max() < 1e-4
        prompt = TOKENS[:1, :5]
        theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = model.generate(prompt, 30, temperature=0.0)
    assert ours.tolist() == theirs.tolist()
    # the in-memory conversion is the same mapping
    with torch.no_grad():
        assert (to_hf_model(model)(TOKENS).logits - ref).abs().max() < 1e-4
        # and the test can tell: without the RoPE permutation the logits are far off
        unpermuted = {theirs: model.state_dict()[ours]
                      for ours, theirs, _ in checkpoint.hf_name_map(model.args)}
        hf.load_state_dict(unpermuted, strict=True)
        assert (hf(TOKENS).logits - ref).abs().max() > 0.1


def test_hf_round_trip_and_dtype(tmp_path, model, transformers):
    checkpoint.write_hf(tmp_path / "f32", model)
    loaded, ckpt = from_checkpoint(tmp_path / "f32")
    assert shape_of(loaded.args) == shape_of(model.args) and ckpt["tokenizer"] is None
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    from safetensors import safe_open

    checkpoint.write_hf(tmp_path / "bf16", model, dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in f.keys()  # tied
    config = json.loads((tmp_path / "bf16" / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    loaded, _ = from_checkpoint(tmp_path / "bf16")
    assert torch.equal(loaded.state_dict()["norm.weight"], model.norm.weight.detach().bfloat16().float())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_parameter_counts_equal_transformers(name, tie, transformers):
    # the same shape in transformers' LlamaForCausalLM (tie_word_embeddings from our config.json): the same
    # count, and without the embedding the same as its num_parameters(exclude_embeddings=True)
    with torch.device("meta"):
        ours = Transformer(ModelArgs(**REFERENCE_CONFIGS[name][0], tie_embeddings=tie))
        theirs = hf_llama(ours.args)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert ours.num_params(non_embedding=True) == theirs.num_parameters(exclude_embeddings=True)


def test_the_hf_tinystories_recipe_has_transformers_count(transformers):
    # a Hugging Face recipe, as its users write it: LlamaConfig with the Llama 2 tokenizer's 32,000 tokens and
    # transformers' default tie_word_embeddings=False; the same model from train.py's command line
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=16,
                                      num_hidden_layers=4, num_key_value_heads=8, vocab_size=32000)
    c = train.parse_settings(["--dim=256", "--hidden_dim=768", "--n_heads=16", "--n_layers=4",
                              "--n_kv_heads=8", "--tie_embeddings=False", "--weight_init=hf"])
    with torch.device("meta"):
        theirs, ours = transformers.LlamaForCausalLM(config), Transformer(ModelArgs.from_dict(c))
    assert not config.tie_word_embeddings and c["vocab_size"] == 32000
    n = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() == n and f"{n / 1e6:.1f}M" == "19.5M"  # the recipe's published size


def test_hf_init_draws_as_transformers_does(transformers):
    # init='hf' against transformers' own init of the same shape: every matrix's std, matched by name
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, hidden_dim=384, tie_embeddings=False)
    torch.manual_seed(0)
    ours, theirs = Transformer(args, init="hf").state_dict(), hf_llama(args).state_dict()
    default = Transformer(args).state_dict()  # gpt2: narrower residual projections
    for name, hf_name, _ in checkpoint.hf_name_map(args):
        assert ours[name].std().item() == pytest.approx(theirs[hf_name].std().item(), rel=0.05), name
        assert ours[name].mean().item() == pytest.approx(theirs[hf_name].mean().item(), abs=1e-3), name
        if name.endswith("wo.weight"):
            assert default[name].std().item() < 0.6 * theirs[hf_name].std().item()


def test_hf_untied_lm_head_both_ways(tmp_path, transformers):
    from safetensors import safe_open

    model = tiny_model(tie_embeddings=False)
    checkpoint.write_hf(tmp_path / "ours", model)
    config = json.loads((tmp_path / "ours" / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is False
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), model.output.weight.detach())
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", local_files_only=True,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(TOKENS).logits - logits_of(model, TOKENS)).abs().max() < 1e-4
    loaded, _ = from_checkpoint(tmp_path / "ours")
    assert not loaded.args.tie_embeddings
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in model.state_dict().items())

    # transformers' own untied model, as its save_pretrained writes it
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=400,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    theirs = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    loaded, _ = from_checkpoint(tmp_path / "theirs")
    assert not loaded.args.tie_embeddings
    with torch.no_grad():
        assert (theirs(TOKENS).logits - logits_of(loaded.eval(), TOKENS)).abs().max() < 1e-4

    # a config that says untied beside weights without an lm_head: refused, saying what to change
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "theirs" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "theirs" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false .* no lm_head.weight"):
        from_checkpoint(tmp_path / "theirs")


def test_hf_generate_stops_at_bos_or_eos(tmp_path, sp_model, transformers):
    # a TinyStories model ends a story by emitting BOS (the shards separate stories with it); make the
    # greedy continuation do that mid-way: BOS's (tied) row becomes a slightly longer copy of token x's,
    # so wherever x would win, BOS wins instead
    model, prompt = tiny_model(), TOKENS[:1, :5]
    assert not {1, 2} & set(prompt[0].tolist())  # BOS=1, EOS=2 in the test tokenizer
    free = model.generate(prompt, 30, temperature=0.0)[0, 5:].tolist()
    x = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i] and t not in (1, 2))
    with torch.no_grad():
        model.tok_embeddings.weight[1] = 1.05 * model.tok_embeddings.weight[x]
    ours = model.generate(prompt, 30, temperature=0.0)[0].tolist()
    ends = 5 + min(i for i, t in enumerate(ours[5:]) if t in (1, 2)) + 1
    assert 5 + 3 <= ends < len(ours) and ours[ends - 1] == 1  # a few tokens, then BOS, then more

    checkpoint.write_hf(tmp_path, model, sp_model)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((tmp_path / name).read_text(encoding="utf-8"))
        assert config["eos_token_id"] == [2, 1] and config["bos_token_id"] == 1, name
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        stopped = hf.generate(prompt, max_new_tokens=30, do_sample=False)
        # and the test can tell: stopping at EOS only, generation runs on past the BOS
        eos_only = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert stopped[0].tolist() == ours[:ends]
    assert eos_only[0].tolist() == ours


def check_hf_tokenizer(tmp_path, sp_path, transformers, vocab_size):
    import google.protobuf  # noqa: F401  AutoTokenizer needs it; without, transformers asks for tiktoken instead
    import sentencepiece as spm

    model = tiny_model(vocab_size=vocab_size, dim=16, n_heads=2, n_kv_heads=1, n_layers=1)
    checkpoint.write_hf(tmp_path, model, sp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    # ordinary story text (single spaces; transformers' converted tokenizer differs from
    # sentencepiece on runs of spaces, a transformers matter)
    texts = make_stories(20, seed=5) + ["Tom said, \"Hi!\"\n\nThe end.", "naïve café über 🐱", ""]
    for cls in (transformers.AutoTokenizer, transformers.LlamaTokenizer):
        tok = cls.from_pretrained(tmp_path, local_files_only=True)
        assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
        for text in texts:
            ids = tok(text)["input_ids"]
            assert ids == [sp.bos_id()] + sp.encode(text), text
            assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])


def test_hf_tokenizer_loads_offline_and_encodes_like_sentencepiece(tmp_path, sp_model, transformers):
    check_hf_tokenizer(tmp_path, sp_model, transformers, 400)


def test_hf_tokenizer_llama2(tmp_path, llama2_tokenizer, transformers):
    check_hf_tokenizer(tmp_path, llama2_tokenizer, transformers, 32000)


# ---------------------------------------------------------------- command line


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        export.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_writes_every_format(tmp_path, sp_model, capsys):
    model = tiny_model()
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, sp_model)
    runs = {0: "./run", 1: None, 2: "./runq"}  # which llama2.c program reads each version
    for version, program in runs.items():
        out = tmp_path / f"v{version}" / "model.bin"
        export.main([str(out), f"--checkpoint={ckpt}", f"--version={version}"]
                    + (["--group_size=16"] if version == 2 else []))
        assert sorted(os.listdir(out.parent)) == ["model.bin", "model.tokenizer.bin"]
        assert checkpoint.read_llama2c_header(out)["version"] == version
        printed = capsys.readouterr().out
        assert f"llama2.c version {version}" in printed
        assert ("quantisation error" in printed) == (version == 2)
        if program:  # the command that runs it, with the tokenizer written beside it
            assert f"{program} {out} -z {out.parent / 'model.tokenizer.bin'}\n" in printed, printed
        else:
            assert "run.c reads version 0" in printed and "malloc failed!" in printed, printed
    export.main([str(tmp_path / "hf"), f"--checkpoint={ckpt}", "--format=hf", "--dtype=float16"])
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json",
                                                   "model.safetensors", "tokenizer.model",
                                                   "tokenizer_config.json"]
    assert "pip install transformers safetensors protobuf sentencepiece" in capsys.readouterr().out
    # import: a llama2.c file plus its tokenizer -> our checkpoint, and an HF directory -> our checkpoint
    export.main([str(tmp_path / "from_bin.pt"), f"--checkpoint={tmp_path / 'v0' / 'model.bin'}",
                 "--format=pt", f"--tokenizer={sp_model}"])
    export.main([str(tmp_path / "from_hf.pt"), f"--checkpoint={tmp_path / 'hf'}", "--format=pt"])
    for name in ("from_bin.pt", "from_hf.pt"):
        loaded, ckpt = from_checkpoint(tmp_path / name)
        assert Path(ckpt["tokenizer"]).read_bytes() == sp_model.read_bytes()
    assert torch.equal(from_checkpoint(tmp_path / "from_bin.pt")[0].norm.weight, model.norm.weight)


@pytest.mark.parametrize("args, message", [
    (["--format=onnx"], "--format=onnx"),
    (["--dtype=bfloat16"], "--dtype applies to --format=hf and gguf only"),
    (["--group_size=32"], "--group_size applies to"),
    (["--version=3"], "--version=3"),
    (["--format=hf", "--version=1"], "--version applies"),
    (["--format=hf", "--dtype=float8"], "--dtype=float8"),
    (["--version=2", "--group_size=48"], "must divide dim=64 and hidden_dim=176"),
    (["--checkpoint=missing.pt"], "no checkpoint at missing.pt"),
    (["--tokenizer=missing.model"], "tokenizer not found"),
    (["--bogus=1"], "unknown config key 'bogus'"),
])
def test_cli_errors_are_one_line(tmp_path, sp_model, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    save_checkpoint(tmp_path / "ckpt.pt", tiny_model(), sp_model)
    code, out, err = run_cli(capsys, "model.bin", "--checkpoint=ckpt.pt", *args)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "model.bin").exists()


def test_cli_vocab_mismatch_and_usage(tmp_path, sp_model, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tiny_model(vocab_size=500), sp_model)
    code, _, err = run_cli(capsys, tmp_path / "m.bin", f"--checkpoint={ckpt}")
    assert code == 1 and "has 400 tokens but the model has vocab_size=500" in err
    code, _, err = run_cli(capsys, f"--checkpoint={ckpt}")
    assert code == 1 and err.startswith("error: usage: python export.py OUT")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_lists_every_option_with_its_default(tmp_path, capsys, flag):
    export.main(["model.bin", flag])  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python export.py OUT") and "run.c reads version 0" in out
    # every option shown, typed back as shown, is accepted and means its default
    shown = re.findall(r"^  (--\w+=\S+)", out, flags=re.M)
    assert len(shown) == len(export.OPTIONS)
    for option in shown:
        assert export.check_options(parse_config(export.DEFAULTS, [option])) == \
            export.check_options(dict(export.DEFAULTS)), option
    assert not (tmp_path / "model.bin").exists()


def test_cli_exports_with_two_vocabularies_share_a_folder(tmp_path, sp_model, capsys):
    # each model file gets its own tokenizer: the second export does not overwrite the first's
    small_sp = train_tokenizer(tmp_path, vocab_size=360)
    for name, vocab_size, sp_path in (("a", 400, sp_model), ("b", 360, small_sp)):
        ckpt = save_checkpoint(tmp_path / f"{name}.pt", tiny_model(vocab_size=vocab_size), sp_path)
        export.main([str(tmp_path / "out" / f"{name}.bin"), f"--checkpoint={ckpt}"])
    assert sorted(os.listdir(tmp_path / "out")) == ["a.bin", "a.tokenizer.bin", "b.bin", "b.tokenizer.bin"]
    for name, vocab_size in (("a", 400), ("b", 360)):  # read_tokenizer_bin checks the exact count
        pieces = read_tokenizer_bin(tmp_path / "out" / f"{name}.tokenizer.bin", vocab_size)[1]
        assert len(pieces) == vocab_size


def test_cli_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n", encoding="utf-8")
    for path in (text, tmp_path / "notes.bin"):  # torch.load's error, and the llama2.c reader's
        if path.suffix == ".bin":
            path.write_bytes(text.read_bytes())
        code, _, err = run_cli(capsys, tmp_path / "m.bin", f"--checkpoint={path}")
        assert code == 1 and err.startswith(f"error: cannot load --checkpoint={path}: "), err
        assert err.count("\n") == 1, err
    assert not (tmp_path / "m.bin").exists()


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "export.py"), str(tmp_path / "m.bin"),
                             f"--checkpoint={tmp_path / 'missing.pt'}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: no checkpoint at")


def test_cli_reads_a_run_folder_s_best_checkpoint_and_says_so(tmp_path, sp_model, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out" / "15m"
    run.mkdir(parents=True)
    best, latest = tiny_model(seed=1), tiny_model(seed=2)
    save_checkpoint(run / "ckpt_best.pt", best, sp_model)
    save_checkpoint(run / "ckpt.pt", latest, sp_model)
    for argv in (["a.pt", "--checkpoint=out/15m", "--format=pt"], ["b.pt", "--format=pt"]):  # the default too
        export.main(argv)
        out, err = capsys.readouterr()
        assert "read out/15m/ckpt_best.pt (" in out, out
        assert "reading out/15m/ckpt_best.pt (its best val loss; ckpt.pt is the latest)" in err, err
        wq = from_checkpoint(argv[0])[0].layers[0].attention.wq.weight
        assert torch.equal(wq, best.layers[0].attention.wq.weight)
        assert not torch.equal(wq, latest.layers[0].attention.wq.weight)
