"""Bridges to outside tools: k-diffusion-style sampler functions and a diffusers scheduler.

Import the submodules directly (``geosample.integrations.kdiffusion``,
``geosample.integrations.diffusers``); the diffusers one needs the optional ``[diffusers]`` extra.
"""
