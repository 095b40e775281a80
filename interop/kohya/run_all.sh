#!/bin/bash
# kohya-ss/sd-scripts interop checks for lora_diffusion (see ../README.md). About 12 min on 2 CPU cores; peak
# anonymous memory ~7.6 GB (q1_ours locon, fused; RSS incl. mmapped files ~15 GB), ~13 GB of files in $OUT.
#   SD_SCRIPTS_DIR  a kohya-ss/sd-scripts checkout (required; imported, never copied here)
#   PYTHON_OLD_TF   interpreter with transformers < 5.6 (CLIP module paths with text_model., as kohya's pinned 4.54.1),
#                   torch, diffusers, lora_diffusion, einops, accelerate (required)
#   PYTHON_NEW_TF   interpreter with transformers >= 5.6 (flattened CLIP), lora_diffusion; einops for te_newtf.py
#                   (default: python)
#   OUT             where files and logs go (default: $TMPDIR/lora_diffusion_interop/kohya)
# Prints each script's output (kohya's INFO logging filtered); unfiltered logs in $OUT/<step>.log.
set -euo pipefail
: "${SD_SCRIPTS_DIR:?set SD_SCRIPTS_DIR to a kohya-ss/sd-scripts checkout}"
: "${PYTHON_OLD_TF:?set PYTHON_OLD_TF to an interpreter with transformers < 5.6}"
export SD_SCRIPTS_DIR="$(cd "$SD_SCRIPTS_DIR" && pwd)"
export OUT="${OUT:-${TMPDIR:-/tmp}/lora_diffusion_interop/kohya}"
mkdir -p "$OUT"
export OUT="$(cd "$OUT" && pwd)"
export MALLOC_ARENA_MAX=2 PYTHONDONTWRITEBYTECODE=1
V="$PYTHON_OLD_TF"; W="${PYTHON_NEW_TF:-python}"
cd "$(dirname "$0")"
echo "sd-scripts: $SD_SCRIPTS_DIR ($(git -C "$SD_SCRIPTS_DIR" rev-parse HEAD 2>/dev/null || echo 'not a git checkout'))"
echo "OUT: $OUT"
W_TF=$("$W" -c "import transformers; print(transformers.__version__.replace('.', ''))")

run() {  # run <step name> <python> <script> [args]: log to $OUT/<step>.log, print it filtered, stop on failure
    local log="$OUT/$1.log"; shift
    local rc=0
    "$@" >"$log" 2>&1 || rc=$?
    grep -Ev 'INFO|^ {20,}|torchvision' "$log" || true
    if [ "$rc" -ne 0 ]; then echo "FAILED ($rc): $* (log: $log)"; exit 1; fi
}

run make_base "$V" make_base.py
for v in lora locon; do run "q1_kohya_$v" "$V" q1_kohya.py "$v"; done
for v in lora locon; do
    run "q1_ours_${v}_oldtf" "$V" q1_ours.py "$v"
    run "q1_ours_${v}_newtf" "$W" q1_ours.py "$v"
done
run te_newtf "$W" te_newtf.py
for t in attn full; do
    run "q2_ours_$t" "$W" q2_ours.py "$t"
    run "q2_kohya_$t" "$V" q2_kohya.py "${t}_tf${W_TF}"
done
run q3_kohya "$V" q3_kohya.py
run q3_ours_oldtf "$V" q3_ours.py
run q3_ours_newtf "$W" q3_ours.py
run q3_kohya_load "$V" q3_kohya_load.py
run q3_repro_unet_only "$W" q3_repro_unet_only.py
