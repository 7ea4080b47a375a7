"""LoRA (llamatiny/lora.py) through every script: the layer and its merge, the checkpoint that holds adapters
and names its base (llamatiny/checkpoint.py), the PEFT export read back by peft itself, and train.py runs: a
fine-tune on a text unlike the pretraining one against a full fine-tune, frozen base weights, exact resume,
the base-hash check, DDP and torch.compile."""
import dataclasses
import json
import os
import re
import shutil
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
from test_export import TOKENS, logits_of, tiny_model, train_tokenizer
from test_train import TINY, assert_same_losses, main_error, ok, read_metrics, run_train

import eval as eval_py
import export
import sample
import tinystories
import train
from configurator import ConfigError
from llamatiny import lora
from llamatiny.checkpoint import CheckpointError, from_checkpoint, save_checkpoint, write_hf
from llamatiny.corpus import OTHER_WORDS, WORDS, make_stories, write_endoftext
from model import ModelArgs, Transformer

# the fine-tunes below: 40 steps on the other text, LoRA at rank 4 with a learning rate LoRA needs
FINETUNE = ["--dataset=other", "--max_iters=40", "--eval_interval=20", "--warmup_iters=0"]
LORA = ["--lora_rank=4", "--learning_rate=1e-2"]


def with_adapters(model: Transformer, alpha=8.0) -> Transformer:
    # trained-looking adapters, rank 4 on every matrix: B is no longer zero, so they change the logits
    lora.attach(model, 4, alpha)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    return model.eval()


def lora_checkpoint(path: Path, model: Transformer, base: Path) -> Path:
    # what train.py saves for a LoRA run, less the optimizer and run state
    save_checkpoint(path, {**lora.checkpoint_entries(model, lora.identify_base(base)),
                           "model_args": dataclasses.asdict(model.args), "tokenizer": None})
    return path


def plain_checkpoint(path: Path, model: Transformer) -> Path:
    save_checkpoint(path, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.args),
                           "tokenizer": None})
    return path


# ---------------------------------------------------------------- the layer, attach and merge


def test_step_zero_is_the_base_model_and_only_the_adapters_train():
    base = tiny_model()
    model = lora.attach(tiny_model(), rank=4, alpha=8.0)
    assert torch.equal(logits_of(model, TOKENS), logits_of(base, TOKENS))  # B = 0: exactly the base
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert len(trainable) == 2 * 7 * model.args.n_layers
    # (out, rank) and (rank, in) per matrix: rank x (in + out) parameters; wq wo: dim -> dim,
    # wk wv: dim -> kv, w1 w3: dim -> hidden, w2: hidden -> dim
    a = model.args
    kv = a.n_kv_heads * a.dim // a.n_heads
    per_layer = 4 * (2 * (a.dim + a.dim) + 2 * (a.dim + kv) + 3 * (a.dim + a.hidden_dim))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == a.n_layers * per_layer


def test_the_layer_adds_the_scaled_low_rank_update():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10, bias=False)
    layer = lora.LoRALinear(linear, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 12)
    expected = x @ linear.weight.T + (6.0 / 3) * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    assert torch.allclose(x @ layer.merged_weight().T, expected, atol=1e-5)


def test_targets_pick_the_matrices_and_the_15m_goal():
    model = lora.attach(tiny_model(), rank=2, alpha=2.0, targets="wv, wq")
    adapted = [name for name, _ in lora.lora_layers(model)]
    assert adapted == ["layers.0.attention.wq", "layers.0.attention.wv", "layers.1.attention.wq",
                       "layers.1.attention.wv"]
    assert lora.settings(model)["targets"] == "wq,wv"
    assert "on wq,wv (4 matrices)" in lora.summary(model)
    # the 15M model at rank 8 on every matrix: under 3% of its parameters train
    with torch.device("meta"):
        big = lora.attach(Transformer(ModelArgs()), rank=8, alpha=16.0)
    line = lora.summary(big)
    assert line.startswith("LoRA: 262,656 parameters train, 1.73% of the model's 15,191,712 (frozen)"), line


@pytest.mark.parametrize("override, message", [
    ({"lora_rank": 8}, "lora_rank=8 adapts a trained model: give it with --init_from=PATH"),
    ({"lora_rank": -1}, "lora_rank=-1 must be 0 (off)"),
    ({"lora_targets": "wq,w4"}, "lora_targets='wq,w4': 'w4' is not one of the weights; choose from "
                                "wq,wk,wv,wo,w1,w2,w3"),
    ({"lora_targets": ""}, "name at least one weight"),
    ({"lora_rank": 8, "init_from": "base.pt", "lora_alpha": 0.0}, "lora_alpha=0.0 must be positive"),
    ({"lora_rank": 8, "init_from": "base.pt", "lora_dropout": 1.0}, "lora_dropout=1.0 must be in [0, 1)"),
    ({"lora_rank": 8, "init_from": "out/ckpt.pt", "out_dir": "out"}, "is the checkpoint this run writes"),
])
def test_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        lora.check_settings(train.default_config() | override)
    lora.check_settings(train.default_config() | {"lora_rank": 8, "init_from": "base.pt"})


