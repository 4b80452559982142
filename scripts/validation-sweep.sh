#!/bin/sh
# EigenGuard's defaults chosen on the validation split (config version 2: validation split and
# clean reserve held out of training). Tuning attack: BadNets 10% to class 0; held out: Blended.
# Fashion-MNIST, PreAct-ResNet18 width 16, 4 epochs (the fast preset), seed 0 then seeds 1 and 2.
# About 7 minutes a run on the 2-core CPU; finished runs are skipped when it is run again.
# Tables: eigenguard report --wide --markdown --split validation --where attack=badnets --sort seed --sort defense_settings.k
set -eu
EG=${EG:-eigenguard}
for seed in 0 1 2; do
    $EG run --seed "$seed" --defense none
    $EG run --seed "$seed" --defense eigenguard             # k = 32, the default so far
    $EG run --seed "$seed" --defense eigenguard --k 16
    $EG run --seed "$seed" --defense eigenguard --k 64
    if [ "$seed" = 0 ]; then                                 # the held-out attack
        $EG run --attack blended --defense none
        $EG run --attack blended --defense eigenguard
    fi
done
