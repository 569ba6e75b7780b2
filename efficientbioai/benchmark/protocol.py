"""The parent side of the row-process protocol: start a row's process, send it commands, read its answers.
The child side, and the protocol itself, are in :mod:`efficientbioai.benchmark.worker`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import efficientbioai
from efficientbioai.benchmark.worker import MARK
from efficientbioai.errors import EfficientBioAIError


class WorkerError(EfficientBioAIError):
    """A row's process failed: it reported an error, or it ended."""


def row_spec(
    row_id: str,
    kind: str,
    device: str,
    precision: str,
    artifact: Path,
    *,
    threads: int,
    tiling: dict[str, Any],
    images: list[dict[str, Any]],
    energy: bool,
    warmup: int,
    outputs: Path,
) -> dict[str, Any]:
    """The first message to a row's process: what it runs, on which images, and where its outputs go."""
    return {
        "row": row_id,
        "kind": kind,
        "device": device,
        "precision": precision,
        "artifact": str(artifact),
        "threads": threads,
        "tiling": tiling,
        "images": images,
        "energy": energy,
        "warmup": warmup,
        "outputs": str(outputs),
        "gpu_index": 0,
    }


class Worker:
    """A row's process (see :mod:`efficientbioai.benchmark.worker`); its stderr goes to ``log``."""

    def __init__(self, spec: dict[str, Any], log: Path, threads: int):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self.log = open(log, "a", buffering=1)  # noqa: SIM115 - closed in close()
        package_root = str(Path(efficientbioai.__file__).resolve().parents[1])
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from efficientbioai.benchmark.worker import main; raise SystemExit(main())",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
        )
        self._send(spec)

    def _send(self, obj: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def _died(self):
        self.proc.wait(timeout=30)
        tail = ""
        with contextlib.suppress(OSError):
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-8:]).strip()
        raise WorkerError(
            f"the row's process ended unexpectedly (exit code {self.proc.returncode})"
            + (f": {tail[-600:]}" if tail else ""),
            f"see {self.log_path}",
        )

    def answer(self) -> dict[str, Any]:
        """The process's next answer (its "ready" message, or a run's result); WorkerError if it failed."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self._died()
            if line.startswith(MARK):
                obj = json.loads(line[len(MARK) :])
                if "error" in obj:
                    self.log.write(obj.get("traceback") or "")
                    raise WorkerError(obj["error"], obj.get("fix"))
                return obj
            self.log.write(line)

    def run(self, image: int) -> dict[str, Any]:
        """Run image ``image`` once, timed, and return the process's measurements."""
        self._send({"cmd": "run", "image": image})
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            for line in self.proc.stdout:
                self.log.write(line)
            self.proc.stdout.close()
        self.log.close()
