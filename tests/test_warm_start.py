"""The warm starts of tests/warm_start.py behave as fresh interpreters for what the suite's tests look at: exit codes,
signals, output, environment, argv, working directory and sys.path; and a process whose environment differs where
modules read it at import starts cold."""

import json
import os
import signal
import subprocess
import time

import pytest
from warm_start import REPO, SERVER_SETTINGS, WARM, WarmProcess, popen_python, start_python

PROBE = """
import json, os, signal, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "rank": os.environ.get("RANK"),
                  "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, set())),
                  "torch_loaded": "torch" in sys.modules}))
sys.stderr.write("to stderr\\n")
raise SystemExit(int(sys.argv[1]))
"""


def warm_env(**extra):
    return dict(os.environ, **SERVER_SETTINGS, **extra)


def test_a_variable_a_library_sets_in_the_pytest_process_is_gone_after_its_test():
    # As torch's compiler does (_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR) in the compiled backend's tests; the next test
    # (same file, same worker: --dist loadfile) launches with this process's environment.
    assert WARM.accepts(warm_env())  # the server starts here, with this process's environment
    os.environ["DSUNLEARN_TEST_SET_BY_A_LIBRARY"] = "1"
    assert not WARM.accepts(warm_env())


def test_a_warm_process_sees_its_own_argv_env_and_cwd_and_ends_with_its_code(tmp_path):
    assert "DSUNLEARN_TEST_SET_BY_A_LIBRARY" not in os.environ

    process = popen_python(["-c", PROBE, "7"], warm_env(RANK="3"), cwd=tmp_path)
    assert isinstance(process, WarmProcess)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 7
    report, stderr_line = output.splitlines()
    assert stderr_line == "to stderr"  # stderr goes where stdout goes, as with stderr=STDOUT
    found = json.loads(report)
    assert found == {"argv": ["-c", "7"], "cwd": str(tmp_path), "path0": "", "rank": "3", "blocked": [],
                     "torch_loaded": True}  # fmt: skip


def test_a_script_runs_as_main_with_its_folder_first_on_the_path(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\nraise RuntimeError('boom')\n")
    process = start_python([str(script), "x"], warm_env(), tmp_path, tmp_path / "log")
    assert process.wait(timeout=120) == 1  # an uncaught exception: its traceback, exit 1
    output = (tmp_path / "log").read_text()
    assert output.startswith(f"__main__ ['{script}', 'x'] {tmp_path}\n") and "RuntimeError: boom" in output


def test_a_module_runs_as_main():
    process = popen_python(["-m", "dsunlearn", "--help"], warm_env())
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "train" in output


def test_signals_and_kill_end_a_warm_process_as_a_fresh_one(tmp_path):
    sleeper = ["-c", "import time; print('up', flush=True); time.sleep(300)"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        process = start_python(sleeper, warm_env(), tmp_path, tmp_path / "log")
        deadline = time.monotonic() + 60
        while (tmp_path / "log").read_text() != "up\n":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.1)
        process.send_signal(sig)
        assert process.wait(timeout=60) == -sig and process.poll() == -sig
        process.kill()  # after the end: nothing happens, as with Popen


def test_an_environment_read_at_import_starts_a_fresh_interpreter(tmp_path):
    # HF_HOME is read when huggingface_hub is imported: the server's import cannot stand in for it.
    assert WARM.accepts(warm_env(RANK="1", MASTER_PORT="1234"))
    # What the imports set themselves (KMP_* from Intel OpenMP), present or not yet in this process, is no difference.
    import_set = WARM._import_env
    assert WARM.accepts({**warm_env(), **import_set})
    assert WARM.accepts({name: value for name, value in warm_env().items() if name not in import_set})
    for env in (warm_env(HF_HOME=str(tmp_path)), {k: v for k, v in warm_env().items() if k != "OMP_NUM_THREADS"}):
        assert not WARM.accepts(env)
        process = popen_python(["-c", "print('cold')"], env)
        assert isinstance(process, subprocess.Popen)
        assert process.communicate(timeout=120)[0] == "cold\n"
    process = start_python(["-c", "print('net')"], warm_env(), REPO, tmp_path / "log", prefix=["env"])
    assert isinstance(process, subprocess.Popen) and process.wait(timeout=60) == 0  # a prefix: never warm


def test_the_server_outlives_a_stray_sigterm_and_is_replaced_after_a_sigkill(tmp_path):
    assert popen_python(["-c", "pass"], warm_env()).communicate(timeout=120) == ("", None)
    server = WARM._server
    server.send_signal(signal.SIGTERM)  # what now and then reaches the test runs' processes (launching.OUTSIDE_STOP)
    with pytest.raises(subprocess.TimeoutExpired):
        server.wait(timeout=1)
    server.kill()
    server.wait(timeout=60)
    with pytest.warns(UserWarning, match="server ended with -9; starting a new one"):
        process = popen_python(["-c", "print('after')"], warm_env())
    assert isinstance(process, WarmProcess) and process.communicate(timeout=300)[0] == "after\n"
    assert WARM._server is not server and WARM._server.poll() is None
