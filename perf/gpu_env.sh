# shellcheck shell=bash
# Source this on the GPU host, from the repository root, at the start of a device run:
#
#   source perf/gpu_env.sh || exit 1
#
# It turns .gpu_bundle/ (made here by perf/pack_gpu_bundle.sh, carried with `carry: [".gpu_bundle"]`)
# into a Python environment that tritonserver's Python backend can use on the host:
#
#   * a venv made with the *system* interpreter (`/usr/bin/python3.12 -m venv --without-pip`): the
#     backend stub embeds the system libpython and breaks with other builds of the same version;
#   * numpy 1.26.4, diffusers, tritonclient (+ python-rapidjson) unpacked into that venv's
#     site-packages (numpy 2.x, the host's, breaks the stub: tensors arrive empty);
#   * a .pth that adds the host torch venv's site-packages after ours (torch, transformers, ...);
#   * this checkout importable as `ditserve` (a meta-path finder built from pyproject.toml's
#     package-dir mapping, as an editable install does) and a `ditserve` console script;
#   * tritonserver + its Python backend unpacked in the pytriton wheel's layout inside that
#     site-packages, so ditserve.server finds it as the "pytriton-bundled" server, copies the 3.12
#     stub next to libtriton_python.so and puts this venv's bin first on PATH for the stub;
#   * PATH, VIRTUAL_ENV, DITSERVE_TRITONSERVER and the NVLink-multicast-off variables exported.
#
# Knobs (environment, all optional):
#   DITSERVE_BUNDLE       bundle folder (default <repo>/.gpu_bundle)
#   DITSERVE_GPU_ROOT     where to build (default /tmp/ditserve_gpu; the venv is $DITSERVE_GPU_ROOT/venv)
#   DITSERVE_HOST_PYTHON  system interpreter for the venv (default /usr/bin/python3.12, else the
#                         /usr/bin/python3.X matching the python3 on PATH)
#   DITSERVE_HOST_SITE    site-packages holding torch (default: probed; /opt/torch/.venv first)
# Idempotent: a second source with the same bundle/checkout only re-exports the variables.

_dsg_say() { printf '[gpu_env] %s\n' "$*"; }
_dsg_untar() {  # _dsg_untar <python> <archive.tar.xz> <dest>: tar+xz, else Python's tarfile/lzma
    tar -C "$3" -xJf "$2" 2>/dev/null && return 0
    "$1" -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as t:
    t.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))' "$2" "$3"
}

