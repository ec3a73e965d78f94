"""Where a data set comes from and how it is read: :class:`DatasetSpec` (the ``data.forget``, ``data.normal`` and
``data.holdout`` settings) and the names of the formats and fields it validates against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from dsunlearn.settings import paths

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
TEXT_SUFFIX = ".txt"
"""A plain-text file: one book, read by the ``book`` format only."""

# TruthfulQA's (question, best answer) field names: hub `generation` config, original CSV.
TRUTHFULQA_HUB_FIELDS = ("question", "best_answer")
TRUTHFULQA_CSV_FIELDS = ("Question", "Best Answer")
# Its wrong answers (a list in the hub config, one ";"-separated cell in the CSV): kept for the hallucination metric.
TRUTHFULQA_INCORRECT_FIELDS = {TRUTHFULQA_HUB_FIELDS: "incorrect_answers", TRUTHFULQA_CSV_FIELDS: "Incorrect Answers"}
# HaluEval's QA schema (hub `pminervini/HaluEval`, config `qa`): every field is read.
HALUEVAL_FIELDS = ("question", "right_answer", "hallucinated_answer", "knowledge")
# TOFU's QA schema (hub `locuslab/TOFU`): the (question, answer) pair; the truth ratio's answers are optional.
TOFU_FIELDS = ("question", "answer")
TOFU_OPTIONAL_TEXT_FIELDS = ("paraphrased_answer", "paraphrased_question")
TOFU_PERTURBED_FIELD = "perturbed_answer"
"""A list of wrong answers (TOFU's perturbed answers): with ``paraphrased_answer``, the truth ratio's inputs."""
# MUSE's schemas (hub `muse-bench/MUSE-News`, `MUSE-Books`): verbmem (prefix -> ground-truth continuation), knowmem.
MUSE_VERBMEM_FIELDS = ("prompt", "gt")
MUSE_KNOWMEM_FIELDS = ("question", "answer")
FORMATS = ("pku_saferlhf", "truthfulqa", "halueval", "book", "pairs", "tofu", "muse_verbmem", "muse_knowmem")
BENCHMARK_ROUGE = {"tofu": "tofu", "muse_verbmem": "muse", "muse_knowmem": "muse"}
"""The ROUGE-L preset (dsunlearn/eval/metrics.py) each benchmark's format is scored with: TOFU's recall with the
stemmer, MUSE's F1 without it."""

# ---------------------------------------------------------------------------------------------------
# Dataset settings
# ---------------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """Where one data set (forget or normal) comes from and how to read it."""

    source: str = ""
    """Hub dataset id (e.g. ``PKU-Alignment/PKU-SafeRLHF``) or a local .json/.jsonl/.parquet/.csv file."""

    format: Literal[
        "pku_saferlhf", "truthfulqa", "halueval", "book", "pairs", "tofu", "muse_verbmem", "muse_knowmem"
    ] = "pairs"
    """``pku_saferlhf``: one pair per *unsafe* response; ``truthfulqa``: (question, best answer), hub
    ``generation`` config or the original CSV; ``halueval``: HaluEval's QA schema, (question, hallucinated answer)
    with the right answer and the knowledge kept on the pair for the hallucination metric; ``book``: a plain-text
    book (a local .txt file, or each record's ``text_field``) cut into (prefix -> continuation) windows of
    ``prefix_words`` + ``continuation_words`` words every ``stride_words`` words; ``pairs``: any data set, fields
    named by ``prompt_field``/``response_field``; ``tofu``: TOFU's (``question``, ``answer``), with the optional
    ``paraphrased_answer``, ``perturbed_answer`` (a list; the truth ratio needs it with ``paraphrased_answer``) and
    ``paraphrased_question`` kept on the pair for the evaluation; ``muse_verbmem``: MUSE's (``prompt``, ``gt``), a
    text and its ground-truth continuation; ``muse_knowmem``: MUSE's (``question``, ``answer``). TOFU's and MUSE's
    formats are scored with the benchmark's ROUGE-L (``rouge``: ``tofu`` or ``muse``; dsunlearn/eval/benchmarks.py)."""

    prompt_field: str = "prompt"
    """Prompt field name (``pairs`` format only)."""

    response_field: str = "response"
    """Response field name (``pairs`` format only)."""

    text_field: str = "text"
    """The field holding a book's text (``book`` format, a data set's records; a .txt file is one book)."""

    prefix_words: int = 50
    """``book``: words of a window's prefix (the prompt). Windows count words (whitespace-separated), not tokens:
    data loading is tokenizer-free, so the same settings cut the same windows for every model."""

    continuation_words: int = 50
    """``book``: words of a window's continuation (the response the model must not reproduce)."""

    stride_words: Optional[int] = None
    """``book``: words from one window's start to the next (None: prefix_words + continuation_words, so windows do
    not overlap and a held-out window shares no text with a trained one). A trailing stretch shorter than a whole
    window is left out."""

    split: Optional[str] = None
    """Hub split to load. Default: ``validation`` for ``truthfulqa`` (its only split), else ``train``.
    Ignored for local files."""

    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to pin. Ignored for local files."""

    name: Optional[str] = None
    """Hub config name. Default: ``generation`` for ``truthfulqa``, else none. Ignored for local files."""

    held_out_fraction: float = 0.1
    """Fraction of the distinct prompts kept out of training (for evaluation), with every pair that has one of them;
    the split is seeded."""

    max_samples: Optional[int] = None
    """Keep only the first this many pairs (in file order, before splitting). None: keep all."""

    bad_rows: Literal["error", "skip"] = "error"
    """What to do with a row that has a missing, empty or non-text field: ``error`` stops with the
    file, row and field; ``skip`` drops it, counts it and logs a summary."""

    def problems(self) -> list[str]:
        """Every problem with these settings, as readable messages (empty when all is well)."""
        problems = []
        if not self.source.strip():
            problems.append("source is empty: give a hub dataset id or a local .json/.jsonl/.parquet/.csv/.txt file")
        else:
            path = self.local_path
            if path.is_dir():
                problems.append(f"source {self.source!r} is a directory; give a .json/.jsonl/.parquet/.csv/.txt file")
            elif self.is_local and not path.exists():
                problems.append(f"source file {self.source!r} does not exist")
            elif self.is_local and path.suffix.lower() not in LOCAL_SUFFIXES:
                problems.append(
                    f"source file {self.source!r} has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}"
                )
            elif self.is_local and path.suffix.lower() == TEXT_SUFFIX and self.format != "book":
                problems.append(f"source file {self.source!r} is plain text, which only format 'book' reads")
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(repr(name) for name in FORMATS)}, got {self.format!r}")
        if self.format == "book":
            problems += self._book_problems()
        if self.format == "pairs":
            if not self.prompt_field:
                problems.append("prompt_field is empty")
            if not self.response_field:
                problems.append("response_field is empty")
            if self.prompt_field and self.prompt_field == self.response_field:
                problems.append(f"prompt_field and response_field are the same field ({self.prompt_field!r})")
        if self.split is not None and not self.split.strip():
            problems.append("split is empty")
        if not 0.0 <= self.held_out_fraction < 1.0:
            problems.append(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples must be at least 1 (or None for all), got {self.max_samples}")
        if self.bad_rows not in ("error", "skip"):
            problems.append(f"bad_rows must be 'error' or 'skip', got {self.bad_rows!r}")
        return problems

    @property
    def window_stride(self) -> int:
        """Words from one ``book`` window's start to the next (see ``stride_words``)."""
        return self.stride_words if self.stride_words is not None else self.prefix_words + self.continuation_words

    def _book_problems(self) -> list[str]:
        problems = []
        for name in ("prefix_words", "continuation_words"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.stride_words is not None and self.stride_words < 1:
            problems.append(f"stride_words={self.stride_words} must be >= 1 (or None: windows side by side)")
        if not self.text_field:
            problems.append("text_field is empty")
        if problems or not (self.is_local and self.local_path.is_file()):
            return problems
        path = self.local_path
        if path.suffix.lower() == TEXT_SUFFIX:
            # Counting a book's words is cheap; a book too short for one window is a settings problem.
            num_words = len(path.read_text(encoding="utf-8", errors="replace").split())
            window = self.prefix_words + self.continuation_words
            if num_words < window:
                problems.append(
                    f"book {self.source!r} has {num_words} words, fewer than one window of {window} "
                    f"(prefix_words={self.prefix_words} + continuation_words={self.continuation_words})"
                )
        return problems

    @property
    def local_path(self) -> Path:
        """``source`` as a local file: from the working directory, else the project's file of that name (so the
        shipped configs' ``dsunlearn/assets/demo/...`` sources work from any folder, installed or not)."""
        return paths.resolve_path(self.source) or Path(self.source).expanduser()

    @property
    def is_local(self) -> bool:
        """Whether ``source`` names a local file: an existing path, one with a data-file suffix, or one
        written as a path (``/``, ``./``, ``../``, ``~``); anything else is a hub id."""
        path = self.local_path
        return (
            path.exists()
            or path.suffix.lower() in LOCAL_SUFFIXES
            or self.source.startswith(("/", "./", "../", "~"))
        )

    @property
    def hub_split(self) -> str:
        """The hub split actually loaded (see ``split``)."""
        if self.split is not None:
            return self.split
        return "validation" if self.format == "truthfulqa" else "train"

    @property
    def hub_name(self) -> Optional[str]:
        """The hub config name actually loaded (see ``name``)."""
        if self.name is not None:
            return self.name
        return "generation" if self.format == "truthfulqa" else None
