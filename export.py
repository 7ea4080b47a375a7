"""
Export a trained model to other runtimes, or import theirs as one of our checkpoints.

    python export.py out/model.bin --checkpoint=out/ckpt.pt                  # llama2.c version 0, for run.c
    python export.py out/model_q80.bin --checkpoint=out/ckpt.pt --version=2  # int8, for runq.c
    python export.py out/hf --checkpoint=out/ckpt.pt --format=hf             # a Hugging Face directory
    python export.py 15m.pt --checkpoint=stories15M.bin --format=pt --tokenizer=data/llama2_tokenizer.model
    python export.py out/adapter --checkpoint=out/lora/ckpt.pt --format=peft   # LoRA adapters alone, for peft
    python export.py out/model.gguf --checkpoint=out/ckpt.pt --format=gguf --dtype=q8_0   # llama.cpp, Ollama

--format=llama2c writes llama2.c's model file and, beside it, the tokenizer in run.c's format named after
it (out/model.bin -> out/model.tokenizer.bin), so exports with different vocabularies can share a folder.
run.c reads version 0 only (on version 1 it stops with "malloc failed!"); runq.c reads version 2; version
1 (float32 with a header) is read by this project's sample.py and train.py. The command to run is printed.
--format=hf writes config.json, model.safetensors and, with a tokenizer, tokenizer.model,
tokenizer_config.json and generation_config.json (generate() stops at EOS or BOS, as sample.py does); an
instruction-tuned model's template becomes the tokenizer's chat template.
Loading it needs: pip install transformers safetensors protobuf sentencepiece (without protobuf,
AutoTokenizer fails with a misleading "`tiktoken` is required").
--format=gguf writes one file for llama.cpp (and Ollama, LM Studio, llama-cpp-python): the weights (--dtype
float32, float16, bfloat16 or q8_0; llama.cpp's f32, f16, bf16 are the same), the architecture's settings and
the tokenizer, with an instruction-tuned model's template as its chat template: `llama-completion -m
out/model.gguf -no-cnv -p "Once upon a time"` (`llama-cli` in older llama.cpp releases) needs nothing else.
It needs `pip install gguf` (llama.cpp's own Python writer).
--format=pt writes our own checkpoint (model, model_args, tokenizer) from a llama2.c file or a Hugging
Face directory, so sample.py and fine-tuning can start from it.
A LoRA fine-tune (train.py --lora_rank) is exported merged, its adapters folded into its base's weights
(W + alpha/rank B A), in any of these formats. --format=peft writes its adapters alone instead, as
adapter_config.json and adapter_model.safetensors named after --format=hf's weights: with transformers and
peft, PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), "out/adapter"), where BASE_HF
is the base exported with --format=hf.
The file formats are described in llamatiny/checkpoint.py, which reads and writes them.
"""
import os
import shlex
import sys
from dataclasses import asdict

import configurator
from configurator import ConfigError, parse_config
from llamatiny import runtime
from llamatiny.checkpoint import (
    GGUF_TYPES,
    from_checkpoint,
    load_sentencepiece,
    save_checkpoint,
    write_gguf,
    write_hf,
    write_llama2c,
    write_peft,
    write_tokenizer_bin,
)
from llamatiny.fileio import check_writable

# name: (default, help). --help prints them; parse_config checks the types against the defaults.
OPTIONS = {
    "checkpoint": ("out/ckpt.pt", "the model: train.py's checkpoint, a llama2.c .bin, or a Hugging Face dir"),
    "format": ("llama2c", "llama2c (file + tokenizer for run.c) | hf (Hugging Face directory) | gguf (one "
                          "file for llama.cpp) | pt (ours) | peft (a LoRA fine-tune's adapters alone)"),
    "version": (None, "llama2c: 0 (None) = float32 for run.c, 1 = float32 + header, 2 = int8 for runq.c"),
    "group_size": (None, "--version=2: values per int8 scale; None = largest power of 2 <= 64 dividing dim,"
                         " hidden_dim"),
    "dtype": (None, "hf: float32 | bfloat16 | float16; gguf: those or q8_0; None = float32"),
    "tokenizer": ("", "sentencepiece .model to export with the model; \"\" = the checkpoint's own"),
}
DEFAULTS = {name: default for name, (default, _) in OPTIONS.items()}
RUNNERS = {0: "run", 2: "runq"}  # llama2.c's programs (run.c, runq.c), by the file version each reads
LLAMA_CPP_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # --dtype as llama.cpp says it


