"""One job's data preparation, in a process of its own: ``python -m site_kernel._prepare_job`` (request on stdin).

Preparing a dataset reads the site's manifest, its raw file paths and the files' headers (patient names,
accession numbers in series folder names). Done inside the worker, all of that stayed in the heap of the
process that then ran the plan, where the plan could read it back from its own memory. Here it runs as the site,
in a process that never runs plan code and exits when done: it writes the harmonised arrays into the site's
cache (:mod:`site_kernel.data.cache`, which holds arrays and aggregate statistics only, under a hash for a name)
and tells the executor where they are. The worker is then handed that file and nothing else.

Request (JSON): ``{"site_dir", "contract", "site_steps"}``. Answer on stdout (JSON):
``{"arrays": PATH, "num_train": N, "num_test": N}``, or for a ``dims=3`` contract ``{"cases": FOLDER, ...}``
(the cache entry holding one memory-mappable ``.npy`` per case, which the worker reads lazily); on failure a
traceback on stderr (for the site's log) and exit status 1, and for the data layer's own errors also
``{"failure": {"fixed_by", "message"}}`` on stdout: their messages name datasets, contract keys and reasons, never
a file or a patient (:mod:`site_kernel.data.errors`), so the executor may tell the researcher what is wrong and whose
action fixes it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    request = json.load(sys.stdin)
    # The answer owns stdout: whatever a library prints while preparing (Python or C) goes to stderr instead.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # One thread, for torch too should harmonising import it. Only a cache miss harmonises: a study that finds its
    # data in the cache imports no torch (importing it to set its thread count cost each site about 1 s of CPU).
    os.environ["OMP_NUM_THREADS"] = "1"
    from .data import ContractError, DataError, cache, prepare
    from .data.prepare import PreparedVolumes

    site_dir = Path(request["site_dir"])
    try:
        prepared = prepare(site_dir, request["contract"], site_steps=request.get("site_steps") or [])
    except (DataError, ContractError) as error:
        with answer:
            json.dump({"failure": {"fixed_by": error.fixed_by, "message": str(error)}}, answer)
        raise
    entry = cache.entry_dir(site_dir, prepared.cache_key)
    counts = {"num_train": prepared.num_train, "num_test": prepared.num_test}
    if isinstance(prepared, PreparedVolumes):  # dims=3: the worker reads the cases from this folder, lazily
        with answer:
            json.dump({"cases": str(entry), **counts}, answer)
        return 0
    arrays = entry / "data.npz"
    if not arrays.is_file():
        raise FileNotFoundError("the prepared arrays are missing from the site's cache")
    with answer:
        json.dump({"arrays": str(arrays), **counts}, answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
