#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what bench/gpu_run.sh needs on a GPU machine that reaches no package
# registry and has no ../shared: the TinyStories sample (1 MB) and the Llama 2 tokenizer (0.5 MB), and,
# for each Python package named, its Python 3.12 x86-64 wheels and those of what it needs. Name only the
# packages the machine's image lacks (gpu_run.sh's preflight lists them as "missing"); every step checks
# the modules it imports and says which to bring. Run it where the registry is, then carry .gpu/ along.
#   bash bench/gpu_prepare.sh [SHARED_DIR [PACKAGE ...]]     # SHARED_DIR: default ../shared
#   bash bench/gpu_prepare.sh ../shared sentencepiece        # e.g. for an image without sentencepiece
# GPU_RUN_CARRIED names another folder than .gpu/ (for both scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
shift $(($# > 0 ? 1 : 0))
carried=${GPU_RUN_CARRIED:-.gpu}
mkdir -p "$carried"
rm -rf "$carried/wheels"  # one version of each package: two would stop the install there
cp "$shared/data/tinystories/TinyStories_all_data_sample.tar.gz" "$shared/tokenizers/llama2.model" "$carried/"
if [ $# -gt 0 ]; then
  python3 -m pip download -q --dest "$carried/wheels" --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "$@"
fi
echo "carry $carried ($(du -sh "$carried" | cut -f1)):"
find "$carried" -type f -exec du -h {} + | sort -k2
