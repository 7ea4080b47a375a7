# The shape of llama2.c's stories42M: 41,689,600 parameters, dim 512, 8 layers, 8 heads, the Llama 2
# 32,000-token vocabulary, 1024-token context. Reference: val loss 0.847 (llama2.c's README).
# llama2.c published no training recipe for this model, so the schedule is our choice: the 110M
# model's 131,072 tokens per iteration (32 x 1024 x 4), the 15M model's learning rate and warmup,
# 100k iterations, and dropout 0.1 as for the 110M model. Not yet verified to reach 0.847.
# Data first: python tinystories.py download && python tinystories.py pretokenize
out_dir = "out/42m"
vocab_source = "llama2"
vocab_size = 32000
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 8
multiple_of = 32
max_seq_len = 1024
dropout = 0.1
batch_size = 32
gradient_accumulation_steps = 4  # 131,072 tokens per iteration
learning_rate = 5e-4
min_lr = 0.0  # as llama2.c's other runs
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 1000
max_iters = 100_000
eval_interval = 2000
eval_iters = 100
compile = True  # a GPU recipe; add --compile=False on a CPU or a Mac
