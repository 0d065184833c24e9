"""A lazy analysis session on an afpx cube.

Build a small cube from the COD files shipped with the tests, open it lazily,
slice it by element, structure and split without reading the fingerprints,
and reduce only what is needed::

    python examples/analysis_session.py [CUBE.zarr]

With a path, the script opens that cube instead (for example one built with
``afpx build-cube oqmd-icsd -o oqmd.zarr``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from afpx import schema
from afpx.cube import build_cube, open_cube, select_sites

if __name__ == "__main__":  # guard: Dask may start worker processes
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        cods = Path(__file__).resolve().parents[1] / "tests" / "data" / "cod"
        path = Path(tempfile.mkdtemp()) / "cod.zarr"
        build_cube([cods], path, deterministic=True, progress=False)

    cube = open_cube(path)  # per-site and per-structure variables in memory, `afp` lazy
    print(cube)

    # All oxygen sites: a boolean selection on in-memory coordinates; afp stays lazy.
    oxygen = select_sites(cube, element="O")
    print(f"\n{oxygen.sizes[schema.SITE]} O sites; afp is {type(oxygen[schema.AFP].data)}")

    # Mean fingerprint of the first perspective: only the O chunks are read.
    mean_rdf = oxygen[schema.AFP].isel({schema.PERSPECTIVE: 0}).mean(schema.SITE).compute()
    # Output bins count neighbours, so a partial sum is a coordination number.
    first_shell = int(1.2 / 6.0 * cube.sizes[schema.BIN])
    cn = float(np.sum(mean_rdf.values[:first_shell]))
    print(f"mean number of neighbours of O within 1.2 R0 (perspective 0): {cn:.1f}")

    # One structure, and the test split.
    first = cube[schema.STRUCTURE_ID].values[0]
    one = select_sites(cube, structure=str(first))
    print(
        f"\n{first}: {one.sizes[schema.SITE]} unique sites,"
        f" Z = {one[schema.Z].values.tolist()}, multiplicities "
        f"{one[schema.MULTIPLICITY].values.tolist()}"
    )
    test = select_sites(cube, split="test")
    print(f"test split: {test.sizes[schema.SITE]} sites")
