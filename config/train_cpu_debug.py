# A tiny model that trains on a laptop CPU in about a minute: checks the whole pipeline end to end
# (data, training, eval, checkpoint, resume, sampling) without a GPU. No reference loss: the
# synthetic fixture corpus is far simpler than TinyStories: val loss about 0.5 after 600 iterations
# (55 s on 2 cores).
# Data first (the synthetic corpus the tests use, with its own 512-token vocabulary):
#   python -m llamatiny.corpus data/fixture_stories.txt --num_stories 5000
#   python tinystories.py train_vocab --input data/fixture_stories.txt --name fixture --vocab_size 512
#   python tinystories.py prepare --input data/fixture_stories.txt --name fixture --vocab_size 512
# For TinyStories itself: --dataset=tinystories --vocab_source=custom (after pretokenize --vocab_size 512).
out_dir = "out/debug"
dataset = "fixture"
vocab_source = "custom"
vocab_size = 512
dim = 64
n_layers = 4
n_heads = 4
n_kv_heads = 2
multiple_of = 16
max_seq_len = 128
dropout = 0.0
batch_size = 16
gradient_accumulation_steps = 1  # 2,048 tokens per iteration
learning_rate = 2e-3
weight_decay = 0.1
beta2 = 0.99
warmup_iters = 30
max_iters = 600
eval_interval = 200
eval_iters = 10
log_interval = 20
device = "cpu"  # small enough that a GPU would not help
compile = False
