#!/usr/bin/env bash
# The GPU figures of issue 30 in one command, on a machine with a CUDA GPU and this
# repository's environment:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]          # default OUTDIR: gpu_check_out
#
# 1. the CUDA tests (tests/test_curvature.py::test_cuda_matches_cpu and the FNO test of
#    tests/test_operators.py, skipped on CPU-only machines);
# 2. benchmarks/scale.py --device cuda for the narrow ResNet-18, the ViT and the 1000-class
#    head: the same rows and ratios as the CPU table of docs/guide.md ("Cost at scale");
# 3. the internal dtype on a GPU: float32 / bf16 / fp16 models with the float64 internal
#    algebra (the library's policy) and with float32 internals, each fit row with "err",
#    the relative error of the log evidence against the float64 model's fit.
#
# Everything goes to OUTDIR/*.txt and is summarised in OUTDIR/table.md (the card named);
# paste that table beside the CPU one in docs/guide.md. Not yet run (no GPU was lent while
# it was written): expect 10-15 minutes on an H100 (every row is a fresh process); DTYPE_ROWS
# (default fit-kfac,fit-ekfac) narrows step 3.
set -u
OUT=${1:-gpu_check_out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

CARD=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')")
if [ "$CARD" = "none" ]; then
    echo "no CUDA device visible to torch; nothing to measure" | tee "$OUT/table.md"
    exit 1
fi
echo "card: $CARD" | tee "$OUT/card.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/card.txt" 2>&1

# 1. CUDA tests
timeout 600 $PY -m pytest -q -rs tests/test_curvature.py tests/test_operators.py -k cuda \
    2>&1 | tail -20 | tee "$OUT/cuda_tests.txt"

# 2. the ratio table on the GPU (same rows as the CPU table)
ROWS=fit-kfac,fit-kfac-reduce,fit-diag,fit-ekfac,marglik,predict-256
timeout 1200 $PY benchmarks/scale.py --device cuda --workloads resnet18-narrow,vit,head1000 \
    --rows "$ROWS" --timeout 300 2>&1 | tee "$OUT/scale_cuda.txt"

# 3. internal dtype per model dtype (float64 internal = the policy; float32 = the trade-off)
for DT in float32 bfloat16 float16; do
    for INT in float64 float32; do
        timeout 600 $PY benchmarks/scale.py --device cuda --workloads resnet18-narrow,vit \
            --rows "${DTYPE_ROWS:-fit-kfac,fit-ekfac}" --dtype "$DT" --internal "$INT" \
            --timeout 200 \
            2>&1 | tee "$OUT/dtype_${DT}_${INT}.txt"
    done
done

{
    echo "## GPU: $CARD"
    echo
    echo '```'
    cat "$OUT/scale_cuda.txt"
    echo
    for f in "$OUT"/dtype_*.txt; do cat "$f"; echo; done
    echo '```'
    echo
    echo "CUDA tests: $(tail -1 "$OUT/cuda_tests.txt")"
} > "$OUT/table.md"
echo "wrote $OUT/table.md"
