"""The trainer of the bundled toy ternary block-diffusion model (torch; the engine never imports
it).  Run it as `python scripts/train_toy_dlm.py`; the recipe is documented in `cli`.

- model:      the torch model (BitLinear, Layer, ToyDLM, TOY_SHAPE/Shape) and attention masks
- data:       the training mix and curriculum, the fast Encoder, DataConfig, the batch of a step
- losses:     the autoregressive (and recall-attention) and block-diffusion losses
- decode:     the torch-side decoder, the held-out evaluation, the recommended decode settings
- export:     GGUF export, and the torch model and logits of a toy GGUF file
- checkpoint: save, resume, start a stage from (--init-from, KV heads grown), RNG states
- train:      the learning-rate schedule, the optimizer steps, a run, the step-time probe
- cli:        the recipe (module docstring), the command line, the final eval, main

Each module lists its public names in `__all__`.
"""
