"""Text data for moelab: built-in and user corpora, document splits, BPE tokenizer, packing, MLM."""

from moelab.data.corpora import CorpusInfo, Document, corpus_domains, list_corpora, load_corpus
from moelab.data.dataset import PackedBlocks, TokenStream, pack_blocks, tokenize_documents
from moelab.data.mlm import mask_tokens
from moelab.data.prepare import PreparedData, load_prepared, prepare_data
from moelab.data.splits import apply_splits, load_splits, save_splits, split_documents
from moelab.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids, train_tokenizer

__all__ = [
    "CorpusInfo",
    "Document",
    "PackedBlocks",
    "PreparedData",
    "SPECIAL_TOKENS",
    "TokenStream",
    "apply_splits",
    "corpus_domains",
    "list_corpora",
    "load_corpus",
    "load_prepared",
    "load_splits",
    "load_tokenizer",
    "mask_tokens",
    "pack_blocks",
    "prepare_data",
    "save_splits",
    "special_ids",
    "split_documents",
    "tokenize_documents",
    "train_tokenizer",
]
