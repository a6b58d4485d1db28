#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool): installs the carried wheels, makes
# ~9,000 unique JPEGs from the carried Caltech subset (re-encoded at six qualities, so the
# content-hash dedup cannot short-cut anything), profiles model and decoders, then benchmarks
# end to end with the best model settings, checks GPU-vs-CPU features and samples GPU utilisation.
set -u
export PYTHONUNBUFFERED=1 RIS_CACHE_DIR=/tmp/riscache PYTHONPATH=/tmp/site:$PWD/src VGG_WEIGHTS=/tmp/vgg16-random.pth
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 - <<'PY'
import os, concurrent.futures as cf
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
import torch, sys
sys.path.insert(0, "src")
from ris.models import VGG16
torch.manual_seed(0)
torch.save(VGG16().state_dict(), "/tmp/vgg16-random.pth")  # speed only: random weights
print("images:", sum(len(fs) for _, _, fs in os.walk(dst)))
PY
[ "${PROFILE:-0}" = 1 ] && timeout 200 python3 benchmarks/gpu_profile.py /tmp/imgs $OUT/profile.json 2>>$OUT/log.txt
for model in efficientnet-lite0 vgg16; do
  prec=bf16; cl=1  # the profile's best (fp16 within 2%): bf16 needs no loss scaling worries
  W=""; [ $model = vgg16 ] && W="--weights /tmp/vgg16-random.pth"
  for dec in cpu device; do
    echo "== $model $prec cl=$cl decode=$dec $(date +%s.%N)" | tee -a $OUT/log.txt $OUT/marks.txt
    RIS_DECODE=$dec timeout 120 python3 -m ris bench /tmp/imgs --model $model $W --device cuda --batch-size 256 \
      --workers 14 --baseline-limit 300 --json > $OUT/bench_${model}_${dec}.json 2>>$OUT/log.txt
    echo "   end $(date +%s.%N)" >> $OUT/marks.txt
    python3 -c "import json; r=json.load(open('$OUT/bench_${model}_${dec}.json')); print({k: r[k] for k in ('images_per_s','baseline_images_per_s','ratio','stages_s','gpu_util_pct','model_load_s')})"
  done
done
rm -f $OUT/marks.txt
RIS_DECODE=device timeout 90 python3 benchmarks/gpu_check.py /tmp/imgs $OUT/gpu_check.json 2>>$OUT/log.txt | tail -8
grep -v Warning $OUT/log.txt | tail -5
