#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the GPU tests, a short real 15M run on the TinyStories
# sample (bf16 + compile), and the GPU benchmarks. Logs go to $OUT (or ./gpu_logs).
#   bash bench/gpu_run.sh SAMPLE_TAR_GZ LLAMA2_TOKENIZER_MODEL [checks|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
tar_gz=$1 tokenizer=$2 phase=${3:-all}
logs=${OUT:-gpu_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
step() { echo; echo "=== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

if [ "$phase" != bench ]; then
step "GPU tests"
python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$logs/gpu_tests.log" | tail -15

step "data: the TinyStories sample with the Llama 2 vocabulary"
data=$(mktemp -d)
python3 tinystories.py download --data_dir "$data" --url "$tar_gz" --tokenizer_url "$tokenizer" 2>&1 | tail -2
python3 tinystories.py pretokenize --data_dir "$data" --vocab_size 0 2>&1 | tail -2

step "train 15M, bf16 + compile, 300 iterations on the sample"
python3 train.py config/train_15m.py --data_dir="$data" --out_dir=out/gpu15m --batch_size=64 \
  --gradient_accumulation_steps=2 --max_iters=300 --warmup_iters=30 --eval_interval=150 --eval_iters=20 \
  --log_interval=25 --learning_rate=1e-3 2>&1 | tee "$logs/train_15m.log" | grep -v "^W" | tail -22
step "resume to 350 (fp16 + GradScaler, no compile) and sample"
python3 train.py config/train_15m.py --data_dir="$data" --out_dir=out/gpu15m --batch_size=64 \
  --gradient_accumulation_steps=2 --max_iters=350 --warmup_iters=30 --eval_interval=150 --eval_iters=20 \
  --log_interval=25 --learning_rate=1e-3 --init_from=resume --dtype=float16 --compile=False 2>&1 | tail -6
python3 sample.py --checkpoint=out/gpu15m/ckpt.pt --prompt="Once upon a time" --max_new_tokens=120 --device=cuda 2>&1 | tail -5

step "torchrun, 1 process (NCCL path)"
torchrun --standalone --nproc_per_node=1 train.py config/train_15m.py --data_dir="$data" --out_dir=out/gpuddp \
  --batch_size=32 --gradient_accumulation_steps=2 --max_iters=20 --warmup_iters=5 --eval_interval=20 \
  --eval_iters=5 --log_interval=10 --compile=False 2>&1 | grep -v "^W" | tail -5

fi
if [ "$phase" != checks ]; then
step "bench: model step"
python3 bench/bench_model.py --device cuda --dtype bfloat16 --compile 2>&1 | tee "$logs/bench_model.log" | tail -25
step "bench: train iteration, every reference config"
python3 bench/bench_train.py --device cuda --compile --dtype bfloat16 2>&1 | tee "$logs/bench_train.log" | grep -v "^W" | tail -20
step "bench: sampling"
python3 bench/bench_sample.py --device cuda 2>&1 | tee "$logs/bench_sample.log" | tail -12
fi
