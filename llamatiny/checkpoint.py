"""
Model files: reading and writing every format the project speaks. from_checkpoint reads any of them;
export.py is the command line that writes them.

Our checkpoint (.pt) is a torch.save'd dict: "model" (the raw model's state_dict), "model_args" (the
ModelArgs fields), "tokenizer" (the sentencepiece .model path, or None); train.py's also hold the
optimizer, scaler, config, iteration, loader and RNG states, so that a run resumes exactly. A LoRA
fine-tune's (train.py --lora_rank) holds "lora" instead of "model": the adapters, their settings and the
base model's path and sha256 (lora.record); from_checkpoint loads the base and adds them.

llama2.c model files (.bin): all integers and floats are little-endian; weight matrices are PyTorch's
(out_features, in_features) row-major, which is what run.c's matmul(W (d, n), x (n,)) expects.
  version 0 (legacy, the one run.c reads): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
      vocab_size, max_seq_len; vocab_size negative when the classifier is not shared), then float32:
      token embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3 (each for all layers),
      final norm, RoPE cos and sin tables (max_seq_len, head_dim/2), [classifier if not shared].
  version 1: a 256-byte header (uint32 magic "ak42" 0x616b3432, int32 version, the 7 int32,
      uint8 shared-classifier flag, zero padding), then float32: attention norms, ffn norms, final
      norm, token embedding, wq, wk, wv, wo, w1, w2, w3, [classifier]. run.c cannot read it.
  version 2 (the one runq.c reads, Q8_0): the same header plus int32 group_size after the flag;
      float32 norms (attention, ffn, final), then per matrix (token embedding, wq, wk, wv, wo, w1, w2,
      w3, [classifier]) its int8 values followed by its float32 scales, one per group_size values.
      runq.c quantises activations in groups along each matrix's rows, so group_size must divide
      dim AND hidden_dim; by default it is the largest power of two up to 64 that does.
llama2.c tokenizer.bin: uint32 max_token_length, then per token: float32 score, int32 byte length, the
  UTF-8 bytes of the piece with '▁' replaced by ' ' (BOS is '\\n<s>\\n', EOS '\\n</s>\\n', byte
  tokens stay '<0x0A>' for run.c to turn into a byte).
A Hugging Face directory: config.json, model.safetensors (Hugging Face's names, wq and wk rows
  permuted for its rotate_half RoPE), and with a tokenizer: tokenizer.model, tokenizer_config.json and
  generation_config.json; transformers' LlamaForCausalLM / AutoTokenizer load it offline. An
  instruction-tuned model's template (instruct.py; "template" in our checkpoint) is the tokenizer's
  chat_template, read back as the template.
A PEFT adapter directory: adapter_config.json (peft's LoraConfig: r, lora_alpha, target_modules ...) and
  adapter_model.safetensors, the adapters named after the Hugging Face weights they add to
  (base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, (rank, in); lora_B, (out, rank));
  peft's PeftModel.from_pretrained puts them onto the Hugging Face export of the base.
A GGUF file (llama.cpp, and Ollama, LM Studio, llama-cpp-python on top of it), written with the gguf package
  (llama.cpp's own writer): the "llama" architecture's settings (llama.context_length, embedding_length,
  feed_forward_length, block_count, attention.head_count, head_count_kv, rope.freq_base,
  attention.layer_norm_rms_epsilon, rope.dimension_count, vocab_size), the sentencepiece tokenizer
  (tokenizer.ggml.*: pieces, scores, types, special ids; tokenizer.chat_template for an instruction-tuned
  model) and the weights under llama.cpp's names (token_embd, blk.N.attn_q ... ffn_up, output_norm; output
  only when the classifier is untied, otherwise llama.cpp ties it to token_embd). Norms are float32, matrices
  the --dtype; GGUF lists dimensions innermost first, so an (out, in) matrix of ours reads (in, out) there.
  wq and wk are written as they are: Meta's RoPE on interleaved pairs is llama.cpp's for this architecture
  (its converter undoes the Hugging Face row permutation to get there).
"""
import json
import os
import pickle
import shlex
import shutil
import struct
import zipfile
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from llamatiny import instruct, lora, runs, runtime
from llamatiny.fileio import atomic_write
from model import ModelArgs, Transformer, precompute_rope

