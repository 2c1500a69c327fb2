"""FLIP's shared core: what the researcher's lab, the hub and a hospital's site kernel must agree on.

- :mod:`~flip_common.sitedata`: the ``data`` a plan's ``train``/``evaluate`` receive, at a site and in the dry run.
"""
