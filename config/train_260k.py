# The shape of llama2.c's stories260K (doc/stories260K.md): 260,032 parameters, dim 64, 5 layers,
# 8 query heads sharing 4 key/value heads, a custom 512-token vocabulary, 512-token context, trained
# with our recipe: Muon for the blocks' matrices, AdamW for the embedding and the norms, warmup-stable-decay.
# On held-out stories, at these shapes and 1M tokens, it beat llama2.c's recipe (bench/README.md).
# llama2.c's recipe, which its reference val loss 1.297 after 100k iterations of 128 x 512 tokens (about
# 10 minutes on an A100) comes from:
#   --optimizer=adamw --lr_schedule=cosine --learning_rate=1e-3 --weight_decay=0.01
# Data first: python tinystories.py download && python tinystories.py train_vocab --vocab_size=512
#             && python tinystories.py pretokenize --vocab_size=512
out_dir = "out/260k"
vocab_source = "custom"
vocab_size = 512
dim = 64
n_layers = 5
n_heads = 8
n_kv_heads = 4
multiple_of = 4
max_seq_len = 512
dropout = 0.05
batch_size = 128
gradient_accumulation_steps = 1  # 65,536 tokens per iteration
optimizer = "muon"
muon_lr = 0.01  # bench_recipe.py's at this shape (with 4 x 256-token batches there)
learning_rate = 1e-2  # AdamW's: the embedding and the norms
min_lr = 0.0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
lr_schedule = "wsd"
decay_frac = 0.2
warmup_iters = 1000
max_iters = 100_000
eval_interval = 2000
eval_iters = 100
compile = True  # a GPU recipe; add --compile=False on a CPU or a Mac
