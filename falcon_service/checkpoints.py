"""Random-weight Falcon checkpoints for offline development, tests, benchmarks and GPU checks.

They have the Falcon-7B architecture (multi-query attention, parallel attention,
rotary positions, no bias, head_dim 64) at a small size, or at Falcon-7B's exact size
(`7b`, bfloat16, built directly on the GPU when there is one), and a byte-level BPE
tokenizer trained here with `tokenizers` whose vocabulary is the model's: every id
decodes to text. Nothing is downloaded.
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
BUILDER_VERSION = 2
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
    dtype: str = "float32"  # what the weights are stored as


PRESETS: dict[str, FalconShape] = {
    "tiny": FalconShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=1024),
    "small": FalconShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, vocab_size=2048),
    # tiiuae/falcon-7b-instruct's shape and dtype: 6.92 billion parameters, 13.8 GB
    "7b": FalconShape(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, vocab_size=65024,
                      dtype="bfloat16"),
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


def _corpus(seed: int = 0, lines: int = 3000, max_syllables: int = 4) -> list[str]:
    """Fixed text plus deterministic pseudo-words: 3,000 lines give a few thousand merges, 60,000 lines
    of longer words Falcon-7B's 65,024."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "ng"]
    text = [_TEXT] * 4
    for _ in range(lines):
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, max_syllables))) for _ in range(12)]
        text.append(" ".join(words).capitalize() + ".")
    return text


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer (like Falcon's) of exactly `vocab_size` tokens, trained offline on a
    built-in corpus (a few seconds for 2,048 tokens, about 15 s for 65,024)."""
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
    corpus = _corpus(seed) if vocab_size <= 4096 else _corpus(seed, lines=60_000, max_syllables=5)
    tok.train_from_iterator(corpus, trainer=trainer)
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


def default_build_device() -> str:
    """Where random weights are drawn: the GPU when there is one (Falcon-7B's in about a second)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_random_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, device: str | None = None
                            ) -> Path:
    """Write a random-weight Falcon checkpoint (weights, config, tokenizer) to `out_dir`.

    The weights are created directly on `device` in the preset's dtype (no float32 copy on the way)
    and written in shards of at most 2 GB, so that saving never holds a second whole copy in memory.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    shape = PRESETS[preset]
    device = device or default_build_device()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(shape.vocab_size, seed)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(falcon_config(shape, eos), dtype=getattr(torch, shape.dtype))
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    del model
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eos, eos_token_id=eos).save_pretrained(out)
    (out / RANDOM_MARKER).write_text(
        json.dumps({"random_weights": True, "preset": preset, "seed": seed, "device": device, **asdict(shape)},
                   indent=2)
    )
    return out


def random_checkpoint_revision(preset: str, seed: int = 0, device: str = "cpu") -> str:
    """A stable id of what `build_random_checkpoint(preset=preset, seed=seed, device=device)` writes,
    without building it (the same seed draws other weights on a GPU)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    recipe = {"preset": preset, "seed": seed, "builder": BUILDER_VERSION, **asdict(PRESETS[preset])}
    if device != "cpu":
        recipe["device"] = device
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
