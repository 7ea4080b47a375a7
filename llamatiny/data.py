"""
Where the token shards live, and the batch loader train.py reads them with.

    shard_dir = dataset_dir("data", "tinystories", "custom", 512)       # data/tok512
    loader = BatchLoader(shard_dir, "train", batch_size=32, max_seq_len=256, seed=1337, vocab_size=512)
    x, y = loader.next_batch()                 # (32, 256) int64 each; y is x shifted by one token
    state = loader.state_dict()                # in the checkpoint: load_state_dict(state) continues exactly

A shard directory (written by `python tinystories.py pretokenize` or `prepare`) holds dataNN.bin, uint16
token ids back to back, and a meta.json naming the tokenizer. data00.bin is the validation split, the rest
train. Instruction data (instruct.py) has a loss mask beside each shard, dataNN.mask: one byte per token,
1 where the token is a target to learn (a response), 0 elsewhere; its y holds -1 (ignored) at the 0s.
"""
import itertools
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np

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


# -----------------------------------------------------------------------------
# the batch loader

class ShardBatches:
    """Global batch g -> (x, y), a pure function of (seed, g): the same in every process and on every run.

    The window stream: epoch e visits the shards in an order drawn from (seed, e); within a shard it takes
    non-overlapping windows of max_seq_len + 1 tokens from a random offset, in a random order, both drawn
    from (seed, e, shard). Batch g is windows g*B ... g*B + B - 1 of that stream. With loss masks (instruction
    data) the same windows of the masks set y to -1 where a target is not learned: records are packed like
    stories, and a record cut by a window still trains on the part of its response inside it."""

    def __init__(self, shard_dir, split: str, batch_size: int, max_seq_len: int, seed: int, vocab_size: int):
        shards = list_shards(shard_dir)
        rebuild = f"run `{shard_command(shard_dir)}`"
        if not shards:
            raise DataError(f"no shards (dataNN.bin) in {shard_dir}: {rebuild}")
        if split == "train" and len(shards) == 1:
            raise DataError(f"{shard_dir} holds only the validation shard {shards[0].name}: {rebuild}")
        # Every shard of both splits, before the first step: an id past the embedding would be an IndexError
        # mid-run on a CPU and a device-side assert on a GPU, and a damaged validation shard would stop the
        # run at its first eval. The price is one sequential read of the set, at memory or disk speed.
        masks = [p.with_name(mask_name(p.name)) for p in shards]
        found = [m.exists() for m in masks]
        if (masked := any(found)) and not all(found):
            raise DataError(f"{masks[found.index(False)]} is missing (the loss mask of instruction data): "
                            f"{rebuild} again")
        loss_tokens = []  # per shard: the targets of instruction data
        for path, mask in zip(shards, masks):
            size = path.stat().st_size
            if size % 2:
                raise DataError(f"{path} is damaged (an odd size, not uint16 token ids): {rebuild} again")
            if size and (top := int(np.memmap(path, dtype=np.uint16, mode="r").max())) >= vocab_size:
                raise DataError(f"{path} is damaged or from another tokenizer (token id {top}, vocab_size "
                                f"{vocab_size}): {rebuild} again")
            if masked and mask.stat().st_size != size // 2:
                raise DataError(f"{mask} ({mask.stat().st_size:,} bytes) does not match {path} "
                                f"({size // 2:,} tokens, one mask byte each): {rebuild} again")
            if masked:
                learn = np.memmap(mask, dtype=np.uint8, mode="r") if size else np.empty(0)
                loss_tokens.append(int(np.count_nonzero(learn)))
        keep = slice(0, 1) if split == "val" else slice(1, None)
        self.paths = [str(p) for p in shards[keep]]
        self.masks = [str(m) for m in masks[keep]] if masked else None
        self.loss_tokens = sum(loss_tokens[keep]) if masked else None
        self.batch_size, self.window, self.seed = batch_size, max_seq_len + 1, seed % 2**63
        self.tokens = np.array([os.path.getsize(p) for p in self.paths], dtype=np.int64) // 2
        full = self.tokens // self.window
        # windows per shard per epoch; one is kept spare so the random offset can range over a whole window
        self.windows = np.where(full >= 2, full - 1, full)
        self.per_epoch = int(self.windows.sum())
        if self.per_epoch == 0:
            raise DataError(f"the {split} split of {shard_dir} has {self.tokens.sum():,} tokens, no shard "
                            f"with max_seq_len + 1 = {self.window}: use a smaller max_seq_len or more data")
        self._orders, self._plans = {}, {}  # small caches: the current epoch and shards

    def __getitem__(self, g: int):
        import torch

        shards, starts = self.locate(g)
        # x and y are filled here in numpy: a torch copy of the slices would go through torch's intra-op
        # thread pool, which stalls for a whole scheduler slice when another process holds the other cores
        x = np.empty((self.batch_size, self.window - 1), dtype=np.int64)  # (B, T)
        y = np.empty_like(x)
        for s in np.unique(shards):
            rows = shards == s
            # opened per batch and dropped: a memmap held for the whole run grows resident memory
            data = np.memmap(self.paths[s], dtype=np.uint16, mode="r")
            index = starts[rows, None] + np.arange(self.window)
            windows = data[index]  # (rows, T + 1)
            x[rows], y[rows] = windows[:, :-1], windows[:, 1:]
            del data
            if self.masks is not None:  # instruction data: only the responses' tokens are targets
                learn = np.memmap(self.masks[s], dtype=np.uint8, mode="r")[index[:, 1:]]  # (rows, T)
                y[rows] = np.where(learn != 0, y[rows], -1)
        return torch.from_numpy(x), torch.from_numpy(y)

    def locate(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard index and start token of each window of batch g."""
        windows = np.arange(g * self.batch_size, (g + 1) * self.batch_size, dtype=np.int64)
        epochs, index = np.divmod(windows, self.per_epoch)
        shards, starts = np.empty_like(index), np.empty_like(index)
        for e in np.unique(epochs):
            sel = epochs == e
            order, ends = self._epoch(int(e))
            pos = np.searchsorted(ends, index[sel], side="right")  # which shard in this epoch's order
            s = order[pos]
            j = index[sel] - (ends[pos] - self.windows[s])  # which window within the shard
            st = np.empty_like(j)
            for k in np.unique(s):
                offset, perm = self._plan(int(e), int(k))
                st[s == k] = offset + perm[j[s == k]] * self.window
            shards[sel], starts[sel] = s, st
        return shards, starts

    def _epoch(self, e: int):
        if e not in self._orders:
            order = np.random.default_rng([self.seed, e, 0]).permutation(len(self.paths))
            self._orders = {e: (order, np.cumsum(self.windows[order]))}
        return self._orders[e]

    def _plan(self, e: int, s: int):
        if (e, s) not in self._plans:
            rng = np.random.default_rng([self.seed, e, 1, s])
            slack = int(self.tokens[s] - self.windows[s] * self.window)
            offset = int(rng.integers(min(self.window - 1, slack) + 1))
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[(e, s)] = (offset, rng.permutation(int(self.windows[s])))
        return self._plans[(e, s)]


class _RankIndices:
    """The global batch indices of one rank from its j-th batch on: rank, rank + W, rank + 2W, ..."""

    def __init__(self, start: int, rank: int, world_size: int):
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self):
        return (self.rank + self.world_size * j for j in itertools.count(self.start))


class BatchLoader:
    """Random (x, y) int64 batches of shape (batch_size, max_seq_len) from the shards of shard_dir.

    Rank r of world_size W takes global batches r, r + W, r + 2W, ... of one deterministic stream
    (ShardBatches), so ranks never overlap and W ranks with A accumulation steps see exactly the batches
    one process sees with W * A steps. Workers (num_workers > 0) fetch the same batches in the same order.
    state_dict() is the number of batches taken, so load_state_dict() continues with the exact next batch.
    Every token id is checked against vocab_size when the loader is made."""

    def __init__(self, shard_dir, split: str, batch_size: int, max_seq_len: int, seed: int, *,
                 vocab_size: int, rank: int = 0, world_size: int = 1, device="cpu", num_workers: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or max_seq_len < 1 or vocab_size < 1 or num_workers < 0:
            raise ValueError("batch_size, max_seq_len and vocab_size must be positive, num_workers >= 0")
        self.split, self.seed = split, seed
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.device = str(device)
        # pinned memory only helps (and only works everywhere) on CUDA
        self.pin = self.device.startswith("cuda")
        self.batches = ShardBatches(shard_dir, split, batch_size, max_seq_len, seed, vocab_size)
        self.masked = self.batches.masks is not None  # instruction data: y is -1 outside the responses
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
        return self.batches.loss_tokens / max(int(self.batches.tokens.sum()), 1)

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
        shards, starts = self.batches.locate(g)
        epoch = g * self.batch_size // self.batches.per_epoch
        order, _ = self.batches._epoch(epoch)
        name = lambda s: Path(self.batches.paths[s]).name
        return {
            "batches_consumed": consumed, "batch_size": self.batch_size, "max_seq_len": self.max_seq_len,
            "world_size": self.world_size, "seed": self.seed, "split": self.split,
            # where the next batch starts, for people reading a checkpoint; loading uses batches_consumed
            "epoch": int(epoch), "shard": name(shards[0]), "position": int(starts[0]),
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
