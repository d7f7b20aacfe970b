#!/usr/bin/env bash
# Downloads here, where pip reaches the package index, the wheels that scripts/gpu_check.sh installs on
# the GPU machine (no internet there; Python 3.12, x86-64), into .whl/ (git-ignored; the device tool
# carries it with `carry: [".whl"]`):
#
#   bash scripts/fetch_gpu_wheels.sh                  # what the GPU run needs (below)
#   bash scripts/fetch_gpu_wheels.sh schedulefree     # ... plus these (NAME or NAME==VERSION)
#
# What the GPU run needs that the machine's image lacks (its packages: .library/device/KINDS.md; torch,
# triton, pytest, pytest-xdist, pytest-timeout and hypothesis are there, and the GPU tests import
# nothing else):
#   nvidia-cuda-cuobjdump  `binsparse doctor` lists the SASS and PTX of _C_cuda with it
#   nvidia-cutlass         the CUDA build's headers, fetched only when csrc/ or setup.py use CUTLASS
# Each package is pinned to the version installed in this environment ($PYTHON, default python3) when
# there is one, and fetched without its dependencies (--no-deps): the script prints what each one
# requires, to fetch by name if the run needs it. One version of each is kept (two stop the install).
# The wheels must stay under WHEELS_MAX_MIB (default 40) and, with the tree that travels (tracked and
# untracked files git does not ignore), under the device tool's 64 MiB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="${WHEELS_DIR:-$ROOT/.whl}"
MAX_MIB="${WHEELS_MAX_MIB:-40}"
TREE_LIMIT_MIB=64

packages=(nvidia-cuda-cuobjdump)
if grep -rqiE "cutlass" csrc setup.py 2>/dev/null; then
    packages+=(nvidia-cutlass)
fi
packages+=("$@")

pinned() {  # NAME -> NAME==VERSION installed here, or NAME as given
    case "$1" in *==*) echo "$1"; return ;; esac
    local version
    version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null)" \
        && echo "$1==$version" || echo "$1"
}

mkdir -p "$DEST"
for package in "${packages[@]}"; do
    spec="$(pinned "$package")"
    stem="$(echo "${spec%%==*}" | tr 'A-Z-.' 'a-z__')"
    rm -f "$DEST/$stem"-*.whl  # one version of each
    echo "== $spec"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
    for wheel in "$DEST/$stem"-*.whl; do
        unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
            | sed 's/^/   (not fetched) /' || true
    done
done

wheels_bytes="$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)"
tree_bytes="$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n 1 | cut -f1)"
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
echo "wheels in $DEST: $(ls "$DEST" | tr '\n' ' ')"
echo "size: wheels $(mib "$wheels_bytes") MiB (limit $MAX_MIB), with the tree $(mib $((wheels_bytes + tree_bytes))) MiB" \
     "(device tool limit $TREE_LIMIT_MIB)"
if [ "$wheels_bytes" -gt $((MAX_MIB * 1048576)) ] || [ $((wheels_bytes + tree_bytes)) -gt $((TREE_LIMIT_MIB * 1048576)) ]; then
    echo "TOO LARGE: drop a package (rm $DEST/NAME-*.whl)" >&2
    exit 1
fi
