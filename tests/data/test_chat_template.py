"""A model directory's tokenizer.json and chat template against transformers' AutoTokenizer on
the same files: a tiny byte-level BPE built offline with `tokenizers`, and templates in the
style of Llama 3's (system header, alternation check) and Qwen3's (namespace, thinking)."""

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from jaxgpt.data.tokenizer import FamilyTokenizer  # noqa: E402

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are helpful." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

QWEN3 = """{%- for message in messages %}
{%- if message.role == "system" and loop.first %}<|im_start|>system
{{ message.content }}<|im_end|>
{% elif message.role == "user" %}<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == "assistant" %}<|im_start|>assistant
{% set ns = namespace(text=message.content) %}
{%- if '</think>' in ns.text %}{% set ns.text = ns.text.split('</think>')[-1].lstrip('\\n') %}{% endif %}
{{- ns.text }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]
CHATS = [
    [{"role": "user", "content": "hello world, how are you?"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Say hi"},
     {"role": "assistant", "content": "<think>\nhm\n</think>\n\nhi there"},
     {"role": "user", "content": "again, ünïcode ☃"}],
]


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def tok_dir(request, tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=301, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, how are you today? Say hi, be brief."] * 10, trainer)
    template, eos = (LLAMA3, "<|eot_id|>") if request.param == "llama3" else (QWEN3, "<|im_end|>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token=eos, chat_template=template)
    path = tmp_path_factory.mktemp(request.param)
    fast.save_pretrained(path)
    end = tok.token_to_id("<|end_of_text|>")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, tok.token_to_id(eos)]}))
    return path


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_ids_equal_apply_chat_template(tok_dir, chat, gen):
    ours = FamilyTokenizer(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    expect = ref.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=True)
    expect = expect["input_ids"] if isinstance(expect, dict) or hasattr(expect, "keys") else expect
    assert ours.encode_chat(CHATS[chat], add_generation_prompt=gen) == list(expect)
    text = ref.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=False)
    assert ours.render_chat(CHATS[chat], gen) == text
    assert ours.decode(ours.encode(text)) == text


def test_stop_ids_and_vocab(tok_dir):
    ours = FamilyTokenizer(tok_dir)
    t = ours.tokenizer
    eos = "<|eot_id|>" if "llama3" in tok_dir.name else "<|im_end|>"
    assert ours.stop_ids == (t.token_to_id("<|end_of_text|>"), t.token_to_id(eos))
    assert ours.n_vocab == len(transformers.AutoTokenizer.from_pretrained(tok_dir))


def test_template_errors_are_one_line(tok_dir):
    ours = FamilyTokenizer(tok_dir)
    if "llama3" in tok_dir.name:
        with pytest.raises(ValueError, match="roles must alternate"):
            ours.render_chat([{"role": "assistant", "content": "x"}])
    ours.chat_template = "{% for m in messages %}"
    with pytest.raises(ValueError, match="chat template line"):
        ours.render_chat([{"role": "user", "content": "x"}])
    ours.chat_template = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses internals
    with pytest.raises(ValueError, match="chat template"):
        ours.render_chat([{"role": "user", "content": "x"}])


def test_chat_template_for_instruction_tuning(tok_dir):
    """Instruction records become one user turn and one assistant turn of the model's template;
    the query is a prefix of the training text, and the response extracts back."""
    from jaxgpt.data.prompts import ChatTemplate, extract_response

    tok = FamilyTokenizer(tok_dir)
    t = ChatTemplate(tok)
    rec = {"instruction": "Say hi", "input": "be brief", "output": "hi there"}
    ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
    turns = [{"role": "user", "content": "Say hi\n\nbe brief"}, {"role": "assistant", "content": "hi there"}]
    assert t.full(rec) == ref.apply_chat_template(turns, tokenize=False)
    assert t.query(rec) == ref.apply_chat_template(turns[:1], add_generation_prompt=True, tokenize=False)
    assert t.full(rec).startswith(t.query(rec))
    assert extract_response(t.query(rec) + "hi there", t, query=t.query(rec)) == "hi there"


def test_chat_cli_replies_as_transformers_generate(tok_dir, tmp_path, monkeypatch, capsys):
    """`python -m jaxgpt.cli.chat` on a model directory with its tokenizer: two turns, each
    the greedy continuation transformers gives for the whole conversation so far."""
    import io

    import torch

    from jaxgpt.cli import chat

    ref_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(ref_tok), hidden_size=16, intermediate_size=20,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    ref_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text((tok_dir / "generation_config.json").read_text())
    stops = FamilyTokenizer(tmp_path).stop_ids
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\nhow are you?\nexit\n"))
    assert chat.main(["--model", str(tmp_path), "--max-new-tokens", "6"]) == 0
    replies = capsys.readouterr().out.splitlines()
    messages = []
    for text, got in zip(["hello world", "how are you?"], replies):
        messages.append({"role": "user", "content": text})
        ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=list(stops), pad_token_id=0)[0, len(ids):].tolist()
        out = out[:min([i for i, t in enumerate(out) if t in stops], default=len(out))]
        expect = ref_tok.decode(out, skip_special_tokens=True).strip()
        assert got == expect
        messages.append({"role": "assistant", "content": expect})
    assert len(replies) == 2 and any(replies)  # not two empty strings
