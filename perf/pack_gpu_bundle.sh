#!/usr/bin/env bash
# Pack what the H100 host lacks into .gpu_bundle/ (git-ignored), to be carried to it
# with the device tool's `carry: [".gpu_bundle"]` and unpacked there by perf/gpu_env.sh.
#
#   bash perf/pack_gpu_bundle.sh            # from anywhere; writes <repo>/.gpu_bundle
#
# Produces (each rebuilt only when missing or when its recipe changed, so a re-run is fast):
#   .gpu_bundle/tritonserver.tar.xz  tritonserver 2.51.0 from the nvidia-pytriton 0.7.0 wheel, in the
#                                    wheel's own layout (pytriton/tritonserver/{bin,backends/python,
#                                    caches/local,python_backend_stubs/<3.11,3.12>} + nvidia_pytriton.libs
#                                    minus the bundled libpython3.13), plus a stand-in pytriton/__init__.py
#                                    so `import pytriton` locates the server as it does with the wheel.
#   .gpu_bundle/site-cp312.tar.xz    numpy 1.26.4 (tests stripped), diffusers 0.42.1, tritonclient 2.73.0,
#                                    python-rapidjson (tritonclient imports it; the host lacks it), av 18.1.0
#                                    (PyAV with its FFmpeg/libx264: Wan's MP4 stage; 24 MB of the bundle),
#                                    installed with `pip install --target` for CPython 3.12 / manylinux.
#   .gpu_bundle/MANIFEST             versions, sizes and sha256 of the above.
#
# Environment knobs:
#   BUNDLE_DIR      output folder (default <repo>/.gpu_bundle)
#   BUNDLE_PY       Python minor version for site-*.tar.xz (default 3.12, the host's). BUNDLE_PY=3.11 with
#                   another BUNDLE_DIR makes a bundle for a local dry run of perf/gpu_env.sh on Debian 12.
#   BUNDLE_CACHE    download cache (default <repo>/.cache/gpu_bundle; git-ignored, never carried)
#   PIP_PYTHON      interpreter whose pip downloads the wheels (default /tmp/v1/bin/python, else python3)
#   XZ_LEVEL        xz preset (default -9)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE_DIR="${BUNDLE_DIR:-$REPO/.gpu_bundle}"
BUNDLE_PY="${BUNDLE_PY:-3.12}"
BUNDLE_CACHE="${BUNDLE_CACHE:-$REPO/.cache/gpu_bundle}"
XZ_LEVEL="${XZ_LEVEL:--9}"
PYTAG="cp${BUNDLE_PY/./}"

if [[ -z "${PIP_PYTHON:-}" ]]; then
    if [[ -x /tmp/v1/bin/python ]]; then PIP_PYTHON=/tmp/v1/bin/python; else PIP_PYTHON=python3; fi
fi

PYTRITON_VERSION=0.7.0
# The packages that go into site-<tag>.tar.xz. Everything else the host already has
# (torch, transformers, safetensors, huggingface-hub>=1.32, pillow, regex, filelock, requests, urllib3,
# grpcio, protobuf, ml-dtypes, packaging, sentencepiece, tokenizers, accelerate): the host's package list.
SITE_PKGS=(numpy==1.26.4 diffusers==0.42.1 tritonclient==2.73.0 python-rapidjson==1.25 av==18.1.0)
# The 3.11 stub only serves local dry runs on Debian 12 (~0.4 MB packed); the host needs 3.12.
STUBS=(3.11 3.12)

PLATFORMS=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
PIP_X=(--no-deps --only-binary=:all: --implementation cp --python-version "$BUNDLE_PY" "${PLATFORMS[@]}")

mkdir -p "$BUNDLE_DIR" "$BUNDLE_CACHE/wheels"
log() { printf '[pack_gpu_bundle] %s\n' "$*" >&2; }

# sha of a recipe string: a tarball is rebuilt when the recipe that made it changes.
recipe_sha() { printf '%s' "$1" | sha256sum | cut -c1-16; }

