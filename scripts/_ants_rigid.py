"""ANTs rigid registration helper for ``scripts/benchmark_registration.py``, run with the Python of a separate
environment that has antspyx (it pins numpy and must stay out of the main environment)::

    .venv-ants/bin/python scripts/_ants_rigid.py FIXED MOVING OUT.json [--threads 2] [--seed 0]

Writes ``{"fixed_to_moving": 4x4, "wall_time_s": ..., "transform_file_type": ...}``: the 4x4 matrix maps **fixed**
physical points (LPS mm) to **moving** physical points, the project's convention. ANTs' forward transform
(``fwdtransforms[0]``, what ``apply_transforms(fixed, moving, fwdtransforms)`` uses to pull the moving image onto
the fixed grid) is an ITK transform in LPS with exactly that direction (``moving = T(fixed)``); the matrix is read
by mapping the origin and the unit vectors with it (exact for an affine map, whatever its parametrisation and
centre). Wall time covers ``ants.registration`` only (not the interpreter start, imports or reading).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("output")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--type_of_transform", default="Rigid")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import ants
    import numpy as np

    fixed = ants.image_read(args.fixed, pixeltype="float")
    moving = ants.image_read(args.moving, pixeltype="float")
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=args.type_of_transform, random_seed=args.seed)
    wall = time.perf_counter() - t0
    transform = ants.read_transform(reg["fwdtransforms"][0])
    origin = np.array(transform.apply_to_point((0.0, 0.0, 0.0)), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, 3] = origin
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        matrix[:3, i] = np.array(transform.apply_to_point(tuple(e)), dtype=np.float64) - origin
    out = {
        "fixed_to_moving": matrix.tolist(),
        "convention": "4x4, fixed LPS mm -> moving LPS mm (ITK/ANTs forward transform)",
        "wall_time_s": wall,
        "transform_file_type": transform.transform_type,
        "ants_version": getattr(ants, "__version__", "?"),
    }
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