def test_lora_without_a_model_to_adapt_is_a_one_line_error(tmp_path):
    message = main_error(["--lora_rank=8", f"--out_dir={tmp_path}"])
    assert "lora_rank=8 adapts a trained model: give it with --init_from=PATH" in message


def test_merge_gives_the_same_logits():
    # a realistically initialised model (std 0.02) with adapters that move its logits visibly
    torch.manual_seed(0)
    base = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, max_seq_len=64))
    model = with_adapters(Transformer(base.args), alpha=64.0)
    model.load_state_dict(base.state_dict() | lora.adapter_state(model))
    merged = lora.merge(model)
    assert not lora.lora_layers(merged) and type(merged) is Transformer
    assert all(p.requires_grad for p in merged.parameters())  # an ordinary model, e.g. to fine-tune
    ours, theirs = logits_of(model.eval(), TOKENS), logits_of(merged.eval(), TOKENS)
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - logits_of(base.eval(), TOKENS)).abs().max() > 1e-2  # the adapters do change them


# ---------------------------------------------------------------- checkpoints and export


def test_from_checkpoint_loads_base_and_adapters(tmp_path):
    base = plain_checkpoint(tmp_path / "base.pt", tiny_model())
    model = with_adapters(tiny_model())
    path = lora_checkpoint(tmp_path / "lora.pt", model, base)
    assert path.stat().st_size < base.stat().st_size / 3
    merged, ckpt = from_checkpoint(path)
    assert not lora.lora_layers(merged) and "lora" in ckpt
    assert (logits_of(merged, TOKENS) - logits_of(model, TOKENS)).abs().max() < 1e-4  # std 0.3 weights: large
    assert all(torch.equal(ckpt["model"][k], v) for k, v in merged.state_dict().items())
    unmerged, ckpt = from_checkpoint(path, merge=False)  # train.py's resume: the base's weights + adapters
    assert torch.equal(logits_of(unmerged, TOKENS), logits_of(model, TOKENS))
    assert all(torch.equal(ckpt["model"][k], v) for k, v in tiny_model().state_dict().items())


def test_eval_py_measures_base_and_adapters(tmp_path):
    # eval.py (like sample.py) loads a LoRA checkpoint's base and adapters: the merged model's loss
    tok = train_tokenizer(tmp_path)
    base = plain_checkpoint(tmp_path / "base.pt", tiny_model())
    model = with_adapters(tiny_model())
    path = lora_checkpoint(tmp_path / "lora.pt", model, base)
    write_endoftext(tmp_path / "s.txt", make_stories(6, seed=2))
    args = [f"--input={tmp_path / 's.txt'}", f"--tokenizer={tok}"]
    with redirect_stdout(StringIO()):
        adapted = eval_py.main([f"--checkpoint={path}", *args])
        merged = plain_checkpoint(tmp_path / "merged.pt", lora.merge(model))
        same = eval_py.main([f"--checkpoint={merged}", *args])["loss"]
        without = eval_py.main([f"--checkpoint={base}", *args])["loss"]
    assert same == pytest.approx(adapted["loss"], rel=1e-5) and abs(without - adapted["loss"]) > 1e-3


def test_a_changed_or_missing_base_is_refused(tmp_path):
    base = plain_checkpoint(tmp_path / "base.pt", tiny_model())
    path = lora_checkpoint(tmp_path / "lora.pt", with_adapters(tiny_model()), base)
    plain_checkpoint(base, tiny_model(seed=5))  # another model in the base's place
    with pytest.raises(CheckpointError) as e:
        from_checkpoint(path)
    message = str(e.value)
    assert f"{path} was trained on the base model {base}, which has changed since (sha256 " in message
    assert "\n" not in message
    base.unlink()
    with pytest.raises(CheckpointError, match=f"{path} holds LoRA adapters for the base model {base}, "
                                              "which is missing"):
        from_checkpoint(path)


