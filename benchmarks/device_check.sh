#!/usr/bin/env bash
# The prepared checks for a lent GPU, in two parts of ~4 and ~6 minutes, each one `run` of the device tool
# (the machine stays warm between two calls made back to back). From the repository root on the device
# machine, whose python3 holds a CUDA build of PyTorch (nrgpt is used from src/, not installed):
#
#   bash benchmarks/device_check.sh bench   "$OUT"   # issue 15: run_all.py --device cuda (readiness, training
#                                                    # steps, generation; the authors' code on the same weights
#                                                    # when a checkout of it is carried as .reference/)
#   bash benchmarks/device_check.sh listops "$OUT"   # issue 14, question 5: sweeps/listops_fig3_gpu_probe.toml,
#                                                    # its three runs side by side, then `nrgpt report`
#
# To carry the authors' code: here, `echo /.reference/ >> .git/info/exclude`, copy a checkout of
# github.com/bhoov/nrgpt to .reference/, and name `.reference` in the call's `carry`. What comes back (at most
# 8 files): the benchmark summary and JSON files, or the sweep's tables, report and a tarball of its runs.
set -euo pipefail
part=${1:?usage: device_check.sh bench|listops OUT_DIR}
out=${2:?usage: device_check.sh bench|listops OUT_DIR}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check.sh: no CUDA device here')"
mkdir -p "$out"
case "$part" in
  bench)
    if [ -f .reference/models/energy_models.py ]; then export NRGPT_REFERENCE_DIR="$PWD/.reference"; fi
    python3 benchmarks/run_all.py --device cuda --threads 8 --out "$out/bench" 2>&1 | tee "$out/bench.log"
    cp "$out/bench/summary.md" "$out/summary.md"
    tar -czf "$out/bench.tar.gz" -C "$out" bench && rm -r "$out/bench"
    ;;
  listops)
    python3 -m nrgpt prepare listops
    sweep=sweeps/listops_fig3_gpu_probe.toml dir=runs/sweeps/listops_fig3_gpu_probe
    for i in 0 1 2; do python3 -m nrgpt sweep "$sweep" --shard "$i/3" --quiet > "$out/shard$i.log" 2>&1 & done
    wait
    python3 -m nrgpt sweep "$sweep" --report > "$out/report.log" 2>&1   # every run finished: tables and report only
    cp "$dir/results.md" "$dir/report.md" "$out/"
    tar -czf "$out/listops_probe.tar.gz" --exclude='*.safetensors' "$dir"
    ;;
  *)
    echo "device_check.sh: unknown part '$part'; use bench or listops" >&2
    exit 2
    ;;
esac
