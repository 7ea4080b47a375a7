r"""
Generate stories from a trained model, streamed to stdout as the tokens come.

    python sample.py --prompt="Once upon a time" --num_samples=3
    python sample.py --checkpoint=out/15m --temperature=0        # a run folder: its best checkpoint; greedy
    python sample.py --checkpoint=out/15m --repetition_penalty=1.2
    python sample.py --start="Once upon a time"                   # llama2.c's and nanoGPT's --prompt
    python sample.py --start=FILE:prompt.txt                      # nanoGPT's prompt from a file
    python sample.py --checkpoint=stories15M.bin --tokenizer=data/llama2_tokenizer.model --top_p=0.9
    python sample.py --prompt_file=prompt.txt --max_new_tokens=500 --device=cuda --compile=True
    python sample.py --checkpoint=out/hf                          # export.py --format=hf's directory
    python sample.py --checkpoint=out/sft/ckpt.pt --instruction="Words: dog, ball, happy"  # instruction-tuned
    python sample.py --checkpoint=out/sft/ckpt.pt --instruction_file=instructions.txt
    python sample.py --checkpoint=out/lora/ckpt.pt                # a LoRA fine-tune: base + adapters

--checkpoint names a file or a folder: a run folder (train.py's out_dir) is its best checkpoint,
ckpt_best.pt, else its latest, ckpt.pt; an export.py --format=hf folder is that model. Left at its default,
out/ckpt.pt, when there is none there, it is the run in out/ that saved last (after `python train.py
config/train_15m.py`, out/15m). A note on stderr says which checkpoint is read.

--repetition_penalty > 1 (1.1 - 1.3 are usual; 1 = off) makes a token that is already in the context (the
prompt and what is generated since) less likely, whatever sampling follows: CTRL's rule, each such token's
logit divided by the penalty where positive and multiplied by it where negative.

The tokenizer is the one recorded in the checkpoint, or a Hugging Face directory's tokenizer.model
(--tokenizer overrides it; a llama2.c .bin records none). Each story stops at the end-of-story token
(BOS or EOS) or after max_new_tokens; samples (and instructions) are separated by a line of dashes.
Settings and timing go to stderr, stories to stdout.

--instruction renders the instruction in the template the checkpoint was tuned with (llamatiny/instruct.py; a
story model takes fields such as "Words: dog, ball, happy", one a line, \n starting a new line, as in
--instruction="Words: dog\nFeatures: Dialogue"; a chat model the user's message) and prints only the
response. --instruction_file holds one instruction a line (or records separated by <|endoftext|> lines), or
instruction records as `tinystories.py prepare` reads them (their responses are left out). --prompt stays raw
text, given to the model as it is.
"""
import os
import sys
import time

import torch

import configurator
from configurator import ConfigError, parse_config
from llamatiny import instruct, runs, runtime
from llamatiny.generate import LoadError, for_inference, generate_story, load_model, load_tokenizer

