"""export.py --format=gguf: the file read back with the gguf package's own reader (tensor names, shapes, types
and values, the architecture's settings, the tokenizer against sentencepiece, q8_0 within its rounding), the
command line (every model source, LoRA merged, one-line errors), and, where llama-cpp-python is installed,
llama.cpp itself: its greedy tokens equal sample.py's (float32 and float16 files), its q8_0 logits stay near
ours, a wrong RoPE layout is caught, and an instruction-tuned model's chat template renders our prompt."""
import dataclasses
import json
import sys

import gguf  # requirements-dev.txt installs it: missing, these tests fail, not skip
import numpy as np
import pytest
import torch
from test_export import run_cli, save_checkpoint, tiny_model, train_tokenizer

import export
import sample
import tinystories
import train
from llamatiny import checkpoint, generate, instruct
from llamatiny.checkpoint import from_checkpoint
from llamatiny.corpus import make_stories, write_endoftext
from llamatiny.tokenizer import Tokenizer

# the trained model: shapes whose rows all split into q8_0's blocks of 32 (dim 32, hidden_dim 96)
TINY = ["--vocab_source=custom", "--vocab_size=512", "--dim=32", "--n_layers=2", "--n_heads=4",
        "--n_kv_heads=2", "--multiple_of=32", "--max_seq_len=64", "--batch_size=8",
        "--gradient_accumulation_steps=1", "--eval_iters=1", "--log_interval=100", "--warmup_iters=10",
        "--learning_rate=1e-2", "--device=cpu", "--compile=False", "--dropout=0.0"]
# llama.cpp's names, by ours (typed here from its tensor list, apart from the writer's mapping)
LLAMA_CPP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "attention_norm": "attn_norm",
                   "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                   "attention.wo": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
                   "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
PROMPT = "Once upon a time"
ENDING = "Tom and Sue played with the kite all day. And they lived happily ever"  # the story ends: " after."


def llama_cpp_name(ours: str) -> str:
    key = ours.removesuffix(".weight")
    if key.startswith("layers."):
        _, i, key = key.split(".", 2)
        return f"blk.{i}.{LLAMA_CPP_NAMES[key]}.weight"
    return f"{LLAMA_CPP_NAMES[key]}.weight"


