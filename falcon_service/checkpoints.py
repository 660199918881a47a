"""Random-weight Falcon checkpoints for offline development, tests and benchmarks.

They have the Falcon-7B architecture (multi-query attention, parallel attention,
rotary positions, no bias, head_dim 64) at a small size, and a byte-level BPE
tokenizer trained here with `tokenizers`, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
HEAD_DIM = 64
# Bump whenever `build_random_checkpoint` writes different files for the same preset and seed:
# importers use it to tell a stored random checkpoint from a freshly built one.
BUILDER_VERSION = 1
# Written into every random checkpoint, so its weights are never mistaken for trained ones.
RANDOM_MARKER = "random_weights.json"


@dataclass(frozen=True)
class FalconShape:
    """The size of a random checkpoint; everything else is Falcon-7B's."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048


PRESETS: dict[str, FalconShape] = {
    "tiny": FalconShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=1024),
    "small": FalconShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, vocab_size=2048),
}

_TEXT = """\
The falcon is a bird of prey. Falcons are fast, and the peregrine falcon is the fastest
animal on earth. User: what do falcons eat? Assistant: Falcons eat smaller birds, bats,
rodents and insects. The model answers questions, writes stories and explains code.
Large language models predict the next token. A server batches requests to use the GPU well.
Naïve café résumé über straße façade — “quotes” and ‘apostrophes’ cost more than one byte.
日本語のテキスト、中文文本、한국어 텍스트, Ελληνικά, русский текст, emoji 🦅🚀✨👍🏽.
def add(a, b):\n    return a + b\n
{"key": "value", "list": [1, 2, 3]} 0123456789 +-*/=<>()[]{}!?.,;:'"
"""


def _corpus(seed: int = 0) -> list[str]:
    """Fixed text plus deterministic pseudo-words, enough to learn a few thousand merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "ng"]
    lines = [_TEXT] * 4
    for _ in range(3000):
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(12)]
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer (like Falcon's) trained offline on a built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, model_max_length=2048)


def falcon_config(shape: FalconShape, eos_token_id: int):
    """A `FalconConfig` with Falcon-7B's architecture flags at the given size."""
    from transformers import FalconConfig

    if shape.hidden_size // shape.num_attention_heads != HEAD_DIM:
        raise ValueError(f"head_dim must be {HEAD_DIM}: hidden_size / num_attention_heads")
    return FalconConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        new_decoder_architecture=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def build_random_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Falcon checkpoint (weights, config, tokenizer) to `out_dir`."""
    import torch
    from transformers import FalconForCausalLM, GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    shape = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.vocab_size, seed)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    torch.manual_seed(seed)
    model = FalconForCausalLM(falcon_config(shape, eos))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos).save_pretrained(out)
    (out / RANDOM_MARKER).write_text(
        json.dumps({"random_weights": True, "preset": preset, "seed": seed, **asdict(shape)}, indent=2)
    )
    return out


def random_checkpoint_revision(preset: str, seed: int = 0) -> str:
    """A stable id of what `build_random_checkpoint(preset=preset, seed=seed)` writes, without building it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    recipe = {"preset": preset, "seed": seed, "builder": BUILDER_VERSION, **asdict(PRESETS[preset])}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
