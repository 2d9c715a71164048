#!/usr/bin/env bash
# The device calls that re-measure mixjax on a lent GPU, one part per call (each well inside the tool's
# 10-minute limit), logs and tables under $OUT (default ./out):
#
#   bash benchmarks/device_session.sh tests     # the kernel tests on the GPU (real kernels, not interpret)
#   bash benchmarks/device_session.sh kernels   # per-GEMM table: decode M = 1..8 (GEMV forms vs the api),
#                                               # M = 32..256 (the api vs decode tiles up to 256 rows) and
#                                               # prefill M = 4096, against XLA bf16 (and int8)
#   bash benchmarks/device_session.sh e2e       # Llama-3-8B-shaped generation: bf16 vs W4.4A8 (+ int4 head)
#   bash benchmarks/device_session.sh profile   # b1 and b32 decode steps: the 45 kernels by time, launches each
#   bash benchmarks/device_session.sh words     # session 9: the 4-bit unpack on 32-bit words (mixed) against the
#                                               # 8-bit shift (mixed_b8), M = 2..256, plus the GPU kernel tests
#   bash benchmarks/device_session.sh words_sweep  # decode tiles again at M = 16, 32 (DECODE_SWEEP_WORDS), M = 128–256 paths
#   bash benchmarks/device_session.sh xq        # session 10 (not yet run): end to end with the activations
#                                               # quantized by XLA ops (w4.4a8@xq+h4) against the Pallas launch
#   bash benchmarks/device_session.sh nq        # session 11: norms emitting int8 codes (rms_norm_quant,
#                                               # w4.4a8@normq+h4) end to end against plain norms
#   bash benchmarks/device_session.sh micro     # session 13: the attention, norm and SwiGLU tests and benchmarks
#   bash benchmarks/device_session.sh e2e12     # session 13: end to end, bf16 beside VARIANTS (BATCHES)
#   bash benchmarks/device_session.sh gputests  # session 13: the attention, SwiGLU and norm tests on the GPU
#   bash benchmarks/device_session.sh prefill   # session 13 (not yet run): prefill 256 / 2048 profiled, b8
#   bash benchmarks/device_session.sh gemv14    # session 14: the M = 1 GEMV on codes (the model's form): per-word
#                                               # rescale, prefetched iterations, 8 warps, 16/64-row tiles; the
#                                               # fused attention step with more splits (b1, b32)
#   bash benchmarks/device_session.sh gputests14  # session 14: the GEMV, attention, SwiGLU and norm tests on the
#                                               # GPU with the session-14 defaults, then a b1 step's 45 kernels
#   bash benchmarks/device_session.sh e2e14     # session 14: end to end, no tests first (VARIANTS, BATCHES)
#   bash benchmarks/device_session.sh pdl       # session 14 (not yet run): XLA's programmatic dependent launch
#                                               # (--xla_gpu_enable_pdl) off / on: does it reach the Pallas
#                                               # kernels (probe_pdl.py), and the b1 step end to end
#   bash benchmarks/device_session.sh gps       # session 17: the prefill GEMM with two groups a step (MgpuConfig.gps)
#   bash benchmarks/device_session.sh prefill17 # session 17: ncu on the two-groups-a-step GEMM, prefill 2048 / 256
#   bash benchmarks/device_session.sh s17c      # session 17: cuDNN prefill attention, GEMM turns of two groups
#   bash benchmarks/device_session.sh s17d      # session 17: GPU tests of the session's changes, prefill 2048 / 256
#   bash benchmarks/device_session.sh s18a      # session 18: the prefill GEMM's conversion (i2f / magic / magic_fma)
#   bash benchmarks/device_session.sh s18b      # session 18: prefill 2048 end to end with the conversions, @pcodes
#   bash benchmarks/device_session.sh s18c      # session 18 (not yet run): ncu on the magic conversions
#   bash benchmarks/device_session.sh s18d      # session 18: CTA tiles for 256–512-token prompts
#   bash benchmarks/device_session.sh s19a      # session 19: SwiGLU's blocked form at prefill (@pswiglu)
#   bash benchmarks/device_session.sh s19b      # session 19: its rows and warps, GPU tests, the rest of s18d
#   bash benchmarks/device_session.sh s19c      # session 19: the new defaults (pick_config, PREFILL_CODES auto)
#   bash benchmarks/device_session.sh s20a      # prepared in session 19: the Mosaic decode kernel at M = 16–64,
#                                               # prefill 256 ± narrow CTAs, the blocked SwiGLU's sweep
#   bash benchmarks/device_session.sh s20b      # session 20: prefill's wall time beyond the device's, SwiGLU 8/16 rows
#   bash benchmarks/device_session.sh s20c      # session 20: the host's side of a prefill call (probe_host.py)
#   bash benchmarks/device_session.sh s20d      # session 20: the standing table (prefill 2048 / 256, decode b1 / b8 / b32)
#   bash benchmarks/device_session.sh s20e      # session 20: s20d again with cuDNN attention for prompts only, bf16 too
#   bash benchmarks/device_session.sh s21a      # session 21: GPU tests of the W8A8 prefill, the GEMV's copy-only twin
#   bash benchmarks/device_session.sh s21b      # session 21: the standing table with W8A8 (bf16, W4.4A8, W8A8)
#   bash benchmarks/device_session.sh s21c      # session 21: 256-token prompts, bf16 / W4.4A8 / W8A8
#   bash benchmarks/device_session.sh s21d      # session 21: W4.4A8 with int8 prefill matrices, 2048 / 256 tokens
#   bash benchmarks/device_session.sh s21e      # session 21: rows a program of the prefill activation quantization
#   bash benchmarks/device_session.sh s21f      # session 21: the one-launch norm kernel at prefill ("all" codes)
#   bash benchmarks/device_session.sh s22a      # prepared: the standing table with session 21's defaults
#   bash benchmarks/device_session.sh s22b      # prepared: prefill 2048 / 256 with and without int8 prefill matrices
#   bash benchmarks/device_session.sh s22c      # prepared: the GEMV and its twin over a 4 GB footprint
#   bash benchmarks/device_session.sh s22d      # session 22: norms leaving the rsqrt to their consumers, GPU tests + b1/b8/b32
#   bash benchmarks/device_session.sh s22e      # session 22: W8A8 beside bf16 with them, then s22c's twin probe
#   bash benchmarks/device_session.sh s22f      # session 22: opt-in PDL on top of them (tests under the flag, b1/b8/b32)
#   bash benchmarks/device_session.sh s22g      # session 22: attention splits merged in the kernel, GPU tests + b1/b8
#   bash benchmarks/device_session.sh s23a      # session 23: the unpack kernel (tests, per layer vs XLA) + prefill 2048/256
#   bash benchmarks/device_session.sh s23b      # session 23: its block sizes again, prefill 2048/256 profiled (top 16)
#   bash benchmarks/device_session.sh s23c      # session 23: the prompt's cache write as one slice, prefill 2048/256
#   bash benchmarks/device_session.sh s23d      # session 23: the cache write as a scatter in the store's order
#   bash benchmarks/device_session.sh s23e      # session 23: GPU tests of the session's defaults
#   bash benchmarks/device_session.sh s23f      # prepared: the int8-cache GPU test, prefill rows with session 23's defaults
#   bash benchmarks/device_session.sh s24a      # prepared: three compute warpgroups in the prefill GEMM (tests, sweep)
#   bash benchmarks/device_session.sh s40a      # session 40: the fused decode attention at 8 / 16 warps, int8 KV cache
#   bash benchmarks/device_session.sh s40c      # session 40: ncu on the fused decode attention at b32 (int8, bf16 caches)
#   bash benchmarks/device_session.sh s40d      # session 40: the attention's first block loaded ahead (@peel), int8 cache
#   bash benchmarks/device_session.sh s40e      # session 40: the same on the bf16 cache (after s40d, warm)
#   bash benchmarks/device_session.sh s46a      # session 46: Qwen3's head norms in the fused attention (GPU tests), a
#                                               # Qwen3-8B shape end to end: bf16 beside W4.4A8 + int4 head
#   bash benchmarks/device_session.sh s46b      # prepared: test_gpu_model.py (Qwen3 case added), Qwen3-8B on an H100
#   bash benchmarks/device_session.sh s47a      # session 47: test_gpu_model.py (Qwen3 and Gemma 3 cases), Gemma-3-4B beside bf16
#   bash benchmarks/device_session.sh s48a      # session 48: cuDNN prefill tests (heads of 256, a scale) and the Gemma 2
#                                               # decode path on the GPU; Gemma-3-4B's prefill with and without cuDNN
#   bash benchmarks/device_session.sh s48b      # session 48: Gemma-3-4B with the sandwich norm in 8 / 16 warps, @sdefer
#                                               # (down_proj into the next norm: slower, removed; it is in commit 2c63103)
#   bash benchmarks/device_session.sh s48c      # session 48: Gemma-2-9B beside bf16, with and without @sw16
#   bash benchmarks/device_session.sh s48d      # session 48: Gemma-3-4B's b32 step profiled, bf16 and W4.4A8
#   bash benchmarks/device_session.sh s49a      # session 49: Gemma-3-4B with the int8 KV cache and @wcodes beside
#                                               # bf16 (session 48's s48e, never run whole, cut to ≈ 380 s; s48e removed)
#   bash benchmarks/device_session.sh s50a      # session 50: the wide-codes model test compiled, Llama-3-8B's standing
#                                               # rows beside bf16 (all within 1 % of the README's)
#   bash benchmarks/device_session.sh s50b      # session 50: test_norm, test_swiglu, test_attention, test_gpu_model
#                                               # whole and compiled
#   bash benchmarks/device_session.sh s51a      # session 51: the other kernel test files, compiled (cut at 204)
#   bash benchmarks/device_session.sh s51b      # session 51: the files s51a's limit cut
#   bash benchmarks/device_session.sh s51c      # session 51: whole generate requests, progressive among them
#   bash benchmarks/device_session.sh s51d      # session 51: whole requests on the int8 cache, and from 128 tokens
#   bash benchmarks/device_session.sh s51e      # session 51: the b1 decode attention step over long caches
#   bash benchmarks/device_session.sh s52a      # session 52: what streaming costs a request; s51e's bf16 rows
#   bash benchmarks/device_session.sh s52b      # session 52: streaming in chunks; 64-position attention blocks on
#                                               # a long request; b32 over long bf16 caches
#   bash benchmarks/device_session.sh s52c      # session 52: decoding in chunks of known trip count (sync_every)
#                                               # against EOS ids and streaming; long bf16 caches' 64 × 3 blocks
#   bash benchmarks/device_session.sh s52d      # prepared (≈ 400 s): streaming 8 / 16 / 32 steps a callback, and
#                                               # the callback unordered (@sunord); chunked decoding's GPU tests
#   bash benchmarks/device_session.sh tall      # session 10 (not yet run): 64-row decode tiles with split-K
#                                               # against the 32-row ones at M = 64, 128 (DECODE_SWEEP_TALL)
#   (the parts of the kernel forms and probes removed in session 34 — warm, prefetch, s32s, s32e, l2, persist — are in
#   commit 302f4a7)
#   bash benchmarks/device_session.sh crossover # M = 96..192: the 32-row decode tiles vs the 64×64 tiles
#                                               # (sets kernels.DECODE_MAX_M; 64, 128 and 256 are measured)
#
# Shapes are the Llama-3-8B linears as the model runs them (q/k/v and gate/up fused). Every number is a
# device-timer span (profiler), every row is checked against its reference first; the device name, jax
# version and the measured copy bandwidth head each table (at most 7 files come back, as the device tool
# allows). Copy the tables into benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
part="${1:-}"

header() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
  python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
}

