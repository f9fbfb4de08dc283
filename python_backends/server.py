"""Start and stop a real NVIDIA Triton Inference Server for ditserve.

Where the server comes from, in order:

1. ``tritonserver=`` argument or the ``DITSERVE_TRITONSERVER`` environment variable;
2. the ``tritonserver`` 2.51 binary bundled in the ``nvidia-pytriton`` wheel (our venv);
3. ``tritonserver`` on ``PATH`` or ``/opt/tritonserver/bin/tritonserver`` (NGC container).

For the pytriton-bundled server the Python backend stub matching the *running* Python's
major.minor is copied next to ``libtriton_python.so`` (idempotently, atomically), and the
running venv's ``bin`` is put first on ``PATH``: the stub finds its site-packages through the
first ``python3`` on ``PATH`` and ignores ``PYTHONPATH``.

The server runs in its own process session (``start_new_session``), with its output in a
log file. :meth:`TritonServer.stop` sends SIGTERM, waits, SIGKILLs the whole session if
anything is left, and verifies that no ``triton_python_backend_stub`` of it survives.
"""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "TritonServer",
    "TritonServerError",
    "find_free_port",
    "find_free_ports",
    "check_ports_free",
    "locate_tritonserver",
    "prepare_backend_dir",
    "session_processes",
    "STUB_NAME",
]

STUB_NAME = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """tritonserver failed to start, died, or could not be stopped cleanly."""


# ----------------------------------------------------------------------------- ports


