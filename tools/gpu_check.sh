#!/usr/bin/env bash
# The first thing to run on a lent GPU machine (issue 14): the `gpu`-marked tests and the two speed benchmarks at
# DiT-B/2 and DiT-XL/2 sizes in bf16, within 8 minutes on one GPU; every part runs (each under a time limit), then
# a table of part -> ok/FAIL and seconds; exit 1 if any part failed.
#
#   DIT_COMMIT=abc1234 bash tools/gpu_check.sh  # on the GPU machine (through the device tool: carry ["wheelhouse"];
#                                               # its copy has no .git, so the log names the commit given here)
#   bash tools/gpu_check.sh --cpu               # dry run on CPU at tiny sizes: the same steps, minutes not spent
#   bash tools/gpu_check.sh --cpu --only env,bench_train_B2 --out /tmp/x
#
# Writes into --out (default $OUT where set, else outputs/gpu_check), 8 files (the device tool brings back 8 at most):
#   gpu_check.log       everything printed
#   summary.json        parts, status, seconds, the benchmarks' headline figures, the environment (env part)
#   bench_train_B2.json, bench_train_XL2.json, bench_sample_B2.json, bench_sample_XL2.json  (tools/bench_*.py)
#   bench_variants.json the same benchmarks with one option changed each (SDPA kernel, fused AdamW, fused QKV,
#                       compile, CUDA graphs, LoRA with the base in fp32 or bf16): what moves the MFU; run last, each
#                       only while the budget holds its limit
#   pytest_gpu.xml      the tests' JUnit report
#
# The GPU machine is offline and lacks webdataset, braceexpand and diffusers (maybe pytest): tools/gpu_wheels.sh,
# run beforehand where PyPI is reachable, puts small wheels into wheelhouse/ (git-ignored: carry it), and the wheels
# part installs those whose distributions are missing there into a scratch folder on PYTHONPATH (no `pip install
# -e .`: the repository root is on PYTHONPATH). Without a wheelhouse the installed packages are used as they are.
# The tests run media-free (DIT_TEST_MEDIA_FREE=1, tests/training/runs.py): latent shards made with numpy and
# text.encoder=none, so neither PyAV, decord nor the MiniLM package is needed.
#
# Options: --cpu | --out DIR | --python PY (or PYTHON=...; default python3) | --wheels DIR (default wheelhouse)
#          --only PART,... (env, wheels, bench_train_B2, bench_train_XL2, bench_sample_B2, bench_sample_XL2,
#          pytest_gpu, variants or one variant_NAME; wheels and env always run)
#          | --budget SECONDS (default 480 on GPU, 900 with --cpu)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

MODE=gpu
OUT_DIR=${OUT:-$ROOT/outputs/gpu_check}
PY=${PYTHON:-python3}
WHEELS=$ROOT/wheelhouse
ONLY=""
BUDGET=""
usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
        --cpu) MODE=cpu ;;
        --out) OUT_DIR=$2; shift ;;
        --python) PY=$2; shift ;;
        --wheels) WHEELS=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z $BUDGET ]]; then BUDGET=$([[ $MODE == gpu ]] && echo 480 || echo 900); fi
