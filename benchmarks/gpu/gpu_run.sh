#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool): installs the carried wheels, makes
# unique JPEGs from the carried Caltech subset (each re-encoded at $QUALITIES JPEG qualities, so the
# content-hash dedup cannot short-cut anything), measures the decode stage alone, benchmarks end to
# end (ris bench, tutorial loop on the same GPU in the same run), GPU search vs CPU, and GPU-vs-CPU
# features. Every step has its own time limit; results go to $OUT. ALSO_POOLINGS="grid rmac" benchmarks
# Lite0 with those poolings as well, in the same run; VGG=0 and CHECK=0 skip VGG16 and the feature check;
# WRITE_PROBE=1 times the catalogue's commits alone on /tmp and /dev/shm (benchmarks/catalogue/commit_throughput.py);
# PROBE_WRITER=1 the pipeline with a stand-in model (benchmarks/catalogue/pipeline_writer.py); BENCH=0 stops there.
set -u
export PYTHONUNBUFFERED=1 RIS_CACHE_DIR=/tmp/riscache PYTHONPATH=/tmp/site:$PWD/src VGG_WEIGHTS=/tmp/vgg16-random.pth
QUALITIES=${QUALITIES:-"95 92 90 88 85 82 80 78 75 72 70 65"}
WORKERS=${WORKERS:-14}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a $OUT/gpu.txt
QUALITIES="$QUALITIES" timeout 90 python3 - <<'PY'
import os, concurrent.futures as cf
from PIL import Image
src, dst = ".gpu/caltech", "/tmp/imgs"
qualities = [int(q) for q in os.environ["QUALITIES"].split()]
jobs = [(os.path.join(r, f), os.path.basename(r), f) for r, _, fs in os.walk(src) for f in fs]
def make(job):
    path, cls, name = job
    img = Image.open(path).convert("RGB")
    os.makedirs(f"{dst}/{cls}", exist_ok=True)
    for q in qualities:
        img.save(f"{dst}/{cls}/q{q}_{name}", "JPEG", quality=q)
with cf.ProcessPoolExecutor(16) as ex:
    list(ex.map(make, jobs, chunksize=32))
import torch
from ris.model.networks import VGG16
torch.manual_seed(0)
torch.save(VGG16().state_dict(), "/tmp/vgg16-random.pth")  # speed only: random weights
print("images:", sum(len(fs) for _, _, fs in os.walk(dst)))
PY
if [ "${WRITE_PROBE:-0}" = 1 ]; then
  echo "== catalogue commits alone (grid3's 11,520-d features, then 1,280-d)"
  for dir in /tmp /dev/shm; do for dims in 11520 1280; do
    timeout 60 python3 benchmarks/catalogue/commit_throughput.py --dims $dims --dir $dir | tee -a $OUT/commits.json
  done; done
fi
echo "== decode stage alone"
timeout 40 python3 benchmarks/indexing/decode_throughput.py /tmp/imgs --workers $WORKERS --batch-size 256 | tee $OUT/decode.json
if [ "${PROBE_WRITER:-0}" = 1 ]; then
  echo "== the pipeline's writer with a stand-in model"
  timeout 150 python3 benchmarks/catalogue/pipeline_writer.py /tmp/imgs --workers $WORKERS --batch-size 256 ${WRITER_ARGS:-} | tee -a $OUT/writer.json
fi
[ "${BENCH:-1}" = 1 ] || exit 0
bench() {  # model decode-mode tag extra-args...
  local model=$1 dec=$2 tag=$3${TMPDIR:+_$(basename ${TMPDIR})}; shift 3
  echo "== $model decode=$dec $tag $(date +%T)"
  RIS_DECODE=$dec timeout 100 python3 -m ris bench /tmp/imgs --model $model "$@" --device cuda --batch-size 256 \
    --workers $WORKERS --baseline-limit 300 --json > $OUT/bench_${model}_${dec}${tag}.json 2>>$OUT/log.txt
  python3 -c "import json; r=json.load(open('$OUT/bench_${model}_${dec}${tag}.json')); print({k: r[k] for k in ('pooling','images','images_per_s','baseline_images_per_s','ratio','stages_s','gpu_util_pct','model_load_s','peak_rss_mb')})"
}
bench efficientnet-lite0 cpu ""
for pooling in ${ALSO_POOLINGS:-}; do bench efficientnet-lite0 cpu _$pooling --pooling $pooling; done
[ "${EAGER:-0}" = 1 ] && RIS_CUDA_GRAPHS=0 bench efficientnet-lite0 cpu _eager
[ "${VGG:-1}" = 1 ] && bench vgg16 cpu "" --weights /tmp/vgg16-random.pth
if [ "${SEARCH:-1}" = 1 ]; then
  echo "== search $(date +%T)"
  timeout 110 python3 benchmarks/gpu/gpu_search_check.py > /dev/null 2>>$OUT/log.txt; tail -c 2500 $OUT/gpu_search.json; echo
fi
[ "${DEVICE_DECODE:-1}" = 1 ] && bench efficientnet-lite0 device ""
for dec in $([ "${CHECK:-1}" = 1 ] && echo cpu) $([ "${DEVICE_DECODE:-1}" = 1 ] && echo device); do
  echo "== features GPU (decode=$dec) vs CPU $(date +%T)"
  RIS_DECODE=$dec timeout 60 python3 benchmarks/gpu/gpu_check.py /tmp/imgs $OUT/gpu_check_$dec.json 2>>$OUT/log.txt | tail -5
done
grep -v Warning $OUT/log.txt | tail -8
