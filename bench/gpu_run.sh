#!/usr/bin/env bash
# The first run on a CUDA machine: one call of about six minutes (the steps' time limits add up to 530 s).
#   1. preflight (bench/gpu_check.py): the GPU, torch, CUDA and cuDNN, the modules, the attention kernel
#      of each call site, and a torch.compile smoke test whose result decides --compile for every step after
#   2. the MFU table of 15M, 42M and 110M (bench/bench_train.py; a config that fails is a row saying why)
#   3. the TinyStories sample in the Llama 2 vocabulary        4. tests/test_gpu.py's GPU tests (in-process)
#   5. train.py: 15M in bf16, at the table's 15M shape, so that its compiled graph comes from the cache
#   6. the same run resumed in float16 (with a GradScaler), eager      7. sample.py on its checkpoint
#   8. train.py under torchrun (DDP, a process per GPU)    9. decoding speed in sample.py's dtype (bfloat16)
# Each step checks the modules it imports, then runs under its own time limit; one that fails is noted and
# the next runs. The summary for bench/README.md comes last, whatever failed (exit status 1 if a step
# failed). The whole log, summary.md and the runs' metrics.jsonl and config.json go to $OUT (default
# out/gpu_run); the data and the checkpoints stay in a temporary folder.
#   bash bench/gpu_prepare.sh ../shared    # first, where ../shared is: fills .gpu/, to carry along
#   bash bench/gpu_run.sh                  # on the GPU machine
#   GPU_RUN_DRY=1 bash bench/gpu_run.sh    # the same steps on the CPU at toy sizes (a test runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
carried=${GPU_RUN_CARRIED:-.gpu}
out=${OUT:-out/gpu_run}
mkdir -p "$out"
work=$(mktemp -d)  # the data and the runs' folders: checkpoints never go to $out
trap 'rm -rf "$work"' EXIT
log=$out/gpu_run.log
: > "$log"
: > "$work/results"
: > "$work/steps"
failed=0

if [ "${GPU_RUN_DRY:-0}" = 1 ]; then  # time limits x 3: a CPU starts Python and torch more slowly
  device=cpu nproc=1 new_tokens=8 slower=3 preflight=(--device cpu --skip_compile_test)
  toy=(--dim=32 --n_layers=1 --n_heads=2 --n_kv_heads=2 --max_seq_len=32)
  table=(--batch_size 2 --iters 1 --warmup 1 --vocab_size=512 "${toy[@]}")
  shape=(--batch_size=4 "${toy[@]}")
else
  device=cuda nproc=gpu new_tokens=250 slower=1 preflight=() table=(--iters 10 --warmup 3) shape=()
fi

