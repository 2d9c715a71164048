#!/bin/bash
# Nsight Compute on the Triton mixed GEMM (decode tiles), one report per "M K N" given: the details page
# (speed of light, occupancy, warp states, scheduler, instruction stats) and the per-SASS-instruction page
# (executed counts and stall samples) as CSV under $OUT; an optional 4th field overrides GemmConfig fields.
#   bash benchmarks/ncu_mma.sh "16 4096 28672" "64 4096 28672" "16 4096 28672 prefetch_meta=3"
#   KERNEL=gemv bash benchmarks/ncu_mma.sh "1 4096 28672"     # the GEMV (mixed_gemv) instead
set -u
NCU=${NCU:-/usr/local/cuda/bin/ncu}
KERNEL=${KERNEL:-mma}
regex=mixed_gemm; [ "$KERNEL" = gemv ] && regex=mixed_gemv
for shape in "$@"; do
  read -r m k n over <<< "$shape"
  over="${over:-}"
  tag="${KERNEL}_m${m}_${k}x${n}${over:+_${over//[=,]/_}}"
  $NCU --clock-control none --kernel-name regex:$regex --launch-skip 2 --launch-count 1 --set full \
    --import-source no --export "$OUT/$tag" -f \
    python benchmarks/ncu_decode.py --kernel "$KERNEL" --m "$m" --k "$k" --n "$n" --set "$over" > "$OUT/ncu_$tag.log" 2>&1
  $NCU --import "$OUT/$tag.ncu-rep" --page details --csv > "$OUT/details_$tag.csv" 2>&1
  $NCU --import "$OUT/$tag.ncu-rep" --page source --csv --print-source sass > "$OUT/sass_$tag.csv" 2>&1
  rm -f "$OUT/$tag.ncu-rep"
  tail -n 3 "$OUT/ncu_$tag.log"
done