MAGIC = 0x616B3432  # "ak42" read as a big-endian word; the bytes on disk are "24ka"
HEADER_BYTES = 256  # versions 1 and 2
HEADER_INTS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
# run.c hard-codes these; a model trained with others would silently run wrong there
RUNC_ROPE_THETA, RUNC_NORM_EPS = 10000.0, 1e-5


class CheckpointError(ValueError):  # a file that cannot be read, or settings it cannot be written with
    pass


# ---------------------------------------------------------------- our checkpoints, and any model file


def save_checkpoint(path, obj) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        # through a file object of ours: given a path, torch's zip writer reports a full disk as
        # "[enforce fail ...] unexpected pos"; given f, the OSError of f.write is the one to report
        failed = _WriteErrors(f)
        try:
            torch.save(obj, failed)
        except RuntimeError:
            if failed.error is None:
                raise
            raise failed.error from None


class _WriteErrors:
    # a file that remembers the OSError of its write, which torch turns into a RuntimeError
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def from_checkpoint(path, device="cpu", merge=True):
    """Loads (model, checkpoint dict) from a train.py checkpoint (.pt), a llama2.c model file (.bin) or a
    Hugging Face Llama directory (its tokenizer.model, if any, is the checkpoint's "tokenizer"). The one
    loader that train.py (resume, fine-tuning), sample.py and export.py share.
    A LoRA fine-tune's checkpoint holds adapters, not weights: its base model is loaded too (refused if the
    file changed since training) and the adapters merged into it, so that the model and checkpoint["model"]
    are an ordinary model's; with merge=False (train.py's resume) checkpoint["model"] is the base's and the
    model has the adapters attached (lora.LoRALinear)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            from safetensors import SafetensorError  # read_hf reads model.safetensors with it
        except ImportError as e:
            raise CheckpointError(f"{path} is a directory: reading a Hugging Face model needs safetensors "
                                  "(pip install safetensors)") from e
        try:
            checkpoint = read_hf(path)
        except (SafetensorError, KeyError) as e:  # a damaged model.safetensors, a config.json missing a field
            raise CheckpointError(f"{path} is not a Hugging Face Llama directory "
                                  f"({type(e).__name__}: {e})") from e
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py, or pass "
                                "--checkpoint=PATH")
    elif path.endswith(".bin"):
        checkpoint = read_llama2c(path)
    else:
        try:
            checkpoint = read_pt(path, device)
        except CheckpointError as e:
            if good := newest_good_checkpoint(path):
                raise CheckpointError(f"{e}; the newest good checkpoint beside it is {good[1]} (iteration "
                                      f"{good[0]}): `cp {shlex.quote(good[1])} {shlex.quote(path)}` and run "
                                      "the same command again") from e
            raise
    adapters = checkpoint.get("lora")
    if adapters:
        checkpoint["model"] = _lora_base_weights(path, adapters["base"], device)
    model = Transformer(ModelArgs.from_dict(checkpoint["model_args"]))
    try:  # strict: a missing key is an error, not silently random weights
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as e:  # torch lists the missing / unexpected keys and wrong shapes over many lines
        raise CheckpointError(f"{path} does not match its model_args: {' '.join(str(e).split())}") from e
    model = model.to(device)
    if adapters:
        lora.attach(model, adapters["rank"], adapters["alpha"], adapters["dropout"], adapters["targets"],
                    adapters["adapters"])
        if merge:
            model = lora.merge(model)
            checkpoint["model"] = model.state_dict()
    if os.path.isdir(path) or path.endswith(".bin"):  # read by us: share the model's tensors, not a 2nd copy
        checkpoint["model"] = model.state_dict()
    return model, checkpoint


def read_pt(path: str, device="cpu", mmap=False) -> dict:
    """Our checkpoint's dict, or a CheckpointError that says whether the file is cut short or not ours."""
    try:  # our own checkpoints hold the config, optimizer and RNG states: load only files you trust
        checkpoint = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive, whose index is at its end
        if size == 0 or isinstance(e, EOFError) or (zipped and not zipfile.is_zipfile(path)):
            what = "empty" if size == 0 else f"truncated ({size:,} bytes, its end missing)"
            raise CheckpointError(f"{path} is {what}: a copy or transfer cut short, or a damaged disk") from e
        if isinstance(e, OSError) and not zipped:  # not a read that failed on a damaged archive
            raise
        why = " ".join(str(e).split())  # torch's messages run over several lines
        raise CheckpointError(f"{path} is not a checkpoint written by train.py "
                              f"({type(e).__name__}: {why})") from e
    if not isinstance(checkpoint, dict) or not {"model", "lora"} & set(checkpoint) \
            or "model_args" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (no 'model' / 'model_args')")
    return checkpoint


