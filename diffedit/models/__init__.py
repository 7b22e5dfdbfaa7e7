"""The Stable Diffusion networks, written from the diffusers/transformers parameter names: configs,
the CLIP tokenizer and text encoder, the UNet, the VAE and their shared blocks."""
