"""Shared fixtures for the recommender-core tests: small slices of the real P5 beauty split, a tokenizer trained
on one of them, tiny from-scratch models, and an environment for running the scripts as subprocesses.

Slices keep the published user and item ids (nothing is renumbered) and the full datamaps.json, so item ids run
1..12101 as in beauty. load_dataset writes negative.txt beside the data when it is missing, so the shared data is
never loaded in place: every slice is a copy under pytest's tmp dir.
"""
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the reference rules' cache (ranking.py) of the whole test session lives in a temporary folder, shared by the
# scripts the tests run (they inherit the environment)
os.environ.setdefault("HDREC_CACHE", tempfile.mkdtemp(prefix="hdrec-cache-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one thread each, as the scripts run (two spinning OpenMP pools slow both down)
    torch.set_num_threads(1)
SHARED_DATA = ROOT.parent / "shared" / "data"
BEAUTY = SHARED_DATA / "p5" / "beauty"


def quiet(*_):
    pass


def make_slice(dst, n_users, seed, with_negatives_from=None):
    """A dataset dir with a seeded random sample of n_users beauty users (lines kept in file order)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    lines = (BEAUTY / "sequential.txt").read_text(encoding="utf-8").splitlines()
    picked = sorted(random.Random(seed).sample(range(len(lines)), n_users))
    (dst / "sequential.txt").write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")
    shutil.copy(BEAUTY / "datamaps.json", dst / "datamaps.json")
    if with_negatives_from is not None:
        shutil.copy(Path(with_negatives_from) / "negative.txt", dst / "negative.txt")
    return dst


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """~300 real beauty users; negative.txt is generated here once (seed 2022) and then shared by all tests.
    Treat it as read-only: tests that write files copy it first (see `copy_of_small`)."""
    from dataset import load_dataset
    d = make_slice(tmp_path_factory.mktemp("beauty300"), 300, seed=0)
    load_dataset(d, log=quiet)          # writes negative.txt
    return d


@pytest.fixture
def copy_of_small(small_data_dir, tmp_path):
    """A private copy of the small dataset (without negative.txt) that a test may modify."""
    d = tmp_path / "data"
    d.mkdir()
    for name in ("sequential.txt", "datamaps.json"):
        shutil.copy(small_data_dir / name, d / name)
    return d


@pytest.fixture(scope="session")
def small_ds(small_data_dir):
    from dataset import load_dataset
    return load_dataset(small_data_dir, log=quiet)


@pytest.fixture(scope="session")
def trained_tokenizer(small_ds):
    """(tokenizer, spm model bytes) trained on the task text of the small dataset, as pretrain.py does."""
    import tasks
    from module import train_tokenizer
    return train_tokenizer(tasks.tokenizer_corpus(small_ds, seed=1), vocab_size=8000)


@pytest.fixture(scope="session")
def tokenizer(trained_tokenizer):
    return trained_tokenizer[0]


@pytest.fixture(scope="session")
def atomic_tokenizer(small_ds):
    """A tokenizer as pretrain.py --id_tokens atomic trains it: the text alone, then every id word one token."""
    import tasks
    from module import train_tokenizer
    return train_tokenizer(list(tasks.tokenizer_corpus(small_ds, seed=1, ids=False)), 8000, tasks.id_words(small_ds))[0]


@pytest.fixture(scope="session")
def encoder(tokenizer, small_ds):
    import tasks
    enc = tasks.WordEncoder(tokenizer)
    enc.add([tasks.item_word(i) for i in range(1, small_ds.num_items + 1)] +
            [tasks.user_word(u) for u in small_ds.users])
    return enc


@pytest.fixture(scope="session")
def item_trie(tokenizer, encoder, small_ds):
    from evaluation import item_trie
    return item_trie(encoder, small_ds)


@pytest.fixture
def tiny_model(tokenizer):
    """A random-init `tiny` HDRec in eval mode, with non-zero whole-word embeddings so they matter."""
    from transformers import T5ForConditionalGeneration
    from module import HDRec, t5_config_for
    torch.manual_seed(0)
    model = HDRec(T5ForConditionalGeneration(t5_config_for("tiny", tokenizer)), task_num=4, prompt_num=3, seed=1)
    with torch.no_grad():
        model.whole_word.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def script_env():
    """Environment for running the scripts as subprocesses: offline, one CPU thread (on this shared 2-core machine
    two spinning OpenMP threads per process make a step many times slower, and one thread is deterministic)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="session")
def python():
    return sys.executable