# name: (default, help). --help prints them; parse_config checks the types against the defaults.
OPTIONS = {
    "checkpoint": ("out/ckpt.pt", "train.py's checkpoint or run folder (its best), a llama2.c .bin, or a "
                                  "Hugging Face directory"),
    "tokenizer": ("", "sentencepiece .model; \"\" = the one recorded in the checkpoint"),
    "prompt": ("", "text the stories start with (\"\" = from scratch); FILE:path reads it from a file"),
    "start": ("", "the same as --prompt (llama2.c's and nanoGPT's name for it)"),
    "prompt_file": ("", "or read the prompt from this file (one trailing newline dropped)"),
    "instruction": ("", "an instruction-tuned model: the instruction, in its template; "
                        "prints the response only"),
    "instruction_file": ("", "or instructions from this file, one a line, or instruction records"),
    "num_samples": (1, "stories to generate"),
    "max_new_tokens": (256, "at most this many new tokens per story (fewer if the story ends)"),
    "temperature": (1.0, "0 = greedy (argmax); higher is more random"),
    "top_k": (None, "keep only the k most likely tokens (None or 0 = all)"),
    "top_p": (0.9, "nucleus sampling: the fewest tokens with this much probability (1.0 = all)"),
    "repetition_penalty": (1.0, "> 1 makes tokens already in the context less likely (1.0 = off)"),
    "seed": (1337, "random seed: the same seed and settings give the same stories"),
    "device": ("auto", "auto = cuda, else mps, else cpu"),
    "dtype": ("auto", "float32 | bfloat16 | float16; auto = bfloat16 (or float16) on cuda, else float32"),
    "compile": (False, "torch.compile the forward pass (pays off on a GPU for long generations)"),
    # Decoding one token reads every weight once, and on an idle machine more cores read them faster; but
    # each of its ~20 small ops a layer is a parallel region whose threads wait for the slowest, so beside
    # another busy process every thread stalls (figures: bench/README.md). Hence train.py's rule
    "threads": (None, "CPU threads; None = all cores on an idle machine, half while others run; "
                      "0 = torch's default"),
    "cpu_speedups": (True, "faster CPU kernels for the same math (llamatiny/cpu_kernels.py); "
                           "False = plain PyTorch"),
}
DEFAULTS = {name: default for name, (default, _) in OPTIONS.items()}
SEPARATOR = "-" * 40


class SampleError(Exception):
    pass


def check_settings(cfg: dict) -> dict:
    # the configurator checks types against the defaults; these are the ranges
    if cfg["num_samples"] < 1 or cfg["max_new_tokens"] < 1:
        raise SampleError("--num_samples and --max_new_tokens must be at least 1")
    threads = cfg["threads"]
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
        raise SampleError(f"--threads={threads!r} must be a whole number >= 0 (None: by load, 0: torch's "
                          "default)")
    if cfg["temperature"] < 0:
        raise SampleError(f"--temperature={cfg['temperature']} must be >= 0 (0 = greedy)")
    top_k = cfg["top_k"]
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise SampleError(f"--top_k={top_k!r} must be a positive integer, or None / 0 for no limit")
    if not 0 < cfg["top_p"] <= 1:
        raise SampleError(f"--top_p={cfg['top_p']} must be in (0, 1] (1 = no limit)")
    if cfg["repetition_penalty"] <= 0:
        raise SampleError(f"--repetition_penalty={cfg['repetition_penalty']} must be positive (1 = off, "
                          "above 1 discourages repeats)")
    prompts = ("prompt", "start", "prompt_file", "instruction", "instruction_file")
    given = [f"--{k}" for k in prompts if cfg[k]]
    if len(given) > 1:
        raise SampleError(f"give one of {' and '.join(given)}, not both")
    return {**cfg, "top_k": top_k or None, "top_p": None if cfg["top_p"] == 1 else cfg["top_p"]}