def test_a_hugging_face_base_is_identified_by_its_weights_and_config(tmp_path):
    write_hf(tmp_path / "hf", tiny_model())
    model = with_adapters(tiny_model())
    path = lora_checkpoint(tmp_path / "lora.pt", model, tmp_path / "hf")
    assert (logits_of(from_checkpoint(path)[0], TOKENS) - logits_of(model, TOKENS)).abs().max() < 1e-4
    config = tmp_path / "hf" / "config.json"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'), encoding="utf-8")
    with pytest.raises(CheckpointError, match="which has changed since"):
        from_checkpoint(path)


def test_export_merges_into_every_format(tmp_path, capsys):
    base = plain_checkpoint(tmp_path / "base.pt", tiny_model())
    model = with_adapters(tiny_model())
    path = lora_checkpoint(tmp_path / "lora.pt", model, base)
    ref = logits_of(model, TOKENS)
    for out, fmt in (("m.pt", "pt"), ("m.bin", "llama2c"), ("hf", "hf")):
        export.main([str(tmp_path / out), f"--checkpoint={path}", f"--format={fmt}"])
        printed = capsys.readouterr().out
        assert f"merging the LoRA adapters (rank 4, alpha 8) of {path} into its base {base}" in printed
        exported, ckpt = from_checkpoint(tmp_path / out)
        assert "lora" not in ckpt and (logits_of(exported, TOKENS) - ref).abs().max() < 1e-4, fmt
    assert set(torch.load(tmp_path / "m.pt", weights_only=False)) == {"model", "model_args", "tokenizer"}


def test_peft_export_of_a_whole_model_is_a_one_line_error(tmp_path, capsys):
    path = plain_checkpoint(tmp_path / "base.pt", tiny_model())
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "adapter"), f"--checkpoint={path}", "--format=peft"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: --format=peft writes a LoRA fine-tune's adapters, and {path} is a whole")
    assert err.count("\n") == 1 and not list(tmp_path.glob("adapter/*"))  # nothing written


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_peft_loads_our_adapters_onto_our_hf_export(tmp_path, capsys, n_kv_heads):
    # the user's side: transformers loads the base's HF export, peft puts the adapters on it, and the
    # logits are ours, unmerged (wq and wk's B rows permuted like the weights' for HF's RoPE)
    import peft
    import transformers

    base = plain_checkpoint(tmp_path / "base.pt", tiny_model(n_kv_heads=n_kv_heads))
    model = with_adapters(tiny_model(n_kv_heads=n_kv_heads))
    path = lora_checkpoint(tmp_path / "lora.pt", model, base)
    export.main([str(tmp_path / "hf"), f"--checkpoint={base}", "--format=hf"])
    export.main([str(tmp_path / "adapter"), f"--checkpoint={path}", "--format=peft"])
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    hf_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert config["target_modules"] == sorted(hf_names)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                       attn_implementation="eager")
    with_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    loaded = {k for k in with_peft.state_dict() if "lora_" in k}
    assert len(loaded) == len(lora.adapter_state(model))  # every adapter found its module
    ours = logits_of(model, TOKENS)
    with torch.no_grad():
        assert (with_peft(TOKENS).logits - ours).abs().max() < 1e-4
        # and the test can tell: the adapters alone make the difference
        with with_peft.disable_adapter():
            assert (with_peft(TOKENS).logits - ours).abs().max() > 0.1


# ---------------------------------------------------------------- train.py


def train_in_process(args, data_dir, out_dir) -> str:
    # train.train in this process (one thread, as run_train's subprocesses); returns what it printed
    threads, printed = torch.get_num_threads(), StringIO()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(printed):
            argv = TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}"] + args
            train.train(train.parse_settings(argv))
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # the fixture corpus, and a text unlike it (other characters, places and objects) in the same tokens
    root = tmp_path_factory.mktemp("lora_data")
    write_endoftext(root / "stories.txt", make_stories(1500, seed=3))
    tinystories.train_vocab(root, 512, input=root / "stories.txt", name="fixture")
    tinystories.prepare(root, root / "stories.txt", "fixture", vocab_size=512)
    write_endoftext(root / "other.txt", make_stories(1500, seed=4, words=OTHER_WORDS))
    tinystories.prepare(root, root / "other.txt", "other", tokenizer=root / "fixture" / "tok512.model")
    return root


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    train_in_process(["--max_iters=100", "--eval_interval=100", "--learning_rate=1e-2"], data_dir, out)
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def finetunes(data_dir, base, tmp_path_factory):
    # the same 40 steps on the other text, every weight and LoRA; the LoRA run's model kept to inspect
    root = tmp_path_factory.mktemp("finetunes")
    printed = train_in_process(FINETUNE + [f"--init_from={base}", "--eval_only=True"], data_dir,
                               root / "eval")
    start = float(re.search(r"eval iter 0: train loss [\d.]+, val loss ([\d.]+)", printed)[1])
    train_in_process(FINETUNE + [f"--init_from={base}"], data_dir, root / "full")
    models = []
    attach = lora.attach_for_training
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lora, "attach_for_training", lambda model, *a: (models.append(model), attach(model, *a))[1])
        printed = train_in_process(FINETUNE + LORA + [f"--init_from={base}"], data_dir, root / "lora")
    return start, root / "full", root / "lora", printed, models[0]


