#!/usr/bin/env bash
# The paper's configurations on one benchmark prepared by scripts/prepare_benchmark.py, and one table
# in the paper's layout with our mAP next to the paper's (scripts/paper_table.py).
#
#   bash scripts/reproduce.sh BENCH_DIR [create_index.py overrides, e.g. device=cuda batch_size=64]
#
# Runs (create_index.py + search_index.py each; features and run folders go to ./outputs):
#   dinov2_global, clip_global                        plain global embeddings (zero-shot)
#   mao_dinov2_zeroshot_gt_paper, mao_clip_...        MaO as the paper describes it (descriptor=mao: one vector
#                                                     per image) on the benchmark's ground-truth masks
#   mao_dinov2_zeroshot_gt, mao_clip_zeroshot_gt      ... as the published code computes it (one MI vector per mask)
#   mao_*_zeroshot_det[_paper]                        ... on DETECTOR_CAPTIONS masks      (if DETECTOR_CAPTIONS)
#   mao_dinov2_finetuned_*                            ... with the LoRA DINOv2 weights    (if DINOV2_WEIGHTS)
#   mao_clip_finetuned_*                              ... with the LoRA CLIP weights      (if CLIP_WEIGHTS)
# Baselines (no paper number in SoIR's table; see scripts/paper_table.py ROWS):
#   siglip_global                                     SigLIP's own global embedding
#   dinov2_gem, dinov2_rmac, clip_gem                 pool=gem / rmac over the patch tokens
#   dinov2_crop_gt, dinov2_mask_pool_gt               object_desc=crop / mask_pool on the ground-truth masks
#   dinov2_global_aqe, dinov2_global_dba              re-ranking of dinov2_global's features (rerank=aqe / dba)
#   mao_dinov2_zeroshot_gt_aqe                        re-ranking of mao_dinov2_zeroshot_gt's features
# Environment (optional):
#   DINOV2_MODEL, CLIP_MODEL, SIGLIP_MODEL   model_name (default: the extractors' defaults, DINOv2-B/14, CLIP-B/16,
#                              SigLIP-B/16-384)
#   DINOV2_DIM, CLIP_DIM, SIGLIP_DIM   vec_dim (default 768, 512, 768)
#   DINOV2_WEIGHTS, LORA_RANK  fine-tuned LoRA checkpoint and its rank (default 256; scripts/train_mao.py)
#   CLIP_WEIGHTS               fine-tuned CLIP LoRA checkpoint (scripts/train_mao.py family=clip; rank LORA_RANK)
#   DETECTOR_CAPTIONS          captions.pt of detector masks (scripts/create_masked_dataset.py); images
#                              without detections get their global embedding (missing_masks=global, counted)
#   SETTINGS                   run only these settings (space-separated names from the list above)
#   PYTHON                     interpreter (default python)
# Writes BENCH_DIR/reproduce-<date>-<time>/runs.tsv and table.md (also printed).
set -euo pipefail
if [[ $# -lt 1 || ! -f "$1/benchmark.json" ]]; then
  echo "usage: bash scripts/reproduce.sh BENCH_DIR [overrides...]  (BENCH_DIR from scripts/prepare_benchmark.py)" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$(cd "$1" && pwd); shift
EXTRA=("$@")
PYTHON=${PYTHON:-python}
NAME=$("$PYTHON" "$REPO/scripts/paper_table.py" args "$BENCH" benchmark)
mapfile -t DATA < <("$PYTHON" "$REPO/scripts/paper_table.py" args "$BENCH" index_args)
mapfile -t GT < <("$PYTHON" "$REPO/scripts/paper_table.py" args "$BENCH" gt_mask_args)
[[ ${#DATA[@]} -gt 0 && ${#GT[@]} -gt 0 ]] || { echo "cannot read $BENCH/benchmark.json" >&2; exit 1; }
OUT="$BENCH/reproduce-$(date +%Y%m%d-%H%M%S)"
mkdir "$OUT"    # fails rather than mixing two runs started in the same second
DINOV2=(vec_dim="${DINOV2_DIM:-768}" ${DINOV2_MODEL:+model_name="$DINOV2_MODEL"})
CLIP=(vec_dim="${CLIP_DIM:-512}" ${CLIP_MODEL:+model_name="$CLIP_MODEL"})
SIGLIP=(vec_dim="${SIGLIP_DIM:-768}" ${SIGLIP_MODEL:+model_name="$SIGLIP_MODEL"})
SEARCH=()  # search_index.py overrides of the next run (re-ranking); the features are the same as without
LORA=(lora_adapt=true lora_rank="${LORA_RANK:-256}" weights="${DINOV2_WEIGHTS:-}")
CLIP_LORA=(lora_adapt=true lora_rank="${LORA_RANK:-256}" weights="${CLIP_WEIGHTS:-}")
DET=(captions_file="${DETECTOR_CAPTIONS:-}" missing_masks=global)

# $1 = setting, the rest = create_index.py overrides; appends "benchmark<TAB>setting<TAB>results folder" to runs.tsv
run() {
  local setting=$1; shift
  if [[ -n "${SETTINGS:-}" && " $SETTINGS " != *" $setting "* ]]; then return; fi
  echo "=== $NAME: $setting ==="
  local log features
  log=$(mktemp)
  "$PYTHON" "$REPO/create_index.py" dataset="$NAME" experiment="$setting" "${DATA[@]}" "$@" \
      ${EXTRA[@]+"${EXTRA[@]}"} | tee "$log"
  features=$(sed -n 's/^features and index: //p' "$log")
  "$PYTHON" "$REPO/search_index.py" dataset="$NAME" experiment="$setting" features_dir="$features" \
      ${SEARCH[@]+"${SEARCH[@]}"} | tee "$log"
  printf '%s\t%s\t%s\n' "$NAME" "$setting" "$(sed -n 's/^results: //p' "$log")" >> "$OUT/runs.tsv"
  rm -f "$log"
}

# $1 = setting, the rest = create_index.py overrides: the paper's method (descriptor=mao, setting_paper)
# and the published code's (setting)
both() {
  local setting=$1; shift
  run "${setting}_paper" "$@" descriptor=mao
  run "$setting" "$@"
}

run dinov2_global extractor=dinov2_features "${DINOV2[@]}"
run clip_global extractor=clip_features "${CLIP[@]}"
both mao_dinov2_zeroshot_gt extractor=dinov2_mi_features "${DINOV2[@]}" "${GT[@]}"
both mao_clip_zeroshot_gt extractor=clip_mi_features "${CLIP[@]}" "${GT[@]}"
if [[ -n "${DETECTOR_CAPTIONS:-}" ]]; then
  both mao_dinov2_zeroshot_det extractor=dinov2_mi_features "${DINOV2[@]}" "${DET[@]}"
  both mao_clip_zeroshot_det extractor=clip_mi_features "${CLIP[@]}" "${DET[@]}"
fi
if [[ -n "${DINOV2_WEIGHTS:-}" ]]; then
  both mao_dinov2_finetuned_gt extractor=dinov2_mi_features "${DINOV2[@]}" "${LORA[@]}" "${GT[@]}"
  if [[ -n "${DETECTOR_CAPTIONS:-}" ]]; then
    both mao_dinov2_finetuned_det extractor=dinov2_mi_features "${DINOV2[@]}" "${LORA[@]}" "${DET[@]}"
  fi
fi
if [[ -n "${CLIP_WEIGHTS:-}" ]]; then
  both mao_clip_finetuned_gt extractor=clip_mi_features "${CLIP[@]}" "${CLIP_LORA[@]}" "${GT[@]}"
  if [[ -n "${DETECTOR_CAPTIONS:-}" ]]; then
    both mao_clip_finetuned_det extractor=clip_mi_features "${CLIP[@]}" "${CLIP_LORA[@]}" "${DET[@]}"
  fi
fi
run siglip_global extractor=siglip_features "${SIGLIP[@]}"
run dinov2_gem extractor=dinov2_features "${DINOV2[@]}" pool=gem
run dinov2_rmac extractor=dinov2_features "${DINOV2[@]}" pool=rmac
run clip_gem extractor=clip_features "${CLIP[@]}" pool=gem
run dinov2_crop_gt extractor=dinov2_mi_features "${DINOV2[@]}" "${GT[@]}" object_desc=crop
run dinov2_mask_pool_gt extractor=dinov2_mi_features "${DINOV2[@]}" "${GT[@]}" object_desc=mask_pool
# Re-ranking: create_index.py finds the features of the same settings (re-ranking is not part of their
# identity) and extracts nothing new; search_index.py re-ranks.
SEARCH=(rerank=aqe)
run dinov2_global_aqe extractor=dinov2_features "${DINOV2[@]}"
run mao_dinov2_zeroshot_gt_aqe extractor=dinov2_mi_features "${DINOV2[@]}" "${GT[@]}"
SEARCH=(rerank=dba)
run dinov2_global_dba extractor=dinov2_features "${DINOV2[@]}"
SEARCH=()
"$PYTHON" "$REPO/scripts/paper_table.py" table "$OUT" --out "$OUT/table.md"
echo "table: $OUT/table.md"
