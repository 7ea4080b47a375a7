"""Instruction data end to end, short of generation (test_eval.py): the input formats from small fixtures
(fields in either order, missing fields, bad records skipped and counted), the loss mask (the masked-in
tokens decode back to exactly the responses), the loader's masked targets, the masked loss and its
normalisation under accumulation and DDP, Words: instructions made from stories, and the template in both
vocabularies and as a Hugging Face chat template."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_export import tiny_model, train_tokenizer
from test_train import assert_same_losses, main_error

import tinystories as ts
import train
from llamatiny import data, instruct, runs
from llamatiny.checkpoint import from_checkpoint, write_hf, write_llama2c
from llamatiny.corpus import make_stories, write_endoftext
from llamatiny.data import DataError, read_meta
from llamatiny.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SEP = "\n<|endoftext|>\n"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def prepare(tmp_path, tok_path, src, name="sft", **kw) -> Path:
    ts.prepare(tmp_path, src, name, tokenizer=tok_path, **kw)
    return tmp_path / name


def decoded_records(shard_dir) -> list[list[tuple[str, bool]]]:
    """Every record of the shards (validation first), as its runs of prompt and response tokens decoded
    one run at a time: [(text, is_response), ...]. Each response run must end with EOS."""
    tok = Tokenizer(read_meta(shard_dir)["tokenizer"])
    records = []
    for shard in data.list_shards(shard_dir):
        ids = np.fromfile(shard, np.uint16).tolist()
        learn = np.fromfile(shard.with_suffix(".mask"), np.uint8).tolist()
        assert len(learn) == len(ids) and set(learn) <= {0, 1}
        for t, m in zip(ids, learn):
            if t == tok.bos_id:
                assert m == 0
                records.append([])
            elif not records[-1] or records[-1][-1][1] != m or records[-1][-1][0][-1] == tok.eos_id:
                records[-1].append(([t], bool(m)))
            else:
                records[-1][-1][0].append(t)
    for pieces in records:
        for ids, response in pieces:
            assert (ids[-1] == tok.eos_id) == response and tok.eos_id not in ids[:-1]
    return [[(tok.decode(ids[:-1] if response else ids), response) for ids, response in pieces]
            for pieces in records]


def story(prompt: str, response: str) -> list[tuple[str, bool]]:
    return [(prompt + "\nStory:", False), (response, True)]


# ----------------------------------------------------------------------------- the input formats


def test_tinystories_instruct_text_fields_in_any_order_and_missing(tmp_path, tok_path, capsys):
    records = [
        "Words: dog, ball, happy\nSummary: A dog plays.\nStory: \n\n"
        "Once upon a time there was a dog.\nIt was happy.",
        # the story first, the fields after it, in another order
        "Story: Tom had a red ball.\n\nHe liked it.\nSummary: Tom and  his ball.\nFeatures: Dialogue\n"
        "Random sentence: The sun was hot.",
        "Words: cat\nStory: A cat sat.",  # missing fields
        "Summary: No story here.",  # no response
        "Story: Only a story.",  # no instruction
        "Hello there\nStory: What came before?",  # text outside any field
        "Words: dog\nWords: cat\nStory: Twice.",  # a field given twice
    ]
    (tmp_path / "in.txt").write_text(SEP.join(records) + SEP, encoding="utf-8")
    out = prepare(tmp_path, tok_path, tmp_path / "in.txt")
    assert decoded_records(out) == [
        story("Words: dog, ball, happy\nSummary: A dog plays.",
              "Once upon a time there was a dog.\nIt was happy."),
        story("Features: Dialogue\nRandom sentence: The sun was hot.\nSummary: Tom and his ball.",
              "Tom had a red ball.\n\nHe liked it."),
        story("Words: cat", "A cat sat."),
    ]
    meta = read_meta(out)["instruction"]
    assert meta["template"]["name"] == "story" and meta["formats"] == ["tinystories_instruct"]
    assert meta["skipped"] == {"no response": 1, "empty prompt": 1, "malformed record": 2}
    assert meta["records"] == 3
    assert f"skipped 4 of 7 records (2 malformed record, 1 no response, 1 empty prompt); the first: " \
           f"{tmp_path / 'in.txt'}: record 4: no response" in capsys.readouterr().out


def test_tinystories_json_shards(tmp_path, tok_path):
    items = [{"story": "Lily saw a dog.", "summary": "Lily and a dog.", "source": "GPT-4",
              "instruction": {"prompt:": "Write a story...", "words": ["dog", "see"],
                              "features": ["Dialogue"]}},
             {"story": "A cat ran.", "instruction": {"words": ["cat"], "features": []}},
             {"story": "Sun.", "summary": "The sun shone."},
             {"story": "Nothing asked."},
             {"story": "", "summary": "No story."}]
    # the folder as pretokenize leaves it: its token shards and their meta.json beside the JSON
    shards = tmp_path / "TinyStories_all_data"
    shards.mkdir()
    (shards / "data00.json").write_text(json.dumps(items), encoding="utf-8")
    (shards / "meta.json").write_text(json.dumps({"tokenizer": str(tok_path), "vocab_size": 400}),
                                      encoding="utf-8")
    (shards / "data00.bin").write_bytes(b"\0\0")
    out = prepare(tmp_path, tok_path, shards)
    assert decoded_records(out) == [story("Words: dog, see\nFeatures: Dialogue\nSummary: Lily and a dog.",
                                          "Lily saw a dog."),
                                    story("Words: cat", "A cat ran."),
                                    story("Summary: The sun shone.", "Sun.")]
    assert read_meta(out)["instruction"]["skipped"] == {"empty prompt": 1, "no response": 1}


def test_prompt_response_and_alpaca_jsonl(tmp_path, tok_path):
    lines = [json.dumps({"prompt": "Say hi.", "response": "Hi!"}),
             json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}),
             "{not json",
             json.dumps({"instruction": "Say nothing.", "output": ""}),
             json.dumps({"prompt": "", "response": "Unasked."}),
             json.dumps({"prompt": ["a list"], "response": "x"}),
             json.dumps({"prompt": "Name a color.", "response": "Red."})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = prepare(tmp_path, tok_path, tmp_path / "in.jsonl")
    chat = lambda q, a: [(f"User: {q}\nAssistant:", False), (a, True)]
    assert decoded_records(out) == [chat("Say hi.", "Hi!"), chat("Add the numbers.\n\n2 and 3", "5"),
                                    chat("Name a color.", "Red.")]
    assert read_meta(out)["instruction"]["skipped"] == {"malformed line": 1, "no response": 1,
                                                        "empty prompt": 1, "malformed record": 1}


def target_runs(y: torch.Tensor) -> list[list[int]]:
    """The runs of consecutive targets (not -1) in the rows of y."""
    runs = []
    for row in y.tolist():
        run = []
        for t in row + [-1]:
            if t >= 0:
                run.append(t)
            elif run:
                runs.append(run)
                run = []
    return runs


def test_prompt_completion_jsonl_trains_on_the_completions_only(tmp_path, tok_path, monkeypatch):
    # OpenAI's fine-tuning format, prepared, then a few training steps in this process: every target of
    # every batch they train on belongs to a completion, and each completion is learned whole, with its EOS
    animals = ["cat", "dog", "frog", "duck", "bird"]
    pairs = [(f"Which animal is number {i}?", f"Number {i} is the {animals[i % 5]}.") for i in range(120)]
    lines = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs)
    (tmp_path / "in.jsonl").write_text(lines, encoding="utf-8")
    out = prepare(tmp_path, tok_path, tmp_path / "in.jsonl", name="pc")
    assert read_meta(out)["instruction"]["formats"] == ["prompt_response"]
    chat = lambda q, a: [(f"User: {q}\nAssistant:", False), (a, True)]
    assert sorted(decoded_records(out)) == sorted(chat(p, c) for p, c in pairs)

    taken, next_batch = [], data.BatchLoader.next_batch
    monkeypatch.setattr(data.BatchLoader, "next_batch",
                        lambda self: taken.append(next_batch(self)) or taken[-1])
    train.train(train.parse_settings(TINY + ["--dataset=pc", "--max_seq_len=64", "--max_iters=3",
                                             f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"]))
    tok = Tokenizer(read_meta(out)["tokenizer"])
    learned = [run for _, y in taken for run in target_runs(y)]
    assert len(learned) > 20 and all(run[-1] == tok.eos_id for run in learned)
    assert {tok.decode(run[:-1]) for run in learned} <= {c for _, c in pairs}


def test_chat_jsonl_learns_every_assistant_turn_and_nothing_else(tmp_path, tok_path):
    conversations = [
        {"conversations": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "A story?"},
                           {"role": "assistant", "content": "Once, a cat.\nThe end."}]},
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]},  # ShareGPT
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                      {"role": "user", "content": "left unanswered"}]},
        {"messages": [{"role": "assistant", "content": "Unasked."}]},
        {"conversations": [{"role": "robot", "content": "?"}, {"role": "assistant", "content": "!"}]},
        {"conversations": "not a list"},
        {"messages": [{"role": "user", "content": "Two"}, {"role": "user", "content": "questions"},
                      {"role": "assistant", "content": "One answer."}]},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations),
                                         encoding="utf-8")
    out = prepare(tmp_path, tok_path, tmp_path / "chat.jsonl")
    assert decoded_records(out) == [
        [("System: Be kind.\nUser: Hi\nAssistant:", False), ("Hello!", True),
         ("User: A story?\nAssistant:", False), ("Once, a cat.\nThe end.", True)],
        [("User: Q1\nAssistant:", False), ("A1", True)],
        [("User: Two\nUser: questions\nAssistant:", False), ("One answer.", True)],
    ]
    meta = read_meta(out)
    assert meta["instruction"]["template"]["name"] == "chat"
    assert meta["instruction"]["skipped"] == {"last turn not the assistant's": 1, "empty prompt": 1,
                                              "malformed record": 2}
    # the mask's count: every response token and its EOS
    tok = Tokenizer(meta["tokenizer"])
    responses = ["Hello!", "Once, a cat.\nThe end.", "A1", "One answer."]
    assert meta["instruction"]["loss_tokens"] == sum(len(tok.encode(r, bos=False)) + 1 for r in responses)


def test_forced_format_and_a_plain_rerun_leaves_no_mask(tmp_path, tok_path):
    stories = make_stories(30, seed=1)
    text = SEP.join(f"Words: dog\nStory: {s}" for s in stories) + SEP
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    out = prepare(tmp_path, tok_path, tmp_path / "in.txt")
    assert sorted(p.name for p in out.iterdir()) == ["data00.bin", "data00.idx", "data00.mask", "data01.bin",
                                                     "data01.idx", "data01.mask", "meta.json"]
    prepare(tmp_path, tok_path, tmp_path / "in.txt", fmt="text")  # the same file as plain text: no masks
    assert sorted(p.name for p in out.iterdir()) == ["data00.bin", "data01.bin", "meta.json"]
    assert "instruction" not in read_meta(out)
    loader = data.BatchLoader(out, "train", 2, 16, 0, vocab_size=400)
    assert not loader.masked and loader.loss_share is None and (loader.next_batch()[1] >= 0).all()


@pytest.mark.parametrize("files, args, message", [
    ({"bad.jsonl": '{"prompt": "", "response": "x"}\n{"prompt": "q"}\n'}, [],
     'bad.jsonl: nothing usable as prompt_response instruction records (skipped 2 of 2 records '
     '(1 empty prompt, 1 no response); the first: '),
    ({"in.txt": "Story: no instruction" + SEP}, ["--format", "tinystories_instruct"],
     "nothing usable as tinystories_instruct instruction records"),
    ({"in.txt": "Just a story."}, ["--format", "csv"],
     "--format=csv: choose auto, text, tinystories_instruct"),
    ({"in.jsonl": '{"prompt": "q", "response": "r"}\n'}, ["--words_from_story", "2"],
     "holds prompt_response records: --words_from_story makes instructions from plain stories only"),
    ({"d/a.jsonl": '{"prompt": "q", "response": "r"}\n', "d/b.txt": "Words: a\nStory: b" + SEP}, [],
     "holds tinystories_instruct records but"),
])
def test_unusable_input_is_a_one_line_error(tmp_path, tok_path, capsys, files, args, message):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    src = tmp_path / next(iter(files)).split("/")[0]
    assert ts.main(["prepare", "--input", str(src), "--name", "x", "--tokenizer", str(tok_path),
                    "--data_dir", str(tmp_path), *args]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line and "tokenizing" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x" / "meta.json").exists()


# ----------------------------------------------------------------------------- Words: from stories


def test_words_from_story_picks_content_words_with_a_fixed_seed(tmp_path, tok_path):
    text = "Once upon a time, Lily saw a big dog. The dog was happy. Lily didn't run; she jumped and smiled."
    # names are not content words
    assert instruct.content_words(text) == ["saw", "big", "dog", "happy", "run", "jumped", "smiled"]
    picked = instruct.words_from_story(text, 3)
    assert len(set(picked)) == 3 and set(picked) <= set(instruct.content_words(text))
    assert all(instruct.words_from_story(text, 3) == picked for _ in range(3))  # same story, same words
    with pytest.raises(instruct.Skip, match="fewer than 8 content words"):
        instruct.words_from_story(text, 8)

    stories = make_stories(40, seed=2) + ["The end."]  # too few content words: skipped
    write_endoftext(tmp_path / "s.txt", stories)
    out = prepare(tmp_path, tok_path, tmp_path / "s.txt", words_from_story=2)
    records = decoded_records(out)
    assert len(records) == 40
    assert read_meta(out)["instruction"]["skipped"] == {"fewer than 2 content words": 1}
    by_story = {s: instruct.words_from_story(s, 2) for s in stories[:40]}
    for (prompt, _), (response, _) in records:
        assert prompt == f"Words: {', '.join(by_story[response])}\nStory:"
        assert instruct.words_met(by_story[response], response)  # a story honours its own words


@pytest.mark.parametrize("words, response, met", [
    (["dog", "ball"], "The Dogs chased a ball.", True),
    (["dance", "run", "try", "cry", "jump", "like", "box"],
     "She was dancing and running; he tried, she cries, they jumped, it liked boxes.", True),
    (["stop", "hop"], "It stopped, then hopped.", True),
    (["dog"], "A dogma.", False),
    (["bee"], "To bed.", False),
    (["cat", "hat"], "A cat.", False),
])
def test_words_met_allows_simple_inflections(words, response, met):
    assert instruct.words_met(words, response) == met


def test_requested_words_and_user_instructions():
    user = [{"role": "user", "content": "Words: Dog, toy car\nSummary: Fun."},
            {"role": "assistant", "content": "x"}]
    assert instruct.requested_words(user) == ["dog", "toy", "car"]
    assert instruct.requested_words([{"role": "user", "content": "Summary: no words"}]) is None
    assert instruct.instruction_messages("story", "Summary: A dog.\nWords: dog") == \
        [{"role": "user", "content": "Words: dog\nSummary: A dog."}]
    assert instruct.instruction_messages("chat", " Tell me a story. ") == \
        [{"role": "user", "content": "Tell me a story."}]
    with pytest.raises(instruct.InstructError, match="such as \"Words: dog, ball, happy\""):
        instruct.instruction_messages("story", "Write about a dog")


# ----------------------------------------------------------------------------- template, both vocabularies


RECORDS = [[{"role": "user", "content": "Words: dog, ball, café\nSummary: A dog 🐶 plays."},
            {"role": "assistant", "content": "Once upon a time, a dog said \"hi\".\n\nThe end."}]]
CHAT = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi, Tom."},
         {"role": "assistant", "content": "Hello! 日本"}, {"role": "user", "content": "More?"},
         {"role": "assistant", "content": "Yes.\nMore."}]]


def check_round_trip(tok: Tokenizer):
    for template, records in (("story", RECORDS), ("chat", CHAT)):
        tokens, mask = instruct.encode_records(tok, template, records * 2)
        starts = np.flatnonzero(tokens == tok.bos_id)
        assert starts.tolist() == [0, len(tokens) // 2] and mask[tokens == tok.bos_id].sum() == 0
        record, learn = tokens[:starts[1]].tolist(), mask[:starts[1]]
        eos = [i for i, t in enumerate(record) if t == tok.eos_id]
        assert all(learn[eos]) and len(eos) == sum(m["role"] == "assistant" for m in records[0])
        masked_in = [t for t, m in zip(record, learn) if m]
        pieces, piece = [], []
        for t in masked_in:
            if t == tok.eos_id:
                pieces.append(tok.decode(piece))
                piece = []
            else:
                piece.append(t)
        assert pieces == [m["content"] for m in records[0] if m["role"] == "assistant"]  # byte for byte
        unmasked = tok.decode([t for t, m in zip(record, learn) if not m])
        assert unmasked.startswith("Words: dog, ball, café\nSummary: A dog 🐶 plays.\nStory:"
                                   if template == "story" else "System: Be kind.")
        prompt = instruct.prompt_ids(tok, template, records[0][:-1])
        assert record[:len(prompt)] == prompt and learn[len(prompt)] == 1  # generation starts at the response


def test_template_in_a_custom_vocabulary_with_its_markers_as_special_tokens(tmp_path, tok_path):
    check_round_trip(Tokenizer(tok_path))
    write_endoftext(tmp_path / "s.txt", make_stories(200, seed=3))
    model = ts.train_vocab(tmp_path, 400, input=tmp_path / "s.txt", name="m",
                           special_tokens=["Story:", "User:", "Assistant:", "<|endoftext|>"])
    tok = Tokenizer(model)
    for marker in ("Story:", "User:", "Assistant:", "<|endoftext|>"):
        assert len(tok.encode(marker, bos=False)) <= 2  # the piece, after sentencepiece's leading space
        assert marker in [tok.sp.id_to_piece(i) for i in tok.encode(f"a\n{marker}", bos=False)]
    check_round_trip(tok)
    assert ts.main(["train_vocab", "--input", str(tmp_path / "s.txt"), "--name", "m", "--vocab_size", "400",
                    "--data_dir", str(tmp_path), "--special_tokens", "two words"]) == 1


def test_template_in_the_llama2_vocabulary(llama2_tokenizer):
    check_round_trip(Tokenizer(llama2_tokenizer))


@pytest.mark.parametrize("vocab", [400, 32000])
def test_hf_chat_template_gives_the_same_tokens(tmp_path, tok_path, request, vocab):
    transformers = pytest.importorskip("transformers")
    sp_path = tok_path if vocab == 400 else request.getfixturevalue("llama2_tokenizer")
    tok = Tokenizer(sp_path)
    for template, records in (("story", RECORDS), ("chat", CHAT)):
        out = tmp_path / template
        write_hf(out, tiny_model(vocab_size=vocab, dim=16, n_heads=2, n_kv_heads=1, n_layers=1), sp_path,
                 template=template)
        assert from_checkpoint(out)[1]["template"]["name"] == template  # read back
        hf = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)

        def ids(m, hf=hf, **kw):
            return list(hf.apply_chat_template(m, tokenize=True, return_dict=True, **kw)["input_ids"])
        assert ids(records[0]) == instruct.encode_records(tok, template, records)[0].tolist()
        assert (ids(records[0][:-1], add_generation_prompt=True)
                == instruct.prompt_ids(tok, template, records[0][:-1]))


# ----------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def words_data(tmp_path_factory, tok_path) -> Path:
    # Words: records of 112 to 219 tokens
    root = tmp_path_factory.mktemp("words")
    write_endoftext(root / "s.txt", make_stories(60, seed=4))
    return prepare(root, tok_path, root / "s.txt", words_from_story=3)


def shard_records(shard: Path, bos: int) -> list[tuple[tuple, tuple]]:
    """The records of a shard, found from its BOS tokens: (tokens, mask) each."""
    ids, learn = np.fromfile(shard, np.uint16).tolist(), np.fromfile(shard.with_suffix(".mask"), np.uint8)
    starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
    return [(tuple(ids[a:b]), tuple(learn[a:b].tolist())) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("max_seq_len", [16, 100, 160, 300])
def test_every_response_target_has_its_records_first_token_in_its_window(words_data, max_seq_len):
    # an epoch of windows, read back against the records of the shard: each window is whole records from
    # their BOS (one record cut at the window's end only when it alone is longer than the window), then
    # padding; every target is its record's next token where the mask learns it, else -1
    bos = read_meta(words_data)["bos_id"]
    records = shard_records(words_data / "data01.bin", bos)
    by_head = {}
    for rec in records:
        by_head.setdefault(rec[0][:6], []).append(rec)
    loader = data.BatchLoader(words_data, "train", 1, max_seq_len, 7, vocab_size=400)
    T = max_seq_len
    seen, padded, targets, shared = [], 0, 0, 0
    for _ in range(loader.batches.per_epoch):
        x, y = (t[0].tolist() for t in loader.next_batch())
        assert x[0] == bos
        p = 0
        while p < T and x[p] == bos:
            tokens, learn = next(r for r in by_head[tuple(x[p:p + 6])]
                                 if r[0][:T - p] == tuple(x[p:p + len(r[0])]))
            n = len(tokens)
            assert p == 0 or p + n <= T + 1  # only a record alone in its window is cut
            for i in range(p, min(p + n - 1, T)):  # the targets inside the record: y[i] is token i + 1 - p
                assert y[i] == (tokens[i + 1 - p] if learn[i + 1 - p] else -1)
                targets += y[i] >= 0
            seen.append((tokens, learn))
            shared += p > 0
            p += n
        if p < T + 1:  # the rest is padding: nothing to learn, no other record
            assert all(t == -1 for t in y[p - 1:]) and bos not in x[p:]
            padded += T + 1 - p
    # every record once in an epoch (as far as a window shows it: cut records may share their start)
    assert sorted(tokens[:T] for tokens, _ in seen) == sorted(tokens[:T] for tokens, _ in records)
    # every response token within the first max_seq_len + 1 tokens of its record is trained, once
    assert targets == sum(sum(learn[1:T + 1]) for _, learn in records) > (0 if T > 16 else -1)
    packing = loader.packing()
    cut = sum(len(t) > T + 1 for t, _ in records)
    assert packing["records"] == len(records) and packing["cut"] == cut
    assert cut > 0 if T < 200 else shared > 0  # records longer than the window; windows of several records
    assert packing["padding"] == pytest.approx(padded / (loader.batches.per_epoch * (T + 1)))


def test_instruction_windows_resume_exactly_and_ranks_take_disjoint_windows(words_data):
    def loader(**kw):
        return data.BatchLoader(words_data, "train", 3, 150, 5, vocab_size=400, **kw)

    ld = loader()
    single = [ld.next_batch() for _ in range(2 * ld.batches.per_epoch // 3 + 1)]  # into the second epoch
    ranks = [loader(rank=r, world_size=2) for r in range(2)]
    for r, ld in enumerate(ranks):
        for g in range(r, len(single), 2):
            assert all(torch.equal(a, b) for a, b in zip(ld.next_batch(), single[g]))
    windows = [{(int(s), int(k)) for g in range(r, 6, 2) for s, k in zip(*ld.batches.locate(g))}
               for r in range(2)]
    assert not windows[0] & windows[1]
    taken = loader(rank=1, world_size=2)
    for _ in range(2):
        taken.next_batch()
    fresh = loader(rank=1, world_size=2)
    fresh.load_state_dict(taken.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.next_batch(), single[5]))


def test_the_loaders_of_a_run_share_one_read_of_the_shards(sft_data, tmp_path, monkeypatch):
    root, base = sft_data
    reads = []
    real = data.Shards.__init__
    monkeypatch.setattr(data.Shards, "__init__", lambda self, *a: reads.append(a) or real(self, *a))
    train.train(train.parse_settings(TINY + ["--max_iters=1", f"--data_dir={root}", f"--out_dir={tmp_path}",
                                             f"--init_from={base}"]))
    assert len(reads) == 1


@pytest.mark.parametrize("damage, message", [
    ("missing", "data00.mask is missing (the loss mask of instruction data): "
                "run `python tinystories.py prepare"),
    ("short", "data01.mask (9 bytes) does not match"),
    ("no index", "data01.idx is missing (where the records of instruction data start): "
                 "run `python tinystories.py prepare"),
    ("bad index", "data01.idx does not match"),
])
def test_a_missing_or_mismatched_mask_or_index_is_refused(tmp_path, damage, message):
    shard_dir = tmp_path / "sft"
    shard_dir.mkdir()
    for i, n in enumerate([100, 200]):
        np.arange(n, dtype=np.uint16).tofile(shard_dir / f"data{i:02d}.bin")
        np.ones(n, np.uint8).tofile(shard_dir / f"data{i:02d}.mask")
        np.arange(0, n, 10, dtype=np.uint64).tofile(shard_dir / f"data{i:02d}.idx")
    data.BatchLoader(shard_dir, "train", 2, 8, 0, vocab_size=512)
    if damage == "missing":
        (shard_dir / "data00.mask").unlink()
    elif damage == "short":
        np.ones(9, np.uint8).tofile(shard_dir / "data01.mask")
    elif damage == "no index":
        (shard_dir / "data01.idx").unlink()
    else:
        np.array([0, 50, 20], np.uint64).tofile(shard_dir / "data01.idx")
    with pytest.raises(DataError, match=re.escape(message)):
        data.BatchLoader(shard_dir, "train", 2, 8, 0, vocab_size=512)



# ----------------------------------------------------------------------------- the loss


TINY = ["--dataset=sft", "--vocab_source=custom", "--vocab_size=400", "--max_seq_len=32", "--batch_size=2",
        "--gradient_accumulation_steps=4", "--eval_iters=1", "--log_interval=1", "--warmup_iters=0",
        "--learning_rate=1e-3", "--device=cpu", "--compile=False", "--dropout=0.0"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tok_path) -> tuple[Path, Path]:
    # instruction data whose windows count different numbers of targets, and a model to fine-tune
    root = tmp_path_factory.mktemp("sft_data")
    write_endoftext(root / "s.txt", make_stories(80, seed=5))
    prepare(root, tok_path, root / "s.txt", words_from_story=3)
    model = tiny_model(vocab_size=400, max_seq_len=32, std=0.05)
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.args),
                "tokenizer": str(tok_path)}, root / "base.pt")
    return root, root / "base.pt"


def test_the_loss_is_the_mean_over_the_response_tokens_of_the_whole_iteration(sft_data, tmp_path, capsys):
    root, base = sft_data
    train.train(train.parse_settings(TINY + ["--max_iters=1", f"--data_dir={root}", f"--out_dir={tmp_path}",
                                             f"--init_from={base}", "--instruction_tuning=True"]))
    assert "instruction data: loss on " in capsys.readouterr().out
    logged = runs.read_metrics(tmp_path)[0][0]  # the first log record (an eval of the base comes before it)

    # by hand: the same four micro-batches, one forward over all of them, the mean over the counted targets
    model, _ = from_checkpoint(base)
    loader = data.BatchLoader(root / "sft", "train", 2, 32, 1337, vocab_size=400)
    batches = [loader.next_batch() for _ in range(4)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    logits, _ = model(x, y)
    log_probs = F.log_softmax(logits.double(), dim=-1)
    picked = log_probs.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    loss = -(picked * (y >= 0)).sum() / (y >= 0).sum()
    loss.float().backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
    # and not the mean of the micro-batches' means, which weights short responses more
    counts = [int((b[1] >= 0).sum()) for b in batches]
    means = [F.cross_entropy(model(b[0], b[1])[0].flatten(0, 1), b[1].flatten(), ignore_index=-1).item()
             for b in batches]
    assert len(set(counts)) > 1 and abs(sum(means) / 4 - loss.item()) > 1e-4

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["template"]["name"] == "story" and ckpt["loader_state"]["batches_consumed"] == 4


def test_an_instruction_tuning_config_refuses_plain_data_in_one_line(sft_data, tmp_path, tok_path):
    # prepared without instruction fields, the data trains every token: an SFT config says so at once
    root, base = sft_data
    write_endoftext(tmp_path / "s.txt", make_stories(30, seed=6))
    plain = prepare(tmp_path, tok_path, tmp_path / "s.txt", name="plain")
    assert all(train.parse_settings([str(ROOT / "config" / f"sft_{name}.py")])["instruction_tuning"]
               for name in ("cpu_debug", "15m"))
    message = main_error(TINY + [f"--data_dir={tmp_path}", "--dataset=plain", f"--out_dir={tmp_path / 'out'}",
                                 f"--init_from={base}", "--instruction_tuning=True"])
    assert message.startswith(f"error: instruction_tuning=True but {plain} holds plain text (no loss masks)")
    assert "--words_from_story 3" in message


def test_a_micro_batch_without_responses_adds_nothing(sft_data, tmp_path, monkeypatch):
    # windows of prompt tokens only: a NaN mean in the model, a zero weight here; the step stays finite
    root, base = sft_data
    real = data.BatchLoader.next_batch

    def every_other_without_targets(self):
        x, y = real(self)
        return (x, torch.full_like(y, -1)) if self.consumed % 2 else (x, y)

    monkeypatch.setattr(data.BatchLoader, "next_batch", every_other_without_targets)
    result = train.train(train.parse_settings(TINY + ["--max_iters=2", f"--data_dir={root}",
                                                      f"--out_dir={tmp_path}", f"--init_from={base}"]))
    logs = [json.loads(line)
            for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(np.isfinite([r.get("loss", 0), r.get("grad_norm", 0), r.get("val_loss", 0)]).all()
               for r in logs)
    assert np.isfinite(result["best_val_loss"])


@pytest.mark.slow
def test_ddp_and_accumulation_give_the_single_process_loss(sft_data, tmp_path):
    # 2 ranks x 2 micro-steps against 1 process x 4: the same batches, the same global mean over responses;
    # and the eval's (2 ranks x 1 batch against 1 process x 2), a mean over the responses of all ranks
    root, base = sft_data
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = {}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher, evals in (("single", [], 2), ("ddp", torchrun, 1)):
        cmd = [sys.executable, *launcher, str(ROOT / "train.py"), *TINY, "--max_iters=3",
               f"--data_dir={root}", f"--out_dir={tmp_path / name}", f"--init_from={base}",
               f"--eval_iters={evals}"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        logs[name] = [json.loads(line) for line in lines]
    assert len(logs["ddp"]) == len(logs["single"]) == 5  # the base's eval, 3 steps and the final eval
    for a, b in zip(logs["single"], logs["ddp"]):
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.slow
def test_an_instruction_run_resumes_exactly_and_exports_as_an_ordinary_model(sft_data, tmp_path):
    root, base = sft_data
    common = TINY + ["--eval_interval=2", "--lr_decay_iters=6", f"--data_dir={root}", "--dropout=0.1"]
    train.train(train.parse_settings(common + ["--max_iters=6", f"--out_dir={tmp_path / 'whole'}",
                                               f"--init_from={base}"]))
    train.train(train.parse_settings(common + ["--max_iters=4", f"--out_dir={tmp_path / 'split'}",
                                               f"--init_from={base}"]))
    train.train(train.parse_settings(common + ["--max_iters=6", f"--out_dir={tmp_path / 'split'}",
                                               "--init_from=resume"]))
    assert_same_losses(tmp_path / "split", tmp_path / "whole")

    # llama2.c's format holds the weights alone: the same logits, the template left behind
    model, ckpt = from_checkpoint(tmp_path / "whole" / "ckpt.pt")
    write_llama2c(tmp_path / "tuned.bin", model)
    again, _ = from_checkpoint(tmp_path / "tuned.bin")
    x = torch.randint(0, 400, (2, 32))
    torch.testing.assert_close(again.eval()(x, x)[0], model.eval()(x, x)[0])
    assert ckpt["template"]["name"] == "story"