command -v "$PY" >/dev/null || { echo "gpu_check.sh: no Python at $PY" >&2; exit 2; }
# paths as given, from the caller's folder; then everything runs from the repository root
[[ $PY == */* ]] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
[[ $WHEELS == /* ]] || WHEELS=$PWD/$WHEELS
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dit_gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
PARTS_TSV=$SCRATCH/parts.tsv
: >"$PARTS_TSV"

# ---- what runs, by mode: (preset, clip shape, batch) per benchmark -------------------------------------------------
if [[ $MODE == gpu ]]; then
    DEVICE=cuda
    # 33x256x256 clips: latents 9x32x32, 2304 tokens per clip. Batches: ours + diffusers' Wan in one process, AdamW
    # state of both (16 B/param) plus the larger activations (~85 B per token, block and width for Wan, measured)
    # stay well under the H200's 139 GiB: DiT-XL/2 batch 8 ~ 75 GiB.
    B2="DiT-B/2 33x256x256 16"
    XL2="DiT-XL/2 33x256x256 8"
    TRAIN_EXTRA=()
    TRAIN_ARGS=(--dtype bf16 --steps 5 --warmup 2)
    SAMPLE_ARGS=(--dtype bf16 --batch 1 --steps 50 --cfg 5 --repeats 2 --warmup 2 --decode-repeats 2)
    LIMIT_TRAIN=150 LIMIT_SAMPLE=120 LIMIT_TESTS=240
    PYTEST_SELECT=()
    # What moves the MFU and the sampling speed: run after everything else, each only if the budget still holds its
    # limit. NAME|TOOL|SLOT|LIMIT|OPTIONS (bench_train with 3 timed steps, no --compare)
    VARIANTS=("B2_cuda_graphs|bench_sample|B2|60|--cuda-graphs" "XL2_flash|bench_train|XL2|60|--attention flash"
              "XL2_cudnn|bench_train|XL2|60|--attention cudnn" "XL2_fused_adamw|bench_train|XL2|60|--fused-adamw"
              "XL2_fused_qkv|bench_train|XL2|60|--fused-qkv" "XL2_compile|bench_train|XL2|150|--compile ours"
              "XL2_sample_compile|bench_sample|XL2|150|--compile" "XL2_lora16|bench_train|XL2|60|--lora 16"
              "XL2_lora16_bf16_base|bench_train|XL2|60|--lora 16 --lora-base bf16"
              "XL2_lora16_fp8_base|bench_train|XL2|60|--lora 16 --lora-base fp8")
else
    DEVICE=cpu
    B2="dit-tiny 5x32x32 2"
    XL2="DiT-S/2 5x32x32 1"
    TRAIN_EXTRA=(--matmul-size 256 --threads 1)
    TRAIN_ARGS=(--dtype bf16 --steps 1 --warmup 1 "${TRAIN_EXTRA[@]}")
    SAMPLE_ARGS=(--dtype bf16 --batch 1 --steps 2 --cfg 5 --repeats 1 --warmup 1 --decode-repeats 1 --threads 1)
    LIMIT_TRAIN=180 LIMIT_SAMPLE=180 LIMIT_TESTS=300
    PYTEST_SELECT=(-k "ddp or cuda")  # DIT_GPU_TESTS_ON_CPU=1: test_gpu's ddp case on CPU (the others as on GPU)
    VARIANTS=("B2_math|bench_train|B2|90|--attention math" "B2_checkpoint_every_2|bench_train|B2|90|--checkpoint-every 2"
              "B2_fused_qkv|bench_train|B2|90|--fused-qkv" "B2_sample_math|bench_sample|B2|90|--attention math"
              "B2_lora_bf16_base|bench_train|B2|90|--lora 4 --lora-base bf16")
fi
read -r p1 s1 _ <<<"$B2"
read -r p2 s2 _ <<<"$XL2"
PLAN=("DiT-B/2:33x256x256" "DiT-XL/2:33x256x256" "$p1:$s1" "$p2:$s2")  # checked by the env part, in both modes

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIT_TEST_MEDIA_FREE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

selected() {
    [[ -z $ONLY || $1 == env || $1 == wheels || ",$ONLY," == *",$1,"* ]] ||
        [[ $1 == variant_* && ",$ONLY," == *",variants,"* ]]
}

record() {  # NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$PARTS_TSV"
    echo "==== $1: $2 in $3 s${4:+ ($4)}"
}

# run_part NAME LIMIT CHECK -- COMMAND...: COMMAND under `timeout` (at most LIMIT s and what is left of the budget),
# then CHECK (a command line, or -) when it succeeded. Never stops the script.
run_part() {
    local name=$1 limit=$2 check=$3
    shift 4
    selected "$name" || return 0
    local left=$((BUDGET - SECONDS))
    if ((left < 20)); then
        record "$name" FAIL 0 "not run: the ${BUDGET} s budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo
    echo "==== $name (at most ${limit} s): $*"
    local t0=$SECONDS rc=0 note=""
    timeout --kill-after=15 "$limit" "$@" || rc=$?
    if ((rc == 124 || rc == 137)); then
        note="timed out after ${limit} s"
    elif ((rc != 0)); then
        note="exit $rc"
    elif [[ $check != - ]]; then
        eval "$check" || { rc=1; note="its output failed the check"; }
    fi
    record "$name" "$([[ $rc == 0 ]] && echo ok || echo FAIL)" $((SECONDS - t0)) "$note"
}

# run_variant NAME|TOOL|SLOT|LIMIT|OPTIONS: one benchmark with other options, into $SCRATCH/variants; skipped (not
# failed) when less than LIMIT seconds of the budget are left
run_variant() {
    local name tool slot limit options preset shape batch
    IFS='|' read -r name tool slot limit options <<<"$1"
    name=variant_$name
    selected "$name" || return 0
    if ((BUDGET - SECONDS < limit)); then
        record "$name" skip 0 "not run: $((BUDGET - SECONDS)) s of the budget left, it may take ${limit} s"
        return 0
    fi
    read -r preset shape batch <<<"${!slot}"
    local json=$SCRATCH/variants/$name.json args
    mkdir -p "$SCRATCH/variants"
    if [[ $tool == bench_train ]]; then
        args=(--batch "$batch" --dtype bf16 --steps 3 --warmup 2 "${TRAIN_EXTRA[@]}")
    else
        args=("${SAMPLE_ARGS[@]}")
    fi
    # shellcheck disable=SC2086  # OPTIONS are words
    run_part "$name" "$limit" "\"\$PY\" tools/gpu_env.py check $tool \"$json\" --device $DEVICE" \
        -- "$PY" "tools/$tool.py" --preset "$preset" --shape "$shape" "${args[@]}" $options --device "$DEVICE" \
        --json "$json"
}

main() {
    local commit
    if commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit+=" with changes"
    else  # the device tool's copy has no .git: the command names it (DIT_COMMIT=<hash from this side's git>)
        commit=${DIT_COMMIT:-"no git checkout"}
    fi
    echo "gpu_check.sh --$MODE: $(date -u +%Y-%m-%dT%H:%M:%SZ) on ${HOSTNAME:-?}, repo at $commit, out $OUT_DIR," \
        "budget $BUDGET s"

    rm -f "$OUT_DIR"/bench_{train,sample}_{B2,XL2}.json "$OUT_DIR/bench_variants.json" "$OUT_DIR/pytest_gpu.xml" \
        "$OUT_DIR/summary.json"
    local site=$SCRATCH/site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        local whls=("$WHEELS"/*.whl)
        echo "wheelhouse $WHEELS: ${#whls[@]} wheels, $(du -sh "$WHEELS" | cut -f1)"
    else
        echo "no wheelhouse at $WHEELS (make one with tools/gpu_wheels.sh): using the packages already installed"
    fi
    run_part wheels 120 - -- "$PY" tools/gpu_env.py install --wheels "$WHEELS" --target "$site"
    export PYTHONPATH="$PYTHONPATH:$site"
    run_part env 120 - -- "$PY" tools/gpu_env.py report --device "$DEVICE" --json "$SCRATCH/env.json" \
        --diffusers-flag "$SCRATCH/diffusers_ok" --plan "${PLAN[@]}"

    local compare=(--compare diffusers)
    if [[ ! -e $SCRATCH/diffusers_ok ]]; then
        compare=()
        echo "note: diffusers' WanTransformer3DModel does not import here (see the env part): bench_train runs" \
            "without --compare diffusers"
    fi
    local check_compare=${compare:+--compare}
    local slot preset shape batch
    for slot in B2 XL2; do
        read -r preset shape batch <<<"${!slot}"
        run_part "bench_train_$slot" "$LIMIT_TRAIN" \
            "\"\$PY\" tools/gpu_env.py check bench_train \"$OUT_DIR/bench_train_$slot.json\" --device $DEVICE $check_compare" \
            -- "$PY" tools/bench_train.py --preset "$preset" --shape "$shape" --batch "$batch" "${TRAIN_ARGS[@]}" \
            "${compare[@]}" --device "$DEVICE" --json "$OUT_DIR/bench_train_$slot.json"
    done
    for slot in B2 XL2; do
        read -r preset shape batch <<<"${!slot}"
        run_part "bench_sample_$slot" "$LIMIT_SAMPLE" \
            "\"\$PY\" tools/gpu_env.py check bench_sample \"$OUT_DIR/bench_sample_$slot.json\" --device $DEVICE" \
            -- "$PY" tools/bench_sample.py --preset "$preset" --shape "$shape" "${SAMPLE_ARGS[@]}" --device "$DEVICE" \
            --json "$OUT_DIR/bench_sample_$slot.json"
    done

    local on_cpu=()
    [[ $MODE == cpu ]] && on_cpu=(env DIT_GPU_TESTS_ON_CPU=1)
    run_part pytest_gpu "$LIMIT_TESTS" - -- "${on_cpu[@]}" "$PY" -m pytest -m gpu tests/distributed/test_gpu.py \
        tests/models/test_vae.py tests/models/test_attention.py tests/diffusion/test_cuda_graphs.py \
        tests/training/test_plan.py tests/training/test_text_device.py \
        "${PYTEST_SELECT[@]}" -p no:cacheprovider -rA \
        --basetemp "$SCRATCH/pytest" --junitxml "$OUT_DIR/pytest_gpu.xml"

    local variant
    for variant in "${VARIANTS[@]}"; do
        run_variant "$variant"
    done
    if compgen -G "$SCRATCH/variants/*.json" >/dev/null; then  # one file for all (the device tool brings back 8)
        "$PY" -c 'import json, sys; json.dump({f.rsplit("/", 1)[-1][:-5]: json.load(open(f)) for f in sys.argv[2:]},
                  open(sys.argv[1], "w"), indent=1)' "$OUT_DIR/bench_variants.json" "$SCRATCH"/variants/*.json
    fi

    echo
    "$PY" tools/gpu_env.py summary --parts "$PARTS_TSV" --env "$SCRATCH/env.json" --mode "$MODE" \
        --out "$OUT_DIR/summary.json" "$OUT_DIR"/bench_{train,sample}_*.json "$SCRATCH"/variants/*.json \
        2>/dev/null || echo "(no summary.json: $PY failed)"
    echo
    printf '%-30s %-6s %8s  %s\n' part status seconds note
    local failed=0 name status seconds note
    while IFS=$'\t' read -r name status seconds note; do
        printf '%-30s %-6s %8s  %s\n' "$name" "$status" "$seconds" "$note"
        [[ $status == ok || $status == skip ]] || failed=1
    done <"$PARTS_TSV"
    printf '%-30s %-6s %8s\n' total "$([[ $failed == 0 ]] && echo ok || echo FAIL)" "$SECONDS"
    return $failed
}

rc=0
main 2>&1 | tee "$OUT_DIR/gpu_check.log" || rc=$?
exit "$rc"