# the carried wheels (bench/gpu_prepare.sh ../shared PACKAGE ...) on a temporary PYTHONPATH
if compgen -G "$carried/wheels/*.whl" > /dev/null; then
  if "$py" -m pip --version > /dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$carried"/wheels/*.whl
  else  # an image without pip: a wheel is a zip of what goes on the path
    for wheel in "$carried"/wheels/*.whl; do "$py" -m zipfile -e "$wheel" "$work/site"; done
  fi
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME SECONDS "MODULES" COMMAND...: COMMAND under its time limit, once the modules it imports are
# found; its output to the screen (without train.py's indented settings), the log and $work/step.log
step() {
  local name=$1 limit=$(($2 * slower)) modules=$3 start=$SECONDS missing status
  shift 3
  printf '\n=== %s (limit %s s)\n' "$name" "$limit" | tee -a "$log"
  : > "$work/step.log"
  missing=$("$py" -c 'import importlib.util as u, sys
print(*(m for m in sys.argv[1:] if u.find_spec(m) is None))' $modules)
  if [ -n "$missing" ]; then
    echo "- $name: skipped, no $missing here: bash bench/gpu_prepare.sh ../shared $missing" \
      | tee -a "$log" >> "$work/steps"
    failed=1
    return 1
  fi
  timeout -k 3 "$limit" "$@" 2>&1 | tee -a "$log" "$work/step.log" | grep -a --line-buffered -v '^  '
  status=${PIPESTATUS[0]}
  if [ "$status" = 0 ]; then
    echo "- $name: ok, $((SECONDS - start)) s" >> "$work/steps"
  elif [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "- $name: TIMED OUT after $limit s" >> "$work/steps"
  else
    echo "- $name: FAILED (exit $status): $(grep -av '^\s*$' "$work/step.log" | tail -1)" >> "$work/steps"
  fi
  [ "$status" = 0 ] || failed=1
  return "$status"
}

# keep LABEL PATTERN: the step's lines that match, into the summary
keep() { grep -aE "$2" "$work/step.log" | sed "s|^|$1|" >> "$work/results"; }

step "preflight" 60 "numpy tqdm" "$py" bench/gpu_check.py "${preflight[@]}"
keep "" '^(# |modules: |warning: |compile: )'
compile=False
grep -q '^compile: on' "$work/step.log" && compile=True
grep -q '^compile: ' "$work/step.log" || echo "compile: off (the preflight did not finish)" >> "$work/results"
compile_flag=()
[ "$compile" = True ] && compile_flag=(--compile)

step "MFU table" 200 "numpy tqdm" "$py" bench/bench_train.py --device "$device" --dtype bfloat16 \
  "${compile_flag[@]}" --configs 15m,42m,110m "${table[@]}"
keep "" '^(# bench_train|\|)'
for config in 15m 42m 110m; do
  grep -q "^| $config |" "$work/step.log" || echo "| $config | | not measured: the step ended first | | | | | |" \
    >> "$work/results"
done

data=$work/data
step "data: the TinyStories sample" 10 "numpy sentencepiece tqdm" "$py" tinystories.py download \
  --data_dir "$data" --url "$carried/TinyStories_all_data_sample.tar.gz" --tokenizer_url "$carried/llama2.model"
step "data: Llama 2 tokens" 20 "numpy sentencepiece tqdm" "$py" tinystories.py pretokenize --data_dir "$data" \
  --vocab_size 0
vocab=$(sed -n 's/^ *"vocab_size": \([0-9]*\),$/\1/p' "$data/TinyStories_all_data/meta.json" 2> /dev/null)

step "GPU tests" 45 "pytest numpy sentencepiece tqdm" "$py" -m pytest tests/test_gpu.py -m gpu -q \
  -p no:cacheprovider
keep "tests/test_gpu.py -m gpu: " '^[0-9]+ (passed|failed|skipped|error)'

# the 15M recipe's micro-batch (128 x 256) and model on the sample; one eval and checkpoint, at the end
train15=(train.py config/train_15m.py --device="$device" --data_dir="$data" --vocab_size="${vocab:-32000}"
         --warmup_iters=10 --learning_rate=1e-3 --eval_interval=1000 --eval_iters=10 "${shape[@]}")
step "train.py 15M, bf16" 60 "numpy tqdm" "$py" "${train15[@]}" --out_dir="$work/15m" --dtype=bfloat16 \
  --compile="$compile" --max_iters=50
keep "15M bf16 compile=$compile: " '^iter (1|50) '
step "train.py 15M, resumed in float16" 30 "numpy tqdm" "$py" "${train15[@]}" --out_dir="$work/15m" \
  --init_from=resume --dtype=float16 --compile=False --max_iters=60
keep "15M fp16 resumed: " '^iter (51|60) '
mkdir -p "$out/15m"
cp "$work/15m/metrics.jsonl" "$work/15m/config.json" "$out/15m/" 2> /dev/null

step "sample.py" 20 "numpy sentencepiece tqdm" "$py" sample.py --checkpoint="$work/15m/ckpt.pt" \
  --device="$device" --prompt="Once upon a time" --max_new_tokens=60
keep "sample.py on it: " 'tokens/s$'

step "torchrun" 60 "numpy tqdm" "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  "${train15[@]}" --out_dir="$work/ddp" --dtype=bfloat16 --compile="$compile" --gradient_accumulation_steps=8 \
  --max_iters=10
keep "torchrun, 15M, compile=$compile: " '^(tokens per iteration|iter 10 )'
mkdir -p "$out/ddp"
cp "$work/ddp/metrics.jsonl" "$work/ddp/config.json" "$out/ddp/" 2> /dev/null

step "decoding speed" 25 "numpy tqdm" "$py" bench/bench_sample.py --device "$device" --skip_uncached \
  --repeats 3 --new_tokens "$new_tokens"
keep "decoding: " '^(15M-shaped|tokens/s|model.generate)'

{
  echo "# bash bench/gpu_run.sh, $(date -u '+%F %H:%M') UTC, $SECONDS s"
  cat "$work/results"
  echo "steps:"
  cat "$work/steps"
} > "$out/summary.md"
printf '\n=== summary for bench/README.md (also in %s)\n' "$out/summary.md" | tee -a "$log"
tee -a "$log" < "$out/summary.md"
exit "$failed"
