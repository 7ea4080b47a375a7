# The shape of llama2.c's stories42M: 41,689,600 parameters, dim 512, 8 layers, 8 heads, the Llama 2
# 32,000-token vocabulary, 1024-token context. Reference: val loss 0.847 (llama2.c's README).
# llama2.c published no training recipe for this model, so the schedule is our choice: the 110M
# model's 131,072 tokens per iteration (32 x 1024 x 4), 100k iterations and dropout 0.1, and our
# recipe (Muon for the blocks' matrices, AdamW for the embedding and the norms, warmup-stable-decay;
# bench/README.md). Not yet verified to reach 0.847. As llama2.c's other recipes:
#   --optimizer=adamw --lr_schedule=cosine --learning_rate=5e-4 --weight_decay=0.1
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
optimizer = "muon"
muon_lr = 0.01  # the 15M shapes' choice, not tuned at this shape (bench/README.md)
learning_rate = 3.5e-3  # AdamW's: the embedding and the norms
min_lr = 0.0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "wsd"
decay_frac = 0.2
warmup_iters = 1000
max_iters = 100_000
eval_interval = 2000
eval_iters = 100
compile = True  # a GPU recipe; add --compile=False on a CPU or a Mac
