#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what bench/gpu_run.sh needs on a GPU machine that reaches no package
# registry and has no ../shared: the TinyStories sample, the Llama 2 tokenizer, and Python 3.12 wheels
# (manylinux, x86-64) of the runtime and test dependencies that the machine's PyTorch image may lack.
# Run it on a machine with the registry, then carry .gpu/ along with the repository (about 25 MB).
#   bash bench/gpu_prepare.sh [SHARED_DIR]     # default: ../shared
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
mkdir -p .gpu/wheels
cp "$shared/data/tinystories/TinyStories_all_data_sample.tar.gz" "$shared/tokenizers/llama2.model" .gpu/
python3 -m pip download -q --dest .gpu/wheels --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  numpy sentencepiece tqdm requests safetensors pytest
echo "prepared .gpu/ ($(du -sh .gpu | cut -f1)): $(ls .gpu/wheels | wc -l) wheels, the sample and the tokenizer"
