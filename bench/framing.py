"""Framing cost against what is already buffered: feeds an upstream answer in 64 KiB chunks to a
paused ``ResponseReader`` (a hook at work: everything queues), then resumes it, for growing sizes.

Linear framing costs the same per megabyte whatever the size; a reader that joins its whole buffer
on every chunk costs more per megabyte the more is queued. Run: ``python bench/framing.py``
(``PYTHONPATH`` picks which popproxy is measured). Prints seconds and microseconds per MiB.
"""

from __future__ import annotations

import time

from popproxy.pop3.framing import ResponseReader

CHUNK = 65536


class Sink:
    def __init__(self) -> None:
        self.octets = 0

    def status_received(self, line: bytes) -> bool:
        return True

    def body_received(self, data: bytes) -> None:
        self.octets += len(data)

    def body_ended(self) -> None:
        pass

    def line_too_long(self) -> None:
        raise AssertionError("limits hit")


def run(mib: int) -> float:
    sink = Sink()
    reader = ResponseReader(sink)
    reader.feed(b"+OK %d octets\r\n" % (mib << 20))
    reader.pause()
    chunk = (b"x" * 78 + b"\r\n") * (CHUNK // 80) + b"y" * (CHUNK % 80 - 2) + b"\r\n"
    started = time.perf_counter()
    for _ in range((mib << 20) // len(chunk)):
        reader.feed(chunk)
    reader.feed(b".\r\n")
    reader.resume()
    return time.perf_counter() - started


def main() -> None:
    print(f"{'MiB queued':>10} {'seconds':>9} {'us per MiB':>11}")
    for mib in (1, 5, 10, 20, 40):
        seconds = run(mib)
        print(f"{mib:>10} {seconds:>9.3f} {seconds / mib * 1e6:>11.0f}")


if __name__ == "__main__":
    main()