class ExportError(ValueError):  # bad options: printed as one line
    pass


def usage() -> str:
    return configurator.usage("python export.py OUT [--key=value ...]", __doc__, OPTIONS)


def tokenizer_bin_path(model_path: str) -> str:
    # out/model.bin -> out/model.tokenizer.bin: each model file has its own, whatever its vocabulary
    return model_path.removesuffix(".bin") + ".tokenizer.bin"


def check_options(cfg: dict) -> dict:
    fmt, version, group_size, dtype = cfg["format"], cfg["version"], cfg["group_size"], cfg["dtype"]
    if fmt not in ("llama2c", "hf", "gguf", "pt", "peft"):
        raise ExportError(f"--format={fmt}: choose llama2c, hf, gguf, pt or peft")
    if version is not None and fmt != "llama2c":
        raise ExportError("--version applies to --format=llama2c only")
    version = 0 if version is None else version
    if version not in (0, 1, 2):
        raise ExportError(f"--version={version}: choose 0 (run.c), 1 (float32, versioned header) or 2 "
                          "(int8, runq.c)")
    if group_size is not None and not (fmt == "llama2c" and version == 2):
        raise ExportError("--group_size applies to --format=llama2c --version=2 only")
    if group_size is not None and not isinstance(group_size, int):
        raise ExportError(f"--group_size={group_size!r} must be an integer")
    if dtype is not None and fmt not in ("hf", "gguf"):
        raise ExportError("--dtype applies to --format=hf and gguf only: llama2.c files are float32 "
                          "(versions 0, 1) or int8 (version 2); --format=pt keeps the checkpoint's weights")
    choices, given = GGUF_TYPES if fmt == "gguf" else runtime.DTYPES, dtype
    dtype = LLAMA_CPP_DTYPES.get(dtype, dtype or "float32")
    if dtype not in choices:
        raise ExportError(f"--dtype={given}: choose one of {', '.join(choices)}")
    if fmt == "gguf":
        try:
            import gguf  # noqa: F401  write_gguf's writer, checked before the model is read
        except ImportError:
            raise ExportError("--format=gguf needs llama.cpp's gguf package: pip install gguf") from None
    return {**cfg, "version": version, "dtype": dtype}


