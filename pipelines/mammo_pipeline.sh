#!/usr/bin/env bash
# Hospital pipeline: DICOM mammograms → patches → conditional DAGAN → synthetic patches → privacy check →
# patch classifier with and without augmentation → reports. Copy this file and set the variables below.
#
#   DICOM_DIR=/data/mammo LABELS=/data/mammo/labels.csv WORK=/scratch/dagan bash pipelines/mammo_pipeline.sh
#   bash pipelines/mammo_pipeline.sh                   # no DICOM_DIR: a small synthetic demo archive, tiny settings
#
# Every step is resumable: run the script again after an interruption and finished steps are skipped, interrupted
# ones continue (extract-patches --resume, train --resume, augment's .partial file).
set -euo pipefail

WORK=${WORK:-work/mammo}            # everything this pipeline writes
SEED=${SEED:-0}
DEVICE=${DEVICE:-auto}              # auto | cpu | cuda
N_VARIANTS=${N_VARIANTS:-10}        # synthetic variants per real training patch

if [[ -z "${DICOM_DIR:-}" ]]; then
  # Demo mode: synthetic DICOMs with lesion labels; 64-px patches and a tiny DAGAN so it runs on a laptop CPU.
  echo "DICOM_DIR not set: running on a synthetic demo archive in $WORK/demo"
  python -c "from dagan_gn.phantom.mammogram import make_demo_archive; make_demo_archive('$WORK/demo', n_patients=12, seed=$SEED)"
  DICOM_DIR="$WORK/demo/dicom"
  LABELS="$WORK/demo/labels.csv"
  PATCH_SIZE=${PATCH_SIZE:-64}
  CONFIG=${CONFIG:-configs/dagan_tiny.yaml}
  STEPS=${STEPS:-40}
  CLS_ARGS=${CLS_ARGS:-"--epochs 3 --width 8 --seeds 2"}
  TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-"model.num_classes=3"}
else
  PATCH_SIZE=${PATCH_SIZE:-256}
  CONFIG=${CONFIG:-configs/dagan_mammo_256.yaml}
  STEPS=${STEPS:-50000}
  CLS_ARGS=${CLS_ARGS:-"--epochs 20 --width 16 --seeds 5"}
  TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-""}
fi
LABEL_ARGS=()
[[ -n "${LABELS:-}" ]] && LABEL_ARGS=(--labels "$LABELS")
mkdir -p "$WORK"

# 1. Patches: patient-level train/val/test split, salted pseudonyms only (keep $WORK/patches.h5.salt secret).
if [[ ! -f "$WORK/patches.h5" ]]; then
  RESUME=(); [[ -f "$WORK/patches.h5.partial" ]] && RESUME=(--resume)
  dagan extract-patches "$DICOM_DIR" --out "$WORK/patches.h5" "${LABEL_ARGS[@]}" --patch-size "$PATCH_SIZE" \
    --seed "$SEED" "${RESUME[@]}" || [[ $? -eq 3 ]]   # exit 3: some files skipped (see patches.h5.report.json)
fi

# 2. The conditional DAGAN, on the train split only (number of classes taken from the patch file).
NUM_CLASSES=$(python -c "from dagan_gn.store.patch_file import PatchFile; print(len(PatchFile('$WORK/patches.h5').class_names))")
# shellcheck disable=SC2086
dagan train --config "$CONFIG" --data "$WORK/patches.h5" --out "$WORK/run" --steps "$STEPS" --seed "$SEED" \
  --device "$DEVICE" --resume model.num_classes="$NUM_CLASSES" $TRAIN_OVERRIDES

# 3. Synthetic variants of the training patches (never val/test), with a contact sheet to look at.
if [[ ! -f "$WORK/synthetic.h5" ]]; then
  dagan augment --in "$WORK/patches.h5" --checkpoint "$WORK/run" --out "$WORK/synthetic.h5" --n "$N_VARIANTS" \
    --seed "$SEED" --device "$DEVICE" --contact-sheet "$WORK/reports/contact_sheet.png"
fi

# 4. Privacy gate: synthetic patches must not copy training patches (of other patients). --strict fails the pipeline.
dagan check-memorization --real "$WORK/patches.h5" --synthetic "$WORK/synthetic.h5" --out "$WORK/reports" \
  --device "$DEVICE" --seed "$SEED" ${STRICT:+--strict}

# 5. Does augmentation help? The same classifier on real / +albumentations / +DAGAN / +both, on held-out patients.
# shellcheck disable=SC2086
dagan evaluate-augmentation --real "$WORK/patches.h5" --synthetic "$WORK/synthetic.h5" --out "$WORK/reports" \
  --device "$DEVICE" --seed "$SEED" $CLS_ARGS

echo "done: $WORK/reports/{downstream.md,downstream.png,memorization.md,contact_sheet.png}"
