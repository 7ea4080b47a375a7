"""The two recipes' optimizers and schedules: optimizer='muon' (Muon for the blocks' matrices, AdamW for the
rest) and lr_schedule='wsd', beside llama2.c's AdamW and cosine: the parameter split, the schedule, an exact
resume, DDP, torch.compile and the settings they refuse."""
import pytest
import torch
from test_model import tiny_model
from test_train import TINY, assert_same_losses, main_error, ok, read_metrics, run_train

import train
from model import Optimizers

MUON = ["--optimizer=muon", "--muon_lr=0.02", "--lr_schedule=wsd", "--decay_frac=0.5", "--warmup_iters=2"]
HIDDEN = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def train_here(args, data_dir, out_dir) -> dict:
    return train.train(train.parse_settings(TINY + args + [f"--data_dir={data_dir}", f"--out_dir={out_dir}"]))


def test_wsd_holds_the_peak_whatever_the_length_then_decays_in_a_line_to_min_lr():
    lr, min_lr, warmup = 1e-3, 1e-5, 10

    def wsd(it, decay_iters, frac=0.2):
        return train.get_lr(it, lr, warmup, decay_iters, min_lr, "wsd", frac)

    assert wsd(0, 100) == pytest.approx(lr / warmup)  # the same warmup as cosine
    # the peak until the last 20%: a run of 100 steps and one of 1,000 agree until the shorter one decays,
    # so a run can be continued past its planned end from any checkpoint before 80
    assert [wsd(i, 100) for i in range(warmup, 80)] == [lr] * 70
    assert [wsd(i, 100) for i in range(100)][:80] == [wsd(i, 1000) for i in range(100)][:80]
    decay = [wsd(i, 100) for i in range(80, 101)]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps[:-1] == pytest.approx([(lr - min_lr) / 20] * 19)  # a straight line
    assert decay[-2] > min_lr and decay[-1] == min_lr  # the run's last step still learns
    # a decay longer than the run after warmup starts where warmup ends
    assert wsd(warmup, 20, frac=0.9) == pytest.approx(lr) and wsd(15, 20, frac=0.9) < lr
    assert train.get_lr(50, lr, warmup, 100, min_lr, "wsd", 0.0) == lr  # no decay at all


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    m = tiny_model(std=None, n_kv_heads=2)
    opt = m.configure_optimizers(0.1, 4e-3, (0.9, 0.95), "cpu", muon={"lr": 0.02, "momentum": 0.9,
                                                                     "weight_decay": 0.01})
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in m.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n in names.values() if n.split(".")[-2] in HIDDEN}
    assert in_adamw == {"tok_embeddings.weight", "norm.weight"} | {n for n in names.values() if "_norm" in n}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()  # each once
    (matrices,), (embedding, gains) = muon.param_groups, adamw.param_groups
    assert (matrices["lr"], matrices["momentum"], matrices["weight_decay"]) == (0.02, 0.9, 0.01)
    assert matrices["lr_scale"] == pytest.approx(0.02 / 4e-3)  # the schedule scales both alike
    assert embedding["weight_decay"] == 0.1 and gains["weight_decay"] == 0.0
    assert embedding["lr_scale"] == gains["lr_scale"] == 1.0


def test_muon_and_wsd_resume_exactly(data_dir, tmp_path):
    # dropout, and float16 for the gradient scaler's unscale and step over both optimizers
    args = MUON + ["--dropout=0.1", "--dtype=float16", "--eval_interval=4", "--lr_decay_iters=8"]
    train_here(args + ["--max_iters=8"], data_dir, tmp_path / "full")
    train_here(args + ["--max_iters=4"], data_dir, tmp_path / "part")
    train_here(["--max_iters=8", "--init_from=resume"], data_dir, tmp_path / "part")  # the rest: ckpt.pt
    assert_same_losses(tmp_path / "full", tmp_path / "part")
    logs, _ = read_metrics(tmp_path / "full")
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.3
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=False) for run in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    muon_state = a["optimizer"]["optimizers"][0]["state"]
    assert len(muon_state) == 2 * 7 and all("momentum_buffer" in s for s in muon_state.values())


