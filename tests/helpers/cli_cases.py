"""Drive the real ``cdcl`` command in child processes, check the outcome, and record every case for
docs/RELIABILITY.md (set CDCL_RELIABILITY_JSON=FILE to collect them; tools/reliability_table.py renders them).

Starting Python and importing torch costs seconds per process on a busy machine and the suites run dozens of
cases, so by default each command runs in a child *forked* from one warm "zygote" process that has imported
cdcl once. The child is a real process (own pid, working folder, environment, stdin/stdout/stderr files, exit
status) and runs ``cdcl.cli`` as ``__main__`` exactly as ``python -m cdcl.cli ARGS`` would, so an uncaught
exception prints a traceback and exits 1; only the imports are skipped. CDCL_TEST_FRESH=1 starts a new
interpreter per command instead (slower; same results).
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

if __package__ in (None, ""):  # started as the zygote's script (see _Zygote): ``helpers`` sits one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdcl.data.synthetic import synthetic_tile  # noqa: E402
from cdcl.testing.slides import write_pyramid  # noqa: E402

from helpers.training import tiny_dataset, tiny_overrides  # noqa: E402

HANDLER_MODULES = (
    "cdcl.cli",
    "cdcl.commands.train",
    "cdcl.commands.evaluate",
    "cdcl.commands.predict",
    "cdcl.commands.predict_wsi",
    "cdcl.commands.data",
)
DEFAULT_TIMEOUT = 180.0
TEMP_NAME = re.compile(r"^\..*\.tmp$|^\.evaluate-")  # atomic_path temporaries, evaluate's staging folder


@dataclass
class CliResult:
    """What one ``cdcl`` process did. ``rc`` < 0 means killed by signal ``-rc`` (as in ``subprocess``)."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    max_rss_mb: float  # peak resident memory of the process (with the zygote: the pages it touched)

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


class Running:
    """A started command: ``wait()`` for its result or ``kill()`` it (SIGKILL) first."""

    def __init__(self, argv: list[str], pid: int, io_dir: Path, collect: Callable[[float | None], dict | None]) -> None:
        """``collect(timeout)``: the exit status as ``_status`` gives it, or None if not ended within ``timeout``."""
        self.argv, self.pid, self._io, self._collect = argv, pid, io_dir, collect
        self._start = time.perf_counter()
        self.result: CliResult | None = None

    def kill(self) -> None:
        if self.result is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # the command and any workers it started
            except ProcessLookupError:
                pass

    def poll(self) -> CliResult | None:
        """The result if the process has ended, else None (never blocks)."""
        if self.result is None:
            status = self._collect(0.0)
            if status is not None:
                self._finish(status)
        return self.result

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> CliResult:
        if self.result is None:
            status = self._collect(timeout)
            if status is None:
                self.kill()
                status = self._collect(None)
                self._finish(status)
                pytest.fail(
                    f"cdcl {' '.join(self.argv[:2])} timed out after {timeout:.0f} s:\n{self.result.stderr[-2000:]}"
                )
            self._finish(status)
        return self.result

    def _finish(self, status: dict) -> None:
        read = lambda name: (self._io / name).read_text(errors="replace") if (self._io / name).exists() else ""  # noqa: E731
        self.result = CliResult(
            self.argv,
            status["rc"],
            read("stdout"),
            read("stderr"),
            time.perf_counter() - self._start,
            status["cpu"],
            status["maxrss_kb"] / 1024,
        )
        shutil.rmtree(self._io, ignore_errors=True)


def _status(pid: int, wait_status: int, usage: resource.struct_rusage) -> dict:
    return {
        "rc": os.waitstatus_to_exitcode(wait_status),
        "cpu": usage.ru_utime + usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
    }


class _Zygote:
    """Client side of the warm process (see the module docstring); started on first use, one per test session."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="cdcl-zygote-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=_environment(None),
        )
        if self._line(None).get("ready") is not True:
            raise RuntimeError(f"cdcl test zygote did not start; see {self.log.name}")
        self.running: Running | None = None
        atexit.register(self.close)

    def _line(self, timeout: float | None) -> dict | None:
        if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"cdcl test zygote died; see {self.log.name}")
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, env: dict[str, str], io_dir: Path) -> Running:
        if self.running is not None and self.running.result is None:  # one at a time: end one a failed test left
            self.running.kill()
            self.running.wait()
        request = {"argv": argv, "cwd": str(cwd), "env": env, "io": str(io_dir)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        pid = self._line(None)["pid"]
        self.running = Running(argv, pid, io_dir, self._line)
        return self.running

    def close(self) -> None:
        """End the zygote (it exits at the end of its input) and drop its log unless it says something."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        empty = os.fstat(self.log.fileno()).st_size == 0
        self.log.close()
        if empty:
            Path(self.log.name).unlink(missing_ok=True)


