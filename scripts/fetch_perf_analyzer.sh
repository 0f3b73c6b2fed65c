#!/usr/bin/env bash
# Fetch NVIDIA's perf_analyzer binary for CPU benchmarking into tools/perf_analyzer/ (gitignored).
#
# The `perf-analyzer` package on PyPI is a placeholder, but the tritonclient wheels up to 2.50.0 bundle
# the real binary (tritonclient-<v>.data/data/bin/perf_analyzer). It links against libb64 (Debian:
# libb64-0d) and libcudart.so.12 (taken from the nvidia-cuda-runtime-cu12 wheel; no GPU is needed).
#
# Usage: scripts/fetch_perf_analyzer.sh [TOOLS_DIR]      (default: tools/perf_analyzer)
# Prints the path of a wrapper script `perf_analyzer` that sets LD_LIBRARY_PATH and runs the binary.
# On a GPU machine inside NVIDIA's Triton SDK container, use the perf_analyzer that ships there instead.
set -euo pipefail

TRITONCLIENT_VERSION="${TRITONCLIENT_VERSION:-2.50.0}"
CUDART_SPEC="${CUDART_SPEC:-nvidia-cuda-runtime-cu12>=12,<13}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/tools/perf_analyzer}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"

mkdir -p "$DEST/lib" "$DEST/dl"
WRAPPER="$DEST/perf_analyzer"

if [ -x "$DEST/bin/perf_analyzer" ] && [ -e "$DEST/lib/libcudart.so.12" ] && [ -x "$WRAPPER" ]; then
  echo "$WRAPPER"
  exit 0
fi

# 1. The binary, from the tritonclient wheel (no dependencies installed).
if [ ! -x "$DEST/bin/perf_analyzer" ]; then
  $PIP download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.11 -d "$DEST/dl" "tritonclient==$TRITONCLIENT_VERSION" >&2
  WHEEL="$(ls "$DEST"/dl/tritonclient-"$TRITONCLIENT_VERSION"-*.whl | head -n1)"
  mkdir -p "$DEST/bin"
  python3 - "$WHEEL" "$DEST/bin" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.endswith(".data/data/bin/perf_analyzer")]
    if not names:
        sys.exit(f"no perf_analyzer binary inside {os.path.basename(wheel)}")
    target = os.path.join(out, "perf_analyzer")
    with zf.open(names[0]) as src, open(target, "wb") as dst:
        dst.write(src.read())
    os.chmod(target, 0o755)
PY
fi

# 2. libcudart.so.12 from the CUDA runtime wheel (perf_analyzer links it even for CPU-only servers).
if [ ! -e "$DEST/lib/libcudart.so.12" ]; then
  $PIP download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.11 -d "$DEST/dl" "$CUDART_SPEC" >&2
  CUDA_WHEEL="$(ls "$DEST"/dl/nvidia_cuda_runtime_cu12-*.whl | head -n1)"
  python3 - "$CUDA_WHEEL" "$DEST/lib" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.startswith("nvidia/cuda_runtime/lib/libcudart.so")]
    if not names:
        sys.exit(f"no libcudart inside {os.path.basename(wheel)}")
    for n in names:
        with zf.open(n) as src, open(os.path.join(out, os.path.basename(n)), "wb") as dst:
            dst.write(src.read())
PY
fi

# 3. libb64 (Debian package libb64-0d) when the system lacks it.
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libb64-0d >/dev/null; }) >&2
  else
    echo "perf_analyzer needs libb64-0d: run 'sudo apt-get install -y libb64-0d'" >&2
    exit 1
  fi
fi

rm -rf "$DEST/dl"
cat > "$WRAPPER" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$DEST/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$DEST/bin/perf_analyzer" "\$@"
EOF
chmod +x "$WRAPPER"

MISSING="$(LD_LIBRARY_PATH="$DEST/lib" ldd "$DEST/bin/perf_analyzer" | grep 'not found' || true)"
if [ -n "$MISSING" ]; then
  echo "perf_analyzer is missing shared libraries:" >&2
  echo "$MISSING" >&2
  exit 1
fi
echo "$WRAPPER"
