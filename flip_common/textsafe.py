"""Untrusted text made safe to print on a terminal: every character that could hide or move what a
person reads is shown as a visible escape instead.

A data owner approves what ``flip-site plans show`` prints, so that must be what runs: a plan line
ending in ``ESC[2K ESC[1G`` would erase itself and show an innocent copy in its place, a bidi
control (Trojan Source) reorders what is shown, and zero-width characters hide differences. This
module lives in ``site_kernel`` (which never imports ``flip_lab``) so that both the site and the
lab render through the one function.

Example::

    text, changed = visible("opt.step()\\x1b[2K")    # -> ("opt.step()\\\\x1b[2K", True)
    text, changed = visible("a\\r\\nb", multiline=True)  # -> ("a\\\\r\\nb", True)
"""

from __future__ import annotations

import unicodedata

# Categories that print nothing or act on the terminal: controls (Cc, C0/C1 and DEL), format
# characters (Cf: bidi controls, zero-width joiners, soft hyphen, U+061C ...), line and paragraph
# separators (Zl, Zp), lone surrogates (Cs), private use (Co) and unassigned code points (Cn).
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_SHORT = {"\x1b": "\\x1b", "\r": "\\r", "\t": "\\t", "\n": "\\n"}


def visible(text: str, *, multiline: bool = False) -> tuple[str, bool]:
    """``text`` with every hidden or terminal-controlling character shown as an escape, and whether
    anything was replaced.

    C0/C1 controls and DEL become ``\\xNN``; other invisible characters become ``<U+XXXX>``.
    With ``multiline``, newline and tab stay as they are (source text); a carriage return is always
    shown, so a CRLF line reads ``...\\r``. Backslashes are left alone: the escapes are for a
    person to read, not to be parsed back (the warning that comes with them says so).
    """
    out: list[str] = []
    changed = False
    for ch in text:
        if multiline and ch in "\n\t":
            out.append(ch)
            continue
        category = unicodedata.category(ch)
        if category not in _HIDDEN:
            out.append(ch)
            continue
        changed = True
        code = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif category == "Cc":
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"<U+{code:04X}>")
    return "".join(out), changed


def shown(text: object) -> str:
    """:func:`visible` of ``str(text)`` on one line, for names, metric names and audit fields."""
    return visible(str(text))[0]


def flagged(*texts: str, multiline: bool = False) -> bool:
    """Whether any of ``texts`` holds a character that :func:`visible` would replace."""
    return any(visible(t, multiline=multiline)[1] for t in texts)
