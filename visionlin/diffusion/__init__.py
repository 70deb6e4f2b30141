"""Linear attention for diffusers pipelines (needs the ``[diffusion]`` extra)."""
