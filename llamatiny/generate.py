"""
What sample.py and eval.py share to generate text: a model and its tokenizer loaded for generation (a file
that is not one, or a tokenizer that does not match, is a LoadError with a one-line message) and made
ready for it, the tokens that end a story, and one story streamed as it is generated.
"""
import os
import pickle

import torch

from llamatiny import cpu_kernels, runtime


class LoadError(Exception):
    pass


def load_model(path: str, device: str):
    from llamatiny.checkpoint import from_checkpoint

    try:
        return from_checkpoint(path, device)
    except FileNotFoundError as e:
        raise LoadError(str(e)) from None
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        # torch.load and the llama2.c reader say what is wrong; keep the first line
        raise LoadError(f"cannot load checkpoint {path}: {runtime.first_line(e)}") from None


def load_tokenizer(cfg: dict, checkpoint: dict, vocab_size: int):
    from llamatiny.tokenizer import Tokenizer

    path = cfg["tokenizer"] or checkpoint.get("tokenizer")
    if not path:
        raise LoadError(f"{cfg['checkpoint']} records no tokenizer (a llama2.c file?): "
                        "pass --tokenizer=path/to/tokenizer.model")
    if path.endswith(".bin"):
        raise LoadError(f"{path} looks like llama2.c's tokenizer.bin; "
                        "pass the sentencepiece .model it was made from")
    if not os.path.isfile(path):
        hint = "" if cfg["tokenizer"] else " (the path recorded in the checkpoint; pass --tokenizer=PATH)"
        raise LoadError(f"tokenizer not found: {path}{hint}")
    try:
        tok = Tokenizer(path)
    except (OSError, ValueError) as e:
        raise LoadError(str(e)) from None
    if tok.vocab_size != vocab_size:
        # a mismatched tokenizer gives fluent-looking gibberish (llama2.c #263): refuse instead
        raise LoadError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{vocab_size}: pass the tokenizer the model was trained with (--tokenizer=PATH)")
    return tok


def for_inference(model, dtype: torch.dtype, cpu_speedups: bool = True, compile: bool = False):
    """The model in dtype (the KV cache follows the weights' dtype) and eval mode; on a CPU with the faster
    kernels for the same math unless cpu_speedups is False; its forward compiled if asked."""
    model = model.to(dtype=dtype).eval()
    if cpu_speedups and model.output.weight.device.type == "cpu":
        cpu_kernels.attach(model)
    if compile:
        # generate_stream runs self.hidden_states (an instance attribute) for the prefill and each decode step
        model.hidden_states = torch.compile(model.hidden_states)
    return model


def stop_ids(tok) -> set[int]:
    # TinyStories shards put BOS before each story, so a model ends a story by starting the next
    return {i for i in (tok.bos_id, tok.eos_id) if i >= 0}


def until_stop(tokens, stops: set[int], out: list[int]):
    # ints from model.generate_stream's (1,) tensors, ending before the first stop token; kept in out
    for t in tokens:
        t = int(t)
        if t in stops:
            return
        out.append(t)
        yield t


def generate_story(model, tok, prompt_ids: list[int], cfg: dict, write, echo: bool = True) -> list[int]:
    """Streams one story (the prompt's text unless echo is False, then the new text) through write(str);
    returns the new ids."""
    device = model.output.weight.device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    stream = model.generate_stream(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["top_p"])
    new: list[int] = []
    if echo:
        write(tok.decode(prompt_ids))
    # decode_stream keeps sentencepiece's leading-space rule and holds back the bytes of a
    # multi-byte character until it is complete, so the text equals tok.decode of all ids (of the new ids
    # alone, without the prompt: a response starts without the space that follows "Story:")
    for text in tok.decode_stream(until_stop(stream, stop_ids(tok), new),
                                  prev_id=prompt_ids[-1] if echo else None):
        write(text)
    return new
