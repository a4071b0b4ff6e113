#!/usr/bin/env bash
# Round 12, machine 1: FP models, then the ternary LSTM for 3 training seeds with fixed lr milestones.
set -x
W=/root/w; R=$W/repo
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 PYTHONPATH=/tmp/site
cd $R
date +%s > $W/t0
python -m pipeline.prepare --params .device/p12.yaml > $W/prepare.log 2>&1
for c in lstm gru; do
  python -m pipeline.train fp $c --params .device/p12.yaml > $W/fp-$c.log 2>&1 &
done
wait
date +%s > $W/t_fp
for s in 0 1 2; do
  python -m pipeline.train ternary lstm --params .device/p12.yaml --seed $s \
    --init runs/fp/lstm/model.ckpt > $W/lstm-$s.log 2>&1 &
done
wait
date +%s > $W/t_lstm
python .device/evaluate.py .device/p12.yaml runs/ternary/lstm/seed0 runs/ternary/lstm/seed1 runs/ternary/lstm/seed2 > $W/eval.log 2>&1
date +%s > $W/t_done
