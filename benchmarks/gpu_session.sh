# The device command for a session lent a GPU (run from the repository root): bash benchmarks/gpu_session.sh
set -o pipefail; export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1; OUT="${OUT:-$PWD/gpu_session_out}"; mkdir -p "$OUT"
python3 benchmarks/gpu_session.py --device cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/log"