def newest_good_checkpoint(damaged: str) -> tuple[int, str] | None:
    # the checkpoints train.py keeps beside a damaged one (with keep_checkpoints the numbered ones,
    # ckpt_best.pt, ckpt.pt): (iteration, path) of the newest that loads, in that order where iterations tie
    folder = os.path.dirname(damaged)
    numbered, good = runs.numbered_checkpoints(folder)[::-1], []
    for path in numbered + [os.path.join(folder, name) for name in ("ckpt_best.pt", "ckpt.pt")]:
        if not os.path.isfile(path) or os.path.samefile(path, damaged):  # (a hard link: the same bytes)
            continue
        if good and path in numbered:  # the newest numbered one that loads is newer than the others
            continue
        try:
            good.append((read_pt(path, mmap=True)["iter_num"], path))  # (mmap: reads only what it looks at)
        except (CheckpointError, OSError, KeyError):  # damaged too, or not one of train.py's
            pass
    return max(good, key=lambda found: found[0], default=None)


def _lora_base_weights(path, base: dict, device) -> dict:
    # the weights a LoRA checkpoint's adapters were trained on: the very same file, or nothing
    if not os.path.exists(base["path"]):
        raise CheckpointError(f"{path} holds LoRA adapters for the base model {base['path']}, which is "
                              "missing: put that file back (the adapters alone are not a model)")
    if (found := lora.base_sha256(base["path"])) != base["sha256"]:
        raise CheckpointError(f"{path} was trained on the base model {base['path']}, which has changed since "
                              f"(sha256 {found[:12]}..., trained on {base['sha256'][:12]}...): restore that "
                              "file, or fine-tune the new one")
    return from_checkpoint(base["path"], device)[1]["model"]


def _shared_classifier(state_dict) -> bool:
    return "output.weight" not in state_dict or torch.equal(state_dict["output.weight"],
                                                            state_dict["tok_embeddings.weight"])


# ---------------------------------------------------------------- llama2.c model files


