"""amg-engine: batched Anti-Memorization Guidance for text-to-audio diffusion, and memorization audits.

The repository's top-level folders are this package's subpackages: ``amg_engine.engine`` (models,
samplers, guidance, the step), ``amg_engine.kernels`` (Triton kernels and their torch twins),
``amg_engine.index`` (embedders, the training index, search) and ``amg_engine.jobs`` (manifests,
runs, the audit, the ``amg`` CLI). ``pyproject.toml`` maps the name ``amg_engine`` onto the
repository root, for editable and wheel installs alike.

The four folders have no ``__init__.py`` on purpose: from the repository root (``python -m ...``
puts it first on ``sys.path``) they are namespace portions, which lose to any installed package of
the same name (Hugging Face's ``kernels``, which transformers imports), so nothing of ours can shadow
another distribution, and nothing imports them under their bare names (tests/test_architecture.py).
"""
