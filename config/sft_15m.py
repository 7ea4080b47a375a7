# Instruction-tunes the 15M story model (config/train_15m.py) to write the story asked for: TinyStories'
# own instructions (the words, features and summary its JSON records carry beside each story), in the
# story template (llamatiny/instruct.py): "Words: ...\nFeatures: ...\nSummary: ...\nStory: STORY". The loss
# covers the stories only. The model's shape comes from --init_from.
# Data first (after `python tinystories.py download`):
#   python tinystories.py prepare --input data/TinyStories_all_data --name instruct
# Then: python train.py config/sft_15m.py --init_from=out/15m/ckpt.pt
#       python sample.py --checkpoint=out/sft15m/ckpt.pt --instruction="Words: dog, ball, happy"
out_dir = "out/sft15m"
instruction_tuning = True  # refuses plain shards: the instructions are what it learns
dataset = "instruct"
vocab_source = "llama2"
vocab_size = 32000
max_seq_len = 256
dropout = 0.0
batch_size = 64
gradient_accumulation_steps = 2  # 32,768 tokens per iteration
learning_rate = 1e-4  # a fifth of pretraining's: adapt the model, do not retrain it
min_lr = 1e-5
weight_decay = 0.1
beta2 = 0.95
warmup_iters = 100
max_iters = 5000  # ~160 M tokens, about a third of an epoch of TinyStories' instruction records
eval_interval = 500
eval_iters = 50
compile = True  # a GPU recipe; add --compile=False on a CPU or a Mac
