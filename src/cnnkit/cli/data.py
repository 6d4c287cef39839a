"""`cnnkit data`: write data sets.

    cnnkit data scenes OUT [--images N] [--val-images M] [--size S] [--seed K]

writes the synthetic digit scenes (:mod:`cnnkit.data.scenes`) in the COCO layout: the default
detection data, which the detection commands otherwise generate into a cache on first use.
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    from cnnkit.data.scenes import (
        DEFAULT_IMAGES,
        DEFAULT_SIZE,
        DEFAULT_VAL_IMAGES,
        MAX_IMAGES,
        MAX_SIZE,
        MIN_SIZE,
    )

    p = sub.add_parser("data", help="write data sets (synthetic digit scenes)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    s = kinds.add_parser(
        "scenes",
        help="synthetic digit scenes in the COCO layout (boxes, masks, 4 keypoints per digit)",
        description="Write OUT/annotations/instances_{train,val}.json and OUT/{train,val}/*.png.",
    )
    s.add_argument("out", metavar="OUT", help="directory to create (must not exist or be empty)")
    s.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        help=f"training scenes, at most {MAX_IMAGES:,} ({DEFAULT_IMAGES})",
    )
    s.add_argument(
        "--val-images",
        type=int,
        default=DEFAULT_VAL_IMAGES,
        help=f"val scenes, at most {MAX_IMAGES:,} ({DEFAULT_VAL_IMAGES})",
    )
    s.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"image side in pixels, {MIN_SIZE}..{MAX_SIZE} ({DEFAULT_SIZE})",
    )
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (0)")
    s.set_defaults(func=run_scenes)


def run_scenes(args: argparse.Namespace) -> int:
    from cnnkit.data.scenes import generate_scenes

    start = time.perf_counter()
    out = generate_scenes(
        args.out, images=args.images, val_images=args.val_images, size=args.size, seed=args.seed
    )
    print(
        f"wrote {out}: {args.images:,} train + {args.val_images:,} val scenes of "
        f"{args.size}x{args.size} px (seed {args.seed}) in {time.perf_counter() - start:.1f} s"
    )
    return 0