def run(out: str, cfg: dict) -> list[str]:
    cfg = check_options(cfg)
    fmt, version = cfg["format"], cfg["version"]
    if fmt == "llama2c" and (os.path.isdir(out) or out.endswith("tokenizer.bin")):
        raise ExportError(f"{out}: give a model file path such as out/model.bin (its tokenizer goes "
                          "beside it)")
    if fmt == "gguf" and os.path.isdir(out):
        raise ExportError(f"{out} is a directory; --format=gguf writes one file, such as out/model.gguf")
    if fmt in ("hf", "peft") and os.path.isfile(out):
        raise ExportError(f"{out} is a file; --format={fmt} writes a directory")
    check_writable(out if fmt in ("hf", "peft") else os.path.dirname(out) or ".")  # before the model is read
    try:
        model, checkpoint = from_checkpoint(cfg["checkpoint"])  # .pt, llama2.c .bin or HF directory
    except FileNotFoundError:
        raise  # its message says what to do
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # not a model file, or a damaged one
        raise ExportError(f"cannot load --checkpoint={cfg['checkpoint']}: {runtime.first_line(e)}") from None
    adapters = checkpoint.get("lora")
    if fmt == "peft":
        if not adapters:
            raise ExportError(f"--format=peft writes a LoRA fine-tune's adapters, and {cfg['checkpoint']} is "
                              "a whole model: train adapters with train.py --lora_rank=8 --init_from=PATH")
        written = write_peft(out, adapters, model.args)
        print(f"wrote {out}/ ({', '.join(os.path.basename(p) for p in written)}; rank {adapters['rank']}, "
              f"alpha {adapters['alpha']:g}) for the base {adapters['base']['path']}")
        print("load it with transformers and peft onto the base's --format=hf export: PeftModel."
              f"from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), {out!r})")
        return written
    if adapters:
        print(f"merging the LoRA adapters (rank {adapters['rank']}, alpha {adapters['alpha']:g}) of "
              f"{cfg['checkpoint']} into its base {adapters['base']['path']}")
    tokenizer = cfg["tokenizer"] or checkpoint.get("tokenizer")
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise ExportError(f"tokenizer not found: {tokenizer} (pass --tokenizer=path/to/tokenizer.model)")
        sp = load_sentencepiece(tokenizer)
        if sp.vocab_size() != model.args.vocab_size:
            raise ExportError(f"tokenizer {tokenizer} has {sp.vocab_size()} tokens but the model has "
                              f"vocab_size={model.args.vocab_size}: pass the tokenizer the model was "
                              "trained with")
    elif fmt == "gguf":
        raise ExportError(f"a GGUF file holds the tokenizer, and {cfg['checkpoint']} records none: pass "
                          "--tokenizer=path/to/tokenizer.model")
    else:
        print(f"note: {cfg['checkpoint']} records no tokenizer; pass --tokenizer=PATH to export one too",
              file=sys.stderr)

    if fmt == "llama2c":
        info = write_llama2c(out, model, version, cfg["group_size"])
        detail = (f", group size {info['group_size']}, max abs quantisation error "
                  f"{info['max_quant_error']:.2e}" if version == 2 else "")
        print(f"wrote {out} (llama2.c version {version}, {info['bytes'] / 1e6:.1f} MB{detail})")
        written = [out]
        if tokenizer:
            if sp.bos_id() != 1:
                print(f"warning: run.c assumes BOS=1, this tokenizer's BOS is {sp.bos_id()}", file=sys.stderr)
            written.append(tokenizer_bin_path(out))
            write_tokenizer_bin(written[-1], tokenizer)
            print(f"wrote {written[-1]} ({sp.vocab_size()} tokens, run.c's tokenizer format)")
        if version not in RUNNERS:
            print("version 1 is read by sample.py and train.py; llama2.c's run.c reads version 0 (on "
                  "version 1 it stops with 'malloc failed!') and runq.c version 2")
        else:
            z = shlex.quote(written[-1]) if tokenizer else "TOKENIZER.bin  (export one with --tokenizer=PATH)"
            program = RUNNERS[version]
            print(f"run it with llama2.c's {program}.c: ./{program} {shlex.quote(out)} -z {z}")
        return written
    if fmt == "hf":
        template = (checkpoint.get("template") or {}).get("name") if tokenizer else None
        written = write_hf(out, model, tokenizer, cfg["dtype"], template)
        print(f"wrote {out}/ ({', '.join(os.path.basename(p) for p in written)}; {cfg['dtype']})")
        print(f"load it with transformers (pip install transformers safetensors protobuf sentencepiece): "
              f"AutoModelForCausalLM.from_pretrained({out!r}), AutoTokenizer.from_pretrained({out!r})")
        if template:
            print(f"its tokenizer's chat template is the {template} template it was tuned with: "
                  "tokenizer.apply_chat_template(messages, add_generation_prompt=True)")
        return written
    if fmt == "gguf":
        template = (checkpoint.get("template") or {}).get("name")
        info = write_gguf(out, model, tokenizer, cfg["dtype"], template)
        chat = f" and the {template} template as its chat template" if template else ""
        print(f"wrote {out} (GGUF, {cfg['dtype']}, {info['bytes'] / 1e6:.1f} MB, with its "
              f"{sp.vocab_size()}-token tokenizer{chat})")
        if kept := info["kept_f16"]:
            print(f"note: {len(kept)} matrices have rows that q8_0's blocks of 32 do not divide and are "
                  f"float16, as llama.cpp's converter leaves them ({', '.join(kept[:2])}, ...)")
        q = shlex.quote(out)
        if template:  # llama.cpp's chat program renders the file's chat template
            print(f"chat with it in llama.cpp: llama-cli -m {q}")
        else:  # llama-cli was the completion program until llama.cpp gave chat that name
            print(f"run it with llama.cpp: llama-completion -m {q} -no-cnv -p \"Once upon a time\" (in older "
                  f"releases: llama-cli -m {q} -p \"Once upon a time\")")
        return [out]
    save_checkpoint(out, {"model": model.state_dict(), "model_args": asdict(model.args),
                          "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
                          **({"template": checkpoint["template"]} if checkpoint.get("template") else {})})
    print(f"wrote {out} (checkpoint for sample.py / fine-tuning)")
    return [out]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage())
        return
    outs = [a for a in argv if not a.startswith("-")]
    try:
        if len(outs) != 1:
            raise ExportError("usage: python export.py OUT [--key=value ...]; python export.py --help lists "
                              "the options")
        run(outs[0], parse_config(DEFAULTS, [a for a in argv if a.startswith("-")]))
    # ExportError and CheckpointError are ValueErrors; an OSError is a file that cannot be read or written
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