def metadata(path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def values(t) -> np.ndarray:
    # a tensor as float32 in PyTorch's (out, in) order, whatever its type in the file
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def train_tiny(*args):
    # on one thread, as train.py's main() would set for a tiny model: its steps are too small to share, and
    # two threads on a busy machine wait for each other at every op (40x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.train(train.parse_settings(TINY + list(args)))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    # a few hundred steps on the synthetic stories: greedy text that is a story, not one token repeated
    out = tmp_path_factory.mktemp("gguf_trained")
    train_tiny("--dataset=fixture", "--max_iters=300", "--eval_interval=300", f"--data_dir={data_dir}",
               f"--out_dir={out}")
    return out / "ckpt.pt"


# ---------------------------------------------------------------- read back with gguf's reader


def test_weights_and_settings_read_back(trained, tmp_path, capsys):
    model, ckpt = from_checkpoint(trained)
    export.main([str(tmp_path / "m.gguf"), f"--checkpoint={trained}", "--format=gguf"])
    printed = capsys.readouterr().out
    assert f'llama-completion -m {tmp_path / "m.gguf"} -no-cnv -p "Once upon a time"' in printed, printed
    a, meta = model.args, metadata(tmp_path / "m.gguf")
    assert {k: v for k, v in meta.items() if k.startswith(("llama.", "general."))} == {
        "general.architecture": "llama", "general.file_type": 0, "general.quantization_version": 2,
        "llama.context_length": 64, "llama.embedding_length": 32, "llama.feed_forward_length": 96,
        "llama.block_count": 2, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 8, "llama.vocab_size": 512,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(a.norm_eps)}
    assert "tokenizer.chat_template" not in meta  # not instruction-tuned
    found = tensors(tmp_path / "m.gguf")
    state = model.state_dict()
    # tied: no output.weight, so that llama.cpp uses token_embd for the classifier
    assert sorted(found) == sorted(llama_cpp_name(k) for k in state if k != "output.weight")
    for name, w in state.items():
        if name == "output.weight":
            continue
        t = found[llama_cpp_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert t.shape.tolist() == list(reversed(w.shape)), name  # GGUF: innermost dimension first
        # exact, wq and wk included: Meta's RoPE layout is llama.cpp's, no permutation
        assert np.array_equal(values(t), w.numpy()), name


@pytest.mark.parametrize("dtype, file_type", [("float16", 1), ("bf16", 32), ("q8_0", 7)])
def test_float16_bfloat16_and_q8_0(sp_model, tmp_path, capsys, dtype, file_type):
    # hidden_dim 176: ffn_down's rows (176) do not split into q8_0's blocks of 32; that one stays float16
    model = tiny_model()
    ckpt = save_checkpoint(tmp_path / "c.pt", model, sp_model)
    export.main([str(tmp_path / "m.gguf"), f"--checkpoint={ckpt}", "--format=gguf", f"--dtype={dtype}"])
    printed = capsys.readouterr().out
    assert metadata(tmp_path / "m.gguf")["general.file_type"] == file_type
    wanted = {"float16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    found = tensors(tmp_path / "m.gguf")
    for name, w in model.state_dict().items():
        if name == "output.weight":
            continue
        t, w = found[llama_cpp_name(name)], w.float()
        kept = dtype == "q8_0" and "w2" in name
        expected = "F32" if w.dim() == 1 else "F16" if kept else wanted
        assert t.tensor_type.name == expected, name
        got = torch.from_numpy(values(t).copy())
        if expected == "F32":
            assert torch.equal(got, w), name
        elif expected == "F16":
            assert torch.equal(got, w.half().float()), name
        elif expected == "BF16":
            assert torch.equal(got, w.bfloat16().float()), name
        else:  # each value within half a step of its block of 32, plus up to 127 times the rounding of the
            # step to float16 (2^-11 of it): 0.5625 steps
            step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            assert ((got - w).reshape(-1, 32).abs() <= 0.5625 * step).all(), name
            assert not torch.equal(got, w)
    assert ("2 matrices have rows that q8_0's blocks of 32 do not divide" in printed) == (dtype == "q8_0")


def test_untied_classifier_is_written(tmp_path, sp_model):
    model = tiny_model()
    model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight))  # untie
    checkpoint.write_gguf(tmp_path / "m.gguf", model, sp_model)
    found = tensors(tmp_path / "m.gguf")
    assert np.array_equal(values(found["output.weight"]), model.output.weight.detach().numpy())
    assert np.array_equal(values(found["token_embd.weight"]), model.tok_embeddings.weight.detach().numpy())


def check_tokenizer(path, sp_path, user_defined=()):
    import sentencepiece as spm

    sp, meta = spm.SentencePieceProcessor(model_file=str(sp_path)), metadata(path)
    n = sp.vocab_size()
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert np.array_equal(np.array(meta["tokenizer.ggml.scores"], np.float32),
                          np.array([sp.get_score(i) for i in range(n)], np.float32))
    types = {i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5
             if sp.is_unused(i) else 4 if sp.id_to_piece(i) in user_defined else 1 for i in range(n)}
    assert meta["tokenizer.ggml.token_type"] == [types[i] for i in range(n)]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert meta.get("tokenizer.ggml.padding_token_id", -1) == sp.pad_id()  # written when there is one
    assert meta["tokenizer.ggml.eot_token_id"] == sp.bos_id()  # a story ends with the next one's BOS
    assert meta["tokenizer.ggml.add_bos_token"] and not meta["tokenizer.ggml.add_eos_token"]
    assert meta["tokenizer.ggml.add_space_prefix"] == sp.encode("a", out_type=str)[0].startswith("\u2581")
    return types


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def special_gguf(tmp_path_factory) -> tuple:
    # train_vocab --special_tokens makes user-defined pieces, which llama.cpp must match whole; and a pad id
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("special")
    lines = [line for s in make_stories(300, seed=0) for line in s.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "sp"), model_type="bpe", vocab_size=400,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity", pad_id=3,
        user_defined_symbols=["Story:", "<|x|>"], remove_extra_whitespaces=False, minloglevel=2,
        self_test_sample_size=0, num_threads=1)
    ckpt = save_checkpoint(root / "c.pt", tiny_model(vocab_size=400), root / "sp.model")
    export.main([str(root / "m.gguf"), f"--checkpoint={ckpt}", "--format=gguf"])
    return root / "m.gguf", root / "sp.model"


