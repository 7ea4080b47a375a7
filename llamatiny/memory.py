"""
How much memory a training step needs, and the largest micro-batch that fits.

train.py asks before it trains: a step that cannot fit stops at once with the batch size that does
(on a CPU the kernel would otherwise kill the process minutes later, without a word), and
`--batch_size=auto` picks the micro-batch for the machine. On a GPU the choice is measured, with real
steps at the run's context and dtype; on a CPU, where running out of memory kills the process instead
of raising an error, it comes from the estimate.
"""
import gc

import torch

from model import ModelArgs, Transformer


def num_params(args: ModelArgs) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time
        return Transformer(args).num_params()


def step_bytes(args: ModelArgs, batch_size: int, dtype: str, device_type: str, frozen: bool = False) -> int:
    """An estimate of the peak memory of one training step (forward, backward, AdamW) in bytes; within
    about a third of what PyTorch allocates, usually below it. frozen: the weights do not train (LoRA)."""
    params = num_params(args)
    half = dtype in ("bfloat16", "float16")
    # float32 weights, and unless frozen their gradients and AdamW's two moments; under autocast, the
    # half-precision weight copies
    weights = (4 if frozen else 16) * params + (2 * params if half else 0)
    tokens = batch_size * args.max_seq_len
    kv_dim = args.n_kv_heads * (args.dim // args.n_heads)
    # what each layer keeps for the backward pass, per token: the norms' inputs and outputs, q k v before
    # and after RoPE, the attention output, and the feed-forward's four hidden-size tensors. Autocast does
    # not halve it: the residual stream and the norms stay float32 beside the half-precision copies.
    per_token_layer = 9 * args.dim + 5 * kv_dim + 4 * args.hidden_dim
    activations = tokens * args.n_layers * per_token_layer * 4
    # the (B, T, vocab) logits: themselves, the float32 log-probabilities, and both gradients
    logits = tokens * args.vocab_size * (12 if half else 16)
    attention = 0
    if device_type == "cpu" and args.dropout > 0:  # the CPU path with dropout keeps its attention weights
        # (the weights before and after dropout, and its mask: about 10 bytes per score)
        attention = args.n_layers * batch_size * args.n_heads * args.max_seq_len ** 2 * 10
    return weights + activations + logits + attention


def available_bytes(device: str) -> int | None:
    """Memory a step may use now: the GPU's free memory, or the host's available RAM (None: unknown)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as f:  # Linux: what can be used without swapping
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def largest_that_fits(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for fits true up to some n and false beyond: doubling
    from 1, then bisecting between the last size that fitted and the first that did not. 0: none fits."""
    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None and good < limit:
        n = min(2 * good, limit)
        good, bad = (n, None) if fits(n) else (good, n)
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def split_batch(sequences: int, world_size: int, largest: int) -> tuple[int, int]:
    """(batch_size, gradient_accumulation_steps) for `sequences` per iteration over world_size processes,
    with the micro-batch as large as possible but at most `largest`: it must divide sequences / world_size,
    so that every process takes the same number of micro-steps and the tokens per iteration stay the same."""
    per_process = sequences // world_size
    batch = max(b for b in range(1, max(1, min(largest, per_process)) + 1) if per_process % b == 0)
    return batch, sequences // batch


def step_fits(args: ModelArgs, batch_size: int, device: str, dtype: str) -> bool:
    """Runs a real step (forward, backward, AdamW) of batch_size sequences on the GPU: does it fit?"""
    model = optimizer = x = loss = None
    try:
        model = Transformer(args).to(device)
        optimizer = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), "cuda")
        x = torch.randint(args.vocab_size, (batch_size, args.max_seq_len + 1), device=device)
        context = (torch.autocast("cuda", dtype=getattr(torch, dtype)) if dtype != "float32"
                   else torch.enable_grad())
        with context:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, optimizer, x, loss
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(args: ModelArgs, limit: int, device: str, dtype: str, processes_here: int = 1,
                  frozen: bool = False, headroom: float = 0.9) -> tuple[int, str]:
    """The largest micro-batch up to limit that fits (0: not even one), and how that was found. On a GPU,
    with real steps; on a CPU, from the estimate against the available memory, which processes_here
    processes of this machine share."""
    if device.startswith("cuda"):
        return largest_that_fits(lambda b: step_fits(args, b, device, dtype), limit), "measured on the GPU"
    free = available_bytes(device)
    if free is None:
        raise ValueError("batch_size=auto needs to know the free memory, which this system does not tell: "
                         "give --batch_size=N")
    share = headroom * free / processes_here
    fits = lambda b: step_bytes(args, b, dtype, device.split(":")[0], frozen) <= share
    return largest_that_fits(fits, limit), f"estimated against {free / 2**30:.1f} GiB of available memory"