def llama2c_layout(args: ModelArgs, version: int, shared: bool) -> list[tuple[str, tuple, str]]:
    """The file's tensors in order: (state_dict name, shape, kind) with kind 'f32' or 'q8'.
    The writer and the reader both walk this list, so they cannot disagree."""
    head_dim, kv_dim = args.dim // args.n_heads, args.n_kv_heads * (args.dim // args.n_heads)
    shape = {
        "tok_embeddings": (args.vocab_size, args.dim), "attention_norm": (args.dim,), "ffn_norm": (args.dim,),
        "attention.wq": (args.dim, args.dim), "attention.wk": (kv_dim, args.dim),
        "attention.wv": (kv_dim, args.dim), "attention.wo": (args.dim, args.dim),
        "feed_forward.w1": (args.hidden_dim, args.dim), "feed_forward.w2": (args.dim, args.hidden_dim),
        "feed_forward.w3": (args.hidden_dim, args.dim), "norm": (args.dim,),
        "output": (args.vocab_size, args.dim),
    }
    matrices = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]

    def entry(name, kind="f32"):
        # "layers.3.attention.wq.weight" -> "attention.wq"; "norm.weight" -> "norm"
        key = name.removesuffix(".weight")
        key = key.split(".", 2)[2] if key.startswith("layers.") else key
        return name, shape[key], kind

    def per_layer(names, kind="f32"):
        return [entry(f"layers.{i}.{name}.weight", kind) for name in names for i in range(args.n_layers)]

    classifier = [] if shared else ["output.weight"]
    if version == 0:
        return ([entry("tok_embeddings.weight")] + per_layer(["attention_norm"])
                + per_layer(matrices[:4]) + per_layer(["ffn_norm"]) + per_layer(matrices[4:])
                + [entry("norm.weight"), ("freqs_cos", (args.max_seq_len, head_dim // 2), "f32"),
                   ("freqs_sin", (args.max_seq_len, head_dim // 2), "f32")]
                + [entry(n) for n in classifier])
    norms = per_layer(["attention_norm", "ffn_norm"]) + [entry("norm.weight")]
    if version == 1:
        return norms + [entry("tok_embeddings.weight")] + per_layer(matrices) + [entry(n) for n in classifier]
    if version == 2:
        return (norms + [entry("tok_embeddings.weight", "q8")] + per_layer(matrices, "q8")
                + [entry(n, "q8") for n in classifier])
    raise CheckpointError(f"unknown llama2.c version {version}: choose 0, 1 or 2")


def check_group_size(args: ModelArgs, group_size: int) -> None:
    # runq.c quantises each matmul's input in groups of group_size along the row (in_features):
    # that is dim for every matrix except w2, whose rows are hidden_dim long
    if group_size < 1 or args.dim % group_size or args.hidden_dim % group_size:
        g = np.gcd(args.dim, args.hidden_dim)
        best = max(d for d in range(1, min(max(group_size, 1), g) + 1) if g % d == 0)
        raise CheckpointError(f"--group_size={group_size} must divide dim={args.dim} and hidden_dim="
                              f"{args.hidden_dim} (every quantised row); try --group_size={best}")


def default_group_size(args: ModelArgs, largest: int = 64) -> int:
    # llama2.c halves 64 until it divides dim; we also need it to divide hidden_dim
    group_size = largest
    while args.dim % group_size or args.hidden_dim % group_size:
        group_size //= 2
    return group_size


def quantize_q80(w: torch.Tensor, group_size: int):
    # symmetric int8 per group of group_size consecutive values: w ~ q * scale, |q| <= 127
    groups = w.float().reshape(-1, group_size)  # (numel / group_size, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero, not NaN
    q = torch.round(groups / safe[:, None]).to(torch.int8)
    return q.flatten(), scale


def dequantize_q80(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    return (q.float().reshape(-1, group_size) * scale[:, None]).flatten()


def write_llama2c(path, model: Transformer, version: int = 0, group_size: int | None = None) -> dict:
    """Writes model as a llama2.c file; returns {"bytes": size, "group_size", "max_quant_error"} (None, None
    below version 2). Bad settings fail before any file is written."""
    args = model.args
    if args.rope_theta != RUNC_ROPE_THETA or args.norm_eps != RUNC_NORM_EPS:
        raise CheckpointError(f"llama2.c's run.c hard-codes rope_theta={RUNC_ROPE_THETA:g} and norm_eps="
                              f"{RUNC_NORM_EPS:g}; this model has rope_theta={args.rope_theta:g}, "
                              f"norm_eps={args.norm_eps:g} (use --format=hf)")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state["freqs_cos"], state["freqs_sin"] = precompute_rope(args.dim // args.n_heads, args.max_seq_len,
                                                             args.rope_theta)
    shared = _shared_classifier(state)
    layout = llama2c_layout(args, version, shared)
    if version == 2:
        group_size = default_group_size(args) if group_size is None else group_size
        check_group_size(args, group_size)
    params = [getattr(args, name) for name in HEADER_INTS]
    max_err = 0.0
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        if version == 0:
            params[5] = params[5] if shared else -params[5]
            f.write(struct.pack("<7i", *params))
        else:
            header = struct.pack("<Ii7iB", MAGIC, version, *params, int(shared))
            if version == 2:
                header += struct.pack("<i", group_size)
            f.write(header + b"\0" * (HEADER_BYTES - len(header)))
        # progress bar on a terminal only: quantising a 110M model takes a while
        for name, shape, kind in tqdm(layout, desc=f"writing {os.path.basename(path)}", unit=" tensors",
                                      disable=None, leave=False):
            t = state[name]
            assert tuple(t.shape) == shape, (name, t.shape, shape)
            if kind == "f32":
                f.write(t.numpy().astype("<f4").tobytes())
            else:
                q, scale = quantize_q80(t, group_size)
                error = (dequantize_q80(q, scale, group_size) - t.flatten()).abs().max().item()
                max_err = max(max_err, error)
                f.write(q.numpy().tobytes())
                f.write(scale.numpy().astype("<f4").tobytes())
    return {"bytes": os.path.getsize(path), "group_size": group_size if version == 2 else None,
            "max_quant_error": max_err if version == 2 else None}


def read_llama2c_header(path) -> dict:
    """{"version", "params": ModelArgs, "shared": bool, "group_size": int or None,
    "offset": the first weight's byte}"""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 28:
        raise CheckpointError(f"{path} is too short to be a llama2.c model file")
    (magic,) = struct.unpack_from("<I", head)
    if magic == MAGIC:
        if len(head) < HEADER_BYTES:
            raise CheckpointError(f"{path}: truncated llama2.c header")
        version, *params, shared = struct.unpack_from("<i7iB", head, 4)
        if version not in (1, 2):
            raise CheckpointError(f"{path}: llama2.c version {version} is not supported (0, 1 and 2 are)")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else None
        offset, shared = HEADER_BYTES, bool(shared)
    else:  # legacy: no magic, the sign of vocab_size says whether the classifier is shared
        version, group_size, offset = 0, None, 28
        params = list(struct.unpack_from("<7i", head))
        shared, params[5] = params[5] > 0, abs(params[5])
    if min(params) <= 0:
        raise CheckpointError(f"{path} is not a llama2.c model file (header {params})")
    try:
        args = ModelArgs(**dict(zip(HEADER_INTS, params)), norm_eps=RUNC_NORM_EPS, rope_theta=RUNC_ROPE_THETA)
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path} is not a llama2.c model file (header {params}: {e})") from None
    if version == 2:
        check_group_size(args, group_size)
    return {"version": version, "params": args, "shared": shared, "group_size": group_size, "offset": offset}


def read_llama2c_tensors(path, header: dict) -> dict:
    """name -> float32 tensor for every entry of the file's layout (int8 matrices dequantised)."""
    args, version, gs = header["params"], header["version"], header["group_size"]
    layout = llama2c_layout(args, version, header["shared"])
    numels = [int(np.prod(shape)) for _, shape, _ in layout]
    sizes = [4 * n if kind == "f32" else n + n // gs * 4 for (_, _, kind), n in zip(layout, numels)]
    expected, actual = header["offset"] + sum(sizes), os.path.getsize(path)
    if expected != actual:
        raise CheckpointError(f"{path} is {actual} bytes but a version-{version} file with {asdict(args)} "
                              f"takes {expected}: truncated, or not a llama2.c model file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out, pos = {}, header["offset"]
    for (name, shape, kind), n, size in zip(layout, numels, sizes):
        if kind == "f32":
            t = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n, offset=pos).astype(np.float32))
        else:
            q = torch.from_numpy(np.frombuffer(data, dtype=np.int8, count=n, offset=pos).copy())
            scale = np.frombuffer(data, dtype="<f4", count=n // gs, offset=pos + n).astype(np.float32)
            t = dequantize_q80(q, torch.from_numpy(scale), gs)
        out[name] = t.reshape(shape)
        pos += size
    del data
    return out


def read_llama2c(path) -> dict:
    """A llama2.c model file (version 0, 1 or 2; int8 is dequantised) -> a checkpoint dict like ours."""
    header = read_llama2c_header(path)
    if not header["shared"]:
        raise CheckpointError(f"{path} has a separate classifier matrix; model.py ties it to the token "
                              "embedding")
    tensors = read_llama2c_tensors(path, header)
    # run.c recomputes RoPE and ignores the stored tables (version 0); so do we
    state = {k: v for k, v in tensors.items() if not k.startswith("freqs_")}
    state["output.weight"] = state["tok_embeddings.weight"]
    return {"model": state, "model_args": asdict(header["params"]), "tokenizer": None,
            "llama2c_version": header["version"], "source": os.path.abspath(path)}


# ---------------------------------------------------------------- llama2.c tokenizer.bin


def load_sentencepiece(path):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise CheckpointError(f"tokenizer not found: {path}")
    return spm.SentencePieceProcessor(model_file=os.fspath(path))


def tokenizer_bin_pieces(sp) -> list[tuple[bytes, float]]:
    # run.c prints pieces as they are, so '▁' becomes a space; BOS/EOS get llama2.c's visible markers
    markers = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}
    return [(markers.get(i, sp.id_to_piece(i)).replace("\u2581", " ").encode("utf-8"), sp.get_score(i))
            for i in range(sp.vocab_size())]


def write_tokenizer_bin(path, sp_model_path) -> int:
    pieces = tokenizer_bin_pieces(load_sentencepiece(sp_model_path))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for b, _ in pieces)))
        for b, score in pieces:
            f.write(struct.pack("<fi", score, len(b)) + b)
    return len(pieces)


# ---------------------------------------------------------------- Hugging Face


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta rotates interleaved pairs (0,1),(2,3)...; HF's rotate_half rotates (i, i + head_dim/2).
    # Reordering each head's output rows [0,2,4,...,1,3,5,...] makes HF's rotation equal ours.
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def hf_name_map(args: ModelArgs) -> list[tuple[str, str, int | None]]:
    """(our name, HF name, heads to RoPE-permute or None): the one mapping both directions use.
    wk is permuted with n_kv_heads, not n_heads (the GQA mistake of llama2.c #431)."""
    names = [("tok_embeddings.weight", "model.embed_tokens.weight", None),
             ("norm.weight", "model.norm.weight", None), ("output.weight", "lm_head.weight", None)]
    per_layer = [("attention.wq", "self_attn.q_proj", args.n_heads),
                 ("attention.wk", "self_attn.k_proj", args.n_kv_heads),
                 ("attention.wv", "self_attn.v_proj", None), ("attention.wo", "self_attn.o_proj", None),
                 ("feed_forward.w1", "mlp.gate_proj", None), ("feed_forward.w2", "mlp.down_proj", None),
                 ("feed_forward.w3", "mlp.up_proj", None), ("attention_norm", "input_layernorm", None),
                 ("ffn_norm", "post_attention_layernorm", None)]
    for i in range(args.n_layers):
        names += [(f"layers.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight", heads)
                  for ours, theirs, heads in per_layer]
    return names


def to_hf_state_dict(state_dict: dict, args: ModelArgs, tied: bool | None = None) -> dict:
    # tied (default: detected): lm_head is left out, HF ties it to embed_tokens from config.json
    tied = _shared_classifier(state_dict) if tied is None else tied
    out = {}
    for ours, theirs, heads in hf_name_map(args):
        if ours == "output.weight" and tied:
            continue
        t = state_dict[ours]
        out[theirs] = (_rope_permute(t, heads) if heads else t).contiguous()
    return out


def from_hf_state_dict(hf_state: dict, args: ModelArgs) -> dict:
    out = {}
    for ours, theirs, heads in hf_name_map(args):
        if theirs not in hf_state:
            continue  # a missing key is reported by load_state_dict(strict=True)
        t = hf_state[theirs]
        out[ours] = (_rope_unpermute(t, heads) if heads else t).contiguous()
    out.setdefault("output.weight", out.get("tok_embeddings.weight"))  # tied: HF stores embed_tokens only
    return out


def hf_config(args: ModelArgs, bos_id=None, eos_ids=None, dtype="float32", tied=True) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.dim // args.n_heads, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        # transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos_id, "eos_token_id": eos_ids, "dtype": dtype, "torch_dtype": dtype,
        "use_cache": True,
    }


def hf_tokenizer_config(sp, max_seq_len: int) -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer", "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
        "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        # keep decode exact: no " ," -> "," clean-up
        "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len,
    }


