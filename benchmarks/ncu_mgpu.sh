#!/bin/bash
# Nsight Compute on the Mosaic GPU prefill GEMM (M=4096, K=4096, N=14336), one report per config given
# as MgpuConfig overrides: details page + per-SASS-instruction page as CSV under $OUT.
#   bash benchmarks/ncu_mgpu.sh seed=0 seed=1,overlap=1
set -u
NCU=${NCU:-/usr/local/cuda/bin/ncu}
for cfg in "$@"; do
  tag=$(echo "$cfg" | tr ',=' '_-')
  $NCU --clock-control none --kernel-name regex:mosaic --launch-skip 2 --launch-count 1 --set full \
    --import-source no --export "$OUT/mg_$tag" -f \
    python benchmarks/ncu_decode.py --kernel mgpu --m 4096 --k 4096 --n 14336 --mgpu "$cfg" > "$OUT/ncu_$tag.log" 2>&1
  $NCU --import "$OUT/mg_$tag.ncu-rep" --page details --csv > "$OUT/details_$tag.csv" 2>&1
  $NCU --import "$OUT/mg_$tag.ncu-rep" --page source --csv --print-source sass > "$OUT/sass_$tag.csv" 2>&1
  rm -f "$OUT/mg_$tag.ncu-rep"
  tail -n 3 "$OUT/ncu_$tag.log"
done
