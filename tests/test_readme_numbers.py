"""Every number in the experiments' READMEs matches the committed output it came from."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import check_numbers  # noqa: E402


def test_experiment_readmes_match_their_committed_outputs():
  errors = [e for r in check_numbers.READMES
            for e in check_numbers.check_readme(os.path.join(ROOT, r))]
  assert not errors, "\n".join(errors)


def test_the_check_catches_a_wrong_number_and_an_edited_table(tmp_path):
  (tmp_path / "out.md").write_text("| a | 0.9123 |\n")
  (tmp_path / "bench.json").write_text('{"speedup": 6.04}\n')
  good = ("<!-- sources: out.md bench.json -->\n<!-- begin out.md -->\n| a | 0.9123 |\n"
          "<!-- end out.md -->\nAccuracy 0.912 (91.2%), 6.0x faster.\n")
  (tmp_path / "README.md").write_text(good)
  assert check_numbers.check_readme(str(tmp_path / "README.md")) == []
  (tmp_path / "README.md").write_text(good.replace("6.0x", "6.3x"))
  [error] = check_numbers.check_readme(str(tmp_path / "README.md"))
  assert "6.3" in error
  (tmp_path / "README.md").write_text(good.replace("| a | 0.9123 |\n<", "| a | 0.9124 |\n<"))
  [error] = check_numbers.check_readme(str(tmp_path / "README.md"))
  assert "differs" in error
