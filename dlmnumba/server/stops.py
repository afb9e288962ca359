"""Stop strings on streamed text: emit what is safe, hold back what may start a stop string."""
from __future__ import annotations


class StopMatcher:
    """Feed text as it is decoded; `push` returns (text safe to emit, whether a stop string was
    reached).  Text that could be the start of a stop string is held until it can't be."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return buf[:cut], True
        keep = 0  # longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-n:]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self, text: str = "") -> str:
        """The rest, at the end of generation (held text that never became a stop string)."""
        out, hit = self.push(text)
        if hit:
            return out
        out, self._held = out + self._held, ""
        return out
