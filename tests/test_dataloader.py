"""The batch loader and where shards live (llamatiny/data.py), on shards of random token ids; and a damaged
shard refused by `python train.py`. No network."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import tinystories
from llamatiny import data as dl
from llamatiny.corpus import make_stories, write_endoftext

VOCAB = 512


def write_shards(shard_dir, sizes, seed=0):
    """dataNN.bin of the given sizes (tokens), random ids below VOCAB."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        rng.integers(0, VOCAB, n, dtype=np.uint16).tofile(shard_dir / f"data{i:02d}.bin")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """tok512/: a validation shard and three train shards of uneven sizes."""
    out = tmp_path_factory.mktemp("data") / f"tok{VOCAB}"
    write_shards(out, [6_000, 9_001, 20_011, 15_000])
    return out


def loader(shard_dir, **kw):
    args = dict(split="train", batch_size=4, max_seq_len=32, seed=1337, vocab_size=VOCAB)
    return dl.BatchLoader(shard_dir, **{**args, **kw})


def batches(ld, n):
    return [ld.next_batch() for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


# -----------------------------------------------------------------------------
# where the shards live

def test_dataset_dir_and_read_meta(tmp_path):
    assert dl.dataset_dir(tmp_path, "tinystories", "llama2", 32000) == tmp_path / "TinyStories_all_data"
    assert dl.dataset_dir(tmp_path, "tinystories", "custom", 512) == tmp_path / "tok512"
    assert dl.dataset_dir(tmp_path, "mine", "custom", 512) == tmp_path / "mine"
    with pytest.raises(dl.DataError, match="pretokenize --vocab_size 512 --data_dir"):
        dl.read_meta(tmp_path / "tok512")


def test_list_shards_in_numeric_order(tmp_path):
    for n in (100, 2, 10, 0):
        (tmp_path / f"data{n:02d}.bin").touch()
    (tmp_path / "data01.bin.tmp").touch()
    (tmp_path / "data01.json").touch()
    names = [p.name for p in dl.list_shards(tmp_path)]
    assert names == ["data00.bin", "data02.bin", "data10.bin", "data100.bin"]
    assert [p.name for p in dl.list_shards(tmp_path, "json")] == ["data01.json"]


# -----------------------------------------------------------------------------
# the batch loader

def test_batches_are_the_shifted_windows_of_the_shards(shards):
    ld = loader(shards)
    data = [np.fromfile(path, np.uint16).astype(np.int64) for path in ld.batches.paths]
    straddle = ld.batches.per_epoch // 4
    assert ld.batches.per_epoch % 4  # so batch `straddle` holds windows of two epochs
    for g in (0, 1, 50, straddle):
        x, y = ld.batches[g]
        found, starts = ld.batches.locate(g)
        # (B, T + 1) windows of the shards: x is window[:, :-1] and y is window[:, 1:]
        window = torch.from_numpy(np.stack([data[s][st:st + 33] for s, st in zip(found, starts)]))
        assert torch.equal(x, window[:, :-1]) and torch.equal(y, window[:, 1:])
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
    assert all("data00" not in p for p in ld.batches.paths)  # train never reads the validation shard
    assert loader(shards, split="val").batches.paths == [str(shards / "data00.bin")]


def test_loader_is_deterministic(shards):
    assert same(batches(loader(shards), 6), batches(loader(shards), 6))
    assert not same(batches(loader(shards), 6), batches(loader(shards, seed=1), 6))
    # validation batches are fixed: a fresh loader with the same seed gives them again
    assert same(batches(loader(shards, split="val"), 3), batches(loader(shards, split="val"), 3))


def test_epoch_covers_disjoint_windows_at_varying_offsets(shards):
    ld = loader(shards, batch_size=1)
    b, L = ld.batches, ld.batches.window
    first = [tuple(map(int, (s[0], st[0]))) for s, st in map(b.locate, range(b.per_epoch))]
    assert len(set(first)) == b.per_epoch  # every window of the epoch once
    for s in range(len(b.paths)):
        starts = sorted(st for k, st in first if k == s)
        assert len(starts) == b.windows[s] and all(q - p >= L for p, q in zip(starts, starts[1:]))
    offsets = {int(b.locate(e * b.per_epoch)[1][0]) % L for e in range(20)}
    assert len(offsets) > 5  # not at fixed multiples of the context length


def test_ranks_are_disjoint_and_equal_one_process_with_more_accumulation(shards):
    W, k = 2, 5
    single = batches(loader(shards), W * k)
    ranks = [batches(loader(shards, rank=r, world_size=W), k) for r in range(W)]
    for r in range(W):
        assert same(ranks[r], single[r::W])  # rank r's j-th batch is global batch r + W*j
    # so per iteration (A micro-steps per rank) the union over ranks is the single process's 2A batches
    A = 2
    for it in range(k // A):
        union = sorted(x.flatten().tolist() for rk in ranks for x, _ in rk[it * A:(it + 1) * A])
        assert union == sorted(x.flatten().tolist() for x, _ in single[it * W * A:(it + 1) * W * A])
    locate = loader(shards).batches.locate
    windows = [{(int(s), int(st)) for g in range(r, 2 * k, W) for s, st in zip(*locate(g))} for r in range(W)]
    assert not windows[0] & windows[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_exact_next_batch(shards, workers):
    reference = batches(loader(shards, rank=1, world_size=2), 9)
    ld = loader(shards, rank=1, world_size=2, num_workers=workers)
    assert same(batches(ld, 4), reference[:4])
    state = ld.state_dict()
    assert state["batches_consumed"] == 4 and state["shard"].startswith("data") and state["epoch"] >= 0
    assert same(batches(ld, 2), reference[4:6])
    fresh = loader(shards, rank=1, world_size=2, num_workers=2 - workers)  # also across worker counts
    fresh.load_state_dict(state)
    assert same(batches(fresh, 5), reference[4:9])
    ld.load_state_dict(state)  # rewinding a running loader restarts its workers
    assert same(batches(ld, 1), reference[4:5])


@pytest.mark.parametrize("world_size, batch_size, first", [(1, 8, 24), (1, 5, 25), (4, 2, 24)])
def test_resume_with_another_batch_shape_continues_at_the_same_token(shards, world_size, batch_size, first):
    # the window stream itself: a loader of one window per batch returns window k as its k-th batch
    stream = batches(loader(shards, batch_size=1), 40)
    xs, ys = torch.cat([x for x, _ in stream]), torch.cat([y for _, y in stream])  # (40, T)
    # a run of 2 ranks x 3 batches of 4 windows has taken windows 0 ... 23
    before = [loader(shards, batch_size=4, rank=r, world_size=2) for r in range(2)]
    taken = [b for ld in before for b in batches(ld, 3)]
    assert sorted(row.tolist() for x, _ in taken for row in x) == sorted(row.tolist() for row in xs[:24])
    # resumed with another shape, the ranks' next batches together continue at window `first`: 24, or the
    # next whole batch of 5 (25)
    after = [loader(shards, batch_size=batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    for ld in after:
        ld.load_state_dict(before[0].state_dict())
    got = [ld.next_batch() for ld in after]  # global batches in rank order: consecutive windows
    n = world_size * batch_size
    assert torch.equal(torch.cat([x for x, _ in got]), xs[first:first + n])
    assert torch.equal(torch.cat([y for _, y in got]), ys[first:first + n])


def test_tiny_split_wraps_epochs(shards):
    ld = loader(shards, split="val", batch_size=256, max_seq_len=256)
    assert ld.batches.per_epoch < 256
    x, _ = ld.next_batch()
    assert x.shape == (256, 256)


def test_missing_shards_is_an_error_with_the_command(tmp_path):
    command = "`python tinystories.py pretokenize --vocab_size 512 --data_dir"
    with pytest.raises(dl.DataError, match=rf"no shards .* {command}"):
        loader(tmp_path / "tok512")
    with pytest.raises(dl.DataError, match="prepare --input YOUR_TEXT --name mine"):
        loader(tmp_path / "mine")
    write_shards(tmp_path / "tok512", [10])
    with pytest.raises(dl.DataError, match="only the validation shard"):
        loader(tmp_path / "tok512")
    write_shards(tmp_path / "tok512", [10, 10])
    with pytest.raises(dl.DataError, match="smaller max_seq_len"):
        loader(tmp_path / "tok512")


@pytest.mark.parametrize("shard", ["data00.bin", "data02.bin"])
@pytest.mark.parametrize("damage", ["odd size", "id past the vocabulary"])
def test_damaged_shard_is_refused_with_its_path_and_the_command(tmp_path, shard, damage):
    out = tmp_path / f"tok{VOCAB}"
    write_shards(out, [6_000, 9_001, 20_011])
    path = out / shard
    data = np.memmap(path, dtype=np.uint16, mode="r+")
    data[1234] = VOCAB - 1  # the largest id is fine
    data.flush()
    del data
    for split in ("train", "val"):
        loader(out, split=split)
    if damage == "odd size":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        data = np.memmap(path, dtype=np.uint16, mode="r+")
        data[4321] = VOCAB
        data.flush()
        del data
    command = f"run `python tinystories.py pretokenize --vocab_size {VOCAB} --data_dir {tmp_path}` again"
    for split in ("train", "val"):  # either split's loader checks every shard, before the first batch
        with pytest.raises(dl.DataError) as e:
            loader(out, split=split)
        message = str(e.value)
        assert "\n" not in message and str(path) in message and command in message
        assert ("odd size" if damage == "odd size" else f"token id {VOCAB}, vocab_size {VOCAB}") in message


def test_train_py_refuses_a_damaged_shard(tmp_path):
    text = tmp_path / "stories.txt"
    write_endoftext(text, make_stories(300, seed=3))
    tinystories.train_vocab(tmp_path, VOCAB, input=text, name="fixture")
    tinystories.prepare(tmp_path, text, "fixture", vocab_size=VOCAB)
    path = tmp_path / "fixture" / "data01.bin"
    data = np.memmap(path, dtype=np.uint16, mode="r+")
    data[-1] = 40_000  # as if made with the Llama 2 tokenizer
    data.flush()
    del data
    args = ["--dataset=fixture", "--vocab_source=custom", f"--vocab_size={VOCAB}", "--dim=32", "--n_layers=1",
            "--n_heads=4", "--max_seq_len=32", "--batch_size=4", "--max_iters=2", "--warmup_iters=1",
            "--device=cpu",
            "--compile=False", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    command = f"python tinystories.py prepare --input YOUR_TEXT --name fixture --data_dir {tmp_path}"
    assert r.stderr.splitlines()[-1] == (f"error: {path} is damaged or from another tokenizer (token id "
                                         f"40000, vocab_size {VOCAB}): run `{command}` again")
    assert not (tmp_path / "out" / "ckpt.pt").exists()
