"""Hierarchical distillation of the sports dataset: all five stages over data/sports/explanation.json.

    torchrun --nproc_per_node 1 data/sports/distillation_sports.py --ckpt_dir llama/llama-3-8b-instruct/ \
        --tokenizer_path llama/tokenizer.model --max_seq_len 512 --max_batch_size 6

The work is done by data/distill.py (same flags; --data_dir overrides this folder).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

from data.distill import main
from utils import report_user_errors

if __name__ == "__main__":
    report_user_errors()
    main(default_data_dir=str(Path(__file__).resolve().parent))
