"""bicro-clean: clean web-crawled image-text datasets with BiCro soft correspondence labels.

The one import package of the distribution. Its subpackages live in the repository's top-level folders
(`pyproject.toml` maps them): `bicro_clean.pipeline` (pipeline/), `bicro_clean.models` (models/),
`bicro_clean.flows` (flows/) and `bicro_clean.lab` (lab/).
"""