def test_settings_given_again_on_resume_apply_to_the_optimizer(data_dir, tmp_path):
    # load_state_dict alone would restore the checkpoint's learning rates and weight decay
    args = MUON + ["--decay_lr=False", "--eval_interval=2"]
    train_here(args + ["--max_iters=2"], data_dir, tmp_path)
    train_here(args + ["--max_iters=4", "--init_from=resume", "--muon_lr=0.01", "--weight_decay=0.05"],
               data_dir, tmp_path)
    muon, adamw = torch.load(tmp_path / "ckpt.pt", weights_only=False)["optimizer"]["optimizers"]
    assert muon["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert adamw["param_groups"][0]["weight_decay"] == 0.05


@pytest.mark.slow
def test_muon_under_ddp_matches_one_process(data_dir, tmp_path):
    # each rank runs Muon on the same all-reduced gradients: two ranks x two micro-steps step as one process
    args = MUON + ["--max_iters=5", "--eval_interval=5", "--gradient_accumulation_steps=4", "--batch_size=4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    ok(run_train(args, data_dir, single))
    result = ok(run_train(args, data_dir, ddp, torchrun=2))
    assert "2 process(es) x 2 accumulation step(s)" in result.stdout
    assert_same_losses(ddp, single, evals=False)


def test_muon_with_a_compiled_model_steps_the_plain_models_matrices(data_dir, tmp_path, monkeypatch):
    # the optimizer is built on the plain model: its names, not the compiled wrapper's (_orig_mod.layers...)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    train_here(MUON + ["--compile=True", "--max_iters=2", "--eval_interval=2"], data_dir, tmp_path)
    muon, adamw = torch.load(tmp_path / "ckpt.pt", weights_only=False)["optimizer"]["optimizers"]
    assert len(muon["state"]) == 2 * 7 and len(adamw["state"]) == 1 + 2 * 2 + 1


@pytest.mark.parametrize("args, message", [
    (["--optimizer=sgd"], "optimizer='sgd' (command line) is not one of 'adamw', 'muon'"),
    (["--lr_schedule=linear"], "lr_schedule='linear' (command line) is not one of 'cosine', 'wsd'"),
    (["--decay_frac=1.5"], "decay_frac=1.5 (command line) must be in [0, 1]"),
    (["--muon_lr=0"], "muon_lr=0.0 (command line) must be positive"),
    (["--muon_momentum=1"], "muon_momentum=1.0 (command line) must be in [0, 1)"),
    (["--muon_weight_decay=-0.1"], "muon_weight_decay=-0.1 (command line) must not be negative"),
])
def test_bad_optimizer_settings_are_one_line_errors(tmp_path, args, message):
    assert message in main_error(["config/train_cpu_debug.py", *args, f"--out_dir={tmp_path}"])


def test_lora_adapters_refuse_muon(data_dir, tmp_path):
    train_here(["--max_iters=1", "--eval_interval=1"], data_dir, tmp_path / "base")
    message = main_error(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'lora'}", "--lora_rank=4",
                                 f"--init_from={tmp_path / 'base' / 'ckpt.pt'}", "--optimizer=muon"])
    assert message == ("error: optimizer='muon' (command line) with lora_rank=4 (command line): "
                       "LoRA's adapters train with AdamW; pass --optimizer=adamw")


def test_a_resumed_run_keeps_its_optimizer(data_dir, tmp_path):
    train_here(["--max_iters=1", "--eval_interval=1"], data_dir, tmp_path)
    message = main_error(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--init_from=resume",
                                 "--max_iters=2", "--optimizer=muon"])
    assert message == (f"error: {tmp_path / 'ckpt.pt'} was trained with optimizer='adamw', whose state a "
                       "resumed run continues: pass --optimizer=adamw, or start a new run")


def test_a_checkpoint_from_before_the_settings_resumes_with_adamw_whatever_the_config(data_dir, tmp_path):
    train_here(["--max_iters=2", "--eval_interval=2"], data_dir, tmp_path)
    path = tmp_path / "ckpt.pt"
    checkpoint = torch.load(path, weights_only=False)
    for key in ("optimizer", "muon_lr", "muon_momentum", "muon_weight_decay", "lr_schedule", "decay_frac"):
        del checkpoint["config"][key]
    torch.save(checkpoint, path)
    config = tmp_path / "muon.py"
    config.write_text('optimizer = "muon"\nlr_schedule = "wsd"\n', encoding="utf-8")
    train.train(train.parse_settings([str(config), f"--out_dir={tmp_path}", "--init_from=resume",
                                      "--max_iters=3"]))
    resumed = torch.load(path, weights_only=False)
    assert (resumed["config"]["optimizer"], resumed["config"]["lr_schedule"]) == ("adamw", "cosine")
    assert resumed["iter_num"] == 3 and "optimizers" not in resumed["optimizer"]  # AdamW's own state
