#!/usr/bin/env bash
# Round 13: FP models, then 6 short recipes x 2 training seeds at once, each tested after.
W=/root/w; R=$W/repo
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=/tmp/site:$R
cd $R
stamp() { echo "$1 $(date +%s)" >> $W/stamps; }
stamp start
P=.device/r13/l45.yaml
python -m pipeline.prepare --params $P > $W/prepare.log 2>&1
for c in lstm gru; do python -m pipeline.train fp $c --params $P > $W/fp-$c.log 2>&1 & done
wait; stamp fp
one() {  # name cell seed
  python -m pipeline.train ternary $2 --params .device/r13/$1.yaml --seed $3 \
    --init runs/fp/$2/model.ckpt --out runs/r13/$1-s$3 > $W/$1-s$3.log 2>&1
  stamp "trained $1-s$3"
  python .device/evaluate.py .device/r13/$1.yaml runs/r13/$1-s$3 > $W/$1-s$3.eval.log 2>&1
  stamp "evaluated $1-s$3"
}
for s in 0 1; do
  for n in l45 l36 l45a; do one $n lstm $s & done
  for n in g55a g50m g50ma; do one $n gru $s & done
done
wait; stamp done
