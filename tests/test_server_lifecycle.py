"""Lifecycle of a real tritonserver started by ``ditserve serve`` / ``TritonServer``.

The serve tests load one light model: the lead's ``flux_postprocess`` stage from the real
``model_repository/`` when it exists, otherwise the ``echo`` fixture model under
``tests/fixtures/model_repository``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from ditserve.server import (
    STUB_NAME,
    TritonServer,
    TritonServerError,
    find_free_ports,
    prepare_backend_dir,
    session_processes,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
FIXTURE_REPOSITORY = Path(__file__).resolve().parent / "fixtures" / "model_repository"


def light_model() -> tuple[Path, str]:
    if (MODEL_REPOSITORY / "flux_postprocess" / "config.pbtxt").is_file():
        return MODEL_REPOSITORY, "flux_postprocess"
    return FIXTURE_REPOSITORY, "echo"


def http_get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_stub(proc: psutil.Process) -> bool:
    try:
        name = proc.name()
        exe = proc.cmdline()[:1]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return STUB_NAME.startswith(name) and len(name) >= 10 or any(STUB_NAME in e for e in exe)


def leftovers(http_port: int, sids: set[int]) -> list[str]:
    """tritonserver/stub processes still alive that belong to our server."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(info["cmdline"] or [])
        try:
            sid = os.getsid(proc.pid)
        except OSError:
            continue
        ours = sid in sids or f"--http-port={http_port}" in cmd or f"_{http_port}_" in cmd
        if ours and (info["name"] == "tritonserver" or is_stub(proc)):
            found.append(f"{proc.pid} {info['name']} {cmd[:200]}")
    return found


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_serve(serve: subprocess.Popen, out: Path, timeout: float) -> None:
    """Until `ditserve serve` (its output going to ``out``) prints that it is ready."""
    deadline = time.monotonic() + timeout
    while b"ditserve: ready" not in out.read_bytes():
        assert serve.poll() is None, f"serve exited early:\n{out.read_text()}"
        assert time.monotonic() < deadline, f"serve not ready:\n{out.read_text()}"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_starts_and_stops_cleanly(sig, tmp_path):
    repo, model = light_model()
    http, grpc, metrics = find_free_ports(3)
    out = tmp_path / "serve.out"
    cmd = [
        sys.executable, "-m", "ditserve.cli", "serve",
        "--model-repository", str(repo),
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--host", "127.0.0.1",
        "--models", model,
        "--model-path", "tiny", "--device", "cpu", "--dtype", "float32",
        "--log-file", str(tmp_path / "tritonserver.log"),
    ]
    with open(out, "wb") as fh:
        serve = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        wait_for_serve(serve, out, timeout=240)

        assert http_get(base + "/v2/health/live") == 200
        assert http_get(base + "/v2/health/ready") == 200
        assert http_get(f"{base}/v2/models/{model}/ready") == 200
        assert http_get(f"http://127.0.0.1:{metrics}/metrics") == 200
        with urllib.request.urlopen(base + "/v2/repository/index", data=b"{}", timeout=5) as r:
            index = json.load(r)
        loaded = {m["name"] for m in index if m.get("state") == "READY"}
        assert model in loaded

        tritons = [p for p in psutil.Process(serve.pid).children(recursive=True)
                   if p.name() == "tritonserver"]
        assert len(tritons) == 1, tritons
        triton = tritons[0]
        assert os.getsid(triton.pid) == triton.pid, "tritonserver must run in its own session"
        stubs = [p for p in triton.children(recursive=True) if is_stub(p)]
        assert stubs, "the Python-backend model should run in a stub process"
        watched = [triton.pid] + [p.pid for p in stubs]

        t0 = time.monotonic()
        serve.send_signal(sig)
        rc = serve.wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)

    text = out.read_text()
    assert rc == 0, text
    assert f"ditserve: {sig.name}, stopping tritonserver" in text
    assert "ditserve: stopped" in text
    assert elapsed < 60, f"shutdown took {elapsed:.1f}s"
    assert not [pid for pid in watched if alive(pid)], "server processes survived"
    assert leftovers(http, {triton.pid}) == []
    assert session_processes(triton.pid) == []
    assert port_is_free(http) and port_is_free(grpc) and port_is_free(metrics)


