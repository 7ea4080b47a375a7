"""
Measure a model on a file: loss per token, bits per byte and perplexity; on instruction records also what
it writes when asked, and how often it uses the words a Words: instruction requests.

    python eval.py --checkpoint=out/15m/ckpt.pt --input=data/valid.txt
    python eval.py --checkpoint=out/sft/ckpt.pt --input=instruct-valid.txt --out=responses.jsonl
    python eval.py --checkpoint=out/sft/ckpt.pt --input=stories.txt --words_from_story=3 --max_records=200
    python eval.py --checkpoint=out/sft15m/ckpt.pt --input=data/TinyStories_all_data --held_out=True

--input is anything `tinystories.py prepare` reads: stories or text (.txt, .json, .jsonl or a directory), or
instruction records (llamatiny/instruct.py), told apart by content (--format to force one). Any checkpoint
sample.py reads (a run folder: its best checkpoint); --device, --dtype and --tokenizer as in sample.py.

--held_out=True keeps the documents or records `prepare` puts in the validation split (0, 100, 200, ...,
or with --val_fraction=F the share prepare's --val_fraction=F held out; the shards' meta.json records it
under "validation"): a model trained on data prepared from --input is measured on what it has not seen.
Data prepared with --val_input FILE held out all of FILE: measure on --input=FILE.

Plain text: the documents are tokenized as in the shards (BOS before each) and every token after the first
is predicted once, the stream cut into consecutive windows of the model's context (a window does not see
the text before it), batch_size windows at a time. loss = the mean negative log-likelihood per predicted
token (nats), perplexity = exp(loss), bits per byte = the summed loss in bits / the UTF-8 bytes of the
documents: it does not depend on the tokenizer, so models with different vocabularies compare.

Instruction records: the same over the record layout of the template (the checkpoint's, or the input's for
a model that records none), counting the response tokens only (the masked loss; bytes of the responses).
Then the model answers each record's last instruction (greedy unless --temperature > 0); --out gets one
{"instruction", "response", "reference"} row per record (JSONL), and records with a Words: field count as
met when the response uses every requested word (instruct.words_met: as a word, case-insensitive, or with
-s, -es, -d, -ed or -ing).
"""
import json
import math
import sys

import numpy as np
import torch
from tqdm import tqdm

import configurator
from configurator import ConfigError, parse_config
from llamatiny import generate, instruct, readers, runs, runtime
from llamatiny.data import DataError
from llamatiny.fileio import atomic_write

OPTIONS = {
    "checkpoint": ("out/ckpt.pt", "train.py's checkpoint or run folder (its best), a llama2.c .bin, or a "
                                  "Hugging Face directory"),
    "input": ("", "the text, stories or instruction records to measure on (a file or a directory)"),
    "format": ("auto", f"how to read --input: auto, {', '.join(instruct.FORMATS)} "
                       f"(as tinystories.py prepare)"),
    "words_from_story": (0, "N > 0: plain stories become Words: instructions of N of their words "
                            "(as prepare)"),
    "held_out": (False, "True: only the records prepare holds out for validation "
                        "(0, 100, 200, ... of --input)"),
    "val_fraction": (None, "with --held_out: the share prepare --val_fraction held out (None: a hundredth)"),
    "tokenizer": ("", "sentencepiece .model; \"\" = the one recorded in the checkpoint"),
    "batch_size": (16, "context windows per forward pass"),
    "max_records": (None, "instruction records: the first N only (None = all)"),
    "max_new_tokens": (256, "at most this many tokens per generated response"),
    "temperature": (0.0, "0 = greedy (argmax); higher is more random"),
    "top_p": (1.0, "nucleus sampling with --temperature > 0 (1.0 = all tokens)"),
    "repetition_penalty": (1.0, "> 1 makes tokens already in the context less likely (1.0 = off)"),
    "seed": (1337, "random seed for sampling"),
    "out": ("", "write the generated responses here: JSONL rows {instruction, response, reference}"),
    "device": ("auto", "auto = cuda, else mps, else cpu"),
    "threads": (None, "CPU threads; None = as train.py: all cores on an idle machine, half while others run"),
    "dtype": ("auto", "float32 | bfloat16 | float16; auto = bfloat16 (or float16) on cuda, else float32"),
}
DEFAULTS = {name: default for name, (default, _) in OPTIONS.items()}


