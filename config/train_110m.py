# The shape of llama2.c's stories110M: 109,529,856 parameters, dim 768, 12 layers, 12 heads, the
# Llama 2 32,000-token vocabulary, 1024-token context, trained with our recipe: Muon for the blocks'
# matrices, AdamW for the embedding and the norms, warmup-stable-decay (bench/README.md).
# llama2.c's recipe, which its reference val loss 0.760 after 200k iterations of 16 x 1024 x 8 tokens on
# 4 GPUs comes from:
#   --optimizer=adamw --lr_schedule=cosine --learning_rate=4e-4 --weight_decay=0.1
# gradient_accumulation_steps is the global count, so this is the same run on 1, 2, 4 or 8 GPUs:
#   torchrun --standalone --nproc_per_node=4 train.py config/train_110m.py
# Data first: python tinystories.py download && python tinystories.py pretokenize
out_dir = "out/110m"
vocab_source = "llama2"
vocab_size = 32000
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 12
multiple_of = 32
max_seq_len = 1024
dropout = 0.1
batch_size = 16
gradient_accumulation_steps = 8  # 131,072 tokens per iteration (2 micro-steps per GPU on 4 GPUs)
optimizer = "muon"
muon_lr = 0.01  # the 15M shapes' choice, not tuned at this shape (bench/README.md)
learning_rate = 3e-3  # AdamW's: the embedding and the norms
min_lr = 0.0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "wsd"
decay_frac = 0.2
warmup_iters = 1000
max_iters = 200_000
eval_interval = 2000
eval_iters = 100
compile = True  # a GPU recipe; add --compile=False on a CPU or a Mac
