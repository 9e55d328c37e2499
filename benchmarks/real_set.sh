#!/bin/bash
# The label-budget benchmark of RESULTS.md on a real catalog: the rows of ROWS on folds
# 0..FOLDS-1 of SET (bccd | chula) at PCT % labelled (3 | 10), resumed from (and written to)
# benchmarks/results/${SET}_${PCT}pct.json. The catalogs are built by RESULTS.md's commands.
#   SET=bccd PCT=3 FOLDS=5 ROWS="supervised-600=supervised[method.epochs=24]" benchmarks/real_set.sh
# In ROWS a literal $NEW (single-quote it) stands for IPB's evidence-based settings below, and
# $PAPER for the paper's draw and student (the row that must stay reproducible).
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${SET:-bccd}
PCT=${PCT:-3}
case "$PCT" in
  3) FRACTION=0.03 ;;
  10) FRACTION=0.1 ;;
  *) echo "PCT must be 3 or 10 (got $PCT)" >&2; exit 2 ;;
esac
case "$SET" in
  bccd) WINDOW="" ;;
  chula) WINDOW="data.window=whole" ;;
  *) echo "SET must be bccd or chula (got $SET)" >&2; exit 2 ;;
esac
COMMON="split.folds=5 split.labelled_fraction=$FRACTION model.width=1.0 data.global_patch=64 data.local_patch=32 \
$WINDOW eval.bn_batches=16 resources.num_workers=0 method.steps_per_epoch=25 method.epochs=8 \
method.teacher_epochs=8 method.finetune_epochs=2 method.pseudo_balance.label_pool=1600"
NEW="method.keep_start=true method.mpl.select_teacher=true method.mpl.student_labelled=1 \
method.pseudo_balance.alpha=0.5 method.pseudo_balance.max_copies=3 method.pseudo_balance.prior=labelled"
PAPER="method.keep_start=false method.mpl.select_teacher=false method.mpl.student_labelled=0 \
method.pseudo_balance.alpha=1 method.pseudo_balance.max_copies=0 method.pseudo_balance.threshold=0"
ROWS=${ROWS:?set ROWS, e.g. ROWS=\"supervised-600=supervised[method.epochs=24]\"}
ROWS=${ROWS//\$NEW/$NEW}
ROWS=${ROWS//\$PAPER/$PAPER}
exec python benchmarks/accuracy.py "${CATALOG:-/tmp/$SET/catalog}" --folds "${FOLDS:-5}" \
  --json "benchmarks/results/${SET}_${PCT}pct.json" --base "${BASE:-supervised}" --methods "$ROWS" $COMMON
