#!/bin/bash
# Pilot 1: ntp LoRA, 1 epoch on 3,000 chain_sum problems (2 terms of 2-3 digits), scored on 500 of the test set.
set -e
export PYTHONPATH=~/caftkit-artifacts/math/src-pilot OMP_NUM_THREADS=1
CAFT="/work/main/.venv/bin/python -m caftkit.cli"
cd ~/caftkit-artifacts/math/pilot
$CAFT eval --model smollm2-135m-instruct --task math --data test-chain2x2-3.jsonl --max-examples 500 --max-new-tokens 12 --output eval-base-chain2x2-3
[ -f ntp-chain2x2-3/caft_run.json ] || $CAFT finetune --data train-chain2x2-3.jsonl --mode ntp --epochs 1 --batch-size 8 --eval-fraction 0.05 --output ntp-chain2x2-3 $( [ -d ntp-chain2x2-3 ] && echo --resume )
[ -f model-chain2x2-3/config.json ] || $CAFT export ntp-chain2x2-3 --output model-chain2x2-3
$CAFT eval --model model-chain2x2-3 --task math --data test-chain2x2-3.jsonl --max-examples 500 --max-new-tokens 12 --output eval-ntp-chain2x2-3
