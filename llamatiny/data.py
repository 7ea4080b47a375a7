"""
Where the token shards live, and the batch loader train.py reads them with.

    shard_dir = dataset_dir("data", "tinystories", "custom", 512)       # data/tok512
    shards = Shards(shard_dir, vocab_size=512)   # read and checked once, shared by the loaders
    loader = BatchLoader(shards, "train", batch_size=32, max_seq_len=256, seed=1337)
    x, y = loader.next_batch()                 # (32, 256) int64 each; y is x shifted by one token
    state = loader.state_dict()                # in the checkpoint: load_state_dict(state) continues exactly

A shard directory (written by `python tinystories.py pretokenize` or `prepare`) holds dataNN.bin, uint16
token ids back to back, and a meta.json naming the tokenizer. data00.bin is the validation split, the rest
train. Instruction data (instruct.py) has two files beside each shard: dataNN.mask, one byte per token, 1
where the token is a target to learn (a response), 0 elsewhere (its y holds -1, ignored, at the 0s); and
dataNN.idx, where each record starts (uint64 token offsets), so that windows hold whole records.
"""
import bisect
import itertools
import json
import re
import shlex
from pathlib import Path

import numpy as np
from tqdm import tqdm

# torch is imported only inside the loader: tinystories.py imports this module, and the data commands
# start in a fraction of a second without it.

TINYSTORIES_DIR = "TinyStories_all_data"


class DataError(Exception):
    """Something the user can fix; the message is one line that says what to run."""


# -----------------------------------------------------------------------------
# where the shards live

def dataset_dir(data_dir, dataset: str = "tinystories", vocab_source: str = "llama2",
                vocab_size: int = 32000) -> Path:
    data_dir = Path(data_dir)
    if dataset != "tinystories":
        return data_dir / dataset  # from `prepare --name NAME`; meta.json says which vocabulary
    if vocab_source == "llama2":
        return data_dir / TINYSTORIES_DIR
    if vocab_source == "custom":
        if vocab_size <= 0:
            raise DataError(f"vocab_source='custom' needs vocab_size > 0, not {vocab_size}")
        return data_dir / f"tok{vocab_size}"
    raise DataError(f"vocab_source must be 'llama2' or 'custom', not {vocab_source!r}")


def data_command(args: str, data_dir) -> str:
    """`python tinystories.py ARGS` with the user's --data_dir, for error messages."""
    return f"python tinystories.py {args}{data_dir_option(data_dir)}"


def shard_command(shard_dir) -> str:
    """The command that writes the shards of shard_dir, for error messages."""
    shard_dir = Path(shard_dir)
    if shard_dir.name == TINYSTORIES_DIR:
        return data_command("pretokenize --vocab_size 0", shard_dir.parent)
    if m := re.fullmatch(r"tok(\d+)", shard_dir.name):
        return data_command(f"pretokenize --vocab_size {m[1]}", shard_dir.parent)
    return data_command(f"prepare --input YOUR_TEXT --name {shard_dir.name}", shard_dir.parent)


def data_dir_option(data_dir) -> str:
    if Path(data_dir).resolve() == Path("data").resolve():
        return ""
    return f" --data_dir {shlex.quote(str(data_dir))}"


def read_meta(shard_dir) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no {path} (no finished shards there): run `{shard_command(shard_dir)}`")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is corrupt ({e}): run `{shard_command(shard_dir)}` again") from None


def list_shards(shard_dir, ext: str = "bin") -> list[Path]:
    """dataNN.bin (or the TinyStories dataNN.json) in numeric order, data100 after data99; the first is the
    validation split."""
    found = [(int(m[1]), p) for p in Path(shard_dir).glob(f"data*.{ext}")
             if (m := re.fullmatch(rf"data(\d+)\.{ext}", p.name))]
    return [p for _, p in sorted(found)]


def mask_name(shard_name: str) -> str:
    # dataNN.bin -> dataNN.mask, the loss mask of instruction data
    return shard_name.removesuffix(".bin") + ".mask"