class EvalError(Exception):
    pass


def usage() -> str:
    synopsis = "python eval.py --checkpoint=CKPT --input=FILE [--key=value ...]"
    return configurator.usage(synopsis, __doc__, OPTIONS)


def check_settings(cfg: dict) -> dict:
    if not cfg["input"]:
        raise EvalError("--input=FILE is required: the text or instruction records to measure on")
    if cfg["batch_size"] < 1 or cfg["max_new_tokens"] < 1:
        raise EvalError("--batch_size and --max_new_tokens must be at least 1")
    if cfg["threads"] is not None and (not isinstance(cfg["threads"], int) or cfg["threads"] < 1):
        raise EvalError(f"--threads={cfg['threads']!r} must be a positive integer (None: by load)")
    share = cfg["val_fraction"]
    if share is not None and (not cfg["held_out"] or not isinstance(share, float) or not 0 < share < 1):
        raise EvalError(f"--val_fraction={share!r}: a share between 0 and 1, with --held_out=True "
                        "(the one prepare --val_fraction held out)")
    if cfg["max_records"] is not None and (not isinstance(cfg["max_records"], int) or cfg["max_records"] < 1):
        raise EvalError(f"--max_records={cfg['max_records']!r} must be a positive integer (or None = all)")
    if cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1 or cfg["repetition_penalty"] <= 0:
        raise EvalError("--temperature must be >= 0 (0 = greedy), --top_p in (0, 1] and --repetition_penalty "
                        "positive (1 = off)")
    return {**cfg, "top_k": None, "top_p": None if cfg["top_p"] == 1 else cfg["top_p"]}


@torch.no_grad()
def stream_loss(model, tokens: np.ndarray, mask: np.ndarray | None, batch_size: int,
                ctx) -> tuple[float, int]:
    """(summed loss in nats, targets) over a token stream: every token after the first is a target (where
    mask is 1), predicted from the window of up to max_seq_len tokens before it that it shares."""
    T, device = model.args.max_seq_len, model.output.weight.device
    tokens = tokens.astype(np.int64)
    n = -(-(len(tokens) - 1) // T)  # windows
    x = np.zeros(n * T, np.int64)
    y = np.full(n * T, -1, np.int64)  # padding at the end of the last window: ignored
    x[:len(tokens) - 1] = tokens[:-1]
    y[:len(tokens) - 1] = np.where(mask[1:] != 0, tokens[1:], -1) if mask is not None else tokens[1:]
    x, y = torch.from_numpy(x).view(n, T), torch.from_numpy(y).view(n, T)  # (windows, T)
    total, targets = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc="loss", unit=" batches", file=sys.stderr):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with ctx:
            _, loss = model(xb, yb)
        counted = int((yb != -1).sum())
        if counted:  # a batch of prompt tokens only has no loss (its mean is NaN)
            total += loss.double().item() * counted
            targets += counted
    return total, targets


def generate_responses(model, tok, template: str, records: list, cfg: dict):
    """Yields (record, response text): the model's reply to each record's last instruction."""
    torch.manual_seed(cfg["seed"])
    for messages in tqdm(records, desc="generating", unit=" records", file=sys.stderr):
        ids = instruct.prompt_ids(tok, template, messages[:-1])
        new = generate.generate_story(model, tok, ids, cfg, write=lambda text: None, echo=False)
        yield messages, tok.decode(new)