def test_server_context_manager_passes_settings(tmp_path):
    """TritonServer: port 0, explicit model loading, DITSERVE_* env reaches the model, one stub
    process per model instance (no auto-complete stub)."""
    tritonclient_http = pytest.importorskip("tritonclient.http")
    with TritonServer(FIXTURE_REPOSITORY, http_port=0, grpc_port=0, metrics_port=0,
                      host="127.0.0.1", models=["echo"], model_path="tiny-test",
                      device="cpu", dtype="float32", log_verbose=1,
                      log_file=tmp_path / "triton.log") as server:
        assert all(p > 0 for p in (server.http_port, server.grpc_port, server.metrics_port))
        assert server.is_ready()
        client = tritonclient_http.InferenceServerClient(server.http_url.split("://", 1)[1])
        try:
            inp = tritonclient_http.InferInput("TEXT", [1], "BYTES")
            inp.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
            result = client.infer("echo", [inp])
        finally:
            client.close()
        assert result.as_numpy("TEXT_OUT").tolist() == [b"hello"]
        assert result.as_numpy("ENV").tolist() == [b"tiny-test", b"cpu", b"float32"]
        pid = server.pid
        assert any(comm == "tritonserver" for _, comm in session_processes(pid))
    assert server.poll() == 0, server.log_tail()
    assert session_processes(pid) == []
    log = (tmp_path / "triton.log").read_text()
    assert "--model-control-mode=explicit" in log and "--load-model=echo" in log
    # With auto-complete on, the Python backend starts a second stub for the model to look for
    # auto_complete_config (the load took 199 s instead of 121 s for the whole repository).
    assert log.count("Starting Python backend stub") == 1, log


def test_server_reports_early_death(tmp_path):
    """A model that fails to load makes tritonserver exit; start() raises with the log."""
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'instance_group [ { kind: KIND_CPU count: 1 } ]\n'
    )
    (model / "1" / "model.py").write_text("raise RuntimeError('deliberately broken model')\n")
    server = TritonServer(tmp_path / "repo", http_port=0, grpc_port=0, metrics_port=0,
                          host="127.0.0.1", models=["broken"], startup_timeout=120,
                          log_file=tmp_path / "triton.log")
    with pytest.raises(TritonServerError, match="deliberately broken model"):
        server.start()
    assert server.poll() is not None
    assert session_processes(server.pid) == []


@pytest.mark.parametrize("exit_code", [0, 3])
def test_own_log_folder_is_removed_only_after_a_clean_exit(tmp_path, exit_code):
    """With no log_file the server logs into a temp folder of its own: gone after exit code 0,
    kept (for the error it explains) otherwise. A stand-in binary exits with the code asked."""
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ntrap 'exit $FAKE_EXIT' TERM\nwhile :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    server = TritonServer(tmp_path, tritonserver=fake, env={"FAKE_EXIT": str(exit_code)})
    log_dir = server.log_file.parent
    assert log_dir.is_dir() and log_dir != tmp_path
    server.start(wait=False)
    time.sleep(0.3)  # let sh install its trap
    assert server.stop() == exit_code
    assert log_dir.exists() == (exit_code != 0)
    if exit_code:
        assert "$ " + str(fake.resolve()) in server.log_file.read_text()
        shutil.rmtree(log_dir)


def test_prepare_backend_dir_is_idempotent():
    first = prepare_backend_dir()
    stub = first / "python" / STUB_NAME
    mtime = stub.stat().st_mtime_ns
    assert prepare_backend_dir() == first
    assert stub.stat().st_mtime_ns == mtime, "an up-to-date stub must not be copied again"
    assert os.access(stub, os.X_OK)


def test_free_ports_are_distinct():
    ports = find_free_ports(5)
    assert len(set(ports)) == 5 and all(1024 <= p < 65536 for p in ports)


