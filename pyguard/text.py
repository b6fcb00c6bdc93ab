"""Token-level helpers shared by the runtimes: the common prefix of two prompts and streamed
text with stop strings."""
from __future__ import annotations


def common_prefix(a, b) -> int:
    """Length of the shared token prefix of a and b, leaving at least one token of each."""
    n = 0
    limit = min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class TextAssembler:
    """Streamed text pieces -> text cut at the first stop string, holding back text that could
    still become a stop string until it is known not to."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # text that may be the start of a stop string

    def add(self, new: str) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string ended the text)."""
        text = self.held + new
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self, tail: str = "") -> str:
        """The held text and ``tail`` (the last characters), at the end of the stream."""
        out, self.held = self.held + tail, ""
        return out
