#!/bin/bash
# ComfyUI interop checks for lora_diffusion (see ../README.md). About 8 min on 2 CPU cores, < 2 GB RSS.
#   COMFYUI_DIR  a ComfyUI checkout (required; imported, never copied here)
#   OUT          where files and results go (default: $TMPDIR/lora_diffusion_interop/comfyui)
#   PYTHON       interpreter with torch, diffusers, transformers, lora_diffusion, einops, torchsde, scipy (default: python)
# Prints the summary lines; each script's stdout is in $OUT/<name>.log, its stderr (ComfyUI's warnings) in
# $OUT/<name>.err, its results in $OUT/*.json.
set -euo pipefail
: "${COMFYUI_DIR:?set COMFYUI_DIR to a ComfyUI checkout}"
export COMFYUI_DIR="$(cd "$COMFYUI_DIR" && pwd)"
export OUT="${OUT:-${TMPDIR:-/tmp}/lora_diffusion_interop/comfyui}"
mkdir -p "$OUT"
export OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repo
cd "$(dirname "$0")"
echo "ComfyUI: $COMFYUI_DIR ($(git -C "$COMFYUI_DIR" rev-parse HEAD 2>/dev/null || echo 'not a git checkout'))"
echo "OUT: $OUT"

run() {  # run <name> <script> [args]: stdout to $OUT/<name>.log, stderr to $OUT/<name>.err; stop on failure
    local name="$1"; shift
    if ! "$PY" "$@" >"$OUT/$name.log" 2>"$OUT/$name.err"; then
        echo "FAILED: $* (last lines of $OUT/$name.err:)"; tail -n 20 "$OUT/$name.err"; exit 1
    fi
}
show() { grep -E "$2" "$OUT/$1.log" || true; }

run q123_sd15 q123_our_files_in_comfy.py sd15;  show q123_sd15 '^\[|wrote'
run q123_sdxl q123_our_files_in_comfy.py sdxl;  show q123_sdxl '^\[|wrote'
run q2_sdxl_naming q2_sdxl_naming.py;           tail -n 20 "$OUT/q2_sdxl_naming.log"
run q4 q4_comfy_files_in_ours.py sd15 sdxl;     show q4 '^\['
run q4b q4b_uninitialised_text_projection.py;   show q4b '.'
run q1b q1b_diffusers_alpha_and_dora.py;        show q1b '.'
run q1c q1c_dora_formula.py;                    show q1c '.'
