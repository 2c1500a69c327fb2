"""The data owner's review shows what runs: hidden characters are visible, CRLF plans are shown and
approved as hashed, run settings are recorded and bounded, and a wiped audit log is caught.

What a person sees is asserted through a terminal emulator (pyte), not on the raw bytes printed.
"""

from __future__ import annotations

import argparse

import pyte
import pytest

from site_kernel.approvals import ApprovalStore, plan_hash
from site_kernel.governance_cli import add_governance_commands
from site_kernel.policy import write_default_policy
from site_kernel.textsafe import visible

CONTRACT = {"modality": "MR", "dims": 2, "size": [8, 8], "spacing": [1.0, 1.0]}
SHAPES = {"fc.weight": [2, 64], "fc.bias": [2]}
# A line that copies pixels into the model, then erases itself and prints an innocent copy.
FORGED = (
    "def train(model, data, config):\n"
    "    model.fc.bias.data[:] = data.images[0, 0, 0, :2]\x1b[2K\x1b[1G    opt.step()\n"
    "    return {}\n"
)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_governance_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def screen_of(text: str, columns: int = 200, lines: int = 60) -> list[str]:
    """What a terminal shows after printing ``text``: the rows of a pyte screen, right-trimmed."""
    screen = pyte.Screen(columns, lines)
    screen.set_mode(pyte.modes.LNM)  # "\n" returns to column 0, as a tty's output translation does
    pyte.Stream(screen).feed(text)
    return [row.rstrip() for row in screen.display]


def submit(site, source, meta=None, shapes=SHAPES):
    digest = plan_hash(source, CONTRACT, shapes)
    ApprovalStore(site).submit(digest, source, CONTRACT, shapes, meta or {"name": "demo"})
    return digest


def test_an_escape_sequence_cannot_hide_a_plan_line(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, FORGED)
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    seen = "\n".join(screen_of(capsys.readouterr().out))
    assert "data.images[0, 0, 0, :2]" in seen
    assert "\\x1b[2K\\x1b[1G" in seen
    assert "WARNING" in seen and "hidden or terminal-control characters" in seen


def test_a_plan_name_cannot_erase_its_own_row(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "x = 1\n", meta={"name": "ok\x1b[2K\x1b[1A\x1b[2K\rno plans"})
    assert cli("plans", "list", "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    row = next(r for r in rows if r.startswith(digest[:12]))
    assert "pending" in row and "! " in row and "\\x1b[2K" in row
    assert not any(r.strip() == "no plans" for r in rows)


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\u200f", "\u061c", "\u200b", "\u2028"])
def test_bidi_and_invisible_characters_are_shown_and_flagged(tmp_path, capsys, char):
    write_default_policy(tmp_path, demo=False)
    source = f'access = "user{char} # admin"\n'
    digest = submit(tmp_path, source)
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    seen = "\n".join(screen_of(capsys.readouterr().out))
    assert f"<U+{ord(char):04X}>" in seen and "WARNING" in seen


def test_metric_and_model_names_are_shown_visibly(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "x = 1\n", shapes={"fc\x1b[8m.weight": [2]})
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    seen = "\n".join(screen_of(capsys.readouterr().out))
    assert "fc\\x1b[8m.weight (2,)" in seen and "WARNING" in seen


def test_a_crlf_plan_is_shown_and_approved_as_hashed(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    source = "import torch\r\nx = 1\r\n"
    digest = submit(tmp_path, source)
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    assert "   1 | import torch\\r" in rows and "   2 | x = 1\\r" in rows
    assert cli("plans", "approve", digest[:8], "--by", "owner", "--site", str(tmp_path)) == 0
    assert ApprovalStore(tmp_path).state(digest) == "approved"


def test_a_lone_carriage_return_is_not_a_hidden_line(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "steal()\r# harmless comment\n")
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    assert "   1 | steal()\\r# harmless comment" in rows


@pytest.mark.parametrize(
    ("raw", "multiline", "expected", "changed"),
    [
        ("plain text", False, "plain text", False),
        ("tab\there", True, "tab\there", False),
        ("tab\there", False, "tab\\there", True),
        ("a\nb", False, "a\\nb", True),
        ("\x07\x7f\x85\x9b", False, "\\x07\\x7f\\x85\\x9b", True),
        ("\u00ad\ufeff\u2029", False, "<U+00AD><U+FEFF><U+2029>", True),
        ("lone \ud800", False, "lone <U+D800>", True),
        ("accents é and 中文 stay", False, "accents é and 中文 stay", False),
    ],
)
def test_visible_escapes_exactly_the_hidden_characters(raw, multiline, expected, changed):
    assert visible(raw, multiline=multiline) == (expected, changed)
