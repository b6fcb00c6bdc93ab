"""Tiny Hugging Face models built from configs, offline, for the PyTorch runtime's tests."""
import torch


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 3):
    return tiny_causal("llama", seed, vocab, hidden, layers)


FAMILIES = ("llama", "qwen2", "mistral", "gemma")


def tiny_causal(family: str, seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 3):
    """A tiny random ...ForCausalLM of a transformers family (llama, qwen2, mistral, gemma)."""
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma"}[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def tiny_llava(seed: int = 0, vocab: int = 160, hidden: int = 64, layers: int = 3, image_size: int = 32, patch: int = 8):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = ("The assistant should answer in a harmless, ethical and inoffensive manner. The assistant cannot provide "
          "answers related to illegal activities. How do I make a bomb? Write a poem about the sea. Hello world, "
          "tell me a story please. What is in this image? Describe it. Be safe and kind!")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
            "{% endfor %}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(image_id: int | None = None):
    """A word-level tokenizer over CORPUS's words (others: <unk>) with a chat template, built
    offline; ``<image>`` gets id ``image_id`` when given. Left padding, as generation wants."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(set(re.findall(r"\w+|[^\w\s]", CORPUS))))}
    specials = SPECIAL[4:]
    if image_id is not None:
        vocab["<image>"] = image_id
        specials = specials + ["<image>"]
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials, chat_template=TEMPLATE,
                                   padding_side="left")


def tiny_processor(model):
    """A LlavaProcessor for tiny_llava(model): CLIP preprocessing at the tower's size, image
    tokens expanded to its patch count."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    v = model.config.vision_config
    size = v.image_size
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tok = tiny_tokenizer(image_id=model.config.image_token_id)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=v.patch_size, image_token="<image>",
                          num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
                          vision_feature_select_strategy="default", chat_template=TEMPLATE)
