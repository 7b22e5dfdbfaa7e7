"""Reading and writing model files: diffusers-layout folders, hub ids, single original-layout
files; strict, safe (safetensors first, `weights_only=True`), no network inside a loader."""
