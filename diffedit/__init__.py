"""DiffEdit on Stable Diffusion, from scratch."""
