"""Stop strings on streamed text: the text up to the first stop string, never a piece of one.

A stop string can arrive split across deltas, so the end of the text that could still begin one is
held back until the next delta says whether it does."""
from __future__ import annotations


class StopMatcher:
    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """The text that is safe to emit now; sets .hit (and emits what precedes it) on a stop string."""
        if self.hit:
            return ""
        text = self.held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        # hold the longest end of `text` that is the start of a stop string
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[len(text) - k:])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of the text: what was held back (no stop string came)."""
        held, self.held = self.held, ""
        return "" if self.hit else held
