# The shape of llama2.c's stories15M ("OG" in its README): 15,191,712 parameters, dim 288, 6 layers,
# 6 heads, the Llama 2 32,000-token vocabulary, 256-token context, trained with our recipe: Muon for the
# blocks' matrices, AdamW for the embedding and the norms, warmup-stable-decay. On held-out stories at
# these shapes, after 0.25M tokens, it beat llama2.c's recipe (bench/README.md); full runs not measured.
# llama2.c's recipe, which its reference val loss 1.072 after 100k iterations of 128 x 256 x 4 tokens
# comes from:
#   --optimizer=adamw --lr_schedule=cosine --learning_rate=5e-4 --weight_decay=0.1
# Data first: python tinystories.py download && python tinystories.py pretokenize
out_dir = "out/15m"
vocab_source = "llama2"
vocab_size = 32000
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
multiple_of = 32
max_seq_len = 256
dropout = 0.0
batch_size = 128  # on a smaller GPU: --batch_size=64 --gradient_accumulation_steps=8 (same tokens per step)
gradient_accumulation_steps = 4  # 131,072 tokens per iteration
optimizer = "muon"
muon_lr = 0.01  # chosen at this shape on 0.25M tokens in 4 x 256 batches (bench/README.md)
learning_rate = 5e-3  # AdamW's: the embedding and the norms
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