_ditserve_gpu_env() {
    local t0=$SECONDS
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"
    [[ -f "$repo/pyproject.toml" ]] || repo="$(pwd)"
    [[ -f "$repo/pyproject.toml" ]] || { _dsg_say "run from the repository root (no pyproject.toml in $repo)"; return 1; }
    local bundle="${DITSERVE_BUNDLE:-$repo/.gpu_bundle}"
    local root="${DITSERVE_GPU_ROOT:-/tmp/ditserve_gpu}"
    local venv="$root/venv"
    [[ -f "$bundle/tritonserver.tar.xz" ]] || { _dsg_say "no $bundle/tritonserver.tar.xz: run perf/pack_gpu_bundle.sh here and carry .gpu_bundle"; return 1; }

    # --- the torch site-packages of the host (probe before PATH changes) ----------------------
    local host_site="${DITSERVE_HOST_SITE:-}"
    if [[ -z "$host_site" ]]; then
        local c
        for c in /opt/torch/.venv/lib/python3*/site-packages; do
            [[ -d "$c/torch" ]] && { host_site="$c"; break; }
        done
    fi
    if [[ -z "$host_site" ]]; then
        local py
        for py in python3 /usr/bin/python3; do
            host_site=$(env -u PYTHONPATH "$py" -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null) && break
            host_site=""
        done
    fi
    [[ -n "$host_site" && -d "$host_site" ]] || { _dsg_say "cannot find a site-packages with torch; set DITSERVE_HOST_SITE"; return 1; }
    # The site-packages holding torch decides the Python version of the venv.
    local pyver
    pyver=$(basename "$(dirname "$host_site")")   # python3.12
    pyver="${pyver#python}"
    local host_py="${DITSERVE_HOST_PYTHON:-/usr/bin/python$pyver}"
    [[ -x "$host_py" ]] || { _dsg_say "no system interpreter $host_py (needed: the stub embeds the system libpython$pyver)"; return 1; }
    local pytag="cp${pyver/./}"

    # --- build (once per bundle + checkout + host) ---------------------------------------------
    local stamp_want
    stamp_want="$( { cat "$bundle/MANIFEST" 2>/dev/null || ls -l "$bundle"; echo "$repo $host_site $host_py";
                      sed -n '/^\[tool.setuptools\]/,/^\[/p' "$repo/pyproject.toml";
                      cat "$repo/perf/gpu_env.sh"; } | sha256sum | cut -c1-16)"
    if [[ -x "$venv/bin/python" && "$(cat "$root/.stamp" 2>/dev/null)" == "$stamp_want" ]]; then
        _dsg_say "reusing $venv"
    else
        rm -rf "$venv" && mkdir -p "$root" || return 1
        "$host_py" -m venv --without-pip "$venv" || { _dsg_say "venv creation failed"; return 1; }
        local site
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
        _dsg_say "unpacking tritonserver into $site"
        _dsg_untar "$venv/bin/python" "$bundle/tritonserver.tar.xz" "$site" || { _dsg_say "tritonserver.tar.xz did not unpack"; return 1; }
        if [[ -f "$bundle/site-$pytag.tar.xz" ]]; then
            _dsg_say "unpacking site-$pytag.tar.xz (numpy 1.26.4, diffusers, tritonclient)"
            _dsg_untar "$venv/bin/python" "$bundle/site-$pytag.tar.xz" "$site" || { _dsg_say "site-$pytag.tar.xz did not unpack"; return 1; }
        else
            _dsg_say "WARNING: no $bundle/site-$pytag.tar.xz for Python $pyver: relying on $host_site for numpy/diffusers/tritonclient"
        fi
        # Host packages after ours, seen through a folder of links that leaves out the host's
        # numpy 2 and what is compiled for it (scipy, scikit-learn): with numpy 1.26.4 scipy
        # fails to import (np.long), and transformers imports scipy whenever it is installed
        # (seen on the H100 host, 2026-11-26). site.addsitedir also runs the folder's .pth files.
        local view="$venv/host-site-view"
        rm -rf "$view"; mkdir -p "$view"
        local entry
        for entry in "$host_site"/*; do
            case "$(basename "$entry")" in
                numpy|numpy-*|numpy.libs|scipy|scipy-*|scipy.libs|sklearn|scikit_learn*) continue ;;
            esac
            ln -s "$entry" "$view/"
        done
        printf 'import site; site.addsitedir(%s)\n' "'$view'" > "$site/zz_ditserve_host_site.pth"
        # This checkout as `ditserve` (the package-dir mapping of pyproject.toml, like `pip install -e .`).
        "$venv/bin/python" - "$repo" "$site" <<'PYEOF' || { _dsg_say "ditserve finder setup failed"; return 1; }
import os, sys, tomllib
repo, site = sys.argv[1], sys.argv[2]
with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
    setuptools_cfg = tomllib.load(f).get("tool", {}).get("setuptools", {})
mapping = {name: os.path.join(repo, d) for name, d in setuptools_cfg.get("package-dir", {}).items() if name}
if not mapping:
    mapping = {"ditserve": os.path.join(repo, "python_backends")}
code = f'''"""Made by perf/gpu_env.sh: imports ditserve from {repo} (pyproject's package-dir mapping)."""
import importlib.abc, importlib.util, os, sys

MAPPING = {mapping!r}


class DitserveCheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = MAPPING.get(fullname)
        if folder is None:
            return None
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


def install():
    if not any(type(f).__name__ == "DitserveCheckoutFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, DitserveCheckoutFinder())
'''
with open(os.path.join(site, "_ditserve_checkout.py"), "w") as f:
    f.write(code)
with open(os.path.join(site, "_ditserve_checkout.pth"), "w") as f:
    f.write("import _ditserve_checkout; _ditserve_checkout.install()\n")
PYEOF
        cat > "$venv/bin/ditserve" <<EOF
#!$venv/bin/python
import sys
from ditserve.cli import main
sys.exit(main())
EOF
        chmod 755 "$venv/bin/ditserve"
        # The stub for this Python next to libtriton_python.so (ditserve.server does it too).
        local ts="$site/pytriton/tritonserver"
        if [[ -f "$ts/python_backend_stubs/$pyver/triton_python_backend_stub" ]]; then
            cp -f "$ts/python_backend_stubs/$pyver/triton_python_backend_stub" "$ts/backends/python/" && chmod 755 "$ts/backends/python/triton_python_backend_stub"
        else
            _dsg_say "no Python $pyver backend stub in the bundle"; return 1
        fi
        echo "$stamp_want" > "$root/.stamp"
    fi

    local site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1

    # --- environment -----------------------------------------------------------------------------
    export VIRTUAL_ENV="$venv"
    case ":$PATH:" in *":$venv/bin:"*) ;; *) export PATH="$venv/bin:$PATH" ;; esac
    unset PYTHONHOME
    export DITSERVE_GPU_VENV="$venv"
    export DITSERVE_HOST_SITE="$host_site"
    export DITSERVE_TRITONSERVER="$site/pytriton/tritonserver/bin/tritonserver"
    # No hub on the host: never try to reach it.
    export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    # NVLink multicast stays off: the lent hosts are shared and their rules forbid it.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    export PYTHONUNBUFFERED=1

    # --- check ------------------------------------------------------------------------------------
    "$venv/bin/python" - <<'PYEOF' || { _dsg_say "environment check failed"; return 1; }
import sys, importlib
import numpy, torch, diffusers, transformers, ditserve, ditserve.kernels, ditserve.server
problems = []
if not numpy.__version__.startswith("1."):
    problems.append(f"numpy {numpy.__version__} from {numpy.__file__}: the Python backend stub needs 1.x")
try:
    import tritonclient.grpc  # noqa: F401
    tc = "tritonclient.grpc ok"
except Exception as e:  # host grpcio/protobuf older than tritonclient 2.73's generated code
    tc = f"tritonclient.grpc UNAVAILABLE ({type(e).__name__}: {e}); perf/bench_e2e.py falls back to HTTP"
try:
    import av  # the Wan ensemble's MP4 stage (wan_postprocess) and bench_e2e's diffusers-side export
    tc += f"; av {av.__version__}"
except Exception as e:
    tc += f"; av UNAVAILABLE ({type(e).__name__}: {e}): the wan_t2v ensemble cannot load"
from ditserve.server import locate_tritonserver
binary, backends, bundled = locate_tritonserver()
print(f"[gpu_env] python {sys.version.split()[0]} ({sys.prefix}); numpy {numpy.__version__}; "
      f"torch {torch.__version__} cuda={torch.cuda.is_available()}; diffusers {diffusers.__version__}; "
      f"transformers {transformers.__version__}; ditserve from {ditserve.__file__}; {tc}")
print(f"[gpu_env] tritonserver {binary} (bundled={bundled}, backends {backends})")
if problems:
    print("[gpu_env] " + "; ".join(problems))
    sys.exit(1)
PYEOF
    # (tritonserver --help exits 1, so check its libraries instead.)
    local f missing=""
    for f in "$DITSERVE_TRITONSERVER" "$site/pytriton/tritonserver/backends/python/libtriton_python.so" \
             "$site/pytriton/tritonserver/backends/python/triton_python_backend_stub"; do
        missing+=$(ldd "$f" 2>&1 | grep 'not found' | sed "s|^|$(basename "$f"): |")
    done
    [[ -z "$missing" ]] || { _dsg_say "tritonserver libraries missing: $missing"; return 1; }
    _dsg_say "ready in $((SECONDS - t0))s: $venv/bin first on PATH"
}

_ditserve_gpu_env
_ditserve_gpu_env_rc=$?
unset -f _ditserve_gpu_env _dsg_say _dsg_untar
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "[gpu_env] note: run as a script, the environment does not persist; use: source perf/gpu_env.sh" >&2
    exit $_ditserve_gpu_env_rc
fi
return $_ditserve_gpu_env_rc
