#!/bin/bash
# Nsight Compute on the Triton mixed GEMM (decode tiles), one report per "M K N" given: the details page
# (speed of light, occupancy, warp states, scheduler, instruction stats) and the per-SASS-instruction page
# (executed counts and stall samples) as CSV under $OUT; an optional 4th field overrides GemmConfig fields.
#   bash benchmarks/ncu_mma.sh "16 4096 28672" "64 4096 28672" "16 4096 28672 prefetch_meta=1"
set -u
NCU=${NCU:-/usr/local/cuda/bin/ncu}
for shape in "$@"; do
  read -r m k n over <<< "$shape"
  over="${over:-}"
  tag="m${m}_${k}x${n}${over:+_${over//[=,]/_}}"
  $NCU --clock-control none --kernel-name regex:mixed_gemm --launch-skip 2 --launch-count 1 --set full \
    --import-source no --export "$OUT/mma_$tag" -f \
    python benchmarks/ncu_decode.py --kernel mma --m "$m" --k "$k" --n "$n" --set "$over" > "$OUT/ncu_$tag.log" 2>&1
  $NCU --import "$OUT/mma_$tag.ncu-rep" --page details --csv > "$OUT/details_$tag.csv" 2>&1
  $NCU --import "$OUT/mma_$tag.ncu-rep" --page source --csv --print-source sass > "$OUT/sass_$tag.csv" 2>&1
  rm -f "$OUT/mma_$tag.ncu-rep"
  tail -n 3 "$OUT/ncu_$tag.log"
done
