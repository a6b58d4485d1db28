#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool): installs the carried wheels, makes
# ~9,000 unique JPEGs from the carried Caltech subset (re-encoded at different qualities, so the
# content-hash dedup cannot short-cut anything), then benchmarks, checks GPU-vs-CPU features and
# samples GPU utilisation. Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1 RIS_CACHE_DIR=/tmp/riscache PYTHONPATH=/tmp/site:$PWD/src
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 - <<'PY'
import os, io, concurrent.futures as cf
from PIL import Image
src = ".gpu/caltech"; dst = "/tmp/imgs"
jobs = [(os.path.join(r, f), os.path.basename(r), f) for r, _, fs in os.walk(src) for f in fs]
def make(job):
    path, cls, name = job
    img = Image.open(path).convert("RGB")
    os.makedirs(f"{dst}/{cls}", exist_ok=True)
    for q in (95, 90, 85, 80, 75, 70):
        img.save(f"{dst}/{cls}/q{q}_{name}", "JPEG", quality=q)
with cf.ProcessPoolExecutor(16) as ex:
    list(ex.map(make, jobs, chunksize=32))
print("images:", sum(len(fs) for _, _, fs in os.walk(dst)))
PY
python3 - <<'PY'
import torch, sys
sys.path.insert(0, "src")
from ris.models import VGG16
torch.manual_seed(0)
torch.save(VGG16().state_dict(), "/tmp/vgg16-random.pth")  # speed only: random weights
PY
(nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 100 > $OUT/util.csv) &
SMI=$!
for bs in 256; do
  echo "== lite0 bs=$bs" | tee -a $OUT/log.txt
  timeout 150 python3 -m ris bench /tmp/imgs --device cuda --batch-size $bs --workers 12 --baseline-limit 300 --json \
    > $OUT/bench_lite0.json 2>>$OUT/log.txt; cat $OUT/bench_lite0.json
  date +%s.%N >> $OUT/marks.txt
  echo "== vgg16 bs=$bs" | tee -a $OUT/log.txt
  timeout 150 python3 -m ris bench /tmp/imgs --model vgg16 --weights /tmp/vgg16-random.pth --device cuda \
    --batch-size $bs --workers 12 --baseline-limit 300 --json > $OUT/bench_vgg16.json 2>>$OUT/log.txt; cat $OUT/bench_vgg16.json
  date +%s.%N >> $OUT/marks.txt
done
kill $SMI
timeout 120 python3 benchmarks/gpu_check.py /tmp/imgs $OUT/gpu_check.json 2>>$OUT/log.txt
tail -20 $OUT/log.txt
