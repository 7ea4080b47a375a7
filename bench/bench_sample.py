"""
Decoding speed: sample.py against llama2.c's run.c and llama.cpp, side by side, on the same model.

    python bench/bench_sample.py --peer ../llama2.c         # the comparison: its run and tokenizer.model
    python bench/bench_sample.py --peer ../llama2.c --llama_cpp                              # and llama.cpp
    python bench/bench_sample.py --llama_cpp --tokenizer PATH/llama2.model                 # llama.cpp only
    python bench/bench_sample.py --runc ../llama2.c/run --tokenizer PATH/llama2.model       # the same
    python bench/bench_sample.py --runc ../llama2.c/run --tokenizer PATH/llama2.model --plain --repeats 7
    python bench/bench_sample.py                        # no run.c: model.generate in-process, see below
    python bench/bench_sample.py --device cuda --skip_uncached     # in sample.py's dtype there: bfloat16

With --runc (llama2.c's run binary, built beside the project with its `make runfast`; nothing of
llama2.c is copied or built here): a 15M-shaped model (dim 288, 6 layers, 6 heads, vocab 32,000) with
random weights is written as a llama2.c file with export.py's writer (checkpoint.write_llama2c), its
tokenizer beside it in run.c's format, and both programs decode it from the same prompt, each as a
process of its own with one thread (OMP_NUM_THREADS=1; sample.py --threads=1), alternating run.c, ours,
run.c, ours, ... so that load from other processes hits both alike. Each reports its own figure:
  sample.py  "N tokens in S s: X tokens/s", the new tokens over the time from the prompt to the last
             token (prefill and packing the weights included)
  run.c      "achieved tok/s", its positions (prompt included) over the time after its first forward
Two models: "trained-like", the final norm's gain set to --norm_scale (7.5: about 1 nat per token and a
nucleus of ~100 tokens, like a trained 15M model), and "fresh", the initialisation's near-uniform
distribution (10 nats; top-p 0.9 keeps ~29,000 tokens). Each greedy (temperature 0) and sampled the way
both programs sample by default (temperature 1, top_p 0.9). The ratio is the median of the ratios of
neighbouring runs; greedy text is checked to agree word for word between the two programs.
--plain adds sample.py --cpu_speedups=False (model.py's forward for every step).
With --llama_cpp (pip install llama-cpp-python), llama.cpp decodes the same model written as a GGUF float32
file (checkpoint.write_gguf), through llama-cpp-python in this process with one thread (n_threads and
n_threads_batch 1), taking its turn in the same alternation. Its figure: the new tokens over the time of
create_completion, from the prompt (prefill included, its prompt cache reset) to the last token, as
sample.py counts; sampled with temperature 1 and top_p 0.9 alone (llama-cpp-python's default top_k 40 and
min_p 0.05 are turned off). Its greedy text is checked against sample.py's too.

Without --runc or --llama_cpp: model.generate in this process, and, labelled as such, an uncached loop in
llama2.c's Python sample.py style (a full forward over the whole sequence for every new token); --compile
adds torch.compile'd decoding. This is the mode for a GPU (--device cuda), where run.c has no counterpart.
"""
import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # model.py lives at the repo root
import model as model_py  # noqa: E402
from llamatiny import cpu_kernels, runtime  # noqa: E402
from llamatiny.checkpoint import write_gguf, write_llama2c, write_tokenizer_bin  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import machine  # noqa: E402

SAMPLING = {"greedy": dict(temperature=0.0), "T=1 top_p=0.9": dict(temperature=1.0, top_p=0.9)}
DEFAULT_TOKENIZER = ROOT / "data" / "llama2_tokenizer.model"


def make_model(norm_scale: float, seed: int = 0) -> model_py.Transformer:
    torch.manual_seed(seed)
    m = model_py.Transformer(model_py.ModelArgs()).eval()  # the 15M shape
    with torch.no_grad():
        m.norm.weight.fill_(norm_scale)  # 1: as initialised; 7.5: a trained model's peakedness (see above)
    return m


# ----------------------------------------------------------------- side by side with run.c

