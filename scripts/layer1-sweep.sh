#!/bin/sh
# The one-factor sweep around EigenGuard's defaults (docs/EIGENGUARD.md): Fashion-MNIST, BadNets at
# 10% and 1% poison, PreAct-ResNet18 width 16, 4 epochs, the layer after layer1 with
# eval_mode running (the defaults), one setting changed at a time; then the defaults and no
# defense again at seeds 1 and 2; then, at seed 1 and 10% poison, every batch folded into the
# running statistics (stats_every 1) and k = 16; k = 16 at seeds 1 and 2 at both ratios; then
# k = 16, k = 32 and no defense at seeds 3 and 4, 10% poison. Every trained model is evaluated
# under all four protocols. 29 runs of about 6 minutes each on a 2-core CPU, the most telling
# first; runs already in the store are skipped.
#
#   sh scripts/layer1-sweep.sh              # store: $EIGENGUARD_STORE or the default store
#   .venv/bin/eigenguard report --wide --markdown --where poison_ratio=0.1 \
#       --where defense_settings.after=layer1 --where defense_settings.eval_mode=running \
#       --sort seed --sort defense_settings.k --sort defense_settings.stats_every
#   .venv/bin/eigenguard report --over-seeds --markdown --where defense_settings.after=layer1 \
#       --where defense_settings.eval_mode=running --where defense_settings.stats_every=2 \
#       --where defense_settings.tail_scale=0.001 --where defense_settings.scale=kth
set -e
EG=${EG:-.venv/bin/eigenguard}
for ratio in 0.1 0.01; do $EG run --quiet --defense eigenguard --poison-ratio $ratio; done
for k in 16 64; do
    for ratio in 0.1 0.01; do $EG run --quiet --defense eigenguard --poison-ratio $ratio --k $k; done
done
for ratio in 0.1 0.01; do $EG run --quiet --defense eigenguard --poison-ratio $ratio --tail-scale 0.1; done
for ratio in 0.1 0.01; do $EG run --quiet --defense eigenguard --poison-ratio $ratio --scale mean; done
for seed in 1 2; do
    for ratio in 0.1 0.01; do
        $EG run --quiet --defense none --poison-ratio $ratio --seed $seed
        $EG run --quiet --defense eigenguard --poison-ratio $ratio --seed $seed
    done
done
$EG run --quiet --defense eigenguard --poison-ratio 0.1 --seed 1 --stats-every 1
$EG run --quiet --defense eigenguard --poison-ratio 0.1 --seed 1 --k 16
$EG run --quiet --defense eigenguard --poison-ratio 0.1 --seed 2 --k 16
$EG run --quiet --defense eigenguard --poison-ratio 0.01 --seed 1 --k 16
$EG run --quiet --defense eigenguard --poison-ratio 0.01 --seed 2 --k 16
for seed in 3 4; do
    $EG run --quiet --defense eigenguard --poison-ratio 0.1 --seed $seed --k 16
    $EG run --quiet --defense eigenguard --poison-ratio 0.1 --seed $seed --k 32
    $EG run --quiet --defense none --poison-ratio 0.1 --seed $seed
done
