#!/bin/bash
# The Chula RBC-12, 3 %-labelled accuracy benchmark of RESULTS.md (sessions 8-9): the rows
# of ROWS on folds 0..FOLDS-1, resumed from (and written to) benchmarks/results/chula_3pct.json.
#   CATALOG=/tmp/chula/catalog FOLDS=3 ROWS="supervised-1000=supervised[method.epochs=40]" benchmarks/chula_3pct.sh
# In ROWS, a literal $NEW (single-quote it) stands for this session's IPB defaults below:
#   ROWS='ipb-lab-450=ipb[$NEW method.teacher_epochs=18 method.pseudo_balance.prior=labelled]' benchmarks/chula_3pct.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON="split.folds=5 split.labelled_fraction=0.03 model.width=1.0 data.global_patch=64 data.local_patch=32 \
data.window=whole eval.bn_batches=16 resources.num_workers=0 method.steps_per_epoch=25 method.epochs=8 \
method.teacher_epochs=8 method.finetune_epochs=2 method.pseudo_balance.label_pool=1600"
NEW="method.keep_start=true method.mpl.select_teacher=true method.mpl.student_labelled=1 \
method.pseudo_balance.alpha=0.5 method.pseudo_balance.max_copies=3"
ROWS=${ROWS:-"supervised-450=supervised[method.epochs=18],supervised-1000=supervised[method.epochs=40],\
ipb-lab-450=ipb[$NEW method.teacher_epochs=18 method.pseudo_balance.prior=labelled]"}
ROWS=${ROWS//\$NEW/$NEW}
exec python benchmarks/accuracy.py "${CATALOG:-/tmp/chula/catalog}" --folds "${FOLDS:-3}" \
  --json benchmarks/results/chula_3pct.json --base supervised-450 --methods "$ROWS" $COMMON
