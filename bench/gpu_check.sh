#!/usr/bin/env bash
# Dense vs pruned at 7-8B scale on one GPU:
#   bash bench/gpu_check.sh OUTDIR               transformers path + scoring cost (no vLLM needed)
#   ENGINE=vllm bash bench/gpu_check.sh OUTDIR   vLLM engines built by tabp_vllm.engine
#   ENGINE=serve bash bench/gpu_check.sh OUTDIR  `tabp-vllm serve` vs a bare vLLM server
# (all three: bench/gpu.py --engine ENGINE)
# Env knobs (defaults in brackets): ARCH [llama-3.1-8b], BATCHES [1,16,64], KS [4,8],
# SCORE_K [8], PROMPT_LEN [512], NEW_TOKENS [128], ROUNDS [2], SCORE_SAMPLES [1024], SLEB_SAMPLES [128],
# SCORE_RESERVE_S [150], DEADLINE_S [480], DEVICE [auto], MODEL_DIR [/tmp/synth-ARCH],
# SKIP [] (speed,score,sleb), PYTHON [python3], ENGINE [transformers] (or vllm: ROUNDS [3], no scoring;
# or serve: BATCHES are the concurrencies, DURATION [16] s per variant per level, RAMP [2]).
# Files the repository does not hold come from $GPU_CARRY [.gpu_carry/ at the repository root]
# (a folder outside the checkout, e.g. /tmp/gpu_carry, keeps parts carried by earlier calls):
#   .gpu_carry/tokenizer/   tokenizer files (SmolLM2's)   -> synth-model --tokenizer
#   .gpu_carry/data/        arc_easy/train.json            -> TABP_VLLM_DATA
#   .gpu_carry/pydeps/      pydantic installed with --target  -> PYTHONPATH (the score CLI)
#   .gpu_carry/whl/*.whl    or pydantic's wheels: installed offline into $TMPDIR/tabp-pydeps
#   (either only when python cannot import pydantic itself)
#   .gpu_carry/vllm-site.tar.xz.part-*  GPU vLLM packed by scripts/gpu-carry-vllm.sh (ENGINE=vllm
#                                       or serve, only when python cannot import vllm itself)
#   .gpu_carry/ray-site.tar.xz.part-*   Ray Serve packed by scripts/gpu-carry-ray.sh (ENGINE=serve,
#                                       only when python cannot import ray.serve.llm itself)
# Each is used only when present; TABP_VLLM_DATA / TOKENIZER set by the caller win.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=${GPU_CARRY:-$ROOT/.gpu_carry}
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
case "$ENGINE" in transformers|vllm|serve) ;; *) echo "error: ENGINE must be transformers, vllm or serve, not '$ENGINE'" >&2; exit 2 ;; esac
# Carried packages (vLLM; Ray Serve for ENGINE=serve) unpack into one folder on PYTHONPATH.
unpack_carry() {  # NAME IMPORT: unpack $CARRY/NAME-site.tar.xz.part-* unless python imports IMPORT
  if ! PYTHONPATH="${PYDEPS:-}" "$PY" -c "import $2" 2>/dev/null \
      && compgen -G "$CARRY/$1-site.tar.xz.part-*" >/dev/null; then
    PYDEPS="${TMPDIR:-/tmp}/tabp-vllm-site"
    echo "gpu_check: unpacking the carried $1 into $PYDEPS"
    mkdir -p "$PYDEPS"
    cat "$CARRY/$1"-site.tar.xz.part-* | xz -d | tar x -C "$PYDEPS" || echo "gpu_check: unpack failed"
  fi
}
if [[ "$ENGINE" == vllm || "$ENGINE" == serve ]]; then
  unpack_carry vllm vllm
  [[ "$ENGINE" == serve ]] && unpack_carry ray ray.serve.llm
  # vLLM 0.26's sampler imports flashinfer unless told not to use it; the carried vLLM has none.
  if ! "$PY" -c "import flashinfer" 2>/dev/null; then export VLLM_USE_FLASHINFER_SAMPLER=0; fi
fi
export PYTHONPATH="$ROOT${PYDEPS:+:$PYDEPS}${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${TABP_VLLM_DATA:-}" && -d "$CARRY/data" ]]; then export TABP_VLLM_DATA="$CARRY/data"; fi
if [[ -z "${TOKENIZER:-}" && -d "$CARRY/tokenizer" ]]; then TOKENIZER="$CARRY/tokenizer"; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

ARCH=${ARCH:-llama-3.1-8b}
DEADLINE_S=${DEADLINE_S:-480}
# What every engine takes; each adds its own below.
args=(
  "$OUT" --arch "$ARCH" --batches "${BATCHES:-1,16,64}" --ks "${KS:-4,8}"
  --prompt-len "${PROMPT_LEN:-512}" --new-tokens "${NEW_TOKENS:-128}" --deadline-s "$DEADLINE_S"
  --device "${DEVICE:-auto}" --model-dir "${MODEL_DIR:-/tmp/synth-$ARCH}"
)
[[ -n "${TOKENIZER:-}" ]] && args+=(--tokenizer "$TOKENIZER")
case "$ENGINE" in
  vllm)
    args+=(--rounds "${ROUNDS:-3}") ;;
  serve)  # BATCHES are the bench's closed-loop concurrencies
    args+=(--rounds "${ROUNDS:-2}" --duration "${DURATION:-16}" --ramp "${RAMP:-2}") ;;
  *)
    args+=(--rounds "${ROUNDS:-2}" --score-samples "${SCORE_SAMPLES:-1024}" --score-k "${SCORE_K:-8}"
           --sleb-samples "${SLEB_SAMPLES:-128}" --score-reserve-s "${SCORE_RESERVE_S:-150}")
    [[ -n "${SKIP:-}" ]] && args+=(--skip "$SKIP") ;;
esac

cd "$ROOT"
# The script keeps its own deadline; the outer timeout only guards against a hang it cannot see.
timeout -k 10 $(( ${DEADLINE_S%.*} + 60 )) "$PY" bench/gpu.py --engine "$ENGINE" "${args[@]}"
rc=$?
echo "gpu_check: rc=$rc, results in $OUT"
ls -la "$OUT" 2>/dev/null
exit $rc
