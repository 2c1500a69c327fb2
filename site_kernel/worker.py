"""The sandboxed worker: the only process that runs researcher code.

Started by the site executor (``python -m site_kernel.worker IN_FD OUT_FD``), it imports torch while still trusted,
waits for a ``load`` frame, reads the harmonised arrays the site prepared for its job, confines itself (no network,
read-only data, writes to scratch only, resource limits, unprivileged user; see ``site_kernel.sandbox``), and only
then executes the plan. It then serves ``train``/``evaluate`` frames for the rest of the job. Everything it sends
back is untrusted by the executor; its stdout/stderr are a pipe that the executor copies into the site's log,
never to the hub.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from flip_common.sitedata import SiteData, VolumeData, open_volumes

from . import _pipe

__all__ = ["SiteData", "VolumeData", "Worker", "main"]


def _failure(role: str, exc: BaseException) -> dict[str, Any]:
    """What the trusted side may describe of a failure: names and a line number, never the exception's text.

    The full traceback goes to this process's stderr, which is the site's own log: the data owner can read it,
    nothing sends it anywhere.
    """
    import traceback

    from .egress import failure_fields

    traceback.print_exc(file=sys.stderr)
    return {"ok": False, "kind": "plan_error", "role": role, "fields": failure_fields(exc)}


class Worker:
    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd_in, self.fd_out = fd_in, fd_out
        self.ns: dict[str, Any] = {}
        self.model: Any = None
        self.data: SiteData | VolumeData | None = None
        self.device = "cpu"

    def load_data(self, header: dict[str, Any]) -> dict[str, Any]:
        """Read the harmonised arrays the site prepared for this job (``header["arrays"]``, an ``.npz`` in the
        site's cache). Trusted code, before the sandbox and the plan exist. The site prepared them in a process
        of its own (:mod:`site_kernel._prepare_job`): this process never reads a manifest, a raw file or its
        path, so the plan finds none of them in its memory.

        A ``dims=3`` job gets ``header["cases"]`` instead, a cache entry of one ``.npy`` per case: only its index
        is read here; the cases are read one at a time when the plan indexes ``data.train`` / ``data.test``,
        after confinement, from that folder alone (the sandbox grants it read-only)."""
        if header.get("cases"):
            self.data = open_volumes(Path(header["cases"]))
            return {"ok": True}
        import torch

        with np.load(header["arrays"], allow_pickle=False) as arrays:
            self.data = SiteData(
                torch.from_numpy(np.ascontiguousarray(arrays["train_x"], np.float32)),
                torch.from_numpy(np.ascontiguousarray(arrays["train_y"], np.int64)),
                torch.from_numpy(np.ascontiguousarray(arrays["test_x"], np.float32)),
                torch.from_numpy(np.ascontiguousarray(arrays["test_y"], np.int64)),
            )
        return {"ok": True}

    def load(self, header: dict[str, Any]) -> dict[str, Any]:
        import torch

        devices = [str(d) for d in header.get("devices", [])]
        if devices:  # the plan sees its granted GPU as cuda:0, numbered as the site's policy numbers it
            os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(d.split(":", 1)[1] for d in devices)
        report = self._confine(header)
        if report.get("refused"):
            return {"ok": False, "kind": "sandbox_unavailable", "missing": report.get("missing", [])}
        # Threads only after confine(): namespaces and Landlock bind the calling thread and those it starts.
        torch.set_num_threads(int(header.get("threads", 1)))
        self.device, note = _device(devices)
        print(f"flip: plans run on {self.device}: {note}", file=sys.stderr, flush=True)
        if self.data is not None:
            self.data.device = self.device
        module = types.ModuleType("flip_plan")
        module.__file__ = "plan.py"
        try:
            exec(compile(header["source"], "plan.py", "exec"), module.__dict__)
            self.ns = module.__dict__
            torch.manual_seed(int(header.get("seed", 0)))
            self.model = self.ns["model"]()
        except Exception as exc:  # researcher code: report kind and line only
            return _failure("model", exc)
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        return {"ok": True, "confinement": report, "model_shapes": shapes, "device": self.device, "device_note": note}

    def _confine(self, header: dict[str, Any]) -> dict[str, Any]:
        if not header.get("confine", True):
            return {"applied": [], "note": "sandbox disabled by the site's policy"}
        import dataclasses

        from . import sandbox
        from .errors import SandboxError
        from .policy import Limits

        try:
            report = sandbox.confine(
                scratch=Path(header["scratch"]),
                readable=[Path(p) for p in header["readable"]],
                limits=Limits(**header["limits"]),
                uid=int(header.get("uid", 65534)),
                accept_weaker_isolation=bool(header.get("accept_weaker", False)),
                protected=[Path(p) for p in header.get("protected", [])],
                devices=[str(d) for d in header.get("devices", [])],
            )
        except SandboxError as exc:  # unavailable, or a mechanism failed part way: run nothing
            return {"refused": True, "missing": list(getattr(exc, "missing", []))}
        return dataclasses.asdict(report)

    def step(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        import torch
        from safetensors.torch import load, save

        op = header["op"]
        function = "train" if op == "train" else "evaluate"
        config = {**header.get("config", {}), "device": self.device}
        try:
            self.model.load_state_dict(load(payload), strict=True)
        except Exception as exc:
            _failure(function, exc)
            return {"ok": False, "kind": "model_mismatch", "role": function}, b""
        if op == "train" and float(config.get("proximal_mu", 0.0)) > 0:
            config["global_params"] = [p.detach().clone() for p in self.model.parameters()]
        seed = int(config.get("seed", 0)) * 100_003 + int(config.get("server-round", 0))
        torch.manual_seed(seed)
        try:
            metrics = self.ns[function](self.model, self.data, config)
        except Exception as exc:
            return _failure(function, exc), b""
        if not isinstance(metrics, dict):
            return {"ok": False, "kind": "plan_error", "role": function, "not_a_dict": True}, b""
        clean: dict[str, Any] = {}
        for key, value in list(metrics.items())[:256]:
            try:
                clean[str(key)[:100]] = float(value)
            except (TypeError, ValueError):
                clean[str(key)[:100]] = None  # the executor's egress check names and refuses it
        reply = {"ok": True, "metrics": clean}  # timings are the executor's to measure, not the plan's
        if op == "train":
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            return reply, save(state)
        return reply, b""

    def serve(self) -> None:
        header, _ = _pipe.recv(self.fd_in)
        try:
            _pipe.send(self.fd_out, self.load_data(header))
        except Exception:  # the site's own data trouble: details in the site log, a plain refusal on the pipe
            import traceback

            traceback.print_exc(file=sys.stderr)
            _pipe.send(self.fd_out, {"ok": False, "kind": "data_error"})
            return
        result = self.load(header)
        _pipe.send(self.fd_out, result)
        if not result["ok"]:
            return
        while True:
            try:
                header, payload = _pipe.recv(self.fd_in)
            except _pipe.PipeClosed:
                return
            if header.get("op") == "exit":
                return
            reply, out = self.step(header, payload)
            _pipe.send(self.fd_out, reply, out)


def _device(devices: list[str]) -> tuple[str, str]:
    """The device the plan gets, and why: after confinement, so that CUDA starts its threads inside it."""
    if not devices:
        return "cpu", "the site's policy grants no GPU ([resources] devices is empty)"
    import torch

    if not torch.cuda.is_available():
        return "cpu", f"the site's policy grants {devices[0]} but this machine has no usable GPU there"
    return "cuda:0", f"the site's policy grants {devices[0]} (seen by the plan as cuda:0)"


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    fd_in, fd_out = int(args[0]), int(args[1])
    # Import heavy, trusted libraries before any researcher code exists, so the sandbox can forbid reading them
    # again later and so the job's first round does not pay for the import.
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    # The sandbox forbids reading the site kernel's files later. Not site_kernel.data: this process never
    # prepares data, so it has no use for the code that reads manifests and raw files.
    from . import egress, sandbox  # noqa: F401

    Worker(fd_in, fd_out).serve()


if __name__ == "__main__":
    main()