def test_lora_finetune_learns_a_new_text(finetunes):
    assert set(WORDS["names"]).isdisjoint(OTHER_WORDS["names"])
    start, full, lora_dir, printed, _ = finetunes
    assert "LoRA: 4,864 parameters train, 11.83% of the model's 41,120 (frozen); rank 4, alpha 16" in printed
    full_logs, full_evals = read_metrics(full)
    lora_logs, lora_evals = read_metrics(lora_dir)
    assert lora_logs[0]["loss"] == full_logs[0]["loss"]  # step 0: both are the base model, on the same batch
    full_gain, lora_gain = start - full_evals[-1]["val_loss"], start - lora_evals[-1]["val_loss"]
    # measured: the base 6.42 on this text, every weight trained 2.76, LoRA 3.47 (80% of the way)
    assert full_gain > 2.5 and lora_gain > 0.65 * full_gain, (start, full_gain, lora_gain)


def test_lora_checkpoint_holds_adapters_and_optimizer_only(finetunes, base):
    _, full, lora_dir, _, model = finetunes
    ckpt = torch.load(lora_dir / "ckpt.pt", weights_only=False)
    assert "model" not in ckpt
    assert set(ckpt["lora"]) == {"rank", "alpha", "dropout", "targets", "base", "adapters"}
    # the base is a run's ckpt.pt, which that run rewrites: the LoRA run keeps the same bytes as base.pt
    kept = lora_dir / "base.pt"
    assert ckpt["lora"]["base"] == {"path": str(kept), "sha256": lora.base_sha256(base)}
    assert os.path.samefile(kept, base)  # a hard link, not a copy
    adapters = ckpt["lora"]["adapters"]
    # the optimizer holds the adapters alone: 28 tensors, whose shapes its AdamW state has
    assert sum(len(group["params"]) for group in ckpt["optimizer"]["param_groups"]) == len(adapters) == 28
    states = list(ckpt["optimizer"]["state"].values())
    assert len(states) == len(adapters)
    assert sorted(s["exp_avg"].shape for s in states) == sorted(t.shape for t in adapters.values())
    assert (lora_dir / "ckpt.pt").stat().st_size < (full / "ckpt.pt").stat().st_size / 3
    # the model trained in the run: its base weights bit for bit the base's, though weight decay was on
    frozen = {k: v for k, v in model.state_dict().items() if not k.endswith(lora.ADAPTER_KEYS)}
    base_state = torch.load(base, weights_only=False)["model"]
    assert frozen.keys() == base_state.keys() and all(torch.equal(frozen[k], base_state[k]) for k in frozen)
    assert all(torch.equal(adapters[k], v) for k, v in lora.adapter_state(model).items())


def test_sample_reads_a_lora_checkpoint(finetunes, capsys):
    # sample.py gets the merged model: the stories equal those of the --format=pt export
    lora_dir = finetunes[2]
    export.main([str(lora_dir / "merged.pt"), f"--checkpoint={lora_dir / 'ckpt.pt'}", "--format=pt"])
    stories = []
    for path in (lora_dir / "ckpt.pt", lora_dir / "merged.pt"):
        capsys.readouterr()
        sample.main([f"--checkpoint={path}", "--max_new_tokens=20", "--prompt=Once upon a time"])
        stories.append(capsys.readouterr().out)
    assert stories[0] == stories[1] and len(stories[0]) > 30


