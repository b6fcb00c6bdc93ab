"""Tiny Hugging Face models built from configs, offline, for the PyTorch runtime's tests."""
import torch


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


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
