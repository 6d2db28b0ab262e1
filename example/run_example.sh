#!/usr/bin/env bash
# The whole SoIR pipeline on the demo set: make data -> index (global and Mask Inversion) -> search.
#
#   bash example/run_example.sh           real SigLIP-B/16-384 from the HuggingFace hub (downloads once)
#   bash example/run_example.sh --tiny    offline: a tiny RANDOM model; its numbers mean nothing
#
# Outputs go to demo_data/ (data, tiny models) and outputs/ (features, indexes, results).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=real
case "${1:-}" in
  --tiny) MODE=tiny ;;
  "") ;;
  *) echo "usage: bash example/run_example.sh [--tiny]" >&2; exit 2 ;;
esac
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
  python scripts/make_tiny_models.py --out demo_data/tiny_models >/dev/null
  MODEL=(model_name=demo_data/tiny_models/siglip vec_dim=32)
  export HF_HUB_OFFLINE=1
else
  MODEL=(vec_dim=768)   # google/siglip-base-patch16-384, the siglip extractors' default
fi

for EXTRACTOR in siglip_features siglip_mi_features; do
  echo "=== $EXTRACTOR ==="
  LOG=$(mktemp)
  python create_index.py dataset=demo extractor=$EXTRACTOR "${MODEL[@]}" \
      anns_file=$DATA/anns.pt captions_file=$DATA/captions.pt | tee "$LOG"
  FEATURES=$(sed -n 's/^features and index: //p' "$LOG")
  python search_index.py dataset=demo experiment=example_$EXTRACTOR features_dir="$FEATURES" k_search=10
  rm -f "$LOG"
done
if [[ $MODE == tiny ]]; then
  echo "REMINDER: --tiny used a random model; the numbers above mean nothing." >&2
fi
