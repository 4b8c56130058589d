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

from errors import UsageError, UserError, cli_failure

log = logging.getLogger("scale")


def build_index(out_dir: str | os.PathLike, backend: str = "numpy", key: str = "path",
                **params: int):
    """A SearchIndex of every image embedding in `out_dir`'s shards, keyed by `key`.

    The shards are read one at a time, then the index is built once over all of
    them, so an ANN index (ivfpq, hnsw) is trained on the whole collection with
    settings for its real size; `params` override them (similarity_search.ann_params).
    """
    import numpy as np

    from scale import shards
    from similarity_search import SearchIndex

    if key not in ("path", "id"):
        raise UsageError(f"--key must be path or id, got {key!r}")
    if not Path(out_dir).is_dir():
        raise UserError(f"no such folder {out_dir}")
    ids, chunks = [], []
    for path, table in shards.iter_shards(out_dir, columns=[key, "image_embedding"]):
        vectors = shards.matrix(table.column("image_embedding"))
        if len(vectors):
            ids += table.column(key).to_pylist()
            chunks.append(vectors)
            log.info("%s: %d images (%d so far)", path.name, len(vectors), len(ids))
    if not chunks:
        raise UserError(f"{out_dir} holds no shards yet: run scale.caption_collection first")
    vectors = np.concatenate(chunks)
    del chunks
    try:
        return SearchIndex.from_vectors(ids, vectors, backend, **params)
    except ValueError as exc:
        raise UserError(str(exc)) from None


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
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="an ANN setting, e.g. nlist=16384, nprobe=64, ef_search=256 "
                             "(default: chosen from the collection's size; see BENCHMARKS.md)")
    args = parser.parse_args(argv)
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        if not value.strip().isdigit():
            parser.error(f"--param {item!r}: expected NAME=INTEGER")
        params[name.strip()] = int(value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    try:
        index = build_index(args.out_dir, args.backend, args.key, **params)
        index.save(args.out)
    except (UserError, OSError) as exc:
        return cli_failure("scale.build_index", exc)
    settings = ", ".join(f"{k}={v}" for k, v in index.params.items())
    print(f"indexed {len(index)} images ({index.dim}-d, {args.backend}"
          f"{': ' + settings if settings else ''}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