def write_hf(out_dir, model: Transformer, tokenizer_path=None, dtype="float32", template=None) -> list[str]:
    # template: the instruct.py template an instruction-tuned model was trained with (its name), written as
    # the tokenizer's chat template
    from safetensors.torch import save  # needed by the HF format only (requirements-dev.txt)

    args = model.args
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tied = _shared_classifier(state)
    tensors = {k: v.to(runtime.DTYPES[dtype]).contiguous()
               for k, v in to_hf_state_dict(state, args, tied).items()}
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def out(name):
        written.append(os.path.join(out_dir, name))
        return written[-1]

    def write_json(name, obj):
        with atomic_write(out(name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

    # written by us, not by save_file, whose error on a full disk is no OSError
    with atomic_write(out("model.safetensors")) as tmp, open(tmp, "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    bos = stops = None
    if tokenizer_path:
        sp = load_sentencepiece(tokenizer_path)
        # A story ends with EOS, or with the BOS that starts the next one (TinyStories' shards separate
        # stories with BOS only, so that is what a model learns to emit): generate() stops at either, as
        # sample.py does. transformers takes a list of ids for eos_token_id.
        bos, stops = sp.bos_id(), [i for i in (sp.eos_id(), sp.bos_id()) if i >= 0]
        with atomic_write(out("tokenizer.model")) as tmp:
            shutil.copyfile(tokenizer_path, tmp)
        config = hf_tokenizer_config(sp, args.max_seq_len)
        if template:
            config["chat_template"] = instruct.hf_chat_template(template)
        write_json("tokenizer_config.json", config)
        write_json("generation_config.json", {"bos_token_id": bos, "eos_token_id": stops})
    write_json("config.json", hf_config(args, bos, stops, dtype, tied))  # last: with a config it is complete
    return written


def write_peft(out_dir, adapters: dict, args: ModelArgs) -> list[str]:
    """A LoRA checkpoint's adapters (its "lora" entry) alone, in Hugging Face PEFT's layout, named after
    write_hf's weights so that peft puts them onto the Hugging Face export of the base model."""
    from safetensors.torch import save_file

    hf_names = {ours.removesuffix(".weight"): (theirs.removesuffix(".weight"), heads)
                for ours, theirs, heads in hf_name_map(args)}
    tensors, modules = {}, set()
    for key, t in adapters["adapters"].items():
        ours, part = key.rsplit(".", 1)  # "layers.0.attention.wq", "lora_A"
        theirs, heads = hf_names[ours]
        if heads and part == "lora_B":  # B's rows are the weight's rows: they get the same RoPE permutation
            t = _rope_permute(t, heads)
        tensors[f"base_model.model.{theirs}.{part}.weight"] = t.detach().float().cpu().contiguous()
        modules.add(theirs.rsplit(".", 1)[-1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapters["rank"],
              "lora_alpha": adapters["alpha"], "lora_dropout": adapters["dropout"],
              "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "inference_mode": True, "base_model_name_or_path": None}
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, name) for name in ("adapter_config.json", "adapter_model.safetensors")]
    with atomic_write(written[1]) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_write(written[0]) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return written


def read_hf(path) -> dict:
    """A Hugging Face Llama directory (config.json + model.safetensors) -> a checkpoint dict like ours."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} not found (only single-file model.safetensors directories are read)")
    with open(config_path, encoding="utf-8") as f:
        c = json.load(f)
    rope_theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    args = ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                     n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                     hidden_dim=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                     norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta))
    if c.get("head_dim", args.dim // args.n_heads) != args.dim // args.n_heads:
        raise CheckpointError(f"{config_path}: head_dim {c['head_dim']} != hidden_size / num_attention_heads")
    state = from_hf_state_dict({k: v.float() for k, v in load_file(weights_path).items()}, args)
    if not _shared_classifier(state):
        raise CheckpointError(f"{path} has an untied lm_head; model.py ties it to the token embedding")
    tokenizer, tokenizer_config = (os.path.join(path, name)
                                   for name in ("tokenizer.model", "tokenizer_config.json"))
    checkpoint = {"model": state, "model_args": asdict(args), "source": os.path.abspath(path),
                  "tokenizer": os.path.abspath(tokenizer) if os.path.isfile(tokenizer) else None}
    if os.path.isfile(tokenizer_config):  # one of our instruction templates, exported by write_hf
        with open(tokenizer_config, encoding="utf-8") as f:
            if template := instruct.template_of_chat_template(json.load(f).get("chat_template")):
                checkpoint["template"] = instruct.template_info(template)
    return checkpoint


# ---------------------------------------------------------------- GGUF (llama.cpp)

# --dtype -> the gguf package's GGMLQuantizationType and LlamaFileType (names, so that importing this file
# does not need gguf)
GGUF_TYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"),
              "bfloat16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def _protobuf_fields(buf: bytes):
    # (field number, value) of one protobuf message: an int for a varint, the bytes for anything else
    def varint(pos):
        value = shift = 0
        while True:
            byte = buf[pos]
            value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
            if byte < 0x80:
                return value, pos

    pos = 0
    while pos < len(buf):
        key, pos = varint(pos)
        wire = key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            n, pos = varint(pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (1, 5):  # 64- and 32-bit numbers
            n = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise CheckpointError(f"not a sentencepiece model (protobuf wire type {wire})")
        yield key >> 3, value


def sentencepiece_types(sp) -> list[int]:
    """Each piece's type as the model file stores it (ModelProto field 1, the pieces; in each, field 3, the
    type, NORMAL=1 when absent): NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1 ... 6, GGUF's
    numbering too. sentencepiece's Python API cannot tell a user-defined piece (train_vocab
    --special_tokens), which llama.cpp must know to match it whole as sentencepiece does."""
    types = [dict(_protobuf_fields(piece)).get(3, 1)
             for field, piece in _protobuf_fields(sp.serialized_model_proto()) if field == 1]
    assert len(types) == sp.vocab_size(), (len(types), sp.vocab_size())
    return types


def write_gguf(path, model: Transformer, tokenizer_path, dtype: str = "float32", template=None) -> dict:
    """Writes model and its tokenizer as one GGUF file; template: the instruct.py template an
    instruction-tuned model was trained with (its name). Returns {"bytes", "kept_f16": [matrices whose rows
    Q8_0's blocks of 32 do not divide, written float16 as llama.cpp's converter does]}."""
    import gguf  # llama.cpp's writer (pip install gguf); export.py checks for it first

    args = model.args
    qtype, file_type = (getattr(enum, name) for enum, name in
                        zip((gguf.GGMLQuantizationType, gguf.LlamaFileType), GGUF_TYPES[dtype]))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if _shared_classifier(state):
        del state["output.weight"]  # llama.cpp ties a missing output.weight to token_embd
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.n_layers)  # from Meta's names (ours)
    sp = load_sentencepiece(tokenizer_path)
    kept = []
    with atomic_write(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            writer.add_context_length(args.max_seq_len)
            writer.add_embedding_length(args.dim)
            writer.add_feed_forward_length(args.hidden_dim)
            writer.add_block_count(args.n_layers)
            writer.add_head_count(args.n_heads)
            writer.add_head_count_kv(args.n_kv_heads)
            writer.add_rope_freq_base(args.rope_theta)
            writer.add_layer_norm_rms_eps(args.norm_eps)
            writer.add_rope_dimension_count(args.dim // args.n_heads)
            writer.add_vocab_size(args.vocab_size)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

            writer.add_tokenizer_model("llama")  # sentencepiece, as llama.cpp reads it
            writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
            writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
            writer.add_token_types(sentencepiece_types(sp))
            for kind, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                                   ("pad", sp.pad_id())):
                if token_id >= 0:  # -1: the tokenizer has none
                    getattr(writer, f"add_{kind}_token_id")(token_id)
            if sp.bos_id() >= 0:
                # A model trained here ends a story with the BOS that starts the next (TinyStories' shards
                # separate stories with BOS only); as end-of-turn, llama.cpp stops there, as sample.py does
                writer.add_eot_token_id(sp.bos_id())
            writer.add_add_bos_token(sp.bos_id() >= 0)  # as sample.py encodes a prompt
            writer.add_add_eos_token(False)
            # sentencepiece's dummy prefix: a space before the text, as "▁a" shows
            writer.add_add_space_prefix(sp.normalize("a").startswith("\u2581"))
            if template:
                writer.add_chat_template(instruct.hf_chat_template(template))

            for name, t in tqdm(state.items(), desc=f"writing {os.path.basename(path)}", unit=" tensors",
                                disable=None, leave=False):
                gguf_name = names.get_name(name, try_suffixes=(".weight",))
                want = qtype if t.dim() == 2 else gguf.GGMLQuantizationType.F32  # llama.cpp's norms: float32
                try:
                    data = gguf.quants.quantize(t.numpy(), want)
                except gguf.QuantError:  # rows (in_features) not a multiple of Q8_0's block of 32
                    want = gguf.GGMLQuantizationType.F16
                    data = gguf.quants.quantize(t.numpy(), want)
                    kept.append(gguf_name)
                writer.add_tensor(gguf_name, data, raw_dtype=want)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {"bytes": os.path.getsize(path), "kept_f16": kept}
