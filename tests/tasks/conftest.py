"""Fixtures of the task tests: a random tiny Qwen3 directory with its own tokenizer and chat
template, built offline (the families' chat-template tests share it)."""

import pytest

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "red green blue cat dog sun moon tree river stone".split()


@pytest.fixture(scope="module")
def qwen_like_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS) + " Repeat."] * 5, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                chat_template=TEMPLATE)
    path = tmp_path_factory.mktemp("qwen_like")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=len(fast), hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=6, max_position_embeddings=128, tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


