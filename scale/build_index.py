"""A search index over the images of scale/caption_collection.py's shards.

    python -m scale.build_index OUT_DIR --out INDEX [--backend numpy] [--key path]

Streams the shards' image embeddings one shard at a time into a
similarity_search.SearchIndex (any of its backends) and saves it
(SearchIndex.save: INDEX.npy + INDEX.json). Load it with
`SearchIndex.load(INDEX, backend)`; its ids are the images' paths (or the
shards' ids, with --key id).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from errors import UserError

log = logging.getLogger("scale")


def build_index(out_dir: str | os.PathLike, backend: str = "numpy", key: str = "path"):
    """A SearchIndex of every image embedding in `out_dir`'s shards, keyed by `key`."""
    from scale import shards
    from similarity_search import SearchIndex

    if key not in ("path", "id"):
        raise UserError(f"--key must be path or id, got {key!r}")
    if not Path(out_dir).is_dir():
        raise UserError(f"no such folder {out_dir}")
    index = None
    for path, table in shards.iter_shards(out_dir, columns=[key, "image_embedding"]):
        vectors = shards.matrix(table.column("image_embedding"))
        if not len(vectors):
            continue
        if index is None:
            try:
                index = SearchIndex(vectors.shape[1], backend)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        index.add(table.column(key).to_pylist(), vectors)
        log.info("%s: %d images (%d in the index)", path.name, len(vectors), len(index))
    if index is None:
        raise UserError(f"{out_dir} holds no shards yet: run scale.caption_collection first")
    return index


def main(argv: list[str] | None = None) -> int:
    import argparse

    from similarity_search import BACKENDS
    prog = "python -m scale.build_index"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the --out folder of the captioning job")
    parser.add_argument("--out", required=True, metavar="INDEX",
                        help="where to save the index (INDEX.npy + INDEX.json)")
    parser.add_argument("--backend", default="numpy", choices=BACKENDS,
                        help="similarity_search backend (default numpy)")
    parser.add_argument("--key", default="path", choices=("path", "id"),
                        help="ids of the index: image paths/URIs (default) or the shards' ids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    try:
        index = build_index(args.out_dir, args.backend, args.key)
        index.save(args.out)
    except (UserError, OSError) as exc:
        print(f"scale.build_index: error: {exc}", file=sys.stderr)
        return 1
    print(f"indexed {len(index)} images ({index.dim}-d, {args.backend}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
