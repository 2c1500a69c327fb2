"""What both sides take from Flower's internals: the one patch they both apply, and how every such reliance fails.

Each side's other adaptations of Flower live in one module of its own (:mod:`flip_lab._flower` for the lab and hub,
:mod:`site_kernel._flower_runtime` for the site). Each checks, before it patches or reads a Flower internal, that
the internal is still what it was written against (:func:`expect`), and otherwise stops with :class:`FlowerChanged`
naming it: a Flower upgrade fails loudly in one known place per side, never as a patch that silently does nothing.
"""

from __future__ import annotations


class FlowerChanged(RuntimeError):
    """A Flower internal FLIP Lab relies on is no longer what it was written against (Flower 1.42)."""

    def __init__(self, internal: str, expected: str) -> None:
        import flwr

        super().__init__(
            f"Flower {getattr(flwr, '__version__', '?')} changed {internal}: FLIP Lab relies on {expected}. "
            "Install the Flower version pyproject.toml pins, or adapt FLIP Lab's Flower module of that side "
            "(flip_lab/_flower.py, site_kernel/_flower_runtime.py, flip_common/flower.py)"
        )
        self.internal = internal


def expect(holds: bool, internal: str, expected: str) -> None:
    """Raise :class:`FlowerChanged` naming ``internal`` unless ``holds``."""
    if not holds:
        raise FlowerChanged(internal, expected)


def fast_object_pulls(initial_backoff: float = 0.01, cap: float = 0.05) -> None:
    """Make Flower's object pulls retry within milliseconds instead of after 1 s, 2 s, 4 s...

    Sites and the hub's study processes alike call this.

    A message's objects are often pulled a moment before the peer has stored them; Flower then backs off starting
    at 1 s (``PULL_INITIAL_BACKOFF``), which alone cost about a second per message on loopback. The defaults are
    keyword-only arguments bound at definition time, hence ``__kwdefaults__``; setting one Flower no longer has
    would change nothing, so their names are checked first.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        expect(
            {"initial_backoff", "backoff_cap"} <= defaults.keys(),
            f"flwr.supercore.inflatable.inflatable_utils.{fn.__name__}",
            "its keyword-only arguments initial_backoff and backoff_cap",
        )
        defaults["initial_backoff"] = initial_backoff
        defaults["backoff_cap"] = cap
