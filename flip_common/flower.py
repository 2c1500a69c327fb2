"""The one patch of Flower that both sides apply: object pulls that retry within milliseconds.

Each side's other adaptations of Flower live in one module of its own (:mod:`flip_lab._flower` for the lab and hub,
:mod:`site_kernel._flower_runtime` for the site), so a Flower upgrade fails in one known place per side.
"""

from __future__ import annotations


def fast_object_pulls(initial_backoff: float = 0.01, cap: float = 0.05) -> None:
    """Make Flower's object pulls retry within milliseconds instead of after 1 s, 2 s, 4 s...

    Sites and the hub's study processes alike call this.

    A message's objects are often pulled a moment before the peer has stored them; Flower then backs off starting
    at 1 s (``PULL_INITIAL_BACKOFF``), which alone cost about a second per message on loopback. The defaults are
    keyword-only arguments bound at definition time, hence ``__kwdefaults__``.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__["initial_backoff"] = initial_backoff
        fn.__kwdefaults__["backoff_cap"] = cap