def test_triton_server_fixture_serves_repository(triton_server):
    """The shared session fixture: ready, and every model of model_repository/ loaded."""
    assert triton_server.is_ready()
    expected = sorted(p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt"))
    for name in expected:
        assert http_get(f"{triton_server.http_url}/v2/models/{name}/ready") == 200, (
            f"{name} not ready:\n{triton_server.log_tail()}")


def test_server_dies_with_the_process_that_started_it(tmp_path):
    """A starter killed with SIGKILL (no cleanup runs) still takes tritonserver with it."""
    script = (
        "import os, sys\n"
        "from ditserve.server import TritonServer\n"
        f"s = TritonServer({str(FIXTURE_REPOSITORY)!r}, http_port=0, grpc_port=0, metrics_port=0,\n"
        "                 host='127.0.0.1', models=['echo'],\n"
        f"                 log_file={str(tmp_path / 'triton.log')!r})\n"
        "s.start()\n"
        "print(s.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 60
    while session_processes(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(pid) == []


def test_cli_takes_subcommands_from_optional_modules(monkeypatch):
    """`ditserve` adds the subcommands of modules with register(subparsers) when present."""
    import types

    from ditserve import cli

    fake = types.ModuleType("ditserve_test_fake_cli")

    def register(subparsers):
        p = subparsers.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: 7 if args.name == "triton" else 0)

    fake.register = register
    monkeypatch.setitem(sys.modules, "ditserve_test_fake_cli", fake)
    monkeypatch.setattr(cli, "OPTIONAL_SUBCOMMAND_MODULES",
                        ("ditserve_test_fake_cli", "ditserve_test_missing_cli"))
    assert cli.main(["hello", "--name", "triton"]) == 7
    assert cli.build_parser().parse_args(["serve", "--models", "a,b"]).models == "a,b"


def test_serve_outside_a_checkout_names_the_repository_settings(monkeypatch, tmp_path, capsys):
    """Installed without a checkout (`pip install .`), `serve` finds no model repository: one line saying what to
    set, exit code 2, no traceback."""
    from ditserve import cli, paths

    monkeypatch.setattr(paths, "__file__", str(tmp_path / "site-packages" / "ditserve" / "paths.py"))
    for name in ("DITSERVE_REPO_ROOT", "DITSERVE_MODEL_REPOSITORY"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["serve", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditserve: cannot locate the ditserve repository root") and "--model-repository" in err


def test_an_unexpected_error_fails_every_request_of_its_batch_and_the_server_stays_up(tmp_path):
    """A stage exception (not bad input) answers each request of the batch with its own INTERNAL error. One
    TritonError shared by the responses crashed tritonserver (SIGSEGV) as soon as the batch held two requests."""
    import concurrent.futures

    grpc = pytest.importorskip("tritonclient.grpc")

    def infer(url: str, x: float):
        client = grpc.InferenceServerClient(url)
        tensor = grpc.InferInput("X", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[x]], np.float32))
        try:
            return float(client.infer("failing", [tensor]).as_numpy("Y")[0, 0])
        except grpc.InferenceServerException as error:
            return error.status(), error.message()
        finally:
            client.close()

    with TritonServer(FIXTURE_REPOSITORY, http_port=0, grpc_port=0, metrics_port=0, host="127.0.0.1",
                      models=["failing"], device="cpu", log_file=tmp_path / "triton.log") as server:
        url = server.grpc_url.split("://", 1)[-1]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # within the 0.5 s queue delay: one batch
            answers = list(pool.map(lambda x: infer(url, x), [1.0, -1.0, 2.0, 3.0]))
        log = (tmp_path / "triton.log").read_text()
        assert "Signal (11)" not in log, log[-3000:]
        assert answers == [("StatusCode.INTERNAL", "failing: internal error: RuntimeError: a negative X")] * 4, answers
        assert server.is_ready() and infer(url, 4.0) == 8.0


def fake_tritonserver(path: Path, *, serve_http: bool = True) -> Path:
    """A stand-in tritonserver: answers 200 to every GET on its --http-port (as a ready server does) and exits
    0 on SIGTERM; with serve_http False it exits 1 at once, as after a failed load."""
    body = (
        "import http.server, signal, sys\n"
        "port = int(next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--http-port=')))\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "class Ready(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200)\n"
        "        self.end_headers()\n"
        "    def log_message(self, *_):\n"
        "        pass\n"
        "http.server.HTTPServer(('127.0.0.1', port), Ready).serve_forever()\n"
    ) if serve_http else "import sys\nprint('failed to load all models')\nsys.exit(1)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


class ReadyElsewhere:
    """Another server on ``port``: a plain HTTP server answering 200 to /v2/health/ready."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        import http.server
        import threading

        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.httpd = http.server.HTTPServer((host, port), Ready)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("option", ["--http-port", "--grpc-port", "--metrics-port"])
def test_serve_refuses_a_port_another_server_holds(option, capsys):
    """A port in use is refused before tritonserver starts, naming the port and its option. The HTTP port of
    another server used to pass for ours: its /v2/health/ready answered, `serve` printed "ready", and our
    tritonserver failed to bind ("Socket '0.0.0.0:18000' already in use") and exited."""
    from ditserve import cli

    ports = dict(zip(["--http-port", "--grpc-port", "--metrics-port"], find_free_ports(3)))
    other = ReadyElsewhere(ports[option])  # on 127.0.0.1; serve binds 0.0.0.0, which it covers
    try:
        rc = cli.main(["serve", "--model-repository", str(FIXTURE_REPOSITORY), "--models", "echo",
                       "--device", "cpu", *[str(a) for item in ports.items() for a in item], "--startup-timeout", "60"])
    finally:
        other.close()
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert f"ditserve: {option} {ports[option]}: cannot bind 0.0.0.0:{ports[option]}" in err
    assert f"choose another {option}" in err
    assert "ditserve: ready" not in out and "starting tritonserver" not in out


def test_serve_refuses_one_port_given_twice(capsys):
    from ditserve import cli

    http, metrics = find_free_ports(2)
    assert cli.main(["serve", "--model-repository", str(FIXTURE_REPOSITORY), "--device", "cpu", "--http-port", str(http),
                     "--grpc-port", str(http), "--metrics-port", str(metrics)]) == 1
    assert f"port {http} is given twice: --http-port and --grpc-port" in capsys.readouterr().err


def test_serve_removes_its_set_copy_after_a_signal(tmp_path):
    """`--set` copies the repository into a temporary folder: removed when serve stops (it was never removed).
    A stand-in tritonserver keeps it quick; TMPDIR shows what serve leaves behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    http, grpc, metrics = find_free_ports(3)
    env = {**os.environ, "TMPDIR": str(tmp),
           "DITSERVE_TRITONSERVER": str(fake_tritonserver(tmp_path / "bin" / "tritonserver"))}
    out = tmp_path / "serve.out"
    with open(out, "wb") as fh:
        serve = subprocess.Popen(
            [sys.executable, "-m", "ditserve.cli", "serve", "--set", "flux_postprocess.png_compress_level=1",
             "--device", "cpu", "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--startup-timeout", "60"],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_for_serve(serve, out, timeout=60)
        copies = list(tmp.glob("ditserve-repo-*"))
        assert len(copies) == 1 and (copies[0] / "model_repository" / "flux_postprocess" / "config.pbtxt").is_file()
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0, out.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
    assert list(tmp.iterdir()) == [], out.read_text()  # the copy, and the clean server's own log folder


@pytest.mark.parametrize("case", ["load failure", "bad --set"])
def test_serve_removes_its_set_copy_when_it_fails(case, tmp_path, monkeypatch, capsys):
    import tempfile

    from ditserve import cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("DITSERVE_TRITONSERVER", str(fake_tritonserver(tmp_path / "bin" / "tritonserver",
                                                                      serve_http=False)))
    setting = "flux_postprocess.png_compress_level=1" if case == "load failure" else "flux_postprocess.png_level=1"
    http, grpc, metrics = find_free_ports(3)
    rc = cli.main(["serve", "--set", setting, "--device", "cpu", "--host", "127.0.0.1", "--http-port", str(http),
                   "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--startup-timeout", "60"])
    err = capsys.readouterr().err
    assert rc == (1 if case == "load failure" else 2), err
    assert ("exited with code 1 before becoming ready" if case == "load failure" else "declares no parameter") in err
    assert list(tmp_path.glob("ditserve-repo-*")) == []


def test_own_log_folder_is_not_left_without_a_server(tmp_path, monkeypatch):
    """The log folder made for a server that never starts (no repository there; stopped before starting) is
    removed: an empty /tmp/ditserve-triton-* was left by each such attempt."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server = TritonServer(tmp_path / "missing", http_port=0, grpc_port=0, metrics_port=0, host="127.0.0.1")
    assert server.log_file.parent.is_dir()  # known before start(), for the messages that name it
    with pytest.raises(TritonServerError, match="does not exist"):
        server.start()
    assert list(tmp_path.glob("ditserve-triton-*")) == []
    assert server.stop() is None

    unused = TritonServer(tmp_path, http_port=0, grpc_port=0, metrics_port=0, host="127.0.0.1")
    assert unused.stop() is None
    assert list(tmp_path.glob("ditserve-triton-*")) == []


def test_a_relative_model_directory_reaches_the_models_absolute(tmp_path, monkeypatch):
    """The models resolve DITSERVE_MODEL_PATH in their own processes, whose working directory is not ours."""
    (tmp_path / "my-flux").mkdir()
    monkeypatch.chdir(tmp_path)

    def sent(model_path: str) -> str:
        return TritonServer(tmp_path, model_path=model_path, log_file=tmp_path / "log").environment()["DITSERVE_MODEL_PATH"]

    assert sent("my-flux") == str(tmp_path / "my-flux")
    assert sent("tiny") == "tiny" and sent("org/name") == "org/name"  # built-in names and Hub ids as given
