# Instruction-tunes the CPU debug model (config/train_cpu_debug.py) on Words: instructions made from the
# fixture corpus' own stories: a laptop-sized check of the whole instruction path (masked loss, template,
# sample.py --instruction, eval.py's Words: score), one to two minutes on 2 cores. A model this small learns
# to put the requested words into its story only after ~2 M tokens, hence the high learning rate.
# Data first (after the debug run, with its vocabulary):
#   python tinystories.py prepare --input data/fixture_stories.txt --name fixture_words \
#       --tokenizer data/fixture/tok512.model --words_from_story 3
# Then: python train.py config/sft_cpu_debug.py --init_from=out/debug/ckpt.pt
#       python sample.py --checkpoint=out/sft_debug/ckpt.pt --instruction="Words: frog, kite, lake"
out_dir = "out/sft_debug"
instruction_tuning = True  # refuses plain shards: the instructions are what it learns
dataset = "fixture_words"
vocab_source = "custom"
vocab_size = 512
max_seq_len = 128
dropout = 0.0
batch_size = 16
gradient_accumulation_steps = 1  # 2,048 tokens per iteration
learning_rate = 3e-3
weight_decay = 0.1
beta2 = 0.99
warmup_iters = 20
max_iters = 1000
eval_interval = 500
eval_iters = 10
log_interval = 50
device = "cpu"
compile = False
