#!/bin/bash
# Every measurement of BENCHMARKS.md "The cost of a fold at two scales" (issue "The cost of
# a fold"), one after another; run it on a quiet machine (nothing else on the cores). Each
# piece writes benchmarks/results/cost/<name>.json (or .txt) and is skipped when that file
# exists, so a killed run resumes where it stopped. Catalogs: RESULTS.md's commands build
# Chula RBC-12 at $CHULA; `ipb demo --out /tmp/demo` builds the demo world at $DEMO.
#   benchmarks/fold_cost_all.sh            # everything
#   ONLY="chula-local demo-local" benchmarks/fold_cost_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/cost
mkdir -p "$OUT"
CHULA=${CHULA:-/tmp/chula/catalog}
DEMO=${DEMO:-/tmp/demo/catalog}
# The accuracy benchmark's small model and patches; Chula at 10 % labelled, 5 folds.
SMALL="model.width=1.0 data.global_patch=64 data.local_patch=32 data.window=whole eval.bn_batches=16 method.steps_per_epoch=25"
CH="split.folds=5 split.labelled_fraction=0.1 $SMALL"
SUP="method.epochs=40 eval.every=10"                       # 1,000 supervised steps, V every 250
SEMI="method.epochs=8 method.teacher_epochs=8 method.finetune_epochs=2 method.pseudo_balance.label_pool=1600"
METHODS="supervised,ipb,fixmatch+pseudo_balance"

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
fresh() { [ ! -s "$OUT/$1" ] && want "${1%.*}"; }

cost() {  # name catalog methods workers runner overrides...
  local name=$1 cat=$2 methods=$3 workers=$4 runner=$5; shift 5
  fresh "$name.json" || { echo "skip $name"; return 0; }
  echo "== $name"
  python benchmarks/fold_cost.py "$cat" --methods "$methods" --workers "$workers" --runner "$runner" \
    --plain-steps 200 --json "$OUT/$name.json.part" "$@" name="$name" 2>&1 | grep -v Warning | tail -30
  mv "$OUT/$name.json.part" "$OUT/$name.json"
}

# 1. A 1,000-step supervised fold, then IPB and FixMatch + pseudo_balance, in local mode.
cost chula-local-supervised "$CHULA" supervised 0 in_process $CH $SUP
cost chula-local-semi "$CHULA" ipb,fixmatch+pseudo_balance 0 in_process $CH $SEMI
cost demo-local "$DEMO" "$METHODS" 0 in_process
cost demo-local-supervised "$DEMO" supervised 0 in_process $SUP   # 1,000 steps on the demo world too
# 2. The same with one Ray Train worker on the local cluster this script starts.
cost chula-worker-supervised "$CHULA" supervised 1 ray_train $CH $SUP
cost chula-worker-semi "$CHULA" ipb,fixmatch+pseudo_balance 1 ray_train $CH $SEMI
cost demo-worker "$DEMO" "$METHODS" 1 ray_train
cost demo-worker-supervised "$DEMO" supervised 1 ray_train $SUP
# Ray gives a Train worker as many torch threads as its CPUs (resources.cpus_per_worker=1):
# on 2 cores the plain loop has 2. The same folds with the worker's torch on both cores:
cost chula-worker2t-supervised "$CHULA" supervised 1 ray_train $CH $SUP resources.torch_threads=2
cost demo-worker2t-supervised "$DEMO" supervised 1 ray_train $SUP resources.torch_threads=2

# 3. `ipb cv` end to end: 10 folds of supervised on Chula RBC-12 (wall, peak memory), and
#    2 folds of IPB to project its 10.
cv() {  # name folds overrides...
  local name=$1 folds=$2; shift 2
  fresh "$name.txt" || { echo "skip $name"; return 0; }
  echo "== $name"
  local store
  store=$(mktemp -d /tmp/ipb-cv-cost-XXXX)
  /usr/bin/time -v ipb cv --preset demo --folds "$folds" data.catalog="$CHULA" split.folds=10 \
    split.labelled_fraction=0.1 $SMALL resources.num_workers=0 tracking.storage_path="$store/runs" \
    tracking.tracking_uri="sqlite:///$store/mlflow.db" name="$name" "$@" > "$OUT/$name.txt.part" 2>&1
  mv "$OUT/$name.txt.part" "$OUT/$name.txt"
  grep -E "Elapsed|Maximum resident" "$OUT/$name.txt"
}
cv cv10-supervised 10 method.name=supervised $SUP
cv cv2-ipb 2 method.name=ipb $SEMI