def _start_fresh(argv: list[str], cwd: Path, env: dict[str, str], io_dir: Path) -> Running:
    with open(io_dir / "stdout", "wb") as out, open(io_dir / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdcl.cli", *argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )

    def collect(timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG if deadline is not None else 0)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(wait_status)  # keep Popen from waiting again
                return _status(pid, wait_status, usage)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    return Running(argv, proc.pid, io_dir, collect)


_zygote: _Zygote | None = None


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    """This process's environment plus ``extra``. One OpenMP thread unless set (on a shared CI machine, torch's
    default of one thread per core is several times slower for these tiny models); the Hugging Face hub
    offline, so a download attempt fails at once instead of retrying for a minute (tests never download)."""
    return {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}


def start_cdcl(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> Running:
    """Start ``cdcl ARGS`` (see the module docstring for how); ``env`` adds to this process's environment
    (settings that libraries read on import, such as HF_HUB_OFFLINE, belong in ``_environment``)."""
    global _zygote
    argv = [str(a) for a in args]
    io_dir = Path(tempfile.mkdtemp(prefix="cdcl-case-"))
    full_env = _environment(env)
    cwd = Path(cwd or os.getcwd())
    if os.environ.get("CDCL_TEST_FRESH") == "1":
        return _start_fresh(argv, cwd, full_env, io_dir)
    if _zygote is None:
        _zygote = _Zygote()
    return _zygote.start(argv, cwd, full_env, io_dir)


def run_cdcl(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT
) -> CliResult:
    """Run ``cdcl ARGS`` to completion (killed and failed after ``timeout`` seconds)."""
    return start_cdcl(*args, cwd=cwd, env=env).wait(timeout)


# ---- a tiny dataset, config, checkpoint and slide, shared by the suites ----------------------------------------

TINY_ENCODER = "mobilenetv3_small_050"  # 0.3 M parameters: a 6 MB checkpoint and fast steps on a CPU


@dataclass
class World:
    """``tiny_dataset`` + an empty YAML config + a checkpoint trained by ``cdcl train`` (read-only: copy first)."""

    root: Path
    data: Path
    split: Path
    config: Path
    checkpoint: Path | None = None

    def train_args(
        self,
        out: Path,
        *sets: str,
        data: Path | None = None,
        split: Path | None = None,
        method: str = "supervised",
        iterations: int = 2,
        config: Path | None = None,
    ) -> list[str]:
        """``train --config ... --set ... --out OUT`` for a tiny run; later ``sets`` override earlier ones."""
        overrides = tiny_overrides(
            data or self.data, split or self.split, method, iterations, **{"model.encoder": TINY_ENCODER}
        ) + list(sets)
        return [
            "train",
            "--config",
            str(config or self.config),
            *[a for s in overrides for a in ("--set", s)],
            "--out",
            str(out),
        ]


_world: World | None = None


def copy_data(world: World, dest: Path) -> Path:
    """A private copy of the tiny dataset, to break."""
    shutil.copytree(world.data, dest)
    return dest


def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The session's shared World, built on first use (its checkpoint comes from a real ``cdcl train`` run)."""
    global _world
    if _world is None:
        root = tmp_path_factory.mktemp("world")
        data, split = tiny_dataset(root)
        config = root / "empty.yaml"
        config.write_text("# every value comes from --set\n")
        world = World(root, data, split, config)
        result = run_cdcl(*world.train_args(root / "run"))
        assert_ok(result)
        world.checkpoint = root / "run" / "last.pt"
        _world = world
    return _world


def write_slide(path: Path, height: int = 512, width: int = 768, mpp: float | None = 0.5) -> Path:
    """A pyramidal TIFF of synthetic H&E tiles (256 px each) on a white margin of 32 px."""
    return write_pyramid(path, _slide_image(height, width), mpp=mpp, tile=128)


@functools.cache
def _slide_image(height: int, width: int) -> np.ndarray:
    image = np.full((height, width, 3), 255, np.uint8)
    rng = np.random.default_rng(0)
    for y in range(32, height - 32, 256):
        for x in range(32, width - 32, 256):
            tile, _ = synthetic_tile(rng, 256)
            h, w = min(256, height - 32 - y), min(256, width - 32 - x)
            image[y : y + h, x : x + w] = tile[:h, :w]
    image.flags.writeable = False
    return image


# ---- checks ------------------------------------------------------------------------------------------------


def stray_files(folder: Path) -> list[str]:
    """Temporary files or staging folders left anywhere under ``folder`` (relative paths)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if TEMP_NAME.match(p.name))


def assert_refused(result: CliResult, *mentions: str, out: Path | None = None) -> None:
    """Exit code 2; stderr ends with one ``cdcl CMD: error: ...`` line containing every string of ``mentions``
    (file names, config keys, the problem); no traceback; ``out`` (if given) holds no file at all."""
    command = " ".join(result.argv[:2]) if result.argv[0] == "data" else result.argv[0]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.rc == 2, f"exit {result.rc}, expected 2:\n{result.stderr[-3000:]}"
    assert result.last_line.startswith(f"cdcl {command}: error: "), result.stderr[-3000:]
    for text in mentions:
        assert text in result.last_line, f"{text!r} not in {result.last_line!r}"
    if out is not None and out.exists():
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert not left, f"partial output left behind in {out}: {left}"


def assert_ok(result: CliResult) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.rc == 0, f"exit {result.rc}, expected 0:\n{result.stderr[-3000:]}"


# ---- the record for docs/RELIABILITY.md -----------------------------------------------------------------------


@dataclass
class Recorder:
    """Appends one JSON line per case to $CDCL_RELIABILITY_JSON (nothing when unset)."""

    suite: str
    case: str
    basetemp: Path

    @classmethod
    def for_test(cls, request: pytest.FixtureRequest) -> Recorder:
        """The recorder of the requesting test (each suite's ``record`` fixture)."""
        case = request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
        return cls(
            request.module.__name__.removeprefix("test_"),
            case,
            request.getfixturevalue("tmp_path_factory").getbasetemp(),
        )

    def scrub(self, text: str) -> str:
        """One line, without the test's temporary folders, so the table reads the same on every run."""
        test_dir = re.escape(str(self.basetemp)) + r"/[^/\s:'\"]+"
        text = re.sub(test_dir + "/", "", " ".join(text.split()))
        text = re.sub(test_dir, ".", text)
        text = re.sub(re.escape(tempfile.gettempdir()) + r"/cdcl-case-\w+/", "", text)
        return text if len(text) <= 400 else text[:399] + "…"

    def __call__(
        self,
        command: str,
        given: str,
        result: CliResult | None,
        expected: str,
        *,
        message: str | None = None,
        outcome: str | None = None,
    ) -> None:
        """One case: ``result`` of the CLI run (None for in-process cases, which give ``message``); ``message``
        defaults to stderr's last line on failure, else the last line of output."""
        target = os.environ.get("CDCL_RELIABILITY_JSON")
        if not target:
            return
        if message is None and result is not None:
            lines = [line for line in (result.stdout if result.rc == 0 else "").splitlines() if line.strip()]
            message = lines[-1] if lines else result.last_line
        row = {
            "suite": self.suite,
            "case": self.case,
            "command": command,
            "input": given,
            "expected": expected,
            "exit_code": None if result is None else result.rc,
            "message": self.scrub(message or ""),
            "outcome": outcome or "",
        }
        if result is not None:
            row.update(
                seconds=round(result.seconds, 2),
                cpu_seconds=round(result.cpu_seconds, 2),
                peak_rss_mb=round(result.max_rss_mb, 1),
            )
        with open(target, "a") as fh:
            fh.write(json.dumps(row) + "\n")


# ---- the zygote (server side) ---------------------------------------------------------------------------------


def _serve() -> None:
    """Import cdcl once, then fork one child per request (JSON lines on stdin; pid and status on stdout)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    for name in HANDLER_MODULES:  # a module that fails to import is left for the child to report
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001
            print(f"zygote: cannot preload {name}: {exc!r}", file=sys.stderr)
    gc.freeze()  # children collect only what they create: fast, and no copy-on-write of the imported modules
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, wait_status, usage = os.wait4(pid, 0)
        replies.write(json.dumps(_status(pid, wait_status, usage)) + "\n")


def _child(request: dict) -> NoReturn:
    """Become ``python -m cdcl.cli ARGV``: own stdio, folder, environment and process group. Ends as the
    interpreter would: SystemExit unwinds out of the server loop, so atexit handlers and finalizers run too."""
    import runpy
    import traceback

    try:
        os.setpgrp()
        io = Path(request["io"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(io / "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(io / "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = open(0, closefd=False)
        sys.argv = [str(Path(sys.modules.pop("cdcl.cli").__file__)), *request["argv"]]  # as `python -m` finds it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except BaseException:  # noqa: BLE001 - never run the command half set up
        traceback.print_exc()
        os._exit(70)
    code = 1
    try:
        runpy.run_module("cdcl.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = (
            exc.code
            if isinstance(exc.code, int)
            else 0
            if exc.code is None
            else (print(exc.code, file=sys.stderr), 1)[1]
        )
    except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
        traceback.print_exc()
    atexit._run_exitfuncs()
    gc.collect()  # what finalization would report (e.g. asyncio tasks whose errors nobody retrieved)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
