#!/usr/bin/env bash
# The GPU measurements of issues 10 and 11 as one prepared script, for a lent GPU machine:
#   bash benchmarks/gpu_check.sh [PART ...]     (default: every part, in the order below)
# Run from the repository root; wheels of packages that machine lacks go in .whl/ (see README).
# Each part has its own time limit, so one slow part cannot take the others' time; the whole
# log goes to $OUT/gpu_check.log (default OUT: gpu_logs/), the end of each part to stdout.
# Issue 10, run 8 (about 4 minutes): cuda_tests cca_engine cca_engine_warm score_61min sums_61min
# (compensated moments and the fits' warm-up on CUDA); run 9 (about 2 minutes): cuda_tests
# sums_10min (a seed's scores the same on every run: pooling without atomics).
set -u
OUT="${OUT:-gpu_logs}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=python3
part() {  # part NAME SECONDS TAIL CMD...: run with a limit, log, print the last TAIL lines
    local name=$1 limit=$2 tail=$3; shift 3
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
    local rc=$?
    cat "/tmp/$name.log" >> "$OUT/gpu_check.log"
    grep -v "Warning\|warn(\|it/s\]" "/tmp/$name.log" | tail -n "$tail"
    echo "=== $name: rc $rc, $((SECONDS - start)) s" | tee -a "$OUT/gpu_check.log"
}
run_part() {
    case $1 in
    # 11: the Base step (new vs old, bf16 and fp32, memory), compiled, a big batch, convolutions
    train_eager) part "$1" 110 12 $PY benchmarks/train_throughput.py --compile no ;;
    train_compiled) part "$1" 170 6 $PY benchmarks/train_throughput.py --skip-old \
        --compile yes --precision bf16 --no-memory ;;
    train_batch32) part "$1" 50 4 $PY benchmarks/train_throughput.py --skip-old --compile no \
        --precision bf16 --no-memory --batch 32 --steps 5 ;;
    train_bf16) part "$1" 50 3 $PY benchmarks/train_throughput.py --skip-old --compile no \
        --precision bf16 --no-memory ;;
    train_loop_shape) part "$1" 50 3 $PY benchmarks/train_throughput.py --skip-old \
        --compile no --precision bf16 --no-memory --batch 29 --seconds 3 ;;
    conv_kernels) part "$1" 60 14 $PY benchmarks/conv_kernels.py ;;
    train_cudnn) part "$1" 60 4 $PY benchmarks/train_throughput.py --skip-old --compile no \
        --precision bf16 --no-memory --cudnn-benchmark ;;
    profile_cudnn) part "$1" 45 30 $PY benchmarks/train_throughput.py --profile --skip-old \
        --rows 25 --cudnn-benchmark ;;
    profile_step) part "$1" 45 30 $PY benchmarks/train_throughput.py --profile --skip-old \
        --rows 25 ;;
    # 10: scoring an hour (and two) of audio with PWCCA + MI on the GPU
    score_61min) part "$1" 180 10 $PY benchmarks/score_end_to_end.py --minutes 61 \
        --device cuda ;;
    # 11: label stage on an hour of audio
    label_stage) part "$1" 90 3 $PY benchmarks/train_throughput.py --label-stage 3600 \
        --layer 6 ;;
    # 11: DDP over NCCL under torchrun (one GPU): the real loop on the bundled corpus, Base
    ddp_nccl)
        sed 's/^log_every = 100/log_every = 25/; s/^save_every = 1000/save_every = 100/' \
            pretraining/configs/base.toml > /tmp/base_gpu.toml
        part "$1" 120 8 torchrun --standalone --nproc_per_node 1 -m pretraining \
            --config /tmp/base_gpu.toml --schedule original --steps 200 --no-profile \
            --device cuda --out /tmp/ddp_run ;;
    loop_no_ddp)  # the same loop in one process without DDP: what DDP costs the loop
        sed 's/^log_every = 100/log_every = 25/; s/^save_every = 1000/save_every = 100/' \
            pretraining/configs/base.toml > /tmp/base_gpu.toml
        part "$1" 120 8 $PY -m pretraining --config /tmp/base_gpu.toml --schedule original \
            --steps 200 --no-profile --device cuda --out /tmp/loop_run ;;
    # 10: the CCA engine on CUDA (and where its fits spend their time); the CUDA tests
    # 11: torchaudio's blocks vs block_forward (one q/k/v matmul), Base width, the step's shape
    blocks_ab) part "$1" 60 3 $PY benchmarks/step_host_overhead.py --block --n-blocks 12 \
        --preset-width --batch 8 --seconds 10 --rounds 20 --device cuda --bf16 ;;
    # 10: MI's k-means alone (torch on the GPU vs scikit-learn on the host), published settings
    mi_kmeans) part "$1" 120 8 $PY benchmarks/score_end_to_end.py --kmeans --device cuda \
        --layers 3 --items 20000 --clusters 500 ;;
    # 10: the same k-means on the host's CPU cores, torch against scikit-learn (the CPU 10x)
    mi_kmeans_cpu) part "$1" 150 8 $PY benchmarks/score_end_to_end.py --kmeans --device cpu \
        --layers 3 --items 20000 --clusters 500 ;;
    cca_engine) part "$1" 60 12 $PY benchmarks/cca_engine.py --device cuda --metrics ;;
    # 10: the same with the fits' libraries started in a background thread (as scoring does)
    cca_engine_warm) part "$1" 60 8 $PY benchmarks/cca_engine.py --device cuda --warm-up \
        --ref-layers 0 ;;
    # 10: compensated (exact_sums) vs plain float64 moments on an hour of audio
    sums_61min) part "$1" 200 14 $PY benchmarks/score_end_to_end.py --compare-sums \
        --minutes 61 --device cuda ;;
    sums_10min) part "$1" 120 12 $PY benchmarks/score_end_to_end.py --compare-sums \
        --minutes 10 --device cuda ;;
    # the fits with the host's LAPACK on one thread (the split of the host SVD off), same card
    cca_engine_1t) part "$1" 60 5 $PY benchmarks/cca_engine.py --device cuda --threads 1 \
        --ref-layers 0 ;;
    cca_cpu) part "$1" 90 6 $PY benchmarks/cca_engine.py --device cpu --ref-layers 0 \
        --threads 16 ;;
    cca_profile) part "$1" 60 60 $PY benchmarks/cca_engine.py --device cuda --ref-layers 0 \
        --profile ;;
    device_agreement) part "$1" 240 8 $PY benchmarks/device_agreement.py --preset base ;;
    cuda_tests) part "$1" 90 4 $PY -m pytest -q -p no:cacheprovider tests/test_extract.py \
        tests/test_precision.py tests/test_models.py tests/test_kmeans.py \
        tests/test_stats.py tests/test_cca.py tests/test_probes.py tests/test_score.py \
        -k "cuda or device or precision" ;;
    *) echo "unknown part $1" ;;
    esac
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
$PY -c "import torch, torchaudio, transformers; print(torch.__version__, torchaudio.__version__,
transformers.__version__)"
PARTS=("$@")
if [ ${#PARTS[@]} -eq 0 ]; then
    PARTS=(train_eager blocks_ab train_compiled train_batch32 score_61min label_stage ddp_nccl
           loop_no_ddp cca_engine mi_kmeans mi_kmeans_cpu device_agreement cuda_tests conv_kernels
           profile_step)
fi
for name in "${PARTS[@]}"; do run_part "$name"; done
