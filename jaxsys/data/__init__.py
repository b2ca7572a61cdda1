"""Training data without downloads: the embedded word-problem corpus and its verifier,
tokenizers (bytes or a Hugging Face folder), and resumable token datasets. numpy only."""
from jaxsys.data.corpus import (
    Problem,
    check_solution,
    count_steps,
    extract_answer,
    format_example,
    format_prompt,
    format_question_solution,
    generate_problems,
    solve,
    verify,
)
from jaxsys.data.dataset import TokenDataset, corpus_dataset, load_documents
from jaxsys.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, WordTokenizer, load_tokenizer

__all__ = [
    "Problem", "check_solution", "count_steps", "extract_answer", "format_example",
    "format_prompt", "format_question_solution", "generate_problems", "solve", "verify",
    "TokenDataset", "corpus_dataset", "load_documents",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "WordTokenizer", "load_tokenizer",
]