def read_prompt(cfg: dict) -> str:
    # --prompt (or --start) as typed, or a file's text: --prompt_file=PATH, or nanoGPT's --start=FILE:PATH
    prompt = cfg["prompt"] or cfg["start"]
    path = cfg["prompt_file"] or (prompt.removeprefix("FILE:") if prompt.startswith("FILE:") else "")
    if not path:
        return prompt
    if not os.path.isfile(path):
        raise SampleError(f"prompt file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SampleError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def read_instructions(cfg: dict, checkpoint: dict) -> tuple[str, list[list[dict]]]:
    """--instruction or --instruction_file -> (the checkpoint's template, the messages of each prompt)."""
    from llamatiny.data import DataError
    from llamatiny.readers import InputRecords

    template = (checkpoint.get("template") or {}).get("name")
    if template is None:
        raise SampleError(f"{cfg['checkpoint']} records no instruction template "
                          "(it was not tuned on instruction data): give it raw text with --prompt")
    path = cfg["instruction_file"]
    try:
        if not path:
            instruction = cfg["instruction"].replace("\\n", "\n")
            return template, [instruct.instruction_messages(template, instruction)]
        if not os.path.isfile(path):
            raise SampleError(f"instruction file not found: {path}")
        source = InputRecords(path)
        records = list(source)
        if source.template is not None:  # records with their references: prompt with all but the reply
            if source.template != template:
                raise SampleError(f"{path} holds {source.template}-template records but "
                                  f"{cfg['checkpoint']} was tuned on the {template} template")
            return template, [messages[:-1] for messages in records]
        with open(path, encoding="utf-8") as f:
            text = f.read()
        texts = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.splitlines()
        return template, [instruct.instruction_messages(template, t.replace("\\n", "\n"))
                          for t in texts if t.strip()]
    except (instruct.InstructError, DataError) as e:
        raise SampleError(str(e)) from None


def encode_prompt(tok, text: str, max_seq_len: int) -> list[int]:
    return check_prompt(tok.encode(text, bos=True), max_seq_len)


def check_prompt(ids: list[int], max_seq_len: int) -> list[int]:
    if len(ids) >= max_seq_len:  # at least one position must be left for a new token
        raise SampleError(f"the prompt is {len(ids)} tokens (with BOS) but the model's context is "
                          f"{max_seq_len}: shorten it to at most {max_seq_len - 1} tokens")
    return ids


def usage() -> str:
    return configurator.usage("python sample.py [config.py ...] [--key=value ...]", __doc__, OPTIONS)


def setup(argv):
    stray = [a for a in argv if not a.startswith("-") and not a.endswith(".py")]
    if stray:  # `--prompt "Once upon"` reaches us as two words
        raise SampleError(f"unexpected argument {stray[0]!r}: settings are --key=value, "
                          "e.g. --prompt=\"Once upon a time\"")
    try:
        cfg = check_settings(parse_config(DEFAULTS, argv))
    except ConfigError as e:
        raise SampleError(str(e)) from None
    prompt = read_prompt(cfg)
    device = runtime.resolve_device(cfg["device"])
    if device == "cpu" and cfg["threads"] != 0:
        threads = runtime.use_cpu_threads(cfg["threads"])
    else:  # 0: torch's own choice
        threads = f"{torch.get_num_threads()} CPU thread(s)"
    dtype = runtime.DTYPES[runtime.resolve_dtype(cfg["dtype"], device)]
    cfg["checkpoint"] = runs.find_checkpoint(cfg["checkpoint"], DEFAULTS["checkpoint"])
    model, checkpoint = load_model(cfg["checkpoint"], device)
    tok = load_tokenizer(cfg, checkpoint, model.args.vocab_size)
    echo = not (cfg["instruction"] or cfg["instruction_file"])  # an instruction's response only
    if echo:
        prompts = [encode_prompt(tok, prompt, model.args.max_seq_len)]
    else:
        template, instructions = read_instructions(cfg, checkpoint)
        prompts = [check_prompt(instruct.prompt_ids(tok, template, m), model.args.max_seq_len)
                   for m in instructions]
    model = for_inference(model, dtype, cfg["cpu_speedups"], cfg["compile"])
    print(f"{model.num_params() / 1e6:.1f}M parameters from {cfg['checkpoint']}, tokenizer {tok.model_path}, "
          f"{device} {str(dtype).removeprefix('torch.')}, {threads}",
          file=sys.stderr)
    return cfg, model, tok, prompts, echo


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    try:
        cfg, model, tok, prompts, echo = setup(argv)
    except (SampleError, LoadError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    # a console that cannot show a character shows an escape, not a crash
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    torch.manual_seed(cfg["seed"])
    n_tokens, seconds = 0, 0.0
    try:
        for i, prompt_ids in enumerate(p for p in prompts for _ in range(cfg["num_samples"])):
            if i:
                write(f"\n{SEPARATOR}\n")
            t0 = time.perf_counter()
            n_tokens += len(generate_story(model, tok, prompt_ids, cfg, write, echo))
            seconds += time.perf_counter() - t0
        write("\n")
    except KeyboardInterrupt:
        write("\n")
        sys.exit(130)
    except BrokenPipeError:  # `python sample.py | head`: the reader has gone, so stop quietly
        # (Python's recipe: point stdout at devnull so the flush at exit does not fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / max(seconds, 1e-9):.1f} tokens/s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
