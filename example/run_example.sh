#!/usr/bin/env bash
# The whole SoIR pipeline on the demo set: make data -> index (global and Mask Inversion) -> search, each
# setting once, then one table comparing them (mAP, R@1, R@5, report of each).
#
#   bash example/run_example.sh           real SigLIP-B/16-384 from the HuggingFace hub (downloads once)
#   bash example/run_example.sh --tiny    offline: tiny RANDOM models; their numbers mean nothing
#   ... key=value                         more create_index.py settings for every run (mi_iterations=10)
#
# Masks: the demo set ships ground-truth masks. To also run the mask pipeline (OWLv2 boxes -> SAM
# masks -> MI), set SAM_CHECKPOINT=/path/to/sam_vit_b_01ec64.pth (--tiny uses a tiny random SAM).
#
# Outputs go to demo_data/ (data, tiny models) and outputs/ (features, indexes, results).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=real
if [[ "${1:-}" == --tiny ]]; then MODE=tiny; shift; fi
EXTRA=("$@")   # key=value overrides for every create_index.py run (e.g. mi_iterations=10)
for arg in "${EXTRA[@]}"; do
  [[ $arg == *=* ]] || { echo "usage: bash example/run_example.sh [--tiny] [key=value ...]" >&2; exit 2; }
done
DATA=demo_data/demo

if [[ ! -f "$DATA/anns.pt" ]]; then
  python scripts/make_demo_dataset.py --out "$DATA"
fi

if [[ $MODE == tiny ]]; then
  cat >&2 <<'BANNER'
##########################################################################################
#  --tiny: TINY RANDOMLY INITIALISED MODEL. The pipeline runs end to end, but every      #
#  number below is meaningless (no pretrained weights). Run without --tiny for real ones. #
##########################################################################################
BANNER
  if [[ ! -f demo_data/tiny_models/sam/sam_tiny.pth ]]; then
    python scripts/make_tiny_models.py --out demo_data/tiny_models >/dev/null
  fi
  MODEL=(model_name=demo_data/tiny_models/siglip vec_dim=32)
  MASK_MODELS=(--owlv2_model demo_data/tiny_models/owlv2 --sam_checkpoint demo_data/tiny_models/sam/sam_tiny.pth
               --sam_config demo_data/tiny_models/sam/sam_tiny.json)
  export HF_HUB_OFFLINE=1
else
  MODEL=(vec_dim=768)   # google/siglip-base-patch16-384, the siglip extractors' default
  MASK_MODELS=()
  [[ -n "${SAM_CHECKPOINT:-}" ]] && MASK_MODELS=(--sam_checkpoint "$SAM_CHECKPOINT")
fi

# index + search, once: create_index.py searches at its end (its table and report); $1 = the setting's
# name, the rest = create_index.py overrides. Each setting's run folder is kept for the final table.
RUNS=()
index_and_search() {
  local name=$1; shift
  echo "=== $name ==="
  local log
  log=$(mktemp)
  python create_index.py dataset=demo experiment="$name" k_search=10 "${MODEL[@]}" anns_file=$DATA/anns.pt "$@" \
      ${EXTRA[@]+"${EXTRA[@]}"} \
      | tee "$log"
  RUNS+=("$name=$(sed -n 's/^results: //p' "$log")")
  rm -f "$log"
}

index_and_search global extractor=siglip_features
index_and_search mi_ground_truth_masks extractor=siglip_mi_features captions_file=$DATA/captions.pt
if [[ ${#MASK_MODELS[@]} -gt 0 ]]; then
  python scripts/create_masked_dataset.py --input_dir "$DATA" --output_dir demo_data/detected_masks_$MODE \
      "${MASK_MODELS[@]}" --preview 4
  index_and_search mi_owlv2_sam_masks extractor=siglip_mi_features \
      captions_file=demo_data/detected_masks_$MODE/captions.pt
else
  echo "(set SAM_CHECKPOINT to also run OWLv2 + SAM mask creation)"
fi

echo
echo "=== global embedding vs Mask Inversion (ground-truth masks) vs Mask Inversion (OWLv2 + SAM masks) ==="
python scripts/compare_runs.py "${RUNS[@]}"
if [[ $MODE == tiny ]]; then
  echo "REMINDER: --tiny used a random model; the numbers above mean nothing." >&2
fi
