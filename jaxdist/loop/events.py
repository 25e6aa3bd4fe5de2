"""TensorBoard event files, written synchronously from the training thread.

tensorboardX's `SummaryWriter` writes through a background thread and flushes again at
exit; after a failed write (a full disk) both report it with tracebacks of their own, after
jaxdist's one line. This writer uses tensorboardX's event-file format and summary protos
(no TensorFlow) but writes each logged point and flushes it in the caller's thread, so a
failure is one `OSError` where the point is logged, and nothing is left to fail later.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar


class EventFile:
    """One new event file in `folder`, for scalars; `purge_step` hides later old points.

    TensorBoard drops the points that earlier files of the folder hold at `purge_step` or
    later (a crashed run's points after its last checkpoint), as `SummaryWriter` does.
    """

    def __init__(self, folder: Path, purge_step: int | None = None):
        Path(folder).mkdir(parents=True, exist_ok=True)
        # The name holds the start's second; the nanoseconds after it keep a file that a
        # resume starts within the same second from replacing the one before it.
        self._writer: EventsWriter | None = EventsWriter(
            str(Path(folder) / "events"), filename_suffix=f".{time.time_ns() % 10**9:09d}")
        if purge_step is not None:
            self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                           session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        """Write one scalar event per `{tag: value}` at `step`, and flush them to disk."""
        if self._writer is None:
            return
        now = time.time()
        for tag, value in values.items():
            self._writer.write_event(Event(wall_time=now, step=step,
                                           summary=scalar(tag, value)))
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the file (an error of the flush is raised)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def abandon(self) -> None:
        """Close the file after a failed write, without raising what it fails with again."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
