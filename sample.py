"""
Generate stories from a trained model, streamed to stdout as the tokens come.

    python sample.py --prompt="Once upon a time" --num_samples=3
    python sample.py --checkpoint=out/ckpt.pt --temperature=0    # greedy
    python sample.py --checkpoint=stories15M.bin --tokenizer=data/llama2_tokenizer.model --top_p=0.9
    python sample.py --prompt_file=prompt.txt --max_new_tokens=500 --device=cuda --compile=True
    python sample.py --checkpoint=out/hf                          # export.py --format=hf's directory
    python sample.py --checkpoint=out/sft/ckpt.pt --instruction="Words: dog, ball, happy"  # instruction-tuned
    python sample.py --checkpoint=out/sft/ckpt.pt --instruction_file=instructions.txt
    python sample.py --checkpoint=out/lora/ckpt.pt                # a LoRA fine-tune: base + adapters

The tokenizer is the one recorded in the checkpoint, or a Hugging Face directory's tokenizer.model
(--tokenizer overrides it; a llama2.c .bin records none). Each story stops at the end-of-story token
(BOS or EOS) or after max_new_tokens; samples (and instructions) are separated by a line of dashes.
Settings and timing go to stderr, stories to stdout.

--instruction renders the instruction in the template the checkpoint was tuned with (llamatiny/instruct.py; a
story model takes fields such as "Words: dog, ball, happy", one a line, \n starting a new line; a chat model
the user's message) and prints only the response. --instruction_file holds one instruction a line (or records
separated by <|endoftext|> lines), or instruction records as `tinystories.py prepare` reads them (their
responses are left out). --prompt stays raw text, given to the model as it is.
"""
import os
import sys
import time

import torch

import configurator
from configurator import ConfigError, parse_config
from llamatiny import instruct, runtime
from llamatiny.generate import LoadError, for_inference, generate_story, load_model, load_tokenizer

# name: (default, help). --help prints them; parse_config checks the types against the defaults.
OPTIONS = {
    "checkpoint": ("out/ckpt.pt", "train.py's checkpoint, a llama2.c .bin, or a Hugging Face directory"),
    "tokenizer": ("", "sentencepiece .model; \"\" = the one recorded in the checkpoint"),
    "prompt": ("", "text the stories start with (\"\" = from scratch)"),
    "prompt_file": ("", "or read the prompt from this file (one trailing newline dropped)"),
    "instruction": ("", "an instruction-tuned model: the instruction, in its template; "
                        "prints the response only"),
    "instruction_file": ("", "or instructions from this file, one a line, or instruction records"),
    "num_samples": (1, "stories to generate"),
    "max_new_tokens": (256, "at most this many new tokens per story (fewer if the story ends)"),
    "temperature": (1.0, "0 = greedy (argmax); higher is more random"),
    "top_k": (None, "keep only the k most likely tokens (None or 0 = all)"),
    "top_p": (0.9, "nucleus sampling: the fewest tokens with this much probability (1.0 = all)"),
    "seed": (1337, "random seed: the same seed and settings give the same stories"),
    "device": ("auto", "auto = cuda, else mps, else cpu"),
    "dtype": ("auto", "float32 | bfloat16 | float16; auto = bfloat16 (or float16) on cuda, else float32"),
    "compile": (False, "torch.compile the forward pass (pays off on a GPU for long generations)"),
    # Batch-1 decoding is hundreds of tiny ops a token, each a parallel region whose threads wait for the
    # slowest: more threads gain little, and one thread descheduled by another job stalls the rest. A
    # laptop always has something else running, so one thread is the default (figures: bench/README.md);
    # try --threads=0 on an idle many-core machine for the larger models.
    "threads": (1, "CPU threads (0 = torch's default, one per physical core)"),
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
    if cfg["threads"] < 0:
        raise SampleError(f"--threads={cfg['threads']} must be >= 0 (0 = torch's default)")
    if cfg["temperature"] < 0:
        raise SampleError(f"--temperature={cfg['temperature']} must be >= 0 (0 = greedy)")
    top_k = cfg["top_k"]
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise SampleError(f"--top_k={top_k!r} must be a positive integer, or None / 0 for no limit")
    if not 0 < cfg["top_p"] <= 1:
        raise SampleError(f"--top_p={cfg['top_p']} must be in (0, 1] (1 = no limit)")
    given = [f"--{k}" for k in ("prompt", "prompt_file", "instruction", "instruction_file") if cfg[k]]
    if len(given) > 1:
        raise SampleError(f"give one of {' and '.join(given)}, not both")
    return {**cfg, "top_k": top_k or None, "top_p": None if cfg["top_p"] == 1 else cfg["top_p"]}


def read_prompt(cfg: dict) -> str:
    if not cfg["prompt_file"]:
        return cfg["prompt"]
    if not os.path.isfile(cfg["prompt_file"]):
        raise SampleError(f"prompt file not found: {cfg['prompt_file']}")
    try:
        with open(cfg["prompt_file"], encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SampleError(f"prompt file {cfg['prompt_file']} is not UTF-8 text "
                          f"({e.reason} at byte {e.start})") from None
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
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = runtime.resolve_device(cfg["device"])
    dtype = runtime.DTYPES[runtime.resolve_dtype(cfg["dtype"], device)]
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
          f"{device} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} CPU thread(s)",
          file=sys.stderr)
    return cfg, model, tok, prompts, echo


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    try:
        cfg, model, tok, prompts, echo = setup(argv)
    except (SampleError, LoadError, ConfigError) as e:
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
