#!/bin/bash
# Runs the fused-linear checks and benchmarks on a GPU box, beside the PyTorch / PEFT anchors.
# Usage (from the repository root): scripts/gpu_fused_run.sh DIR STAGE...
#   DIR holds the stripped `news2stock-dev` binary (the developer tools of the news2stock example:
#   `cargo build --release --features cuda --example news2stock-dev`), the GPU checks
#   `gpu_selftest` (burn-cuda-ops) and `gpu_fused` (peft-lora) and the `kernels` bench (built by
#   `cargo test/bench --no-run --release --features cuda`; see docs/PERFORMANCE.md), and the anchor scripts
#   copied from scripts/ (bench_lora_linear_torch.py, bench_pissa_peft.py, and peft_baseline.py,
#   vendored unchanged from ../shared/bench/). Stages: check, quick,
#   linear, train (ours then HF PEFT's three configs), and ours with one switch off (same binary):
#   train-noattn (attention / head+CE / RMSNorm ops, PEFT_LORA_FUSED_ATTENTION=0), train-noelem
#   (SwiGLU and RoPE kernels), train-noadamw (one-kernel AdamW), train-nosoftmax (the attention's
#   softmax kernels); util (GPU busy share + cubecl kernel profile), prof (Nsight, when present),
#   pissa (bench-init vs PEFT's init), kernels (burn-cuda-ops' `kernels` bench: each step kernel
#   alone, and each GEMM of the fused low-rank linear), quick-tune / train-tune (cuBLASLt autotuning on,
#   PEFT_LORA_GEMM_AUTOTUNE=1), quick-sync / train-sync (each fused op waits for its hand-off to
#   cubecl's device thread, PEFT_LORA_ASYNC_SUBMIT=0).
# Writes logs under $OUT (or /tmp/fused-out), packed into $OUT/logs.tgz at the end.
D=$1; shift
OUT=${OUT:-/tmp/fused-out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda-13.0/lib64:$LD_LIBRARY_PATH
export PYTHONUNBUFFERED=1
B=$D/news2stock-dev
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
mem() { # peak of nvidia-smi's memory.used while "$@" runs
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/mem_$1.txt" & local p=$!
  shift; "$@"; local rc=$?; kill $p; wait $p 2>/dev/null
  return $rc
}
peak() { sort -n "$OUT/mem_$1.txt" | tail -1; }
# ours with one switch set: variant TAG ENV=VAL CONFIG... (CONFIG: qv-gc, qv-nogc, all-gc)
variant() {
  local tag=$1 env=$2; shift 2
  for name in "$@"; do
    case $name in
      qv-gc) args="--lora-r 8 --gradient-checkpointing true" ;;
      qv-nogc) args="--lora-r 8 --gradient-checkpointing false" ;;
      all-gc) args="--lora-r 16 --gradient-checkpointing true --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" ;;
    esac
    mem "$tag-$name" env $env timeout 200 $B --batch-size 2 --grad-accum 1 --lora-alpha 32 $args bench-train --steps 6 --warmup 2 2>&1 | tee "$OUT/train_${tag}_$name.txt" | tail -1
    echo "ours-$tag $name peak_used_mib $(peak $tag-$name)" | tee -a "$OUT/peaks.txt"
  done
}
mkdir -p /tmp/fused-logs
pack() { cp "$OUT"/*.txt /tmp/fused-logs/ 2>/dev/null; (cd /tmp/fused-logs && tar czf "$OUT/logs.tgz" .); find "$OUT" -name 'mem_*.txt' -delete; }
for stage in "$@"; do
  case $stage in
  kernels)
    timeout 200 $D/kernels 2>&1 | grep -v '^{' | tee "$OUT/kernels.txt" ;;
  check)
    # burn-cuda-ops' self-test (every op vs an f64 host reference, the race test) and
    # peft-lora's fused-layer check (LoraLinear fused vs composed vs host, the optimizer).
    CUBECL_AUTOTUNE_LEVEL=minimal timeout 300 $D/gpu_selftest 2>&1 | tee "$OUT/check.txt" | tail -30
    CUBECL_AUTOTUNE_LEVEL=minimal timeout 300 $D/gpu_fused 2>&1 | tee "$OUT/check_layer.txt" | tail -30 ;;
  quick)
    timeout 150 $B bench-linear --quick --composed 2>&1 | grep -v '^{' | tee "$OUT/linear_quick.txt"
    timeout 120 python3 $D/bench_lora_linear_torch.py --quick 2>&1 | tee "$OUT/torch_quick.txt" ;;
  linear)
    timeout 300 $B bench-linear 2>&1 | tee "$OUT/linear.txt" | grep -v '^{'
    timeout 200 python3 $D/bench_lora_linear_torch.py 2>&1 | tee "$OUT/torch_linear.txt" ;;
  train)
    variant base PEFT_LORA_BASELINE_RUN=1 qv-gc qv-nogc all-gc
    for name in seed-qv-r8-gc seed-qv-r8-nogc all-r16-gc; do
      mem "hf-$name" timeout 200 python3 $D/peft_baseline.py --skip-micro --only $name 2>&1 | tee "$OUT/hf_$name.txt" | tail -2
      echo "hf $name peak_used_mib $(peak hf-$name)" | tee -a "$OUT/peaks.txt"
    done ;;
  quick-tune)
    PEFT_LORA_GEMM_AUTOTUNE=1 timeout 150 $B bench-linear --quick 2>&1 | grep -v '^{' | tee "$OUT/linear_quick_tune.txt" ;;
  train-tune)
    variant tune PEFT_LORA_GEMM_AUTOTUNE=1 qv-nogc all-gc ;;
  quick-sync)
    PEFT_LORA_ASYNC_SUBMIT=0 timeout 150 $B bench-linear --quick 2>&1 | grep -v '^{' | tee "$OUT/linear_quick_sync.txt" ;;
  train-sync)
    variant sync PEFT_LORA_ASYNC_SUBMIT=0 qv-gc qv-nogc all-gc ;;
  train-noattn)
    variant noattn PEFT_LORA_FUSED_ATTENTION=0 qv-gc qv-nogc ;;
  prof)
    # Kernel-time profile of two 8B q,v steps (no checkpointing) with Nsight Systems, if present.
    NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
    if [ -n "$NSYS" ]; then
      $NSYS profile -o /tmp/prof --force-overwrite true -t cuda --stats=false $B --batch-size 2 --grad-accum 1 --lora-alpha 32 --lora-r 8 \
        --gradient-checkpointing false bench-train --steps 2 --warmup 1 > "$OUT/prof_run.txt" 2>&1
      $NSYS stats -r cuda_gpu_kern_sum /tmp/prof.nsys-rep 2>&1 | cut -c1-220 | head -60 > "$OUT/prof.txt"
      tail -4 "$OUT/prof_run.txt"; head -40 "$OUT/prof.txt"
    else
      echo "no nsys on this machine" | tee "$OUT/prof.txt"
    fi ;;
  train-noelem)
    variant noelem PEFT_LORA_ELEMENTWISE_KERNELS=0 qv-gc qv-nogc ;;
  train-noadamw)
    variant noadamw PEFT_LORA_FUSED_ADAMW=0 qv-gc all-gc ;;
  train-nosoftmax)
    variant nosoftmax PEFT_LORA_SOFTMAX_KERNEL=0 qv-gc qv-nogc ;;
  util|util-all)
    # GPU busy share during 8B q,v steps (no checkpointing; util-all: all linear r 16 with
    # checkpointing): nvidia-smi's utilization.gpu (the share of time a kernel runs) sampled every
    # 100 ms; then cubecl's own per-kernel profile (synchronises after each kernel: shares, not
    # speed; cuBLASLt GEMMs are not in it).
    args="--batch-size 2 --grad-accum 1 --lora-alpha 32 --lora-r 8 --gradient-checkpointing false"
    [ $stage = util-all ] && args="--batch-size 2 --grad-accum 1 --lora-alpha 32 --lora-r 16 --gradient-checkpointing true --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/util_samples.txt" & p=$!
    timeout 200 $B $args bench-train --steps 12 --warmup 2 2>&1 | tail -1 | tee "$OUT/util_run.txt"
    kill $p; wait $p 2>/dev/null
    sort -n "$OUT/util_samples.txt" | awk '{a[NR]=$1} END {print "utilization.gpu samples", NR, "median", a[int(NR/2)+1], "p90", a[int(NR*0.9)+1]}' | tee "$OUT/util.txt"
    CUBECL_DEBUG_LOG=/tmp/cubecl_prof.log CUBECL_DEBUG_OPTION=profile timeout 200 $B $args bench-train --steps 2 --warmup 1 2>&1 | tail -1
    grep -v '^$' /tmp/cubecl_prof.log | tail -60 | cut -c1-200 > "$OUT/cubecl_prof.txt"; tail -45 "$OUT/cubecl_prof.txt" ;;
  pissa)
    timeout 300 $B --lora-r 16 --lora-alpha 32 bench-init --method pissa --layers 32 2>&1 | tee "$OUT/pissa_ours.txt" | tail -3
    timeout 120 python3 $D/bench_pissa_peft.py --method pissa --layers 32 --r 16 2>&1 | tee "$OUT/pissa_peft.txt" | tail -2
    timeout 200 python3 $D/bench_pissa_peft.py --method pissa --layers 32 --r 16 --device cpu 2>&1 | tee "$OUT/pissa_peft_cpu.txt" | tail -2 ;;
  esac
  pack
done
