"""eval.py (loss, bits per byte and perplexity against independent computations; generation and the Words:
score on instruction records), sample.py --instruction, and the behaviour the whole path exists for: a
model tuned on Words: instructions made from its stories uses the requested words far more often than
the model it started from."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from test_export import tiny_model, train_tokenizer

import eval
import sample
import tinystories as ts
import train
from llamatiny import instruct
from llamatiny.checkpoint import write_hf
from llamatiny.corpus import make_stories, write_endoftext
from llamatiny.data import mask_name
from llamatiny.tokenizer import Tokenizer

SEP = "\n<|endoftext|>\n"
RECORDS = [("Words: dog, ball\nSummary: A dog plays.", "The dog ran to the ball. It was happy."),
           ("Words: cat", "A cat sat on a mat.\n\nThe end."),
           ("Features: Dialogue", "\"Hi,\" said Tom. \"Hi,\" said Sue."),
           ("Words: sun, hat", "The sun was hot, so Lily wore a hat.")]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def save(path: Path, model, tok_path, template=None) -> Path:
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.args),
                "tokenizer": str(tok_path),
                **({"template": instruct.template_info(template)} if template else {})}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok_path) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(vocab_size=400, max_seq_len=64, std=0.1)
    return {name: save(root / f"{name}.pt", model, tok_path, template) for name, template in
            (("base", None), ("story", "story"), ("chat", "chat"))}


def summed_nll(model, stream: list[int], learn: list[int] | None = None) -> tuple[float, int]:
    # consecutive windows of max_seq_len targets, one at a time, log-probabilities in float64
    T, total, count = model.args.max_seq_len, 0.0, 0
    for k in range(0, len(stream) - 1, T):
        x, y = torch.tensor([stream[k:k + T]]), torch.tensor(stream[k + 1:k + T + 1])
        keep = (torch.ones(len(y), dtype=torch.bool) if learn is None
                else torch.tensor(learn[k + 1:k + T + 1]) == 1)
        with torch.no_grad():
            log_probs = F.log_softmax(model(x, x)[0][0, :len(y)].double(), dim=-1)
        total -= log_probs[torch.arange(len(y)), y][keep].sum().item()
        count += int(keep.sum())
    return total, count


def test_bits_per_byte_equals_an_independent_computation(tmp_path, tok_path, ckpts, capsys):
    stories = make_stories(12, seed=3) + [
        "Lily saw 12 ducks.\nShe said: \u201chello, caf\u00e9!\u201d \U0001F642"]
    write_endoftext(tmp_path / "s.txt", stories)
    result = eval.main([f"--checkpoint={ckpts['base']}", f"--input={tmp_path / 's.txt'}", "--batch_size=3"])
    assert "bits per byte" in capsys.readouterr().out and "records" not in result

    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    text = (tmp_path / "s.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
    stream = [i for d in docs for i in [sp.bos_id()] + sp.encode(d)]
    model = tiny_model(vocab_size=400, max_seq_len=64, std=0.1)
    nats, count = summed_nll(model, stream)
    assert len(stream) > 4 * 64 and count == len(stream) - 1 == result["targets"]
    nbytes = sum(len(d.encode()) for d in docs)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_threads_are_taken_as_asked_and_said(tmp_path, ckpts, capsys):
    write_endoftext(tmp_path / "s.txt", make_stories(2, seed=5))
    before = torch.get_num_threads()
    try:
        eval.main([f"--checkpoint={ckpts['base']}", f"--input={tmp_path / 's.txt'}", "--threads=1",
                   "--device=cpu"])
        assert torch.get_num_threads() == 1 and ", 1 CPU thread(s)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_out_on_plain_text_says_it_writes_nothing(tmp_path, ckpts, capsys):
    write_endoftext(tmp_path / "s.txt", make_stories(4, seed=5))
    out = tmp_path / "responses.jsonl"
    eval.main([f"--checkpoint={ckpts['base']}", f"--input={tmp_path / 's.txt'}", f"--out={out}"])
    assert f"note: --out={out} not written: {tmp_path / 's.txt'} holds no instruction records" \
        in capsys.readouterr().out
    assert not out.exists()


def test_instruction_records_masked_loss_responses_and_words_score(tmp_path, tok_path, ckpts, capsys):
    src = tmp_path / "records.txt"
    src.write_text(SEP.join(f"{p}\nStory: {s}" for p, s in RECORDS) + SEP, encoding="utf-8")
    out = tmp_path / "rows.jsonl"
    result = eval.main([f"--checkpoint={ckpts['story']}", f"--input={src}", "--max_new_tokens=12",
                        f"--out={out}"])
    printed = capsys.readouterr().out
    assert "4 instruction records" in printed and "Words constraints met: " in printed

    # the masked loss by hand: the record layout written out literally, targets on the responses and EOS
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    stream, learn = [], []
    for prompt, response in RECORDS:
        pieces = [([sp.bos_id()], 0), (sp.encode(f"{prompt}\nStory:"), 0),
                  (sp.encode(response) + [sp.eos_id()], 1)]
        for ids, m in pieces:
            stream += ids
            learn += [m] * len(ids)
    model = tiny_model(vocab_size=400, max_seq_len=64, std=0.1)
    nats, count = summed_nll(model, stream, learn)
    assert result["targets"] == count and result["loss"] == pytest.approx(nats / count, rel=1e-5)
    nbytes = sum(len(r.encode()) for _, r in RECORDS)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["instruction"], r["reference"]) for r in rows] == RECORDS
    # the response: greedy decoding from the rendered prompt, up to the end of the story
    tok = Tokenizer(tok_path)
    prompt = instruct.prompt_ids(tok, "story", [{"role": "user", "content": RECORDS[0][0]}])
    new = model.generate(torch.tensor([prompt]), 12, temperature=0.0)[0, len(prompt):].tolist()
    stops = [i for i, t in enumerate(new) if t in (tok.bos_id, tok.eos_id)]
    assert rows[0]["response"] == tok.decode(new[:stops[0]] if stops else new)
    asked = [i for i, (p, _) in enumerate(RECORDS) if p.startswith("Words:")]
    met = [instruct.words_met(instruct.requested_words([{"role": "user", "content": RECORDS[i][0]}]),
                              rows[i]["response"]) for i in asked]
    assert result["words_asked"] == 3 and result["words_met"] == sum(met)

    result = eval.main([f"--checkpoint={ckpts['base']}", f"--input={src}", "--max_new_tokens=4",
                        "--max_records=2"])
    assert result["records"] == 2 and result["words_asked"] == 2  # a model without a template: the input's


@pytest.mark.parametrize("args, message", [
    ([], "--input=FILE is required"),
    (["--input=missing.txt"], "no such file or directory: missing.txt"),
    (["--input=records.txt", "--checkpoint=CHAT"], "was tuned on the chat template but records.txt holds "
                                                    "story-template records (tinystories_instruct)"),
    (["--input=records.txt", "--max_records=0"], "--max_records=0 must be a positive integer"),
    (["--input=records.txt", "--top_p=0"], "--top_p in (0, 1]"),
    (["--input=records.txt", "--threads=0"], "--threads=0 must be a positive integer"),
    (["--input=records.txt", "--checkpoint=none.pt"], "no checkpoint at none.pt"),
    (["records.txt"], "unexpected argument 'records.txt'"),
])
def test_eval_errors_are_one_line(tmp_path, ckpts, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "records.txt").write_text(SEP.join(f"{p}\nStory: {s}" for p, s in RECORDS), encoding="utf-8")
    args = [a.replace("CHAT", str(ckpts["chat"])) for a in args]
    with pytest.raises(SystemExit):
        eval.main([f"--checkpoint={ckpts['story']}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "".join(err), err


# ----------------------------------------------------------------------------- sample.py --instruction


def greedy_response(tok, model, template, instruction, n=10) -> str:
    prompt = instruct.prompt_ids(tok, template, instruct.instruction_messages(template, instruction))
    new = model.generate(torch.tensor([prompt]), n, temperature=0.0)[0, len(prompt):].tolist()
    stops = [i for i, t in enumerate(new) if t in (tok.bos_id, tok.eos_id)]
    return tok.decode(new[:stops[0]] if stops else new)


def run_sample(capsys, *argv):
    sample.main([*map(str, argv), "--temperature=0", "--max_new_tokens=10", "--cpu_speedups=False"])
    return capsys.readouterr().out


def test_sample_instruction_prints_only_the_response(tmp_path, tok_path, ckpts, capsys):
    tok, model = Tokenizer(tok_path), tiny_model(vocab_size=400, max_seq_len=64, std=0.1)
    expected = [greedy_response(tok, model, "story", "Words: dog, ball\nSummary: A dog."),
                greedy_response(tok, model, "story", "Words: cat")]
    assert expected[0] != expected[1]
    # \n in the option starts a new field line; the fields may come in any order
    out = run_sample(capsys, f"--checkpoint={ckpts['story']}",
                     "--instruction=Summary: A dog.\\nWords: dog, ball")
    assert out == expected[0] + "\n"
    (tmp_path / "one_a_line.txt").write_text("Words: dog, ball\\nSummary: A dog.\n\nWords: cat\n",
                                             encoding="utf-8")
    (tmp_path / "records.txt").write_text("Words: dog, ball\nSummary: A dog.\nStory: A reference." + SEP
                                          + "Story: Another.\nWords: cat" + SEP, encoding="utf-8")
    for name in ("one_a_line.txt", "records.txt"):
        out = run_sample(capsys, f"--checkpoint={ckpts['story']}", f"--instruction_file={tmp_path / name}")
        assert out == f"{expected[0]}\n{sample.SEPARATOR}\n{expected[1]}\n"
    # the chat template: the instruction is the user's message
    out = run_sample(capsys, f"--checkpoint={ckpts['chat']}", "--instruction=Tell me a story.")
    assert out == greedy_response(tok, model, "chat", "Tell me a story.") + "\n"
    # a Hugging Face export keeps the template as its chat template
    write_hf(tmp_path / "hf", model, tok_path, template="story")
    out = run_sample(capsys, f"--checkpoint={tmp_path / 'hf'}", "--instruction=Words: cat")
    assert out == expected[1] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=BASE", "--instruction=Words: dog"], "records no instruction template"),
    (["--instruction=Write about a dog"], "no field line"),
    (["--instruction=Words: dog", "--prompt=Once"], "give one of --prompt and --instruction, not both"),
    (["--instruction_file=missing.txt"], "instruction file not found: missing.txt"),
])
def test_sample_instruction_errors_are_one_line(ckpts, capsys, args, message):
    args = [a.replace("BASE", str(ckpts["base"])) for a in args]
    with pytest.raises(SystemExit):
        sample.main([f"--checkpoint={ckpts['story']}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ----------------------------------------------------------------------------- the behaviour


@pytest.mark.slow
def test_tuning_on_words_from_its_stories_makes_a_model_use_the_requested_words(tmp_path):
    stories, held_out = make_stories(1000, seed=11), make_stories(40, seed=12)
    write_endoftext(tmp_path / "stories.txt", stories)
    write_endoftext(tmp_path / "held_out.txt", held_out)
    tok = ts.train_vocab(tmp_path, 512, input=tmp_path / "stories.txt", name="plain")
    ts.prepare(tmp_path, tmp_path / "stories.txt", "plain", vocab_size=512)
    ts.prepare(tmp_path, tmp_path / "stories.txt", "words", tokenizer=tok, words_from_story=3)
    common = ["--vocab_source=custom", "--vocab_size=512", "--dim=64", "--n_layers=2", "--n_heads=4",
              "--n_kv_heads=2", "--multiple_of=16", "--max_seq_len=128", "--batch_size=16",
              "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=50", "--warmup_iters=20",
              "--learning_rate=2e-3", "--device=cpu", f"--data_dir={tmp_path}"]
    train.train(train.parse_settings(common + ["--dataset=plain", "--max_iters=250", "--eval_interval=250",
                                               f"--out_dir={tmp_path / 'base'}"]))
    # copying a requested word into its place in the story is learnt late: ~2M tokens at this size
    train.train(train.parse_settings(common + ["--dataset=words", "--max_iters=1000", "--eval_interval=1000",
                                               "--learning_rate=3e-3", f"--out_dir={tmp_path / 'tuned'}",
                                               f"--init_from={tmp_path / 'base'}/ckpt.pt"]))
    scores = {name: eval.main([f"--checkpoint={tmp_path / name / 'ckpt.pt'}",
                               f"--input={tmp_path / 'held_out.txt'}", "--words_from_story=3",
                               "--max_new_tokens=150"])
              for name in ("base", "tuned")}
    base, tuned = scores["base"], scores["tuned"]
    # the base, asked in a format it never saw, hardly uses the requested words; the tuned model uses most of
    # them, and all three in a good share of stories
    assert tuned["words_used_share"] > 1.5 * base["words_used_share"], scores
    assert tuned["words_used_share"] > 0.5, scores
    assert tuned["words_share"] >= base["words_share"] + 0.15, scores
    assert tuned["loss"] < base["loss"]  # on the held-out stories' responses


@pytest.mark.parametrize("val_fraction, held_out", [(None, 3), (0.04, 10)])
def test_held_out_measures_the_records_prepare_held_out(tmp_path, tok_path, ckpts, val_fraction, held_out):
    # eval --held_out=True on the input of a prepared dataset reads exactly its validation shard's tokens,
    # with prepare's --val_fraction given back to it as meta.json records it
    write_endoftext(tmp_path / "s.txt", make_stories(250, seed=9))
    ts.prepare(tmp_path, tmp_path / "s.txt", "words", tokenizer=tok_path, words_from_story=3,
               val_fraction=val_fraction)
    meta = json.loads((tmp_path / "words" / "meta.json").read_text())
    assert meta["validation"] == {"val_fraction": val_fraction or 0.01}
    share = [] if val_fraction is None else [f"--val_fraction={meta['validation']['val_fraction']}"]
    result = eval.main([f"--checkpoint={ckpts['story']}", f"--input={tmp_path / 's.txt'}",
                        "--words_from_story=3", "--held_out=True", "--max_new_tokens=2", *share])
    val = tmp_path / "words" / "data00.bin"
    mask = np.fromfile(val.with_name(mask_name(val.name)), dtype=np.uint8)
    assert result["records"] == held_out  # records 0, 100 and 200; or 0, 25, 50, ... 225
    assert result["tokens"] == val.stat().st_size // 2 == len(mask) and result["targets"] == int(mask.sum())


@pytest.mark.parametrize("bad", ["--val_fraction=0.2", "--held_out=True --val_fraction=1.5",
                                 "--held_out=True --val_fraction=1"])
def test_val_fraction_is_a_share_given_with_held_out(tmp_path, ckpts, capsys, bad):
    write_endoftext(tmp_path / "s.txt", make_stories(5, seed=9))
    with pytest.raises(SystemExit):
        eval.main([f"--checkpoint={ckpts['story']}", f"--input={tmp_path / 's.txt'}", *bad.split()])
    err = capsys.readouterr().err
    assert err.startswith("error: --val_fraction=") and "--held_out=True" in err and err.count("\n") == 1, err


def test_max_records_reads_no_further(tmp_path, ckpts, capsys):
    # the records after the first two are never read: a broken line there is not even counted
    rows = [json.dumps({"prompt": "Tell me about a dog.", "response": "A dog barks."})] * 2 + ["{broken"]
    (tmp_path / "r.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = [f"--checkpoint={ckpts['chat']}", f"--input={tmp_path / 'r.jsonl'}", "--max_new_tokens=2"]
    assert eval.main(args + ["--max_records=2"])["records"] == 2
    assert "skipped" not in capsys.readouterr().out
    assert eval.main(args)["records"] == 2
    assert "skipped 1 of 3 records (1 malformed line)" in capsys.readouterr().out
