"""Data: prepare token shards from a corpus, and stream batches from them.

    prepare(source, out_dir, ...) -> metadata     lab/data/prep.py
    open_dataset(path) -> TokenDataset            lab/data/format.py
    TrainStream(dataset, seq_len, ...).batch(step) / .iterator(start_step)
    eval_batches(dataset, seq_len, ...)           lab/data/pipeline.py
    default_data_path()                           lab/data/cache.py
"""

from lab.data.cache import default_data_path
from lab.data.format import FORMAT_VERSION, TokenDataset, check_vocab, open_dataset
from lab.data.pipeline import StreamIterator, TrainStream, eval_batches
from lab.data.prep import prepare

__all__ = [
    "FORMAT_VERSION",
    "StreamIterator",
    "TokenDataset",
    "TrainStream",
    "check_vocab",
    "default_data_path",
    "eval_batches",
    "open_dataset",
    "prepare",
]