def test_tokenizer_with_special_tokens_and_padding(special_gguf):
    types = check_tokenizer(*special_gguf, user_defined=("Story:", "<|x|>"))
    assert sorted(types.values()).count(4) == 2 and types[3] == 3  # the two pieces; <pad> is a control


@pytest.mark.slow  # gguf's reader takes seconds over 32,000 strings
def test_tokenizer_llama2(tmp_path, llama2_tokenizer):
    model = tiny_model(vocab_size=32000, dim=16, n_heads=2, n_kv_heads=1, n_layers=1)
    checkpoint.write_gguf(tmp_path / "m.gguf", model, llama2_tokenizer)
    types = check_tokenizer(tmp_path / "m.gguf", llama2_tokenizer)
    assert list(types.values()).count(6) == 256  # the byte pieces


def test_instruction_template_is_the_chat_template(tmp_path, sp_model, capsys):
    ckpt = tmp_path / "c.pt"
    model = tiny_model()
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.args),
                "tokenizer": str(sp_model), "template": instruct.template_info("chat")}, ckpt)
    export.main([str(tmp_path / "m.gguf"), f"--checkpoint={ckpt}", "--format=gguf"])
    assert metadata(tmp_path / "m.gguf")["tokenizer.chat_template"] == instruct.hf_chat_template("chat")
    assert f"chat with it in llama.cpp: llama-cli -m {tmp_path / 'm.gguf'}\n" in capsys.readouterr().out


# ---------------------------------------------------------------- the command line


def test_every_source_exports(trained, data_dir, tmp_path, capsys):
    # a llama2.c file (with --tokenizer), a Hugging Face directory and a LoRA fine-tune (merged)
    model, ckpt = from_checkpoint(trained)
    checkpoint.write_llama2c(tmp_path / "m.bin", model)
    checkpoint.write_hf(tmp_path / "hf", model, ckpt["tokenizer"])
    train_tiny("--dataset=fixture", "--max_iters=2", "--eval_interval=2", "--lora_rank=4",
               f"--init_from={trained}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'lora'}")
    merged, lora_ckpt = from_checkpoint(tmp_path / "lora" / "ckpt.pt")
    assert "lora" in lora_ckpt
    sources = {"bin": ([f"--checkpoint={tmp_path / 'm.bin'}", f"--tokenizer={ckpt['tokenizer']}"], model),
               "hf": ([f"--checkpoint={tmp_path / 'hf'}"], model),
               "lora": ([f"--checkpoint={tmp_path / 'lora' / 'ckpt.pt'}"], merged)}
    for name, (args, expected) in sources.items():
        export.main([str(tmp_path / f"{name}.gguf"), "--format=gguf"] + args)
        found = tensors(tmp_path / f"{name}.gguf")
        for key, w in expected.state_dict().items():
            if key != "output.weight":
                assert np.array_equal(values(found[llama_cpp_name(key)]), w.float().numpy()), (name, key)
        check_tokenizer(tmp_path / f"{name}.gguf", ckpt["tokenizer"])
    assert "merging the LoRA adapters" in capsys.readouterr().out
    base_wq = model.state_dict()["layers.0.attention.wq.weight"]
    assert not torch.equal(merged.state_dict()["layers.0.attention.wq.weight"], base_wq)  # the adapters count


@pytest.mark.parametrize("args, message", [
    (["--format=gguf", "--dtype=float8"], "--dtype=float8: choose one of float32, float16, bfloat16, q8_0"),
    (["--format=hf", "--dtype=q8_0"], "--dtype=q8_0: choose one of float32, bfloat16, float16"),
    (["--format=gguf", "--version=2"], "--version applies to --format=llama2c only"),
    (["--format=gguf", "--checkpoint=m.bin"], "a GGUF file holds the tokenizer, and m.bin records none: pass "
                                              "--tokenizer="),
])
def test_errors_are_one_line(tmp_path, sp_model, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    checkpoint.write_llama2c(tmp_path / "m.bin", tiny_model())
    save_checkpoint(tmp_path / "ckpt.pt", tiny_model(), sp_model)
    code, _, err = run_cli(capsys, "model.gguf", "--checkpoint=ckpt.pt", *args)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "model.gguf").exists()