def find_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (bound together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_free_port(host: str = "127.0.0.1") -> int:
    return find_free_ports(1, host)[0]


def check_ports_free(ports: Mapping[str, int], host: str = "0.0.0.0") -> None:
    """TritonServerError unless every port of ``ports`` (``{name: port}``, the name as the error should
    call it, e.g. ``--http-port``) can be bound on ``host`` now, as tritonserver binds it (SO_REUSEADDR, so
    that a port left in TIME_WAIT counts as free). Without this, a port held by another server made start-up
    look successful: its /v2/health/ready answered while ours failed to bind and exited."""
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise TritonServerError(f"port {port} is given twice: {seen[port]} and {name}; choose another {name}")
        seen[port] = name
    for name, port in ports.items():
        try:
            family, _type, _proto, _name, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(address)
        except OSError as err:
            raise TritonServerError(f"{name} {port}: cannot bind {host or '*'}:{port} "
                                    f"({err.strerror or err}); another server may be using it, "
                                    f"choose another {name}") from None


def _absolute_directory(model_path: str) -> str:
    """A relative directory made absolute: the models resolve the path in their own processes, whose working
    directory is not this one's. Built-in names stay as they are (they win over a same-named directory)."""
    from ditserve.checkpoints import BUILTIN_MODELS, OTHER_BUILTINS

    if model_path in BUILTIN_MODELS or model_path in OTHER_BUILTINS or not Path(model_path).expanduser().is_dir():
        return model_path
    return str(Path(model_path).expanduser().absolute())


# ----------------------------------------------------------------------------- locating


def _pytriton_root() -> Path | None:
    """``<site-packages>/pytriton/tritonserver`` without importing pytriton (slow)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        root = Path(loc) / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return root
    return None


def locate_tritonserver(tritonserver: str | os.PathLike | None = None) -> tuple[Path, Path | None, bool]:
    """Return ``(binary, backend_directory or None, bundled_in_pytriton)``."""
    explicit = tritonserver or os.environ.get("DITSERVE_TRITONSERVER")
    if explicit:
        binary = Path(explicit).resolve()
        if not binary.is_file():
            raise TritonServerError(f"tritonserver not found at {binary}")
        root = binary.parent.parent
        bundled = _pytriton_root() is not None and root == _pytriton_root().resolve()
        backends = root / "backends"
        return binary, (backends if backends.is_dir() else None), bundled
    root = _pytriton_root()
    if root is not None:
        return root / "bin" / "tritonserver", root / "backends", True
    for cand in (shutil.which("tritonserver"), "/opt/tritonserver/bin/tritonserver"):
        if cand and Path(cand).is_file():
            binary = Path(cand).resolve()
            backends = binary.parent.parent / "backends"
            return binary, (backends if backends.is_dir() else None), False
    raise TritonServerError(
        "no tritonserver found: install nvidia-pytriton==0.7.0 (make), set "
        "DITSERVE_TRITONSERVER, or run inside an NGC Triton container"
    )


def prepare_backend_dir(backend_dir: str | os.PathLike | None = None,
                        python_version: str | None = None) -> Path:
    """Copy the pytriton Python-backend stub for this Python next to ``libtriton_python.so``.

    Idempotent and safe against concurrent callers (copy to a temp file, then rename).
    Returns the backend directory to pass as ``--backend-directory``.
    """
    if backend_dir is None:
        root = _pytriton_root()
        if root is None:
            raise TritonServerError("nvidia-pytriton is not installed in this Python")
        backend_dir = root / "backends"
        stubs = root / "python_backend_stubs"
    else:
        backend_dir = Path(backend_dir)
        stubs = backend_dir.parent / "python_backend_stubs"
    backend_dir = Path(backend_dir)
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    src = stubs / version / STUB_NAME
    dst = backend_dir / "python" / STUB_NAME
    if not src.is_file():
        raise TritonServerError(f"no Python backend stub for Python {version} at {src}")
    if not (backend_dir / "python" / "libtriton_python.so").is_file():
        raise TritonServerError(f"no libtriton_python.so in {backend_dir / 'python'}")
    if dst.is_file() and os.access(dst, os.X_OK) and filecmp.cmp(src, dst, shallow=False):
        return backend_dir
    fd, tmp = tempfile.mkstemp(prefix=f".{STUB_NAME}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return backend_dir


# ----------------------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, pgid, sid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    lpar, rpar = data.find("("), data.rfind(")")
    comm = data[lpar + 1:rpar]
    fields = data[rpar + 2:].split()
    # fields[0]=state, [1]=ppid, [2]=pgrp, [3]=session
    return comm, fields[0], int(fields[2]), int(fields[3])


def session_processes(sid: int, include_zombies: bool = False) -> list[tuple[int, str]]:
    """Live ``(pid, comm)`` of every process in session ``sid`` (zombies excluded by default)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is None:
            continue
        comm, state, _pgid, psid = st
        if psid != sid:
            continue
        if state in ("Z", "X") and not include_zombies:
            continue
        found.append((int(entry), comm))
    return found


def _is_stub(comm: str) -> bool:
    # /proc comm is truncated to 15 characters: "triton_python_b"
    return STUB_NAME.startswith(comm) and len(comm) >= 10


# ----------------------------------------------------------------------------- server


def _parent_death_signal(sig: int = signal.SIGTERM):
    """preexec_fn: the child gets ``sig`` when the thread that started it dies (Linux), so a
    killed test run or CLI does not leave a tritonserver behind. None elsewhere."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def _preexec() -> None:
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # parent already gone between fork and prctl
            os.kill(os.getpid(), int(sig))

    return _preexec


def _venv_bin() -> Path:
    """The bin folder of the running interpreter's environment."""
    return Path(sys.prefix) / "bin"


class TritonServer:
    """A tritonserver process over a model repository.

    Usable as a context manager::

        with TritonServer(model_repository, http_port=0, models=["flux_postprocess"],
                          model_path="tiny", device="cpu", dtype="float32") as srv:
            requests.get(srv.http_url + "/v2/health/ready")

    Port 0 picks a free port. ``models=None`` loads the whole repository (default
    model-control mode); a list switches to ``--model-control-mode=explicit`` with one
    ``--load-model`` per entry.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike | None = None,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "0.0.0.0",
        models: Sequence[str] | None = None,
        model_path: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        gpus: str | Sequence[int] | None = None,
        log_file: str | os.PathLike | None = None,
        log_verbose: int = 0,
        startup_timeout: float = 600.0,
        stop_timeout: float = 60.0,
        exit_timeout_secs: int = 20,
        tritonserver: str | os.PathLike | None = None,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str | None] | None = None,
    ) -> None:
        if model_repository is None:
            from ditserve.paths import model_repository as _default_repo

            model_repository = _default_repo()
        self.model_repository = Path(model_repository).resolve()
        wanted = [p for p in (http_port, grpc_port, metrics_port)]
        free = iter(find_free_ports(sum(1 for p in wanted if not p)))
        self.http_port, self.grpc_port, self.metrics_port = (p or next(free) for p in wanted)
        self.host = host
        self.models = [m for m in (models or []) if m] or None
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        if gpus is not None and not isinstance(gpus, str):
            gpus = ",".join(str(g) for g in gpus)
        self.gpus = gpus
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.exit_timeout_secs = exit_timeout_secs
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self._tritonserver = tritonserver
        # A log we made up ourselves is removed after a clean exit (code 0) and kept otherwise,
        # where the error messages point at it: 74 such folders had piled up in /tmp from test
        # and demo runs before this.
        # The folder is made here, so that log_file can be shown before start(); it is removed again when
        # no process was started (a missing repository, a busy port, stop() before start()).
        self._own_log_dir: str | None = None
        if log_file is None:
            self._own_log_dir = tempfile.mkdtemp(prefix="ditserve-triton-")
            log_file = Path(self._own_log_dir) / "tritonserver.log"
        self.log_file = Path(log_file)
        self.process: subprocess.Popen | None = None
        self._log_fh = None
        self._shm_prefix = f"ditserve_{os.getpid()}_{self.http_port}_"

    # -- urls ---------------------------------------------------------------------------

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc expects it."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    # -- command and environment -------------------------------------------------------

    def command(self) -> list[str]:
        binary, backend_dir, bundled = locate_tritonserver(self._tritonserver)
        if bundled:
            backend_dir = prepare_backend_dir(backend_dir)
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            # Every config.pbtxt is complete and no model.py defines auto_complete_config, yet with
            # auto-complete on the Python backend starts one extra stub per model only to look for
            # it: a second interpreter importing torch/diffusers per model. Off, loading the whole
            # repository took 121 s instead of 199 s (2 cores, 28 stubs; 156 s of CPU against 289 s).
            "--disable-auto-complete-config",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        if self.models:
            cmd.append("--model-control-mode=explicit")
            cmd.extend(f"--load-model={m}" for m in self.models)
        cmd.extend(self.extra_args)
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = str(_venv_bin())
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
        env["PATH"] = os.pathsep.join([venv_bin, *path])
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env.pop("PYTHONHOME", None)
        if self.model_path is not None:
            env["DITSERVE_MODEL_PATH"] = _absolute_directory(str(self.model_path))
        if self.device is not None:
            env["DITSERVE_DEVICE"] = self.device
        if self.dtype is not None:
            env["DITSERVE_DTYPE"] = self.dtype
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        # Every pipeline stage is its own stub process with its own torch/OpenMP pool; under
        # concurrent requests they run at once, and OpenMP's default spin-waiting makes them
        # starve each other (measured on 2 cores: throughput swinging between 1 and 13
        # requests/s at concurrency 4, against a steady ~19/s with passive waiting).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        for key, value in self.extra_env.items():
            if value is None:  # None removes a variable
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    # -- lifecycle ----------------------------------------------------------------------

    def ports(self) -> dict[str, int]:
        """The ports tritonserver binds, by keyword argument."""
        return {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}

    def check_ports(self, names: Mapping[str, str] | None = None) -> None:
        """TritonServerError unless each port can be bound on ``host`` now; ``names`` maps ``http_port``,
        ``grpc_port`` and ``metrics_port`` to what the error calls them (e.g. ``--http-port``)."""
        names = names or {}
        check_ports_free({names.get(key, key): port for key, port in self.ports().items()}, self.host)

    def start(self, wait: bool = True) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            return self
        try:
            if not self.model_repository.is_dir():
                raise TritonServerError(f"model repository {self.model_repository} does not exist")
            self.check_ports()
            cmd = self.command()
        except BaseException:
            if self.process is None:
                self._remove_unused_log_dir()
            raise
        if self._own_log_dir is not None and not Path(self._own_log_dir).is_dir():
            self._own_log_dir = tempfile.mkdtemp(prefix="ditserve-triton-")  # removed by an earlier failure
            self.log_file = Path(self._own_log_dir) / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_file, "ab", buffering=0)
        self._log_fh.write(("$ " + " ".join(cmd) + "\n").encode())
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
            close_fds=True,
            preexec_fn=_parent_death_signal(),
        )
        atexit.register(self._atexit_stop)
        if wait:
            try:
                self.wait_ready(self.startup_timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def is_ready(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/v2/health/ready", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def is_live(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/v2/health/live", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            if self.process is None:
                raise TritonServerError("tritonserver was not started")
            rc = self.process.poll()
            if rc is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {rc} before becoming ready; "
                    f"last lines of {self.log_file}:\n{self.log_tail()}"
                )
            # Ready only while our own process is alive: another server on the port (bound after start()
            # checked it) would answer while ours fails to bind it and exits.
            if self.is_ready() and self.process.poll() is None:
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f}s; last lines of "
                    f"{self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Block until tritonserver exits by itself; returns its exit code."""
        if self.process is None:
            raise TritonServerError("tritonserver was not started")
        return self.process.wait(timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait, SIGKILL the whole session; verify no stub survives.

        Returns tritonserver's exit code (negative for a signal), None if never started.
        Idempotent.
        """
        if self.process is None:
            self._remove_unused_log_dir()
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        proc = self.process
        sid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sid, signal.SIGKILL)
                proc.wait(10)
        # tritonserver is gone; anything left in its session (stubs reparented to init)
        # gets SIGKILL, then we verify nothing is left.
        self._kill_session(sid)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self._cleanup_shm()
        if self._own_log_dir is not None and proc.returncode == 0:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit_stop)
        return proc.returncode

    def _remove_unused_log_dir(self) -> None:
        """Our own log folder, when no process has been started to write to it."""
        if self._own_log_dir is not None and self.process is None:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)

    def _kill_session(self, sid: int, timeout: float = 10.0) -> None:
        leftover = session_processes(sid)
        if leftover:
            for pid, _comm in leftover:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while leftover and time.monotonic() < deadline:
                time.sleep(0.1)
                leftover = session_processes(sid)
        stubs = [(p, c) for p, c in leftover if _is_stub(c)]
        if leftover:
            raise TritonServerError(
                f"processes of tritonserver session {sid} survived SIGKILL: {leftover}"
                + (f" (python backend stubs: {stubs})" if stubs else "")
            )

    def _cleanup_shm(self) -> None:
        shm = Path("/dev/shm")
        if not shm.is_dir():
            return
        for f in shm.glob(self._shm_prefix + "*"):
            with contextlib.suppress(OSError):
                f.unlink()

    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=15)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"TritonServer(repo={self.model_repository}, http={self.http_port}, "
                f"grpc={self.grpc_port}, metrics={self.metrics_port}, pid={self.pid})")