def test_lora_resumes_exactly_and_refuses_a_changed_base(data_dir, base, tmp_path):
    # float16 (its GradScaler state) and adapter dropout (the RNG streams): a run stopped halfway and
    # resumed logs what the straight run logs
    own_base = tmp_path / "base.pt"
    shutil.copyfile(base, own_base)
    args = FINETUNE + LORA + [f"--init_from={own_base}", "--dtype=float16", "--lora_dropout=0.1",
                              "--eval_interval=3", "--lr_decay_iters=6"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_in_process(args + ["--max_iters=6"], data_dir, full)
    train_in_process(args + ["--max_iters=3"], data_dir, part)
    printed = train_in_process(args + ["--max_iters=6", "--init_from=resume"], data_dir, part)
    assert "resuming from iteration 3" in printed
    full_logs, _ = read_metrics(full)
    part_logs, _ = read_metrics(part)
    logged = lambda logs: [(r["loss"], r["grad_norm"]) for r in logs]
    assert logged(full_logs) == logged(part_logs)
    a, b = (torch.load(p / "ckpt.pt", weights_only=False)["lora"]["adapters"] for p in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)

    message = main_error(TINY + ["--init_from=resume", "--lora_rank=8", f"--data_dir={data_dir}",
                                 f"--out_dir={full}"])
    assert "was trained with lora_rank=4 (command line: 8)" in message
    other = Transformer(ModelArgs.from_dict(torch.load(base, weights_only=False)["model_args"]))
    plain_checkpoint(own_base, other)  # a model of the same shape in the base's place
    message = main_error(TINY + ["--init_from=resume", "--max_iters=8", f"--data_dir={data_dir}",
                                 f"--out_dir={part}"])
    assert f"{part / 'ckpt.pt'} was trained on the base model {own_base}, which has changed since" in message


def test_a_lora_run_survives_its_base_run_continuing(data_dir, tmp_path, capsys):
    # fine-tune a run's ckpt.pt with LoRA, then continue that run, which replaces its ckpt.pt: the adapters'
    # checkpoint still samples and exports, on the base it was trained on
    base_run, lora_run = tmp_path / "base", tmp_path / "lora"
    train_in_process(["--max_iters=2", "--eval_interval=2"], data_dir, base_run)
    base = base_run / "ckpt.pt"
    printed = train_in_process(FINETUNE + LORA + ["--max_iters=2", f"--init_from={base}"], data_dir, lora_run)
    assert f"this run keeps its base as {lora_run / 'base.pt'}" in printed
    tokens = TOKENS[:, :32]
    tuned = logits_of(from_checkpoint(lora_run / "ckpt.pt")[0], tokens)
    sha = lora.base_sha256(base)
    train_in_process(["--max_iters=4", "--eval_interval=2", "--init_from=resume"], data_dir, base_run)
    assert lora.base_sha256(base) != sha  # the base run has moved on

    assert torch.equal(logits_of(from_checkpoint(lora_run / "ckpt.pt")[0], tokens), tuned)
    capsys.readouterr()
    sample.main([f"--checkpoint={lora_run / 'ckpt.pt'}", "--max_new_tokens=10", "--prompt=Once upon a time"])
    assert capsys.readouterr().out.startswith("Once upon a time")
    export.main([str(tmp_path / "merged.bin"), f"--checkpoint={lora_run / 'ckpt.pt'}"])
    assert torch.allclose(logits_of(from_checkpoint(tmp_path / "merged.bin")[0], tokens), tuned, atol=1e-5)
    # a base that nothing rewrites (here a copy outside any run folder) is named where it is
    published = tmp_path / "published.pt"
    shutil.copyfile(lora_run / "base.pt", published)
    again = tmp_path / "again"
    train_in_process(FINETUNE + LORA + ["--max_iters=1", f"--init_from={published}"], data_dir, again)
    record = torch.load(again / "ckpt.pt", weights_only=False)["lora"]["base"]
    assert record["path"] == str(published) and not (again / "base.pt").exists()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(data_dir, base, tmp_path):
    # gradient_accumulation_steps=2 is global: 2 ranks x 1 micro-step see the batches 1 process x 2 sees;
    # DDP reduces the adapters' gradients only (the frozen weights have none)
    args = FINETUNE + LORA + [f"--init_from={base}", "--max_iters=4", "--eval_interval=4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train_in_process(args, data_dir, single)
    result = ok(run_train(args, data_dir, ddp, torchrun=2))
    assert "2 process(es) x 1 accumulation step(s)" in result.stdout
    assert "LoRA: 4,864 parameters train" in result.stdout
    assert_same_losses(ddp, single, evals=False)
    a, b = (torch.load(p / "ckpt.pt", weights_only=False)["lora"]["adapters"] for p in (single, ddp))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_compiled_lora_run_saves_plain_adapter_names(data_dir, base, tmp_path, monkeypatch):
    # torch.compile with the eager backend: the same wrapping (and _orig_mod. names) without a C++ compiler
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    train_in_process(FINETUNE + LORA + [f"--init_from={base}", "--compile=True", "--max_iters=2",
                                        "--eval_interval=2"], data_dir, tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert sorted(ckpt["lora"]["adapters"]) == sorted(lora.adapter_state(from_checkpoint(tmp_path / "ckpt.pt",
                                                                                         merge=False)[0]))
