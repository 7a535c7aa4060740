#!/usr/bin/env bash
# Every GPU check and measurement behind the docs, for one machine with an sm_80+ GPU.
#
#   bash scripts/gpu_suite.sh [tests|kernels|study1|study16|policies|all] OUT_DIR
#
# Offline data is read from $DATA (default ../shared), laid out like the workspace's shared/:
#   $DATA/models/tiny-neox-a, $DATA/data/gpt-neox-20b/tokenizer.json,
#   $DATA/data/wikitext-2-raw/wiki.test.raw, $DATA/data/gutenberg-en/gutenberg_en_valid.jsonl.xz
# Set W8A16_BUILD_DIR to a kept folder so the CUDA extension is built only once.
# Each part fits in ~6 minutes on an H100; `all` needs ~25.
set -uo pipefail
what=${1:-all}; out=${2:-out}; mkdir -p "$out"
DATA=${DATA:-../shared}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} W8A16_SHARED="$DATA"
tok="$DATA/data/gpt-neox-20b/tokenizer.json"; wiki="$DATA/data/wikitext-2-raw/wiki.test.raw"
books="$DATA/data/gutenberg-en/gutenberg_en_valid.jsonl.xz"; tiny="$DATA/models/tiny-neox-a"
run() { echo "== $*"; "$@"; }
python3 -m w8a16_ops.build || exit 1
case $what in tests|all)
  run python3 -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | grep -v DEBUG > "$out/cuda_tests.log"
  tail -5 "$out/cuda_tests.log";; esac
case $what in kernels|all)
  run python3 -m bench kernels --json "$out/kernels.json" --no_progress > "$out/kernels.txt" 2>&1
  tail -16 "$out/kernels.txt"
  run python3 -m bench attention --json "$out/attention.json" > "$out/attention.txt" 2>&1
  tail -12 "$out/attention.txt";; esac
case $what in study1|all)
  run python3 -m bench --model_path random:pythia-2.8b --tokenizer "$tok" --dataset "$wiki" --batch_size 1 \
      --modes +hf_compile --json "$out/study_b1.json" --csv "$out/study_b1.csv" --plot "$out/study_b1.png" \
      --no_progress > "$out/study_b1.txt" 2>&1
  tail -16 "$out/study_b1.txt";; esac
case $what in study16|all)
  run python3 -m bench --model_path random:pythia-2.8b --tokenizer "$tok" --dataset "$wiki" --batch_size 16 \
      --json "$out/study_b16.json" --csv "$out/study_b16.csv" --plot "$out/study_b16.png" \
      --no_progress > "$out/study_b16.txt" 2>&1
  tail -14 "$out/study_b16.txt";; esac
case $what in policies|all)
  run python3 -m bench policies --model_path "$tiny" --dataset "$books" --json "$out/policies.json" \
      --no_progress > "$out/policies.txt" 2>&1
  tail -16 "$out/policies.txt";; esac
