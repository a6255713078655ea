#!/usr/bin/env bash
# Dense vs pruned at 7-8B scale on one GPU:
#   bash bench/gpu_check.sh OUTDIR               transformers path + scoring cost (no vLLM needed)
#   ENGINE=vllm bash bench/gpu_check.sh OUTDIR   vLLM engines built by tabp_vllm.engine (bench/gpu_vllm.py)
# Env knobs (defaults in brackets): ARCH [llama-3.1-8b], BATCHES [1,16,64], KS [4,8],
# SCORE_K [8], PROMPT_LEN [512], NEW_TOKENS [128], ROUNDS [2], SCORE_SAMPLES [1024], SLEB_SAMPLES [128],
# SCORE_RESERVE_S [150], DEADLINE_S [480], DEVICE [auto], MODEL_DIR [/tmp/synth-ARCH],
# SKIP [] (speed,score,sleb), PYTHON [python3], ENGINE [transformers] (or vllm: ROUNDS [3], no scoring).
# Files the repository does not hold come from .gpu_carry/ at the repository root:
#   .gpu_carry/tokenizer/   tokenizer files (SmolLM2's)   -> synth-model --tokenizer
#   .gpu_carry/data/        arc_easy/train.json            -> TABP_VLLM_DATA
#   .gpu_carry/pydeps/      pydantic installed with --target  -> PYTHONPATH (the score CLI)
#   .gpu_carry/whl/*.whl    or pydantic's wheels: installed offline into $TMPDIR/tabp-pydeps
#   (either only when python cannot import pydantic itself)
#   .gpu_carry/vllm-site.tar.xz.part-*  GPU vLLM packed by scripts/gpu-carry-vllm.sh (ENGINE=vllm,
#                                       only when python cannot import vllm itself)
# Each is used only when present; TABP_VLLM_DATA / TOKENIZER set by the caller win.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY="$ROOT/.gpu_carry"
PY=${PYTHON:-python3}

export PYTHONUNBUFFERED=1
# Carried pydantic only where python lacks one (a carried build for another Python would shadow it).
PYDEPS=""
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if [[ -d "$CARRY/pydeps" ]]; then
    PYDEPS="$CARRY/pydeps"
  elif compgen -G "$CARRY/whl/*.whl" >/dev/null; then
    PYDEPS="${TMPDIR:-/tmp}/tabp-pydeps"
    echo "gpu_check: installing $(ls "$CARRY"/whl/*.whl | wc -l) carried wheels into $PYDEPS"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check \
      --target "$PYDEPS" "$CARRY"/whl/*.whl || echo "gpu_check: wheel install failed (score steps may fail)"
  fi
fi
ENGINE=${ENGINE:-transformers}
if [[ "$ENGINE" == vllm ]] && ! "$PY" -c "import vllm" 2>/dev/null \
    && compgen -G "$CARRY/vllm-site.tar.xz.part-*" >/dev/null; then
  PYDEPS="${TMPDIR:-/tmp}/tabp-vllm-site"
  echo "gpu_check: unpacking the carried vLLM into $PYDEPS"
  mkdir -p "$PYDEPS"
  cat "$CARRY"/vllm-site.tar.xz.part-* | xz -d | tar x -C "$PYDEPS" || echo "gpu_check: unpack failed"
fi
# vLLM 0.26's sampler imports flashinfer unless told not to use it; the carried vLLM has none.
if [[ "$ENGINE" == vllm ]] && ! "$PY" -c "import flashinfer" 2>/dev/null; then
  export VLLM_USE_FLASHINFER_SAMPLER=0
fi
export PYTHONPATH="$ROOT${PYDEPS:+:$PYDEPS}${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${TABP_VLLM_DATA:-}" && -d "$CARRY/data" ]]; then export TABP_VLLM_DATA="$CARRY/data"; fi
if [[ -z "${TOKENIZER:-}" && -d "$CARRY/tokenizer" ]]; then TOKENIZER="$CARRY/tokenizer"; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

ARCH=${ARCH:-llama-3.1-8b}
DEADLINE_S=${DEADLINE_S:-480}
args=(
  "$OUT" --arch "$ARCH" --batches "${BATCHES:-1,16,64}" --ks "${KS:-4,8}"
  --prompt-len "${PROMPT_LEN:-512}" --new-tokens "${NEW_TOKENS:-128}" --rounds "${ROUNDS:-2}"
  --score-samples "${SCORE_SAMPLES:-1024}" --score-k "${SCORE_K:-8}" --sleb-samples "${SLEB_SAMPLES:-128}"
  --score-reserve-s "${SCORE_RESERVE_S:-150}" --deadline-s "$DEADLINE_S"
  --device "${DEVICE:-auto}" --model-dir "${MODEL_DIR:-/tmp/synth-$ARCH}"
)
[[ -n "${TOKENIZER:-}" ]] && args+=(--tokenizer "$TOKENIZER")
[[ -n "${SKIP:-}" ]] && args+=(--skip "$SKIP")

cd "$ROOT"
# The script keeps its own deadline; the outer timeout only guards against a hang it cannot see.
if [[ "$ENGINE" == vllm ]]; then
  args=("$OUT" --arch "$ARCH" --batches "${BATCHES:-1,16,64}" --ks "${KS:-4,8}"
        --prompt-len "${PROMPT_LEN:-512}" --new-tokens "${NEW_TOKENS:-128}" --rounds "${ROUNDS:-3}"
        --deadline-s "$DEADLINE_S" --device "${DEVICE:-auto}" --model-dir "${MODEL_DIR:-/tmp/synth-$ARCH}")
  [[ -n "${TOKENIZER:-}" ]] && args+=(--tokenizer "$TOKENIZER")
  script=bench/gpu_vllm.py
else
  script=bench/gpu_scale.py
fi
timeout -k 10 $(( ${DEADLINE_S%.*} + 60 )) "$PY" "$script" "${args[@]}"
rc=$?
echo "gpu_check: rc=$rc, results in $OUT"
ls -la "$OUT" 2>/dev/null
exit $rc
