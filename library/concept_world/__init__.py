"""A tiny "concept world": synthetic latent scenes and a small text-to-image model trained on them.

Nobody on this project has real SD weights or a GPU, so the project trains its own miniature
latent diffusion model in which concepts (a colour, a size, a shape) can be erased or enhanced by
LECO and the effect measured with a deterministic classifier.

Modules:
    scenes: scene generator and prompt grammar (torch only).
    classifier: deterministic latent classifier (torch only).
    sampling: prompt encoding, CFG sampling, latent display.
    model: build, train, save, cache (``ensure_concept_model``).
    evaluate: accuracy and per-prompt rates.

Run ``python -m library.concept_world build`` / ``eval``.
"""