def test_a_folder_or_no_gguf_package_is_one_line(tmp_path, sp_model, capsys, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tiny_model(), sp_model)
    code, _, err = run_cli(capsys, tmp_path, f"--checkpoint={ckpt}", "--format=gguf")
    assert code == 1 and err == f"error: {tmp_path} is a directory; --format=gguf writes one file, such as " \
                                "out/model.gguf\n"
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    code, _, err = run_cli(capsys, tmp_path / "m.gguf", f"--checkpoint={ckpt}", "--format=gguf")
    assert code == 1 and err == "error: --format=gguf needs llama.cpp's gguf package: pip install gguf\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# ---------------------------------------------------------------- llama.cpp itself (llama-cpp-python)


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: `pip install llama-cpp-python` builds llama.cpp from "
                    "source (minutes) and runs the GGUF files in it; the reader tests run without it")
    return llama_cpp


def load(llama_cpp, path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, verbose=False, **kw)


def sample_py(capsys, ckpt, n, **options) -> tuple[list[int], str]:
    # sample.py's greedy story: its new ids (through the command's own setup and generate_story) and the text
    # the command prints
    argv = [f"--checkpoint={ckpt}", "--temperature=0", f"--max_new_tokens={n}", "--device=cpu"] + [
        f"--{k}={v}" for k, v in options.items()]
    cfg, model, tok, prompts, echo = sample.setup(argv)
    ids = generate.generate_story(model, tok, prompts[0], cfg, lambda text: None, echo)
    capsys.readouterr()
    sample.main(argv)
    return ids, capsys.readouterr().out


def is_end(llama_cpp, llm, token: int) -> bool:
    return llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token)


def greedy(llama_cpp, llm, prompt_ids, n) -> list[int]:
    # llama.cpp's own greedy sampler (temperature 0), stopping where it stops: an end-of-generation token
    out = []
    for token in llm.generate(prompt_ids, temp=0.0, reset=True):
        if is_end(llama_cpp, llm, token) or len(out) == n:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_llama_cpp_greedy_equals_sample_py(llama_cpp, trained, tmp_path, capsys, dtype):
    export.main([str(tmp_path / "m.gguf"), f"--checkpoint={trained}", "--format=gguf", f"--dtype={dtype}"])
    llm = load(llama_cpp, tmp_path / "m.gguf")
    tok = Tokenizer(from_checkpoint(trained)[1]["tokenizer"])
    n, new = 48, {}
    for prompt in (PROMPT, ENDING):
        ours, text = sample_py(capsys, trained, n, prompt=prompt)
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=True)
        assert prompt_ids == tok.encode(prompt)  # llama.cpp's tokenizer, from the file, is ours
        assert greedy(llama_cpp, llm, prompt_ids, n) == ours
        completion = llm.create_completion(prompt, max_tokens=n, temperature=0.0)["choices"][0]
        assert prompt + completion["text"] + "\n" == text  # the text, and where the story ends
        new[prompt] = (ours, completion["finish_reason"])
    ours, finish = new[PROMPT]
    assert len(ours) == n and len(set(ours)) > 10 and finish == "length"  # a story, not one token repeated
    ours, finish = new[ENDING]
    assert 0 < len(ours) < n and finish == "stop"  # "after." and the next story's BOS: both stop there