def index_name(shard_name: str) -> str:
    # dataNN.bin -> dataNN.idx, where the records of instruction data start
    return shard_name.removesuffix(".bin") + ".idx"


# -----------------------------------------------------------------------------
# the shards, read once

class Shards:
    """The shards of shard_dir, read and checked once: the loaders of both splits share one Shards (train.py
    makes three loaders), so the set is read once per process, not once per loader.

    Every shard of both splits is checked before the first step: an id past the embedding would be an
    IndexError mid-run on a CPU and a device-side assert on a GPU, and a damaged validation shard would stop
    the run at its first eval. The price is one sequential read of the set, at memory or disk speed.
    Instruction data (masks beside the shards) also has its records' starts, dataNN.idx, and packs whole
    records into windows (pack_records), once per window length."""

    def __init__(self, shard_dir, vocab_size: int):
        self.dir = Path(shard_dir)
        shards = list_shards(shard_dir)
        rebuild = self.rebuild = f"run `{shard_command(shard_dir)}`"
        if not shards:
            raise DataError(f"no shards (dataNN.bin) in {shard_dir}: {rebuild}")
        masks = [p.with_name(mask_name(p.name)) for p in shards]
        found = [m.exists() for m in masks]
        if (masked := any(found)) and not all(found):
            raise DataError(f"{masks[found.index(False)]} is missing (the loss mask of instruction data): "
                            f"{rebuild} again")
        self.paths = [str(p) for p in shards]
        self.masks = [str(m) for m in masks] if masked else None
        self.tokens = np.array([p.stat().st_size for p in shards], dtype=np.int64) // 2
        self.loss_tokens, self.starts = [], []  # per shard, instruction data: targets, record starts
        for path, mask in zip(shards, masks):
            size = path.stat().st_size
            if size % 2:
                raise DataError(f"{path} is damaged (an odd size, not uint16 token ids): {rebuild} again")
            if size and (top := int(np.memmap(path, dtype=np.uint16, mode="r").max())) >= vocab_size:
                raise DataError(f"{path} is damaged or from another tokenizer (token id {top}, vocab_size "
                                f"{vocab_size}): {rebuild} again")
            if masked:
                if mask.stat().st_size != size // 2:
                    raise DataError(f"{mask} ({mask.stat().st_size:,} bytes) does not match {path} "
                                    f"({size // 2:,} tokens, one mask byte each): {rebuild} again")
                learn = np.memmap(mask, dtype=np.uint8, mode="r") if size else np.empty(0)
                self.loss_tokens.append(int(np.count_nonzero(learn)))
                self.starts.append(self._record_starts(path, size // 2))
        self._packed = {}  # (shard, window) -> pack_records of its records

    def _record_starts(self, path: Path, tokens: int) -> np.ndarray:
        # the record starts prepare wrote beside the shard: checked, not trusted, as the shard itself is
        idx = path.with_name(index_name(path.name))
        if not idx.exists():
            raise DataError(f"{idx} is missing (where the records of instruction data start): "
                            f"{self.rebuild} again")
        starts = np.fromfile(idx, dtype=np.uint64).astype(np.int64)
        if idx.stat().st_size % 8 or tokens and (len(starts) == 0 or starts[0] != 0 or starts[-1] >= tokens
                                                 or (np.diff(starts) <= 0).any()):
            raise DataError(f"{idx} does not match {path} (its records' starts): {self.rebuild} again")
        return starts

    def split(self, split: str) -> list[int]:
        # the shards of a split: data00 is the validation split, the rest train
        if split == "train" and len(self.paths) == 1:
            raise DataError(f"{self.dir} holds only the validation shard {Path(self.paths[0]).name}: "
                            f"{self.rebuild}")
        return [0] if split == "val" else list(range(1, len(self.paths)))

    def lengths(self, s: int) -> np.ndarray:
        # instruction data: the tokens of each record of shard s
        return np.diff(self.starts[s], append=self.tokens[s])

    def packed(self, s: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        if (s, window) not in self._packed:
            self._packed[(s, window)] = pack_records(self.lengths(s), window)
        return self._packed[(s, window)]


def pack_records(lengths: np.ndarray, window: int, lookahead: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing of whole records into windows of `window` tokens: (order, bounds), window k holding
    records order[bounds[k]:bounds[k + 1]], each from its first token, back to back; the rest of a window is
    padding. Each window takes the longest record that fits its space among the next `lookahead` records
    not yet placed (the oldest of equal length), until none fits. A record longer than the window fills one
    alone and is cut: its instruction is in the window, the end of its response is not."""
    lengths = np.minimum(lengths, window).tolist()
    waiting, order, bounds, following = [], [], [0], 0  # waiting: sorted (length, -record)
    while waiting or following < len(lengths):
        space = window
        while True:
            while following < len(lengths) and len(waiting) < lookahead:
                bisect.insort(waiting, (lengths[following], -following))
                following += 1
            fits = bisect.bisect_right(waiting, (space, 1)) - 1  # the longest record of length <= space
            if fits < 0:
                break
            length, record = waiting.pop(fits)
            order.append(-record)
            space -= length
        bounds.append(len(order))
    return np.array(order, dtype=np.int64), np.array(bounds, dtype=np.int64)


# -----------------------------------------------------------------------------
# the batch loader

class ShardBatches:
    """Global batch g -> (x, y), a pure function of (seed, g): the same in every process and on every run.

    The window stream: epoch e visits the split's shards in an order drawn from (seed, e), and each shard's
    windows of max_seq_len + 1 tokens in an order drawn from (seed, e, shard). Batch g is windows
    g*B ... g*B + B - 1 of that stream. Plain text is one stream of stories: a shard's windows are
    non-overlapping, from a random offset drawn from (seed, e, shard). Instruction data is records, each a
    prompt and its response: a window holds whole records from their first token (Shards.packed, the
    same in every epoch), so that every response is trained with its instruction, and its masks set y to
    -1 where a target is not learned (prompts, padding)."""

    def __init__(self, shards: Shards, split: str, batch_size: int, max_seq_len: int, seed: int):
        self.shards, self.split = shards, shards.split(split)
        self.paths = [shards.paths[s] for s in self.split]
        self.masked = shards.masks is not None
        self.batch_size, self.window, self.seed = batch_size, max_seq_len + 1, seed % 2**63
        self.tokens = shards.tokens[self.split]
        if self.masked:  # (2 M records of ~220 tokens pack in ~17 s on a loaded CPU: a bar where it is long)
            packing = tqdm(self.split, desc=f"packing the {split} records", unit=" shards", delay=2)
            self.windows = np.array([len(shards.packed(s, self.window)[1]) - 1 for s in packing])
        else:  # one window is kept spare so that the random offset can range over a whole window
            full = self.tokens // self.window
            self.windows = np.where(full >= 2, full - 1, full)
        self.per_epoch = int(self.windows.sum())
        if self.per_epoch == 0:
            raise DataError(f"the {split} split of {shards.dir} has {self.tokens.sum():,} tokens, no shard "
                            f"with max_seq_len + 1 = {self.window}: use a smaller max_seq_len or more data")
        self._orders, self._plans = {}, {}  # small caches: the current epoch and shards

    def __getitem__(self, g: int):
        import torch

        shards, slots = self.locate(g)
        # x and y are filled here in numpy: a torch copy of the slices would go through torch's intra-op
        # thread pool, which stalls for a whole scheduler slice when another process holds the other cores
        x = np.empty((self.batch_size, self.window - 1), dtype=np.int64)  # (B, T)
        y = np.empty_like(x)
        for s in np.unique(shards):
            rows = shards == s
            index = self.index(int(s), slots[rows])  # (rows, T + 1), -1 where a window is padded
            # opened per batch and dropped: a memmap held for the whole run grows resident memory
            data = np.memmap(self.paths[s], dtype=np.uint16, mode="r")
            windows = np.where(index >= 0, data[index.clip(0)], 0)
            x[rows], y[rows] = windows[:, :-1], windows[:, 1:]
            del data
            if self.masked:  # instruction data: only the responses' tokens are targets
                learn = np.memmap(self.shards.masks[self.split[s]], dtype=np.uint8, mode="r")
                y[rows] = np.where((index[:, 1:] >= 0) & (learn[index[:, 1:].clip(0)] != 0), y[rows], -1)
        return torch.from_numpy(x), torch.from_numpy(y)

    def locate(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard (of the split) and slot of each window of batch g: the start token of a window of plain
        text, the packed window of instruction data."""
        windows = np.arange(g * self.batch_size, (g + 1) * self.batch_size, dtype=np.int64)
        epochs, index = np.divmod(windows, self.per_epoch)
        shards, slots = np.empty_like(index), np.empty_like(index)
        for e in np.unique(epochs):
            sel = epochs == e
            order, ends = self._epoch(int(e))
            pos = np.searchsorted(ends, index[sel], side="right")  # which shard in this epoch's order
            s = order[pos]
            j = index[sel] - (ends[pos] - self.windows[s])  # which window within the shard
            found = np.empty_like(j)
            for k in np.unique(s):
                found[s == k] = self._plan(int(e), int(k))[j[s == k]]
            shards[sel], slots[sel] = s, found
        return shards, slots

    def index(self, s: int, slots: np.ndarray) -> np.ndarray:
        """(windows, T + 1) token positions in shard s of the windows at slots; -1 where one is padded."""
        if not self.masked:
            return slots[:, None] + np.arange(self.window)
        order, bounds = self.shards.packed(self.split[s], self.window)
        starts, lengths = self.shards.starts[self.split[s]], self.shards.lengths(self.split[s])
        index = np.full((len(slots), self.window), -1, dtype=np.int64)
        for row, k in enumerate(slots):
            records = order[bounds[k]:bounds[k + 1]]
            spans = [np.arange(a, a + n) for a, n in zip(starts[records], lengths[records])]
            filled = np.concatenate(spans)[:self.window]  # (a record longer than the window: its start)
            index[row, :len(filled)] = filled
        return index

    def _epoch(self, e: int):
        if e not in self._orders:
            order = np.random.default_rng([self.seed, e, 0]).permutation(len(self.paths))
            self._orders = {e: (order, np.cumsum(self.windows[order]))}
        return self._orders[e]

    def _plan(self, e: int, s: int) -> np.ndarray:
        # the slots of shard s in epoch e, in the order they are visited
        if (e, s) not in self._plans:
            rng = np.random.default_rng([self.seed, e, 1, s])
            if self.masked:
                plan = rng.permutation(int(self.windows[s]))
            else:
                slack = int(self.tokens[s] - self.windows[s] * self.window)
                offset = int(rng.integers(min(self.window - 1, slack) + 1))
                plan = offset + rng.permutation(int(self.windows[s])) * self.window
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[(e, s)] = plan
        return self._plans[(e, s)]


class _RankIndices:
    """The global batch indices of one rank from its j-th batch on: rank, rank + W, rank + 2W, ..."""

    def __init__(self, start: int, rank: int, world_size: int):
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self):
        return (self.rank + self.world_size * j for j in itertools.count(self.start))


class BatchLoader:
    """Random (x, y) int64 batches of shape (batch_size, max_seq_len) from a split of the shards.

    Rank r of world_size W takes global batches r, r + W, r + 2W, ... of one deterministic stream
    (ShardBatches), so ranks never overlap and W ranks with A accumulation steps see exactly the batches
    one process sees with W * A steps. Workers (num_workers > 0) fetch the same batches in the same order.
    state_dict() is the number of batches taken, so load_state_dict() continues with the exact next batch.
    Every token id is checked against vocab_size when the shards are read."""

    def __init__(self, data, split: str, batch_size: int, max_seq_len: int, seed: int, *,
                 vocab_size: int | None = None, rank: int = 0, world_size: int = 1, device="cpu",
                 num_workers: int = 0):
        # data: a shard directory (read here, its ids checked against vocab_size), or Shards read once for
        # several loaders
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or max_seq_len < 1 or num_workers < 0:
            raise ValueError("batch_size and max_seq_len must be positive, num_workers >= 0")
        self.split, self.seed = split, seed
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.device = str(device)
        # pinned memory only helps (and only works everywhere) on CUDA
        self.pin = self.device.startswith("cuda")
        shards = data if isinstance(data, Shards) else Shards(data, vocab_size)
        self.batches = ShardBatches(shards, split, batch_size, max_seq_len, seed)
        self.masked = self.batches.masked  # instruction data: y is -1 outside the responses
        self.consumed = 0  # batches this rank has returned
        self._workers = None

    @property
    def tokens_per_epoch(self) -> int:
        # the targets of one pass over the split: each window of max_seq_len + 1 tokens gives max_seq_len
        return self.batches.per_epoch * self.max_seq_len

    @property
    def loss_share(self) -> float | None:
        # instruction data: the share of the split's tokens that are targets (the responses); else None
        if not self.masked:
            return None
        loss_tokens = sum(self.batches.shards.loss_tokens[s] for s in self.batches.split)
        return loss_tokens / max(int(self.batches.tokens.sum()), 1)

    def packing(self) -> dict | None:
        """Instruction data: how its records fill the split's windows of max_seq_len + 1 tokens ("records",
        "cut": those longer than a window, "padding": the share of window tokens that are padding); else
        None."""
        if not self.masked:
            return None
        shards, window = self.batches.shards, self.batches.window
        lengths = np.concatenate([shards.lengths(s) for s in self.batches.split])
        filled = int(np.minimum(lengths, window).sum())
        return {"records": len(lengths), "cut": int((lengths > window).sum()),
                "padding": 1 - filled / (self.batches.per_epoch * window)}

    def next_batch(self):
        if self.num_workers == 0:
            x, y = self.batches[self.rank + self.world_size * self.consumed]
            if self.pin:
                x, y = x.pin_memory(), y.pin_memory()
        else:
            if self._workers is None:
                self._workers = self._start_workers()
            x, y = next(self._workers)
        self.consumed += 1
        if self.device == "cpu":
            return x, y
        return x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)

    def _start_workers(self):
        import torch.utils.data

        # a map-style dataset over an endless index sampler: the DataLoader hands indices to the workers in
        # turn and returns their batches in index order, so any num_workers gives the same sequence
        loader = torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=_RankIndices(self.consumed, self.rank, self.world_size),
            num_workers=self.num_workers, pin_memory=self.pin,
        )
        return iter(loader)

    def rewind(self) -> None:
        # back to the first batch: an eval loader gives the same batches at every eval
        self.consumed, self._workers = 0, None

    def state_dict(self, unused: int = 0) -> dict:
        """unused: batches returned but not trained on yet (fetched ahead): they come again on resume."""
        consumed = self.consumed - unused
        g = self.rank + self.world_size * consumed
        shards, slots = self.batches.locate(g)
        epoch = g * self.batch_size // self.batches.per_epoch
        order, _ = self.batches._epoch(epoch)
        name = lambda s: Path(self.batches.paths[s]).name
        start = self.batches.index(int(shards[0]), slots[:1])[0, 0]
        return {
            "batches_consumed": consumed, "batch_size": self.batch_size, "max_seq_len": self.max_seq_len,
            "world_size": self.world_size, "seed": self.seed, "split": self.split,
            # where the next batch starts, for people reading a checkpoint; loading uses batches_consumed
            "epoch": int(epoch), "shard": name(shards[0]), "position": int(start),
            "shard_order": [name(s) for s in order],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("split", self.split) != self.split:
            raise ValueError(f"loader state is for the {state['split']!r} split, not {self.split!r}")
        shape = ("batch_size", "max_seq_len", "world_size")
        if all(state[k] == getattr(self, k) for k in shape):
            self.consumed = int(state["batches_consumed"])
        else:  # resumed with another batch shape: continue at the same token of the global stream
            tokens = (state["batches_consumed"] * state["world_size"] * state["batch_size"]
                      * state["max_seq_len"])
            self.consumed = -(-tokens // (self.world_size * self.batch_size * self.max_seq_len))
        self._workers = None  # restart the workers at the new position
