"""FLIP's shared core: what the researcher's lab, the hub and a hospital's site kernel must agree on.

Both sides import this package and it imports neither: ``site_kernel`` (the hospital) and ``flip_lab`` (the researcher
and the hub) meet only here, so what a hospital must trust of the lab's code is exactly these modules.

- :mod:`~flip_common.protocol`: the records that cross the boundary (plan specs, run config and settings, site
  replies and error kinds, worker frames, job events) and their checking readers.
- :mod:`~flip_common.bundle`: the one strict reader of a study bundle, used by the hub and by every site.
- :mod:`~flip_common.planhash`: the hash a data owner approves.
- :mod:`~flip_common.contract`: data-contract validation, run by the lab at submit and by the site before data.
- :mod:`~flip_common.sitedata`: the ``data`` a plan's ``train``/``evaluate`` receive, at a site and in the dry run.
- :mod:`~flip_common.packing`: arrays on the wire (one safetensors blob per record).
- :mod:`~flip_common.secagg`: secure-aggregation arithmetic (fixed point, masks, keys) shared by hub and sites.
- :mod:`~flip_common.textsafe`: untrusted text made visible, never interpreted.
- :mod:`~flip_common.net`: ports, PIDs and the default hub address.
- :mod:`~flip_common.flower`: the one patch of Flower both sides apply.
- :mod:`~flip_common.errors`: the root of every error FLIP raises on purpose.
"""
