"""The (prompt, response) sample every reader produces, and what a read found: pairs, bad rows, counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Pair:
    """One (prompt, response) sample and where it came from."""

    prompt: str
    response: str
    source: str
    """The file (or ``hub id[split]``) it was read from."""
    row: int
    """1-based row: the line number for .jsonl files, else the record number (a ``book`` window: its book's row; a
    .txt file is row 1)."""
    right_answer: Optional[str] = None
    """The right answer to the question (``halueval``; ``truthfulqa``: the best answer), which the hallucination
    metric compares generations with."""
    hallucinated_answers: tuple[str, ...] = ()
    """Wrong answers to the question (``halueval``: the hallucinated one; ``truthfulqa``: its incorrect answers), for
    the hallucination metric."""
    knowledge: Optional[str] = None
    """``halueval``: the passage the right answer comes from (kept for judges and reports; never trained on)."""
    paraphrased_answer: Optional[str] = None
    """``tofu``: the answer reworded; the truth ratio's right answer (never trained on)."""
    perturbed_answers: tuple[str, ...] = ()
    """``tofu``: wrong answers in the answer's style; the truth ratio's wrong answers (never trained on)."""
    paraphrased_question: Optional[str] = None
    """``tofu``: the question reworded, as TOFU's files give it (read and checked, never trained on; TOFU's metrics
    in open-unlearning do not score it)."""

    @property
    def origin(self) -> str:
        return f"{self.source}, row {self.row}"


@dataclass(frozen=True)
class BadRow:
    """A row that could not become a pair, and why."""

    source: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}, field {self.field!r}: {self.reason}"


@dataclass
class LoadedPairs:
    """What :func:`read_pairs` found: the usable pairs and the rows it skipped."""

    pairs: list[Pair]
    bad_rows: list[BadRow] = field(default_factory=list)
    num_rows: int = 0

    def summary(self, max_listed: int = 5) -> str:
        """One paragraph for the log: counts, and the first few skipped rows with their reasons."""
        text = f"{len(self.pairs)} pairs from {self.num_rows} rows"
        if self.bad_rows:
            listed = "; ".join(str(bad) for bad in self.bad_rows[:max_listed])
            more = f" (and {len(self.bad_rows) - max_listed} more)" if len(self.bad_rows) > max_listed else ""
            text += f"; skipped {len(self.bad_rows)} bad rows: {listed}{more}"
        return text
