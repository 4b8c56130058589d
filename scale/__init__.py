"""Captioning and indexing large image collections with Ray Data (optional extra).

    pip install -r requirements-scale.txt
    python -m scale.caption_collection --images DIR_GLOB_OR_URI --out OUT_DIR   # caption
    python main.py --import-parquet OUT_DIR                                    # into the databases
    python -m scale.build_index OUT_DIR --backend numpy --out INDEX            # or a search index

`caption_collection.py` runs the pipeline's stage modules as a Ray Data
pipeline; `shards.py` is the output's file contract (Parquet shards,
manifest, failures) and its import; `build_index.py` builds a
similarity_search.SearchIndex from the shards. Importing this package imports
neither Ray nor torch.
"""
