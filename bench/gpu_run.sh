#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in two phases that each fit one short call on a lent machine
# (torch preinstalled, no package registry, no ../shared): fill .gpu/ first with bench/gpu_prepare.sh.
#   bash bench/gpu_run.sh 1   # < 5 min: the SDPA kernel of every call site, tests/test_gpu.py, a 15M run
#                             #   (bf16 + compile, MFU), its fp16 resume, the 260K dropout path, torchrun + compile
#   bash bench/gpu_run.sh 2   # < 5 min: MFU of 15M / 42M / 110M, sampling tokens/s, 2-process NCCL (2 GPUs)
# Full logs go to $OUT (or gpu_logs/); each phase ends with a summary to paste into bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: bash bench/gpu_run.sh 1|2}
logs=${OUT:-gpu_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
summary="$logs/summary_phase$phase.txt"
: > "$summary"
step() { echo; echo "=== $*"; }
note() { echo "$*" | tee -a "$summary"; }

# the dependencies the image lacks, from the carried wheels, into a temporary target (nothing is installed)
missing=$(python3 -c "import importlib.util as u; print(' '.join(m for m in ('numpy', 'sentencepiece', 'tqdm', \
'requests', 'safetensors', 'pytest') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --find-links .gpu/wheels --target "$site" $missing || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
note "# $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1), $(nvidia-smi -L | wc -l) GPU(s)"
note "# $(python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)")"
data=$(mktemp -d)

if [ "$phase" = 1 ]; then
  step "the SDPA kernel of every call site"
  python3 bench/gpu_check.py 2>&1 | tee -a "$summary"

  step "GPU tests"
  timeout 150 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -x 2>&1 | tee "$logs/gpu_tests.log" | tail -15
  note "tests/test_gpu.py: $(tail -1 "$logs/gpu_tests.log")"

  step "data: the TinyStories sample, Llama 2 vocabulary and a 512-token one"
  python3 tinystories.py download --data_dir "$data" --url .gpu/TinyStories_all_data_sample.tar.gz \
    --tokenizer_url .gpu/llama2.model 2>&1 | tail -1
  python3 tinystories.py pretokenize --data_dir "$data" --vocab_size 0 2>&1 | tail -1
  python3 tinystories.py train_vocab --data_dir "$data" --vocab_size 512 --num_stories 4000 2>&1 | tail -1
  python3 tinystories.py pretokenize --data_dir "$data" --vocab_size 512 2>&1 | tail -1

  step "15M, bf16 + compile, 100 iterations"
  run15=(config/train_15m.py --data_dir="$data" --out_dir="$logs/15m" --batch_size=64 --gradient_accumulation_steps=2
         --warmup_iters=10 --eval_interval=50 --eval_iters=10 --log_interval=10 --learning_rate=1e-3 --overwrite=True)
  timeout 240 python3 train.py "${run15[@]}" --max_iters=100 2>&1 | tee "$logs/train_15m.log" | grep -v "^  " | tail -14
  note "15M bf16+compile: $(grep '^iter 100 ' "$logs/train_15m.log")"

  step "resumed to 120 in float16 (GradScaler), no compile, then a story"
  timeout 120 python3 train.py "${run15[@]}" --max_iters=120 --init_from=resume --dtype=float16 --compile=False \
    2>&1 | tee "$logs/resume_fp16.log" | grep -v "^  " | tail -5
  note "15M fp16 resume: $(grep '^iter 120 ' "$logs/resume_fp16.log")"
  python3 sample.py --checkpoint="$logs/15m/ckpt.pt" --prompt="Once upon a time" --max_new_tokens=60 --device=cuda \
    2>&1 | tee "$logs/sample.log" | tail -3
  note "sample.py: $(tail -1 "$logs/sample.log")"

  step "260K with dropout 0.05, bf16 + compile, 40 iterations"
  timeout 180 python3 train.py config/train_260k.py --data_dir="$data" --out_dir="$logs/260k" --max_iters=40 \
    --warmup_iters=5 --eval_interval=40 --eval_iters=5 --log_interval=10 --overwrite=True 2>&1 \
    | tee "$logs/train_260k.log" | grep -v "^  " | tail -6
  note "260K dropout: $(grep '^iter 40 ' "$logs/train_260k.log")"

  step "torchrun (DDP + compile), 1 process per GPU, 20 iterations"
  gpus=$(nvidia-smi -L | wc -l)
  timeout 180 torchrun --standalone --nproc_per_node="$gpus" train.py config/train_15m.py --data_dir="$data" \
    --out_dir="$logs/ddp" --batch_size=32 --gradient_accumulation_steps="$((2 * gpus))" --max_iters=20 \
    --warmup_iters=5 --eval_interval=20 --eval_iters=5 --overwrite=True 2>&1 | tee "$logs/ddp.log" \
    | grep -v "^  \|^W" | tail -5
  note "torchrun x$gpus + compile: $(grep '^iter 20 ' "$logs/ddp.log")"
else
  step "MFU of the reference configs (bf16 + compile)"
  timeout 240 python3 bench/bench_train.py --device cuda --compile --dtype bfloat16 --configs 15m,42m,110m \
    --iters 5 --warmup 3 2>&1 | tee "$logs/bench_train.log" | grep "^|\|^#" | tee -a "$summary"

  step "sampling, 15M shape"
  timeout 120 python3 bench/bench_sample.py --device cuda 2>&1 | tee "$logs/bench_sample.log" | tail -8
  tail -4 "$logs/bench_sample.log" >> "$summary"

  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    step "2 processes, NCCL, 15M, 20 iterations"
    python3 tinystories.py download --data_dir "$data" --url .gpu/TinyStories_all_data_sample.tar.gz \
      --tokenizer_url .gpu/llama2.model 2>&1 | tail -1
    python3 tinystories.py pretokenize --data_dir "$data" --vocab_size 0 2>&1 | tail -1
    timeout 180 torchrun --standalone --nproc_per_node=2 train.py config/train_15m.py --data_dir="$data" \
      --out_dir="$logs/nccl" --batch_size=64 --gradient_accumulation_steps=4 --max_iters=20 --warmup_iters=5 \
      --eval_interval=20 --eval_iters=5 --overwrite=True 2>&1 | tee "$logs/nccl.log" | grep -v "^  \|^W" | tail -5
    note "NCCL x2: $(grep '^iter 20 ' "$logs/nccl.log")"
  fi
fi
echo; echo "=== summary (also in $summary)"; cat "$summary"
