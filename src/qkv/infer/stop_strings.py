"""Stop strings in a growing text, at a cost linear in the stop strings' length per step.

Each step the engine asks two things about a sequence's text: does a stop string occur in
what was not sent yet (then the text ends there), and how long a tail must be held back
because it could still grow into a stop string. Both look only at the text's end: a match
cannot start inside text already sent (that text was only sent once no stop could begin
in it), and the held tail is at most len(stop) - 1 characters. The tail check runs the
Knuth-Morris-Pratt automaton of each stop over that tail, so it costs O(len(stop)) per
stop and step, not O(len(stop)^2) as comparing every candidate suffix does.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.max_len = max((len(s) for s in self.stops), default=0)
        self._failure = [_failure(s) for s in self.stops]

    def __bool__(self) -> bool:
        return bool(self.stops)

    def first_hit(self, text: str, sent: int) -> int | None:
        """Where the earliest stop string starts in `text`, given that text[:sent] is out."""
        start = max(0, sent - self.max_len)
        hits = [k for k in (text.find(s, start) for s in self.stops) if k >= 0]
        return min(hits) if hits else None

    def held(self, text: str, end: int) -> int:
        """How many characters before `end` could be the start of a stop string."""
        hold = 0
        for stop, fail in zip(self.stops, self._failure):
            q = 0  # length of the longest prefix of `stop` that ends here
            for c in text[max(0, end - len(stop) + 1) : end]:
                while q and stop[q] != c:
                    q = fail[q - 1]
                if stop[q] == c:
                    q += 1
            hold = max(hold, q)
        return hold


def _failure(s: str) -> list[int]:
    """KMP failure table: f[i] = length of the longest proper prefix of s[:i+1] that is
    also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f
