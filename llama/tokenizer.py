"""Llama 3 tokenizer (tiktoken BPE from Meta's `tokenizer.model`) and its chat format.

Same token ids and prompt layout as Meta's reference code (github.com/meta-llama/llama3, llama/tokenizer.py):
    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>...
    <|start_header_id|>assistant<|end_header_id|>\n\n
"""
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# Meta's pre-tokenisation regex for Llama 3.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256


def special_token_names():
    """The 256 special tokens, in id order after the BPE ranks (Meta's list)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>",
             "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
             "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]
    return names


class Tokenizer:
    def __init__(self, model_path):
        model_path = Path(model_path)
        try:
            mergeable_ranks = load_tiktoken_bpe(str(model_path))
        except Exception as e:  # tiktoken raises ValueError/binascii.Error on a file that is not "base64 rank" lines
            raise ValueError(f"{model_path}: not a tiktoken BPE file (lines of 'base64-token rank'): {e}") from e
        n_base = len(mergeable_ranks)
        self.special_tokens = {name: n_base + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(name=model_path.name, pat_str=PAT_STR,
                                       mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.stop_tokens = [self.eos_id, self.eot_id]

    def encode(self, text, bos=False, eos=False):
        # Special-token text inside user content is encoded as plain text, never as a control token.
        ids = self.model.encode(text, allowed_special=set(), disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.model.decode(list(ids))


class ChatFormat:
    """Turns a dialog into prompt ids; the interface every chat backend in llama/ shares."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = list(tokenizer.stop_tokens)
        self.pad_id = tokenizer.eos_id  # any id works: padded positions are masked out

    def encode_header(self, message):
        t = self.tokenizer
        return ([t.special_tokens["<|start_header_id|>"]] + t.encode(message["role"])
                + [t.special_tokens["<|end_header_id|>"]] + t.encode("\n\n"))

    def encode_message(self, message):
        return self.encode_header(message) + self.tokenizer.encode(message["content"].strip()) + [self.tokenizer.eot_id]

    def encode_dialog_prompt(self, dialog):
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids += self.encode_message(message)
        return ids + self.encode_header({"role": "assistant", "content": ""})  # the model writes the reply next

    def decode(self, ids):
        return self.tokenizer.decode(ids)