download() {  # download <dest-dir> <python-version> <pkg==ver>...
    local dest="$1" pyver="$2"; shift 2
    local need=()
    for spec in "$@"; do
        local name="${spec%%==*}" ver="${spec##*==}"
        local norm="${name//-/_}"
        if ! compgen -G "$dest/${norm}-${ver}-*.whl" >/dev/null && ! compgen -G "$dest/${name}-${ver}-*.whl" >/dev/null; then
            need+=("$spec")
        fi
    done
    if ((${#need[@]})); then
        log "downloading ${need[*]}"
        "$PIP_PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
            --python-version "$pyver" "${PLATFORMS[@]}" -d "$dest" "${need[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
    fi
}

pack_xz() {  # pack_xz <out.tar.xz> <dir> <paths...>  (deterministic order/owner; atomic)
    local out="$1" dir="$2"; shift 2
    tar -C "$dir" --sort=name --owner=0 --group=0 --numeric-owner --mtime='2025-01-01 00:00Z' -cf - "$@" \
        | xz "$XZ_LEVEL" -T0 -c > "$out.tmp"
    mv -f "$out.tmp" "$out"
}

# ---------------------------------------------------------------- tritonserver.tar.xz
TS_RECIPE="pytriton=$PYTRITON_VERSION stubs=${STUBS[*]} layout=v1 xz=$XZ_LEVEL"
TS_OUT="$BUNDLE_DIR/tritonserver.tar.xz"
if [[ -f "$TS_OUT" && "$(cat "$TS_OUT.recipe" 2>/dev/null)" == "$(recipe_sha "$TS_RECIPE")" ]]; then
    log "tritonserver.tar.xz up to date"
else
    # The wheel is py3-none-manylinux_2_35: the Python version does not matter for it.
    download "$BUNDLE_CACHE/wheels" 3.12 "nvidia-pytriton==$PYTRITON_VERSION"
    WHL=$(ls "$BUNDLE_CACHE"/wheels/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl | head -1 || true)
    STAGE="$BUNDLE_CACHE/stage-tritonserver"
    rm -rf "$STAGE" && mkdir -p "$STAGE"
    log "extracting tritonserver from $(basename "$WHL")"
    stub_globs=()
    for v in "${STUBS[@]}"; do stub_globs+=("pytriton/tritonserver/python_backend_stubs/$v/*"); done
    unzip -q "$WHL" -d "$STAGE" \
        'pytriton/tritonserver/bin/*' 'pytriton/tritonserver/backends/*' 'pytriton/tritonserver/caches/*' \
        "${stub_globs[@]}" 'nvidia_pytriton.libs/*'
    # libpython3.13 serves only the pytriton 3.13 stub (32 MB); nothing else links it.
    rm -f "$STAGE"/nvidia_pytriton.libs/libpython3*.so*
    # Fail loudly if any remaining ELF needs a bundled library that is not there any more.
    missing=0
    while IFS= read -r -d '' f; do
        while read -r lib; do
            [[ "$lib" == *-????????.so* || "$lib" == *-????????.*.so* ]] || continue   # auditwheel-renamed
            [[ -e "$STAGE/nvidia_pytriton.libs/$lib" ]] || { log "MISSING $lib needed by ${f#$STAGE/}"; missing=1; }
        done < <(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    done < <(find "$STAGE" -type f \( -name '*.so*' -o -name tritonserver -o -name triton_python_backend_stub \) -print0)
    ((missing == 0)) || { log "bundled library closure broken"; exit 1; }
    # Stand-in package: only the server files travel, not pytriton's Python API.
    cat > "$STAGE/pytriton/__init__.py" <<'EOF'
"""Stand-in for nvidia-pytriton 0.7.0 made by ditserve's perf/pack_gpu_bundle.sh.

Only the tritonserver binary, its libraries and the Python backend travel to the GPU host
(pytriton/tritonserver/...); pytriton's own Python API is not here. `import pytriton` works
so that code can find the server as os.path.dirname(pytriton.__file__)/tritonserver.
"""
__version__ = "0.7.0"
DITSERVE_STANDIN = True
EOF
    chmod 755 "$STAGE/pytriton/tritonserver/bin/tritonserver" "$STAGE"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
    log "packing tritonserver.tar.xz (xz $XZ_LEVEL; a few minutes the first time)"
    pack_xz "$TS_OUT" "$STAGE" pytriton nvidia_pytriton.libs
    recipe_sha "$TS_RECIPE" > "$TS_OUT.recipe"
    rm -rf "$STAGE"
fi

# ---------------------------------------------------------------- site-<tag>.tar.xz
SITE_RECIPE="py=$BUNDLE_PY pkgs=${SITE_PKGS[*]} layout=v1 xz=$XZ_LEVEL"
SITE_OUT="$BUNDLE_DIR/site-$PYTAG.tar.xz"
if [[ -f "$SITE_OUT" && "$(cat "$SITE_OUT.recipe" 2>/dev/null)" == "$(recipe_sha "$SITE_RECIPE")" ]]; then
    log "site-$PYTAG.tar.xz up to date"
else
    WDIR="$BUNDLE_CACHE/wheels-$PYTAG"
    mkdir -p "$WDIR"
    download "$WDIR" "$BUNDLE_PY" "${SITE_PKGS[@]}"
    STAGE="$BUNDLE_CACHE/stage-site-$PYTAG"
    rm -rf "$STAGE" && mkdir -p "$STAGE"
    wheels=()
    for spec in "${SITE_PKGS[@]}"; do
        name="${spec%%==*}"; ver="${spec##*==}"
        w=$(ls "$WDIR"/"${name//-/_}"-"$ver"-*.whl "$WDIR"/"$name"-"$ver"-*.whl 2>/dev/null | head -1 || true)
        [[ -n "$w" ]] || { log "no wheel for $spec in $WDIR"; exit 1; }
        wheels+=("$w")
    done
    log "installing ${#wheels[@]} wheels for CPython $BUNDLE_PY into a staging site-packages"
    "$PIP_PYTHON" -m pip install -q --disable-pip-version-check --no-compile --no-index --target "$STAGE" \
        "${PIP_X[@]}" "${wheels[@]}"
    # Scripts (f2py, diffusers-cli) carry the staging interpreter's shebang: useless there.
    rm -rf "$STAGE/bin"
    # numpy's own test suites: 5 MB that nothing imports.
    find "$STAGE/numpy" -type d -name tests -prune -exec rm -rf {} +
    find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
    log "packing site-$PYTAG.tar.xz"
    (cd "$STAGE" && pack_xz "$SITE_OUT" "$STAGE" $(ls -A))
    recipe_sha "$SITE_RECIPE" > "$SITE_OUT.recipe"
    rm -rf "$STAGE"
fi

# ---------------------------------------------------------------- MANIFEST
{
    echo "# ditserve GPU bundle, made by perf/pack_gpu_bundle.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "pytriton=$PYTRITON_VERSION (tritonserver 2.51.0) stubs=${STUBS[*]}"
    echo "site_py=$BUNDLE_PY packages=${SITE_PKGS[*]}"
    for f in "$BUNDLE_DIR"/*.tar.xz; do
        printf '%s %s %s\n' "$(basename "$f")" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-64)"
    done
} > "$BUNDLE_DIR/MANIFEST"

total=$(du -cb "$BUNDLE_DIR" | tail -1 | cut -f1)
ls -l "$BUNDLE_DIR" >&2
awk -v t="$total" -v d="$BUNDLE_DIR" 'BEGIN { printf "bundle %s: %.1f MiB (%d bytes)\n", d, t / 1048576, t }'
if ((total > 62 * 1048576)); then
    log "WARNING: bundle is over 62 MiB; with the working tree it may pass the device tool's 64 MiB limit"
fi
