#!/usr/bin/env bash
# The CIFAR-10 normalization study in one command (a thin wrapper around `dagan benchmark cifar10`).
#
#   pipelines/cifar10_norm_study.sh DATA OUT [PRESET] [extra dagan benchmark options...]
#
#   DATA    cifar-10-python.tar.gz, cifar-10-batches-py/, or an image zip such as cifar10-jpeg-train.zip
#   OUT     results folder; re-running the same command resumes (done cells are skipped, killed cells resume)
#   PRESET  smoke (default; minutes on a CPU) | seed-10k | full-100k (GPU)
#
# Examples:
#   pipelines/cifar10_norm_study.sh ~/data/cifar-10-python.tar.gz results/smoke
#   pipelines/cifar10_norm_study.sh ~/data/cifar-10-python.tar.gz results/seed10k seed-10k --device cuda \
#       --inception-weights ~/weights/weights-inception-2015-12-05-6726825d.pth
#   pipelines/cifar10_norm_study.sh DATA results/gn-vs-ln seed-10k --archs resnet --critic-norms layer,group
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
data=$1
out=$2
preset=${3:-smoke}
shift $(( $# >= 3 ? 3 : 2 ))

dagan benchmark cifar10 --data "$data" --out "$out" --preset "$preset" "$@"
echo "table: $out/results.md   curves: $out/fid_vs_step.png   grids: $out/grids/"
