"""Constants and small types shared by the client tests (conftest puts tests/client on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-mixtral"  # a directory under the model root; the server resolves it there
# Seconds-fast knobs for the tiny model: 4 calibration samples of 32 tokens, input-Hessian sensitivity, RTN.
FAST = {"sensitivity": "input-hessian", "quantizer": "rtn", "group_size": 16, "calib_samples": 4, "seq_len": 32,
        "avg_bits": 3.0}
FAST_FLAGS = ["--sensitivity", "input-hessian", "--quantizer", "rtn", "--group-size", "16", "--calib-samples", "4",
              "--seq-len", "32", "--avg-bits", "3"]


@dataclass
class Service:
    url: str
    key: str
    root: Path  # model root (also holds eval.txt and short.txt)
    home: Path  # MOPEQ_HOME: artifacts under home/artifacts/<job id>
    proc: Any  # svc_util.Proc

    @property
    def eval_file(self) -> str:
        return str(self.root / "eval.txt")

    def artifact_dir(self, job_id: str) -> Path:
        return self.home / "artifacts" / job_id

    def log_tail(self, n: int = 4000) -> str:
        return self.proc.text()[-n:]
