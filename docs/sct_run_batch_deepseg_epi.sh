#!/bin/bash
#
# Spinal cord masks of every BOLD run of one subject (or session), for SCT's batch runner:
#
#   sct_run_batch -script sct_run_batch_deepseg_epi.sh -path-data BIDS_DIR -path-output OUT \
#                 -jobs 4 -itk-threads 2
#
# sct_run_batch calls this script once per subject folder ($1 = sub-01, or sub-01/ses-01
# when the dataset has sessions) with PATH_DATA, PATH_DATA_PROCESSED, PATH_LOG... set.
# Each call runs `sct_deepseg_epi batch` on that subject's runs only, and all calls write
# into ONE BIDS derivatives folder:
#
#   OUT/data_processed/derivatives/sct_deepseg_epi/
#       dataset_description.json, summary.tsv (one row per run, merged across jobs),
#       sub-*/[ses-*/]func/*_desc-spinalcord_mask.nii.gz (+ .json)
#
# Safe with -jobs > 1: the model is installed (downloaded) under a file lock, so parallel
# jobs install it once and nobody reads a half-written copy; each run has its own lock and
# every file is written to a temporary name and renamed; summary.tsv and
# dataset_description.json are updated under a lock on the derivatives folder. A rerun
# skips runs that are already up to date (-overwrite 1 in SCT_DEEPSEG_EPI_ARGS redoes them).
#
# Threads per job: -itk-threads (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, 1 by default) also
# sets the inference threads, so keep -jobs x -itk-threads <= the number of CPUs.
#
# Settings (environment variables, all optional):
#   SCT_DEEPSEG_EPI_MODEL    model reference (default: seg_sc_epi)
#   SCT_DEEPSEG_EPI_DERIV    derivatives folder (default: $PATH_DATA_PROCESSED/derivatives/sct_deepseg_epi)
#   SCT_DEEPSEG_EPI_ARGS     more options for `sct_deepseg_epi batch`, e.g. "-4d each -soft 1 -task-label rest"
#   SCT_DEEPSEG_EPI          the command (default: sct_deepseg_epi on PATH, else SCT's python -m sct_deepseg_epi)

set -u
set -o pipefail

SUBJECT_DIR="${1:?usage: $0 sub-XX[/ses-YY] (called by sct_run_batch)}"
: "${PATH_DATA:?PATH_DATA is not set; run this script through sct_run_batch}"
: "${PATH_DATA_PROCESSED:?PATH_DATA_PROCESSED is not set; run this script through sct_run_batch}"

SUBJECT="${SUBJECT_DIR%%/*}"
SESSION=""
if [[ "$SUBJECT_DIR" == */ses-* ]]; then
  SESSION="${SUBJECT_DIR#*/}"
fi

MODEL="${SCT_DEEPSEG_EPI_MODEL:-seg_sc_epi}"
DERIV="${SCT_DEEPSEG_EPI_DERIV:-$PATH_DATA_PROCESSED/derivatives/sct_deepseg_epi}"
THREADS="${ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS:-1}"

if [[ -n "${SCT_DEEPSEG_EPI:-}" ]]; then
  read -r -a CMD <<< "$SCT_DEEPSEG_EPI"
elif command -v sct_deepseg_epi > /dev/null 2>&1; then
  CMD=(sct_deepseg_epi)
elif [[ -n "${SCT_DIR:-}" && -x "$SCT_DIR/python/envs/venv_sct/bin/python" ]]; then
  CMD=("$SCT_DIR/python/envs/venv_sct/bin/python" -m sct_deepseg_epi)
else
  echo "error: sct_deepseg_epi not found (pip install it into SCT's environment, or set SCT_DEEPSEG_EPI)" >&2
  exit 1
fi

# A subject with no functional runs (anatomy only) is not a failure: say so and stop.
shopt -s nullglob
FUNC="$PATH_DATA/$SUBJECT_DIR/func"
RUNS=("$FUNC"/*_bold.nii "$FUNC"/*_bold.nii.gz)
if [[ ${#RUNS[@]} -eq 0 ]]; then
  echo "$SUBJECT_DIR: no func/*_bold.nii[.gz]; nothing to segment"
  exit 0
fi

ARGS=(batch "$PATH_DATA" -o "$DERIV" -model "$MODEL" -participant-label "$SUBJECT"
      -jobs 1 -threads "$THREADS")
if [[ -n "$SESSION" ]]; then
  ARGS+=(-session-label "$SESSION")
fi
# shellcheck disable=SC2206  # word splitting of the extra options is intended
EXTRA=(${SCT_DEEPSEG_EPI_ARGS:-})

# ${A[@]+"${A[@]}"}: an empty array under `set -u` in the bash 3.2 of macOS
echo "$(date -u +%FT%TZ) $SUBJECT_DIR: ${CMD[*]} ${ARGS[*]} ${EXTRA[*]+${EXTRA[*]}}"
"${CMD[@]}" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
status=$?
echo "$(date -u +%FT%TZ) $SUBJECT_DIR: exit status $status (per-run outcomes: $DERIV/summary.tsv)"
exit $status