def test_llama_cpp_logits_float32_and_q8_0(llama_cpp, trained, tmp_path):
    model, ckpt = from_checkpoint(trained)
    ids = Tokenizer(ckpt["tokenizer"]).encode(
        "Once upon a time, there was a little dog named Tom. Tom had a red ball and loved to play.")
    assert 20 < len(ids) <= 64
    with torch.no_grad():
        ref = model(torch.tensor([ids]), torch.tensor([ids]))[0][0].numpy()  # (T, vocab)

    def llama_cpp_logits(path):
        # a float32 KV cache (llama.cpp's default is float16): the file's weights are all that differs
        llm = load(llama_cpp, path, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                   type_v=llama_cpp.GGML_TYPE_F32)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    def error(logits):  # (largest, mean) difference from ours, in standard deviations of our logits
        diff = np.abs(logits - ref) / ref.std()
        return diff.max(), diff.mean()

    # float32: the same numbers up to the order of summation (measured: 2e-6 at most)
    export.main([str(tmp_path / "f32.gguf"), f"--checkpoint={trained}", "--format=gguf"])
    assert error(llama_cpp_logits(tmp_path / "f32.gguf"))[0] < 1e-4
    # q8_0 (weights and, in llama.cpp's products, activations in int8 blocks of 32): within 0.2 standard
    # deviations, 0.03 on average (measured: 0.065 and 0.010), and the same likeliest token
    export.main([str(tmp_path / "q8.gguf"), f"--checkpoint={trained}", "--format=gguf", "--dtype=q8_0"])
    q8 = llama_cpp_logits(tmp_path / "q8.gguf")
    largest, mean = error(q8)
    assert largest < 0.2 and mean < 0.03, (largest, mean)
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    # and the comparison can tell: wq, wk in Hugging Face's row order (the permutation llama.cpp's converter
    # undoes) rotate the wrong pairs, so every position after the first is off
    for name, w in model.state_dict().items():
        heads = {"wq": model.args.n_heads, "wk": model.args.n_kv_heads}.get(name.split(".")[-2])
        if heads:
            w.copy_(checkpoint._rope_permute(w, heads))
    checkpoint.write_gguf(tmp_path / "wrong.gguf", model, ckpt["tokenizer"])
    wrong = np.abs(llama_cpp_logits(tmp_path / "wrong.gguf") - ref).max(-1) / ref.std()
    assert wrong[0] < 1e-4 and wrong[1:].min() > 0.01, wrong


def test_llama_cpp_tokenizes_a_prompt_with_special_tokens_as_sentencepiece(llama_cpp, special_gguf):
    import sentencepiece as spm

    path, sp_path = special_gguf
    sp, llm = spm.SentencePieceProcessor(model_file=str(sp_path)), load(llama_cpp, path)
    # an instruction prompt ends with its marker; where text follows such a piece ("Story: Once"), llama.cpp
    # puts a space before the text and sentencepiece does not
    for text in ("Words: dog, ball\nSummary: A dog runs.\nStory:", "Once upon a time"):
        assert llm.tokenize(text.encode(), add_bos=True) == [sp.bos_id()] + sp.encode(text), text


@pytest.mark.parametrize("template", ["story", "chat"])
def test_llama_cpp_chat_template_round_trip(llama_cpp, trained, tmp_path, capsys, template):
    # an instruction-tuned model as train.py writes it: its template rendered by llama-cpp-python from the
    # file's chat template gives sample.py --instruction's prompt tokens, and the same greedy reply
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if template == "story":
        write_endoftext(tmp_path / "s.txt", make_stories(200, seed=4))
        instruction, fmt = "Words: dog, ball, happy", dict(words_from_story=3)
    else:
        rows = [{"prompt": f"Tell me about {s.split(' named ')[-1].split('.')[0]}.", "response": s}
                for s in make_stories(200, seed=4)]
        (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        instruction, fmt = "Tell me about Tom.", {}
    src = tmp_path / ("s.txt" if template == "story" else "s.jsonl")
    tok_path = from_checkpoint(trained)[1]["tokenizer"]
    tinystories.prepare(tmp_path, src, "sft", tokenizer=tok_path, **fmt)
    train_tiny("--dataset=sft", "--max_iters=30", "--eval_interval=30", f"--init_from={trained}",
               f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'sft'}")
    tuned = tmp_path / "sft" / "ckpt.pt"
    assert from_checkpoint(tuned)[1]["template"]["name"] == template
    export.main([str(tmp_path / "m.gguf"), f"--checkpoint={tuned}", "--format=gguf"])
    llm = load(llama_cpp, tmp_path / "m.gguf")
    messages = instruct.instruction_messages(template, instruction)
    tok = Tokenizer(tok_path)
    # rendered as llama-cpp-python's chat handler renders it, then tokenized with special tokens parsed
    rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=tok.sp.id_to_piece(
        tok.eos_id), bos_token=tok.sp.id_to_piece(tok.bos_id))(messages=messages).prompt
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == instruct.prompt_ids(
        tok, template, messages)
    n = 40
    ours, text = sample_py(capsys, tuned, n, instruction=instruction)
    reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=n)["choices"][0]["message"]
    # llama.cpp keeps the space of the reply's first piece ("▁Once" after "Story:"); sample.py prints the
    # reply without it
    assert reply["content"] == " " + text.removesuffix("\n") and text == tok.decode(ours) + "\n"