def run_runc(runc, model_bin, prompt, steps, sampling, seed) -> tuple[float, str]:
    cmd = [runc, str(model_bin), "-z", str(model_bin.with_suffix(".tokenizer.bin")), "-n", str(steps),
           "-i", prompt, "-t", str(sampling["temperature"]), "-p", str(sampling.get("top_p", 1.0)),
           "-s", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    found = re.search(r"achieved tok/s: ([\d.]+)", out.stderr)
    if out.returncode or not found:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return float(found.group(1)), out.stdout


def run_sample_py(model_bin, tokenizer, prompt, new_tokens, sampling, seed, plain=False) -> tuple[float, str]:
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--checkpoint={model_bin}", f"--tokenizer={tokenizer}",
           f"--prompt={prompt}", f"--max_new_tokens={new_tokens}", f"--temperature={sampling['temperature']}",
           f"--top_p={sampling.get('top_p', 1.0)}", f"--seed={seed}", "--threads=1", "--device=cpu",
           "--dtype=float32", f"--cpu_speedups={not plain}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    found = re.search(r"(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s", out.stderr)
    if out.returncode or not found:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    if int(found.group(1)) < new_tokens:  # the story ended early: too few tokens for a steady figure
        print(f"  note: sample.py stopped after {found.group(1)} of {new_tokens} tokens (end of story)")
    return float(found.group(2)), out.stdout


def load_llama_cpp(gguf_path, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("error: --llama_cpp needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp "
                 "from source, several minutes)")
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, n_threads_batch=1,
                 verbose=False)


def run_llama_cpp(llm, prompt, new_tokens, sampling, seed) -> tuple[float, str]:
    llm.reset()  # no prompt cache from the previous run: each run prefills, as sample.py does
    t0 = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=new_tokens, temperature=sampling["temperature"],
                                top_p=sampling.get("top_p", 1.0), top_k=0, min_p=0.0, repeat_penalty=1.0,
                                seed=seed)
    seconds = time.perf_counter() - t0
    n = out["usage"]["completion_tokens"]
    if n < new_tokens:
        print(f"  note: llama.cpp stopped after {n} of {new_tokens} tokens (end of story)")
    return n / seconds, prompt + out["choices"][0]["text"]


def side_by_side(args):
    from llamatiny.tokenizer import Tokenizer

    if args.runc and (not Path(args.runc).is_file() or not os.access(args.runc, os.X_OK)):
        sys.exit(f"error: --runc {args.runc} is not an executable: build llama2.c's run (make runfast) and "
                 "pass its path")
    if not Path(args.tokenizer).is_file():
        sys.exit(f"error: tokenizer not found: {args.tokenizer}; pass --tokenizer=PATH/llama2.model "
                 "(the Llama 2 sentencepiece model)")
    n_prompt = len(Tokenizer(args.tokenizer).encode(args.prompt, bos=True))
    steps = n_prompt - 1 + args.new_tokens  # run.c's -n: the prompt's positions (BOS aside) and the new
    peers = (["run.c"] if args.runc else []) + (["llama.cpp"] if args.llama_cpp else [])
    programs = peers + ["sample.py"] + (["sample.py --cpu_speedups=False"] if args.plain else [])
    print(f"decoding: 15M-shaped model, random weights, float32, one thread, prompt {args.prompt!r} "
          f"({n_prompt} tokens with BOS), {args.new_tokens} new tokens; "
          f"{args.repeats} runs each, alternating {', '.join(programs)}")
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, scale in (("trained-like", args.norm_scale), ("fresh", 1.0)):
            model = make_model(scale)
            model_bin = Path(tmp) / f"{label}.bin"
            write_llama2c(model_bin, model, version=0)
            write_tokenizer_bin(model_bin.with_suffix(".tokenizer.bin"), args.tokenizer)
            if args.llama_cpp:  # the same weights as a GGUF float32 file, its tokenizer inside
                write_gguf(model_bin.with_suffix(".gguf"), model, args.tokenizer)
                llm = load_llama_cpp(model_bin.with_suffix(".gguf"), model.args.max_seq_len)
            for name, sampling in SAMPLING.items():
                figures = {p: [] for p in programs}
                texts = {}
                for i in range(args.repeats):
                    seed = args.seed + i
                    for program in programs:
                        prompt, n = args.prompt, args.new_tokens
                        if program == "run.c":
                            tok_s, text = run_runc(args.runc, model_bin, prompt, steps, sampling, seed)
                        elif program == "llama.cpp":
                            tok_s, text = run_llama_cpp(llm, prompt, n, sampling, seed)
                        else:
                            tok_s, text = run_sample_py(model_bin, args.tokenizer, prompt, n, sampling, seed,
                                                        plain=program != "sample.py")
                        figures[program].append(tok_s)
                        texts[program] = text
                ratios = {peer: [ours / theirs for ours, theirs in zip(figures["sample.py"], figures[peer],
                                                                       strict=True)] for peer in peers}
                agree = ""
                if sampling["temperature"] == 0:
                    differ = [p for p in peers if texts[p].split() != texts["sample.py"].split()]
                    agree = f"TEXT DIFFERS: {', '.join(differ)}" if differ else "same text"
                rows.append((label, name, {p: statistics.median(v) for p, v in figures.items()},
                             {p: (statistics.median(r), min(r), max(r)) for p, r in ratios.items()}, agree))
                print(f"  {label}, {name}: " + ", ".join(f"{p} {', '.join(f'{x:.0f}' for x in v)}"
                                                        for p, v in figures.items()), flush=True)

    print(f"\n| model | sampling | {' | '.join(f'{p} tok/s' for p in programs)} | "
          + " | ".join(f"sample.py / {p} (median, range)" for p in peers) + " | greedy text |")
    print("|---|---|" + "---|" * (len(programs) + len(peers)) + "---|")
    for label, name, medians, ratios, agree in rows:
        print(f"| {label} | {name} | " + " | ".join(f"{medians[p]:.1f}" for p in programs) + " | "
              + " | ".join(f"{r:.2f}x ({lo:.2f} - {hi:.2f})" for r, lo, hi in ratios.values())
              + f" | {agree} |")


# ----------------------------------------------------------------- in-process (no run.c; GPUs)

@torch.inference_mode()
def generate_uncached(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
    # llama2.c's Python sample.py style: re-run the whole (cropped) sequence for each new token
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.args.max_seq_len:])  # (B, 1, vocab): last position only
        next_token = model_py.sample_next(logits[:, -1, :], temperature, top_k, top_p)
        idx = torch.cat((idx, next_token[:, None]), dim=1)
    return idx


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def in_process(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    dtype = runtime.resolve_dtype(args.dtype, args.device)
    ours = make_model(args.norm_scale).to(args.device, runtime.DTYPES[dtype])
    if args.device == "cpu":
        cpu_kernels.attach(ours)  # as sample.py decodes on a CPU
    idx = torch.tensor([[1]], device=args.device)  # BOS
    n = args.new_tokens
    where = (f"{torch.cuda.get_device_name(args.device)}, {date.today()}" if args.device.startswith("cuda")
             else machine())
    print(f"15M-shaped model, {n} new tokens after BOS, batch 1, {args.device} {dtype}"
          + (f", {torch.get_num_threads()} thread(s)" if args.device == "cpu" else "")
          + f"; {where}")

    def run_ours(m, sampling):
        return m.generate(idx, n, **sampling)

    variants = {} if args.skip_uncached else {"uncached (llama2.c sample.py style)":
                                              (ours, lambda m, s: generate_uncached(m, idx, n, **s))}
    variants["model.generate"] = (ours, run_ours)
    if args.compile:
        compiled = copy.deepcopy(ours)
        # generate_stream runs self.hidden_states for prefill and each decode step, as sample.py compiles it
        compiled.hidden_states = torch.compile(compiled.hidden_states, dynamic=True)
        t0 = time.perf_counter()
        run_ours(compiled, SAMPLING["greedy"])  # compiles prefill and decode
        sync(args.device)
        print(f"torch.compile warm-up: {time.perf_counter() - t0:.1f} s")
        variants["model.generate, torch.compile'd forward"] = (compiled, run_ours)

    results = {}
    for label, sampling in SAMPLING.items():
        for m, fn in variants.values():  # warm-up (allocations, kernels) outside the timing
            fn(m, sampling)
        times = {name: [] for name in variants}
        outputs = {}
        for _ in range(args.repeats):
            for name, (m, fn) in variants.items():
                torch.manual_seed(1)
                sync(args.device)
                t0 = time.perf_counter()
                outputs[name] = fn(m, sampling)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
        # the first n - 1 only: at the n-th the cache slides its window, the uncached loop crops
        if label == "greedy":
            tokens = [out[0, 1:n].tolist() for out in outputs.values()]
            print(f"greedy tokens agree across variants (first {n - 1}): "
                  f"{all(t == tokens[0] for t in tokens)}")
        results[label] = {name: (n / statistics.median(t), n / min(t)) for name, t in times.items()}

    width = max(map(len, variants)) + 2
    print(f"\n{'tokens/s (median / best)':<{width}}" + "".join(f"{label:>24}" for label in SAMPLING))
    for name in variants:
        print(f"{name:<{width}}" + "".join(
            f"{results[label][name][0]:>15.1f} / {results[label][name][1]:<6.1f}" for label in SAMPLING))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer",
                        help="a llama2.c checkout with run built: the default --runc and --tokenizer")
    parser.add_argument("--runc",
                        help="llama2.c's run binary (make runfast): time it side by side with sample.py")
    parser.add_argument("--tokenizer", help="the Llama 2 sentencepiece model (default: the peer's "
                        f"tokenizer.model, else {DEFAULT_TOKENIZER.relative_to(ROOT)})")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--new_tokens", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="first sampling seed (run i uses seed + i)")
    parser.add_argument("--plain", action="store_true", help="also time sample.py --cpu_speedups=False")
    parser.add_argument("--llama_cpp", action="store_true",
                        help="also time llama.cpp (pip install llama-cpp-python) on the model as a GGUF file")
    parser.add_argument("--norm_scale", type=float, default=7.5,
                        help="the trained-like model's final norm gain")
    parser.add_argument("--device", default="cpu", help="without --runc: cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", *runtime.DTYPES],
                        help="without --runc: auto (default) is sample.py's choice: bfloat16 on a GPU that "
                             "has it, float16 on an older one, float32 on a CPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="without --runc: torch CPU threads (0 = default)")
    parser.add_argument("--compile", action="store_true",
                        help="without --runc: also torch.compile'd decoding")
    parser.add_argument("--skip_uncached", action="store_true", help="without --runc: skip the uncached loop")
    args = parser.parse_args()
    if args.peer:
        args.runc = args.runc or str(Path(args.peer) / "run")
        args.tokenizer = args.tokenizer or str(Path(args.peer) / "tokenizer.model")
    args.tokenizer = args.tokenizer or str(DEFAULT_TOKENIZER)
    if args.new_tokens < 1 or args.repeats < 1:
        sys.exit("error: --new_tokens and --repeats must be at least 1")
    if args.runc or args.llama_cpp:
        side_by_side(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    in_process(args)


if __name__ == "__main__":
    main()
