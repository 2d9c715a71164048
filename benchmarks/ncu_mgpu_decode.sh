#!/bin/bash
# Nsight Compute on the Mosaic GPU decode path's 4-bit kernel (the 2nd Mosaic launch of each call), one
# report per "M K N" given: details page + per-SASS-instruction page as CSV under $OUT.
#   bash benchmarks/ncu_mgpu_decode.sh "1 4096 14336" "16 14336 4096"
set -u
NCU=${NCU:-/usr/local/cuda/bin/ncu}
for shape in "$@"; do
  read -r m k n <<< "$shape"
  tag="m${m}_${k}x${n}"
  $NCU --clock-control none --kernel-name regex:mosaic --launch-skip 3 --launch-count 1 --set full \
    --import-source no --export "$OUT/md_$tag" -f \
    python benchmarks/ncu_decode.py --kernel mgpu_decode --m "$m" --k "$k" --n "$n" > "$OUT/ncu_$tag.log" 2>&1
  $NCU --import "$OUT/md_$tag.ncu-rep" --page details --csv > "$OUT/details_$tag.csv" 2>&1
  $NCU --import "$OUT/md_$tag.ncu-rep" --page source --csv --print-source sass > "$OUT/sass_$tag.csv" 2>&1
  rm -f "$OUT/md_$tag.ncu-rep"
  tail -n 3 "$OUT/ncu_$tag.log"
done
