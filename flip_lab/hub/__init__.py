"""The hub: FLIP Lab's ServerApp, its streaming grid, strategies and update screening."""