def evaluate(model, tok, checkpoint: dict, cfg: dict, ctx, say=print) -> dict:
    source = readers.InputRecords(cfg["input"], cfg["format"], cfg["words_from_story"])
    items = []
    for i, item in enumerate(source):
        if cfg["held_out"] and not readers.is_val(i, cfg["val_fraction"] or 1 / readers.VAL_EVERY):
            continue
        items.append(item)
        if source.template is not None and len(items) == cfg["max_records"]:
            break  # instruction records: read no further than the ones measured
    if not items:
        raise EvalError(f"no documents in {cfg['input']}")
    if source.skips.reasons:
        say(source.skips.summary())
    if source.template is None:
        tokens, mask = tok.encode_documents(items), None
        nbytes, what = sum(len(d.encode("utf-8")) for d in items), f"{len(items):,} documents"
    else:
        trained = (checkpoint.get("template") or {}).get("name")
        if trained and trained != source.template:
            raise EvalError(f"{cfg['checkpoint']} was tuned on the {trained} template but {cfg['input']} "
                            f"holds {source.template}-template records "
                            f"({', '.join(sorted(set(source.formats)))})")
        items = items[:cfg["max_records"]]
        tokens, mask = instruct.encode_records(tok, source.template, items)
        nbytes = sum(len(m["content"].encode("utf-8")) for r in items for m in r if m["role"] == "assistant")
        what = f"{len(items):,} instruction records, the loss on their responses"
    nats, targets = stream_loss(model, tokens, mask, cfg["batch_size"], ctx)
    loss = nats / max(targets, 1)
    result = {"documents": len(items), "tokens": len(tokens), "targets": targets, "loss": loss,
              "bits_per_byte": nats / math.log(2) / max(nbytes, 1), "perplexity": math.exp(loss)}
    say(f"{cfg['input']}: {what}: {targets:,} tokens predicted ({nbytes:,} bytes) | "
        f"loss {loss:.4f} per token | {result['bits_per_byte']:.4f} bits per byte | "
        f"perplexity {result['perplexity']:.3f}")
    if source.template is None:
        if cfg["out"]:
            say(f"note: --out={cfg['out']} not written: {cfg['input']} holds no instruction records, so "
                f"there are no responses to write (plain text is measured, not answered)")
        return result

    rows, asked, met, requested, used = [], 0, 0, 0, 0
    for messages, response in generate_responses(model, tok, source.template, items, cfg):
        rows.append({"instruction": messages[-2]["content"], "response": response,
                     "reference": messages[-1]["content"]})
        if words := instruct.requested_words(messages):
            asked, requested = asked + 1, requested + len(words)
            met += instruct.words_met(words, response)
            used += sum(instruct.words_met([w], response) for w in words)
    result.update(records=len(rows), words_asked=asked, words_met=met,
                  words_share=met / asked if asked else None,
                  words_used_share=used / requested if requested else None)
    how = "greedy" if cfg["temperature"] == 0 else f"temperature {cfg['temperature']}"
    say(f"generated {len(rows):,} responses ({how})" + (f": {cfg['out']}" if cfg["out"] else ""))
    if asked:
        say(f"Words constraints met: {met:,} of {asked:,} ({met / asked:.1%}); "
            f"requested words used: {used:,} of {requested:,} ({used / requested:.1%})")
    if cfg["out"]:
        with atomic_write(cfg["out"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return result


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage())
        return None
    try:
        stray = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]
        if stray:
            raise EvalError(f"unexpected argument {stray[0]!r}: settings are --key=value, e.g. --input=FILE")
        cfg = check_settings(parse_config(DEFAULTS, argv))
        device = runtime.resolve_device(cfg["device"])
        dtype = runtime.resolve_dtype(cfg["dtype"], device)
        # every core of a busy machine would stall each batch and token
        threads = f", {runtime.use_cpu_threads(cfg['threads'])}" if device == "cpu" else ""
        cfg["checkpoint"] = runs.find_checkpoint(cfg["checkpoint"], DEFAULTS["checkpoint"])
        model, checkpoint = generate.load_model(cfg["checkpoint"], device)
        tok = generate.load_tokenizer(cfg, checkpoint, model.args.vocab_size)
        model = generate.for_inference(model, runtime.DTYPES[dtype])
        print(f"{model.num_params() / 1e6:.1f}M parameters from {cfg['checkpoint']}, "
              f"tokenizer {tok.model_path}, {device} {dtype}{threads}", file=sys.stderr)
        return evaluate(model, tok, checkpoint, cfg, runtime.autocast(device, dtype))
    except (EvalError, generate.LoadError, ConfigError, DataError, instruct.InstructError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
