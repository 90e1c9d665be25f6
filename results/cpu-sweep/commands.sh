#!/bin/bash
# The real-data CPU sweep of issue 20: the sweep trained one after another (the CPU default),
# then the first 100 iterations of the same sweep fused (same schedule: its lr drops come later).
export PYTHONPATH=/work/snap-sweep FASTRES_CACHE=/tmp/fastres-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-sweep
cd /tmp/sweep-real
common="resnet20 --data /work/shared/data/cifar10-jpeg --val-split 5000 --sweep lr=0.02,0.1,0.5 --milestones 250,375 --log-every 50 --compile --device cpu --progress plain"
/usr/bin/time -v python -m fastres.train $common --iters 500 --eval-every 250 --checkpoint-every 250 --out runs/sweep > seq.log 2>&1
/usr/bin/time -v python -m fastres.train $common --iters 100 --eval-every 100 --checkpoint-every 100 --fuse on --out runs/sweep-fused-100 > fused.log 2>&1
