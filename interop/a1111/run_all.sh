#!/bin/bash
# A1111 interop checks for lora_diffusion (see README.md here). About 5-6 min on 2 busy CPU cores, < 2 GB RSS.
#   A1111_DIR  an AUTOMATIC1111/stable-diffusion-webui checkout or export (required; imported, never copied here)
#   LBW_DIR    a hako-mikan/sd-webui-lora-block-weight checkout (required by q3_lbw.py)
#   CLIP_BPE   open_clip's bpe_simple_vocab_16e6.txt.gz (required by q3_prompt.py: CLIP-L's real tokenizer)
#   OUT        where files and results go (default: $TMPDIR/lora_diffusion_interop/a1111)
#   PYTHON     interpreter with torch, diffusers, transformers, safetensors and lora_diffusion (default: python)
# Prints the PASS / KNOWN / FAIL lines; each script's full output is in $OUT/<name>.log, its results in $OUT/*.json.
# Exit status 1 if any check printed FAIL (all scripts still run).
set -uo pipefail
: "${A1111_DIR:?set A1111_DIR to a stable-diffusion-webui checkout}"
: "${LBW_DIR:?set LBW_DIR to a sd-webui-lora-block-weight checkout}"
: "${CLIP_BPE:?set CLIP_BPE to bpe_simple_vocab_16e6.txt.gz}"
export A1111_DIR="$(cd "$A1111_DIR" && pwd)" LBW_DIR="$(cd "$LBW_DIR" && pwd)"
export CLIP_BPE="$(cd "$(dirname "$CLIP_BPE")" && pwd)/$(basename "$CLIP_BPE")"
export OUT="${OUT:-${TMPDIR:-/tmp}/lora_diffusion_interop/a1111}"
mkdir -p "$OUT"
export OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the repo
cd "$(dirname "$0")"
echo "A1111: $A1111_DIR ($(git -C "$A1111_DIR" rev-parse HEAD 2>/dev/null || echo 'not a git checkout'))"
echo "LBW: $LBW_DIR ($(git -C "$LBW_DIR" rev-parse HEAD 2>/dev/null || echo 'not a git checkout'))"
echo "OUT: $OUT"

status=0
run() {  # run <script>: full output to $OUT/<script>.log, verdict lines printed
    local name="${1%.py}" rc=0
    "$PY" "$1" >"$OUT/$name.log" 2>&1 || rc=$?
    grep -E '^(PASS|KNOWN|FAIL) |PASS, ' "$OUT/$name.log" || true
    if [ "$rc" -ne 0 ]; then
        grep -q '^FAIL ' "$OUT/$name.log" || { echo "ERROR ($rc): $1 (last lines of $OUT/$name.log:)"; tail -n 20 "$OUT/$name.log"; }
        status=1
    fi
}

run check_ldm_names.py
run q12_keys_weights.py
run q3_prompt.py
run q3_lbw.py
run q4_emphasis.py
run q3_alias.py
exit $status
