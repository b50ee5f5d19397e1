"""Datasets: preparation (Tiny Shakespeare, ListOps, tokenised corpora), tokenizers and token streams.

``prepare_*`` and ``import_listops`` write a prepared dataset directory (format: ``nrgpt.data.stream``);
``load_tokenizer`` and ``TokenStream`` read one. Every bad input raises ``DataError`` with a one-line
message saying what is wrong and how to fix it.
"""

from .listops import (
    LISTOPS_PRESETS,
    ListOpsConfig,
    evaluate_listops_expression,
    import_listops,
    listops_config,
    listops_sample_info,
    prepare_listops,
    read_listops_test,
    split_sample,
)
from .stream import DataError, TokenStream, load_meta
from .text import find_raw_file, prepare_corpus, prepare_shakespeare_char
from .tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "DataError", "TokenStream", "load_meta", "Tokenizer", "load_tokenizer", "find_raw_file",
    "prepare_shakespeare_char", "prepare_corpus", "LISTOPS_PRESETS", "ListOpsConfig", "listops_config",
    "prepare_listops", "import_listops", "evaluate_listops_expression", "split_sample", "listops_sample_info",
    "read_listops_test",
]
