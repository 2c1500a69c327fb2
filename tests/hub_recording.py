"""A hub that also writes down every array it receives from a site, for tests to assert on what the hub saw.

The production hub has no such switch. A test starts its local federation's runner with this file in place of
``flip_lab.hub.runner`` (by setting ``flip_lab.local.RUNNER`` to ``(this file, FOLDER, "runner")``); that runner starts
each study with this file in place of ``flip_lab.hub.study``, and the study wraps ``StreamingGrid.send_and_receive`` so
that every reply it hands on is saved first, as ``FOLDER/RUN/round-R/PHASE/SITE/KEY.safetensors``:

    python tests/hub_recording.py FOLDER runner ARGS...   # flip_lab.hub.runner's arguments
    python -I tests/hub_recording.py FOLDER study ARGS...  # flip_lab.hub.study's arguments
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).resolve()


def _record_replies(folder: Path) -> None:
    from flip_lab.hub.grid import StreamingGrid

    send_and_receive = StreamingGrid.send_and_receive

    def recorded(self, messages, *, timeout=None):
        messages = list(messages)
        replies = send_and_receive(self, messages, timeout=timeout)
        if not messages:
            return replies
        phase = messages[0].metadata.message_type
        round_ = int(messages[0].content.config_records["config"].get("server-round", 0))
        for reply in replies:
            if reply.has_error():
                continue
            out = (
                folder / str(self._grid.run.run_id) / f"round-{round_}" / phase / self.name(reply.metadata.src_node_id)
            )
            out.mkdir(parents=True, exist_ok=True)
            for key, record in reply.content.array_records.items():
                arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in record.items()}
                save_file(arrays, str(out / f"{key}.safetensors"))
        return replies

    StreamingGrid.send_and_receive = recorded


def main() -> None:
    folder, role, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if role == "runner":
        from flip_lab.hub import runner

        runner.STUDY = (str(HERE), str(folder), "study")
        runner.main(argv)
    else:
        from flip_lab.hub import study

        _record_replies(folder)
        study.main(argv)


if __name__ == "__main__":
    main()
