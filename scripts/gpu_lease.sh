#!/bin/bash
# One GPU lease's measurements beside their anchors: 8B training against HF PEFT, Liger and
# Unsloth, the step's phases, generation against transformers, the GPU checks, and the NCCL /
# data-parallel runs. (scripts/gpu_fused_run.sh keeps the kernel, adapted-linear and init stages.)
#
# Usage (from the repository root on the GPU box): scripts/gpu_lease.sh DIR STAGE...
#   DIR holds, each stripped and optionally gzipped (unpacked here):
#   - news2stock-dev   cargo build --release --features cuda --example news2stock-dev
#   - gpu_selftest     cargo test --release --no-run -p burn-cuda-ops --test gpu_selftest
#   - gpu_fused        cargo test --release --no-run --features cuda -p peft-lora --test gpu_fused
#   - nccl_test        cargo test --release --no-run -p data-parallel --features nccl --test nccl
#   - gpu_data_parallel  cargo test --release --no-run --features cuda --test gpu_data_parallel
#   - for the peers (not in this repository: ../shared/bench/wheels/ and fixtures/):
#     liger_kernel-0.8.5-py3-none-any.whl, unsloth-site.tgz, tokenizer.json(.gz) of Llama 3.
#   The anchor scripts are read from scripts/ (peft_baseline.py and unsloth_bench.py are
#   vendored unchanged from ../shared/bench/).
# Stages:
#   info          the card, the driver, torch / transformers / PEFT versions
#   check         burn-cuda-ops gpu_selftest and peft-lora gpu_fused (CHECKS="gpu_selftest" for one)
#   parity        bench-model's logits against each llama fixture (transformers f32), with the
#                 defaults and with each of PARITY_SWITCHES (default PEFT_LORA_CAUSAL_ATTENTION)
#   train         ours on the three configs (qv-gc, qv-nogc, all-gc), LoRA dropout 0.1
#   train-optin   the same with the opt-in switches on (PEFT_LORA_UNCHECKED_KERNELS; OPTIN=1 profiles
#                 so too; VALIDATE=1 runs `check` under cubecl's validate mode)
#   train-ab      ours with each opt-in training switch on alone (AB_SWITCHES, default
#                 "PEFT_LORA_MULTI_TENSOR PEFT_LORA_SEEDED_ADAPTERS PEFT_LORA_CAUSAL_ATTENTION
#                 PEFT_LORA_SHARED_INPUT";
#                 an entry NAME=VALUE exports that value instead of 1, and NAME,NAME2=V sets
#                 both, e.g. PEFT_LORA_CAUSAL_ATTENTION,PEFT_LORA_CAUSAL_BLOCKS=4), then all
#                 of them, on CONFIGS (default qv-gc all-gc); run `train` beside it for the defaults
#   train-d0      the same at dropout 0 (Unsloth's, which its fused kernels need)
#                 (CONFIGS="qv-gc all-gc" picks configs for train and train-d0)
#   phases        qv-gc and all-gc with PEFT_TRAIN_PHASES=1 (where a step's time goes)
#   hf | liger    HF PEFT (+ Liger) on the three configs (scripts/peft_baseline.py)
#   unsloth       Unsloth on the three configs (saves a random 8B model to /tmp/m8b first)
#                 (PEERS="seed-qv-r8-gc all-r16-gc" picks configs for hf, liger and unsloth)
#   profile       one qv-gc step under Nsight Compute: GPU time per kernel (scripts/kernel_profile.py)
#   gen           bench-generate (batch 1 / 8 / 64) and scripts/bench_transformers_generate.py
#   gen-sample    the same at batch 1 / 64 with sampling (temperature 0.6, top-k 50, top-p 0.9)
#   sbs           bench-generate --side-by-side --batch 64 (the eval's routed pass against two)
#   gen-ab        each decode switch against the default, batch 1 / 64: the opt-in ones on
#                 (PEFT_LORA_SHARED_INPUT, PEFT_LORA_DECODE_ATTENTION, PEFT_LORA_GEMM_AUTOTUNE),
#                 the queued read off; side by side with the shared input on and the row block
#                 off; every line carries its ids' hash (greedy tokens equal across switches)
#   host-profile  the host's CPU time by function (PEFT_HOST_PROFILE, scripts/host_profile.py):
#                 batch-1 generation and a q,v training run (news2stock-dev unstripped of symbols)
#   launch        bench-launch: the host's cost of one launch per path (Burn op, autodiff, our
#                 cubecl kernel, our cuBLASLt task)
#   dp1           NCCL and data-parallel checks on one GPU
#   dp2 | dp4     the two-rank checks (and over sockets), bench-train on 1 / 2 (/ 4) GPUs
# Every run's nvidia-smi peak (memory.used) and the GPU's busy share (utilization.gpu, samples
# above 16.5 GB, i.e. the 8B model loaded) go to $OUT/summary.txt; logs to $OUT/logs.tgz.
set -u
D=$(cd "$1" && pwd); shift
R=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/lease-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda-13.0/lib64:${LD_LIBRARY_PATH:-}
for f in "$D"/*.gz; do [ -f "$f" ] && [ ! -f "${f%.gz}" ] && gunzip -kf "$f"; done
chmod +x "$D"/news2stock-dev "$D"/gpu_* "$D"/nccl_test 2>/dev/null
S="$OUT/summary.txt"
L="$OUT/logs"; mkdir -p "$L"

mem() { # mem TAG CMD...: samples memory.used and utilization.gpu while CMD runs
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 200 \
    > "$L/samples_$1.txt" & local p=$!
  shift; "$@"; local rc=$?; kill $p; wait $p 2>/dev/null
  return $rc
}
peak() { sort -t, -k1 -n "$L/samples_$1.txt" | tail -1 | cut -d, -f1; }
busy() { awk -F, '$1>16500{s+=$2;n++} END{if(n) printf "%.0f%% of %d samples", s/n, n}' "$L/samples_$1.txt"; }
args_of() {
  case $1 in
    qv-gc) echo "--lora-r 8 --gradient-checkpointing true" ;;
    qv-nogc) echo "--lora-r 8 --gradient-checkpointing false" ;;
    all-gc) echo "--lora-r 16 --gradient-checkpointing true --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" ;;
  esac
}
ours() { # ours TAG DROPOUT CONFIG... (environment set by the caller)
  local tag=$1 p=$2; shift 2
  for name in "$@"; do
    mem "$tag-$name" timeout 240 "$D"/news2stock-dev --batch-size 2 --grad-accum 1 \
      --lora-alpha 32 --lora-dropout "$p" $(args_of "$name") bench-train --steps 6 --warmup 2 \
      > "$L/train_${tag}_$name.txt" 2>&1
    echo "ours $tag $name: $(grep '^{' "$L/train_${tag}_$name.txt" | tail -1) peak_used_mib $(peak "$tag-$name") busy $(busy "$tag-$name")" | tee -a "$S"
    grep '^phases' "$L/train_${tag}_$name.txt" | tail -2 | tee -a "$S"
  done
}
peers() { # peers KIND CONFIG... (config names of peft_baseline.py)
  local kind=$1; shift
  for name in "$@"; do
    case $kind in
      hf) mem "hf-$name" timeout 300 python3 "$R"/scripts/peft_baseline.py --skip-micro --only "$name" ;;
      liger) mem "liger-$name" env PYTHONPATH=/tmp/liger timeout 300 python3 "$R"/scripts/peft_baseline.py --skip-micro --liger --only "$name" ;;
      unsloth) mem "unsloth-$name" env PYTHONPATH=/tmp/unsloth timeout 400 python3 "$R"/scripts/unsloth_bench.py --load /tmp/m8b --only "$name" ;;
    esac > "$L/${kind}_$name.txt" 2>&1
    echo "$kind $name: $(grep '^{' "$L/${kind}_$name.txt" | tail -1) peak_used_mib $(peak "$kind-$name")" | tee -a "$S"
  done
}
ncclenv() { # a folder where libnccl.so resolves (cudarc asks for libnccl.so; NCCL ships .so.2)
  local lib
  lib=$(python3 -c "import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],'lib'))" 2>/dev/null)
  [ -f "$lib/libnccl.so.2" ] || lib=$(dirname "$(find / -name 'libnccl.so.2' 2>/dev/null | head -1)")
  mkdir -p /tmp/nccl && ln -sf "$lib/libnccl.so.2" /tmp/nccl/libnccl.so
  export LD_LIBRARY_PATH=/tmp/nccl:$lib:$LD_LIBRARY_PATH
  echo "nccl from $lib" >> "$S"
}
test_bin() { # test_bin NAME FILTER [TAG]: one GPU test binary, its result line to the summary
  local log="$L/$1_$2${3:+_$3}.txt"
  timeout 300 "$D/$1" --ignored "$2" > "$log" 2>&1
  echo "$1 $2 ${3:-} rc=$? $(grep '^test result' "$log")" | tee -a "$S"
}
dp_train() { # dp_train N: bench-train q,v r8 with checkpointing on N GPUs
  mem "dp$1" timeout 400 "$D"/news2stock-dev --batch-size 2 --grad-accum 1 --lora-alpha 32 \
    --lora-dropout 0.1 $(args_of qv-gc) bench-train --steps 6 --warmup 2 --nproc-per-node "$1" \
    > "$L/dp$1.txt" 2>&1
  echo "dp nproc $1: rc=$? $(grep '^{' "$L/dp$1.txt" | tail -1) peak_used_mib(largest card sample) $(peak "dp$1")" | tee -a "$S"
}
three=${PEERS:-"seed-qv-r8-gc seed-qv-r8-nogc all-r16-gc"}
OPTIN_ENV="PEFT_LORA_UNCHECKED_KERNELS=1"
for stage in "$@"; do
  case $stage in
  info)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$S"
    python3 -c "import torch,transformers,peft;print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__)" 2>&1 | tee -a "$S" ;;
  check)
    # VALIDATE=1: cubecl's `validate` bounds mode (read from cubecl.toml in the working
    # folder): every unchecked launch reports an out-of-range index as "[VALIDATION kernel]".
    V=$(mktemp -d); [ "${VALIDATE:-0}" = 1 ] && printf '[compilation]\ncheck_mode = "validate"\n' > "$V/cubecl.toml"
    for t in ${CHECKS:-gpu_selftest gpu_fused}; do
      (cd "$V" && CUBECL_AUTOTUNE_LEVEL=minimal timeout 300 "$D/$t") > "$L/$t.txt" 2>&1
      echo "$t rc=$? $(tail -1 "$L/$t.txt")" | tee -a "$S"
      grep '"pass":false' "$L/$t.txt" | head -5 | tee -a "$S"
      echo "$t out-of-range reports: $(grep -c 'VALIDATION' "$L/$t.txt")" | tee -a "$S"
    done ;;
  parity)
    # The model's logits on each llama fixture (fixtures/llama/*: transformers' f32 logits)
    # with the defaults and with each switch of PARITY_SWITCHES on (default the causal
    # attention): `bench-model --skip-8b` prints the largest error relative to the logits'
    # scale over the unpadded positions.
    for f in "$R"/fixtures/llama/*/; do
      for sw in default ${PARITY_SWITCHES:-PEFT_LORA_CAUSAL_ATTENTION}; do
        n=$(basename "$f")
        ( [ "$sw" = default ] || export "$sw=1"
          timeout 120 "$D"/news2stock-dev bench-model --skip-8b --fixture "$f" ) > "$L/parity_${n}_$sw.txt" 2>&1
        echo "parity $n $sw rc=$? $(grep '^{' "$L/parity_${n}_$sw.txt" | tail -1)" | tee -a "$S"
      done
    done ;;
  train) ours d01 0.1 ${CONFIGS:-qv-gc qv-nogc all-gc} ;;
  train-optin) export $OPTIN_ENV; ours optin 0.1 ${CONFIGS:-qv-gc qv-nogc all-gc}
    unset PEFT_LORA_UNCHECKED_KERNELS ;;
  train-d0) ours d0 0 ${CONFIGS:-qv-gc qv-nogc all-gc} ;;
  train-ab)
    sws=${AB_SWITCHES:-"PEFT_LORA_MULTI_TENSOR PEFT_LORA_SEEDED_ADAPTERS PEFT_LORA_CAUSAL_ATTENTION PEFT_LORA_SHARED_INPUT"}
    on() { # on ENTRY: each comma-separated NAME (exported as 1) or NAME=VALUE of ENTRY
      local e; for e in ${1//,/ }; do case $e in *=*) export "$e" ;; *) export "$e=1" ;; esac; done
    }
    for sw in $sws; do
      ( on "$sw"; ours "ab-$sw" 0.1 ${CONFIGS:-qv-gc all-gc} )
    done
    ( for sw in $sws; do on "$sw"; done; ours ab-all 0.1 ${CONFIGS:-qv-gc all-gc} ) ;;
  phases) PEFT_TRAIN_PHASES=1 ours phases 0.1 qv-gc all-gc ;;
  hf) peers hf $three ;;
  liger)
    mkdir -p /tmp/liger && (cd /tmp/liger && python3 -m zipfile -e "$D"/liger_kernel-0.8.5-py3-none-any.whl .)
    peers liger $three ;;
  unsloth)
    mkdir -p /tmp/unsloth /tmp/tok && tar xzf "$D"/unsloth-site.tgz -C /tmp/unsloth
    cp "$D"/tokenizer.json /tmp/tok/
    [ -d /tmp/m8b ] || PYTHONPATH=/tmp/unsloth timeout 300 python3 "$R"/scripts/unsloth_bench.py \
      --save /tmp/m8b --tokenizer /tmp/tok > "$L/unsloth_save.txt" 2>&1
    peers unsloth $three ;;
  profile)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ "${OPTIN:-0}" = 1 ] && export $OPTIN_ENV
    timeout 480 "$NCU" --metrics gpu__time_duration.sum --clock-control none --cache-control none \
      --csv --page raw --log-file "$L/profile_qv-gc.csv" "$D"/news2stock-dev --batch-size 2 \
      --grad-accum 1 --lora-alpha 32 --lora-dropout 0.1 $(args_of qv-gc) bench-train --steps 1 \
      --warmup 1 > "$L/profile_run.txt" 2>&1
    echo "profile rc=$?" | tee -a "$S"
    python3 "$R"/scripts/kernel_profile.py "$L/profile_qv-gc.csv" 45 | tee -a "$S" ;;
  gen)
    timeout 200 "$D"/news2stock-dev bench-generate > "$L/gen_ours.txt" 2>&1
    echo "gen ours rc=$?" | tee -a "$S"; grep '^{' "$L/gen_ours.txt" | tee -a "$S"
    timeout 200 python3 "$R"/scripts/bench_transformers_generate.py > "$L/gen_tf.txt" 2>&1
    echo "gen transformers rc=$?" | tee -a "$S"; grep '^{' "$L/gen_tf.txt" | tee -a "$S" ;;
  gen-sample)
    timeout 200 "$D"/news2stock-dev bench-generate --batch 1,64 --sample > "$L/gen_sample_ours.txt" 2>&1
    echo "gen-sample ours rc=$?" | tee -a "$S"; grep '^{' "$L/gen_sample_ours.txt" | tee -a "$S"
    timeout 200 python3 "$R"/scripts/bench_transformers_generate.py --batch 1,64 --sample > "$L/gen_sample_tf.txt" 2>&1
    echo "gen-sample transformers rc=$?" | tee -a "$S"; grep '^{' "$L/gen_sample_tf.txt" | tee -a "$S" ;;
  host-profile)
    # Where the host's time goes (needs news2stock-dev with its symbols: `strip --strip-debug`).
    PEFT_HOST_PROFILE="$L/host_gen_b1.folded" timeout 120 "$D"/news2stock-dev bench-generate --batch 1 > "$L/host_gen_b1.txt" 2>&1
    echo "host-profile gen b1 rc=$?" | tee -a "$S"
    python3 "$R"/scripts/host_profile.py "$L/host_gen_b1.folded" 30 generate 2>&1 | tee -a "$S"
    PEFT_HOST_PROFILE="$L/host_train_qv.folded" timeout 120 "$D"/news2stock-dev --batch-size 2 --grad-accum 1 \
      --lora-alpha 32 --lora-dropout 0.1 --lora-r 8 --gradient-checkpointing true bench-train --steps 6 --warmup 2 > "$L/host_train_qv.txt" 2>&1
    echo "host-profile train qv rc=$?" | tee -a "$S"
    python3 "$R"/scripts/host_profile.py "$L/host_train_qv.folded" 30 bench_train 2>&1 | tee -a "$S" ;;
  sbs)
    timeout 200 "$D"/news2stock-dev bench-generate --side-by-side --batch 64 > "$L/sbs.txt" 2>&1
    echo "side-by-side rc=$?" | tee -a "$S"; grep '^{' "$L/sbs.txt" | tee -a "$S" ;;
  gen-ab)
    ab() { # ab TAG ENV... -- ARGS...: one bench-generate run with the environment given
      local tag=$1; shift; local env=()
      while [ "$1" != "--" ]; do env+=("$1"); shift; done; shift
      env "${env[@]}" timeout 200 "$D"/news2stock-dev bench-generate "$@" > "$L/ab_$tag.txt" 2>&1
      echo "gen-ab $tag rc=$?" | tee -a "$S"; grep '^{' "$L/ab_$tag.txt" | tee -a "$S"
    }
    ab default X=0 -- --batch 1,64
    ab shared_input PEFT_LORA_SHARED_INPUT=1 -- --batch 1,64
    ab split_attention PEFT_LORA_DECODE_ATTENTION=1 -- --batch 1,64
    ab autotune PEFT_LORA_GEMM_AUTOTUNE=1 -- --batch 1,64
    ab no_queued_read PEFT_LORA_QUEUED_READ=0 -- --batch 1,64
    ab sbs X=0 -- --side-by-side --batch 64
    ab sbs_shared_input PEFT_LORA_SHARED_INPUT=1 -- --side-by-side --batch 64
    ab sbs_no_row_block PEFT_LORA_ROW_BLOCK=0 -- --side-by-side --batch 64 ;;
  launch)
    timeout 60 "$D"/news2stock-dev bench-launch > "$L/launch.txt" 2>&1
    echo "launch rc=$?" | tee -a "$S"; grep '^{' "$L/launch.txt" | tee -a "$S" ;;
  dp1)
    ncclenv
    test_bin nccl_test one_rank
    test_bin gpu_data_parallel one_rank_through_nccl ;;
  dp2|dp4)
    ncclenv
    test_bin nccl_test two_ranks
    test_bin gpu_data_parallel two_ranks
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 test_bin nccl_test two_ranks sockets
    dp_train 1; dp_train 2
    [ "$stage" = dp4 ] && dp_train 4 ;;
  *) echo "unknown stage $stage" | tee -a "$S" ;;
  esac
done
tar czf "$OUT/logs.tgz" -C "$L" .