case "$part" in
  tests)
    header
    timeout 540 python3 -m pytest -q -x tests/test_gemv.py tests/test_kernels.py tests/test_mgpu.py \
      tests/test_mgpu_decode.py tests/test_fuse.py tests/test_norm.py tests/test_attention.py tests/test_swiglu.py 2>&1 | tee "$out/tests.log"
    ;;
  kernels)
    header
    shapes=4096x6144,4096x4096,4096x28672,14336x4096  # qkv, o, gate+up, down
    python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 1 \
      --variants xla_bf16,api,gemv_qf --out "$out/m1" 2>&1 | tee -a "$out/kernels.log"
    python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 2,4,8 \
      --variants xla_bf16,api,gemv_1l --out "$out/m2_16" 2>&1 | tee -a "$out/kernels.log"
    python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 32,64,256,4096 \
      --variants xla_bf16,api,mixed_dt --large-m-variants xla_bf16,xla_int8,api,mixed_dt \
      --out "$out/m32_4096" 2>&1 | tee -a "$out/kernels.log"
    ;;
  e2e)
    header
    python3 benchmarks/bench_generate.py --variants bf16@plain,bf16,w4.4a8+h4 --profile \
      --budget-s 540 --out "$out/generation.md" 2>&1 | tee "$out/e2e.log"
    ;;
  profile)
    header
    python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4 --batches 1,32 --profile --profile-top 45 \
      --new-tokens 128 --repeats 2 --budget-s 330 --out "$out/gen_profile.md" 2>&1 | tee "$out/profile.log"
    ;;
  words)
    header
    timeout 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_gemv.py 2>&1 | tail -5 | tee "$out/tests.log"
    shapes=4096x6144,4096x4096,4096x28672,14336x4096
    b="python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes $shapes"
    timeout 230 $b --ms 2,4,8 --variants xla_bf16,mixed,mixed_b8,gemv_qf --out "$out/w2_8" 2>&1 | tee -a "$out/words.log"
    timeout 200 $b --ms 16,32,64 --variants xla_bf16,mixed,mixed_b8 --out "$out/w16_64" 2>&1 | tee -a "$out/words.log"
    ;;
  words_sweep)
    header
    timeout 280 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x28672 --ms 16 \
      --variants xla_bf16,mixed --sweep-decode-words --sweep-shapes 4096x28672,14336x4096 --sweep-ms 16,32 \
      --out "$out/wsweep" 2>&1 | tee "$out/wsweep.log"
    timeout 150 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x6144,4096x4096,4096x28672,14336x4096 \
      --ms 128,256 --variants xla_bf16,mixed,mixed_dt,api --out "$out/w128" 2>&1 | tee "$out/w128.log"
    ;;
  xq)
    header
    timeout 90 python3 -m pytest -q -x tests/test_kernels.py tests/test_gemv.py \
      -k "xla_activation or other_configs or groups_per_iteration" 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 480 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4,w4.4a8@xq+h4 --profile \
      --budget-s 470 --out "$out/generation.md" 2>&1 | tee "$out/e2e.log"
    ;;
  nq)  # session 11: the norms before mixed linears emit int8 codes (@normq) against plain norms (default)
    header
    timeout 70 python3 -m pytest -q -x tests/test_norm.py -k "quant" 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 450 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4,w4.4a8@normq+h4 --profile \
      --budget-s 440 --out "$out/generation.md" 2>&1 | tee "$out/e2e.log"
    ;;
  micro)  # session 13: the session-12 kernels alone first (GPU tests, bench_attention, bench_norm), so the
           # end-to-end call (e2e12) runs only the options that win
    header
    timeout 120 python3 -m pytest -q -x tests/test_attention.py tests/test_norm.py tests/test_swiglu.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 200 python3 benchmarks/bench_attention.py --out "$out/attention.md" 2>&1 | tee "$out/attention.log"
    timeout 150 python3 benchmarks/bench_norm.py --out "$out/norm.md" 2>&1 | tee "$out/norm.log"
    ;;
  e2e12)  # session 13: the model-level GPU tests of the session-12 kernels, then end to end, bf16 beside the
          # chosen options (VARIANTS=..., BATCHES=...)
    header
    timeout 90 python3 -m pytest -q tests/test_attention.py tests/test_norm.py tests/test_swiglu.py \
      -k "model or quant or swiglu" 2>&1 | tail -12 | tee "$out/tests.log"
    timeout 470 python3 benchmarks/bench_generate.py \
      --variants "${VARIANTS:-bf16@plain,bf16,w4.4a8@plain+h4,w4.4a8+h4}" \
      --batches "${BATCHES:-1,32}" --repeats 2 --prefill-len 256 --profile --budget-s 460 \
      --out "$out/generation.md" 2>&1 | tee "$out/e2e.log"
    ;;
  gputests)  # session 13: the attention, norm and SwiGLU tests on the GPU with the new defaults
    header
    timeout 300 python3 -m pytest -q tests/test_attention.py tests/test_swiglu.py tests/test_norm.py 2>&1 | tail -15 | tee "$out/tests.log"
    ;;
  prefill)  # session 13 (not yet run): where a short prefill goes (256 tokens: 0.42x bf16 end to end, below
            # the per-GEMM 0.44-0.73x; --profile shows busy / span against the wall time), b8 with the
            # session-13 defaults, and 2048 tokens again
    header
    timeout 290 python3 benchmarks/bench_generate.py --variants bf16@plain,bf16,w4.4a8+h4 --batches 8 --repeats 2 \
      --prefill-len 256 --profile --profile-top 12 --budget-s 280 --out "$out/prefill256.md" 2>&1 | tee "$out/prefill256.log"
    timeout 270 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1 --repeats 2 \
      --prefill-len 2048 --profile --profile-top 12 --budget-s 260 --out "$out/prefill2048.md" 2>&1 | tee "$out/prefill2048.log"
    ;;
  gemv14)  # session 14: GEMV variants at M = 1 on codes, then the attention step's splits
    header
    timeout 100 python3 -m pytest -q -x tests/test_gemv.py -k "groups_per_iteration" 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 330 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 \
      --shapes 4096x28672,14336x4096,4096x6144,4096x4096 --ms 1 \
      --variants "${VARIANTS:-xla_bf16,gemv_1l,gemv_1l_w8,gemvc,gemvc_wr,gemvc_pf,gemvc_pf2k,gemvc_pf1k,gemvc_w8,gemvc_w8b64,gemvc_w8pf2k,gemvc_w8b64pf2k,gemvc_b16,gemvc_b16pf}" \
      --out "$out/gemv14" 2>&1 | tee "$out/gemv14.log"
    timeout 120 python3 benchmarks/bench_attention.py --step-only --parts 8 --fused-splits 2,3,4,8,16 \
      --out "$out/attention14.md" 2>&1 | tee "$out/attention14.log"
    ;;
  gputests14)  # session 14: the new defaults (attention splits, GEMV prefetch) under the GPU tests, then where
              # a b1 step goes kernel by kernel
    header
    timeout 380 python3 -m pytest -q tests/test_gemv.py tests/test_attention.py tests/test_swiglu.py tests/test_norm.py \
      2>&1 | tail -15 | tee "$out/tests.log"
    timeout 170 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --batches 1 --new-tokens 128 --repeats 1 \
      --prefill-len 256 --profile --profile-top 45 --budget-s 160 --out "$out/profile14.md" 2>&1 | tee "$out/profile14.log"
    ;;
  e2e14)  # session 14: end to end only (the GPU tests ran in gputests14), bf16 beside VARIANTS
    header
    timeout 250 python3 benchmarks/bench_generate.py \
      --variants "${VARIANTS:-w4.4a8+h4,w4.4a8@ngemv+h4}" --batches "${BATCHES:-1}" \
      --repeats 2 --prefill-len 256 --profile --profile-top 12 --budget-s 240 --out "$out/generation.md" \
      2>&1 | tee "$out/e2e.log"
    ;;
  pdl)  # session 14 (not yet run): each GEMV pays ≈ 4 µs of fixed cost a launch (NOTES item 53); PDL overlaps
        # a kernel's start with the previous one's end
    header
    for v in false true; do
      XLA_FLAGS="--xla_gpu_enable_pdl=$v --xla_dump_to=/tmp/pdl_$v" timeout 100 python3 benchmarks/probe_pdl.py \
        /tmp/pdl_$v 2>&1 | tee -a "$out/pdl.log"
    done
    for v in false true; do
      XLA_FLAGS="--xla_gpu_enable_pdl=$v" timeout 200 python3 benchmarks/bench_generate.py \
        --variants bf16@plain,w4.4a8+h4 --batches 1 --repeats 2 --prefill-len 256 --profile --budget-s 190 \
        --out "$out/generation_pdl_$v.md" 2>&1 | tee -a "$out/pdl.log"
    done
    ;;
  s15a)  # session 15: the whole decode path on the GPU against the XLA reference (tests/test_gpu_model.py,
         # DEFER_DOWN included) and the norm kernels, then the PDL probe with the flag off / on
    header
    timeout 260 python3 -m pytest -q tests/test_gpu_model.py tests/test_norm.py 2>&1 | tail -15 | tee "$out/tests.log"
    for v in false true; do
      XLA_FLAGS="--xla_gpu_enable_pdl=$v --xla_dump_to=/tmp/pdl_$v" timeout 120 python3 benchmarks/probe_pdl.py \
        /tmp/pdl_$v 2>&1 | tee -a "$out/pdl.log"
    done
    ;;
  parity)  # session 15: the Pallas decode path against the XLA reference, kernel by kernel, bf16 and f32
    header
    timeout 500 python3 benchmarks/check_decode_parity.py 2>&1 | tee "$out/parity.log"
    ;;
  pdl15)  # session 15: our kernels with griddepcontrol (pallas_kernels/pdl.py) under XLA's PDL flag: the whole
          # decode path against the XLA reference with it on (a missing wait would show as a race), then b1
          # end to end: flag off (today's default), flag on alone, on + our waits/triggers, + weights first
    header
    MIXJAX_PDL=2 XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 120 python3 -m pytest -q tests/test_gpu_model.py \
      2>&1 | tail -6 | tee "$out/tests.log"
    timeout 110 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --batches 1 --repeats 2 \
      --prefill-len 256 --profile --budget-s 100 --out "$out/generation_off.md" 2>&1 | tail -25 | tee "$out/e2e_off.log"
    XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 260 python3 benchmarks/bench_generate.py \
      --variants w4.4a8@pdlw+h4,w4.4a8@pdl+h4,w4.4a8+h4 --batches 1 --repeats 2 --prefill-len 256 --profile \
      --budget-s 250 --out "$out/generation_on.md" 2>&1 | tail -40 | tee "$out/e2e_on.log"
    ;;
  pdl15b)  # session 15: @pdl at b8 and b32 against the default, each in its own process (flag on / off)
    header
    timeout 95 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --batches 8,32 --repeats 2 \
      --prefill-len 256 --budget-s 90 --out "$out/generation_off.md" 2>&1 | grep "decode batch" | tee "$out/e2e_off.log"
    XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 95 python3 benchmarks/bench_generate.py --variants w4.4a8@pdl+h4 \
      --batches 8,32 --repeats 2 --prefill-len 256 --budget-s 90 --out "$out/generation_on.md" 2>&1 \
      | grep "decode batch" | tee "$out/e2e_on.log"
    ;;
  gps)  # session 17: the Mosaic GPU prefill GEMM with two groups a pipeline step (MgpuConfig.gps), M = 2048 and
        # 4096, against XLA bf16 / int8 and the default; its tests on the GPU first
    header
    timeout 120 python3 -m pytest -q tests/test_mgpu.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 440 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 \
      --shapes ${SHAPES:-4096x28672,14336x4096,4096x6144,4096x4096} --ms 4096 --variants xla_bf16,xla_int8,mgpu_core,api \
      --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-shapes ${SWEEP_SHAPES:-4096x28672,14336x4096} \
      --sweep-ms ${SWEEP_MS:-2048,4096} --out "$out/gps" 2>&1 | tee "$out/gps.log"
    ;;
  prefill17)  # session 17: Nsight Compute on the prefill GEMM with two groups a step (the new default), then
              # prefill end to end, 2048 and 256 tokens, bf16 beside W4.4A8 (prefill only: --batches "")
    header
    OUT="$out" timeout 150 bash benchmarks/ncu_mgpu.sh gps=2 2>&1 | tee "$out/ncu.log"
    for n in 2048 256; do
      timeout 200 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4 --batches "" --repeats 3 \
        --prefill-len $n --profile --profile-top 12 --budget-s 190 --out "$out/prefill$n.md" 2>&1 | tee "$out/prefill$n.log"
    done
    ;;
  s17c)  # session 17: cuDNN flash attention for prefill (model.PREFILL_ATTENTION) and the prefill GEMM's turns
         # of two groups (gps=2 + pingpong): GPU tests, the GEMM sweep at M = 4096, prefill 2048 end to end
    header
    timeout 150 python3 -m pytest -q tests/test_attention.py tests/test_mgpu.py -k "prefill or mgpu" 2>&1 | tail -4 \
      | tee "$out/tests.log"  # (as run in session 17, -k prefill deselected most of test_mgpu.py)
    timeout 200 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x28672 --ms 4096 \
      --variants xla_bf16 --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-shapes 4096x28672,14336x4096 \
      --sweep-ms 4096 --out "$out/pp" 2>&1 | grep -v "^ *$" | tail -14 | tee "$out/pp.log"
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4 --batches "" --repeats 3 \
      --prefill-len 2048 --profile --profile-top 12 --budget-s 190 --out "$out/prefill2048.md" 2>&1 | tee "$out/prefill2048.log"
    ;;
  s17d)  # session 17: the GPU tests of the session's changes (cuDNN prefill attention with its causal fast path,
         # two groups a step, the decode path's model test), then prefill 2048 and 256 end to end
    header
    timeout 200 python3 -m pytest -q tests/test_attention.py tests/test_mgpu.py tests/test_gpu_model.py \
      -k "prefill or mgpu or matmul or weight or gpu_model or decode_path or bad" 2>&1 | tail -5 | tee "$out/tests.log"
    for n in 2048 256; do
      timeout 130 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4 --batches "" --repeats 3 \
        --prefill-len $n --profile --profile-top 8 --budget-s 120 --out "$out/prefill$n.md" 2>&1 | tee "$out/prefill$n.log"
    done
    ;;
  s18a)  # session 18 (not yet run): the prefill GEMM's int32 partials to f32 without I2FP (MgpuConfig.convert):
         # the Mosaic GPU tests (with the codes input), then the GEMM at M = 4096 and 2048 (i2f / magic /
         # magic_fma, two groups a step and one) beside XLA bf16 and int8
    header
    timeout 150 python3 -m pytest -q tests/test_mgpu.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 400 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x28672,14336x4096 \
      --ms 4096 --variants xla_bf16,xla_int8 --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-mgpu-grid convert \
      --sweep-shapes 4096x28672,14336x4096 --sweep-ms ${SWEEP_MS:-4096,2048} --out "$out/convert" 2>&1 \
      | grep -v "^ *$" | tail -40 | tee "$out/convert.log"
    ;;
  s18b)  # session 18 (not yet run): prefill 2048 end to end, bf16 beside W4.4A8 with each conversion, and with
         # the norms and SwiGLU handing the GEMMs codes (model.PREFILL_CODES)
    header
    timeout 560 python3 benchmarks/bench_generate.py --variants ${VARIANTS:-bf16,w4.4a8+h4,w4.4a8@magic+h4,w4.4a8@magicfma+h4,w4.4a8@magic@pcodes+h4} \
      --batches "" --repeats 3 --prefill-len 2048 --profile --profile-top 8 --budget-s 540 \
      --out "$out/prefill2048.md" 2>&1 | tee "$out/prefill2048.log"
    ;;
  s18c)  # session 18 (not yet run): Nsight Compute on the prefill GEMM with each magic conversion (is the
         # I2FP pipe what held the tensor pipe at 46 %? item 63; the i2f baseline is item 60's report)
    header
    OUT="$out" timeout 330 bash benchmarks/ncu_mgpu.sh convert=magic convert=magic_fma 2>&1 | tee "$out/ncu.log"
    ;;
  s18d)  # session 18 (not yet run): CTA tiles for short prompts (M = 256, 512: the default 128×128 CTA gives 64
         # CTAs for N = 4096 on 132 SMs) beside XLA bf16 and the whole api path
    header
    timeout 300 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x4096,4096x6144,4096x28672,14336x4096 \
      --ms 256,512 --variants xla_bf16,api --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-mgpu-grid medium \
      --sweep-shapes 4096x4096,4096x6144,4096x28672,14336x4096 --sweep-ms 256,512 --out "$out/medium" 2>&1 \
      | grep -v "^ *$" | tail -50 | tee "$out/medium.log"
    ;;
  s19a)  # session 19: SwiGLU's blocked form handing down_proj codes at prefill (model.PREFILL_CODES = "auto"):
         # the GPU tests, the kernel against XLA's SiLU·mul + the GEMM's quantization launch at 256 / 2048 rows,
         # then prefill 2048 and 256 end to end, bf16 beside the default and @pswiglu
    header
    timeout 150 python3 -m pytest -q tests/test_swiglu.py tests/test_norm.py -k "swiglu or prefill_codes" 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 120 python3 benchmarks/bench_norm.py --swiglu-only --ms 256,2048 --parts 0 --chunks 2 --calls 16 \
      --out "$out/swiglu.md" 2>&1 | tee "$out/swiglu.log"
    for len in 2048 256; do
      timeout 200 python3 benchmarks/bench_generate.py --variants ${VARIANTS:-bf16,w4.4a8+h4,w4.4a8@pswiglu+h4} \
        --batches "" --repeats 3 --prefill-len $len --profile --profile-top 8 --budget-s 190 \
        --out "$out/prefill$len.md" 2>&1 | grep -v "^ *$" | tail -30 | tee "$out/prefill$len.log"
    done
    ;;
  s19b)  # session 19: the GPU tests of the blocked SwiGLU and PREFILL_CODES, the blocked form's rows and warps at
         # 256 / 2048 rows, and the rest of s18d's CTA tiles (4096→28672, 14336→4096 at M = 256, 512)
    header
    timeout 150 python3 -m pytest -q tests/test_swiglu.py tests/test_norm.py -k "swiglu or prefill_codes" 2>&1 | tail -25 | tee "$out/tests.log"
    timeout 120 python3 benchmarks/bench_norm.py --swiglu-only --ms 256,2048 --parts 0 --chunks 2 --calls 16 \
      --out "$out/swiglu.md" 2>&1 | tee "$out/swiglu.log"
    timeout 260 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x4096 --ms 256 \
      --variants xla_bf16 --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-mgpu-grid medium \
      --sweep-shapes 4096x28672,14336x4096 --sweep-ms 256,512 --out "$out/medium" 2>&1 \
      | grep -v "^ *$" | tail -30 | tee "$out/medium.log"
    ;;
  s19c)  # session 19: the new defaults (narrow CTAs at short prompts, SwiGLU codes at prefill): the Mosaic
         # GPU tests, prefill 256 (beside @wide) and 2048 end to end against bf16
    header
    timeout 90 python3 -m pytest -q tests/test_mgpu.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 90 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4,w4.4a8@wide+h4 \
      --batches "" --repeats 3 --prefill-len 256 --profile --profile-top 6 --budget-s 85 \
      --out "$out/prefill256.md" 2>&1 | grep -v "^ *$" | tail -24 | tee "$out/prefill256.log"
    timeout 65 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4 \
      --batches "" --repeats 3 --prefill-len 2048 --profile --profile-top 6 --budget-s 60 \
      --out "$out/prefill2048.md" 2>&1 | grep -v "^ *$" | tail -20 | tee "$out/prefill2048.log"
    ;;
  s20a)  # prepared in session 19 (not yet run): (1) the Mosaic GPU decode kernel (swapped operands, the int4
         # unpacked in registers, never timed on the H200 past M = 1) at M = 16–64 beside the api's Triton tiles
         # and XLA bf16 — the b32 target needs the M = 32 GEMMs near the weight-read floor; (2) prefill 256 with
         # and without item 67's narrow CTAs, device split kept; (3) the blocked SwiGLU's rows and warps
    header
    timeout 90 python3 -m pytest -q tests/test_mgpu_decode.py 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 240 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 \
      --shapes 4096x6144,4096x4096,4096x28672,14336x4096 --ms ${MS:-16,32,64} \
      --variants ${VARIANTS:-xla_bf16,api,mgpu_decode,mgpu_decode_fold} --out "$out/decode" 2>&1 \
      | grep -v "^ *$" | tail -60 | tee "$out/decode.log"
    timeout 100 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4,w4.4a8@wide+h4 \
      --batches "" --repeats 3 --prefill-len 256 --profile --profile-top 10 --budget-s 95 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    timeout 60 python3 benchmarks/bench_norm.py --swiglu-only --ms 2048 --parts 0 --chunks 2 --calls 8 \
      --out "$out/swiglu.md" 2>&1 | tail -8 | tee "$out/swiglu.log"
    ;;
  s20b)  # session 20: where prefill's wall time beyond the device's goes (pipelined calls, the params'
         # dispatch), 256 and 2048 tokens; the blocked SwiGLU at 8 and 16 rows a program (kernel and end to end)
    header
    timeout 60 python3 -m pytest -q tests/test_swiglu.py 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 60 python3 benchmarks/bench_norm.py --swiglu-only --ms 256,2048 --parts 0 --chunks 2 --calls 8 \
      --out "$out/swiglu.md" 2>&1 | tail -14 | tee "$out/swiglu.log"
    timeout 110 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4 \
      --batches "" --repeats 5 --prefill-len 256 --profile --profile-top 4 --budget-s 100 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16,w4.4a8+h4,w4.4a8@swb16+h4 \
      --batches "" --repeats 5 --prefill-len 2048 --profile --profile-top 4 --budget-s 190 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    ;;
  s20c)  # session 20: the host's side of one blocked prefill call (probe_host.py), bf16 and W4.4A8 at 256 tokens;
         # W4.4A8 with XLA's command buffers (CUDA graphs) off; the SwiGLU tests with BLOCK_ROWS = 16
    header
    timeout 60 python3 -m pytest -q tests/test_swiglu.py 2>&1 | tail -3 | tee "$out/tests.log"
    for v in bf16 w4.4a8+h4; do
      timeout 90 python3 benchmarks/probe_host.py --variant $v --prefill-len 256 > "$out/host_$v.log" 2>&1
      head -5 "$out/host_$v.log"
    done
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 130 python3 benchmarks/bench_generate.py \
      --variants bf16,w4.4a8+h4 --batches "" --repeats 5 --prefill-len 256 --budget-s 120 \
      --out "$out/nocmdbuf.md" 2>&1 | grep "prefill batch" | tee "$out/nocmdbuf.log"
    ;;
  s20d)  # session 20: the standing end-to-end table with this version's defaults: XLA's bf16 beside W4.4A8 (+ int4
         # head), prefill 2048 and decode b1 / b8 / b32 in one call, then prefill 256
    header
    timeout 400 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 3 --budget-s 390 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    timeout 110 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 \
      --batches "" --repeats 5 --prefill-len 256 --budget-s 100 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s20e)  # session 20: decode with cuDNN attention gated to prompt-shaped chunks (XLA's bf16 step had taken it at
         # every decode step since session 17): bf16@plain and bf16 beside W4.4A8, prefill 2048 and b1 / b8 / b32
    header
    timeout 420 python3 benchmarks/bench_generate.py --variants bf16@plain,bf16,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 3 --budget-s 410 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s21a)  # session 21: the W8A8 prefill without its copy pass (GPU tests), then the M = 1 GEMV's copy-only twin
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu.py tests/test_fuse.py 2>&1 | tail -5 \
      | tee "$out/tests.log"
    timeout 300 python3 benchmarks/probe_twin.py 2>&1 | tee "$out/twin.log"
    ;;
  s21b)  # session 21: the standing end-to-end table with W8A8 beside it (the issue's three variants)
    header
    timeout 440 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w8a8+h8 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 3 --budget-s 430 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s21c)  # session 21: 256-token prompts, the three variants (W8A8 now without its copy pass)
    header
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w8a8+h8 \
      --batches "" --repeats 7 --prefill-len 256 --profile --profile-top 4 --budget-s 190 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s21d)  # session 21: W4.4A8 holding int8 prefill matrices (`@pint8`) beside W4.4A8 and bf16, 2048 and 256 tokens
    header
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu.py -k "int8_prefill or all_8bit" 2>&1 \
      | tail -3 | tee "$out/tests.log"
    timeout 260 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pint8+h4 --batches 1 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 3 --budget-s 250 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pint8+h4 \
      --batches "" --repeats 7 --prefill-len 256 --budget-s 140 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s21e)  # session 21: rows a program of the prefill GEMM's activation quantization (mgpu.QUANT_ROWS)
    header
    timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "activation_quant or quant_kernel" \
      2>&1 | tail -2 | tee "$out/tests.log"
    timeout 120 python3 benchmarks/bench_norm.py --ms 256,2048 --parts 0 --prefill-quant 128,64,32,16 \
      --out "$out/quant_rows.md" 2>&1 | tee "$out/quant_rows.log"
    timeout 230 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@qr32+h4,w4.4a8@qr16+h4 \
      --batches "" --repeats 7 --prefill-len 2048 --profile --profile-top 6 --budget-s 220 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    ;;
  s21f)  # session 21: the one-launch norm kernel at prefill (PREFILL_CODES = "all", one program per row)
    header
    timeout 100 python3 benchmarks/bench_norm.py --ms 256,2048 --parts 0,-1 --prefill-quant 32 --warps 4,8 \
      --out "$out/prefill_norm.md" 2>&1 | tee "$out/prefill_norm.log"
    timeout 130 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@pcodes+h4 \
      --batches "" --repeats 7 --prefill-len 2048 --profile --profile-top 8 --budget-s 125 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    timeout 100 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@pcodes+h4 \
      --batches "" --repeats 7 --prefill-len 256 --profile --profile-top 8 --budget-s 95 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s22a)  # next session: the standing table with session 21's defaults (norm codes at prefill, 32-row quantization)
    header
    timeout 440 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w8a8+h8 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 3 --budget-s 430 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s22b)  # next session: prompts of 2048 and 256 tokens with the int8 prefill matrices beside the defaults
    header
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pint8+h4,w8a8+h8 \
      --batches "" --repeats 7 --prefill-len 2048 --profile --profile-top 3 --budget-s 190 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    timeout 180 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pint8+h4,w8a8+h8 \
      --batches "" --repeats 7 --prefill-len 256 --profile --profile-top 3 --budget-s 170 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s22c)  # next session: the GEMV and its twin with the weight copies spread over 4 GB (the model's footprint)
    header
    timeout 400 python3 benchmarks/probe_twin.py --programs 4096 --block-n 32 --mb 4000 2>&1 | tee "$out/twin4g.log"
    ;;
  s22d)  # session 22: the norms that leave the row's rsqrt to the attention / SwiGLU kernels (GPU tests), then
    # b1 / b8 / b32 against the two-launch norms (`@norm2l`) and bf16
    header
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_norm.py tests/test_swiglu.py tests/test_gpu_model.py \
      tests/test_attention.py -k "codes or defer or silu or attend_new_tokens or gpu or decode" 2>&1 | tail -4 \
      | tee "$out/tests.log"
    timeout 400 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@norm2l+h4 --batches 1,8,32 \
      --repeats 3 --prefill-len 2048 --profile --profile-top 4 --budget-s 390 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s22e)  # session 22: W8A8 with the deferred-rsqrt norms beside bf16 (the standing table's third row), then the
    # GEMV and its copy-only twin over a 4 GB footprint (s22c)
    header
    timeout 260 python3 benchmarks/bench_generate.py --variants bf16@plain,w8a8+h8 --batches 1,8,32 \
      --repeats 3 --prefill-len 2048 --profile --profile-top 4 --budget-s 250 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    timeout 300 python3 benchmarks/probe_twin.py --programs 4096 --block-n 32 --mb 4000 2>&1 | tee "$out/twin4g.log"
    ;;
  s22f)  # session 22: the opt-in PDL (item 58) on top of the one-launch norms: the decode path against XLA under
    # the flag (a missing wait would show as a race), then b1 / b8 / b32 with it, bf16 without it
    header
    MIXJAX_PDL=1 XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 120 python3 -m pytest -q -p no:cacheprovider \
      tests/test_gpu_model.py 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 110 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 1,8,32 --repeats 3 \
      --prefill-len 256 --budget-s 100 --out "$out/bf16.md" 2>&1 | grep "decode batch" | tee "$out/bf16.log"
    XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 200 python3 benchmarks/bench_generate.py \
      --variants w4.4a8+h4,w4.4a8@pdl+h4 --batches 1,8,32 --repeats 3 --prefill-len 256 --profile --budget-s 190 \
      --out "$out/pdl.md" 2>&1 | grep "decode batch" | tee "$out/pdl.log"
    ;;
  s22g)  # session 22: the fused attention merging its splits in the launch (GPU tests: the kernel against XLA's
    # merge, again and again, and the whole decode path), then b1 / b8 against `@xmerge` (XLA's merge).
    # Ran on commit 7d77180; the merge was slower (NOTES item 81) and is reverted (f902334): this no longer runs
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_gpu_model.py \
      -k "merge or attend_new_tokens or gpu or decode" 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 300 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@xmerge+h4 --batches 1,8 \
      --repeats 3 --prefill-len 256 --profile --profile-top 4 --budget-s 290 \
      --out "$out/generation.md" 2>&1 | grep "decode batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s23a)  # session 23: the int4 → int8 unpack as a Pallas kernel (pallas_kernels/unpack.py): its tests and the
    # prefill GEMM's on the GPU, the kernel against XLA's pass per layer, then prefill 2048 / 256 against `@xunpack`
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_unpack.py tests/test_mgpu.py 2>&1 | tail -3 \
      | tee "$out/tests.log"
    timeout 150 python3 benchmarks/bench_unpack.py --out "$out/unpack.md" 2>&1 | tee "$out/unpack.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@xunpack+h4 \
      --batches "" --repeats 7 --prefill-len 2048 --profile --profile-top 4 --budget-s 140 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    timeout 120 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@xunpack+h4 \
      --batches "" --repeats 7 --prefill-len 256 --budget-s 110 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s23b)  # session 23: the unpack's block sizes around 16 rows, then prefill 2048 / 256 with the new default
    # (16 rows × 4 groups) against `@xunpack`, each profiled (the top 16 kernels: where a short prompt's time goes)
    header
    timeout 120 python3 benchmarks/bench_unpack.py --out "$out/unpack.md" 2>&1 | tee "$out/unpack.log"
    for len in 2048 256; do
      timeout 170 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@xunpack+h4 \
        --batches "" --repeats 7 --prefill-len $len --profile --profile-top 16 --budget-s 160 \
        --out "$out/prefill$len.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill$len.log"
    done
    ;;
  s23c)  # session 23: a prompt's keys and values written by one dynamic-update-slice (CACHE_WRITE "slice", then the
    # default as CACHE_WRITE_SLICE; ran on 3c7e822: 129 launches more, the cond's host round trips; removed, so
    # this no longer runs as written):
    # the cache tests and the GPU model test, then prefill 2048 / 256 against `@scatterkv`, bf16 and W4.4A8
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_gpu_model.py 2>&1 | tail -3 \
      | tee "$out/tests.log"
    for len in 2048 256; do
      timeout 200 python3 benchmarks/bench_generate.py \
        --variants bf16@plain,bf16@plain@scatterkv,w4.4a8+h4,w4.4a8@scatterkv+h4 \
        --batches "" --repeats 7 --prefill-len $len --profile --profile-top 12 --budget-s 190 \
        --out "$out/prefill$len.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill$len.log"
    done
    ;;
  s23d)  # session 23: the chunk's cache write as a scatter in the store's order (`@kvt`, CACHE_WRITE "scatter_t")
    # against XLA's scatter (`@scatterkv`), bf16 and W4.4A8, prefill 2048 / 256 profiled
    header
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k cache_write 2>&1 | tail -2 \
      | tee "$out/tests.log"
    for len in 2048 256; do
      timeout 220 python3 benchmarks/bench_generate.py \
        --variants bf16@plain@scatterkv,bf16@plain@kvt,w4.4a8@scatterkv+h4,w4.4a8@kvt+h4 \
        --batches "" --repeats 7 --prefill-len $len --profile --profile-top 12 --budget-s 210 \
        --out "$out/prefill$len.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill$len.log"
    done
    ;;
  s23e)  # session 23: the session's defaults on the GPU (the unpack kernel, the cache write in the store's order):
    # the model tests (f32 dots in full precision now), the unpack and GEMM tests, the whole decode path
    header
    timeout 300 python3 -m pytest -q -rf -p no:cacheprovider tests/test_model.py tests/test_unpack.py \
      tests/test_gpu_model.py tests/test_mgpu.py 2>&1 | tail -12 | tee "$out/tests.log"
    ;;
  s23f)  # next session: the int8 cache test that fails on the H200 only (its message now names the element), then
    # s22b's prefill rows with session 23's defaults (unpack kernel, cache write in the store's order): do
    # `--int8-prefill` and W8A8 now pass 1.3× bf16 at 2048 tokens?
    header
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k int8_cache_codes 2>&1 | tail -8 \
      | tee "$out/tests.log"
    for len in 2048 256; do
      timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pint8+h4,w8a8+h8 \
        --batches "" --repeats 7 --prefill-len $len --profile --profile-top 3 --budget-s 190 \
        --out "$out/prefill$len.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill$len.log"
    done
    ;;
  s24a)  # prepared (session 23): three compute warpgroups in the prefill GEMM (MgpuConfig.wgs = 3, NOTES item 86):
    # the Mosaic GPU tests (two wgs = 3 cases run only on the GPU), then the GEMM alone at M = 3072 and 1536
    # (multiples of both 128- and 192-row CTAs) beside XLA bf16 and int8
    header
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 360 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x28672,14336x4096 \
      --ms 3072 --variants xla_bf16,xla_int8 --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-mgpu-grid wgs \
      --sweep-shapes 4096x28672,14336x4096,4096x6144,4096x4096 --sweep-ms 3072,1536 --out "$out/wgs" 2>&1 \
      | grep -v "^ *$" | tail -40 | tee "$out/wgs.log"
    ;;
  s24b)  # session 24: the 192-row CTAs where pick_config's estimate prefers them (THREE_WG_CONFIG), the last row
    # tile overlapping instead of padding; the int8 cache test that fails on the H200 only (its message names the
    # element); the GEMM at M = 2048 default against THREE_WG_CONFIG; prefill 2048 without and with the new tiles
    # (@wg3; if faster, set mgpu.THREE_WGS = True), with the int8 matrices and W8A8. Prepared in session 24, whose
    # device loans were paused before this call. Session 26 added the per-token activation scales to the GEMM sweep
    # (MgpuConfig.act_scale="token": what MixLLM's per-group activation scales cost in the rescale)
    header
    timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_model.py -k int8_cache_codes 2>&1 | tail -8 \
      | tee "$out/tests.log"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu.py -k "rows_not or pick_config or takes_codes \
      or within_bf16 or group_matmul_matches or token" 2>&1 | tail -4 | tee -a "$out/tests.log"
    # session 26: the grid "token" is "pick" with each tile also at one activation scale a row (act_scale="token")
    timeout 150 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x6144 --ms 2048 \
      --variants xla_bf16 --sweep-mgpu --sweep-mgpu-variant mgpu_core --sweep-mgpu-grid token \
      --sweep-shapes 4096x28672,14336x4096,4096x6144,4096x4096 --sweep-ms 2048 --out "$out/pick" 2>&1 \
      | grep "mgpu_core\|xla_bf16" | tee "$out/pick.log"
    timeout 280 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@wg3+h4,w4.4a8@pint8+h4,w8a8+h8 \
      --batches "" --repeats 7 --prefill-len 2048 --profile --profile-top 3 --budget-s 270 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    ;;
  s24c)  # prepared in session 24: short prompts through the swapped-operand kernel in column tiles
    # (mgpu_decode, M > 64: the packed weight unpacked in registers by each tile of 64 or 128 activation rows, no
    # int8 copy of the weight first), against today's prefill path (unpack + Mosaic GEMM) and XLA bf16; then a
    # 256-token prefill with it (@short: column tiles of 128 rows, @short64: of 64). If it wins, set
    # api.MGPU_SHORT_M and run s24d (tile widths and stages)
    header
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu_decode.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 150 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 \
      --shapes 4096x6144,4096x4096,4096x28672,14336x4096 --ms 256,512 \
      --variants xla_bf16,mgpu,mgpu_decode,mgpu_decode_fold,mgpu_decode64 --out "$out/short" 2>&1 | grep -v "^ *$" \
      | tail -30 \
      | tee "$out/short.log"
    timeout 280 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@short+h4,w4.4a8@short64+h4 \
      --batches "" --repeats 7 --prefill-len 256 --profile --profile-top 3 --budget-s 270 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    ;;
  s26c)  # session 26: s24c without its 256-token prefill (≈ 270 s at most), for what budget is left after s24b;
    # session 27 added the Pallas kernels under shard_map (what several GPUs run) on a one-GPU mesh
    header
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu_decode.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_parallel.py -k "shard_map or one_device" 2>&1 \
      | tail -4 | tee -a "$out/tests.log"
    timeout 150 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 \
      --shapes 4096x6144,4096x4096,4096x28672,14336x4096 --ms 256,512 \
      --variants xla_bf16,mgpu,mgpu_decode,mgpu_decode_fold,mgpu_decode64 --out "$out/short" 2>&1 | grep -v "^ *$" \
      | tail -30 | tee "$out/short.log"
    ;;
  s27a)  # session 27: the GPU-only failures of s24b / s26c with their messages, and the parallel tests in full
    header
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_parallel.py -k "shard_map or one_device" 2>&1 \
      | tail -60 | tee "$out/parallel.log"
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu.py -k token_activation_scales_lower 2>&1 \
      | grep -v "^    " | tail -25 | tee "$out/token.log"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu_decode.py -k short_prompt_takes_codes 2>&1 \
      | grep -v "^    " | tail -25 | tee "$out/short.log"
    ;;
  s27b)  # session 27: the three-CPU-device comparison on this many-core host, its numbers printed
    header
    script=$(python3 -c 'import sys; sys.path.insert(0, "tests"); import test_parallel; print(test_parallel.THREE_DEVICES)')
    XLA_FLAGS=--xla_force_host_platform_device_count=3 JAX_PLATFORMS=cpu timeout 150 python3 -c "$script" 2>&1 \
      | grep RESULT | tee "$out/three.log"
    ;;
  s28a)  # prepared in sessions 27-28: the per-token prefill (`mgpu.PREFILL_ACT_SCALE = "token"`, @ptok) end to end,
    # with the producers' per-row codes (session 28), and per token in o_proj and gate/up only (@psel, "selective")
    header
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_mgpu.py tests/test_swiglu.py tests/test_norm.py \
      tests/test_kernels.py -k "prefill_token or within_bf16 or one_scale_a_row or row_take or matches_reference \
      or row_quant_kernel or selective" 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 120 python3 benchmarks/bench_norm.py --ms 2048 --parts -1 --warps 8 --chunks "" --row-scale --calls 8 \
      --out "$out/producers.md" 2>&1 | grep "xla_\|row\|pallas_w\|swiglu_b16" | tee "$out/producers.log"
    timeout 310 python3 benchmarks/bench_generate.py \
      --variants bf16@plain,w4.4a8+h4,w4.4a8@ptok+h4,w4.4a8@psel+h4 \
      --batches "" --repeats 7 --prefill-len 2048 --profile --profile-top 3 --budget-s 300 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    ;;
  s29a)  # s28a's decisive part alone, for a budget that no longer holds s28a: the 2048-token prefill, bf16 beside
    # W4.4A8 per group (MixLLM), per token (@ptok) and selective (@psel)
    header
    timeout 330 python3 benchmarks/bench_generate.py \
      --variants bf16@plain,w4.4a8+h4,w4.4a8@ptok+h4,w4.4a8@psel+h4 \
      --batches "" --repeats 5 --prefill-len 2048 --profile --profile-top 3 --budget-s 320 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    ;;
  s29b)  # the smallest form of s29a, for what a few refused starts leave: bf16, MixLLM and selective at 2048 tokens
    header
    timeout 230 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@psel+h4 \
      --batches "" --repeats 3 --prefill-len 2048 --budget-s 220 \
      --out "$out/prefill2048.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048.log"
    ;;
  s30a)  # session 30: static activation scales on the kernels (GPU tests of the static paths; the speed of
    # `@static` beside bf16 and MixLLM's dynamic scales: decode batch 1 and the 2048-token prefill)
    header
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_static.py tests/test_mgpu.py -k "static" 2>&1 \
      | tail -4 | tee "$out/tests.log"
    timeout 330 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@static+h4 \
      --batches 1 --repeats 5 --prefill-len 2048 --budget-s 320 \
      --out "$out/static.md" 2>&1 | grep "decode\|prefill\|tok/s |" | tee "$out/static.log"
    ;;
  s30b)  # after session 30: the per-token prefill with SwiGLU's one-walk row form (NOTES item 100), with and without
    # the int8 matrices, and the GPU tests of session 30's fixes (f32 references at HIGHEST)
    header
    timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_static.py tests/test_mgpu.py \
      -k "static or prefill_token or one_scale_a_row" 2>&1 | tail -3 | tee "$out/tests.log"
    timeout 170 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8@ptok+h4,w4.4a8@ptok@pint8+h4 \
      --batches "" --repeats 5 --prefill-len 2048 --budget-s 160 \
      --out "$out/ptok.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/ptok.log"
    ;;
  s31a)  # session 31: decode with an int8 KV cache (issue 6, item 3; `--kv-int8`) at batch 1 and 32 beside the bf16
    # cache, bf16 (XLA, bf16 cache) in the first run; profiled (the b32 step's attention took 497 µs in session 22)
    header
    timeout 210 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,32 --repeats 3 \
      --prefill-len 256 --profile --profile-top 4 --budget-s 200 --out "$out/kv16.md" 2>&1 \
      | grep "decode\|tok/s |\|attention" | tee "$out/kv16.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --kv-int8 --batches 1,32 --repeats 3 \
      --prefill-len 256 --profile --profile-top 4 --budget-s 140 --out "$out/kv8.md" 2>&1 \
      | grep "decode\|tok/s |\|attention" | tee "$out/kv8.log"
    ;;
  s31h)  # session 31, for an H100 (kind nvidia-h100-x1; the issues name the H100, sessions 8-30 got H200s): the standing
    # table, XLA's bf16 beside W4.4A8 + int4 head, decode b1 / b8 / b32 and prefill 2048, one process each, profiled
    header
    timeout 420 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 3 --budget-s 410 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s31)  # session 31's first call on whatever machine comes: an H100 runs the standing table (s31h); an H200 runs the
    # GPU tests of session 30's fixes and then s31a (decode with the int8 KV cache)
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
      bash "$0" s31h
    else
      header
      timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_static.py tests/test_mgpu.py \
        -k "static or prefill_token or one_scale_a_row" 2>&1 | tail -3 | tee "$out/tests.log"
      bash "$0" s31a | grep -v "^jax\|^NVIDIA"
    fi
    ;;
  s32k)  # prepared in session 31, for an H100 (kind nvidia-h100-x1): issue 5's kernel table on the GPU it names (the
    # last H100 kernel table is session 6's): the API's dispatch against XLA bf16 at M = 1 and 16, and against XLA bf16
    # and int8 at M = 4096, on the four Llama-3-8B linears (device timers, weights rotated past L2)
    header
    shapes=4096x6144,4096x4096,4096x28672,14336x4096  # qkv, o, gate+up, down
    timeout 240 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 1,16 \
      --variants xla_bf16,api --out "$out/m1_16" 2>&1 | tail -24 | tee "$out/m1_16.log"
    timeout 240 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 4096 \
      --variants xla_bf16,api --large-m-variants xla_bf16,xla_int8,api --out "$out/m4096" 2>&1 | tail -16 \
      | tee "$out/m4096.log"
    ;;
  s31b)  # session 31, calls 3-5 on the warm H100 as they ran: the prompt's activation scales at 2048 tokens beside bf16,
    # 256-token prompts, W8A8's standing row (its ratios against the bf16 rows of s31h / this call), per-token scales
    # (≈ 300 s of work on the H100; the timeouts are upper bounds)
    header
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8@psel+h4,w4.4a8@psel@pint8+h4 \
      --batches "" --repeats 5 --prefill-len 2048 --budget-s 190 --out "$out/psel2048.md" 2>&1 | grep "prefill batch"
    timeout 110 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches "" --repeats 5 \
      --prefill-len 256 --budget-s 100 --out "$out/prefill256.md" 2>&1 | grep "prefill batch"
    timeout 250 python3 benchmarks/bench_generate.py --variants w8a8+h8 --batches 1,8,32 --repeats 2 --prefill-len 2048 \
      --profile --profile-top 3 --budget-s 240 --out "$out/w8a8.md" 2>&1 | grep "batch"
    timeout 200 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@ptok+h4,w4.4a8@ptok@pint8+h4 \
      --batches "" --repeats 5 --prefill-len 2048 --budget-s 190 --out "$out/ptok.md" 2>&1 | grep "prefill batch"
    ;;
  s32a)  # prepared in session 31: the fused attention step's blocks in flight at b8 / b32 (`num_stages` 1, 2, 3, with
    # 128- and 64-position blocks), bf16 and int8 caches. At b32 the step took 624 µs of a 4.22 ms H100 decode step with
    # the bf16 cache, 485 with int8 (NOTES item 107); offline (ptx_stats.py) a program takes 40 / 72 / 136 KB of
    # shared memory at 1 / 2 / 3 stages of 128 bf16 positions
    header
    timeout 300 python3 benchmarks/bench_attention.py --batches 8,32 --lengths 384 --int8 --step-only --parts 0 \
      --fused-stages 1,3 --out "$out/attention_stages.md" 2>&1 | tail -40 | tee "$out/attention_stages.log"
    ;;
  s32m)  # session 32: the embedded model's W4.4A8 checkpoint on the GPU (issue 6 item 4: its perplexity equals the CPU
    # value). The device reaches no hub and takes at most 64 MiB of carried files a call, so the checkpoint travels in
    # parts on one warm machine. Here: `mixjax convert SmolLM2-135M-Instruct.Q4_1.gguf /tmp/ck44 --samples 8 --seq-len
    # 256 --head-bits 4`, `tar cf ck44.tar -C /tmp ck44 && split -b 40M ck44.tar .cache/ck44.tar.part_`, and the evals
    # wheel's wikipedia_5.jsonl copied to .cache/gpuck/. Call 1 (carry .cache/ck44.tar.part_aa): `mkdir -p /tmp/mj && cp
    # .cache/ck44.tar.part_aa /tmp/mj/`; call 2 (carry .cache/ck44.tar.part_ab and .cache/gpuck): this entry
    header
    r=$PWD
    (cd /tmp/mj && cat ck44.tar.part_aa "$r/.cache/ck44.tar.part_ab" | tar x) || exit 1
    export MIXJAX_CACHE=/tmp/mjc PYTHONPATH="$r"
    cli() { python3 -c 'import sys; from mixjax.cli import main; sys.exit(main())' "$@"; }
    for impl in pallas xla; do
      cli eval --model /tmp/mj/ck44 --data .cache/gpuck/wikipedia_5.jsonl --seq-len 256 --max-tokens 8192 \
        --implementation "$impl" 2>&1 | tail -1 | tee -a "$out/real_model.log"
      cli generate --model /tmp/mj/ck44 --prompt "What is the capital of France? Answer in one sentence." \
        --max-new-tokens 40 --implementation "$impl" 2>&1 | tee -a "$out/real_model.log"
    done
    ;;
  s32t)  # session 32: the GPU-only tests and the kernel files that hold them (CI skips 38 cases without a GPU): the
    # whole model's decode path compiled, the CUDA lowerings, the Mosaic GPU prefill and decode GEMMs, static scales,
    # attention. All six files take more than one call (session 32: 89 of 134 cases in 560 s on an H100, the first four
    # files whole): s32t runs them, s32u the last two
    header
    timeout 560 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py tests/test_gpu_lowering.py \
      tests/test_mgpu.py tests/test_static.py 2>&1 | tail -25 | tee "$out/gputests.log"
    ;;
  s32u)  # the rest of s32t: the attention kernels and the Mosaic GPU decode kernel, compiled
    header
    timeout 560 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_mgpu_decode.py 2>&1 \
      | tail -25 | tee "$out/gputests2.log"
    ;;
  s33k)  # session 33: the decode tiles' small per-group operands two iterations ahead (`GemmConfig.prefetch_meta=3`; item
    # 40's ncu: at distance one their first use still waited a whole iteration). GPU tests of the new loop first, then
    # M = 16, 32 on the four layer shapes against the default (api) and XLA bf16 (as run, also the distance-one form
    # mixed_pf2, removed since)
    header
    timeout 150 python3 -m pytest -q -x tests/test_kernels.py -k "two_iterations_ahead or other_configs" 2>&1 | tail -3 \
      | tee "$out/tests.log"
    shapes=4096x6144,4096x4096,4096x28672,14336x4096
    timeout 300 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 16,32 \
      --variants xla_bf16,api,mixed_pf3,mixed_pf3s2,mixed_pf3s4 --out "$out/pf3" 2>&1 | tail -16 \
      | tee "$out/pf3.log"
    ;;
  s33s)  # after s33k: prefetch_meta 0 / 3 over 2–3 stages and 256–1024 programs (longer loops) at M = 32, then end to end
    header
    timeout 230 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x28672 --ms 32 \
      --variants api --sweep-decode-pf3 --sweep-shapes 4096x28672,14336x4096,4096x6144 --sweep-ms 32 \
      --out "$out/sweep" > "$out/sweep.log" 2>&1; grep "mixed\|api" "$out/sweep.log" | tail -40
    timeout 330 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pf3l+h4,w4.4a8@pf3+h4 \
      --batches 8,32 --repeats 2 --prefill-len 256 --budget-s 320 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s33w)  # after s33s: split-K from one wave of resident decode tiles (`kernels.DECODE_SPLIT_RULE = "wave"`) against the
    # default (≈ 1024 programs) at M = 8, 16, 32 on the four layer shapes, then decode b8 / b32 end to end
    header
    shapes=4096x6144,4096x4096,4096x28672,14336x4096
    timeout 220 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes "$shapes" --ms 8,16,32 \
      --variants xla_bf16,api,mixed_wave --out "$out/wave" > "$out/wave.log" 2>&1; tail -14 "$out/wave.log"
    timeout 330 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@wave+h4 \
      --batches 8,32 --repeats 2 --prefill-len 256 --profile --profile-top 4 --budget-s 320 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s33v)  # after s33w: around one wave at M = 32 on gate/up and down: 64/128-row tiles, 4/8 warps, 3/4 stages, pf 0/3
    header
    timeout 280 python3 benchmarks/bench_matmul.py --device-timers --repeats 3 --shapes 4096x28672 --ms 32 \
      --variants api --sweep-decode-wave --sweep-shapes 4096x28672,14336x4096 --sweep-ms 32 \
      --out "$out/sweep" > "$out/sweep.log" 2>&1; grep "mixed\|api" "$out/sweep.log" | sed 's/ *err.*device busy/ busy/' | tail -70
    ;;
  s35a)  # session 35: the prefill's unpack in L2-sized chunks of output channels, each consumed by its GEMM at once
    # (probe_chunked_unpack.py, NOTES item 121; ran with LAYERS=gate+up,q/k/v PROBE_S=240: every chunking slower)
    header
    timeout "${PROBE_S:-300}" python3 benchmarks/probe_chunked_unpack.py --layers "${LAYERS:-gate+up,q/k/v,down,o}" \
      --out "$out/chunked.md" 2>&1 | grep -v "^$" | tail -40 | tee "$out/chunked.log"
    ;;
  s40a)  # session 40: the fused decode attention at 8 and 16 warps a program (offline: a block's loop 941 → 568 / 455
    # SASS instructions a thread on the int8 cache) — its GPU tests at 2 / 8 / 16 warps, then b1 / b32 with the int8 KV
    # cache against the default 4 warps, bf16 beside for the ratios
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "any_warps" 2>&1 | tail -3 \
      | tee "$out/warps_tests.log"
    timeout 300 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@attw8+h4,w4.4a8@attw16+h4 --kv-int8 \
      --batches 1,32 --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 290 --out "$out/warps_int8.md" \
      2>&1 | grep "batch\|tok/s |" | tee "$out/warps_int8.log"
    timeout 120 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 1,32 --repeats 2 --prefill-len 256 \
      --budget-s 110 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    ;;
  s46a)  # session 46: Qwen3 (query/key head norms, in the fused decode attention kernel): the kernel against XLA in the
    # model and the quantize → save → generate test on the GPU, then a Qwen3-8B-shaped model end to end, bf16 beside
    # W4.4A8 + int4 head (b1 / b8 / b32, prefill 2048)
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_e2e.py \
      -k "fused_step_matches_xla or qwen3" 2>&1 | tail -3 | tee "$out/qwen3_tests.log"
    timeout 330 python3 benchmarks/bench_generate.py --shape qwen3-8b --variants bf16@plain,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 6 --budget-s 320 --out "$out/qwen3_8b.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/qwen3_8b.log"
    ;;
  s52d)  # session 52: s52c: a W4.4A8 request streamed 8 steps a callback +4 % (33 callbacks, ≈ 0.85 ms each),
    # unstreamed chunks (fixed8, eos8) cost nothing. Streamed 16 and 32 steps a callback, and the callback unordered
    # (@sunord: no effect token through the program); --profile: device busy against span a new token (the idle
    # time a chunk's callback leaves)
    header
    timeout 300 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@sunord+h4 --batches "" \
      --request 2048:256 --request-as fixed8,stream8,stream16,stream32 --repeats 3 --prefill-len 256 --profile \
      --budget-s 290 --out "$out/request.md" 2>&1 | grep "request\|FAILED\|==" | tee "$out/request.log"
    timeout 200 python3 -m pytest -q tests/test_generate.py tests/test_gpu_model.py -k "chunk or stream or eos" 2>&1 \
      | tail -5 | tee "$out/tests.log"  # decoding in chunks (the GPU's default) on the compiled kernels
    ;;
  s52c)  # session 52: host round trips. s52b: streaming in chunks still cost +11 % (W4.4A8) where the loop's end
    # depends on the data: the XLA GPU while loop reads its predicate on the host every step unless it knows the trip
    # count, which it does only without EOS ids (the benchmark's case). generate now decodes chunks of sync_every
    # steps, each a loop of known trip count, and checks EOS and streams once a chunk. fixedK: no EOS id, eosK: an
    # EOS id never emitted, streamK: that and on_token; K = sync_every. Then 64 × 3 attention blocks on bf16 caches
    # of 2048+ positions (the new default) against 128 × 2 (@att128) on the same request.
    header
    timeout 430 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@att128+h4 --batches "" \
      --request 2048:256 --request-as fixed1,fixed8,eos1,eos8,stream8 --repeats 3 --prefill-len 256 \
      --budget-s 420 --out "$out/request.md" 2>&1 | grep "request\|FAILED\|==" | tee "$out/request.log"
    ;;
  s52b)  # session 52: streaming in chunks (generate's stream_every; s52a: one callback a step cost W4.4A8's
    # 2048+256 request +10 %), 0 = unstreamed, 1 and 8 steps a callback, all in each variant's one process; and the
    # fused attention's 64-position blocks, 3 in flight (@att64s3; s52a: 11.2 against 12.7 µs a layer at 2304
    # positions on a bf16 cache) priced on the same long request; then b32 over long bf16 caches (does it hold there?)
    header
    timeout 330 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@att64s3+h4 --batches "" \
      --request 2048:256 --stream 0,1,8 --repeats 3 --prefill-len 256 --budget-s 320 --out "$out/request.md" 2>&1 \
      | grep "request\|FAILED\|==" | tee "$out/request.log"
    timeout 150 python3 benchmarks/bench_attention.py --batches 32 --lengths 2304,4096 --step-only --parts 0 \
      --fused-splits 8 --fused-stages 3 --out "$out/attention_b32.md" 2>&1 | tail -16 | tee "$out/attention_b32.log"
    ;;
  s52a)  # prepared in session 51: what streaming costs a request (generate's on_token, one host callback a step,
    # as `mixjax generate` streams), bf16 and W4.4A8 with and without it; then s51e's bf16 rows (its limit cut them)
    header
    for stream in "" "--stream"; do
      timeout 130 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches "" $stream \
        --request 2048:256 --repeats 3 --prefill-len 256 --budget-s 120 --out "$out/request${stream}.md" 2>&1 \
        | grep "request\|FAILED\|==" | tee -a "$out/request.log"
    done
    timeout 150 python3 benchmarks/bench_attention.py --batches 1 --lengths 384,2304,4096 --step-only --parts 0 \
      --fused-splits 8,32 --fused-stages 3 --out "$out/attention_b1.md" 2>&1 | tail -24 | tee "$out/attention_b1.log"
    ;;
  s51e)  # session 51: the b1 decode attention step over long caches (s51d: 2.1-2.3k positions cost W4.4A8's step
    # +0.20 ms against XLA bf16's +0.13): XLA's step against the fused kernel at its splits (16 at b1), 8 and 32,
    # 64-position blocks and 3 stages, bf16 and int8 caches
    header
    timeout 230 python3 benchmarks/bench_attention.py --batches 1 --lengths 384,2304,4096 --step-only --parts 0,8 \
      --fused-splits 8,32 --fused-stages 3 --int8 --out "$out/attention_b1.md" 2>&1 | tail -40 \
      | tee "$out/attention_b1.log"
    ;;
  s51d)  # session 51: whole requests on the int8 KV cache (a 2048-token prompt: the decode reads 2.1-2.3k positions),
    # bf16 and W4.4A8 on the bf16 cache beside; then a 128-token prompt (the decode rows' form) as one request
    header
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches "" \
      --request 2048:256 --repeats 3 --prefill-len 256 --budget-s 140 --out "$out/request.md" 2>&1 \
      | grep "batch\|request\|FAILED\|==" | tee "$out/request.log"
    timeout 90 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --kv-int8 --batches "" \
      --request 2048:256 --repeats 3 --prefill-len 256 --budget-s 80 --out "$out/request_kv8.md" 2>&1 \
      | grep "batch\|request\|FAILED\|==" | tee "$out/request_kv8.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1 \
      --request 128:256 --repeats 3 --prefill-len 128 --budget-s 140 --out "$out/request128.md" 2>&1 \
      | grep "batch\|request\|FAILED\|==" | tee "$out/request128.log"
    ;;
  s51c)  # session 51: whole requests as a user makes them (one `mixjax.generate` call, 2048-token prompt, 256 new
    # tokens, batch 1) in bf16, W4.4A8, W8A8, and progressive (a W8A8 prompt, W4.4A8 decode; both resident), bf16
    # beside; each variant's prefill row too (its time to first token); DESIGN's "still to come"
    header
    timeout 420 python3 benchmarks/bench_generate.py --variants 'bf16@plain,w4.4a8+h4,w8a8+h8,w4.4a8+h4<w8a8+h8' \
      --batches "" --request 2048:256 --repeats 3 --prefill-len 2048 --budget-s 410 --out "$out/request.md" 2>&1 \
      | grep "batch\|request\|tok/s |\|FAILED\|==" | tee "$out/request.log"
    ;;
  s51b)  # session 51: the files s51a's limit cut (it passed 204 tests of GEMV, decode tiles, unpack, fusion and
    # the first 8 of Mosaic GPU decode): the rest of Mosaic GPU decode, static scales, the CUDA lowerings
    header
    timeout 330 python3 -m pytest -q -p no:cacheprovider -rfEs --durations=8 tests/test_mgpu_decode.py \
      tests/test_static.py tests/test_gpu_lowering.py 2>&1 | tail -30 | tee "$out/tests.log"
    ;;
  s51a)  # prepared in session 50: the other kernel test files whole and compiled (session 50 ran norm, SwiGLU,
    # attention, the GPU model and test_mgpu.py): GEMV, decode tiles, unpack, fusion, Mosaic GPU decode, static
    # scales, the CUDA lowerings, NNX and shard_map on the kernels (last run whole in sessions 39 and 43)
    header
    timeout 430 python3 -m pytest -q -p no:cacheprovider -rfE --durations=8 tests/test_gemv.py tests/test_kernels.py \
      tests/test_unpack.py tests/test_fuse.py tests/test_mgpu_decode.py tests/test_static.py \
      tests/test_gpu_lowering.py 2>&1 | tail -30 | tee "$out/tests.log"
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_nn.py tests/test_parallel.py \
      -k "on_the_kernels or on_a_gpu" 2>&1 | tail -8 | tee "$out/tests_nn_parallel.log"
    ;;
  s50b)  # session 50: the kernel test files sessions 43–49 changed, whole and compiled (last run whole in sessions
    # 39 and 43): norms, SwiGLU, attention (head norms, scales, soft caps, heads of 256, wide codes), the GPU model
    header
    timeout 530 python3 -m pytest -q -p no:cacheprovider -rfE --durations=8 tests/test_norm.py tests/test_swiglu.py \
      tests/test_attention.py tests/test_gpu_model.py 2>&1 | tail -30 | tee "$out/tests.log"
    ;;
  s50a)  # session 50 (prepared in session 49): the model-level codes case with heads of 256 compiled (s49a's
    # limit cut it) and the GPU decode paths with WIDE_HEAD_CODES on (its default since session 49); then
    # Llama-3-8B's standing rows with everything since session 42 (the README's rows come from s38c / s42b), bf16
    # beside, and b32 on the int8 cache
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_gpu_model.py \
      -k "hands_o_proj or decode_path" 2>&1 | tail -3 | tee "$out/codes_tests.log"
    timeout 240 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --budget-s 230 --out "$out/standing.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/standing.log"
    timeout 100 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --kv-int8 --batches 32 --repeats 2 \
      --prefill-len 256 --budget-s 90 --out "$out/kvint8.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/kvint8.log"
    ;;
  s49a)  # session 49: session 48's s48e cut to fit what refused starts left (≈ 380 s): @wcodes against the
    # default beside bf16 at b1 / b32 (bf16 cache), the int8 cache at b32, then the codes tests compiled (run as
    # w4.4a8+h4 and w4.4a8@wcodes+h4; @wcodes is the default since, so the old default is @nwcodes here)
    header
    timeout 180 python3 benchmarks/bench_generate.py --shape gemma3-4b --variants bf16@plain,w4.4a8@nwcodes+h4,w4.4a8+h4 \
      --batches 1,32 --repeats 2 --prefill-len 256 --budget-s 170 --out "$out/gemma3_4b_bf16kv.md" 2>&1 \
      | grep "decode" | tee "$out/gemma3_4b_bf16kv.log"
    timeout 110 python3 benchmarks/bench_generate.py --shape gemma3-4b --variants w4.4a8@nwcodes+h4,w4.4a8+h4 --kv-int8 \
      --batches 32 --repeats 2 --prefill-len 256 --budget-s 100 --out "$out/gemma3_4b_int8kv.md" 2>&1 \
      | grep "decode" | tee "$out/gemma3_4b_int8kv.log"
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py -k "codes" 2>&1 | tail -3 \
      | tee "$out/codes_tests.log"
    ;;
  s48d)  # session 48: where Gemma-3-4B's b32 step goes (1.61× bf16 against Qwen3-8B's 1.89×): both steps profiled,
    # the 30 kernels by time a step
    header
    timeout 300 python3 benchmarks/bench_generate.py --shape gemma3-4b --variants bf16@plain,w4.4a8+h4 --batches 32 \
      --profile --profile-top 30 --new-tokens 128 --repeats 2 --prefill-len 256 --budget-s 280 \
      --out "$out/gemma3_4b_profile.md" 2>&1 | tee "$out/gemma3_4b_profile.log" | grep -v "^ *$" | tail -80
    ;;
  s48c)  # session 48: Gemma-2-9B's shape beside bf16 (soft-capped scores: its prompts attend through XLA on both
    # sides), with the sandwich norm in 16 warps (@sw16, s48b's best)
    header
    timeout 420 python3 benchmarks/bench_generate.py --shape gemma2-9b --batches 1,32 --repeats 2 --prefill-len 2048 \
      --variants bf16@plain,w4.4a8+h4,w4.4a8@sw16+h4 --budget-s 400 --out "$out/gemma2_9b.md" 2>&1 \
      | grep "batch\|tok/s |\|Error" | tee "$out/gemma2_9b.log"
    ;;
  s48b)  # session 48: Gemma-3-4B's decode with the sandwich norm's program in 8 or 16 warps (@sw8, @sw16: at b1 one
    # program reads all of o_proj's partials) and down_proj's partials deferred into the next layer's norm (@sdefer,
    # NOTES item 151), beside bf16. As run in session 48: since then 16 warps are the default (the plain variant is
    # `@sw4`'s today) and @sdefer is removed (commit 2c63103 has it)
    header
    timeout 500 python3 benchmarks/bench_generate.py --shape gemma3-4b --batches 1,32 --repeats 2 --prefill-len 256 \
      --variants bf16@plain,w4.4a8+h4,w4.4a8@sw8+h4,w4.4a8@sw16+h4,w4.4a8@sdefer+h4,w4.4a8@sdefer@sw8+h4 \
      --budget-s 480 --out "$out/gemma3_4b_sandwich.md" 2>&1 | grep "batch\|tok/s |\|Error" \
      | tee "$out/gemma3_4b_sandwich.log"
    ;;
  s48a)  # session 48: cuDNN's flash attention for heads of 256 (Hopper) and with a scale: the prefill tests on the
    # GPU (Gemma 3 / Gemma 2-scale models against XLA's attention), Gemma 2's decode path (test_gpu_model.py), then
    # Gemma-3-4B's 2048-token prefill with and without cuDNN (@xprefill: XLA's attention, the scores materialised)
    header
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_gpu_model.py \
      -k "cudnn or prefill_attention or other_architectures" 2>&1 | tail -4 | tee "$out/gpu_tests.log"
    timeout 300 python3 benchmarks/bench_generate.py --shape gemma3-4b --batches "" --repeats 5 --prefill-len 2048 \
      --variants bf16@plain@xprefill,bf16@plain,w4.4a8@xprefill+h4,w4.4a8+h4 --budget-s 280 \
      --out "$out/gemma3_4b_prefill.md" 2>&1 | grep "prefill\|Error" | tee "$out/gemma3_4b_prefill.log"
    ;;
  s47a)  # session 47: the whole decode path on the GPU with Gemma 3 (heads of 256 in the fused attention, a window
    # on two layers of three, sandwich norms feeding the norm kernels, GeGLU) and Qwen3, then Gemma-3-4B's shape
    # beside bf16 (its stacked bf16 layers attend through XLA: the window differs by layer under the scan)
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py -k other_architectures 2>&1 \
      | tail -3 | tee "$out/gpu_model.log"
    timeout 250 python3 benchmarks/bench_generate.py --shape gemma3-4b --variants bf16@plain,w4.4a8+h4,w4.4a8@xsandwich+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --budget-s 230 --out "$out/gemma3_4b.md" 2>&1 | grep "batch\|tok/s |\|Error" \
      | tee "$out/gemma3_4b.log"
    ;;
  s46b)  # prepared in session 46, not run: the whole decode path on the GPU with Qwen3's head norms (mixed weights,
    # norms deferring r into the fused attention, which then normalizes each q/k head: test_gpu_model.py's qwen3
    # case), then Qwen3-8B's shape on an H100 (s46a ran on an H200) beside bf16
    header
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py 2>&1 | tail -3 \
      | tee "$out/gpu_model.log"
    timeout 300 python3 benchmarks/bench_generate.py --shape qwen3-8b --variants bf16@plain,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --budget-s 290 --out "$out/qwen3_8b.md" 2>&1 | grep "batch\|tok/s |" \
      | tee "$out/qwen3_8b.log"
    ;;
  s44b)  # session 44, prepared for a machine with several GPUs (kind nvidia-h100-x8, -x4 or -x2): quantization with
    # the float weights split over the GPUs (FSDP, `--shard-weights`, NOTES item 142), never run on GPUs. Llama-3-8B
    # in f32, 32 × 2048, one sample a GPU a batch: replicated weights against FSDP (time, the most any GPU held),
    # then 8 of Llama-3-70B's 80 layers FSDP (per-layer time; per-GPU memory against the CPU analysis's 32.9 GiB
    # of weights + 20.4 for all 80 layers over 8); each in its own process (≤ 560 s in all)
    header
    n=$(nvidia-smi -L | wc -l)
    for opt in "" "--shard-weights"; do
      PYTHONPATH=. timeout 170 python3 benchmarks/quant_speed.py --dtype float32 --samples 32 --batch-size "$n" \
        --devices "$n" $opt 2>&1 | grep "^jax\|wall\|peak\|Error" | tee -a "$out/quant_fsdp_8b.log"
    done
    PYTHONPATH=. timeout 220 python3 benchmarks/quant_speed.py --shape llama3-70b --layers 8 --dtype float32 \
      --samples "$n" --batch-size "$n" --devices "$n" --shard-weights 2>&1 | grep "^jax\|wall\|peak\|Error" \
      | tee "$out/quant_fsdp_70b8.log"
    ;;
  s44a)  # session 44: the salience pass's memory as `mixjax quantize` runs it (stacked f32 Llama-3-8B, Δ in the
    # scan), short of s43b/s43c: the GPU compile's analysis at 1 × 2048 and 4 × 2048 tokens, then one 4 × 2048 batch
    # run on random weights with the device's peak bytes (the estimate: ≈ 30 GiB of weights + ≈ 14 of temporaries)
    header
    timeout 200 python3 benchmarks/salience_memory.py --forms stacked --dtype float32 --batch 1 --seq-len 2048 2>&1 \
      | grep -v "^W\|^I" | tail -3 | tee "$out/salience_stacked_b1.log"
    timeout 300 python3 benchmarks/salience_memory.py --forms stacked --dtype float32 --batch 4 --seq-len 2048 \
      --run stacked 2>&1 | grep -v "^W\|^I" | tail -4 | tee "$out/salience_stacked_b4.log"
    ;;
  s43b)  # prepared in session 43, not run: the salience pass's memory at the Llama-3-8B shape (the one step of
    # `mixjax quantize` that holds the whole model): stacked layers under lax.scan with each layer's Δ in its
    # iteration (quantize's form now), a tuple of layers with every Δ held or computed in each layer; XLA's compiled
    # memory analysis of the three in f32 and bf16 (compile only, nothing allocated)
    header
    timeout 280 python3 benchmarks/salience_memory.py --layers 32 --dtype float32 --batch 1 --seq-len 2048 2>&1 \
      | grep -v "^W\|^I" | tail -7 | tee "$out/salience_f32.log"
    timeout 280 python3 benchmarks/salience_memory.py --layers 32 --dtype bfloat16 --batch 4 --seq-len 2048 2>&1 \
      | grep -v "^W\|^I" | tail -7 | tee "$out/salience_bf16.log"
    ;;
  s43c)  # prepared in session 43, not run: s43b's three forms each run on one f32 batch of 2048 tokens (random
    # weights and tokens), each in its own process, with the device's peak bytes in use (an OOM is a finding)
    header
    for form in stacked held inlayer; do
      timeout 180 python3 benchmarks/salience_memory.py --layers 32 --dtype float32 --batch 1 --seq-len 2048 \
        --run $form 2>&1 | grep "ran \|Error\|RESOURCE" | tail -3 | tee "$out/salience_run_$form.log"
    done
    ;;
  s42e)  # prepared in session 42, run in session 43: programmatic dependent launch on today's b8 / b32 steps with the
    # int8 KV cache (session 15 measured b32 +0.5 % on that day's kernels; the steps are 1.5× shorter now, so the
    # launches' share is larger; NOTES item 140): the default with the flag off, then the flag on with our kernels'
    # waits (@pdl), each in its own process, bf16 beside; the decode path's GPU tests under the flag last (the
    # measurements first, should a start leave less time)
    header
    timeout 100 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --kv-int8 --batches 8,32 --repeats 2 \
      --prefill-len 256 --profile --budget-s 90 --out "$out/pdl_off.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/pdl_off.log"
    MIXJAX_PDL=1 XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 100 python3 benchmarks/bench_generate.py \
      --variants w4.4a8@pdl+h4 --kv-int8 --batches 8,32 --repeats 2 --prefill-len 256 --profile \
      --budget-s 90 --out "$out/pdl_on.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/pdl_on.log"
    timeout 80 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 8,32 --repeats 2 --prefill-len 256 \
      --budget-s 70 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    MIXJAX_PDL=1 XLA_FLAGS=--xla_gpu_enable_pdl=true timeout 150 python3 -m pytest -q -p no:cacheprovider \
      tests/test_gpu_model.py 2>&1 | tail -3 | tee "$out/pdl_tests.log"
    ;;
  s42d)  # prepared in session 42, not run: the whole attention and GPU-model test files compiled on the GPU with the
    # int8 value blocks and the fused step's f32 bound derived from its TF32 logits (call 3 of session 42 ran out of
    # time inside them: they take > 200 s)
    header
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_gpu_model.py 2>&1 | tail -6 \
      | tee "$out/attention_gpu_model.log"
    ;;
  s42c)  # session 42: with the value blocks the int8 step's 128-position blocks take 159 registers (246 before) and 658 SASS
    # instructions a 64 positions (765 at 64 × 3): b1 / b8 / b32 with --kv-int8, the default 64 × 3 against @att128
    # (128 × 2) and @att128s3 (128 × 3), then bf16 at b32 for the ratio
    header
    timeout 260 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@att128+h4,w4.4a8@att128s3+h4 --kv-int8 \
      --batches 1,8,32 --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 250 --out "$out/att128.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/att128.log"
    timeout 70 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 32 --repeats 2 --prefill-len 256 \
      --budget-s 60 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    ;;
  s42b)  # session 42: s42a on an H100 (the issues' card; s42a ran on an H200): b1 / b8 / b32 with --kv-int8, the value
    # blocks (default) against @vrow, bf16 beside; first the fused step's f32 case that failed once in s42a's whole-file
    # run on the H200, six times with its error
    header
    for i in 1 2 3 4 5 6; do
      timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "matches_reference and 100-32" 2>&1 \
        | grep -E "^E  |passed|failed" | head -6
    done | tee "$out/f32_case.log"
    timeout 300 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@vrow+h4 --kv-int8 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 290 --out "$out/vblock.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/vblock.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 1,8,32 --repeats 2 --prefill-len 256 \
      --budget-s 140 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    ;;
  s42a)  # session 42: an int8 cache's values in blocks of 64 positions stored [Dh, 64] (`KVCache.v_block`; offline the
    # fused step's loop 941 → 765 SASS instructions and 168 → 120 registers at b32: no byte loads from shared memory for
    # P·V) — its tests compiled on the GPU, then b1 / b8 / b32 with --kv-int8 against the position-major order
    # (@vrow), bf16 beside
    header
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "blocked or BLOCKED or 320 or 512 or through_the_kernel or fused_step or bad_inputs" \
      2>&1 | tail -3 | tee "$out/vblock_tests.log"
    timeout 300 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@vrow+h4 --kv-int8 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 290 --out "$out/vblock.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/vblock.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 1,8,32 --repeats 2 --prefill-len 256 \
      --budget-s 140 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    ;;
  s40d)  # (run in session 40; `@peel` and attention.FUSED_PEEL were removed after s40d/s40e, measured slower: commit
    # 37dfd16 has them) the fused decode attention's first cache block loaded before the new token's work (`@peel`;
    # s40c's ncu: 42 % of the int8 step's stall samples outside its loop, the loop's first wait the largest stall) —
    # its tests compiled on the GPU, then b1 / b8 / b32 with the int8 KV cache against the default, bf16 beside
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "peel or any_warps" 2>&1 | tail -3 \
      | tee "$out/peel_tests.log"
    timeout 270 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@peel+h4 --kv-int8 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 260 --out "$out/peel_int8.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/peel_int8.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 1,8,32 --repeats 2 --prefill-len 256 \
      --budget-s 140 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    ;;
  s40e)  # (run in session 40; removed since, as s40d) after s40d (warm): the peel on the bf16 cache, at its default
    # 128 × 2 (250 registers offline) and at 64 × 3 (168), b1 / b32
    header
    timeout 330 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@peel+h4,w4.4a8@att64s3@peel+h4 \
      --batches 1,32 --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 320 --out "$out/peel_bf16.md" \
      2>&1 | grep "batch\|tok/s |" | tee "$out/peel_bf16.log"
    ;;
  s40c)  # session 40: Nsight Compute on the fused decode attention at b32 (a 384-position cache, the token at 256, four
    # q/k/v partials in, o_proj's codes out), int8 and bf16 caches with their default blocks: where its programs wait
    header
    NCU=${NCU:-/usr/local/cuda/bin/ncu}
    for cache in int8 bf16; do
      flag=""; [ "$cache" = int8 ] && flag="--int8"
      timeout 200 $NCU --clock-control none --kernel-name regex:attend_new --launch-skip 2 --launch-count 1 --set full \
        --import-source no --export "$out/att_$cache" -f python3 benchmarks/ncu_attention.py $flag > "$out/ncu_$cache.log" 2>&1
      $NCU --import "$out/att_$cache.ncu-rep" --page details --csv > "$out/details_$cache.csv" 2>&1
      $NCU --import "$out/att_$cache.ncu-rep" --page source --csv --print-source sass > "$out/sass_$cache.csv" 2>&1
      rm -f "$out/att_$cache.ncu-rep"
      tail -n 2 "$out/ncu_$cache.log"
      python3 benchmarks/ncu_summary.py "$out/details_$cache.csv" "$out/sass_$cache.csv" --top 25 | tee "$out/summary_$cache.txt"
    done
    ;;
  s39c)  # session 39: the files whose kernels sessions 37–39 changed, compiled on the GPU with today's defaults (tiled
    # codes on a GPU, the GEMV's computed offsets, the int8 cache's 64 × 3 step, the tiled loads of 128-row tiles):
    # the whole decode path first, then the Triton GEMM, the GEMV, the unpack and the projection fusion
    header
    timeout 570 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py tests/test_kernels.py tests/test_gemv.py \
      tests/test_unpack.py tests/test_fuse.py 2>&1 | tail -30 | tee "$out/gputests.log"
    ;;
  s39f)  # session 39: the fused decode attention over a bf16 cache at 64 positions × 3 stages and 128 × 3 against the
    # default 128 × 2 (the int8 cache gained 6 % of its attention at 64 × 3 in session 38; bf16's block was picked
    # at 2 stages in session 13), b8 and b32, one process each
    header
    timeout 330 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@att64s3+h4,w4.4a8@att128s3+h4 --batches 8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 320 --out "$out/att_bf16.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/att_bf16.log"
    ;;
  s39g)  # session 39, after s39f on the warm machine (run as this command): b1 and b32 with the bf16 cache, the default
    # 128 × 2 attention against 64 × 3
    header
    timeout 200 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@att64s3+h4 --batches 1,32 --repeats 2 \
      --prefill-len 256 --profile --profile-top 6 --budget-s 190 --out "$out/att_bf16_b1.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/att_bf16_b1.log"
    ;;
  s39e)  # session 39: the decode tiles at 32 weight rows a program (half a tiled block, contiguous in it) at M = 16 / 32,
    # 2 or 4 warps, the default split or half of it (offline: 94–96 registers, 239 SASS instructions a loop at 2 warps)
    header
    timeout 200 python3 benchmarks/probe_tiled_configs.py --ms 16,32 --only "block_n 32" --out "$out/narrow_tiles.md" 2>&1 \
      | grep "^|\|rror" | tee "$out/narrow_tiles.log"
    ;;
  s39d)  # session 39, after s39c on the warm machine (run as this command): the attention, norm and SwiGLU kernels'
    # files whole (s38e's 45 s cut ran 6 of them)
    header
    timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_norm.py tests/test_swiglu.py \
      2>&1 | tail -15 | tee "$out/gputests2.log"
    ;;
  s39b)  # session 39: the decode tiles at 128 weight rows a program on tiled codes (two 64-row blocks a group; half the
    # activation codes re-read per weight byte) at M = 16 / 32, 4 or 8 warps, split ×1 / ×2; then s39a's tests
    header
    timeout 240 python3 benchmarks/probe_tiled_configs.py --ms 16,32 --only "block_n 128" --out "$out/wide_tiles.md" 2>&1 \
      | grep "^|\|rror" | tee "$out/wide_tiles.log"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "int8_tensor or split_q or attend_new_tokens_matches" \
      2>&1 | tail -2 | tee "$out/qk8_tests.log"
    ;;
  s39a)  # (run in session 39; @qk8 and attention.QK_INT8 were removed after it, measured slower: commit e54ba84 has them)
    # prepared in session 38: an int8 cache's q·k on the int8 tensor cores (attention.QK_INT8, q as two
    # int8 terms; offline 939 → 817 SASS instructions a 64-position block) — its tests compiled on the GPU, then end
    # to end against the default at b1 / b8 / b32 with --kv-int8 (bf16 beside for the ratios)
    header
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "int8_tensor or split_q or attend_new_tokens_matches" \
      2>&1 | tail -2 | tee "$out/qk8_tests.log"
    timeout 300 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@qk8+h4 --kv-int8 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 290 --out "$out/qk8.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/qk8.log"
    timeout 150 python3 benchmarks/bench_generate.py --variants bf16@plain --batches 1,8,32 --repeats 2 --prefill-len 256 \
      --budget-s 140 --out "$out/bf16.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/bf16.log"
    ;;
  s38e)  # session 38: the int8 cache's fused step at 64 positions × 3 stages by default (attention.INT8_BLOCK_STAGES,
    # CODES_ONE_SPLIT in positions so b8 keeps one split and the codes): its fused-step tests compiled, then end to
    # end against the old 128 × 2 (@att128) at b1 / b8 / b32
    header
    timeout 45 python3 -m pytest -q -p no:cacheprovider -x tests/test_attention.py -k "attend_new_tokens_matches or codes_are" \
      2>&1 | tail -2 | tee "$out/att_tests.log"
    timeout 140 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@att128+h4 --kv-int8 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 130 --out "$out/kvint8_default.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/kvint8_default.log"
    ;;
  s38d)  # session 38: the int8 KV cache's attention at 64-position blocks and 3 stages (@att64s3: b32 +1 %, attention
    # 482 → 451 µs a step in s38c) against the default 128 × 2 at b1 / b8 / b32, before making it the int8 default
    header
    timeout 230 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@att64s3+h4 --kv-int8 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 220 --out "$out/kvint8_blocks.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/kvint8_blocks.log"
    ;;
  s38c)  # session 38: the standing rows with tiled codes the GPU default (b1 / b8 / b32, prefill 2048) beside bf16, the
    # whole decode path on the GPU (test_gpu_model.py; s38b's 100 s cut it), then b32 with the int8 KV cache at the
    # attention's 128-position blocks (default) against 64 (3 programs an SM by registers, offline) and 64 × 3 stages
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py -k "decode_path" 2>&1 | tail -3 \
      | tee "$out/gpu_model.log"
    timeout 255 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 2048 --profile --profile-top 8 --budget-s 245 --out "$out/standing.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/standing.log"
    timeout 170 python3 benchmarks/bench_generate.py --variants w4.4a8+h4,w4.4a8@att64+h4,w4.4a8@att64s3+h4 --kv-int8 \
      --batches 32 --repeats 2 --prefill-len 256 --profile --profile-top 4 --budget-s 160 --out "$out/kvint8.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/kvint8.log"
    ;;
  s38b)  # session 38: tiled codes the GPU default (model.TILED_CODES None), the quantized head tiled too: the whole
    # decode path on the GPU (test_gpu_model.py), end to end beside @rowmajor and bf16, b32 with the int8 KV cache,
    # then the GEMV's configs on tiled codes at M = 1 / 2 (64-row blocks, programs, warps, the group-major reading)
    header
    timeout 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py -k "decode_path" 2>&1 | tail -3 \
      | tee "$out/gpu_model.log"
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@rowmajor+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 6 --budget-s 190 --out "$out/tiled_default.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/tiled_default.log"
    timeout 80 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --kv-int8 --batches 32 --repeats 2 \
      --prefill-len 256 --profile --profile-top 6 --budget-s 70 --out "$out/kvint8.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/kvint8.log"
    timeout 150 python3 benchmarks/probe_tiled_configs.py --ms 1,2 --out "$out/gemv_configs.md" 2>&1 | grep -v "^|---" | tail -60
    ;;
  s38a)  # session 38: the GEMV on one-group blocks through computed offsets (GemvConfig.tiled_read="gather", a thread
    # one group as in row-major) — its tests compiled, the probe at M = 1 / 2 (row-major, Q = 1, Q = 4), end to end
    # tiled (@tiled) against row-major and bf16, then the decode tiles' configs swept on tiled codes (M = 16 / 32)
    header
    timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gemv.py -k "tiled or normalizes" 2>&1 | tail -3 \
      | tee "$out/gather_tests.log"
    timeout 80 python3 benchmarks/probe_tile_major.py --ms 1,2 --out "$out/gemv_gather.md" 2>&1 | grep -v "^|---" | tail -10
    timeout 230 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@tiled+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 6 --budget-s 220 --out "$out/gather_e2e.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/gather_e2e.log"
    timeout 180 python3 benchmarks/probe_tiled_configs.py --out "$out/tiled_configs.md" 2>&1 | grep -v "^|---" | tail -70
    ;;
  s37a)  # session 37: the attention codes tests compiled on the GPU with the live-row epilogue (the default after
    # s36b; s36a ran them on the all-rows form), then the tile-major probe (NOTES item 125: the decode tiles with
    # their codes, and scales and zeros, in (tile, group) blocks against row-major, bit for bit, M = 16 / 32)
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py -k "codes" 2>&1 | tail -4 \
      | tee "$out/attcodes_tests.log"
    timeout 300 python3 benchmarks/probe_tile_major.py --ms 8,16,32 --out "$out/tile_major.md" 2>&1 \
      | grep -v "^|---" | tail -20
    ;;
  s37b)  # session 37: the tiled codes (format.tile_codes, one group a block row then) on the GPU: their tests compiled
    # (decode tiles, GEMV, unpack, and the whole decode path of test_gpu_model.py, which runs tiled), then the probe
    # with the model's dispatch (GEMV at M = 1 / 2, decode tiles at 16 / 32, the prefill's unpack), row-major against
    # tiled (run at commit 6483eb1, before the probe took its Q = 1 / Q = 4 columns)
    header
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gemv.py tests/test_unpack.py \
      tests/test_gpu_model.py -k "tiled or decode_path" 2>&1 | tail -4 | tee "$out/tiled_tests.log"
    timeout 300 python3 benchmarks/probe_tile_major.py --out "$out/tiled.md" 2>&1 | grep -v "^|---" | tail -18
    ;;
  s37c)  # session 37: end to end, tiled codes (one group a block row then) against row-major (`@rowmajor`), bf16
    # beside: decode b1 / b8 / b32 and the 256-token prefill
    header
    timeout 560 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@rowmajor+h4 --batches 1,8,32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 6 --budget-s 540 --out "$out/tiled_e2e.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/tiled_e2e.log"
    ;;
  s37e)  # session 37, at commit 8a80464: the GEMV on one-group blocks read as separate blocks (not one group-major
    # block), M = 1 / 2, against row-major and 4 groups a block (1.2–2.3× slower: reverted after the call); then the
    # whole decode path with tiled codes (test_gpu_model.py) and the GEMV's tiled tests
    header
    timeout 120 python3 benchmarks/probe_tile_major.py --ms 1,2 --out "$out/gemv_tiled.md" 2>&1 | grep -v "^|---" | tail -10
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_model.py tests/test_gemv.py -k "decode_path or tiled" \
      2>&1 | tail -4 | tee "$out/gpu_model.log"
    ;;
  s37d)  # session 37: blocks of 64 rows × 4 groups (the default now: the GEMV's row order inside a block) — their
    # tests compiled, the probe (row-major, Q = 1, Q = 4), then end to end beside @tiled1, @rowmajor and bf16
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gemv.py tests/test_unpack.py \
      tests/test_gpu_model.py -k "tiled or decode_path" 2>&1 | tail -4 | tee "$out/tiled_tests.log"
    timeout 150 python3 benchmarks/probe_tile_major.py --out "$out/tiled.md" 2>&1 | grep -v "^|---" | tail -18
    timeout 280 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@tiled1+h4,w4.4a8@rowmajor+h4 \
      --batches 1,8,32 --repeats 2 --prefill-len 256 --profile --profile-top 6 --budget-s 270 \
      --out "$out/tiled_e2e.md" 2>&1 | grep "tok/s |\|^| w4\|^| bf16" | tee "$out/tiled_e2e.log"
    ;;
  s36b)  # session 36, after s36a: b8 / b32 with the codes default and b8's one split (`attention.CODES_ONE_SPLIT`;
    # s36a measured it as @att1), `@attlive` (the epilogue on the 4 live rows of the MMA's 16), bf16 in the same call;
    # then b32 with the int8 KV cache (the best b32 setting of session 34, now with the codes)
    header
    timeout 250 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@attlive+h4 \
      --batches 8,32 --repeats 2 --prefill-len 256 --profile --profile-top 6 --budget-s 240 \
      --out "$out/standing.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/standing.log"
    timeout 110 python3 benchmarks/bench_generate.py --variants w4.4a8+h4 --kv-int8 --batches 32 --repeats 2 \
      --prefill-len 256 --profile --profile-top 6 --budget-s 100 --out "$out/kvint8.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/kvint8.log"
    ;;
  s36a)  # session 36: the attention kernel hands o_proj its codes (default) against o_proj quantizing (@noattcodes)
    # at b16 / b32 (one split of the 8 KV heads: the codes come from the programs; b1 and b8 split the positions and
    # do not ask for them; `@att1` one split everywhere, so b8 too), bf16 in the same call; then the codes tests
    # compiled on the GPU
    header
    timeout 330 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@noattcodes+h4,w4.4a8@att1+h4 \
      --batches 8,16,32 --repeats 2 --prefill-len 256 --profile --profile-top 8 --budget-s 320 --out "$out/attcodes.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/attcodes.log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py -k "codes" 2>&1 | tail -4 \
      | tee "$out/attcodes_tests.log"
    ;;
  s35c)  # session 35: the b32 decode step's kernels by time beyond the top four (with down_proj's new default)
    header
    timeout 220 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 32 --repeats 2 \
      --prefill-len 256 --profile --profile-top 24 --budget-s 210 --out "$out/b32profile.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/b32profile.log"
    ;;
  s35d)  # session 35: down_proj's prefetch_meta=3 default against the old tiles (`@nopf3`) at b32, bf16 beside
    header
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@nopf3+h4 --batches 32 \
      --repeats 2 --prefill-len 256 --profile --profile-top 5 --budget-s 190 --out "$out/pf3default.md" 2>&1 \
      | grep "batch\|tok/s |" | tee "$out/pf3default.log"
    ;;
  s34t)  # session 34 (no device that session): the Triton kernel's tests compiled on the GPU after the measured-slower
    # forms were removed (NOTES item 119; the default configurations' Triton IR is byte-identical, the test list is new)
    header
    timeout 400 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_gemv.py 2>&1 \
      | tail -12 | tee "$out/gputests.log"
    ;;
  s34a)  # next: the standing decode rows with session 33's wave splits (b1 should not move; b8 2.03×, b32 1.77× in
    # s33w), beside down_proj with the small operands two iterations ahead at M = 32 (@pf3down, −7 % on that GEMM)
    header
    timeout 560 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@pf3down+h4 \
      --batches 1,8,32 --repeats 2 --prefill-len 256 --profile --profile-top 4 --budget-s 545 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s33e)  # after s33k: decode b8 / b32 end to end with the best prefetch_meta=3 form, bf16 (XLA) as the base
    header
    timeout 500 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@${PF3:-pf3}+h4 \
      --batches 8,32 --repeats 2 --prefill-len 256 --profile --profile-top 3 --budget-s 480 \
      --out "$out/generation.md" 2>&1 | grep "batch\|tok/s |" | tee "$out/e2e.log"
    ;;
  s28b)  # after s28a: the 256-token prefill with per-token scales; at 2048 tokens selective with the int8 matrices
    header
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4,w4.4a8@ptok+h4,w4.4a8@psel+h4 \
      --batches "" --repeats 7 --prefill-len 256 --profile --profile-top 3 --budget-s 190 \
      --out "$out/prefill256.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill256.log"
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8@pint8+h4,w4.4a8@psel@pint8+h4 \
      --batches "" --repeats 7 --prefill-len 2048 --budget-s 190 \
      --out "$out/prefill2048_int8.md" 2>&1 | grep "prefill batch\|tok/s |" | tee "$out/prefill2048_int8.log"
    ;;
  s28tp)  # prepared in session 28, for a two-GPU machine (kind nvidia-h100-x2 or nvidia-h200-x2): tensor-parallel
    # decode and prefill against one GPU of the same host, bf16 and W4.4A8 (NCCL all-reduces of o/down outputs)
    header
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_parallel.py 2>&1 | tail -4 | tee "$out/tests.log"
    timeout 200 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,8 --repeats 3 \
      --prefill-len 2048 --budget-s 190 --out "$out/one.md" 2>&1 | grep "decode\|prefill" | tee "$out/one.log"
    timeout 240 python3 benchmarks/bench_generate.py --variants bf16@plain,w4.4a8+h4 --batches 1,8 --repeats 3 \
      --prefill-len 2048 --budget-s 230 --tensor-parallel 2 --out "$out/tp2.md" 2>&1 | grep "decode\|prefill" \
      | tee "$out/tp2.log"
    ;;
  s24d)  # after s24c: the column-tiled kernel's tile width × stages × fold at M = 256 on the four linears
    header
    timeout 400 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x4096 --ms 256 \
      --variants xla_bf16 --sweep-mgpu-decode --sweep-shapes 4096x6144,4096x4096,4096x28672,14336x4096 \
      --sweep-ms 256 --out "$out/sweep" 2>&1 | grep "mgpu_decode" | tee "$out/sweep.log"
    ;;
  tall)
    header
    timeout 420 python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x28672 --ms 64 \
      --variants xla_bf16,mixed --sweep-decode-tall --sweep-shapes 4096x28672,14336x4096,4096x6144 \
      --sweep-ms 64,128 --out "$out/tall" 2>&1 | tee "$out/tall.log"
    ;;
  crossover)
    header
    python3 benchmarks/bench_matmul.py --device-timers --repeats 5 --shapes 4096x6144,4096x4096,4096x28672,14336x4096 \
      --ms 96,128,192 --variants xla_bf16,api,mixed_dt --out "$out/crossover" 2>&1 | tee "$out/crossover.log"
    ;;
  *)
    echo "usage: bash benchmarks/device_session.sh tests|kernels|e2e|profile|words|words_sweep|xq|nq|micro|e2e12|gputests|prefill|gemv14|gputests14|e2e14|pdl|tall|crossover|gps|prefill17|s17c|s17d|s18a|s18b|s18c|s18d|s19a|s19b|s19c|s20a|s20b|s20c|s20d|s20e|s21a|s21b|s21c|s21d|s21e|s21f|s22a|s22b|s22c|s22d|s22e|s22f|s22g|s23a|s23b|s23c|s23d|s23e|s23f|s24a|s24b|s24c|s24d|s26c|s27a|s27b|s28a|s28b|s28tp|s29a|s29b|s30a|s30b|s31|s31a|s31b|s31h|s32a|s32k|s32m|s32t|s32u|s33k|s33s|s33w|s33v|s34t|s34a|s33e" >&2
    exit 2
    ;;
esac
