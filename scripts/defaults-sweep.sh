#!/bin/sh
# The one-factor sweep behind EigenGuard's defaults (docs/EIGENGUARD.md): Fashion-MNIST, BadNets at
# 10% and 1% poison, PreAct-ResNet18 width 16, 4 epochs, seed 0, one setting changed at a time
# around the sweep's centre (k = 32, tail_scale = 1e-3, scale = kth, after layer2, eval_mode batch;
# every trained model is evaluated under all four protocols whatever its eval_mode).
# 26 runs of about 6 minutes each on a 2-core CPU; runs already in the store are skipped.
#
#   sh scripts/defaults-sweep.sh            # store: $EIGENGUARD_STORE or the default store
#   .venv/bin/eigenguard report --wide --markdown --where poison_ratio=0.1
set -e
EG=${EG:-.venv/bin/eigenguard}
for ratio in 0.1 0.01; do
    $EG run --quiet --defense none --poison-ratio $ratio
    centre="--defense eigenguard --poison-ratio $ratio --after layer2 --eval-mode batch"
    $EG run --quiet $centre
    for k in 1 4 8 16 64; do $EG run --quiet $centre --k $k; done
    for after in layer1 layer3; do $EG run --quiet $centre --after $after; done
    $EG run --quiet $centre --scale mean
    for tail in 0 0.1 1; do $EG run --quiet $centre --tail-scale $tail; done
done
