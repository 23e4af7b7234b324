"""A tiny random Llama and its byte-level BPE tokenizer, built offline in seconds.

What a real engine needs to serve a model without a hub: ``config.json`` +
``model.safetensors`` (random weights, hidden 128, 2 layers) and a Hugging Face tokenizer
(``tokenizer.json`` trained here on a fixed corpus, ``tokenizer_config.json`` with BOS/EOS
and a Llama-3-style chat template). The same directory is what ``--tokenizer`` takes on the
gateway and the reference engine, so every part counts the same tokens.

    python instances/tiny_llama.py build/tiny-llama                 # tokenizer + model
    python instances/tiny_llama.py build/tiny-llama --tokenizer-only

The tokenizer needs only ``tokenizers``; the model needs ``transformers`` and ``torch`` (the
vLLM environment has both). Outputs are cached: a directory whose ``llmfleet-tiny.json``
names this builder's version is reused as it is. The module imports nothing of the project,
so any Python environment with those packages can run it by path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

BUILD_VERSION = 1
STAMP = "llmfleet-tiny.json"
VOCAB_SIZE = 512
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's template without its date and tool preamble: BOS, a header per message, and the
# assistant's header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A small word list; _corpus strings it into a fixed text to train the BPE merges on.
_WORD_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "cache prefix token replica router gateway request stream model engine block hash ring "
    "user system assistant hello world question answer please tell me about short long"
)
_WORDS = _WORD_TEXT.split()


def _corpus(lines: int = 4000) -> list[str]:
    """A fixed pseudo-English corpus (an LCG over a word list): same text on every machine."""
    state = 12345
    out = []
    for _ in range(lines):
        words = []
        for _ in range(12):
            state = (state * 1103515245 + 12345) % 2**31
            words.append(_WORDS[state % len(_WORDS)])
        out.append(" ".join(words) + ".")
    out.append("0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
    return out


def build_tokenizer(out_dir: str) -> None:
    """Train a byte-level BPE tokenizer (``VOCAB_SIZE`` ids) and write it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama 3: a completion prompt gets a BOS; chat prompts get theirs from the template.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, f, indent=1)


def build_model(out_dir: str, seed: int = 0) -> None:
    """Random Llama weights for the tokenizer in ``out_dir`` (needs transformers + torch)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS)}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], tie_word_embeddings=False,
        torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=ids[BOS], eos_token_id=ids[EOS]).save_pretrained(out_dir)


def is_built(out_dir: str, with_model: bool) -> bool:
    """Whether ``out_dir`` holds this version's build (with the model if asked)."""
    try:
        with open(os.path.join(out_dir, STAMP), encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    return stamp.get("version") == BUILD_VERSION and (stamp.get("model") or not with_model)


def ensure_built(out_dir: str, with_model: bool = True) -> str:
    """Build into ``out_dir`` unless a build of this version is already there; the path.

    Builds in a temporary sibling directory and renames it into place, so a concurrent or
    interrupted build never leaves a half-written model where a reader looks.
    """
    if is_built(out_dir, with_model):
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-llama-", dir=parent)
    build_tokenizer(tmp)
    if with_model:
        build_model(tmp)
    with open(os.path.join(tmp, STAMP), "w", encoding="utf-8") as f:
        json.dump({"version": BUILD_VERSION, "model": with_model}, f)
    if os.path.isdir(out_dir):
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another builder won the race: theirs is as good as ours
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="build/tiny-llama")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="only the tokenizer (no transformers/torch needed)")
    args = parser.parse_args(argv)
    path = ensure_built(args.out_dir, with_model=not args.tokenizer_only)
    print(json.dumps({"event": "tiny_llama_ready", "path": os.path.abspath(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
